//! Issue 13: defects found by probing the release binary as a remote client, an operator and
//! a fault would. Each test reproduces the probe against the real binaries and checks the
//! fixed behaviour.

use collector_e2e::*;
use std::time::Duration;

/// Item 1: one rejected sample must not leave the batch deadline in the past (the loop then
/// polled with a zero timeout, 100 % CPU, until a valid sample came).
#[test]
fn one_rejected_sample_leaves_the_worker_idle() {
    let d = Daemon::start(Setup::default());
    let worker = d.worker_pid();
    let udp = d.udp.expect("udp address");
    send_udp(udp, &[encode(&sample("forged-1", "not-the-secret"))]);
    d.wait_counter("invalid_signature", 1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(worker) - before;
    // Idle: a heartbeat and a sweep a second. Spinning used the whole 3 s (300 ticks at 100 Hz).
    assert!(
        used * 10 < ticks_per_second() * 3,
        "an idle worker used {used} ticks of CPU in 3 s after one rejected sample"
    );
}

/// Item 7: a worker that gets SIGTERM (PDEATHSIG, the fast stop, a heartbeat timeout) stops
/// gracefully and stores the samples it holds.
#[test]
fn sigterm_to_a_worker_stores_the_samples_it_holds() {
    let d = Daemon::start(
        Setup::default()
            .collector("batch_timeout = 5")
            .collector("batch_size = 1000"),
    );
    let worker = d.worker_pid();
    let udp = d.udp.expect("udp address");
    let payloads: Vec<Vec<u8>> = (0..100)
        .map(|i| encode(&sample(&format!("term-{i}"), SECRET)))
        .collect();
    send_udp(udp, &payloads);
    assert_eq!(
        d.wait_counter("samples_received", 100, Duration::from_secs(10)),
        100
    );
    assert_eq!(
        d.count_samples(),
        0,
        "batch_timeout 5 s: nothing stored yet"
    );
    // SAFETY: kill(2) on the worker we just looked up.
    unsafe { libc::kill(worker, libc::SIGTERM) };
    assert_eq!(
        d.wait_samples(100, Duration::from_secs(10)),
        100,
        "log:\n{}",
        d.log()
    );
    assert!(
        !d.log().contains("signal SIGTERM"),
        "the worker died of SIGTERM; log:\n{}",
        d.log()
    );
}

/// Start `n` threads that each flood `addr` with ceilometer `tcp://` frames of samples signed
/// with the wrong secret (all rejected, so no back-pressure ever pauses them) until the
/// returned flag is set.
fn flood_unsigned(
    addr: std::net::SocketAddr,
    n: usize,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    Vec<std::thread::JoinHandle<()>>,
) {
    use std::io::Write;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut chunk = Vec::new();
    for i in 0..2000 {
        chunk.extend_from_slice(&tcp_frame(&sample(&format!("flood-{i}"), "wrong")));
    }
    let handles = (0..n)
        .map(|_| {
            let stop = stop.clone();
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                    return;
                };
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Err(e) = s.write_all(&chunk) {
                        if e.kind() != std::io::ErrorKind::WouldBlock
                            && e.kind() != std::io::ErrorKind::TimedOut
                        {
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    (stop, handles)
}

/// Item 4: a client that floods a worker cannot monopolise its loop: another client is
/// answered promptly and the worker keeps sending heartbeats.
#[test]
fn a_flooding_client_does_not_starve_others_or_the_heartbeat() {
    let d = Daemon::start(Setup::default().service("worker_timeout = 60"));
    let _worker = d.worker_pid();
    let (stop, floods) = flood_unsigned(d.tcp.expect("tcp address"), 2);
    std::thread::sleep(Duration::from_secs(3));
    let mut c = RpcClient::connect(d.rpc.expect("rpc address")).expect("connect");
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let t = std::time::Instant::now();
    let r = c.call(vec![sample("fair-1", SECRET)]);
    let took = t.elapsed();
    let status = d.status();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in floods {
        let _ = h.join();
    }
    eprintln!(
        "answered after {took:?} under a flood; heartbeat {} s old",
        status["workers"][0]["since_heartbeat_s"]
    );
    let r = r.expect("the well-behaved client is answered");
    assert_eq!(r.stored, 1, "{r:?}");
    // One second is the issue's bound; a debug build on a shared 2-core machine gets twice that.
    assert!(
        took < Duration::from_secs(2),
        "answered after {took:?} under a flood"
    );
    let since = status["workers"][0]["since_heartbeat_s"]
        .as_f64()
        .unwrap_or(f64::MAX);
    assert!(since < 3.0, "heartbeat {since} s old under a flood");
}

/// Open `n` ceilometer `tcp://` connections that each announce a frame of 16 MiB − 1 and
/// send `body` bytes of it, never finishing it. Returns the connections (to keep them open).
fn partial_frames(addr: std::net::SocketAddr, n: usize, body: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    let chunk = vec![0x90u8; 1 << 20];
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).expect("connect");
                s.set_write_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let _ = s.write_all(&((16u64 << 20) - 1).to_le_bytes());
                let mut sent = 0;
                while sent < body {
                    let k = chunk.len().min(body - sent);
                    // A paused connection stops being read: its writes then time out.
                    if s.write_all(&chunk[..k]).is_err() {
                        break;
                    }
                    sent += k;
                }
                s
            })
        })
        .collect();
    handles.into_iter().filter_map(|h| h.join().ok()).collect()
}

/// Item 2: what connections may buffer is bounded per worker (`max_buffered_bytes`, 256 MiB
/// by default), not by max_connections × max_frame_bytes; a well-behaved client on the same
/// worker is still answered.
#[test]
fn partial_frames_stay_within_the_buffered_bytes_budget() {
    let d = Daemon::start(Setup::default());
    let worker = d.worker_pid();
    let conns = partial_frames(d.tcp.expect("tcp address"), 40, 15 << 20);
    let mut c = RpcClient::connect(d.rpc.expect("rpc address")).expect("connect");
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let r = c.call(vec![sample("budget-1", SECRET)]);
    let hwm_mib = proc_status_kib(worker, "VmHWM") / 1024;
    let rss_mib = proc_status_kib(worker, "VmRSS") / 1024;
    eprintln!("40 partial 15 MiB frames: worker peak RSS {hwm_mib} MiB, now {rss_mib} MiB");
    // The budget stayed spent: partial frames were dropped, each with a logged reason.
    let dropped = wait_for(Duration::from_secs(5), || {
        d.log().contains("dropping a partial frame").then_some(())
    });
    drop(conns);
    assert!(
        dropped.is_some(),
        "no partial frame dropped; log:\n{}",
        d.log()
    );
    assert_eq!(r.expect("answered").stored, 1);
    // Measured 296-312 MiB (allocator slack while buffers are dropped and regrown); before:
    // 692 MiB.
    assert!(
        hwm_mib < 256 + 80,
        "worker peak RSS {hwm_mib} MiB with 40 partial frames (budget 256 MiB)"
    );
}

/// Item 2: a frame must be complete within `frame_timeout`; a trickle of bytes, which resets
/// the idle timer, cannot keep a partial frame (and its buffer) alive.
#[test]
fn a_trickled_frame_is_dropped_at_the_frame_deadline() {
    use std::io::{Read, Write};
    let d = Daemon::start(Setup::default().collector("frame_timeout = 2"));
    let mut s = std::net::TcpStream::connect(d.tcp.expect("tcp address")).expect("connect");
    s.write_all(&1000u64.to_le_bytes()).expect("header");
    let t = std::time::Instant::now();
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(8) {
        if s.write_all(&[0x90]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !closed {
        s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        closed =
            matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_)) && d.log().contains("frame_timeout");
    }
    assert!(
        closed,
        "a trickled frame was kept for 8 s; log:\n{}",
        d.log()
    );
    assert!(d.log().contains("frame_timeout"), "log:\n{}", d.log());
}

/// `[0, 1, "x", [[nil × n]]]`: one RPC request of `n` nils (msgpack array32 of 0xc0).
fn rpc_of_nils(n: usize) -> Vec<u8> {
    let mut out = vec![0x94, 0x00, 0x01, 0xa1, b'x', 0x91, 0xdd];
    out.extend_from_slice(&(n as u32).to_be_bytes());
    out.resize(out.len() + n, 0xc0);
    out
}

/// Item 3: decoding no longer inflates a frame ~38×: a frame of more elements than
/// `max_frame_elements` is refused before it is decoded, and the worker's peak RSS stays
/// under the documented bound (128 MiB for one 16 MiB frame).
#[test]
fn a_frame_of_millions_of_elements_is_refused_before_decoding() {
    use std::io::{Read, Write};
    let d = Daemon::start(Setup::default());
    let worker = d.worker_pid();
    let mut s = std::net::TcpStream::connect(d.rpc.expect("rpc address")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // 16 MiB − 64 bytes of nils: just under max_frame_bytes.
    let frame = rpc_of_nils((16 << 20) - 64);
    let _ = s.write_all(&frame);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    std::thread::sleep(Duration::from_millis(500));
    let hwm_mib = proc_status_kib(worker, "VmHWM") / 1024;
    let rss_mib = proc_status_kib(worker, "VmRSS") / 1024;
    eprintln!("16 MiB frame of nils: worker peak RSS {hwm_mib} MiB, after {rss_mib} MiB");
    assert!(
        hwm_mib < 128,
        "worker peak RSS {hwm_mib} MiB for one 16 MiB frame"
    );
    assert!(d.log().contains("max_frame_elements"), "log:\n{}", d.log());
    // The worker still serves.
    let mut c = RpcClient::connect(d.rpc.expect("rpc address")).expect("connect");
    assert_eq!(
        c.call(vec![sample("after-nils", SECRET)])
            .expect("call")
            .stored,
        1
    );

    // A frame just under the limit is decoded and answered, and its memory given back.
    let mut s = std::net::TcpStream::connect(d.rpc.expect("rpc address")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(&rpc_of_nils(1_000_000)).expect("send");
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).expect("an answer");
    assert!(n > 0 && String::from_utf8_lossy(&buf[..n]).contains("unknown method"));
    std::thread::sleep(Duration::from_millis(1500));
    let hwm_mib = proc_status_kib(worker, "VmHWM") / 1024;
    let rss_mib = proc_status_kib(worker, "VmRSS") / 1024;
    eprintln!("1 M elements: worker peak RSS {hwm_mib} MiB, after {rss_mib} MiB");
    assert!(
        hwm_mib < 128,
        "worker peak RSS {hwm_mib} MiB for 1 M elements"
    );
    assert!(
        rss_mib < 48,
        "worker RSS {rss_mib} MiB after the frame was answered"
    );
}

/// Item 5: text from the network is logged with control characters escaped and its length
/// capped: a message_id holding a newline cannot forge a log line.
#[test]
fn network_text_cannot_forge_log_lines() {
    let d = Daemon::start(Setup::default());
    let udp = d.udp.expect("udp address");
    let forged = "x\n1999-01-01T00:00:00.000Z ERROR collector[1] FORGED line\r";
    // A bad signature: the message_id is logged.
    send_udp(udp, &[encode(&sample(forged, "wrong"))]);
    // A good signature and a bad timestamp: message_id and the timestamp's error are logged.
    let mut v = sample("placeholder", SECRET);
    if let meter::Value::Map(pairs) = &mut v {
        for (k, val) in pairs.iter_mut() {
            match k.as_str() {
                Some("message_id") => *val = meter::Value::Str(format!("{forged}-2")),
                Some("timestamp") => {
                    *val = meter::Value::Str(format!("2026-02-30T00:00:00{forged}"))
                }
                _ => {}
            }
        }
    }
    meter::signature::sign(&mut v, SECRET);
    // A message_id far longer than a log line should be.
    let long = sample(&"L".repeat(30_000), "wrong");
    send_udp(udp, &[encode(&v)]);
    d.wait_counter("invalid_signature", 1, Duration::from_secs(10));
    d.wait_counter("invalid_timestamp", 1, Duration::from_secs(10));
    // The throttle allows one line a second per kind.
    std::thread::sleep(Duration::from_millis(1100));
    send_udp(udp, &[encode(&long)]);
    d.wait_counter("invalid_signature", 2, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let log = d.log();
    assert!(
        !log.lines().any(|l| l.starts_with("1999-01-01")),
        "a forged line made it into the log:\n{log}"
    );
    assert!(
        log.contains("\\n1999-01-01T00:00:00.000Z ERROR collector[1] FORGED line\\r"),
        "the id is logged escaped:\n{log}"
    );
    assert!(
        log.contains("invalid_timestamp") || log.contains("FORGED line\\r-2"),
        "{log}"
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a log line of {longest} bytes");
    assert!(log.contains("more bytes)"), "{log}");
}

struct NoWake;
impl collector::dispatch::Wake for NoWake {
    fn wake(&self) {}
}

/// Item 6: the AMQP consumer takes bodies only up to `max_frame_bytes` (not 128 MiB), and
/// holds at most `max_buffered_bytes` of deliveries the worker has not taken (it stops
/// reading the broker meanwhile), instead of up to prefetch × 128 MiB.
#[test]
fn amqp_bodies_and_undrained_deliveries_are_bounded() {
    use collector::amqp::{AmqpConsumer, Limits};
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let cfg = collector::config::MessagingConfig {
        transport_url: "rabbit://guest:guest@127.0.0.1:5672/".into(),
        control_exchange: format!("e2e-hardening-{unique}"),
        metering_topic: format!("e2e-hardening-{unique}"),
        amqp_durable_queues: false,
        rabbit_qos_prefetch_count: 1000,
        ..Default::default()
    };
    let queue = format!("{}.sample", cfg.metering_topic);
    let limits = Limits {
        max_body: 64 << 10,
        max_queued_bytes: 256 << 10,
    };
    let mut consumer =
        AmqpConsumer::start_with_limits(&cfg, limits, std::sync::Arc::new(NoWake)).expect("start");
    wait_for(Duration::from_secs(10), || {
        consumer.status().consuming.then_some(())
    })
    .expect("consuming");
    let py = ceilometer_python();
    let publish = format!(
        "import amqp\n\
         c = amqp.Connection('127.0.0.1:5672', userid='guest', password='guest'); c.connect()\n\
         ch = c.channel()\n\
         ch.basic_publish(amqp.Message(b'x' * (100 << 10)), exchange='', routing_key='{queue}')\n\
         for i in range(40):\n    ch.basic_publish(amqp.Message(b'y' * (30 << 10)), exchange='', routing_key='{queue}')\n\
         c.close()\n"
    );
    let out = std::process::Command::new(&py)
        .args(["-c", &publish])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nobody takes deliveries for a while: the thread must stop at its budget.
    std::thread::sleep(Duration::from_secs(2));
    let queued = consumer.queued_bytes();
    eprintln!(
        "undrained deliveries held: {queued} bytes (budget {} bytes)",
        256 << 10
    );
    let mut got = Vec::new();
    wait_for(Duration::from_secs(20), || {
        while let Some(d) = consumer.try_recv() {
            consumer.ack(d.tag);
            got.push(d.body.len());
        }
        (got.len() >= 40).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    while let Some(d) = consumer.try_recv() {
        got.push(d.body.len());
    }
    consumer.shutdown();
    let _ = std::process::Command::new(&py)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/notify.py"))
        .args(["--delete", "127.0.0.1:5672", &cfg.control_exchange, &queue])
        .output();
    assert!(
        queued <= (256 << 10) + (128 << 10),
        "{queued} bytes of undrained deliveries held"
    );
    assert_eq!(got.len(), 40, "every small message arrives: {got:?}");
    assert!(
        got.iter().all(|&n| n == 30 << 10),
        "the 100 KiB body was taken: {got:?}"
    );
}

/// Serialises this file's tests that run processes as `nobody` (across processes: nextest
/// runs each test in its own), so they do not move each other's RLIMIT_NPROC count.
struct NobodyLock {
    _file: std::fs::File,
}

impl NobodyLock {
    fn take() -> NobodyLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("collector-e2e-nobody.lock"))
            .expect("lock file");
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        NobodyLock { _file: f }
    }
}

/// Tasks (processes and threads) of `uid` on the machine: what RLIMIT_NPROC counts.
fn tasks_of_uid(uid: u32) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(tasks) = std::fs::read_dir(e.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let real = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|u| u.parse::<u32>().ok());
            n += usize::from(real == Some(uid));
        }
    }
    n
}

/// Item 8: a worker that cannot start for a transient reason (here: its writer thread hits
/// RLIMIT_NPROC, EAGAIN) is a crash, respawned with backoff; only a configuration error
/// stops the daemon. The probe: the launcher as `nobody` under an NPROC limit, then
/// `collectorctl workers 2`.
#[test]
fn a_transient_worker_setup_failure_does_not_stop_the_daemon() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not running as root");
        return;
    }
    // RLIMIT_NPROC counts every task of nobody's on the machine, so a process of nobody's
    // that comes or goes meanwhile (another test) can move the limit: our own such tests
    // take a lock, and the probe is tried up to three times. The old code fails every time.
    let _lock = NobodyLock::take();
    let mut last = None;
    for _ in 0..3 {
        match std::panic::catch_unwind(transient_failure_probe) {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        std::panic::resume_unwind(e);
    }
}

fn transient_failure_probe() {
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let nobody = unsafe {
        let p = libc::getpwnam(c"nobody".as_ptr());
        assert!(!p.is_null(), "no user nobody");
        (*p).pw_uid
    };
    // Room for the launcher and one worker with its writer thread and the SQLite writer's
    // relay thread (and a little for other processes of nobody's that come and go), not for
    // a second worker and its thread.
    let limit = tasks_of_uid(nobody) + 5;
    let nproc = format!("--nproc={limit}:{limit}");
    let mut setup = Setup::default();
    setup.service.push("user = \"nobody\"".into());
    let d = Daemon::start_wrapped(
        setup,
        |dir| {
            let c = std::ffi::CString::new(dir.to_str().unwrap_or_default()).unwrap_or_default();
            // SAFETY: plain chmod on our temp dir so the unprivileged workers can write there.
            unsafe { libc::chmod(c.as_ptr(), 0o777) };
        },
        &["prlimit", &nproc],
    );
    let first = d.worker_pid();
    let (code, _, err) = d.ctl(&["workers", "2"]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_secs(4));
    let log = d.log();
    assert!(
        log.contains("Resource temporarily unavailable"),
        "the probe did not hit the limit; log:\n{log}"
    );
    assert!(alive(d.pid()), "the launcher stopped; log:\n{log}");
    assert!(alive(first), "the serving worker was stopped; log:\n{log}");
    let mut c = RpcClient::connect(d.rpc.expect("rpc address")).expect("connect");
    assert_eq!(
        c.call(vec![sample("still-serving", SECRET)])
            .expect("call")
            .stored,
        1
    );
}

/// Item 9a: a TOML syntax error never echoes the offending line (it may hold a secret), in
/// `--check-config`, in the reload reply or in the log.
#[test]
fn config_syntax_errors_do_not_echo_secrets() {
    let d = Daemon::start(Setup::default());
    let good = std::fs::read_to_string(&d.config_path).expect("config");
    let broken = good.replace(
        &format!("telemetry_secret = \"{SECRET}\""),
        "telemetry_secret = \"s3cret-value",
    );
    assert_ne!(good, broken);
    std::fs::write(&d.config_path, &broken).expect("write");
    let out = std::process::Command::new(bin("collector"))
        .arg("--check-config")
        .arg("--config")
        .arg(&d.config_path)
        .output()
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        !text.contains("s3cret"),
        "--check-config echoed the secret: {text}"
    );
    let (_, rout, rerr) = d.ctl(&["reload"]);
    assert!(
        !format!("{rout}{rerr}").contains("s3cret"),
        "reload: {rout}{rerr}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!d.log().contains("s3cret"), "log:\n{}", d.log());
}

/// Items 9b and 9c: a password given as a URL query parameter is masked by
/// `collectorctl config` (masked by the daemon) and in the MySQL driver's log line.
#[test]
fn url_query_passwords_are_masked_everywhere() {
    for (url, secret) in [
        (
            "postgresql://e2e_nobody@127.0.0.1:1/nodb?password=PgS3cret",
            "PgS3cret",
        ),
        (
            "mysql://e2e_nobody@127.0.0.1:1/nodb?password=My5ecret&charset=utf8",
            "My5ecret",
        ),
    ] {
        let d = Daemon::start(Setup::default().connection(url));
        let (code, out, err) = d.ctl(&["config"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("password=***"), "{out}");
        assert!(!out.contains(secret), "collectorctl config: {out}");
        std::thread::sleep(Duration::from_millis(500));
        assert!(!d.log().contains(secret), "log:\n{}", d.log());
        if url.starts_with("mysql") {
            assert!(
                d.log()
                    .contains("ignoring connection URL parameter password=\"***\""),
                "log:\n{}",
                d.log()
            );
        }
    }
}

/// Item 10: in the foreground too (and so under systemd), the database and the log are not
/// readable by other users: the launcher applies umask 027 in every mode.
#[test]
fn files_are_not_world_readable_in_the_foreground() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(Setup::default());
    let mut c = RpcClient::connect(d.rpc.expect("rpc address")).expect("connect");
    assert_eq!(
        c.call(vec![sample("umask-1", SECRET)])
            .expect("call")
            .stored,
        1
    );
    for name in ["collector.db", "collector.log"] {
        let mode = std::fs::metadata(d.path(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o007, 0, "{name} is mode {:o}", mode & 0o777);
    }
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/systemd/collector.service"),
    )
    .expect("unit");
    assert!(unit.lines().any(|l| l.trim() == "UMask=0027"), "{unit}");
}

/// Item 11: a pidfile that is a symbolic link is refused, not followed (root would truncate
/// and overwrite its target).
#[test]
fn a_symlinked_pidfile_is_refused_not_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "victim's content\n").expect("victim");
    let pidfile = dir.path().join("collector.pid");
    std::os::unix::fs::symlink(&victim, &pidfile).expect("symlink");
    let text = Setup::default()
        .service(&format!("pidfile = \"{}\"", pidfile.display()))
        .render(dir.path());
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, text).expect("config");
    let mut child = std::process::Command::new(bin("collector"))
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_for(Duration::from_secs(5), || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let content = std::fs::read_to_string(&victim).expect("victim");
    assert_eq!(
        content, "victim's content\n",
        "the pidfile's target was overwritten"
    );
    let status = status.expect("a launcher with a symlinked pidfile must not start");
    assert!(!status.success());
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(err.contains("symbolic link"), "{err}");
}

/// Item 11: giving the control socket to the daemon's user does not follow a symbolic link
/// planted at its path.
#[test]
fn the_control_socket_chown_does_not_follow_links() {
    use std::os::unix::fs::MetadataExt;
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not running as root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "x").expect("victim");
    let path = dir.path().join("control.sock");
    let server =
        collector::control::ControlServer::bind(path.to_str().expect("path")).expect("bind");
    std::fs::remove_file(&path).expect("remove the socket");
    std::os::unix::fs::symlink(&victim, &path).expect("symlink");
    let _ = server.chown_to(Some("nobody"), None);
    let owner = std::fs::metadata(&victim).expect("victim").uid();
    assert_eq!(owner, 0, "the link's target was given to nobody");
}

/// Item 12: with `user=` set, the pidfile is still removed at exit, though the launcher can
/// no longer unlink it from its root-owned directory after dropping privileges.
#[test]
fn the_pidfile_is_removed_after_a_privilege_drop() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not running as root");
        return;
    }
    let _lock = NobodyLock::take();
    let mut setup = Setup::default();
    setup.service.push("user = \"nobody\"".into());
    let mut d = Daemon::start_with_dir_prep(
        {
            let mut s = setup;
            s.service.push("pidfile = \"RUNDIR/collector.pid\"".into());
            s
        },
        |dir| {
            // The workers (nobody) write the database and log in the temp dir; the pidfile
            // lives in a directory only root may write, like /run.
            let c = std::ffi::CString::new(dir.to_str().unwrap_or_default()).unwrap_or_default();
            // SAFETY: plain chmod on our temp dir.
            unsafe { libc::chmod(c.as_ptr(), 0o777) };
            std::fs::create_dir(dir.join("run")).expect("run dir");
        },
    );
    let pidfile = d.path("run/collector.pid");
    assert!(pidfile.exists(), "no pidfile; log:\n{}", d.log());
    let launcher = d.pid();
    d.send_signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(20)).is_some(),
        "launcher did not stop"
    );
    // The launcher has exited; whoever removes the file does so right after.
    let gone = wait_for(Duration::from_secs(5), || (!pidfile.exists()).then_some(()));
    assert!(
        gone.is_some(),
        "pidfile of {launcher} left behind after exit; log:\n{}",
        d.log()
    );
}

/// Send `bytes` to the control socket and read answer lines until it closes (or `max`).
fn control_exchange(
    path: &std::path::Path,
    bytes: &[u8],
    timeout: Duration,
    max: usize,
) -> Vec<String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect control socket");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s.set_write_timeout(Some(timeout)).expect("timeout");
    let _ = s.write_all(bytes);
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(s).lines() {
        match line {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
        if lines.len() >= max {
            break;
        }
    }
    lines
}

/// Item 13: the control socket answers the daemon's own user (the allowed uid is the one
/// the launcher runs as after dropping privileges, not root's).
#[test]
fn the_control_socket_admits_the_daemon_user() {
    use std::os::unix::process::CommandExt;
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not running as root");
        return;
    }
    let _lock = NobodyLock::take();
    let mut setup = Setup::default();
    setup.service.push("user = \"nobody\"".into());
    let d = Daemon::start_with_dir_prep(setup, |dir| {
        let c = std::ffi::CString::new(dir.to_str().unwrap_or_default()).unwrap_or_default();
        // SAFETY: plain chmod on our temp dir so the unprivileged workers can write there.
        unsafe { libc::chmod(c.as_ptr(), 0o777) };
    });
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let (uid, gid) = unsafe {
        let p = libc::getpwnam(c"nobody".as_ptr());
        assert!(!p.is_null());
        ((*p).pw_uid, (*p).pw_gid)
    };
    let out = std::process::Command::new(bin("collectorctl"))
        .arg("--socket")
        .arg(d.control_socket())
        .arg("status")
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run collectorctl as nobody");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "collectorctl status as the daemon's user: {text}"
    );
}

/// Item 13: the 64 KiB line cap holds even after a newline: a huge line that follows a
/// command is refused after at most about 64 KiB of it, not buffered whole.
#[test]
fn the_control_line_cap_holds_after_a_newline() {
    use std::io::{BufRead, Write};
    let d = Daemon::start(Setup::default());
    let before = proc_status_kib(d.pid(), "VmHWM");
    let mut s = std::os::unix::net::UnixStream::connect(d.control_socket()).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"status\n").expect("write");
    // One line of up to 128 MiB: count what the launcher takes before it hangs up.
    let chunk = vec![b'a'; 64 << 10];
    let mut sent = 0usize;
    while sent < (128 << 20) {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let lines: Vec<String> = std::io::BufReader::new(s)
        .lines()
        .map_while(Result::ok)
        .collect();
    let grown_mib = proc_status_kib(d.pid(), "VmHWM").saturating_sub(before) / 1024;
    eprintln!(
        "sent {} KiB of one line before the launcher hung up; its peak RSS grew {grown_mib} MiB",
        sent >> 10
    );
    assert!(
        lines.iter().any(|l| l.contains("longer than")),
        "{:?}",
        lines
            .iter()
            .map(|l| l.chars().take(100).collect::<String>())
            .collect::<Vec<_>>()
    );
    // 64 KiB of line, a read chunk, and the socket buffers; before: the whole burst the
    // launcher could read (megabytes; 35 MB for 400 MiB in the issue's probe).
    assert!(
        sent < (2 << 20),
        "the launcher took {} KiB of one line",
        sent >> 10
    );
}

/// Item 13: a `reload` sent while the daemon stops is answered (an error), not left hanging.
#[test]
fn a_reload_during_a_stop_is_answered() {
    let mut d = Daemon::start(Setup::default());
    let lines = control_exchange(
        &d.control_socket(),
        b"stop\nreload\n",
        Duration::from_secs(20),
        2,
    );
    let _ = d.wait_exit(Duration::from_secs(20));
    assert_eq!(lines.len(), 2, "answers: {lines:?}");
    assert!(
        lines[1].contains("\"ok\":false") && lines[1].contains("stopping"),
        "{lines:?}"
    );
}

/// Item 13: `loglevel off` is accepted, and documented in `help`.
#[test]
fn loglevel_off_is_documented() {
    let d = Daemon::start(Setup::default());
    let lines = control_exchange(&d.control_socket(), b"help\n", Duration::from_secs(10), 1);
    assert!(lines.iter().any(|l| l.contains("off")), "{lines:?}");
    let (code, _, err) = d.ctl(&["loglevel", "off"]);
    assert_eq!(code, 0, "{err}");
    let ops = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .expect("docs");
    assert!(
        ops.contains("error, warn, info, debug, trace, off"),
        "operations.md"
    );
}

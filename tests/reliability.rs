//! Reliability (issue 8): chaos with acknowledged samples, storage faults, overload, and a
//! hostile input corpus. The promise: an acknowledged sample is stored exactly once, whatever
//! happens to workers, storage or the input; a bad sample or client never disturbs good ones.

use collector_e2e::*;
use meter::Value;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A tiny xorshift: enough randomness for chaos, no extra crate.
struct Rng(u64);
impl Rng {
    fn new() -> Rng {
        Rng(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 | 1)
            .unwrap_or(88172645463325252))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Send `ids` until acked, reconnecting on any error; gives up at `deadline`.
fn send_until_acked(
    addr: std::net::SocketAddr,
    ids: &[String],
    client: &mut Option<RpcClient>,
    deadline: Instant,
) -> bool {
    while Instant::now() < deadline {
        if client.is_none() {
            *client = RpcClient::connect(addr).ok();
            if client.is_none() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        }
        let c = client.as_mut().unwrap();
        let _ = c.stream.set_read_timeout(Some(Duration::from_secs(5)));
        match c.call(ids.iter().map(|id| sample(id, SECRET)).collect()) {
            Ok(r) if r.error.is_none() && r.stored + r.duplicates == ids.len() as i64 => {
                return true
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => *client = None,
        }
    }
    false
}

#[test]
fn chaos_every_acked_sample_is_stored_exactly_once() {
    let d = Daemon::start(Setup::default().workers(3));
    d.wait_workers(3, &[], WAIT);
    let launcher = d.pid();
    // Baseline: the fewest descriptors seen while idle (a collectorctl connection being
    // served is transient, not a leak).
    let fds_before = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(30));
            fd_count(launcher)
        })
        .min()
        .unwrap();
    let addr = d.rpc.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut client = None;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let ids: Vec<String> = (0..50).map(|k| format!("chaos-{t}-{i}-{k}")).collect();
                    if send_until_acked(addr, &ids, &mut client, Instant::now() + WAIT) {
                        acked.extend(ids);
                    } else {
                        panic!("batch chaos-{t}-{i} never acked within {WAIT:?}");
                    }
                    i += 1;
                }
                acked
            })
        })
        .collect();
    let mut rng = Rng::new();
    let start = Instant::now();
    let mut last_hup = Instant::now();
    let (mut kills, mut hups, mut ttins, mut ttous) = (0, 0, 0, 0);
    while start.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(250));
        let workers: Vec<i32> = children_of(launcher)
            .iter()
            .filter(|(_, s)| *s != 'Z')
            .map(|(p, _)| *p)
            .collect();
        match rng.next() % 4 {
            0 | 1 if !workers.is_empty() => {
                let victim = workers[(rng.next() % workers.len() as u64) as usize];
                // SAFETY: killing one of our daemon's workers.
                unsafe { libc::kill(victim, libc::SIGKILL) };
                kills += 1;
            }
            2 => {
                d.send_signal(libc::SIGTTIN);
                ttins += 1;
            }
            _ => {
                d.send_signal(libc::SIGTTOU);
                ttous += 1;
            }
        }
        if last_hup.elapsed() > Duration::from_secs(3) {
            d.send_signal(libc::SIGHUP);
            hups += 1;
            last_hup = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    eprintln!(
        "chaos: {kills} kills, {hups} HUPs, {ttins} TTIN, {ttous} TTOU; {} samples acked",
        acked.len()
    );
    assert!(
        acked.len() >= 1000,
        "too little traffic got through: {}",
        acked.len()
    );
    let c = d.db();
    let (total, distinct): (i64, i64) = c
        .query_row(
            "SELECT count(*), count(DISTINCT message_id) FROM sample",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(total, distinct, "a message_id stored twice");
    let stored: HashSet<String> = d.message_ids().into_iter().collect();
    let missing = acked.iter().filter(|id| !stored.contains(*id)).count();
    assert_eq!(missing, 0, "{missing} acked samples are not stored");
    // Back to 3 settled workers: no zombies, no leaked descriptors in the launcher.
    assert_eq!(d.ctl(&["workers", "3"]).0, 0);
    d.wait_workers(3, &[], WAIT);
    let settled = wait_for(WAIT, || {
        let kids = children_of(launcher);
        let zombies = kids.iter().filter(|(_, s)| *s == 'Z').count();
        (zombies == 0 && kids.len() == 3 && fd_count(launcher) <= fds_before).then_some(())
    });
    assert!(
        settled.is_some(),
        "launcher not settled: children {:?}, fds {} (before {fds_before})",
        children_of(launcher),
        fd_count(launcher)
    );
}

/// A small tmpfs for the database, when we may mount (root); removed on drop.
struct Tmpfs(std::path::PathBuf);
impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn start_on_tmpfs(size: &str) -> Option<(Daemon, Tmpfs)> {
    let mut mnt = None;
    let d = Daemon::start_with_dir_prep(Setup::default().db_file("db/collector.db"), |dir| {
        mnt = Tmpfs::mount(&dir.join("db"), size);
    });
    let mnt = mnt?;
    Some((d, mnt))
}

fn chattr(flag: &str, files: &[std::path::PathBuf]) -> bool {
    std::process::Command::new("chattr")
        .arg(flag)
        .args(files)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn read_only_database_answers_errors_and_recovers() {
    let d = Daemon::start(Setup::default());
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    assert_eq!(c.call(vec![sample("ro-0", SECRET)]).unwrap().stored, 1);
    let db = d.db_path();
    let files = vec![db.clone(), db.with_extension("db-wal")];
    // As root, file modes do not stop writes; the immutable attribute does, even through the
    // descriptors SQLite already holds.
    if unsafe { libc::geteuid() } != 0 || !chattr("+i", &files) {
        eprintln!("skipped: cannot make the database immutable (needs root and chattr)");
        return;
    }
    struct Undo(Vec<std::path::PathBuf>);
    impl Drop for Undo {
        fn drop(&mut self) {
            chattr("-i", &self.0);
        }
    }
    let undo = Undo(files);
    let r = c
        .call(vec![sample("ro-1", SECRET), sample("ro-2", SECRET)])
        .unwrap();
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("storage unavailable")),
        "{r:?}"
    );
    let shown = wait_for(WAIT, || {
        let v = d.status();
        v["workers"][0]["last_error"].as_str().map(str::to_string)
    });
    assert!(
        shown.is_some_and(|e| e.contains("storage unavailable")),
        "status must show the storage error"
    );
    drop(undo);
    let r = wait_for(WAIT, || {
        let r = c
            .call(vec![sample("ro-1", SECRET), sample("ro-2", SECRET)])
            .unwrap();
        r.error.is_none().then_some(r)
    });
    assert_eq!(
        r.map(|r| r.stored),
        Some(2),
        "no recovery once the file is writable again"
    );
    let mut ids = d.message_ids();
    ids.sort();
    assert_eq!(ids, vec!["ro-0", "ro-1", "ro-2"]);
    let cleared = wait_for(WAIT, || {
        d.status()["workers"][0]["last_error"]
            .is_null()
            .then_some(())
    });
    assert!(
        cleared.is_some(),
        "status still shows the old error after recovery"
    );
}

#[test]
fn full_disk_answers_errors_and_recovers() {
    let Some((d, mnt)) = start_on_tmpfs("2m") else {
        eprintln!("skipped: cannot mount a tmpfs (not root)");
        return;
    };
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let mut acked: Vec<String> = Vec::new();
    let mut call = |c: &mut RpcClient, ids: &[String]| -> Response {
        let r = c
            .call(ids.iter().map(|i| sample(i, SECRET)).collect())
            .unwrap();
        if r.error.is_none() {
            acked.extend(ids.iter().cloned());
        }
        r
    };
    assert_eq!(call(&mut c, &["full-0".to_string()]).stored, 1);
    assert!(mnt.0.join("collector.db").exists());
    // Fill the file system.
    let filler = mnt.0.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "count=100"])
        .arg(format!("of={}", filler.display()))
        .output();
    let big: Vec<String> = (0..3000).map(|i| format!("full-{}", i + 1)).collect();
    let r = call(&mut c, &big);
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("storage unavailable")),
        "disk full must fail the call: {r:?}"
    );
    std::fs::remove_file(&filler).unwrap();
    let r = wait_for(WAIT, || {
        let r = call(&mut c, &big);
        r.error.is_none().then_some(r)
    });
    assert!(r.is_some(), "no recovery after space was freed");
    let stored: HashSet<String> = d.message_ids().into_iter().collect();
    assert!(
        acked.iter().all(|id| stored.contains(id)),
        "an acked sample is missing"
    );
    assert_eq!(stored.len(), acked.len());
    let counted = wait_for(WAIT, || {
        (d.stats()["dispatch_errors"].as_u64() >= Some(1)).then_some(())
    });
    assert!(counted.is_some(), "{}", d.stats());
}

#[test]
fn udp_flood_stays_bounded_counted_and_responsive() {
    let d = Daemon::start(Setup::default().workers(1));
    let pids = d.wait_workers(1, &[], WAIT);
    let udp = d.udp.unwrap();
    let payloads: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..20_000)
            .map(|i| encode(&sample(&format!("flood-{i}"), SECRET)))
            .collect(),
    );
    let senders: Vec<_> = (0..2)
        .map(|t| {
            let p = payloads.clone();
            std::thread::spawn(move || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let mut sent = 0u64;
                for (i, b) in p.iter().enumerate() {
                    if i % 2 == t && s.send_to(b, udp).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    // Responsive during the flood: RPC and the control socket answer.
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    assert_eq!(
        c.call(vec![sample("during-flood", SECRET)]).unwrap().stored,
        1
    );
    assert_eq!(d.ctl(&["status"]).0, 0);
    let sent: u64 = senders.into_iter().map(|h| h.join().unwrap()).sum();
    // Everything sent is either stored or counted as dropped by the kernel.
    let settled = wait_for(WAIT, || {
        let s = d.stats();
        let stored = s["samples_stored"].as_u64()?.checked_sub(1)?;
        let drops = s["udp_kernel_drops"].as_u64()?;
        let received = s["udp_received"].as_u64()?;
        (received + drops == sent && stored == received).then_some((stored, drops))
    });
    let (stored, drops) = settled.unwrap_or_else(|| panic!("sent {sent}, stats {}", d.stats()));
    eprintln!("flood: sent {sent}, stored {stored}, kernel drops {drops}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 256 * 1024,
        "worker peak RSS {hwm_kib} KiB under a flood"
    );
}

/// Expected outcome of one hostile input.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Refused (counted), nothing stored.
    Rejected,
    /// Stored like any sample.
    Stored,
}

fn map_with(id: &str, f: impl FnOnce(&mut Vec<(Value, Value)>)) -> Value {
    let mut v = sample(id, SECRET);
    if let Value::Map(pairs) = &mut v {
        pairs.retain(|(k, _)| k.as_str() != Some("message_signature"));
        f(pairs);
    }
    meter::signature::sign(&mut v, SECRET);
    v
}

fn set(pairs: &mut [(Value, Value)], key: &str, val: Value) {
    for (k, v) in pairs.iter_mut() {
        if k.as_str() == Some(key) {
            *v = val.clone();
        }
    }
}

#[test]
fn hostile_samples_get_their_documented_outcome() {
    let d = Daemon::start(Setup::default());
    let cases: Vec<(&str, Value, Outcome)> = vec![
        (
            "nan-volume",
            map_with("nan-volume", |p| {
                set(p, "counter_volume", Value::Float(f64::NAN))
            }),
            Outcome::Rejected,
        ),
        (
            "inf-volume",
            map_with("inf-volume", |p| {
                set(p, "counter_volume", Value::Float(f64::INFINITY))
            }),
            Outcome::Rejected,
        ),
        (
            "year-0",
            map_with("year-0", |p| {
                set(p, "timestamp", Value::Str("0000-01-01T00:00:00".into()))
            }),
            Outcome::Stored,
        ),
        (
            "year-9999",
            map_with("year-9999", |p| {
                set(
                    p,
                    "timestamp",
                    Value::Str("9999-12-31T23:59:59.999999+00:00".into()),
                )
            }),
            Outcome::Stored,
        ),
        (
            "bad-time",
            map_with("bad-time", |p| {
                set(p, "timestamp", Value::Str("2026-02-30T00:00:00".into()))
            }),
            Outcome::Rejected,
        ),
        (
            "int-key-meta",
            map_with("int-key-meta", |p| {
                set(
                    p,
                    "resource_metadata",
                    Value::Map(vec![(Value::Int(1), Value::Str("x".into()))]),
                )
            }),
            Outcome::Rejected,
        ),
        (
            "short-sig",
            {
                let mut v = sample("short-sig", SECRET);
                if let Value::Map(p) = &mut v {
                    set(p, "message_signature", Value::Str("abc123".into()));
                }
                v
            },
            Outcome::Rejected,
        ),
        (
            "long-sig",
            {
                let mut v = sample("long-sig", SECRET);
                if let Value::Map(p) = &mut v {
                    set(p, "message_signature", Value::Str("0".repeat(4096)));
                }
                v
            },
            Outcome::Rejected,
        ),
        (
            "huge-meta",
            map_with("huge-meta", |p| {
                set(
                    p,
                    "resource_metadata",
                    Value::Map(vec![(
                        Value::Str("big".into()),
                        Value::Array((0..50_000).map(Value::Int).collect()),
                    )]),
                )
            }),
            Outcome::Stored,
        ),
        ("plain", sample("plain", SECRET), Outcome::Stored),
    ];
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    for (id, v, want) in &cases {
        let r = c.call(vec![v.clone()]).unwrap();
        let got = if r.stored == 1 {
            Outcome::Stored
        } else {
            Outcome::Rejected
        };
        assert_eq!(got, *want, "{id}: {r:?}");
        assert!(r.error.is_none(), "{id}: {r:?}");
    }
    let stored: HashSet<String> = d.message_ids().into_iter().collect();
    for (id, _, want) in &cases {
        assert_eq!(stored.contains(*id), *want == Outcome::Stored, "{id}");
    }
}

#[test]
fn hostile_frames_close_only_their_connection() {
    let d = Daemon::start(Setup::default());
    let rpc = d.rpc.unwrap();
    let expect_closed = |mut s: TcpStream, what: &str| {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = vec![0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) => return,
                Ok(_) => continue,
                // Closed with our unread bytes pending: the kernel answers with a reset.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("{what}: connection not closed: {e}"),
            }
        }
    };
    // 100 000 levels of nesting.
    let mut s = TcpStream::connect(rpc).unwrap();
    s.write_all(&vec![0x91u8; 100_000]).unwrap();
    expect_closed(s, "deep nesting");
    // An array claiming 4 billion elements.
    let mut s = TcpStream::connect(rpc).unwrap();
    s.write_all(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap();
    expect_closed(s, "huge array claim");
    // Invalid UTF-8 in a str: a malformed request, closed.
    let mut s = TcpStream::connect(rpc).unwrap();
    s.write_all(&[0x94, 0x00, 0x01, 0xa2, 0xff, 0xfe, 0x90])
        .unwrap();
    expect_closed(s, "invalid utf-8 method");
    // The same on UDP: counted as malformed, never a crash.
    send_udp(
        d.udp.unwrap(),
        &[
            vec![0x91u8; 60_000],
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],
            vec![0x81, 0xa1, 0xff, 0x00],
        ],
    );
    // A frame just under max_frame_bytes (16 MiB) arriving in tiny writes: accepted. The first
    // and last 64 KiB go one byte per write; the middle in 64 KiB writes (16 M single-byte
    // writes would take the client half a minute and prove nothing more: the server's
    // scanner resumes where it stopped, so its cost is linear either way).
    let blob = Value::Bin(vec![b'a'; 16 * 1024 * 1024 - 4096]);
    let big = map_with("big-frame", |p| {
        set(
            p,
            "resource_metadata",
            Value::Map(vec![(Value::Str("blob".into()), blob)]),
        )
    });
    let frame = rpc_request(1, vec![big]);
    assert!(frame.len() < 16 * 1024 * 1024);
    let mut s = TcpStream::connect(rpc).unwrap();
    s.set_nodelay(true).unwrap();
    let edge = 64 * 1024;
    for b in &frame[..edge] {
        s.write_all(&[*b]).unwrap();
    }
    for chunk in frame[edge..frame.len() - edge].chunks(64 * 1024) {
        s.write_all(chunk).unwrap();
    }
    for b in &frame[frame.len() - edge..] {
        s.write_all(&[*b]).unwrap();
    }
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut resp = vec![0u8; 256];
    let n = s.read(&mut resp).unwrap();
    let r = parse_response(meter::decode::decode_value(&resp[..n]).unwrap()).unwrap();
    // Bin inside metadata is a bytes value ceilometer could sign: stored.
    assert_eq!(r.stored, 1, "{r:?}");
    // One byte over the limit: refused before it is buffered.
    let mut s = TcpStream::connect(rpc).unwrap();
    let over = rpc_request(
        2,
        vec![map_with("too-big", |p| {
            set(
                p,
                "resource_metadata",
                Value::Map(vec![(
                    Value::Str("b".into()),
                    Value::Bin(vec![0; 16 * 1024 * 1024]),
                )]),
            )
        })],
    );
    let _ = s.write_all(&over);
    expect_closed(s, "over max_frame_bytes");
    // Good clients were never disturbed.
    let mut c = RpcClient::connect(rpc).unwrap();
    assert_eq!(
        c.call(vec![sample("still-fine", SECRET)]).unwrap().stored,
        1
    );
    let counted = wait_for(WAIT, || {
        let s = d.stats();
        (s["rpc_errors"].as_u64() >= Some(4) && s["udp_malformed"].as_u64() >= Some(3))
            .then_some(())
    });
    assert!(counted.is_some(), "{}", d.stats());
}

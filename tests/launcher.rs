//! The launcher (issue 5): supervised workers, signals, reload without loss, daemon mode,
//! pidfile, init script. Real binaries, real signals.

use collector_e2e::*;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn workers_come_up_and_a_killed_worker_is_replaced_within_a_second() {
    let d = Daemon::start(Setup::default().workers(3));
    let pids = d.wait_workers(3, &[], WAIT);
    for p in &pids {
        assert!(children_of(d.pid()).iter().any(|(c, _)| c == p));
    }
    // SAFETY: killing our own daemon's worker.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let t = Instant::now();
    let now = d.wait_workers(3, &pids[..1], Duration::from_secs(5));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "respawn took {:?}",
        t.elapsed()
    );
    assert!(now.contains(&pids[1]) && now.contains(&pids[2]));
    // The respawned worker serves: data still flows.
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    assert_eq!(
        c.call(vec![sample("after-respawn", SECRET)])
            .unwrap()
            .stored,
        1
    );
    assert!(d.stats()["respawns"].as_u64().unwrap() >= 1);
}

#[test]
fn killing_the_launcher_takes_every_worker_down() {
    let mut d = Daemon::start(Setup::default().workers(2));
    let pids = d.wait_workers(2, &[], WAIT);
    d.send_signal(libc::SIGKILL);
    assert!(d.wait_exit(WAIT).is_some());
    let gone = wait_for(Duration::from_secs(2), || {
        (!pids.iter().any(|p| alive(*p))).then_some(())
    });
    assert!(
        gone.is_some(),
        "workers {pids:?} outlived the launcher by 2 s"
    );
}

#[test]
fn term_while_rpc_clients_are_mid_batch_loses_no_acked_sample() {
    let mut setup = Setup::default().workers(2);
    setup.service.push("pidfile = \"PIDFILE\"".into());
    let mut d = Daemon::start_with_pidfile(setup);
    let pidfile = d.path("collector.pid");
    assert!(pidfile.exists());
    let addr = d.rpc.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let Ok(mut c) = RpcClient::connect(addr) else {
                    return acked;
                };
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids: Vec<String> = (0..200).map(|k| format!("term-{t}-{i}-{k}")).collect();
                    let batch = ids.iter().map(|id| sample(id, SECRET)).collect();
                    match c.call(batch) {
                        Ok(r) if r.error.is_none() => acked.extend(ids),
                        _ => break,
                    }
                    i += 1;
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    d.send_signal(libc::SIGTERM);
    let code = d
        .wait_exit(Duration::from_secs(30))
        .expect("launcher exits");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<String> = clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(code, Some(0));
    assert!(!acked.is_empty());
    let stored: std::collections::HashSet<String> = d.message_ids().into_iter().collect();
    let missing: Vec<_> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acked samples missing, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert!(!pidfile.exists(), "pidfile must be removed at exit");
    assert!(
        !d.control_socket().exists(),
        "control socket must be removed at exit"
    );
}

#[test]
fn hup_during_a_paced_udp_stream_loses_nothing_and_replaces_workers() {
    let d = Daemon::start(Setup::default().workers(2));
    let old = d.wait_workers(2, &[], WAIT);
    let udp = d.udp.unwrap();
    let sender = std::thread::spawn(move || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut sent = 0;
        let start = Instant::now();
        // ~2000 datagrams/s for 3 s.
        for i in 0..6000 {
            let due = start + Duration::from_micros(500 * i as u64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            sock.send_to(&encode(&sample(&format!("hup-{i}"), SECRET)), udp)
                .unwrap();
            sent += 1;
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(700));
    d.send_signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(900));
    d.send_signal(libc::SIGHUP);
    let sent = sender.join().unwrap();
    let new = d.wait_workers(2, &old, WAIT);
    assert!(new.iter().all(|p| !old.contains(p)));
    assert_eq!(
        d.wait_samples(sent, WAIT),
        sent,
        "datagrams lost across reload"
    );
    assert_eq!(d.count_samples(), sent);
}

#[test]
fn a_broken_config_on_hup_keeps_the_old_workers_serving() {
    let d = Daemon::start(Setup::default().workers(1));
    let old = d.wait_workers(1, &[], WAIT);
    let good = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        format!("{good}\n[collector]\nudp_prot = 1\n"),
    )
    .unwrap();
    d.send_signal(libc::SIGHUP);
    assert!(
        wait_for(WAIT, || (d.log_count("reload failed") >= 1).then_some(())).is_some(),
        "{}",
        d.log()
    );
    assert_eq!(d.ready_workers(), old);
    let (code, _, err) = d.ctl(&["reload"]);
    assert_eq!(code, 1, "reload of a broken config must fail: {err}");
    assert!(
        err.contains("udp_prot") || err.contains("reload failed"),
        "{err}"
    );
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    assert_eq!(
        c.call(vec![sample("still-serving", SECRET)])
            .unwrap()
            .stored,
        1
    );
    std::fs::write(&d.config_path, good).unwrap();
    let (code, out, err) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    d.wait_workers(1, &old, WAIT);
}

#[test]
fn ttin_and_ttou_change_the_worker_count() {
    let d = Daemon::start(Setup::default().workers(1));
    d.wait_workers(1, &[], WAIT);
    d.send_signal(libc::SIGTTIN);
    d.wait_workers(2, &[], WAIT);
    d.send_signal(libc::SIGTTIN);
    d.wait_workers(3, &[], WAIT);
    d.send_signal(libc::SIGTTOU);
    d.wait_workers(2, &[], WAIT);
    let (code, _, _) = d.ctl(&["workers", "1"]);
    assert_eq!(code, 0);
    d.wait_workers(1, &[], WAIT);
}

#[test]
fn a_second_daemon_with_the_same_pidfile_refuses_and_a_stale_one_is_replaced() {
    let mut setup = Setup::default();
    setup.service.push("pidfile = \"PIDFILE\"".into());
    let d = Daemon::start_with_pidfile(setup);
    let pidfile = d.path("collector.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, d.pid());
    let out = Command::new(bin("collector"))
        .args(["--config"])
        .arg(&d.config_path)
        .current_dir(d.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already running") && err.contains(&pid.to_string()),
        "{err}"
    );
    drop(d);
    // A stale pidfile (nobody holds its lock) is replaced.
    let mut setup = Setup::default();
    setup.service.push("pidfile = \"PIDFILE\"".into());
    let dir_probe = Daemon::start_with_pidfile_and(setup, |dir| {
        std::fs::write(dir.join("collector.pid"), "999999\n").unwrap();
    });
    let pid: i32 = std::fs::read_to_string(dir_probe.path("collector.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, dir_probe.pid());
}

#[test]
fn init_script_start_status_reload_stop() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::default();
    let cfg = dir.path().join("collector.toml");
    std::fs::write(&cfg, setup.render(dir.path())).unwrap();
    let pidfile = dir.path().join("run/collector.pid");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/init.d/collector");
    let run = |action: &str| {
        let out = Command::new("sh")
            .arg(&script)
            .arg(action)
            .env("COLLECTOR_BIN", bin("collector"))
            .env("COLLECTOR_CONFIG", &cfg)
            .env("COLLECTOR_PIDFILE", &pidfile)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    struct Reap(std::path::PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Ok(p) = std::fs::read_to_string(&self.0) {
                if let Ok(pid) = p.trim().parse::<i32>() {
                    // SAFETY: killing the daemon this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
    let _reap = Reap(pidfile.clone());
    assert_eq!(run("status").0, 3);
    let (code, out) = run("start");
    assert_eq!(code, 0, "{out}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    let (code, out) = run("status");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&pid.to_string()));
    let log = dir.path().join("collector.log");
    let (code, out) = run("reload");
    assert_eq!(code, 0, "{out}");
    let reloaded = wait_for(WAIT, || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("generation 2 serving")
            .then_some(())
    });
    assert!(
        reloaded.is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let (code, out) = run("stop");
    assert_eq!(code, 0, "{out}");
    assert!(!alive(pid));
    assert!(!pidfile.exists());
    assert_eq!(run("status").0, 3);
}

#[test]
fn daemon_mode_detaches_and_reports_start_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::default();
    // Relative paths must still work after the daemon's chdir to /.
    setup.service.push("pidfile = \"run/c.pid\"".into());
    let text = setup.render(dir.path()).replace(
        &format!("{}/control.sock", dir.path().display()),
        "control.sock",
    );
    let cfg = dir.path().join("collector.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(bin("collector"))
        .args(["--daemon", "--config", "collector.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pidfile = dir.path().join("run/c.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    // Detached: its own session, cwd /.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        std::path::Path::new("/")
    );
    let sid = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = sid.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // Double fork: a new session (setsid), of which the daemon is not the leader, so it can
    // never acquire a controlling terminal again.
    let our_sid = unsafe { libc::getsid(0) };
    assert_ne!(
        fields[3],
        our_sid.to_string(),
        "daemon must leave the caller's session"
    );
    assert_ne!(
        fields[3],
        pid.to_string(),
        "daemon must not lead its session"
    );
    assert!(dir.path().join("control.sock").exists());
    // A second start fails with a clear message and a non-zero code.
    let out2 = Command::new(bin("collector"))
        .args(["--daemon", "--config", "collector.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out2.status.success());
    assert!(String::from_utf8_lossy(&out2.stderr).contains("already running"));
    // SAFETY: stopping the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(wait_for(WAIT, || (!alive(pid)).then_some(())).is_some());
    assert!(!pidfile.exists());
    // A start error (port in use) reaches the caller's terminal with a non-zero status.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("rpc_port = 0", &format!("rpc_port = {port}"));
    std::fs::write(&cfg, text).unwrap();
    let out3 = Command::new(bin("collector"))
        .args(["--daemon", "--config", "collector.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out3.status.success());
    let err = String::from_utf8_lossy(&out3.stderr);
    assert!(
        err.contains("cannot bind") && err.contains(&port.to_string()),
        "{err}"
    );
}

#[test]
fn privileges_are_dropped_after_binding_when_root() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not running as root");
        return;
    }
    let mut setup = Setup::default();
    setup.service.push("user = \"nobody\"".into());
    let d = Daemon::start_with_dir_prep(setup, |dir| {
        // SAFETY: plain chmod on our temp dir so the unprivileged workers can write there.
        let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        unsafe { libc::chmod(c.as_ptr(), 0o777) };
    });
    let pids = d.wait_workers(1, &[], WAIT);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
        "{uid_line}"
    );
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    assert_eq!(c.call(vec![sample("as-nobody", SECRET)]).unwrap().stored, 1);
}

#[test]
fn systemd_notifications_follow_the_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut setup = Setup::default().workers(2);
    setup
        .env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    let mut d = Daemon::start(setup);
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().contains("READY=1"));
    d.send_signal(libc::SIGHUP);
    assert!(next().contains("RELOADING=1"));
    assert!(
        next().contains("READY=1"),
        "READY=1 again once the new generation serves"
    );
    d.send_signal(libc::SIGTERM);
    assert!(next().contains("STOPPING=1"));
    assert_eq!(d.wait_exit(WAIT), Some(Some(0)));
}

#[test]
fn check_config_validates_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let run = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        Command::new(bin("collector"))
            .args(["--check-config", "--config"])
            .arg(&cfg)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let ok = run("[publisher]\ntelemetry_secret = \"topsecret\"\n[database]\nconnection = \"postgresql://u:pw@127.0.0.1:1/db\"\n");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let shown = String::from_utf8_lossy(&ok.stdout);
    assert!(
        shown.contains("u:***@") && !shown.contains("topsecret"),
        "{shown}"
    );
    // Nothing was started or bound.
    assert!(!dir.path().join("data").exists());
    let bad_port = run("[database]\nconnection = \"postgresql://u@h:port/db\"\n");
    assert_eq!(bad_port.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_port.stderr).contains("[database] connection"));
    let unknown = run("[database]\nconnection = \"mongodb://h/ceilometer\"\n");
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("known: sqlite, postgresql"));
    let typo = run("[collector]\nudp_prot = 1\n");
    assert_eq!(typo.status.code(), Some(2));
    let err = String::from_utf8_lossy(&typo.stderr);
    assert!(err.contains("udp_prot") && err.contains("line 2"), "{err}");
}

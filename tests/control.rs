//! The control socket and collectorctl (issue 6), with the real binaries.

use collector_e2e::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn ask_raw(sock: &std::path::Path, line: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(line).unwrap();
    let mut out = String::new();
    let _ = BufReader::new(&s).read_line(&mut out);
    out
}

#[test]
fn every_command_answers_json_lines() {
    let d = Daemon::start(Setup::default().workers(2));
    d.wait_workers(2, &[], WAIT);
    let sock = d.control_socket();
    for cmd in ["help", "status", "stats", "config", "worker 0"] {
        let out = ask_raw(&sock, format!("{cmd}\n").as_bytes());
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{cmd}: {e}: {out:?}"));
        assert_eq!(v["ok"], true, "{cmd}: {out}");
    }
    let help = ask_raw(&sock, b"help\n");
    for c in [
        "status", "stats", "workers", "reload", "stop", "loglevel", "config", "worker",
    ] {
        assert!(help.contains(c), "help lacks {c}: {help}");
    }
    // config masks the secret.
    let (code, out, _) = d.ctl(&["config"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("telemetry_secret = \"***\"") && !out.contains(SECRET),
        "{out}"
    );
    // worker introspection: pid, connections with peers, RSS, fds.
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    c.call(vec![sample("w-1", SECRET)]).unwrap();
    let (code, out, err) = d.ctl(&["worker", "0"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in [
        "pid",
        "generation",
        "uptime_s",
        "connections",
        "pending_batch",
        "rss_kib",
        "fds",
        "counters",
    ] {
        assert!(v.get(k).is_some(), "worker output lacks {k}: {out}");
    }
    assert!(v["rss_kib"].as_u64().unwrap() > 0);
    let (code, _, err) = d.ctl(&["worker", "99"]);
    assert_eq!(code, 1, "{err}");
    // loglevel, in the launcher and the workers.
    let (code, out, _) = d.ctl(&["loglevel", "trace"]);
    assert_eq!((code, out.trim()), (0, "log level: trace"));
    let (code, _, err) = d.ctl(&["loglevel", "loud"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown log level"), "{err}");
    assert!(
        wait_for(WAIT, || (d.log_count("log level set to TRACE") >= 3)
            .then_some(()))
        .is_some(),
        "{}",
        d.log()
    );
}

#[test]
fn status_numbers_match_what_was_sent() {
    let d = Daemon::start(Setup::default().workers(2));
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let good: Vec<_> = (0..30).map(|i| sample(&format!("n-{i}"), SECRET)).collect();
    let bad: Vec<_> = (0..5).map(|i| sample(&format!("x-{i}"), "wrong")).collect();
    assert_eq!(c.call(good).unwrap().stored, 30);
    assert_eq!(c.call(bad).unwrap().rejected, 5);
    send_udp(d.udp.unwrap(), &[vec![0xc1, 0x00]]);
    let ok = wait_for(WAIT, || {
        let s = d.stats();
        (s["samples_stored"] == 30
            && s["invalid_signature"] == 5
            && s["udp_malformed"] == 1
            && s["rpc_requests"] == 2)
            .then_some(s)
    });
    assert!(ok.is_some(), "stats never matched: {}", d.stats());
    let (code, out, _) = d.ctl(&["status"]);
    assert_eq!(code, 0);
    let rows: Vec<&str> = out.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{out}");
    let stored: u64 = rows
        .iter()
        .map(|r| r.split_whitespace().nth(6).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(stored, 30, "{out}");
    assert!(out.lines().nth(1).unwrap().contains("STORED/S"));
}

#[test]
fn reload_returns_once_the_new_generation_serves_and_stop_waits_for_exit() {
    let mut d = Daemon::start(Setup::default().workers(2));
    let old = d.wait_workers(2, &[], WAIT);
    let (code, out, err) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("generation 2 serving"), "{out}");
    // Right after reload returns, generation 2 is the serving one with all workers ready.
    let s = d.status();
    assert_eq!(s["generation"], 2);
    let ready = d.ready_workers();
    assert_eq!(ready.len(), 2);
    assert!(ready.iter().all(|p| !old.contains(p)));
    let (code, _, _) = d.ctl(&["workers", "3"]);
    assert_eq!(code, 0);
    d.wait_workers(3, &[], WAIT);
    let pid = d.pid();
    let (code, out, err) = d.ctl(&["stop"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stopped"));
    assert!(!alive(pid), "stop returned before the daemon exited");
    assert!(d.wait_exit(WAIT).is_some());
    let (code, _, err) = d.ctl(&["status"]);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn exit_codes_without_a_daemon_and_for_usage() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(bin("collectorctl"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&[
        "--socket",
        dir.path().join("none.sock").to_str().unwrap(),
        "status",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(run(&["workers", "many"]).status.code(), Some(2));
    assert_eq!(run(&["--help"]).status.code(), Some(0));
}

#[test]
fn socket_is_private_and_other_uids_are_refused() {
    let d = Daemon::start(Setup::default());
    let sock = d.control_socket();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped the other-uid part: not running as root");
        return;
    }
    // Open the file mode so only SO_PEERCRED stands between nobody and the daemon.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let dir = d.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    use std::os::unix::process::CommandExt;
    let out = Command::new(bin("collectorctl"))
        .args(["--socket", sock.to_str().unwrap(), "status"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));
    assert!(d.log_count("refused a client with uid 65534") >= 1);
    // Root still gets in.
    assert_eq!(d.ctl(&["status"]).0, 0);
}

#[test]
fn bad_input_on_the_control_socket_never_disturbs_others() {
    let d = Daemon::start(Setup::default());
    let sock = d.control_socket();
    let out = ask_raw(&sock, b"launch missiles\n");
    assert!(
        out.contains("\"ok\":false") && out.contains("unknown command"),
        "{out}"
    );
    let out = ask_raw(&sock, b"\xff\xfe\x00junk\n");
    assert!(out.contains("\"ok\":false"), "{out}");
    // A 1 MB line: an error line, then a close.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let _ = s.write_all(&vec![b'a'; 1 << 20]);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.contains("line longer"), "{resp}");
    // A client that asks a lot and never reads.
    let mut hog = UnixStream::connect(&sock).unwrap();
    hog.set_nonblocking(true).unwrap();
    for _ in 0..20000 {
        if hog.write_all(b"status\n").is_err() {
            break;
        }
    }
    // Others are served, and data still flows.
    assert_eq!(d.ctl(&["status"]).0, 0);
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    assert_eq!(c.call(vec![sample("ok-1", SECRET)]).unwrap().stored, 1);
    drop(hog);
    assert_eq!(d.ctl(&["stats"]).0, 0);
}

#[test]
fn samples_and_statistics_queries() {
    let d = Daemon::start(Setup::default());
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let batch: Vec<_> = (0..10)
        .map(|i| sample_with(&format!("q-{i}"), SECRET, "disk.read", 10 * (i + 1)))
        .collect();
    assert_eq!(c.call(batch).unwrap().stored, 10);
    let (code, out, err) = d.ctl(&["samples", "--meter", "disk.read", "--limit", "3", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3);
    let (code, out, _) = d.ctl(&["samples", "--meter", "disk.read"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 11, "{out}");
    assert!(out.starts_with("TIMESTAMP"));
    let (code, out, err) = d.ctl(&["statistics", "--meter", "disk.read", "--json"]);
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s0 = &st[0];
    assert_eq!(s0["count"], 10);
    assert_eq!(s0["min"].as_f64(), Some(10.0));
    assert_eq!(s0["max"].as_f64(), Some(100.0));
    assert_eq!(s0["sum"].as_f64(), Some(550.0));
    assert_eq!(s0["avg"].as_f64(), Some(55.0));
    let (code, out, _) = d.ctl(&["samples", "--meter", "nope"]);
    assert_eq!((code, out.lines().count()), (0, 1));
    let (code, _, err) = d.ctl(&["samples", "--meter", "disk.read", "--since", "yesterday"]);
    assert_eq!(code, 2, "{err}");
}

//! `[service] log_format = "json"`: every line the launcher and its workers write is one
//! JSON object with the documented keys, and values a peer sent stay inside their strings.

use collector_e2e::*;
use std::time::Duration;

#[test]
fn json_log_lines_are_objects_with_fields_and_escaped_peer_values() {
    let d = Daemon::start(Setup::default().workers(2).service("log_format = \"json\""));
    // A forged signature whose message_id tries to end the line and start a fake one.
    let evil = "evil\n{\"level\":\"error\",\"message\":\"forged\"}\u{1b}[31m";
    send_udp(d.udp.unwrap(), &[encode(&sample(evil, "wrong"))]);
    let line = wait_for(Duration::from_secs(20), || {
        d.log()
            .lines()
            .find(|l| l.contains("invalid signature"))
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("no invalid-signature line; log:\n{}", d.log()));
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(v["level"], "warn");
    assert_eq!(v["message_id"], evil);
    assert_eq!(v["source"], "udp");
    assert!(v["worker"].as_u64().is_some(), "{line}");
    assert!(v["pid"].as_u64().is_some());
    assert!(v["target"]
        .as_str()
        .is_some_and(|t| t.starts_with("collector")));
    assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    // Every line of the file (launcher and workers) is an object with the base keys; the
    // forged text never became a line of its own.
    let log = std::fs::read_to_string(d.path("collector.log")).unwrap();
    for l in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        for k in ["time", "level", "pid", "target", "message"] {
            assert!(v.get(k).is_some(), "no {k} in {l}");
        }
        assert_ne!(v["message"], "forged");
    }
    assert!(log
        .lines()
        .any(|l| l.contains("\"listening: ") && !l.contains("\"worker\"")));
}

#[test]
fn text_log_lines_escape_peer_values() {
    let d = Daemon::start(Setup::default());
    let evil = "evil\nFAKE ERROR injected";
    send_udp(d.udp.unwrap(), &[encode(&sample(evil, "wrong"))]);
    wait_for(Duration::from_secs(20), || {
        d.log().contains("invalid signature").then_some(())
    })
    .unwrap_or_else(|| panic!("no invalid-signature line; log:\n{}", d.log()));
    let log = d.log();
    assert!(log.contains("evil\\nFAKE ERROR injected"), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("FAKE ERROR")), "{log}");
}

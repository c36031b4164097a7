//! The launcher's HTTP endpoint against the real daemon: /metrics carries every
//! `collectorctl stats` figure with the same value and passes `promtool check metrics`,
//! /healthz and /readyz follow the daemon's and storage's state.
//!
//! `promtool` comes with Debian's `prometheus` package (.ci/run installs it).

use collector_e2e::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// One HTTP GET; (status, content type, body).
fn get(addr: SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let ct = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ct, body.to_string())
}

/// Prometheus text → `name{labels}` → value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Sum of the series of `name` whose labels contain every `filter` pair.
fn sum(m: &BTreeMap<String, f64>, name: &str, filter: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            let (n, labels) = k.split_once('{').unwrap_or((k.as_str(), ""));
            n == name && filter.iter().all(|f| labels.contains(f))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Where each `collectorctl stats` figure is in /metrics: (stats key, metric, label filter).
/// docs/operations.md has the same table for operators; `by_source` is checked apart.
const STATS_TO_METRICS: &[(&str, &str, &[&str])] = &[
    (
        "udp_received",
        "collector_udp_datagrams_received_total",
        &[],
    ),
    (
        "udp_malformed",
        "collector_udp_datagrams_malformed_total",
        &[],
    ),
    ("udp_kernel_drops", "collector_udp_kernel_drops_total", &[]),
    (
        "tcp_connections",
        "collector_connections_accepted_total",
        &["kind=\"tcp\""],
    ),
    ("tcp_malformed", "collector_tcp_malformed_total", &[]),
    (
        "rpc_connections",
        "collector_connections_accepted_total",
        &["kind=\"rpc\""],
    ),
    ("rpc_requests", "collector_rpc_requests_total", &[]),
    ("rpc_errors", "collector_rpc_errors_total", &[]),
    ("amqp_deliveries", "collector_amqp_deliveries_total", &[]),
    (
        "amqp_malformed",
        "collector_amqp_deliveries_malformed_total",
        &[],
    ),
    ("amqp_reconnects", "collector_amqp_reconnects_total", &[]),
    ("amqp_acked", "collector_amqp_deliveries_acked_total", &[]),
    (
        "amqp_rejected",
        "collector_amqp_deliveries_rejected_total",
        &[],
    ),
    ("samples_received", "collector_samples_received_total", &[]),
    ("samples_stored", "collector_samples_stored_total", &[]),
    (
        "samples_duplicate",
        "collector_samples_duplicates_total",
        &[],
    ),
    ("samples_rejected", "collector_samples_rejected_total", &[]),
    (
        "invalid_signature",
        "collector_samples_rejected_total",
        &["reason=\"invalid_signature\""],
    ),
    (
        "invalid_timestamp",
        "collector_samples_rejected_total",
        &["reason=\"invalid_timestamp\""],
    ),
    ("samples_dropped", "collector_samples_dropped_total", &[]),
    ("samples_expired", "collector_samples_expired_total", &[]),
    ("dispatch_errors", "collector_dispatch_errors_total", &[]),
    (
        "database_errors",
        "collector_storage_errors_total",
        &["kind=\"database\""],
    ),
    (
        "file_errors",
        "collector_storage_errors_total",
        &["kind=\"file\""],
    ),
    ("batches_written", "collector_batches_written_total", &[]),
    ("batches_relayed", "collector_batches_relayed_total", &[]),
    (
        "batch_latency_ms",
        "collector_batch_commit_duration_seconds_count",
        &[],
    ),
    (
        "batch_latency_us_sum",
        "collector_batch_commit_duration_seconds_sum",
        &[],
    ),
    ("batch_size", "collector_batch_size_count", &[]),
    ("batch_size_sum", "collector_batch_size_sum", &[]),
    (
        "freshness_ms",
        "collector_sample_freshness_seconds_count",
        &[],
    ),
    (
        "freshness_ms_sum",
        "collector_sample_freshness_seconds_sum",
        &[],
    ),
    (
        "respawns",
        "collector_worker_restarts_total",
        &["cause=\"crash\""],
    ),
];

/// `by_source.<source>.<field>` → metric and the label that picks the field.
const SOURCE_FIELDS: &[(&str, &str, &str)] = &[
    ("received", "collector_samples_received_total", ""),
    ("stored", "collector_samples_stored_total", ""),
    ("duplicates", "collector_samples_duplicates_total", ""),
    (
        "invalid_signature",
        "collector_samples_rejected_total",
        "reason=\"invalid_signature\"",
    ),
    (
        "invalid_timestamp",
        "collector_samples_rejected_total",
        "reason=\"invalid_timestamp\"",
    ),
    (
        "malformed",
        "collector_samples_rejected_total",
        "reason=\"malformed\"",
    ),
    ("bytes", "collector_received_bytes_total", ""),
];

fn stats_value(key: &str, v: &serde_json::Value) -> f64 {
    match key {
        // Histograms: their count is the sum of their buckets.
        "batch_latency_ms" | "batch_size" | "freshness_ms" => v
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).sum())
            .unwrap_or(0.0),
        "batch_latency_us_sum" => v.as_f64().unwrap_or(0.0) / 1e6,
        "freshness_ms_sum" => v.as_f64().unwrap_or(0.0) / 1e3,
        _ => v.as_f64().unwrap_or(f64::NAN),
    }
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn every_stats_figure_is_a_metric_with_the_same_value_and_promtool_agrees() {
    let d = Daemon::start(Setup::default().workers(2));
    let addr = d.metrics_addr().expect("metrics endpoint in the log");
    // Traffic of every kind the counters see.
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let good: Vec<_> = (0..30).map(|i| sample(&format!("m-{i}"), SECRET)).collect();
    let bad: Vec<_> = (0..5).map(|i| sample(&format!("b-{i}"), "wrong")).collect();
    assert_eq!(c.call(good.clone()).unwrap().stored, 30);
    assert_eq!(c.call(bad).unwrap().rejected, 5);
    assert_eq!(c.call(good[..3].to_vec()).unwrap().duplicates, 3);
    send_udp(
        d.udp.unwrap(),
        &[encode(&sample("u-1", SECRET)), vec![0xc1, 0x00]],
    );
    let mut t = TcpStream::connect(d.tcp.unwrap()).unwrap();
    t.write_all(&tcp_frame(&sample("t-1", SECRET))).unwrap();
    drop(t);
    let stats = wait_for(WAIT, || {
        let s = d.stats();
        (s["samples_stored"] == 32 && s["udp_malformed"] == 1 && s["tcp_connections"] == 1)
            .then_some(s)
    })
    .unwrap_or_else(|| panic!("stats never settled: {}", d.stats()));
    // Heartbeats come every second: wait until /metrics shows the same settled figures.
    let metrics = wait_for(WAIT, || {
        let (st, _, body) = get(addr, "/metrics", "text/plain");
        let m = parse(&body);
        (st == 200 && sum(&m, "collector_samples_stored_total", &[]) == 32.0).then_some(body)
    })
    .expect("/metrics never showed the stored samples");
    let m = parse(&metrics);
    let obj = stats.as_object().unwrap();
    for key in obj.keys() {
        assert!(
            key == "by_source" || STATS_TO_METRICS.iter().any(|(k, _, _)| k == key),
            "stats figure {key} has no metric in the table"
        );
    }
    for (source, fields) in obj["by_source"].as_object().expect("by_source") {
        for (field, v) in fields.as_object().unwrap() {
            let (_, metric, label) = SOURCE_FIELDS
                .iter()
                .find(|(f, _, _)| f == field)
                .unwrap_or_else(|| panic!("by_source field {field} has no metric"));
            let src = format!("source=\"{source}\"");
            let filter: Vec<&str> = [src.as_str(), label]
                .into_iter()
                .filter(|l| !l.is_empty())
                .collect();
            let got = sum(&m, metric, &filter);
            assert_eq!(
                v.as_f64().unwrap(),
                got,
                "by_source.{source}.{field} vs {metric}{filter:?}"
            );
        }
    }
    // Per source: what was sent where (rpc 30 + 3 duplicates + 5 bad, udp 1, tcp 1).
    assert_eq!(
        sum(&m, "collector_samples_stored_total", &["source=\"rpc\""]),
        30.0
    );
    assert_eq!(
        sum(&m, "collector_samples_stored_total", &["source=\"udp\""]),
        1.0
    );
    assert_eq!(
        sum(&m, "collector_samples_stored_total", &["source=\"tcp\""]),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "collector_samples_duplicates_total",
            &["source=\"rpc\""]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &m,
            "collector_samples_rejected_total",
            &["source=\"rpc\"", "reason=\"invalid_signature\""]
        ),
        5.0
    );
    assert!(sum(&m, "collector_received_bytes_total", &["source=\"tcp\""]) > 100.0);
    assert_eq!(
        sum(&m, "collector_sample_freshness_seconds_count", &[]),
        32.0
    );
    assert!(sum(&m, "collector_last_sample_committed_timestamp_seconds", &[]) > 1.7e9);
    for (key, metric, filter) in STATS_TO_METRICS {
        let want = stats_value(key, &obj[*key]);
        let got = sum(&m, metric, filter);
        assert!(
            (want - got).abs() < 1e-6,
            "{key} = {want} in stats but {metric}{filter:?} = {got}\n{metrics}"
        );
    }
    assert_eq!(sum(&m, "collector_workers", &["state=\"ready\""]), 2.0);
    assert_eq!(sum(&m, "collector_generation", &[]), 1.0);
    assert_eq!(sum(&m, "collector_ready", &[]), 1.0);
    for w in ["0", "1"] {
        let l = format!("worker=\"{w}\"");
        assert!(sum(&m, "collector_worker_resident_memory_bytes", &[&l]) > 1e6);
        assert!(sum(&m, "collector_worker_open_fds", &[&l]) > 3.0);
        assert!(m
            .keys()
            .any(|k| k.starts_with("collector_worker_cpu_seconds_total{") && k.contains(&l)));
    }
    // The exposition is valid by Prometheus's own linter.
    let (ok, said) = promtool_check(&metrics);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
    // OpenMetrics on request.
    let (st, ct, body) = get(
        addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert_eq!(st, 200);
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(body.ends_with("# EOF\n"));
    // The other paths.
    assert_eq!(get(addr, "/healthz", "*/*").0, 200);
    assert_eq!(
        get(addr, "/readyz", "*/*"),
        (200, "text/plain; charset=utf-8".into(), "ready\n".into())
    );
    assert_eq!(get(addr, "/nope", "*/*").0, 404);
}

#[test]
fn restarts_by_cause_and_readiness_while_a_worker_is_replaced() {
    let d = Daemon::start(Setup::default().workers(2));
    let addr = d.metrics_addr().unwrap();
    let pids = d.wait_workers(2, &[], WAIT);
    // SAFETY: kill(2) on a worker of our daemon.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let m = wait_for(WAIT, || {
        let m = parse(&get(addr, "/metrics", "").2);
        (sum(&m, "collector_worker_restarts_total", &["cause=\"crash\""]) == 1.0).then_some(m)
    });
    assert!(m.is_some(), "crash never counted; log:\n{}", d.log());
    d.wait_workers(2, &[pids[0]], WAIT);
    wait_for(WAIT, || (get(addr, "/readyz", "").0 == 200).then_some(()))
        .expect("ready again after the respawn");
    // A reload retires the old generation: two `reload` restarts, one successful reload.
    let (code, _, err) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    let m = wait_for(WAIT, || {
        let m = parse(&get(addr, "/metrics", "").2);
        (sum(&m, "collector_worker_restarts_total", &["cause=\"reload\""]) == 2.0).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "reload restarts never counted:\n{}",
            get(addr, "/metrics", "").2
        )
    });
    assert_eq!(sum(&m, "collector_generation", &[]), 2.0);
    assert_eq!(
        sum(&m, "collector_reloads_total", &["outcome=\"success\""]),
        1.0
    );
    assert_eq!(
        sum(&m, "collector_worker_restarts_total", &["cause=\"crash\""]),
        1.0
    );
    // Stopping: /healthz turns 503 before the endpoint goes away (or the connection fails).
    d.send_signal(libc::SIGTERM);
}

// ------------------------------------------------------------------ storage through a proxy

fn psql(db: &str, statement: &str) {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", db])
        .args(["-v", "ON_ERROR_STOP=1", "-tAc", statement])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {statement}: {} (PostgreSQL must run on 127.0.0.1:5432; .ci/run starts it)",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct PgDb(String);

impl PgDb {
    fn new() -> PgDb {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "collector_metrics{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        psql("postgres", &format!("CREATE DATABASE {name}"));
        PgDb(name)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::panic::catch_unwind(move || {
            psql(
                "postgres",
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )
        });
    }
}

#[test]
fn readyz_is_503_while_storage_is_down_and_200_after_recovery() {
    let db = PgDb::new();
    let proxy = Proxy::start("127.0.0.1:5432");
    let url = format!("postgresql://postgres@{}/{}", proxy.addr, db.0);
    let d = Daemon::start(Setup::default().workers(2).connection(&url));
    let addr = d.metrics_addr().unwrap();
    wait_for(WAIT, || (get(addr, "/readyz", "").0 == 200).then_some(()))
        .unwrap_or_else(|| panic!("never ready: {:?}\n{}", get(addr, "/readyz", ""), d.log()));
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    assert_eq!(c.call(vec![sample("pg-0", SECRET)]).unwrap().stored, 1);

    proxy.set_up(false);
    proxy.cut();
    // Both workers notice: a write fails (or their probe does).
    let batch: Vec<_> = (1..=4)
        .map(|i| sample(&format!("pg-{i}"), SECRET))
        .collect();
    let reason = wait_for(WAIT, || {
        let _ = c.call(batch.clone());
        send_udp(d.udp.unwrap(), &[encode(&sample("pg-u", SECRET))]);
        let (st, _, body) = get(addr, "/readyz", "");
        (st == 503).then_some(body)
    })
    .unwrap_or_else(|| panic!("/readyz never turned 503; log:\n{}", d.log()));
    assert!(reason.starts_with("storage unavailable"), "{reason}");
    assert_eq!(reason.lines().count(), 1, "{reason}");
    let m = parse(&get(addr, "/metrics", "").2);
    assert_eq!(sum(&m, "collector_storage_up", &[]), 0.0);
    assert_eq!(sum(&m, "collector_ready", &[]), 0.0);
    assert!(
        sum(
            &m,
            "collector_dispatch_errors_total",
            &["driver=\"postgresql\""]
        ) >= 1.0
    );
    // /healthz: the launcher itself is fine.
    assert_eq!(get(addr, "/healthz", "").0, 200);

    proxy.set_up(true);
    wait_for(WAIT, || {
        let r = c.call(batch.clone()).ok()?;
        r.error.is_none().then_some(())
    })
    .expect("storage never came back");
    wait_for(WAIT, || (get(addr, "/readyz", "").0 == 200).then_some(())).unwrap_or_else(|| {
        panic!(
            "/readyz stayed {:?}; log:\n{}",
            get(addr, "/readyz", ""),
            d.log()
        )
    });
    let m = parse(&get(addr, "/metrics", "").2);
    assert_eq!(sum(&m, "collector_storage_up", &[]), 1.0);
}

#[test]
fn a_taken_metrics_port_is_a_boot_error_and_an_empty_address_disables_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let setup = Setup::default().service(&format!("metrics_port = {port}"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, setup.render(dir.path())).unwrap();
    let out = Command::new(bin("collector"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics endpoint") && err.contains(&port.to_string()),
        "{err}"
    );

    let d = Daemon::start(Setup::default().service("metrics_address = \"\""));
    assert!(d.metrics_addr().is_none());
    assert!(!d.log().contains("metrics endpoint"));
}

#[test]
fn a_hung_worker_is_counted_as_hung_not_crash() {
    let d = Daemon::start(Setup::default().workers(2).service("worker_timeout = 2"));
    let addr = d.metrics_addr().unwrap();
    let pids = d.wait_workers(2, &[], WAIT);
    // SAFETY: kill(2) on a worker of our daemon: it stops heartbeating.
    unsafe { libc::kill(pids[0], libc::SIGSTOP) };
    let m = wait_for(WAIT, || {
        let m = parse(&get(addr, "/metrics", "").2);
        (sum(&m, "collector_worker_restarts_total", &["cause=\"hung\""]) == 1.0).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "hung never counted:\n{}\nlog:\n{}",
            get(addr, "/metrics", "").2,
            d.log()
        )
    });
    assert_eq!(
        sum(&m, "collector_worker_restarts_total", &["cause=\"crash\""]),
        0.0
    );
    d.wait_workers(2, &[pids[0]], WAIT);
}

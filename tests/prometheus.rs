//! A real Prometheus server (Debian's `prometheus` package; .ci/run installs it) scrapes a
//! daemon's /metrics: what Prometheus stores and answers through its own query API
//! (`/api/v1/query`) is what the collector did. Also: the shipped alert rules and scrape
//! configuration pass `promtool`.

use collector_e2e::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn shipped_rules_and_scrape_config_pass_promtool() {
    let rules = repo("etc/prometheus/collector.rules.yml");
    let (ok, said) = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(ok && said.contains("SUCCESS"), "{said}");
    let tests = repo("etc/prometheus/collector.rules.test.yml");
    let (ok, said) = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(ok, "{said}");
    let cfg = repo("etc/prometheus/prometheus.yml");
    let (ok, said) = promtool(&["check", "config", cfg.to_str().unwrap()]);
    assert!(ok, "{said}");
}

/// A Prometheus server in a temp dir, killed and reaped on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: collector\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        // A free port for Prometheus's own web server.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("prometheus.log")).unwrap(),
            ))
            .spawn()
            .expect("prometheus (Debian package prometheus; .ci/run installs it)");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        wait_for(WAIT, || {
            (http_get(p.addr, "/-/ready").0 == 200).then_some(())
        })
        .unwrap_or_else(|| panic!("prometheus never ready:\n{}", p.log()));
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/query`: the first result's value, when there is one.
    fn query(&self, promql: &str) -> Option<f64> {
        let (st, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(promql)),
        );
        if st != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Raw answer of `/api/v1/query`, for the record.
    fn query_raw(&self, promql: &str) -> String {
        http_get(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(promql)),
        )
        .1
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).to_string();
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        return (0, String::new());
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Prometheus answers small bodies with a length, large ones chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[test]
fn a_real_prometheus_scrapes_what_the_collector_stored_and_its_restarts() {
    let d = Daemon::start(Setup::default().workers(2));
    let target = d.metrics_addr().expect("metrics endpoint");
    let prom = Prometheus::start(target);

    // N samples over UDP, ceilometer TCP and MessagePack-RPC.
    let (n_udp, n_tcp, n_rpc) = (40, 25, 35);
    let n = n_udp + n_tcp + n_rpc;
    let udp: Vec<_> = (0..n_udp)
        .map(|i| encode(&sample(&format!("p-udp-{i}"), SECRET)))
        .collect();
    send_udp(d.udp.unwrap(), &udp);
    let mut t = TcpStream::connect(d.tcp.unwrap()).unwrap();
    for i in 0..n_tcp {
        t.write_all(&tcp_frame(&sample(&format!("p-tcp-{i}"), SECRET)))
            .unwrap();
    }
    drop(t);
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let rpc: Vec<_> = (0..n_rpc)
        .map(|i| sample(&format!("p-rpc-{i}"), SECRET))
        .collect();
    assert_eq!(c.call(rpc).unwrap().stored, n_rpc);
    assert_eq!(d.wait_samples(n, WAIT), n, "log:\n{}", d.log());

    // Two scrapes at least, and the stored total as Prometheus sees it.
    let q = "sum(collector_samples_stored_total)";
    let got = wait_for(WAIT, || {
        let scrapes = prom.query("count_over_time(up{job=\"collector\"}[5m])")?;
        let v = prom.query(q)?;
        (scrapes >= 2.0 && v == n as f64).then_some(v)
    });
    assert_eq!(
        got,
        Some(n as f64),
        "Prometheus never answered {q} = {n}: {}\nprometheus log:\n{}",
        prom.query_raw(q),
        prom.log()
    );
    println!("query {q} -> {}", prom.query_raw(q));
    for src in ["udp", "tcp", "rpc"] {
        let q = format!("sum(collector_samples_stored_total{{source=\"{src}\"}})");
        let want = match src {
            "udp" => n_udp,
            "tcp" => n_tcp,
            _ => n_rpc,
        };
        assert_eq!(prom.query(&q), Some(want as f64), "{}", prom.query_raw(&q));
    }
    assert_eq!(prom.query("up{job=\"collector\"}"), Some(1.0));
    assert_eq!(prom.query("collector_ready"), Some(1.0));

    // A worker killed with SIGKILL shows up in the restarts metric.
    let pids = d.wait_workers(2, &[], WAIT);
    // SAFETY: kill(2) on a worker of our own daemon.
    unsafe { libc::kill(pids[1], libc::SIGKILL) };
    let q = "sum(collector_worker_restarts_total{cause=\"crash\"})";
    let restarts = wait_for(WAIT, || prom.query(q).filter(|v| *v >= 1.0));
    assert_eq!(restarts, Some(1.0), "{}", prom.query_raw(q));
    println!("query {q} -> {}", prom.query_raw(q));
    // The scrape itself never failed (the target stayed up throughout).
    let q = "min_over_time(up{job=\"collector\"}[5m])";
    assert_eq!(prom.query(q), Some(1.0), "{}", prom.query_raw(q));
}

//! AMQP figures in /metrics against a real RabbitMQ and ceilometer's own notifier
//! (tests/py/notify.py): connected workers, deliveries acked, samples by source `amqp`.

use collector_e2e::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn broker() -> String {
    std::env::var("COLLECTOR_TEST_AMQP").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

fn notify(args: &[&str]) -> std::process::Output {
    Command::new(ceilometer_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/notify.py"))
        .args(args)
        .output()
        .expect("run notify.py")
}

/// The test's exchange and queue, deleted from the broker on drop.
struct Topology {
    exchange: String,
    topic: String,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let q = format!("{}.sample", self.topic);
        let _ = notify(&["--delete", &broker(), &self.exchange, &q]);
    }
}

fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn amqp_connected_acked_and_samples_by_source() {
    let unique = format!("{}-{}", std::process::id(), line!());
    let t = Topology {
        exchange: format!("e2e-metrics-{unique}"),
        topic: format!("e2e-metrics-metering-{unique}"),
    };
    let d = Daemon::start(Setup::default().workers(2).extra(&format!(
        "[messaging]\ntransport_url = \"rabbit://guest:guest@{}/\"\ncontrol_exchange = \"{}\"\nmetering_topic = \"{}\"",
        broker(),
        t.exchange,
        t.topic
    )));
    let addr = d.metrics_addr().unwrap();
    wait_for(WAIT, || {
        (value(&metrics(addr), "collector_amqp_connected") == Some(2.0)).then_some(())
    })
    .unwrap_or_else(|| panic!("workers never connected:\n{}\n{}", metrics(addr), d.log()));
    // 30 samples in 10 messages of 3.
    let out = notify(&[&broker(), &t.exchange, &t.topic, SECRET, "30", "3", "mq"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.wait_samples(30, WAIT), 30);
    let text = wait_for(WAIT, || {
        let m = metrics(addr);
        (value(&m, "collector_amqp_deliveries_acked_total") == Some(10.0)).then_some(m)
    })
    .unwrap_or_else(|| panic!("acks never counted:\n{}", metrics(addr)));
    assert_eq!(value(&text, "collector_amqp_deliveries_total"), Some(10.0));
    assert_eq!(
        value(&text, "collector_amqp_deliveries_rejected_total"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "collector_samples_stored_total{source=\"amqp\"}"),
        Some(30.0)
    );
    assert!(value(&text, "collector_received_bytes_total{source=\"amqp\"}").unwrap_or(0.0) > 0.0);
}

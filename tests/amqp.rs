//! ceilometer's `notifier://` samples through RabbitMQ into the daemon (issue 10): a real
//! broker, ceilometer's own `SampleNotifierPublisher` as the publisher, the built binary.

use collector_e2e::*;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn broker() -> String {
    std::env::var("COLLECTOR_TEST_AMQP").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

/// A test's exchange and topic, deleted from the broker on drop.
struct Topology {
    exchange: String,
    topic: String,
}

impl Topology {
    fn new(test: &str) -> Topology {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let unique = format!("{}-{nanos}", std::process::id());
        Topology {
            exchange: format!("e2e-{test}-{unique}"),
            topic: format!("e2e-metering-{test}-{unique}"),
        }
    }

    fn setup(&self, workers: usize) -> Setup {
        // With COLLECTOR_TEST_AMQP_TLS=<CA file> (scripts/test's second pass) the daemon's
        // consumers connect over TLS (COLLECTOR_TEST_AMQPS, default localhost:5671).
        let (url, tls) = match std::env::var("COLLECTOR_TEST_AMQP_TLS") {
            Ok(ca) => (
                format!(
                    "amqps://guest:guest@{}/",
                    std::env::var("COLLECTOR_TEST_AMQPS")
                        .unwrap_or_else(|_| "localhost:5671".into())
                ),
                format!("\nssl_ca_file = {ca:?}"),
            ),
            Err(_) => (format!("rabbit://guest:guest@{}/", broker()), String::new()),
        };
        Setup::default().workers(workers).extra(&format!(
            "[messaging]\ntransport_url = \"{url}\"\ncontrol_exchange = \"{}\"\nmetering_topic = \"{}\"\nrabbit_qos_prefetch_count = 100{tls}",
            self.exchange,
            self.topic
        ))
    }

    /// Publish with ceilometer's notifier; returns the message ids.
    fn publish(&self, secret: &str, count: usize, per_message: usize, prefix: &str) -> Vec<String> {
        let out = Command::new(ceilometer_python())
            .arg(script())
            .args([
                &broker(),
                &self.exchange,
                &self.topic,
                secret,
                &count.to_string(),
                &per_message.to_string(),
                prefix,
            ])
            .output()
            .expect("run notify.py");
        assert!(
            out.status.success(),
            "notify.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Messages in the queue (ready + unacked), from rabbitmqctl.
    fn queued(&self) -> Option<u64> {
        let out = rabbitmqctl(&["list_queues", "name", "messages"]);
        let q = format!("{}.sample", self.topic);
        out.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(q.as_str()))
                .then(|| f.next()?.parse().ok())
                .flatten()
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new(ceilometer_python())
            .arg(script())
            .args([
                "--delete",
                &broker(),
                &self.exchange,
                &format!("{}.sample", self.topic),
            ])
            .output();
    }
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/notify.py")
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_stored_once(d: &Daemon, ids: &[String]) {
    let n = ids.len() as i64;
    assert_eq!(
        d.wait_samples(n, WAIT),
        n,
        "not every published sample was stored"
    );
    let c = d.db();
    let (total, distinct): (i64, i64) = c
        .query_row(
            "SELECT count(*), count(DISTINCT message_id) FROM sample",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((total, distinct), (n, n));
    let stored: HashSet<String> = d.message_ids().into_iter().collect();
    assert!(ids.iter().all(|id| stored.contains(id)));
}

#[test]
fn ten_thousand_samples_from_several_publishers_stored_once_and_forgeries_rejected() {
    let topo = Topology::new("bulk");
    let d = Daemon::start(topo.setup(2));
    // Both workers consume before anything is published.
    let consuming = wait_for(WAIT, || {
        let s = d.status();
        let ws = s["workers"].as_array()?.clone();
        (ws.len() == 2 && ws.iter().all(|w| w["amqp"]["consuming"] == true)).then_some(())
    });
    assert!(
        consuming.is_some(),
        "workers never consumed: {}",
        d.status()
    );
    let (code, out, _) = d.ctl(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("consuming"), "{out}");
    let topo = std::sync::Arc::new(topo);
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let t = topo.clone();
            std::thread::spawn(move || t.publish(SECRET, 2500, 50, &format!("bulk-{p}")))
        })
        .collect();
    let forged = topo.publish("not-the-secret", 20, 10, "forged");
    let ids: Vec<String> = publishers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(ids.len(), 10_000);
    assert_eq!(forged.len(), 20);
    assert_stored_once(&d, &ids);
    let counted = wait_for(WAIT, || {
        let s = d.stats();
        (s["invalid_signature"].as_u64() >= Some(20) && s["amqp_deliveries"].as_u64() >= Some(202))
            .then_some(s)
    });
    assert!(counted.is_some(), "{}", d.stats());
    // Everything was acked: the queue drains to empty.
    assert!(wait_for(WAIT, || (topo.queued() == Some(0)).then_some(())).is_some());
}

#[test]
fn a_killed_broker_connection_loses_nothing() {
    let topo = Topology::new("kill");
    let d = Daemon::start(topo.setup(1));
    assert!(
        wait_for(WAIT, || (d.status()["workers"][0]["amqp"]["consuming"]
            == true)
            .then_some(()))
        .is_some()
    );
    let topo = std::sync::Arc::new(topo);
    let t = topo.clone();
    let publisher = std::thread::spawn(move || t.publish(SECRET, 3000, 10, "kill"));
    // Close the collector's connections while the stream flows.
    let mut closed = 0;
    let start = Instant::now();
    while closed < 2 && start.elapsed() < Duration::from_secs(20) {
        let list = rabbitmqctl(&["list_connections", "pid", "client_properties"]);
        for line in list.lines().filter(|l| l.contains("collector[")) {
            if let Some(pid) = line.split_whitespace().next() {
                let _ = Command::new("rabbitmqctl")
                    .args(["close_connection", pid, "e2e test kill"])
                    .output();
                closed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    let ids = publisher.join().unwrap();
    assert!(
        closed >= 1,
        "never found the collector's connection to kill"
    );
    assert_stored_once(&d, &ids);
    assert!(
        wait_for(WAIT, || (d.stats()["amqp_reconnects"].as_u64() >= Some(1))
            .then_some(()))
        .is_some()
    );
}

#[test]
fn a_worker_killed_with_unacked_deliveries_gets_them_redelivered() {
    let topo = Topology::new("kill9");
    let d = Daemon::start(topo.setup(1));
    let pids = d.wait_workers(1, &[], WAIT);
    assert!(
        wait_for(WAIT, || (d.status()["workers"][0]["amqp"]["consuming"]
            == true)
            .then_some(()))
        .is_some()
    );
    // Storage blocked: deliveries reach the worker but cannot be committed, so stay unacked.
    let blocker = d.db();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let ids = topo.publish(SECRET, 500, 10, "unacked");
    let received = wait_for(WAIT, || {
        let w = &d.status()["workers"][0];
        (w["amqp"]["deliveries"].as_u64() >= Some(1)).then_some(())
    });
    assert!(received.is_some(), "worker never received a delivery");
    // SAFETY: killing our daemon's worker.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    d.wait_workers(1, &pids, WAIT);
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    assert_stored_once(&d, &ids);
}

#[test]
fn unwritable_storage_keeps_messages_queued_until_it_recovers() {
    let topo = Topology::new("dbdown");
    let d = Daemon::start(topo.setup(1));
    assert!(
        wait_for(WAIT, || (d.status()["workers"][0]["amqp"]["consuming"]
            == true)
            .then_some(()))
        .is_some()
    );
    let blocker = d.db();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let ids = topo.publish(SECRET, 200, 10, "dbdown");
    // The write lock outlives the driver's busy timeout: the batch fails, deliveries are
    // rejected for redelivery and stay in the queue.
    let failed = wait_for(WAIT, || {
        (d.stats()["dispatch_errors"].as_u64() >= Some(1)).then_some(())
    });
    assert!(failed.is_some(), "{}", d.stats());
    assert!(
        topo.queued().unwrap_or(0) > 0,
        "messages left the queue while storage was down"
    );
    assert_eq!(d.count_samples(), 0);
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    assert_stored_once(&d, &ids);
    assert!(wait_for(WAIT, || (topo.queued() == Some(0)).then_some(())).is_some());
}

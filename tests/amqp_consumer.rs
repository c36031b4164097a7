//! The AMQP consumer (`collector::amqp`) against a real RabbitMQ (127.0.0.1:5672, guest/guest,
//! or `COLLECTOR_TEST_AMQP=host:port`), fed by ceilometer's own `notifier://` publisher
//! (tests/py/notify.py in a venv with PyPI ceilometer, oslo.messaging and kombu). Each test
//! uses its own exchange and topic and deletes them at the end; `rabbitmqctl` (run as root)
//! inspects queues and kills connections.

use collector::amqp::{decode_envelope, AmqpConsumer, Delivery};
use collector::config::MessagingConfig;
use collector::dispatch::Wake;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "amqp-e2e-secret";

fn broker() -> String {
    std::env::var("COLLECTOR_TEST_AMQP").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

/// With `COLLECTOR_TEST_AMQP_TLS=<CA file>` (scripts/test's second pass), the consumer under
/// test connects over TLS to the broker's TLS listener (`COLLECTOR_TEST_AMQPS`, default
/// `localhost:5671`), checking its certificate against that CA; publishers stay plain.
fn with_tls(mut m: MessagingConfig) -> MessagingConfig {
    if let Ok(ca) = std::env::var("COLLECTOR_TEST_AMQP_TLS") {
        let tls = std::env::var("COLLECTOR_TEST_AMQPS").unwrap_or_else(|_| "localhost:5671".into());
        m.transport_url = format!("amqps://guest:guest@{tls}/");
        m.ssl_ca_file = ca;
    }
    m
}

/// The venv with ceilometer's publisher stack (shared with the other end-to-end tests).
fn python() -> PathBuf {
    collector_e2e::ceilometer_python()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/notify.py")
}

/// A test's exchange and topic; both are deleted from the broker on drop.
struct Topology {
    exchange: String,
    topic: String,
}

impl Topology {
    fn new(test: &str) -> Topology {
        let unique = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        Topology {
            exchange: format!("e2e-amqp-{test}-{unique}"),
            topic: format!("e2e-metering-{test}-{unique}"),
        }
    }

    fn queue(&self) -> String {
        format!("{}.sample", self.topic)
    }

    fn config(&self, durable: bool, prefetch: u16) -> MessagingConfig {
        with_tls(MessagingConfig {
            transport_url: format!("rabbit://guest:guest@{}/", broker()),
            control_exchange: self.exchange.clone(),
            metering_topic: self.topic.clone(),
            amqp_durable_queues: durable,
            rabbit_qos_prefetch_count: prefetch,
            ..MessagingConfig::default()
        })
    }

    /// Publish `count` samples, `per_message` to a notification, with ceilometer's
    /// `SampleNotifierPublisher`; returns their message ids.
    fn notify(&self, count: usize, per_message: usize, prefix: &str, durable: bool) -> Vec<String> {
        let mut cmd = Command::new(python());
        cmd.arg(script()).args([
            &broker(),
            &self.exchange,
            &self.topic,
            SECRET,
            &count.to_string(),
            &per_message.to_string(),
            prefix,
        ]);
        if durable {
            cmd.arg("durable");
        }
        let out = cmd.output().expect("run notify.py");
        assert!(
            out.status.success(),
            "notify.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(ids.len(), count);
        ids
    }

    /// (ready, unacknowledged) messages of our queue, from the broker.
    fn depth(&self) -> (u64, u64) {
        let out = rabbitmqctl(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        let queue = self.queue();
        for line in out.lines() {
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() == 3 && cols[0] == queue {
                return (cols[1].parse().unwrap(), cols[2].parse().unwrap());
            }
        }
        panic!("queue {queue} not found in:\n{out}");
    }

    fn wait_depth(&self, want: (u64, u64), timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.depth();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queue {}: (ready, unacked) = {got:?}, want {want:?}",
                self.queue()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Close our consumer's connection from the broker side, found by the connection name
    /// the consumer sets in its client properties.
    fn kill_connection(&self) {
        let out = rabbitmqctl(&["list_connections", "pid", "client_properties"]);
        let line = out
            .lines()
            .find(|l| l.contains(&format!("{}/{}", self.exchange, self.queue())))
            .unwrap_or_else(|| panic!("no connection for {} in:\n{out}", self.queue()));
        let pid = line.split('\t').next().unwrap();
        rabbitmqctl(&["close_connection", pid, "e2e: killed by the test"]);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new(python())
            .arg(script())
            .args(["--delete", &broker(), &self.exchange, &self.queue()])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The loop's side of the wake-up: counts rings, lets a test sleep until the next one.
#[derive(Default)]
struct Bell {
    rings: Mutex<u64>,
    cv: Condvar,
}

impl Wake for Bell {
    fn wake(&self) {
        *self.rings.lock().unwrap() += 1;
        self.cv.notify_all();
    }
}

impl Bell {
    fn rings(&self) -> u64 {
        *self.rings.lock().unwrap()
    }

    fn wait(&self, timeout: Duration) {
        let guard = self.rings.lock().unwrap();
        let _ = self.cv.wait_timeout(guard, timeout).unwrap();
    }
}

fn start(cfg: &MessagingConfig) -> (AmqpConsumer, Arc<Bell>) {
    let bell = Arc::new(Bell::default());
    let consumer = AmqpConsumer::start(cfg, bell.clone()).expect("start");
    (consumer, bell)
}

/// Receive exactly `n` deliveries within `timeout`, polling only after wake-ups (and on a
/// short tick, as the loop's own timers would).
fn recv(consumer: &mut AmqpConsumer, bell: &Bell, n: usize, timeout: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        match consumer.try_recv() {
            Some(d) => got.push(d),
            None => {
                assert!(
                    Instant::now() < deadline,
                    "received {} of {n} deliveries; status {:?}",
                    got.len(),
                    consumer.status()
                );
                bell.wait(Duration::from_millis(100));
            }
        }
    }
    got
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_consuming(consumer: &AmqpConsumer) {
    wait_until(Duration::from_secs(10), "consuming", || {
        consumer.status().consuming
    });
}

/// Decode every delivery; check each sample's signature and collect the message ids.
fn sample_ids(deliveries: &[Delivery]) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for d in deliveries {
        let (message_id, samples) = decode_envelope(&d.body).expect("decode");
        assert!(message_id.is_some(), "notification without message_id");
        for s in samples {
            let id = s.get("message_id").and_then(|v| v.as_str()).unwrap();
            assert!(
                meter::signature::verify_signature(&s, SECRET),
                "signature of {id} does not verify: {s:?}"
            );
            assert!(ids.insert(id.to_string()), "sample {id} twice");
        }
    }
    ids
}

#[test]
fn ceilometer_notifier_samples_arrive_with_valid_signatures() {
    let topo = Topology::new("notifier");
    // The publisher declares the queue first (oslo's default queue for a topic without a
    // consumer); ours must accept it as it is.
    let mut want: BTreeSet<String> = topo.notify(20, 5, "before", false).into_iter().collect();
    let (mut consumer, bell) = start(&topo.config(false, 100));
    wait_consuming(&consumer);
    // ... and the publisher then accepts the queue as the consumer declared it.
    want.extend(topo.notify(30, 10, "after", false));
    let deliveries = recv(&mut consumer, &bell, 7, Duration::from_secs(10));
    assert!(deliveries.iter().all(|d| !d.redelivered));
    assert_eq!(sample_ids(&deliveries), want);
    assert!(bell.rings() >= 1);
    for d in &deliveries {
        consumer.ack(d.tag);
    }
    topo.wait_depth((0, 0), Duration::from_secs(5));
    let status = consumer.status();
    assert!(status.connected && status.consuming, "{status:?}");
    assert_eq!((status.deliveries, status.reconnects), (7, 0));
    consumer.shutdown();
}

#[test]
fn durable_queues_match_oslo_and_fall_back_like_it() {
    // Both sides durable: the same declaration, no PRECONDITION_FAILED.
    let topo = Topology::new("durable");
    let want: BTreeSet<String> = topo.notify(4, 2, "d", true).into_iter().collect();
    let (mut consumer, bell) = start(&topo.config(true, 10));
    let deliveries = recv(&mut consumer, &bell, 2, Duration::from_secs(10));
    assert_eq!(sample_ids(&deliveries), want);
    deliveries.iter().for_each(|d| consumer.ack(d.tag));
    consumer.shutdown();
    drop(topo);

    // Queue declared non-durable by the publisher, consumer configured durable: oslo's
    // fallback uses the existing non-durable exchange and queue instead of failing.
    let topo = Topology::new("fallback");
    let want: BTreeSet<String> = topo.notify(3, 3, "f", false).into_iter().collect();
    let (mut consumer, bell) = start(&topo.config(true, 10));
    let deliveries = recv(&mut consumer, &bell, 1, Duration::from_secs(10));
    assert_eq!(sample_ids(&deliveries), want);
    consumer.ack(deliveries[0].tag);
    topo.wait_depth((0, 0), Duration::from_secs(5));
    assert_eq!(consumer.status().reconnects, 0);
    consumer.shutdown();
}

#[test]
fn reconnects_after_the_broker_kills_the_connection() {
    let topo = Topology::new("reconnect");
    let (mut consumer, bell) = start(&topo.config(false, 100));
    wait_consuming(&consumer);
    let want: BTreeSet<String> = topo.notify(5, 1, "r", false).into_iter().collect();
    let first = recv(&mut consumer, &bell, 5, Duration::from_secs(10));
    assert_eq!(sample_ids(&first), want);
    consumer.ack(first[0].tag);
    consumer.ack(first[1].tag);
    topo.wait_depth((0, 3), Duration::from_secs(5));

    topo.kill_connection();
    wait_until(Duration::from_secs(10), "a reconnect", || {
        let s = consumer.status();
        s.reconnects == 1 && s.consuming
    });
    let status = consumer.status();
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("CONNECTION_FORCED"),
        "{status:?}"
    );
    // The three unacked deliveries come back, marked redelivered.
    let again = recv(&mut consumer, &bell, 3, Duration::from_secs(10));
    assert!(again.iter().all(|d| d.redelivered), "{again:?}");
    let old: BTreeSet<String> = sample_ids(&first[2..]);
    assert_eq!(sample_ids(&again), old);
    // Tags of the dead connection are dropped, not sent on the new channel (where they could
    // ack the wrong message or close the channel with an unknown delivery tag).
    for d in &first[2..] {
        consumer.ack(d.tag);
    }
    std::thread::sleep(Duration::from_millis(300));
    topo.wait_depth((0, 3), Duration::from_secs(5));
    for d in &again {
        consumer.ack(d.tag);
    }
    // The consumer goes on with new messages on the new connection.
    let more: BTreeSet<String> = topo.notify(2, 1, "r2", false).into_iter().collect();
    let next = recv(&mut consumer, &bell, 2, Duration::from_secs(10));
    assert_eq!(sample_ids(&next), more);
    next.iter().for_each(|d| consumer.ack(d.tag));
    topo.wait_depth((0, 0), Duration::from_secs(5));
    assert_eq!(consumer.status().reconnects, 1);
    consumer.shutdown();
}

#[test]
fn reject_with_requeue_redelivers_later_and_ack_removes() {
    let topo = Topology::new("reject");
    let (mut consumer, bell) = start(&topo.config(false, 100));
    wait_consuming(&consumer);
    topo.notify(2, 1, "j", false);
    let got = recv(&mut consumer, &bell, 2, Duration::from_secs(10));

    // Requeue: held about a second (a dead database must not spin the broker), then back.
    let rejected_at = Instant::now();
    consumer.reject(got[0].tag, true);
    // Reject without requeue: dropped by the broker (no dead-letter exchange here).
    consumer.reject(got[1].tag, false);
    let again = recv(&mut consumer, &bell, 1, Duration::from_secs(10));
    let held = rejected_at.elapsed();
    assert!(
        held >= Duration::from_millis(900),
        "redelivered after {held:?}"
    );
    assert!(again[0].redelivered);
    assert_eq!(again[0].body, got[0].body);
    assert_ne!(again[0].tag, got[0].tag);
    topo.wait_depth((0, 1), Duration::from_secs(5));

    consumer.ack(again[0].tag);
    topo.wait_depth((0, 0), Duration::from_secs(5));
    assert!(consumer.try_recv().is_none());
    consumer.shutdown();
}

#[test]
fn stop_consuming_then_shutdown_returns_unacked_messages() {
    let topo = Topology::new("stop");
    let (mut consumer, bell) = start(&topo.config(false, 100));
    wait_consuming(&consumer);
    topo.notify(3, 1, "s", false);
    let got = recv(&mut consumer, &bell, 3, Duration::from_secs(10));
    consumer.ack(got[0].tag);

    consumer.stop_consuming();
    wait_until(Duration::from_secs(5), "the consumer cancelled", || {
        !consumer.status().consuming
    });
    // Deliveries in flight can still be acked: the channel stays open.
    consumer.ack(got[1].tag);
    // New messages wait in the queue.
    topo.notify(2, 1, "s2", false);
    topo.wait_depth((2, 1), Duration::from_secs(5));
    assert!(consumer.try_recv().is_none());
    assert!(consumer.status().connected);

    let t = Instant::now();
    consumer.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    // The unacked delivery went back to the queue with the two that were never delivered.
    topo.wait_depth((3, 0), Duration::from_secs(5));
}

#[test]
fn a_broker_that_refuses_us_is_retried_and_reported_without_blocking() {
    // Wrong password: the broker says why (authentication_failure_close).
    let mut cfg = Topology::new("auth").config(false, 10);
    cfg.transport_url = format!("rabbit://guest:wrong@{}/", broker());
    let t = Instant::now();
    let (consumer, _bell) = start(&cfg);
    assert!(t.elapsed() < Duration::from_millis(500), "start blocked");
    wait_until(Duration::from_secs(10), "an error", || {
        consumer.status().last_error.is_some()
    });
    let status = consumer.status();
    assert!(!status.connected, "{status:?}");
    let error = status.last_error.unwrap();
    assert!(error.contains("ACCESS_REFUSED"), "{error}");
    assert!(!error.contains("wrong"), "password in the error: {error}");
    let t = Instant::now();
    consumer.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "shutdown took {:?}",
        t.elapsed()
    );

    // Nobody listening: connection refused, then backoff; shutdown interrupts the wait.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    cfg.transport_url = format!("rabbit://guest:guest@127.0.0.1:{port}/");
    let (consumer, _bell) = start(&cfg);
    wait_until(Duration::from_secs(5), "an error", || {
        consumer.status().last_error.is_some()
    });
    let error = consumer.status().last_error.unwrap();
    assert!(error.contains("cannot connect"), "{error}");
    let t = Instant::now();
    consumer.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "shutdown took {:?}",
        t.elapsed()
    );
}

/// A TCP relay to the broker whose connections can be frozen: bytes are then read and
/// dropped in both directions, as on a dead network path (no RST, no FIN).
struct Relay {
    port: u16,
    /// Connections with an index below this are frozen.
    frozen_below: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    fn start() -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen_below = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (frozen, count) = (frozen_below.clone(), accepted.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let index = count.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = std::net::TcpStream::connect(broker()) else {
                    continue;
                };
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    let frozen = frozen.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            if index >= frozen.load(Ordering::SeqCst)
                                && to.write_all(&buf[..n]).is_err()
                            {
                                break;
                            }
                        }
                        if index < frozen.load(Ordering::SeqCst) {
                            // A dead path does not say it closed either.
                            std::thread::sleep(Duration::from_secs(30));
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pipe(upstream, client);
            }
        });
        Relay {
            port,
            frozen_below,
            accepted,
        }
    }

    /// Freeze every connection made so far.
    fn freeze(&self) {
        self.frozen_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

#[test]
fn missed_heartbeats_end_a_dead_connection_and_it_is_reopened() {
    let topo = Topology::new("heartbeat");
    let relay = Relay::start();
    let mut cfg = topo.config(false, 10);
    // oslo.messaging's URL option; 2 s makes the dead path show within 4 s.
    cfg.transport_url = format!(
        "rabbit://guest:guest@127.0.0.1:{}/?heartbeat_timeout_threshold=2",
        relay.port
    );
    let (mut consumer, bell) = start(&cfg);
    wait_consuming(&consumer);
    // Idle over several heartbeat periods: heartbeats keep the connection up.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(consumer.status().reconnects, 0, "{:?}", consumer.status());

    relay.freeze();
    let frozen_at = Instant::now();
    wait_until(Duration::from_secs(10), "a reconnect", || {
        let s = consumer.status();
        s.reconnects == 1 && s.consuming
    });
    let took = frozen_at.elapsed();
    let error = consumer.status().last_error.unwrap_or_default();
    assert!(error.contains("no heartbeat"), "{error}");
    assert!(took >= Duration::from_secs(3), "dead after {took:?}");
    // The new connection works.
    let want: BTreeSet<String> = topo.notify(2, 1, "h", false).into_iter().collect();
    let got = recv(&mut consumer, &bell, 2, Duration::from_secs(10));
    assert_eq!(sample_ids(&got), want);
    got.iter().for_each(|d| consumer.ack(d.tag));
    topo.wait_depth((0, 0), Duration::from_secs(5));
    consumer.shutdown();
}

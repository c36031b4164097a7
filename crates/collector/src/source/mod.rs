//! The sources a worker reads: UDP datagrams ([`udp`]), ceilometer `tcp://` frames ([`tcp`]),
//! MessagePack-RPC requests ([`rpc`]) over the connections of [`conns`], and AMQP deliveries
//! ([`amqp`]).
//!
//! Each source owns its sockets and connection state and, when the worker's loop polls it,
//! turns bytes into decoded sample maps and hands them to one step, [`Intake::ingest`], which
//! verifies, checks and batches them for the dispatchers. Limits on what a source may read and
//! hold live in the source; what happens to a sample once decoded lives in [`Intake`].

pub mod amqp;
pub mod conns;
pub mod rpc;
pub mod tcp;
pub mod udp;

use crate::counters::Counters;
use crate::dispatch::{Batch, Ticket, WriterMsg};
use crate::untrusted::{untrusted, Untrusted};
use meter::{Node, Parts, Sample, View};
use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Batches handed to the writer and not yet completed. More than one keeps the writer busy
/// while the loop fills the next; the writer commits the ones that queued up behind a slow
/// commit together (group commit), so under load transactions grow and the per-commit cost
/// of SQLite's indexes is shared. With the pending batch's cap this bounds a worker's memory
/// to about (MAX_IN_FLIGHT + 1) × batch_size samples when storage is slower than the input.
/// Measured (collector-load, one worker, alternating builds twice): 2 and 4 in flight store
/// the same within noise over UDP and RPC; 2 peaks at 53-57 MiB RSS under a flood, 4 at 67-71.
const MAX_IN_FLIGHT: usize = 2;

/// Wire bytes at which the pending batch goes to the writer even if it holds fewer than
/// `batch_size` samples. A decoded sample takes about five times its wire size, so this bounds
/// a worker's memory when samples are large; ceilometer's (~1 KB) reach `batch_size` first
/// (issue 18).
///
/// Reading pauses once the pending batch is full (at `batch_size` samples or these bytes) and
/// the writer already has MAX_IN_FLIGHT batches. It used to go on to twice either, so that the
/// writer's next transaction was bigger; measured with one worker under a UDP flood and paced
/// just below the maximum (collector-load, 150,000 samples, alternating builds, load average
/// 4-6), that held 31.2-34.8 MiB at peak against 25.0-25.5 MiB now, for stored/s 0.93× under
/// the flood (pairs 0.86-0.99, noise of the same size) and the same at the paced rate and over
/// RPC; issue 18 caps a worker at 30 MiB.
pub const BATCH_BYTES: usize = 2 << 20;

/// Rate-limited logging of a repeated problem: at most one line a second, with a count of
/// what was suppressed.
pub struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            last: None,
            suppressed: 0,
        }
    }

    pub fn log(&mut self, level: log::Level, msg: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        let n = std::mem::take(&mut self.suppressed);
        if n > 0 {
            log::log!(level, "{} (and {n} more like it in the last second)", msg());
        } else {
            log::log!(level, "{}", msg());
        }
        self.last = Some(now);
    }
}

impl Throttle {
    /// Like [`log`](Self::log), with the sample's `message_id` and `source` as structured
    /// fields (JSON logs carry them as keys).
    pub fn log_kv(
        &mut self,
        level: log::Level,
        message_id: &str,
        source: &str,
        msg: impl FnOnce() -> String,
    ) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        let n = std::mem::take(&mut self.suppressed);
        // Capped like the message's copy (the log encoders escape it).
        let message_id: String = message_id
            .chars()
            .take(crate::untrusted::MAX_CHARS)
            .collect();
        let message_id = message_id.as_str();
        if n > 0 {
            log::log!(level, message_id = message_id, source = source; "{} (and {n} more like it in the last second)", msg());
        } else {
            log::log!(level, message_id = message_id, source = source; "{}", msg());
        }
        self.last = Some(now);
    }
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

/// What the sources feed: the one ingest step, the pending batch and the hand-off to the
/// writer thread.
pub struct Intake {
    pub counters: Counters,
    pub batch: Batch,
    /// Batches handed to the writer and not yet completed.
    pub in_flight: usize,
    /// Set once the worker stops: every batch goes to the writer at once.
    pub stopping: bool,
    next_batch_id: u64,
    writer_tx: Option<mpsc::Sender<WriterMsg>>,
    verify: bool,
    db: bool,
    file: bool,
    signer: meter::signature::SigningKey,
    max_batch: usize,
    batch_timeout: Duration,
    log_sig: Throttle,
    log_bad: Throttle,
}

impl Intake {
    /// A worker whose batches go to another worker's writer (`crate::relay`) hands them over
    /// at half `batch_timeout`: the hop and worker 0's commit then fit in the rest, so that its
    /// samples are committed about as soon as worker 0's own.
    pub fn hand_over_sooner(&mut self) {
        self.batch_timeout /= 2;
    }

    pub fn new(cfg: &crate::config::Config, writer_tx: mpsc::Sender<WriterMsg>) -> Intake {
        let db = cfg.has_dispatcher("database");
        Intake {
            counters: Counters::new(),
            batch: Batch::default(),
            in_flight: 0,
            stopping: false,
            next_batch_id: 1,
            writer_tx: Some(writer_tx),
            verify: db,
            db,
            file: cfg.has_dispatcher("file"),
            signer: meter::signature::SigningKey::new(&cfg.publisher.telemetry_secret),
            max_batch: cfg.collector.batch_size.max(1),
            batch_timeout: Duration::from_secs_f64(cfg.collector.batch_timeout),
            log_sig: Throttle::new(),
            log_bad: Throttle::new(),
        }
    }

    /// Room for more samples? When the writer is behind, sources stop reading and the kernel's
    /// buffers (and TCP flow control) hold the rest.
    pub fn can_accept(&self) -> bool {
        // An empty batch always accepts: bytes are only counted for what it holds, but a
        // bound that an empty batch could exceed would stop reading for good.
        self.batch.is_empty()
            || (self.batch.len() < self.max_batch && self.batch.bytes < BATCH_BYTES)
    }

    /// Whether the pending batch is due for the writer by size (samples or bytes).
    fn full(&self) -> bool {
        self.batch.len() >= self.max_batch || self.batch.bytes >= BATCH_BYTES
    }

    /// A source took `n` wire bytes into the pending batch (a datagram or frame whose samples
    /// were accepted; a request's rejected samples count too, erring on the safe side).
    pub fn add_bytes(&mut self, n: usize) {
        if !self.batch.is_empty() {
            self.batch.bytes = self.batch.bytes.saturating_add(n);
        }
    }

    /// When the pending batch must go to the writer at the latest, if it holds anything.
    pub fn deadline(&self) -> Option<Instant> {
        // A full writer wakes the loop with its completion; until then there is nothing to do.
        if self.batch.is_empty() || self.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        self.batch.opened.map(|t| t + self.batch_timeout)
    }

    /// A full batch goes to the writer at once (if it has room), from inside read loops too:
    /// otherwise one readiness event could drain a flood into a single unbounded batch.
    pub fn flush_if_full(&mut self) {
        if self.full() {
            self.maybe_flush(Instant::now());
        }
    }

    /// One decoded sample map from any source: verify, check, batch. Returns whether it was
    /// accepted for the database (or file) dispatcher.
    pub fn ingest<V: Parts>(&mut self, v: V, source: &str) -> bool {
        self.counters.samples_received += 1;
        let src = crate::counters::source_index(source);
        self.counters.by_source.at_mut(src).received += 1;
        let signed_ok = !self.verify || self.signer.verify(&v);
        if !signed_ok {
            self.counters.invalid_signature += 1;
            self.counters.samples_rejected += 1;
            self.counters.by_source.at_mut(src).invalid_signature += 1;
            let id = v
                .get_key("message_id")
                .and_then(Node::str_value)
                .unwrap_or("?");
            self.log_sig.log_kv(log::Level::Warn, id, source, || {
                format!("{source}: invalid signature on sample {}", Untrusted(id))
            });
            if !self.file {
                return false;
            }
        }
        let sample = match Sample::from_value(v) {
            Ok(s) => s,
            Err(e) => {
                self.counters.samples_rejected += 1;
                self.counters.by_source.at_mut(src).malformed += 1;
                self.log_bad.log(log::Level::Warn, || {
                    format!("{source}: malformed sample: {}", untrusted(&e))
                });
                return false;
            }
        };
        let mut time_ms = None;
        if self.db && signed_ok {
            match meter::parse_timestamp(&sample.timestamp) {
                Ok(t) => time_ms = Some((t.unix_timestamp_nanos() / 1_000_000) as i64),
                Err(e) => {
                    self.counters.invalid_timestamp += 1;
                    self.counters.samples_rejected += 1;
                    self.counters.by_source.at_mut(src).invalid_timestamp += 1;
                    let id = &sample.message_id;
                    self.log_bad.log_kv(log::Level::Warn, id, source, || {
                        format!("{source}: sample {}: {}", Untrusted(id), untrusted(&e))
                    });
                    if self.file {
                        self.open_batch();
                        self.batch.file.push(sample);
                    }
                    return false;
                }
            }
        }
        let for_db = self.db && signed_ok;
        if for_db || self.file {
            self.open_batch();
        }
        if for_db || (self.file && !self.db) {
            // Parallel to the primary list: for per-source outcomes and freshness.
            self.batch.meta.push(crate::dispatch::SampleMeta {
                source: src as u8,
                time_ms,
            });
        }
        match (for_db, self.file) {
            (true, true) => {
                self.batch.file.push(sample.clone());
                self.batch.db.push(sample);
            }
            (true, false) => self.batch.db.push(sample),
            (false, true) => self.batch.file.push(sample),
            (false, false) => {}
        }
        // Accepted means: taken by the dispatcher whose result answers the client.
        for_db || !self.db
    }

    /// The samples of one request or delivery: ingest each (a non-map counts as rejected).
    /// Returns where the accepted ones sit in the batch and how many were rejected.
    pub fn ingest_all<V: Parts>(&mut self, samples: Vec<V>, source: &str) -> (Range<usize>, usize) {
        let start = self.primary_len();
        let mut rejected = 0;
        for s in samples {
            let accepted = if matches!(s.view(), View::Map(_)) {
                self.ingest(s, source)
            } else {
                self.counters.samples_received += 1;
                self.counters.samples_rejected += 1;
                let c = self.counters.by_source.get_mut(source);
                c.received += 1;
                c.malformed += 1;
                false
            };
            rejected += usize::from(!accepted);
        }
        (start..self.primary_len(), rejected)
    }

    /// The batch's age counts from its first entry. Only what enters the batch opens it: a
    /// rejected sample must not arm the deadline, or the loop polls with a timeout in the
    /// past until something valid arrives (issue 13, item 1).
    fn open_batch(&mut self) {
        if self.batch.opened.is_none() {
            self.batch.opened = Some(Instant::now());
        }
    }

    /// Someone waits for the result of part of the pending batch.
    pub fn add_ticket(&mut self, ticket: Ticket) {
        self.open_batch();
        self.batch.tickets.push(ticket);
        self.flush_if_full();
    }

    /// Where a request's samples are counted: the database batch, or the file batch when the
    /// file dispatcher runs alone.
    fn primary_len(&self) -> usize {
        if self.db {
            self.batch.db.len()
        } else {
            self.batch.file.len()
        }
    }

    /// Hand the batch to the writer when it is full, old enough, or someone waits for it and
    /// the writer is idle (group commit: latency stays low when idle, batches grow under load).
    pub fn maybe_flush(&mut self, now: Instant) {
        if self.batch.is_empty() || self.in_flight >= MAX_IN_FLIGHT {
            return;
        }
        let full = self.full();
        let old = self
            .batch
            .opened
            .is_some_and(|t| now.duration_since(t) >= self.batch_timeout);
        let waited_on = !self.batch.tickets.is_empty() && self.in_flight == 0;
        if full || old || waited_on || self.stopping {
            self.flush_batch();
        }
    }

    pub fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let Some(tx) = self.writer_tx.as_ref() else {
            return;
        };
        let mut b = std::mem::take(&mut self.batch);
        b.id = self.next_batch_id;
        self.next_batch_id += 1;
        if tx.send(WriterMsg::Batch(b)).is_ok() {
            self.in_flight += 1;
        } else {
            log::error!("writer thread is gone; samples dropped");
        }
    }

    /// Ask the writer to reopen its files (log rotation).
    pub fn reopen(&self) {
        if let Some(tx) = self.writer_tx.as_ref() {
            let _ = tx.send(WriterMsg::Reopen);
        }
    }

    /// No more batches: the writer thread ends once it has written what it holds.
    pub fn close_writer(&mut self) {
        self.writer_tx.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter::Value;

    /// A signed sample whose metadata holds `pad` bytes of text.
    fn sample(i: usize, pad: usize, secret: &str) -> Value {
        let mut v = Sample {
            source: "openstack".into(),
            counter_name: "cpu".into(),
            counter_type: meter::CounterType::Cumulative,
            counter_unit: "ns".into(),
            counter_volume: meter::Volume::Int(i as i64),
            user_id: None,
            project_id: None,
            user_name: None,
            project_name: None,
            resource_id: "r".into(),
            timestamp: "2026-11-30T12:00:00.000000+00:00".into(),
            resource_metadata: Value::Map(vec![(
                Value::Str("pad".into()),
                Value::Str("x".repeat(pad)),
            )])
            .into(),
            message_id: format!("m{i}"),
            message_signature: None,
            monotonic_time: None,
            extra: vec![],
        }
        .to_value();
        meter::sign(&mut v, secret);
        v
    }

    /// Feed samples as the UDP source does until the intake refuses more; returns how many
    /// it took and the batches handed to the writer meanwhile.
    fn fill(pad: usize) -> (usize, usize, Intake) {
        let cfg = crate::config::Config::default();
        let (tx, rx) = mpsc::channel();
        let mut intake = Intake::new(&cfg, tx);
        let secret = cfg.publisher.telemetry_secret.clone();
        let mut taken = 0;
        while intake.can_accept() && taken < 100_000 {
            let v = sample(taken, pad, &secret);
            let wire = meter::encode::to_msgpack(&v).len();
            assert!(intake.ingest(v, "udp"), "sample {taken} refused");
            intake.add_bytes(wire);
            intake.flush_if_full();
            taken += 1;
        }
        let handed = rx.try_iter().count();
        (taken, handed, intake)
    }

    #[test]
    fn small_samples_are_bounded_by_count() {
        // batch_size 1000: two batches go to the writer (its limit in flight), then the
        // pending batch fills to batch_size and reading stops.
        let (taken, handed, intake) = fill(10);
        assert_eq!(handed, MAX_IN_FLIGHT);
        assert_eq!(intake.batch.len(), 1000);
        assert_eq!(taken, 3000);
    }

    #[test]
    fn large_samples_are_bounded_by_bytes() {
        // 100 KB samples: batch_size would let 4,000 of them (400 MB) in; the byte bound
        // hands a batch over at BATCH_BYTES and, the writer full, stops taking there.
        let (taken, handed, intake) = fill(100_000);
        assert_eq!(handed, MAX_IN_FLIGHT);
        let per_batch = BATCH_BYTES.div_ceil(100_000);
        assert!(intake.batch.bytes >= BATCH_BYTES, "{}", intake.batch.bytes);
        assert!(intake.batch.bytes < BATCH_BYTES + 101_000);
        assert!(
            taken <= MAX_IN_FLIGHT * (per_batch + 1) + per_batch + 1,
            "took {taken} samples of 100 KB"
        );
        assert!(!intake.can_accept());
    }

    #[test]
    fn a_relaying_worker_hands_its_batch_over_at_half_the_timeout() {
        let mut cfg = crate::config::Config::default();
        cfg.collector.batch_timeout = 0.2;
        let secret = cfg.publisher.telemetry_secret.clone();
        for (relaying, after) in [(false, 200), (true, 100)] {
            let (tx, rx) = mpsc::channel();
            let mut intake = Intake::new(&cfg, tx);
            if relaying {
                intake.hand_over_sooner();
            }
            assert!(intake.ingest(sample(1, 10, &secret), "udp"));
            let opened = intake.batch.opened.expect("the batch is open");
            assert_eq!(
                intake.deadline(),
                Some(opened + Duration::from_millis(after))
            );
            intake.maybe_flush(opened + Duration::from_millis(after - 1));
            assert_eq!(rx.try_iter().count(), 0, "not yet ({relaying})");
            intake.maybe_flush(opened + Duration::from_millis(after));
            assert_eq!(rx.try_iter().count(), 1, "handed over ({relaying})");
        }
    }
}

//! Dispatchers and the writer thread.
//!
//! The worker's event loop never blocks on storage: it hands whole batches to one writer
//! thread (started after fork) and keeps draining its sockets while SQLite commits. The writer
//! runs every configured dispatcher on a batch — `file` appends, `database` stores — and sends
//! back a [`Completion`] through a channel, waking the loop with a `mio::Waker`. The loop bounds
//! how many batches are in flight, which is the back-pressure that keeps memory flat when
//! storage is slower than the network.

use crate::counters::{Counters, BATCH_SIZE_BUCKETS, FRESHNESS_BUCKETS_MS};
use crate::untrusted::{untrusted, Untrusted};
use meter::Sample;
use std::ops::Range;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{FileDispatcher, SampleFilter, Storage};

/// Who is waiting for (part of) a batch: one RPC request or notification, or an AMQP
/// delivery.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Connection slot and its serial (slots are reused; serials are not).
    pub conn: usize,
    pub serial: u64,
    /// The request's msgid; `None` for a notification (nobody to answer).
    pub msgid: Option<u64>,
    /// The AMQP delivery to ack or reject (then `conn` is unused).
    pub amqp_tag: Option<u64>,
    /// Where this request's samples sit in `Batch::db`.
    pub range: Range<usize>,
    /// Samples of the request refused before storage (bad signature, timestamp, fields).
    pub rejected: usize,
}

/// Samples on their way to the dispatchers.
#[derive(Default)]
pub struct Batch {
    pub id: u64,
    /// For the database dispatcher: verified, timestamp checked.
    pub db: Vec<Sample>,
    /// For the file dispatcher: everything decoded.
    pub file: Vec<Sample>,
    pub tickets: Vec<Ticket>,
    pub opened: Option<Instant>,
    /// Per sample of the primary list (`db`, or `file` when the file dispatcher runs alone):
    /// where it came from and when it was taken, for the per-source and freshness metrics.
    pub meta: Vec<SampleMeta>,
    /// Wire bytes of what was taken into this batch (datagrams, frames), for the intake's
    /// bound in bytes ([`crate::source::Intake::can_accept`]).
    pub bytes: usize,
}

/// What the metrics need to know of one batched sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleMeta {
    /// Index into [`crate::counters::SOURCES`].
    pub source: u8,
    /// The sample's timestamp, Unix milliseconds; `None` when not parsed (file only).
    pub time_ms: Option<i64>,
}

/// One source's share of a batch's outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceOutcome {
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.db.len().max(self.file.len())
    }

    pub fn is_empty(&self) -> bool {
        self.db.is_empty() && self.file.is_empty() && self.tickets.is_empty()
    }
}

/// Per-ticket result of a committed batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TicketResult {
    pub stored: usize,
    pub duplicates: usize,
    pub rejected: usize,
}

/// What the writer says about one batch.
pub struct Completion {
    pub id: u64,
    /// How many of the loop's batches this commit covered (the writer merges queued ones).
    pub batches: usize,
    pub tickets: Vec<Ticket>,
    /// `Ok` with one result per ticket, or the dispatcher error text.
    pub result: Result<Vec<TicketResult>, String>,
    pub counts: BatchCounts,
    pub latency: Duration,
    /// The outcome split by source ([`crate::counters::SOURCES`] order).
    pub per_source: [SourceOutcome; 4],
    /// Freshness (commit time − sample timestamp) of the stored samples: histogram over
    /// [`FRESHNESS_BUCKETS_MS`] and sum.
    pub freshness_ms: Vec<u64>,
    pub freshness_ms_sum: u64,
    /// Wall clock of the commit, Unix milliseconds.
    pub committed_unix_ms: i64,
    /// Which dispatcher failed: `database` or `file`.
    pub error_kind: Option<&'static str>,
    /// Not a batch: the writer's storage probe after a failure answered (`result` Ok) or
    /// not. Counted nowhere; it only tells the loop storage is back.
    pub probe: bool,
    /// The batch's samples (`db` and `file`), handed back so that they are freed by the loop
    /// thread that allocated them: the allocator frees its own thread's blocks without
    /// atomics, and a sample is some 60 blocks (the writer freeing them cost ~6 % of a worker's
    /// CPU under load).
    pub spent: [Vec<Sample>; 2],
}

impl Completion {
    /// A probe's result (no batch, no tickets).
    pub fn probe(result: Result<(), String>) -> Completion {
        Completion {
            id: 0,
            batches: 0,
            tickets: Vec::new(),
            result: result.map(|()| Vec::new()),
            counts: BatchCounts::default(),
            latency: Duration::ZERO,
            per_source: Default::default(),
            freshness_ms: Vec::new(),
            freshness_ms_sum: 0,
            committed_unix_ms: 0,
            error_kind: None,
            probe: true,
            spent: Default::default(),
        }
    }
}

/// Aggregates for the worker's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchCounts {
    pub samples: usize,
    pub stored: usize,
    pub duplicates: usize,
    pub rejected: usize,
    /// Of `rejected`: older than the time to live on arrival.
    pub expired: usize,
}

pub enum WriterMsg {
    Batch(Batch),
    /// USR1 / logrotate: reopen the file dispatcher's file.
    Reopen,
    /// Another worker's batch for the SQLite file this worker writes ([`crate::relay`]).
    Relay(crate::relay::Request),
}

/// Wakes the event loop; implemented by `mio::Waker` in the daemon.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

impl Wake for mio::Waker {
    fn wake(&self) {
        if let Err(e) = mio::Waker::wake(self) {
            log::error!("cannot wake the worker loop: {e}");
        }
    }
}

pub struct Writer {
    pub storage: Option<Box<dyn Storage>>,
    pub file: Option<FileDispatcher>,
    /// `metering_time_to_live` when this writer runs retention (worker 0's only).
    pub ttl_seconds: Option<u64>,
    /// Between retention passes (`[database] expiry_interval`).
    pub expiry_interval: Duration,
    /// A second handle on the same storage for the retention passes, which then run on a
    /// thread of their own: a pass (counting, rollup retention, the orphan search on PostgreSQL
    /// and SQLite) never occupies the writer thread, which only waits for the short locks the
    /// pass takes. `None`: passes run on the writer thread between batches.
    pub retention: Option<Box<dyn Storage>>,
}

/// The thread that runs retention passes on their own handle when the writer asks, and says
/// when each is done (the writer then takes its idle steps: reclaim, graves).
struct Retention {
    thread: storage::background::Nudged,
    done: Arc<std::sync::atomic::AtomicBool>,
    /// A pass was asked for and has not reported.
    running: bool,
}

impl Retention {
    fn start(mut st: Box<dyn Storage>, ttl: u64) -> std::io::Result<Retention> {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let thread = storage::background::Nudged::spawn("retention", move || {
            expiry_pass(st.as_mut(), ttl);
            // The graves this handle made are its reaper's to drop: the writer's handle would
            // only look when idle, never under a steady load.
            if let Err(e) = st.retention_step() {
                log::warn!("retention step: {e}");
            }
            flag.store(true, std::sync::atomic::Ordering::Release);
        })?;
        Ok(Retention {
            thread,
            done,
            running: false,
        })
    }

    /// Ask for a pass unless one is running.
    fn ask(&mut self) {
        if !self.running {
            self.running = self.thread.nudge();
        }
    }

    /// Whether the pass asked for has finished since the last call.
    fn finished(&mut self) -> bool {
        if self.running && self.done.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.running = false;
            return true;
        }
        false
    }
}

/// One retention pass, logged.
fn expiry_pass(st: &mut dyn Storage, ttl: u64) {
    let started = Instant::now();
    match st.clear_expired_metering_data(ttl) {
        Ok(n) if n > 0 => log::info!(
            "expired {n} samples older than {ttl} s in {:.3} s",
            started.elapsed().as_secs_f64()
        ),
        Ok(_) => {}
        Err(e) => log::warn!("cannot expire old samples: {e}"),
    }
}

/// While a pass runs on the retention thread, the writer looks this often whether it is done.
const RETENTION_POLL: Duration = Duration::from_millis(50);

/// At most this many queued batches are merged into one transaction.
const MERGE_MAX: usize = 8;

/// ... and no more once this many samples are in: with other workers' batches relayed to this
/// writer, eight messages could be eight workers' full batches held decoded at once (a
/// worker 0 serving three others peaked at 31 MiB before this bound).
const MERGE_MAX_SAMPLES: usize = 4_000;

/// How often a writer whose database write failed checks whether storage answers again.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// With retention work left (an expired chunk's pages to reclaim, a detached partition to
/// drop), the writer takes a step after this long without a batch: drivers step after each
/// batch, and an idle daemon would otherwise leave the work for the next pass, one step per
/// `expiry_interval` (a 431k-row SQLite chunk is ~860 steps: six days at the default 600 s).
const IDLE_STEP: Duration = Duration::from_millis(20);

/// What the storage probe asks: one sample of a meter nobody sends (a cheap indexed read).
fn probe_filter() -> SampleFilter {
    SampleFilter {
        meter: Some("collector.storage.probe".into()),
        limit: Some(1),
        ..Default::default()
    }
}

impl Writer {
    /// The writer thread's body: runs until the loop drops its sender.
    ///
    /// With a time to live, retention runs here, between batches, every `expiry_interval`, on
    /// a timer that also fires when no batch arrives (an idle daemon still expires). A pass
    /// drops whole partitions, each in a moment, so a batch waits for at most one pass.
    pub fn run(mut self, rx: Receiver<WriterMsg>, tx: Sender<Completion>, waker: Arc<dyn Wake>) {
        let interval = self.expiry_interval;
        let mut next_expiry = Instant::now();
        // Storage is probed once at start, so a database that cannot be reached (down,
        // refused credentials later fixed, a TLS handshake that fails) is reported at once,
        // not at the first batch: `collectorctl status` shows why and /readyz says 503. After
        // a failure it is probed every PROBE_EVERY until it answers, so the worker reports it
        // back up without waiting for the next sample.
        let mut down = false;
        if !self.probe(&tx, &waker, &mut down) {
            return;
        }
        // Whether retention may have left steps to take; set by each pass (and at start: a
        // restart resumes an interrupted reclaim), cleared when a step finds nothing.
        let expiring = self.ttl_seconds.is_some() && self.storage.is_some();
        let mut steps_left = expiring;
        let mut retention = match (self.retention.take(), self.ttl_seconds) {
            (Some(st), Some(ttl)) if expiring => match Retention::start(st, ttl) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!("cannot start the retention thread, expiring on the writer: {e}");
                    None
                }
            },
            _ => None,
        };
        loop {
            // Wait for a batch, or until the next probe (storage down), retention pass or
            // idle retention step.
            let mut wait = None;
            if down {
                wait = Some(PROBE_EVERY);
            }
            if expiring {
                let until = next_expiry.saturating_duration_since(Instant::now());
                wait = Some(wait.map_or(until, |w: Duration| w.min(until)));
            }
            if steps_left && !down {
                wait = Some(wait.map_or(IDLE_STEP, |w: Duration| w.min(IDLE_STEP)));
            }
            if retention.as_ref().is_some_and(|r| r.running) {
                wait = Some(wait.map_or(RETENTION_POLL, |w: Duration| w.min(RETENTION_POLL)));
            }
            let msg = match wait {
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
                Some(w) => match rx.recv_timeout(w) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            };
            let loop_alive = match msg {
                Some(msg) => self.handle(msg, &rx, &tx, &waker, &mut down),
                None if down => self.probe(&tx, &waker, &mut down),
                None => {
                    if let (true, Some(st)) = (steps_left, self.storage.as_mut()) {
                        match st.retention_step() {
                            Ok(more) => steps_left = more,
                            Err(e) => {
                                // Left for the next pass (or the next batch's own step).
                                log::warn!("retention step: {e}");
                                steps_left = false;
                            }
                        }
                    }
                    true
                }
            };
            if !loop_alive {
                return;
            }
            if retention.as_mut().is_some_and(Retention::finished) {
                steps_left = true;
            }
            if let (Some(ttl), Some(st)) = (self.ttl_seconds, self.storage.as_mut()) {
                if Instant::now() >= next_expiry {
                    next_expiry = Instant::now() + interval;
                    match retention.as_mut() {
                        Some(r) => r.ask(),
                        None => {
                            expiry_pass(st.as_mut(), ttl);
                            steps_left = true;
                        }
                    }
                }
            }
        }
    }

    /// Probe storage and tell the loop when its state differs from `down` (it failed, or
    /// answers again). `false` when the loop has gone.
    fn probe(&mut self, tx: &Sender<Completion>, waker: &Arc<dyn Wake>, down: &mut bool) -> bool {
        let Some(st) = self.storage.as_mut() else {
            return true;
        };
        let result = st.get_samples(&probe_filter()).map(drop);
        if result.is_err() == *down {
            return true;
        }
        *down = result.is_err();
        if tx
            .send(Completion::probe(result.map_err(|e| e.to_string())))
            .is_err()
        {
            return false;
        }
        waker.wake();
        true
    }

    /// One message and whatever queued behind it; `false` when the loop has gone. A written
    /// batch updates `down` (the database failed it).
    fn handle(
        &mut self,
        msg: WriterMsg,
        rx: &Receiver<WriterMsg>,
        tx: &Sender<Completion>,
        waker: &Arc<dyn Wake>,
        down: &mut bool,
    ) -> bool {
        {
            // Group commit: whatever queued behind the previous commit goes in this one.
            // Other workers' batches (this worker writing the SQLite file for all) join it.
            let mut batches = Vec::new();
            let mut relays = Vec::new();
            let mut next = Some(msg);
            let mut samples = 0;
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Reopen => self.reopen(),
                    WriterMsg::Batch(b) => {
                        samples += b.len();
                        batches.push(b)
                    }
                    WriterMsg::Relay(r) => {
                        samples += r.samples.len();
                        relays.push(r)
                    }
                }
                if batches.len() + relays.len() < MERGE_MAX && samples < MERGE_MAX_SAMPLES {
                    next = rx.try_recv().ok();
                }
            }
            if !batches.is_empty() || !relays.is_empty() {
                let primary_is_db = self.storage.is_some();
                let c = self.write(merge(batches, primary_is_db), relays);
                // A commit of relayed samples only is answered to the relays, not the loop.
                if c.batches > 0 {
                    *down = c.error_kind == Some("database");
                    if tx.send(c).is_err() {
                        return false;
                    }
                    waker.wake();
                }
            }
        }
        true
    }

    fn reopen(&mut self) {
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.reopen() {
                log::error!("file dispatcher: cannot reopen: {e}");
            }
        }
    }

    /// Run the dispatchers on a merged batch; `relays` (other workers' batches) are stored in
    /// the same transaction and answered here. A completion with `batches == 0` had only
    /// relayed samples and goes to nobody.
    fn write(
        &mut self,
        (batch, merged): (Batch, usize),
        relays: Vec<crate::relay::Request>,
    ) -> Completion {
        let started = Instant::now();
        let mut counts = BatchCounts {
            samples: batch.db.len(),
            ..Default::default()
        };
        let mut error = None;
        let mut error_kind = None;
        // Which primary samples did not make it (duplicates are not stored either).
        let mut not_stored = vec![false; batch.meta.len()];
        let mut per_source = [SourceOutcome::default(); 4];
        if let Some(f) = self.file.as_mut() {
            if !batch.file.is_empty() {
                if let Err(e) = f.append(&batch.file) {
                    error = Some(format!("file dispatcher: {e}"));
                    error_kind = Some("file");
                }
            }
        }
        let mut results: Vec<TicketResult> = batch
            .tickets
            .iter()
            .map(|t| TicketResult {
                rejected: t.rejected,
                ..Default::default()
            })
            .collect();
        let mut batch = batch;
        let relayed = store_relays(
            self.storage.as_deref_mut(),
            &mut batch.db,
            relays,
            error.is_none(),
        );
        if let Some(st) = self.storage.as_mut() {
            if error.is_none() && !batch.db.is_empty() {
                match relayed.unwrap_or_else(|| st.record_metering_data(&batch.db)) {
                    Ok(out) => {
                        counts.stored = out.stored;
                        counts.duplicates = out.duplicate_indices.len();
                        counts.rejected = out.rejected.len();
                        counts.expired = out.expired;
                        if out.expired > 0 {
                            log::warn!(
                                "{} samples older than metering_time_to_live dropped",
                                out.expired
                            );
                        }
                        for (i, reason) in out
                            .rejected
                            .iter()
                            .filter(|(_, r)| r != storage::EXPIRED_REASON)
                        {
                            log::warn!(
                                "sample {} rejected by storage: {}",
                                Untrusted(
                                    batch
                                        .db
                                        .get(*i)
                                        .map(|s| s.message_id.as_str())
                                        .unwrap_or("?")
                                ),
                                untrusted(reason)
                            );
                        }
                        attribute(&batch.tickets, &mut results, &out);
                        for &i in &out.duplicate_indices {
                            if let (Some(m), Some(n)) = (batch.meta.get(i), not_stored.get_mut(i)) {
                                per_source[m.source as usize % 4].duplicates += 1;
                                *n = true;
                            }
                        }
                        for (i, _) in &out.rejected {
                            if let (Some(m), Some(n)) = (batch.meta.get(*i), not_stored.get_mut(*i))
                            {
                                per_source[m.source as usize % 4].rejected += 1;
                                *n = true;
                            }
                        }
                    }
                    Err(e) => {
                        error = Some(format!("storage unavailable: {e}"));
                        error_kind = Some("database");
                    }
                }
            }
        } else {
            // File-only: every sample handed over counts as stored once appended.
            for (t, r) in batch.tickets.iter().zip(results.iter_mut()) {
                r.stored = t.range.len();
            }
            counts.stored = batch.file.len();
        }
        let latency = started.elapsed();
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let mut freshness_ms = Vec::new();
        let mut freshness_ms_sum = 0u64;
        if error.is_none() {
            for (m, skip) in batch.meta.iter().zip(&not_stored) {
                if *skip {
                    continue;
                }
                per_source[m.source as usize % 4].stored += 1;
                if let Some(t) = m.time_ms {
                    // A sample from the future (clock skew) counts as fresh, not negative.
                    let age = now_ms.saturating_sub(t).max(0) as u64;
                    crate::counters::observe(&mut freshness_ms, &FRESHNESS_BUCKETS_MS, age);
                    freshness_ms_sum += age;
                }
            }
        }
        Completion {
            id: batch.id,
            batches: merged,
            tickets: batch.tickets,
            result: match error {
                Some(e) => Err(e),
                None => Ok(results),
            },
            counts,
            latency,
            per_source,
            freshness_ms,
            freshness_ms_sum,
            committed_unix_ms: now_ms,
            error_kind,
            probe: false,
            spent: [batch.db, batch.file],
        }
    }
}

/// Store other workers' batches (`relays`) with this worker's own `db` samples, in one
/// transaction, and answer each relay with its part of the outcome. Returns the outcome of
/// `db`'s part, or `None` when there was nothing relayed (the caller stores `db` itself).
/// `db` is as it was when this returns. `ok`: the file dispatcher has not failed the batch (if
/// it has, `db` is not stored, but the relays still are).
fn store_relays(
    storage: Option<&mut (dyn Storage + 'static)>,
    db: &mut Vec<Sample>,
    relays: Vec<crate::relay::Request>,
    ok: bool,
) -> Option<Result<storage::RecordOutcome, storage::StorageError>> {
    if relays.is_empty() {
        return None;
    }
    let Some(st) = storage else {
        for r in relays {
            let _ = r.reply.send(Err(storage::StorageError::Unavailable(
                "this worker has no database".into(),
            )));
        }
        return None;
    };
    let own = if ok { db.len() } else { 0 };
    let mut all = std::mem::take(db);
    let mut parts = Vec::with_capacity(relays.len() + 1);
    parts.push(0..own);
    let mut replies = Vec::with_capacity(relays.len());
    let mut own_rest = all.split_off(own);
    for r in relays {
        let at = all.len();
        all.extend(r.samples);
        parts.push(at..all.len());
        replies.push(r.reply);
    }
    let result = st.record_metering_data(&all);
    let mut outcomes = match &result {
        Ok(out) => split_outcome(out, &parts).into_iter().map(Ok).collect(),
        Err(e) => parts.iter().map(|_| Err(e.clone())).collect::<Vec<_>>(),
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes.drain(1..)) {
        let _ = reply.send(outcome);
    }
    all.truncate(own);
    all.append(&mut own_rest);
    *db = all;
    if !ok || own == 0 {
        return None;
    }
    outcomes.pop()
}

/// Concatenate batches into one, shifting each ticket's range (into `db`, or into `file` when
/// the file dispatcher runs alone); returns it and how many went in.
fn merge(batches: Vec<Batch>, primary_is_db: bool) -> (Batch, usize) {
    let n = batches.len();
    let mut it = batches.into_iter();
    let Some(mut all) = it.next() else {
        return (Batch::default(), 0);
    };
    for mut b in it {
        let shift = if primary_is_db {
            all.db.len()
        } else {
            all.file.len()
        };
        for t in &mut b.tickets {
            t.range = t.range.start + shift..t.range.end + shift;
        }
        all.db.append(&mut b.db);
        all.file.append(&mut b.file);
        all.tickets.append(&mut b.tickets);
        all.meta.append(&mut b.meta);
    }
    (all, n)
}

/// The outcome of a batch made of `parts` (consecutive index ranges of it), one per part,
/// indices relative to the part.
pub fn split_outcome(
    out: &storage::RecordOutcome,
    parts: &[std::ops::Range<usize>],
) -> Vec<storage::RecordOutcome> {
    parts
        .iter()
        .map(|r| {
            let duplicate_indices: Vec<usize> = out
                .duplicate_indices
                .iter()
                .filter(|i| r.contains(i))
                .map(|i| i - r.start)
                .collect();
            let rejected: Vec<(usize, String)> = out
                .rejected
                .iter()
                .filter(|(i, _)| r.contains(i))
                .map(|(i, why)| (i - r.start, why.clone()))
                .collect();
            let expired = rejected
                .iter()
                .filter(|(_, why)| why == storage::EXPIRED_REASON)
                .count();
            storage::RecordOutcome {
                stored: r.len() - duplicate_indices.len() - rejected.len(),
                duplicates: duplicate_indices.len(),
                duplicate_indices,
                rejected,
                expired,
            }
        })
        .collect()
}

/// Split the batch's outcome over the requests that contributed to it.
fn attribute(tickets: &[Ticket], results: &mut [TicketResult], out: &storage::RecordOutcome) {
    let ranges: Vec<Range<usize>> = tickets.iter().map(|t| t.range.clone()).collect();
    for (r, part) in results.iter_mut().zip(split_outcome(out, &ranges)) {
        r.duplicates = part.duplicates;
        r.rejected += part.rejected.len();
        r.stored = part.stored;
    }
}

/// Fold a completion's aggregates into the worker's counters.
pub fn count_completion(c: &Completion, counters: &mut Counters) {
    if c.probe {
        return;
    }
    counters.observe_batch_latency(c.latency.as_millis() as u64);
    counters.batch_latency_us_sum += c.latency.as_micros() as u64;
    match &c.result {
        Ok(_) => {
            counters.batches_written += 1;
            counters.samples_stored += c.counts.stored as u64;
            counters.samples_duplicate += c.counts.duplicates as u64;
            counters.samples_rejected += c.counts.rejected as u64;
            let size = c.counts.samples.max(c.meta_len());
            crate::counters::observe(&mut counters.batch_size, &BATCH_SIZE_BUCKETS, size as u64);
            counters.batch_size_sum += size as u64;
            for (i, o) in c.per_source.iter().enumerate() {
                let s = counters.by_source.at_mut(i);
                s.stored += o.stored;
                s.duplicates += o.duplicates;
                s.malformed += o.rejected;
            }
            if counters.freshness_ms.len() < c.freshness_ms.len() {
                counters.freshness_ms.resize(c.freshness_ms.len(), 0);
            }
            for (a, b) in counters.freshness_ms.iter_mut().zip(&c.freshness_ms) {
                *a += b;
            }
            counters.freshness_ms_sum += c.freshness_ms_sum;
            counters.samples_expired += c.counts.expired as u64;
        }
        Err(_) => {
            counters.dispatch_errors += 1;
            match c.error_kind {
                Some("file") => counters.file_errors += 1,
                _ => counters.database_errors += 1,
            }
        }
    }
}

impl Completion {
    /// Samples the batch carried for its primary dispatcher.
    fn meta_len(&self) -> usize {
        self.per_source
            .iter()
            .map(|o| (o.stored + o.duplicates + o.rejected) as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(range: Range<usize>) -> Ticket {
        Ticket {
            conn: 0,
            serial: 0,
            msgid: Some(1),
            amqp_tag: None,
            range,
            rejected: 0,
        }
    }

    #[test]
    fn merged_batches_keep_each_ticket_on_its_own_samples() {
        let a = Batch {
            id: 1,
            tickets: vec![ticket(0..0), ticket(0..0)],
            ..Default::default()
        };
        let b = Batch {
            id: 2,
            tickets: vec![ticket(0..0)],
            ..Default::default()
        };
        // No samples: ranges stay empty wherever they land.
        let (m, n) = merge(vec![a, b], true);
        assert_eq!(n, 2);
        assert_eq!(m.tickets.len(), 3);
        assert!(m.tickets.iter().all(|t| t.range.is_empty()));
    }

    #[test]
    fn attribution_splits_duplicates_and_rejects_per_ticket() {
        let tickets = vec![ticket(0..3), ticket(3..5)];
        let mut results = vec![TicketResult::default(); 2];
        let out = storage::RecordOutcome {
            stored: 2,
            duplicates: 2,
            duplicate_indices: vec![1, 3],
            rejected: vec![(4, "bad".into())],
            expired: 0,
        };
        attribute(&tickets, &mut results, &out);
        assert_eq!(
            results[0],
            TicketResult {
                stored: 2,
                duplicates: 1,
                rejected: 0
            }
        );
        assert_eq!(
            results[1],
            TicketResult {
                stored: 0,
                duplicates: 1,
                rejected: 1
            }
        );
    }

    struct NoWake;
    impl Wake for NoWake {
        fn wake(&self) {}
    }

    fn old_sample(id: &str, days_ago: i64) -> Sample {
        let t = time::OffsetDateTime::now_utc() - time::Duration::days(days_ago);
        Sample {
            source: "openstack".into(),
            counter_name: "cpu".into(),
            counter_type: meter::CounterType::Gauge,
            counter_unit: "ns".into(),
            counter_volume: meter::Volume::Int(1),
            user_id: None,
            project_id: None,
            user_name: None,
            project_name: None,
            resource_id: "vm".into(),
            timestamp: t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            resource_metadata: Default::default(),
            message_id: id.into(),
            message_signature: None,
            monotonic_time: None,
            extra: Vec::new(),
        }
    }

    /// A store with a 5-day-old and a fresh sample; a writer with a 2-day TTL on a 50 ms timer,
    /// its passes on the writer thread or (`separate`) on a retention thread with a second
    /// handle. No batch is ever sent: the timer alone must expire the old day.
    fn retention_expires_while_no_batch_arrives(separate: bool) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:///{}", dir.path().join("c.db").display());
        let opts = storage::StorageOptions::default();
        let mut st = storage::open(&url, &opts).unwrap();
        let out = st
            .record_metering_data(&[old_sample("old", 5), old_sample("new", 0)])
            .unwrap();
        assert_eq!(out.stored, 2);
        let writer = Writer {
            storage: Some(storage::open(&url, &opts).unwrap()),
            file: None,
            ttl_seconds: Some(2 * 86_400),
            expiry_interval: Duration::from_millis(50),
            retention: separate.then(|| storage::open(&url, &opts).unwrap()),
        };
        let (wtx, wrx) = std::sync::mpsc::channel();
        let (ctx, _crx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || writer.run(wrx, ctx, Arc::new(NoWake)));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = st
                .get_samples(&storage::SampleFilter::default())
                .unwrap()
                .len();
            if left == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "old sample never expired");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The writer (and its retention thread) stop when the loop's sender goes.
        drop(wtx);
        thread.join().unwrap();
    }

    #[test]
    fn retention_runs_on_its_timer_while_no_batch_arrives() {
        retention_expires_while_no_batch_arrives(false);
    }

    #[test]
    fn retention_on_its_own_thread_and_handle_runs_on_the_timer_too() {
        retention_expires_while_no_batch_arrives(true);
    }

    /// A writer with only the database dispatcher, on `url`, no retention.
    fn database_writer(url: &str) -> Writer {
        Writer {
            storage: Some(storage::open(url, &storage::StorageOptions::default()).unwrap()),
            file: None,
            ttl_seconds: None,
            expiry_interval: Duration::from_secs(3600),
            retention: None,
        }
    }

    fn meta_of(n: usize) -> Vec<SampleMeta> {
        vec![
            SampleMeta {
                source: 0,
                time_ms: None
            };
            n
        ]
    }

    /// The writer stores a batch and hands its samples back in the completion, so the loop
    /// thread that decoded them frees them.
    #[test]
    fn a_written_batch_comes_back_with_its_samples() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:///{}", dir.path().join("c.db").display());
        let writer = database_writer(&url);
        let (wtx, wrx) = std::sync::mpsc::channel();
        let (ctx, crx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || writer.run(wrx, ctx, Arc::new(NoWake)));
        let samples = vec![old_sample("a", 0), old_sample("b", 0)];
        let meta = meta_of(samples.len());
        wtx.send(WriterMsg::Batch(Batch {
            id: 7,
            db: samples.clone(),
            tickets: vec![ticket(0..2)],
            meta,
            ..Default::default()
        }))
        .unwrap();
        let c = crx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(c.id, 7);
        assert_eq!(c.counts.stored, 2);
        assert_eq!(c.spent[0], samples);
        assert!(c.spent[1].is_empty());
        drop(wtx);
        thread.join().unwrap();
    }

    /// Another worker's batches (relayed) are stored with this worker's in one transaction;
    /// each gets its own part of the outcome, and only this worker's reach the loop.
    #[test]
    fn relayed_batches_are_answered_with_their_own_outcome() {
        let mut writer = database_writer("sqlite://");
        let (wtx, wrx) = std::sync::mpsc::channel();
        let (ctx, crx) = std::sync::mpsc::channel();
        let own = vec![old_sample("a", 0), old_sample("b", 0)];
        let meta = meta_of(own.len());
        let (r1, a1) = std::sync::mpsc::channel();
        let (r2, a2) = std::sync::mpsc::channel();
        let mut bad = old_sample("", 0);
        bad.message_id.clear();
        // Relay 1: a duplicate of this worker's "b", and "c". Relay 2: "c" again and a
        // sample storage rejects (empty id).
        wtx.send(WriterMsg::Relay(crate::relay::Request {
            samples: vec![old_sample("b", 0), old_sample("c", 0)],
            reply: r1,
        }))
        .unwrap();
        wtx.send(WriterMsg::Relay(crate::relay::Request {
            samples: vec![old_sample("c", 0), bad],
            reply: r2,
        }))
        .unwrap();
        let first = WriterMsg::Batch(Batch {
            id: 1,
            db: own.clone(),
            tickets: vec![ticket(0..2)],
            meta,
            ..Default::default()
        });
        let mut down = false;
        assert!(writer.handle(
            first,
            &wrx,
            &ctx,
            &(Arc::new(NoWake) as Arc<dyn Wake>),
            &mut down
        ));
        let c = crx.try_recv().expect("this worker's completion");
        assert_eq!((c.counts.stored, c.counts.duplicates), (2, 0));
        assert_eq!(c.spent[0], own, "this worker's samples come back to it");
        assert!(crx.try_recv().is_err(), "nothing else reaches the loop");
        let o1 = a1.try_recv().unwrap().unwrap();
        assert_eq!((o1.stored, o1.duplicate_indices.clone()), (1, vec![0]));
        let o2 = a2.try_recv().unwrap().unwrap();
        assert_eq!(o2.stored, 0);
        assert_eq!(o2.duplicate_indices, vec![0]);
        assert_eq!(o2.rejected.len(), 1);
        assert_eq!(o2.rejected[0].0, 1);
        // A relay alone (no batch of this worker's) is stored and answered too.
        let (r3, a3) = std::sync::mpsc::channel();
        let only = WriterMsg::Relay(crate::relay::Request {
            samples: vec![old_sample("d", 0)],
            reply: r3,
        });
        assert!(writer.handle(
            only,
            &wrx,
            &ctx,
            &(Arc::new(NoWake) as Arc<dyn Wake>),
            &mut down
        ));
        assert_eq!(a3.try_recv().unwrap().unwrap().stored, 1);
        assert!(crx.try_recv().is_err());
        let st = writer.storage.as_mut().unwrap();
        assert_eq!(st.get_samples(&SampleFilter::default()).unwrap().len(), 4);
    }
}

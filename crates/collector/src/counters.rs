//! Per-worker counters (DESIGN §8): plain integers in one struct, sent to the launcher with
//! every heartbeat and summed there. No global mutable state.

use serde::{Deserialize, Serialize};

/// Upper bounds (ms) of the `batch_latency_ms` histogram buckets; the last bucket is open.
pub const LATENCY_BUCKETS_MS: [u64; 10] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];

/// Upper bounds (samples) of the `batch_size` histogram buckets; the last bucket is open.
pub const BATCH_SIZE_BUCKETS: [u64; 9] = [1, 10, 50, 100, 250, 500, 1000, 2500, 5000];

/// Upper bounds (ms) of the `freshness_ms` histogram (commit time − sample timestamp); the
/// last bucket is open. Ceilometer polls every 10 min by default: the range reaches past it.
pub const FRESHNESS_BUCKETS_MS: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000,
];

/// The sources, as `Intake::ingest` names them.
pub const SOURCES: [&str; 4] = ["udp", "tcp", "rpc", "amqp"];

/// What happened to one source's samples.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SourceCounters {
    pub received: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub invalid_signature: u64,
    pub invalid_timestamp: u64,
    /// Not a sample (missing or wrong-typed fields), or refused by storage on its merits.
    pub malformed: u64,
    /// Payload bytes read (datagrams, stream bytes, AMQP message bodies).
    pub bytes: u64,
}

impl SourceCounters {
    pub fn rejected(&self) -> u64 {
        self.invalid_signature + self.invalid_timestamp + self.malformed
    }

    fn add(&mut self, o: &SourceCounters) {
        self.received += o.received;
        self.stored += o.stored;
        self.duplicates += o.duplicates;
        self.invalid_signature += o.invalid_signature;
        self.invalid_timestamp += o.invalid_timestamp;
        self.malformed += o.malformed;
        self.bytes += o.bytes;
    }
}

/// [`SourceCounters`] per source.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BySource {
    pub udp: SourceCounters,
    pub tcp: SourceCounters,
    pub rpc: SourceCounters,
    pub amqp: SourceCounters,
}

impl BySource {
    /// The counters of a source by name (index into [`SOURCES`] with `index`).
    pub fn get_mut(&mut self, source: &str) -> &mut SourceCounters {
        self.at_mut(source_index(source))
    }

    pub fn at_mut(&mut self, i: usize) -> &mut SourceCounters {
        match i {
            0 => &mut self.udp,
            1 => &mut self.tcp,
            2 => &mut self.rpc,
            _ => &mut self.amqp,
        }
    }

    /// (name, counters) in [`SOURCES`] order.
    pub fn iter(&self) -> [(&'static str, &SourceCounters); 4] {
        [
            ("udp", &self.udp),
            ("tcp", &self.tcp),
            ("rpc", &self.rpc),
            ("amqp", &self.amqp),
        ]
    }

    fn add(&mut self, o: &BySource) {
        self.udp.add(&o.udp);
        self.tcp.add(&o.tcp);
        self.rpc.add(&o.rpc);
        self.amqp.add(&o.amqp);
    }
}

/// Index of a source name in [`SOURCES`] (unknown names count as the last).
pub fn source_index(source: &str) -> usize {
    SOURCES
        .iter()
        .position(|s| *s == source)
        .unwrap_or(SOURCES.len() - 1)
}

/// Add one observation to a fixed-bucket histogram (`counts` has one more entry than
/// `bounds`, for values above the last bound).
pub fn observe(counts: &mut Vec<u64>, bounds: &[u64], value: u64) {
    if counts.len() != bounds.len() + 1 {
        counts.resize(bounds.len() + 1, 0);
    }
    let i = bounds
        .iter()
        .position(|&b| value <= b)
        .unwrap_or(bounds.len());
    counts[i] += 1;
}

fn add_hist(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Counters {
    pub udp_received: u64,
    pub udp_malformed: u64,
    pub tcp_connections: u64,
    pub tcp_malformed: u64,
    pub amqp_deliveries: u64,
    pub amqp_malformed: u64,
    pub amqp_reconnects: u64,
    pub rpc_connections: u64,
    pub rpc_requests: u64,
    pub rpc_errors: u64,
    pub samples_received: u64,
    pub samples_stored: u64,
    pub samples_duplicate: u64,
    pub samples_rejected: u64,
    /// Of `samples_rejected`: samples already older than `metering_time_to_live` on arrival.
    pub samples_expired: u64,
    pub invalid_signature: u64,
    pub invalid_timestamp: u64,
    pub dispatch_errors: u64,
    pub samples_dropped: u64,
    pub batches_written: u64,
    /// Of `batches_written`: batches whose database samples this worker handed to worker 0,
    /// the writer of the SQLite file (`crate::relay`), and that worker 0 stored.
    pub batches_relayed: u64,
    /// Histogram: count of batches whose commit took at most `LATENCY_BUCKETS_MS[i]` ms; the
    /// extra last entry counts slower ones.
    pub batch_latency_ms: Vec<u64>,
    /// Sum of the commit times of the batches in `batch_latency_ms`, in microseconds (the
    /// histogram's `_sum` in /metrics).
    pub batch_latency_us_sum: u64,
    pub respawns: u64,
    /// Datagrams the kernel dropped on the UDP socket because its receive buffer was full
    /// (the socket's `drops` in /proc/net/udp); filled in by the launcher.
    pub udp_kernel_drops: u64,
    /// Samples by source: received, stored, duplicates, rejected by reason, bytes.
    pub by_source: BySource,
    /// Histogram of samples per committed batch (`BATCH_SIZE_BUCKETS`), and their sum.
    pub batch_size: Vec<u64>,
    pub batch_size_sum: u64,
    /// Histogram of commit time − sample timestamp over stored samples
    /// (`FRESHNESS_BUCKETS_MS`), and its sum in ms.
    pub freshness_ms: Vec<u64>,
    pub freshness_ms_sum: u64,
    /// Failed batches by dispatcher (their sum is `dispatch_errors`).
    pub database_errors: u64,
    pub file_errors: u64,
    /// AMQP deliveries acked (committed, or malformed and dropped) and rejected for
    /// redelivery (storage unavailable).
    pub amqp_acked: u64,
    pub amqp_rejected: u64,
}

impl Counters {
    pub fn new() -> Counters {
        Counters {
            batch_latency_ms: vec![0; LATENCY_BUCKETS_MS.len() + 1],
            batch_size: vec![0; BATCH_SIZE_BUCKETS.len() + 1],
            freshness_ms: vec![0; FRESHNESS_BUCKETS_MS.len() + 1],
            ..Default::default()
        }
    }

    pub fn observe_batch_latency(&mut self, ms: u64) {
        if self.batch_latency_ms.len() != LATENCY_BUCKETS_MS.len() + 1 {
            self.batch_latency_ms = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        }
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.batch_latency_ms[i] += 1;
    }

    /// Add another worker's counters into this one (the launcher's sum).
    pub fn add(&mut self, o: &Counters) {
        macro_rules! sum {
            ($($f:ident),*) => { $( self.$f += o.$f; )* };
        }
        sum!(
            udp_received,
            udp_malformed,
            tcp_connections,
            tcp_malformed,
            amqp_deliveries,
            amqp_malformed,
            amqp_reconnects,
            rpc_connections,
            rpc_requests,
            rpc_errors,
            samples_received,
            samples_stored,
            samples_duplicate,
            samples_rejected,
            samples_expired,
            invalid_signature,
            invalid_timestamp,
            dispatch_errors,
            samples_dropped,
            batches_written,
            batches_relayed,
            batch_latency_us_sum,
            respawns,
            batch_size_sum,
            freshness_ms_sum,
            database_errors,
            file_errors,
            amqp_acked,
            amqp_rejected
        );
        self.by_source.add(&o.by_source);
        add_hist(&mut self.batch_size, &o.batch_size);
        add_hist(&mut self.freshness_ms, &o.freshness_ms);
        if self.batch_latency_ms.len() < o.batch_latency_ms.len() {
            self.batch_latency_ms.resize(o.batch_latency_ms.len(), 0);
        }
        for (a, b) in self.batch_latency_ms.iter_mut().zip(&o.batch_latency_ms) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_sum() {
        let mut a = Counters::new();
        a.observe_batch_latency(0);
        a.observe_batch_latency(3);
        a.observe_batch_latency(5000);
        assert_eq!(a.batch_latency_ms[0], 1);
        assert_eq!(a.batch_latency_ms[2], 1);
        assert_eq!(a.batch_latency_ms[LATENCY_BUCKETS_MS.len()], 1);
        let mut b = Counters::new();
        b.samples_stored = 5;
        b.observe_batch_latency(3);
        a.add(&b);
        assert_eq!(a.samples_stored, 5);
        assert_eq!(a.batch_latency_ms[2], 2);
    }
}

//! Per-worker counters (DESIGN §8): plain integers in one struct, sent to the launcher with
//! every heartbeat and summed there. No global mutable state.

use serde::{Deserialize, Serialize};

/// Upper bounds (ms) of the `batch_latency_ms` histogram buckets; the last bucket is open.
pub const LATENCY_BUCKETS_MS: [u64; 10] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];

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
    /// Histogram: count of batches whose commit took at most `LATENCY_BUCKETS_MS[i]` ms; the
    /// extra last entry counts slower ones.
    pub batch_latency_ms: Vec<u64>,
    pub respawns: u64,
    /// Datagrams the kernel dropped on the UDP socket because its receive buffer was full
    /// (the socket's `drops` in /proc/net/udp); filled in by the launcher.
    pub udp_kernel_drops: u64,
}

impl Counters {
    pub fn new() -> Counters {
        Counters {
            batch_latency_ms: vec![0; LATENCY_BUCKETS_MS.len() + 1],
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
            respawns
        );
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

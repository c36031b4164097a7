//! Clocks, percentiles, pacing and the kernel's UDP counters.

use serde_json::{json, Value as Json};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock nanoseconds since the epoch: the clock the SQLite driver's `recorded_at` uses, so
/// send times and commit times taken in different processes compare.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Nearest-rank percentile `p` (0..=100) of sorted values.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `{"n", "p50", "p99", "max"}` in milliseconds from latencies in nanoseconds.
pub fn latency_summary(mut ns: Vec<i64>) -> Json {
    ns.sort_unstable();
    let ms = |v: Option<i64>| v.map(|x| (x as f64 / 1e6 * 1000.0).round() / 1000.0);
    json!({
        "n": ns.len(),
        "p50": ms(percentile(&ns, 50.0)),
        "p99": ms(percentile(&ns, 99.0)),
        "max": ms(ns.last().copied()),
    })
}

/// `RcvbufErrors` from the `Udp:` lines of /proc/net/snmp: datagrams the kernel dropped
/// because a socket's receive buffer was full (every socket on the host, not only ours).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Spaces out work to `rate` items a second from a start instant; `None` runs flat out.
pub struct Pacer {
    start: Instant,
    per_item: Option<f64>,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Pacer {
        Pacer {
            start: Instant::now(),
            per_item: rate.filter(|r| *r > 0.0).map(|r| 1.0 / r),
        }
    }

    /// How many items to send at once: enough that a wake-up every ~0.5 ms keeps the rate.
    pub fn chunk(&self, max: usize) -> usize {
        match self.per_item {
            None => max,
            Some(per) => ((0.0005 / per).ceil() as usize).clamp(1, max),
        }
    }

    /// Sleep until item `i` is due.
    pub fn wait_for(&self, i: u64) {
        let Some(per) = self.per_item else { return };
        let due = self.start + Duration::from_secs_f64(per * i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_is_in_milliseconds() {
        let s = latency_summary(vec![3_000_000, 1_000_000, 2_000_000]);
        assert_eq!(s["p50"], json!(2.0));
        assert_eq!(s["max"], json!(3.0));
        assert_eq!(s["n"], json!(3));
    }

    #[test]
    fn snmp_counter_is_readable_on_linux() {
        assert!(udp_rcvbuf_errors().is_some());
    }
}

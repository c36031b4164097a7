//! The Prometheus exposition of the launcher's view: the workers' summed counters (the same
//! figures `collectorctl stats` prints), the workers' processes, generations, reloads and
//! restarts.
//!
//! The launcher takes a [`Snapshot`] of its state on each scrape and encodes it with the
//! `prometheus-client` crate, in the Prometheus text format (0.0.4) or, when the scraper's
//! `Accept` asks for it, in OpenMetrics. Nothing here keeps state between scrapes: the
//! counters live in the workers (DESIGN §8) and the launcher's sums never go backwards
//! because exited workers' counters are kept.
//!
//! Naming follows Prometheus's conventions: prefix `collector_`, base units (`_seconds`,
//! `_bytes`), `_total` on counters, low-cardinality labels only (`source`, `reason`, `kind`,
//! `state`, `cause`, `driver`, `worker` = slot index, never a pid or a peer).

use crate::counters::{Counters, BATCH_SIZE_BUCKETS, FRESHNESS_BUCKETS_MS, LATENCY_BUCKETS_MS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of OpenMetrics text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One process's resource use, from /proc.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStats {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// One worker of the serving generation.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerProc {
    /// Slot index in its generation (the `worker` label).
    pub index: usize,
    pub proc: Option<ProcStats>,
}

/// Worker restarts, by what caused them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restarts {
    /// Died on its own (signal, exit code): `respawns` in `collectorctl stats`.
    pub crash: u64,
    /// Killed by the launcher after `worker_timeout` without a heartbeat.
    pub hung: u64,
    /// Retired by a reload (replaced by the new generation).
    pub reload: u64,
}

/// Everything one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Counters summed over every worker, exited ones included (`collectorctl stats`).
    pub totals: Counters,
    /// The storage driver's name (`sqlite`, `postgresql`, `mysql`; `file` when only the file
    /// dispatcher runs): the `driver` label of batch metrics.
    pub driver: String,
    /// Workers of the serving generation.
    pub workers: Vec<WorkerProc>,
    /// Live workers by state (booting, ready, stopping), all generations.
    pub workers_by_state: [u64; 3],
    /// Workers the configuration asks for.
    pub workers_wanted: u64,
    pub restarts: Restarts,
    pub generation: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// 1 while every worker of the serving generation heartbeats and storage answers.
    pub ready: bool,
    /// Workers whose storage is reported down.
    pub storage_down_workers: u64,
    /// The launcher's own process.
    pub launcher: Option<ProcStats>,
    /// Open connections by kind (tcp, rpc), summed over live workers.
    pub connections_open: [u64; 2],
    /// Wall clock (Unix ms) of the newest commit that stored samples, any worker.
    pub last_commit_unix_ms: Option<i64>,
    /// Workers of the serving generation whose AMQP connection is up; `None` without AMQP.
    pub amqp_connected: Option<u64>,
}

pub const WORKER_STATES: [&str; 3] = ["booting", "ready", "stopping"];

/// How the scraper wants it: OpenMetrics when its `Accept` lists
/// `application/openmetrics-text` with a non-zero quality, else the Prometheus text format.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let mut params = part.split(';').map(str::trim);
        let media = params.next().unwrap_or("");
        media.eq_ignore_ascii_case("application/openmetrics-text")
            && !params.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

/// Encode a snapshot; returns the body and its `Content-Type`.
pub fn encode(snapshot: Snapshot, openmetrics: bool) -> (String, &'static str) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::with_capacity(16 * 1024);
    let result = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
    };
    if let Err(e) = result {
        // Writing into a String cannot fail; a failure here is a bug in an encoder.
        log::error!("cannot encode metrics: {e}");
    }
    let ct = if openmetrics {
        OPENMETRICS_TEXT
    } else {
        PROMETHEUS_TEXT
    };
    (out, ct)
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Small helpers over the descriptor encoder: one family, its labelled values.
struct Out<'e> {
    enc: DescriptorEncoder<'e>,
}

impl Out<'_> {
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        values: &[(Labels<'_>, u64)],
    ) -> std::fmt::Result {
        let unit = unit.as_ref();
        let mut me = self
            .enc
            .encode_descriptor(name, help, unit, MetricType::Counter)?;
        for (labels, v) in values {
            if labels.is_empty() {
                ConstCounter::new(*v).encode(me.encode_family(&Vec::<(&str, &str)>::new())?)?;
            } else {
                ConstCounter::new(*v).encode(me.encode_family(labels)?)?;
            }
        }
        Ok(())
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        self.counters(name, help, None, &[(vec![], v)])
    }

    fn counter_f64(
        &mut self,
        name: &str,
        help: &str,
        unit: Unit,
        values: &[(Labels<'_>, f64)],
    ) -> std::fmt::Result {
        let mut me = self
            .enc
            .encode_descriptor(name, help, Some(&unit), MetricType::Counter)?;
        for (labels, v) in values {
            ConstCounter::new(*v).encode(me.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauges(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        values: &[(Labels<'_>, f64)],
    ) -> std::fmt::Result {
        let unit = unit.as_ref();
        let mut me = self
            .enc
            .encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for (labels, v) in values {
            // Whole numbers print as such ("1", not "1.0"): easier to read and to grep.
            if v.fract() == 0.0 && v.abs() < 9.0e15 {
                ConstGauge::new(*v as i64).encode(me.encode_family(labels)?)?;
            } else {
                ConstGauge::new(*v).encode(me.encode_family(labels)?)?;
            }
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>, v: f64) -> std::fmt::Result {
        self.gauges(name, help, unit, &[(vec![], v)])
    }

    /// A histogram from per-bucket counts (`counts[i]` for `upper[i]`, the extra last one
    /// for +Inf).
    #[allow(clippy::too_many_arguments)]
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        labels: &Labels<'_>,
        upper: &[f64],
        counts: &[u64],
        sum: f64,
    ) -> std::fmt::Result {
        let unit = unit.as_ref();
        let mut me = self
            .enc
            .encode_descriptor(name, help, unit, MetricType::Histogram)?;
        let mut buckets: Vec<(f64, u64)> = upper
            .iter()
            .enumerate()
            .map(|(i, u)| (*u, counts.get(i).copied().unwrap_or(0)))
            .collect();
        buckets.push((
            f64::INFINITY,
            counts.iter().skip(upper.len()).copied().sum::<u64>(),
        ));
        let count = buckets.iter().map(|b| b.1).sum();
        me.encode_family(labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

impl Collector for Snapshot {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut o = Out { enc: encoder };
        let t = &self.totals;
        let s = self;

        o.gauges(
            "collector_build_info",
            "Always 1; the labels say which collector build serves.",
            None,
            &[(vec![("version", env!("CARGO_PKG_VERSION"))], 1.0)],
        )?;

        // Samples (DESIGN §8 counters, summed over workers).
        let by = t.by_source.iter();
        let per = |f: &dyn Fn(&crate::counters::SourceCounters) -> u64| -> Vec<(Labels<'_>, u64)> {
            by.iter()
                .map(|(n, c)| (vec![("source", *n)], f(c)))
                .collect()
        };
        o.counters(
            "collector_samples_received",
            "Samples decoded, by source, before verification.",
            None,
            &per(&|c| c.received),
        )?;
        o.counters(
            "collector_samples_stored",
            "Samples committed to storage (or written by the file dispatcher alone), by source.",
            None,
            &per(&|c| c.stored),
        )?;
        o.counters(
            "collector_samples_duplicates",
            "Samples storage already held (same message_id), by source: stored once, counted here.",
            None,
            &per(&|c| c.duplicates),
        )?;
        let mut rejected = Vec::new();
        for (n, c) in by.iter() {
            rejected.push((
                vec![("source", *n), ("reason", "invalid_signature")],
                c.invalid_signature,
            ));
            rejected.push((
                vec![("source", *n), ("reason", "invalid_timestamp")],
                c.invalid_timestamp,
            ));
            rejected.push((vec![("source", *n), ("reason", "malformed")], c.malformed));
        }
        o.counters(
            "collector_samples_rejected",
            "Samples refused and never stored, by source and reason (malformed: not a valid sample, or refused by storage).",
            None,
            &rejected,
        )?;
        o.counters(
            "collector_received",
            "Payload bytes read, by source (datagrams, stream bytes, AMQP message bodies).",
            Some(Unit::Bytes),
            &per(&|c| c.bytes),
        )?;
        o.counter(
            "collector_samples_dropped",
            "Samples lost to a storage failure that no client will retry (UDP, TCP, RPC without requeue).",
            t.samples_dropped,
        )?;
        o.counter(
            "collector_samples_expired",
            "Samples already older than metering_time_to_live when they arrived (dropped, also counted as rejected).",
            t.samples_expired,
        )?;

        // Sources.
        o.counter(
            "collector_udp_datagrams_received",
            "UDP datagrams read.",
            t.udp_received,
        )?;
        o.counter(
            "collector_udp_datagrams_malformed",
            "UDP datagrams that were not a valid sample.",
            t.udp_malformed,
        )?;
        o.counter(
            "collector_udp_kernel_drops",
            "Datagrams the kernel dropped on the UDP socket because its receive buffer was full.",
            t.udp_kernel_drops,
        )?;
        o.counters(
            "collector_connections_accepted",
            "Connections accepted, by kind (tcp: ceilometer tcp://, rpc: MessagePack-RPC over TCP or Unix).",
            None,
            &[
                (vec![("kind", "tcp")], t.tcp_connections),
                (vec![("kind", "rpc")], t.rpc_connections),
            ],
        )?;
        o.gauges(
            "collector_connections_open",
            "Connections open now, by kind.",
            None,
            &[
                (vec![("kind", "tcp")], s.connections_open[0] as f64),
                (vec![("kind", "rpc")], s.connections_open[1] as f64),
            ],
        )?;
        o.counter(
            "collector_tcp_malformed",
            "ceilometer tcp:// connections closed for an oversized or undecodable frame.",
            t.tcp_malformed,
        )?;
        o.counter(
            "collector_rpc_requests",
            "MessagePack-RPC requests and notifications read.",
            t.rpc_requests,
        )?;
        o.counter(
            "collector_rpc_errors",
            "MessagePack-RPC requests answered with an error (bad method, bad frame, storage unavailable).",
            t.rpc_errors,
        )?;
        o.counter(
            "collector_amqp_deliveries",
            "AMQP deliveries taken from the broker.",
            t.amqp_deliveries,
        )?;
        o.counter(
            "collector_amqp_deliveries_malformed",
            "AMQP deliveries that were not a valid oslo.messaging notification (acked and dropped).",
            t.amqp_malformed,
        )?;
        o.counter(
            "collector_amqp_reconnects",
            "AMQP connections re-established after a loss.",
            t.amqp_reconnects,
        )?;
        o.counter(
            "collector_amqp_deliveries_acked",
            "AMQP deliveries acked (committed, or malformed and dropped).",
            t.amqp_acked,
        )?;
        o.counter(
            "collector_amqp_deliveries_rejected",
            "AMQP deliveries rejected for redelivery (storage unavailable).",
            t.amqp_rejected,
        )?;
        if let Some(n) = s.amqp_connected {
            o.gauge(
                "collector_amqp_connected",
                "Workers of the serving generation connected to the AMQP broker.",
                None,
                n as f64,
            )?;
        }

        // Storage.
        let driver: Labels<'_> = vec![("driver", s.driver.as_str())];
        o.counters(
            "collector_batches_written",
            "Batches committed by the dispatchers.",
            None,
            &[(driver.clone(), t.batches_written)],
        )?;
        o.counters(
            "collector_batches_relayed",
            "Batches a worker handed to worker 0, the writer of the SQLite file, stored there.",
            None,
            &[(driver.clone(), t.batches_relayed)],
        )?;
        o.counters(
            "collector_dispatch_errors",
            "Batches a dispatcher failed to write (storage unavailable, file error).",
            None,
            &[(driver.clone(), t.dispatch_errors)],
        )?;
        let upper: Vec<f64> = LATENCY_BUCKETS_MS
            .iter()
            .map(|ms| *ms as f64 / 1000.0)
            .collect();
        o.histogram(
            "collector_batch_commit_duration",
            "Time to commit one batch (all dispatchers).",
            Some(Unit::Seconds),
            &driver,
            &upper,
            &t.batch_latency_ms,
            t.batch_latency_us_sum as f64 / 1e6,
        )?;
        let sizes: Vec<f64> = BATCH_SIZE_BUCKETS.iter().map(|n| *n as f64).collect();
        o.histogram(
            "collector_batch_size",
            "Samples per committed batch.",
            None,
            &driver,
            &sizes,
            &t.batch_size,
            t.batch_size_sum as f64,
        )?;
        let fresh: Vec<f64> = FRESHNESS_BUCKETS_MS
            .iter()
            .map(|ms| *ms as f64 / 1000.0)
            .collect();
        o.histogram(
            "collector_sample_freshness",
            "Commit time minus the sample's own timestamp, over stored samples: how late data lands.",
            Some(Unit::Seconds),
            &driver,
            &fresh,
            &t.freshness_ms,
            t.freshness_ms_sum as f64 / 1000.0,
        )?;
        if let Some(ms) = s.last_commit_unix_ms {
            o.gauges(
                "collector_last_sample_committed_timestamp",
                "When samples were last committed (Unix time): the pipeline's heartbeat.",
                Some(Unit::Seconds),
                &[(driver.clone(), ms as f64 / 1000.0)],
            )?;
        }
        o.counters(
            "collector_storage_errors",
            "Failed batch writes by dispatcher (database: storage unavailable; file: file dispatcher).",
            None,
            &[
                (vec![("kind", "database")], t.database_errors),
                (vec![("kind", "file")], t.file_errors),
            ],
        )?;
        o.gauges(
            "collector_storage_up",
            "1 when every worker's last storage write succeeded.",
            None,
            &[(
                driver.clone(),
                if s.storage_down_workers == 0 {
                    1.0
                } else {
                    0.0
                },
            )],
        )?;

        // Workers and the launcher.
        o.gauges(
            "collector_workers",
            "Live worker processes by state (all generations).",
            None,
            &WORKER_STATES
                .iter()
                .zip(s.workers_by_state)
                .map(|(st, n)| (vec![("state", *st)], n as f64))
                .collect::<Vec<_>>(),
        )?;
        o.gauge(
            "collector_workers_desired",
            "Workers per generation the configuration (or TTIN/TTOU) asks for.",
            None,
            s.workers_wanted as f64,
        )?;
        o.counters(
            "collector_worker_restarts",
            "Worker processes replaced, by cause: crash (died on its own), hung (killed after worker_timeout without heartbeat), reload (retired by a new generation).",
            None,
            &[
                (vec![("cause", "crash")], s.restarts.crash),
                (vec![("cause", "hung")], s.restarts.hung),
                (vec![("cause", "reload")], s.restarts.reload),
            ],
        )?;
        o.gauge(
            "collector_generation",
            "The serving generation of workers (1 at start, +1 per reload).",
            None,
            s.generation as f64,
        )?;
        o.counters(
            "collector_reloads",
            "Reloads (HUP, collectorctl reload) by outcome.",
            None,
            &[
                (vec![("outcome", "success")], s.reloads_ok),
                (vec![("outcome", "failure")], s.reloads_failed),
            ],
        )?;
        o.gauge(
            "collector_ready",
            "1 when /readyz answers 200: every worker of the serving generation serves and storage answers.",
            None,
            if s.ready { 1.0 } else { 0.0 },
        )?;
        let idx: Vec<String> = s.workers.iter().map(|w| w.index.to_string()).collect();
        let per_worker = |f: &dyn Fn(&ProcStats) -> f64| -> Vec<(Labels<'_>, f64)> {
            s.workers
                .iter()
                .zip(&idx)
                .filter_map(|(w, i)| {
                    w.proc
                        .as_ref()
                        .map(|p| (vec![("worker", i.as_str())], f(p)))
                })
                .collect()
        };
        o.gauges(
            "collector_worker_resident_memory",
            "Resident memory of each worker process of the serving generation.",
            Some(Unit::Bytes),
            &per_worker(&|p| p.rss_bytes as f64),
        )?;
        o.counter_f64(
            "collector_worker_cpu",
            "User and system CPU time of each worker process of the serving generation.",
            Unit::Seconds,
            &per_worker(&|p| p.cpu_seconds),
        )?;
        o.gauges(
            "collector_worker_open_fds",
            "Open file descriptors of each worker process of the serving generation.",
            None,
            &per_worker(&|p| p.open_fds as f64),
        )?;
        o.gauges(
            "collector_worker_start_time",
            "Start time of each worker process of the serving generation, since the Unix epoch.",
            Some(Unit::Seconds),
            &per_worker(&|p| p.start_time_seconds),
        )?;
        if let Some(p) = &s.launcher {
            // The standard process metrics, for the process serving this endpoint.
            o.counter_f64(
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Unit::Seconds,
                &[(vec![], p.cpu_seconds)],
            )?;
            o.gauge(
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(Unit::Bytes),
                p.rss_bytes as f64,
            )?;
            o.gauge(
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                p.open_fds as f64,
            )?;
            o.gauge(
                "process_start_time",
                "Start time of the process since unix epoch in seconds.",
                Some(Unit::Seconds),
                p.start_time_seconds,
            )?;
        }
        Ok(())
    }
}

/// Resource use of a process from /proc/PID/stat (CPU ticks, start time), statm (RSS) and
/// fd/ (open descriptors). `None` when the process is gone.
pub fn proc_stats(pid: i32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: fields after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ticks = clock_ticks();
    let cpu = (field(14)? + field(15)?) as f64 / ticks;
    let start = boot_time().unwrap_or(0.0) + field(22).unwrap_or(0) as f64 / ticks;
    let rss_pages = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcStats {
        rss_bytes: rss_pages * page_size(),
        cpu_seconds: cpu,
        open_fds: fds,
        start_time_seconds: start,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Boot time (seconds since the epoch), from /proc/stat's `btime`; read once.
fn boot_time() -> Option<f64> {
    static BOOT: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut t = Counters::new();
        t.samples_received = 10;
        t.samples_stored = 7;
        t.samples_rejected = 3;
        t.invalid_signature = 2;
        t.udp_received = 4;
        t.tcp_connections = 1;
        t.rpc_connections = 2;
        t.observe_batch_latency(3);
        t.observe_batch_latency(5000);
        t.batch_latency_us_sum = 5_003_000;
        t.respawns = 1;
        t.by_source.rpc.stored = 7;
        t.by_source.rpc.invalid_signature = 2;
        t.by_source.udp.malformed = 1;
        Snapshot {
            totals: t,
            driver: "sqlite".into(),
            workers: vec![
                WorkerProc {
                    index: 0,
                    proc: proc_stats(std::process::id() as i32),
                },
                WorkerProc {
                    index: 1,
                    proc: None,
                },
            ],
            workers_by_state: [0, 2, 0],
            workers_wanted: 2,
            restarts: Restarts {
                crash: 1,
                hung: 0,
                reload: 2,
            },
            generation: 2,
            reloads_ok: 1,
            reloads_failed: 0,
            ready: true,
            storage_down_workers: 0,
            launcher: proc_stats(std::process::id() as i32),
            connections_open: [1, 2],
            last_commit_unix_ms: Some(1_796_000_000_500),
            amqp_connected: None,
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{text}"))
    }

    #[test]
    fn prometheus_text_names_values_and_types() {
        let (text, ct) = encode(sample(), false);
        assert!(ct.starts_with("text/plain; version=0.0.4"));
        assert_eq!(
            line(&text, "collector_samples_stored_total{source=\"rpc\"}"),
            "collector_samples_stored_total{source=\"rpc\"} 7"
        );
        assert_eq!(
            line(&text, "# TYPE collector_samples_stored_total"),
            "# TYPE collector_samples_stored_total counter"
        );
        assert_eq!(
            line(
                &text,
                "collector_samples_rejected_total{source=\"udp\",reason=\"malformed\"}"
            ),
            "collector_samples_rejected_total{source=\"udp\",reason=\"malformed\"} 1"
        );
        assert_eq!(
            line(&text, "collector_worker_restarts_total{cause=\"crash\"}"),
            "collector_worker_restarts_total{cause=\"crash\"} 1"
        );
        assert_eq!(
            line(&text, "collector_build_info"),
            format!(
                "collector_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )
        );
        // Histogram: cumulative buckets in seconds, +Inf = count, sum in seconds.
        assert_eq!(
            line(
                &text,
                "collector_batch_commit_duration_seconds_bucket{driver=\"sqlite\",le=\"0.005\"}"
            ),
            "collector_batch_commit_duration_seconds_bucket{driver=\"sqlite\",le=\"0.005\"} 1"
        );
        assert_eq!(
            line(
                &text,
                "collector_batch_commit_duration_seconds_bucket{driver=\"sqlite\",le=\"+Inf\"}"
            ),
            "collector_batch_commit_duration_seconds_bucket{driver=\"sqlite\",le=\"+Inf\"} 2"
        );
        assert_eq!(
            line(&text, "collector_batch_commit_duration_seconds_count"),
            "collector_batch_commit_duration_seconds_count{driver=\"sqlite\"} 2"
        );
        assert!(line(&text, "collector_batch_commit_duration_seconds_sum").ends_with(" 5.003"));
        // Per-worker process metrics only for workers whose /proc could be read.
        assert!(text.contains("collector_worker_resident_memory_bytes{worker=\"0\"}"));
        assert!(!text.contains("{worker=\"1\"}"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_when_asked() {
        let (text, ct) = encode(sample(), true);
        assert!(ct.starts_with("application/openmetrics-text"));
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(
            line(&text, "# TYPE collector_samples_stored "),
            "# TYPE collector_samples_stored counter"
        );
        assert_eq!(
            line(&text, "collector_samples_stored_total{source=\"rpc\"}"),
            "collector_samples_stored_total{source=\"rpc\"} 7"
        );
        assert!(text.contains("# UNIT collector_batch_commit_duration_seconds seconds"));
    }

    #[test]
    fn accept_negotiation() {
        // What Prometheus 2.x sends.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("application/openmetrics-text; q=0"));
        assert!(wants_openmetrics("Application/OpenMetrics-Text"));
    }

    #[test]
    fn proc_stats_of_this_process() {
        let p = proc_stats(std::process::id() as i32).unwrap();
        assert!(
            p.rss_bytes > 0 && p.open_fds > 0 && p.start_time_seconds > 1e9,
            "{p:?}"
        );
        assert!(proc_stats(i32::MAX).is_none());
    }
}

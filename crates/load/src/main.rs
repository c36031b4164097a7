//! `collector-load`: load generator and raw-limit probes for benchmarking the collector.
//! Every mode prints one JSON object on one line on stdout; see docs/performance.md.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use collector_load::samples::{self, Payloads};
use collector_load::stats::{latency_summary, udp_rcvbuf_errors};
use collector_load::{grow, json as sample_json, raw_server, raw_sqlite, rpc, tcp, udp, watch};
use serde_json::json;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "collector-load",
    version,
    about = "Load generator and raw-limit probes for the collector"
)]
struct Cli {
    /// Secret the generated samples are signed with (the collector's telemetry_secret).
    #[arg(long, global = true, default_value = "change this for valid signing")]
    secret: String,
    /// Read the samples from this file (written by `gen`) instead of generating them first.
    #[arg(long, global = true, value_name = "FILE")]
    samples: Option<PathBuf>,
    /// Leave out the first N samples: send sequence numbers N..N+COUNT (after a warm-up run
    /// that sent 0..N, the same samples would all be duplicates).
    #[arg(long, global = true, default_value_t = 0, value_name = "N")]
    skip: usize,
    #[command(subcommand)]
    mode: Mode,
}

/// Where and how `udp` and `tcp` watch the database for their samples' commits.
#[derive(Args)]
struct WatchArgs {
    /// Watch this SQLite file for the samples' commits: stored count, throughput, latency.
    #[arg(long, value_name = "PATH")]
    watch_db: Option<PathBuf>,
    /// Poll interval of the watcher (latency resolution).
    #[arg(long, default_value_t = 5)]
    watch_interval_ms: u64,
    /// After sending, stop watching once no new sample was committed for this long.
    #[arg(long, default_value_t = 1500)]
    settle_ms: u64,
}

#[derive(Subcommand)]
enum Mode {
    /// Generate COUNT signed samples into a file, so timed runs need not sign.
    Gen {
        /// Samples to generate.
        #[arg(long)]
        count: usize,
        /// File to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Send COUNT samples, one per datagram, with sendmmsg; flat out or paced at RATE/s.
    Udp {
        /// The collector's UDP address (udp_address:udp_port).
        #[arg(long)]
        to: SocketAddr,
        /// Samples to send (sequence numbers 0..COUNT).
        #[arg(long)]
        count: usize,
        /// Datagrams per second; flat out when absent.
        #[arg(long)]
        rate: Option<f64>,
        #[command(flatten)]
        watch: WatchArgs,
        /// Also write (seq, send time) pairs here, for `latency`.
        #[arg(long, value_name = "FILE")]
        sends_out: Option<PathBuf>,
        /// Sender sockets (distinct source ports, as many publishers), used in turn per call.
        #[arg(long, default_value_t = 1)]
        clients: usize,
    },
    /// Send COUNT samples as ceilometer tcp:// frames (8-byte LE length + msgpack) over
    /// CLIENTS connections, flat out or paced at RATE/s in all.
    Tcp {
        /// The collector's ceilometer tcp:// address (tcp_address:tcp_port).
        #[arg(long)]
        to: SocketAddr,
        /// Samples to send (sequence numbers 0..COUNT).
        #[arg(long)]
        count: usize,
        /// Samples per second over all connections; flat out when absent.
        #[arg(long)]
        rate: Option<f64>,
        /// Connections (one thread each), as many publishers.
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Pipelined MessagePack-RPC record_metering_data calls of BATCH samples.
    Rpc {
        /// The collector's RPC address (rpc_address:rpc_port).
        #[arg(long)]
        to: SocketAddr,
        /// Samples to send (sequence numbers 0..COUNT).
        #[arg(long)]
        count: usize,
        /// Samples per request.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Requests in flight per connection.
        #[arg(long, default_value_t = 8)]
        depth: usize,
        #[arg(long, default_value_t = 2)]
        connections: usize,
        /// Samples per second over all connections (default: as fast as acks come).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// p50/p99 of recorded_at − send time from a collector's SQLite file and a `--sends-out` file.
    Latency {
        /// The collector's SQLite file.
        #[arg(long, value_name = "PATH")]
        db: PathBuf,
        /// The file `udp --sends-out` wrote.
        #[arg(long, value_name = "FILE")]
        sends: PathBuf,
    },
    /// The raw UDP limit: a recvmmsg loop into nothing while a thread sends COUNT datagrams.
    RawUdp {
        /// Port to bind on 127.0.0.1 (0: any free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Datagrams to send.
        #[arg(long)]
        count: usize,
        /// Datagrams per receive call; 1 uses recv(2) like a one-at-a-time loop.
        #[arg(long, default_value_t = udp::BATCH)]
        batch: usize,
    },
    /// The raw SQLite limit: bare rusqlite inserts of the same rows, 1000 per transaction.
    RawSqlite {
        /// Rows to insert.
        #[arg(long)]
        count: usize,
        /// Database file to create (replaced if it exists).
        #[arg(long, value_name = "PATH", default_value = "raw-sqlite.db")]
        db: PathBuf,
        /// Rows per transaction.
        #[arg(long, default_value_t = 1000)]
        per_tx: usize,
        /// Add the indexes the collector's sample table has.
        #[arg(long)]
        indexed: bool,
    },
    /// The raw server limit: the same rows by the server's best bulk path from one process
    /// (PostgreSQL binary COPY, MariaDB/MySQL multi-row prepared INSERT) into a bare table.
    RawServer {
        /// postgresql://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB (the database must exist;
        /// a table `raw` is created in it and dropped after).
        #[arg(long)]
        url: String,
        /// Rows to write.
        #[arg(long)]
        count: usize,
        /// Rows per transaction (one COPY or one INSERT each).
        #[arg(long, default_value_t = 1000)]
        per_tx: usize,
    },
    /// The growth run: COUNT ceilometer-shaped samples (uuid1 message_ids, INSTANCES instances
    /// with 8 meters on 2 x INSTANCES resources, timestamps over DAYS days ending at today's
    /// 00:00 UTC) as calls of BATCH samples over one connection; stored/s per window.
    /// With --direct URL, no daemon: batches of BATCH go straight through the storage crate.
    Grow {
        /// The collector's RPC address.
        #[arg(long, required_unless_present = "direct", conflicts_with = "direct")]
        to: Option<SocketAddr>,
        /// Write to this storage URL in-process (`storage::open` + `record_metering_data`).
        #[arg(long, value_name = "URL")]
        direct: Option<String>,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1000)]
        instances: u64,
        #[arg(long, default_value_t = 7.0)]
        days: f64,
        #[arg(long, default_value_t = 1000)]
        batch: u64,
        /// Calls in flight.
        #[arg(long, default_value_t = 4)]
        depth: usize,
        /// Report stored/s over this many windows of COUNT / WINDOWS samples.
        #[arg(long, default_value_t = 12)]
        windows: u64,
        /// With --direct: the store's time partition span in seconds (`partition_span`).
        #[arg(long, value_name = "SECONDS", requires = "direct")]
        partition_span: Option<u64>,
    },
    /// Time statistics (cpu, hourly, over [START, END) µs; all and one resource) and the latest
    /// 100 cpu samples of one resource on a grown store, through the storage crate.
    Query {
        /// Storage URL (as `[database] connection`).
        #[arg(long)]
        db: String,
        #[arg(long)]
        start_micros: i64,
        #[arg(long)]
        end_micros: i64,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Time `clear_expired_metering_data(TTL)` on a store; with PROBE, calls of BATCH fresh
    /// samples go to the daemon there meanwhile and their longest wait is reported.
    Expire {
        #[arg(long)]
        db: String,
        #[arg(long)]
        ttl: u64,
        #[arg(long)]
        probe: Option<SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        batch: u64,
        /// SQLite: stop reclaiming the expired chunk's pages after this many steps.
        #[arg(long)]
        max_reclaim_steps: Option<u64>,
    },
    /// Write COUNT samples as oslo.messaging v2 notification bodies (JSON, PER_MESSAGE samples
    /// each), one body per line, for a publisher to put on an AMQP queue.
    AmqpBodies {
        /// Samples to write (sequence numbers 0..COUNT).
        #[arg(long)]
        count: usize,
        /// Samples per notification.
        #[arg(long, default_value_t = 10)]
        per_message: usize,
        /// File to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Watch the SQLite file of `w` (if any) for the `count` samples from sequence number `first`
/// a sender reports through `progress`.
#[allow(clippy::type_complexity)]
fn spawn_watcher(
    w: &WatchArgs,
    count: usize,
    first: u64,
) -> (
    Arc<watch::Progress>,
    Option<std::thread::JoinHandle<Result<watch::Observed>>>,
) {
    let progress = Arc::new(watch::Progress::default());
    let watcher = w.watch_db.as_deref().map(|db| {
        watch::spawn(
            watch::WatchOptions {
                db: db.to_path_buf(),
                interval: Duration::from_millis(w.watch_interval_ms),
                settle: Duration::from_millis(w.settle_ms),
                limit: Duration::from_secs(60),
                first,
            },
            count,
            progress.clone(),
        )
    });
    (progress, watcher)
}

/// The JSON line of a datagram or stream sender (`udp`, `tcp`): what it sent, how fast.
fn sent_summary(
    mode: &str,
    to: SocketAddr,
    sent: &udp::Sent,
    rate: Option<f64>,
    clients: usize,
    p: &Payloads,
) -> serde_json::Value {
    let send_s = (sent.last_ns - sent.first_ns) as f64 / 1e9;
    json!({
        "mode": mode,
        "to": to.to_string(),
        "sent": sent.sent,
        "send_failed": sent.failed,
        "send_s": send_s,
        "send_per_s": round(sent.sent as f64 / send_s.max(1e-9)),
        "rate_asked": rate,
        "clients": clients,
        "mean_sample_bytes": p.total_bytes() / p.len().max(1),
    })
}

/// Add what the watcher saw (stored, lost, stored/s, latencies) to a sender's JSON line.
fn watched(
    out: &mut serde_json::Value,
    w: std::thread::JoinHandle<Result<watch::Observed>>,
    db: &std::path::Path,
    sent: &udp::Sent,
    watch_interval_ms: u64,
    first: u64,
) -> Result<()> {
    let obs = match w.join() {
        Ok(r) => r?,
        Err(_) => bail!("watcher thread panicked"),
    };
    let committed: Vec<i64> = obs
        .seen_at
        .iter()
        .zip(&sent.send_ns)
        .filter(|(seen, sent)| **seen > 0 && **sent > 0)
        .map(|(seen, sent)| seen - sent)
        .collect();
    let duration = (obs.last_new_ns - sent.first_ns) as f64 / 1e9;
    let recorded = watch::recorded_latencies(db, &sent.send_ns, first)?;
    out["stored"] = json!(obs.stored);
    out["lost"] = json!(sent.sent.saturating_sub(obs.stored));
    out["foreign_rows"] = json!(obs.foreign);
    out["duration_s"] = json!(duration);
    out["stored_per_s"] = json!(round(obs.stored as f64 / duration.max(1e-9)));
    out["latency_ms"] = latency_summary(committed);
    out["latency_basis"] = json!(format!(
        "send to first poll that saw the row committed (poll every {watch_interval_ms} ms)"
    ));
    out["recorded_at_latency_ms"] = latency_summary(recorded);
    Ok(())
}

fn main() {
    // The drivers' own log lines (e.g. RUST_LOG=storage=debug: where expiry's time went), on
    // stderr; nothing by default, so stdout stays one JSON object.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("collector-load: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<serde_json::Value> {
    let skip = cli.skip;
    // The first sequence number sent, as the watcher and the send-time tables key them.
    let first = skip as u64;
    let payloads = |count: usize| {
        samples::obtain(cli.samples.as_deref(), skip + count, &cli.secret).map(|p| p.skip(skip))
    };
    Ok(match cli.mode {
        Mode::Gen { count, out } => {
            let started = std::time::Instant::now();
            let p = Payloads::generate(count, &cli.secret);
            p.save(&out)?;
            json!({
                "mode": "gen",
                "count": p.len(),
                "bytes": p.total_bytes(),
                "mean_sample_bytes": p.total_bytes() / p.len().max(1),
                "seconds": started.elapsed().as_secs_f64(),
            })
        }
        Mode::Udp {
            to,
            count,
            rate,
            watch,
            sends_out,
            clients,
        } => {
            let p = payloads(count)?;
            let socks = (0..clients.max(1))
                .map(|_| udp::connect(to))
                .collect::<Result<Vec<_>>>()?;
            let (progress, watcher) = spawn_watcher(&watch, count, first);
            let rcvbuf_before = udp_rcvbuf_errors();
            let sent = udp::send(&socks, &p, count, rate, &progress);
            let mut out = sent_summary("udp", to, &sent, rate, socks.len(), &p);
            if let Some(path) = &sends_out {
                watch::save_sends(path, &sent.send_ns, first)?;
            }
            if let (Some(w), Some(db)) = (watcher, watch.watch_db.as_ref()) {
                watched(&mut out, w, db, &sent, watch.watch_interval_ms, first)?;
                let rcvbuf_after = udp_rcvbuf_errors();
                out["rcvbuf_errors"] = json!(match (rcvbuf_before, rcvbuf_after) {
                    (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                    _ => None,
                });
            }
            out
        }
        Mode::Tcp {
            to,
            count,
            rate,
            clients,
            watch,
        } => {
            let p = payloads(count)?;
            let (progress, watcher) = spawn_watcher(&watch, count, first);
            let (sent, open) = tcp::send(to, clients, &p, count, rate, &progress)?;
            let mut out = sent_summary("tcp", to, &sent, rate, open.len(), &p);
            if let (Some(w), Some(db)) = (watcher, watch.watch_db.as_ref()) {
                watched(&mut out, w, db, &sent, watch.watch_interval_ms, first)?;
            }
            drop(open);
            out
        }
        Mode::Rpc {
            to,
            count,
            batch,
            depth,
            connections,
            rate,
        } => {
            let p = payloads(count)?;
            let o = rpc::RpcOptions {
                to,
                count,
                batch,
                depth,
                connections,
                rate,
            };
            let r = rpc::run(&p, &o)?;
            let sum = |f: fn(&rpc::Ack) -> u64| r.acks.iter().map(f).sum::<u64>();
            let stored = sum(|a| a.stored);
            let secs = r.elapsed.as_secs_f64();
            json!({
                "mode": "rpc",
                "to": to.to_string(),
                "batch": batch,
                "depth": depth,
                "connections": connections,
                "rate_asked": rate,
                "requests": r.requests,
                "samples": r.samples,
                "acked_requests": r.acks.len(),
                "error_answers": r.acks.iter().filter(|a| a.error).count(),
                "stored": stored,
                "duplicates": sum(|a| a.duplicates),
                "rejected": sum(|a| a.rejected),
                "duration_s": secs,
                "stored_per_s": round(stored as f64 / secs.max(1e-9)),
                "latency_ms": latency_summary(r.latency_ns),
                "latency_basis": "send of a request to its answer, which the collector sends after commit",
                "errors": r.errors,
            })
        }
        Mode::Latency { db, sends } => {
            let table = watch::load_sends(&sends)?;
            let lat = watch::recorded_latencies(&db, &table, 0)?;
            json!({
                "mode": "latency",
                "latency_ms": latency_summary(lat),
                "latency_basis": "recorded_at (stamped as the driver starts writing the batch) minus send time",
            })
        }
        Mode::RawUdp { port, count, batch } => {
            let p = payloads(count)?;
            let r = udp::raw_limit(port, &p, count, batch)?;
            let secs = (r.last_recv_ns - r.first_send_ns) as f64 / 1e9;
            json!({
                "mode": "raw-udp",
                "recv_batch": batch,
                "sent": r.sent,
                "received": r.received,
                "lost": r.sent.saturating_sub(r.received),
                "bytes": r.bytes,
                "send_s": r.send_s,
                "duration_s": secs,
                "recv_per_s": round(r.received as f64 / secs.max(1e-9)),
            })
        }
        Mode::RawSqlite {
            count,
            db,
            per_tx,
            indexed,
        } => {
            let p = payloads(count)?;
            let r = raw_sqlite::run(&db, &p, count, per_tx, indexed)?;
            json!({
                "mode": "raw-sqlite",
                "indexed": indexed,
                "rows": r.rows,
                "per_tx": per_tx,
                "seconds": r.seconds,
                "insert_per_s": round(r.rows as f64 / r.seconds.max(1e-9)),
            })
        }
        Mode::RawServer { url, count, per_tx } => {
            let p = payloads(count)?;
            let r = raw_server::run(&url, &p, count, per_tx)?;
            json!({
                "mode": "raw-server",
                "server": r.server,
                "rows": r.rows,
                "per_tx": per_tx,
                "seconds": r.seconds,
                "insert_per_s": round(r.rows as f64 / r.seconds.max(1e-9)),
            })
        }
        Mode::Grow {
            to,
            direct,
            count,
            instances,
            days,
            batch,
            depth,
            windows,
            partition_span,
        } => {
            let day = 86_400_000_000i64;
            let today = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
            let start = (today - today.rem_euclid(day)) - (days * day as f64) as i64;
            let fleet = samples::Fleet::spanning(count, instances, days, start);
            match (direct, to) {
                (Some(url), _) => grow::grow_direct(&grow::DirectOptions {
                    url,
                    fleet,
                    count,
                    batch,
                    windows,
                    secret: cli.secret.clone(),
                    partition_span,
                })?,
                (None, Some(to)) => grow::grow(&grow::GrowOptions {
                    to,
                    fleet,
                    count,
                    batch,
                    depth,
                    windows,
                    secret: cli.secret.clone(),
                })?,
                (None, None) => anyhow::bail!("grow needs --to or --direct"),
            }
        }
        Mode::Query {
            db,
            start_micros,
            end_micros,
            runs,
        } => grow::query(&db, start_micros, end_micros, runs)?,
        Mode::Expire {
            db,
            ttl,
            probe,
            batch,
            max_reclaim_steps,
        } => {
            let fleet = samples::Fleet {
                instances: 1000,
                start_micros: 0,
                interval_micros: 60_000_000,
            };
            grow::expire(
                &db,
                ttl,
                probe,
                fleet,
                batch,
                &cli.secret,
                max_reclaim_steps,
            )?
        }
        Mode::AmqpBodies {
            count,
            per_message,
            out,
        } => {
            let p = payloads(count)?;
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&out)
                    .map_err(|e| anyhow::anyhow!("create {}: {e}", out.display()))?,
            );
            let (mut messages, mut bytes) = (0usize, 0usize);
            for (n, start) in (0..count).step_by(per_message.max(1)).enumerate() {
                let batch = (start..(start + per_message.max(1)).min(count))
                    .map(|i| meter::decode_value(p.get(i)).map_err(anyhow::Error::from))
                    .collect::<Result<Vec<_>>>()?;
                let body = sample_json::envelope(n, &batch)?;
                bytes += body.len();
                writeln!(f, "{body}")?;
                messages += 1;
            }
            f.flush()?;
            json!({
                "mode": "amqp-bodies",
                "samples": count,
                "messages": messages,
                "per_message": per_message,
                "mean_message_bytes": bytes / messages.max(1),
            })
        }
    })
}

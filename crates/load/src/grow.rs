//! The growth run (`collector-load grow`) and the probes run on the grown store (`query`,
//! `expire`).
//!
//! `grow` sends a [`Fleet`]'s samples (ceilometer-shaped: uuid1 `message_id`s, thousands of
//! resources, days of timestamps in order) as `record_metering_data` calls of `batch` samples
//! over one connection, a few in flight, generated and signed on a thread of their own while
//! earlier calls are answered; it reports stored/s per window of acked samples, so a store that
//! slows as it fills shows it. `query` times statistics and `samples` through the storage crate
//! against the grown database; `expire` times `clear_expired_metering_data` while a probe keeps
//! sending calls to the daemon and records how long each waited.

use crate::rpc::{encode_request, parse_response, Ack};
use crate::samples::Fleet;
use anyhow::{bail, Context, Result};
use meter::decode::{read_value, DecodeError, Limits};
use serde_json::{json, Value as Json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use storage::Storage as _;

/// One connection to the daemon's RPC port: send requests, read answers in order.
struct Rpc {
    writer: TcpStream,
    reader: TcpStream,
    buf: Vec<u8>,
    chunk: Vec<u8>,
}

impl Rpc {
    fn connect(to: SocketAddr) -> Result<Rpc> {
        let s = TcpStream::connect(to).with_context(|| format!("connect to {to}"))?;
        s.set_nodelay(true)?;
        let reader = s.try_clone()?;
        reader.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Rpc {
            writer: s,
            reader,
            buf: Vec::with_capacity(1 << 16),
            chunk: vec![0; 1 << 16],
        })
    }

    fn send(&mut self, request: &[u8]) -> Result<()> {
        self.writer.write_all(request).context("send request")
    }

    fn answer(&mut self) -> Result<Ack> {
        let limits = Limits::default();
        loop {
            match read_value(&self.buf, &limits) {
                Ok((v, used)) => {
                    self.buf.drain(..used);
                    return parse_response(&v);
                }
                Err(DecodeError::Incomplete) => {}
                Err(e) => bail!("undecodable response: {e}"),
            }
            let n = self.reader.read(&mut self.chunk).context("read response")?;
            if n == 0 {
                bail!("the collector closed the connection");
            }
            self.buf.extend_from_slice(&self.chunk[..n]);
        }
    }
}

/// Requests of `batch` fleet samples `range`, built on a thread of their own.
fn requests(
    fleet: Fleet,
    secret: String,
    range: std::ops::Range<u64>,
    batch: u64,
) -> mpsc::Receiver<(Vec<u8>, usize)> {
    let (tx, rx) = mpsc::sync_channel(16);
    std::thread::spawn(move || {
        let mut msgid = 0u32;
        let mut i = range.start;
        let mut body = Vec::new();
        while i < range.end {
            let end = (i + batch).min(range.end);
            body.clear();
            for k in i..end {
                meter::encode::encode_value(&fleet.sample(k, &secret), &mut body);
            }
            let mut req = Vec::with_capacity(body.len() + 32);
            encode_request(&mut req, msgid, (end - i) as usize, &body);
            if tx.send((req, (end - i) as usize)).is_err() {
                return;
            }
            msgid = msgid.wrapping_add(1);
            i = end;
        }
    });
    rx
}

pub struct GrowOptions {
    pub to: SocketAddr,
    pub fleet: Fleet,
    pub count: u64,
    pub batch: u64,
    pub depth: usize,
    pub windows: u64,
    pub secret: String,
}

/// Stored/s per window of `count / windows` samples done, as a growth run fills a store.
struct Windows {
    count: u64,
    size: u64,
    label: &'static str,
    stored: u64,
    start: Instant,
    window_stored: u64,
    list: Vec<Json>,
}

impl Windows {
    fn new(count: u64, windows: u64, label: &'static str) -> Self {
        Windows {
            count,
            size: (count / windows.max(1)).max(1),
            label,
            stored: 0,
            start: Instant::now(),
            window_stored: 0,
            list: Vec::new(),
        }
    }

    /// `n` more samples done (`done` in all), `stored` of them stored; closes a window when
    /// `done` crosses its end or reaches `count`.
    fn add(&mut self, done: u64, n: u64, stored: u64) {
        self.stored += stored;
        self.window_stored += stored;
        if done / self.size > (done - n) / self.size || done == self.count {
            let per_s = self.window_stored as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
            self.list
                .push(json!({ "rows": self.stored, "stored_per_s": per_s.round() }));
            eprintln!("{}: {} rows, {per_s:.0} stored/s", self.label, self.stored);
            self.start = Instant::now();
            self.window_stored = 0;
        }
    }
}

/// Send the fleet's first `count` samples; stored/s per window of `count / windows` acked
/// samples.
pub fn grow(o: &GrowOptions) -> Result<Json> {
    let rx = requests(o.fleet, o.secret.clone(), 0..o.count, o.batch.max(1));
    let mut rpc = Rpc::connect(o.to)?;
    let mut windows = Windows::new(o.count, o.windows, "grow");
    let mut in_flight = std::collections::VecDeque::new();
    let (mut acked, mut dups, mut errors) = (0u64, 0u64, 0u64);
    let mut max_wait = Duration::ZERO;
    let started = Instant::now();
    let mut gen_wait = Duration::ZERO;
    loop {
        while in_flight.len() < o.depth.max(1) {
            let t = Instant::now();
            let Ok((req, n)) = rx.recv() else { break };
            gen_wait += t.elapsed();
            rpc.send(&req)?;
            in_flight.push_back((Instant::now(), n));
        }
        let Some((sent, n)) = in_flight.pop_front() else {
            break;
        };
        let ack = rpc.answer()?;
        max_wait = max_wait.max(sent.elapsed());
        if ack.error {
            errors += 1;
        }
        acked += n as u64;
        dups += ack.duplicates;
        windows.add(acked, n as u64, ack.stored);
    }
    Ok(json!({
        "mode": "grow",
        "samples": o.count,
        "stored": windows.stored,
        "duplicates": dups,
        "error_answers": errors,
        "seconds": started.elapsed().as_secs_f64(),
        "generator_wait_s": gen_wait.as_secs_f64(),
        "max_call_wait_ms": max_wait.as_secs_f64() * 1e3,
        "windows": windows.list,
        "start_micros": o.fleet.start_micros,
        "end_micros": o.fleet.timestamp(o.count.saturating_sub(1)),
    }))
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn time_of(us: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .map_err(|e| anyhow::anyhow!("{us} µs: {e}"))
}

/// Median of `runs` timings (ms) of statistics and `samples` queries on a grown store:
/// `cpu` hourly over [start, end), the same for one resource, and the latest 100 `cpu`
/// samples of that resource.
pub fn query(url: &str, start_us: i64, end_us: i64, runs: usize) -> Result<Json> {
    let mut st = storage::open(url, &storage::StorageOptions::default())?;
    let resource = Fleet::instance_resource(7);
    let base = storage::SampleFilter {
        meter: Some("cpu".into()),
        start: Some(time_of(start_us)?),
        end: Some(time_of(end_us)?),
        ..Default::default()
    };
    let one = storage::SampleFilter {
        resource_id: Some(resource.clone()),
        ..base.clone()
    };
    let latest = storage::SampleFilter {
        meter: Some("cpu".into()),
        resource_id: Some(resource),
        limit: Some(100),
        ..Default::default()
    };
    let mut out = json!({"mode": "query", "runs": runs});
    for (name, filter) in [("statistics_meter", &base), ("statistics_resource", &one)] {
        let (mut t, mut periods, mut count, mut source) = (Vec::new(), 0, 0, String::new());
        for _ in 0..runs.max(1) + 1 {
            let t0 = Instant::now();
            let (stats, src) = st.get_meter_statistics_from(filter, Some(3600))?;
            t.push(t0.elapsed().as_secs_f64() * 1e3);
            periods = stats.len();
            count = stats.iter().map(|s| s.count).sum::<u64>();
            source = src.to_string();
        }
        t.remove(0); // the first run warms the page cache and the statement cache
        out[name] =
            json!({"ms": median_ms(t), "periods": periods, "samples": count, "source": source});
    }
    let mut t = Vec::new();
    let mut n = 0;
    for _ in 0..runs.max(1) + 1 {
        let t0 = Instant::now();
        n = st.get_samples(&latest)?.len();
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.remove(0);
    out["samples_latest_100"] = json!({"ms": median_ms(t), "rows": n});
    Ok(out)
}

/// The pause between reclaim steps while a probe runs (see `expire`).
const RECLAIM_PAUSE: Duration = Duration::from_millis(5);

/// Time `clear_expired_metering_data(ttl)` on `url`; meanwhile, with `probe`, keep sending
/// calls of `batch` fresh samples to the daemon there and report how long each waited. On
/// SQLite, expiry hides a chunk at once and its pages are reclaimed in steps after batches:
/// then the reclaim is also run to the end here, timing each step (the longest hold of the
/// write lock), while the probe keeps going. On the server drivers, the tables expired
/// partitions were moved into are dropped the same way, one per step.
pub fn expire(
    url: &str,
    ttl: u64,
    probe: Option<SocketAddr>,
    fleet: Fleet,
    batch: u64,
    secret: &str,
    max_reclaim_steps: Option<u64>,
) -> Result<Json> {
    let opts = storage::StorageOptions::default();
    let mut sqlite = match storage::url::StorageUrl::parse(url) {
        Ok(u) if u.scheme == "sqlite" => Some(storage::sqlite::SqliteStorage::open(
            storage::sqlite::Target::from_url(&u)?,
            &opts,
        )?),
        _ => None,
    };
    let mut other = match sqlite {
        Some(_) => None,
        None => Some(storage::open(url, &opts)?),
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<Json> {
        let prober = probe.map(|to| {
            let stop = &stop;
            let secret = secret.to_string();
            scope.spawn(move || -> Result<(u64, Vec<f64>)> {
                let mut rpc = Rpc::connect(to)?;
                // Fresh samples, stamped from now on: new ids, in today's partition.
                let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
                let fresh = Fleet {
                    start_micros: now,
                    ..fleet
                };
                let rx = requests(fresh, secret, 0..1_000_000, batch);
                let mut waits = Vec::new();
                let mut stored = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((req, _)) = rx.recv() else { break };
                    let t0 = Instant::now();
                    rpc.send(&req)?;
                    stored += rpc.answer()?.stored;
                    waits.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                Ok((stored, waits))
            })
        });
        if prober.is_some() {
            std::thread::sleep(Duration::from_millis(500));
        }
        let t0 = Instant::now();
        let result = match (sqlite.as_mut(), other.as_mut()) {
            (Some(s), _) => s.clear_expired_metering_data(ttl),
            (None, Some(o)) => o.clear_expired_metering_data(ttl),
            (None, None) => bail!("no storage for {url}"),
        };
        let secs = t0.elapsed().as_secs_f64();
        let mut reclaim = None;
        if let (Some(st), Ok(_)) = (other.as_mut(), &result) {
            // Server drivers: the tables expired partitions were moved into (graves) are
            // dropped by the handle's reaper thread on a connection of its own (the daemon's
            // is nudged after its next batch), and on MariaDB the rows the expiry orphaned are
            // deleted there after them: woken here, then waited for by closing the handle,
            // while the probe goes on.
            let t1 = Instant::now();
            st.retention_step()?;
            drop(other.take());
            reclaim = Some(json!({"reaper": true, "seconds": t1.elapsed().as_secs_f64()}));
        }
        if let (Some(sq), Ok(_)) = (sqlite.as_mut(), &result) {
            let (t1, mut steps, mut rows, mut longest) = (Instant::now(), 0u64, 0u64, 0f64);
            let mut held = 0f64;
            // The longest step of each kind: row deletes, each index drop, the table drop.
            let mut kinds = serde_json::Map::new();
            while max_reclaim_steps.is_none_or(|m| steps < m) {
                let t = Instant::now();
                let Some(step) = sq.reclaim_step()? else {
                    break;
                };
                let ms = t.elapsed().as_secs_f64() * 1e3;
                longest = longest.max(ms);
                held += ms / 1e3;
                let kind = match (&step.index, step.dropped) {
                    (Some(ix), _) => format!("drop index {ix}"),
                    (None, true) => "drop table".to_string(),
                    (None, false) => "delete rows".to_string(),
                };
                let was = kinds.get(&kind).and_then(|v| v.as_f64()).unwrap_or(0.0);
                kinds.insert(kind, json!(was.max(ms)));
                steps += 1;
                rows += step.rows;
                // A worker takes its steps between its own batches, never two in a row while a
                // batch waits; this process stands in for it, so it lets go of the lock for a
                // moment after each step (back to back, it kept re-taking the lock before the
                // daemon's writer, polling every millisecond, could get it).
                if prober.is_some() {
                    std::thread::sleep(RECLAIM_PAUSE);
                }
            }
            reclaim = Some(json!({
                "steps": steps, "rows": rows, "max_step_ms": longest,
                "max_step_ms_by_kind": kinds,
                "seconds": t1.elapsed().as_secs_f64(),
                "steps_seconds": held,
            }));
        }
        if prober.is_some() {
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, Ordering::Relaxed);
        let expired = result?;
        let mut out = json!({"mode": "expire", "ttl": ttl, "expired": expired, "seconds": secs});
        if let Some(r) = reclaim {
            out["reclaim"] = r;
        }
        if let Some(p) = prober {
            match p.join() {
                Ok(Ok((stored, waits))) => {
                    let max = waits.iter().copied().fold(0.0, f64::max);
                    out["probe"] =
                        json!({"calls": waits.len(), "stored": stored, "max_wait_ms": max});
                }
                Ok(Err(e)) => out["probe_error"] = json!(format!("{e:#}")),
                Err(_) => out["probe_error"] = json!("probe thread panicked"),
            }
        }
        Ok(out)
    })
}

/// Options of the direct fill (`collector-load grow --direct URL`).
pub struct DirectOptions {
    pub url: String,
    pub fleet: Fleet,
    pub count: u64,
    pub batch: u64,
    pub windows: u64,
    pub secret: String,
    /// The store's partition span in seconds; the driver's default when `None`.
    pub partition_span: Option<u64>,
}

/// The fleet's samples `range` as typed batches of `batch`, built on a thread of their own.
fn sample_batches(
    fleet: Fleet,
    secret: String,
    range: std::ops::Range<u64>,
    batch: u64,
) -> mpsc::Receiver<Vec<meter::Sample>> {
    let (tx, rx) = mpsc::sync_channel(8);
    std::thread::spawn(move || {
        let mut i = range.start;
        while i < range.end {
            let end = (i + batch).min(range.end);
            let mut v = Vec::with_capacity((end - i) as usize);
            for k in i..end {
                match meter::Sample::from_value(fleet.sample(k, &secret)) {
                    Ok(s) => v.push(s),
                    Err(e) => {
                        eprintln!("grow --direct: sample {k}: {e}");
                        return;
                    }
                }
            }
            if tx.send(v).is_err() {
                return;
            }
            i = end;
        }
    });
    rx
}

/// The growth run without a daemon: the same samples in batches of `batch` straight through
/// `storage::open` + `record_metering_data` (one transaction each, as a worker writes them),
/// stored/s per window; for filling a big store quickly and for insert-rate experiments.
pub fn grow_direct(o: &DirectOptions) -> Result<Json> {
    let mut opts = storage::StorageOptions::default();
    if let Some(span) = o.partition_span {
        opts.partition_span_seconds = span;
    }
    let mut st = storage::open(&o.url, &opts)?;
    let rx = sample_batches(o.fleet, o.secret.clone(), 0..o.count, o.batch.max(1));
    let mut windows = Windows::new(o.count, o.windows, "grow --direct");
    let (mut done, mut dups) = (0u64, 0u64);
    let mut max_call = Duration::ZERO;
    let started = Instant::now();
    let mut gen_wait = Duration::ZERO;
    loop {
        let t = Instant::now();
        let Ok(batch) = rx.recv() else { break };
        gen_wait += t.elapsed();
        let t0 = Instant::now();
        let out = st.record_metering_data(&batch)?;
        max_call = max_call.max(t0.elapsed());
        let n = batch.len() as u64;
        done += n;
        dups += out.duplicates as u64;
        windows.add(done, n, out.stored as u64);
    }
    if done < o.count {
        bail!(
            "the sample generator stopped after {done} of {} samples",
            o.count
        );
    }
    Ok(json!({
        "mode": "grow_direct",
        "samples": o.count,
        "stored": windows.stored,
        "duplicates": dups,
        "error_answers": 0,
        "seconds": started.elapsed().as_secs_f64(),
        "generator_wait_s": gen_wait.as_secs_f64(),
        "max_call_wait_ms": max_call.as_secs_f64() * 1e3,
        "windows": windows.list,
        "start_micros": o.fleet.start_micros,
        "end_micros": o.fleet.timestamp(o.count.saturating_sub(1)),
    }))
}

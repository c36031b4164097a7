//! Watching a database for committed samples, and reading `recorded_at` back afterwards.
//!
//! The watcher is a thread that polls `SELECT id, message_id FROM sample WHERE id > ?` every few
//! milliseconds on its own connection. A row it sees for the first time was committed before
//! that poll began and after the previous one did, so "poll start − send time" is the sample's
//! send→committed latency, over-estimated by at most one poll interval. It works for any store
//! whose `sample` table has an increasing integer `id` and the `message_id` (the collector's
//! and scripts/peer.py's both do), and it costs the machine a few percent of one core.

use crate::samples::seq_of;
use crate::stats::now_ns;
use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the sender tells the watcher.
#[derive(Default)]
pub struct Progress {
    /// Samples handed to the kernel so far.
    pub sent: AtomicU64,
    /// The sender has finished.
    pub done: AtomicBool,
}

/// What the watcher saw.
pub struct Observed {
    /// Per sequence number: wall-clock ns of the first poll that saw it (0: never seen).
    pub seen_at: Vec<i64>,
    pub stored: u64,
    /// Wall-clock ns of the poll that saw the last new row.
    pub last_new_ns: i64,
    /// Rows whose message_id was not one of ours (should be 0).
    pub foreign: u64,
}

pub struct WatchOptions {
    pub db: PathBuf,
    pub interval: Duration,
    /// After the sender is done, stop when no new row appeared for this long.
    pub settle: Duration,
    /// Give up this long after the sender is done.
    pub limit: Duration,
    /// The first sequence number sent (`--skip`): sequence number `first + i` is the `i`th.
    pub first: u64,
}

fn open(db: &Path) -> Result<Connection> {
    // Not read-only: a WAL reader needs to write the -shm index; it never writes the database.
    let c = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("open {}", db.display()))?;
    c.busy_timeout(Duration::from_secs(5))?;
    Ok(c)
}

/// Start watching; `expected` is the number of sequence numbers in play.
pub fn spawn(
    opts: WatchOptions,
    expected: usize,
    progress: Arc<Progress>,
) -> std::thread::JoinHandle<Result<Observed>> {
    std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || run(opts, expected, &progress))
        .expect("spawn watcher thread")
}

fn run(opts: WatchOptions, expected: usize, progress: &Progress) -> Result<Observed> {
    let conn = open(&opts.db)?;
    let mut stmt = conn.prepare("SELECT id, message_id FROM sample WHERE id > ?1 ORDER BY id")?;
    let mut obs = Observed {
        seen_at: vec![0; expected],
        stored: 0,
        last_new_ns: 0,
        foreign: 0,
    };
    let mut last_id: i64 = 0;
    let mut done_at: Option<i64> = None;
    loop {
        let t = now_ns();
        let mut rows = stmt.query([last_id])?;
        while let Some(row) = rows.next()? {
            last_id = row.get(0)?;
            let id: String = row.get(1)?;
            match seq_of(&id)
                .and_then(|s| s.checked_sub(opts.first))
                .map(|s| s as usize)
            {
                Some(s) if s < expected && obs.seen_at[s] == 0 => {
                    obs.seen_at[s] = t;
                    obs.stored += 1;
                    obs.last_new_ns = t;
                }
                _ => obs.foreign += 1,
            }
        }
        drop(rows);
        if progress.done.load(Ordering::Acquire) {
            let done = *done_at.get_or_insert(t);
            let sent = progress.sent.load(Ordering::Acquire);
            let quiet = t - obs.last_new_ns.max(done) > opts.settle.as_nanos() as i64;
            let over = t - done > opts.limit.as_nanos() as i64;
            if obs.stored >= sent || quiet || over {
                return Ok(obs);
            }
        }
        std::thread::sleep(opts.interval);
    }
}

/// `recorded_at` (µs, stamped by the collector's SQLite driver when it starts writing a batch)
/// minus the send time, in ns, for every stored sample we have a send time for.
///
/// `send_ns[i]` is the send time of sequence number `first + i`.
pub fn recorded_latencies(db: &Path, send_ns: &[i64], first: u64) -> Result<Vec<i64>> {
    let conn = open(db)?;
    let mut stmt = conn.prepare("SELECT message_id, recorded_at FROM sample")?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::with_capacity(send_ns.len());
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let recorded: i64 = row.get(1)?;
        let at = seq_of(&id).and_then(|s| s.checked_sub(first));
        if let Some(&sent) = at.and_then(|s| send_ns.get(s as usize)) {
            if sent > 0 {
                out.push(recorded * 1_000 - sent);
            }
        }
    }
    Ok(out)
}

/// Send times written by `udp --sends-out`: (u64 seq, i64 ns) little-endian pairs.
///
/// `send_ns[i]` is the send time of sequence number `first + i`.
pub fn save_sends(path: &Path, send_ns: &[i64], first: u64) -> Result<()> {
    let mut out = Vec::with_capacity(send_ns.len() * 16);
    for (i, &t) in send_ns.iter().enumerate() {
        if t > 0 {
            out.extend_from_slice(&(first + i as u64).to_le_bytes());
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    std::fs::write(path, out).with_context(|| format!("write {}", path.display()))
}

/// Read [`save_sends`]'s file back as a table indexed by sequence number.
pub fn load_sends(path: &Path) -> Result<Vec<i64>> {
    let raw = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let mut table = Vec::new();
    for pair in raw.chunks_exact(16) {
        let seq = u64::from_le_bytes(pair[..8].try_into()?) as usize;
        let t = i64::from_le_bytes(pair[8..].try_into()?);
        if seq >= table.len() {
            table.resize(seq + 1, 0);
        }
        table[seq] = t;
    }
    Ok(table)
}

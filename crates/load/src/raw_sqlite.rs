//! The raw SQLite limit: the same samples' rows inserted with bare rusqlite, no collector.
//!
//! Before the clock starts the samples are decoded, their timestamps parsed and their meters
//! and resources numbered (as the collector's normalized schema stores them: integer
//! `meter_id` and `resource_id`). What is timed is one prepared `INSERT` per row into one table
//! shaped like the collector's `sample`, 1,000 rows per transaction, WAL, `synchronous =
//! NORMAL` (the collector's defaults). The bare figure (integer primary key only) is the limit
//! the benchmark compares against; `indexed` adds the four indexes the collector's `sample`
//! table carries (unique message_id, meter+time, resource+time, time) to show what they cost.

use crate::samples::Payloads;
use anyhow::{Context, Result};
use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

struct Row {
    meter: i64,
    resource: i64,
    volume: f64,
    timestamp: i64,
    message_id: String,
    signature: Option<String>,
}

pub struct RawSqlite {
    pub rows: u64,
    pub seconds: f64,
}

pub fn run(
    db: &Path,
    payloads: &Payloads,
    count: usize,
    per_tx: usize,
    indexed: bool,
) -> Result<RawSqlite> {
    let mut rows = Vec::with_capacity(count);
    let mut meters: HashMap<String, i64> = HashMap::new();
    let mut resources: HashMap<String, i64> = HashMap::new();
    let number = |map: &mut HashMap<String, i64>, key: String| -> i64 {
        let next = map.len() as i64 + 1;
        *map.entry(key).or_insert(next)
    };
    for i in 0..count {
        let v = meter::decode_value(payloads.get(i)).with_context(|| format!("sample {i}"))?;
        let s = meter::Sample::from_value(v).with_context(|| format!("sample {i}"))?;
        let ts = meter::parse_timestamp(&s.timestamp)?;
        rows.push(Row {
            meter: number(&mut meters, s.counter_name),
            resource: number(&mut resources, s.resource_id),
            volume: s.counter_volume.as_f64(),
            timestamp: (ts.unix_timestamp_nanos() / 1000) as i64,
            message_id: s.message_id,
            signature: s.message_signature,
        });
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let mut conn = Connection::open(db).with_context(|| format!("open {}", db.display()))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE sample (
            id INTEGER PRIMARY KEY, meter_id INTEGER NOT NULL, resource_id INTEGER NOT NULL,
            volume REAL NOT NULL, timestamp INTEGER NOT NULL, recorded_at INTEGER NOT NULL,
            message_id TEXT NOT NULL, message_signature TEXT)",
    )?;
    if indexed {
        conn.execute_batch(
            "CREATE UNIQUE INDEX ix_message_id ON sample (message_id);
             CREATE INDEX ix_meter_ts ON sample (meter_id, timestamp);
             CREATE INDEX ix_resource_ts ON sample (resource_id, timestamp);
             CREATE INDEX ix_ts ON sample (timestamp);",
        )?;
    }
    let recorded_at = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
    let start = Instant::now();
    for chunk in rows.chunks(per_tx.max(1)) {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO sample (meter_id, resource_id, volume, timestamp, recorded_at, message_id, message_signature)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for r in chunk {
                insert.execute(params![
                    r.meter,
                    r.resource,
                    r.volume,
                    r.timestamp,
                    recorded_at,
                    r.message_id,
                    r.signature
                ])?;
            }
        }
        tx.commit()?;
    }
    Ok(RawSqlite {
        rows: rows.len() as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

//! The raw SQLite limit: the same samples' rows inserted with bare rusqlite, no collector.
//!
//! Before the clock starts the samples are decoded, their timestamps parsed and their meters
//! and resources numbered (as the collector's normalized schema stores them: integer
//! `meter_id` and `resource_id`). What is timed is one prepared `INSERT` per row into one table
//! shaped like the collector's `sample`, 1,000 rows per transaction, WAL, `synchronous =
//! NORMAL` (the collector's defaults). The bare figure (integer primary key only) is the limit
//! the benchmark compares against; `indexed` stores the rows as the collector's SQLite chunk
//! tables do (the id kept only as its time-ordered key, `storage::msgkey::StoredKey`, unique;
//! meter+time and resource+time indexed) to show what those indexes cost on their own: no
//! resource lookups, no rollups.

use crate::samples::Payloads;
use anyhow::{Context, Result};
use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use storage::msgkey::StoredKey;

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
            message_id TEXT, message_signature TEXT, message_key BLOB)",
    )?;
    if indexed {
        conn.execute_batch(
            "CREATE UNIQUE INDEX ix_message_key ON sample (message_key);
             CREATE INDEX ix_meter_ts ON sample (meter_id, timestamp);
             CREATE INDEX ix_resource_ts ON sample (resource_id, timestamp);",
        )?;
    }
    let recorded_at = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
    let start = Instant::now();
    for chunk in rows.chunks(per_tx.max(1)) {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO sample (meter_id, resource_id, volume, timestamp, recorded_at, message_id, message_signature, message_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for r in chunk {
                // The collector keeps the id in its key column only (`message_id` NULL).
                let (id, key) = if indexed {
                    (None, Some(StoredKey::of(&r.message_id)))
                } else {
                    (Some(&r.message_id), None)
                };
                insert.execute(params![
                    r.meter,
                    r.resource,
                    r.volume,
                    r.timestamp,
                    recorded_at,
                    id,
                    r.signature,
                    key
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The indexed variant stores what the collector's chunk tables store: the id only as its
    /// key (`StoredKey`: the bench's ids are not uuid1, so their key is the text), unique, and
    /// the two time indexes.
    #[test]
    fn indexed_rows_are_laid_out_as_the_collector_s_chunks() {
        let dir = std::env::temp_dir().join(format!("raw-sqlite-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Payloads::generate(50, "k");
        let ids: Vec<String> = (0..50)
            .map(|i| meter::Sample::decode(p.get(i)).unwrap().message_id)
            .collect();
        for indexed in [false, true] {
            let db = dir.join(format!("raw-{indexed}.db"));
            let r = run(&db, &p, 50, 20, indexed).unwrap();
            assert_eq!(r.rows, 50);
            let conn = Connection::open(&db).unwrap();
            let stored: Vec<(Option<String>, Option<String>)> = conn
                .prepare("SELECT message_id, message_key FROM sample ORDER BY id")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let expected: Vec<(Option<String>, Option<String>)> = ids
                .iter()
                .map(|id| {
                    let key = match StoredKey::of(id) {
                        StoredKey::Text(t) => t.to_owned(),
                        StoredKey::Uuid1(_) => unreachable!("the bench's ids are not uuid1"),
                    };
                    if indexed {
                        (None, Some(key))
                    } else {
                        (Some(id.clone()), None)
                    }
                })
                .collect();
            assert_eq!(stored, expected);
            let mut indexes: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            indexes.sort();
            let expected: &[&str] = if indexed {
                &["ix_message_key", "ix_meter_ts", "ix_resource_ts"]
            } else {
                &[]
            };
            assert_eq!(indexes, expected);
            if indexed {
                // Unique on the key: the same id again is refused.
                let dup = conn.execute(
                    "INSERT INTO sample (meter_id, resource_id, volume, timestamp, recorded_at,
                                         message_key)
                     SELECT meter_id, resource_id, volume, timestamp, recorded_at, message_key
                       FROM sample LIMIT 1",
                    [],
                );
                assert!(dup.is_err());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

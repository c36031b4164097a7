//! Insert throughput: the SQLite driver against a bare rusqlite insert of the same rows.
//!
//! Both write batches of 1000 realistic samples (nested metadata, 10 resources, 5 meters)
//! into a fresh WAL file with `synchronous = NORMAL`, one transaction per batch:
//!
//! - `driver`: `Storage::record_metering_data`, everything included (timestamp parsing,
//!   canonical metadata JSON, cache lookups, normalized schema with its indexes and the
//!   `UNIQUE (message_id)` idempotence check).
//! - `raw`: one prepared `INSERT` per sample into an index-free, denormalized table holding the
//!   same values, converted beforehand (timestamp and metadata JSON are not part of the timing).
//!   That is the floor SQLite sets, not a competing design.
//!
//! After criterion's two measurements, the same two writers run interleaved batch by batch,
//! so both see the same machine load; that pass prints the ratio. On a shared machine the two
//! separate criterion figures can drift apart by more than the difference being measured.
//!
//! Run: `cargo bench -p storage --bench insert -- --measurement-time 5`.

mod common;

use common::{batch, metadata, BATCH};
use criterion::{BatchSize, Criterion, Throughput};
use meter::{Sample, Value};
use rusqlite::{params, Connection};
use std::cell::Cell;
use std::time::Duration;
use storage::StorageOptions;

/// One row of the raw table: the same values, converted ahead of time.
struct RawRow {
    name: String,
    kind: &'static str,
    unit: String,
    resource_id: String,
    user_id: Option<String>,
    project_id: Option<String>,
    source: String,
    metadata: String,
    volume: f64,
    timestamp: i64,
    message_id: String,
    signature: Option<String>,
}

fn raw_rows(samples: Vec<Sample>) -> Vec<RawRow> {
    samples
        .into_iter()
        .map(|smp| RawRow {
            name: smp.counter_name,
            kind: smp.counter_type.as_str(),
            unit: smp.counter_unit,
            resource_id: smp.resource_id,
            user_id: smp.user_id,
            project_id: smp.project_id,
            source: smp.source,
            metadata: serde_json::to_string(&storage::json::Json::canonical(
                &smp.resource_metadata.value(),
            ))
            .expect("metadata serializes"),
            volume: smp.counter_volume.as_f64(),
            timestamp: (meter::parse_timestamp(&smp.timestamp)
                .expect("bench timestamps parse")
                .unix_timestamp_nanos()
                / 1000) as i64,
            message_id: smp.message_id,
            signature: smp.message_signature,
        })
        .collect()
}

fn raw_table(path: &std::path::Path) -> Connection {
    let raw = Connection::open(path).expect("open raw");
    raw.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE raw (name TEXT, type TEXT, unit TEXT, resource_id TEXT, user_id TEXT,
             project_id TEXT, source TEXT, metadata TEXT, volume REAL, timestamp INTEGER,
             recorded_at INTEGER, message_id TEXT, signature TEXT);",
    )
    .expect("raw schema");
    raw
}

fn raw_insert(raw: &mut Connection, rows: &[RawRow]) {
    let tx = raw.transaction().expect("begin");
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO raw VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .expect("prepare");
        for r in rows {
            stmt.execute(params![
                r.name,
                r.kind,
                r.unit,
                r.resource_id,
                r.user_id,
                r.project_id,
                r.source,
                r.metadata,
                r.volume,
                r.timestamp,
                r.timestamp,
                r.message_id,
                r.signature
            ])
            .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

fn open_driver(path: &std::path::Path) -> Box<dyn storage::Storage> {
    storage::open(
        &format!("sqlite:///{}", path.display()),
        &StorageOptions::default(),
    )
    .expect("open driver")
}

/// Driver and raw alternately, batch by batch, each into its own fresh file.
fn interleaved(batches: usize) {
    let resources: Vec<Value> = (0..10).map(metadata).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open_driver(&dir.path().join("driver.db"));
    let mut raw = raw_table(&dir.path().join("raw.db"));
    let (mut driver_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
    for n in 0..batches {
        let samples = batch(n, &resources);
        let rows = raw_rows(samples.clone());
        let t = std::time::Instant::now();
        let out = store.record_metering_data(&samples).expect("driver insert");
        driver_time += t.elapsed();
        assert_eq!(out.stored, BATCH);
        let t = std::time::Instant::now();
        raw_insert(&mut raw, &rows);
        raw_time += t.elapsed();
    }
    let rate = |d: Duration| (batches * BATCH) as f64 / d.as_secs_f64();
    println!(
        "interleaved, {batches} batches of {BATCH}: driver {:.0} rows/s, raw {:.0} rows/s, driver/raw = {:.0} %",
        rate(driver_time),
        rate(raw_time),
        100.0 * raw_time.as_secs_f64() / driver_time.as_secs_f64()
    );
}

fn bench(c: &mut Criterion) {
    let resources: Vec<Value> = (0..10).map(metadata).collect();
    let mut group = c.benchmark_group("insert_1000");
    group.throughput(Throughput::Elements(BATCH as u64));

    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open_driver(&dir.path().join("driver.db"));
    let next = Cell::new(0usize);
    group.bench_function("driver", |b| {
        b.iter_batched(
            || {
                let n = next.get();
                next.set(n + 1);
                batch(n, &resources)
            },
            |samples| {
                let out = store.record_metering_data(&samples).expect("driver insert");
                assert_eq!(out.stored, BATCH);
            },
            BatchSize::PerIteration,
        )
    });

    let mut raw = raw_table(&dir.path().join("raw.db"));
    let next = Cell::new(0usize);
    group.bench_function("raw", |b| {
        b.iter_batched(
            || {
                let n = next.get();
                next.set(n + 1);
                raw_rows(batch(n, &resources))
            },
            |rows| raw_insert(&mut raw, &rows),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    interleaved(300);
}

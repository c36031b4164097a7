//! Insert throughput of the server drivers against the best bulk path of each server, from one
//! process, in the same run.
//!
//! For PostgreSQL and for MariaDB/MySQL (each skipped, with a message, when its server does not
//! answer), batches of 1000 realistic samples (the generator of `benches/insert.rs`: nested
//! metadata, 10 resources, 5 meters) go
//!
//! - `driver`: through `Storage::record_metering_data` into a fresh database: everything
//!   included (timestamp parsing, cache lookups, the normalized schema with its indexes and the
//!   `UNIQUE (message_id)` check, exact duplicate accounting);
//! - `raw`: the same values, converted beforehand, into an index-free denormalized table in the
//!   same database by the server's fastest bulk path — binary `COPY` for PostgreSQL, one
//!   1000-row prepared `INSERT` for MariaDB — one transaction per batch.
//!
//! Criterion measures each; then both run interleaved batch by batch (same load) and the pass
//! prints rows/s and the driver/raw ratio. Servers: `COLLECTOR_TEST_POSTGRES` (default
//! `postgresql://postgres@127.0.0.1:5432`), `COLLECTOR_TEST_MYSQL` (default
//! `mysql://root@127.0.0.1:3306`). Run: `cargo bench -p storage --bench server`.

mod common;

use common::{batch, metadata, BATCH};
use criterion::{BatchSize, Criterion, Throughput};
use meter::{Sample, Value};
use mysql::prelude::Queryable;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use std::cell::Cell;
use std::time::{Duration, Instant};
use storage::{Storage, StorageOptions};
use time::OffsetDateTime;

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
    timestamp: OffsetDateTime,
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
            timestamp: meter::parse_timestamp(&smp.timestamp).expect("bench timestamps parse"),
            message_id: smp.message_id,
            signature: smp.message_signature,
        })
        .collect()
}

const DB: &str = "collector_bench";

/// One server's two writers.
trait Raw {
    fn insert(&mut self, rows: &[RawRow]);
}

struct PgRaw(postgres::Client);

impl Raw for PgRaw {
    fn insert(&mut self, rows: &[RawRow]) {
        let mut tx = self.0.transaction().expect("begin");
        let writer = tx
            .copy_in("COPY raw FROM STDIN (FORMAT binary)")
            .expect("copy in");
        let types = [
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::FLOAT8,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TEXT,
        ];
        let mut w = BinaryCopyInWriter::new(writer, &types);
        for r in rows {
            w.write(&[
                &r.name,
                &r.kind,
                &r.unit,
                &r.resource_id,
                &r.user_id,
                &r.project_id,
                &r.source,
                &r.metadata,
                &r.volume,
                &r.timestamp,
                &r.timestamp,
                &r.message_id,
                &r.signature,
            ])
            .expect("copy row");
        }
        w.finish().expect("copy finish");
        tx.commit().expect("commit");
    }
}

struct MyRaw(mysql::Conn, String);

fn my_date(t: OffsetDateTime) -> mysql::Value {
    mysql::Value::Date(
        t.year() as u16,
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond(),
    )
}

impl Raw for MyRaw {
    fn insert(&mut self, rows: &[RawRow]) {
        if self.1.is_empty() {
            let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; rows.len()].join(", ");
            self.1 = format!("INSERT INTO raw VALUES {values}");
        }
        let mut params = Vec::with_capacity(rows.len() * 13);
        for r in rows {
            let opt =
                |v: &Option<String>| v.as_deref().map_or(mysql::Value::NULL, mysql::Value::from);
            params.extend([
                mysql::Value::from(r.name.as_str()),
                mysql::Value::from(r.kind),
                mysql::Value::from(r.unit.as_str()),
                mysql::Value::from(r.resource_id.as_str()),
                opt(&r.user_id),
                opt(&r.project_id),
                mysql::Value::from(r.source.as_str()),
                mysql::Value::from(r.metadata.as_str()),
                mysql::Value::Double(r.volume),
                my_date(r.timestamp),
                my_date(r.timestamp),
                mysql::Value::from(r.message_id.as_str()),
                opt(&r.signature),
            ]);
        }
        self.0.query_drop("START TRANSACTION").expect("begin");
        self.0
            .exec_drop(&self.1, mysql::Params::Positional(params))
            .expect("insert");
        self.0.query_drop("COMMIT").expect("commit");
    }
}

/// Server, base URL (`user@host:port`), and how to make a fresh bench database.
struct Server {
    name: &'static str,
    driver_url: String,
    open_raw: fn(&str) -> Box<dyn Raw>,
    base: String,
}

fn base(var: &str, default: &str) -> String {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_string());
    url.split_once("://")
        .map(|(_, r)| r.trim_end_matches('/').to_string())
        .unwrap_or(url)
}

/// Recreate the bench database and its raw table; `None` (with a message) if the server is down.
fn prepare(name: &'static str) -> Option<Server> {
    match name {
        "postgresql" => {
            let base = base(
                "COLLECTOR_TEST_POSTGRES",
                "postgresql://postgres@127.0.0.1:5432",
            );
            let mut admin = match postgres::Client::connect(
                &format!("postgresql://{base}/postgres"),
                postgres::NoTls,
            ) {
                Ok(c) => c,
                Err(e) => {
                    println!("skipping PostgreSQL: not reachable at {base}: {e}");
                    return None;
                }
            };
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)"))
                .expect("drop bench db");
            admin
                .batch_execute(&format!("CREATE DATABASE {DB}"))
                .expect("create bench db");
            Some(Server {
                name: "postgresql",
                driver_url: format!("postgresql://{base}/{DB}"),
                base,
                open_raw: |base| {
                    let mut c = postgres::Client::connect(
                        &format!("postgresql://{base}/{DB}"),
                        postgres::NoTls,
                    )
                    .expect("raw connect");
                    c.batch_execute(
                        "DROP TABLE IF EXISTS raw;
                         CREATE TABLE raw (name TEXT, type TEXT, unit TEXT, resource_id TEXT,
                             user_id TEXT, project_id TEXT, source TEXT, metadata TEXT,
                             volume DOUBLE PRECISION, timestamp TIMESTAMPTZ,
                             recorded_at TIMESTAMPTZ, message_id TEXT, signature TEXT)",
                    )
                    .expect("raw table");
                    Box::new(PgRaw(c))
                },
            })
        }
        _ => {
            let base = base("COLLECTOR_TEST_MYSQL", "mysql://root@127.0.0.1:3306");
            let opts = mysql::OptsBuilder::from_opts(
                mysql::Opts::from_url(&format!("mysql://{base}/")).expect("url"),
            )
            .prefer_socket(false);
            let mut admin = match mysql::Conn::new(opts) {
                Ok(c) => c,
                Err(e) => {
                    println!("skipping MariaDB/MySQL: not reachable at {base}: {e}");
                    return None;
                }
            };
            admin
                .query_drop(format!("DROP DATABASE IF EXISTS {DB}"))
                .expect("drop bench db");
            admin
                .query_drop(format!("CREATE DATABASE {DB}"))
                .expect("create bench db");
            Some(Server {
                name: "mariadb",
                driver_url: format!("mysql://{base}/{DB}"),
                base,
                open_raw: |base| {
                    let opts = mysql::OptsBuilder::from_opts(
                        mysql::Opts::from_url(&format!("mysql://{base}/{DB}")).expect("url"),
                    )
                    .prefer_socket(false);
                    let mut c = mysql::Conn::new(opts).expect("raw connect");
                    c.query_drop("DROP TABLE IF EXISTS raw").expect("drop raw");
                    c.query_drop(
                        "CREATE TABLE raw (name VARCHAR(255), type VARCHAR(16), unit VARCHAR(255),
                             resource_id VARCHAR(255), user_id VARCHAR(255),
                             project_id VARCHAR(255), source VARCHAR(255), metadata LONGTEXT,
                             volume DOUBLE, timestamp DATETIME(6), recorded_at DATETIME(6),
                             message_id VARCHAR(255), signature TEXT)
                         ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
                    )
                    .expect("raw table");
                    Box::new(MyRaw(c, String::new()))
                },
            })
        }
    }
}

fn open_driver(url: &str) -> Box<dyn Storage> {
    storage::open(url, &StorageOptions::default()).expect("open driver")
}

/// Driver and raw alternately, batch by batch, from batch number `first` on.
fn interleaved(server: &Server, first: usize, batches: usize) {
    let resources: Vec<Value> = (0..10).map(metadata).collect();
    let mut store = open_driver(&server.driver_url);
    let mut raw = (server.open_raw)(&server.base);
    let (mut driver_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
    for n in first..first + batches {
        let samples = batch(n, &resources);
        let rows = raw_rows(samples.clone());
        let t = Instant::now();
        let out = store.record_metering_data(&samples).expect("driver insert");
        driver_time += t.elapsed();
        assert_eq!(out.stored, BATCH);
        let t = Instant::now();
        raw.insert(&rows);
        raw_time += t.elapsed();
    }
    let rate = |d: Duration| (batches * BATCH) as f64 / d.as_secs_f64();
    println!(
        "{}: interleaved, {batches} batches of {BATCH}: driver {:.0} rows/s, raw {:.0} rows/s, driver/raw = {:.0} %",
        server.name,
        rate(driver_time),
        rate(raw_time),
        100.0 * raw_time.as_secs_f64() / driver_time.as_secs_f64()
    );
}

fn bench(c: &mut Criterion, server: &Server) -> usize {
    let resources: Vec<Value> = (0..10).map(metadata).collect();
    let mut group = c.benchmark_group(format!("{}_insert_1000", server.name));
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut store = open_driver(&server.driver_url);
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
    let driver_batches = next.get();
    let mut raw = (server.open_raw)(&server.base);
    let next_raw = Cell::new(0usize);
    group.bench_function("raw", |b| {
        b.iter_batched(
            || {
                let n = next_raw.get();
                next_raw.set(n + 1);
                raw_rows(batch(n, &resources))
            },
            |rows| raw.insert(&rows),
            BatchSize::PerIteration,
        )
    });
    group.finish();
    driver_batches
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let interleaved_batches: usize = std::env::var("BENCH_INTERLEAVED_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for name in ["postgresql", "mariadb"] {
        let Some(server) = prepare(name) else {
            continue;
        };
        let used = bench(&mut c, &server);
        // Fresh ids after criterion's: the interleaved pass writes new samples.
        interleaved(&server, used + 1, interleaved_batches);
    }
    c.final_summary();
}

//! The raw server limits: the same samples' rows written by the server's best bulk path from one
//! process, no collector (the idea of `crates/storage/benches/server.rs`, on the bench's samples).
//!
//! Before the clock starts the samples are decoded and converted (timestamps parsed, metadata
//! serialized to JSON text). What is timed is, per transaction of `per_tx` rows (1,000, the
//! collector's `batch_size`), one binary `COPY ... FROM STDIN` for PostgreSQL or one multi-row
//! prepared `INSERT` for MariaDB/MySQL, into a bare table `raw` (no index, no key) that the run
//! creates in the database the URL names (replacing any table of that name).

use crate::json::to_json;
use crate::samples::Payloads;
use anyhow::{bail, Context, Result};
use mysql::prelude::Queryable;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use std::time::Instant;
use time::OffsetDateTime;

struct Row {
    name: String,
    kind: String,
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

pub struct RawServer {
    pub server: &'static str,
    pub rows: u64,
    pub seconds: f64,
}

fn rows(payloads: &Payloads, count: usize) -> Result<Vec<Row>> {
    (0..count)
        .map(|i| {
            let v = meter::decode_value(payloads.get(i)).with_context(|| format!("sample {i}"))?;
            let s = meter::Sample::from_value(v).with_context(|| format!("sample {i}"))?;
            Ok(Row {
                timestamp: meter::parse_timestamp(&s.timestamp)?,
                metadata: to_json(&s.resource_metadata.value())?.to_string(),
                name: s.counter_name,
                kind: s.counter_type.as_str().to_string(),
                unit: s.counter_unit,
                resource_id: s.resource_id,
                user_id: s.user_id,
                project_id: s.project_id,
                source: s.source,
                volume: s.counter_volume.as_f64(),
                message_id: s.message_id,
                signature: s.message_signature,
            })
        })
        .collect()
}

pub fn run(url: &str, payloads: &Payloads, count: usize, per_tx: usize) -> Result<RawServer> {
    let rows = rows(payloads, count)?;
    let per_tx = per_tx.max(1);
    let (server, seconds) = if url.starts_with("postgres") {
        ("postgresql", postgres_run(url, &rows, per_tx)?)
    } else if url.starts_with("mysql") || url.starts_with("mariadb") {
        ("mariadb", mysql_run(url, &rows, per_tx)?)
    } else {
        bail!("{url}: neither postgresql:// nor mysql://");
    };
    Ok(RawServer {
        server,
        rows: rows.len() as u64,
        seconds,
    })
}

fn postgres_run(url: &str, rows: &[Row], per_tx: usize) -> Result<f64> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).with_context(|| url.to_string())?;
    c.batch_execute(
        "DROP TABLE IF EXISTS raw;
         CREATE TABLE raw (name TEXT, type TEXT, unit TEXT, resource_id TEXT,
             user_id TEXT, project_id TEXT, source TEXT, metadata TEXT,
             volume DOUBLE PRECISION, timestamp TIMESTAMPTZ,
             recorded_at TIMESTAMPTZ, message_id TEXT, signature TEXT)",
    )?;
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
    let recorded_at = OffsetDateTime::now_utc();
    let start = Instant::now();
    for chunk in rows.chunks(per_tx) {
        let mut tx = c.transaction()?;
        let writer = tx.copy_in("COPY raw FROM STDIN (FORMAT binary)")?;
        let mut w = BinaryCopyInWriter::new(writer, &types);
        for r in chunk {
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
                &recorded_at,
                &r.message_id,
                &r.signature,
            ])?;
        }
        w.finish()?;
        tx.commit()?;
    }
    let secs = start.elapsed().as_secs_f64();
    c.batch_execute("DROP TABLE raw")?;
    Ok(secs)
}

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

fn mysql_run(url: &str, rows: &[Row], per_tx: usize) -> Result<f64> {
    let url = url.replacen("mariadb://", "mysql://", 1);
    let opts = mysql::OptsBuilder::from_opts(mysql::Opts::from_url(&url)?).prefer_socket(false);
    let mut c = mysql::Conn::new(opts).with_context(|| url.clone())?;
    c.query_drop("DROP TABLE IF EXISTS raw")?;
    c.query_drop(
        "CREATE TABLE raw (name VARCHAR(255), type VARCHAR(16), unit VARCHAR(255),
             resource_id VARCHAR(255), user_id VARCHAR(255),
             project_id VARCHAR(255), source VARCHAR(255), metadata LONGTEXT,
             volume DOUBLE, timestamp DATETIME(6), recorded_at DATETIME(6),
             message_id VARCHAR(255), signature TEXT)
         ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    )?;
    let recorded_at = my_date(OffsetDateTime::now_utc());
    let opt = |v: &Option<String>| v.as_deref().map_or(mysql::Value::NULL, mysql::Value::from);
    let start = Instant::now();
    let mut prepared: Option<(usize, mysql::Statement)> = None;
    for chunk in rows.chunks(per_tx) {
        let stmt = match &prepared {
            Some((n, st)) if *n == chunk.len() => st.clone(),
            _ => {
                let values =
                    vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
                let st = c.prep(format!("INSERT INTO raw VALUES {values}"))?;
                prepared = Some((chunk.len(), st.clone()));
                st
            }
        };
        let mut params = Vec::with_capacity(chunk.len() * 13);
        for r in chunk {
            params.extend([
                mysql::Value::from(r.name.as_str()),
                mysql::Value::from(r.kind.as_str()),
                mysql::Value::from(r.unit.as_str()),
                mysql::Value::from(r.resource_id.as_str()),
                opt(&r.user_id),
                opt(&r.project_id),
                mysql::Value::from(r.source.as_str()),
                mysql::Value::from(r.metadata.as_str()),
                mysql::Value::Double(r.volume),
                my_date(r.timestamp),
                recorded_at.clone(),
                mysql::Value::from(r.message_id.as_str()),
                opt(&r.signature),
            ]);
        }
        c.query_drop("START TRANSACTION")?;
        c.exec_drop(&stmt, mysql::Params::Positional(params))?;
        c.query_drop("COMMIT")?;
    }
    let secs = start.elapsed().as_secs_f64();
    c.query_drop("DROP TABLE raw")?;
    Ok(secs)
}

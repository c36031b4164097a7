//! The read side of the SQLite driver: [`SampleFilter`] to SQL, and the four queries.
//!
//! Timestamps are integer microseconds, so range filters are integer comparisons on
//! `ix_sample_*_timestamp` and statistics periods are one `GROUP BY` on an integer division.

use crate::model::{counter_type_from_str, from_micros, to_micros};
use crate::{MeterInfo, ResourceInfo, SampleFilter, Statistics, StorageError, StoredSample};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params_from_iter, Connection, Row};
use time::OffsetDateTime;

/// Failure of a query: SQLite's (mapped by the driver) or a stored value we cannot read back.
pub enum QueryError {
    Sql(rusqlite::Error),
    Storage(StorageError),
}

impl From<rusqlite::Error> for QueryError {
    fn from(e: rusqlite::Error) -> Self {
        QueryError::Sql(e)
    }
}

type Result<T> = std::result::Result<T, QueryError>;

use crate::partition::Range;
use crate::rollup::{self, BucketRow, Granularity};
use crate::StatsSource;

use super::schema::NO_SAMPLES;

/// The chunk tables overlapping the filter's time range, oldest first.
fn partitions(conn: &Connection, filter: &SampleFilter) -> Result<Vec<Range>> {
    let mut stmt = conn.prepare_cached("SELECT lo, hi FROM sample_partition ORDER BY lo")?;
    let rows = stmt.query_map([], |r| {
        Ok(Range {
            lo: r.get(0)?,
            hi: r.get(1)?,
        })
    })?;
    let (start, end) = (filter.start.map(to_micros), filter.end.map(to_micros));
    let mut out = Vec::new();
    for r in rows {
        let r = r?;
        if r.overlaps(start, end) {
            out.push(r);
        }
    }
    Ok(out)
}

/// `FROM` the given chunks as one table `s`, joined with meter `m` and resource `r`.
fn from(parts: &[Range]) -> String {
    let union = if parts.is_empty() {
        NO_SAMPLES.to_string()
    } else {
        super::schema::union_all(parts.iter().map(|p| {
            format!(
                "SELECT {} FROM \"{}\"",
                super::schema::chunk_columns(),
                p.name("sample_")
            )
        }))
    };
    format!(
        " FROM ({union}) s
    JOIN meter m ON m.id = s.meter_id
    JOIN resource r ON r.internal_id = s.resource_id"
    )
}

/// `FROM` one chunk table as `s`, joined as [`from`] does. With a resource id in the filter
/// the join starts from its resource rows (`CROSS JOIN` fixes SQLite's join order): that
/// resource's samples through `(resource_id, timestamp)` are a few hundred a day, where the
/// planner's own choice walked every sample of the meter (`EXPLAIN QUERY PLAN`).
fn from_one(part: &Range, filter: &SampleFilter) -> String {
    let name = part.name("sample_");
    if filter.resource_id.is_some() {
        format!(
            " FROM resource r CROSS JOIN \"{name}\" s ON s.resource_id = r.internal_id
    JOIN meter m ON m.id = s.meter_id"
        )
    } else {
        format!(
            " FROM \"{name}\" s
    JOIN meter m ON m.id = s.meter_id
    JOIN resource r ON r.internal_id = s.resource_id"
        )
    }
}

/// A `WHERE` clause and its parameters, in textual order.
struct Where {
    sql: String,
    params: Vec<SqlValue>,
}

impl Where {
    fn new(filter: &SampleFilter) -> Where {
        let mut w = Where {
            sql: String::from(" WHERE 1 = 1"),
            params: Vec::new(),
        };
        for (column, v) in filter.column_equalities() {
            w.sql.push_str(&format!(" AND {column} = ?"));
            w.params.push(SqlValue::Text(v.to_string()));
        }
        if filter.meter.is_none() && (filter.start.is_some() || filter.end.is_some()) {
            // There is no index on timestamp alone: walk (meter_id, timestamp) per meter.
            w.sql.push_str(" AND s.meter_id IN (SELECT id FROM meter)");
        }
        if let Some(start) = filter.start {
            w.push(" AND s.timestamp >= ?", SqlValue::Integer(to_micros(start)));
        }
        if let Some(end) = filter.end {
            w.push(" AND s.timestamp < ?", SqlValue::Integer(to_micros(end)));
        }
        for (key, value) in &filter.metadata {
            w.sql.push_str(
                " AND s.resource_id IN (SELECT md.id FROM metadata md
                    WHERE md.meta_key = ? AND (md.value = ? OR md.value = ?))",
            );
            w.params.push(SqlValue::Text(key.clone()));
            w.params.push(SqlValue::Text(value.clone()));
            w.params.push(typed_metadata_value(value));
        }
        w
    }

    fn push(&mut self, sql: &str, param: SqlValue) {
        self.sql.push_str(sql);
        self.params.push(param);
    }
}

/// The number or boolean a metadata filter's text stands for, as stored in `metadata.value`
/// (booleans are 0/1); NULL (matches nothing) when it is neither.
fn typed_metadata_value(text: &str) -> SqlValue {
    let t = text.trim();
    if let Ok(i) = t.parse::<i64>() {
        return SqlValue::Integer(i);
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() => return SqlValue::Real(f),
        _ => {}
    }
    if t.eq_ignore_ascii_case("true") {
        SqlValue::Integer(1)
    } else if t.eq_ignore_ascii_case("false") {
        SqlValue::Integer(0)
    } else {
        SqlValue::Null
    }
}

fn limit(filter: &SampleFilter) -> i64 {
    filter
        .limit
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX))
}

fn corrupt(what: impl Into<String>) -> QueryError {
    QueryError::Storage(StorageError::Database(what.into()))
}

fn time_at(us: i64) -> Result<OffsetDateTime> {
    from_micros(us).ok_or_else(|| corrupt(format!("timestamp {us} µs out of range")))
}

fn json_at(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| corrupt(format!("stored metadata is not JSON: {e}")))
}

fn counter_type_at(text: &str) -> Result<meter::CounterType> {
    counter_type_from_str(text)
        .ok_or_else(|| corrupt(format!("unknown stored counter type {text:?}")))
}

/// Newest first: chunk by chunk from the newest, each chunk's rows through its own indexes,
/// until the limit is reached (chunks do not overlap in time, so the order holds).
pub fn samples(conn: &Connection, filter: &SampleFilter) -> Result<Vec<StoredSample>> {
    let w = Where::new(filter);
    let mut out = Vec::new();
    let want = filter.limit;
    for part in partitions(conn, filter)?.iter().rev() {
        let left = match want {
            Some(n) if out.len() >= n => break,
            Some(n) => i64::try_from(n - out.len()).unwrap_or(i64::MAX),
            None => -1,
        };
        let sql = format!(
            "SELECT r.source_id, m.name, m.type, m.unit, s.volume, r.user_id, r.project_id,
                    r.resource_id, s.timestamp, s.recorded_at, r.resource_metadata, {},
                    s.message_signature
             {}{} ORDER BY s.timestamp DESC, s.id DESC LIMIT ?",
            crate::msgkey::message_id_sql("s."),
            from_one(part, filter),
            w.sql
        );
        let mut params = w.params.clone();
        params.push(SqlValue::Integer(left));
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(params.iter()))?;
        while let Some(row) = rows.next()? {
            out.push(sample_row(row)?);
        }
    }
    Ok(out)
}

fn sample_row(row: &Row<'_>) -> Result<StoredSample> {
    Ok(StoredSample {
        source: row.get(0)?,
        counter_name: row.get(1)?,
        counter_type: counter_type_at(&row.get::<_, String>(2)?)?,
        counter_unit: row.get(3)?,
        counter_volume: row.get(4)?,
        user_id: row.get(5)?,
        project_id: row.get(6)?,
        resource_id: row.get(7)?,
        timestamp: time_at(row.get(8)?)?,
        recorded_at: time_at(row.get(9)?)?,
        resource_metadata: json_at(&row.get::<_, String>(10)?)?,
        message_id: row.get(11)?,
        message_signature: row.get(12)?,
    })
}

pub fn meters(conn: &Connection, filter: &SampleFilter) -> Result<Vec<MeterInfo>> {
    let mut w = Where::new(filter);
    let from = from(&partitions(conn, filter)?);
    let sql = format!(
        "SELECT DISTINCT m.name, m.type, m.unit, r.resource_id, r.project_id, r.user_id,
                r.source_id
         {from}{}
         ORDER BY m.name, m.type, m.unit, r.resource_id, r.project_id, r.user_id, r.source_id
         LIMIT ?",
        w.sql
    );
    w.params.push(SqlValue::Integer(limit(filter)));
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(w.params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(MeterInfo {
            name: row.get(0)?,
            counter_type: counter_type_at(&row.get::<_, String>(1)?)?,
            unit: row.get(2)?,
            resource_id: row.get(3)?,
            project_id: row.get(4)?,
            user_id: row.get(5)?,
            source: row.get(6)?,
        });
    }
    Ok(out)
}

pub fn resources(conn: &Connection, filter: &SampleFilter) -> Result<Vec<ResourceInfo>> {
    let mut w = Where::new(filter);
    let from = from(&partitions(conn, filter)?);
    // Per resource id: the span of its matching samples, and owner/metadata of the newest one
    // (a resource id has one row per metadata version it was seen with).
    let sql = format!(
        "SELECT resource_id, user_id, project_id, source_id, resource_metadata, first, last
         FROM (
           SELECT r.resource_id, r.user_id, r.project_id, r.source_id, r.resource_metadata,
                  MIN(s.timestamp) OVER w AS first, MAX(s.timestamp) OVER w AS last,
                  ROW_NUMBER() OVER (PARTITION BY r.resource_id
                                     ORDER BY s.timestamp DESC, s.id DESC) AS rn
           {from}{}
           WINDOW w AS (PARTITION BY r.resource_id)
         )
         WHERE rn = 1 ORDER BY resource_id LIMIT ?",
        w.sql
    );
    w.params.push(SqlValue::Integer(limit(filter)));
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(w.params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(ResourceInfo {
            resource_id: row.get(0)?,
            user_id: row.get(1)?,
            project_id: row.get(2)?,
            source: row.get(3)?,
            metadata: json_at(&row.get::<_, String>(4)?)?,
            first_sample_timestamp: time_at(row.get(5)?)?,
            last_sample_timestamp: time_at(row.get(6)?)?,
        });
    }
    Ok(out)
}

const AGGREGATES: &str = "m.unit, COUNT(*), MIN(s.volume), MAX(s.volume), AVG(s.volume),
    SUM(s.volume), MIN(s.timestamp), MAX(s.timestamp)";

/// Aggregates of one result row, starting at column `at`.
struct Agg {
    unit: String,
    count: u64,
    min: f64,
    max: f64,
    avg: f64,
    sum: f64,
    first: i64,
    last: i64,
}

fn agg_row(row: &Row<'_>, at: usize) -> Result<Agg> {
    Ok(Agg {
        unit: row.get(at)?,
        count: row.get::<_, i64>(at + 1)?.max(0) as u64,
        min: row.get(at + 2)?,
        max: row.get(at + 3)?,
        avg: row.get(at + 4)?,
        sum: row.get(at + 5)?,
        first: row.get(at + 6)?,
        last: row.get(at + 7)?,
    })
}

fn stats_of(
    a: Agg,
    period_start: OffsetDateTime,
    period_end: OffsetDateTime,
    period: u64,
) -> Result<Statistics> {
    let duration_start = time_at(a.first)?;
    let duration_end = time_at(a.last)?;
    Ok(Statistics {
        period_start,
        period_end,
        period,
        count: a.count,
        min: a.min,
        max: a.max,
        avg: a.avg,
        sum: a.sum,
        duration_start,
        duration_end,
        duration: (a.last - a.first) as f64 / 1e6,
        unit: a.unit,
    })
}

/// Statistics from the coarsest rollup that is exact for the query, else from the samples.
pub fn statistics_from(
    conn: &Connection,
    filter: &SampleFilter,
    period: Option<u64>,
    levels: &[Granularity],
    now: i64,
) -> Result<(Vec<Statistics>, StatsSource)> {
    let usable = usable_levels(conn, filter, levels)?;
    match rollup::exact_granularity(&usable, filter, period, now) {
        Some(g) => Ok((from_rollup(conn, filter, period, &g)?, rollup::source(&g))),
        None => Ok((statistics(conn, filter, period)?, StatsSource::Raw)),
    }
}

/// The configured levels whose rollups are complete from the filter's start on.
fn usable_levels(
    conn: &Connection,
    filter: &SampleFilter,
    levels: &[Granularity],
) -> Result<Vec<Granularity>> {
    let Some(start) = filter.start.map(to_micros) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut stmt =
        conn.prepare_cached("SELECT complete_from FROM rollup_level WHERE granularity = ?1")?;
    for g in levels {
        let from: Option<i64> = stmt
            .query_row([g.seconds as i64], |r| r.get(0))
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        if from.is_some_and(|f| f <= start) {
            out.push(*g);
        }
    }
    Ok(out)
}

fn from_rollup(
    conn: &Connection,
    filter: &SampleFilter,
    period: Option<u64>,
    g: &Granularity,
) -> Result<Vec<Statistics>> {
    let mut sql = String::new();
    let mut params = vec![SqlValue::Integer(g.seconds as i64)];
    if let (Some(res), Some(start)) = (&filter.resource_id, filter.start) {
        // A level folded from a finer one is answered by its rows and the finer level's
        // (rollup::Level): every sample is in exactly one of the two.
        let levels = load_levels(conn)?;
        let mut buckets = Vec::new();
        for (gran, from) in rollup::resource_granularities(&levels, g.seconds) {
            resource_buckets(conn, filter, res, start, from, gran, &mut buckets)?;
        }
        return rollup::statistics(buckets, filter, period).map_err(QueryError::Storage);
    }
    sql.push_str("SELECT b.bucket, m.unit, b.count, b.sum, b.min, b.max, b.first, b.last FROM ");
    if let Some(res) = &filter.resource_id {
        // Without a start (not exact, so not reached): scan the series' rows.
        sql.push_str(
            "meter m JOIN rollup_resource b ON b.meter_id = m.id AND b.resource_id = ?2
             WHERE b.granularity = ?1",
        );
        params.push(SqlValue::Text(res.clone()));
    } else {
        sql.push_str("meter m JOIN rollup_meter b ON b.meter_id = m.id WHERE b.granularity = ?1");
    }
    if let Some(meter) = &filter.meter {
        params.push(SqlValue::Text(meter.clone()));
        sql.push_str(&format!(" AND m.name = ?{}", params.len()));
    }
    if let Some(start) = filter.start {
        params.push(SqlValue::Integer(to_micros(start)));
        sql.push_str(&format!(" AND b.bucket >= ?{}", params.len()));
    }
    if let Some(end) = filter.end {
        params.push(SqlValue::Integer(to_micros(end)));
        sql.push_str(&format!(" AND b.bucket < ?{}", params.len()));
    }
    fold_rollup(conn, &sql, params, filter, period)
}

/// The registered rollup levels and their sources.
pub(crate) fn load_levels(conn: &Connection) -> rusqlite::Result<Vec<rollup::Level>> {
    let mut stmt =
        conn.prepare_cached("SELECT granularity, source, fold_from FROM rollup_level")?;
    let rows = stmt.query_map([], |r| {
        Ok(rollup::Level {
            seconds: r.get::<_, i64>(0)?.max(0) as u64,
            source: r.get::<_, i64>(1)?.max(0) as u64,
            fold_from: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// One resource's `rollup_resource` rows of the level of `seconds` from `start` (and not
/// before bucket `from`) to the filter's end.
fn resource_buckets(
    conn: &Connection,
    filter: &SampleFilter,
    res: &str,
    start: time::OffsetDateTime,
    from: i64,
    seconds: u64,
    out: &mut Vec<BucketRow>,
) -> Result<()> {
    // rollup_resource is keyed by time first: enumerate the buckets of the range and seek
    // each (one index seek per bucket and meter row), rather than scan every series.
    let mut params = vec![SqlValue::Integer(seconds as i64)];
    let step = rollup::micros_of(seconds);
    let end = match filter.end {
        Some(e) => to_micros(e),
        None => {
            let last: Option<i64> = conn
                .prepare_cached("SELECT MAX(bucket) FROM rollup_resource WHERE granularity = ?1")?
                .query_row([seconds as i64], |r| r.get(0))?;
            last.map_or(to_micros(start), |b| b.saturating_add(step))
        }
    };
    // The first bucket: the start is a multiple of the level asked for, and so of a finer
    // level dividing it; `from` (a fold_from) is a multiple of the level asked for too.
    params.push(SqlValue::Integer(to_micros(start).max(from)));
    params.push(SqlValue::Integer(end));
    params.push(SqlValue::Integer(step));
    params.push(SqlValue::Text(res.to_string()));
    let mut sql = String::from(
        "WITH RECURSIVE t(bucket) AS (
             SELECT ?2 WHERE ?2 < ?3
             UNION ALL SELECT bucket + ?4 FROM t WHERE bucket + ?4 < ?3)
         SELECT b.bucket, m.unit, b.count, b.sum, b.min, b.max, b.first, b.last
           FROM t CROSS JOIN meter m CROSS JOIN rollup_resource b
          WHERE b.granularity = ?1 AND b.bucket = t.bucket AND b.meter_id = m.id
            AND b.resource_id = ?5",
    );
    if let Some(meter) = &filter.meter {
        params.push(SqlValue::Text(meter.clone()));
        sql.push_str(&format!(" AND m.name = ?{}", params.len()));
    }
    collect_buckets(conn, &sql, params, out)
}

/// Run a rollup query (bucket, unit, count, sum, min, max, first, last); append its rows.
fn collect_buckets(
    conn: &Connection,
    sql: &str,
    params: Vec<SqlValue>,
    out: &mut Vec<BucketRow>,
) -> Result<()> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params_from_iter(params.iter()))?;
    while let Some(row) = rows.next()? {
        out.push(BucketRow {
            bucket: row.get(0)?,
            unit: row.get(1)?,
            agg: rollup::Agg {
                count: row.get::<_, i64>(2)?.max(0) as u64,
                sum: row.get(3)?,
                min: row.get(4)?,
                max: row.get(5)?,
                first: row.get(6)?,
                last: row.get(7)?,
            },
        });
    }
    Ok(())
}

/// Run a rollup query (bucket, unit, count, sum, min, max, first, last) and fold its rows.
fn fold_rollup(
    conn: &Connection,
    sql: &str,
    params: Vec<SqlValue>,
    filter: &SampleFilter,
    period: Option<u64>,
) -> Result<Vec<Statistics>> {
    let mut buckets = Vec::new();
    collect_buckets(conn, sql, params, &mut buckets)?;
    rollup::statistics(buckets, filter, period).map_err(QueryError::Storage)
}

pub fn statistics(
    conn: &Connection,
    filter: &SampleFilter,
    period: Option<u64>,
) -> Result<Vec<Statistics>> {
    let w = Where::new(filter);
    let period = period.filter(|p| *p > 0);
    let from = from(&partitions(conn, filter)?);
    let Some(period) = period else {
        // One bucket per unit over the filter's range (or the samples' span where it is open).
        let sql = format!(
            "SELECT {AGGREGATES}{from}{} GROUP BY m.unit ORDER BY m.unit",
            w.sql
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(w.params.iter()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let a = agg_row(row, 0)?;
            let start = match filter.start {
                Some(t) => t,
                None => time_at(a.first)?,
            };
            let end = match filter.end {
                Some(t) => t,
                None => time_at(a.last)?,
            };
            out.push(stats_of(a, start, end, 0)?);
        }
        return Ok(out);
    };
    let period_us = i64::try_from(period)
        .ok()
        .and_then(|p| p.checked_mul(1_000_000))
        .ok_or_else(|| {
            QueryError::Storage(StorageError::InvalidOption {
                name: "period",
                value: period.to_string(),
                reason: "too long".to_string(),
            })
        })?;
    // Buckets are aligned to the filter's start, or to the first matching sample.
    let anchor = match filter.start {
        Some(t) => to_micros(t),
        None => {
            let sql = format!("SELECT MIN(s.timestamp){from}{}", w.sql);
            let first: Option<i64> = conn
                .prepare_cached(&sql)?
                .query_row(params_from_iter(w.params.iter()), |r| r.get(0))?;
            match first {
                Some(t) => t,
                None => return Ok(Vec::new()),
            }
        }
    };
    // timestamp >= anchor, so the integer division is a floor.
    let sql = format!(
        "SELECT (s.timestamp - ?) / ? AS bucket, {AGGREGATES}{from}{} AND s.timestamp >= ?
         GROUP BY bucket, m.unit ORDER BY bucket, m.unit",
        w.sql
    );
    let mut params = vec![SqlValue::Integer(anchor), SqlValue::Integer(period_us)];
    params.extend(w.params.iter().cloned());
    params.push(SqlValue::Integer(anchor));
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let bucket: i64 = row.get(0)?;
        let a = agg_row(row, 1)?;
        let start_us = bucket
            .checked_mul(period_us)
            .and_then(|o| o.checked_add(anchor))
            .ok_or_else(|| corrupt("period start out of range"))?;
        let start = time_at(start_us)?;
        let end = time_at(start_us.saturating_add(period_us))?;
        out.push(stats_of(a, start, end, period)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filter_text_is_typed() {
        assert_eq!(typed_metadata_value("2"), SqlValue::Integer(2));
        assert_eq!(typed_metadata_value("2.5"), SqlValue::Real(2.5));
        assert_eq!(typed_metadata_value("True"), SqlValue::Integer(1));
        assert_eq!(typed_metadata_value("nan"), SqlValue::Null);
        assert_eq!(typed_metadata_value("m1.tiny"), SqlValue::Null);
    }
}

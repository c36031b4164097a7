//! The read side of the PostgreSQL driver: [`SampleFilter`] to SQL, and the four queries.
//!
//! Orderings on text use `COLLATE "C"` (byte order, as SQLite sorts), whatever the database's
//! default collation. Metadata filters are `jsonb` containment (`@>`, answered by the GIN
//! index) confirmed by the exact path (`#>`), because containment alone would also accept the
//! value anywhere in an array.

use super::Fail;
use crate::model::counter_type_from_str;
use crate::server::{metadata_paths, metadata_value, PathStep};
use crate::{MeterInfo, ResourceInfo, SampleFilter, Statistics, StorageError, StoredSample};
use ::postgres::types::ToSql;
use ::postgres::{Client, Row};
use serde_json::Value as J;
use time::OffsetDateTime;

use crate::model::SAMPLE_FROM as FROM;
use crate::model::{to_micros, StatsSource};
use crate::rollup::{self, BucketRow, Granularity};

type Param = Box<dyn ToSql + Sync>;

/// A `WHERE` clause with `$n` placeholders and its parameters.
struct Where {
    sql: String,
    params: Vec<Param>,
}

impl Where {
    fn new(filter: &SampleFilter) -> Where {
        let mut w = Where {
            sql: String::from(" WHERE TRUE"),
            params: Vec::new(),
        };
        for (column, v) in filter.column_equalities() {
            w.push(&format!(" AND {column} = "), "", Box::new(v.to_string()));
        }
        if let Some(start) = filter.start {
            w.push(" AND s.timestamp >= ", "", Box::new(start));
        }
        if let Some(end) = filter.end {
            w.push(" AND s.timestamp < ", "", Box::new(end));
        }
        for (key, value) in &filter.metadata {
            w.metadata(key, value);
        }
        w
    }

    /// Append `before $n after` and bind `param` to `$n`.
    fn push(&mut self, before: &str, after: &str, param: Param) {
        self.params.push(param);
        self.sql
            .push_str(&format!("{before}${}{after}", self.params.len()));
    }

    fn placeholder(&mut self, param: Param) -> String {
        self.params.push(param);
        format!("${}", self.params.len())
    }

    fn metadata(&mut self, key: &str, value: &str) {
        let v = metadata_value(value);
        // The JSON values the text stands for.
        let mut candidates = vec![J::String(v.text.clone())];
        if let Some(i) = v.int {
            candidates.push(J::from(i));
        } else if let Some(f) = v.number {
            candidates.push(J::from(f));
        }
        if v.number == Some(1.0) {
            candidates.push(J::Bool(true));
        } else if v.number == Some(0.0) {
            candidates.push(J::Bool(false));
        }
        let candidate_texts: Vec<String> = candidates.iter().map(J::to_string).collect();
        let mut alternatives = Vec::new();
        for steps in metadata_paths(key) {
            let path: Vec<String> = steps
                .iter()
                .map(|s| match s {
                    PathStep::Key(k) => k.clone(),
                    PathStep::Index(i) => i.to_string(),
                })
                .collect();
            let mut contains = Vec::new();
            for c in &candidates {
                let doc = steps
                    .iter()
                    .rev()
                    .fold(c.clone(), |inner, step| match step {
                        PathStep::Key(k) => J::Object([(k.clone(), inner)].into_iter().collect()),
                        PathStep::Index(_) => J::Array(vec![inner]),
                    });
                let p = self.placeholder(Box::new(doc.to_string()));
                contains.push(format!("r.resource_metadata @> {p}::TEXT::JSONB"));
            }
            let p = self.placeholder(Box::new(path));
            let c = self.placeholder(Box::new(candidate_texts.clone()));
            alternatives.push(format!(
                "(({}) AND (r.resource_metadata #> {p}::TEXT[]) = ANY ({c}::TEXT[]::JSONB[]))",
                contains.join(" OR ")
            ));
        }
        if alternatives.is_empty() {
            self.sql.push_str(" AND FALSE");
        } else {
            self.sql
                .push_str(&format!(" AND ({})", alternatives.join(" OR ")));
        }
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| p.as_ref()).collect()
    }
}

fn limit(filter: &SampleFilter) -> Option<i64> {
    filter.limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

fn corrupt(what: impl Into<String>) -> Fail {
    Fail::Storage(StorageError::Database(what.into()))
}

fn json_at(text: &str) -> Result<J, Fail> {
    serde_json::from_str(text).map_err(|e| corrupt(format!("stored metadata is not JSON: {e}")))
}

fn counter_type_at(text: &str) -> Result<meter::CounterType, Fail> {
    counter_type_from_str(text)
        .ok_or_else(|| corrupt(format!("unknown stored counter type {text:?}")))
}

/// The id `sql` (at most two rows of one id column) finds for `key`: `None` when there is no
/// row, `Some(None)` when there are several (no single constant to name).
fn only_id(c: &mut Client, sql: &str, key: &String) -> Result<Option<Option<i64>>, Fail> {
    let rows = c.query(sql, &[key])?;
    Ok(match rows.as_slice() {
        [] => None,
        [one] => Some(Some(one.try_get::<_, i64>(0)?)),
        _ => Some(None),
    })
}

pub(super) fn samples(c: &mut Client, filter: &SampleFilter) -> Result<Vec<StoredSample>, Fail> {
    let mut w = Where::new(filter);
    if let Some(res) = &filter.resource_id {
        // A resource id usually has one resource row. Named as a constant, it lets the planner
        // read each time partition's (resource_id, meter_id, timestamp) index backwards, partitions
        // newest first, and stop at the limit; joined, it sorted all the resource's samples.
        let sql = "SELECT internal_id FROM resource WHERE resource_id = $1 LIMIT 2";
        match only_id(c, sql, res)? {
            Some(Some(id)) => w.push(" AND s.resource_id = ", "", Box::new(id)),
            Some(None) => {}
            None => return Ok(Vec::new()),
        }
        // The meter row too, so each partition's (resource_id, meter_id, timestamp) index is
        // read with both as constants, newest first, up to the limit.
        if let Some(name) = &filter.meter {
            let sql = "SELECT id FROM meter WHERE name = $1 LIMIT 2";
            match only_id(c, sql, name)? {
                Some(Some(id)) => w.push(" AND s.meter_id = ", "", Box::new(id)),
                Some(None) => {}
                None => return Ok(Vec::new()),
            }
        }
    }
    let lim = w.placeholder(Box::new(limit(filter)));
    let sql = format!(
        "SELECT r.source_id, m.name, m.type, m.unit, s.volume, r.user_id, r.project_id,
                r.resource_id, s.timestamp, s.recorded_at, r.resource_metadata::TEXT,
                s.message_id, s.message_signature
         {FROM}{} ORDER BY s.timestamp DESC, s.id DESC LIMIT {lim}::BIGINT",
        w.sql
    );
    let rows = c.query(&sql, &w.refs())?;
    rows.iter().map(sample_row).collect()
}

fn sample_row(row: &Row) -> Result<StoredSample, Fail> {
    Ok(StoredSample {
        source: row.try_get(0)?,
        counter_name: row.try_get(1)?,
        counter_type: counter_type_at(row.try_get(2)?)?,
        counter_unit: row.try_get(3)?,
        counter_volume: row.try_get(4)?,
        user_id: row.try_get(5)?,
        project_id: row.try_get(6)?,
        resource_id: row.try_get(7)?,
        timestamp: row.try_get(8)?,
        recorded_at: row.try_get(9)?,
        resource_metadata: json_at(row.try_get(10)?)?,
        message_id: row.try_get(11)?,
        message_signature: row.try_get(12)?,
    })
}

pub(super) fn meters(c: &mut Client, filter: &SampleFilter) -> Result<Vec<MeterInfo>, Fail> {
    let mut w = Where::new(filter);
    let lim = w.placeholder(Box::new(limit(filter)));
    let sql = format!(
        "SELECT DISTINCT m.name COLLATE \"C\" AS name, m.type, m.unit COLLATE \"C\" AS unit,
                r.resource_id COLLATE \"C\" AS resource_id,
                r.project_id COLLATE \"C\" AS project_id, r.user_id COLLATE \"C\" AS user_id,
                r.source_id COLLATE \"C\" AS source_id
         {FROM}{}
         ORDER BY 1, 2, 3, 4, 5, 6, 7
         LIMIT {lim}::BIGINT",
        w.sql
    );
    let rows = c.query(&sql, &w.refs())?;
    rows.iter()
        .map(|row| {
            Ok(MeterInfo {
                name: row.try_get(0)?,
                counter_type: counter_type_at(row.try_get(1)?)?,
                unit: row.try_get(2)?,
                resource_id: row.try_get(3)?,
                project_id: row.try_get(4)?,
                user_id: row.try_get(5)?,
                source: row.try_get(6)?,
            })
        })
        .collect()
}

pub(super) fn resources(c: &mut Client, filter: &SampleFilter) -> Result<Vec<ResourceInfo>, Fail> {
    let mut w = Where::new(filter);
    let lim = w.placeholder(Box::new(limit(filter)));
    // Per resource id: the span of its matching samples, and owner/metadata of the newest one.
    let sql = format!(
        "SELECT resource_id, user_id, project_id, source_id, resource_metadata::TEXT, first, last
         FROM (
           SELECT r.resource_id, r.user_id, r.project_id, r.source_id, r.resource_metadata,
                  MIN(s.timestamp) OVER w AS first, MAX(s.timestamp) OVER w AS last,
                  ROW_NUMBER() OVER (PARTITION BY r.resource_id
                                     ORDER BY s.timestamp DESC, s.id DESC) AS rn
           {FROM}{}
           WINDOW w AS (PARTITION BY r.resource_id)
         ) AS t
         WHERE rn = 1 ORDER BY resource_id COLLATE \"C\" LIMIT {lim}::BIGINT",
        w.sql
    );
    let rows = c.query(&sql, &w.refs())?;
    rows.iter()
        .map(|row| {
            Ok(ResourceInfo {
                resource_id: row.try_get(0)?,
                user_id: row.try_get(1)?,
                project_id: row.try_get(2)?,
                source: row.try_get(3)?,
                metadata: json_at(row.try_get(4)?)?,
                first_sample_timestamp: row.try_get(5)?,
                last_sample_timestamp: row.try_get(6)?,
            })
        })
        .collect()
}

const AGGREGATES: &str = "m.unit, COUNT(*), MIN(s.volume), MAX(s.volume), AVG(s.volume),
    SUM(s.volume), MIN(s.timestamp), MAX(s.timestamp)";

/// Aggregates of one result row, from column `at`.
fn stats_of(
    row: &Row,
    at: usize,
    period_start: Option<OffsetDateTime>,
    period_end: Option<OffsetDateTime>,
    period: u64,
) -> Result<Statistics, Fail> {
    let first: OffsetDateTime = row.try_get(at + 6)?;
    let last: OffsetDateTime = row.try_get(at + 7)?;
    Ok(Statistics {
        period_start: period_start.unwrap_or(first),
        period_end: period_end.unwrap_or(last),
        period,
        count: row.try_get::<_, i64>(at + 1)?.max(0) as u64,
        min: row.try_get(at + 2)?,
        max: row.try_get(at + 3)?,
        avg: row.try_get(at + 4)?,
        sum: row.try_get(at + 5)?,
        duration_start: first,
        duration_end: last,
        duration: (last - first).as_seconds_f64(),
        unit: row.try_get(at)?,
    })
}

pub(super) fn statistics(
    c: &mut Client,
    filter: &SampleFilter,
    period: Option<u64>,
) -> Result<Vec<Statistics>, Fail> {
    let mut w = Where::new(filter);
    let Some(period) = period.filter(|p| *p > 0) else {
        let sql = format!(
            "SELECT {AGGREGATES}{FROM}{} GROUP BY m.unit ORDER BY m.unit COLLATE \"C\"",
            w.sql
        );
        let rows = c.query(&sql, &w.refs())?;
        return rows
            .iter()
            .map(|row| stats_of(row, 0, filter.start, filter.end, 0))
            .collect();
    };
    let period_us = i64::try_from(period)
        .ok()
        .and_then(|p| p.checked_mul(1_000_000))
        .ok_or_else(|| {
            Fail::Storage(StorageError::InvalidOption {
                name: "period",
                value: period.to_string(),
                reason: "too long".to_string(),
            })
        })?;
    // Buckets are aligned to the filter's start, or to the first matching sample.
    let anchor = match filter.start {
        Some(t) => t,
        None => {
            let sql = format!("SELECT MIN(s.timestamp){FROM}{}", w.sql);
            match c
                .query_one(&sql, &w.refs())?
                .try_get::<_, Option<OffsetDateTime>>(0)?
            {
                Some(t) => t,
                None => return Ok(Vec::new()),
            }
        }
    };
    let a = w.placeholder(Box::new(anchor));
    let p = w.placeholder(Box::new(period_us));
    // Exact integer microseconds since the anchor (timestamp >= anchor: division floors).
    let sql = format!(
        "SELECT (EXTRACT(EPOCH FROM s.timestamp - {a}::TIMESTAMPTZ) * 1000000)::BIGINT
                  / {p}::BIGINT AS bucket, {AGGREGATES}
         {FROM}{} AND s.timestamp >= {a}::TIMESTAMPTZ
         GROUP BY bucket, m.unit ORDER BY bucket, m.unit COLLATE \"C\"",
        w.sql
    );
    let rows = c.query(&sql, &w.refs())?;
    rows.iter()
        .map(|row| {
            let bucket: i64 = row.try_get(0)?;
            let offset = bucket
                .checked_mul(period_us)
                .ok_or_else(|| corrupt("period start out of range"))?;
            let start = anchor
                .checked_add(time::Duration::microseconds(offset))
                .ok_or_else(|| corrupt("period start out of range"))?;
            let end = start
                .checked_add(time::Duration::microseconds(period_us))
                .ok_or_else(|| corrupt("period end out of range"))?;
            stats_of(row, 1, Some(start), Some(end), period)
        })
        .collect()
}

/// Statistics from the coarsest rollup level exact for the query (see `storage::rollup`),
/// among `levels` complete from the filter's start on; else from the samples.
pub(super) fn statistics_from(
    c: &mut Client,
    filter: &SampleFilter,
    period: Option<u64>,
    levels: &[Granularity],
    now: i64,
) -> Result<(Vec<Statistics>, StatsSource), Fail> {
    let mut usable = Vec::new();
    if let Some(start) = filter.start.map(to_micros) {
        for g in levels {
            let from: Option<i64> = c
                .query_opt(
                    "SELECT complete_from FROM rollup_level WHERE granularity = $1",
                    &[&(g.seconds as i64)],
                )?
                .map(|r| r.get(0));
            if from.is_some_and(|f| f <= start) {
                usable.push(*g);
            }
        }
    }
    let Some(g) = rollup::exact_granularity(&usable, filter, period, now) else {
        return Ok((statistics(c, filter, period)?, StatsSource::Raw));
    };
    let start = filter.start.map(to_micros).unwrap_or(0);
    // A level folded from a finer one is answered per resource by its rows and the finer
    // level's (every sample is in exactly one of the two; crate::rollup::Level).
    let grans = match filter.resource_id {
        Some(_) => rollup::resource_granularities(&super::schema::load_levels(c)?, g.seconds),
        None => vec![(g.seconds, i64::MIN)],
    };
    let mut rows = Vec::new();
    for (seconds, from) in grans {
        let gran = seconds as i64;
        let start = start.max(from);
        let step = crate::rollup::micros_of(seconds);
        let end: i64 = match filter.end {
            Some(e) => to_micros(e),
            None => {
                let table = if filter.resource_id.is_some() {
                    "rollup_resource"
                } else {
                    "rollup_meter"
                };
                let last: Option<i64> = c
                    .query_one(
                        &format!("SELECT MAX(bucket) FROM {table} WHERE granularity = $1"),
                        &[&gran],
                    )?
                    .get(0);
                last.map_or(start, |b| b.saturating_add(step))
            }
        };
        rows.extend(match &filter.resource_id {
            // Keyed by time first: one index lookup per bucket and meter row.
            Some(res) => c.query(
                // LATERAL with OFFSET 0 (kept from being pulled up into the join): one
                // primary-key lookup per bucket and meter row. Joined plainly, the planner
                // walked every bucket of the resource (150 ms on 1 M samples against 4 ms;
                // EXPLAIN).
                "SELECT t.bucket, m.unit, b.count, b.sum, b.min, b.max, b.first, b.last
                   FROM generate_series($2::BIGINT, $3::BIGINT - 1, $4::BIGINT) AS t (bucket)
                   CROSS JOIN meter m
                   CROSS JOIN LATERAL (
                       SELECT count, sum, min, max, first, last FROM rollup_resource
                        WHERE granularity = $1 AND bucket = t.bucket AND meter_id = m.id
                          AND resource_id = $5 OFFSET 0) b
                  WHERE ($6::TEXT IS NULL OR m.name = $6)",
                &[&gran, &start, &end, &step, res, &filter.meter],
            )?,
            None => c.query(
                "SELECT b.bucket, m.unit, b.count, b.sum, b.min, b.max, b.first, b.last
                   FROM meter m JOIN rollup_meter b ON b.meter_id = m.id
                  WHERE b.granularity = $1 AND b.bucket >= $2 AND b.bucket < $3
                    AND ($4::TEXT IS NULL OR m.name = $4)",
                &[&gran, &start, &end, &filter.meter],
            )?,
        });
    }
    let mut buckets = Vec::with_capacity(rows.len());
    for r in rows {
        buckets.push(BucketRow {
            bucket: r.try_get(0)?,
            unit: r.try_get(1)?,
            agg: rollup::Agg {
                count: r.try_get::<_, i64>(2)?.max(0) as u64,
                sum: r.try_get(3)?,
                min: r.try_get(4)?,
                max: r.try_get(5)?,
                first: r.try_get(6)?,
                last: r.try_get(7)?,
            },
        });
    }
    let stats = rollup::statistics(buckets, filter, period).map_err(Fail::Storage)?;
    Ok((stats, rollup::source(&g)))
}

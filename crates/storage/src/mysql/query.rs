//! The read side of the MySQL/MariaDB driver: [`SampleFilter`] to SQL, and the four queries.
//!
//! Text columns use a binary collation, so equality and ordering are byte-exact as in SQLite.
//! Metadata filters go through the flattened `metadata` table (an index lookup on
//! `(meta_key, value_text)` or `(meta_key, value_num)`).

use super::{date, Fail, MyConn};
use crate::model::{counter_type_from_str, to_micros, StatsSource};
use crate::rollup::{self, BucketRow, Granularity};
use crate::server::metadata_value;
use crate::{MeterInfo, ResourceInfo, SampleFilter, Statistics, StorageError, StoredSample};
use ::mysql::prelude::Queryable;
use ::mysql::{Params, Row, Value as MyValue};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use crate::model::SAMPLE_FROM as FROM;

/// [`FROM`] with the join order fixed: resource rows first, then their samples through
/// `ix_sample_resource_meter_timestamp`.
const SAMPLE_FROM_RESOURCE: &str = " FROM resource r
    STRAIGHT_JOIN sample s ON s.resource_id = r.internal_id
    JOIN meter m ON m.id = s.meter_id";

/// A `WHERE` clause and its parameters, in textual order.
struct Where {
    sql: String,
    params: Vec<MyValue>,
}

impl Where {
    fn new(filter: &SampleFilter) -> Where {
        let mut w = Where {
            sql: String::from(" WHERE 1 = 1"),
            params: Vec::new(),
        };
        for (column, v) in filter.column_equalities() {
            w.push(&format!(" AND {column} = ?"), MyValue::from(v));
        }
        if filter.meter.is_none() && (filter.start.is_some() || filter.end.is_some()) {
            // No index on timestamp alone: walk (meter_id, timestamp) per meter.
            w.sql.push_str(" AND s.meter_id IN (SELECT id FROM meter)");
        }
        if let Some(start) = filter.start {
            w.push(" AND s.timestamp >= ?", date(start));
        }
        if let Some(end) = filter.end {
            w.push(" AND s.timestamp < ?", date(end));
        }
        for (key, value) in &filter.metadata {
            let v = metadata_value(value);
            w.sql.push_str(
                " AND s.resource_id IN (SELECT md.id FROM metadata md
                    WHERE md.meta_key = ? AND md.value_text = ?",
            );
            w.params.push(MyValue::from(key.as_str()));
            w.params.push(MyValue::from(v.text.as_str()));
            if let Some(n) = v.number {
                w.sql.push_str(
                    " UNION SELECT md.id FROM metadata md WHERE md.meta_key = ? AND md.value_num = ?",
                );
                w.params.push(MyValue::from(key.as_str()));
                w.params.push(MyValue::Double(n));
            }
            w.sql.push(')');
        }
        w
    }

    fn push(&mut self, sql: &str, param: MyValue) {
        self.sql.push_str(sql);
        self.params.push(param);
    }

    /// ` LIMIT ?` when the filter has a limit.
    fn limit(&mut self, filter: &SampleFilter) {
        if let Some(n) = filter.limit {
            self.push(" LIMIT ?", MyValue::UInt(n as u64));
        }
    }
}

fn corrupt(what: impl Into<String>) -> Fail {
    Fail::Storage(StorageError::Database(what.into()))
}

fn take(row: &mut Row, i: usize) -> Result<MyValue, Fail> {
    row.take_opt::<MyValue, _>(i)
        .ok_or_else(|| corrupt(format!("result has no column {i}")))?
        .map_err(|e| corrupt(format!("column {i}: {e}")))
}

fn text(row: &mut Row, i: usize) -> Result<String, Fail> {
    opt_text(row, i)?.ok_or_else(|| corrupt(format!("column {i} is NULL")))
}

fn opt_text(row: &mut Row, i: usize) -> Result<Option<String>, Fail> {
    match take(row, i)? {
        MyValue::NULL => Ok(None),
        MyValue::Bytes(b) => String::from_utf8(b)
            .map(Some)
            .map_err(|_| corrupt(format!("column {i} is not UTF-8"))),
        other => Ok(Some(other.as_sql(true).trim_matches('\'').to_string())),
    }
}

fn num(row: &mut Row, i: usize) -> Result<f64, Fail> {
    let v = take(row, i)?;
    ::mysql::from_value_opt::<f64>(v).map_err(|e| corrupt(format!("column {i}: {e}")))
}

fn int(row: &mut Row, i: usize) -> Result<i64, Fail> {
    let v = take(row, i)?;
    ::mysql::from_value_opt::<i64>(v).map_err(|e| corrupt(format!("column {i}: {e}")))
}

/// A `DATETIME(6)` (UTC) back to an instant; binary results carry the parts, text results
/// `YYYY-MM-DD HH:MM:SS[.ffffff]`.
fn time_at(row: &mut Row, i: usize) -> Result<OffsetDateTime, Fail> {
    let parts = match take(row, i)? {
        MyValue::Date(y, mo, d, h, mi, s, us) => (i32::from(y), mo, d, h, mi, s, us),
        MyValue::Bytes(b) => {
            let t = String::from_utf8_lossy(&b).to_string();
            let n = |r: std::ops::Range<usize>| t.get(r).and_then(|x| x.parse::<u32>().ok());
            let frac = t.get(20..).map_or(Some(0), |f| {
                format!("{f:0<6}").get(..6).and_then(|x| x.parse().ok())
            });
            match (
                n(0..4),
                n(5..7),
                n(8..10),
                n(11..13),
                n(14..16),
                n(17..19),
                frac,
            ) {
                (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(s), Some(us)) => {
                    (y as i32, mo as u8, d as u8, h as u8, mi as u8, s as u8, us)
                }
                _ => return Err(corrupt(format!("unreadable DATETIME {t:?}"))),
            }
        }
        other => return Err(corrupt(format!("column {i}: not a DATETIME: {other:?}"))),
    };
    let (y, mo, d, h, mi, s, us) = parts;
    let date = Month::try_from(mo)
        .ok()
        .and_then(|m| Date::from_calendar_date(y, m, d).ok());
    let time = Time::from_hms_micro(h, mi, s, us).ok();
    match (date, time) {
        (Some(date), Some(time)) => Ok(PrimitiveDateTime::new(date, time).assume_utc()),
        _ => Err(corrupt(format!("DATETIME out of range: {parts:?}"))),
    }
}

fn json_at(row: &mut Row, i: usize) -> Result<serde_json::Value, Fail> {
    let t = text(row, i)?;
    serde_json::from_str(&t).map_err(|e| corrupt(format!("stored metadata is not JSON: {e}")))
}

fn counter_type_at(row: &mut Row, i: usize) -> Result<meter::CounterType, Fail> {
    let t = text(row, i)?;
    counter_type_from_str(&t).ok_or_else(|| corrupt(format!("unknown stored counter type {t:?}")))
}

fn run(c: &mut MyConn, sql: &str, params: Vec<MyValue>) -> Result<Vec<Row>, Fail> {
    Ok(c.exec::<Row, _, _>(sql, Params::Positional(params))?)
}

pub(super) fn samples(c: &mut MyConn, filter: &SampleFilter) -> Result<Vec<StoredSample>, Fail> {
    let mut w = Where::new(filter);
    w.sql.push_str(" ORDER BY s.timestamp DESC, s.id DESC");
    w.limit(filter);
    const COLUMNS: &str = "r.source_id, m.name, m.type, m.unit, s.volume, r.user_id,
        r.project_id, r.resource_id, s.timestamp, s.recorded_at, r.resource_metadata,
        s.message_id, s.message_signature";
    let sql = if filter.resource_id.is_some() {
        // With a resource id, start from its resource rows whatever the table statistics say:
        // right after a bulk fill InnoDB's statistics were stale and the plan walked every
        // sample of the meter (2.3 s on 1 M rows, 10 ms once they were recalculated). The
        // rows are chosen and sorted from ix_sample_resource_meter_timestamp alone (a covering
        // index: no row read, no metadata text in the sort), then only those are read.
        format!(
            "SELECT {COLUMNS}
               FROM (SELECT s.id, s.timestamp{SAMPLE_FROM_RESOURCE}{}) k
               STRAIGHT_JOIN sample s ON s.id = k.id AND s.timestamp = k.timestamp
               JOIN resource r ON r.internal_id = s.resource_id
               JOIN meter m ON m.id = s.meter_id
              ORDER BY k.timestamp DESC, k.id DESC",
            w.sql
        )
    } else {
        format!("SELECT {COLUMNS}{FROM}{}", w.sql)
    };
    run(c, &sql, w.params)?
        .into_iter()
        .map(|mut row| {
            Ok(StoredSample {
                source: text(&mut row, 0)?,
                counter_name: text(&mut row, 1)?,
                counter_type: counter_type_at(&mut row, 2)?,
                counter_unit: text(&mut row, 3)?,
                counter_volume: num(&mut row, 4)?,
                user_id: opt_text(&mut row, 5)?,
                project_id: opt_text(&mut row, 6)?,
                resource_id: text(&mut row, 7)?,
                timestamp: time_at(&mut row, 8)?,
                recorded_at: time_at(&mut row, 9)?,
                resource_metadata: json_at(&mut row, 10)?,
                message_id: text(&mut row, 11)?,
                message_signature: opt_text(&mut row, 12)?,
            })
        })
        .collect()
}

pub(super) fn meters(c: &mut MyConn, filter: &SampleFilter) -> Result<Vec<MeterInfo>, Fail> {
    let mut w = Where::new(filter);
    w.sql.push_str(
        " ORDER BY m.name, m.type, m.unit, r.resource_id, r.project_id, r.user_id, r.source_id",
    );
    w.limit(filter);
    let sql = format!(
        "SELECT DISTINCT m.name, m.type, m.unit, r.resource_id, r.project_id, r.user_id,
                r.source_id
         {FROM}{}",
        w.sql
    );
    run(c, &sql, w.params)?
        .into_iter()
        .map(|mut row| {
            Ok(MeterInfo {
                name: text(&mut row, 0)?,
                counter_type: counter_type_at(&mut row, 1)?,
                unit: text(&mut row, 2)?,
                resource_id: text(&mut row, 3)?,
                project_id: opt_text(&mut row, 4)?,
                user_id: opt_text(&mut row, 5)?,
                source: text(&mut row, 6)?,
            })
        })
        .collect()
}

pub(super) fn resources(c: &mut MyConn, filter: &SampleFilter) -> Result<Vec<ResourceInfo>, Fail> {
    let mut w = Where::new(filter);
    let mut lim = Where {
        sql: String::new(),
        params: Vec::new(),
    };
    lim.limit(filter);
    // Per resource id: the span of its matching samples, and owner/metadata of the newest one.
    let sql = format!(
        "SELECT resource_id, user_id, project_id, source_id, resource_metadata, first, last
         FROM (
           SELECT r.resource_id, r.user_id, r.project_id, r.source_id, r.resource_metadata,
                  MIN(s.timestamp) OVER (PARTITION BY r.resource_id) AS first,
                  MAX(s.timestamp) OVER (PARTITION BY r.resource_id) AS last,
                  ROW_NUMBER() OVER (PARTITION BY r.resource_id
                                     ORDER BY s.timestamp DESC, s.id DESC) AS rn
           {FROM}{}
         ) AS t
         WHERE rn = 1 ORDER BY resource_id{}",
        w.sql, lim.sql
    );
    w.params.extend(lim.params);
    run(c, &sql, w.params)?
        .into_iter()
        .map(|mut row| {
            Ok(ResourceInfo {
                resource_id: text(&mut row, 0)?,
                user_id: opt_text(&mut row, 1)?,
                project_id: opt_text(&mut row, 2)?,
                source: text(&mut row, 3)?,
                metadata: json_at(&mut row, 4)?,
                first_sample_timestamp: time_at(&mut row, 5)?,
                last_sample_timestamp: time_at(&mut row, 6)?,
            })
        })
        .collect()
}

const AGGREGATES: &str = "m.unit, COUNT(*), MIN(s.volume), MAX(s.volume), AVG(s.volume),
    SUM(s.volume), MIN(s.timestamp), MAX(s.timestamp)";

fn stats_of(
    row: &mut Row,
    at: usize,
    period_start: Option<OffsetDateTime>,
    period_end: Option<OffsetDateTime>,
    period: u64,
) -> Result<Statistics, Fail> {
    let first = time_at(row, at + 6)?;
    let last = time_at(row, at + 7)?;
    Ok(Statistics {
        period_start: period_start.unwrap_or(first),
        period_end: period_end.unwrap_or(last),
        period,
        count: int(row, at + 1)?.max(0) as u64,
        min: num(row, at + 2)?,
        max: num(row, at + 3)?,
        avg: num(row, at + 4)?,
        sum: num(row, at + 5)?,
        duration_start: first,
        duration_end: last,
        duration: (last - first).as_seconds_f64(),
        unit: text(row, at)?,
    })
}

pub(super) fn statistics(
    c: &mut MyConn,
    filter: &SampleFilter,
    period: Option<u64>,
) -> Result<Vec<Statistics>, Fail> {
    let w = Where::new(filter);
    let Some(period) = period.filter(|p| *p > 0) else {
        let sql = format!(
            "SELECT {AGGREGATES}{FROM}{} GROUP BY m.unit ORDER BY m.unit",
            w.sql
        );
        return run(c, &sql, w.params)?
            .into_iter()
            .map(|mut row| stats_of(&mut row, 0, filter.start, filter.end, 0))
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
    let anchor = match filter.start {
        Some(t) => t,
        None => {
            let sql = format!("SELECT MIN(s.timestamp){FROM}{}", w.sql);
            let mut rows = run(c, &sql, w.params.clone())?;
            match rows.first_mut() {
                Some(row) if !matches!(row.as_ref(0), None | Some(MyValue::NULL)) => {
                    time_at(row, 0)?
                }
                _ => return Ok(Vec::new()),
            }
        }
    };
    // Exact integer microseconds since the anchor (timestamp >= anchor: DIV floors).
    let sql = format!(
        "SELECT TIMESTAMPDIFF(MICROSECOND, ?, s.timestamp) DIV ? AS bucket, {AGGREGATES}
         {FROM}{} AND s.timestamp >= ?
         GROUP BY bucket, m.unit ORDER BY bucket, m.unit",
        w.sql
    );
    let mut params = vec![date(anchor), MyValue::Int(period_us)];
    params.extend(w.params);
    params.push(date(anchor));
    run(c, &sql, params)?
        .into_iter()
        .map(|mut row| {
            let bucket = int(&mut row, 0)?;
            let offset = bucket
                .checked_mul(period_us)
                .ok_or_else(|| corrupt("period start out of range"))?;
            let start = anchor
                .checked_add(time::Duration::microseconds(offset))
                .ok_or_else(|| corrupt("period start out of range"))?;
            let end = start
                .checked_add(time::Duration::microseconds(period_us))
                .ok_or_else(|| corrupt("period end out of range"))?;
            stats_of(&mut row, 1, Some(start), Some(end), period)
        })
        .collect()
}

/// A rollup row's bucket (column 0) and aggregate (columns 2 to 7: count, sum, min, max,
/// first, last); column 1 is the meter's unit or id, which the caller reads.
fn bucket_agg(r: &mut Row) -> Result<(i64, rollup::Agg), Fail> {
    Ok((
        int(r, 0)?,
        rollup::Agg {
            count: int(r, 2)?.max(0) as u64,
            sum: num(r, 3)?,
            min: num(r, 4)?,
            max: num(r, 5)?,
            first: int(r, 6)?,
            last: int(r, 7)?,
        },
    ))
}

/// Buckets in one statement's `IN` list (each one primary-key lookup per meter row).
const BUCKETS_PER_QUERY: i64 = 128;

/// One resource's rollup rows of level `granularity` in [`start`, `end`) µs, for the meter rows
/// named `meter` (all when NULL).
///
/// `rollup_resource`'s primary key is `(granularity, bucket, meter_id, resource_id)`: the
/// buckets of the time range are listed (the range first clamped to the level's stored
/// buckets, two descents of the key, so an open-ended query reads only what exists) and the
/// meter rows looked up first, so that every key part is a constant: one primary-key lookup
/// per bucket and meter row, as the other drivers do, 128 buckets per statement.
fn resource_buckets(
    c: &mut MyConn,
    resource: &str,
    meter: &MyValue,
    granularity: u64,
    start: i64,
    end: i64,
) -> Result<Vec<BucketRow>, Fail> {
    let meters: Vec<(i64, String)> = c.exec(
        "SELECT id, unit FROM meter WHERE (? IS NULL OR name = ?)",
        (meter.clone(), meter.clone()),
    )?;
    let stored: Option<(Option<i64>, Option<i64>)> = c.exec_first(
        "SELECT MIN(bucket), MAX(bucket) FROM rollup_resource WHERE granularity = ?",
        (granularity,),
    )?;
    let (Some((Some(lo), Some(hi))), false) = (stored, meters.is_empty()) else {
        return Ok(Vec::new());
    };
    let step = crate::rollup::micros_of(granularity).max(1);
    // The first bucket at or after the start (buckets are multiples of the step).
    let first = crate::partition::floor_to(start.max(lo), step);
    let first = if first < start.max(lo) {
        first.saturating_add(step)
    } else {
        first
    };
    let last = end.saturating_sub(1).min(hi);
    if first > last {
        return Ok(Vec::new());
    }
    let ids = vec!["?"; meters.len()].join(", ");
    let mut out = Vec::new();
    let mut from = first;
    loop {
        let buckets: Vec<i64> = (0..BUCKETS_PER_QUERY)
            .map(|k| from.saturating_add(k.saturating_mul(step)))
            .take_while(|b| *b <= last)
            .collect();
        let Some(&next) = buckets.last() else {
            break;
        };
        let list = buckets
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut params: Vec<MyValue> = vec![MyValue::UInt(granularity)];
        params.extend(meters.iter().map(|(id, _)| MyValue::Int(*id)));
        params.push(MyValue::from(resource));
        let rows: Vec<Row> = c.exec(
            format!(
                "SELECT b.bucket, b.meter_id, b.`count`, b.`sum`, b.`min`, b.`max`, b.`first`,
                        b.`last`
                   FROM rollup_resource b FORCE INDEX (PRIMARY)
                  WHERE b.granularity = ? AND b.bucket IN ({list}) AND b.meter_id IN ({ids})
                    AND b.resource_id = ?"
            ),
            Params::Positional(params),
        )?;
        for mut r in rows {
            let meter_id = int(&mut r, 1)?;
            let unit = meters
                .iter()
                .find(|(id, _)| *id == meter_id)
                .map(|(_, u)| u.clone())
                .unwrap_or_default();
            let (bucket, agg) = bucket_agg(&mut r)?;
            out.push(BucketRow { bucket, unit, agg });
        }
        if next >= last || next.checked_add(step).is_none() {
            break;
        }
        from = next + step;
    }
    Ok(out)
}

/// Statistics from the coarsest rollup level exact for the query (see `storage::rollup`),
/// among `levels` complete from the filter's start on; else from the samples.
pub(super) fn statistics_from(
    c: &mut MyConn,
    filter: &SampleFilter,
    period: Option<u64>,
    levels: &[Granularity],
    now: i64,
) -> Result<(Vec<Statistics>, StatsSource), Fail> {
    let mut usable = Vec::new();
    if let Some(start) = filter.start.map(to_micros) {
        let complete: Vec<(u64, i64)> =
            c.query("SELECT granularity, complete_from FROM rollup_level")?;
        usable.extend(
            levels
                .iter()
                .filter(|g| {
                    complete
                        .iter()
                        .any(|&(s, from)| s == g.seconds && from <= start)
                })
                .copied(),
        );
    }
    let Some(g) = rollup::exact_granularity(&usable, filter, period, now) else {
        return Ok((statistics(c, filter, period)?, StatsSource::Raw));
    };
    let start = filter.start.map(to_micros).unwrap_or(0);
    let end = filter.end.map_or(i64::MAX, to_micros);
    let meter = filter.meter.as_deref().map_or(MyValue::NULL, MyValue::from);
    let buckets = match &filter.resource_id {
        Some(res) => {
            // A level folded from a finer one: its rows and the finer level's (every sample
            // is in exactly one of the two; crate::rollup::Level).
            let registered = super::schema::load_levels(c)?;
            let mut out = Vec::new();
            for (gran, from) in rollup::resource_granularities(&registered, g.seconds) {
                out.extend(resource_buckets(
                    c,
                    res,
                    &meter,
                    gran,
                    start.max(from),
                    end,
                )?);
            }
            out
        }
        None => {
            let rows: Vec<Row> = c.exec(
                "SELECT b.bucket, m.unit, b.`count`, b.`sum`, b.`min`, b.`max`, b.`first`,
                        b.`last`
                   FROM meter m STRAIGHT_JOIN rollup_meter b
                     ON b.meter_id = m.id AND b.granularity = ? AND b.bucket >= ?
                    AND b.bucket < ?
                  WHERE (? IS NULL OR m.name = ?)",
                (g.seconds, start, end, meter.clone(), meter),
            )?;
            let mut buckets = Vec::with_capacity(rows.len());
            for mut r in rows {
                let unit = text(&mut r, 1)?;
                let (bucket, agg) = bucket_agg(&mut r)?;
                buckets.push(BucketRow { bucket, unit, agg });
            }
            buckets
        }
    };
    let stats = rollup::statistics(buckets, filter, period).map_err(Fail::Storage)?;
    Ok((stats, rollup::source(&g)))
}

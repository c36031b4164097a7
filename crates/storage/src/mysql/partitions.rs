//! Time partitions of the MariaDB/MySQL `sample` table.
//!
//! `sample` is `PARTITION BY RANGE (TO_SECONDS(timestamp))`: partition `p<lo>` (`lo` in µs
//! since the epoch, `pm…` before 1970, as [`Range::name`] spells it) holds the samples below
//! its `VALUES LESS THAN`, down to the previous partition's bound, and the last one,
//! [`CATCH_ALL`], everything after. Ranges are contiguous, so the first partition also holds
//! anything older than its `lo` and there is never a gap.
//!
//! MariaDB's DDL commits implicitly and waits for every open transaction on the table, so a
//! writer adds partitions *before* opening its batch transaction, under a named lock
//! (`GET_LOCK`), re-reading the partitions under it: of several processes needing the same
//! partition, one adds it and the others find it there. Partitions are added ahead of time
//! (the one after today's always exists) and for samples up to [`MAX_NEW`] spans ahead, by
//! splitting the catch-all, which copies only the samples waiting in it (from further in the
//! future: a far-future sample never makes a huge partition that would hold today's samples
//! until its own day). A sample older than the first partition's `lo` gets partitions of its
//! own (splitting the first) only while the first is empty, as on a new store; otherwise it
//! is stored in the first partition, which then waits for its bound to pass the cutoff (a
//! split would copy a whole partition while holding the writers).

use super::{Fail, MyConn};
use crate::partition::{floor_to, Range};
use crate::rollup::Granularity;
use crate::StorageError;
use ::mysql::prelude::Queryable;

/// `TO_SECONDS('1970-01-01 00:00:00')`: MariaDB counts seconds from year 0.
const EPOCH_TO_SECONDS: i64 = 62_167_219_200;

/// The catch-all last partition (`VALUES LESS THAN MAXVALUE`).
pub const CATCH_ALL: &str = "pmax";

/// Partitions are made on demand up to this many spans ahead of now (a sample further in
/// the future waits in [`CATCH_ALL`]), and at most this many spans back for a late sample
/// (beyond: one partition for its span and one for the gap).
const MAX_NEW: i64 = 64;

/// A migrated store gets one partition per span for at most this many spans of history, the
/// older samples one partition together.
const MAX_HISTORY: i64 = 1000;

/// How long a writer waits for another process's partition DDL (seconds).
const LOCK_WAIT: i64 = 60;

/// One partition: its name and range (`lo` as named; the first holds older samples too; the
/// catch-all's `hi` is `i64::MAX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub range: Range,
}

/// `TO_SECONDS` of an instant in µs, which partition bounds are written in.
fn to_seconds(us: i64) -> i64 {
    us.div_euclid(1_000_000) + EPOCH_TO_SECONDS
}

/// The `lo` a partition name carries.
fn lo_of(name: &str) -> Option<i64> {
    let rest = name.strip_prefix('p')?;
    match rest.strip_prefix('m') {
        Some(n) => n.parse::<i64>().ok().map(|n| -n),
        None => rest.parse().ok(),
    }
}

/// The partitions of `sample`, oldest first, the catch-all last; empty when it is not
/// partitioned.
pub fn read(conn: &mut MyConn) -> Result<Vec<Part>, Fail> {
    let rows: Vec<(Option<String>, Option<String>)> = conn.query(
        "SELECT PARTITION_NAME, PARTITION_DESCRIPTION FROM information_schema.PARTITIONS
          WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'sample'
          ORDER BY PARTITION_ORDINAL_POSITION",
    )?;
    let mut out: Vec<Part> = Vec::with_capacity(rows.len());
    for (name, bound) in rows {
        let Some(name) = name else { continue };
        if name == CATCH_ALL {
            let lo = out.last().map_or(i64::MIN, |p| p.range.hi);
            out.push(Part {
                name,
                range: Range { lo, hi: i64::MAX },
            });
            continue;
        }
        let hi = bound
            .as_deref()
            .and_then(|b| b.trim().parse::<i64>().ok())
            .map(|s| (s - EPOCH_TO_SECONDS).saturating_mul(1_000_000));
        match (lo_of(&name), hi) {
            (Some(lo), Some(hi)) => out.push(Part {
                name,
                range: Range { lo, hi },
            }),
            _ => {
                return Err(Fail::Storage(StorageError::Database(format!(
                    "mysql: sample partition {name:?} ({bound:?}) was not made by this driver"
                ))))
            }
        }
    }
    if out.last().is_some_and(|p| p.name != CATCH_ALL) {
        return Err(Fail::Storage(StorageError::Database(
            "mysql: the sample table has no catch-all partition".into(),
        )));
    }
    Ok(out)
}

/// One partition per span covering `[lo, hi)` exactly (aligned; the first and last clipped).
fn per_span(lo: i64, hi: i64, span: i64) -> Vec<Range> {
    let mut out = Vec::new();
    let mut a = lo;
    while a < hi {
        let b = floor_to(a, span).saturating_add(span).min(hi);
        out.push(Range { lo: a, hi: b });
        a = b;
    }
    out
}

/// Partitions covering `[lo, hi)` for a late sample at `lo`: one per span, or beyond
/// [`MAX_NEW`] spans, one for the sample's span and one for the gap up to `hi`.
pub fn late(lo: i64, hi: i64, span_us: i64) -> Vec<Range> {
    let span = span_us.max(1_000_000);
    if lo >= hi {
        return Vec::new();
    }
    if (hi - lo) / span > MAX_NEW {
        let first = floor_to(lo, span).saturating_add(span).min(hi);
        let mut out = vec![Range { lo, hi: first }];
        if first < hi {
            out.push(Range { lo: first, hi });
        }
        return out;
    }
    per_span(lo, hi, span)
}

/// Partitions covering `[lo, hi)` for a migrated store: one per span for the last
/// [`MAX_HISTORY`] spans, one before them for anything older.
pub fn history(lo: i64, hi: i64, span_us: i64) -> Vec<Range> {
    let span = span_us.max(1_000_000);
    let start = floor_to(hi.saturating_sub(MAX_HISTORY.saturating_mul(span)), span).max(lo);
    let mut out = Vec::new();
    if start > lo {
        out.push(Range { lo, hi: start });
    }
    out.extend(per_span(start, hi, span));
    out
}

/// `PARTITION p<lo> VALUES LESS THAN (<TO_SECONDS(hi)>), ...` and, with `catch_all`, the
/// catch-all partition last.
pub fn definitions(ranges: &[Range], catch_all: bool) -> String {
    let mut defs: Vec<String> = ranges
        .iter()
        .map(|r| {
            format!(
                "PARTITION {} VALUES LESS THAN ({})",
                r.name("p"),
                to_seconds(r.hi)
            )
        })
        .collect();
    if catch_all {
        defs.push(format!("PARTITION {CATCH_ALL} VALUES LESS THAN MAXVALUE"));
    }
    defs.join(", ")
}

/// What a writer knows about the partitions (refreshed under the lock when it falls short).
#[derive(Debug, Default)]
pub struct Known {
    parts: Vec<Part>,
    /// The first partition's `lo` when it was found holding samples: older samples go into
    /// it without asking again.
    settled_lo: Option<i64>,
}

/// The bound the partitions before the catch-all must reach: past the span after `now`'s
/// (ahead of time), and past the newest sample when that is at most [`MAX_NEW`] spans ahead.
fn target(max: i64, now: i64, span_us: i64) -> i64 {
    let ahead = now.saturating_add(span_us);
    if max < now.saturating_add(MAX_NEW.saturating_mul(span_us)) {
        ahead.max(max)
    } else {
        ahead
    }
}

impl Known {
    pub fn clear(&mut self) {
        self.parts.clear();
        self.settled_lo = None;
    }

    /// Whether samples from `min` to `max` (µs) go where they belong without DDL.
    fn suffices(&self, min: i64, max: i64, now: i64, span_us: i64) -> bool {
        let n = self.parts.len();
        if n < 2 {
            return false;
        }
        let (first, last) = (&self.parts[0], &self.parts[n - 2]);
        last.range.hi > target(max, now, span_us)
            && (min >= first.range.lo || self.settled_lo == Some(first.range.lo))
    }
}

/// The named lock serializing partition DDL of one database.
fn lock_name(database: &str) -> String {
    format!("collector.partition.{database}")
        .chars()
        .take(64)
        .collect()
}

/// Run `f` holding the partition lock.
pub fn locked<T>(
    conn: &mut MyConn,
    database: &str,
    f: impl FnOnce(&mut MyConn) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let name = lock_name(database);
    let got: Option<Option<i64>> = conn.exec_first("SELECT GET_LOCK(?, ?)", (&name, LOCK_WAIT))?;
    if got.flatten() != Some(1) {
        return Err(Fail::Storage(StorageError::Unavailable(format!(
            "mysql: timed out waiting for lock {name:?} held by another process changing partitions"
        ))));
    }
    let result = f(conn);
    let released = conn.exec_drop("SELECT RELEASE_LOCK(?)", (&name,));
    let out = result?;
    released?;
    Ok(out)
}

/// Make sure samples with timestamps `min..=max` (µs) go to partitions of their own span
/// (but see the module notes), and that the partition after the one holding `now` exists.
/// Call outside any transaction (DDL commits).
pub fn ensure(
    conn: &mut MyConn,
    database: &str,
    known: &mut Known,
    (min, max): (i64, i64),
    now: i64,
    span_us: i64,
) -> Result<(), Fail> {
    if known.suffices(min, max, now, span_us) {
        return Ok(());
    }
    locked(conn, database, |conn| {
        known.parts = read(conn)?;
        let n = known.parts.len();
        if n < 2 {
            return Err(Fail::Storage(StorageError::Database(
                "mysql: the sample table is not partitioned".into(),
            )));
        }
        let (first, last) = (known.parts[0].clone(), known.parts[n - 2].clone());
        let need = target(max, now, span_us);
        if last.range.hi <= need {
            // Copies only the samples waiting in the catch-all (from the far future).
            let hi = floor_to(need, span_us).saturating_add(span_us);
            let defs = definitions(&per_span(last.range.hi, hi, span_us.max(1)), true);
            log::info!("mysql: adding sample partitions: {defs}");
            conn.query_drop(format!(
                "ALTER TABLE sample REORGANIZE PARTITION {CATCH_ALL} INTO ({defs})"
            ))?;
        }
        if min < first.range.lo && known.settled_lo != Some(first.range.lo) {
            let used: Option<i64> = conn.query_first(format!(
                "SELECT 1 FROM sample PARTITION ({}) LIMIT 1",
                first.name
            ))?;
            if used.is_some() {
                known.settled_lo = Some(first.range.lo);
            } else {
                // Empty: splitting it copies nothing.
                let mut ranges = late(floor_to(min, span_us), first.range.lo, span_us);
                ranges.push(first.range);
                let defs = definitions(&ranges, false);
                log::info!("mysql: adding sample partitions: {defs}");
                conn.query_drop(format!(
                    "ALTER TABLE sample REORGANIZE PARTITION {} INTO ({defs})",
                    first.name
                ))?;
            }
        }
        let settled = known.settled_lo;
        known.parts = read(conn)?;
        known.settled_lo = settled;
        Ok(())
    })
}

/// The prefix of graves: tables an expired partition's rows were swapped into (`EXCHANGE
/// PARTITION`), dropped later by [`reap_one`]. The name goes on with the partition's name and
/// the burial time (µs), so it never meets another.
pub const GRAVE_PREFIX: &str = "sample_expired_";

/// How long expiry's DDL waits for `sample`'s metadata lock (seconds; MySQL takes whole
/// seconds only). Writers queue behind a waiting DDL, so a long query on `sample` must not
/// make them wait for it: past this the partition waits for the next pass.
const DDL_WAIT: i64 = 1;

/// Take the partitions entirely older than `cutoff` (µs) out of `sample`, oldest first (the
/// catch-all and the partition before it always stay; a partition straddling the cutoff waits
/// for a later pass): each one's rows are swapped into an empty grave table of the same shape
/// (`EXCHANGE PARTITION`: a rename of files, whatever the rows), then the emptied partition is
/// dropped. Each `ALTER TABLE` waits for the batches in flight and holds new ones for a few
/// ms; the grave's file is deleted later ([`reap_one`]), holding nothing a writer needs (a
/// `DROP PARTITION` of the full partition held them while InnoDB deleted its file: 0.2–0.3 s
/// for 143k–428k rows). Returns the samples expired and the partitions taken out (an empty
/// one is dropped at once).
pub fn bury_expired(
    conn: &mut MyConn,
    database: &str,
    cutoff: i64,
    levels: &[Granularity],
) -> Result<(u64, usize), Fail> {
    locked(conn, database, |conn| {
        let parts = read(conn)?;
        let (mut total, mut buried) = (0u64, 0usize);
        let mut shape: Option<String> = None;
        conn.query_drop(format!("SET SESSION lock_wait_timeout = {DDL_WAIT}"))?;
        let result = (|| -> Result<(), Fail> {
            for p in parts.iter().take(parts.len().saturating_sub(2)) {
                if p.range.hi > cutoff {
                    break;
                }
                let shape = match &shape {
                    Some(s) => s,
                    None => shape.insert(grave_shape(conn)?),
                };
                match bury_one(conn, p, levels, shape) {
                    Ok(n) => {
                        total += n;
                        buried += 1;
                    }
                    Err(Fail::My(::mysql::Error::MySqlError(e))) if e.code == 1205 => {
                        // A long statement holds `sample`; a half-done burial (rows swapped
                        // out, the empty partition left) is finished by the next pass.
                        log::warn!(
                            "mysql: partition {} not expired this time (sample is busy): {}",
                            p.name,
                            e.message
                        );
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })();
        let reset = conn.query_drop("SET SESSION lock_wait_timeout = DEFAULT");
        result?;
        reset?;
        Ok((total, buried))
    })
}

/// Swap partition `p`'s rows into a new grave and drop the emptied partition; its rows.
fn bury_one(conn: &mut MyConn, p: &Part, levels: &[Granularity], shape: &str) -> Result<u64, Fail> {
    let now = crate::model::to_micros(time::OffsetDateTime::now_utc());
    let t0 = std::time::Instant::now();
    let (rows, source) = rows_of(conn, p, levels, now)?;
    let t1 = std::time::Instant::now();
    if rows == 0 {
        // Nothing to move: dropping an empty partition is as quick as the exchange.
        conn.query_drop(format!("ALTER TABLE sample DROP PARTITION {}", p.name))?;
        expired_below(conn, p.range.hi)?;
        log::info!("mysql: dropped empty sample partition {}", p.name);
        return Ok(0);
    }
    let grave = format!("{GRAVE_PREFIX}{}_{now}", p.name);
    conn.query_drop(format!("CREATE TABLE `{grave}` {shape}"))?;
    let t2 = std::time::Instant::now();
    // Both statements under one table lock: the writers' batch in flight is waited for once
    // (each `ALTER TABLE` alone waited for one, and a batch takes ~0.2 s on a 1 M-row store).
    conn.query_drop(format!("LOCK TABLES sample WRITE, `{grave}` WRITE"))?;
    let t3 = std::time::Instant::now();
    let swapped = conn
        .query_drop(format!(
            "ALTER TABLE sample EXCHANGE PARTITION {} WITH TABLE `{grave}`",
            p.name
        ))
        .and_then(|()| conn.query_drop(format!("ALTER TABLE sample DROP PARTITION {}", p.name)));
    let unlocked = conn.query_drop("UNLOCK TABLES");
    swapped?;
    unlocked?;
    expired_below(conn, p.range.hi)?;
    let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
    log::info!(
        "mysql: expired sample partition {} ({rows} samples, from {source}) into {grave}; \
         count {:.1} ms, grave made {:.1} ms, lock {:.1} ms, exchange and drop partition {:.1} ms",
        p.name,
        ms(t0, t1),
        ms(t1, t2),
        ms(t2, t3),
        ms(t3, std::time::Instant::now())
    );
    Ok(rows)
}

/// Every sample below `hi` (µs) has been expired: the oldest partition, just dropped, held
/// them all (`expired_before`, see the schema's version 3).
fn expired_below(conn: &mut MyConn, hi: i64) -> Result<(), Fail> {
    conn.exec_drop("UPDATE expired_before SET us = GREATEST(us, ?)", (hi,))?;
    Ok(())
}

/// What follows `CREATE TABLE <name>` for a grave: `sample`'s own definition as the server
/// shows it, without the partitioning, so `EXCHANGE PARTITION` accepts it whatever
/// migrations shaped `sample`.
fn grave_shape(conn: &mut MyConn) -> Result<String, Fail> {
    let bad = |why: &str| {
        Fail::Storage(StorageError::Database(format!(
            "mysql: cannot make a table shaped as sample ({why})"
        )))
    };
    let row: Option<(String, String)> = conn.query_first("SHOW CREATE TABLE sample")?;
    let (_, ddl) = row.ok_or_else(|| bad("SHOW CREATE TABLE answered nothing"))?;
    // MariaDB: `\n PARTITION BY RANGE ...`; MySQL: `\n/*!50100 PARTITION BY RANGE ... */`.
    let at = ddl
        .rfind("PARTITION BY")
        .ok_or_else(|| bad("not partitioned"))?;
    let at = ddl[..at]
        .rfind('\n')
        .ok_or_else(|| bad("unexpected layout"))?;
    let body = ddl[..at].trim_end();
    let rest = body
        .strip_prefix("CREATE TABLE `sample`")
        .ok_or_else(|| bad("unexpected layout"))?;
    Ok(rest.trim_start().to_string())
}

/// The rows of partition `p`, the oldest left (it also holds any sample older than its `lo`),
/// and where the number came from. From `rollup_meter` when a level counts the partition's
/// span exactly (every inserted sample is counted there, in its batch's transaction): the
/// level's buckets tile `[lo, hi)`, none of them past the level's retention, the level
/// complete since `lo`, no earlier expiry reached above `lo` (`expired_before`: a partition
/// made again for an expired span), and no sample in the partition older than `lo` (one
/// index descent per meter). Else `COUNT(*)`, which reads the partition (0.11 s for 143k rows, 0.47 s for 428k).
fn rows_of(
    conn: &mut MyConn,
    p: &Part,
    levels: &[Granularity],
    now: i64,
) -> Result<(u64, &'static str), Fail> {
    let complete: Vec<(u64, i64)> =
        conn.query("SELECT granularity, complete_from FROM rollup_level")?;
    let Range { lo, hi } = p.range;
    // A partition made again for a span expired before: its rollups count those samples too.
    let expired_before: Option<Option<i64>> =
        conn.query_first("SELECT MAX(us) FROM expired_before")?;
    let fresh = expired_before.flatten().map_or(true, |us| lo >= us);
    let exact =
        crate::rollup::counting_granularity(levels, &complete, lo, hi, now).filter(|_| fresh);
    if let Some(g) = exact {
        // Each meter's first sample in the partition, one index descent each (as `EXISTS`,
        // the optimizer materialized a scan of the whole partition's index: 127 ms for 143k).
        let older: Option<i64> = conn.exec_first(
            format!(
                "SELECT 1 FROM meter m
                  WHERE (SELECT s.timestamp FROM sample PARTITION ({}) s WHERE s.meter_id = m.id
                          ORDER BY s.timestamp LIMIT 1)
                        < TIMESTAMPADD(MICROSECOND, ?, '1970-01-01')
                  LIMIT 1",
                p.name
            ),
            (lo,),
        )?;
        if older.is_none() {
            let n: Option<i64> = conn.exec_first(
                "SELECT CAST(COALESCE(SUM(b.`count`), 0) AS SIGNED)
                   FROM meter m STRAIGHT_JOIN rollup_meter b
                     ON b.meter_id = m.id AND b.granularity = ? AND b.bucket >= ? AND b.bucket < ?",
                (g.seconds, lo, hi),
            )?;
            return Ok((n.unwrap_or(0).max(0) as u64, "rollups"));
        }
    }
    let n: Option<u64> = conn.query_first(format!(
        "SELECT COUNT(*) FROM sample PARTITION ({})",
        p.name
    ))?;
    Ok((n.unwrap_or(0), "COUNT(*)"))
}

/// Whether any grave is waiting to be dropped.
pub fn graves_pending(conn: &mut MyConn) -> Result<bool, Fail> {
    Ok(!graves(conn, 1)?.is_empty())
}

/// Up to `limit` graves, by name.
fn graves(conn: &mut MyConn, limit: u32) -> Result<Vec<String>, Fail> {
    Ok(conn.exec(
        format!(
            "SELECT TABLE_NAME FROM information_schema.TABLES
              WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME LIKE ?
              ORDER BY TABLE_NAME LIMIT {limit}"
        ),
        (format!("{}%", GRAVE_PREFIX.replace('_', "\\_")),),
    )?)
}

/// Drop one grave (InnoDB deletes its file: ~50 ms for 150 MB), holding only the grave's own
/// metadata lock and, so as never to drop a grave expiry has made but not filled yet, the
/// partition lock, taken without waiting (when expiry holds it, the step is skipped). Returns
/// the grave dropped, if any, and whether more are waiting.
pub fn reap_one(conn: &mut MyConn, database: &str) -> Result<(Option<String>, bool), Fail> {
    let found = graves(conn, 2)?;
    let Some(grave) = found.first().cloned() else {
        return Ok((None, false));
    };
    let name = lock_name(database);
    let got: Option<Option<i64>> = conn.exec_first("SELECT GET_LOCK(?, 0)", (&name,))?;
    if got.flatten() != Some(1) {
        return Ok((None, true));
    }
    let t0 = std::time::Instant::now();
    let dropped = conn.query_drop(format!("DROP TABLE IF EXISTS `{grave}`"));
    let released = conn.exec_drop("SELECT RELEASE_LOCK(?)", (&name,));
    dropped?;
    released?;
    log::info!(
        "mysql: reaped {grave} in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok((Some(grave), found.len() > 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::DAY_US;

    #[test]
    fn pieces_cover_exactly_and_align() {
        let d = DAY_US;
        assert_eq!(
            per_span(d / 2, 3 * d, d),
            vec![
                Range { lo: d / 2, hi: d },
                Range { lo: d, hi: 2 * d },
                Range {
                    lo: 2 * d,
                    hi: 3 * d
                },
            ]
        );
        // A late sample far before: its own span first, then the gap.
        assert_eq!(
            late(0, 1000 * d, d),
            vec![
                Range { lo: 0, hi: d },
                Range {
                    lo: d,
                    hi: 1000 * d
                }
            ]
        );
        assert_eq!(late(0, 3 * d, d).len(), 3);
        assert!(late(5, 5, d).is_empty());
        // Long history: the last MAX_HISTORY spans one each, one partition before them.
        let h = history(0, 2000 * d, d);
        assert_eq!(h.len() as i64, MAX_HISTORY + 1);
        assert_eq!(
            h[0],
            Range {
                lo: 0,
                hi: 1000 * d
            }
        );
        assert_eq!(history(0, 3 * d, d).len(), 3);
    }

    #[test]
    fn the_target_is_ahead_of_now_and_near_future_samples() {
        let d = DAY_US;
        assert_eq!(target(0, 0, d), d);
        assert_eq!(target(10 * d, 0, d), 10 * d);
        // Far in the future: the catch-all holds it.
        assert_eq!(target(1000 * d, 0, d), d);
    }

    #[test]
    fn names_and_bounds_round_trip() {
        for lo in [0, DAY_US, -DAY_US * 365 * 900] {
            let r = Range {
                lo,
                hi: lo + DAY_US,
            };
            assert_eq!(lo_of(&r.name("p")), Some(lo));
        }
        assert_eq!(to_seconds(0), EPOCH_TO_SECONDS);
        assert_eq!(to_seconds(-1), EPOCH_TO_SECONDS - 1);
        assert_eq!(lo_of("pmax"), None);
    }
}

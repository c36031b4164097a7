//! Time partitions of the MariaDB/MySQL `sample` table.
//!
//! `sample` is `PARTITION BY RANGE (TO_SECONDS(timestamp))`: partition `p<lo>` (`lo` in µs
//! since the epoch, `pm…` before 1970, as [`Range::name`] spells it) holds the samples below
//! its `VALUES LESS THAN`, down to the previous partition's bound. Ranges are contiguous, so the
//! first partition also holds anything older than its `lo` and there is never a gap; at the
//! other end nothing can be stored at or after the last bound, so partitions are added ahead
//! of time (the one after today's always exists) and on demand for a future sample.
//!
//! MariaDB's DDL commits implicitly and waits for every open transaction on the table, so a
//! writer adds partitions *before* opening its batch transaction, under a named lock
//! (`GET_LOCK`), re-reading the partitions under it: of several processes needing the same
//! partition, one adds it and the others find it there. Adding at the end (`ADD PARTITION`)
//! copies nothing. A sample older than the first partition's `lo` gets partitions of its own
//! (`REORGANIZE PARTITION` of the first) only while the first is empty, as on a new store;
//! otherwise it is stored in the first partition, which then waits for its last sample to
//! expire (a reorganization would copy a whole partition while holding the writers).

use super::{Fail, MyConn};
use crate::partition::{floor_to, Range};
use crate::StorageError;
use ::mysql::prelude::Queryable;

/// `TO_SECONDS('1970-01-01 00:00:00')`: MariaDB counts seconds from year 0.
const EPOCH_TO_SECONDS: i64 = 62_167_219_200;

/// More spans than this between two bounds are covered by one catch-all partition for the
/// gap and one span-long partition, rather than one partition per span (MariaDB allows 8192
/// partitions per table).
const MAX_NEW: i64 = 64;

/// How long a writer waits for another process's partition DDL (seconds).
const LOCK_WAIT: i64 = 60;

/// One partition: its name and range (`lo` as named; the first holds older samples too).
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

/// The partitions of `sample`, oldest first; empty when it is not partitioned.
pub fn read(conn: &mut MyConn) -> Result<Vec<Part>, Fail> {
    let rows: Vec<(Option<String>, Option<String>)> = conn.query(
        "SELECT PARTITION_NAME, PARTITION_DESCRIPTION FROM information_schema.PARTITIONS
          WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'sample'
          ORDER BY PARTITION_ORDINAL_POSITION",
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (name, bound) in rows {
        let Some(name) = name else { continue };
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
    Ok(out)
}

/// Partitions covering `[lo, hi)` exactly: one per span (aligned; the first and last clipped),
/// or, beyond [`MAX_NEW`] spans, one span-long partition at the end (`at_end`, for a future
/// sample) or the start (for a late one) and one for the rest.
pub fn pieces(lo: i64, hi: i64, span_us: i64, at_end: bool) -> Vec<Range> {
    let span = span_us.max(1_000_000);
    let mut out = Vec::new();
    if lo >= hi {
        return out;
    }
    if (hi - lo) / span > MAX_NEW && !at_end {
        let first = floor_to(lo, span).saturating_add(span).min(hi);
        out.push(Range { lo, hi: first });
        if first < hi {
            out.push(Range { lo: first, hi });
        }
        return out;
    }
    if (hi - lo) / span > MAX_NEW {
        let last = floor_to(hi - 1, span).max(lo);
        if last > lo {
            out.push(Range { lo, hi: last });
        }
        out.push(Range { lo: last, hi });
        return out;
    }
    let mut a = lo;
    while a < hi {
        let b = floor_to(a, span).saturating_add(span).min(hi);
        out.push(Range { lo: a, hi: b });
        a = b;
    }
    out
}

/// `PARTITION p<lo> VALUES LESS THAN (<TO_SECONDS(hi)>), ...`
pub fn definitions(ranges: &[Range]) -> String {
    ranges
        .iter()
        .map(|r| {
            format!(
                "PARTITION {} VALUES LESS THAN ({})",
                r.name("p"),
                to_seconds(r.hi)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a writer knows about the partitions (refreshed under the lock when it falls short).
#[derive(Debug, Default)]
pub struct Known {
    parts: Vec<Part>,
    /// The first partition's `lo` when it was found holding samples: older samples go into
    /// it without asking again.
    settled_lo: Option<i64>,
}

impl Known {
    pub fn clear(&mut self) {
        self.parts.clear();
        self.settled_lo = None;
    }

    /// Whether samples from `min` to `max` (µs) can be inserted and the partition after
    /// `now`'s exists, without DDL.
    fn suffices(&self, min: i64, max: i64, now: i64, span_us: i64) -> bool {
        let (Some(first), Some(last)) = (self.parts.first(), self.parts.last()) else {
            return false;
        };
        last.range.hi > max.max(now.saturating_add(span_us))
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

/// Make sure samples with timestamps `min..=max` (µs) can be inserted, and that the partition
/// after the one holding `now` exists. Call outside any transaction (DDL commits).
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
        let (Some(first), Some(last)) = (known.parts.first(), known.parts.last()) else {
            return Err(Fail::Storage(StorageError::Database(
                "mysql: the sample table is not partitioned".into(),
            )));
        };
        let (first, last) = (first.clone(), last.clone());
        let need = max.max(now.saturating_add(span_us));
        if last.range.hi <= need {
            let hi = floor_to(need, span_us).saturating_add(span_us);
            let defs = definitions(&pieces(last.range.hi, hi, span_us, true));
            log::info!("mysql: adding sample partitions: {defs}");
            conn.query_drop(format!("ALTER TABLE sample ADD PARTITION ({defs})"))?;
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
                let mut ranges = pieces(floor_to(min, span_us), first.range.lo, span_us, false);
                ranges.push(first.range);
                let defs = definitions(&ranges);
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

/// Drop the partitions entirely older than `cutoff` (µs), one `ALTER TABLE` each (each waits
/// for the batches in flight and holds new ones only while the partition's file is removed);
/// the last partition always stays (MariaDB cannot drop them all). Returns the samples dropped.
pub fn drop_expired(conn: &mut MyConn, database: &str, cutoff: i64) -> Result<u64, Fail> {
    locked(conn, database, |conn| {
        let parts = read(conn)?;
        let mut total = 0u64;
        for p in parts.iter().take(parts.len().saturating_sub(1)) {
            if p.range.hi > cutoff {
                break;
            }
            let n: Option<u64> = conn.query_first(format!(
                "SELECT COUNT(*) FROM sample PARTITION ({})",
                p.name
            ))?;
            conn.query_drop(format!("ALTER TABLE sample DROP PARTITION {}", p.name))?;
            log::info!("mysql: dropped sample partition {} ({n:?} samples)", p.name);
            total += n.unwrap_or(0);
        }
        Ok(total)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::DAY_US;

    #[test]
    fn pieces_cover_exactly_and_align() {
        let p = pieces(DAY_US / 2, 3 * DAY_US, DAY_US, true);
        assert_eq!(
            p,
            vec![
                Range {
                    lo: DAY_US / 2,
                    hi: DAY_US
                },
                Range {
                    lo: DAY_US,
                    hi: 2 * DAY_US
                },
                Range {
                    lo: 2 * DAY_US,
                    hi: 3 * DAY_US
                },
            ]
        );
        // Far apart: a gap partition and one span-long one at the end.
        let far = pieces(0, 1000 * DAY_US, DAY_US, true);
        assert_eq!(
            far,
            vec![
                Range {
                    lo: 0,
                    hi: 999 * DAY_US
                },
                Range {
                    lo: 999 * DAY_US,
                    hi: 1000 * DAY_US
                },
            ]
        );
        // A late sample far before: its own span first, then the gap.
        assert_eq!(
            pieces(0, 1000 * DAY_US, DAY_US, false),
            vec![
                Range { lo: 0, hi: DAY_US },
                Range {
                    lo: DAY_US,
                    hi: 1000 * DAY_US
                },
            ]
        );
        assert!(pieces(5, 5, DAY_US, true).is_empty());
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

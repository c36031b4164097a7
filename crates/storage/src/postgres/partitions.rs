//! Time partitions of the PostgreSQL `sample` table (schema version 3).
//!
//! `sample` is range-partitioned on `timestamp` (declarative partitioning): one partition
//! `sample_<lo>` per span (`StorageOptions::partition_span_seconds`, UTC-aligned; `lo` is the
//! first microsecond, `m` for a minus sign), listed in `sample_partition (lo, hi, name)` in
//! the same transaction that creates or drops it. The arithmetic (alignment, clipping against
//! neighbours after a span change, which partitions a cutoff expires) is `crate::partition`'s,
//! shared with the other drivers.
//!
//! Creation and removal take the transaction-scoped advisory lock [`LOCK_KEY`] and read the
//! catalog again under it, so writers on many hosts creating the same partition do not race:
//! the first creates it, the others find it made.

use super::Fail;
use crate::partition::{self, Partitions, Range};
use crate::StorageError;
use ::postgres::error::SqlState;
use ::postgres::{Client, GenericClient};

/// The prefix of partition names.
pub const PREFIX: &str = "sample_";

/// The advisory lock held while partitions are created or dropped ("collpart" in ASCII).
const LOCK_KEY: i64 = 0x636f_6c6c_7061_7274;

/// How long making a partition waits for the table lock (creating a partition locks `sample`
/// exclusively for an instant; writers queue behind it while it waits). Made ahead, a
/// partition is rarely made on the hot path.
const DDL_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";

/// Expiry counts the rows of a partition up to this size (a few ms); above, it takes the
/// statistics' count.
const COUNT_UP_TO_BYTES: i64 = 2 << 20;

/// The partitions listed in the catalog.
pub fn load(client: &mut impl GenericClient) -> Result<Partitions, ::postgres::Error> {
    let rows = client.query("SELECT lo, hi FROM sample_partition", &[])?;
    Ok(Partitions::from_ranges(rows.iter().map(|r| Range {
        lo: r.get(0),
        hi: r.get(1),
    })))
}

/// `us` (µs since the epoch) as a PostgreSQL `timestamptz` literal in UTC, exact to the
/// microsecond, years before 1 as `BC`.
pub fn literal(us: i64) -> Result<String, Fail> {
    let t = crate::model::from_micros(us).ok_or_else(|| {
        Fail::Storage(StorageError::Database(format!(
            "postgresql: partition bound {us} µs is out of range"
        )))
    })?;
    let year = t.year();
    let (y, era) = if year <= 0 {
        (1 - year, " BC")
    } else {
        (year, "")
    };
    Ok(format!(
        "{y:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00{era}",
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    ))
}

/// Create partition `r` and list it (inside the caller's transaction).
pub fn create(client: &mut impl GenericClient, r: Range) -> Result<(), Fail> {
    let name = r.name(PREFIX);
    client.batch_execute(&format!(
        "CREATE TABLE {name} PARTITION OF sample FOR VALUES FROM ('{}') TO ('{}')",
        literal(r.lo)?,
        literal(r.hi)?
    ))?;
    client.execute(
        "INSERT INTO sample_partition (lo, hi, name) VALUES ($1, $2, $3)",
        &[&r.lo, &r.hi, &name],
    )?;
    Ok(())
}

/// Make sure a partition holds each of `timestamps` (µs), creating the missing ones in one
/// transaction under the advisory lock, after reading the catalog again (another process may
/// have made or dropped some). `known` is replaced by the catalog as committed. Returns how
/// many partitions this call created.
pub fn ensure(
    client: &mut Client,
    known: &mut Partitions,
    timestamps: &[i64],
    span_us: i64,
) -> Result<usize, Fail> {
    let mut tx = client.transaction()?;
    tx.batch_execute(DDL_LOCK_TIMEOUT)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    let mut fresh = load(&mut tx)?;
    let mut made = 0;
    let planned = partition::plan(&fresh, timestamps.iter().copied(), span_us);
    for (r, _) in planned {
        if fresh.find(r.lo) == Some(r) {
            continue;
        }
        log::info!(
            "postgresql: creating partition {} for [{}, {})",
            r.name(PREFIX),
            literal(r.lo)?,
            literal(r.hi)?
        );
        create(&mut tx, r)?;
        fresh.insert(r);
        made += 1;
    }
    tx.commit()?;
    *known = fresh;
    Ok(made)
}

/// Whether every timestamp falls in a known partition (the hot path's check).
pub fn covers(known: &Partitions, timestamps: &[i64]) -> bool {
    timestamps.iter().all(|&ts| known.find(ts).is_some())
}

/// The insert found no partition for a row: one was dropped (or never made) after this
/// process read the catalog.
pub fn is_missing_partition(e: &::postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::CHECK_VIOLATION && db.message().starts_with("no partition of")
    })
}

/// Drop the partitions entirely older than `cutoff` (µs), one transaction each (the advisory
/// lock, then the drop, which holds `sample`'s lock only for an instant); returns the rows
/// they held. A partition straddling the cutoff waits for a later pass. A partition of up to
/// [`COUNT_UP_TO_BYTES`] is counted; a larger one's rows are the statistics system's live-row
/// count (or else the planner's estimate), so the time does not grow with the rows.
pub fn drop_expired(client: &mut Client, cutoff: i64) -> Result<u64, Fail> {
    let mut total = 0u64;
    let known = load(client)?;
    for r in known.expired(cutoff) {
        match drop_one(client, r) {
            Ok(rows) => total += rows,
            Err(Fail::Pg(e)) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                // A long statement holds `sample`: writers would queue behind the drop.
                log::warn!(
                    "postgresql: partition {} not dropped this time (sample is busy): {e}",
                    r.name(PREFIX)
                );
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// How long a drop waits for `sample`'s lock: writers queue behind it meanwhile, so no
/// longer than about a batch; the partition waits for the next pass otherwise.
const DROP_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '500ms'";

/// Drop partition `r` if still listed; the rows it held.
fn drop_one(client: &mut Client, r: Range) -> Result<u64, Fail> {
    let name = r.name(PREFIX);
    let mut tx = client.transaction()?;
    tx.batch_execute(DROP_LOCK_TIMEOUT)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    // Listed still (another process may have dropped it meanwhile)?
    let listed = tx
        .query_opt(
            "SELECT 1 FROM sample_partition WHERE lo = $1 AND hi = $2",
            &[&r.lo, &r.hi],
        )?
        .is_some();
    if !listed {
        return Ok(0);
    }
    // Its size on disk, the statistics system's live-row count (inserts minus deletes, exact
    // for a partition only ever inserted into) and the planner's estimate.
    let (bytes, live, tuples): (i64, i64, f32) = tx
        .query_opt(
            "SELECT pg_relation_size(c.oid), COALESCE(pg_stat_get_live_tuples(c.oid), 0),
                    c.reltuples
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&name],
        )?
        .map_or((0, 0, -1.0), |row| (row.get(0), row.get(1), row.get(2)));
    let rows = if bytes > COUNT_UP_TO_BYTES && live > 0 {
        live as u64
    } else if bytes > COUNT_UP_TO_BYTES && tuples >= 0.0 {
        tuples as u64
    } else {
        let n: i64 = tx
            .query_one(&format!("SELECT COUNT(*) FROM {name}"), &[])?
            .get(0);
        n.max(0) as u64
    };
    tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))?;
    tx.execute(
        "DELETE FROM sample_partition WHERE lo = $1 AND hi = $2",
        &[&r.lo, &r.hi],
    )?;
    tx.commit()?;
    log::info!("postgresql: dropped expired partition {name} ({rows} samples)");
    Ok(rows)
}

/// The advisory lock, for callers that must not run while partitions change (expiry's
/// orphan deletion, the migration).
pub fn lock(client: &mut impl GenericClient) -> Result<(), ::postgres::Error> {
    client.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_exact_utc_and_bc_before_year_one() {
        let f = |us| literal(us).ok().unwrap_or_default();
        assert_eq!(f(0), "1970-01-01 00:00:00.000000+00");
        assert_eq!(f(-1), "1969-12-31 23:59:59.999999+00");
        assert_eq!(f(1_764_460_800_000_001), "2025-11-30 00:00:00.000001+00");
        // Year 0 of the proleptic calendar is 1 BC.
        assert_eq!(
            f(-62_167_219_200_000_000),
            "0001-01-01 00:00:00.000000+00 BC"
        );
        assert!(literal(i64::MAX).is_err());
    }
}

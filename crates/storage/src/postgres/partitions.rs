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
use crate::rollup::Granularity;
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

/// Without a rollup level that counts it, expiry counts the rows of a partition up to this
/// size (a few ms); above, it takes the statistics' count.
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

/// The prefix of graves: tables expiry detached from `sample` and renamed, whose files
/// [`reap_one`] deletes later. The name goes on with the partition's `lo` and the burial
/// time (µs), so a partition made again for the same span, and expired again, never meets
/// its old grave.
pub const GRAVE_PREFIX: &str = "sample_expired_";

/// Take the partitions entirely older than `cutoff` (µs) out of `sample`, one short
/// transaction each (the advisory lock, `DETACH PARTITION`, a rename to a grave, the catalog
/// row); returns the rows they held. A partition straddling the
/// cutoff waits for a later pass. From the commit on no query sees the rows; the grave's
/// files are deleted later by [`reap_one`], outside any lock a writer takes. The rows are
/// counted from the rollups ([`rows_of`]), so the time does not grow with them.
pub fn bury_expired(client: &mut Client, cutoff: i64, levels: &[Granularity]) -> Result<u64, Fail> {
    let mut total = 0u64;
    let known = load(client)?;
    for r in known.expired(cutoff) {
        match bury_one(client, r, levels) {
            Ok(Some(rows)) => total += rows,
            Ok(None) => {}
            Err(Fail::Pg(e)) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                // A long statement holds `sample`: writers would queue behind the detach.
                log::warn!(
                    "postgresql: partition {} not expired this time (sample is busy): {e}",
                    r.name(PREFIX)
                );
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// How long a detach waits for `sample`'s lock: writers queue behind it meanwhile, so no
/// longer than about a batch; the partition waits for the next pass otherwise.
const DETACH_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '500ms'";

/// Detach partition `r` into a grave if still listed; the rows it held.
fn bury_one(client: &mut Client, r: Range, levels: &[Granularity]) -> Result<Option<u64>, Fail> {
    let name = r.name(PREFIX);
    let started = std::time::Instant::now();
    let mut tx = client.transaction()?;
    tx.batch_execute(DETACH_LOCK_TIMEOUT)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    // Listed still (another process may have expired it meanwhile)?
    let listed = tx
        .query_opt(
            "SELECT 1 FROM sample_partition WHERE lo = $1 AND hi = $2",
            &[&r.lo, &r.hi],
        )?
        .is_some();
    if !listed {
        return Ok(None);
    }
    let locked = std::time::Instant::now();
    let now = crate::model::to_micros(time::OffsetDateTime::now_utc());
    let grave = format!("{GRAVE_PREFIX}{}_{now}", r.name(""));
    // Catalog changes only: the files stay, so `sample`'s lock is held for an instant and the
    // commit has nothing to delete (a DROP deleted them at commit, holding the lock meanwhile).
    tx.batch_execute(&format!(
        "ALTER TABLE sample DETACH PARTITION {name}; ALTER TABLE {name} RENAME TO {grave}"
    ))?;
    let detached = std::time::Instant::now();
    // Counted holding `sample`'s lock, so no insert is running: every row the partition held
    // is committed, and counted in the rollups by the statement that inserted it.
    let (rows, source) = rows_of(&mut tx, r, &grave, levels, now)?;
    tx.execute(
        "DELETE FROM sample_partition WHERE lo = $1 AND hi = $2",
        &[&r.lo, &r.hi],
    )?;
    tx.execute("UPDATE expired_before SET us = GREATEST(us, $1)", &[&r.hi])?;
    let counted = std::time::Instant::now();
    tx.commit()?;
    let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
    log::info!(
        "postgresql: expired partition {name} ({rows} samples, from {source}) into {grave}; \
         lock {:.1} ms, detach {:.1} ms, count {:.1} ms, commit {:.1} ms",
        ms(started, locked),
        ms(locked, detached),
        ms(detached, counted),
        ms(counted, std::time::Instant::now())
    );
    Ok(Some(rows))
}

/// The rows of the partition `r`, detached as `table`, and where the number came from: from
/// `rollup_meter` when a level counts its range exactly (`crate::rollup::counting_granularity`;
/// a partition holds exactly its range) and no earlier expiry reached into the range
/// (`expired_before`), one index range per meter; else an exact `COUNT(*)`
/// for a partition of up to [`COUNT_UP_TO_BYTES`] and above that the statistics system's
/// live-row count (inserts minus deletes, exact for a partition only inserted into until
/// `ANALYZE` replaces it by its estimate), or else the planner's estimate.
fn rows_of(
    tx: &mut ::postgres::Transaction<'_>,
    r: Range,
    table: &str,
    levels: &[Granularity],
    now: i64,
) -> Result<(u64, &'static str), Fail> {
    let complete: Vec<(u64, i64)> = tx
        .query("SELECT granularity, complete_from FROM rollup_level", &[])?
        .iter()
        .map(|row| (row.get::<_, i64>(0).max(0) as u64, row.get(1)))
        .collect();
    // A partition made again for a span expired before: its rollups count those samples too.
    let expired_before: Option<i64> = tx
        .query_opt("SELECT MAX(us) FROM expired_before", &[])?
        .and_then(|row| row.get(0));
    let fresh = expired_before.map_or(true, |us| r.lo >= us);
    let level = crate::rollup::counting_granularity(levels, &complete, r.lo, r.hi, now);
    if let Some(g) = level.filter(|_| fresh) {
        let n: i64 = tx
            .query_one(
                "SELECT COALESCE(SUM(x.n), 0)::BIGINT FROM meter m CROSS JOIN LATERAL
                   (SELECT SUM(b.count) AS n FROM rollup_meter b
                     WHERE b.meter_id = m.id AND b.granularity = $1
                       AND b.bucket >= $2 AND b.bucket < $3) x",
                &[&(g.seconds as i64), &r.lo, &r.hi],
            )?
            .get(0);
        return Ok((n.max(0) as u64, "rollups"));
    }
    let (bytes, live, tuples): (i64, i64, f32) = tx
        .query_opt(
            "SELECT pg_relation_size(c.oid), COALESCE(pg_stat_get_live_tuples(c.oid), 0),
                    c.reltuples
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table],
        )?
        .map_or((0, 0, -1.0), |row| (row.get(0), row.get(1), row.get(2)));
    Ok(if bytes > COUNT_UP_TO_BYTES && live > 0 {
        (live as u64, "live-row count")
    } else if bytes > COUNT_UP_TO_BYTES && tuples >= 0.0 {
        (tuples as u64, "planner estimate")
    } else {
        let n: i64 = tx
            .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])?
            .get(0);
        (n.max(0) as u64, "COUNT(*)")
    })
}

/// Whether any grave is waiting to be reaped.
pub fn graves_pending(client: &mut impl GenericClient) -> Result<bool, ::postgres::Error> {
    Ok(!graves(client, 1)?.is_empty())
}

/// Up to `limit` graves, oldest burial first (by name: same `lo` digits count in practice).
fn graves(client: &mut impl GenericClient, limit: i64) -> Result<Vec<String>, ::postgres::Error> {
    let rows = client.query(
        "SELECT c.relname::TEXT FROM pg_class c
          WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
            AND c.relname LIKE $1 ORDER BY c.relname LIMIT $2",
        &[&format!("{}%", GRAVE_PREFIX.replace('_', "\\_")), &limit],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// How long reaping waits for a grave's lock (only another reaper takes it).
const REAP_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '100ms'";

/// One bounded step of dropping the oldest grave: its unique constraint, then each index, one
/// per step, then the table (each deletes files, which is what takes the time: a 4.3 M-row
/// grave dropped whole took 853 ms, its parts ~60-290 ms each); nothing a writer or reader
/// locks is held meanwhile. Returns the grave worked on, if any, and whether more work is
/// waiting (this grave's remaining parts or another grave).
pub fn reap_one(client: &mut Client) -> Result<(Option<String>, bool), ::postgres::Error> {
    let found = graves(client, 2)?;
    let Some(grave) = found.first() else {
        return Ok((None, false));
    };
    let t0 = std::time::Instant::now();
    let mut tx = client.transaction()?;
    tx.batch_execute(REAP_LOCK_TIMEOUT)?;
    // The partition's copy of the parent's unique constraint stays with it when detached
    // and owns its index: it goes as a constraint. Then plain indexes, then the table.
    let part: Option<String> = tx
        .query_opt(
            "SELECT 'ALTER TABLE ' || quote_ident($1) || ' DROP CONSTRAINT ' || quote_ident(conname)
               FROM pg_constraint
              WHERE conrelid = to_regclass(quote_ident($1)) AND contype IN ('u', 'p')
             UNION ALL
             SELECT 'DROP INDEX ' || quote_ident(i.relname)
               FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
              WHERE x.indrelid = to_regclass(quote_ident($1))
                AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
             LIMIT 1",
            &[grave],
        )?
        .map(|r| r.get(0));
    let what = match &part {
        Some(sql) => {
            tx.batch_execute(sql)?;
            "a part of"
        }
        None => {
            tx.batch_execute(&format!("DROP TABLE IF EXISTS {grave}"))?;
            "the rest of"
        }
    };
    tx.commit()?;
    log::info!(
        "postgresql: reaped {what} {grave} in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok((Some(grave.clone()), part.is_some() || found.len() > 1))
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

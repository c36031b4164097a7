//! The MySQL/MariaDB schema and its migrations.
//!
//! MySQL's DDL is not transactional (each statement commits), so migrations are serialized by
//! a named server lock (`GET_LOCK`, named after the database) rather than a transaction, and
//! every statement is `CREATE ... IF NOT EXISTS` so a migration interrupted half-way is simply
//! run again. `schema_version` records how many versions are applied.
//!
//! Version 2 partitions `sample` by time (`PARTITION BY RANGE (TO_SECONDS(timestamp))`, see
//! [`super::partitions`]) and adds the rollups, computed from the samples already stored.

use super::{partitions, Fail, MyConn};
use crate::msgkey::{message_key_sql, Dialect};
use crate::partition::floor_to;
use crate::rollup::{self, Granularity, Level};
use crate::StorageError;
use ::mysql::prelude::Queryable;

/// Version 1. `{coll}` is a binary, no-pad collation: exact, case- and trailing-space-sensitive
/// comparison (`utf8mb4_nopad_bin` on MariaDB, `utf8mb4_0900_bin` on MySQL 8), so two
/// message_ids differing in case or trailing spaces are different samples, as elsewhere.
pub const V1: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS meter (
        id    BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        name  VARCHAR(255) NOT NULL,
        type  VARCHAR(16) NOT NULL CHECK (type IN ('gauge', 'delta', 'cumulative')),
        unit  VARCHAR(255) NOT NULL,
        UNIQUE KEY uq_meter (name, type, unit)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={coll}",
    // One row per distinct (resource, owner, source, metadata); resource_key is the hex
    // SHA-256 of those five (NULL told from ''): MySQL's UNIQUE treats NULLs as distinct and
    // cannot index long text whole.
    "CREATE TABLE IF NOT EXISTS resource (
        internal_id       BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        resource_key      CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        resource_id       VARCHAR(255) NOT NULL,
        user_id           VARCHAR(255) NULL,
        project_id        VARCHAR(255) NULL,
        source_id         VARCHAR(255) NOT NULL,
        resource_metadata JSON NOT NULL,
        UNIQUE KEY uq_resource_key (resource_key),
        KEY ix_resource_resource_id (resource_id),
        KEY ix_resource_project_id (project_id),
        KEY ix_resource_user_id (user_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={coll}",
    // Flattened, typed metadata (ceilometer's metadata_text/_int/_float/_bool in one table):
    // strings in value_text, numbers and booleans (0/1) in value_num. Written once per
    // resource row; a filter is an index lookup on (meta_key, value).
    "CREATE TABLE IF NOT EXISTS metadata (
        id         BIGINT NOT NULL,
        seq        INT NOT NULL,
        meta_key   TEXT NOT NULL,
        value_text TEXT NULL,
        value_num  DOUBLE NULL,
        PRIMARY KEY (id, seq),
        KEY ix_metadata_text (meta_key(191), value_text(191)),
        KEY ix_metadata_num (meta_key(191), value_num)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={coll}",
    "CREATE TABLE IF NOT EXISTS sample (
        id                BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        meter_id          BIGINT NOT NULL,
        resource_id       BIGINT NOT NULL,
        volume            DOUBLE NOT NULL,
        timestamp         DATETIME(6) NOT NULL,
        recorded_at       DATETIME(6) NOT NULL,
        message_id        VARCHAR(255) NOT NULL,
        message_signature TEXT NULL,
        UNIQUE KEY uq_sample_message_id (message_id),
        KEY ix_sample_meter_timestamp (meter_id, timestamp),
        KEY ix_sample_resource_timestamp (resource_id, timestamp)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={coll}",
    "CREATE TABLE IF NOT EXISTS cache_epoch (
        id    INT NOT NULL PRIMARY KEY,
        epoch BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "INSERT IGNORE INTO cache_epoch (id, epoch) VALUES (1, 0)",
];

/// Version 2's new tables: the rollups, as in the PostgreSQL schema (buckets and timestamps
/// in integer microseconds, so the drivers share `storage::rollup`). `rollup_resource` is keyed
/// by time first, so a batch's upserts (in-order samples) land together and the pages InnoDB
/// must hold stay few (keyed by series first, a 1 M-row store's writes fell to a fifth once the
/// table outgrew the buffer pool); its series index serves the query (one resource's buckets of
/// one meter row over a time range), keyed by time slice first since version 5 ([`v5`]).
const V2_TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS rollup_meter (
        meter_id    BIGINT NOT NULL,
        granularity BIGINT NOT NULL,
        bucket      BIGINT NOT NULL,
        `count`     BIGINT NOT NULL,
        `sum`       DOUBLE NOT NULL,
        `min`       DOUBLE NOT NULL,
        `max`       DOUBLE NOT NULL,
        `first`     BIGINT NOT NULL,
        `last`      BIGINT NOT NULL,
        PRIMARY KEY (meter_id, granularity, bucket)
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS rollup_resource (
        meter_id    BIGINT NOT NULL,
        resource_id VARCHAR(255) NOT NULL,
        granularity BIGINT NOT NULL,
        bucket      BIGINT NOT NULL,
        `count`     BIGINT NOT NULL,
        `sum`       DOUBLE NOT NULL,
        `min`       DOUBLE NOT NULL,
        `max`       DOUBLE NOT NULL,
        `first`     BIGINT NOT NULL,
        `last`      BIGINT NOT NULL,
        PRIMARY KEY (granularity, bucket, meter_id, resource_id),
        KEY ix_rollup_resource_series (meter_id, resource_id, granularity, bucket)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={coll}",
    "CREATE TABLE IF NOT EXISTS rollup_level (
        granularity   BIGINT NOT NULL PRIMARY KEY,
        complete_from BIGINT NOT NULL
    ) ENGINE=InnoDB",
];

/// The version this build writes.
pub fn current_version() -> i64 {
    6
}

fn read_version(conn: &mut MyConn) -> Result<Option<i64>, Fail> {
    let exists: Option<i64> = conn.exec_first(
        "SELECT COUNT(*) FROM information_schema.TABLES
          WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'schema_version'",
        (),
    )?;
    if exists.unwrap_or(0) == 0 {
        return Ok(None);
    }
    Ok(conn.query_first::<i64, _>("SELECT version FROM schema_version")?)
}

/// The binary, no-pad utf8mb4 collation this server has.
fn collation(conn: &mut MyConn) -> Result<String, Fail> {
    let found: Vec<String> = conn.query(
        "SELECT COLLATION_NAME FROM information_schema.COLLATIONS
          WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin')
          ORDER BY COLLATION_NAME DESC",
    )?;
    Ok(found
        .into_iter()
        .next()
        .unwrap_or_else(|| "utf8mb4_bin".to_string()))
}

/// Bring the database to [`current_version`], and register the configured rollup levels.
pub(crate) fn migrate(
    conn: &mut MyConn,
    database: &str,
    levels: &[Granularity],
    span_us: i64,
) -> Result<(), Fail> {
    if read_version(conn)? == Some(current_version()) {
        return register_levels(conn, database, levels);
    }
    let name = lock_name(database);
    let got: Option<Option<i64>> = conn.exec_first("SELECT GET_LOCK(?, 60)", (&name,))?;
    if got.flatten() != Some(1) {
        return Err(Fail::Storage(StorageError::Unavailable(format!(
            "mysql: timed out waiting for lock {name:?} held by another process migrating the schema"
        ))));
    }
    let result = migrate_locked(conn, levels, span_us);
    let released = conn.exec_drop("SELECT RELEASE_LOCK(?)", (&name,));
    result?;
    released?;
    register_levels(conn, database, levels)
}

/// The schema lock's name. Lock names are server-wide: named after the database, at most 64
/// characters.
fn lock_name(database: &str) -> String {
    format!("collector.schema.{database}")
        .chars()
        .take(64)
        .collect()
}

fn migrate_locked(conn: &mut MyConn, levels: &[Granularity], span_us: i64) -> Result<(), Fail> {
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL) ENGINE=InnoDB",
    )?;
    let found = match read_version(conn)? {
        Some(v) => v,
        None => {
            conn.query_drop("INSERT INTO schema_version (version) VALUES (0)")?;
            0
        }
    };
    if found > current_version() {
        return Err(Fail::Storage(StorageError::SchemaTooNew {
            found,
            supported: current_version(),
        }));
    }
    let coll = collation(conn)?;
    if found < 1 {
        log::info!("mysql: creating schema version 1 (collation {coll})");
        for sql in V1 {
            conn.query_drop(sql.replace("{coll}", &coll))?;
        }
        conn.query_drop("UPDATE schema_version SET version = 1")?;
    }
    if found < 2 {
        log::info!("mysql: migrating schema to version 2: time partitions and rollups");
        v2(conn, &coll, levels, span_us)?;
        conn.query_drop("UPDATE schema_version SET version = 2")?;
    }
    if found < 3 {
        // Samples before this instant (µs) may have been expired, so rollup buckets there
        // may count samples no partition holds: expiry counts a partition's rows from the
        // rollups only above it. Every expiry drops the oldest partition, which holds every
        // sample below its bound, so it moves up to that bound. A version 2 store starts at
        // its oldest partition; a new or version 1 store (rollups just computed from every
        // stored sample) at the beginning.
        log::info!("mysql: migrating schema to version 3: expired_before");
        conn.query_drop(
            "CREATE TABLE IF NOT EXISTS expired_before (us BIGINT NOT NULL) ENGINE=InnoDB",
        )?;
        let from = match partitions::read(conn)?.first() {
            Some(p) if found == 2 && p.name != partitions::CATCH_ALL => p.range.lo,
            _ => i64::MIN,
        };
        conn.exec_drop(
            "INSERT INTO expired_before (us) SELECT ? FROM DUAL
              WHERE NOT EXISTS (SELECT 1 FROM expired_before)",
            (from,),
        )?;
        conn.query_drop("UPDATE schema_version SET version = 3")?;
    }
    if found < 4 {
        log::info!("mysql: migrating schema to version 4: unique message key");
        v4(conn)?;
        conn.query_drop("UPDATE schema_version SET version = 4")?;
    }
    if found < 5 {
        log::info!("mysql: migrating schema to version 5: rollup series index by slice");
        v5(conn)?;
        conn.query_drop("UPDATE schema_version SET version = 5")?;
    }
    if found < 6 {
        log::info!("mysql: migrating schema to version 6: rollup level sources");
        v6(conn)?;
        conn.query_drop("UPDATE schema_version SET version = 6")?;
    }
    Ok(())
}

/// Buckets per slice of a rollup level: `rollup_resource`'s series index begins with the
/// slice, `bucket DIV (granularity * SLICE_BUCKETS * 10^6)` (a day of hourly buckets, 24
/// days of daily ones), so new rows go into the current slice's part of the index.
pub const SLICE_BUCKETS: i64 = 24;

/// The slice of a bucket (µs) of a level of `granularity` seconds, as the generated column
/// computes it (`DIV` truncates toward zero, as Rust's `/` does).
pub fn slice_of(bucket: i64, granularity: u64) -> i64 {
    let width = i64::try_from(granularity)
        .unwrap_or(i64::MAX)
        .saturating_mul(SLICE_BUCKETS * 1_000_000)
        .max(1);
    bucket / width
}

/// Whether `table` in the current database has `column` (a migration that adds one is done).
fn has_column(conn: &mut MyConn, table: &str, column: &str) -> Result<bool, Fail> {
    let n: Option<i64> = conn.exec_first(
        "SELECT COUNT(*) FROM information_schema.COLUMNS
          WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
        (table, column),
    )?;
    Ok(n.unwrap_or(0) > 0)
}

/// Version 4 to 5: `rollup_resource`'s series index `(meter_id, resource_id, granularity,
/// bucket)` took every new row (a series' first sample in a bucket: nearly one per sample for
/// hourly buckets) to a random page of an index that grows with the store: past ~1.5 M samples
/// it outgrew InnoDB's buffer pool and each batch read index pages from disk. Keyed
/// `(granularity, slice, meter_id, resource_id, bucket)`, new rows go into the current slice's
/// part; a query for one series reads one range per slice in its time range. One `ALTER
/// TABLE` (atomic), skipped when an interrupted run got that far.
fn v5(conn: &mut MyConn) -> Result<(), Fail> {
    if has_column(conn, "rollup_resource", "slice")? {
        return Ok(());
    }
    conn.query_drop(format!(
        "ALTER TABLE rollup_resource
             ADD COLUMN slice BIGINT AS (bucket DIV (granularity * {})) VIRTUAL,
             ADD KEY ix_rollup_resource_slice (granularity, slice, meter_id, resource_id, bucket),
             DROP INDEX ix_rollup_resource_series",
        SLICE_BUCKETS * 1_000_000
    ))?;
    Ok(())
}

/// Version 5 to 6: `rollup_level.source`, the finer level a level's per-resource buckets are
/// folded from (0: written directly), and `fold_from`, the bucket from which on they are
/// ([`crate::rollup::Level`]). A store without rollups yet has its levels registered afresh,
/// with sources; a store with rollups gets its sources at registration, from a bucket ahead.
/// Safe to run again after an interruption.
///
/// It also drops `rollup_resource`'s slice index (version 5): a resource's buckets are read by
/// primary key, one lookup per bucket and meter row (`query::resource_buckets`), so each new
/// rollup row is written once instead of twice (the index was 12 % of the server's CPU in a
/// fresh store's fill).
fn v6(conn: &mut MyConn) -> Result<(), Fail> {
    if !has_column(conn, "rollup_level", "source")? {
        conn.query_drop("ALTER TABLE rollup_level ADD COLUMN source BIGINT NOT NULL DEFAULT 0")?;
    }
    if !has_column(conn, "rollup_level", "fold_from")? {
        conn.query_drop(
            "ALTER TABLE rollup_level
                 ADD COLUMN fold_from BIGINT NOT NULL DEFAULT -9223372036854775808",
        )?;
    }
    if has_column(conn, "rollup_resource", "slice")? {
        conn.query_drop(
            "ALTER TABLE rollup_resource DROP INDEX ix_rollup_resource_slice, DROP COLUMN slice",
        )?;
    }
    conn.query_drop(
        "DELETE FROM rollup_level WHERE NOT EXISTS (SELECT 1 FROM rollup_meter)
            AND NOT EXISTS (SELECT 1 FROM rollup_resource)",
    )?;
    Ok(())
}

/// Version 3 to 4: `message_id`'s uniqueness moves to a virtual column holding its
/// time-ordered key ([`crate::msgkey`]), unique with the timestamp; the id column keeps the
/// id as sent. uuid1 ids then go in at the end of the unique index instead of at random pages,
/// which kept a store past a million rows reading index pages from disk on every batch. One
/// `ALTER TABLE` (atomic), skipped when an interrupted run got that far.
fn v4(conn: &mut MyConn) -> Result<(), Fail> {
    if has_column(conn, "sample", "message_key")? {
        return Ok(());
    }
    conn.query_drop(format!(
        "ALTER TABLE sample
             ADD COLUMN message_key VARCHAR(255) AS {} VIRTUAL,
             ADD UNIQUE KEY uq_sample_message_key (message_key, timestamp),
             DROP INDEX uq_sample_message_id",
        message_key_sql("message_id", Dialect::Mysql)
    ))?;
    Ok(())
}

/// Version 1 to 2, each step safe to run again after an interruption: the rollup tables; the
/// sample table rebuilt partitioned (one `ALTER TABLE`, atomic: a table copy), unique on
/// `(message_id, timestamp)` as MariaDB requires every unique key to hold the partitioning
/// column, its resource index `(resource_id, meter_id, timestamp)` (covering the `samples`
/// query of one resource and meter); then the rollups of every configured level computed from the stored samples (the
/// tables emptied first, so a re-run does not count twice), so every level is complete from
/// the beginning.
fn v2(conn: &mut MyConn, coll: &str, levels: &[Granularity], span_us: i64) -> Result<(), Fail> {
    for sql in V2_TABLES {
        conn.query_drop(sql.replace("{coll}", coll))?;
    }
    if partitions::read(conn)?.is_empty() {
        let bounds: Option<(Option<i64>, Option<i64>)> = conn.query_first(
            "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01', MIN(timestamp)),
                    TIMESTAMPDIFF(MICROSECOND, '1970-01-01', MAX(timestamp)) FROM sample",
        )?;
        let now = crate::model::to_micros(time::OffsetDateTime::now_utc());
        let (lo, hi) = match bounds {
            Some((Some(lo), Some(hi))) => (lo, hi.max(now)),
            _ => (now, now),
        };
        // From the oldest sample's span to the one after today's (ahead of time).
        let lo = floor_to(lo, span_us);
        let hi = floor_to(hi, span_us).saturating_add(2 * span_us);
        let defs = partitions::definitions(&partitions::history(lo, hi, span_us), true);
        conn.query_drop(format!(
            "ALTER TABLE sample DROP PRIMARY KEY, ADD PRIMARY KEY (id, timestamp),
                 DROP INDEX uq_sample_message_id,
                 ADD UNIQUE KEY uq_sample_message_id (message_id, timestamp),
                 DROP INDEX ix_sample_resource_timestamp,
                 ADD KEY ix_sample_resource_meter_timestamp (resource_id, meter_id, timestamp)
             PARTITION BY RANGE (TO_SECONDS(timestamp)) ({defs})"
        ))?;
    }
    conn.query_drop("DELETE FROM rollup_meter")?;
    conn.query_drop("DELETE FROM rollup_resource")?;
    conn.query_drop("DELETE FROM rollup_level")?;
    let us = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01', s.timestamp)";
    for g in levels.iter().filter(|g| g.seconds > 0) {
        let bucket = format!("({us} - MOD(MOD({us}, ?) + ?, ?))");
        let aggs =
            format!("COUNT(*), SUM(s.volume), MIN(s.volume), MAX(s.volume), MIN({us}), MAX({us})");
        let step = g.micros();
        conn.exec_drop(
            format!(
                "INSERT INTO rollup_meter
                   (meter_id, granularity, bucket, `count`, `sum`, `min`, `max`, `first`, `last`)
                 SELECT s.meter_id, ?, {bucket} AS b, {aggs}
                   FROM sample s GROUP BY s.meter_id, b"
            ),
            (g.seconds, step, step, step),
        )?;
        conn.exec_drop(
            format!(
                "INSERT INTO rollup_resource (meter_id, resource_id, granularity, bucket, `count`,
                                             `sum`, `min`, `max`, `first`, `last`)
                 SELECT s.meter_id, r.resource_id, ?, {bucket} AS b, {aggs}
                   FROM sample s JOIN resource r ON r.internal_id = s.resource_id
                  GROUP BY s.meter_id, r.resource_id, b"
            ),
            (g.seconds, step, step, step),
        )?;
        conn.exec_drop(
            "INSERT INTO rollup_level (granularity, complete_from) VALUES (?, ?)",
            (g.seconds, i64::MIN),
        )?;
    }
    Ok(())
}

/// The registered rollup levels and their sources.
pub(crate) fn load_levels(conn: &mut MyConn) -> Result<Vec<Level>, Fail> {
    let rows: Vec<(u64, u64, i64)> =
        conn.query("SELECT granularity, source, fold_from FROM rollup_level")?;
    Ok(rows
        .into_iter()
        .map(|(seconds, source, fold_from)| Level {
            seconds,
            source,
            fold_from,
        })
        .collect())
}

/// The `rollup_resource` upsert that merges the rows of granularity `?` (the second parameter)
/// chosen by `filter` (a condition on `bucket`, its parameters after) into level `?` (the
/// first), each into the bucket of that level holding it.
pub(crate) fn merge_resource_rows_sql(filter: &str) -> String {
    format!(
        "INSERT INTO rollup_resource (meter_id, resource_id, granularity, bucket, `count`,
                                      `sum`, `min`, `max`, `first`, `last`)
         SELECT meter_id, resource_id, g, b, SUM(`count`), SUM(`sum`), MIN(`min`), MAX(`max`),
                MIN(`first`), MAX(`last`)
           FROM (SELECT r.*, l.g, r.bucket - MOD(MOD(r.bucket, l.g * 1000000) + l.g * 1000000,
                                                 l.g * 1000000) AS b
                   FROM rollup_resource r CROSS JOIN (SELECT CAST(? AS SIGNED) AS g) l
                  WHERE r.granularity = ? AND {filter}) s
          GROUP BY meter_id, resource_id, g, b
         ON DUPLICATE KEY UPDATE
           `count` = rollup_resource.`count` + VALUES(`count`),
           `sum` = rollup_resource.`sum` + VALUES(`sum`),
           `min` = LEAST(rollup_resource.`min`, VALUES(`min`)),
           `max` = GREATEST(rollup_resource.`max`, VALUES(`max`)),
           `first` = LEAST(rollup_resource.`first`, VALUES(`first`)),
           `last` = GREATEST(rollup_resource.`last`, VALUES(`last`))"
    )
}

/// Register the configured rollup levels missing from `rollup_level`: complete from the
/// bucket after the newest rollup's last sample (samples stored before were not counted at
/// that level), or from the beginning on an empty store; with their sources
/// ([`rollup::assign_sources`]). A level whose source is no longer configured takes the
/// source's buckets and becomes direct. Changes are made under the schema lock in one
/// transaction that also moves the cache epoch, so every writer reloads the levels.
fn register_levels(conn: &mut MyConn, database: &str, levels: &[Granularity]) -> Result<(), Fail> {
    if rollup::level_changes(levels, &load_levels(conn)?).is_empty() {
        return Ok(());
    }
    let name = lock_name(database);
    let got: Option<Option<i64>> = conn.exec_first("SELECT GET_LOCK(?, 60)", (&name,))?;
    if got.flatten() != Some(1) {
        return Err(Fail::Storage(StorageError::Unavailable(format!(
            "mysql: timed out waiting for lock {name:?} held by another process registering rollup levels"
        ))));
    }
    let result = register_locked(conn, levels);
    if result.is_err() {
        let _ = conn.query_drop("ROLLBACK");
    }
    let released = conn.exec_drop("SELECT RELEASE_LOCK(?)", (&name,));
    result?;
    released?;
    Ok(())
}

fn register_locked(conn: &mut MyConn, levels: &[Granularity]) -> Result<(), Fail> {
    conn.query_drop("START TRANSACTION")?;
    let changes = rollup::level_changes(levels, &load_levels(conn)?);
    for (had, want) in &changes {
        match had {
            Some(had) => {
                if had.source != 0 {
                    conn.exec_drop(
                        merge_resource_rows_sql("r.bucket >= ?"),
                        (want.seconds, had.source, had.fold_from),
                    )?;
                }
                conn.exec_drop(
                    "UPDATE rollup_level SET source = ?, fold_from = ? WHERE granularity = ?",
                    (want.source, want.fold_from, want.seconds),
                )?;
            }
            None => {
                let newest: Option<Option<i64>> =
                    conn.query_first("SELECT MAX(`last`) FROM rollup_meter")?;
                conn.exec_drop(
                    "INSERT IGNORE INTO rollup_level (granularity, complete_from, source,
                                                      fold_from)
                     VALUES (?, ?, ?, ?)",
                    (
                        want.seconds,
                        rollup::complete_from(newest.flatten(), want.seconds),
                        want.source,
                        want.fold_from,
                    ),
                )?;
            }
        }
    }
    if !changes.is_empty() {
        conn.query_drop("UPDATE cache_epoch SET epoch = epoch + 1 WHERE id = 1")?;
    }
    conn.query_drop("COMMIT")?;
    Ok(())
}

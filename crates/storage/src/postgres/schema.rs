//! The PostgreSQL schema and its migrations.
//!
//! `schema_version` holds one row: how many entries of [`MIGRATIONS`] the database has had
//! applied. PostgreSQL's DDL is transactional, so each open that finds the database behind
//! migrates inside one transaction holding a transaction-scoped advisory lock
//! (`pg_advisory_xact_lock`): when many workers on many hosts start at once, one migrates and
//! the others wait for it, then find the work done. A database migrated by a newer build is
//! refused.

use crate::StorageError;
use ::postgres::Client;

/// Version 1: the SQLite driver's model with PostgreSQL's own types. See docs/storage.md.
pub const V1: &str = "
CREATE TABLE meter (
    id    BIGSERIAL PRIMARY KEY,
    name  TEXT NOT NULL,
    type  TEXT NOT NULL CHECK (type IN ('gauge', 'delta', 'cumulative')),
    unit  TEXT NOT NULL,
    UNIQUE (name, type, unit)
);

-- One row per distinct (resource, owner, source, metadata), as in the SQLite schema.
-- resource_key is the hex SHA-256 of those five (NULL told from ''), so one UNIQUE column
-- identifies a row even where user_id or project_id is NULL.
CREATE TABLE resource (
    internal_id       BIGSERIAL PRIMARY KEY,
    resource_key      TEXT NOT NULL UNIQUE,
    resource_id       TEXT NOT NULL,
    user_id           TEXT,
    project_id        TEXT,
    source_id         TEXT NOT NULL,
    resource_metadata JSONB NOT NULL
);
CREATE INDEX ix_resource_resource_id ON resource (resource_id);
CREATE INDEX ix_resource_project_id ON resource (project_id);
CREATE INDEX ix_resource_user_id ON resource (user_id);
-- Metadata filters are containment tests (@>) answered by this index.
CREATE INDEX ix_resource_metadata ON resource USING gin (resource_metadata jsonb_path_ops);

CREATE TABLE sample (
    id                BIGSERIAL PRIMARY KEY,
    meter_id          BIGINT NOT NULL,  -- meter (id); not enforced, see docs/storage.md
    resource_id       BIGINT NOT NULL,  -- resource (internal_id); likewise
    volume            DOUBLE PRECISION NOT NULL,
    timestamp         TIMESTAMPTZ NOT NULL,
    recorded_at       TIMESTAMPTZ NOT NULL,
    message_id        TEXT NOT NULL UNIQUE,
    message_signature TEXT
);
CREATE INDEX ix_sample_meter_timestamp ON sample (meter_id, timestamp);
CREATE INDEX ix_sample_resource_timestamp ON sample (resource_id, timestamp);
-- Samples arrive roughly in time order: a BRIN index serves time ranges and expiry for
-- almost nothing per insert (a B-tree here cost every insert).
CREATE INDEX ix_sample_timestamp ON sample USING brin (timestamp);

-- Bumped whenever rows of meter or resource are deleted, so every process drops its id caches.
CREATE TABLE cache_epoch (epoch BIGINT NOT NULL);
INSERT INTO cache_epoch (epoch) VALUES (0);
";

/// Version 2: rollups (pre-aggregated statistics), as in the SQLite schema. Buckets and
/// timestamps are integer microseconds so the drivers share the arithmetic
/// (`storage::rollup`). Samples stored before a level existed are not in it: `rollup_level`
/// says from which bucket on each level is complete.
pub const V2: &str = "
CREATE TABLE rollup_meter (
    meter_id    BIGINT NOT NULL,
    granularity BIGINT NOT NULL,
    bucket      BIGINT NOT NULL,
    count       BIGINT NOT NULL,
    sum         DOUBLE PRECISION NOT NULL,
    min         DOUBLE PRECISION NOT NULL,
    max         DOUBLE PRECISION NOT NULL,
    first       BIGINT NOT NULL,
    last        BIGINT NOT NULL,
    PRIMARY KEY (meter_id, granularity, bucket)
);
CREATE TABLE rollup_resource (
    granularity BIGINT NOT NULL,
    bucket      BIGINT NOT NULL,
    meter_id    BIGINT NOT NULL,
    resource_id TEXT NOT NULL,
    count       BIGINT NOT NULL,
    sum         DOUBLE PRECISION NOT NULL,
    min         DOUBLE PRECISION NOT NULL,
    max         DOUBLE PRECISION NOT NULL,
    first       BIGINT NOT NULL,
    last        BIGINT NOT NULL,
    PRIMARY KEY (granularity, bucket, meter_id, resource_id)
);
CREATE TABLE rollup_level (
    granularity   BIGINT PRIMARY KEY,
    complete_from BIGINT NOT NULL
);
";

/// Version 3: `sample` range-partitioned by `timestamp` (see `postgres::partitions`). The
/// version 2 table is renamed and its rows moved into partitions by [`move_samples`], in the
/// same transaction; ids keep their sequence. Unique is `(message_id, timestamp)` (a partitioned
/// table's unique keys must contain the partition key; a retry carries the same timestamp, so
/// idempotence holds). The indexes are made per partition; the BRIN index stays for time
/// ranges inside a partition with no meter or resource to narrow them (it cost no measurable
/// insert time: docs/storage.md).
const V3: &str = "
ALTER TABLE sample RENAME TO sample_v2;
DROP INDEX ix_sample_meter_timestamp, ix_sample_resource_timestamp, ix_sample_timestamp;
CREATE TABLE sample (
    id                BIGINT NOT NULL DEFAULT nextval('sample_id_seq'),
    meter_id          BIGINT NOT NULL,
    resource_id       BIGINT NOT NULL,
    volume            DOUBLE PRECISION NOT NULL,
    timestamp         TIMESTAMPTZ NOT NULL,
    recorded_at       TIMESTAMPTZ NOT NULL,
    message_id        TEXT NOT NULL,
    message_signature TEXT,
    CONSTRAINT sample_message_id_timestamp_key UNIQUE (message_id, timestamp)
) PARTITION BY RANGE (timestamp);
ALTER SEQUENCE sample_id_seq OWNED BY sample.id;
CREATE INDEX ix_sample_meter_timestamp ON sample (meter_id, timestamp);
CREATE INDEX ix_sample_resource_timestamp ON sample (resource_id, timestamp);
CREATE INDEX ix_sample_timestamp ON sample USING brin (timestamp);
CREATE TABLE sample_partition (
    lo   BIGINT PRIMARY KEY,
    hi   BIGINT NOT NULL,
    name TEXT NOT NULL UNIQUE
);
";

/// Version 4: `expired_before`, one row: samples before this instant (µs) may have been
/// expired, so rollup buckets there may count samples no partition holds any more; expiry
/// counts a partition's rows from the rollups only above it (`partitions::rows_of`). A store
/// from version 3 starts at its oldest partition (earlier ones may have been dropped).
const V4: &str = "
CREATE TABLE expired_before (us BIGINT NOT NULL);
INSERT INTO expired_before (us)
    SELECT COALESCE(MIN(lo), (-9223372036854775807)::BIGINT - 1) FROM sample_partition;
";

/// Version 5: the resource index also keys the meter, `(resource_id, meter_id, timestamp)`.
/// `samples` of one resource and meter (latest 100) read it backwards in each partition and
/// stop at the limit; with `(resource_id, timestamp)` the planner, short of statistics on fresh
/// partitions, ANDed bitmaps of that index and of every sample of the meter in each partition
/// (17,858 index entries per partition at 1 M rows, 39 ms at 3 M: docs/storage.md). A query by
/// resource alone still has the index's prefix. Rebuilding it reads every partition once.
const V5: &str = "
DROP INDEX ix_sample_resource_timestamp;
CREATE INDEX ix_sample_resource_meter_timestamp ON sample (resource_id, meter_id, timestamp);
";

/// Version 6: `rollup_level.source`, the finer level a level's per-resource buckets are folded
/// from (0: written directly), and `fold_from`, the bucket from which on they are
/// ([`crate::rollup::Level`]). A store without rollups yet has its levels registered afresh,
/// with sources; a store with rollups gets its sources at registration, from a bucket ahead.
const V6: &str = "
ALTER TABLE rollup_level ADD COLUMN IF NOT EXISTS source BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollup_level ADD COLUMN IF NOT EXISTS fold_from BIGINT NOT NULL
    DEFAULT (-9223372036854775807)::BIGINT - 1;
DELETE FROM rollup_level WHERE NOT EXISTS (SELECT 1 FROM rollup_meter)
    AND NOT EXISTS (SELECT 1 FROM rollup_resource);
";

/// Applied in order; entry `i` takes a database from version `i` to `i + 1`. Append only.
pub const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6];

/// Merges `rollup_resource` rows of granularity `$2` chosen by `FILTER` (a condition on
/// `bucket`) into each level of `$1` (seconds) from that level's fold_from on (the array
/// parameter `FROMS`, in the same order), each into the bucket holding it; `ROWS` is the rows'
/// source (`rollup_resource`, or a CTE of deleted rows).
const MERGE: &str = "
INSERT INTO rollup_resource (granularity, bucket, meter_id, resource_id, count, sum, min, max,
                             first, last)
SELECT g.seconds, s.bucket - (((s.bucket % (g.seconds * 1000000)) + g.seconds * 1000000)
                              % (g.seconds * 1000000)) AS b,
       s.meter_id, s.resource_id, SUM(s.count)::BIGINT, SUM(s.sum), MIN(s.min), MAX(s.max),
       MIN(s.first), MAX(s.last)
  FROM ROWS s CROSS JOIN unnest($1::BIGINT[], FROMS::BIGINT[]) AS g (seconds, fold_from)
 WHERE s.granularity = $2 AND s.bucket >= g.fold_from AND FILTER
 GROUP BY g.seconds, b, s.meter_id, s.resource_id
 ORDER BY g.seconds, b, s.meter_id, s.resource_id
ON CONFLICT (granularity, bucket, meter_id, resource_id) DO UPDATE SET
    count = rollup_resource.count + excluded.count, sum = rollup_resource.sum + excluded.sum,
    min = LEAST(rollup_resource.min, excluded.min), max = GREATEST(rollup_resource.max, excluded.max),
    first = LEAST(rollup_resource.first, excluded.first), last = GREATEST(rollup_resource.last, excluded.last)";

/// Fold the per-resource buckets of level `$2` older than `$3` into each level of `$1` (from its
/// fold_from on, `$4`), and delete them, in one statement (a concurrent pass or late write
/// waits for the rows' locks).
pub fn fold_expired_sql() -> String {
    format!(
        "WITH moved AS (DELETE FROM rollup_resource WHERE granularity = $2 AND bucket < $3
                        RETURNING *) {}",
        MERGE
            .replace("ROWS", "moved")
            .replace("FILTER", "TRUE")
            .replace("FROMS", "$4")
    )
}

/// The registered rollup levels and their sources.
pub fn load_levels(
    client: &mut impl ::postgres::GenericClient,
) -> Result<Vec<crate::rollup::Level>, ::postgres::Error> {
    Ok(client
        .query(
            "SELECT granularity, source, fold_from FROM rollup_level",
            &[],
        )?
        .iter()
        .map(|r| crate::rollup::Level {
            seconds: r.get::<_, i64>(0).max(0) as u64,
            source: r.get::<_, i64>(1).max(0) as u64,
            fold_from: r.get(2),
        })
        .collect())
}

/// The second half of version 3: a partition for every span holding version 2 samples, the
/// rows copied in id order, the old table dropped.
fn move_samples(tx: &mut ::postgres::Transaction<'_>, span_us: i64) -> Result<(), MigrateError> {
    let span = span_us.max(1);
    let rows = tx.query(
        "SELECT DISTINCT (us - (((us % $1) + $1) % $1))
           FROM (SELECT (EXTRACT(EPOCH FROM timestamp) * 1000000)::BIGINT AS us
                   FROM sample_v2) AS t",
        &[&span],
    )?;
    let los: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let known = crate::partition::Partitions::default();
    for lo in los {
        let r = known.new_range(lo, span);
        super::partitions::create(tx, r).map_err(|f| match f {
            super::Fail::Pg(e) => MigrateError::Sql(e),
            super::Fail::Storage(e) => MigrateError::Storage(e),
        })?;
    }
    let moved = tx.execute(
        "INSERT INTO sample (id, meter_id, resource_id, volume, timestamp, recorded_at,
                             message_id, message_signature)
         SELECT id, meter_id, resource_id, volume, timestamp, recorded_at, message_id,
                message_signature
           FROM sample_v2 ORDER BY id",
        &[],
    )?;
    tx.batch_execute("DROP TABLE sample_v2")?;
    log::info!("postgresql: moved {moved} samples into time partitions");
    Ok(())
}

/// Register the configured rollup levels missing from `rollup_level`: complete from the
/// bucket after the newest stored sample (earlier samples were not counted at that level), or
/// from the beginning on an empty database; with their sources
/// ([`crate::rollup::assign_sources`]). A level whose source is no longer configured takes the
/// source's buckets and becomes direct. Changes are made under the migration lock in one
/// transaction that also moves the cache epoch, so every writer reloads the levels.
pub fn register_levels(
    client: &mut Client,
    levels: &[crate::rollup::Granularity],
) -> Result<(), ::postgres::Error> {
    // Every connect comes here: compare first, so the newest-sample lookup (which reads every
    // sample: no index leads with the timestamp) runs only for a new level.
    if crate::rollup::level_changes(levels, &load_levels(client)?).is_empty() {
        return Ok(());
    }
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    let changes = crate::rollup::level_changes(levels, &load_levels(&mut tx)?);
    for (had, want) in &changes {
        let (secs, source, from) = (want.seconds as i64, want.source as i64, want.fold_from);
        match had {
            Some(had) => {
                if had.source != 0 {
                    let merge = MERGE
                        .replace("ROWS", "rollup_resource")
                        .replace("FILTER", "TRUE")
                        .replace("FROMS", "$3");
                    tx.execute(
                        &merge,
                        &[&vec![secs], &(had.source as i64), &vec![had.fold_from]],
                    )?;
                }
                tx.execute(
                    "UPDATE rollup_level SET source = $2, fold_from = $3 WHERE granularity = $1",
                    &[&secs, &source, &from],
                )?;
            }
            None => {
                let g_us = crate::rollup::micros_of(want.seconds);
                tx.execute(
                    "INSERT INTO rollup_level (granularity, complete_from, source, fold_from)
                     SELECT $1::BIGINT, COALESCE(
                         (SELECT ((EXTRACT(EPOCH FROM MAX(timestamp)) * 1000000)::BIGINT
                                  / $2::BIGINT + 1) * $2::BIGINT FROM sample),
                         (-9223372036854775807)::BIGINT - 1), $3::BIGINT, $4::BIGINT
                     ON CONFLICT (granularity) DO NOTHING",
                    &[&secs, &g_us, &source, &from],
                )?;
            }
        }
    }
    if !changes.is_empty() {
        tx.execute("UPDATE cache_epoch SET epoch = epoch + 1", &[])?;
    }
    tx.commit()
}

/// The version this build writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// The advisory lock key migrations hold ("collectr" in ASCII); advisory locks are per
/// database, so databases on one server do not wait for each other.
const LOCK_KEY: i64 = 0x636f_6c6c_6563_7472;

fn read_version(
    client: &mut impl ::postgres::GenericClient,
) -> Result<Option<i64>, ::postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT version::BIGINT FROM schema_version", &[])?
        .map(|r| r.get(0)))
}

/// Failure of [`migrate`].
#[derive(Debug)]
pub enum MigrateError {
    Sql(::postgres::Error),
    /// A schema from a newer build, or a partition bound out of range.
    Storage(StorageError),
}

impl From<::postgres::Error> for MigrateError {
    fn from(e: ::postgres::Error) -> Self {
        MigrateError::Sql(e)
    }
}

/// Bring the database to [`current_version`].
pub fn migrate(
    client: &mut Client,
    levels: &[crate::rollup::Granularity],
    span_us: i64,
) -> Result<(), MigrateError> {
    // Common case first, without the lock: already up to date.
    if read_version(client)? == Some(current_version()) {
        register_levels(client, levels)?;
        return Ok(());
    }
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let found = match read_version(&mut tx)? {
        Some(v) => v,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
            0
        }
    };
    if found > current_version() {
        return Err(MigrateError::Storage(StorageError::SchemaTooNew {
            found,
            supported: current_version(),
        }));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        log::info!("postgresql: migrating schema to version {}", i + 1);
        tx.batch_execute(sql)?;
        if i == 2 {
            move_samples(&mut tx, span_us)?;
        }
    }
    tx.execute(
        "UPDATE schema_version SET version = $1",
        &[&(current_version() as i32)],
    )?;
    tx.commit()?;
    register_levels(client, levels)?;
    Ok(())
}

//! The SQLite schema and its migrations.
//!
//! `schema_version` holds one row: how many entries of [`MIGRATIONS`] the file has had applied.
//! Every open brings the file up to date inside one `BEGIN IMMEDIATE` transaction, so when
//! several worker processes open a fresh file at once exactly one of them migrates and the
//! others find the work done. A file migrated by a newer build is refused rather than guessed at.
//!
//! Version 2 partitions samples by time: the `sample` table of version 1 gives way to chunk
//! tables (`sample_<lo>`, listed in `sample_partition`), and rollups are added; a version 1 file
//! is converted in place (its samples moved into chunks, its rollups computed from them).
//! Version 3 adds `sample_graveyard`: expired chunks whose pages are still being reclaimed.
//! Version 4 indexes new chunks' `message_id`s by their time-ordered key ([`crate::msgkey`]).
//! Version 5 records each rollup level's *source* ([`crate::rollup::Level`]): coarser levels of
//! a new store take their per-resource buckets from the finest, at its retention.
//! Version 6 keeps new chunks' ids as their keys in a `message_key` column
//! ([`crate::msgkey::StoredKey`]), written by the driver, in place of version 4's index
//! expression.

use crate::msgkey::{message_id_sql, message_key_blob_sql};
use crate::partition::Range;
use crate::rollup::{self, Granularity};
use crate::StorageError;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::sync::OnceLock;

/// Version 1: ceilometer's normalized model (meter, resource, sample) plus typed, flattened
/// resource metadata and the cache epoch. See docs/storage.md for the reasoning per column.
pub const V1: &str = "
CREATE TABLE meter (
    id    INTEGER PRIMARY KEY,
    name  TEXT NOT NULL,
    type  TEXT NOT NULL CHECK (type IN ('gauge', 'delta', 'cumulative')),
    unit  TEXT NOT NULL,
    UNIQUE (name, type, unit)
);

-- One row per distinct (resource, owner, source, metadata): a resource whose metadata changes
-- gets a new row, so a sample keeps the metadata it was sent with.
CREATE TABLE resource (
    internal_id       INTEGER PRIMARY KEY,
    resource_id       TEXT NOT NULL,
    user_id           TEXT,
    project_id        TEXT,
    source_id         TEXT NOT NULL,
    resource_metadata TEXT NOT NULL,  -- canonical JSON: keys sorted
    metadata_hash     TEXT NOT NULL,  -- hex SHA-256 of resource_metadata
    UNIQUE (resource_id, user_id, project_id, source_id, metadata_hash)
);
CREATE INDEX ix_resource_project_id ON resource (project_id);
CREATE INDEX ix_resource_user_id ON resource (user_id);

-- ceilometer's metadata_text/int/float/bool tables in one: SQLite keeps each value's own type
-- (the column has no declared type, so no affinity conversion), booleans as 0/1.
CREATE TABLE metadata (
    id        INTEGER NOT NULL REFERENCES resource (internal_id),
    meta_key  TEXT NOT NULL,
    value,
    PRIMARY KEY (id, meta_key)
) WITHOUT ROWID;
CREATE INDEX ix_metadata_key_value ON metadata (meta_key, value);

CREATE TABLE sample (
    id                INTEGER PRIMARY KEY,
    meter_id          INTEGER NOT NULL REFERENCES meter (id),
    resource_id       INTEGER NOT NULL REFERENCES resource (internal_id),
    volume            REAL NOT NULL,
    timestamp         INTEGER NOT NULL,  -- microseconds since 1970-01-01T00:00:00Z
    recorded_at       INTEGER NOT NULL,  -- same unit
    message_id        TEXT NOT NULL UNIQUE,
    message_signature TEXT
);
-- No index on timestamp alone: every index costs each insert, and time ranges without a
-- meter are answered per meter through the first index (`meter_id IN (SELECT id FROM meter)`).
CREATE INDEX ix_sample_meter_timestamp ON sample (meter_id, timestamp);
CREATE INDEX ix_sample_resource_timestamp ON sample (resource_id, timestamp);

-- Bumped whenever rows of meter or resource are deleted, so every process drops its id caches.
CREATE TABLE cache_epoch (epoch INTEGER NOT NULL);
INSERT INTO cache_epoch (epoch) VALUES (0);
";

/// Version 2: time-partitioned samples and rollups. The chunk tables are made by
/// [`create_partition`]; this adds their registry and the rollup tables.
const V2: &str = "
-- One row per chunk table: samples with lo <= timestamp < hi (microseconds) live in `name`.
CREATE TABLE sample_partition (
    lo   INTEGER PRIMARY KEY,
    hi   INTEGER NOT NULL,
    name TEXT NOT NULL UNIQUE
);

-- Pre-aggregated statistics per meter row and per (meter row, resource id), in UTC-aligned
-- buckets of `granularity` seconds starting at `bucket` (microseconds). A meter's buckets over
-- a time range are one index range. Per resource there are as many series as resources times
-- meters, so that table is keyed by time first: new buckets are written at the end of the
-- index (pages in cache, like a chunk's), retention is a range delete, and a series is read
-- with one seek per bucket.
CREATE TABLE rollup_meter (
    meter_id    INTEGER NOT NULL,
    granularity INTEGER NOT NULL,
    bucket      INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    sum         REAL NOT NULL,
    min         REAL NOT NULL,
    max         REAL NOT NULL,
    first       INTEGER NOT NULL,
    last        INTEGER NOT NULL,
    PRIMARY KEY (meter_id, granularity, bucket)
) WITHOUT ROWID;
CREATE TABLE rollup_resource (
    meter_id    INTEGER NOT NULL,
    resource_id TEXT NOT NULL,    -- the resource id itself: rollups outlive resource rows
    granularity INTEGER NOT NULL,
    bucket      INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    sum         REAL NOT NULL,
    min         REAL NOT NULL,
    max         REAL NOT NULL,
    first       INTEGER NOT NULL,
    last        INTEGER NOT NULL,
    PRIMARY KEY (granularity, bucket, meter_id, resource_id)
) WITHOUT ROWID;
-- The granularities rollups are kept at, and from which bucket on each is complete (a
-- granularity configured later does not cover samples stored before).
CREATE TABLE rollup_level (
    granularity INTEGER PRIMARY KEY,
    complete_from INTEGER NOT NULL
);
";

/// Version 3: retention hides a chunk in O(1) and reclaims its pages later, in bounded steps.
/// A chunk table listed here is no longer in `sample_partition` (no query sees it); its rows
/// are deleted a few hundred per transaction between batches and the small remainder dropped
/// (see `reclaim_step` in the driver). Being in the schema, the work resumes after a restart.
const V3: &str = "
CREATE TABLE sample_graveyard (
    name TEXT PRIMARY KEY
);
";

/// What a migration needs to know beyond the SQL: the partition span and rollup levels.
pub struct Layout<'a> {
    pub span_us: i64,
    pub rollups: &'a [Granularity],
}

/// One migration step.
type Step = fn(&Transaction<'_>, &Layout<'_>) -> rusqlite::Result<()>;

fn v1(tx: &Transaction<'_>, _: &Layout<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(V1)
}

/// Version 1 → 2: move the samples into chunk tables, compute the rollups, drop `sample`.
fn v2(tx: &Transaction<'_>, layout: &Layout<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(V2)?;
    let span = layout.span_us.max(1);
    let los: Vec<i64> = {
        // Per span, through ix_sample_meter_timestamp per meter.
        let mut stmt = tx.prepare(
            "SELECT DISTINCT timestamp - ((timestamp % ?1) + ?1) % ?1 FROM sample
              WHERE meter_id IN (SELECT id FROM meter) ORDER BY 1",
        )?;
        let rows = stmt.query_map([span], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for lo in los {
        let r = Range { lo, hi: lo + span };
        let name = create_chunk(tx, r)?;
        tx.execute(
            &format!(
                "INSERT INTO \"{name}\" (id, meter_id, resource_id, volume, timestamp,
                                        recorded_at, message_signature, message_key)
                 SELECT id, meter_id, resource_id, volume, timestamp, recorded_at,
                        message_signature, {key} FROM sample
                  WHERE meter_id IN (SELECT id FROM meter) AND timestamp >= ?1 AND timestamp < ?2
                  ORDER BY id",
                key = message_key_blob_sql("message_id")
            ),
            params![r.lo, r.hi],
        )?;
        for g in layout.rollups {
            rollup_from_partition(tx, &name, g)?;
        }
    }
    for g in layout.rollups {
        tx.execute(
            "INSERT OR IGNORE INTO rollup_level (granularity, complete_from) VALUES (?1, ?2)",
            params![g.seconds as i64, i64::MIN],
        )?;
    }
    tx.execute_batch("DROP TABLE sample")?;
    refresh_view(tx)
}

fn v3(tx: &Transaction<'_>, _: &Layout<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(V3)
}

/// The view `sample`: every chunk table as one, for readers outside the driver (the
/// `sqlite3` shell, scripts, tests) that knew version 1's table. Remade whenever a chunk is
/// created or dropped (a schema change: other connections re-prepare once).
pub fn refresh_view(conn: &Connection) -> rusqlite::Result<()> {
    let table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'sample' AND type = 'table')",
        [],
        |r| r.get(0),
    )?;
    if table {
        // Version 1's table, mid-migration: the view replaces it once it is dropped.
        return Ok(());
    }
    let names: Vec<String> = {
        let mut stmt = conn.prepare_cached("SELECT name FROM sample_partition ORDER BY lo")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let body = if names.is_empty() {
        NO_SAMPLES.to_string()
    } else {
        union_all(
            names
                .iter()
                .map(|n| format!("SELECT {} FROM \"{n}\"", chunk_columns())),
        )
    };
    conn.execute_batch(&format!(
        "DROP VIEW IF EXISTS sample; CREATE VIEW sample AS {body};"
    ))
}

/// Terms per compound SELECT in [`union_all`]: SQLite refuses a compound of more than
/// `SQLITE_MAX_COMPOUND_SELECT` (500 in its default build, a compile-time maximum that
/// `sqlite3_limit` can only lower).
const UNION_TERMS: usize = 400;

/// `a UNION ALL b UNION ALL ...` of the given SELECTs (at least one), nested in groups of
/// [`UNION_TERMS`] when there are more, so that no compound exceeds SQLite's limit: a store of
/// day chunks kept without a TTL passes 500 chunks after 500 days, and a single compound of
/// them made every chunk creation (the view) and every raw query across them fail.
pub fn union_all(terms: impl Iterator<Item = String>) -> String {
    let terms: Vec<String> = terms.collect();
    if terms.len() <= UNION_TERMS {
        return terms.join(" UNION ALL ");
    }
    let groups: Vec<String> = terms
        .chunks(UNION_TERMS)
        .map(|g| format!("SELECT * FROM ({})", g.join(" UNION ALL ")))
        .collect();
    union_all(groups.into_iter())
}

/// `(a AND b AND ...)` of the given conditions (`1 = 1` for none), nested in groups of 100:
/// SQLite parses a chain of ANDs as a tree as deep as the chain is long and refuses one deeper
/// than 1000 (`SQLITE_MAX_EXPR_DEPTH`).
pub fn and_all(terms: impl Iterator<Item = String>) -> String {
    const GROUP: usize = 100;
    let mut terms: Vec<String> = terms.collect();
    if terms.is_empty() {
        return "1 = 1".to_string();
    }
    while terms.len() > 1 {
        terms = terms
            .chunks(GROUP)
            .map(|g| format!("({})", g.join(" AND ")))
            .collect();
    }
    terms.remove(0)
}

/// What the `sample` view and the raw queries select from a chunk table, whichever version
/// made it: its columns, with `message_id` given back from the key where only the key is kept
/// ([`crate::msgkey::message_id_sql`]).
pub fn chunk_columns() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "id, meter_id, resource_id, volume, timestamp, recorded_at, {} AS message_id,
             message_signature",
            message_id_sql("")
        )
    })
}

/// [`chunk_columns`] as an empty stand-in when there is no chunk.
pub const NO_SAMPLES: &str = "SELECT 0 AS id, 0 AS meter_id, 0 AS resource_id, 0.0 AS volume,
    0 AS timestamp, 0 AS recorded_at, '' AS message_id, NULL AS message_signature WHERE 0";

/// Fold every sample of a chunk table into the rollups of granularity `g` (migration).
fn rollup_from_partition(
    tx: &Transaction<'_>,
    name: &str,
    g: &Granularity,
) -> rusqlite::Result<()> {
    let upd = "count = count + excluded.count, sum = sum + excluded.sum,
               min = min(min, excluded.min), max = max(max, excluded.max),
               first = min(first, excluded.first), last = max(last, excluded.last)";
    let bucket = "s.timestamp - ((s.timestamp % ?2) + ?2) % ?2";
    tx.execute(
        &format!(
            "INSERT INTO rollup_meter
               SELECT s.meter_id, ?1, {bucket}, COUNT(*), SUM(s.volume), MIN(s.volume),
                      MAX(s.volume), MIN(s.timestamp), MAX(s.timestamp)
                 FROM \"{name}\" s WHERE true GROUP BY s.meter_id, 3
             ON CONFLICT (meter_id, granularity, bucket) DO UPDATE SET {upd}"
        ),
        params![g.seconds as i64, g.micros()],
    )?;
    tx.execute(
        &format!(
            "INSERT INTO rollup_resource
               SELECT s.meter_id, r.resource_id, ?1, {bucket}, COUNT(*), SUM(s.volume),
                      MIN(s.volume), MAX(s.volume), MIN(s.timestamp), MAX(s.timestamp)
                 FROM \"{name}\" s JOIN resource r ON r.internal_id = s.resource_id
                WHERE true GROUP BY s.meter_id, r.resource_id, 4
             ON CONFLICT (granularity, bucket, meter_id, resource_id) DO UPDATE SET {upd}"
        ),
        params![g.seconds as i64, g.micros()],
    )?;
    Ok(())
}

/// Create the chunk table for `r` (if missing) and register it; returns its name.
pub fn create_partition(tx: &Connection, r: Range) -> rusqlite::Result<String> {
    let name = r.name("sample_");
    // A chunk for this range was expired and its table still awaits reclaiming: finish that
    // first, so the new chunk starts empty. Only a sample for an expired day gets here (the
    // daemon normally refuses those on arrival), so the one long drop is acceptable.
    let buried = tx
        .prepare_cached("DELETE FROM sample_graveyard WHERE name = ?1")?
        .execute([&name])?;
    if buried > 0 {
        tx.execute_batch(&format!("DROP TABLE IF EXISTS \"{name}\""))?;
    }
    create_chunk(tx, r)
}

/// [`create_partition`] without the graveyard (which versions before 3 do not have).
fn create_chunk(tx: &Connection, r: Range) -> rusqlite::Result<String> {
    let name = r.name("sample_");
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS \"{name}\" (
             id                INTEGER PRIMARY KEY,
             meter_id          INTEGER NOT NULL,
             resource_id       INTEGER NOT NULL,
             volume            REAL NOT NULL,
             timestamp         INTEGER NOT NULL,
             recorded_at       INTEGER NOT NULL,
             message_id        TEXT,         -- NULL: the id is kept as its key
             message_signature TEXT,
             -- msgkey::StoredKey of the id (16 bytes for uuid1, else the id): unique.
             message_key       BLOB NOT NULL
         );
         CREATE UNIQUE INDEX IF NOT EXISTS \"ix_{name}_message_key\" ON \"{name}\" (message_key);
         CREATE INDEX IF NOT EXISTS \"ix_{name}_meter_timestamp\" ON \"{name}\" (meter_id, timestamp);
         CREATE INDEX IF NOT EXISTS \"ix_{name}_resource_timestamp\" ON \"{name}\" (resource_id, timestamp);",
    ))?;
    let added = tx.execute(
        "INSERT OR IGNORE INTO sample_partition (lo, hi, name) VALUES (?1, ?2, ?3)",
        params![r.lo, r.hi, name],
    )?;
    if added > 0 {
        refresh_view(tx)?;
    }
    Ok(name)
}

/// Version 4: chunks made from now on enforce `message_id`'s uniqueness by a unique index on
/// its [`crate::msgkey`] key (time-ordered for uuid1 ids) instead of a `UNIQUE` column. Older
/// chunks keep their index (both admit the same rows) and nothing is rewritten; the version
/// changes so that an older build, whose `ON CONFLICT (message_id)` names a constraint the new
/// chunks lack, refuses the file instead of failing every batch.
fn v4(_: &Transaction<'_>, _: &Layout<'_>) -> rusqlite::Result<()> {
    Ok(())
}

/// Version 5: `rollup_level.source`, the finer level a level's per-resource buckets are folded
/// from (0: written directly), and `fold_from`, the bucket from which on they are
/// ([`rollup::Level`]). A store without rollups yet has its levels registered afresh, with
/// sources; a store with rollups gets its sources at registration, from a bucket ahead.
fn v5(tx: &Transaction<'_>, _: &Layout<'_>) -> rusqlite::Result<()> {
    for (column, default) in [("source", "0"), ("fold_from", "-9223372036854775808")] {
        if !has_column(tx, "rollup_level", column)? {
            tx.execute_batch(&format!(
                "ALTER TABLE rollup_level ADD COLUMN {column} INTEGER NOT NULL DEFAULT {default};"
            ))?;
        }
    }
    tx.execute_batch(
        "DELETE FROM rollup_level WHERE NOT EXISTS (SELECT 1 FROM rollup_meter)
            AND NOT EXISTS (SELECT 1 FROM rollup_resource);",
    )
}

/// Version 6: chunks made from now on keep their samples' ids as [`crate::msgkey::StoredKey`]s
/// in a `message_key` column (16 bytes for a uuid1 id instead of 36 characters; `message_id`
/// is left NULL and given back from the key when read), written by the driver with each row,
/// and are unique on that column instead of on version 4's expression. Evaluating the
/// expression (two `GLOB`s, five `substr`s) for every inserted row cost more than the column,
/// and any SQL function in a statement makes SQLite keep a statement journal, a copy of every
/// page a multi-row insert changes: with a plain column and `INSERT OR IGNORE`, an insert can
/// no longer fail half-way and keeps none (docs/performance.md, seventh session). Older chunks
/// keep their rows, index and the driver's older statement; they get a `message_key` column
/// that stays NULL (adding a nullable column rewrites nothing), so that every chunk answers
/// [`chunk_columns`]. The version changes so that an older build, which would insert rows
/// without the key, refuses the file.
fn v6(tx: &Transaction<'_>, _: &Layout<'_>) -> rusqlite::Result<()> {
    let names: Vec<String> = {
        let mut stmt = tx.prepare("SELECT name FROM sample_partition ORDER BY lo")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for name in names {
        if !has_column(tx, &name, "message_key")? {
            tx.execute_batch(&format!(
                "ALTER TABLE \"{name}\" ADD COLUMN message_key BLOB"
            ))?;
        }
    }
    refresh_view(tx)
}

/// Applied in order; entry `i` takes a file from version `i` to `i + 1`. Append only.
pub const MIGRATIONS: &[Step] = &[v1, v2, v3, v4, v5, v6];

/// Whether `table` has a column `column` (migrations that add one may run again).
fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
        [table, column],
        |r| r.get(0),
    )
}

/// Whether chunk table `name` was made by version 6 or later: unique on its `message_key`
/// column (`NOT NULL` there; an older chunk's, added by [`v6`], is nullable and unused).
pub fn keyed_chunk(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1)
                         WHERE name = 'message_key' AND \"notnull\" = 1)",
    )?
    .query_row([name], |r| r.get(0))
}

/// The `rollup_resource` upsert that merges the rows of granularity `?2` chosen by `filter` (a
/// condition on `bucket`) into level `?1`, each into the bucket of `?1` holding it.
pub fn merge_resource_rows_sql(filter: &str) -> String {
    format!(
        "INSERT INTO rollup_resource (meter_id, resource_id, granularity, bucket, count, sum,
                                      min, max, first, last)
         SELECT meter_id, resource_id, ?1,
                bucket - ((bucket % (?1 * 1000000)) + ?1 * 1000000) % (?1 * 1000000) AS b,
                SUM(count), SUM(sum), MIN(min), MAX(max), MIN(first), MAX(last)
           FROM rollup_resource WHERE granularity = ?2 AND {filter}
          GROUP BY meter_id, resource_id, b
         ON CONFLICT (granularity, bucket, meter_id, resource_id) DO UPDATE SET
           count = count + excluded.count, sum = sum + excluded.sum,
           min = min(min, excluded.min), max = max(max, excluded.max),
           first = min(first, excluded.first), last = max(last, excluded.last)"
    )
}

/// The rollup levels of `layout` missing from `rollup_level` are added, complete from the
/// bucket after the newest sample's (samples stored before were not counted at that level),
/// with their sources ([`rollup::assign_sources`]); a direct level gets a source from a
/// bucket ahead; a level whose source is no longer configured takes the source's buckets
/// from its `fold_from` on and becomes direct. When anything changed, the cache epoch moves,
/// so every writer reloads the levels before its next batch.
pub fn register_rollup_levels(conn: &Connection, layout: &Layout<'_>) -> rusqlite::Result<()> {
    let changes = rollup::level_changes(layout.rollups, &crate::sqlite::query::load_levels(conn)?);
    for (had, want) in &changes {
        let (secs, source, from) = (want.seconds as i64, want.source as i64, want.fold_from);
        match had {
            Some(had) => {
                if had.source != 0 {
                    conn.execute(
                        &merge_resource_rows_sql("bucket >= ?3"),
                        params![secs, had.source as i64, had.fold_from],
                    )?;
                }
                conn.execute(
                    "UPDATE rollup_level SET source = ?2, fold_from = ?3 WHERE granularity = ?1",
                    params![secs, source, from],
                )?;
            }
            None => {
                let newest: Option<i64> =
                    conn.query_row("SELECT MAX(last) FROM rollup_meter", [], |r| r.get(0))?;
                conn.execute(
                    "INSERT OR IGNORE INTO rollup_level (granularity, complete_from, source,
                                                         fold_from)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        secs,
                        rollup::complete_from(newest, want.seconds),
                        source,
                        from
                    ],
                )?;
            }
        }
    }
    if !changes.is_empty() {
        conn.execute("UPDATE cache_epoch SET epoch = epoch + 1", [])?;
    }
    Ok(())
}

/// The version this build writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

fn read_version(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(None);
    }
    conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()
}

/// Bring the file to [`current_version`]. Errors are rusqlite's or
/// [`StorageError::SchemaTooNew`]; the caller maps the former.
pub fn migrate(conn: &mut Connection, layout: &Layout<'_>) -> Result<(), MigrateError> {
    // Common case first, without taking the write lock: already up to date.
    if read_version(conn)? == Some(current_version()) {
        if levels_differ(conn, layout)? {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            register_rollup_levels(&tx, layout)?;
            tx.commit()?;
        }
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let found = match read_version(&tx)? {
        Some(v) => v,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", [])?;
            0
        }
    };
    if found > current_version() {
        return Err(MigrateError::TooNew(StorageError::SchemaTooNew {
            found,
            supported: current_version(),
        }));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        log::info!("sqlite: migrating schema to version {}", i + 1);
        step(&tx, layout)?;
    }
    register_rollup_levels(&tx, layout)?;
    tx.execute(
        "UPDATE schema_version SET version = ?1",
        [current_version()],
    )?;
    tx.commit()?;
    Ok(())
}

fn levels_differ(conn: &Connection, layout: &Layout<'_>) -> rusqlite::Result<bool> {
    let registered = crate::sqlite::query::load_levels(conn)?;
    Ok(!rollup::level_changes(layout.rollups, &registered).is_empty())
}

/// Failure of [`migrate`].
#[derive(Debug)]
pub enum MigrateError {
    Sql(rusqlite::Error),
    TooNew(StorageError),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sql(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_newer_files() {
        let mut conn = Connection::open_in_memory().unwrap();
        let rollups = crate::rollup::default_granularities();
        let layout = Layout {
            span_us: crate::partition::DAY_US,
            rollups: &rollups,
        };
        migrate(&mut conn, &layout).unwrap();
        migrate(&mut conn, &layout).unwrap();
        let v: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, current_version());
        conn.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        match migrate(&mut conn, &layout) {
            Err(MigrateError::TooNew(StorageError::SchemaTooNew { found: 99, .. })) => {}
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }
}

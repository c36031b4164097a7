//! The SQLite schema and its migrations.
//!
//! `schema_version` holds one row: how many entries of [`MIGRATIONS`] the file has had applied.
//! Every open brings the file up to date inside one `BEGIN IMMEDIATE` transaction, so when
//! several worker processes open a fresh file at once exactly one of them migrates and the
//! others find the work done. A file migrated by a newer build is refused rather than guessed at.

use crate::StorageError;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

/// Version 1: ceilometer's normalized model (meter, resource, sample) plus typed, flattened
/// resource metadata and the cache epoch. See docs/storage.md for the reasoning per column.
const V1: &str = "
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

/// Applied in order; entry `i` takes a file from version `i` to `i + 1`. Append only.
pub const MIGRATIONS: &[&str] = &[V1];

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
pub fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    // Common case first, without taking the write lock: already up to date.
    if read_version(conn)? == Some(current_version()) {
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
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        log::info!("sqlite: migrating schema to version {}", i + 1);
        tx.execute_batch(sql)?;
    }
    tx.execute(
        "UPDATE schema_version SET version = ?1",
        [current_version()],
    )?;
    tx.commit()?;
    Ok(())
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
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, current_version());
        conn.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        match migrate(&mut conn) {
            Err(MigrateError::TooNew(StorageError::SchemaTooNew { found: 99, .. })) => {}
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }
}

//! The MySQL/MariaDB schema and its migrations.
//!
//! MySQL's DDL is not transactional (each statement commits), so migrations are serialized by
//! a named server lock (`GET_LOCK`, named after the database) rather than a transaction, and
//! every statement is `CREATE ... IF NOT EXISTS` so a migration interrupted half-way is simply
//! run again. `schema_version` records how many entries of [`MIGRATIONS`] are applied.

use super::{Fail, MyConn};
use crate::StorageError;
use ::mysql::prelude::Queryable;

/// Version 1. `{coll}` is a binary, no-pad collation: exact, case- and trailing-space-sensitive
/// comparison (`utf8mb4_nopad_bin` on MariaDB, `utf8mb4_0900_bin` on MySQL 8), so two
/// message_ids differing in case or trailing spaces are different samples, as elsewhere.
const V1: &[&str] = &[
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

/// Applied in order; entry `i` takes a database from version `i` to `i + 1`. Append only.
pub const MIGRATIONS: &[&[&str]] = &[V1];

pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
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

/// Bring the database to [`current_version`].
pub(crate) fn migrate(conn: &mut MyConn, database: &str) -> Result<(), Fail> {
    if read_version(conn)? == Some(current_version()) {
        return Ok(());
    }
    // Lock names are server-wide: name it after the database. At most 64 characters.
    let name: String = format!("collector.schema.{database}")
        .chars()
        .take(64)
        .collect();
    let got: Option<Option<i64>> = conn.exec_first("SELECT GET_LOCK(?, 60)", (&name,))?;
    if got.flatten() != Some(1) {
        return Err(Fail::Storage(StorageError::Unavailable(format!(
            "mysql: timed out waiting for lock {name:?} held by another process migrating the schema"
        ))));
    }
    let result = migrate_locked(conn);
    let released = conn.exec_drop("SELECT RELEASE_LOCK(?)", (&name,));
    result?;
    released?;
    Ok(())
}

fn migrate_locked(conn: &mut MyConn) -> Result<(), Fail> {
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
    for (i, statements) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        log::info!(
            "mysql: migrating schema to version {} (collation {coll})",
            i + 1
        );
        for sql in *statements {
            conn.query_drop(sql.replace("{coll}", &coll))?;
        }
        conn.exec_drop("UPDATE schema_version SET version = ?", (i as i64 + 1,))?;
    }
    Ok(())
}

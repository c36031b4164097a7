//! The embedded SQLite driver (`sqlite://`), modelled on ceilometer's normalized SQL model.
//!
//! Several worker processes write one file: WAL mode lets readers proceed beside the single
//! writer, every batch is one `BEGIN IMMEDIATE` transaction (the write lock is taken up front,
//! so a busy database fails at `BEGIN` after `busy_timeout` instead of deadlocking mid-batch),
//! and `message_id` is unique (by its time-ordered key, [`crate::msgkey`]), so retried or
//! redelivered batches store nothing twice.
//!
//! The hot path is one multi-row `INSERT ... ON CONFLICT DO NOTHING` per chunk of
//! samples: meter and resource ids come from in-process caches, valid across processes because
//! ids never change while a row lives; rows are only deleted by expiry, which bumps
//! `cache_epoch` so every process drops its caches at its next batch. Expiry takes a chunk
//! out of the live set in one short transaction and batches then reclaim its pages a bounded
//! step at a time ([`SqliteStorage::reclaim_step`]). Schema and reasoning: docs/storage.md.

pub(crate) mod cache;
mod query;
pub mod schema;

use crate::json::{flatten, FlatValue, Json};
use crate::model::to_micros;
use crate::msgkey::StoredKey;
use crate::partition::{self, Partitions};
use crate::rollup::{self, BatchRollup};
use crate::url::StorageUrl;
use crate::{
    MeterInfo, RecordOutcome, ResourceInfo, SampleFilter, Statistics, Storage, StorageError,
    StorageOptions, StoredSample,
};
use cache::{MeterCache, ResourceCache};
use meter::{Sample, Volume};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, ToSql, TransactionBehavior};
use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{c_int, c_void};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    File(PathBuf),
    /// `sqlite://`, `sqlite://:memory:`: private to this connection, gone when it closes.
    Memory,
}

impl Target {
    /// Parse the part of a `sqlite://` URL after `://`, following SQLAlchemy: `/data/x.db` is
    /// the relative path `data/x.db`, `//var/lib/x.db` the absolute `/var/lib/x.db`, and an
    /// empty path or `:memory:` an in-memory database.
    pub fn from_url(url: &StorageUrl<'_>) -> Result<Target, StorageError> {
        let rest = url.rest;
        if rest.contains('?') {
            return Err(url.error("query parameters are not supported"));
        }
        if rest.is_empty() || rest == ":memory:" {
            return Ok(Target::Memory);
        }
        let Some(path) = rest.strip_prefix('/') else {
            return Err(url.error(
                "sqlite URLs take no host: use sqlite:///relative/path.db or sqlite:////absolute/path.db",
            ));
        };
        if path.is_empty() || path == ":memory:" {
            return Ok(Target::Memory);
        }
        Ok(Target::File(PathBuf::from(path)))
    }

    fn describe(&self) -> String {
        match self {
            Target::File(p) => p.display().to_string(),
            Target::Memory => ":memory:".to_string(),
        }
    }
}

/// The SQLite [`Storage`] driver.
pub struct SqliteStorage {
    target: Target,
    opts: StorageOptions,
    synchronous: &'static str,
    /// `None` after a fault that may have left the connection unusable; the next call reopens.
    conn: Option<Connection>,
    meters: MeterCache,
    resources: ResourceCache,
    /// The `cache_epoch` the caches were filled under.
    epoch: i64,
    /// Scratch buffer for metadata JSON, reused across samples.
    json_buf: Vec<u8>,
    /// The chunk tables known to this connection; reloaded with the caches (expiry drops
    /// chunks and bumps the epoch) and when a batch needs one it does not know.
    partitions: Partitions,
    /// Whether each chunk table used so far has schema 6's `message_key` column (which
    /// insert statement it takes); forgotten with the partitions.
    keyed: std::collections::HashMap<String, bool>,
    /// When rollup retention last ran (it walks every series, so not on every pass).
    rollup_retention_at: Option<Instant>,
    /// Whether `sample_graveyard` may list expired chunks whose pages are still to be
    /// reclaimed: checked when the epoch changes (expiry bumps it), cleared when a reclaim step
    /// finds nothing. While set, every batch is followed by one [`SqliteStorage::reclaim_step`].
    graveyard: bool,
    /// The rollup levels a sample is written to per resource (the others are folded from one
    /// of these: [`rollup::Level`]); loaded with the caches, before the first batch.
    plan: rollup::ResourcePlan,
}

/// What one [`SqliteStorage::reclaim_step`] did to an expired chunk's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// The chunk table (`sample_<lo>`, no longer in `sample_partition`).
    pub table: String,
    /// Rows deleted: at most [`RECLAIM_ROWS`], or at most [`RECLAIM_DROP_ROWS`] with `dropped`.
    pub rows: u64,
    /// The step dropped this secondary index instead (the table had at most
    /// [`RECLAIM_INDEX_ROWS`] rows left).
    pub index: Option<String>,
    /// The table (and its indexes) were dropped: the chunk is gone.
    pub dropped: bool,
}

/// Rows one reclaim step deletes from an expired chunk (by rowid, from the top: the table's
/// B-tree is walked in order, each index left gets one delete per row, at random places).
/// Chosen so a step costs well under a 1000-sample batch (docs/storage.md, *Measured*).
pub const RECLAIM_ROWS: i64 = 500;

/// Once an expired chunk has at most this many rows, its indexes are dropped (the two
/// secondary ones, and the `message_id` key's of a chunk made by version 4 or later), one per
/// step (`DROP INDEX` visits each of the index's pages — about 1,500 at this size —
/// but writes next to none, while deleting rows dirties a page of every index per row): the
/// rows left are then deleted with only the table (and, in a chunk made before version 4, its
/// `message_id` index, which is part of the table) to update.
pub const RECLAIM_INDEX_ROWS: i64 = 250_000;

/// An expired chunk with at most this many rows left is dropped whole in one step: `DROP
/// TABLE` visits every page of the table and its indexes, so this bounds the pages it reads.
pub const RECLAIM_DROP_ROWS: i64 = 4000;

/// A validated sample with its ids resolved, ready to insert.
struct Row<'a> {
    index: usize,
    meter_id: i64,
    resource_id: i64,
    volume: f64,
    timestamp: i64,
    sample: &'a Sample,
}

/// Samples are inserted by multi-row statements of these sizes (largest that fits first):
/// one statement per row spent a third of the insert time in per-statement overhead, and a
/// fixed set of sizes keeps the statements in the prepared-statement cache.
const CHUNK_SIZES: [usize; 4] = [128, 32, 8, 1];

/// The largest chunk size that fits in `remaining` rows, and its statement for chunk `table`
/// (`keyed`: made by schema 6 or later, with a `message_key` column; see [`schema::keyed_chunk`]).
///
/// A keyed chunk's insert gives the id as its key only (`message_id` stays NULL, see
/// [`schema::keyed_chunk`]) and is `INSERT OR IGNORE` of plain values: nothing in it can fail
/// half-way (no SQL function, no constraint resolved by aborting), so SQLite keeps no statement
/// journal for it. Its constraints are the unique key (a duplicate is skipped, as `ON CONFLICT
/// DO NOTHING` did) and NOT NULLs the bound values always satisfy. An older chunk's unique
/// index is an expression of `message_id` ([`crate::msgkey::message_key_sql`]), evaluated by
/// SQLite for every row, and keeps its statement.
fn insert_statement(table: &str, remaining: usize, keyed: bool) -> (usize, String) {
    let i = CHUNK_SIZES
        .iter()
        .position(|&n| n <= remaining)
        .unwrap_or(CHUNK_SIZES.len() - 1);
    // Seven values a row either way: a keyed chunk's key in place of the id.
    let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; CHUNK_SIZES[i]].join(", ");
    let sql = if keyed {
        format!(
            "INSERT OR IGNORE INTO \"{table}\" (meter_id, resource_id, volume, timestamp,
               recorded_at, message_signature, message_key) VALUES {values}"
        )
    } else {
        format!(
            "INSERT INTO \"{table}\" (meter_id, resource_id, volume, timestamp, recorded_at,
               message_id, message_signature) VALUES {values}
             ON CONFLICT DO NOTHING"
        )
    };
    (CHUNK_SIZES[i], sql)
}

/// Rollup rows are upserted by multi-row statements of these sizes.
const ROLLUP_SIZES: [usize; 4] = [64, 16, 4, 1];

const ROLLUP_UPDATE: &str = "count = count + excluded.count, sum = sum + excluded.sum,
    min = min(min, excluded.min), max = max(max, excluded.max),
    first = min(first, excluded.first), last = max(last, excluded.last)";

/// The upsert of `n` per-meter (or, with `resource`, per-resource) rollup rows.
fn rollup_statement(resource: bool, n: usize) -> &'static str {
    static SQL: OnceLock<Vec<(String, String)>> = OnceLock::new();
    let sql = SQL.get_or_init(|| {
        ROLLUP_SIZES
            .iter()
            .map(|&n| {
                let m = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; n].join(", ");
                let r = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; n].join(", ");
                (
                    format!(
                        "INSERT INTO rollup_meter (meter_id, granularity, bucket, count, sum, min,
                           max, first, last) VALUES {m}
                         ON CONFLICT (meter_id, granularity, bucket) DO UPDATE SET {ROLLUP_UPDATE}"
                    ),
                    format!(
                        "INSERT INTO rollup_resource (meter_id, resource_id, granularity, bucket,
                           count, sum, min, max, first, last) VALUES {r}
                         ON CONFLICT (granularity, bucket, meter_id, resource_id)
                         DO UPDATE SET {ROLLUP_UPDATE}"
                    ),
                )
            })
            .collect()
    });
    let i = ROLLUP_SIZES.iter().position(|&k| k == n).unwrap_or(3);
    if resource {
        &sql[i].1
    } else {
        &sql[i].0
    }
}

/// Upsert a batch's rollup buckets.
fn write_rollups(conn: &Connection, b: &BatchRollup<'_>) -> rusqlite::Result<()> {
    let meters: Vec<_> = b.meters.iter().collect();
    let mut rest = &meters[..];
    while !rest.is_empty() {
        let n = ROLLUP_SIZES
            .iter()
            .copied()
            .find(|&k| k <= rest.len())
            .unwrap_or(1);
        let (chunk, tail) = rest.split_at(n);
        let mut params: Vec<&dyn ToSql> = Vec::with_capacity(n * 9);
        let grans: Vec<i64> = chunk.iter().map(|((g, _, _), _)| *g as i64).collect();
        for (((_, meter, bucket), a), g) in chunk.iter().zip(&grans) {
            params.extend_from_slice(&[
                meter as &dyn ToSql,
                g,
                bucket,
                &a.count as &dyn ToSql,
                &a.sum,
                &a.min,
                &a.max,
                &a.first,
                &a.last,
            ]);
        }
        conn.prepare_cached(rollup_statement(false, n))?
            .execute(&*params)?;
        rest = tail;
    }
    let resources: Vec<_> = b.resources.iter().collect();
    let mut rest = &resources[..];
    while !rest.is_empty() {
        let n = ROLLUP_SIZES
            .iter()
            .copied()
            .find(|&k| k <= rest.len())
            .unwrap_or(1);
        let (chunk, tail) = rest.split_at(n);
        let mut params: Vec<&dyn ToSql> = Vec::with_capacity(n * 10);
        let grans: Vec<i64> = chunk.iter().map(|((g, _, _, _), _)| *g as i64).collect();
        for (((_, meter, resource, bucket), a), g) in chunk.iter().zip(&grans) {
            params.extend_from_slice(&[
                meter as &dyn ToSql,
                resource,
                g,
                bucket,
                &a.count as &dyn ToSql,
                &a.sum,
                &a.min,
                &a.max,
                &a.first,
                &a.last,
            ]);
        }
        conn.prepare_cached(rollup_statement(true, n))?
            .execute(&*params)?;
        rest = tail;
    }
    Ok(())
}

/// Insert one chunk into `table`; count what was stored and which indices were duplicates.
fn insert_chunk(
    conn: &Connection,
    table: &str,
    keyed: bool,
    sql: &str,
    chunk: &[&Row<'_>],
    recorded_at: i64,
    outcome: &mut RecordOutcome,
) -> rusqlite::Result<()> {
    let keys: Vec<StoredKey<'_>> = if keyed {
        chunk
            .iter()
            .map(|r| StoredKey::of(&r.sample.message_id))
            .collect()
    } else {
        Vec::new()
    };
    let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * 7);
    for (i, r) in chunk.iter().enumerate() {
        params.extend_from_slice(&[
            &r.meter_id as &dyn ToSql,
            &r.resource_id,
            &r.volume,
            &r.timestamp,
            &recorded_at,
        ]);
        // A keyed chunk keeps the id as its key only (see schema::v6).
        match keys.get(i) {
            Some(k) => params.extend_from_slice(&[&r.sample.message_signature as &dyn ToSql, k]),
            None => params.extend_from_slice(&[
                &r.sample.message_id as &dyn ToSql,
                &r.sample.message_signature,
            ]),
        }
    }
    let inserted = conn.prepare_cached(sql)?.execute(&*params)?;
    if inserted == chunk.len() {
        outcome.stored += inserted;
        return Ok(());
    }
    // Some message_ids were already stored (or repeat within the chunk). The rows this
    // statement inserted got consecutive rowids ending at last_insert_rowid — nobody else
    // writes under our lock — and, rows being inserted in order, each id's first occurrence.
    let mut fresh = HashSet::new();
    if inserted > 0 {
        let last = conn.last_insert_rowid();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM \"{table}\" WHERE id > ?1 AND id <= ?2",
            crate::msgkey::message_id_sql("")
        ))?;
        let ids = stmt.query_map(params![last - inserted as i64, last], |r| {
            r.get::<_, String>(0)
        })?;
        for id in ids {
            fresh.insert(id?);
        }
    }
    for r in chunk {
        if fresh.remove(&r.sample.message_id) {
            outcome.stored += 1;
        } else {
            outcome.duplicate_indices.push(r.index);
        }
    }
    Ok(())
}

/// How often rollup retention runs (its buckets are an hour or longer).
const ROLLUP_RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Registry entry point.
pub fn open_boxed(
    url: &StorageUrl<'_>,
    opts: &StorageOptions,
) -> Result<Box<dyn Storage>, StorageError> {
    Ok(Box::new(SqliteStorage::open(Target::from_url(url)?, opts)?))
}

impl SqliteStorage {
    /// Open (creating the file and its parent directory if missing) and migrate the schema.
    pub fn open(target: Target, opts: &StorageOptions) -> Result<Self, StorageError> {
        let synchronous = synchronous_level(&opts.sqlite_synchronous)?;
        let mut storage = SqliteStorage {
            target,
            opts: opts.clone(),
            synchronous,
            conn: None,
            meters: MeterCache::default(),
            resources: ResourceCache::default(),
            epoch: i64::MIN,
            json_buf: Vec::new(),
            partitions: Partitions::default(),
            keyed: Default::default(),
            rollup_retention_at: None,
            graveyard: true,
            plan: rollup::ResourcePlan::default(),
        };
        storage.connection()?;
        Ok(storage)
    }

    /// The database file, or `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        match &self.target {
            Target::File(p) => Some(p),
            Target::Memory => None,
        }
    }

    /// The open connection, reopening it after a fault.
    fn connection(&mut self) -> Result<&mut Connection, StorageError> {
        if self.conn.is_none() {
            let conn = connect(&self.target, &self.opts, self.synchronous)?;
            self.conn = Some(conn);
        }
        match self.conn.as_mut() {
            Some(c) => Ok(c),
            None => Err(StorageError::Database("connection vanished".into())),
        }
    }

    /// Map a rusqlite error and leave the driver ready for the next call.
    fn fail(&mut self, e: rusqlite::Error) -> StorageError {
        let err = map_error(&self.target, &e);
        // Ids created by the rolled-back transaction may sit in the caches.
        self.clear_caches();
        let busy = matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        );
        let in_tx = self.conn.as_ref().is_some_and(|c| !c.is_autocommit());
        if self.target != Target::Memory && ((err.is_transient() && !busy) || in_tx) {
            // After I/O errors, a read-only or full disk, SQLite's own state is suspect: start
            // over with a fresh connection once the fault clears. (Busy is harmless.)
            log::warn!("sqlite {}: reopening after: {err}", self.target.describe());
            self.conn = None;
        }
        err
    }

    fn clear_caches(&mut self) {
        self.meters.clear();
        self.resources.clear();
        self.partitions.clear();
        self.keyed.clear();
        self.epoch = i64::MIN;
    }

    fn span_us(&self) -> i64 {
        i64::try_from(self.opts.partition_span_seconds)
            .unwrap_or(i64::MAX / 1_000_000)
            .max(1)
            .saturating_mul(1_000_000)
    }

    fn write_batch(
        &mut self,
        batch: &[Sample],
        valid: &[(usize, i64)],
        recorded_at: i64,
        outcome: &mut RecordOutcome,
    ) -> rusqlite::Result<()> {
        let span = self.span_us();
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => return Err(rusqlite::Error::InvalidQuery),
        };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let epoch: i64 = tx
            .prepare_cached("SELECT epoch FROM cache_epoch")?
            .query_row([], |r| r.get(0))?;
        if epoch != self.epoch {
            self.meters.clear();
            self.resources.clear();
            self.partitions.clear();
            self.keyed.clear();
            self.epoch = epoch;
            self.graveyard = graveyard_pending(&tx)?;
            self.plan = rollup::ResourcePlan::new(&self.opts.rollups, &query::load_levels(&tx)?);
        }
        let mut rows = Vec::with_capacity(valid.len());
        for &(index, timestamp) in valid {
            let sample = &batch[index];
            rows.push(Row {
                index,
                meter_id: meter_id(&tx, &mut self.meters, sample)?,
                resource_id: resource_id(&tx, &mut self.resources, &mut self.json_buf, sample)?,
                volume: sample.counter_volume.as_f64(),
                timestamp,
                sample,
            });
        }
        if self.partitions.is_empty() {
            self.partitions = load_partitions(&tx)?;
        }
        let mut plan = partition::plan(&self.partitions, rows.iter().map(|r| r.timestamp), span);
        if plan
            .iter()
            .any(|(r, _)| self.partitions.find(r.lo) != Some(*r))
        {
            // A chunk this process has not seen: another may have made it since we looked.
            self.partitions = load_partitions(&tx)?;
            plan = partition::plan(&self.partitions, rows.iter().map(|r| r.timestamp), span);
        }
        let mut part_rows = Vec::with_capacity(rows.len());
        for (range, positions) in &plan {
            let table = if self.partitions.find(range.lo) == Some(*range) {
                range.name("sample_")
            } else {
                let name = schema::create_partition(&tx, *range)?;
                self.partitions.insert(*range);
                name
            };
            let keyed = match self.keyed.get(&table) {
                Some(&k) => k,
                None => {
                    let k = schema::keyed_chunk(&tx, &table)?;
                    self.keyed.insert(table.clone(), k);
                    k
                }
            };
            part_rows.clear();
            part_rows.extend(positions.iter().map(|&i| &rows[i]));
            let mut rest = &part_rows[..];
            while !rest.is_empty() {
                let (size, sql) = insert_statement(&table, rest.len(), keyed);
                let (chunk, tail) = rest.split_at(size);
                insert_chunk(&tx, &table, keyed, &sql, chunk, recorded_at, outcome)?;
                rest = tail;
            }
        }
        if !self.opts.rollups.is_empty() {
            // Only what was inserted: a duplicate never counts twice.
            outcome.duplicate_indices.sort_unstable();
            let mut rollup = BatchRollup::default();
            for r in &rows {
                if outcome.duplicate_indices.binary_search(&r.index).is_err() {
                    rollup.add(
                        &self.opts.rollups,
                        &self.plan,
                        r.meter_id,
                        &r.sample.resource_id,
                        r.timestamp,
                        r.volume,
                    );
                }
            }
            write_rollups(&tx, &rollup)?;
        }
        tx.commit()
    }

    /// Retention: hide the chunk tables entirely older than `cutoff`, one per transaction of
    /// a few row writes whatever the chunk's size (out of `sample_partition` and the view, into
    /// `sample_graveyard`; the epoch bump makes every process forget it); then the resources
    /// and meters nothing live refers to any more, rollup buckets past their own retention, and
    /// one bounded reclaim step (later batches do the rest). Returns the samples expired.
    fn expire(&mut self, cutoff: i64, now: i64) -> rusqlite::Result<u64> {
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => return Err(rusqlite::Error::InvalidQuery),
        };
        let mut total = 0u64;
        let mut dropped = false;
        loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(r) = load_partitions(&tx)?.expired(cutoff).into_iter().next() else {
                break;
            };
            let name = r.name("sample_");
            // The row count comes from the rowid range (the table's own B-tree), not a scan:
            // rows are never deleted from a chunk, so max(id) - min(id) + 1 is exact unless two
            // processes raced for ids, which the write lock excludes.
            let n: i64 = tx.query_row(&rowid_span(&name), [], |row| row.get(0))?;
            tx.execute("DELETE FROM sample_partition WHERE lo = ?1", [r.lo])?;
            tx.execute(
                "INSERT OR IGNORE INTO sample_graveyard (name) VALUES (?1)",
                [&name],
            )?;
            schema::refresh_view(&tx)?;
            // Other processes must forget the chunk (and, below, the rows that go with it).
            tx.execute("UPDATE cache_epoch SET epoch = epoch + 1", [])?;
            tx.commit()?;
            total += n.max(0) as u64;
            dropped = true;
            self.graveyard = true;
        }
        if dropped {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let names: Vec<String> = load_partitions(&tx)?
                .overlapping(None, None)
                .iter()
                .map(|r| r.name("sample_"))
                .collect();
            // One index probe per resource (or meter) row and chunk; the conjunction nested
            // in groups, as SQLite limits an expression's depth to 1000 (a flat AND chain of
            // one term per chunk failed past ~500 chunks).
            let orphan = |col: &str, outer: &str| -> String {
                schema::and_all(names.iter().map(|n| {
                    format!("NOT EXISTS (SELECT 1 FROM \"{n}\" s WHERE s.{col} = {outer})")
                }))
            };
            let resource_orphan = orphan("resource_id", "resource.internal_id");
            tx.execute(
                &format!(
                    "DELETE FROM metadata WHERE id IN
                       (SELECT internal_id FROM resource WHERE {resource_orphan})"
                ),
                [],
            )?;
            tx.execute(&format!("DELETE FROM resource WHERE {resource_orphan}"), [])?;
            // Meters stay while a rollup refers to them: rollups outlive samples. (A meter's
            // per-resource buckets always come with its per-meter ones.)
            tx.execute(
                &format!(
                    "DELETE FROM meter WHERE {}
                       AND NOT EXISTS (SELECT 1 FROM rollup_meter b WHERE b.meter_id = meter.id)",
                    orphan("meter_id", "meter.id")
                ),
                [],
            )?;
            tx.execute("UPDATE cache_epoch SET epoch = epoch + 1", [])?;
            tx.commit()?;
        }
        let due = self
            .rollup_retention_at
            .map_or(true, |t| t.elapsed() >= ROLLUP_RETENTION_INTERVAL);
        if due {
            self.rollup_retention_at = Some(Instant::now());
            expire_rollups(conn, &self.opts.rollups, now)?;
        }
        if self.graveyard {
            // What expiry did is committed: a failed step is retried after the next batch.
            match reclaim(conn) {
                Ok((_, more)) => self.graveyard = more,
                Err(e) => log::warn!("sqlite: reclaiming an expired chunk: {e}"),
            }
        }
        Ok(total)
    }

    /// One bounded step of reclaiming the pages of expired chunks (one short transaction) on
    /// the first table in `sample_graveyard`: the [`RECLAIM_ROWS`] highest rows; or, once at
    /// most [`RECLAIM_INDEX_ROWS`] are left, one of its secondary indexes; or, once at most
    /// [`RECLAIM_DROP_ROWS`] are left, the table itself. `None` when nothing is left to
    /// reclaim. Batches run one step each while there is work; this is for tests and tools.
    pub fn reclaim_step(&mut self) -> Result<Option<Reclaimed>, StorageError> {
        self.connection()?;
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => return Err(StorageError::Database("connection vanished".into())),
        };
        match reclaim(conn) {
            Ok((r, more)) => {
                self.graveyard = more;
                Ok(r)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Run a read-only query with the connection, mapping errors.
    fn read<T>(
        &mut self,
        f: impl FnOnce(&Connection) -> Result<T, query::QueryError>,
    ) -> Result<T, StorageError> {
        let conn = self.connection()?;
        // One read transaction: a query reading the chunk list and then the chunks sees one
        // snapshot (WAL), so a chunk dropped by retention meanwhile is still there for it.
        let result = match conn.unchecked_transaction() {
            Ok(tx) => {
                let r = f(&tx);
                drop(tx); // rolls back: nothing was written
                r
            }
            Err(e) => Err(query::QueryError::Sql(e)),
        };
        match result {
            Ok(v) => Ok(v),
            Err(query::QueryError::Sql(e)) => Err(self.fail(e)),
            Err(query::QueryError::Storage(e)) => Err(e),
        }
    }
}

impl Storage for SqliteStorage {
    fn record_metering_data(&mut self, batch: &[Sample]) -> Result<RecordOutcome, StorageError> {
        let mut outcome = RecordOutcome::default();
        let mut valid = Vec::with_capacity(batch.len());
        let now = to_micros(OffsetDateTime::now_utc());
        let too_old = self.opts.time_to_live_seconds.map(|ttl| {
            now.saturating_sub(
                i64::try_from(ttl)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1_000_000),
            )
        });
        for (i, s) in batch.iter().enumerate() {
            match validate(s) {
                Ok(ts) if too_old.is_some_and(|cutoff| ts < cutoff) => {
                    outcome
                        .rejected
                        .push((i, crate::EXPIRED_REASON.to_string()));
                    outcome.expired += 1;
                }
                Ok(ts) => valid.push((i, ts)),
                Err(reason) => outcome.rejected.push((i, reason)),
            }
        }
        if valid.is_empty() {
            return Ok(outcome);
        }
        let recorded_at = now;
        self.connection()?;
        if let Err(e) = self.write_batch(batch, &valid, recorded_at, &mut outcome) {
            return Err(self.fail(e));
        }
        outcome.duplicates = outcome.duplicate_indices.len();
        if self.graveyard {
            // The batch is committed: a failed step must not fail it (the next one retries).
            if let Err(e) = self.reclaim_step() {
                log::warn!("sqlite: reclaiming an expired chunk: {e}");
            }
        }
        Ok(outcome)
    }

    fn get_samples(&mut self, filter: &SampleFilter) -> Result<Vec<StoredSample>, StorageError> {
        self.read(|c| query::samples(c, filter))
    }

    fn get_meters(&mut self, filter: &SampleFilter) -> Result<Vec<MeterInfo>, StorageError> {
        self.read(|c| query::meters(c, filter))
    }

    fn get_resources(&mut self, filter: &SampleFilter) -> Result<Vec<ResourceInfo>, StorageError> {
        self.read(|c| query::resources(c, filter))
    }

    fn get_meter_statistics(
        &mut self,
        filter: &SampleFilter,
        period: Option<u64>,
    ) -> Result<Vec<Statistics>, StorageError> {
        Ok(self.get_meter_statistics_from(filter, period)?.0)
    }

    fn get_meter_statistics_from(
        &mut self,
        filter: &SampleFilter,
        period: Option<u64>,
    ) -> Result<(Vec<Statistics>, crate::StatsSource), StorageError> {
        let levels = self.opts.rollups.clone();
        let now = to_micros(OffsetDateTime::now_utc());
        self.read(|c| query::statistics_from(c, filter, period, &levels, now))
    }

    fn retention_step(&mut self) -> Result<bool, StorageError> {
        Ok(self.reclaim_step()?.is_some())
    }

    fn clear_expired_metering_data(&mut self, ttl_seconds: u64) -> Result<u64, StorageError> {
        let ttl_us = i64::try_from(ttl_seconds)
            .ok()
            .and_then(|s| s.checked_mul(1_000_000))
            .unwrap_or(i64::MAX);
        let now = to_micros(OffsetDateTime::now_utc());
        let cutoff = now.saturating_sub(ttl_us);
        self.connection()?;
        match self.expire(cutoff, now) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.fail(e)),
        }
    }
}

/// The rows of chunk `table` from its rowid range: two B-tree descents. (One `SELECT
/// MAX(id) - MIN(id)` would scan the table: SQLite's min/max shortcut takes a lone aggregate.)
fn rowid_span(table: &str) -> String {
    format!(
        "SELECT COALESCE((SELECT MAX(id) FROM \"{table}\") - (SELECT MIN(id) FROM \"{table}\") + 1, 0)"
    )
}

/// Whether `sample_graveyard` lists a table.
fn graveyard_pending(conn: &Connection) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM sample_graveyard)")?
        .query_row([], |r| r.get(0))
}

/// See [`SqliteStorage::reclaim_step`]. Rows of a chunk have consecutive rowids (only this
/// deletes them, from the top), so the count left is the rowid range.
/// Also returns whether more is left to reclaim.
fn reclaim(conn: &mut Connection) -> rusqlite::Result<(Option<Reclaimed>, bool)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let name: Option<String> = tx
        .prepare_cached("SELECT name FROM sample_graveyard ORDER BY name LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    let Some(table) = name else {
        return Ok((None, false));
    };
    let exists: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        )?
        .query_row([&table], |r| r.get(0))?;
    let (top, left) = if exists {
        tx.query_row(
            &format!(
                "SELECT (SELECT MAX(id) FROM \"{table}\"), ({})",
                rowid_span(&table)
            ),
            [],
            |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, i64>(1)?)),
        )?
    } else {
        (None, 0)
    };
    let index: Option<String> = if top.is_some() && left <= RECLAIM_INDEX_ROWS {
        tx.prepare_cached(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1
               AND sql IS NOT NULL ORDER BY name LIMIT 1",
        )?
        .query_row([&table], |r| r.get(0))
        .optional()?
    } else {
        None
    };
    let step = match (top, index) {
        (Some(_), Some(ix)) if left > RECLAIM_DROP_ROWS => {
            tx.execute_batch(&format!("DROP INDEX IF EXISTS \"{ix}\""))?;
            Reclaimed {
                table,
                rows: 0,
                index: Some(ix),
                dropped: false,
            }
        }
        (Some(top), _) if left > RECLAIM_DROP_ROWS => {
            let rows = tx.execute(
                &format!("DELETE FROM \"{table}\" WHERE id > ?1"),
                [top - RECLAIM_ROWS],
            )?;
            Reclaimed {
                table,
                rows: rows as u64,
                index: None,
                dropped: false,
            }
        }
        _ => {
            tx.execute_batch(&format!("DROP TABLE IF EXISTS \"{table}\""))?;
            tx.prepare_cached("DELETE FROM sample_graveyard WHERE name = ?1")?
                .execute([&table])?;
            Reclaimed {
                table,
                rows: left.max(0) as u64,
                index: None,
                dropped: true,
            }
        }
    };
    let more = !step.dropped || graveyard_pending(&tx)?;
    tx.commit()?;
    Ok((Some(step), more))
}

/// The chunk tables listed in `sample_partition`.
fn load_partitions(conn: &Connection) -> rusqlite::Result<Partitions> {
    let mut stmt = conn.prepare_cached("SELECT lo, hi FROM sample_partition")?;
    let rows = stmt.query_map([], |r| {
        Ok(partition::Range {
            lo: r.get(0)?,
            hi: r.get(1)?,
        })
    })?;
    Ok(Partitions::from_ranges(
        rows.collect::<rusqlite::Result<Vec<_>>>()?,
    ))
}

/// Delete rollup buckets older than their granularity's retention: per meter (a range on each
/// meter's key), then per-resource buckets one bucket (every series' row for that hour or day)
/// per transaction, oldest first, so the write lock is held briefly however much is due. A
/// per-resource bucket of a level others are folded from is first merged into theirs, in the
/// same transaction ([`rollup::Level`]).
fn expire_rollups(
    conn: &mut Connection,
    levels: &[rollup::Granularity],
    now: i64,
) -> rusqlite::Result<()> {
    let registered = query::load_levels(conn)?;
    for g in levels.iter().filter(|g| g.retention_seconds > 0) {
        let keep = i64::try_from(g.retention_seconds)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000);
        let cutoff = now.saturating_sub(keep);
        let gran = g.seconds as i64;
        let into = rollup::folded_from(&registered, g.seconds);
        conn.execute(
            "DELETE FROM rollup_meter WHERE meter_id IN (SELECT id FROM meter)
               AND granularity = ?1 AND bucket < ?2",
            params![gran, cutoff],
        )?;
        loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let oldest: Option<i64> = tx
                .prepare_cached("SELECT MIN(bucket) FROM rollup_resource WHERE granularity = ?1")?
                .query_row([gran], |r| r.get(0))?;
            let Some(bucket) = oldest.filter(|b| *b < cutoff) else {
                break;
            };
            // Into each level folded from this one, from its fold_from on (earlier buckets it
            // counts already).
            for &(coarse, _) in into.iter().filter(|(_, from)| bucket >= *from) {
                tx.prepare_cached(&schema::merge_resource_rows_sql("bucket = ?3"))?
                    .execute(params![coarse as i64, gran, bucket])?;
            }
            tx.prepare_cached(
                "DELETE FROM rollup_resource WHERE granularity = ?1 AND bucket = ?2",
            )?
            .execute(params![gran, bucket])?;
            tx.commit()?;
        }
    }
    Ok(())
}

/// The sample's UTC timestamp in microseconds, or why it cannot be stored.
fn validate(s: &Sample) -> Result<i64, String> {
    let ts = meter::parse_timestamp(&s.timestamp).map_err(|e| e.to_string())?;
    if let Volume::Float(f) = s.counter_volume {
        if !f.is_finite() {
            return Err(format!("non-finite counter_volume {f}"));
        }
    }
    if s.message_id.is_empty() {
        return Err("empty message_id".to_string());
    }
    Ok(to_micros(ts))
}

fn meter_id(conn: &Connection, cache: &mut MeterCache, s: &Sample) -> rusqlite::Result<i64> {
    if let Some(id) = cache.get(s) {
        return Ok(id);
    }
    // Under the batch's write lock nobody else can insert between the lookup and the insert.
    let kind = s.counter_type.as_str();
    let found = conn
        .prepare_cached("SELECT id FROM meter WHERE name = ?1 AND type = ?2 AND unit = ?3")?
        .query_row(params![s.counter_name, kind, s.counter_unit], |r| r.get(0))
        .optional()?;
    let id = match found {
        Some(id) => id,
        None => {
            conn.prepare_cached("INSERT INTO meter (name, type, unit) VALUES (?1, ?2, ?3)")?
                .execute(params![s.counter_name, kind, s.counter_unit])?;
            conn.last_insert_rowid()
        }
    };
    cache.insert(s, id);
    Ok(id)
}

fn resource_id(
    conn: &Connection,
    cache: &mut ResourceCache,
    json: &mut Vec<u8>,
    s: &Sample,
) -> rusqlite::Result<i64> {
    let fingerprint = ResourceCache::fingerprint(s);
    if let Some(id) = cache.get(fingerprint, s) {
        return Ok(id);
    }
    let tree = s.resource_metadata.value();
    json.clear();
    serde_json::to_writer(&mut *json, &Json::canonical(&tree))
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let metadata = std::str::from_utf8(json)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let hash = sha256_hex(metadata.as_bytes());
    // Under the batch's write lock, as for meters. `IS` because user and project may be NULL.
    let found = conn
        .prepare_cached(
            "SELECT internal_id FROM resource WHERE resource_id = ?1 AND user_id IS ?2
               AND project_id IS ?3 AND source_id = ?4 AND metadata_hash = ?5",
        )?
        .query_row(
            params![s.resource_id, s.user_id, s.project_id, s.source, hash],
            |r| r.get(0),
        )
        .optional()?;
    let id = match found {
        Some(id) => id,
        None => {
            conn.prepare_cached(
                "INSERT INTO resource
                   (resource_id, user_id, project_id, source_id, resource_metadata, metadata_hash)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                s.resource_id,
                s.user_id,
                s.project_id,
                s.source,
                metadata,
                hash
            ])?;
            let id = conn.last_insert_rowid();
            // Metadata rows are written once, with the resource row they describe.
            let mut insert = conn.prepare_cached(
                "INSERT OR IGNORE INTO metadata (id, meta_key, value) VALUES (?1, ?2, ?3)",
            )?;
            for (k, v) in flatten(&tree) {
                let value: &dyn ToSql = match &v {
                    FlatValue::Text(t) => t,
                    FlatValue::Int(i) => i,
                    FlatValue::Real(f) => f,
                };
                insert.execute(params![id, k, value])?;
            }
            id
        }
    };
    cache.insert(fingerprint, s, id);
    Ok(id)
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Validate `PRAGMA synchronous` before it reaches SQL.
fn synchronous_level(value: &str) -> Result<&'static str, StorageError> {
    match value.trim().to_ascii_uppercase().as_str() {
        "OFF" | "0" => Ok("OFF"),
        "NORMAL" | "1" => Ok("NORMAL"),
        "FULL" | "2" => Ok("FULL"),
        "EXTRA" | "3" => Ok("EXTRA"),
        _ => Err(StorageError::InvalidOption {
            name: "sqlite_synchronous",
            value: value.to_string(),
            reason: "expected OFF, NORMAL, FULL or EXTRA".to_string(),
        }),
    }
}

/// SQLite's allocator, mimalloc: see [`use_mimalloc`].
unsafe extern "C" fn mem_malloc(n: c_int) -> *mut c_void {
    libmimalloc_sys::mi_malloc(usize::try_from(n).unwrap_or(0))
}
unsafe extern "C" fn mem_free(p: *mut c_void) {
    libmimalloc_sys::mi_free(p)
}
unsafe extern "C" fn mem_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    libmimalloc_sys::mi_realloc(p, usize::try_from(n).unwrap_or(0))
}
unsafe extern "C" fn mem_size(p: *mut c_void) -> c_int {
    c_int::try_from(libmimalloc_sys::mi_usable_size(p)).unwrap_or(c_int::MAX)
}
unsafe extern "C" fn mem_roundup(n: c_int) -> c_int {
    let n = usize::try_from(n).unwrap_or(0);
    c_int::try_from(libmimalloc_sys::mi_good_size(n)).unwrap_or(c_int::MAX)
}
unsafe extern "C" fn mem_init(_: *mut c_void) -> c_int {
    rusqlite::ffi::SQLITE_OK
}
unsafe extern "C" fn mem_shutdown(_: *mut c_void) {}

/// Give SQLite mimalloc for its own allocations (page cache, statements, records), once per
/// process and before its first connection. With glibc's malloc, the writer thread's
/// `malloc`/`free` were ~2.5 % of a worker's CPU under load (perf, 300k RPC samples), and the
/// rest of the process already allocates with mimalloc. SQLite accepts an allocator only
/// before it initializes: where something opened a connection first (a test, a tool), it
/// keeps its default, which is only slower.
fn use_mimalloc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let methods = rusqlite::ffi::sqlite3_mem_methods {
            xMalloc: Some(mem_malloc),
            xFree: Some(mem_free),
            xRealloc: Some(mem_realloc),
            xSize: Some(mem_size),
            xRoundup: Some(mem_roundup),
            xInit: Some(mem_init),
            xShutdown: Some(mem_shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: SQLITE_CONFIG_MALLOC takes a pointer to a sqlite3_mem_methods, which SQLite
        // copies before returning; the functions above are plain wrappers that never unwind. Before
        // sqlite3_initialize this is the documented way to set the allocator; after, SQLite
        // refuses it with SQLITE_MISUSE and nothing changes.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MALLOC,
                &methods as *const rusqlite::ffi::sqlite3_mem_methods,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            log::debug!("sqlite: already initialized, keeping its default allocator");
        }
    });
}

/// Open, configure and migrate one connection.
fn connect(
    target: &Target,
    opts: &StorageOptions,
    synchronous: &str,
) -> Result<Connection, StorageError> {
    use_mimalloc();
    let conn = match target {
        Target::Memory => Connection::open_in_memory(),
        Target::File(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StorageError::Unavailable(format!(
                        "sqlite {}: cannot create directory {}: {e}",
                        target.describe(),
                        dir.display()
                    ))
                })?;
            }
            Connection::open(path)
        }
    }
    .map_err(|e| map_error(target, &e))?;
    let mut conn = conn;
    let setup = |conn: &mut Connection| -> Result<(), schema::MigrateError> {
        set_busy_handler(conn, opts.busy_timeout_ms);
        set_wal(conn, Duration::from_millis(opts.busy_timeout_ms))?;
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        // A multi-row INSERT or upsert that could abort part-way (a NOT NULL column) keeps a
        // statement journal: a copy of every page it changes. In a temporary file that was a
        // write(2) per page, 4 KiB for each page the batch touched (half the bytes the worker
        // wrote); in memory it is a copy that lives for one statement.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // The REFERENCES clauses document the model but are not enforced: checking two parent
        // rows per sample cost ~15 % of insert throughput, and the ids come from lookups made
        // under the batch's write lock (see the cache epoch), so they cannot dangle.
        conn.pragma_update(None, "foreign_keys", false)?;
        // Four insert sizes per chunk table in use, the rollup upserts, the queries.
        conn.set_prepared_statement_cache_capacity(64);
        let span_us = i64::try_from(opts.partition_span_seconds)
            .unwrap_or(i64::MAX / 1_000_000)
            .max(1)
            .saturating_mul(1_000_000);
        schema::migrate(
            conn,
            &schema::Layout {
                span_us,
                rollups: &opts.rollups,
            },
        )
    };
    match setup(&mut conn) {
        Ok(()) => Ok(conn),
        Err(schema::MigrateError::Sql(e)) => Err(map_error(target, &e)),
        Err(schema::MigrateError::TooNew(e)) => Err(e),
    }
}

/// Pages the WAL may hold before a commit checkpoints it into the database file (SQLite's
/// default is 1,000). A batch of 1,000 ceilometer-shaped samples dirties about 2,500 pages
/// (the chunk's indexes and the rollups take one random page per sample or so), so at the
/// default every batch checkpointed, writing each page twice and syncing the file. At 10,000
/// (~40 MiB of WAL at 4 KiB pages) a page rewritten by several batches reaches the file once
/// per checkpoint: measured in docs/performance.md (*The WAL checkpoint*), 18 % less system
/// time for the same fill, no change in RSS (the WAL is read through the OS cache).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// Wait for another connection's lock by polling every millisecond, up to `timeout_ms`.
///
/// SQLite's own busy timeout sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 then 100 ms between
/// tries, so a writer that met a lock held for 130 ms got it up to 50 ms after its release, and
/// one that another process kept re-taking (a worker's next batch, a reclaim step) could lose
/// every race. A try costs a few microseconds; waiting is rare and short, so a fixed 1 ms poll
/// hands the lock over within a millisecond of its release.
fn set_busy_handler(conn: &Connection, timeout_ms: u64) {
    thread_local! {
        /// When the current wait on this thread began (the handler is called with count 0 at
        /// its first retry, on the thread running the statement).
        static WAIT_START: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    extern "C" fn poll(arg: *mut c_void, count: c_int) -> c_int {
        let timeout = Duration::from_millis(arg as usize as u64);
        let now = Instant::now();
        let start = WAIT_START.with(|w| {
            if count == 0 {
                w.set(Some(now));
            }
            w.get().unwrap_or(now)
        });
        if now.duration_since(start) >= timeout {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(1));
        1
    }
    // The timeout travels in the handler's argument pointer itself (nothing to own or free).
    let arg = timeout_ms.min(u64::from(u32::MAX)) as usize as *mut c_void;
    // SAFETY: `conn.handle()` is this open connection's handle; `poll` is a plain function that
    // never unwinds and reads `arg` as an integer only, so it stays valid as long as SQLite
    // keeps it (the connection's life, or until another handler replaces it).
    unsafe {
        rusqlite::ffi::sqlite3_busy_handler(conn.handle(), Some(poll), arg);
    }
}

/// Switch to WAL. Converting a fresh file needs an exclusive lock for a moment, for which
/// SQLite does not always consult the busy handler, so retry up to the busy timeout when
/// several processes open the same new file at once.
fn set_wal(conn: &Connection, timeout: Duration) -> rusqlite::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sort rusqlite's errors into transient (`Unavailable`) and the rest.
fn map_error(target: &Target, e: &rusqlite::Error) -> StorageError {
    let what = format!("sqlite {}: {e}", target.describe());
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::ReadOnly
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::PermissionDenied
            | ErrorCode::OutOfMemory,
        ) => StorageError::Unavailable(what),
        _ => StorageError::Database(what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<Target, StorageError> {
        Target::from_url(&StorageUrl::parse(url)?)
    }

    use meter::CounterType;

    #[test]
    fn url_forms() {
        assert_eq!(target("sqlite://").unwrap(), Target::Memory);
        assert_eq!(target("sqlite://:memory:").unwrap(), Target::Memory);
        assert_eq!(target("sqlite:///:memory:").unwrap(), Target::Memory);
        assert_eq!(
            target("sqlite:///data/x.db").unwrap(),
            Target::File("data/x.db".into())
        );
        assert_eq!(
            target("sqlite:////var/lib/x.db").unwrap(),
            Target::File("/var/lib/x.db".into())
        );
        for bad in ["sqlite://host/x.db", "sqlite:///x.db?mode=ro"] {
            assert!(
                matches!(target(bad), Err(StorageError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    /// Every connection checkpoints the WAL only past `WAL_AUTOCHECKPOINT_PAGES`, not SQLite's
    /// 1,000 pages, which a single batch exceeded, and keeps statement journals in memory, not
    /// in a temporary file written page by page.
    #[test]
    fn connections_let_the_wal_grow_past_a_batch_and_journal_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::File(dir.path().join("wal.db"));
        let conn = connect(&target, &StorageOptions::default(), "NORMAL").unwrap();
        let pragma = |name: &str| -> i64 {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                .unwrap()
        };
        let pages = pragma("wal_autocheckpoint");
        assert_eq!(pages, WAL_AUTOCHECKPOINT_PAGES);
        assert!(pages > 1000, "above SQLite's default of 1,000 pages");
        assert_eq!(pragma("temp_store"), 2, "PRAGMA temp_store: 2 is MEMORY");
    }

    /// The bundled SQLite is built by `.cargo/config.toml`'s flags: no allocation statistics
    /// (a global mutex on every malloc) and no shared page-cache group (a global mutex on every
    /// page fetch). Without the flags this build's SQLite has both.
    #[test]
    fn the_bundled_sqlite_takes_no_global_mutex_per_allocation_or_page() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::File(dir.path().join("flags.db"));
        let conn = connect(&target, &StorageOptions::default(), "NORMAL").unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (zeroblob(100000));")
            .unwrap();
        // SAFETY: a plain read of SQLite's global counter.
        assert_eq!(unsafe { rusqlite::ffi::sqlite3_memory_used() }, 0);
    }

    #[test]
    fn synchronous_is_validated() {
        assert_eq!(synchronous_level("normal").unwrap(), "NORMAL");
        assert_eq!(synchronous_level("2").unwrap(), "FULL");
        let e = synchronous_level("FULL; DROP TABLE sample").unwrap_err();
        assert!(e.to_string().contains("sqlite_synchronous"), "{e}");
    }

    fn sample(i: usize) -> Sample {
        Sample {
            source: "openstack".into(),
            counter_name: "cpu".into(),
            counter_type: CounterType::Gauge,
            counter_unit: "%".into(),
            counter_volume: Volume::Int(i as i64),
            user_id: None,
            project_id: None,
            user_name: None,
            project_name: None,
            resource_id: format!("vm-{i}"),
            timestamp: "2026-01-01T00:00:00Z".into(),
            resource_metadata: meter::Value::Map(vec![(
                meter::Value::Str("name".into()),
                meter::Value::Str(format!("server number {i}")),
            )])
            .into(),
            message_id: format!("id-{i}"),
            message_signature: None,
            monotonic_time: None,
            extra: Vec::new(),
        }
    }

    #[test]
    fn a_full_database_is_unavailable_then_recovers_by_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::File(dir.path().join("c.db"));
        let mut st = SqliteStorage::open(target, &StorageOptions::default()).unwrap();
        assert_eq!(st.record_metering_data(&[sample(0)]).unwrap().stored, 1);
        // A full disk, as far as this connection is concerned: the file may not grow.
        let conn = st.conn.as_ref().unwrap();
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        let _: i64 = conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })
            .unwrap();
        let batch: Vec<Sample> = (1..2000).map(sample).collect();
        let err = st.record_metering_data(&batch).unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("full"), "{err}");
        assert!(st.conn.is_none(), "connection dropped after the fault");
        // The fault is gone with the old connection: the retry reopens and stores it all.
        let out = st.record_metering_data(&batch).unwrap();
        assert_eq!((out.stored, out.duplicates), (1999, 0));
        assert_eq!(
            st.get_samples(&SampleFilter::default()).unwrap().len(),
            2000
        );
    }

    /// The busy handler waits for a lock another connection holds and takes it once released;
    /// while the lock stays held it gives up with "database is locked" after the timeout.
    #[test]
    fn a_writer_waits_for_anothers_lock_then_gives_up_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.db");
        let opts = StorageOptions {
            busy_timeout_ms: 400,
            ..StorageOptions::default()
        };
        let mut st = SqliteStorage::open(Target::File(path.clone()), &opts).unwrap();
        assert_eq!(st.record_metering_data(&[sample(0)]).unwrap().stored, 1);

        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            holder.execute_batch("COMMIT").unwrap();
            tx.send(Instant::now()).unwrap();
            holder
        });
        let out = st.record_metering_data(&[sample(1)]).unwrap();
        let done = Instant::now();
        assert_eq!(out.stored, 1, "stored once the lock was released");
        let released = rx.recv().unwrap();
        assert!(done >= released, "the write waited for the release");
        let holder = t.join().unwrap();

        // Held past the timeout: the write fails, as transient, no sooner than the timeout.
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let t0 = Instant::now();
        let err = st.record_metering_data(&[sample(2)]).unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("locked"), "{err}");
        assert!(
            t0.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t0.elapsed()
        );
        holder.execute_batch("COMMIT").unwrap();
        assert_eq!(st.record_metering_data(&[sample(2)]).unwrap().stored, 1);
    }

    #[test]
    fn sha256_is_hex() {
        assert_eq!(
            sha256_hex(b"{}"),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }
}

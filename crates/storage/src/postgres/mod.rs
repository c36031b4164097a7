//! The PostgreSQL driver (`postgresql://`, `postgresql+psycopg2://`), on the synchronous
//! `postgres` client, with TLS through rustls as libpq's `sslmode`, `sslrootcert`, `sslcert`
//! and `sslkey` URL parameters ask (default `prefer`, as libpq).
//!
//! Same logical model as the SQLite driver (meter, resource, sample; `(message_id, timestamp)`
//! UNIQUE; samples in time partitions, see `partitions.rs`) with PostgreSQL's types:
//! `timestamptz`, `jsonb` metadata behind a GIN index. On the hot path a batch is one
//! statement, one round trip: `INSERT ... SELECT FROM unnest($1::bigint[], ...)` in autocommit
//! mode. When some message_id is already stored that statement fails whole and the batch goes
//! again with `ON CONFLICT (message_id, timestamp) DO NOTHING`, returning the positions of the
//! rows it skipped, so duplicates are counted exactly.
//!
//! Many processes on many hosts write one database: ids are cached per process as in the
//! SQLite driver, kept valid by the `cache_epoch` row: the insert locks it `FOR SHARE` and
//! inserts only if it still holds the epoch the ids were resolved under; expiry bumps it, under
//! an exclusive lock, whenever it deletes meters or resources. A lost connection
//! fails the call with [`StorageError::Unavailable`] and the next call reconnects (at most
//! once a second while the server stays away); a server down at open does not fail the open.

mod partitions;
mod query;
pub mod schema;

use crate::partition::Partitions;
use crate::server::cache::{MeterCache, ResourceCache};
use crate::server::{self, Link, Valid, CONFLICT_RETRIES};
use crate::tls::Verify;
use crate::url::StorageUrl;
use crate::{
    MeterInfo, RecordOutcome, ResourceInfo, SampleFilter, Statistics, Storage, StorageError,
    StorageOptions, StoredSample,
};
use ::postgres::config::{SslMode, TargetSessionAttrs};
use ::postgres::error::SqlState;
use ::postgres::{Client, Config, Statement};
use meter::{Sample, Value};
use std::time::Duration;
use time::OffsetDateTime;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Registry entry point.
pub fn open_boxed(
    url: &StorageUrl<'_>,
    opts: &StorageOptions,
) -> Result<Box<dyn Storage>, StorageError> {
    Ok(Box::new(PostgresStorage::open(url, opts)?))
}

/// Check a `postgresql://` URL without connecting.
pub fn check_url(url: &StorageUrl<'_>) -> Result<(), StorageError> {
    config_from_url(url).map(drop)
}

/// The PostgreSQL [`Storage`] driver.
pub struct PostgresStorage {
    config: Target,
    link: Link<Conn>,
    meters: MeterCache,
    resources: ResourceCache,
    /// The `cache_epoch` the caches were filled under.
    epoch: i64,
    json_buf: Vec<u8>,
    /// `metering_time_to_live`: samples older on arrival are rejected and counted.
    ttl_seconds: Option<u64>,
    /// Rollup levels, and their granularities in seconds as the insert binds them.
    levels: Vec<crate::rollup::Granularity>,
    level_seconds: Vec<i64>,
    /// The levels written per resource ([`crate::rollup::Level`]).
    plan: PgPlan,
    /// `partition_span_seconds` in µs.
    span_us: i64,
    /// Drops graves (expired partitions, detached) on its own thread and connection: nudged
    /// after each batch while any may be waiting (found at open: a restart resumes; or made by
    /// an expiry pass), woken by the idle retention step.
    reaper: server::Reaper,
}

/// Where and how to connect: the client configuration and the TLS connector its `sslmode`
/// calls for (used only when TLS is on).
struct Target {
    pg: Config,
    tls: MakeRustlsConnect,
}

/// One open connection with its prepared hot-path statements.
struct Conn {
    client: Client,
    insert: Statement,
    insert_dedup: Statement,
    meter_select: Statement,
    meter_insert: Statement,
    resource_select: Statement,
    resource_insert: Statement,
    /// The sample partitions as this connection last read (or made) them.
    partitions: crate::partition::Partitions,
}

/// The hot path, one statement in autocommit mode (one round trip per batch): validated rows
/// in as parallel arrays, inserted only if `cache_epoch` still holds the epoch the ids were
/// resolved under (`$8`), which the statement locks `FOR SHARE` until it commits; it returns the
/// epoch it found (a different one means nothing was inserted: resolve again). A plain INSERT:
/// when a message_id is already stored it fails as a whole (unique violation) and the batch
/// goes again through [`INSERT_SAMPLES_DEDUP`]. Plain insertion is the normal case and costs
/// a third less server time than `ON CONFLICT`'s speculative insertion and its bookkeeping.
const INSERT_SAMPLES: &str = "
WITH e AS (SELECT epoch FROM cache_epoch FOR SHARE),
inserted AS (
    INSERT INTO sample (meter_id, resource_id, volume, timestamp, recorded_at, message_id,
                        message_signature)
    SELECT meter_id, resource_id, volume, ts, $7, message_id, message_signature
    FROM unnest($1::BIGINT[], $2::BIGINT[], $3::DOUBLE PRECISION[], $4::TIMESTAMPTZ[],
                $5::TEXT[], $6::TEXT[])
        AS t (meter_id, resource_id, volume, ts, message_id, message_signature)
    WHERE (SELECT epoch FROM e) = $8::BIGINT
    RETURNING meter_id, resource_id, volume, timestamp
)ROLLUPS
SELECT (SELECT epoch FROM e), (SELECT COUNT(*) FROM inserted), '{}'::BIGINT[]";

/// The rollup upserts appended to both inserts (`ROLLUPS`): the rows the statement inserted,
/// and only those, folded into buckets of each granularity in `$9` (seconds) per meter row, and
/// of those in `$10` (the levels written directly: [`crate::rollup::Level`]) per (meter row,
/// resource id), and of those in `$11` for a sample before the matching bucket of `$12` (a
/// folded level's `fold_from`), in the same statement and so the same transaction. Rows are
/// upserted in key order, so concurrent writers lock shared buckets in the same order.
const ROLLUPS: &str = ",
rolled AS (
    SELECT i.meter_id, i.resource_id, i.volume, g.seconds,
           (EXTRACT(EPOCH FROM i.timestamp) * 1000000)::BIGINT AS us,
           g.seconds * 1000000 AS step
    FROM inserted i CROSS JOIN unnest($9::BIGINT[]) AS g (seconds)
),
bucketed AS (
    SELECT meter_id, resource_id, volume, seconds, us,
           us - (((us % step) + step) % step) AS bucket
    FROM rolled
),
rm AS (
    INSERT INTO rollup_meter (meter_id, granularity, bucket, count, sum, min, max, first, last)
    SELECT meter_id, seconds, bucket, COUNT(*), SUM(volume), MIN(volume), MAX(volume),
           MIN(us), MAX(us)
    FROM bucketed GROUP BY meter_id, seconds, bucket ORDER BY meter_id, seconds, bucket
    ON CONFLICT (meter_id, granularity, bucket) DO UPDATE SET
        count = rollup_meter.count + excluded.count, sum = rollup_meter.sum + excluded.sum,
        min = LEAST(rollup_meter.min, excluded.min), max = GREATEST(rollup_meter.max, excluded.max),
        first = LEAST(rollup_meter.first, excluded.first), last = GREATEST(rollup_meter.last, excluded.last)
    RETURNING 1
),
rr AS (
    INSERT INTO rollup_resource (granularity, bucket, meter_id, resource_id, count, sum, min,
                                 max, first, last)
    SELECT b.seconds, b.bucket, b.meter_id, r.resource_id, COUNT(*), SUM(b.volume),
           MIN(b.volume), MAX(b.volume), MIN(b.us), MAX(b.us)
    FROM bucketed b JOIN resource r ON r.internal_id = b.resource_id
    WHERE b.seconds = ANY($10::BIGINT[])
       OR EXISTS (SELECT 1 FROM unnest($11::BIGINT[], $12::BIGINT[]) AS f (seconds, until)
                   WHERE f.seconds = b.seconds AND b.us < f.until)
    GROUP BY b.seconds, b.bucket, b.meter_id, r.resource_id
    ORDER BY b.seconds, b.bucket, b.meter_id, r.resource_id
    ON CONFLICT (granularity, bucket, meter_id, resource_id) DO UPDATE SET
        count = rollup_resource.count + excluded.count, sum = rollup_resource.sum + excluded.sum,
        min = LEAST(rollup_resource.min, excluded.min), max = GREATEST(rollup_resource.max, excluded.max),
        first = LEAST(rollup_resource.first, excluded.first), last = GREATEST(rollup_resource.last, excluded.last)
    RETURNING 1
)";

/// The same, skipping stored message_ids; also returns the 1-based positions it skipped.
const INSERT_SAMPLES_DEDUP: &str = "
WITH e AS (SELECT epoch FROM cache_epoch FOR SHARE),
input AS (
    SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::DOUBLE PRECISION[], $4::TIMESTAMPTZ[],
                         $5::TEXT[], $6::TEXT[])
        WITH ORDINALITY AS t (meter_id, resource_id, volume, ts, message_id, message_signature, ord)
    WHERE (SELECT epoch FROM e) = $8::BIGINT
), inserted AS (
    INSERT INTO sample (meter_id, resource_id, volume, timestamp, recorded_at, message_id,
                        message_signature)
    SELECT meter_id, resource_id, volume, ts, $7, message_id, message_signature
    FROM input ORDER BY ord
    ON CONFLICT (message_id, timestamp) DO NOTHING
    RETURNING message_id, meter_id, resource_id, volume, timestamp
)ROLLUPS
SELECT (SELECT epoch FROM e), (SELECT COUNT(*) FROM inserted),
       ARRAY(SELECT ord FROM input WHERE message_id NOT IN (SELECT message_id FROM inserted)
             ORDER BY ord)";

/// A resource row no sample refers to (`r`).
const ORPHAN_RESOURCE: &str =
    "NOT EXISTS (SELECT 1 FROM sample s WHERE s.resource_id = r.internal_id OFFSET 0)";

/// A meter row (`m`) no sample refers to; meters stay while a rollup refers to them: rollups
/// outlive samples.
const ORPHAN_METER: &str = "NOT EXISTS (SELECT 1 FROM sample s WHERE s.meter_id = m.id OFFSET 0)
    AND NOT EXISTS (SELECT 1 FROM rollup_meter b WHERE b.meter_id = m.id)";

/// How many times a batch is resolved again because expiry moved the epoch under it.
const EPOCH_RETRIES: usize = 5;

/// Why a write or read failed: the client's error, or one of ours.
enum Fail {
    Pg(::postgres::Error),
    Storage(StorageError),
}

impl From<::postgres::Error> for Fail {
    fn from(e: ::postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl PostgresStorage {
    /// Parse the URL and connect. A server that does not answer is not an error here: the
    /// driver starts disconnected and every call tries again (at most once a second), so a
    /// worker can start before its database. Bad credentials, an unknown database, a schema
    /// from a newer build and malformed URLs are errors.
    pub fn open(url: &StorageUrl<'_>, opts: &StorageOptions) -> Result<Self, StorageError> {
        let (config, what) = config_from_url(url)?;
        let reaper = reaper(&config, &what);
        let mut st = PostgresStorage {
            config,
            link: Link::new(what),
            meters: MeterCache::default(),
            resources: ResourceCache::default(),
            epoch: i64::MIN,
            json_buf: Vec::new(),
            ttl_seconds: opts.time_to_live_seconds,
            levels: opts.rollups.clone(),
            level_seconds: opts.rollups.iter().map(|g| g.seconds as i64).collect(),
            plan: PgPlan::default(),
            span_us: i64::try_from(opts.partition_span_seconds)
                .unwrap_or(i64::MAX / 1_000_000)
                .max(1)
                .saturating_mul(1_000_000),
            reaper,
        };
        match connect(&st.config, &st.link.what, &st.levels, st.span_us) {
            Ok(mut conn) => {
                let pending = partitions::graves_pending(&mut conn.client)
                    .map_err(|e| connect_error(&st.link.what, &e))?;
                st.reaper.set_pending(pending);
                st.link.get(|| Ok(conn))?;
            }
            Err(e) if e.is_transient() => st.link.start_down(&e),
            Err(e) => return Err(e),
        }
        Ok(st)
    }

    /// Whether a connection is open (tests).
    pub fn is_connected(&self) -> bool {
        self.link.is_connected()
    }

    fn clear_caches(&mut self) {
        self.meters.clear();
        self.resources.clear();
        self.epoch = i64::MIN;
    }

    /// Map a failure; drop the connection when it is dead.
    fn fail(&mut self, f: Fail) -> StorageError {
        match f {
            Fail::Storage(e) => e,
            Fail::Pg(e) => {
                let (err, broken) = classify(&self.link.what, &e);
                if broken {
                    self.link.lost(&err);
                }
                err
            }
        }
    }

    fn read<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, Fail>,
    ) -> Result<T, StorageError> {
        let conn = link_conn(&mut self.link, &self.config, &self.levels, self.span_us)?;
        let result = f(&mut conn.client);
        let closed = conn.client.is_closed();
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                let err = self.fail(e);
                if closed {
                    self.link.lost(&err);
                }
                Err(err)
            }
        }
    }

    fn expire(
        conn: &mut Conn,
        cutoff: OffsetDateTime,
        levels: &[crate::rollup::Granularity],
        span_us: i64,
    ) -> Result<(u64, bool), Fail> {
        let mut laps = server::Laps::start("postgresql: expiry");
        let client = &mut conn.client;
        // Rollup buckets past their own retention: a range on rollup_resource's key; the
        // per-meter table holds a few rows per meter and bucket.
        let now = crate::model::to_micros(OffsetDateTime::now_utc());
        let registered = schema::load_levels(client)?;
        for g in levels.iter().filter(|g| g.retention_seconds > 0) {
            let keep = i64::try_from(g.retention_seconds)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000);
            let before = now.saturating_sub(keep);
            let gran = g.seconds as i64;
            client.execute(
                "DELETE FROM rollup_meter WHERE granularity = $1 AND bucket < $2",
                &[&gran, &before],
            )?;
            // A level others are folded from: its old buckets move into theirs.
            let (into, from): (Vec<i64>, Vec<i64>) =
                crate::rollup::folded_from(&registered, g.seconds)
                    .into_iter()
                    .map(|(s, from)| (s as i64, from))
                    .unzip();
            if !into.is_empty() {
                client.execute(&schema::fold_expired_sql(), &[&into, &gran, &before, &from])?;
            }
            client.execute(
                "DELETE FROM rollup_resource WHERE granularity = $1 AND bucket < $2",
                &[&gran, &before],
            )?;
        }
        laps.lap("rollup retention");
        // Whole partitions entirely older than the cutoff: detached into graves, whatever their
        // rows; the graves' files are deleted by the reaper, after the next batch or pass.
        let total = partitions::bury_expired(client, crate::model::to_micros(cutoff), levels)?;
        laps.lap("partitions");
        let client = &mut conn.client;
        // Keep the partitions of now and the next span made ahead (the daemon calls this on a
        // timer, so a worker rarely has to make one on the hot path).
        partitions::ensure(client, &mut conn.partitions, &ahead(span_us), span_us)?;
        laps.lap("partitions ahead");
        // Orphans: first the candidates, without any lock (writers go on meanwhile), then
        // those deleted under the locks if still orphaned. `OFFSET 0` keeps each NOT EXISTS a
        // per-row probe of the partitions' indexes, newest partition first for a live row; as
        // an anti-join the planner hashed every sample of the store (240 ms at 264k rows, 14
        // ms probed; EXPLAIN ANALYZE in docs/storage.md).
        // Plain index scans, which stop at the first row, and no JIT: the planner, costing a
        // probe by its estimate of a resource's rows, chose bitmap scans (which read every
        // entry of the resource first) and compiled the query (60 ms on its own): 210 ms for
        // 2,000 resources at 1 M samples, 12 ms as set here (EXPLAIN ANALYZE, docs/storage.md).
        let mut tx = client.transaction()?;
        tx.batch_execute("SET LOCAL jit = off; SET LOCAL enable_bitmapscan = off")?;
        let orphan_resources: Vec<i64> = tx
            .query(
                &format!("SELECT r.internal_id FROM resource r WHERE {ORPHAN_RESOURCE}"),
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        laps.lap("orphan resources");
        let orphan_meters: Vec<i64> = tx
            .query(
                &format!("SELECT m.id FROM meter m WHERE {ORPHAN_METER}"),
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.commit()?;
        laps.lap("orphan meters");
        if orphan_resources.is_empty() && orphan_meters.is_empty() {
            laps.log();
            return Ok((total, false));
        }
        let mut tx = client.transaction()?;
        // Partitions are neither made nor dropped meanwhile (same lock order as theirs).
        partitions::lock(&mut tx)?;
        // Inserts lock the epoch row FOR SHARE; this waits for running ones and queues new ones
        // behind it (a table lock, so they cannot starve it). Once the epoch moves, no insert
        // uses ids resolved before: they check it.
        tx.batch_execute("LOCK TABLE cache_epoch IN EXCLUSIVE MODE")?;
        let resources = tx.execute(
            &format!("DELETE FROM resource r WHERE r.internal_id = ANY ($1) AND {ORPHAN_RESOURCE}"),
            &[&orphan_resources],
        )?;
        let meters = tx.execute(
            &format!("DELETE FROM meter m WHERE m.id = ANY ($1) AND {ORPHAN_METER}"),
            &[&orphan_meters],
        )?;
        let bumped = resources + meters > 0;
        if bumped {
            tx.execute("UPDATE cache_epoch SET epoch = epoch + 1", &[])?;
        }
        tx.commit()?;
        laps.lap("orphan deletion");
        laps.log();
        Ok((total, bumped))
    }
}

impl Storage for PostgresStorage {
    fn record_metering_data(&mut self, batch: &[Sample]) -> Result<RecordOutcome, StorageError> {
        let mut outcome = RecordOutcome::default();
        let rows = server::prepare(batch, &mut outcome, self.ttl_seconds, |s, _| check_text(s));
        if !rows.is_empty() {
            let recorded_at = OffsetDateTime::now_utc();
            let mut attempt = 0;
            let mut dedup = false;
            let dups = loop {
                let conn = link_conn(&mut self.link, &self.config, &self.levels, self.span_us)?;
                let mut caches = Caches {
                    levels: &self.level_seconds,
                    grans: &self.levels,
                    plan: &mut self.plan,
                    span_us: self.span_us,
                    meters: &mut self.meters,
                    resources: &mut self.resources,
                    epoch: &mut self.epoch,
                    json: &mut self.json_buf,
                };
                match write_batch(conn, &mut caches, &rows, recorded_at, dedup) {
                    Ok(dups) => break dups,
                    Err(e) => {
                        let closed = conn.client.is_closed();
                        if !dedup && matches!(&e, Fail::Pg(pg) if is_stored_message_id(pg)) {
                            // Some message_id is stored already: write it again, skipping those.
                            // (The ids are still good: meter and resource rows are committed
                            // on their own.)
                            dedup = true;
                            continue;
                        }
                        self.clear_caches();
                        let conflict = matches!(&e, Fail::Pg(pg) if is_conflict(pg));
                        let err = self.fail(e);
                        if closed {
                            self.link.lost(&err);
                        }
                        if conflict && attempt < CONFLICT_RETRIES && self.link.is_connected() {
                            attempt += 1;
                            log::debug!("{}: retrying a batch after: {err}", self.link.what);
                            continue;
                        }
                        return Err(err);
                    }
                }
            };
            outcome.stored = rows.len() - dups.len();
            outcome.duplicate_indices.extend(dups);
            outcome.duplicate_indices.sort_unstable();
            self.reaper.nudge();
        }
        outcome.duplicates = outcome.duplicate_indices.len();
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
        let levels = self.levels.clone();
        let now = crate::model::to_micros(OffsetDateTime::now_utc());
        self.read(|c| query::statistics_from(c, filter, period, &levels, now))
    }

    /// Graves are the reaper's: woken here, nothing left for the caller to step on.
    fn retention_step(&mut self) -> Result<bool, StorageError> {
        self.reaper.wake();
        Ok(false)
    }

    fn clear_expired_metering_data(&mut self, ttl_seconds: u64) -> Result<u64, StorageError> {
        let ttl = time::Duration::seconds(i64::try_from(ttl_seconds).unwrap_or(i64::MAX / 2));
        let cutoff = OffsetDateTime::now_utc()
            .checked_sub(ttl)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH - time::Duration::days(365 * 3000));
        // The graves this pass makes, and any an earlier pass or another process left: the
        // next batch or idle step has the reaper look (never this call).
        self.reaper.set_pending(true);
        let conn = link_conn(&mut self.link, &self.config, &self.levels, self.span_us)?;
        match Self::expire(conn, cutoff, &self.levels, self.span_us) {
            Ok((n, bumped)) => {
                if bumped {
                    self.clear_caches();
                }
                Ok(n)
            }
            Err(e) => {
                let closed = conn.client.is_closed();
                let err = self.fail(e);
                if closed {
                    self.link.lost(&err);
                }
                Err(err)
            }
        }
    }
}

/// The per-resource levels a batch writes (`$10` to `$12` of the insert): the direct ones, and
/// folded ones (with their fold_from) for samples before it ([`crate::rollup::ResourcePlan`]).
#[derive(Debug, Default)]
struct PgPlan {
    direct: Vec<i64>,
    until_seconds: Vec<i64>,
    until: Vec<i64>,
}

/// The per-resource plan `rollup_level` gives for the configured `levels`.
fn resource_plan(
    client: &mut Client,
    levels: &[crate::rollup::Granularity],
) -> Result<PgPlan, Fail> {
    let plan = crate::rollup::ResourcePlan::new(levels, &schema::load_levels(client)?);
    Ok(PgPlan {
        direct: plan.direct.iter().map(|g| g.seconds as i64).collect(),
        until_seconds: plan.until.iter().map(|(g, _)| g.seconds as i64).collect(),
        until: plan.until.iter().map(|(_, from)| *from).collect(),
    })
}

/// The driver's caches, borrowed for one batch.
struct Caches<'a> {
    /// Rollup granularities (seconds), for the insert's `$9`.
    levels: &'a [i64],
    /// The same levels, for the per-resource plan.
    grans: &'a [crate::rollup::Granularity],
    /// The levels written per resource, for `$10` to `$12`; reloaded with the caches.
    plan: &'a mut PgPlan,
    /// `partition_span_seconds` in µs, for partitions made on demand.
    span_us: i64,
    meters: &'a mut MeterCache,
    resources: &'a mut ResourceCache,
    epoch: &'a mut i64,
    json: &'a mut Vec<u8>,
}

/// Resolve ids (from the caches, or by autocommitted lookups and inserts of meter and resource
/// rows), then insert in one statement; the batch indices that were already stored.
fn write_batch(
    conn: &mut Conn,
    caches: &mut Caches<'_>,
    rows: &[Valid<'_>],
    recorded_at: OffsetDateTime,
    dedup: bool,
) -> Result<Vec<usize>, Fail> {
    let client = &mut conn.client;
    // Every row needs a partition: made here (under the advisory lock) for a late or future
    // sample; the normal case finds them all made ahead.
    let stamps_us: Vec<i64> = rows
        .iter()
        .map(|r| crate::model::to_micros(r.timestamp))
        .collect();
    if !partitions::covers(&conn.partitions, &stamps_us) {
        partitions::ensure(client, &mut conn.partitions, &stamps_us, caches.span_us)?;
    }
    if *caches.epoch == i64::MIN {
        *caches.epoch = client
            .query_one("SELECT epoch FROM cache_epoch", &[])?
            .get(0);
        *caches.plan = resource_plan(client, caches.grans)?;
    }
    for _ in 0..EPOCH_RETRIES {
        // Expiry bumps the epoch whenever it deletes meter or resource rows, so while the
        // epoch is the one these ids were resolved under, none of them has been deleted.
        let expected = *caches.epoch;
        let n = rows.len();
        let (mut meter_ids, mut resource_ids) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut volumes, mut stamps) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut ids, mut sigs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for r in rows {
            let s = r.sample;
            meter_ids.push(meter_id(
                client,
                (&conn.meter_select, &conn.meter_insert),
                caches.meters,
                s,
            )?);
            resource_ids.push(resource_id(
                client,
                (&conn.resource_select, &conn.resource_insert),
                caches.resources,
                caches.json,
                s,
            )?);
            volumes.push(s.counter_volume.as_f64());
            stamps.push(r.timestamp);
            ids.push(s.message_id.as_str());
            sigs.push(s.message_signature.as_deref());
        }
        let statement = if dedup {
            &conn.insert_dedup
        } else {
            &conn.insert
        };
        let row = match client.query_one(
            statement,
            &[
                &meter_ids,
                &resource_ids,
                &volumes,
                &stamps,
                &ids,
                &sigs,
                &recorded_at,
                &expected,
                &caches.levels,
                &caches.plan.direct,
                &caches.plan.until_seconds,
                &caches.plan.until,
            ],
        ) {
            Ok(row) => row,
            Err(e) if partitions::is_missing_partition(&e) => {
                // Dropped by another process's expiry after this one read the catalog (its
                // TTL may be shorter than ours): read it again and make what is missing.
                log::debug!("postgresql: a partition went missing; making it again");
                partitions::ensure(client, &mut conn.partitions, &stamps_us, caches.span_us)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let found: i64 = row.get(0);
        if found != expected {
            log::debug!("cache epoch moved from {expected} to {found}: resolving ids again");
            caches.meters.clear();
            caches.resources.clear();
            *caches.plan = resource_plan(client, caches.grans)?;
            *caches.epoch = found;
            continue;
        }
        let ords: Vec<i64> = row.get(2);
        let mut dups = Vec::with_capacity(ords.len());
        for ord in ords {
            let r = usize::try_from(ord - 1)
                .ok()
                .and_then(|i| rows.get(i))
                .ok_or_else(|| {
                    Fail::Storage(StorageError::Database(format!(
                        "insert returned position {ord} of {n}"
                    )))
                })?;
            dups.push(r.index);
        }
        return Ok(dups);
    }
    Err(Fail::Storage(StorageError::Unavailable(
        "postgresql: expiry keeps deleting meters, resources or partitions under this batch".into(),
    )))
}

fn meter_id(
    tx: &mut Client,
    (select, insert): (&Statement, &Statement),
    cache: &mut MeterCache,
    s: &Sample,
) -> Result<i64, Fail> {
    if let Some(id) = cache.get(s) {
        return Ok(id);
    }
    let kind = s.counter_type.as_str();
    let params: [&(dyn ::postgres::types::ToSql + Sync); 3] =
        [&s.counter_name, &kind, &s.counter_unit];
    // Look up first (the usual miss: the row exists, this process has not cached it yet);
    // insert if absent; a concurrent insert of the same row makes ours do nothing, and the
    // second lookup (a new snapshot under READ COMMITTED) finds theirs.
    let id = match tx.query_opt(select, &params)? {
        Some(row) => row.get(0),
        None => match tx.query_opt(insert, &params)? {
            Some(row) => row.get(0),
            None => tx.query_one(select, &params)?.get(0),
        },
    };
    cache.insert(s, id);
    Ok(id)
}

fn resource_id(
    tx: &mut Client,
    (select, insert): (&Statement, &Statement),
    cache: &mut ResourceCache,
    json: &mut Vec<u8>,
    s: &Sample,
) -> Result<i64, Fail> {
    let fingerprint = ResourceCache::fingerprint(s);
    if let Some(id) = cache.get(fingerprint, s) {
        return Ok(id);
    }
    let metadata = server::canonical_json(&s.resource_metadata.value(), json)
        .map_err(|e| Fail::Storage(StorageError::Database(format!("metadata JSON: {e}"))))?;
    let key = server::resource_key(s, metadata);
    let id = match tx.query_opt(select, &[&key])? {
        Some(row) => row.get(0),
        None => {
            let inserted = tx.query_opt(
                insert,
                &[
                    &key,
                    &s.resource_id,
                    &s.user_id,
                    &s.project_id,
                    &s.source,
                    &metadata,
                ],
            )?;
            match inserted {
                Some(row) => row.get(0),
                None => tx.query_one(select, &[&key])?.get(0),
            }
        }
    };
    cache.insert(fingerprint, s, id);
    Ok(id)
}

/// PostgreSQL text cannot hold NUL (and `jsonb` refuses `\u0000`): such a sample is rejected
/// rather than failing its whole batch.
fn check_text(s: &Sample) -> Result<(), String> {
    let fields = [
        Some(s.source.as_str()),
        Some(s.counter_name.as_str()),
        Some(s.counter_unit.as_str()),
        s.user_id.as_deref(),
        s.project_id.as_deref(),
        Some(s.resource_id.as_str()),
        Some(s.message_id.as_str()),
        s.message_signature.as_deref(),
    ];
    // The metadata's flag is exact about where a NUL may be, but not about JSON's depth limit.
    let md = &s.resource_metadata;
    if fields.iter().flatten().any(|f| f.contains('\0'))
        || (md.has_nul() && value_has_nul(&md.value(), 0))
    {
        return Err("contains a NUL character, which PostgreSQL cannot store".to_string());
    }
    Ok(())
}

fn value_has_nul(v: &Value, depth: usize) -> bool {
    if depth > crate::json::MAX_DEPTH {
        return false;
    }
    match v {
        Value::Str(s) => s.contains('\0'),
        // Binary that is UTF-8 is written as a string; other binary as numbers.
        Value::Bin(b) => std::str::from_utf8(b).is_ok_and(|s| s.contains('\0')),
        Value::Array(items) => items.iter().any(|i| value_has_nul(i, depth + 1)),
        Value::Map(pairs) => pairs
            .iter()
            .any(|(k, v)| crate::json::key_text(k).contains('\0') || value_has_nul(v, depth + 1)),
        _ => false,
    }
}

/// The unique violation of `(message_id, timestamp)` in a sample partition (its index is named
/// after the partition: `sample_<lo>_message_id_timestamp_key`): some sample of the batch is
/// stored already.
fn is_stored_message_id(e: &::postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION
            && db
                .constraint()
                .is_some_and(|c| c.ends_with("message_id_timestamp_key"))
    })
}

/// Refused for lack of privilege, or in a read-only session.
fn is_read_only(e: &::postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE || *c == SqlState::READ_ONLY_SQL_TRANSACTION
    )
}

/// Deadlocks and serialization failures: nothing was stored; the same batch may be retried.
fn is_conflict(e: &::postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// Sort the client's errors into [`StorageError`]s, and say whether the connection is dead.
fn classify(what: &str, e: &::postgres::Error) -> (StorageError, bool) {
    let text = match e.as_db_error() {
        Some(db) => format!("{what}: {} ({})", db.message(), db.code().code()),
        None => {
            // The client's TLS errors hide the cause in their source chain.
            let mut full = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                full.push_str(": ");
                full.push_str(&s.to_string());
                src = s.source();
            }
            match crate::tls::explain(&full) {
                Some(why) => format!("{what}: TLS: {why} ({full})"),
                None => format!("{what}: {full}"),
            }
        }
    };
    let Some(code) = e.code() else {
        // No SQLSTATE: I/O, a closed connection, or a protocol problem. Conversion errors are
        // ours (a bug), not the connection's.
        let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io || e.to_string().contains("communicating") {
            return (StorageError::Unavailable(text), true);
        }
        return (StorageError::Database(text), false);
    };
    let c = code.code();
    if c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "57P04" | "57P05") {
        // Connection exceptions; the server is shutting down or terminated us.
        return (StorageError::Unavailable(text), true);
    }
    let transient = c.starts_with("53") // insufficient resources: disk full, out of memory, too many connections
        || c.starts_with("58") // system error (I/O)
        || c.starts_with("40") // serialization failure, deadlock
        || matches!(c, "55P03" | "57014" | "25006"); // lock timeout, statement timeout, read-only
    if transient {
        (StorageError::Unavailable(text), false)
    } else {
        (StorageError::Database(text), false)
    }
}

/// The link's open connection, or a new one from [`connect`].
fn link_conn<'a>(
    link: &'a mut Link<Conn>,
    config: &Target,
    levels: &[crate::rollup::Granularity],
    span_us: i64,
) -> Result<&'a mut Conn, StorageError> {
    let what = link.what.clone();
    link.get(|| connect(config, &what, levels, span_us))
}

/// A handle's reaper: [`partitions::reap_one`] on a plain connection of its own, opened at its
/// first step and again after a failure; a grave whose lock is held (an expiry detaching) waits
/// for the next nudge.
fn reaper(config: &Target, what: &str) -> server::Reaper {
    let (pg, tls, name) = (config.pg.clone(), config.tls.clone(), what.to_string());
    let mut client: Option<Client> = None;
    server::Reaper::new(what, move || {
        if client.is_none() {
            client = Some(
                pg.connect(tls.clone())
                    .map_err(|e| classify(&name, &e).0.to_string())?,
            );
        }
        let Some(c) = client.as_mut() else {
            return Ok(server::ReapStep::Done);
        };
        match partitions::reap_one(c) {
            Ok((Some(_), true)) => Ok(server::ReapStep::More),
            Ok((_, false)) => Ok(server::ReapStep::Done),
            Ok((None, true)) => Ok(server::ReapStep::Busy),
            Err(e) if e.code() == Some(&::postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                Ok(server::ReapStep::Busy)
            }
            Err(e) => {
                if c.is_closed() {
                    client = None;
                }
                Err(classify(&name, &e).0.to_string())
            }
        }
    })
}

/// Connect, set up the session, migrate and prepare the hot-path statements.
fn connect(
    config: &Target,
    what: &str,
    levels: &[crate::rollup::Granularity],
    span_us: i64,
) -> Result<Conn, StorageError> {
    let mut client = config
        .pg
        .connect(config.tls.clone())
        .map_err(|e| connect_error(what, &e))?;
    match schema::migrate(&mut client, levels, span_us) {
        Ok(()) => {}
        Err(schema::MigrateError::Storage(e)) => return Err(e),
        Err(schema::MigrateError::Sql(e)) => return Err(connect_error(what, &e)),
    }
    let mut prepare = |sql: &str| client.prepare(sql).map_err(|e| connect_error(what, &e));
    let insert = prepare(&INSERT_SAMPLES.replace("ROLLUPS", ROLLUPS))?;
    let insert_dedup = prepare(&INSERT_SAMPLES_DEDUP.replace("ROLLUPS", ROLLUPS))?;
    let meter_select = prepare("SELECT id FROM meter WHERE name = $1 AND type = $2 AND unit = $3")?;
    let meter_insert = prepare(
        "INSERT INTO meter (name, type, unit) VALUES ($1, $2, $3)
         ON CONFLICT (name, type, unit) DO NOTHING RETURNING id",
    )?;
    let resource_select = prepare("SELECT internal_id FROM resource WHERE resource_key = $1")?;
    let resource_insert = prepare(
        "INSERT INTO resource (resource_key, resource_id, user_id, project_id, source_id,
                               resource_metadata)
         VALUES ($1, $2, $3, $4, $5, $6::TEXT::JSONB)
         ON CONFLICT (resource_key) DO NOTHING RETURNING internal_id",
    )?;
    let mut partitions = Partitions::default();
    // The partitions of now and of the next span, made ahead so the hot path finds them. A
    // role that may only read (collectorctl's, say) cannot make them and does not need to.
    match partitions::ensure(&mut client, &mut partitions, &ahead(span_us), span_us) {
        Ok(_) => {}
        Err(Fail::Pg(e)) if is_read_only(&e) => {
            log::warn!("{what}: cannot make the partitions ahead (read-only role?): {e}");
            partitions = partitions::load(&mut client).map_err(|e| connect_error(what, &e))?;
        }
        Err(Fail::Pg(e)) => return Err(connect_error(what, &e)),
        Err(Fail::Storage(e)) => return Err(e),
    }
    Ok(Conn {
        client,
        insert,
        insert_dedup,
        meter_select,
        meter_insert,
        resource_select,
        resource_insert,
        partitions,
    })
}

/// Timestamps (µs) whose partitions are made ahead of the samples: now and one span on.
fn ahead(span_us: i64) -> [i64; 2] {
    let now = crate::model::to_micros(OffsetDateTime::now_utc());
    [now, now.saturating_add(span_us)]
}

/// At connect, only a server that cannot be reached (or cannot take us right now) is
/// transient; refused credentials, a missing database or missing privileges need an operator.
fn connect_error(what: &str, e: &::postgres::Error) -> StorageError {
    let (err, _) = classify(what, e);
    match e.code().map(|c| c.code()) {
        Some(c) if c.starts_with("28") || c == "3D000" || c == "42501" => {
            StorageError::Database(err.to_string())
        }
        _ => err,
    }
}

/// Build the client configuration from the URL; returns it with a printable name.
fn config_from_url(url: &StorageUrl<'_>) -> Result<(Target, String), StorageError> {
    let u = server::ServerUrl::parse(url)?;
    let mut c = Config::new();
    c.application_name("collector")
        .connect_timeout(Duration::from_secs(10))
        // A server that vanishes without closing the connection (host down, partition) is
        // noticed within about a minute instead of the kernel's 15-minute retransmission limit.
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(60));
    // libpq's default: TLS when the server offers it, no certificate check.
    let mut sslmode = "prefer".to_string();
    let mut files = crate::tls::TlsFiles::default();
    let mut host = u.host.clone();
    let mut port = u.port;
    let mut user = u.user.clone();
    let mut password = u.password.clone();
    let mut dbname = u.database.clone();
    for (k, v) in &u.params {
        match k.as_str() {
            "host" => host = Some(v.clone()),
            "port" => {
                port = Some(v.parse().map_err(|_| StorageError::InvalidOption {
                    name: "port",
                    value: v.clone(),
                    reason: "expected a port number".into(),
                })?)
            }
            "user" => user = Some(v.clone()),
            "password" => password = Some(v.clone()),
            "dbname" => dbname = v.clone(),
            "sslmode" => sslmode = v.clone(),
            "sslrootcert" if v == "system" => files.root = None,
            "sslrootcert" => files.root = Some(("sslrootcert", v.into())),
            "sslcert" => files.cert = Some(("sslcert", v.into())),
            "sslkey" => files.key = Some(("sslkey", v.into())),
            "connect_timeout" => {
                c.connect_timeout(server::seconds_param("connect_timeout", v)?);
            }
            "application_name" => {
                c.application_name(v);
            }
            "options" => {
                c.options(v);
            }
            "keepalives" => {
                c.keepalives(server::bool_param("keepalives", v)?);
            }
            "keepalives_idle" => {
                c.keepalives_idle(server::seconds_param("keepalives_idle", v)?);
            }
            "keepalives_interval" => {
                c.keepalives_interval(server::seconds_param("keepalives_interval", v)?);
            }
            "keepalives_count" => {
                let n = v.parse().map_err(|_| StorageError::InvalidOption {
                    name: "keepalives_count",
                    value: v.clone(),
                    reason: "expected a whole number".into(),
                })?;
                c.keepalives_retries(n);
            }
            "tcp_user_timeout" => {
                // Milliseconds, as in libpq.
                let ms: u64 = v.parse().map_err(|_| StorageError::InvalidOption {
                    name: "tcp_user_timeout",
                    value: v.clone(),
                    reason: "expected a whole number of milliseconds".into(),
                })?;
                c.tcp_user_timeout(Duration::from_millis(ms));
            }
            "target_session_attrs" => match v.as_str() {
                "any" => {
                    c.target_session_attrs(TargetSessionAttrs::Any);
                }
                "read-write" => {
                    c.target_session_attrs(TargetSessionAttrs::ReadWrite);
                }
                _ => {
                    return Err(StorageError::InvalidOption {
                        name: "target_session_attrs",
                        value: v.clone(),
                        reason: "expected any or read-write (the collector writes)".into(),
                    })
                }
            },
            _ => server::ignore_param("postgresql", k, v),
        }
    }
    let host = host.unwrap_or_else(|| "localhost".to_string());
    let port = port.unwrap_or(5432);
    if host.starts_with('/') {
        c.host_path(&host);
    } else {
        c.host(&host);
    }
    c.port(port).dbname(&dbname);
    let user = user.unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "postgres".into()));
    c.user(&user);
    if let Some(p) = &password {
        c.password(p.as_bytes());
    }
    // libpq: `require` with a root certificate file behaves as `verify-ca`; `allow` (plain
    // first, TLS if refused) has no equivalent in the client and is taken as `prefer`.
    let (mode, verify) = match sslmode.as_str() {
        "disable" => (SslMode::Disable, None),
        "allow" | "prefer" => (SslMode::Prefer, Some(Verify::Encrypt)),
        "require" if files.root.is_some() => (SslMode::Require, Some(Verify::Chain)),
        "require" => (SslMode::Require, Some(Verify::Encrypt)),
        "verify-ca" => (SslMode::Require, Some(Verify::Chain)),
        "verify-full" => (SslMode::Require, Some(Verify::Full)),
        _ => {
            return Err(StorageError::InvalidOption {
                name: "sslmode",
                value: sslmode,
                reason: "expected disable, allow, prefer, require, verify-ca or verify-full".into(),
            })
        }
    };
    c.ssl_mode(mode);
    let tls = crate::tls::client_config(verify.unwrap_or(Verify::Encrypt), &files)?;
    let what = format!("postgresql://{user}@{host}:{port}/{dbname}");
    Ok((
        Target {
            pg: c,
            tls: MakeRustlsConnect::new(tls),
        },
        what,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> Result<(Config, String), StorageError> {
        config_from_url(&StorageUrl::parse(url)?).map(|(t, w)| (t.pg, w))
    }

    #[test]
    fn urls_and_parameters() {
        let (c, what) = cfg("postgresql+psycopg2://ceilo:pw@db:6432/ceilometer?client_encoding=utf8&connect_timeout=3&sslmode=prefer").unwrap();
        assert_eq!(what, "postgresql://ceilo@db:6432/ceilometer");
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
        let (c, _) = cfg("postgresql://u@/c?host=/run/postgresql").unwrap();
        assert!(matches!(
            c.get_hosts()[0],
            ::postgres::config::Host::Unix(_)
        ));
        for (bad, name) in [
            ("postgresql://u@h/c?sslmode=sometimes", "sslmode"),
            (
                "postgresql://u@h/c?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "sslrootcert",
            ),
            (
                "postgresql://u@h/c?sslmode=require&sslcert=/etc/hostname",
                "sslcert",
            ),
            ("postgresql://u@h/c?connect_timeout=ten", "connect_timeout"),
            ("postgresql://u@h/c?keepalives=maybe", "keepalives"),
        ] {
            match cfg(bad) {
                Err(StorageError::InvalidOption { name: n, .. }) => assert_eq!(n, name, "{bad}"),
                other => panic!("{bad}: {:?}", other.map(|(_, w)| w)),
            }
        }
    }

    #[test]
    fn nul_is_refused_per_sample() {
        let mut s = Sample {
            source: "s".into(),
            counter_name: "c".into(),
            counter_type: meter::CounterType::Gauge,
            counter_unit: "u".into(),
            counter_volume: meter::Volume::Int(1),
            user_id: None,
            project_id: None,
            user_name: None,
            project_name: None,
            resource_id: "r".into(),
            timestamp: String::new(),
            resource_metadata: Value::Map(vec![(Value::Str("k".into()), Value::Str("v".into()))])
                .into(),
            message_id: "m".into(),
            message_signature: None,
            monotonic_time: None,
            extra: Vec::new(),
        };
        assert!(check_text(&s).is_ok());
        s.resource_metadata = Value::Map(vec![(
            Value::Str("k".into()),
            Value::Array(vec![Value::Str("a\0b".into())]),
        )])
        .into();
        assert!(check_text(&s).unwrap_err().contains("NUL"));
    }
}

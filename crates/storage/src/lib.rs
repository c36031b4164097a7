//! `storage`: where metering samples go once the daemon has decoded and verified them.
//!
//! Two kinds of destination live here:
//!
//! - **Storage drivers** behind the [`Storage`] trait, chosen once at start-up by the URL scheme
//!   of `[database] connection` through [`open`] (the role stevedore's `DriverManager` plays in
//!   ceilometer): the embedded SQLite driver ([`sqlite`]) and the server drivers for
//!   PostgreSQL ([`postgres`]) and MySQL/MariaDB ([`mysql`]), which share [`server`]. A new
//!   driver is one module plus one line in [`registry`].
//! - The **file dispatcher** ([`FileDispatcher`]): one JSON line per sample in a size-rotated
//!   file, like ceilometer's `file` dispatcher.
//!
//! This crate opens no sockets, starts no threads and keeps no global state: the daemon owns
//! one [`Storage`] (and/or one [`FileDispatcher`]) per worker and calls it from its writer
//! thread. Design notes and the SQL schema are in `docs/storage.md`.

pub mod background;
pub mod error;
pub mod file;
pub mod json;
pub mod model;
pub mod msgkey;
pub mod mysql;
pub mod partition;
pub mod postgres;
pub mod registry;
pub mod rollup;
pub mod server;
pub mod sqlite;
pub mod tls;
pub mod url;

pub use error::StorageError;
pub use file::FileDispatcher;
pub use model::{
    MeterInfo, RecordOutcome, ResourceInfo, SampleFilter, Statistics, StatsSource, StoredSample,
};
pub use registry::{check_url, known_schemes, open};

use meter::Sample;

/// One storage backend. Every driver offers the same operations (DESIGN §7).
///
/// Methods take `&mut self` because a driver owns one connection and its caches; a daemon
/// worker holds one `Box<dyn Storage>` on its writer thread.
pub trait Storage: Send {
    /// Store a batch. Idempotent on `message_id`; one transaction per call.
    ///
    /// Samples that cannot be stored on their own merits (unparseable timestamp, non-finite
    /// volume, empty message_id) are listed in [`RecordOutcome::rejected`] while the rest of the
    /// batch is stored. A storage-level failure stores nothing and returns
    /// [`StorageError::Unavailable`]; the caller retries the whole batch later, which is safe
    /// because of the idempotence.
    fn record_metering_data(&mut self, batch: &[Sample]) -> Result<RecordOutcome, StorageError>;

    /// Samples matching `filter`, newest first, at most `filter.limit`.
    fn get_samples(&mut self, filter: &SampleFilter) -> Result<Vec<StoredSample>, StorageError>;

    /// One entry per (meter, resource) pair that has samples matching `filter`.
    fn get_meters(&mut self, filter: &SampleFilter) -> Result<Vec<MeterInfo>, StorageError>;

    /// One entry per resource id that has samples matching `filter`, with the metadata of its
    /// newest matching sample.
    fn get_resources(&mut self, filter: &SampleFilter) -> Result<Vec<ResourceInfo>, StorageError>;

    /// min/max/avg/sum/count of the volumes of the samples matching `filter`, per unit.
    ///
    /// `period: None` (or `Some(0)`) gives one bucket over the whole range; `Some(seconds)`
    /// gives buckets of that length aligned to `filter.start`, or to the first matching sample
    /// when the filter has no start. Buckets without samples are omitted.
    fn get_meter_statistics(
        &mut self,
        filter: &SampleFilter,
        period: Option<u64>,
    ) -> Result<Vec<Statistics>, StorageError>;

    /// [`Storage::get_meter_statistics`], and where the answer came from: pre-aggregated
    /// rollups (exact for the filter and period asked) or the raw samples.
    fn get_meter_statistics_from(
        &mut self,
        filter: &SampleFilter,
        period: Option<u64>,
    ) -> Result<(Vec<Statistics>, StatsSource), StorageError> {
        Ok((self.get_meter_statistics(filter, period)?, StatsSource::Raw))
    }

    /// Delete samples whose timestamp is older than now − `ttl_seconds`, then the resources
    /// and meters no sample refers to any more. Returns the number of samples deleted.
    fn clear_expired_metering_data(&mut self, ttl_seconds: u64) -> Result<u64, StorageError>;

    /// One step of the work expiry leaves for later, if any is waiting: SQLite reclaims the
    /// pages of an expired chunk, the server drivers drop a table an expired partition was
    /// moved into. `Ok(false)` when there was nothing to do. Drivers take these steps
    /// themselves after batches; the daemon's writer takes them when it has no batch, and tools
    /// and tests call it directly.
    fn retention_step(&mut self) -> Result<bool, StorageError> {
        Ok(false)
    }
}

/// The rejection reason of a sample already older than the time to live when it arrived.
pub const EXPIRED_REASON: &str = "older than metering_time_to_live";

/// Driver tuning that does not belong in the connection URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageOptions {
    /// SQLite `PRAGMA synchronous`: `OFF`, `NORMAL`, `FULL` or `EXTRA`. With WAL, `NORMAL`
    /// never corrupts the database; a power loss may lose the last commits.
    pub sqlite_synchronous: String,
    /// How long a write waits for another process's lock before the batch fails as
    /// [`StorageError::Unavailable`].
    pub busy_timeout_ms: u64,
    /// Length of a sample partition (SQLite: one chunk table each), in seconds; UTC-aligned.
    pub partition_span_seconds: u64,
    /// `metering_time_to_live`: a sample already older than this when it arrives is not stored
    /// (rejected, and counted in [`RecordOutcome::expired`]). `None`: samples never expire.
    pub time_to_live_seconds: Option<u64>,
    /// Rollup granularities and their retention.
    pub rollups: Vec<rollup::Granularity>,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            sqlite_synchronous: "NORMAL".to_string(),
            busy_timeout_ms: 5000,
            partition_span_seconds: 86_400,
            time_to_live_seconds: None,
            rollups: rollup::default_granularities(),
        }
    }
}

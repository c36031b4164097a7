//! The driver-independent types that go in and out of [`crate::Storage`].

use meter::CounterType;
use serde::{Serialize, Serializer};
use time::OffsetDateTime;

/// What became of one [`crate::Storage::record_metering_data`] batch.
///
/// Every index of the batch is accounted for exactly once: it was stored, it was a duplicate
/// (its `message_id` was already stored, or appeared earlier in the same batch), or it was
/// rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Samples newly written.
    pub stored: usize,
    /// Samples whose `message_id` was already stored; equals `duplicate_indices.len()`.
    pub duplicates: usize,
    /// Batch indices of those duplicates, ascending, so a caller that merged several requests
    /// into one batch can answer each with its own counts.
    pub duplicate_indices: Vec<usize>,
    /// Batch index and reason of each sample refused on its own merits, ascending.
    pub rejected: Vec<(usize, String)>,
    /// How many of the rejected samples were already older than the time to live when they
    /// arrived (dropped, never stored).
    pub expired: usize,
}

/// Which samples a query looks at. Every field narrows the match; the default matches all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleFilter {
    /// Meter name (`counter_name`), e.g. `cpu`.
    pub meter: Option<String>,
    pub resource_id: Option<String>,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub source: Option<String>,
    /// Inclusive lower bound on the sample timestamp.
    pub start: Option<OffsetDateTime>,
    /// Exclusive upper bound on the sample timestamp.
    pub end: Option<OffsetDateTime>,
    /// Resource metadata equalities: a flattened path (`flavor.name`, `tags[0]`; no
    /// `metadata.` prefix) and the value as text. The text matches a string value equal to it,
    /// and a number or boolean it parses as (`"2"` matches `2` and `2.0`, `"true"` matches
    /// `true`).
    pub metadata: Vec<(String, String)>,
    /// At most this many results (ignored by statistics).
    pub limit: Option<usize>,
}

/// A sample as read back from storage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredSample {
    pub source: String,
    pub counter_name: String,
    #[serde(serialize_with = "ser_counter_type")]
    pub counter_type: CounterType,
    pub counter_unit: String,
    pub counter_volume: f64,
    pub user_id: Option<String>,
    pub project_id: Option<String>,
    pub resource_id: String,
    /// UTC.
    #[serde(serialize_with = "ser_time")]
    pub timestamp: OffsetDateTime,
    /// When this collector stored it (UTC).
    #[serde(serialize_with = "ser_time")]
    pub recorded_at: OffsetDateTime,
    pub resource_metadata: serde_json::Value,
    pub message_id: String,
    pub message_signature: Option<String>,
}

/// A meter seen on a resource (ceilometer's `Meter` model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterInfo {
    pub name: String,
    #[serde(serialize_with = "ser_counter_type")]
    pub counter_type: CounterType,
    pub unit: String,
    pub resource_id: String,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub source: String,
}

/// A resource and the time span of its matching samples (ceilometer's `Resource` model).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceInfo {
    pub resource_id: String,
    /// Owner, source and metadata as of the newest matching sample.
    pub user_id: Option<String>,
    pub project_id: Option<String>,
    pub source: String,
    pub metadata: serde_json::Value,
    #[serde(serialize_with = "ser_time")]
    pub first_sample_timestamp: OffsetDateTime,
    #[serde(serialize_with = "ser_time")]
    pub last_sample_timestamp: OffsetDateTime,
}

/// Aggregates over one period (ceilometer's `Statistics` model).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Statistics {
    #[serde(serialize_with = "ser_time")]
    pub period_start: OffsetDateTime,
    #[serde(serialize_with = "ser_time")]
    pub period_end: OffsetDateTime,
    /// Period length in seconds; 0 when no period was asked for.
    pub period: u64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub sum: f64,
    /// Timestamp of the first and last sample inside the period.
    #[serde(serialize_with = "ser_time")]
    pub duration_start: OffsetDateTime,
    #[serde(serialize_with = "ser_time")]
    pub duration_end: OffsetDateTime,
    /// `duration_end - duration_start` in seconds.
    pub duration: f64,
    pub unit: String,
}

/// Which data answered a statistics query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsSource {
    /// Computed over the stored samples.
    Raw,
    /// Summed from the rollup of this granularity (seconds), which is exact for the query.
    Rollup { granularity: u64 },
}

impl std::fmt::Display for StatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatsSource::Raw => f.write_str("raw"),
            StatsSource::Rollup { granularity } => write!(f, "rollup:{granularity}"),
        }
    }
}

/// Microseconds since the Unix epoch: how every driver in this crate represents instants
/// internally (see docs/storage.md for why).
pub(crate) fn to_micros(t: OffsetDateTime) -> i64 {
    // Years -9999..=9999 span ±3.2e17 µs, far inside i64.
    (t.unix_timestamp_nanos() / 1000) as i64
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    to_micros(OffsetDateTime::now_utc())
}

/// The inverse of [`to_micros`]; `None` outside the representable range.
pub(crate) fn from_micros(us: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).ok()
}

fn ser_time<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    use time::format_description::well_known::Rfc3339;
    let text = t.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

fn ser_counter_type<S: Serializer>(t: &CounterType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_str())
}

/// Parse a stored counter type back.
pub(crate) fn counter_type_from_str(s: &str) -> Option<CounterType> {
    match s {
        "gauge" => Some(CounterType::Gauge),
        "delta" => Some(CounterType::Delta),
        "cumulative" => Some(CounterType::Cumulative),
        _ => None,
    }
}

/// The joins every SQL driver's sample queries read from: `s` sample, `m` meter, `r` resource.
pub(crate) const SAMPLE_FROM: &str = " FROM sample s
    JOIN meter m ON m.id = s.meter_id
    JOIN resource r ON r.internal_id = s.resource_id";

impl SampleFilter {
    /// The filter's plain equalities, as (column in [`SAMPLE_FROM`]'s joins, value), in the
    /// order every SQL driver writes them.
    pub(crate) fn column_equalities(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("m.name", &self.meter),
            ("r.resource_id", &self.resource_id),
            ("r.project_id", &self.project_id),
            ("r.user_id", &self.user_id),
            ("r.source_id", &self.source),
        ]
        .into_iter()
        .filter_map(|(column, value)| value.as_deref().map(|v| (column, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn micros_round_trip() {
        for t in [
            datetime!(1970-01-01 00:00:00 UTC),
            datetime!(2026-11-02 01:01:07.000001 UTC),
            datetime!(1901-12-13 20:45:52.5 UTC),
            datetime!(9999-12-31 23:59:59.999999 UTC),
        ] {
            assert_eq!(from_micros(to_micros(t)), Some(t));
        }
    }

    #[test]
    fn serializes_times_as_rfc3339() {
        let m = Statistics {
            period_start: datetime!(2026-01-01 00:00:00 UTC),
            period_end: datetime!(2026-01-01 00:01:00 UTC),
            period: 60,
            count: 1,
            min: 1.0,
            max: 1.0,
            avg: 1.0,
            sum: 1.0,
            duration_start: datetime!(2026-01-01 00:00:30.25 UTC),
            duration_end: datetime!(2026-01-01 00:00:30.25 UTC),
            duration: 0.0,
            unit: "ns".into(),
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["period_start"], "2026-01-01T00:00:00Z");
        assert_eq!(v["duration_start"], "2026-01-01T00:00:30.25Z");
    }
}

//! The typed metering sample (DESIGN §4.1) extracted from a decoded message map.
//!
//! [`Sample::from_value`] checks every field's type and takes the strings it keeps out of the
//! decoded map: moved from an owned [`Value`], copied from a [`crate::ValueRef`] (the receive
//! path, whose other strings are never allocated); `resource_metadata` alone is encoded into
//! one byte string ([`Metadata`]). Verify the signature on the decoded map *before*
//! converting it: the typed
//! form forgets distinctions the signature sees (a missing `user_id` vs nil, bin vs str, a u64
//! volume above `i64::MAX`), so [`Sample::to_value`] re-signs, but does not always re-verify, an
//! unusual message.

use crate::decode::{decode_value_with, DecodeError, Limits};
use crate::metadata::Metadata;
use crate::signature::SIGNATURE_FIELD;
use crate::timestamp::{parse_timestamp, TimestampError};
use crate::value::{Parts, Value, View};

/// Why a message is not a sample. Every variant that concerns a field names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// The bytes are not one msgpack value.
    #[error("undecodable msgpack: {0}")]
    Decode(#[from] DecodeError),
    #[error("a sample must be a map, got {got}")]
    NotAMap { got: &'static str },
    /// Top-level keys are field names; ceilometer only sends str.
    #[error("top-level key #{index} is {got}, expected str")]
    NonStringKey { index: usize, got: &'static str },
    #[error("field {field:?}: appears more than once")]
    DuplicateField { field: String },
    #[error("field {field:?}: missing")]
    Missing { field: &'static str },
    #[error("field {field:?}: expected {expected}, got {got}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    /// A bin sent where a string belongs (old publishers) that is not UTF-8.
    #[error("field {field:?}: bin is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("field \"counter_type\": expected gauge, delta or cumulative, got {value:?}")]
    CounterType { value: String },
}

impl SampleError {
    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            SampleError::DuplicateField { field } => Some(field),
            SampleError::Missing { field }
            | SampleError::WrongType { field, .. }
            | SampleError::InvalidUtf8 { field } => Some(field),
            SampleError::CounterType { .. } => Some("counter_type"),
            SampleError::Decode(e) if !e.path().is_empty() => Some(e.path()),
            _ => None,
        }
    }
}

/// `counter_type`: how successive volumes of a meter relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterType {
    Gauge,
    Delta,
    Cumulative,
}

impl CounterType {
    /// The wire name (`"gauge"`, `"delta"`, `"cumulative"`); anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gauge" => Some(CounterType::Gauge),
            "delta" => Some(CounterType::Delta),
            "cumulative" => Some(CounterType::Cumulative),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CounterType::Gauge => "gauge",
            CounterType::Delta => "delta",
            CounterType::Cumulative => "cumulative",
        }
    }
}

/// `counter_volume`, keeping int vs float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Volume {
    Int(i64),
    Float(f64),
}

impl Volume {
    pub fn as_f64(self) -> f64 {
        match self {
            Volume::Int(i) => i as f64,
            Volume::Float(f) => f,
        }
    }

    pub fn to_value(self) -> Value {
        match self {
            Volume::Int(i) => Value::Int(i),
            Volume::Float(f) => Value::Float(f),
        }
    }
}

/// One metering sample as ceilometer's `meter_message_from_counter` builds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub source: String,
    pub counter_name: String,
    pub counter_type: CounterType,
    pub counter_unit: String,
    pub counter_volume: Volume,
    pub user_id: Option<String>,
    pub project_id: Option<String>,
    pub user_name: Option<String>,
    pub project_name: Option<String>,
    pub resource_id: String,
    /// As sent (ISO 8601); see [`crate::timestamp::parse_timestamp`] for the UTC form.
    pub timestamp: String,
    /// Always a map (nil on the wire becomes an empty one), kept encoded: see [`Metadata`].
    pub resource_metadata: Metadata,
    pub message_id: String,
    pub message_signature: Option<String>,
    pub monotonic_time: Option<f64>,
    /// Fields this version does not know, kept for the file dispatcher.
    pub extra: Vec<(String, Value)>,
}

/// The fields [`Sample`] types, in the order ceilometer's `meter_message_from_counter` builds
/// them (and [`Sample::to_value`] writes them).
pub const FIELDS: [&str; 15] = [
    "source",
    "counter_name",
    "counter_type",
    "counter_unit",
    "counter_volume",
    "user_id",
    "user_name",
    "project_id",
    "project_name",
    "resource_id",
    "timestamp",
    "resource_metadata",
    "message_id",
    "monotonic_time",
    SIGNATURE_FIELD,
];

/// A str, or a bin holding UTF-8 (old publishers send bytes where strings belong).
fn text<M: Parts>(
    field: &'static str,
    v: M,
    expected: &'static str,
) -> Result<String, SampleError> {
    let v = match v.into_string() {
        Ok(s) => return Ok(s),
        Err(v) => v,
    };
    match v.into_bytes() {
        Ok(b) => String::from_utf8(b).map_err(|_| SampleError::InvalidUtf8 { field }),
        Err(other) => Err(SampleError::WrongType {
            field,
            expected,
            got: other.type_name(),
        }),
    }
}

fn required<M: Parts>(field: &'static str, v: Option<M>) -> Result<String, SampleError> {
    text(field, v.ok_or(SampleError::Missing { field })?, "str")
}

/// str, nil or missing.
fn optional<M: Parts>(field: &'static str, v: Option<M>) -> Result<Option<String>, SampleError> {
    match v {
        None => Ok(None),
        Some(v) if matches!(v.view(), View::Nil) => Ok(None),
        Some(v) => text(field, v, "str or nil").map(Some),
    }
}

impl Sample {
    /// Type-check a decoded message map and move its parts into a `Sample`.
    ///
    /// Required: `source`, `counter_name`, `counter_type`, `counter_unit`, `counter_volume`,
    /// `resource_id`, `timestamp` (kept as sent; see [`Sample::timestamp_utc`]), `message_id`.
    /// Optional: `user_id`, `project_id`, `user_name`, `project_name` (str or nil),
    /// `resource_metadata` (map; nil or missing is an empty map), `message_signature` (str),
    /// `monotonic_time` (float, int or nil). Strings may arrive as UTF-8 bin. Other fields go to
    /// `extra` in wire order. Duplicate or non-str top-level keys are refused.
    ///
    /// From an owned [`Value`] the strings are moved; from a [`crate::value::ValueRef`] (the
    /// receive path) the fields kept are copied and the rest, the metadata's strings
    /// included, never allocated.
    pub fn from_value<M: Parts>(message: M) -> Result<Sample, SampleError> {
        let pairs = match message.into_pairs() {
            Ok(pairs) => pairs,
            Err(other) => {
                return Err(SampleError::NotAMap {
                    got: other.type_name(),
                })
            }
        };
        let mut slots: [Option<M>; FIELDS.len()] = Default::default();
        let mut extra: Vec<(String, Value)> = Vec::new();
        for (index, (k, v)) in pairs.into_iter().enumerate() {
            let View::Str(key) = k.view() else {
                return Err(SampleError::NonStringKey {
                    index,
                    got: k.type_name(),
                });
            };
            match FIELDS.iter().position(|f| *f == key) {
                Some(i) => {
                    if slots[i].replace(v).is_some() {
                        return Err(SampleError::DuplicateField {
                            field: key.to_owned(),
                        });
                    }
                }
                None => extra.push((key.to_owned(), v.into_value())),
            }
        }
        if extra.len() > 1 {
            let mut names: Vec<&str> = extra.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err(SampleError::DuplicateField {
                    field: w[0].to_owned(),
                });
            }
        }
        let [source, counter_name, counter_type, counter_unit, counter_volume, user_id, user_name, project_id, project_name, resource_id, timestamp, resource_metadata, message_id, monotonic_time, message_signature] =
            slots;

        let counter_type = {
            let s = required("counter_type", counter_type)?;
            CounterType::parse(&s).ok_or(SampleError::CounterType { value: s })?
        };
        let counter_volume = match counter_volume.as_ref().map(|v| (v.view(), v.type_name())) {
            None => {
                return Err(SampleError::Missing {
                    field: "counter_volume",
                })
            }
            Some((View::Int(i), _)) => Volume::Int(i),
            Some((View::UInt(u), _)) => Volume::Float(u as f64),
            Some((View::Float(f), _)) => Volume::Float(f),
            Some((_, got)) => {
                return Err(SampleError::WrongType {
                    field: "counter_volume",
                    expected: "int or float",
                    got,
                })
            }
        };
        // Encoded here, the tree dropped at once: see `crate::metadata`.
        let resource_metadata = match resource_metadata.as_ref() {
            None => Metadata::default(),
            Some(m) => match m.view() {
                View::Nil => Metadata::default(),
                View::Map(_) => Metadata::from_value(m),
                _ => {
                    return Err(SampleError::WrongType {
                        field: "resource_metadata",
                        expected: "map or nil",
                        got: m.type_name(),
                    })
                }
            },
        };
        let monotonic_time = match monotonic_time.as_ref().map(|m| (m.view(), m.type_name())) {
            None | Some((View::Nil, _)) => None,
            Some((View::Float(f), _)) => Some(f),
            Some((View::Int(i), _)) => Some(i as f64),
            Some((View::UInt(u), _)) => Some(u as f64),
            Some((_, got)) => {
                return Err(SampleError::WrongType {
                    field: "monotonic_time",
                    expected: "float, int or nil",
                    got,
                })
            }
        };
        let message_signature = match message_signature {
            None => None,
            Some(v) => Some(text(SIGNATURE_FIELD, v, "str")?),
        };
        Ok(Sample {
            source: required("source", source)?,
            counter_name: required("counter_name", counter_name)?,
            counter_type,
            counter_unit: required("counter_unit", counter_unit)?,
            counter_volume,
            user_id: optional("user_id", user_id)?,
            project_id: optional("project_id", project_id)?,
            user_name: optional("user_name", user_name)?,
            project_name: optional("project_name", project_name)?,
            resource_id: required("resource_id", resource_id)?,
            timestamp: required("timestamp", timestamp)?,
            resource_metadata,
            message_id: required("message_id", message_id)?,
            message_signature,
            monotonic_time,
            extra,
        })
    }

    /// Decode one msgpack sample map (a UDP datagram, a TCP frame) with the default limits.
    ///
    /// This does not verify the signature: to do so, decode with
    /// [`crate::decode::decode_value`], verify the [`Value`], then [`Sample::from_value`].
    pub fn decode(bytes: &[u8]) -> Result<Sample, SampleError> {
        Sample::decode_with(bytes, &Limits::default())
    }

    /// [`Sample::decode`] with explicit decoder limits.
    pub fn decode_with(bytes: &[u8], limits: &Limits) -> Result<Sample, SampleError> {
        Sample::from_value(decode_value_with(bytes, limits)?)
    }

    /// The message map ceilometer would send for this sample, in its field order; `None`
    /// optionals become nil (as ceilometer sends them), `message_signature` is left out when
    /// absent, and `extra` follows.
    pub fn to_value(&self) -> Value {
        let s = |v: &str| Value::Str(v.to_owned());
        let opt = |v: &Option<String>| v.as_deref().map_or(Value::Nil, s);
        let mut pairs: Vec<(Value, Value)> = Vec::with_capacity(FIELDS.len() + self.extra.len());
        let mut put = |k: &str, v: Value| pairs.push((s(k), v));
        put("source", s(&self.source));
        put("counter_name", s(&self.counter_name));
        put("counter_type", s(self.counter_type.as_str()));
        put("counter_unit", s(&self.counter_unit));
        put("counter_volume", self.counter_volume.to_value());
        put("user_id", opt(&self.user_id));
        put("user_name", opt(&self.user_name));
        put("project_id", opt(&self.project_id));
        put("project_name", opt(&self.project_name));
        put("resource_id", s(&self.resource_id));
        put("timestamp", s(&self.timestamp));
        put("resource_metadata", self.resource_metadata.value());
        put("message_id", s(&self.message_id));
        put(
            "monotonic_time",
            self.monotonic_time.map_or(Value::Nil, Value::Float),
        );
        if let Some(sig) = &self.message_signature {
            put(SIGNATURE_FIELD, s(sig));
        }
        for (k, v) in &self.extra {
            put(k, v.clone());
        }
        Value::Map(pairs)
    }

    /// `timestamp` normalized to UTC (DESIGN §6).
    pub fn timestamp_utc(&self) -> Result<time::OffsetDateTime, TimestampError> {
        parse_timestamp(&self.timestamp)
    }
}

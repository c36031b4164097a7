//! The typed metering sample (DESIGN §4.1) extracted from a decoded message map.

use crate::value::Value;

/// `counter_type`: how successive volumes of a meter relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterType {
    Gauge,
    Delta,
    Cumulative,
}

impl CounterType {
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
    /// Always a `Value::Map` (nil on the wire becomes an empty map).
    pub resource_metadata: Value,
    pub message_id: String,
    pub message_signature: Option<String>,
    pub monotonic_time: Option<f64>,
    /// Fields this version does not know, kept for the file dispatcher.
    pub extra: Vec<(String, Value)>,
}

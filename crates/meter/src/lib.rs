//! `meter`: the ceilometer metering sample and everything pure about it — decoding the msgpack
//! bytes ceilometer's publishers send, computing and verifying their HMAC signature, and
//! normalizing their timestamps to UTC.
//!
//! It does no I/O, starts no threads and holds no state: the daemon, the storage drivers and the
//! load generator all build on it.

pub mod sample;
pub mod timestamp;
pub mod value;

pub use sample::{CounterType, Sample, Volume};
pub use timestamp::{parse_timestamp, TimestampError};
pub use value::Value;

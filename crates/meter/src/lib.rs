//! `meter`: the ceilometer metering sample and everything pure about it — decoding the msgpack
//! bytes ceilometer's publishers send, computing and verifying their HMAC signature, and
//! normalizing their timestamps to UTC.
//!
//! It does no I/O, starts no threads and holds no state: the daemon, the storage drivers and the
//! load generator all build on it.
//!
//! The receive path for one message is:
//!
//! ```
//! # use meter::{decode_value_ref, Sample, SigningKey, ValueRef};
//! # let mut m = Sample { source: "openstack".into(), counter_name: "cpu".into(),
//! #   counter_type: meter::CounterType::Cumulative, counter_unit: "ns".into(),
//! #   counter_volume: meter::Volume::Int(1), user_id: None, project_id: None, user_name: None,
//! #   project_name: None, resource_id: "r".into(), timestamp: "2014-01-01T12:00:00".into(),
//! #   resource_metadata: Default::default(), message_id: "m".into(), message_signature: None,
//! #   monotonic_time: None, extra: vec![] }.to_value();
//! # meter::sign(&mut m, "secret");
//! # let datagram = meter::encode::to_msgpack(&m);
//! let key = SigningKey::new("secret"); // once, at start-up
//! // Malformed → count and drop. Its strings borrow the datagram's bytes; `decode_value`
//! // gives an owned `Value` instead, and everything below takes either.
//! let message: ValueRef = decode_value_ref(&datagram)?;
//! let signed = key.verify(&message); // before from_value: the message is what was signed
//! let sample = Sample::from_value(message)?; // typed: the fields it keeps are copied
//! assert!(signed && sample.counter_name == "cpu");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod decode;
pub mod encode;
pub mod metadata;
pub mod sample;
pub mod signature;
pub mod timestamp;
pub mod value;

pub use decode::{
    decode_value, decode_value_ref, decode_value_with, read_value, DecodeError, Limits,
};
pub use encode::encode_value;
pub use metadata::Metadata;
pub use sample::{CounterType, Sample, SampleError, Volume};
pub use signature::{
    compute_signature, sign, try_compute_signature, verify_signature, SignatureError, SigningKey,
};
pub use timestamp::{parse_timestamp, TimestampError};
pub use value::{Node, Parts, Value, ValueRef, View};

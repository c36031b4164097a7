//! Shared helpers for the integration tests: loading the signature vectors.
#![allow(dead_code)]

use meter::{decode_value, Value};
use serde_json::Value as Json;

pub struct Vector {
    pub secret: String,
    pub bytes: Vec<u8>,
    /// The message as JSON (only in signatures.json).
    pub json: Option<Json>,
    /// The expected signature; `None` where ceilometer's code raises.
    pub signature: Option<String>,
}

fn data(name: &str) -> Json {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// The vectors produced by real ceilometer (copied from shared/vectors/signatures.json).
pub fn ceilometer_vectors() -> Vec<Vector> {
    data("signatures.json")
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Vector {
            secret: e["secret"].as_str().unwrap().to_owned(),
            bytes: hex::decode(e["msgpack_hex"].as_str().unwrap()).unwrap(),
            signature: Some(
                e["message"]["message_signature"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ),
            json: Some(e["message"].clone()),
        })
        .collect()
}

/// Random awkward messages signed by tools/gen_reference_vectors.py.
pub fn reference_vectors() -> Vec<Vector> {
    data("reference_vectors.json")["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Vector {
            secret: e["secret"].as_str().unwrap().to_owned(),
            bytes: hex::decode(e["msgpack_hex"].as_str().unwrap()).unwrap(),
            signature: e["signature"].as_str().map(str::to_owned),
            json: None,
        })
        .collect()
}

/// (f64 bits, Python repr) pairs from the same generator.
pub fn reference_floats() -> Vec<(f64, String)> {
    data("reference_vectors.json")["floats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let bits = u64::from_str_radix(e[0].as_str().unwrap(), 16).unwrap();
            (f64::from_bits(bits), e[1].as_str().unwrap().to_owned())
        })
        .collect()
}

pub fn decode(v: &Vector) -> Value {
    decode_value(&v.bytes).unwrap()
}

pub fn s(x: &str) -> Value {
    Value::Str(x.to_owned())
}

pub fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
}

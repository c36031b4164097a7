//! How a msgpack [`Value`] becomes JSON, and how resource metadata is flattened into
//! queryable key/value rows. Shared by the SQLite driver and the file dispatcher so a value
//! looks the same wherever it lands.
//!
//! msgpack can say things JSON cannot; the choices (documented in docs/storage.md):
//! - `bin`: a JSON string when the bytes are UTF-8, else an array of byte values (0–255).
//!   Lossless and dependency-free; a base64 string would be indistinguishable from text.
//! - non-finite floats: the strings `"NaN"`, `"Infinity"`, `"-Infinity"` (Python's spelling),
//!   because `null` would lose which one it was and bare `NaN` is not JSON.
//! - non-string map keys: their text (`1`, `true`, `null`, JSON of arrays/maps), as Python's
//!   `json.dumps` does for scalars.
//! - nesting deeper than [`MAX_DEPTH`] becomes `null` (the decoder bounds depth long before).

use meter::Value;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use std::borrow::Cow;

/// Deeper containers are written as `null` instead of recursing further.
pub const MAX_DEPTH: usize = 64;

/// Serializes a [`Value`] as JSON.
#[derive(Clone, Copy)]
pub struct Json<'a> {
    value: &'a Value,
    sort_keys: bool,
    depth: usize,
}

impl<'a> Json<'a> {
    /// Maps keep their wire order (duplicate keys are written as they came).
    pub fn wire_order(value: &'a Value) -> Self {
        Json {
            value,
            sort_keys: false,
            depth: 0,
        }
    }

    /// Maps sorted by key, duplicate keys resolved to the last one (as a Python dict built
    /// from the same msgpack would): equal metadata gives equal text, whatever the wire order.
    pub fn canonical(value: &'a Value) -> Self {
        Json {
            value,
            sort_keys: true,
            depth: 0,
        }
    }

    fn child(&self, value: &'a Value) -> Self {
        Json {
            value,
            sort_keys: self.sort_keys,
            depth: self.depth + 1,
        }
    }
}

/// The JSON stand-in for a non-finite float.
pub fn non_finite_text(f: f64) -> &'static str {
    if f.is_nan() {
        "NaN"
    } else if f > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// The text a map key is written as.
pub fn key_text(key: &Value) -> Cow<'_, str> {
    match key {
        Value::Str(s) => Cow::Borrowed(s),
        Value::Nil => Cow::Borrowed("null"),
        Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::Int(i) => Cow::Owned(i.to_string()),
        Value::UInt(u) => Cow::Owned(u.to_string()),
        Value::Float(f) if f.is_finite() => Cow::Owned(f.to_string()),
        Value::Float(f) => Cow::Borrowed(non_finite_text(*f)),
        Value::Bin(b) => String::from_utf8_lossy(b),
        Value::Array(_) | Value::Map(_) => Cow::Owned(
            serde_json::to_string(&Json::canonical(key)).unwrap_or_else(|_| "?".to_string()),
        ),
    }
}

/// Map entries with their key text; sorted and de-duplicated (last wins) when `sort`.
fn entries(pairs: &[(Value, Value)], sort: bool) -> Vec<(Cow<'_, str>, &Value)> {
    let mut v: Vec<(Cow<'_, str>, &Value)> = pairs.iter().map(|(k, v)| (key_text(k), v)).collect();
    if sort {
        // Stable: among equal keys the wire order survives, so keeping the last keeps the last.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Cow<'_, str>, &Value)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        v = out;
    }
    v
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.value {
            Value::Nil => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(f) => s.serialize_str(non_finite_text(*f)),
            Value::Str(t) => s.serialize_str(t),
            Value::Bin(b) => match std::str::from_utf8(b) {
                Ok(t) => s.serialize_str(t),
                Err(_) => {
                    let mut seq = s.serialize_seq(Some(b.len()))?;
                    for byte in b {
                        seq.serialize_element(byte)?;
                    }
                    seq.end()
                }
            },
            Value::Array(_) | Value::Map(_) if self.depth >= MAX_DEPTH => s.serialize_unit(),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&self.child(item))?;
                }
                seq.end()
            }
            Value::Map(pairs)
                if !self.sort_keys && pairs.iter().all(|(k, _)| k.as_str().is_some()) =>
            {
                // Fast path for the usual all-string-keys map: no key allocation.
                let mut map = s.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k.as_str().unwrap_or_default(), &self.child(v))?;
                }
                map.end()
            }
            Value::Map(pairs) => {
                let entries = entries(pairs, self.sort_keys);
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in &entries {
                    map.serialize_entry(k.as_ref(), &self.child(v))?;
                }
                map.end()
            }
        }
    }
}

/// A flattened metadata value, typed as SQL stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum FlatValue<'a> {
    Text(Cow<'a, str>),
    Int(i64),
    Real(f64),
}

/// Flatten resource metadata into `(path, value)` pairs the way ceilometer's
/// `utils.dict_to_keyval` does: nested map keys joined with `.`, array elements as `key[i]`.
/// `nil` leaves (and non-UTF-8 `bin`) are skipped, as ceilometer skips values it cannot type.
/// Booleans become 0/1 (SQLite's own JSON convention); non-finite floats their JSON text.
/// Only a map has paths; anything else flattens to nothing.
pub fn flatten(metadata: &Value) -> Vec<(String, FlatValue<'_>)> {
    let mut out = Vec::new();
    if let Value::Map(pairs) = metadata {
        for (k, v) in entries(pairs, true) {
            flatten_into(k.into_owned(), v, 1, &mut out);
        }
    }
    out
}

fn flatten_into<'a>(
    path: String,
    v: &'a Value,
    depth: usize,
    out: &mut Vec<(String, FlatValue<'a>)>,
) {
    let leaf = match v {
        Value::Nil => return,
        Value::Bool(b) => FlatValue::Int(i64::from(*b)),
        Value::Int(i) => FlatValue::Int(*i),
        Value::UInt(u) => FlatValue::Real(*u as f64),
        Value::Float(f) if f.is_finite() => FlatValue::Real(*f),
        Value::Float(f) => FlatValue::Text(Cow::Borrowed(non_finite_text(*f))),
        Value::Str(s) => FlatValue::Text(Cow::Borrowed(s)),
        Value::Bin(b) => match std::str::from_utf8(b) {
            Ok(s) => FlatValue::Text(Cow::Borrowed(s)),
            Err(_) => return,
        },
        Value::Array(_) | Value::Map(_) if depth >= MAX_DEPTH => return,
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten_into(format!("{path}[{i}]"), item, depth + 1, out);
            }
            return;
        }
        Value::Map(pairs) => {
            for (k, v) in entries(pairs, true) {
                flatten_into(format!("{path}.{k}"), v, depth + 1, out);
            }
            return;
        }
    };
    out.push((path, leaf));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.to_string())
    }

    fn sample_map() -> Value {
        Value::Map(vec![
            (s("zeta"), Value::Int(1)),
            (
                s("flavor"),
                Value::Map(vec![(s("name"), s("m1.tiny")), (s("vcpus"), Value::Int(1))]),
            ),
            (
                s("tags"),
                Value::Array(vec![s("a"), Value::Nil, Value::Bool(true)]),
            ),
            (s("blob"), Value::Bin(vec![0xff, 0x00])),
            (s("text_bin"), Value::Bin(b"ok".to_vec())),
            (s("nan"), Value::Float(f64::NAN)),
            (s("inf"), Value::Float(f64::NEG_INFINITY)),
            (Value::Int(7), Value::Float(2.5)),
            (s("big"), Value::UInt(u64::MAX)),
        ])
    }

    #[test]
    fn wire_order_keeps_order_and_encodes_edge_values() {
        let text = serde_json::to_string(&Json::wire_order(&sample_map())).unwrap();
        assert_eq!(
            text,
            r#"{"zeta":1,"flavor":{"name":"m1.tiny","vcpus":1},"tags":["a",null,true],"blob":[255,0],"text_bin":"ok","nan":"NaN","inf":"-Infinity","7":2.5,"big":18446744073709551615}"#
        );
    }

    #[test]
    fn canonical_sorts_and_dedupes_last_wins() {
        let a = Value::Map(vec![
            (s("b"), Value::Int(1)),
            (s("a"), Value::Int(2)),
            (s("b"), Value::Int(3)),
        ]);
        let b = Value::Map(vec![(s("a"), Value::Int(2)), (s("b"), Value::Int(3))]);
        let ta = serde_json::to_string(&Json::canonical(&a)).unwrap();
        let tb = serde_json::to_string(&Json::canonical(&b)).unwrap();
        assert_eq!(ta, r#"{"a":2,"b":3}"#);
        assert_eq!(ta, tb);
    }

    #[test]
    fn too_deep_becomes_null() {
        let mut v = Value::Int(1);
        for _ in 0..(MAX_DEPTH + 10) {
            v = Value::Array(vec![v]);
        }
        let text = serde_json::to_string(&Json::wire_order(&v)).unwrap();
        assert_eq!(text.matches('[').count(), MAX_DEPTH, "{text}");
        assert!(text.contains("[null]"), "{text}");
        assert!(flatten(&Value::Map(vec![(s("deep"), v)])).is_empty());
    }

    #[test]
    fn flattens_like_ceilometer() {
        let md = sample_map();
        let flat = flatten(&md);
        let keys: Vec<&str> = flat.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "7",
                "big",
                "flavor.name",
                "flavor.vcpus",
                "inf",
                "nan",
                "tags[0]",
                "tags[2]",
                "text_bin",
                "zeta"
            ]
        );
        assert!(flat.contains(&("flavor.name".into(), FlatValue::Text("m1.tiny".into()))));
        assert!(flat.contains(&("tags[2]".into(), FlatValue::Int(1))));
        assert!(flat.contains(&("inf".into(), FlatValue::Text("-Infinity".into()))));
        assert!(flatten(&Value::Array(vec![Value::Int(1)])).is_empty());
    }
}

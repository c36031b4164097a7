//! `Sample::from_value`: the typed fields of real vectors, and an error naming the field for
//! every wrong type.

mod common;

use common::*;
use meter::{verify_signature, CounterType, Sample, SampleError, Value, Volume};
use serde_json::Value as Json;

/// A complete, valid message as ceilometer builds it (vector 0).
fn base() -> Value {
    decode(&ceilometer_vectors()[0])
}

fn with(field: &str, v: Option<Value>) -> Value {
    let Value::Map(mut pairs) = base() else {
        unreachable!()
    };
    let at = pairs.iter().position(|(k, _)| k.as_str() == Some(field));
    match (at, v) {
        (Some(i), Some(v)) => pairs[i].1 = v,
        (Some(i), None) => {
            pairs.remove(i);
        }
        (None, Some(v)) => pairs.push((s(field), v)),
        (None, None) => {}
    }
    Value::Map(pairs)
}

fn json_str(j: &Json) -> Option<String> {
    j.as_str().map(str::to_owned)
}

#[test]
fn vectors_0_to_3_give_the_right_fields() {
    let vectors = ceilometer_vectors();
    for (i, v) in vectors.iter().take(4).enumerate() {
        let j = v.json.as_ref().unwrap();
        let sample = Sample::decode(&v.bytes).unwrap();
        assert_eq!(sample.source, j["source"].as_str().unwrap(), "vector {i}");
        assert_eq!(sample.counter_name, j["counter_name"].as_str().unwrap());
        assert_eq!(
            sample.counter_type.as_str(),
            j["counter_type"].as_str().unwrap()
        );
        assert_eq!(sample.counter_unit, j["counter_unit"].as_str().unwrap());
        assert_eq!(sample.user_id, json_str(&j["user_id"]));
        assert_eq!(sample.project_id, json_str(&j["project_id"]));
        assert_eq!(sample.user_name, None);
        assert_eq!(sample.project_name, None);
        assert_eq!(sample.resource_id, j["resource_id"].as_str().unwrap());
        assert_eq!(sample.timestamp, j["timestamp"].as_str().unwrap());
        assert_eq!(sample.message_id, j["message_id"].as_str().unwrap());
        assert_eq!(sample.message_signature, json_str(&j["message_signature"]));
        assert_eq!(sample.monotonic_time, None);
        assert!(sample.extra.is_empty());
        assert_eq!(
            &sample.resource_metadata.value(),
            decode(v).get("resource_metadata").unwrap()
        );
        assert!(sample.timestamp_utc().is_ok());
    }
    let volumes: Vec<Volume> = vectors
        .iter()
        .take(4)
        .map(|v| Sample::decode(&v.bytes).unwrap().counter_volume)
        .collect();
    assert_eq!(
        volumes,
        [
            Volume::Int(0),
            Volume::Float(1.5),
            Volume::Int(2),
            Volume::Float(4.5)
        ]
    );
    let types: Vec<CounterType> = vectors
        .iter()
        .take(4)
        .map(|v| Sample::decode(&v.bytes).unwrap().counter_type)
        .collect();
    assert_eq!(
        types,
        [
            CounterType::Cumulative,
            CounterType::Gauge,
            CounterType::Delta,
            CounterType::Cumulative
        ]
    );
}

#[test]
fn to_value_round_trips_and_still_verifies() {
    for v in ceilometer_vectors().iter().take(4) {
        let sample = Sample::decode(&v.bytes).unwrap();
        let value = sample.to_value();
        assert!(verify_signature(&value, &v.secret));
        assert_eq!(Sample::from_value(value).unwrap(), sample);
    }
}

#[test]
fn every_required_field_is_named_when_missing() {
    for field in [
        "source",
        "counter_name",
        "counter_type",
        "counter_unit",
        "counter_volume",
        "resource_id",
        "timestamp",
        "message_id",
    ] {
        let e = Sample::from_value(with(field, None)).unwrap_err();
        assert_eq!(e, SampleError::Missing { field });
        assert_eq!(e.to_string(), format!("field \"{field}\": missing"));
        assert_eq!(e.field(), Some(field));
    }
}

#[test]
fn optional_fields_may_be_missing_or_nil() {
    for field in [
        "user_id",
        "project_id",
        "user_name",
        "project_name",
        "resource_metadata",
        "monotonic_time",
        "message_signature",
    ] {
        let sample = Sample::from_value(with(field, None)).unwrap();
        if field == "resource_metadata" {
            assert_eq!(sample.resource_metadata.value(), Value::Map(vec![]));
            assert!(sample.resource_metadata.is_empty());
        }
        if field != "message_signature" {
            let sample = Sample::from_value(with(field, Some(Value::Nil))).unwrap();
            assert_eq!(sample.resource_metadata.value().type_name(), "map");
        }
    }
    let sample = Sample::from_value(with("user_name", Some(s("alice")))).unwrap();
    assert_eq!(sample.user_name.as_deref(), Some("alice"));
    let sample = Sample::from_value(with("monotonic_time", Some(Value::Float(12.5)))).unwrap();
    assert_eq!(sample.monotonic_time, Some(12.5));
    let sample = Sample::from_value(with("monotonic_time", Some(Value::Int(7)))).unwrap();
    assert_eq!(sample.monotonic_time, Some(7.0));
}

#[test]
fn wrong_types_name_the_field() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "source",
            Value::Int(1),
            "field \"source\": expected str, got int",
        ),
        (
            "counter_name",
            Value::Nil,
            "field \"counter_name\": expected str, got nil",
        ),
        (
            "counter_type",
            Value::Bool(true),
            "field \"counter_type\": expected str, got bool",
        ),
        (
            "counter_type",
            s("gaug"),
            "field \"counter_type\": expected gauge, delta or cumulative, got \"gaug\"",
        ),
        (
            "counter_unit",
            Value::Array(vec![]),
            "field \"counter_unit\": expected str, got array",
        ),
        (
            "counter_volume",
            s("1"),
            "field \"counter_volume\": expected int or float, got str",
        ),
        (
            "counter_volume",
            Value::Nil,
            "field \"counter_volume\": expected int or float, got nil",
        ),
        (
            "counter_volume",
            Value::Bool(true),
            "field \"counter_volume\": expected int or float, got bool",
        ),
        (
            "user_id",
            Value::Int(3),
            "field \"user_id\": expected str or nil, got int",
        ),
        (
            "project_id",
            Value::Float(1.0),
            "field \"project_id\": expected str or nil, got float",
        ),
        (
            "user_name",
            Value::Map(vec![]),
            "field \"user_name\": expected str or nil, got map",
        ),
        (
            "project_name",
            Value::Bool(false),
            "field \"project_name\": expected str or nil, got bool",
        ),
        (
            "resource_id",
            Value::Nil,
            "field \"resource_id\": expected str, got nil",
        ),
        (
            "timestamp",
            Value::Int(1_400_000_000),
            "field \"timestamp\": expected str, got int",
        ),
        (
            "resource_metadata",
            s("{}"),
            "field \"resource_metadata\": expected map or nil, got str",
        ),
        (
            "resource_metadata",
            Value::Array(vec![]),
            "field \"resource_metadata\": expected map or nil, got array",
        ),
        (
            "message_id",
            Value::Int(5),
            "field \"message_id\": expected str, got int",
        ),
        (
            "message_signature",
            Value::Nil,
            "field \"message_signature\": expected str, got nil",
        ),
        (
            "monotonic_time",
            s("now"),
            "field \"monotonic_time\": expected float, int or nil, got str",
        ),
        (
            "source",
            Value::Bin(vec![0xff]),
            "field \"source\": bin is not valid UTF-8",
        ),
    ];
    for (field, value, want) in cases {
        let e = Sample::from_value(with(field, Some(value))).unwrap_err();
        assert_eq!(e.to_string(), want);
        assert_eq!(e.field(), Some(field));
    }
}

#[test]
fn bin_strings_from_old_publishers_are_accepted() {
    let sample = Sample::from_value(with(
        "resource_id",
        Some(Value::Bin(b"r\xc3\xa9s".to_vec())),
    ))
    .unwrap();
    assert_eq!(sample.resource_id, "rés");
    let sample =
        Sample::from_value(with("counter_type", Some(Value::Bin(b"delta".to_vec())))).unwrap();
    assert_eq!(sample.counter_type, CounterType::Delta);
    let sample = Sample::from_value(with("user_id", Some(Value::Bin(b"u".to_vec())))).unwrap();
    assert_eq!(sample.user_id.as_deref(), Some("u"));
}

#[test]
fn huge_unsigned_volume_becomes_a_float() {
    let sample = Sample::from_value(with("counter_volume", Some(Value::UInt(u64::MAX)))).unwrap();
    assert_eq!(sample.counter_volume, Volume::Float(u64::MAX as f64));
    let sample = Sample::from_value(with("counter_volume", Some(Value::Int(i64::MIN)))).unwrap();
    assert_eq!(sample.counter_volume, Volume::Int(i64::MIN));
}

#[test]
fn every_vector_s_metadata_is_taken_back_from_its_bytes() {
    // How one worker hands a sample's metadata to another (collector::relay): the bytes, checked.
    let samples: Vec<Sample> = ceilometer_vectors()
        .iter()
        .filter_map(|v| Sample::decode(&v.bytes).ok())
        .collect();
    assert!(samples.len() >= 4, "{} vectors are samples", samples.len());
    for sample in samples {
        let m = &sample.resource_metadata;
        assert_eq!(meter::Metadata::from_encoded(m.as_bytes()).as_ref(), Ok(m));
    }
}

#[test]
fn unknown_fields_are_kept_in_order() {
    let m = with("zeta", Some(Value::Int(1)));
    let Value::Map(mut pairs) = m else {
        unreachable!()
    };
    pairs.push((s("alpha"), Value::Nil));
    let sample = Sample::from_value(Value::Map(pairs)).unwrap();
    assert_eq!(
        sample.extra,
        vec![
            ("zeta".to_owned(), Value::Int(1)),
            ("alpha".to_owned(), Value::Nil)
        ]
    );
}

#[test]
fn malformed_maps_are_refused() {
    let e = Sample::from_value(Value::Array(vec![])).unwrap_err();
    assert_eq!(e.to_string(), "a sample must be a map, got array");

    let Value::Map(mut pairs) = base() else {
        unreachable!()
    };
    pairs.insert(2, (Value::Int(7), Value::Nil));
    let e = Sample::from_value(Value::Map(pairs)).unwrap_err();
    assert_eq!(e.to_string(), "top-level key #2 is int, expected str");

    let Value::Map(mut pairs) = base() else {
        unreachable!()
    };
    pairs.insert(0, (Value::Bin(b"source".to_vec()), s("x")));
    assert!(matches!(
        Sample::from_value(Value::Map(pairs)),
        Err(SampleError::NonStringKey {
            index: 0,
            got: "bin"
        })
    ));

    for dup in ["counter_volume", "custom"] {
        let Value::Map(mut pairs) = with("custom", Some(Value::Nil)) else {
            unreachable!()
        };
        pairs.push((s(dup), Value::Int(1)));
        let e = Sample::from_value(Value::Map(pairs)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("field \"{dup}\": appears more than once")
        );
    }

    let e = Sample::decode(&[0x81, 0xa1]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "undecodable msgpack: truncated: the buffer ends inside a msgpack value"
    );
    let e = Sample::decode(&[0x81, 0xa1, b'k', 0xa1, 0xff]).unwrap_err();
    assert_eq!(e.field(), Some("k"));
}

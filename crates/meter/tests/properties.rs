//! Property tests: the decoder survives any bytes, and signing round-trips for any metadata.

mod common;

use common::*;
use meter::encode::to_msgpack;
use meter::{
    decode_value, read_value, sign, try_compute_signature, verify_signature, Limits, Sample,
    SigningKey, Value,
};
use proptest::prelude::*;

/// Characters that stress Python's repr: quotes, backslash, controls, non-printables, astral.
fn nasty_string() -> impl Strategy<Value = String> {
    let chars = prop::sample::select(vec![
        'a',
        'Z',
        ' ',
        '\'',
        '"',
        '\\',
        '\t',
        '\n',
        '\r',
        '\0',
        '\u{1f}',
        '\u{7f}',
        '\u{80}',
        '\u{a0}',
        '\u{ad}',
        'é',
        '\u{378}',
        '\u{2028}',
        '\u{200b}',
        '✓',
        '\u{feff}',
        '😀',
        '\u{e0001}',
        '\u{10ffff}',
        ':',
    ]);
    prop_oneof![
        prop::collection::vec(chars, 0..8).prop_map(|v| v.into_iter().collect()),
        any::<String>(),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(Value::UInt),
        any::<f64>().prop_map(Value::Float),
        prop::sample::select(vec![
            0.0,
            -0.0,
            1e16,
            1e-5,
            f64::NAN,
            f64::INFINITY,
            -f64::INFINITY
        ])
        .prop_map(Value::Float),
        nasty_string().prop_map(Value::Str),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bin),
        nasty_string().prop_map(|s| Value::Bin(s.into_bytes())),
    ]
}

fn tree() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(nasty_string(), inner, 0..6)
                .prop_map(|m| Value::Map(m.into_iter().map(|(k, v)| (Value::Str(k), v)).collect())),
        ]
    })
}

fn message(metadata: Value, extra: Value) -> Value {
    let metadata = match metadata {
        m @ Value::Map(_) => m,
        other => map(vec![("value", other)]),
    };
    let Value::Map(mut pairs) = decode(&ceilometer_vectors()[0]) else {
        unreachable!()
    };
    pairs.retain(|(k, _)| k.as_str() != Some("message_signature"));
    for (k, v) in &mut pairs {
        if k.as_str() == Some("resource_metadata") {
            *v = metadata.clone();
        }
    }
    pairs.push((s("extra_field"), extra));
    Value::Map(pairs)
}

/// Reverse every map's entry order, recursively: the signature must not care.
fn reorder(v: &Value) -> Value {
    match v {
        Value::Map(pairs) => Value::Map(
            pairs
                .iter()
                .rev()
                .map(|(k, v)| (reorder(k), reorder(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(reorder).collect()),
        other => other.clone(),
    }
}

fn exercise(bytes: &[u8]) {
    let key = SigningKey::new("k");
    for limits in [
        Limits::default(),
        Limits {
            max_depth: 3,
            max_bytes: Some(64),
        },
    ] {
        if let Ok((v, n)) = read_value(bytes, &limits) {
            assert!(n <= bytes.len());
            // Whatever decodes re-encodes to something that decodes to the same thing.
            let again = to_msgpack(&v);
            assert_eq!(to_msgpack(&decode_value(&again).unwrap()), again);
            let _ = key.verify(&v);
            let _ = key.compute(&v);
            let _ = Sample::from_value(v);
        }
    }
    let _ = Sample::decode(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_mutated_samples(
        which in 0usize..11,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
    ) {
        let mut bytes = ceilometer_vectors()[which].bytes.clone();
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                2 => { bytes.remove(i); }
                _ => bytes.truncate(i),
            }
        }
        exercise(&bytes);
    }

    #[test]
    fn sign_then_verify_round_trips(
        metadata in tree(),
        extra in tree(),
        secret in "\\PC{1,16}",
    ) {
        let mut m = message(metadata, extra);
        let signable = try_compute_signature(&m, &secret).is_ok();
        sign(&mut m, &secret);
        prop_assert_eq!(verify_signature(&m, &secret), signable);
        prop_assert!(verify_signature(&m, ""));
        if signable {
            // Through the wire and back, and in any map order, it still verifies.
            let wire = decode_value(&to_msgpack(&m)).unwrap();
            prop_assert!(verify_signature(&wire, &secret));
            prop_assert!(verify_signature(&reorder(&m), &secret));
            let other_secret = secret.clone() + "x";
            prop_assert!(!verify_signature(&m, &other_secret));
            // And the same number as the other numeric type does not.
            let Value::Map(mut pairs) = m.clone() else { unreachable!() };
            for (k, v) in &mut pairs {
                if k.as_str() == Some("counter_volume") {
                    *v = Value::Float(0.0);
                }
            }
            prop_assert!(!verify_signature(&Value::Map(pairs), &secret));
        }
    }

    #[test]
    fn encode_decode_round_trips(v in tree()) {
        let bytes = to_msgpack(&v);
        let (back, n) = read_value(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(to_msgpack(&back), bytes);
    }
}

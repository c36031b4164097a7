//! Property tests: the decoder survives any bytes, and signing round-trips for any metadata.

mod common;

use common::*;
use meter::encode::to_msgpack;
use meter::{
    decode_value, decode_value_ref, read_value, sign, try_compute_signature, verify_signature,
    Limits, Sample, SigningKey, Value,
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
    same_through_borrowed_decode(&key, bytes);
}

/// The borrowing decoder (the daemon's receive path) agrees with the owning one on any bytes:
/// the same value or the same error, the same signature verdict, the same sample or error.
fn same_through_borrowed_decode(key: &SigningKey, bytes: &[u8]) {
    match (decode_value(bytes), decode_value_ref(bytes)) {
        (Ok(owned), Ok(borrowed)) => {
            // Compared as bytes: floats by their bits, as the encoder writes them.
            assert_eq!(to_msgpack(&owned), to_msgpack(&borrowed));
            assert_eq!(key.verify(&owned), key.verify(&borrowed));
            let (a, b) = (Sample::from_value(owned), Sample::from_value(borrowed));
            match (&a, &b) {
                (Ok(x), Ok(y)) => {
                    assert_eq!(to_msgpack(&x.to_value()), to_msgpack(&y.to_value()));
                    // The metadata's bytes too.
                    assert_eq!(x.resource_metadata, y.resource_metadata);
                }
                _ => assert_eq!(a, b),
            }
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("owned {a:?} but borrowed {b:?}"),
    }
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

    /// How one worker hands metadata to another: its encoding is taken back as it was, and
    /// bytes that are taken back are exactly the encoding of what they decode to (so equal
    /// metadata stay equal bytes); nothing panics.
    #[test]
    fn metadata_bytes_are_taken_back_only_in_the_encoder_s_form(
        metadata in tree(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let tree = match metadata {
            m @ Value::Map(_) => m,
            other => map(vec![("value", other)]),
        };
        let m = meter::Metadata::from_value(&tree);
        prop_assert_eq!(meter::Metadata::from_encoded(m.as_bytes()), Ok(m.clone()));
        let mut bytes = m.as_bytes().to_vec();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(back) = meter::Metadata::from_encoded(&bytes) {
            prop_assert_eq!(to_msgpack(&back.value()), bytes);
        }
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
            let bytes = to_msgpack(&m);
            let wire = decode_value(&bytes).unwrap();
            prop_assert!(verify_signature(&wire, &secret));
            // As the daemon receives it: strings borrowed from the datagram.
            let key = SigningKey::new(&secret);
            let borrowed = decode_value_ref(&bytes).unwrap();
            prop_assert!(key.verify(&borrowed));
            let (x, y) = (Sample::from_value(wire.clone()), Sample::from_value(borrowed));
            prop_assert_eq!(x.map(|s| to_msgpack(&s.to_value())), y.map(|s| to_msgpack(&s.to_value())));
            same_through_borrowed_decode(&key, &bytes);
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
        same_through_borrowed_decode(&SigningKey::new("k"), &bytes);
        let (back, n) = read_value(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(to_msgpack(&back), bytes);
    }

    #[test]
    fn remembered_key_orders_sign_as_fresh_sorting_does(a in tree(), b in tree(), secret in "[a-z]{1,8}") {
        // A thread of its own starts with nothing remembered.
        let fresh = |v: &Value| {
            let (v, secret) = (v.clone(), secret.clone());
            std::thread::spawn(move || {
                (meter::signature::signing_input(&v), meter::compute_signature(&v, &secret))
            })
            .join()
            .unwrap()
        };
        let wrap = |v: &Value| match v {
            m @ Value::Map(_) => m.clone(),
            other => map(vec![("value", other.clone())]),
        };
        let (a, b) = (wrap(&a), wrap(&b));
        // The same keys in another wire order: a remembered order must not be applied to it.
        let mut c = a.clone();
        if let Value::Map(pairs) = &mut c {
            pairs.reverse();
        }
        let (fresh_a, fresh_b, fresh_c) = (fresh(&a), fresh(&b), fresh(&c));
        // Here, each message's orders are remembered from the one before: a after a, b after
        // a, a after b, c after a, and a again.
        let runs = [(&a, &fresh_a), (&a, &fresh_a), (&b, &fresh_b), (&a, &fresh_a), (&c, &fresh_c), (&a, &fresh_a)];
        for (v, want) in runs {
            let got = (meter::signature::signing_input(v), meter::compute_signature(v, &secret));
            prop_assert_eq!(&got, want);
        }
    }

    #[test]
    fn metadata_round_trips_and_finds_nul_characters_from_its_bytes(v in tree()) {
        let m = meter::Metadata::from_value(&v);
        prop_assert_eq!(to_msgpack(&m.value()), to_msgpack(&v));
        prop_assert_eq!(m.has_nul(), tree_has_nul(&v));
    }

    #[test]
    fn the_encoder_lays_out_bytes_as_rmp_does(v in tree(), ints in prop::collection::vec(edge_int(), 0..8)) {
        prop_assert_eq!(to_msgpack(&v), reference_encode(&v));
        let ints = Value::Array(ints);
        prop_assert_eq!(to_msgpack(&ints), reference_encode(&ints));
    }
}

/// A str, or bin that is UTF-8, holding NUL anywhere in the tree (keys included).
fn tree_has_nul(v: &Value) -> bool {
    match v {
        Value::Str(s) => s.contains('\0'),
        Value::Bin(b) => std::str::from_utf8(b).is_ok_and(|s| s.contains('\0')),
        Value::Array(items) => items.iter().any(tree_has_nul),
        Value::Map(pairs) => pairs
            .iter()
            .any(|(k, v)| tree_has_nul(k) || tree_has_nul(v)),
        _ => false,
    }
}

/// Integers at and around every boundary between msgpack's integer encodings.
fn edge_int() -> impl Strategy<Value = Value> {
    let edges: Vec<i64> = [
        0i64,
        31,
        32,
        127,
        128,
        255,
        256,
        65_535,
        65_536,
        4_294_967_295,
    ]
    .iter()
    .flat_map(|&e| [e, e + 1, -e, -e - 1])
    .chain([
        i64::MIN,
        i64::MAX,
        -2_147_483_648,
        -2_147_483_649,
        -32_768,
        -32_769,
    ])
    .collect();
    prop_oneof![
        prop::sample::select(edges).prop_map(Value::Int),
        any::<i16>().prop_map(|i| Value::Int(i.into())),
        ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(Value::UInt),
    ]
}

/// The encoding as `rmp::encode` writes it (what `meter::encode` used before it was written by
/// hand; kept here as the reference).
fn reference_encode(value: &Value) -> Vec<u8> {
    use rmp::encode as e;
    fn go(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Nil => e::write_nil(out).unwrap(),
            Value::Bool(b) => e::write_bool(out, *b).unwrap(),
            Value::Int(i) => {
                e::write_sint(out, *i).unwrap();
            }
            Value::UInt(u) => {
                e::write_uint(out, *u).unwrap();
            }
            Value::Float(f) => e::write_f64(out, *f).unwrap(),
            Value::Str(s) => e::write_str(out, s).unwrap(),
            Value::Bin(b) => e::write_bin(out, b).unwrap(),
            Value::Array(items) => {
                e::write_array_len(out, items.len() as u32).unwrap();
                items.iter().for_each(|i| go(i, out));
            }
            Value::Map(pairs) => {
                e::write_map_len(out, pairs.len() as u32).unwrap();
                for (k, v) in pairs {
                    go(k, out);
                    go(v, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    go(value, &mut out);
    out
}

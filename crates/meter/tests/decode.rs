//! The msgpack decoder: every type, streaming prefixes, hostile lengths and depths, and the
//! wording of its errors.

mod common;

use common::*;
use meter::decode::{decode_value_with, MAX_DEPTH_CEILING};
use meter::encode::to_msgpack;
use meter::{decode_value, read_value, DecodeError, Limits, Node, Value};

fn dec(bytes: &[u8]) -> Result<Value, DecodeError> {
    decode_value(bytes)
}

#[test]
fn scalars_keep_their_msgpack_type() {
    let cases: Vec<(&[u8], Value)> = vec![
        (&[0xc0], Value::Nil),
        (&[0xc2], Value::Bool(false)),
        (&[0xc3], Value::Bool(true)),
        (&[0x00], Value::Int(0)),
        (&[0x7f], Value::Int(127)),
        (&[0xff], Value::Int(-1)),
        (&[0xe0], Value::Int(-32)),
        (&[0xcc, 0xff], Value::Int(255)),
        (&[0xcd, 0x01, 0x00], Value::Int(256)),
        (&[0xce, 0xff, 0xff, 0xff, 0xff], Value::Int(u32::MAX as i64)),
        (
            &[0xcf, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            Value::Int(i64::MAX),
        ),
        (&[0xcf, 0x80, 0, 0, 0, 0, 0, 0, 0], Value::UInt(1 << 63)),
        (
            &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            Value::UInt(u64::MAX),
        ),
        (&[0xd0, 0x80], Value::Int(-128)),
        (&[0xd1, 0x80, 0x00], Value::Int(-32768)),
        (&[0xd2, 0x80, 0, 0, 0], Value::Int(i32::MIN as i64)),
        (&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], Value::Int(i64::MIN)),
        // float32 0.1 widened exactly, as Python does.
        (
            &[0xca, 0x3d, 0xcc, 0xcc, 0xcd],
            Value::Float(f64::from(0.1f32)),
        ),
        (&[0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0], Value::Float(1.5)),
        (&[0xcb, 0, 0, 0, 0, 0, 0, 0, 0], Value::Float(0.0)),
        (&[0xa0], s("")),
        (&[0xa2, b'h', b'i'], s("hi")),
        (&[0xd9, 2, 0xc3, 0xbc], s("ü")),
        (&[0xda, 0, 1, b'x'], s("x")),
        (&[0xdb, 0, 0, 0, 1, b'x'], s("x")),
        (&[0xc4, 2, 0xff, 0x00], Value::Bin(vec![0xff, 0])),
        (&[0xc5, 0, 0], Value::Bin(vec![])),
        (&[0xc6, 0, 0, 0, 1, 7], Value::Bin(vec![7])),
        (&[0x90], Value::Array(vec![])),
        (
            &[0x92, 0x01, 0xa1, b'a'],
            Value::Array(vec![Value::Int(1), s("a")]),
        ),
        (&[0xdc, 0, 1, 0xc0], Value::Array(vec![Value::Nil])),
        (&[0xdd, 0, 0, 0, 1, 0xc0], Value::Array(vec![Value::Nil])),
        (&[0x80], Value::Map(vec![])),
        (
            &[0x81, 0x01, 0x02],
            Value::Map(vec![(Value::Int(1), Value::Int(2))]),
        ),
        (
            &[0xde, 0, 1, 0xa1, b'k', 0xc0],
            map(vec![("k", Value::Nil)]),
        ),
        (
            &[0xdf, 0, 0, 0, 1, 0xa1, b'k', 0xc0],
            map(vec![("k", Value::Nil)]),
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(dec(bytes), Ok(want.clone()), "{bytes:02x?}");
        // And the encoder writes something that decodes back to the same value.
        assert_eq!(dec(&to_msgpack(&want)), Ok(want), "{bytes:02x?}");
    }
}

#[test]
fn encoder_matches_python_msgpack_bytes() {
    // Re-encoding what ceilometer sent gives back its exact bytes.
    for v in ceilometer_vectors() {
        assert_eq!(to_msgpack(&decode(&v)), v.bytes);
    }
}

#[test]
fn every_strict_prefix_is_incomplete() {
    for v in ceilometer_vectors()
        .iter()
        .chain(reference_vectors().iter().take(40))
    {
        for k in 0..v.bytes.len() {
            assert_eq!(
                read_value(&v.bytes[..k], &Limits::default()).map(|_| ()),
                Err(DecodeError::Incomplete),
                "prefix {k} of {}",
                v.bytes.len()
            );
        }
    }
}

#[test]
fn read_value_reports_consumed_bytes_of_a_stream() {
    let vectors = ceilometer_vectors();
    let mut stream = vectors[0].bytes.clone();
    stream.extend_from_slice(&vectors[1].bytes);
    stream.extend_from_slice(&vectors[2].bytes[..10]);
    let limits = Limits::default();
    let (first, n1) = read_value(&stream, &limits).unwrap();
    assert_eq!(n1, vectors[0].bytes.len());
    assert_eq!(first, decode(&vectors[0]));
    let (second, n2) = read_value(&stream[n1..], &limits).unwrap();
    assert_eq!(n2, vectors[1].bytes.len());
    assert_eq!(second, decode(&vectors[1]));
    assert_eq!(
        read_value(&stream[n1 + n2..], &limits),
        Err(DecodeError::Incomplete)
    );
    assert_eq!(read_value(&[], &limits), Err(DecodeError::Incomplete));
}

#[test]
fn trailing_bytes_in_a_datagram_are_an_error() {
    let e = dec(&[0xc0, 0xc0, 0xc0]).unwrap_err();
    assert_eq!(
        e,
        DecodeError::TrailingBytes {
            consumed: 1,
            total: 3
        }
    );
    assert_eq!(
        e.to_string(),
        "2 trailing bytes after a 1-byte msgpack value"
    );
}

#[test]
fn claimed_lengths_are_not_trusted() {
    // Each of these claims ~4 GiB (or 2^32 entries) with a handful of bytes behind it. Reserving
    // on the claim would abort the process; the decoder must just ask for more bytes.
    let hostile: &[&[u8]] = &[
        &[0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0, 0xc0],
        &[0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0, 0xc0],
        &[0xdb, 0xff, 0xff, 0xff, 0xff, b'a', b'b', b'c'],
        &[0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        &[0x91, 0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0],
        &[0xdc, 0xff, 0xff, 0xc0],
        &[0xde, 0xff, 0xff, 0xc0, 0xc0],
    ];
    for bytes in hostile {
        assert_eq!(dec(bytes), Err(DecodeError::Incomplete), "{bytes:02x?}");
        // With a byte limit the answer is final: the value can never fit.
        let limits = Limits {
            max_bytes: Some(65_536),
            ..Limits::default()
        };
        match decode_value_with(bytes, &limits) {
            Err(DecodeError::TooLarge {
                needed,
                max_bytes: 65_536,
                ..
            }) => assert!(needed > 65_536),
            other => panic!("{bytes:02x?}: {other:?}"),
        }
    }
}

#[test]
fn max_bytes_bounds_the_whole_value() {
    let v = &ceilometer_vectors()[0];
    let len = v.bytes.len();
    let exact = Limits {
        max_bytes: Some(len),
        ..Limits::default()
    };
    assert!(decode_value_with(&v.bytes, &exact).is_ok());
    let short = Limits {
        max_bytes: Some(len - 1),
        ..Limits::default()
    };
    let e = decode_value_with(&v.bytes, &short).unwrap_err();
    assert!(matches!(e, DecodeError::TooLarge { .. }), "{e:?}");
    // Over the limit is known before the rest of the value has arrived.
    assert!(matches!(
        read_value(&v.bytes[..len - 1], &short),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn deep_nesting_is_a_clean_error() {
    for opener in [&[0x91u8][..], &[0x81, 0xa1, b'k'][..]] {
        let bytes: Vec<u8> = opener
            .iter()
            .copied()
            .cycle()
            .take(opener.len() * 100_000)
            .collect();
        let e = dec(&bytes).unwrap_err();
        assert!(
            matches!(e, DecodeError::TooDeep { max_depth: 64, .. }),
            "{e:?}"
        );
        // Even a caller asking for "no limit" gets the hard ceiling, not a stack overflow.
        let limits = Limits {
            max_depth: usize::MAX,
            max_bytes: None,
        };
        let e = decode_value_with(&bytes, &limits).unwrap_err();
        assert!(
            matches!(
                e,
                DecodeError::TooDeep {
                    max_depth: MAX_DEPTH_CEILING,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    // Exactly max_depth levels is fine.
    let mut bytes = vec![0x91; 64];
    bytes.push(0xc0);
    assert!(dec(&bytes).is_ok());
    bytes.insert(0, 0x91);
    assert!(dec(&bytes).is_err());
    let e = dec(&[0x81, 0xa1, b'a', 0x81, 0xa1, b'b', 0x91, 0xc0]);
    assert!(decode_value_with(
        &[0x81, 0xa1, b'a', 0x81, 0xa1, b'b', 0x91, 0xc0],
        &Limits {
            max_depth: 2,
            max_bytes: None
        }
    )
    .unwrap_err()
    .to_string()
    .starts_with("field \"a:b\": nesting deeper than 2 levels"));
    assert!(e.is_ok());
}

#[test]
fn errors_name_the_path() {
    // {"resource_metadata": {"tags": ["ok", <str with invalid UTF-8>]}}
    let mut bytes = vec![0x81, 0xb1];
    bytes.extend_from_slice(b"resource_metadata");
    bytes.extend_from_slice(&[0x81, 0xa4]);
    bytes.extend_from_slice(b"tags");
    bytes.extend_from_slice(&[0x92, 0xa2, b'o', b'k', 0xa2, b'a', 0xff]);
    let e = dec(&bytes).unwrap_err();
    assert_eq!(e.path(), "resource_metadata:tags[1]");
    assert_eq!(
        e.to_string(),
        "field \"resource_metadata:tags[1]\": invalid UTF-8 in str (valid up to byte 1)"
    );

    let e = dec(&[0xa1, 0xc3]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "top level: invalid UTF-8 in str (valid up to byte 0)"
    );

    let e = dec(&[0x82, 0xa1, b'a', 0xc0, 0xd9, 1, 0x80, 0xc0]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field \"<key #1>\": invalid UTF-8 in str (valid up to byte 0)"
    );

    let e = dec(&[0x81, 0xa1, b't', 0xd6, 0xff, 0, 0, 0, 0]).unwrap_err();
    assert_eq!(
        e,
        DecodeError::Ext {
            path: "t".into(),
            type_id: Some(-1)
        }
    );
    assert_eq!(e.to_string(), "field \"t\": ext type -1 is not supported");
    let e = dec(&[0x91, 0xc7, 1, 5, 0]).unwrap_err();
    assert_eq!(e.to_string(), "field \"[0]\": ext type 5 is not supported");

    let e = dec(&[0x81, 0x01, 0xc1]).unwrap_err();
    assert_eq!(e.to_string(), "field \"1\": reserved marker byte 0xc1");

    assert_eq!(
        DecodeError::Incomplete.to_string(),
        "truncated: the buffer ends inside a msgpack value"
    );
}

#[test]
fn deepest_allowed_value_can_be_signed_encoded_and_dropped_on_a_small_stack() {
    let n = MAX_DEPTH_CEILING - 1;
    let mut bytes = [0x81, 0xa1, b'k'].repeat(n);
    bytes.extend_from_slice(&[0x91, 0xc0]);
    let limits = Limits {
        max_depth: MAX_DEPTH_CEILING,
        max_bytes: None,
    };
    let worker = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || {
            let v = decode_value_with(&bytes, &limits).unwrap();
            let sig = meter::compute_signature(&v, "secret");
            assert_eq!(sig.len(), 64);
            assert_eq!(to_msgpack(&v), bytes);
            drop(v);
        })
        .unwrap();
    worker.join().unwrap();
}

/// A str of `s`'s bytes as msgpack (str 8 header).
fn str8(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0xd9, s.len() as u8];
    out.extend_from_slice(s);
    out
}

#[test]
fn strs_are_utf8_checked_at_every_length_and_position() {
    // ASCII strs take a word-at-a-time path, the rest full validation: both must agree with
    // the standard library on every length around a word and wherever the odd byte sits.
    let odd: [&[u8]; 5] = [
        "é".as_bytes(),
        "日".as_bytes(),
        "😀".as_bytes(),
        &[0xff],
        &[0xe6, 0x97], // a truncated 3-byte sequence
    ];
    for len in 0..40 {
        let ascii: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let bytes = str8(&ascii);
        let want = Value::Str(String::from_utf8(ascii.clone()).unwrap());
        assert_eq!(dec(&bytes), Ok(want), "ascii of {len}");
        assert_eq!(
            meter::decode::decode_value_ref(&bytes),
            Ok(meter::ValueRef::Str(std::str::from_utf8(&ascii).unwrap()))
        );
        for at in 0..=len {
            for o in odd {
                let mut s = ascii.clone();
                s.splice(at..at, o.iter().copied());
                let bytes = str8(&s);
                let got = dec(&bytes);
                let got_ref = meter::decode::decode_value_ref(&bytes).map(|v| v.to_value());
                match std::str::from_utf8(&s) {
                    Ok(text) => {
                        assert_eq!(got, Ok(Value::Str(text.to_string())), "{s:02x?}");
                        assert_eq!(got_ref, Ok(Value::Str(text.to_string())), "{s:02x?}");
                    }
                    Err(e) => {
                        let want = Err(DecodeError::InvalidUtf8 {
                            path: String::new(),
                            valid_up_to: e.valid_up_to(),
                        });
                        assert_eq!(got, want, "{s:02x?}");
                        assert_eq!(got_ref, want, "{s:02x?}");
                    }
                }
            }
        }
    }
}

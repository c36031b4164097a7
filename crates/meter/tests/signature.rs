//! Signatures against the vectors real ceilometer produced, a Python model's awkward vectors,
//! and exhaustive single-change mutations.

mod common;

use common::*;
use meter::signature::signing_input;
use meter::{
    compute_signature, sign, try_compute_signature, verify_signature, SignatureError, SigningKey,
    Value,
};

#[test]
fn every_ceilometer_vector_verifies() {
    let vectors = ceilometer_vectors();
    assert_eq!(vectors.len(), 11);
    for (i, v) in vectors.iter().enumerate() {
        let m = decode(v);
        let want = v.signature.as_deref().unwrap();
        assert_eq!(compute_signature(&m, &v.secret), want, "vector {i}");
        assert_eq!(
            try_compute_signature(&m, &v.secret).as_deref(),
            Ok(want),
            "vector {i}"
        );
        assert!(verify_signature(&m, &v.secret), "vector {i}");
        assert!(SigningKey::new(&v.secret).verify(&m), "vector {i}");
    }
}

#[test]
fn every_reference_vector_matches_python() {
    let vectors = reference_vectors();
    assert!(vectors.len() >= 100);
    let mut unsignable = 0;
    for (i, v) in vectors.iter().enumerate() {
        let m = decode(v);
        match &v.signature {
            Some(want) => {
                assert_eq!(
                    try_compute_signature(&m, &v.secret).as_deref(),
                    Ok(want.as_str()),
                    "vector {i}: {m:?}"
                );
                assert!(verify_signature(&m, &v.secret), "vector {i}");
            }
            None => {
                unsignable += 1;
                assert!(
                    try_compute_signature(&m, &v.secret).is_err(),
                    "vector {i}: {m:?}"
                );
                assert!(!verify_signature(&m, &v.secret), "vector {i}");
            }
        }
    }
    assert!(
        unsignable > 0,
        "the generator should cover messages Python cannot sign"
    );
}

#[test]
fn floats_render_like_python_repr() {
    for (f, want) in reference_floats() {
        let m = map(vec![("f", Value::Float(f))]);
        let got = String::from_utf8(signing_input(&m).unwrap()).unwrap();
        assert_eq!(got, format!("f{want}"), "bits {:016x}", f.to_bits());
    }
}

#[test]
fn signing_input_matches_readme_examples() {
    let m = map(vec![
        ("z", Value::Int(1)),
        ("message_signature", s("ignored")),
        (
            "m",
            map(vec![
                ("b", map(vec![("c", Value::Nil)])),
                ("a", Value::Bool(true)),
                ("e", Value::Map(vec![])),
            ]),
        ),
        (
            "l",
            Value::Array(vec![
                s("a"),
                s("ü"),
                Value::Int(0),
                map(vec![("k", s("v"))]),
                Value::Bin(b"x'".to_vec()),
            ]),
        ),
        (
            "f",
            Value::Array(vec![
                Value::Float(1e-5),
                Value::Float(1e16),
                Value::Float(-0.0),
            ]),
        ),
        ("b", Value::Bin(b"it's".to_vec())),
    ]);
    let got = String::from_utf8(signing_input(&m).unwrap()).unwrap();
    assert_eq!(
        got,
        "bb\"it's\"\
         f[1e-05, 1e+16, -0.0]\
         l[b'a', b'\\xc3\\xbc', 0, {b'k': b'v'}, \"x'\"]\
         m:aTrue\
         m:b:cNone\
         z1"
    );
}

#[test]
fn empty_secret_disables_signing() {
    let v = &ceilometer_vectors()[10];
    assert_eq!(v.secret, "");
    let m = decode(v);
    assert_eq!(compute_signature(&m, ""), "");
    assert!(verify_signature(&m, ""));
    assert!(verify_signature(&Value::Nil, ""));
    let mut forged = m.clone();
    sign(&mut forged, "");
    assert_eq!(forged.get("message_signature"), Some(&s("")));
}

#[test]
fn sign_then_verify_and_replace() {
    let mut m = decode(&ceilometer_vectors()[0]);
    let original = m.clone();
    sign(&mut m, "other secret");
    assert!(verify_signature(&m, "other secret"));
    assert!(!verify_signature(&m, "change this for valid signing"));
    sign(&mut m, "change this for valid signing");
    assert_eq!(m, original, "re-signing replaces the field in place");
}

#[test]
fn bad_claimed_signatures_fail() {
    let secret = "change this for valid signing";
    let m = decode(&ceilometer_vectors()[1]);
    let good = m
        .get("message_signature")
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    let with_sig = |sig: Option<Value>| {
        let Value::Map(mut pairs) = m.clone() else {
            unreachable!()
        };
        pairs.retain(|(k, _)| k.as_str() != Some("message_signature"));
        if let Some(sig) = sig {
            pairs.push((s("message_signature"), sig));
        }
        Value::Map(pairs)
    };
    assert!(verify_signature(&with_sig(Some(s(&good))), secret));
    // Python compares bytes signatures as they are.
    assert!(verify_signature(
        &with_sig(Some(Value::Bin(good.clone().into_bytes()))),
        secret
    ));
    assert!(!verify_signature(&with_sig(None), secret));
    assert!(!verify_signature(&with_sig(Some(s(""))), secret));
    assert!(!verify_signature(&with_sig(Some(Value::Nil)), secret));
    assert!(!verify_signature(
        &with_sig(Some(s(&good.to_uppercase()))),
        secret
    ));
    assert!(!verify_signature(&with_sig(Some(s(&good[..63]))), secret));
    assert!(!verify_signature(
        &with_sig(Some(s(&format!("{good}0")))),
        secret
    ));
    let mut nonascii = good.clone();
    nonascii.replace_range(0..1, "é");
    assert!(!verify_signature(&with_sig(Some(s(&nonascii))), secret));
    assert!(!verify_signature(&Value::Array(vec![]), secret));
}

#[test]
fn messages_ceilometer_cannot_sign_never_verify() {
    let secret = "k";
    let check = |m: Value, expect: fn(&SignatureError) -> bool| {
        let err = try_compute_signature(&m, secret).unwrap_err();
        assert!(expect(&err), "{err}");
        // Even carrying the lenient signature, it must not verify.
        let mut m = m;
        sign(&mut m, secret);
        assert!(!verify_signature(&m, secret), "{m:?}");
    };
    // A shadowed duplicate could smuggle a value past the signature: refuse.
    check(
        map(vec![
            ("counter_volume", Value::Int(9)),
            ("counter_volume", Value::Int(1)),
        ]),
        |e| matches!(e, SignatureError::DuplicateKey { key, .. } if key == "counter_volume"),
    );
    check(
        map(vec![("m", map(vec![("a", Value::Nil), ("a", Value::Nil)]))]),
        |e| matches!(e, SignatureError::DuplicateKey { path, .. } if path == "m"),
    );
    check(
        map(vec![(
            "m",
            Value::Map(vec![
                (s("a"), Value::Nil),
                (Value::Bin(b"b".to_vec()), Value::Nil),
            ]),
        )]),
        |e| matches!(e, SignatureError::MixedKeys { path, found: "bin" } if path == "m"),
    );
    check(
        map(vec![("m", Value::Map(vec![(Value::Int(1), Value::Nil)]))]),
        |e| matches!(e, SignatureError::MixedKeys { found: "int", .. }),
    );
    check(
        map(vec![(
            "m",
            map(vec![("l", Value::Array(vec![Value::Bin(vec![0xff])]))]),
        )]),
        |e| matches!(e, SignatureError::BinNotUtf8 { path } if path == "m:l"),
    );
    assert_eq!(
        try_compute_signature(&Value::Int(1), secret),
        Err(SignatureError::NotAMap { got: "int" })
    );
}

#[test]
fn error_messages_name_the_field() {
    let m = map(vec![(
        "resource_metadata",
        map(vec![("tags", Value::Array(vec![Value::Bin(vec![0xc3])]))]),
    )]);
    let e = try_compute_signature(&m, "k").unwrap_err();
    assert_eq!(
        e.to_string(),
        "field \"resource_metadata:tags\": bin inside an array is not UTF-8"
    );
}

/// A way to change one node of a message.
#[derive(Debug, Clone, Copy)]
enum Step {
    Key(usize),
    Index(usize),
}

fn node_mut<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    let mut cur = v;
    for step in path {
        cur = match (cur, step) {
            (Value::Map(p), Step::Key(i)) => &mut p[*i].1,
            (Value::Array(a), Step::Index(i)) => &mut a[*i],
            _ => unreachable!(),
        };
    }
    cur
}

fn all_paths(v: &Value, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(path.clone());
    match v {
        Value::Map(pairs) => {
            for (i, (k, child)) in pairs.iter().enumerate() {
                if path.is_empty() && k.as_str() == Some("message_signature") {
                    continue;
                }
                path.push(Step::Key(i));
                all_paths(child, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                path.push(Step::Index(i));
                all_paths(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Every change a single node can take that ceilometer's signature must notice.
fn mutations(v: &Value) -> Vec<Value> {
    match v {
        Value::Nil => vec![Value::Bool(false), Value::Int(0)],
        Value::Bool(b) => vec![Value::Bool(!b)],
        Value::Int(i) => vec![Value::Int(i.wrapping_add(1)), Value::Float(*i as f64)],
        Value::UInt(u) => vec![Value::UInt(u - 1), Value::Float(*u as f64)],
        Value::Float(f) => {
            let next = f64::from_bits(f.to_bits() + 1);
            vec![
                Value::Float(next),
                Value::Float(-f - 1.0),
                Value::Int(*f as i64),
            ]
        }
        Value::Str(x) => vec![
            Value::Str(format!("{x}x")),
            Value::Str(x.chars().skip(1).collect::<String>() + "_"),
            Value::Bin(x.clone().into_bytes()),
        ],
        Value::Bin(b) => {
            let mut longer = b.clone();
            longer.push(b'x');
            vec![Value::Bin(longer)]
        }
        Value::Array(items) => {
            let mut longer = items.clone();
            longer.push(Value::Nil);
            let mut out = vec![Value::Array(longer)];
            if !items.is_empty() {
                out.push(Value::Array(items[1..].to_vec()));
            }
            out
        }
        Value::Map(pairs) => {
            let mut longer = pairs.clone();
            longer.push((s("added"), Value::Int(1)));
            vec![Value::Map(longer)]
        }
    }
}

#[test]
fn any_single_change_breaks_verification() {
    let mut checked = 0;
    for (n, v) in ceilometer_vectors().iter().enumerate() {
        if v.secret.is_empty() {
            continue;
        }
        let original = decode(v);
        let mut paths = Vec::new();
        all_paths(&original, &mut Vec::new(), &mut paths);
        for path in paths.iter().filter(|p| !p.is_empty()) {
            for replacement in mutations(node_mut(&mut original.clone(), path)) {
                let mut m = original.clone();
                let node = node_mut(&mut m, path);
                if *node == replacement {
                    continue;
                }
                *node = replacement.clone();
                assert!(
                    !verify_signature(&m, &v.secret),
                    "vector {n}: {path:?} -> {replacement:?} still verifies"
                );
                checked += 1;
            }
        }
        // Renaming, dropping or adding a top-level field.
        let Value::Map(pairs) = &original else {
            unreachable!()
        };
        for i in 0..pairs.len() {
            if pairs[i].0.as_str() == Some("message_signature") {
                continue;
            }
            // An empty map contributes nothing, so dropping one is invisible (as in ceilometer).
            let empty_map = matches!(&pairs[i].1, Value::Map(m) if m.is_empty());
            let mut renamed = pairs.clone();
            renamed[i].0 = Value::Str(format!("{}_", pairs[i].0.as_str().unwrap()));
            let mut dropped = pairs.clone();
            dropped.remove(i);
            let changed = if empty_map {
                vec![]
            } else {
                vec![renamed, dropped]
            };
            for m in changed {
                assert!(
                    !verify_signature(&Value::Map(m), &v.secret),
                    "vector {n} field {i}"
                );
                checked += 1;
            }
        }
        let mut added = pairs.clone();
        added.push((s("extra"), Value::Nil));
        assert!(!verify_signature(&Value::Map(added), &v.secret));
        assert!(verify_signature(&original, &v.secret));
    }
    assert!(checked > 300, "only {checked} mutations checked");
}

/// Sorted orders are remembered between messages (by each map's place in the walk): a message
/// whose keys at some place have the same count and lengths but other bytes or another wire
/// order must be sorted afresh.
#[test]
fn a_remembered_key_order_is_used_only_for_the_same_keys() {
    let s = |x: &str| Value::Str(x.to_owned());
    let msg = |pairs: &[(&str, i64)]| {
        Value::Map(pairs.iter().map(|(k, v)| (s(k), Value::Int(*v))).collect())
    };
    let first = msg(&[("bb", 1), ("aa", 2), ("cc", 3)]);
    let renamed = msg(&[("bb", 1), ("zz", 2), ("cc", 3)]);
    let reordered = msg(&[("aa", 2), ("cc", 3), ("bb", 1)]);
    let input = |v: &Value| String::from_utf8(meter::signature::signing_input(v).unwrap()).unwrap();
    assert_eq!(input(&first), "aa2bb1cc3");
    assert_eq!(input(&first), "aa2bb1cc3");
    assert_eq!(input(&renamed), "bb1cc3zz2");
    assert_eq!(input(&first), "aa2bb1cc3");
    assert_eq!(input(&reordered), "aa2bb1cc3");
    let nested = |inner: &[(&str, i64)]| Value::Map(vec![(s("m"), msg(inner))]);
    assert_eq!(input(&nested(&[("y", 1), ("x", 2)])), "m:x2m:y1");
    assert_eq!(input(&nested(&[("x", 1), ("y", 2)])), "m:x1m:y2");
}

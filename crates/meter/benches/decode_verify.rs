//! Hot path of every source: decode one msgpack sample, verify its signature, type it.
//! Throughput is in samples, so criterion reports samples/s. `_ref`: strings borrowed from
//! the message's bytes (what the daemon's sources do), against the owned `Value`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use meter::{decode_value, decode_value_ref, Sample, SigningKey};

/// The ceilometer vectors' full samples (0..4), as they arrive on the wire.
fn samples() -> (String, Vec<Vec<u8>>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/signatures.json");
    let text = std::fs::read_to_string(path).expect("signatures.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let entries = json.as_array().expect("array");
    let secret = entries[0]["secret"].as_str().expect("secret").to_owned();
    let bytes = entries
        .iter()
        .take(4)
        .map(|e| hex::decode(e["msgpack_hex"].as_str().expect("hex")).expect("hex"))
        .collect();
    (secret, bytes)
}

/// The three benches of one decoder (`decode_value` or `decode_value_ref`), named with
/// `suffix`: decode, verify an already decoded sample, and decode + verify + type.
macro_rules! bench_decoder {
    ($group:expr, $key:expr, $messages:expr, $decode:ident, $suffix:literal) => {{
        let (group, key, messages) = ($group, $key, $messages);
        group.bench_function(concat!("decode", $suffix), |b| {
            b.iter(|| {
                for m in messages {
                    black_box($decode(black_box(m)).expect("decodes"));
                }
            })
        });
        let values: Vec<_> = messages
            .iter()
            .map(|m| $decode(m).expect("decodes"))
            .collect();
        group.bench_function(concat!("verify", $suffix), |b| {
            b.iter(|| {
                for v in &values {
                    assert!(key.verify(black_box(v)));
                }
            })
        });
        group.bench_function(concat!("decode", $suffix, "+verify+from_value"), |b| {
            b.iter(|| {
                for m in messages {
                    let value = $decode(black_box(m)).expect("decodes");
                    assert!(key.verify(&value));
                    black_box(Sample::from_value(value).expect("sample"));
                }
            })
        });
    }};
}

fn decode_verify(c: &mut Criterion) {
    let (secret, messages) = samples();
    let key = SigningKey::new(&secret);
    let mut group = c.benchmark_group("sample");
    group.throughput(Throughput::Elements(messages.len() as u64));
    bench_decoder!(&mut group, &key, &messages, decode_value, "");
    bench_decoder!(&mut group, &key, &messages, decode_value_ref, "_ref");
    group.finish();
}

criterion_group!(benches, decode_verify);
criterion_main!(benches);

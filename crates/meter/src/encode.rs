//! [`Value`] → msgpack bytes, laid out as Python's `msgpack.packb(..., use_bin_type=True)` does
//! (smallest int encoding, float64 for floats, str vs bin kept), so re-encoded samples and the
//! load generator's traffic look like a ceilometer publisher's.

use rmp::encode as rmpe;

use crate::value::Value;

/// Append the msgpack encoding of `value` to `out`.
///
/// msgpack cannot express a str, bin, array or map longer than `u32::MAX`; such a value is
/// written as nil rather than as a corrupt length.
pub fn encode_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Nil => written(rmpe::write_nil(out)),
        Value::Bool(b) => written(rmpe::write_bool(out, *b)),
        Value::Int(i) => written(rmpe::write_sint(out, *i)),
        Value::UInt(u) => written(rmpe::write_uint(out, *u)),
        Value::Float(f) => written(rmpe::write_f64(out, *f)),
        Value::Str(s) => match u32::try_from(s.len()) {
            Ok(_) => written(rmpe::write_str(out, s)),
            Err(_) => written(rmpe::write_nil(out)),
        },
        Value::Bin(b) => match u32::try_from(b.len()) {
            Ok(_) => written(rmpe::write_bin(out, b)),
            Err(_) => written(rmpe::write_nil(out)),
        },
        Value::Array(items) => match u32::try_from(items.len()) {
            Ok(n) => {
                written(rmpe::write_array_len(out, n));
                for item in items {
                    encode_value(item, out);
                }
            }
            Err(_) => written(rmpe::write_nil(out)),
        },
        Value::Map(pairs) => match u32::try_from(pairs.len()) {
            Ok(n) => {
                written(rmpe::write_map_len(out, n));
                for (k, v) in pairs {
                    encode_value(k, out);
                    encode_value(v, out);
                }
            }
            Err(_) => written(rmpe::write_nil(out)),
        },
    }
}

/// Discard the result of an rmp write into a `Vec<u8>`, which cannot fail.
#[inline]
fn written<T, E>(_: Result<T, E>) {}

/// [`encode_value`] into a fresh buffer.
pub fn to_msgpack(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_value(value, &mut out);
    out
}

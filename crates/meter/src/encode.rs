//! [`Value`] (or any [`crate::value::Node`]) → msgpack bytes, laid out as Python's `msgpack.packb(..., use_bin_type=True)` does
//! (smallest int encoding, float64 for floats, str vs bin kept), so re-encoded samples and the
//! load generator's traffic look like a ceilometer publisher's.

use crate::value::{Node, View};

/// Append the msgpack encoding of `value` to `out`.
///
/// msgpack cannot express a str, bin, array or map longer than `u32::MAX`; such a value is
/// written as nil rather than as a corrupt length.
///
/// Written by hand rather than through `rmp::encode` (whose layout it keeps byte for byte: a
/// test compares them): every sample's metadata is encoded on the receive path
/// ([`crate::Metadata`]), and rmp's writers, generic over an error type a `Vec` never
/// returns, took 9,000 instructions for a ceilometer instance's metadata.
pub fn encode_value<N: Node>(value: &N, out: &mut Vec<u8>) {
    match value.view() {
        View::Nil => out.push(0xc0),
        View::Bool(b) => out.push(if b { 0xc3 } else { 0xc2 }),
        View::Int(i) => int(i, out),
        View::UInt(u) => uint(u, out),
        View::Float(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        View::Str(s) => {
            if header(out, s.len(), Some((0xa0, 32)), Some(0xd9), [0xda, 0xdb]) {
                out.extend_from_slice(s.as_bytes());
            }
        }
        View::Bin(b) => {
            if header(out, b.len(), None, Some(0xc4), [0xc5, 0xc6]) {
                out.extend_from_slice(b);
            }
        }
        View::Array(items) => {
            if header(out, items.len(), Some((0x90, 16)), None, [0xdc, 0xdd]) {
                for item in items {
                    encode_value(item, out);
                }
            }
        }
        View::Map(pairs) => {
            if header(out, pairs.len(), Some((0x80, 16)), None, [0xde, 0xdf]) {
                for (k, v) in pairs {
                    encode_value(k, out);
                    encode_value(v, out);
                }
            }
        }
    }
}

/// A str, bin, array or map header: the fix form (`fix`: its marker and the lengths below
/// which it applies) when there is one, else the 8-bit length (str and bin only), else the
/// 16-bit or 32-bit one. A length past `u32::MAX` writes nil and answers false: no payload
/// follows.
#[inline]
fn header(
    out: &mut Vec<u8>,
    len: usize,
    fix: Option<(u8, u32)>,
    m8: Option<u8>,
    [m16, m32]: [u8; 2],
) -> bool {
    let Ok(n) = u32::try_from(len) else {
        out.push(0xc0);
        return false;
    };
    match (fix, m8) {
        (Some((f, below)), _) if n < below => out.push(f | n as u8),
        (_, Some(m)) if n < 256 => out.extend_from_slice(&[m, n as u8]),
        _ if n < 65_536 => {
            out.push(m16);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(m32);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    true
}

/// The smallest encoding, non-negative values as unsigned (as msgpack-python and rmp do).
#[inline]
fn int(i: i64, out: &mut Vec<u8>) {
    if i >= 0 {
        uint(i as u64, out);
    } else if i >= -32 {
        out.push(i as u8);
    } else if i >= -128 {
        out.extend_from_slice(&[0xd0, i as u8]);
    } else if i >= -32_768 {
        out.push(0xd1);
        out.extend_from_slice(&(i as i16).to_be_bytes());
    } else if i >= -2_147_483_648 {
        out.push(0xd2);
        out.extend_from_slice(&(i as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&i.to_be_bytes());
    }
}

#[inline]
fn uint(u: u64, out: &mut Vec<u8>) {
    if u < 128 {
        out.push(u as u8);
    } else if u < 256 {
        out.extend_from_slice(&[0xcc, u as u8]);
    } else if u < 65_536 {
        out.push(0xcd);
        out.extend_from_slice(&(u as u16).to_be_bytes());
    } else if u < 4_294_967_296 {
        out.push(0xce);
        out.extend_from_slice(&(u as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&u.to_be_bytes());
    }
}

/// [`encode_value`] into a fresh buffer.
pub fn to_msgpack<N: Node>(value: &N) -> Vec<u8> {
    let mut out = Vec::new();
    encode_value(value, &mut out);
    out
}

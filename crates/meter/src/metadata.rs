//! A sample's `resource_metadata`, kept as the msgpack encoding of its map rather than as a
//! [`Value`] tree.
//!
//! A ceilometer instance sample's metadata is some forty strings and a few nested maps: as a
//! tree, forty-odd allocations that lived from the sample's decode until its batch was
//! stored, scattered over memory, then compared node by node with the resource cache's copy
//! on the writer thread (a native profile put that comparison at 5 % of a worker's CPU and
//! the allocations of the trees held in flight at about as much again). As one byte string,
//! the tree is built and dropped while the sample is decoded (its memory reused at once),
//! the sample holds one allocation, and the writer compares two byte strings. The tree is
//! decoded again only where it is needed: a new resource row, its JSON, the file dispatcher.
//!
//! The bytes are [`crate::encode`]'s encoding of the map, so two metadata are equal exactly
//! when their trees are (floats by their bits: a NaN equals itself, `-0.0` differs from
//! `0.0`).

use crate::decode::{decode_value_with, Limits, MAX_DEPTH_CEILING};
use crate::encode::encode_value;
use crate::value::{Node, Value};
use std::fmt;

/// The msgpack encoding of a metadata map.
#[derive(Clone, PartialEq, Eq)]
pub struct Metadata {
    bytes: Box<[u8]>,
}

/// An empty map's encoding.
const EMPTY: [u8; 1] = [0x80];

impl Default for Metadata {
    /// The empty map.
    fn default() -> Self {
        Metadata {
            bytes: Box::new(EMPTY),
        }
    }
}

impl Metadata {
    /// Encode `value` (a map; [`crate::Sample::from_value`] turns nil into an empty one),
    /// owned or borrowed.
    pub fn from_value<N: Node>(value: &N) -> Metadata {
        // Encoded into a buffer kept by the thread, then copied into one exact allocation: no
        // reallocation while it grows, no spare capacity held by the sample.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            buf.clear();
            encode_value(value, buf);
            let bytes = Box::from(&buf[..]);
            // A huge metadata once does not pin its buffer for the thread's life.
            if buf.capacity() > 1 << 16 {
                *buf = Vec::new();
            }
            Metadata { bytes }
        })
    }

    /// The tree again. The bytes are this module's own encoding of a decoded value, so
    /// decoding them cannot fail (the depth limit is the decoder's ceiling, never below what
    /// any sample was decoded with); if it ever did, the answer would be an empty map.
    pub fn value(&self) -> Value {
        let limits = Limits {
            max_depth: MAX_DEPTH_CEILING,
            max_bytes: None,
        };
        match decode_value_with(&self.bytes, &limits) {
            Ok(v) => v,
            Err(e) => {
                debug_assert!(false, "metadata bytes do not decode: {e}");
                Value::Map(Vec::new())
            }
        }
    }

    /// Metadata from bytes said to be this module's encoding of a map (what
    /// [`Metadata::as_bytes`] gave another process of this collector), checked without
    /// building the tree: one complete map, nested at most [`MAX_DEPTH_CEILING`] deep, every
    /// header, int and float in the form [`encode_value`] writes (so that equality stays that
    /// of the trees), no ext type, every str UTF-8, nothing after it. Anything else is refused;
    /// the cost is one pass over the bytes and one copy.
    pub fn from_encoded(bytes: &[u8]) -> Result<Metadata, &'static str> {
        check_encoded(bytes)?;
        Ok(Metadata {
            bytes: Box::from(bytes),
        })
    }

    /// The encoding itself (a msgpack map).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether this is the empty map.
    pub fn is_empty(&self) -> bool {
        *self.bytes == EMPTY
    }

    /// Whether some str in it, or bin that is UTF-8 (JSON writes those as strings), key or
    /// value, at any depth, holds a NUL character, which PostgreSQL's text and `jsonb` cannot
    /// store. Read from the bytes, building nothing; `false` is final, `true` may deserve a
    /// closer look (it is also the answer for bytes this module would not have written).
    pub fn has_nul(&self) -> bool {
        scan_has_nul(&self.bytes)
    }
}

impl From<Value> for Metadata {
    fn from(value: Value) -> Self {
        Metadata::from_value(&value)
    }
}

impl From<&Value> for Metadata {
    fn from(value: &Value) -> Self {
        Metadata::from_value(value)
    }
}

impl fmt::Debug for Metadata {
    /// As the tree it encodes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value().fmt(f)
    }
}

/// The bytes of a big-endian field of `n` bytes at `at`, as a number; `None` past the end.
fn read_be(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let field = b.get(at..at.checked_add(n)?)?;
    Some(field.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

/// What follows a marker's field.
enum Then {
    Nothing,
    Str,
    Bin,
    Array,
    Map,
}

/// The form [`encode_value`] writes marker `m` in, for a marker with a field of its own: the
/// field's bytes, the field values it writes that marker for (a smaller value has a smaller
/// form; for negative ints, the two's complement of the ints below the next smaller form's)
/// and what follows. `None`: a marker it never writes (float32, ext, the reserved one).
fn field_form(m: u8) -> Option<(usize, std::ops::RangeInclusive<u64>, Then)> {
    const U16: u64 = 0xffff;
    const U32: u64 = 0xffff_ffff;
    Some(match m {
        0xcc => (1, 128..=0xff, Then::Nothing),
        0xcd => (2, 256..=U16, Then::Nothing),
        0xce => (4, 65_536..=U32, Then::Nothing),
        0xcf => (8, 1 << 32..=u64::MAX, Then::Nothing),
        0xd0 => (1, 0x80..=0xdf, Then::Nothing),
        0xd1 => (2, 0x8000..=0xff7f, Then::Nothing),
        0xd2 => (4, 0x8000_0000..=0xffff_7fff, Then::Nothing),
        0xd3 => (8, 1 << 63..=0xffff_ffff_7fff_ffff, Then::Nothing),
        0xcb => (8, 0..=u64::MAX, Then::Nothing),
        0xd9 => (1, 32..=0xff, Then::Str),
        0xda => (2, 256..=U16, Then::Str),
        0xdb => (4, 65_536..=U32, Then::Str),
        0xc4 => (1, 0..=0xff, Then::Bin),
        0xc5 => (2, 256..=U16, Then::Bin),
        0xc6 => (4, 65_536..=U32, Then::Bin),
        0xdc => (2, 16..=U16, Then::Array),
        0xdd => (4, 65_536..=U32, Then::Array),
        0xde => (2, 16..=U16, Then::Map),
        0xdf => (4, 65_536..=U32, Then::Map),
        _ => return None,
    })
}

/// [`Metadata::from_encoded`]'s check: walks the items in order, keeping for each open
/// container how many items it still has (a claimed length costs nothing until its items are
/// read, so a false claim runs out of bytes).
fn check_encoded(b: &[u8]) -> Result<(), &'static str> {
    const NOT_OURS: &str = "not in the form the collector encodes";
    let mut open: Vec<u64> = Vec::new();
    let mut i = 0;
    loop {
        let m = *b.get(i).ok_or("truncated")?;
        if i == 0 && !matches!(m, 0x80..=0x8f | 0xde | 0xdf) {
            return Err("not a map");
        }
        i += 1;
        // Items a container opened here holds; payload bytes of a str (true) or bin (false).
        let (items, payload) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (None, None),
            0x80..=0x8f => (Some(2 * u64::from(m & 0x0f)), None),
            0x90..=0x9f => (Some(u64::from(m & 0x0f)), None),
            0xa0..=0xbf => (None, Some((u64::from(m & 0x1f), true))),
            _ => {
                let (n, written_for, then) = field_form(m).ok_or(NOT_OURS)?;
                let v = read_be(b, i, n).ok_or("truncated")?;
                i += n;
                if !written_for.contains(&v) {
                    return Err(NOT_OURS);
                }
                match then {
                    Then::Nothing => (None, None),
                    Then::Str => (None, Some((v, true))),
                    Then::Bin => (None, Some((v, false))),
                    Then::Array => (Some(v), None),
                    Then::Map => (Some(2 * v), None),
                }
            }
        };
        if let Some((n, is_str)) = payload {
            let end = usize::try_from(n)
                .ok()
                .and_then(|n| i.checked_add(n))
                .ok_or("truncated")?;
            let data = b.get(i..end).ok_or("truncated")?;
            if is_str && !data.is_ascii() && std::str::from_utf8(data).is_err() {
                return Err("a str that is not UTF-8");
            }
            i = end;
        }
        if let Some(n) = items {
            if open.len() >= MAX_DEPTH_CEILING {
                return Err("nested too deep");
            }
            if n > 0 {
                open.push(n);
                continue;
            }
        }
        // An item is complete: so is every container it was the last item of.
        loop {
            match open.last_mut() {
                None => {
                    return if i == b.len() {
                        Ok(())
                    } else {
                        Err("bytes after the map")
                    };
                }
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

/// [`Metadata::has_nul`] over msgpack bytes: containers' items follow their headers, so one
/// pass over the bytes visits every str and bin without a stack.
fn scan_has_nul(b: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&m) = b.get(i) {
        i += 1;
        // (bytes of length field, whether a str) for str and bin; bytes to skip otherwise.
        let (len_bytes, is_str) = match m {
            // fixint, fixmap and fixarray headers, nil, booleans, negative fixint.
            0x00..=0x9f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => continue,
            0xa0..=0xbf => (0, true),
            0xd9 => (1, true),
            0xda => (2, true),
            0xdb => (4, true),
            0xc4 => (1, false),
            0xc5 => (2, false),
            0xc6 => (4, false),
            0xcc | 0xd0 => {
                i += 1;
                continue;
            }
            0xcd | 0xd1 | 0xdc | 0xde => {
                i += 2;
                continue;
            }
            0xca | 0xce | 0xd2 | 0xdd | 0xdf => {
                i += 4;
                continue;
            }
            0xcb | 0xcf | 0xd3 => {
                i += 8;
                continue;
            }
            // An ext type or the reserved marker: not this module's bytes.
            _ => return true,
        };
        let n = if len_bytes == 0 {
            usize::from(m & 0x1f)
        } else {
            let Some(n) = read_be(b, i, len_bytes) else {
                return true;
            };
            i += len_bytes;
            n as usize
        };
        let Some(data) = b.get(i..i.saturating_add(n)) else {
            return true;
        };
        i += n;
        if data.contains(&0) && (is_str || std::str::from_utf8(data).is_ok()) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.to_owned())
    }

    #[test]
    fn round_trips_and_compares_as_the_tree_does() {
        let tree = Value::Map(vec![
            (s("display_name"), s("vm-1")),
            (
                s("flavor"),
                Value::Map(vec![
                    (s("vcpus"), Value::Int(2)),
                    (s("ram"), Value::UInt(u64::MAX)),
                ]),
            ),
            (s("tags"), Value::Array(vec![Value::Nil, Value::Bool(true)])),
            (s("blob"), Value::Bin(vec![0, 255])),
            (s("load"), Value::Float(0.25)),
        ]);
        let m = Metadata::from_value(&tree);
        assert_eq!(m.value(), tree);
        assert_eq!(m, Metadata::from(tree.clone()));
        assert!(!m.is_empty() && !m.has_nul());
        let mut other = tree.clone();
        if let Value::Map(pairs) = &mut other {
            pairs[4].1 = Value::Float(0.5);
        }
        assert_ne!(m, Metadata::from(other));
        // Order is part of the tree: the same pairs in another order are another map.
        let swapped = Value::Map(vec![(s("a"), Value::Int(1)), (s("b"), Value::Int(2))]);
        let again = Value::Map(vec![(s("b"), Value::Int(2)), (s("a"), Value::Int(1))]);
        assert_ne!(Metadata::from(swapped), Metadata::from(again));
    }

    #[test]
    fn floats_compare_by_bits() {
        let nan = Metadata::from(Value::Map(vec![(s("x"), Value::Float(f64::NAN))]));
        assert_eq!(nan, nan.clone());
        let zero = Metadata::from(Value::Map(vec![(s("x"), Value::Float(0.0))]));
        let minus_zero = Metadata::from(Value::Map(vec![(s("x"), Value::Float(-0.0))]));
        assert_ne!(zero, minus_zero);
    }

    #[test]
    fn the_empty_map_and_nul_characters_are_known_without_decoding() {
        assert!(Metadata::default().is_empty());
        assert_eq!(Metadata::default().value(), Value::Map(Vec::new()));
        assert_eq!(Metadata::default(), Metadata::from(Value::Map(Vec::new())));
        let deep_value = Value::Map(vec![(
            s("a"),
            Value::Map(vec![(s("b"), Value::Array(vec![s("x\0y")]))]),
        )]);
        assert!(Metadata::from(deep_value).has_nul());
        let in_key = Value::Map(vec![(s("k\0"), Value::Int(1))]);
        assert!(Metadata::from(in_key).has_nul());
        let utf8_bin = Value::Map(vec![(s("k"), Value::Bin(vec![b'a', 0]))]);
        assert!(
            Metadata::from(utf8_bin).has_nul(),
            "UTF-8 bin is written as text"
        );
        let bin = Value::Map(vec![(s("k"), Value::Bin(vec![0xff, 0]))]);
        assert!(!Metadata::from(bin).has_nul(), "other bin is not text");
        assert!(!Metadata::from(Value::Map(vec![(s("zero"), Value::Int(0))])).has_nul());
        // Every length width, numbers whose bytes hold zeros, the NUL at the very end.
        for n in [31, 32, 255, 256, 65_535, 65_536] {
            let mut pairs = vec![
                (s("f"), Value::Float(0.25)),
                (s("i"), Value::Int(-65_536)),
                (s("u"), Value::Int(1 << 32)),
                (s("long"), s(&"x".repeat(n))),
                (s("bin"), Value::Bin(vec![0xff; n])),
            ];
            assert!(!Metadata::from(Value::Map(pairs.clone())).has_nul(), "{n}");
            pairs.push((s("last"), s(&format!("{}\0", "y".repeat(n)))));
            assert!(Metadata::from(Value::Map(pairs)).has_nul(), "{n}");
        }
    }

    #[test]
    fn nesting_to_the_decoders_ceiling_decodes_again() {
        let mut v = Value::Map(Vec::new());
        for _ in 0..MAX_DEPTH_CEILING - 1 {
            v = Value::Map(vec![(s("k"), v)]);
        }
        let m = Metadata::from_value(&v);
        assert_eq!(m.value(), v);
    }

    /// Maps holding every form the encoder writes: each int, str, bin, array and map width.
    fn every_form() -> Vec<Value> {
        let mut out = vec![Value::Map(Vec::new())];
        let ints = [
            0,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            (1 << 32) - 1,
            1 << 32,
            i64::MAX,
            -1,
            -32,
            -33,
            -128,
            -129,
            -32_768,
            -32_769,
            -2_147_483_648,
            -2_147_483_649,
            i64::MIN,
        ];
        let mut pairs: Vec<(Value, Value)> = ints
            .iter()
            .map(|&i| (s(&format!("i{i}")), Value::Int(i)))
            .collect();
        pairs.push((s("u"), Value::UInt(u64::MAX)));
        pairs.push((s("f"), Value::Float(-0.0)));
        pairs.push((s("nil"), Value::Nil));
        pairs.push((s("t"), Value::Bool(true)));
        pairs.push((s("é"), s("ünïcode ✓")));
        pairs.push((Value::Int(7), Value::Bin(vec![0xff, 0, 1])));
        out.push(Value::Map(pairs));
        for n in [0, 15, 16, 31, 32, 255, 256, 65_535, 65_536] {
            out.push(Value::Map(vec![
                (s("str"), s(&"x".repeat(n))),
                (s("bin"), Value::Bin(vec![0xfe; n])),
                (s("array"), Value::Array(vec![Value::Nil; n])),
                (
                    s("map"),
                    Value::Map((0..n).map(|i| (Value::Int(i as i64), Value::Nil)).collect()),
                ),
            ]));
        }
        out
    }

    #[test]
    fn encoded_bytes_are_taken_back_as_they_were() {
        for v in every_form() {
            let m = Metadata::from_value(&v);
            let again = Metadata::from_encoded(m.as_bytes()).expect("the encoder's own bytes");
            assert_eq!(again, m);
            assert_eq!(again.value(), v);
        }
        let mut deep = Value::Map(Vec::new());
        for _ in 0..MAX_DEPTH_CEILING - 1 {
            deep = Value::Map(vec![(s("k"), deep)]);
        }
        let m = Metadata::from_value(&deep);
        assert!(Metadata::from_encoded(m.as_bytes()).is_ok());
        let deeper = Metadata::from_value(&Value::Map(vec![(s("k"), deep)]));
        assert_eq!(
            Metadata::from_encoded(deeper.as_bytes()),
            Err("nested too deep")
        );
    }

    #[test]
    fn every_truncation_and_any_extra_byte_is_refused() {
        for v in every_form().into_iter().take(4) {
            let bytes = Metadata::from_value(&v).as_bytes().to_vec();
            for n in 0..bytes.len() {
                assert!(Metadata::from_encoded(&bytes[..n]).is_err(), "{n} of {v:?}");
            }
            let mut more = bytes.clone();
            more.push(0xc0);
            assert_eq!(Metadata::from_encoded(&more), Err("bytes after the map"));
        }
    }

    #[test]
    fn bytes_the_encoder_would_not_write_are_refused() {
        // Each: a map of one pair "k" => the value, in a form the encoder never writes for
        // it (equal trees would then differ in bytes), or not a value at all.
        let forms: [&[u8]; 19] = [
            &[0xcc, 0x05],                   // 5 as uint8
            &[0xcd, 0x00, 0xff],             // 255 as uint16
            &[0xce, 0x00, 0x00, 0xff, 0xff], // 65,535 as uint32
            &[0xcf, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            &[0xd0, 0xff],                   // -1 as int8
            &[0xd1, 0xff, 0x80],             // -128 as int16
            &[0xd2, 0xff, 0xff, 0x80, 0x00], // -32,768 as int32
            &[0xd3, 0xff, 0xff, 0xff, 0xff, 0x80, 0, 0, 0],
            &[0xd9, 0x01, b'a'],       // a 1-byte str as str8
            &[0xda, 0x00, 0x01, b'a'], // as str16
            &[0xc5, 0x00, 0x01, 0x00], // a 1-byte bin as bin16
            &[0xdc, 0x00, 0x00],       // an empty array as array16
            &[0xde, 0x00, 0x00],       // an empty map as map16
            &[0xca, 0, 0, 0, 0],       // float32
            &[0xd4, 0x01, 0x00],       // fixext1
            &[0xc7, 0x00, 0x01],       // ext8
            &[0xc1],                   // never used
            &[0xa2, 0xc3, 0x28],       // a str that is not UTF-8
            &[0xa1, 0xff],             // nor this
        ];
        for f in forms {
            let mut b = vec![0x81, 0xa1, b'k'];
            b.extend_from_slice(f);
            assert!(Metadata::from_encoded(&b).is_err(), "{b:x?}");
        }
        // A bin need not be UTF-8; the smallest forms of the same values are taken.
        for ok in [
            &[0xc4, 0x01, 0xff][..],
            &[0x05],
            &[0xff],
            &[0xd0, 0xdf],
            &[0xa1, b'a'],
        ] {
            let mut b = vec![0x81, 0xa1, b'k'];
            b.extend_from_slice(ok);
            assert!(Metadata::from_encoded(&b).is_ok(), "{b:x?}");
        }
        // Only a map, and a claimed length the bytes do not hold fails without allocating it.
        assert_eq!(Metadata::from_encoded(&[0x90]), Err("not a map"));
        assert_eq!(Metadata::from_encoded(&[0xa0]), Err("not a map"));
        assert!(Metadata::from_encoded(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0]).is_err());
        assert!(Metadata::from_encoded(&[0x81, 0xdb, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}

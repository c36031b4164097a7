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
            let Some(field) = b.get(i..i + len_bytes) else {
                return true;
            };
            i += len_bytes;
            field
                .iter()
                .fold(0usize, |acc, &x| (acc << 8) | usize::from(x))
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
}

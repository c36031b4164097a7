//! MessagePack bytes → [`Value`], written by hand for untrusted input.
//!
//! The decoder is shared by every source: one UDP datagram ([`decode_value`]), one TCP frame,
//! and the MessagePack-RPC stream, where [`read_value`] reports [`DecodeError::Incomplete`] so
//! the caller can wait for more bytes and retry from the same offset.
//!
//! It never panics, never reserves memory for a length the peer claims before the bytes that
//! back it are there (every element takes at least one byte), bounds nesting (so a 100 000-deep
//! array is an error, not a stack overflow), and keeps every distinction ceilometer's signature
//! can see: int vs float, str vs bin, nil. Ext types are refused; ceilometer never sends them.
//! Errors name the path of the offending value (`resource_metadata:tags[1]`, with `:` between
//! map keys as in ceilometer's signature names).

use std::fmt;

use crate::value::{Node, Value, ValueRef, View};

/// Default bound on container nesting (a ceilometer sample uses 2 to 4 levels).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Hard ceiling on [`Limits::max_depth`]. The decoder itself keeps its own stack, but
/// everything that walks a [`Value`] recursively (the signature, the encoder, `Drop`) uses
/// the call stack, so depth must stay well inside the smallest thread stack (a 256-deep
/// message signs within a 1 MiB stack even in a debug build; see the tests).
pub const MAX_DEPTH_CEILING: usize = 256;

/// Containers are presized to their claimed length up to this many entries, and grow by
/// pushing past it. Claims are checked against the bytes left, but nested containers' claims
/// overlap the same bytes; the cap keeps memory proportional to what was actually decoded.
const MAX_PRESIZE: usize = 128;

/// What a single value may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Containers nested deeper than this are refused ([`DecodeError::TooDeep`]). A scalar is
    /// depth 0, a map of scalars depth 1. Clamped to [`MAX_DEPTH_CEILING`].
    pub max_depth: usize,
    /// Bytes one value may span. Past it the decoder answers [`DecodeError::TooLarge`] instead of
    /// [`DecodeError::Incomplete`], as soon as a claimed length shows the value cannot fit, so a
    /// stream reader learns early that a frame is oversized. `None`: bounded by the buffer only.
    pub max_bytes: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: DEFAULT_MAX_DEPTH,
            max_bytes: None,
        }
    }
}

/// Why bytes are not one acceptable msgpack value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ends inside the value: a stream reader should wait for more bytes and retry
    /// from the same offset. For a whole datagram it means the datagram is truncated.
    #[error("truncated: the buffer ends inside a msgpack value")]
    Incomplete,
    /// Containers nest deeper than [`Limits::max_depth`].
    #[error("{}: nesting deeper than {max_depth} levels", Where(path))]
    TooDeep { path: String, max_depth: usize },
    /// The value would span more than [`Limits::max_bytes`]; `needed` is a lower bound.
    #[error(
        "{}: value needs at least {needed} bytes, limit is {max_bytes}",
        Where(path)
    )]
    TooLarge {
        path: String,
        needed: usize,
        max_bytes: usize,
    },
    /// A msgpack str whose bytes are not UTF-8.
    #[error(
        "{}: invalid UTF-8 in str (valid up to byte {valid_up_to})",
        Where(path)
    )]
    InvalidUtf8 { path: String, valid_up_to: usize },
    /// A msgpack ext value (`type_id` is `None` if the buffer ended before it).
    #[error("{}: ext type {} is not supported", Where(path), ExtType(*type_id))]
    Ext { path: String, type_id: Option<i8> },
    /// The byte 0xc1, which msgpack reserves and never uses.
    #[error("{}: reserved marker byte 0xc1", Where(path))]
    ReservedMarker { path: String },
    /// A whole-buffer decode ([`decode_value`]) found bytes after the value.
    #[error("{} trailing bytes after a {consumed}-byte msgpack value", total - consumed)]
    TrailingBytes { consumed: usize, total: usize },
}

impl DecodeError {
    /// The path of the offending value (`""` for the top level or when there is none).
    pub fn path(&self) -> &str {
        match self {
            DecodeError::TooDeep { path, .. }
            | DecodeError::TooLarge { path, .. }
            | DecodeError::InvalidUtf8 { path, .. }
            | DecodeError::Ext { path, .. }
            | DecodeError::ReservedMarker { path } => path,
            DecodeError::Incomplete | DecodeError::TrailingBytes { .. } => "",
        }
    }
}

/// Renders a path as `field "a:b[1]"`, or `top level` for the empty path.
pub(crate) struct Where<'a>(pub(crate) &'a str);

impl fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("top level")
        } else {
            write!(f, "field {:?}", self.0)
        }
    }
}

struct ExtType(Option<i8>);

impl fmt::Display for ExtType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(t) => write!(f, "{t}"),
            None => f.write_str("(unknown)"),
        }
    }
}

/// Decode the first msgpack value in `buf`; returns it and the number of bytes it took.
///
/// Bytes after the value are left alone (they are the next value of a stream).
/// [`DecodeError::Incomplete`] means `buf` is a prefix of a value that may still be valid.
pub fn read_value(buf: &[u8], limits: &Limits) -> Result<(Value, usize), DecodeError> {
    read(buf, limits)
}

fn read<'a, T: Build<'a>>(buf: &'a [u8], limits: &Limits) -> Result<(T, usize), DecodeError> {
    let mut d = Decoder {
        buf,
        pos: 0,
        max_bytes: limits.max_bytes.unwrap_or(usize::MAX),
        max_depth: limits.max_depth.min(MAX_DEPTH_CEILING),
    };
    let value = d.decode()?;
    Ok((value, d.pos))
}

/// Decode a buffer that holds exactly one value (a UDP datagram, a TCP frame) with the default
/// [`Limits`]. Bytes after the value are an error.
pub fn decode_value(buf: &[u8]) -> Result<Value, DecodeError> {
    decode_value_with(buf, &Limits::default())
}

/// [`decode_value`] with explicit limits.
pub fn decode_value_with(buf: &[u8], limits: &Limits) -> Result<Value, DecodeError> {
    whole(buf, limits)
}

/// [`decode_value`] into a [`ValueRef`] that borrows `buf`'s strings instead of copying them:
/// the same checks, errors and limits.
pub fn decode_value_ref(buf: &[u8]) -> Result<ValueRef<'_>, DecodeError> {
    whole(buf, &Limits::default())
}

/// [`decode_value_ref`] with explicit limits.
pub fn decode_value_ref_with<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<ValueRef<'a>, DecodeError> {
    whole(buf, limits)
}

fn whole<'a, T: Build<'a>>(buf: &'a [u8], limits: &Limits) -> Result<T, DecodeError> {
    let (value, consumed) = read(buf, limits)?;
    if consumed != buf.len() {
        return Err(DecodeError::TrailingBytes {
            consumed,
            total: buf.len(),
        });
    }
    Ok(value)
}

/// A value without a payload to own or borrow.
enum Scalar {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
}

/// What the decoder builds: an owned [`Value`] or a borrowing [`ValueRef`].
trait Build<'a>: Node {
    fn scalar(v: Scalar) -> Self;
    fn str(s: &'a str) -> Self;
    fn bin(b: &'a [u8]) -> Self;
    fn array(items: Vec<Self>) -> Self;
    fn map(pairs: Vec<(Self, Self)>) -> Self;
}

impl<'a> Build<'a> for Value {
    #[inline]
    fn scalar(v: Scalar) -> Self {
        match v {
            Scalar::Nil => Value::Nil,
            Scalar::Bool(b) => Value::Bool(b),
            Scalar::Int(i) => Value::Int(i),
            Scalar::UInt(u) => Value::UInt(u),
            Scalar::Float(f) => Value::Float(f),
        }
    }
    #[inline]
    fn str(s: &'a str) -> Self {
        Value::Str(s.to_owned())
    }
    #[inline]
    fn bin(b: &'a [u8]) -> Self {
        Value::Bin(b.to_vec())
    }
    #[inline]
    fn array(items: Vec<Self>) -> Self {
        Value::Array(items)
    }
    #[inline]
    fn map(pairs: Vec<(Self, Self)>) -> Self {
        Value::Map(pairs)
    }
}

impl<'a> Build<'a> for ValueRef<'a> {
    #[inline]
    fn scalar(v: Scalar) -> Self {
        match v {
            Scalar::Nil => ValueRef::Nil,
            Scalar::Bool(b) => ValueRef::Bool(b),
            Scalar::Int(i) => ValueRef::Int(i),
            Scalar::UInt(u) => ValueRef::UInt(u),
            Scalar::Float(f) => ValueRef::Float(f),
        }
    }
    #[inline]
    fn str(s: &'a str) -> Self {
        ValueRef::Str(s)
    }
    #[inline]
    fn bin(b: &'a [u8]) -> Self {
        ValueRef::Bin(b)
    }
    #[inline]
    fn array(items: Vec<Self>) -> Self {
        ValueRef::Array(items)
    }
    #[inline]
    fn map(pairs: Vec<(Self, Self)>) -> Self {
        ValueRef::Map(pairs)
    }
}

/// What went wrong, before the path is attached.
enum Kind {
    TooDeep,
    TooLarge { needed: usize },
    InvalidUtf8 { valid_up_to: usize },
    Ext { type_id: Option<i8> },
    Reserved,
}

/// Internal error: `Incomplete` is routine for a stream decoder; the rest gets its path from
/// the decoder's stack of open containers.
enum Error {
    Incomplete,
    Fail(Kind),
}

/// A container being filled. The decoder keeps these on a heap stack instead of recursing, so
/// nesting costs no call stack (the depth limit still bounds the memory and protects the
/// recursive code that walks the finished [`Value`]).
enum Open<T> {
    Array {
        items: Vec<T>,
        remaining: usize,
    },
    Map {
        pairs: Vec<(T, T)>,
        remaining: usize,
        /// The key read for the entry whose value comes next.
        key: Option<T>,
    },
}

/// One decoded item, before it becomes a `T`: a leaf, or the header of a container whose
/// checks passed. The reader used to return the finished value or the open container itself,
/// built field by field in a stack slot and then copied out with 16-byte loads over those
/// narrower stores, which stalls on store forwarding: perf put a third of the decoder's time
/// on that one copy. A token is small and matched where the value is built.
enum Token<'a> {
    Scalar(Scalar),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(usize),
    Map(usize),
}

/// How a map key appears in an error path.
fn describe_key<N: Node>(key: &N) -> String {
    match key.view() {
        View::Str(s) => s.to_owned(),
        View::Bin(b) => String::from_utf8_lossy(b).into_owned(),
        View::Int(i) => i.to_string(),
        View::UInt(u) => u.to_string(),
        View::Float(f) => f.to_string(),
        View::Bool(b) => b.to_string(),
        View::Nil => "nil".to_string(),
        View::Array(_) | View::Map(_) => format!("<{} key>", key.type_name()),
    }
}

struct Decoder<'a> {
    buf: &'a [u8],
    /// Invariant: `pos <= buf.len()`.
    pos: usize,
    max_bytes: usize,
    max_depth: usize,
}

impl<'a> Decoder<'a> {
    fn decode<T: Build<'a>>(&mut self) -> Result<T, DecodeError> {
        let mut stack: Vec<Open<T>> = Vec::new();
        loop {
            let token = match self.item(stack.len()) {
                Ok(t) => t,
                Err(Error::Incomplete) => return Err(DecodeError::Incomplete),
                Err(Error::Fail(kind)) => return Err(self.error(kind, &stack)),
            };
            let mut value = match token {
                Token::Scalar(v) => T::scalar(v),
                Token::Str(v) => T::str(v),
                Token::Bin(v) => T::bin(v),
                Token::Array(0) => T::array(Vec::new()),
                Token::Map(0) => T::map(Vec::new()),
                Token::Array(n) => {
                    stack.push(Open::Array {
                        items: Vec::with_capacity(n.min(MAX_PRESIZE)),
                        remaining: n,
                    });
                    continue;
                }
                Token::Map(n) => {
                    stack.push(Open::Map {
                        pairs: Vec::with_capacity(n.min(MAX_PRESIZE)),
                        remaining: n,
                        key: None,
                    });
                    continue;
                }
            };
            // Hand the finished value to its container; a container it completes is itself
            // handed up, and so on. The container is filled in place and only popped once
            // complete (moving it out and back for every element cost more than the push).
            loop {
                let Some(top) = stack.last_mut() else {
                    return Ok(value);
                };
                let done = match top {
                    Open::Array { items, remaining } => {
                        items.push(value);
                        *remaining -= 1;
                        *remaining == 0
                    }
                    Open::Map {
                        pairs,
                        remaining,
                        key,
                    } => match key.take() {
                        None => {
                            *key = Some(value);
                            false
                        }
                        Some(k) => {
                            pairs.push((k, value));
                            *remaining -= 1;
                            *remaining == 0
                        }
                    },
                };
                if !done {
                    break;
                }
                value = match stack.pop() {
                    Some(Open::Array { items, .. }) => T::array(items),
                    Some(Open::Map { pairs, .. }) => T::map(pairs),
                    // Unreachable: last_mut() just found it.
                    None => return Err(DecodeError::Incomplete),
                };
            }
        }
    }

    /// Attach the path of the value being read when `kind` happened.
    fn error<T: Node>(&self, kind: Kind, stack: &[Open<T>]) -> DecodeError {
        let mut path = String::new();
        for open in stack {
            match open {
                Open::Array { items, .. } => path.push_str(&format!("[{}]", items.len())),
                Open::Map { pairs, key, .. } => {
                    if !path.is_empty() {
                        path.push(':');
                    }
                    match key {
                        Some(k) => path.push_str(&describe_key(k)),
                        None => path.push_str(&format!("<key #{}>", pairs.len())),
                    }
                }
            }
        }
        match kind {
            Kind::TooDeep => DecodeError::TooDeep {
                path,
                max_depth: self.max_depth,
            },
            Kind::TooLarge { needed } => DecodeError::TooLarge {
                path,
                needed,
                max_bytes: self.max_bytes,
            },
            Kind::InvalidUtf8 { valid_up_to } => DecodeError::InvalidUtf8 { path, valid_up_to },
            Kind::Ext { type_id } => DecodeError::Ext { path, type_id },
            Kind::Reserved => DecodeError::ReservedMarker { path },
        }
    }

    /// Check that `n` more bytes may be consumed: past `max_bytes` is `TooLarge` (known now,
    /// whatever follows), past the buffer is `Incomplete`. Never overflows.
    #[inline]
    fn claim(&self, n: usize) -> Result<(), Error> {
        let room_in_limit = self.max_bytes.saturating_sub(self.pos);
        if n > room_in_limit {
            return Err(Error::Fail(Kind::TooLarge {
                needed: self.pos.saturating_add(n),
            }));
        }
        if n > self.buf.len() - self.pos {
            return Err(Error::Incomplete);
        }
        Ok(())
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        self.claim(n)?;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }

    #[inline]
    fn u16(&mut self) -> Result<usize, Error> {
        Ok(u16::from_be_bytes(self.array()?) as usize)
    }

    #[inline]
    fn u32(&mut self) -> Result<usize, Error> {
        // usize is at least 32 bits on every target this daemon builds for.
        Ok(u32::from_be_bytes(self.array()?) as usize)
    }

    /// Read one marker and what directly follows it; `depth` is the number of open containers.
    #[inline(always)]
    fn item(&mut self, depth: usize) -> Result<Token<'a>, Error> {
        let marker = self.u8()?;
        let value = match marker {
            0x00..=0x7f => Token::Scalar(Scalar::Int(i64::from(marker))),
            0xe0..=0xff => Token::Scalar(Scalar::Int(i64::from(marker as i8))),
            0x80..=0x8f => return self.map(usize::from(marker & 0x0f), depth),
            0x90..=0x9f => return self.seq(usize::from(marker & 0x0f), depth),
            0xa0..=0xbf => self.str(usize::from(marker & 0x1f))?,
            0xc0 => Token::Scalar(Scalar::Nil),
            0xc1 => return Err(Error::Fail(Kind::Reserved)),
            0xc2 => Token::Scalar(Scalar::Bool(false)),
            0xc3 => Token::Scalar(Scalar::Bool(true)),
            0xc4 => {
                let n = self.u8()? as usize;
                Token::Bin(self.take(n)?)
            }
            0xc5 => {
                let n = self.u16()?;
                Token::Bin(self.take(n)?)
            }
            0xc6 => {
                let n = self.u32()?;
                Token::Bin(self.take(n)?)
            }
            // ext 8/16/32: length then type; fixext 1..16: type only. Refused either way.
            0xc7..=0xc9 => {
                let len_bytes = 1usize << (marker - 0xc7);
                let type_id = self.buf.get(self.pos + len_bytes).map(|&b| b as i8);
                return Err(Error::Fail(Kind::Ext { type_id }));
            }
            0xd4..=0xd8 => {
                let type_id = self.buf.get(self.pos).map(|&b| b as i8);
                return Err(Error::Fail(Kind::Ext { type_id }));
            }
            0xca => Token::Scalar(Scalar::Float(f64::from(f32::from_be_bytes(self.array()?)))),
            0xcb => Token::Scalar(Scalar::Float(f64::from_be_bytes(self.array()?))),
            0xcc => Token::Scalar(Scalar::Int(i64::from(self.u8()?))),
            0xcd => Token::Scalar(Scalar::Int(i64::from(u16::from_be_bytes(self.array()?)))),
            0xce => Token::Scalar(Scalar::Int(i64::from(u32::from_be_bytes(self.array()?)))),
            0xcf => {
                // UInt only above i64::MAX, as `Value::from(u64)` splits them.
                let u = u64::from_be_bytes(self.array()?);
                Token::Scalar(match i64::try_from(u) {
                    Ok(i) => Scalar::Int(i),
                    Err(_) => Scalar::UInt(u),
                })
            }
            0xd0 => Token::Scalar(Scalar::Int(i64::from(i8::from_be_bytes(self.array()?)))),
            0xd1 => Token::Scalar(Scalar::Int(i64::from(i16::from_be_bytes(self.array()?)))),
            0xd2 => Token::Scalar(Scalar::Int(i64::from(i32::from_be_bytes(self.array()?)))),
            0xd3 => Token::Scalar(Scalar::Int(i64::from_be_bytes(self.array()?))),
            0xd9 => {
                let n = self.u8()? as usize;
                self.str(n)?
            }
            0xda => {
                let n = self.u16()?;
                self.str(n)?
            }
            0xdb => {
                let n = self.u32()?;
                self.str(n)?
            }
            0xdc => {
                let n = self.u16()?;
                return self.seq(n, depth);
            }
            0xdd => {
                let n = self.u32()?;
                return self.seq(n, depth);
            }
            0xde => {
                let n = self.u16()?;
                return self.map(n, depth);
            }
            0xdf => {
                let n = self.u32()?;
                return self.map(n, depth);
            }
        };
        Ok(value)
    }

    fn str(&mut self, n: usize) -> Result<Token<'a>, Error> {
        let bytes = self.take(n)?;
        // Nearly every str of a sample is ASCII, and checking that a word at a time costs a
        // fraction of full UTF-8 validation on short strings (callgrind: from_utf8 was ~6,600
        // instructions per RPC sample, some 65 strs); anything else is validated in full.
        if bytes.is_ascii() {
            // SAFETY: ASCII bytes are valid UTF-8.
            return Ok(Token::Str(unsafe { std::str::from_utf8_unchecked(bytes) }));
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Token::Str(s)),
            Err(e) => Err(Error::Fail(Kind::InvalidUtf8 {
                valid_up_to: e.valid_up_to(),
            })),
        }
    }

    fn enter(&self, depth: usize) -> Result<(), Error> {
        if depth >= self.max_depth {
            return Err(Error::Fail(Kind::TooDeep));
        }
        Ok(())
    }

    /// An array header of `n` elements, checked: the depth, and that the buffer can back them
    /// (each element takes at least one byte) before anything is reserved.
    fn seq(&mut self, n: usize, depth: usize) -> Result<Token<'a>, Error> {
        self.enter(depth)?;
        if n > 0 {
            self.claim(n)?;
        }
        Ok(Token::Array(n))
    }

    /// A map header of `n` entries, checked as [`seq`](Self::seq) does (each entry takes at
    /// least two bytes: key and value).
    fn map(&mut self, n: usize, depth: usize) -> Result<Token<'a>, Error> {
        self.enter(depth)?;
        if n > 0 {
            self.claim(n.saturating_mul(2))?;
        }
        Ok(Token::Map(n))
    }
}

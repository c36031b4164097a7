//! `message_signature`: HMAC-SHA256 over a message exactly as ceilometer's `compute_signature`
//! feeds it (DESIGN §5, `shared/vectors/README.md`).
//!
//! The message's fields are visited in sorted key order, nested maps flattened to `a:b:c`
//! names, the top-level `message_signature` skipped, and for each field its name and Python's
//! `str()` of its value go into the HMAC. Arrays are first passed through ceilometer's
//! `decode_unicode` (str ↔ bytes swapped, inner maps sorted) and fed as Python's list repr.
//! The input is streamed into the HMAC through a small stack buffer: no string is built per
//! sample.
//!
//! Some messages have no ceilometer signature at all, because ceilometer's own code raises on
//! them (maps with keys that are not all str or all bin, duplicate keys, a bin inside an array
//! that is not UTF-8). [`verify_signature`] refuses those; [`compute_signature`] still returns a
//! deterministic value for them (keys ordered by type then bytes, last duplicate wins, invalid
//! UTF-8 replaced), and [`try_compute_signature`] says why.
//!
//! With an empty secret signing is off: the signature is `""` and every message verifies.

mod pyrepr;
mod unprintable;

use std::cmp::Ordering;

use ring::hmac;

use crate::decode::Where;
use crate::value::{Node, Value, ValueRef};
use pyrepr::Sink;

/// The top-level field that carries the signature, and is left out of it.
pub const SIGNATURE_FIELD: &str = "message_signature";

/// Why a message has no ceilometer-compatible signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the message is a {got}, not a map")]
    NotAMap { got: &'static str },
    /// msgpack-python refuses keys that are not str or bin, and Python cannot sort a mix.
    #[error("{}: map keys must be all str or all bin (found {found})", Where(path))]
    MixedKeys { path: String, found: &'static str },
    /// A Python dict cannot hold the same key twice; only crafted messages do.
    #[error("{}: duplicate key {key:?}", Where(path))]
    DuplicateKey { path: String, key: String },
    /// ceilometer decodes bin inside arrays as UTF-8 and raises on anything else.
    #[error("{}: bin inside an array is not UTF-8", Where(path))]
    BinNotUtf8 { path: String },
}

/// A prepared secret: the HMAC key schedule is computed once, not per sample.
#[derive(Clone)]
pub struct SigningKey {
    /// `None` for the empty secret: signing disabled.
    key: Option<hmac::Key>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("SigningKey")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl SigningKey {
    pub fn new(secret: &str) -> Self {
        let key = if secret.is_empty() {
            None
        } else {
            Some(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()))
        };
        SigningKey { key }
    }

    /// False for the empty secret, where signatures are `""` and everything verifies.
    pub fn is_enabled(&self) -> bool {
        self.key.is_some()
    }

    /// The signature ceilometer would compute, or why it would fail to.
    pub fn try_compute(&self, message: &Value) -> Result<String, SignatureError> {
        match &self.key {
            None => Ok(String::new()),
            Some(key) => message
                .with_ref(|m| digest(key, m, true))
                .map(|tag| hex(&tag).iter().map(|&b| b as char).collect()),
        }
    }

    /// The signature, with the lenient fallback for messages ceilometer cannot sign.
    pub fn compute(&self, message: &Value) -> String {
        match &self.key {
            None => String::new(),
            Some(key) => match message.with_ref(|m| digest(key, m, false)) {
                Ok(tag) => hex(&tag).iter().map(|&b| b as char).collect(),
                // The lenient walk reports no errors; keep a value anyway rather than panic.
                Err(_) => String::new(),
            },
        }
    }

    /// True if the message's `message_signature` is the one ceilometer would compute.
    ///
    /// Compared in constant time. A missing, non-string or non-ASCII signature fails, and so
    /// does any message ceilometer could not sign (see the module docs).
    pub fn verify<N: Node>(&self, message: &N) -> bool {
        match &self.key {
            None => true,
            Some(key) => message.with_ref(|m| verify_with(key, m)),
        }
    }

    /// Set (or replace) the message's `message_signature`.
    pub fn sign(&self, message: &mut Value) {
        let sig = self.compute(message);
        let Value::Map(pairs) = message else {
            return;
        };
        let is_sig = |k: &Value| matches!(k, Value::Str(s) if s == SIGNATURE_FIELD);
        match pairs.iter().position(|(k, _)| is_sig(k)) {
            Some(first) => {
                pairs[first].1 = Value::Str(sig);
                let mut i = 0;
                pairs.retain(|(k, _)| {
                    i += 1;
                    i - 1 == first || !is_sig(k)
                });
            }
            None => pairs.push((Value::Str(SIGNATURE_FIELD.to_owned()), Value::Str(sig))),
        }
    }
}

/// [`SigningKey::verify`] with signing on: the claimed signature against the computed one.
fn verify_with(key: &hmac::Key, message: &ValueRef<'_>) -> bool {
    let claimed: &[u8] = match top_level_signature(message) {
        Some(ValueRef::Str(s)) => s.as_bytes(),
        Some(ValueRef::Bin(b)) => b,
        _ => return false,
    };
    let Ok(tag) = digest(key, message, true) else {
        return false;
    };
    constant_time_eq(&hex(&tag), claimed)
}

/// Lowercase hex HMAC-SHA256 of `message` keyed with `secret`, as ceilometer computes it; `""`
/// for an empty secret. For a message ceilometer cannot sign, a deterministic stand-in (see the
/// module docs); [`try_compute_signature`] reports those instead.
pub fn compute_signature(message: &Value, secret: &str) -> String {
    SigningKey::new(secret).compute(message)
}

/// [`compute_signature`], or why ceilometer itself could not sign this message.
pub fn try_compute_signature(message: &Value, secret: &str) -> Result<String, SignatureError> {
    SigningKey::new(secret).try_compute(message)
}

/// Whether `message_signature` matches; always true for an empty secret. Constant-time.
/// Daemons verifying many samples should keep a [`SigningKey`] instead.
pub fn verify_signature(message: &Value, secret: &str) -> bool {
    SigningKey::new(secret).verify(message)
}

/// Set `message_signature` on a message map (for the load generator and tests).
pub fn sign(message: &mut Value, secret: &str) {
    SigningKey::new(secret).sign(message)
}

/// The top-level signature field as Python's `dict.get` sees it: the last one wins.
fn top_level_signature<'m, 'b>(message: &'m ValueRef<'b>) -> Option<&'m ValueRef<'b>> {
    match message {
        ValueRef::Map(pairs) => pairs
            .iter()
            .rev()
            .find(|(k, _)| matches!(k, ValueRef::Str(s) if *s == SIGNATURE_FIELD))
            .map(|(_, v)| v),
        _ => None,
    }
}

fn hex(tag: &hmac::Tag) -> [u8; 64] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in tag.as_ref().iter().enumerate().take(32) {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    out
}

/// Compare without an early exit, so timing does not tell how many leading characters of a
/// forged signature were right. The length (always 64 for a real signature) is not secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Buffers small writes so the HMAC sees a few large updates instead of many tiny ones.
struct HmacSink {
    ctx: hmac::Context,
    buf: [u8; 512],
    len: usize,
}

impl HmacSink {
    fn flush(&mut self) {
        self.ctx.update(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Sink for HmacSink {
    fn put(&mut self, bytes: &[u8]) {
        if bytes.len() > self.buf.len() - self.len {
            self.flush();
            if bytes.len() >= self.buf.len() {
                self.ctx.update(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

fn digest(
    key: &hmac::Key,
    message: &ValueRef<'_>,
    strict: bool,
) -> Result<hmac::Tag, SignatureError> {
    let ValueRef::Map(pairs) = message else {
        if strict {
            return Err(SignatureError::NotAMap {
                got: message.type_name(),
            });
        }
        return Ok(hmac::sign(key, b""));
    };
    let mut sink = HmacSink {
        ctx: hmac::Context::with_key(key),
        buf: [0; 512],
        len: 0,
    };
    let mut walker = Walker {
        out: &mut sink,
        strict,
        scratch: Vec::with_capacity(64),
        maps: 0,
    };
    walker.fields(pairs, &mut Vec::new())?;
    sink.flush();
    Ok(sink.ctx.sign())
}

/// Feeds a message to a [`Sink`] the way ceilometer's `recursive_keypairs` +
/// `compute_signature` do. `strict`: fail where ceilometer raises; otherwise fall back.
pub(crate) struct Walker<'o, S: Sink> {
    pub(crate) out: &'o mut S,
    pub(crate) strict: bool,
    /// Sorted entry indices of the maps being walked, one slice per open map (a stack), so
    /// sorting allocates once per message rather than once per map.
    pub(crate) scratch: Vec<usize>,
    /// Maps sorted so far in this message: the next one's place in [`ORDERS`].
    pub(crate) maps: usize,
}

/// Maps whose sorted order is remembered, by their place in a message's walk.
const ORDERS_KEPT: usize = 64;
/// Larger maps are sorted every time (and do not pin their keys' bytes in the cache).
const ORDER_MAX_KEYS: usize = 256;
const ORDER_MAX_KEY_BYTES: usize = 8192;

/// The sorted order of the map the walk met at some place, with the keys it had.
#[derive(Default)]
struct Order {
    bin: bool,
    /// The keys' bytes, one after the other, and where each ends.
    keys: Vec<u8>,
    ends: Vec<u32>,
    order: Vec<u32>,
}

impl Order {
    /// Whether `pairs` has exactly these keys (all str, or all bin as `bin` says), in this
    /// wire order.
    fn matches(&self, pairs: &[(ValueRef<'_>, ValueRef<'_>)], bin: bool) -> bool {
        if self.bin != bin || self.ends.len() != pairs.len() {
            return false;
        }
        let mut start = 0;
        pairs.iter().zip(&self.ends).all(|((k, _), &end)| {
            let cached = &self.keys[start..end as usize];
            start = end as usize;
            key_bytes(k) == cached
        })
    }
}

thread_local! {
    /// Successive messages from one publisher have the same keys in the same wire order
    /// (ceilometer builds every sample dict the same way, and a resource's metadata keeps its
    /// keys), so each map's sorted order is remembered by its place in the walk and reused
    /// when the next message has the same keys there: comparing the keys is a few hundred
    /// instructions, sorting them was some 14,000 per sample (callgrind). Only maps whose keys
    /// are all str or all bin, without duplicates, are remembered.
    static ORDERS: std::cell::RefCell<Vec<Order>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Type order for keys in the lenient fallback (strict mode only admits all-str or all-bin).
fn key_rank(k: &ValueRef<'_>) -> u8 {
    match k {
        ValueRef::Str(_) => 0,
        ValueRef::Bin(_) => 1,
        ValueRef::Nil => 2,
        ValueRef::Bool(_) => 3,
        ValueRef::Int(_) | ValueRef::UInt(_) | ValueRef::Float(_) => 4,
        ValueRef::Array(_) => 5,
        ValueRef::Map(_) => 6,
    }
}

fn as_f64(v: &ValueRef<'_>) -> f64 {
    match v {
        ValueRef::Int(i) => *i as f64,
        ValueRef::UInt(u) => *u as f64,
        ValueRef::Float(f) => *f,
        _ => 0.0,
    }
}

/// The bytes a str or bin key sorts by (empty for any other key; only called on maps whose
/// keys are all str or all bin).
#[inline]
fn key_bytes<'k>(k: &'k ValueRef<'_>) -> &'k [u8] {
    match k {
        ValueRef::Str(s) => s.as_bytes(),
        ValueRef::Bin(b) => b,
        _ => &[],
    }
}

fn cmp_keys(a: &ValueRef<'_>, b: &ValueRef<'_>) -> Ordering {
    key_rank(a).cmp(&key_rank(b)).then_with(|| match (a, b) {
        // Code point order is UTF-8 byte order.
        (ValueRef::Str(x), ValueRef::Str(y)) => x.as_bytes().cmp(y.as_bytes()),
        (ValueRef::Bin(x), ValueRef::Bin(y)) => x.cmp(y),
        (ValueRef::Bool(x), ValueRef::Bool(y)) => x.cmp(y),
        (ValueRef::Int(x), ValueRef::Int(y)) => x.cmp(y),
        (ValueRef::UInt(x), ValueRef::UInt(y)) => x.cmp(y),
        (ValueRef::Int(_), ValueRef::UInt(_)) => Ordering::Less,
        (ValueRef::UInt(_), ValueRef::Int(_)) => Ordering::Greater,
        _ => as_f64(a).total_cmp(&as_f64(b)),
    })
}

impl<S: Sink> Walker<'_, S> {
    /// Push the entries of `pairs` onto `scratch` in Python's iteration order for
    /// `sorted(d.items())` on the dict msgpack-python would build (last duplicate wins).
    /// Returns the range of `scratch` holding them; the caller truncates back to its start.
    fn sort_entries(
        &mut self,
        pairs: &[(ValueRef<'_>, ValueRef<'_>)],
        path: &dyn Fn() -> String,
    ) -> Result<std::ops::Range<usize>, SignatureError> {
        let base = self.scratch.len();
        // All keys str, or all bin: the order is the keys' bytes (what cmp_keys gives them),
        // compared without ranking each key's type first. Every map ceilometer can sign.
        let uniform = match pairs.first().map(|(k, _)| k) {
            Some(ValueRef::Str(_)) => pairs.iter().all(|(k, _)| matches!(k, ValueRef::Str(_))),
            Some(ValueRef::Bin(_)) => pairs.iter().all(|(k, _)| matches!(k, ValueRef::Bin(_))),
            _ => false,
        };
        if let Some((first, _)) = pairs.first() {
            if self.strict && !uniform {
                let str_keys = matches!(first, ValueRef::Str(_));
                for (k, _) in pairs {
                    let ok = match k {
                        ValueRef::Str(_) => str_keys,
                        ValueRef::Bin(_) => !str_keys,
                        _ => false,
                    };
                    if !ok {
                        return Err(SignatureError::MixedKeys {
                            path: path(),
                            found: k.type_name(),
                        });
                    }
                }
            }
        }
        let place = self.maps;
        self.maps += 1;
        let bin = matches!(pairs.first().map(|(k, _)| k), Some(ValueRef::Bin(_)));
        let rememberable = uniform && place < ORDERS_KEPT;
        let remembered = rememberable
            && ORDERS.with(|o| {
                let Ok(orders) = o.try_borrow() else {
                    return false;
                };
                match orders.get(place) {
                    Some(order) if order.matches(pairs, bin) => {
                        self.scratch.extend(order.order.iter().map(|&i| i as usize));
                        true
                    }
                    _ => false,
                }
            });
        if remembered {
            return Ok(base..self.scratch.len());
        }
        self.scratch.extend(0..pairs.len());
        // Ties (duplicates) keep wire order, so the last of each run is the last on the wire.
        let cmp = |a: usize, b: usize| {
            if uniform {
                key_bytes(&pairs[a].0).cmp(key_bytes(&pairs[b].0))
            } else {
                cmp_keys(&pairs[a].0, &pairs[b].0)
            }
        };
        self.scratch[base..].sort_unstable_by(|&a, &b| cmp(a, b).then(a.cmp(&b)));
        // Drop all but the last entry of each run of equal keys.
        let mut write = base;
        for read in base..self.scratch.len() {
            let idx = self.scratch[read];
            let dup_of_next = self
                .scratch
                .get(read + 1)
                .is_some_and(|&next| cmp(idx, next) == Ordering::Equal);
            if dup_of_next {
                if self.strict {
                    let key = key_text(&pairs[idx].0);
                    self.scratch.truncate(base);
                    return Err(SignatureError::DuplicateKey { path: path(), key });
                }
                continue;
            }
            self.scratch[write] = idx;
            write += 1;
        }
        self.scratch.truncate(write);
        if rememberable
            && write - base == pairs.len()
            && pairs.len() <= ORDER_MAX_KEYS
            && pairs.iter().map(|(k, _)| key_bytes(k).len()).sum::<usize>() <= ORDER_MAX_KEY_BYTES
        {
            ORDERS.with(|o| {
                let Ok(mut orders) = o.try_borrow_mut() else {
                    return;
                };
                if orders.len() <= place {
                    orders.resize_with(place + 1, Order::default);
                }
                let order = &mut orders[place];
                order.bin = bin;
                order.keys.clear();
                order.ends.clear();
                for (k, _) in pairs {
                    order.keys.extend_from_slice(key_bytes(k));
                    order.ends.push(order.keys.len() as u32);
                }
                order.order.clear();
                order
                    .order
                    .extend(self.scratch[base..write].iter().map(|&i| i as u32));
            });
        }
        Ok(base..write)
    }

    /// `recursive_keypairs`: one (name, str(value)) per non-map leaf, maps flattened.
    pub(crate) fn fields<'v, 'a>(
        &mut self,
        pairs: &'v [(ValueRef<'a>, ValueRef<'a>)],
        prefix: &mut Vec<&'v ValueRef<'a>>,
    ) -> Result<(), SignatureError> {
        let top = prefix.is_empty();
        let range = self.sort_entries(pairs, &|| name_text(prefix, None))?;
        let base = range.start;
        for j in range {
            let (k, v) = &pairs[self.scratch[j]];
            if top && matches!(k, ValueRef::Str(s) if *s == SIGNATURE_FIELD) {
                continue;
            }
            if let ValueRef::Map(inner) = v {
                prefix.push(k);
                let r = self.fields(inner, prefix);
                prefix.pop();
                r?;
                continue;
            }
            for p in prefix.iter() {
                self.key_str(p)?;
                self.out.byte(b':');
            }
            self.key_str(k)?;
            self.value_str(v, &|| name_text(prefix, Some(k)))?;
        }
        self.scratch.truncate(base);
        Ok(())
    }

    /// `'%s' % key`: only str and bin keys occur in strict mode.
    fn key_str(&mut self, k: &ValueRef<'_>) -> Result<(), SignatureError> {
        match k {
            ValueRef::Map(_) => self.converted_repr(k, &String::new),
            _ => self.value_str(k, &String::new),
        }
    }

    /// Python `str(value)` for a non-map value.
    fn value_str(
        &mut self,
        v: &ValueRef<'_>,
        path: &dyn Fn() -> String,
    ) -> Result<(), SignatureError> {
        match v {
            ValueRef::Str(s) => self.out.put(s.as_bytes()),
            ValueRef::Array(_) => return self.converted_repr(v, path),
            _ => self.scalar_repr(v),
        }
        Ok(())
    }

    /// repr of the values whose `str()` and `repr()` agree once strings are excluded.
    fn scalar_repr(&mut self, v: &ValueRef<'_>) {
        match v {
            ValueRef::Nil => self.out.put(b"None"),
            ValueRef::Bool(true) => self.out.put(b"True"),
            ValueRef::Bool(false) => self.out.put(b"False"),
            ValueRef::Int(i) => pyrepr::int(self.out, i),
            ValueRef::UInt(u) => pyrepr::int(self.out, u),
            ValueRef::Float(f) => pyrepr::float(self.out, *f),
            ValueRef::Bin(b) => pyrepr::bytes(self.out, b),
            ValueRef::Str(s) => pyrepr::str(self.out, s),
            // Only reached for keys in the lenient fallback.
            ValueRef::Array(_) | ValueRef::Map(_) => self.out.put(b"?"),
        }
    }

    /// repr of `decode_unicode(v)`: str becomes bytes, bin becomes str, maps are sorted.
    fn converted_repr(
        &mut self,
        v: &ValueRef<'_>,
        path: &dyn Fn() -> String,
    ) -> Result<(), SignatureError> {
        match v {
            ValueRef::Str(s) => pyrepr::bytes(self.out, s.as_bytes()),
            ValueRef::Bin(b) => match std::str::from_utf8(b) {
                Ok(s) => pyrepr::str(self.out, s),
                Err(_) if self.strict => return Err(SignatureError::BinNotUtf8 { path: path() }),
                Err(_) => pyrepr::str(self.out, &String::from_utf8_lossy(b)),
            },
            ValueRef::Array(items) => {
                self.out.byte(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.put(b", ");
                    }
                    self.converted_repr(item, path)?;
                }
                self.out.byte(b']');
            }
            ValueRef::Map(pairs) => {
                let range = self.sort_entries(pairs, path)?;
                let base = range.start;
                self.out.byte(b'{');
                for j in range {
                    let (k, v) = &pairs[self.scratch[j]];
                    if j > base {
                        self.out.put(b", ");
                    }
                    self.converted_repr(k, path)?;
                    self.out.put(b": ");
                    self.converted_repr(v, path)?;
                }
                self.out.byte(b'}');
                self.scratch.truncate(base);
            }
            _ => self.scalar_repr(v),
        }
        Ok(())
    }
}

/// A key as text for error messages.
fn key_text(k: &ValueRef<'_>) -> String {
    match k {
        ValueRef::Str(s) => (*s).to_owned(),
        ValueRef::Bin(b) => String::from_utf8_lossy(b).into_owned(),
        _ => format!("<{}>", k.type_name()),
    }
}

/// The `a:b:c` signature name of a field, for error messages.
fn name_text(prefix: &[&ValueRef<'_>], last: Option<&ValueRef<'_>>) -> String {
    let mut s = String::new();
    for k in prefix.iter().copied().chain(last) {
        if !s.is_empty() {
            s.push(':');
        }
        s.push_str(&key_text(k));
    }
    s
}

/// Render the exact bytes ceilometer feeds its HMAC (for tests and debugging).
pub fn signing_input(message: &Value) -> Result<Vec<u8>, SignatureError> {
    let message = message.as_value_ref();
    let ValueRef::Map(pairs) = &message else {
        return Err(SignatureError::NotAMap {
            got: message.type_name(),
        });
    };
    let mut out = Vec::new();
    let mut walker = Walker {
        out: &mut out,
        strict: true,
        scratch: Vec::new(),
        maps: 0,
    };
    walker.fields(pairs, &mut Vec::new())?;
    Ok(out)
}

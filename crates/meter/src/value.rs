//! A decoded msgpack value that keeps every distinction ceilometer's signature can see.

/// One msgpack value. Unlike a JSON value it keeps int vs float, str vs bin, and nil, because
/// ceilometer's signature feeds Python's `str()` of each and those differ.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    /// Any integer that fits in i64.
    Int(i64),
    /// A positive integer above `i64::MAX`.
    UInt(u64),
    /// float32 values are widened to f64, as Python's msgpack does.
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    /// Pairs in wire order. Keys are usually `Str`, but msgpack allows any value.
    Map(Vec<(Value, Value)>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Look a string key up in a map (linear: sample maps hold ~15 keys).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

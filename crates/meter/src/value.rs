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
    /// The msgpack type's name, for error messages (`expected int or float, got str`).
    pub fn type_name(&self) -> &'static str {
        Node::type_name(self)
    }

    pub fn as_str(&self) -> Option<&str> {
        self.str_value()
    }

    /// Look a string key up in a map (linear: sample maps hold ~15 keys).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.get_key(key)
    }

    /// Mutable [`Value::get`].
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self {
            Value::Map(pairs) => pairs
                .iter_mut()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<u64> for Value {
    /// Keeps the `Int`/`UInt` split the decoder makes: `UInt` only above `i64::MAX`.
    fn from(u: u64) -> Self {
        match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(u),
        }
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

/// A decoded msgpack value whose strings and byte strings borrow the bytes it was decoded
/// from ([`crate::decode::decode_value_ref`]): the receive path verifies and converts a
/// sample without allocating its strings (some 65 for a ceilometer instance sample, most in
/// its metadata), and copies only the fields the typed [`crate::Sample`] keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueRef<'a> {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(Vec<ValueRef<'a>>),
    Map(Vec<(ValueRef<'a>, ValueRef<'a>)>),
}

/// What a [`Node`] is, with its payload borrowed: how code that reads a decoded value (the
/// signature, the encoder, the typed sample) takes a [`Value`] and a [`ValueRef`] alike.
#[derive(Debug, Clone, Copy)]
pub enum View<'n, N> {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'n str),
    Bin(&'n [u8]),
    Array(&'n [N]),
    Map(&'n [(N, N)]),
}

/// A decoded msgpack value, owned or borrowed.
pub trait Node: Sized {
    fn view(&self) -> View<'_, Self>;

    /// The msgpack type's name, for error messages.
    fn type_name(&self) -> &'static str {
        match self.view() {
            View::Nil => "nil",
            View::Bool(_) => "bool",
            View::Int(_) | View::UInt(_) => "int",
            View::Float(_) => "float",
            View::Str(_) => "str",
            View::Bin(_) => "bin",
            View::Array(_) => "array",
            View::Map(_) => "map",
        }
    }

    /// Look a string key up in a map (linear: sample maps hold ~15 keys).
    fn get_key(&self, key: &str) -> Option<&Self> {
        match self.view() {
            View::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| matches!(k.view(), View::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn str_value(&self) -> Option<&str> {
        match self.view() {
            View::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Run `f` on this value as a [`ValueRef`] (itself, or an owned value's strings borrowed):
    /// the signature walks that one type.
    fn with_ref<R>(&self, f: impl FnOnce(&ValueRef<'_>) -> R) -> R;

    /// An owned copy.
    fn to_value(&self) -> Value {
        match self.view() {
            View::Nil => Value::Nil,
            View::Bool(b) => Value::Bool(b),
            View::Int(i) => Value::Int(i),
            View::UInt(u) => Value::UInt(u),
            View::Float(f) => Value::Float(f),
            View::Str(s) => Value::Str(s.to_owned()),
            View::Bin(b) => Value::Bin(b.to_vec()),
            View::Array(items) => Value::Array(items.iter().map(Node::to_value).collect()),
            View::Map(pairs) => Value::Map(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_value(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

impl Node for Value {
    #[inline(always)]
    fn view(&self) -> View<'_, Self> {
        match self {
            Value::Nil => View::Nil,
            Value::Bool(b) => View::Bool(*b),
            Value::Int(i) => View::Int(*i),
            Value::UInt(u) => View::UInt(*u),
            Value::Float(f) => View::Float(*f),
            Value::Str(s) => View::Str(s),
            Value::Bin(b) => View::Bin(b),
            Value::Array(items) => View::Array(items),
            Value::Map(pairs) => View::Map(pairs),
        }
    }

    fn with_ref<R>(&self, f: impl FnOnce(&ValueRef<'_>) -> R) -> R {
        f(&self.as_value_ref())
    }

    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl Value {
    /// The same tree with its strings borrowed (its maps and arrays are new vectors).
    pub fn as_value_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Nil => ValueRef::Nil,
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Int(i) => ValueRef::Int(*i),
            Value::UInt(u) => ValueRef::UInt(*u),
            Value::Float(f) => ValueRef::Float(*f),
            Value::Str(s) => ValueRef::Str(s),
            Value::Bin(b) => ValueRef::Bin(b),
            Value::Array(items) => ValueRef::Array(items.iter().map(Value::as_value_ref).collect()),
            Value::Map(pairs) => ValueRef::Map(
                pairs
                    .iter()
                    .map(|(k, v)| (k.as_value_ref(), v.as_value_ref()))
                    .collect(),
            ),
        }
    }
}

impl<'a> Node for ValueRef<'a> {
    #[inline(always)]
    fn view(&self) -> View<'_, Self> {
        match self {
            ValueRef::Nil => View::Nil,
            ValueRef::Bool(b) => View::Bool(*b),
            ValueRef::Int(i) => View::Int(*i),
            ValueRef::UInt(u) => View::UInt(*u),
            ValueRef::Float(f) => View::Float(*f),
            ValueRef::Str(s) => View::Str(s),
            ValueRef::Bin(b) => View::Bin(b),
            ValueRef::Array(items) => View::Array(items),
            ValueRef::Map(pairs) => View::Map(pairs),
        }
    }

    fn with_ref<R>(&self, f: impl FnOnce(&ValueRef<'_>) -> R) -> R {
        f(self)
    }
}

/// Taking a decoded value apart for the typed [`crate::Sample`]: an owned [`Value`] gives up
/// its strings (moved), a [`ValueRef`] copies the ones asked for. `Err` hands the value back
/// when it is not of the kind asked.
pub trait Parts: Node {
    fn into_pairs(self) -> Result<Vec<(Self, Self)>, Self>;
    fn into_items(self) -> Result<Vec<Self>, Self>;
    fn into_string(self) -> Result<String, Self>;
    fn into_bytes(self) -> Result<Vec<u8>, Self>;
    fn into_value(self) -> Value;
}

impl Parts for Value {
    fn into_pairs(self) -> Result<Vec<(Self, Self)>, Self> {
        match self {
            Value::Map(pairs) => Ok(pairs),
            other => Err(other),
        }
    }
    fn into_items(self) -> Result<Vec<Self>, Self> {
        match self {
            Value::Array(items) => Ok(items),
            other => Err(other),
        }
    }
    fn into_string(self) -> Result<String, Self> {
        match self {
            Value::Str(s) => Ok(s),
            other => Err(other),
        }
    }
    fn into_bytes(self) -> Result<Vec<u8>, Self> {
        match self {
            Value::Bin(b) => Ok(b),
            other => Err(other),
        }
    }
    fn into_value(self) -> Value {
        self
    }
}

impl Parts for ValueRef<'_> {
    fn into_pairs(self) -> Result<Vec<(Self, Self)>, Self> {
        match self {
            ValueRef::Map(pairs) => Ok(pairs),
            other => Err(other),
        }
    }
    fn into_items(self) -> Result<Vec<Self>, Self> {
        match self {
            ValueRef::Array(items) => Ok(items),
            other => Err(other),
        }
    }
    fn into_string(self) -> Result<String, Self> {
        match self {
            ValueRef::Str(s) => Ok(s.to_owned()),
            other => Err(other),
        }
    }
    fn into_bytes(self) -> Result<Vec<u8>, Self> {
        match self {
            ValueRef::Bin(b) => Ok(b.to_vec()),
            other => Err(other),
        }
    }
    fn into_value(self) -> Value {
        self.to_value()
    }
}

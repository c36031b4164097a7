//! Message bodies: oslo.messaging's notification envelope, read with a small JSON reader of
//! its own (see the parent module's documentation for why).

use meter::Value;

/// Decode oslo.messaging's v2 envelope: outer JSON `{"oslo.version": "2.0", "oslo.message":
/// "<JSON text>"}` whose inner object has `event_type`, `priority`, `publisher_id`,
/// `message_id`, `timestamp` and `payload` (a list of sample maps). A v1 body (the message
/// object itself, as the `messaging` driver sends it) is accepted too. Returns the inner
/// `message_id` and the samples, JSON ints as `Int`/`UInt`, floats as `Float` (`1.0` stays a
/// float), strings as `Str`, null as `Nil`, objects as `Map` in document order.
pub fn decode_envelope(body: &[u8]) -> Result<(Option<String>, Vec<Value>), String> {
    let outer = json::parse(body).map_err(|e| format!("message body is not JSON: {e}"))?;
    if !matches!(outer, Value::Map(_)) {
        return Err(format!(
            "message body is a JSON {}, not an object",
            json_type(&outer)
        ));
    }
    let message = match outer.get("oslo.version") {
        Some(Value::Str(v)) if v == "2.0" => match outer.get("oslo.message") {
            Some(Value::Str(inner)) => json::parse(inner.as_bytes())
                .map_err(|e| format!("oslo.message is not JSON: {e}"))?,
            Some(other) => {
                return Err(format!(
                    "oslo.message is a JSON {}, not a string",
                    json_type(other)
                ))
            }
            None => return Err("envelope without oslo.message".into()),
        },
        Some(Value::Str(v)) => return Err(format!("unsupported oslo.version {v:?}")),
        Some(other) => {
            return Err(format!(
                "oslo.version is a JSON {}, not a string",
                json_type(other)
            ))
        }
        None => outer,
    };
    let message_id = message
        .get("message_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Value::Map(pairs) = message else {
        return Err(format!(
            "the notification is a JSON {}, not an object",
            json_type(&message)
        ));
    };
    let payload = pairs
        .into_iter()
        .rev() // the last of duplicate keys wins, as in Python
        .find_map(|(k, v)| matches!(&k, Value::Str(s) if s == "payload").then_some(v))
        .ok_or("notification without payload")?;
    let samples = match payload {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if !matches!(item, Value::Map(_)) {
                    return Err(format!(
                        "payload[{i}] is a JSON {}, not a sample object",
                        json_type(item)
                    ));
                }
            }
            items
        }
        one @ Value::Map(_) => vec![one],
        other => {
            return Err(format!(
                "payload is a JSON {}, not a list of samples",
                json_type(&other)
            ))
        }
    };
    Ok((message_id, samples))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Nil => "null",
        Value::Bool(_) => "boolean",
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => "number",
        Value::Str(_) | Value::Bin(_) => "string",
        Value::Array(_) => "array",
        Value::Map(_) => "object",
    }
}

/// A JSON reader that keeps what Python's `json` module writes: int versus float, the exact
/// float (correctly rounded), object member order, and `NaN`/`Infinity`/`-Infinity`.
pub(super) mod json {
    use meter::Value;

    /// Python nests far less; this bounds the recursion on hostile input.
    const MAX_DEPTH: usize = 128;

    pub fn parse(text: &[u8]) -> Result<Value, String> {
        let text = std::str::from_utf8(text).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut p = Parser {
            s: text,
            b: text.as_bytes(),
            i: 0,
        };
        p.ws();
        let v = p.value(0)?;
        p.ws();
        if p.i != p.b.len() {
            return Err(p.err("extra data after the value"));
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a str,
        b: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn err(&self, what: &str) -> String {
            format!("{what} at byte {}", self.i)
        }

        fn peek(&self) -> Option<u8> {
            self.b.get(self.i).copied()
        }

        fn ws(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
                self.i += 1;
            }
        }

        fn expect(&mut self, c: u8) -> Result<(), String> {
            if self.peek() == Some(c) {
                self.i += 1;
                Ok(())
            } else {
                Err(self.err(&format!("expected '{}'", c as char)))
            }
        }

        fn value(&mut self, depth: usize) -> Result<Value, String> {
            if depth > MAX_DEPTH {
                return Err(self.err(&format!("nested deeper than {MAX_DEPTH}")));
            }
            match self.peek() {
                None => Err(self.err("unexpected end")),
                Some(b'{') => self.object(depth),
                Some(b'[') => self.array(depth),
                Some(b'"') => self.string().map(Value::Str),
                Some(b't') => self.literal("true", Value::Bool(true)),
                Some(b'f') => self.literal("false", Value::Bool(false)),
                Some(b'n') => self.literal("null", Value::Nil),
                Some(b'N') => self.literal("NaN", Value::Float(f64::NAN)),
                Some(b'I') => self.literal("Infinity", Value::Float(f64::INFINITY)),
                Some(b'-') if self.b[self.i..].starts_with(b"-Infinity") => {
                    self.literal("-Infinity", Value::Float(f64::NEG_INFINITY))
                }
                Some(b'-' | b'0'..=b'9') => self.number(),
                Some(c) => Err(self.err(&format!("unexpected character {:?}", c as char))),
            }
        }

        fn literal(&mut self, word: &str, v: Value) -> Result<Value, String> {
            if self.b[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                Err(self.err("invalid literal"))
            }
        }

        fn object(&mut self, depth: usize) -> Result<Value, String> {
            self.i += 1;
            let mut pairs = Vec::new();
            self.ws();
            if self.peek() == Some(b'}') {
                self.i += 1;
                return Ok(Value::Map(pairs));
            }
            loop {
                self.ws();
                if self.peek() != Some(b'"') {
                    return Err(self.err("expected a string key"));
                }
                let key = self.string()?;
                self.ws();
                self.expect(b':')?;
                self.ws();
                let v = self.value(depth + 1)?;
                pairs.push((Value::Str(key), v));
                self.ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        return Ok(Value::Map(pairs));
                    }
                    _ => return Err(self.err("expected ',' or '}'")),
                }
            }
        }

        fn array(&mut self, depth: usize) -> Result<Value, String> {
            self.i += 1;
            let mut items = Vec::new();
            self.ws();
            if self.peek() == Some(b']') {
                self.i += 1;
                return Ok(Value::Array(items));
            }
            loop {
                self.ws();
                items.push(self.value(depth + 1)?);
                self.ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b']') => {
                        self.i += 1;
                        return Ok(Value::Array(items));
                    }
                    _ => return Err(self.err("expected ',' or ']'")),
                }
            }
        }

        fn string(&mut self) -> Result<String, String> {
            self.i += 1; // opening quote
            let mut out = String::new();
            let mut start = self.i;
            loop {
                match self.peek() {
                    None => return Err(self.err("unterminated string")),
                    Some(b'"') => {
                        out.push_str(&self.s[start..self.i]);
                        self.i += 1;
                        return Ok(out);
                    }
                    Some(b'\\') => {
                        out.push_str(&self.s[start..self.i]);
                        self.i += 1;
                        self.escape(&mut out)?;
                        start = self.i;
                    }
                    Some(c) if c < 0x20 => {
                        return Err(self.err("control character in string"));
                    }
                    Some(_) => self.i += 1,
                }
            }
        }

        fn escape(&mut self, out: &mut String) -> Result<(), String> {
            let c = self.peek().ok_or_else(|| self.err("unterminated escape"))?;
            self.i += 1;
            match c {
                b'"' => out.push('"'),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let hi = self.hex4()?;
                    let ch =
                        if (0xD800..0xDC00).contains(&hi) && self.b[self.i..].starts_with(b"\\u") {
                            let save = self.i;
                            self.i += 2;
                            let lo = self.hex4()?;
                            if (0xDC00..0xE000).contains(&lo) {
                                char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                            } else {
                                self.i = save; // a lone high surrogate; the next escape stands alone
                                None
                            }
                        } else {
                            char::from_u32(hi)
                        };
                    // Lone surrogates (Python can write them) cannot be in a Rust string.
                    out.push(ch.unwrap_or(char::REPLACEMENT_CHARACTER));
                }
                _ => {
                    self.i -= 1;
                    return Err(self.err("invalid escape"));
                }
            }
            Ok(())
        }

        fn hex4(&mut self) -> Result<u32, String> {
            let h = self
                .s
                .get(self.i..self.i + 4)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .ok_or_else(|| self.err("invalid \\u escape"))?;
            self.i += 4;
            u32::from_str_radix(h, 16).map_err(|_| self.err("invalid \\u escape"))
        }

        fn digits(&mut self) -> usize {
            let start = self.i;
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
            self.i - start
        }

        fn number(&mut self) -> Result<Value, String> {
            let start = self.i;
            if self.peek() == Some(b'-') {
                self.i += 1;
            }
            match self.peek() {
                Some(b'0') => self.i += 1,
                Some(b'1'..=b'9') => {
                    self.digits();
                }
                _ => return Err(self.err("invalid number")),
            }
            let mut float = false;
            if self.peek() == Some(b'.') {
                self.i += 1;
                if self.digits() == 0 {
                    return Err(self.err("invalid number"));
                }
                float = true;
            }
            if let Some(b'e' | b'E') = self.peek() {
                self.i += 1;
                if let Some(b'+' | b'-') = self.peek() {
                    self.i += 1;
                }
                if self.digits() == 0 {
                    return Err(self.err("invalid number"));
                }
                float = true;
            }
            let text = &self.s[start..self.i];
            if float {
                // Rust's float parsing is correctly rounded, so Python's repr round-trips.
                return text
                    .parse::<f64>()
                    .map(Value::Float)
                    .map_err(|_| self.err("invalid number"));
            }
            if let Ok(i) = text.parse::<i64>() {
                Ok(Value::Int(i))
            } else if let Ok(u) = text.parse::<u64>() {
                Ok(Value::UInt(u))
            } else {
                Err(self.err(&format!("integer {text} out of the 64-bit range")))
            }
        }
    }
}

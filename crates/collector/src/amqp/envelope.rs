//! Message bodies: oslo.messaging's notification envelope into sample maps, with a JSON reader
//! of our own (see the module doc of `amqp` for why serde_json does not do).

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
mod json {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(inner: &str) -> Vec<u8> {
        let quoted = json_quote(inner);
        format!("{{\"oslo.version\": \"2.0\", \"oslo.message\": {quoted}}}").into_bytes()
    }

    /// JSON string literal for `s` (what Python's json.dumps does to the inner text).
    fn json_quote(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }

    #[test]
    fn decodes_a_v2_envelope_keeping_int_and_float_apart() {
        let inner = r#"{"message_id": "m-1", "publisher_id": "telemetry.publisher.h",
            "event_type": "metering", "priority": "SAMPLE", "timestamp": "2026-01-01 00:00:00",
            "payload": [{"counter_volume": 1.0, "b": 1, "c": -7, "d": 18446744073709551615,
                         "e": 0.1, "f": 1e-05, "g": 1.7976931348623157e+308, "h": null,
                         "i": true, "j": "\u00fc\ud83d\ude00", "k": {"z": 1, "a": [1, 2.5]},
                         "l": -0.0, "m": NaN, "n": -Infinity, "o": 12345678901234567890.0}]}"#;
        let (id, samples) = decode_envelope(&envelope(inner)).unwrap();
        assert_eq!(id.as_deref(), Some("m-1"));
        assert_eq!(samples.len(), 1);
        let v = &samples[0];
        assert_eq!(v.get("counter_volume"), Some(&Value::Float(1.0)));
        assert_eq!(v.get("b"), Some(&Value::Int(1)));
        assert_eq!(v.get("c"), Some(&Value::Int(-7)));
        assert_eq!(v.get("d"), Some(&Value::UInt(u64::MAX)));
        assert_eq!(v.get("e"), Some(&Value::Float(0.1)));
        assert_eq!(v.get("f"), Some(&Value::Float(1e-5)));
        assert_eq!(v.get("g"), Some(&Value::Float(f64::MAX)));
        assert_eq!(v.get("h"), Some(&Value::Nil));
        assert_eq!(v.get("i"), Some(&Value::Bool(true)));
        assert_eq!(v.get("j"), Some(&s("ü😀")));
        assert_eq!(
            v.get("k"),
            Some(&Value::Map(vec![
                (s("z"), Value::Int(1)),
                (s("a"), Value::Array(vec![Value::Int(1), Value::Float(2.5)])),
            ]))
        );
        match v.get("l") {
            Some(Value::Float(f)) => assert!(*f == 0.0 && f.is_sign_negative()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(v.get("m"), Some(Value::Float(f)) if f.is_nan()));
        assert_eq!(v.get("n"), Some(&Value::Float(f64::NEG_INFINITY)));
        assert_eq!(v.get("o"), Some(&Value::Float(12345678901234567890.0)));
        // Document order is kept.
        let Value::Map(pairs) = v else { panic!() };
        let keys: Vec<_> = pairs.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys[..4], ["counter_volume", "b", "c", "d"]);
    }

    #[test]
    fn floats_are_correctly_rounded() {
        // Shortest repr strings Python writes for awkward doubles; each must come back exact.
        for f in [
            0.1 + 0.2,
            1.0 / 3.0,
            2.2250738585072014e-308,
            5e-324,
            9007199254740993.0,
            123456.789e3,
            0.30000000000000004,
            4.35,
        ] {
            let text = format!("{{\"payload\": [{{\"v\": {f:?}}}]}}");
            let (_, samples) = decode_envelope(text.as_bytes()).unwrap();
            assert_eq!(samples[0].get("v"), Some(&Value::Float(f)), "{text}");
        }
    }

    #[test]
    fn accepts_a_v1_message_and_a_single_map_payload() {
        let body = br#"{"message_id": "x", "priority": "SAMPLE", "payload": [{"a": 1}, {"a": 2}]}"#;
        let (id, samples) = decode_envelope(body).unwrap();
        assert_eq!(id.as_deref(), Some("x"));
        assert_eq!(samples.len(), 2);
        let (id, samples) = decode_envelope(br#"{"payload": {"a": 1}}"#).unwrap();
        assert_eq!(id, None);
        assert_eq!(samples, vec![Value::Map(vec![(s("a"), Value::Int(1))])]);
        let (_, samples) = decode_envelope(&envelope(r#"{"payload": []}"#)).unwrap();
        assert!(samples.is_empty());
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "unexpected end"),
            (b"\xff\xfe", "not UTF-8"),
            (b"[1, 2]", "JSON array, not an object"),
            (b"{\"oslo.version\": \"2.0\"}", "without oslo.message"),
            (
                b"{\"oslo.version\": \"3.0\", \"oslo.message\": \"{}\"}",
                "unsupported oslo.version",
            ),
            (
                b"{\"oslo.version\": 2, \"oslo.message\": \"{}\"}",
                "oslo.version is a JSON number",
            ),
            (
                b"{\"oslo.version\": \"2.0\", \"oslo.message\": {}}",
                "oslo.message is a JSON object",
            ),
            (
                b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"{\\\"payload\\\": [\"}",
                "oslo.message is not JSON",
            ),
            (
                b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"[]\"}",
                "notification is a JSON array",
            ),
            (b"{\"message_id\": \"m\"}", "without payload"),
            (b"{\"payload\": \"x\"}", "payload is a JSON string"),
            (b"{\"payload\": [{}, 3]}", "payload[1] is a JSON number"),
            (b"{\"payload\": [{\"a\": 1}]} x", "extra data"),
            (b"{\"payload\": [{\"a\": 01}]}", "expected ',' or '}'"),
            (b"{\"payload\": [{\"a\": 1.}]}", "invalid number"),
            (b"{\"payload\": [{\"a\": 1e}]}", "invalid number"),
            (
                b"{\"payload\": [{\"a\": 99999999999999999999}]}",
                "out of the 64-bit range",
            ),
            (
                b"{\"payload\": [{\"a\": -9999999999999999999}]}",
                "out of the 64-bit range",
            ),
            (b"{\"payload\": [{\"a\": \"x\ty\"}]}", "control character"),
            (b"{\"payload\": [{\"a\": \"\\x\"}]}", "invalid escape"),
            (b"{\"payload\": [{\"a\": \"\\u12\"}]}", "invalid \\u escape"),
            (b"{\"payload\": [{\"a\": \"abc}]}", "unterminated string"),
            (b"{\"payload\": [{\"a\": tru}]}", "invalid literal"),
            (b"{\"payload\": [{1: 2}]}", "expected a string key"),
            (b"{\"payload\" [{}]}", "expected ':'"),
        ];
        for (body, want) in cases {
            let err = decode_envelope(body).unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: got {err:?}, want {want:?}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        let err = decode_envelope(format!("{{\"payload\": {deep}}}").as_bytes()).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn surrogates_pair_up_and_lone_ones_are_replaced() {
        let (_, v) = decode_envelope(
            br#"{"payload": [{"a": "\ud83d\ude00", "b": "x\ud800y", "c": "\udc00\ud800\u0041"}]}"#,
        )
        .unwrap();
        assert_eq!(v[0].get("a"), Some(&s("😀")));
        assert_eq!(v[0].get("b"), Some(&s("x\u{fffd}y")));
        assert_eq!(v[0].get("c"), Some(&s("\u{fffd}\u{fffd}A")));
    }
}

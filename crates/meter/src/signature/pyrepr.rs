//! The text Python's `str()` and `repr()` give for the values ceilometer feeds its HMAC.
//!
//! Everything writes into a [`Sink`] so the signature streams into the HMAC without building
//! a string per sample; tests render into a `Vec<u8>` and compare with what Python prints.

use std::fmt::{self, Write as _};

use super::unprintable::UNPRINTABLE;

/// Where rendered bytes go: the HMAC in production, a `Vec<u8>` in tests.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);

    fn byte(&mut self, b: u8) {
        self.put(&[b]);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn byte(&mut self, b: u8) {
        self.push(b);
    }
}

/// A small stack buffer for `core::fmt` output (numbers), so formatting allocates nothing.
struct StackBuf {
    buf: [u8; 48],
    len: usize,
}

impl StackBuf {
    fn new() -> Self {
        StackBuf {
            buf: [0; 48],
            len: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// An integer [`int`] can write.
pub(crate) trait Int: Copy {
    fn write(self, buf: &mut itoa::Buffer) -> &str;
}

impl Int for &i64 {
    fn write(self, buf: &mut itoa::Buffer) -> &str {
        buf.format(*self)
    }
}

impl Int for &u64 {
    fn write(self, buf: &mut itoa::Buffer) -> &str {
        buf.format(*self)
    }
}

/// Python `str(int)` (= `repr`): decimal. `itoa` rather than `core::fmt`, whose machinery cost
/// ~800 instructions per integer, most of a sample's integers' share of the signature.
pub(crate) fn int(out: &mut impl Sink, v: impl Int) {
    let mut buf = itoa::Buffer::new();
    out.put(v.write(&mut buf).as_bytes());
}

/// Python `repr(float)` (= `str(float)` since Python 3.2): the shortest digits that round-trip,
/// fixed notation when the decimal exponent is in [-4, 16), scientific otherwise.
pub(crate) fn float(out: &mut impl Sink, f: f64) {
    if f.is_nan() {
        return out.put(b"nan");
    }
    if f.is_infinite() {
        return out.put(if f > 0.0 { b"inf" } else { b"-inf" });
    }
    if f.is_sign_negative() {
        out.byte(b'-');
    }
    // ryu, like Python's dtoa, picks the shortest digits that round-trip, the closest of
    // those, and the even one on an exact tie (`core::fmt` rounds such ties up:
    // 117220855192733.625 must print as ...733.62). Only the layout differs, so take the
    // digits and the decimal exponent from ryu's text, whatever its layout.
    let mut buf = ryu::Buffer::new();
    let (digits, decpt) = Digits::parse(buf.format_finite(f.abs()));
    let digits = digits.as_slice();
    // Scientific exponent is decpt - 1.
    if (-3..=16).contains(&decpt) {
        if decpt <= 0 {
            out.put(b"0.");
            for _ in 0..-decpt {
                out.byte(b'0');
            }
            out.put(digits);
        } else {
            let decpt = decpt as usize;
            if decpt < digits.len() {
                out.put(&digits[..decpt]);
                out.byte(b'.');
                out.put(&digits[decpt..]);
            } else {
                out.put(digits);
                for _ in digits.len()..decpt {
                    out.byte(b'0');
                }
                out.put(b".0");
            }
        }
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        out.put(first);
        if !rest.is_empty() {
            out.byte(b'.');
            out.put(rest);
        }
        let exp = decpt - 1;
        out.byte(b'e');
        out.byte(if exp < 0 { b'-' } else { b'+' });
        let mut b = StackBuf::new();
        let _ = write!(b, "{:02}", exp.unsigned_abs());
        out.put(b.bytes());
    }
}

/// Significant decimal digits of a float (no leading or trailing zeros; `0` for zero).
struct Digits {
    buf: [u8; 24],
    len: usize,
}

impl Digits {
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Parse `[digits][.digits][e[-]exp]` into digits `d1 d2 ...` and `decpt` such that the
    /// value is `0.d1d2... × 10^decpt`.
    fn parse(s: &str) -> (Digits, i32) {
        let s = s.as_bytes();
        let e_at = s
            .iter()
            .position(|&c| c == b'e' || c == b'E')
            .unwrap_or(s.len());
        let exp: i32 = s
            .get(e_at + 1..)
            .and_then(|e| std::str::from_utf8(e).ok())
            .and_then(|e| e.parse().ok())
            .unwrap_or(0);
        let mut d = Digits {
            buf: [0; 24],
            len: 0,
        };
        let mut decpt = 0i32;
        let mut seen_point = false;
        let mut leading = true;
        for &c in &s[..e_at] {
            match c {
                b'.' => seen_point = true,
                b'0'..=b'9' => {
                    if leading && c == b'0' {
                        if seen_point {
                            decpt -= 1;
                        }
                        continue;
                    }
                    leading = false;
                    if !seen_point {
                        decpt += 1;
                    }
                    if d.len < d.buf.len() {
                        d.buf[d.len] = c;
                        d.len += 1;
                    }
                }
                _ => {}
            }
        }
        while d.len > 0 && d.buf[d.len - 1] == b'0' {
            d.len -= 1;
        }
        if d.len == 0 {
            // Zero: Python prints 0.0, i.e. digit "0" with the point after it.
            d.buf[0] = b'0';
            d.len = 1;
            return (d, 1);
        }
        (d, decpt + exp)
    }
}

/// Python's choice of quote for a str or bytes repr: `'` unless the text holds `'` and no `"`.
fn quote_for(bytes: &[u8]) -> u8 {
    if bytes.contains(&b'\'') && !bytes.contains(&b'"') {
        b'"'
    } else {
        b'\''
    }
}

fn hex_escape(out: &mut impl Sink, b: u8) {
    out.put(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 0xf)],
    ]);
}

/// Python `repr(bytes)`: `b'...'`.
pub(crate) fn bytes(out: &mut impl Sink, data: &[u8]) {
    let quote = quote_for(data);
    out.byte(b'b');
    out.byte(quote);
    let mut literal_from = 0;
    for (i, &b) in data.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'\\' => Some(b"\\\\"),
            b'\t' => Some(b"\\t"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            _ if b == quote => Some(if quote == b'\'' { b"\\'" } else { b"\\\"" }),
            0x20..=0x7e => continue,
            _ => None,
        };
        out.put(&data[literal_from..i]);
        literal_from = i + 1;
        match escape {
            Some(e) => out.put(e),
            None => hex_escape(out, b),
        }
    }
    out.put(&data[literal_from..]);
    out.byte(quote);
}

fn printable(c: char) -> bool {
    let c = u32::from(c);
    UNPRINTABLE
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_err()
}

/// Python `repr(str)`: `'...'`, escaping what `str.isprintable()` refuses.
pub(crate) fn str(out: &mut impl Sink, s: &str) {
    let quote = quote_for(s.as_bytes());
    out.byte(quote);
    let mut literal_from = 0;
    for (i, c) in s.char_indices() {
        let code = u32::from(c);
        let plain = match c {
            '\\' | '\t' | '\n' | '\r' => false,
            _ if code == u32::from(quote) => false,
            ' '..='~' => true,
            _ if code < 0x80 => false,
            _ => printable(c),
        };
        if plain {
            continue;
        }
        out.put(&s.as_bytes()[literal_from..i]);
        literal_from = i + c.len_utf8();
        match c {
            '\\' => out.put(b"\\\\"),
            '\t' => out.put(b"\\t"),
            '\n' => out.put(b"\\n"),
            '\r' => out.put(b"\\r"),
            _ if code == u32::from(quote) => {
                out.byte(b'\\');
                out.byte(quote);
            }
            _ if code <= 0xff => hex_escape(out, code as u8),
            _ => {
                let (prefix, width) = if code <= 0xffff {
                    (b"\\u", 4)
                } else {
                    (b"\\U", 8)
                };
                out.put(prefix);
                for shift in (0..width).rev() {
                    out.byte(HEX[((code >> (shift * 4)) & 0xf) as usize]);
                }
            }
        }
    }
    out.put(&s.as_bytes()[literal_from..]);
    out.byte(quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn floats_like_python() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (1.5, "1.5"),
            (3.0, "3.0"),
            (0.1, "0.1"),
            (0.30000000000000004, "0.30000000000000004"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (123456789012345.6, "123456789012345.6"),
            (1234567890123456.8, "1234567890123456.8"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
            (-f64::NAN, "nan"),
            (f64::from(0.1f32), "0.10000000149011612"),
            // Exactly 117220855192733.625: a tie Python (and ryu) round to even.
            (f64::from_bits(0x42da_a726_dbc7_2768), "117220855192733.62"),
            (100.0, "100.0"),
            (0.00012, "0.00012"),
            (1e100, "1e+100"),
        ];
        for &(f, want) in cases {
            assert_eq!(render(|o| float(o, f)), want, "{f:e}");
        }
    }

    #[test]
    fn ints_like_python() {
        for v in [0i64, 1, -1, 9, 10, -10, 1234567890, i64::MAX, i64::MIN] {
            assert_eq!(render(|o| int(o, &v)), v.to_string());
        }
        for v in [0u64, 10, u64::MAX, 1 << 63] {
            assert_eq!(render(|o| int(o, &v)), v.to_string());
        }
    }

    #[test]
    fn bytes_like_python() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "b''"),
            (b"abc", "b'abc'"),
            (b"it's", "b\"it's\""),
            (b"\"x\"", "b'\"x\"'"),
            (b"'\"", "b'\\'\"'"),
            (b"\\", "b'\\\\'"),
            (
                b"\t\n\r\x00\x1f\x7f\x80\xff",
                "b'\\t\\n\\r\\x00\\x1f\\x7f\\x80\\xff'",
            ),
            ("ü".as_bytes(), "b'\\xc3\\xbc'"),
        ];
        for &(b, want) in cases {
            assert_eq!(render(|o| bytes(o, b)), want);
        }
    }

    #[test]
    fn str_like_python() {
        let cases: &[(&str, &str)] = &[
            ("", "''"),
            ("abc", "'abc'"),
            ("it's", "\"it's\""),
            ("'\"", "'\\'\"'"),
            ("ü✓😀", "'ü✓😀'"),
            ("\u{7f}\u{80}\u{a0}\u{ad}", "'\\x7f\\x80\\xa0\\xad'"),
            ("\u{2028}\u{200b}\u{feff}", "'\\u2028\\u200b\\ufeff'"),
            ("\u{e0001}\u{10ffff}", "'\\U000e0001\\U0010ffff'"),
            ("a\tb\\", "'a\\tb\\\\'"),
        ];
        for &(s, want) in cases {
            assert_eq!(render(|o| str(o, s)), want, "{s:?}");
        }
    }
}

//! Text that came from the network, made safe to log.
//!
//! A sample's `message_id`, a field name, a frame's decode error or a storage error quoting a
//! value can hold anything, newlines included: logged raw, a datagram could write a forged
//! line (`\n2026-… ERROR collector[1] …`) into the log. [`Untrusted`] displays such text with
//! control characters escaped (`\n`, `\r`, `\t`, `\u{1b}` …) and cut to a bounded length.

use std::fmt::{self, Display, Write};

/// Characters of untrusted text shown in a log line; the rest is elided with a count.
pub const MAX_CHARS: usize = 256;

/// Displays `self.0` escaped and capped (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == MAX_CHARS {
                return write!(f, "…({} more bytes)", self.0.len() - i);
            }
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                // C0, DEL, C1 controls, and the Unicode line/paragraph separators and bidi
                // controls that can make a log line read differently than it is.
                c if c.is_control()
                    || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
                {
                    write!(f, "\\u{{{:x}}}", c as u32)?
                }
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Shorthand for values that are not `&str` yet (errors quoting input): `untrusted(&e)`.
pub fn untrusted(v: &impl Display) -> String {
    Untrusted(&v.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let forged =
            "id\n2026-11-30T10:00:00Z ERROR collector[1] FORGED\r\t\u{1b}[31m\u{85}\u{2028}";
        let s = Untrusted(forged).to_string();
        assert!(!s.chars().any(|c| c.is_control()), "{s:?}");
        assert_eq!(
            s,
            "id\\n2026-11-30T10:00:00Z ERROR collector[1] FORGED\\r\\t\\u{1b}[31m\\u{85}\\u{2028}"
        );
        assert_eq!(Untrusted("a\\nb").to_string(), "a\\\\nb");
    }

    #[test]
    fn long_text_is_capped() {
        let long = "é".repeat(1000);
        let s = Untrusted(&long).to_string();
        assert!(s.starts_with(&"é".repeat(MAX_CHARS)));
        assert!(s.ends_with(&format!("…({} more bytes)", 2 * (1000 - MAX_CHARS))));
        assert_eq!(Untrusted("short").to_string(), "short");
    }
}

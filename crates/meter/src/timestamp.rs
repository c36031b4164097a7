//! Timestamp normalization to UTC (DESIGN §6).

use time::format_description::well_known::Iso8601;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Why a timestamp was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid timestamp {value:?}: {reason}")]
pub struct TimestampError {
    pub value: String,
    pub reason: String,
}

/// Parse any ISO 8601 form ceilometer's publishers send and return it in UTC.
///
/// Accepts `2014-01-01T12:00:00`, a space instead of `T`, fractional seconds (up to
/// nanoseconds; ceilometer sends microseconds), and `Z` or `±HH:MM` offsets. A naive
/// timestamp is UTC.
pub fn parse_timestamp(s: &str) -> Result<OffsetDateTime, TimestampError> {
    if let Some(t) = parse_common(s.as_bytes()) {
        return Ok(t);
    }
    parse_general(s)
}

/// The general parser (the `time` crate's ISO 8601), for what [`parse_common`] leaves.
fn parse_general(s: &str) -> Result<OffsetDateTime, TimestampError> {
    let err = |reason: &str| TimestampError {
        value: s.chars().take(64).collect(),
        reason: reason.to_string(),
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(err("empty"));
    }
    if t.len() > 64 {
        return Err(err("too long"));
    }
    // Normalise a space separator to 'T' so one parser serves both.
    let owned;
    let t = if t.as_bytes().get(10) == Some(&b' ') {
        owned = format!("{}T{}", &t[..10], &t[11..]);
        owned.as_str()
    } else {
        t
    };
    if let Ok(dt) = OffsetDateTime::parse(t, &Iso8601::DEFAULT) {
        // An offset can move the last representable day past year 9999: refused, not a panic.
        return dt
            .checked_to_offset(UtcOffset::UTC)
            .ok_or_else(|| err("out of range once converted to UTC"));
    }
    match PrimitiveDateTime::parse(t, &Iso8601::DEFAULT) {
        Ok(naive) => Ok(naive.assume_utc()),
        Err(e) => Err(err(&e.to_string())),
    }
}

/// `N` ASCII digits as a number, or `None`.
#[inline]
fn digits<const N: usize>(b: &[u8]) -> Option<u32> {
    let b = b.get(..N)?;
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

/// The form ceilometer's `isoformat()` gives, without the general parser:
/// `YYYY-MM-DD[T ]HH:MM:SS[.f{1,9}][Z|±HH:MM]`, nothing around it. Anything else (and any field
/// out of its usual range) is `None` and goes to [`parse_general`], so this path only ever
/// answers what that parser would (a property test compares them).
fn parse_common(b: &[u8]) -> Option<OffsetDateTime> {
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let year = digits::<4>(b)?;
    let month = digits::<2>(&b[5..])?;
    let day = digits::<2>(&b[8..])?;
    let hour = digits::<2>(&b[11..])?;
    let minute = digits::<2>(&b[14..])?;
    let second = digits::<2>(&b[17..])?;
    if year < 1000 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if let Some((b'.', frac)) = rest.split_first() {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        for &c in &frac[..n] {
            nanos = nanos * 10 + u32::from(c - b'0');
        }
        nanos *= 10u32.pow(9 - n as u32);
        rest = &frac[n..];
    }
    let offset_seconds: i32 = match rest {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = digits::<2>(&[*h1, *h2])?;
            let m = digits::<2>(&[*m1, *m2])?;
            if h > 23 || m > 59 {
                return None;
            }
            let secs = (h * 3600 + m * 60) as i32;
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year as i32, month, day as u8).ok()?;
    let time = time::Time::from_hms_nano(hour as u8, minute as u8, second as u8, nanos).ok()?;
    let utc = PrimitiveDateTime::new(date, time)
        .assume_utc()
        .checked_sub(time::Duration::seconds(i64::from(offset_seconds)))?;
    Some(utc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn naive_is_utc() {
        assert_eq!(
            parse_timestamp("2014-01-01T12:00:00").unwrap(),
            datetime!(2014-01-01 12:00:00 UTC)
        );
    }

    #[test]
    fn zulu_and_offsets_normalize() {
        assert_eq!(
            parse_timestamp("2014-01-01T12:00:00Z").unwrap(),
            datetime!(2014-01-01 12:00:00 UTC)
        );
        assert_eq!(
            parse_timestamp("2014-01-01T12:00:00+02:00").unwrap(),
            datetime!(2014-01-01 10:00:00 UTC)
        );
        assert_eq!(
            parse_timestamp("2014-01-01T00:30:00-01:00").unwrap(),
            datetime!(2014-01-01 01:30:00 UTC)
        );
        assert_eq!(
            parse_timestamp("2026-11-01T00:00:00.000000+00:00").unwrap(),
            datetime!(2026-11-01 00:00:00 UTC)
        );
    }

    #[test]
    fn fractional_seconds_kept() {
        assert_eq!(
            parse_timestamp("2026-11-02T01:01:07.000001+00:00").unwrap(),
            datetime!(2026-11-02 01:01:07.000001 UTC)
        );
        assert_eq!(
            parse_timestamp("2026-11-02 01:01:07.5").unwrap(),
            datetime!(2026-11-02 01:01:07.5 UTC)
        );
    }

    #[test]
    fn an_offset_past_the_last_year_is_an_error_not_a_panic() {
        for s in ["9999-12-31T23:00:00-05:00", "9999-12-31T23:59:59.999-00:01"] {
            let e = parse_timestamp(s).unwrap_err();
            assert!(e.reason.contains("out of range"), "{s}: {e}");
        }
        assert_eq!(
            parse_timestamp("9999-12-31T23:00:00+05:00").unwrap(),
            datetime!(9999-12-31 18:00:00 UTC)
        );
    }

    /// The fast path answers exactly what the general parser answers, wherever it answers.
    #[test]
    fn fast_path_agrees_with_the_general_parser() {
        let mut cases = vec![
            "2026-11-02T01:01:07.000001+00:00".to_string(),
            "2026-11-02 01:01:07.5".to_string(),
            "2026-11-02T01:01:07Z".to_string(),
            "2026-11-02T01:01:07.123456789-03:30".to_string(),
            "2024-02-29T23:59:59.999999+23:59".to_string(),
            "1000-01-01T00:00:00-23:59".to_string(),
            "9999-12-31T23:59:59.999999999+00:00".to_string(),
        ];
        // Every field at and around its bounds, in every layout the fast path takes.
        for (y, mo, d) in [
            (2023, 2, 29),
            (2024, 2, 29),
            (2026, 4, 31),
            (2026, 13, 1),
            (2026, 0, 1),
        ] {
            for (h, mi, s) in [
                (0, 0, 0),
                (23, 59, 59),
                (24, 0, 0),
                (23, 60, 0),
                (23, 59, 60),
            ] {
                for frac in ["", ".1", ".123456", ".123456789", ".1234567890", "."] {
                    for off in [
                        "", "Z", "+00:00", "-00:00", "+05:30", "-23:59", "+24:00", "+0530", "z",
                    ] {
                        for sep in ['T', ' ', 't'] {
                            cases.push(format!(
                                "{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{off}"
                            ));
                        }
                    }
                }
            }
        }
        let mut fast = 0;
        for c in &cases {
            if let Some(t) = parse_common(c.as_bytes()) {
                fast += 1;
                assert_eq!(parse_general(c), Ok(t), "{c}");
            }
        }
        assert!(
            fast > 80,
            "the fast path took only {fast} of {}",
            cases.len()
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for bad in [
            "",
            "yesterday",
            "2014-13-01T00:00:00",
            "2014-01-01T25:00:00",
            "2014-01-01T12:00:00+99:00",
            "\u{0}",
        ] {
            let e = parse_timestamp(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid timestamp"), "{e}");
        }
    }
}

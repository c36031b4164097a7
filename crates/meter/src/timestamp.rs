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
        return Ok(dt.to_offset(UtcOffset::UTC));
    }
    match PrimitiveDateTime::parse(t, &Iso8601::DEFAULT) {
        Ok(naive) => Ok(naive.assume_utc()),
        Err(e) => Err(err(&e.to_string())),
    }
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

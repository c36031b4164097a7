//! Splitting a `[database] connection` URL into its scheme and the driver-specific rest.
//!
//! Connection strings follow SQLAlchemy's form (`dialect+driver://user:pw@host:port/db`) so a
//! `ceilometer.conf` value works unchanged. Only the scheme is interpreted here; each driver
//! parses the remainder itself, because SQLite's "path after three or four slashes" has little
//! in common with a server URL.

use crate::StorageError;

/// A connection URL cut at `://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageUrl<'a> {
    /// Lower-cased, e.g. `sqlite`, `postgresql+psycopg2`.
    pub scheme: String,
    /// Everything after `://`, verbatim.
    pub rest: &'a str,
    /// The whole URL, for error messages (use [`redact`] before showing it).
    pub original: &'a str,
}

impl<'a> StorageUrl<'a> {
    pub fn parse(url: &'a str) -> Result<Self, StorageError> {
        let bad = |reason: &str| StorageError::BadUrl {
            url: redact(url),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected SCHEME://..., e.g. sqlite:///data/collector.db"))?;
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.');
        if scheme.is_empty() || !scheme.chars().all(valid) {
            return Err(bad("the scheme must be letters, digits, '+', '-' or '.'"));
        }
        Ok(StorageUrl {
            scheme: scheme.to_ascii_lowercase(),
            rest,
            original: url,
        })
    }

    /// A [`StorageError::BadUrl`] for this URL.
    pub fn error(&self, reason: impl Into<String>) -> StorageError {
        StorageError::BadUrl {
            url: redact(self.original),
            reason: reason.into(),
        }
    }
}

/// Whether a URL query parameter names a secret (`password`, `sslpassword`, `pwd`, …).
pub fn is_secret_param(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "credential"]
        .iter()
        .any(|s| k.contains(s))
}

/// A query parameter's value as it may be shown: `***` for a secret.
pub fn shown_param<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret_param(key) {
        "***"
    } else {
        value
    }
}

/// The URL with any password in its authority part, and any secret query parameter,
/// replaced by `***`, fit for logs.
pub fn redact(url: &str) -> String {
    let url = &match url.split_once('?') {
        Some((head, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => format!("{k}={}", shown_param(k, v)),
                    None => kv.to_string(),
                })
                .collect();
            format!("{head}?{}", q.join("&"))
        }
        None => url.to_string(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!("{scheme}://{}:***{}", &authority[..colon], &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_scheme_case_insensitively() {
        let u = StorageUrl::parse("PostgreSQL+psycopg2://u:p@h/db").unwrap();
        assert_eq!(u.scheme, "postgresql+psycopg2");
        assert_eq!(u.rest, "u:p@h/db");
    }

    #[test]
    fn rejects_urls_without_scheme() {
        for bad in ["/var/lib/x.db", "sqlite:/x.db", "://x", "sq lite://x"] {
            let e = StorageUrl::parse(bad).unwrap_err();
            assert!(matches!(e, StorageError::BadUrl { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("mysql+pymysql://ceilo:s3cr3t@db:3306/ceilometer?charset=utf8"),
            "mysql+pymysql://ceilo:***@db:3306/ceilometer?charset=utf8"
        );
        assert_eq!(redact("postgresql://ceilo@db/c"), "postgresql://ceilo@db/c");
        assert_eq!(
            redact("sqlite:////var/lib/a:b@c.db"),
            "sqlite:////var/lib/a:b@c.db"
        );
        let e = StorageUrl::parse("pg sql://u:pw@h/").unwrap_err();
        assert!(!e.to_string().contains("pw"), "{e}");
        assert_eq!(
            redact("mysql://u@db/c?password=My5ecret&charset=utf8"),
            "mysql://u@db/c?password=***&charset=utf8"
        );
        assert_eq!(shown_param("password", "My5ecret"), "***");
        assert_eq!(shown_param("charset", "utf8"), "utf8");
    }
}

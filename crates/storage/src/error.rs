//! The one error type every driver returns, split by what the caller can do about it.

/// Why a storage operation failed.
///
/// Driver-specific error types (rusqlite's, a future PostgreSQL client's) never leak out: each
/// driver maps its errors onto these variants, so the daemon handles every backend alike.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    /// The URL's scheme names no compiled-in driver. A start-up error.
    #[error("unknown storage scheme {scheme:?}; known: {}", known.join(", "))]
    UnknownScheme {
        scheme: String,
        known: &'static [&'static str],
    },
    /// The URL is malformed for its driver. A start-up error. Passwords are redacted.
    #[error("bad storage URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// A [`crate::StorageOptions`] value the driver cannot use. A start-up error.
    #[error("invalid storage option {name} = {value:?}: {reason}")]
    InvalidOption {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// Transient: the database is locked past the busy timeout, read-only, full, unreachable
    /// or failing I/O. Nothing of the operation took effect; retrying later is the remedy
    /// (the daemon answers RPC with `storage unavailable: <this text>`).
    #[error("{0}")]
    Unavailable(String),
    /// The database was written by a newer version of this program.
    #[error("database schema version {found} is newer than this program supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    /// Anything else the database reported (corruption, a bug): retrying will not help.
    #[error("database error: {0}")]
    Database(String),
}

impl StorageError {
    /// Whether retrying the same operation later may succeed without operator action.
    pub fn is_transient(&self) -> bool {
        matches!(self, StorageError::Unavailable(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_scheme_lists_known_ones() {
        let e = StorageError::UnknownScheme {
            scheme: "mongodb".into(),
            known: &["sqlite", "postgresql"],
        };
        assert_eq!(
            e.to_string(),
            "unknown storage scheme \"mongodb\"; known: sqlite, postgresql"
        );
        assert!(!e.is_transient());
        assert!(StorageError::Unavailable("database is locked".into()).is_transient());
    }
}

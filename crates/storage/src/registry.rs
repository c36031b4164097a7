//! The driver registry: which URL schemes open which [`Storage`] implementation.
//!
//! Adding a driver is one module plus one entry in [`DRIVERS`]. A scheme appears in
//! [`known_schemes`] (and so in the "unknown scheme" error) only once its driver is compiled
//! in. The server schemes are ceilometer's (`postgresql+psycopg2`, `mysql+pymysql`), so a
//! `ceilometer.conf` connection string works unchanged.

use crate::url::StorageUrl;
use crate::{mysql, postgres, sqlite, Storage, StorageError, StorageOptions};
use std::sync::OnceLock;

/// Opens a driver from a parsed URL.
pub type Constructor =
    fn(&StorageUrl<'_>, &StorageOptions) -> Result<Box<dyn Storage>, StorageError>;

/// One driver: the schemes it answers to and how to open it.
pub struct Driver {
    pub schemes: &'static [&'static str],
    pub open: Constructor,
}

/// Every compiled-in driver.
pub const DRIVERS: &[Driver] = &[
    Driver {
        schemes: &["sqlite"],
        open: sqlite::open_boxed,
    },
    Driver {
        schemes: &["postgresql", "postgresql+psycopg2"],
        open: postgres::open_boxed,
    },
    Driver {
        schemes: &["mysql", "mysql+pymysql", "mariadb"],
        open: mysql::open_boxed,
    },
];

/// Every scheme [`open`] accepts, in registry order.
pub fn known_schemes() -> &'static [&'static str] {
    static KNOWN: OnceLock<Vec<&'static str>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        DRIVERS
            .iter()
            .flat_map(|d| d.schemes.iter().copied())
            .collect()
    })
}

/// Open the storage driver named by `url`'s scheme.
///
/// Errors: [`StorageError::UnknownScheme`] (listing the known ones), [`StorageError::BadUrl`],
/// [`StorageError::InvalidOption`], or whatever the driver reports when it cannot open the
/// database (usually [`StorageError::Unavailable`]). At start-up every error is fatal.
pub fn open(url: &str, opts: &StorageOptions) -> Result<Box<dyn Storage>, StorageError> {
    let parsed = StorageUrl::parse(url)?;
    let driver = DRIVERS
        .iter()
        .find(|d| d.schemes.contains(&parsed.scheme.as_str()))
        .ok_or_else(|| StorageError::UnknownScheme {
            scheme: parsed.scheme.clone(),
            known: known_schemes(),
        })?;
    (driver.open)(&parsed, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_implemented_schemes_are_known() {
        assert_eq!(
            known_schemes(),
            &[
                "sqlite",
                "postgresql",
                "postgresql+psycopg2",
                "mysql",
                "mysql+pymysql",
                "mariadb"
            ]
        );
    }

    #[test]
    fn unknown_scheme_names_it_and_the_known_ones() {
        let err = open("mongodb://localhost/ceilometer", &StorageOptions::default())
            .err()
            .expect("mongodb must be refused");
        assert_eq!(
            err.to_string(),
            "unknown storage scheme \"mongodb\"; known: sqlite, postgresql, \
             postgresql+psycopg2, mysql, mysql+pymysql, mariadb"
        );
        // A server URL is parsed at open: a bad one is refused before any connection.
        let err = open("mysql+pymysql://u:pw@db:port/c", &StorageOptions::default())
            .err()
            .expect("bad port");
        assert!(matches!(err, StorageError::BadUrl { .. }), "{err}");
        assert!(!err.to_string().contains("pw@"), "{err}");
    }
}

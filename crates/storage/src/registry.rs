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

/// Validates a URL for a driver without connecting (`collector --check-config`).
pub type Checker = fn(&StorageUrl<'_>) -> Result<(), StorageError>;

/// One driver: the schemes it answers to, how to open it, and how to check its URL.
pub struct Driver {
    pub schemes: &'static [&'static str],
    pub open: Constructor,
    pub check: Checker,
}

/// Every compiled-in driver.
pub const DRIVERS: &[Driver] = &[
    Driver {
        schemes: &["sqlite"],
        open: sqlite::open_boxed,
        check: |u| sqlite::Target::from_url(u).map(drop),
    },
    Driver {
        schemes: &["postgresql", "postgresql+psycopg2"],
        open: postgres::open_boxed,
        check: postgres::check_url,
    },
    Driver {
        schemes: &["mysql", "mysql+pymysql", "mariadb"],
        open: mysql::open_boxed,
        check: mysql::check_url,
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

fn driver_for<'a>(url: &'a str) -> Result<(StorageUrl<'a>, &'static Driver), StorageError> {
    let parsed = StorageUrl::parse(url)?;
    let driver = DRIVERS
        .iter()
        .find(|d| d.schemes.contains(&parsed.scheme.as_str()))
        .ok_or_else(|| StorageError::UnknownScheme {
            scheme: parsed.scheme.clone(),
            known: known_schemes(),
        })?;
    Ok((parsed, driver))
}

/// Check `url` as its driver would at open (scheme, path or host, options), without
/// connecting: what `collector --check-config` can say before any worker starts.
pub fn check_url(url: &str) -> Result<(), StorageError> {
    let (parsed, driver) = driver_for(url)?;
    (driver.check)(&parsed)
}

/// Open the storage driver named by `url`'s scheme.
///
/// Errors: [`StorageError::UnknownScheme`] (listing the known ones), [`StorageError::BadUrl`],
/// [`StorageError::InvalidOption`], or whatever the driver reports when it cannot open the
/// database (usually [`StorageError::Unavailable`]). At start-up every error is fatal.
pub fn open(url: &str, opts: &StorageOptions) -> Result<Box<dyn Storage>, StorageError> {
    let (parsed, driver) = driver_for(url)?;
    (driver.open)(&parsed, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_as_their_driver_would_without_connecting() {
        for good in [
            "sqlite:///data/x.db",
            "sqlite://",
            "postgresql://u:pw@127.0.0.1:1/db",
            "mysql+pymysql://u:pw@127.0.0.1:1/db?charset=utf8",
        ] {
            check_url(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "mongodb://h/db",
            "postgresql://u@h:port/db",
            "postgresql://u@h/db?sslmode=sometimes",
            "mysql://u@h/db?connect_timeout=soon",
            "sqlite:///x.db?mode=ro",
        ] {
            assert!(check_url(bad).is_err(), "{bad} passed the check");
        }
    }

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

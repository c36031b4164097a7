//! SQLite-specific behaviour of the SQLite driver against real files in temporary
//! directories: locking, URL forms, open errors. What every driver must do (idempotence,
//! duplicates, filters, statistics, expiry, concurrent writers) is in `conformance.rs`, which
//! runs for SQLite too.

mod common;

use common::{sample, url_for};
use rusqlite::Connection;
use storage::{SampleFilter, StorageError, StorageOptions};

#[test]
fn a_locked_database_is_unavailable_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let opts = StorageOptions {
        busy_timeout_ms: 100,
        ..Default::default()
    };
    let mut db = storage::open(&url_for(&path), &opts).unwrap();
    let t = "2026-01-01T00:00:00";
    assert_eq!(
        db.record_metering_data(&[sample("warm", "cpu", "r", t, 1.0)])
            .unwrap()
            .stored,
        1
    );

    // Another process's writer holds the lock longer than our busy timeout.
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let batch = vec![
        sample("x", "cpu", "r", t, 1.0),
        sample("y", "new.meter", "new", t, 2.0),
    ];
    let err = db.record_metering_data(&batch).unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(matches!(err, StorageError::Unavailable(_)));
    assert!(err.to_string().contains("locked"), "{err}");
    blocker.execute_batch("ROLLBACK").unwrap();

    // Nothing of the failed batch was stored; the retry stores all of it.
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.duplicates), (2, 0));
    assert_eq!(db.get_samples(&SampleFilter::default()).unwrap().len(), 3);

    // Expiry, too, fails transiently under the lock and works afterwards.
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert!(db
        .clear_expired_metering_data(1)
        .unwrap_err()
        .is_transient());
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(db.clear_expired_metering_data(1).unwrap(), 3);
}

#[test]
fn open_errors_are_specific() {
    let opts = StorageOptions::default();
    let e = storage::open("mongodb://h/db", &opts).err().unwrap();
    assert_eq!(
        e.to_string(),
        "unknown storage scheme \"mongodb\"; known: sqlite, postgresql, postgresql+psycopg2, \
         mysql, mysql+pymysql, mariadb"
    );
    let e = storage::open("postgresql://u:secret@h:port/db", &opts)
        .err()
        .unwrap();
    assert!(matches!(e, StorageError::BadUrl { .. }), "{e}");
    assert!(!e.to_string().contains("secret"));
    let e = storage::open("sqlite://host/x.db", &opts).err().unwrap();
    assert!(matches!(e, StorageError::BadUrl { .. }), "{e}");
    let e = storage::open("data/x.db", &opts).err().unwrap();
    assert!(matches!(e, StorageError::BadUrl { .. }), "{e}");
    let bad = StorageOptions {
        sqlite_synchronous: "SOMETIMES".into(),
        ..Default::default()
    };
    let e = storage::open("sqlite://", &bad).err().unwrap();
    assert!(matches!(e, StorageError::InvalidOption { .. }), "{e}");
    for e in [
        StorageError::BadUrl {
            url: String::new(),
            reason: String::new(),
        },
        StorageError::Database(String::new()),
    ] {
        assert!(!e.is_transient());
    }
    // A directory where the file should be: cannot open.
    let dir = tempfile::tempdir().unwrap();
    let e = storage::open(&url_for(dir.path()), &opts).err().unwrap();
    assert!(e.is_transient(), "{e:?}");
}

#[test]
fn memory_url_works() {
    for url in ["sqlite://", "sqlite://:memory:"] {
        let mut db = storage::open(url, &StorageOptions::default()).unwrap();
        let out = db
            .record_metering_data(&[sample("m", "cpu", "r", "2026-01-01T00:00:00", 1.0)])
            .unwrap();
        assert_eq!(out.stored, 1);
        assert_eq!(db.get_samples(&SampleFilter::default()).unwrap().len(), 1);
    }
}

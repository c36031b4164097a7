//! SQLite allocates through mimalloc once the driver opened its first connection. A test
//! binary of its own: SQLite takes an allocator only before it initializes, so nothing else
//! may open a connection first in this process.

#[test]
fn sqlite_allocates_from_mimalloc_once_the_driver_opened_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("c.db").display());
    let mut db = storage::open(&url, &storage::StorageOptions::default()).unwrap();
    // SAFETY: a plain allocation from SQLite's allocator, checked and given back.
    unsafe {
        let p = rusqlite::ffi::sqlite3_malloc(4096);
        assert!(!p.is_null());
        assert!(
            libmimalloc_sys::mi_is_in_heap_region(p),
            "SQLite's allocation is not mimalloc's"
        );
        // What SQLite reports of it is what mimalloc gave (at least the size asked).
        assert!(rusqlite::ffi::sqlite3_msize(p) >= 4096);
        rusqlite::ffi::sqlite3_free(p);
    }
    // And the driver works on it.
    let filter = storage::SampleFilter::default();
    assert!(db.get_samples(&filter).unwrap().is_empty());
}

//! Retention in the running daemon: an idle daemon finishes reclaiming an expired chunk
//! without waiting for samples to arrive.

use collector_e2e::*;
use std::time::Duration;

/// The chunk tables of a SQLite store (not the partition list or the graveyard).
fn chunks(db: &rusqlite::Connection) -> Vec<String> {
    let mut stmt = db
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'sample_%'
               AND name NOT IN ('sample_partition', 'sample_graveyard')",
        )
        .unwrap();
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    names
}

#[test]
fn an_idle_daemon_reclaims_an_expired_chunk_to_the_end() {
    // 5,000 samples of one old day (the support samples are all stamped 2026-11-01), stored
    // without a TTL.
    let mut first = Daemon::start(Setup::default());
    first.wait_serving(1);
    let mut c = RpcClient::connect(first.rpc.unwrap()).unwrap();
    for call in 0..5 {
        let samples = (0..1000)
            .map(|i| sample(&format!("old-{call}-{i}"), SECRET))
            .collect();
        let r = c.call(samples).unwrap();
        assert!(r.error.is_none(), "{:?}", r.error);
    }
    assert_eq!(first.wait_samples(5000, Duration::from_secs(20)), 5000);
    drop(c);
    first.send_signal(libc::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(20)).is_some());
    let old = first.db_path();

    // The same file under a daemon with a one-day TTL, and nothing sent to it: its first pass
    // takes the chunk out of the live set and one reclaim step (500 of 5,000 rows); the
    // rest (more steps, then the DROP) must come without any batch.
    let second = Daemon::start_with_dir_prep(
        Setup::default().database("metering_time_to_live = 86400"),
        |dir| {
            for suffix in ["", "-wal", "-shm"] {
                let from = format!("{}{suffix}", old.display());
                if std::path::Path::new(&from).exists() {
                    std::fs::copy(&from, dir.join(format!("collector.db{suffix}"))).unwrap();
                }
            }
        },
    );
    let db = rusqlite::Connection::open(second.db_path()).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let done = wait_for(Duration::from_secs(30), || {
        let left: i64 = db
            .query_row("SELECT COUNT(*) FROM sample_graveyard", [], |r| r.get(0))
            .ok()?;
        let hidden: i64 = db
            .query_row("SELECT COUNT(*) FROM sample_partition", [], |r| r.get(0))
            .ok()?;
        (left == 0 && hidden == 0 && chunks(&db).is_empty()).then_some(())
    });
    assert!(
        done.is_some(),
        "graveyard {:?}, chunks {:?}; log:\n{}",
        db.query_row("SELECT COUNT(*) FROM sample_graveyard", [], |r| r
            .get::<_, i64>(0)),
        chunks(&db),
        second.log()
    );
    assert_eq!(second.count_samples(), 0);
    assert!(
        second.log().contains("expired 5000 samples"),
        "{}",
        second.log()
    );
}

//! Time partitions of the PostgreSQL driver (schema version 3), checked against the server's
//! own catalog: which partition each row is in (`tableoid`), which partitions exist
//! (`pg_inherits`), what expiry drops, partitions made concurrently, the version 2 → 3
//! migration, and the plans of time-bounded and newest-first queries. Needs the PostgreSQL
//! server of the conformance suite (see `servers/mod.rs`).

mod common;
mod servers;

use common::{level, sample};
use servers::{Admin, Kind, TestDb};
use storage::{SampleFilter, StatsSource, StorageOptions};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

const DAY_US: i64 = 86_400_000_000;

fn iso(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

fn us(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
}

fn today() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT)
}

/// The partition name of the day holding `t` (µs of its first microsecond).
fn day_partition(t: OffsetDateTime) -> String {
    let lo = us(t).div_euclid(DAY_US) * DAY_US;
    if lo < 0 {
        format!("sample_m{}", lo.unsigned_abs())
    } else {
        format!("sample_{lo}")
    }
}

fn pg(t: &TestDb) -> postgres::Client {
    match t.admin() {
        Admin::Postgres(c) => c,
        _ => unreachable!(),
    }
}

/// The partitions of `sample` as the server knows them (`pg_inherits`), by name.
fn attached(t: &TestDb) -> Vec<String> {
    pg(t)
        .query(
            "SELECT c.relname::TEXT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'sample'::regclass ORDER BY c.relname",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// (message_id, the partition its row is stored in).
fn placement(t: &TestDb) -> Vec<(String, String)> {
    pg(t)
        .query(
            "SELECT message_id, tableoid::regclass::TEXT FROM sample ORDER BY message_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn rows_land_in_their_day_partitions_and_queries_span_them() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let day0 = today() - Duration::days(3);
    let mut batch = Vec::new();
    let mut expected = Vec::new();
    for d in 0..3 {
        for h in [0, 13] {
            let ts = day0 + Duration::days(d) + Duration::hours(h);
            let id = format!("s{d}-{h:02}");
            batch.push(sample(&id, "cpu", "r", &iso(ts), (d * 100 + h) as f64));
            expected.push((id, day_partition(ts)));
        }
    }
    // The last microsecond of a day is in that day's partition, the next one in the next.
    let edge = day0 + Duration::days(1) - Duration::microseconds(1);
    batch.push(sample("t-edge", "cpu", "r", &iso(edge), 1.0));
    expected.push(("t-edge".into(), day_partition(day0)));
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.duplicates), (7, 0));
    expected.sort();
    assert_eq!(placement(&t), expected);
    // Those three days, plus today and tomorrow made ahead at open.
    let mut want: Vec<String> = (0..5)
        .map(|d| day_partition(day0 + Duration::days(d)))
        .collect();
    want.sort();
    assert_eq!(attached(&t), want);
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM sample_partition p JOIN pg_class c ON c.relname = p.name"),
        5,
        "the driver's catalog lists exactly the attached partitions"
    );
    // A retry is a duplicate whichever partition it went to.
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 7));
    // Newest first across partitions, and a limit that stops inside the second newest day.
    let got = db
        .get_samples(&SampleFilter {
            resource_id: Some("r".into()),
            meter: Some("cpu".into()),
            limit: Some(3),
            ..Default::default()
        })
        .unwrap();
    let got: Vec<&str> = got.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(got, ["s2-13", "s2-00", "s1-13"]);
    // A range over two partitions.
    let got = db
        .get_samples(&SampleFilter {
            start: Some(day0 + Duration::hours(12)),
            end: Some(day0 + Duration::days(1) + Duration::hours(12)),
            ..Default::default()
        })
        .unwrap();
    let got: Vec<&str> = got.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(got, ["s1-00", "t-edge", "s0-13"]);
}

#[test]
fn a_configured_span_makes_hourly_partitions() {
    let t = TestDb::new(Kind::Postgres);
    let opts = StorageOptions {
        partition_span_seconds: 3600,
        ..Default::default()
    };
    let mut db = storage::open(&t.url, &opts).unwrap();
    let h0 = today() - Duration::days(1);
    let batch: Vec<_> = (0..3)
        .map(|h| {
            let ts = h0 + Duration::hours(h) + Duration::minutes(30);
            sample(&format!("h{h}"), "cpu", "r", &iso(ts), 1.0)
        })
        .collect();
    assert_eq!(db.record_metering_data(&batch).unwrap().stored, 3);
    let parts: Vec<String> = placement(&t).into_iter().map(|(_, p)| p).collect();
    let want: Vec<String> = (0..3)
        .map(|h| format!("sample_{}", us(h0 + Duration::hours(h))))
        .collect();
    assert_eq!(parts, want);
    let hi: i64 = pg(&t)
        .query_one(
            "SELECT hi - lo FROM sample_partition WHERE name = $1",
            &[&want[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(hi, 3_600_000_000);
}

#[test]
fn late_and_future_samples_get_their_partition() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let late = today() - Duration::days(9000) + Duration::hours(5);
    let ancient = OffsetDateTime::UNIX_EPOCH - Duration::days(400) + Duration::hours(1);
    let future = today() + Duration::days(40) + Duration::hours(7);
    let batch = vec![
        sample("late", "cpu", "r", &iso(late), 1.0),
        sample("ancient", "cpu", "r", &iso(ancient), 2.0),
        sample("future", "cpu", "r", &iso(future), 3.0),
    ];
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.duplicates, out.rejected.len()), (3, 0, 0));
    let got = placement(&t);
    assert_eq!(
        got,
        vec![
            ("ancient".to_string(), day_partition(ancient)),
            ("future".to_string(), day_partition(future)),
            ("late".to_string(), day_partition(late)),
        ]
    );
    assert!(
        day_partition(ancient).starts_with("sample_m"),
        "before 1970"
    );
    // Read back through the driver, with their timestamps exact.
    let back = db.get_samples(&SampleFilter::default()).unwrap();
    let stamps: Vec<OffsetDateTime> = back.iter().map(|s| s.timestamp).collect();
    assert_eq!(stamps, [future, late, ancient]);
    // A second handle (its own catalog read at open) stores into them and counts retries.
    let mut other = t.open();
    let out = other.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 3));
    // Older than the TTL on arrival: rejected as expired, and no partition made for it.
    let opts = StorageOptions {
        time_to_live_seconds: Some(86_400 * 30),
        ..Default::default()
    };
    let mut ttl_db = storage::open(&t.url, &opts).unwrap();
    let before = attached(&t);
    let out = ttl_db
        .record_metering_data(&[sample(
            "too-old",
            "cpu",
            "r",
            &iso(today() - Duration::days(100)),
            1.0,
        )])
        .unwrap();
    assert_eq!((out.stored, out.expired), (0, 1));
    assert_eq!(attached(&t), before);
}

#[test]
fn retention_drops_exactly_the_partitions_older_than_the_cutoff() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let t0 = today();
    let mut batch = Vec::new();
    for (d, n) in [(5, 3), (4, 2), (3, 4), (1, 1), (0, 1)] {
        for i in 0..n {
            let ts = t0 - Duration::days(d) + Duration::hours(2 * i + 1);
            batch.push(sample(&format!("d{d}-{i}"), "cpu", "r", &iso(ts), 1.0));
        }
    }
    assert_eq!(db.record_metering_data(&batch).unwrap().stored, 11);
    let all = attached(&t);
    assert_eq!(all.len(), 6, "five days with samples and tomorrow");
    // Cutoff in the middle of day −3: days −5 and −4 go whole, day −3 straddles and stays.
    let cutoff = t0 - Duration::days(3) + Duration::hours(4);
    let ttl = (OffsetDateTime::now_utc() - cutoff).whole_seconds() as u64;
    let mut janitor = t.open();
    assert_eq!(janitor.clear_expired_metering_data(ttl).unwrap(), 5);
    let mut kept: Vec<String> = all
        .iter()
        .filter(|p| {
            **p != day_partition(t0 - Duration::days(5))
                && **p != day_partition(t0 - Duration::days(4))
        })
        .cloned()
        .collect();
    kept.sort();
    assert_eq!(attached(&t), kept);
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM sample_partition"),
        kept.len() as i64
    );
    // Day −3's samples before the cutoff wait for a later pass: nothing is deleted row by row.
    assert_eq!(t.scalar("SELECT COUNT(*) FROM sample"), 6);
    assert_eq!(janitor.clear_expired_metering_data(ttl).unwrap(), 0);
    // Rollups outlive the samples: day −5 is still answered, from them.
    let filter = SampleFilter {
        meter: Some("cpu".into()),
        start: Some(t0 - Duration::days(5)),
        end: Some(t0 - Duration::days(4)),
        ..Default::default()
    };
    let (stats, source) = db.get_meter_statistics_from(&filter, None).unwrap();
    assert_eq!(
        source,
        StatsSource::Rollup {
            granularity: 86_400
        }
    );
    assert_eq!(stats[0].count, 3);
    // The writer's catalog still lists a dropped day: a late sample for it is stored (the
    // insert finds no partition, the driver makes it again).
    let late = t0 - Duration::days(4) + Duration::hours(20);
    let out = db
        .record_metering_data(&[sample("late-again", "cpu", "r", &iso(late), 1.0)])
        .unwrap();
    assert_eq!(out.stored, 1);
    assert!(attached(&t).contains(&day_partition(late)));
}

#[test]
fn concurrent_writers_making_the_same_new_partition_all_succeed() {
    let t = TestDb::new(Kind::Postgres);
    // Open first (the schema exists), then race on partitions only.
    let mut handles: Vec<_> = (0..4).map(|_| t.open()).collect();
    for round in 0..5i64 {
        // A day no partition covers yet, the same for every writer.
        let day = today() - Duration::days(200 + round);
        let barrier = std::sync::Barrier::new(handles.len());
        let outcomes: Vec<usize> = std::thread::scope(|scope| {
            let running: Vec<_> = handles
                .iter_mut()
                .enumerate()
                .map(|(w, db)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        let batch: Vec<_> = (0..50)
                            .map(|i| {
                                let ts = day + Duration::minutes(i * 7 + w as i64);
                                let id = format!("r{round}-w{w}-{i}");
                                sample(&id, "cpu", "r", &iso(ts), 1.0)
                            })
                            .collect();
                        barrier.wait();
                        db.record_metering_data(&batch).unwrap().stored
                    })
                })
                .collect();
            running.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(outcomes, [50, 50, 50, 50], "round {round}");
        assert_eq!(
            t.scalar(&format!(
                "SELECT COUNT(*) FROM {} WHERE message_id LIKE 'r{round}-%'",
                day_partition(day)
            )),
            200
        );
    }
    // One partition per day, listed once.
    assert_eq!(attached(&t).len(), 5 + 2);
    assert_eq!(t.scalar("SELECT COUNT(*) FROM sample_partition"), 7);
}

/// A database of schema version 2 (as the previous build made it), samples over three days
/// and rollups, migrated in place at open: every row kept with its id, in its partition, the
/// rollups untouched, new ids after the old ones, retries of old samples still duplicates.
#[test]
fn version_2_database_migrates_to_partitions_keeping_rows_and_rollups() {
    let t = TestDb::new(Kind::Postgres);
    let day0 = today() - Duration::days(3);
    let mut c = pg(&t);
    c.batch_execute(storage::postgres::schema::V1).unwrap();
    c.batch_execute(storage::postgres::schema::V2).unwrap();
    c.batch_execute(
        "CREATE TABLE schema_version (version INTEGER NOT NULL);
         INSERT INTO schema_version VALUES (2);
         INSERT INTO meter (name, type, unit) VALUES ('cpu', 'gauge', '%');
         INSERT INTO resource (resource_key, resource_id, source_id, resource_metadata)
             VALUES ('k', 'vm', 'openstack', '{}');
         INSERT INTO rollup_level VALUES (3600, 0), (86400, 0);",
    )
    .unwrap();
    let mut old = Vec::new();
    for i in 0..30i64 {
        let ts = day0 + Duration::hours(i * 2) + Duration::microseconds(i);
        c.execute(
            "INSERT INTO sample (meter_id, resource_id, volume, timestamp, recorded_at,
                                 message_id)
             VALUES ((SELECT id FROM meter), (SELECT internal_id FROM resource), $1, $2, $2, $3)",
            &[&(i as f64), &ts, &format!("old-{i:02}")],
        )
        .unwrap();
        old.push((format!("old-{i:02}"), ts));
    }
    c.batch_execute(
        "INSERT INTO rollup_meter SELECT meter_id, 86400, 0, COUNT(*), SUM(volume), MIN(volume),
                MAX(volume), 0, 0 FROM sample GROUP BY meter_id;
         INSERT INTO rollup_resource VALUES (86400, 0, 1, 'vm', 30, 435, 0, 29, 0, 0);",
    )
    .unwrap();
    let ids_before: Vec<(i64, String)> = c
        .query("SELECT id, message_id FROM sample ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    drop(c);

    let mut db = t.open();
    assert_eq!(
        t.scalar("SELECT version::BIGINT FROM schema_version"),
        storage::postgres::schema::current_version()
    );
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM pg_class WHERE relname = 'sample_v2'"),
        0
    );
    // Version 2 expired by deleting rows, whose rollups stay: expiry counts from the rollups
    // only from the oldest partition on.
    assert_eq!(
        t.scalar("SELECT us FROM expired_before"),
        t.scalar("SELECT MIN(lo) FROM sample_partition")
    );
    let mut c = pg(&t);
    let ids_after: Vec<(i64, String)> = c
        .query("SELECT id, message_id FROM sample ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(ids_after, ids_before, "every row, with its id");
    let mut want: Vec<(String, String)> = old
        .iter()
        .map(|(id, ts)| (id.clone(), day_partition(*ts)))
        .collect();
    want.sort();
    assert_eq!(placement(&t), want);
    let back = db.get_samples(&SampleFilter::default()).unwrap();
    assert_eq!(back.len(), 30);
    assert_eq!(back[0].timestamp, old[29].1, "timestamps exact to the µs");
    assert_eq!(t.scalar("SELECT COUNT(*) FROM rollup_meter"), 1);
    assert_eq!(
        t.scalar("SELECT count FROM rollup_resource WHERE resource_id = 'vm'"),
        30
    );
    // Retries of migrated samples are duplicates; new samples get new ids.
    let retry: Vec<_> = old
        .iter()
        .take(3)
        .map(|(id, ts)| sample(id, "cpu", "vm", &iso(*ts), 0.0))
        .collect();
    let out = db.record_metering_data(&retry).unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 3));
    let fresh = sample("new", "cpu", "vm", &iso(OffsetDateTime::now_utc()), 1.0);
    assert_eq!(db.record_metering_data(&[fresh]).unwrap().stored, 1);
    let max_old = ids_before.iter().map(|(id, _)| *id).max().unwrap();
    let new_id: i64 = c
        .query_one("SELECT id FROM sample WHERE message_id = 'new'", &[])
        .unwrap()
        .get(0);
    assert!(new_id > max_old);
    // The retry's rollups were not counted again.
    assert_eq!(
        t.scalar("SELECT count FROM rollup_resource WHERE resource_id = 'vm' AND bucket = 0"),
        30
    );
}

fn explain(
    c: &mut postgres::Client,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> String {
    c.query(&format!("EXPLAIN {sql}"), params)
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Time-bounded queries read only the partitions in range (pruned at plan time, or at
/// executor start-up for a generic plan of a prepared statement). (The plans of `samples` on a
/// grown store are in docs/storage.md: on a few rows a sequential scan is rightly cheaper.)
#[test]
fn plans_prune_partitions_and_use_their_indexes() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let day0 = today() - Duration::days(6);
    let mut batch = Vec::new();
    for d in 0..6 {
        for i in 0..200 {
            let ts = day0 + Duration::days(d) + Duration::minutes(i * 7);
            let res = format!("r{}", i % 20);
            batch.push(sample(&format!("{d}-{i}"), "cpu", &res, &iso(ts), 1.0));
        }
    }
    assert_eq!(db.record_metering_data(&batch).unwrap().stored, 1200);
    let mut c = pg(&t);
    c.batch_execute("ANALYZE").unwrap();
    let start = day0 + Duration::days(2);
    let end = day0 + Duration::days(3);
    let plan = explain(
        &mut c,
        "SELECT COUNT(*) FROM sample s WHERE s.timestamp >= $1 AND s.timestamp < $2",
        &[&start, &end],
    );
    let scanned: Vec<&str> = plan.matches("sample_").collect();
    assert_eq!(scanned.len(), 1, "one partition: {plan}");
    assert!(plan.contains(&day_partition(start)), "{plan}");
    // A prepared statement planned generically prunes at executor start-up instead.
    c.batch_execute(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE q (TIMESTAMPTZ, TIMESTAMPTZ) AS
           SELECT COUNT(*) FROM sample s WHERE s.timestamp >= $1 AND s.timestamp < $2",
    )
    .unwrap();
    let plan = explain(
        &mut c,
        &format!("EXECUTE q ('{}', '{}')", iso(start), iso(end)),
        &[],
    );
    assert!(plan.contains("Subplans Removed: 7"), "{plan}");
}

/// `samples` for a resource names its resource row as a constant when there is one (so each
/// partition's index is read backwards and the newest partitions first); a resource id with
/// several rows (metadata changed) or none still answers exactly.
#[test]
fn samples_of_a_resource_with_one_several_or_no_rows() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let day0 = today() - Duration::days(3);
    let mut batch = Vec::new();
    for i in 0..300i64 {
        let ts = day0 + Duration::minutes(i * 13);
        let mut smp = sample(&format!("a{i:03}"), "cpu", "vm-a", &iso(ts), i as f64);
        if i >= 150 {
            // The metadata changed half way: a second resource row for vm-a.
            smp.resource_metadata =
                meter::Value::Map(vec![(common::s("state"), common::s("resized"))]).into();
        }
        batch.push(smp);
        batch.push(sample(
            &format!("b{i:03}"),
            "cpu",
            "vm-b",
            &iso(ts),
            i as f64,
        ));
    }
    assert_eq!(db.record_metering_data(&batch).unwrap().stored, 600);
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM resource WHERE resource_id = 'vm-a'"),
        2
    );
    for res in ["vm-a", "vm-b"] {
        let got = db
            .get_samples(&SampleFilter {
                resource_id: Some(res.into()),
                meter: Some("cpu".into()),
                limit: Some(200),
                ..Default::default()
            })
            .unwrap();
        let want: Vec<String> = (100..300)
            .rev()
            .map(|i| format!("{}{i:03}", &res[3..]))
            .collect();
        let got: Vec<String> = got.into_iter().map(|s| s.message_id).collect();
        assert_eq!(got, want, "{res}");
    }
    let none = db
        .get_samples(&SampleFilter {
            resource_id: Some("vm-none".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(none.is_empty());
}

/// A partition above the size expiry counts row by row: the rows it reports come from the
/// statistics system's live-row count, which for a partition only inserted into is exact.
#[test]
fn expiry_of_a_large_partition_reports_its_rows_without_counting() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let day = today() - Duration::days(10);
    for b in 0..30i64 {
        let batch: Vec<_> = (0..1000i64)
            .map(|i| {
                let ts = day + Duration::seconds(b * 2000 + i * 2);
                sample(&format!("big-{b}-{i}"), "cpu", "r", &iso(ts), 1.0)
            })
            .collect();
        assert_eq!(db.record_metering_data(&batch).unwrap().stored, 1000);
    }
    let bytes = t.scalar(&format!(
        "SELECT pg_relation_size('{}')",
        day_partition(day)
    ));
    assert!(bytes > 2 << 20, "{bytes} bytes: above the counting limit");
    // The inserting session reports its statistics within a second or so of going idle.
    drop(db);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut janitor = t.open();
    assert_eq!(
        janitor.clear_expired_metering_data(5 * 86_400).unwrap(),
        30_000
    );
    assert!(!attached(&t).contains(&day_partition(day)));
}

/// A role that may only read opens the store even when the partitions ahead are not made yet
/// (it cannot make them), and reads across the partitions.
#[test]
fn a_read_only_role_opens_without_making_partitions() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let ts = today() - Duration::days(2);
    let out = db
        .record_metering_data(&[sample("ro-1", "cpu", "r", &iso(ts), 1.0)])
        .unwrap();
    assert_eq!(out.stored, 1);
    drop(db);
    let role = format!("{}_ro", t.name);
    let tomorrow = day_partition(today() + Duration::days(1));
    let mut c = pg(&t);
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role};
         CREATE ROLE {role} LOGIN;
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
         DROP TABLE {tomorrow};
         DELETE FROM sample_partition WHERE name = '{tomorrow}';"
    ))
    .unwrap();
    let url = t.url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(url, t.url);
    let got = storage::open(&url, &StorageOptions::default())
        .and_then(|mut ro| ro.get_samples(&SampleFilter::default()));
    c.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .unwrap();
    let got = got.unwrap();
    assert_eq!(got.len(), 1);
    assert!(!attached(&t).contains(&tomorrow), "not made by the reader");
}

/// While a long statement holds `sample` (here an open transaction that read it), expiry does
/// not wait for it (writers would queue behind its drop): it gives up after a short lock
/// timeout, keeps the partition, and drops it on a later pass.
#[test]
fn expiry_gives_up_quickly_when_sample_is_busy_and_drops_later() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let old = today() - Duration::days(5);
    let out = db
        .record_metering_data(&[sample("busy-1", "cpu", "r", &iso(old), 1.0)])
        .unwrap();
    assert_eq!(out.stored, 1);
    let mut reader = pg(&t);
    let mut tx = reader.transaction().unwrap();
    let n: i64 = tx
        .query_one("SELECT COUNT(*) FROM sample", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let started = std::time::Instant::now();
    assert_eq!(db.clear_expired_metering_data(86_400).unwrap(), 0);
    let waited = started.elapsed();
    assert!(waited < std::time::Duration::from_secs(3), "{waited:?}");
    assert!(attached(&t).contains(&day_partition(old)));
    tx.commit().unwrap();
    assert_eq!(db.clear_expired_metering_data(86_400).unwrap(), 1);
    assert!(!attached(&t).contains(&day_partition(old)));
}

/// The graves (expired partitions, detached and renamed) waiting to be dropped.
fn graves(t: &TestDb) -> Vec<String> {
    pg(t)
        .query(
            "SELECT relname::TEXT FROM pg_class
              WHERE relkind = 'r' AND relname LIKE 'sample\\_expired\\_%' ORDER BY relname",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Until no grave is left (the reaper works on its own thread), at most 20 s.
fn wait_for_no_graves(t: &TestDb) {
    common::wait_until("the reaper drops every grave", || graves(t).is_empty());
}

/// Expiry detaches a partition into a grave table, out of every query at once, and leaves
/// deleting its files to a handle's reaper (its own thread and connection), never the expiry
/// call: meanwhile a late sample makes a partition of the same name; a handle opened afterwards
/// (a restart) finds the grave and its reaper drops it after its first batch (constraint,
/// indexes, table, one part per step); with no batch, `retention_step` (the idle daemon's)
/// wakes the reaper.
#[test]
fn expired_partitions_wait_in_graves_that_later_steps_drop() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let old = today() - Duration::days(5);
    let batch: Vec<_> = (0..3)
        .map(|i| {
            let ts = old + Duration::hours(i);
            sample(&format!("old-{i}"), "cpu", "r", &iso(ts), 1.0)
        })
        .collect();
    assert_eq!(db.record_metering_data(&batch).unwrap().stored, 3);
    let mut janitor = t.open();
    assert_eq!(janitor.clear_expired_metering_data(3 * 86_400).unwrap(), 3);
    let first = graves(&t);
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].starts_with(&format!("sample_expired_{}_", us(old))));
    assert!(!attached(&t).contains(&day_partition(old)));
    assert_eq!(t.scalar("SELECT COUNT(*) FROM sample"), 0);
    assert_eq!(t.scalar(&format!("SELECT COUNT(*) FROM {}", first[0])), 3);
    // A late sample for that day: a partition of the same name, beside the grave (`db` was
    // opened before the burial and does not look for graves).
    let late = old + Duration::hours(20);
    let out = db
        .record_metering_data(&[sample("late", "cpu", "r", &iso(late), 1.0)])
        .unwrap();
    assert_eq!(out.stored, 1);
    assert!(attached(&t).contains(&day_partition(old)));
    assert_eq!(graves(&t), first);
    // A restart: the new handle finds the grave; its first batch is stored, then takes the
    // first bounded step (the unique constraint), and the steps that follow drop each index
    // and then the table: five in all (constraint, three indexes, table).
    drop(janitor);
    let mut restarted = t.open();
    let parts = |g: &str| {
        t.scalar(&format!(
            "SELECT COUNT(*) FROM pg_index WHERE indrelid = to_regclass('{g}')"
        ))
    };
    assert_eq!(parts(&first[0]), 4);
    let now = OffsetDateTime::now_utc() - Duration::seconds(1);
    let out = restarted
        .record_metering_data(&[sample("new", "cpu", "r", &iso(now), 1.0)])
        .unwrap();
    assert_eq!(out.stored, 1);
    wait_for_no_graves(&t);
    assert_eq!(t.scalar("SELECT COUNT(*) FROM sample"), 2);
    // The day again (its late sample): another grave, which the next expiry drops when no
    // batch came between (an idle daemon).
    assert_eq!(
        restarted.clear_expired_metering_data(3 * 86_400).unwrap(),
        1
    );
    let second = graves(&t);
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    assert_eq!(
        restarted.clear_expired_metering_data(3 * 86_400).unwrap(),
        0
    );
    assert_eq!(graves(&t), second);
    assert!(!restarted.retention_step().unwrap());
    wait_for_no_graves(&t);
    let ids: Vec<_> = restarted
        .get_samples(&SampleFilter::default())
        .unwrap()
        .into_iter()
        .map(|s| s.message_id)
        .collect();
    assert_eq!(ids, ["new"]);
}

/// The rows expiry reports come from the rollups when a level counts the partition exactly,
/// and else from the partition: without rollup levels, or with an hourly span the daily level
/// does not tile (the hourly one does), the number is the same.
#[test]
fn expiry_reports_exact_rows_with_and_without_rollups() {
    for (rollups, span) in [
        (Vec::new(), 86_400),
        (storage::rollup::default_granularities(), 86_400),
        (storage::rollup::default_granularities(), 3600),
        (vec![level(86_400)], 3600),
    ] {
        let t = TestDb::new(Kind::Postgres);
        let opts = StorageOptions {
            rollups: rollups.clone(),
            partition_span_seconds: span,
            ..Default::default()
        };
        let mut db = storage::open(&t.url, &opts).unwrap();
        let old = today() - Duration::days(5);
        let batch: Vec<_> = (0..7)
            .map(|i| {
                let ts = old + Duration::minutes(7 * i);
                sample(
                    &format!("c-{i}"),
                    "cpu",
                    &format!("r{}", i % 3),
                    &iso(ts),
                    1.0,
                )
            })
            .collect();
        assert_eq!(db.record_metering_data(&batch).unwrap().stored, 7);
        // A retry counts nowhere.
        assert_eq!(db.record_metering_data(&batch).unwrap().duplicates, 7);
        assert_eq!(
            db.clear_expired_metering_data(3 * 86_400).unwrap(),
            7,
            "rollups {rollups:?}, span {span}"
        );
    }
}

/// The resource index keys the meter too (schema version 5): one resource's samples of one
/// meter are an index range in each partition, whatever the other meters hold; with
/// `(resource_id, timestamp)` the planner ANDed a bitmap of every sample of the meter in each
/// partition (39 ms for the latest 100 at 3 M rows).
#[test]
fn samples_of_a_resource_and_meter_read_one_index_range_per_partition() {
    let t = TestDb::new(Kind::Postgres);
    let mut db = t.open();
    let day0 = today() - Duration::days(3);
    let mut batch = Vec::new();
    for d in 0..3 {
        for i in 0..400i64 {
            let ts = day0 + Duration::days(d) + Duration::minutes(i * 3);
            let meter = if i % 4 == 0 { "cpu" } else { "memory" };
            let res = format!("vm-{}", i % 40);
            batch.push(sample(&format!("{d}-{i}"), meter, &res, &iso(ts), i as f64));
        }
    }
    assert_eq!(db.record_metering_data(&batch).unwrap().stored, 1200);
    let mut c = pg(&t);
    c.batch_execute("ANALYZE").unwrap();
    let indexes = t.scalar(
        "SELECT COUNT(*) FROM pg_indexes WHERE tablename LIKE 'sample_%'
           AND indexdef LIKE '%(resource_id, meter_id, \"timestamp\")%'",
    );
    assert!(indexes >= 3, "one per partition: {indexes}");
    let (res, met): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT internal_id FROM resource WHERE resource_id = 'vm-4'),
                        (SELECT id FROM meter WHERE name = 'cpu')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    c.batch_execute("SET enable_seqscan = off").unwrap();
    let plan = explain(
        &mut c,
        "SELECT s.id FROM sample s WHERE s.resource_id = $1 AND s.meter_id = $2
          ORDER BY s.timestamp DESC, s.id DESC LIMIT 100",
        &[&res, &met],
    );
    assert!(
        plan.contains("resource_id_meter_id_timestamp_idx"),
        "{plan}"
    );
    assert!(
        plan.lines()
            .filter(|l| l.contains("meter_id_timestamp_idx"))
            .all(|l| l.contains("resource_id_meter_id_timestamp_idx")),
        "no scan of the meter's index: {plan}"
    );
    // And the driver's answer: vm-4's cpu samples (i = 4, 44, ... each day), newest first.
    let got = db
        .get_samples(&storage::SampleFilter {
            meter: Some("cpu".into()),
            resource_id: Some("vm-4".into()),
            limit: Some(100),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(got.len(), 30);
    assert!(got.windows(2).all(|w| w[0].timestamp >= w[1].timestamp));
    assert!(got
        .iter()
        .all(|s| s.resource_id == "vm-4" && s.counter_name == "cpu"));
    assert_eq!(got[0].message_id, "2-364");
}

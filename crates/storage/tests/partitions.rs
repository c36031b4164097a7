//! Time partitions, retention, rollups and the version 1 → 2 migration of the SQLite driver,
//! against real files. (The server drivers' partitions are tested in pg_partitions.rs and
//! mysql_partitions.rs.)

mod common;

use common::{fold, level, sample, url_for, Aggregate, NO_SAMPLES};
use rusqlite::Connection;
use std::collections::{BTreeMap, HashMap};
use storage::{SampleFilter, Statistics, StatsSource, Storage as _, StorageOptions};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

fn iso(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

fn today() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT)
}

fn chunk_tables(path: &std::path::Path) -> Vec<String> {
    let c = Connection::open(path).unwrap();
    let mut stmt = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'sample_%' AND name NOT IN ('sample_partition', 'sample_graveyard') ORDER BY name")
        .unwrap();
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    names
}

#[test]
fn samples_go_to_day_chunks_and_queries_span_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let mut db = storage::open(&url_for(&path), &StorageOptions::default()).unwrap();
    let day0 = today() - Duration::days(3);
    let mut batch = Vec::new();
    for d in 0..3 {
        for h in [1, 13] {
            let t = day0 + Duration::days(d) + Duration::hours(h);
            batch.push(sample(
                &format!("s{d}-{h}"),
                "cpu",
                "r",
                &iso(t),
                (d * 100 + h) as f64,
            ));
        }
    }
    // One batch over three days: three chunks, each row once.
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.duplicates), (6, 0));
    assert_eq!(chunk_tables(&path).len(), 3);
    // A retry is a duplicate in whichever chunk it went to.
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 6));

    // Newest first across chunks, limit honoured, range filters pick chunks.
    let latest = db
        .get_samples(&SampleFilter {
            meter: Some("cpu".into()),
            limit: Some(3),
            ..Default::default()
        })
        .unwrap();
    let ids: Vec<_> = latest.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(ids, ["s2-13", "s2-1", "s1-13"]);
    let mid = db
        .get_samples(&SampleFilter {
            start: Some(day0 + Duration::hours(12)),
            end: Some(day0 + Duration::days(1) + Duration::hours(12)),
            ..Default::default()
        })
        .unwrap();
    let ids: Vec<_> = mid.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(ids, ["s1-1", "s0-13"]);
    assert_eq!(db.get_meters(&SampleFilter::default()).unwrap().len(), 1);
    let res = db.get_resources(&SampleFilter::default()).unwrap();
    assert_eq!(res.len(), 1);
    assert_eq!(res[0].first_sample_timestamp, day0 + Duration::hours(1));
    // The view keeps version 1's `sample` table readable for outside readers.
    let c = Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM sample", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 6);
}

#[test]
fn retention_drops_whole_chunks_and_too_old_samples_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let opts = StorageOptions {
        time_to_live_seconds: Some(10 * 86_400),
        ..Default::default()
    };
    let mut db = storage::open(&url_for(&path), &opts).unwrap();
    let now = OffsetDateTime::now_utc();
    let d = |days: i64, id: &str, r: &str| {
        sample(
            id,
            "cpu",
            r,
            &iso(today() - Duration::days(days) + Duration::hours(1)),
            1.0,
        )
    };
    let batch = vec![
        d(3, "a", "old-only"),
        d(3, "b", "kept"),
        d(2, "c", "kept"),
        d(0, "e", "kept"),
        // Beyond the 10-day time to live already: counted, not stored.
        d(12, "x", "kept"),
    ];
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.expired), (4, 1));
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].0, 4);
    assert_eq!(out.rejected[0].1, storage::EXPIRED_REASON);
    assert_eq!(chunk_tables(&path).len(), 3);

    // A cutoff inside day -2: day -3 goes whole, day -2 straddles and waits.
    let ttl = (now - (today() - Duration::days(2) + Duration::hours(12))).whole_seconds() as u64;
    let mut janitor = storage::open(&url_for(&path), &opts).unwrap();
    assert_eq!(janitor.clear_expired_metering_data(ttl).unwrap(), 2);
    assert_eq!(chunk_tables(&path).len(), 2);
    let ids: Vec<_> = db
        .get_samples(&SampleFilter::default())
        .unwrap()
        .into_iter()
        .map(|s| s.message_id)
        .collect();
    assert_eq!(ids, ["e", "c"]);
    let c = Connection::open(&path).unwrap();
    let gone: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM resource WHERE resource_id = 'old-only'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(gone, 0, "orphaned resource rows go with their chunk");
    // The writer's cached chunk list is stale; the epoch makes it reload, and a late sample
    // for a dropped day makes a new chunk.
    let out = db
        .record_metering_data(&[d(3, "late", "old-only")])
        .unwrap();
    assert_eq!(out.stored, 1);
    assert_eq!(chunk_tables(&path).len(), 3);
    // Rollups outlive the samples: statistics for day -3 still come from them.
    let (stats, source) = db
        .get_meter_statistics_from(
            &SampleFilter {
                meter: Some("cpu".into()),
                start: Some(today() - Duration::days(3)),
                end: Some(today() - Duration::days(2)),
                ..Default::default()
            },
            Some(86_400),
        )
        .unwrap();
    assert_eq!(
        source,
        StatsSource::Rollup {
            granularity: 86_400
        }
    );
    assert_eq!(stats[0].count, 3, "a, b and the late one");
}

/// splitmix64, for reproducible random data without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per (period index, unit): count, sum, min, max, first and last timestamp.
type Expected = BTreeMap<(i64, String), Aggregate>;

/// The statistics the raw definition gives, computed here from the samples themselves.
fn expected(
    samples: &[(String, String, String, i64, f64)],
    meter: &str,
    resource: Option<&str>,
    start: i64,
    end: i64,
    period: i64,
) -> Expected {
    let mut out: Expected = BTreeMap::new();
    for (m, unit, r, ts, v) in samples {
        if m != meter || resource.is_some_and(|x| x != r) || *ts < start || *ts >= end {
            continue;
        }
        let k = (ts - start) / period;
        let e = out.entry((k, unit.clone())).or_insert(NO_SAMPLES);
        fold(e, *v, *ts);
    }
    out
}

fn check(got: &[Statistics], want: &Expected, start: i64, period: i64) {
    assert_eq!(got.len(), want.len());
    for (s, ((k, unit), w)) in got.iter().zip(want) {
        let ps = (s.period_start.unix_timestamp_nanos() / 1000) as i64;
        assert_eq!(ps, start + k * period);
        assert_eq!(&s.unit, unit);
        assert_eq!(s.count, w.0);
        assert!(
            (s.sum - w.1).abs() <= 1e-6 * w.1.abs().max(1.0),
            "{} vs {}",
            s.sum,
            w.1
        );
        assert_eq!((s.min, s.max), (w.2, w.3));
        assert!((s.avg - w.1 / w.0 as f64).abs() <= 1e-9 * w.1.abs().max(1.0));
        let first = (s.duration_start.unix_timestamp_nanos() / 1000) as i64;
        let last = (s.duration_end.unix_timestamp_nanos() / 1000) as i64;
        assert_eq!((first, last), (w.4, w.5));
    }
}

#[test]
fn rollups_agree_with_raw_over_random_data_and_count_no_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let mut db = storage::open(&url_for(&path), &StorageOptions::default()).unwrap();
    let hour = 3_600_000_000i64;
    let start_t = today() - Duration::days(4);
    let start = (start_t.unix_timestamp_nanos() / 1000) as i64;
    let meters = [("cpu", "ns"), ("cpu", "%"), ("memory", "MB")];
    let mut kept = Vec::new();
    let mut seen = HashMap::new();
    let mut seq = 0u64;
    for round in 0..30 {
        let mut batch = Vec::new();
        for _ in 0..97 {
            seq += 1;
            let r = mix(seq);
            // Mostly new samples, some retries of earlier ones (same id and timestamp).
            let (id, ts, (m, unit), res, v) = if r % 7 == 0 && !kept.is_empty() {
                let (id, ts, mu, res, v): &(String, i64, (&str, &str), String, f64) =
                    &kept[(r >> 8) as usize % kept.len()];
                (id.clone(), *ts, *mu, res.clone(), *v + 1000.0)
            } else {
                let ts = start + (r >> 3) as i64 % (4 * 24 * hour);
                let mu = meters[(r >> 40) as usize % meters.len()];
                let res = format!("r{}", (r >> 50) % 5);
                let v = ((r >> 20) % 10_000) as f64 / 8.0 - 300.0;
                let id = format!("m{round}-{seq}");
                kept.push((id.clone(), ts, mu, res.clone(), v));
                (id, ts, mu, res, v)
            };
            let when = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts) * 1000).unwrap();
            let mut s = sample(&id, m, &res, &iso(when), v);
            s.counter_unit = unit.into();
            seen.entry(id)
                .or_insert((m.to_string(), unit.to_string(), res, ts, v));
            batch.push(s);
        }
        db.record_metering_data(&batch).unwrap();
    }
    let stored: Vec<_> = seen.into_values().collect();
    let end = start + 4 * 24 * hour;
    let end_t = start_t + Duration::days(4);
    // The same database without rollup levels: the raw path.
    let mut raw = storage::open(
        &url_for(&path),
        &StorageOptions {
            rollups: Vec::new(),
            ..Default::default()
        },
    )
    .unwrap();
    for (resource, period, gran) in [
        (None, 3600, 3600),
        (None, 7200, 3600),
        (None, 86_400, 86_400),
        (Some("r3"), 3600, 3600),
        (Some("r1"), 2 * 86_400, 86_400),
    ] {
        let f = SampleFilter {
            meter: Some("cpu".into()),
            resource_id: resource.map(String::from),
            start: Some(start_t),
            end: Some(end_t),
            ..Default::default()
        };
        let (got, source) = db.get_meter_statistics_from(&f, Some(period)).unwrap();
        assert_eq!(source, StatsSource::Rollup { granularity: gran });
        let want = expected(
            &stored,
            "cpu",
            resource,
            start,
            end,
            period as i64 * 1_000_000,
        );
        check(&got, &want, start, period as i64 * 1_000_000);
        let (raw_got, raw_source) = raw.get_meter_statistics_from(&f, Some(period)).unwrap();
        assert_eq!(raw_source, StatsSource::Raw);
        check(&raw_got, &want, start, period as i64 * 1_000_000);
    }
    // Unaligned: raw, and still right.
    let f = SampleFilter {
        meter: Some("cpu".into()),
        start: Some(start_t + Duration::minutes(30)),
        end: Some(end_t),
        ..Default::default()
    };
    let (got, source) = db.get_meter_statistics_from(&f, Some(3600)).unwrap();
    assert_eq!(source, StatsSource::Raw);
    let s30 = start + hour / 2;
    check(
        &got,
        &expected(&stored, "cpu", None, s30, end, hour),
        s30,
        hour,
    );
}

#[test]
fn a_version_1_file_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let day = 86_400_000_000i64;
    let base = (today().unix_timestamp_nanos() / 1000) as i64 - 2 * day;
    {
        // A file as today's code (schema version 1) leaves it.
        let c = Connection::open(&path).unwrap();
        c.execute_batch(storage::sqlite::schema::V1).unwrap();
        c.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version VALUES (1);
             INSERT INTO meter (id, name, type, unit) VALUES (1, 'cpu', 'gauge', '%');
             INSERT INTO resource VALUES (1, 'vm', NULL, NULL, 'openstack', '{}', 'h');",
        )
        .unwrap();
        for i in 0..48i64 {
            c.execute(
                "INSERT INTO sample (meter_id, resource_id, volume, timestamp, recorded_at, message_id)
                 VALUES (1, 1, ?1, ?2, ?2, ?3)",
                rusqlite::params![i as f64, base + i * day / 24 + 7, format!("id-{i}")],
            )
            .unwrap();
        }
    }
    let mut db = storage::open(&url_for(&path), &StorageOptions::default()).unwrap();
    let c = Connection::open(&path).unwrap();
    let v: i64 = c
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, storage::sqlite::schema::current_version());
    assert_eq!(chunk_tables(&path).len(), 2, "two days, two chunks");
    assert_eq!(db.get_samples(&SampleFilter::default()).unwrap().len(), 48);
    // Rollups were computed from the migrated samples.
    let f = SampleFilter {
        meter: Some("cpu".into()),
        start: Some(today() - Duration::days(2)),
        end: Some(today()),
        ..Default::default()
    };
    let (stats, source) = db.get_meter_statistics_from(&f, Some(86_400)).unwrap();
    assert_eq!(
        source,
        StatsSource::Rollup {
            granularity: 86_400
        }
    );
    assert_eq!(stats.len(), 2);
    assert_eq!(
        (stats[0].count, stats[0].sum),
        (24, (0..24).sum::<i64>() as f64)
    );
    // Stored ids still deduplicate after the move.
    let ts = OffsetDateTime::from_unix_timestamp_nanos(i128::from(base + 7) * 1000).unwrap();
    let out = db
        .record_metering_data(&[sample("id-0", "cpu", "vm", &iso(ts), 0.0)])
        .unwrap();
    assert_eq!(out.duplicates, 1);
}

#[test]
fn a_granularity_added_later_is_used_only_where_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let hourly = StorageOptions {
        rollups: vec![level(3600)],
        ..Default::default()
    };
    let t = today() - Duration::days(2) + Duration::hours(3);
    let mut db = storage::open(&url_for(&path), &hourly).unwrap();
    db.record_metering_data(&[sample("a", "cpu", "r", &iso(t), 1.0)])
        .unwrap();
    drop(db);
    let mut db = storage::open(&url_for(&path), &StorageOptions::default()).unwrap();
    let f = SampleFilter {
        meter: Some("cpu".into()),
        start: Some(today() - Duration::days(2)),
        end: Some(today()),
        ..Default::default()
    };
    // The daily level did not see sample "a": hourly buckets answer the daily question.
    let (stats, source) = db.get_meter_statistics_from(&f, Some(86_400)).unwrap();
    assert_eq!(source, StatsSource::Rollup { granularity: 3600 });
    assert_eq!(stats[0].count, 1);
}

fn count(path: &std::path::Path, sql: &str) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

/// `n` samples on day `-days`, ids `{tag}{i}`, spread over 20 resources.
fn day_batch(days: i64, tag: &str, n: usize) -> Vec<meter::Sample> {
    (0..n)
        .map(|i| {
            let t = today() - Duration::days(days) + Duration::milliseconds(i as i64 * 7);
            sample(
                &format!("{tag}{i}"),
                "cpu",
                &format!("r{}", i % 20),
                &iso(t),
                i as f64,
            )
        })
        .collect()
}

fn sqlite_at(path: &std::path::Path, opts: &StorageOptions) -> storage::sqlite::SqliteStorage {
    let target = storage::sqlite::Target::File(path.to_path_buf());
    storage::sqlite::SqliteStorage::open(target, opts).unwrap()
}

/// Check one reclaim step against the bounds; returns rows deleted.
fn check_step(step: &storage::sqlite::Reclaimed, rows_before: i64) {
    use storage::sqlite::{RECLAIM_DROP_ROWS, RECLAIM_INDEX_ROWS, RECLAIM_ROWS};
    match (&step.index, step.dropped) {
        (Some(_), false) => {
            assert_eq!(step.rows, 0, "{step:?}");
            assert!(rows_before <= RECLAIM_INDEX_ROWS, "{step:?}");
        }
        (None, false) => assert!(step.rows as i64 <= RECLAIM_ROWS, "{step:?}"),
        (None, true) => {
            assert!(rows_before <= RECLAIM_DROP_ROWS, "{step:?}");
            assert_eq!(step.rows as i64, rows_before, "{step:?}");
        }
        (Some(_), true) => panic!("{step:?}"),
    }
}

#[test]
fn expiry_hides_a_chunk_at_once_and_reclaims_it_in_bounded_steps_across_a_restart() {
    use storage::sqlite::{RECLAIM_DROP_ROWS, RECLAIM_ROWS};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let opts = StorageOptions::default();
    let big = (RECLAIM_DROP_ROWS + 3 * RECLAIM_ROWS + 123) as usize;
    {
        let mut db = storage::open(&url_for(&path), &opts).unwrap();
        for part in day_batch(3, "old", big).chunks(1000) {
            assert_eq!(db.record_metering_data(part).unwrap().stored, part.len());
        }
        let keep = day_batch(0, "new", 10);
        assert_eq!(db.record_metering_data(&keep).unwrap().stored, 10);
    }
    let old_table = {
        let lo = (today() - Duration::days(3)).unix_timestamp() * 1_000_000;
        format!("sample_{lo}")
    };
    let pages_before = count(&path, "PRAGMA page_count");
    let objects = |path: &std::path::Path| {
        count(
            path,
            &format!("SELECT COUNT(*) FROM sqlite_master WHERE tbl_name = '{old_table}'"),
        )
    };
    // The table, its message key's index and its two secondary indexes.
    assert_eq!(objects(&path), 4);

    let mut janitor = sqlite_at(&path, &opts);
    let ttl = (OffsetDateTime::now_utc() - (today() - Duration::days(1))).whole_seconds() as u64;
    assert_eq!(
        janitor.clear_expired_metering_data(ttl).unwrap(),
        big as u64
    );
    // Gone from every query and the view at once ...
    let all = janitor.get_samples(&SampleFilter::default()).unwrap();
    assert_eq!(all.len(), 10);
    assert!(all.iter().all(|s| s.message_id.starts_with("new")));
    assert_eq!(count(&path, "SELECT COUNT(*) FROM sample"), 10);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM sample_partition"), 1);
    // ... while its pages are reclaimed later: expiry itself took one bounded step (a small
    // chunk: it dropped an index).
    assert_eq!(count(&path, "SELECT COUNT(*) FROM sample_graveyard"), 1);
    assert_eq!(objects(&path), 3);
    let rows_left =
        |path: &std::path::Path| count(path, &format!("SELECT COUNT(*) FROM \"{old_table}\""));
    assert_eq!(rows_left(&path), big as i64);
    drop(janitor);

    // A restart in the middle: the graveyard is in the schema, a new handle carries on.
    let mut db = sqlite_at(&path, &opts);
    let mut steps = Vec::new();
    let mut before = rows_left(&path);
    while let Some(step) = db.reclaim_step().unwrap() {
        assert_eq!(step.table, old_table);
        check_step(&step, before);
        if step.dropped {
            assert_eq!(objects(&path), 0);
        } else {
            before = rows_left(&path);
        }
        steps.push(step);
        assert!(steps.len() < 100, "reclaim does not end");
    }
    let rows: u64 = steps.iter().map(|s| s.rows).sum();
    assert_eq!(rows as usize, big, "every row reclaimed once");
    assert!(steps.last().unwrap().dropped);
    // The other two indexes, deletes of RECLAIM_ROWS down to RECLAIM_DROP_ROWS, then the drop.
    let deletes = (big as i64 - RECLAIM_DROP_ROWS + RECLAIM_ROWS - 1) / RECLAIM_ROWS;
    assert_eq!(steps.len() as i64, 2 + deletes + 1, "{steps:?}");
    assert!(steps[0].index.is_some());
    assert_eq!(count(&path, "SELECT COUNT(*) FROM sample_graveyard"), 0);
    assert_eq!(chunk_tables(&path).len(), 1);
    // The pages are free for new chunks: the file did not grow, nothing leaked.
    assert_eq!(count(&path, "PRAGMA page_count"), pages_before);
    assert!(count(&path, "PRAGMA freelist_count") > 0);
    let ok: String = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert_eq!(db.get_samples(&SampleFilter::default()).unwrap().len(), 10);
}

#[test]
fn batches_reclaim_an_expired_chunk_one_step_each_and_a_late_sample_starts_a_fresh_chunk() {
    use storage::sqlite::{RECLAIM_DROP_ROWS, RECLAIM_ROWS};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let opts = StorageOptions::default();
    let big = (RECLAIM_DROP_ROWS + 2 * RECLAIM_ROWS) as usize;
    let mut writer = storage::open(&url_for(&path), &opts).unwrap();
    for part in day_batch(3, "old", big).chunks(1000) {
        writer.record_metering_data(part).unwrap();
    }
    writer.record_metering_data(&day_batch(0, "w", 1)).unwrap();
    let old_table = format!(
        "sample_{}",
        (today() - Duration::days(3)).unix_timestamp() * 1_000_000
    );
    let rows_left = || count(&path, &format!("SELECT COUNT(*) FROM \"{old_table}\""));
    let indexes = || {
        count(
            &path,
            &format!("SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = '{old_table}'"),
        )
    };

    // Another process expires the day (and takes one step: the message key's index).
    let mut janitor = storage::open(&url_for(&path), &opts).unwrap();
    let ttl = (OffsetDateTime::now_utc() - (today() - Duration::days(1))).whole_seconds() as u64;
    assert_eq!(
        janitor.clear_expired_metering_data(ttl).unwrap(),
        big as u64
    );
    assert_eq!((rows_left(), indexes()), (big as i64, 2));

    // The writer learns of it through the epoch; each batch is followed by one step.
    let out = writer.record_metering_data(&day_batch(0, "a", 5)).unwrap();
    assert_eq!(out.stored, 5);
    assert_eq!((rows_left(), indexes()), (big as i64, 1));
    let out = writer.record_metering_data(&day_batch(0, "a2", 5)).unwrap();
    assert_eq!(out.stored, 5);
    assert_eq!((rows_left(), indexes()), (big as i64, 0));
    let out = writer.record_metering_data(&day_batch(0, "b", 5)).unwrap();
    assert_eq!(out.stored, 5);
    assert_eq!(rows_left(), big as i64 - RECLAIM_ROWS);

    // A late sample for the expired day (no time to live configured, so accepted): the
    // buried table is finished off first and the day's new chunk holds only the new sample.
    let out = writer
        .record_metering_data(&day_batch(3, "late", 1))
        .unwrap();
    assert_eq!(out.stored, 1);
    assert_eq!((rows_left(), indexes()), (1, 3));
    assert_eq!(count(&path, "SELECT COUNT(*) FROM sample_graveyard"), 0);
    let got: Vec<_> = writer
        .get_samples(&SampleFilter {
            end: Some(today() - Duration::days(2)),
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|s| s.message_id)
        .collect();
    assert_eq!(got, ["late0"]);
    let out = writer.record_metering_data(&day_batch(0, "c", 5)).unwrap();
    assert_eq!(out.stored, 5);
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM sample"),
        1 + 1 + 5 + 5 + 5 + 5
    );
}

#[test]
fn a_version_2_file_gets_the_graveyard_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let opts = StorageOptions::default();
    {
        let mut db = storage::open(&url_for(&path), &opts).unwrap();
        db.record_metering_data(&day_batch(3, "old", 5)).unwrap();
        db.record_metering_data(&day_batch(0, "new", 5)).unwrap();
    }
    // What a version 2 file looks like: no graveyard.
    Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TABLE sample_graveyard; UPDATE schema_version SET version = 2")
        .unwrap();
    let mut db = storage::open(&url_for(&path), &opts).unwrap();
    assert_eq!(
        count(&path, "SELECT version FROM schema_version"),
        storage::sqlite::schema::current_version()
    );
    let ttl = (OffsetDateTime::now_utc() - (today() - Duration::days(1))).whole_seconds() as u64;
    assert_eq!(db.clear_expired_metering_data(ttl).unwrap(), 5);
    assert_eq!(
        chunk_tables(&path).len(),
        1,
        "a small chunk goes in expiry's own step"
    );
    assert_eq!(db.get_samples(&SampleFilter::default()).unwrap().len(), 5);
}

/// uuid1 `message_id`s of the same minute, their low clock bits wrapped at random (as
/// `str(uuid.uuid1())` from many hosts), plus each one's key form as another id.
fn uuid1_batch(days: i64, n: usize) -> Vec<meter::Sample> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = today() - Duration::days(days) + Duration::seconds(i as i64);
        let low = (mix(i as u64) as u32) as u64;
        let id = format!(
            "{low:08x}-9e41-11ef-8a3c-{:012x}",
            0x0242_ac12_0000 + i as u64
        );
        let key = storage::msgkey::message_key(&id).into_owned();
        assert_ne!(key, id);
        out.push(sample(&id, "cpu", "r", &iso(t), i as f64));
        out.push(sample(&key, "cpu", "r", &iso(t), i as f64));
    }
    out
}

/// Rebuild chunk table `chunk` of the file `c` as an older version made it: `unique` is its
/// uniqueness clause (a `UNIQUE` column for version 3, a unique index for versions 4 and 5),
/// without version 6's `message_key` column. The rows are kept.
fn remake_chunk_as_before_v6(c: &Connection, chunk: &str, unique_index: Option<&str>) {
    let view: String = c
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'sample'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let (column, index) = match unique_index {
        None => (" UNIQUE".to_string(), String::new()),
        Some(expr) => (
            String::new(),
            format!("CREATE UNIQUE INDEX \"ix_{chunk}_message_key\" ON \"{chunk}\" ({expr});"),
        ),
    };
    let id = storage::msgkey::message_id_sql("");
    c.execute_batch(&format!(
        "DROP VIEW sample;
         CREATE TABLE old_rows AS SELECT * FROM \"{chunk}\";
         DROP TABLE \"{chunk}\";
         CREATE TABLE \"{chunk}\" (id INTEGER PRIMARY KEY, meter_id INTEGER NOT NULL,
           resource_id INTEGER NOT NULL, volume REAL NOT NULL, timestamp INTEGER NOT NULL,
           recorded_at INTEGER NOT NULL, message_id TEXT NOT NULL{column}, message_signature TEXT);
         {view};
         {index}
         CREATE INDEX \"ix_{chunk}_meter_timestamp\" ON \"{chunk}\" (meter_id, timestamp);
         CREATE INDEX \"ix_{chunk}_resource_timestamp\" ON \"{chunk}\" (resource_id, timestamp);
         INSERT INTO \"{chunk}\" SELECT id, meter_id, resource_id, volume, timestamp, recorded_at,
           {id}, message_signature FROM old_rows;
         DROP TABLE old_rows;"
    ))
    .unwrap();
}

/// Each version's chunks keep the uniqueness they were made with: version 3 a `UNIQUE`
/// `message_id` column, versions 4 and 5 a unique index on the time-ordered key expression,
/// version 6 on the `message_key` column the driver writes. All must admit exactly the
/// distinct ids: a retry is a duplicate in each, and an id and its key form are two samples.
#[test]
fn every_version_s_chunks_admit_exactly_the_distinct_message_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let opts = StorageOptions::default();
    let v3 = uuid1_batch(3, 50);
    let v5 = uuid1_batch(2, 40);
    {
        let mut db = storage::open(&url_for(&path), &opts).unwrap();
        assert_eq!(db.record_metering_data(&v3).unwrap().stored, 100);
        assert_eq!(db.record_metering_data(&v5).unwrap().stored, 80);
    }
    // Turn those chunks into ones made by versions 3 and 5, and the file into a version 3 one.
    let c = Connection::open(&path).unwrap();
    let chunks = chunk_tables(&path);
    remake_chunk_as_before_v6(&c, &chunks[0], None);
    let expr = storage::msgkey::message_key_sql("message_id", storage::msgkey::Dialect::Sqlite);
    remake_chunk_as_before_v6(&c, &chunks[1], Some(&expr));
    c.execute_batch("UPDATE schema_version SET version = 3")
        .unwrap();
    drop(c);

    let mut db = storage::open(&url_for(&path), &opts).unwrap();
    assert_eq!(
        count(&path, "SELECT version FROM schema_version"),
        storage::sqlite::schema::current_version()
    );
    let out = db.record_metering_data(&v3).unwrap();
    assert_eq!(
        (out.stored, out.duplicates),
        (0, 100),
        "retry into the v3 chunk"
    );
    // Into the v5 chunk: its 80 stored already, and 5 more pairs.
    let out = db.record_metering_data(&uuid1_batch(2, 45)).unwrap();
    assert_eq!((out.stored, out.duplicates), (10, 80), "the v5 chunk");

    let new = uuid1_batch(0, 200);
    let out = db.record_metering_data(&new).unwrap();
    assert_eq!((out.stored, out.duplicates), (200 * 2, 0));
    let out = db.record_metering_data(&new[..30]).unwrap();
    assert_eq!(
        (out.stored, out.duplicates),
        (0, 30),
        "retry into the v6 chunk"
    );
    // Duplicates inside one batch, too.
    let mut twice = uuid1_batch(1, 3);
    twice.extend(twice.clone());
    let out = db.record_metering_data(&twice).unwrap();
    assert_eq!((out.stored, out.duplicates), (6, 6));

    let tables = chunk_tables(&path);
    assert_eq!(tables.len(), 4);
    let c = Connection::open(&path).unwrap();
    let glob_index = |table: &str| {
        count(
            &path,
            &format!(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = '{table}'
                   AND name LIKE '%message_key' AND sql LIKE '%GLOB%'"
            ),
        )
    };
    let keyed = |t: &str| storage::sqlite::schema::keyed_chunk(&c, t).unwrap();
    assert_eq!((keyed(&tables[0]), glob_index(&tables[0])), (false, 0));
    assert_eq!((keyed(&tables[1]), glob_index(&tables[1])), (false, 1));
    assert_eq!((keyed(&tables[2]), glob_index(&tables[2])), (true, 0));
    assert_eq!((keyed(&tables[3]), glob_index(&tables[3])), (true, 0));
    // A v6 chunk keeps each id as its key only: a uuid1 id's 16 bytes, any other id itself.
    let kinds = |t: &str, blob: &str| {
        count(
            &path,
            &format!(
                "SELECT COUNT(*) FROM \"{t}\" WHERE message_id IS NULL
                   AND typeof(message_key) = '{blob}'
                   AND (typeof(message_key) = 'text' OR length(message_key) = 16)"
            ),
        )
    };
    assert_eq!(
        (kinds(&tables[3], "blob"), kinds(&tables[3], "text")),
        (200, 200)
    );
    // Older chunks keep their ids; the key column v6 added them stays empty.
    let kept = |t: &str| {
        count(
            &path,
            &format!(
                "SELECT COUNT(*) FROM \"{t}\" WHERE message_id IS NOT NULL
                   AND message_key IS NULL"
            ),
        )
    };
    assert_eq!((kept(&tables[0]), kept(&tables[1])), (100, 90));
    // The column keeps each id as sent.
    let got = db.get_samples(&SampleFilter::default()).unwrap();
    let mut ids: Vec<String> = got.into_iter().map(|s| s.message_id).collect();
    ids.sort();
    let mut want: Vec<String> = v3
        .iter()
        .chain(&uuid1_batch(2, 45))
        .chain(&new)
        .chain(&twice[..6])
        .map(|s| s.message_id.clone())
        .collect();
    want.sort();
    assert_eq!(ids, want);
    // A client outside the daemon (the sqlite3 shell) can write each chunk, and the unique
    // index still refuses a duplicate: in a version 6 chunk it must give the key, which
    // msgkey::message_key_blob_sql computes.
    let again = |table: &str, id_col: &str, id: &str| {
        let insert = format!(
            "INSERT INTO \"{table}\" (meter_id, resource_id, volume, timestamp, recorded_at,
               {id_col})
               SELECT meter_id, resource_id, volume, timestamp, recorded_at, {id}
                 FROM sample WHERE message_id GLOB '*-*-1*' AND timestamp IN
                   (SELECT timestamp FROM \"{table}\") LIMIT 1"
        );
        c.execute(&insert, []).unwrap_err().to_string()
    };
    let err = again(&tables[1], "message_id", "message_id");
    assert!(err.contains("UNIQUE"), "{err}");
    let key = storage::msgkey::message_key_blob_sql("message_id");
    let err = again(&tables[3], "message_key", &key);
    assert!(err.contains("UNIQUE"), "{err}");
    let missing_key = format!(
        "INSERT INTO \"{t}\" (meter_id, resource_id, volume, timestamp, recorded_at, message_id)
           VALUES (1, 1, 1.0, 1, 1, 'new-id')",
        t = tables[3]
    );
    let err = c.execute(&missing_key, []).unwrap_err().to_string();
    assert!(err.contains("NOT NULL"), "{err}");
}

/// SQLite refuses a compound SELECT of more than 500 terms: a store of day chunks kept without
/// a TTL passes that after 500 days. Hourly chunks make it 600 here: chunk creation (which
/// remakes the `sample` view) and the raw queries across all of them must still work.
#[test]
fn more_chunks_than_sqlite_allows_in_one_compound_select() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let opts = StorageOptions {
        partition_span_seconds: 3600,
        ..StorageOptions::default()
    };
    let mut db = storage::open(&url_for(&path), &opts).unwrap();
    let t0 = today() - Duration::hours(600);
    let n = 600;
    for first in (0..n).step_by(100) {
        let batch: Vec<_> = (first..first + 100)
            .map(|h| {
                let t = t0 + Duration::hours(h) + Duration::minutes(30);
                sample(&format!("m{h}"), "cpu", "r", &iso(t), h as f64)
            })
            .collect();
        let out = db.record_metering_data(&batch).unwrap();
        assert_eq!(out.stored, 100);
    }
    assert_eq!(chunk_tables(&path).len(), n as usize);
    // The view, as the sqlite3 shell sees it, holds every chunk.
    assert_eq!(count(&path, "SELECT COUNT(*) FROM sample"), n);
    assert_eq!(
        count(&path, "SELECT CAST(SUM(volume) AS INTEGER) FROM sample"),
        n * (n - 1) / 2
    );
    // A raw statistics query across all chunks (no start time: no rollup answers it).
    let stats = db
        .get_meter_statistics(
            &SampleFilter {
                meter: Some("cpu".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].count, n as u64);
    assert_eq!(stats[0].sum, (n * (n - 1) / 2) as f64);
    // samples walks the chunks newest first; meters and resources read the union.
    let all = db.get_samples(&SampleFilter::default()).unwrap();
    assert_eq!(all.len(), n as usize);
    assert_eq!(all[0].message_id, format!("m{}", n - 1));
    assert_eq!(all[n as usize - 1].message_id, "m0");
    let meters = db.get_meters(&SampleFilter::default()).unwrap();
    assert_eq!(meters.len(), 1);
    let resources = db.get_resources(&SampleFilter::default()).unwrap();
    assert_eq!(resources.len(), 1);
    // Retention of the oldest 100 hours through the nested view.
    let ttl = (OffsetDateTime::now_utc() - (t0 + Duration::hours(100))).whole_seconds() as u64;
    assert_eq!(db.clear_expired_metering_data(ttl).unwrap(), 100);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM sample"), n - 100);
}

//! One conformance suite for every storage driver: SQLite, PostgreSQL and MariaDB/MySQL run
//! the same tests through the [`Storage`] trait (the macro at the bottom instantiates each test
//! once per driver: `sqlite::…`, `postgresql::…`, `mariadb::…`).
//!
//! Each test gets its own database (a temp file, or a `CREATE DATABASE` dropped afterwards; see
//! `servers/mod.rs`). The PostgreSQL and MariaDB servers must be running: when one is not, its
//! tests fail with a message saying so. The two-writer test re-executes this binary as two
//! child processes (`child_writer` with an environment variable), as `processes.rs` does.

mod common;
mod servers;

use common::{fold, level, s, sample, Aggregate, NO_SAMPLES};
use meter::{CounterType, Sample, Value, Volume};
use servers::proxy::Proxy;
use servers::{Kind, TestDb};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration as StdDuration, Instant};
use storage::{SampleFilter, Storage, StorageError, StorageOptions};
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use time::{Duration, OffsetDateTime, UtcOffset};

const BASE: OffsetDateTime = datetime!(2026-01-01 00:00:00 UTC);

fn iso(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

fn ids(samples: &[storage::StoredSample]) -> Vec<String> {
    samples.iter().map(|s| s.message_id.clone()).collect()
}

/// What the test knows about each sample it stored, for computing expectations independently.
#[derive(Clone)]
struct Known {
    id: String,
    meter: &'static str,
    unit: &'static str,
    resource: &'static str,
    project: &'static str,
    user: &'static str,
    source: &'static str,
    ts: OffsetDateTime,
    volume: f64,
    flavor: &'static str,
}

/// 60 samples over two resources, three meters (one name with two units), two sources,
/// timestamps 37 s apart written in assorted ISO forms.
fn dataset() -> (Vec<Sample>, Vec<Known>) {
    let mut samples = Vec::new();
    let mut known = Vec::new();
    for k in 0..60i64 {
        let (resource, project, user, flavor, vcpus) = if k % 2 == 0 {
            ("r1", "p1", "u1", "m1.tiny", 1)
        } else {
            ("r2", "p2", "u2", "m1.small", 2)
        };
        let (meter, unit, kind) = match k % 4 {
            0 => ("disk.read.bytes", "B", CounterType::Cumulative),
            3 => ("cpu_util", "ratio", CounterType::Gauge),
            _ => ("cpu_util", "%", CounterType::Gauge),
        };
        let source = if k % 5 == 0 { "other" } else { "openstack" };
        let ts = BASE + Duration::seconds(37 * k) + Duration::microseconds(k);
        // Alternate offsets and naive forms: all must normalize to the same instant.
        let ts_text = match k % 3 {
            0 => iso(ts),
            1 => iso(ts.to_offset(UtcOffset::from_hms(2, 0, 0).unwrap())),
            _ => iso(ts).trim_end_matches('Z').to_string(),
        };
        let volume = k as f64 * 1.5 + 0.25;
        let id = format!("m{k:03}");
        let mut smp = sample(&id, meter, resource, &ts_text, volume);
        smp.counter_unit = unit.into();
        smp.counter_type = kind;
        smp.project_id = Some(project.into());
        smp.user_id = Some(user.into());
        smp.source = source.into();
        let mut md = vec![
            (
                s("flavor"),
                Value::Map(vec![
                    (s("name"), s(flavor)),
                    (s("vcpus"), Value::Int(vcpus)),
                ]),
            ),
            (s("tags"), Value::Array(vec![s("web"), s(resource)])),
            (s("public"), Value::Bool(resource == "r2")),
            (
                s("ram_gb"),
                Value::Float(if resource == "r1" { 0.5 } else { 2.0 }),
            ),
        ];
        // r1's display name changes halfway: a new resource row, newest metadata wins.
        let display = if resource == "r1" && k >= 30 {
            "web-renamed"
        } else {
            "web"
        };
        md.push((s("display_name"), s(display)));
        smp.resource_metadata = Value::Map(md).into();
        samples.push(smp);
        known.push(Known {
            id,
            meter,
            unit,
            resource,
            project,
            user,
            source,
            ts,
            volume,
            flavor,
        });
    }
    (samples, known)
}

fn loaded(kind: Kind) -> (TestDb, Box<dyn Storage>, Vec<Known>) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let (samples, known) = dataset();
    let out = db.record_metering_data(&samples).unwrap();
    assert_eq!(out.stored, samples.len());
    (t, db, known)
}

/// Expected ids for a predicate, newest first (the order get_samples promises).
fn expect(known: &[Known], pred: impl Fn(&Known) -> bool) -> Vec<String> {
    let mut v: Vec<&Known> = known.iter().filter(|k| pred(k)).collect();
    v.sort_by_key(|k| std::cmp::Reverse(k.ts));
    v.iter().map(|k| k.id.clone()).collect()
}

fn stores_and_reads_back_every_field(kind: Kind) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let mut smp = sample(
        "id-1",
        "cpu",
        "vm-1",
        "2026-03-04T05:06:07.123456+01:00",
        42.5,
    );
    smp.counter_type = CounterType::Cumulative;
    smp.counter_unit = "ns".into();
    smp.counter_volume = Volume::Int(7);
    smp.user_id = None;
    smp.extra = vec![("unknown".into(), Value::Int(1))];
    // Values that test the column types: unicode, a float needing all 17 digits, big ints.
    smp.resource_metadata = Value::Map(vec![
        (s("display_name"), s("vm-é-🙂")),
        (
            s("flavor"),
            Value::Map(vec![(s("name"), s("m1.tiny")), (s("vcpus"), Value::Int(1))]),
        ),
        (s("ratio"), Value::Float(0.1 + 0.2)),
        (s("big"), Value::Int(i64::MIN)),
        (
            s("tags"),
            Value::Array(vec![s("a"), Value::Nil, Value::Bool(false)]),
        ),
    ])
    .into();
    let before = OffsetDateTime::now_utc();
    let out = db.record_metering_data(std::slice::from_ref(&smp)).unwrap();
    assert_eq!((out.stored, out.duplicates, out.rejected.len()), (1, 0, 0));

    let got = db.get_samples(&SampleFilter::default()).unwrap();
    assert_eq!(got.len(), 1);
    let g = &got[0];
    assert_eq!(g.source, "openstack");
    assert_eq!(g.counter_name, "cpu");
    assert_eq!(g.counter_type, CounterType::Cumulative);
    assert_eq!(g.counter_unit, "ns");
    assert_eq!(g.counter_volume, 7.0);
    assert_eq!(g.user_id, None);
    assert_eq!(g.project_id.as_deref(), Some("project-1"));
    assert_eq!(g.resource_id, "vm-1");
    assert_eq!(g.timestamp, datetime!(2026-03-04 04:06:07.123456 UTC));
    assert!(
        g.recorded_at >= before - Duration::seconds(1)
            && g.recorded_at <= OffsetDateTime::now_utc() + Duration::seconds(1),
        "{} vs {before}",
        g.recorded_at
    );
    assert_eq!(
        g.resource_metadata,
        serde_json::json!({
            "display_name": "vm-é-🙂",
            "flavor": {"name": "m1.tiny", "vcpus": 1},
            "ratio": 0.1 + 0.2,
            "big": i64::MIN,
            "tags": ["a", null, false],
        })
    );
    assert_eq!(g.message_id, "id-1");
    assert_eq!(g.message_signature.as_deref(), Some("sig-id-1"));
    // Case and trailing spaces make different ids (no case-insensitive or PAD SPACE collation).
    let mut upper = smp.clone();
    upper.message_id = "ID-1".into();
    let mut spaced = smp.clone();
    spaced.message_id = "id-1 ".into();
    let out = db.record_metering_data(&[upper, spaced, smp]).unwrap();
    assert_eq!((out.stored, out.duplicate_indices), (2, vec![2]));
}

fn duplicates_within_and_across_batches_are_counted_not_stored(kind: Kind) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let ts = "2026-01-01T00:00:00";
    let a = sample("a", "cpu", "r", ts, 1.0);
    let b = sample("b", "cpu", "r", ts, 2.0);
    let mut a_again = sample("a", "cpu", "r", ts, 99.0);
    a_again.resource_id = "elsewhere".into();

    let out = db
        .record_metering_data(&[a.clone(), b.clone(), a_again.clone()])
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (2, 1));
    assert_eq!(out.duplicate_indices, vec![2]);

    // A retried batch stores nothing twice.
    let c = sample("c", "cpu", "r", ts, 3.0);
    let out = db.record_metering_data(&[b.clone(), c, a.clone()]).unwrap();
    assert_eq!((out.stored, out.duplicates), (1, 2));
    assert_eq!(out.duplicate_indices, vec![0, 2]);
    // Idempotence: the same batch again and again changes nothing.
    for _ in 0..3 {
        let out = db.record_metering_data(&[a.clone(), b.clone()]).unwrap();
        assert_eq!((out.stored, out.duplicate_indices), (0, vec![0, 1]));
    }

    // Across connections too.
    let mut other = t.open();
    let out = other.record_metering_data(&[a_again]).unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 1));

    let got = db.get_samples(&SampleFilter::default()).unwrap();
    let mut got_ids = ids(&got);
    got_ids.sort();
    assert_eq!(got_ids, ["a", "b", "c"]);
    assert_eq!(t.scalar("SELECT COUNT(*) FROM sample"), 3);
    // The first write of "a" won.
    let first = got.iter().find(|g| g.message_id == "a").unwrap();
    assert_eq!(first.counter_volume, 1.0);
    assert_eq!(first.resource_id, "r");
}

fn duplicates_inside_large_batches_are_attributed_to_their_indices(kind: Kind) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let ts = "2026-01-01T00:00:00";
    let mk = |i: usize| {
        sample(
            &format!("d{i}"),
            "cpu",
            &format!("r{}", i % 4),
            ts,
            i as f64,
        )
    };
    // Every third id is stored beforehand.
    let before: Vec<Sample> = (0..1200).filter(|i| i % 3 == 0).map(mk).collect();
    assert_eq!(db.record_metering_data(&before).unwrap().stored, 400);

    // 1200 ids, then 20 repeats of ids that are new in this batch: several chunks, each
    // mixing new rows with old and repeated ones.
    let mut batch: Vec<Sample> = (0..1200).map(mk).collect();
    batch.extend((0..20).map(|k| {
        let mut repeat = mk(1 + 3 * k);
        repeat.counter_volume = Volume::Float(-1.0);
        repeat
    }));
    let out = db.record_metering_data(&batch).unwrap();
    let mut want: Vec<usize> = (0..1200).filter(|i| i % 3 == 0).collect();
    want.extend(1200..1220);
    assert_eq!(out.duplicate_indices, want);
    assert_eq!((out.stored, out.duplicates), (800, 420));
    let got = db.get_samples(&SampleFilter::default()).unwrap();
    assert_eq!(got.len(), 1200);
    let d4 = got.iter().find(|s| s.message_id == "d4").unwrap();
    assert_eq!(d4.counter_volume, 4.0, "the first occurrence was stored");
    assert_eq!(t.scalar("SELECT COUNT(*) FROM sample"), 1200);
}

fn a_partially_bad_batch_stores_the_good_samples(kind: Kind) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let ts = "2026-01-01T00:00:00Z";
    let batch = vec![
        sample("ok-0", "cpu", "r", ts, 1.0),
        sample("bad-ts", "cpu", "r", "yesterday", 1.0),
        sample("bad-nan", "cpu", "r", ts, f64::NAN),
        sample("ok-3", "cpu", "r", ts, 1.0),
        sample("bad-inf", "cpu", "r", ts, f64::INFINITY),
        sample("", "cpu", "r", ts, 1.0),
        sample("bad-month", "cpu", "r", "2026-13-01T00:00:00", 1.0),
        sample("ok-0", "cpu", "r", ts, 2.0),
    ];
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!(out.stored, 2);
    assert_eq!(out.duplicate_indices, vec![7]);
    let rejected: Vec<usize> = out.rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(rejected, vec![1, 2, 4, 5, 6]);
    assert!(
        out.rejected[0].1.starts_with("invalid timestamp"),
        "{:?}",
        out.rejected
    );
    assert!(
        out.rejected[1].1.contains("non-finite"),
        "{:?}",
        out.rejected
    );
    assert!(
        out.rejected[3].1.contains("message_id"),
        "{:?}",
        out.rejected
    );
    let mut got = ids(&db.get_samples(&SampleFilter::default()).unwrap());
    got.sort();
    assert_eq!(got, ["ok-0", "ok-3"]);

    // All bad: nothing to write, still a clean outcome.
    let out = db.record_metering_data(&batch[1..3]).unwrap();
    assert_eq!((out.stored, out.rejected.len()), (0, 2));
    assert_eq!(db.record_metering_data(&[]).unwrap(), Default::default());
}

fn metadata_in_another_key_order_is_the_same_resource_row(kind: Kind) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let ts = "2026-01-01T00:00:00";
    let a = sample("a", "cpu", "vm", ts, 1.0);
    let mut b = sample("b", "cpu", "vm", ts, 2.0);
    let mut tree = b.resource_metadata.value();
    if let Value::Map(pairs) = &mut tree {
        pairs.reverse();
    }
    b.resource_metadata = tree.into();
    assert_ne!(a.resource_metadata, b.resource_metadata);
    let mut c = sample("c", "cpu", "vm", ts, 3.0);
    c.resource_metadata = Value::Map(vec![(s("display_name"), s("other"))]).into();
    // No owner at all: NULL user and project still identify one row.
    let mut d = sample("d", "cpu", "vm", ts, 4.0);
    d.user_id = None;
    d.project_id = None;
    let mut e = d.clone();
    e.message_id = "e".into();
    assert_eq!(db.record_metering_data(&[a, b, c, d]).unwrap().stored, 4);
    // A second handle (fresh caches) finds the existing rows.
    assert_eq!(t.open().record_metering_data(&[e]).unwrap().stored, 1);
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM resource"),
        3,
        "same metadata in any order: one row; other metadata or owner: another"
    );
}

fn expiry_deletes_old_samples_and_orphans_and_other_handles_keep_working(kind: Kind) {
    let t = TestDb::new(kind);
    let mut writer = t.open();
    let mut janitor = t.open();
    let now = OffsetDateTime::now_utc();
    // Days old: SQLite drops whole day partitions entirely older than the cutoff.
    let old = iso(now - Duration::days(3));
    let fresh = iso(now - Duration::seconds(5));
    let mut batch = vec![
        sample("old-1", "old.meter", "gone", &old, 1.0),
        sample("old-2", "cpu", "kept", &old, 1.0),
        sample("new-1", "cpu", "kept", &fresh, 1.0),
    ];
    batch[1].resource_metadata = batch[2].resource_metadata.clone();
    assert_eq!(writer.record_metering_data(&batch).unwrap().stored, 3);

    assert_eq!(janitor.clear_expired_metering_data(86_400).unwrap(), 2);
    assert_eq!(
        ids(&writer.get_samples(&SampleFilter::default()).unwrap()),
        ["new-1"]
    );
    let count = |sql: &str| t.scalar(sql);
    let gone = "SELECT COUNT(*) FROM resource WHERE resource_id = 'gone'";
    if kind == Kind::Mysql {
        // MariaDB searches for orphans on the handle's reaper thread, not in the call: the
        // idle step wakes it.
        assert!(!janitor.retention_step().unwrap());
        common::wait_until("the reaper deletes the orphaned resource", || {
            count(gone) == 0
        });
    }
    assert_eq!(count(gone), 0);
    // Rollups outlive the samples and keep their meter row.
    assert_eq!(
        count("SELECT COUNT(*) FROM meter WHERE name = 'old.meter'"),
        1
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM resource WHERE resource_id = 'kept'"),
        1
    );

    // The writer cached the ids of "gone" and "old.meter"; the epoch makes it forget them.
    let again = vec![sample("again", "old.meter", "gone", &fresh, 5.0)];
    assert_eq!(writer.record_metering_data(&again).unwrap().stored, 1);
    let got = writer
        .get_samples(&SampleFilter {
            resource_id: Some("gone".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].counter_name, "old.meter");
    // No sample refers to a deleted meter or resource.
    assert_eq!(
        count("SELECT COUNT(*) FROM sample s LEFT JOIN resource r ON r.internal_id = s.resource_id WHERE r.internal_id IS NULL"),
        0
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM sample s LEFT JOIN meter m ON m.id = s.meter_id WHERE m.id IS NULL"),
        0
    );
    if kind != Kind::Postgres {
        assert_eq!(
            count("SELECT COUNT(*) FROM metadata m LEFT JOIN resource r ON r.internal_id = m.id WHERE r.internal_id IS NULL"),
            0
        );
    }
    // Nothing left to expire; a huge TTL expires nothing and does not overflow.
    assert_eq!(janitor.clear_expired_metering_data(86_400).unwrap(), 0);
    assert_eq!(janitor.clear_expired_metering_data(u64::MAX).unwrap(), 0);
    // TTL 0: every driver is partitioned now, and today's partition straddles the cutoff,
    // so it waits for a later pass.
    assert_eq!(janitor.clear_expired_metering_data(0).unwrap(), 0);
}

fn samples_older_than_the_time_to_live_on_arrival_are_counted_not_stored(kind: Kind) {
    let t = TestDb::new(kind);
    let opts = StorageOptions {
        time_to_live_seconds: Some(86_400),
        ..Default::default()
    };
    let mut db = storage::open(&t.url, &opts).unwrap();
    let now = OffsetDateTime::now_utc();
    let batch = vec![
        sample("fresh", "cpu", "r", &iso(now - Duration::hours(1)), 1.0),
        sample("stale", "cpu", "r", &iso(now - Duration::days(2)), 2.0),
    ];
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!((out.stored, out.expired), (1, 1));
    assert_eq!(out.rejected, vec![(1, storage::EXPIRED_REASON.to_string())]);
    assert_eq!(
        ids(&db.get_samples(&SampleFilter::default()).unwrap()),
        ["fresh"]
    );
}

/// splitmix64: reproducible random data without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn rollups_answer_aligned_statistics_as_the_raw_computation(kind: Kind) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let hour = 3_600_000_000i64;
    let start_t = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT) - Duration::days(2);
    let start = (start_t.unix_timestamp_nanos() / 1000) as i64;
    let units = ["ns", "%"];
    // (message_id, unit, resource, µs, volume) of every sample stored, first write wins.
    let mut stored: BTreeMap<String, (&str, String, i64, f64)> = BTreeMap::new();
    let mut seq = 0u64;
    for round in 0..6 {
        let mut batch = Vec::new();
        for _ in 0..120 {
            seq += 1;
            let r = mix(seq);
            let id = if r % 6 == 0 && seq > 10 {
                format!("m{}", (r >> 9) % (seq - 1) + 1) // a retry of an earlier sample
            } else {
                format!("m{seq}")
            };
            let n: u64 = id[1..].parse().unwrap();
            let rn = mix(n);
            let ts = start + (rn >> 3) as i64 % (2 * 24 * hour);
            let unit = units[(rn >> 40) as usize % 2];
            let res = format!("r{}", (rn >> 50) % 4);
            let v = ((rn >> 20) % 10_000) as f64 / 4.0 - 100.0;
            let when = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts) * 1000).unwrap();
            // A retry carries the same timestamp; its volume differs and must not count.
            let vol = if stored.contains_key(&id) { v + 1e6 } else { v };
            let mut smp = sample(&id, "cpu", &res, &iso(when), vol);
            smp.counter_unit = unit.into();
            stored.entry(id).or_insert((unit, res, ts, v));
            batch.push(smp);
        }
        let _ = round;
        db.record_metering_data(&batch).unwrap();
    }
    let end_t = start_t + Duration::days(2);
    for (resource, period, gran) in [
        (None, 3600, 3600),
        (None, 86_400, 86_400),
        (Some("r2"), 7200, 3600),
        (Some("r1"), 86_400, 86_400),
    ] {
        let f = SampleFilter {
            meter: Some("cpu".into()),
            resource_id: resource.map(String::from),
            start: Some(start_t),
            end: Some(end_t),
            ..Default::default()
        };
        let (got, source) = db.get_meter_statistics_from(&f, Some(period)).unwrap();
        assert_eq!(source, storage::StatsSource::Rollup { granularity: gran });
        // The raw definition, computed here.
        let p = period as i64 * 1_000_000;
        let mut want: BTreeMap<(i64, &str), Aggregate> = BTreeMap::new();
        for (unit, res, ts, v) in stored.values() {
            if resource.is_some_and(|r| r != res) {
                continue;
            }
            let e = want.entry(((ts - start) / p, unit)).or_insert(NO_SAMPLES);
            fold(e, *v, *ts);
        }
        assert_eq!(got.len(), want.len(), "{resource:?} {period}");
        for (st, ((k, unit), w)) in got.iter().zip(&want) {
            let ps = (st.period_start.unix_timestamp_nanos() / 1000) as i64;
            assert_eq!((ps, st.unit.as_str()), (start + k * p, *unit));
            assert_eq!(st.count, w.0);
            assert!(
                (st.sum - w.1).abs() <= 1e-6 * w.1.abs().max(1.0),
                "{} {}",
                st.sum,
                w.1
            );
            assert_eq!((st.min, st.max), (w.2, w.3));
            let first = (st.duration_start.unix_timestamp_nanos() / 1000) as i64;
            let last = (st.duration_end.unix_timestamp_nanos() / 1000) as i64;
            assert_eq!((first, last), (w.4, w.5));
        }
    }
}

/// Rollups hourly kept a day, daily kept forever.
fn hourly_for_a_day_and_daily() -> StorageOptions {
    let hourly = storage::rollup::Granularity {
        seconds: 3600,
        retention_seconds: 86_400,
    };
    StorageOptions {
        rollups: vec![hourly, level(86_400)],
        ..Default::default()
    }
}

/// With the default levels a new store writes per-resource rollups hourly only; the daily
/// level is their union with its own rows, into which the hourly buckets are folded when they
/// pass their retention. Answers stay the raw computation's before and after the fold, after a
/// second pass (nothing counted twice) and after late samples for folded days.
fn per_resource_daily_rollups_are_folded_from_the_hourly_ones(kind: Kind) {
    let t = TestDb::new(kind);
    let hour = 3_600_000_000i64;
    let opts = hourly_for_a_day_and_daily();
    let mut db = storage::open(&t.url, &opts).unwrap();
    let admin = &t;
    assert_eq!(
        admin.scalar("SELECT source FROM rollup_level WHERE granularity = 86400"),
        3600
    );
    let today = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT);
    let start_t = today - Duration::days(3);
    let start = (start_t.unix_timestamp_nanos() / 1000) as i64;
    let mut stored: Vec<(String, i64, f64)> = Vec::new();
    let mut seq = 0u64;
    let write = |db: &mut Box<dyn Storage>,
                 stored: &mut Vec<(String, i64, f64)>,
                 seq: &mut u64,
                 n: usize,
                 span_h: i64| {
        let mut batch = Vec::new();
        for _ in 0..n {
            *seq += 1;
            let r = mix(*seq ^ 0x5eed);
            let ts = start + (r >> 3) as i64 % (span_h * hour);
            let res = format!("r{}", (r >> 50) % 3);
            let v = ((r >> 20) % 1000) as f64 / 8.0;
            let when = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts) * 1000).unwrap();
            batch.push(sample(&format!("f{seq}"), "cpu", &res, &iso(when), v));
            stored.push((res, ts, v));
        }
        assert_eq!(db.record_metering_data(&batch).unwrap().stored, n);
    };
    write(&mut db, &mut stored, &mut seq, 300, 72);
    assert_eq!(
        admin.scalar("SELECT COUNT(*) FROM rollup_resource WHERE granularity = 86400"),
        0,
        "the daily level gets no writes of its own"
    );
    let check = |db: &mut Box<dyn Storage>, stored: &[(String, i64, f64)], what: &str| {
        for res in ["r0", "r1", "r2"] {
            let mine: Vec<(i64, f64)> = stored
                .iter()
                .filter(|(r, _, _)| r == res)
                .map(|(_, ts, v)| (*ts, *v))
                .collect();
            assert_daily(db, res, (start_t, today), &mine, &format!("{what} {res}"));
        }
    };
    check(&mut db, &stored, "from the hourly buckets");
    // No sample is old enough to expire; the rollup retention runs and folds the hourly
    // buckets older than a day into daily ones.
    let mut janitor = storage::open(&t.url, &opts).unwrap();
    assert_eq!(janitor.clear_expired_metering_data(30 * 86_400).unwrap(), 0);
    let cutoff = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64 - 24 * hour;
    assert_eq!(
        admin.scalar(&format!(
            "SELECT COUNT(*) FROM rollup_resource WHERE granularity = 3600 AND bucket < {cutoff}"
        )),
        0
    );
    assert!(admin.scalar("SELECT COUNT(*) FROM rollup_resource WHERE granularity = 86400") > 0);
    check(&mut db, &stored, "after the fold");
    // Late samples for the folded days go to hourly buckets, folded at the next pass.
    write(&mut db, &mut stored, &mut seq, 60, 48);
    check(&mut db, &stored, "late samples");
    let mut janitor = storage::open(&t.url, &opts).unwrap();
    assert_eq!(janitor.clear_expired_metering_data(30 * 86_400).unwrap(), 0);
    check(&mut db, &stored, "after a second fold");
}

/// `n` cpu samples of resource r0 (ids `{prefix}{i}` from `from`), at pseudo-random times in
/// `[lo, lo + span)` µs; each (µs, volume) is appended to `stored`.
fn r0_samples(
    prefix: &str,
    from: u64,
    n: u64,
    (lo, span): (i64, i64),
    stored: &mut Vec<(i64, f64)>,
) -> Vec<Sample> {
    (from..from + n)
        .map(|i| {
            let r = mix(i ^ 0xf01d);
            let ts = lo + (r >> 3) as i64 % span;
            let v = ((r >> 20) % 1000) as f64 / 4.0;
            stored.push((ts, v));
            let when = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts) * 1000).unwrap();
            sample(&format!("{prefix}{i}"), "cpu", "r0", &iso(when), v)
        })
        .collect()
}

/// `res`'s daily cpu statistics over [start, end) come from the daily rollup and equal the
/// raw computation over its samples `stored` (µs, volume), per day from the start.
fn assert_daily(
    db: &mut Box<dyn Storage>,
    res: &str,
    (start_t, end_t): (OffsetDateTime, OffsetDateTime),
    stored: &[(i64, f64)],
    what: &str,
) {
    let start = (start_t.unix_timestamp_nanos() / 1000) as i64;
    let f = SampleFilter {
        meter: Some("cpu".into()),
        resource_id: Some(res.into()),
        start: Some(start_t),
        end: Some(end_t),
        ..Default::default()
    };
    let (got, source) = db.get_meter_statistics_from(&f, Some(86_400)).unwrap();
    assert_eq!(
        source,
        storage::StatsSource::Rollup {
            granularity: 86_400
        },
        "{what}"
    );
    let day = 86_400_000_000i64;
    let mut want: BTreeMap<i64, Aggregate> = BTreeMap::new();
    for (ts, v) in stored {
        fold(
            want.entry((ts - start) / day).or_insert(NO_SAMPLES),
            *v,
            *ts,
        );
    }
    assert_eq!(got.len(), want.len(), "{what}");
    for (st, (k, w)) in got.iter().zip(&want) {
        let ps = (st.period_start.unix_timestamp_nanos() / 1000) as i64;
        assert_eq!(ps, start + k * day, "{what}");
        assert_eq!(st.count, w.0, "{what} day {k}");
        assert!((st.sum - w.1).abs() <= 1e-6 * w.1.abs().max(1.0), "{what}");
        assert_eq!((st.min, st.max), (w.2, w.3), "{what} day {k}");
        let first = (st.duration_start.unix_timestamp_nanos() / 1000) as i64;
        let last = (st.duration_end.unix_timestamp_nanos() / 1000) as i64;
        assert_eq!((first, last), (w.4, w.5), "{what} day {k}");
    }
}

/// A level whose source is removed from the configuration takes the source's buckets (merged
/// at open) and is written directly from then on: its answers stay the raw computation's.
fn a_folded_level_whose_source_is_removed_takes_its_buckets(kind: Kind) {
    let t = TestDb::new(kind);
    let both = StorageOptions {
        rollups: vec![level(3600), level(86_400)],
        ..Default::default()
    };
    let daily = StorageOptions {
        rollups: vec![level(86_400)],
        ..Default::default()
    };
    let today = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT);
    let range = (today - Duration::days(3), today);
    let times = (
        (range.0.unix_timestamp_nanos() / 1000) as i64,
        3 * 86_400_000_000,
    );
    let mut stored: Vec<(i64, f64)> = Vec::new();
    let batch = |from, n, stored: &mut Vec<(i64, f64)>| r0_samples("d", from, n, times, stored);
    let check = |db: &mut Box<dyn Storage>, stored: &[(i64, f64)], what: &str| {
        assert_daily(db, "r0", range, stored, what)
    };
    let mut db = storage::open(&t.url, &both).unwrap();
    db.record_metering_data(&batch(0, 200, &mut stored))
        .unwrap();
    check(&mut db, &stored, "folded");
    drop(db);
    let mut db = storage::open(&t.url, &daily).unwrap();
    assert_eq!(
        t.scalar("SELECT source FROM rollup_level WHERE granularity = 86400"),
        0
    );
    assert!(t.scalar("SELECT COUNT(*) FROM rollup_resource WHERE granularity = 86400") > 0);
    check(&mut db, &stored, "merged when the hourly level went");
    db.record_metering_data(&batch(200, 100, &mut stored))
        .unwrap();
    check(&mut db, &stored, "written directly since");
}

/// A store from before sources (every level written directly) is converted at open: the daily
/// level is folded from the hourly one from the start of the day after tomorrow, when writers
/// of the older release have had a day to go. Samples before that are still written to both
/// levels, later ones to the hourly only; answers stay the raw computation's, also after the
/// expiry deleted the old hourly buckets (which the daily ones count already).
fn a_store_with_direct_levels_is_folded_from_a_day_ahead(kind: Kind) {
    let t = TestDb::new(kind);
    let opts = hourly_for_a_day_and_daily();
    let day = 86_400_000_000i64;
    let today = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT);
    let range = (today - Duration::days(3), today + Duration::days(5));
    let start = (range.0.unix_timestamp_nanos() / 1000) as i64;
    let mut stored: Vec<(i64, f64)> = Vec::new();
    let batch = |from, n, lo, span, stored: &mut Vec<(i64, f64)>| {
        r0_samples("u", from, n, (lo, span), stored)
    };
    let check = |db: &mut Box<dyn Storage>, stored: &[(i64, f64)], what: &str| {
        assert_daily(db, "r0", range, stored, what)
    };
    let mut old = storage::open(&t.url, &opts).unwrap();
    // What a store of the previous release looks like: both levels direct.
    t.execute(&format!(
        "UPDATE rollup_level SET source = 0, fold_from = {} WHERE granularity = 86400",
        i64::MIN
    ));
    t.execute("UPDATE cache_epoch SET epoch = epoch + 1");
    old.record_metering_data(&batch(0, 200, start, 3 * day, &mut stored))
        .unwrap();
    assert!(t.scalar("SELECT COUNT(*) FROM rollup_resource WHERE granularity = 86400") > 0);
    check(&mut old, &stored, "both levels direct");

    let mut new = storage::open(&t.url, &opts).unwrap();
    let fold_from = (today + Duration::days(2)).unix_timestamp() * 1_000_000;
    assert_eq!(
        t.scalar("SELECT source FROM rollup_level WHERE granularity = 86400"),
        3600
    );
    assert_eq!(
        t.scalar("SELECT fold_from FROM rollup_level WHERE granularity = 86400"),
        fold_from
    );
    check(&mut new, &stored, "converted");
    // Samples before fold_from go to both levels, later ones (two days ahead) to the hourly.
    let daily = t.scalar("SELECT COUNT(*) FROM rollup_resource WHERE granularity = 86400");
    new.record_metering_data(&batch(200, 60, start, 3 * day, &mut stored))
        .unwrap();
    old.record_metering_data(&batch(300, 60, fold_from, 3 * day, &mut stored))
        .unwrap();
    assert_eq!(
        t.scalar(&format!(
            "SELECT COUNT(*) FROM rollup_resource WHERE granularity = 86400 AND bucket >= {fold_from}"
        )),
        0
    );
    assert!(t.scalar("SELECT COUNT(*) FROM rollup_resource WHERE granularity = 86400") >= daily);
    check(&mut new, &stored, "written both sides of fold_from");
    // The expiry deletes the hourly buckets older than a day: before fold_from, not merged.
    assert_eq!(new.clear_expired_metering_data(30 * 86_400).unwrap(), 0);
    check(&mut new, &stored, "after the hourly retention");
}

fn many_handles_opening_a_fresh_database_at_once_all_succeed(kind: Kind) {
    let t = TestDb::new(kind);
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let url = t.url.clone();
            std::thread::spawn(move || {
                let mut db = storage::open(&url, &StorageOptions::default()).unwrap();
                let smp = sample(&format!("t{i}"), "cpu", "r", "2026-01-01T00:00:00", 1.0);
                db.record_metering_data(&[smp]).unwrap().stored
            })
        })
        .collect();
    let stored: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(stored, 6);
    let version = match kind {
        Kind::Sqlite => storage::sqlite::schema::current_version(),
        Kind::Postgres => storage::postgres::schema::current_version(),
        Kind::Mysql => storage::mysql::schema::current_version(),
    };
    assert_eq!(t.scalar("SELECT version FROM schema_version"), version);
    assert_eq!(t.scalar("SELECT COUNT(*) FROM schema_version"), 1);
    assert_eq!(t.scalar("SELECT COUNT(*) FROM resource"), 1);
    assert_eq!(t.scalar("SELECT COUNT(*) FROM meter"), 1);
}

// ------------------------------------------------------------------ two writer processes

const CHILD_ENV: &str = "STORAGE_CONFORMANCE_CHILD";
const BATCHES: usize = 30;
const BATCH: usize = 200;

/// The ids child `prefix` writes: its own, plus every fifth one shared with the other child.
fn ids_for(prefix: &str) -> Vec<Vec<String>> {
    (0..BATCHES)
        .map(|b| {
            (0..BATCH)
                .map(|i| {
                    let n = b * BATCH + i;
                    if n % 5 == 0 {
                        format!("shared-{n}")
                    } else {
                        format!("{prefix}-{n}")
                    }
                })
                .collect()
        })
        .collect()
}

/// Write `batches` the way the daemon does: a transient failure retries the same batch.
/// Returns (stored, duplicates, transient errors seen).
fn write_retrying(db: &mut dyn Storage, batches: &[Vec<Sample>]) -> (usize, usize, usize) {
    let (mut stored, mut duplicates, mut retries) = (0, 0, 0);
    for batch in batches {
        let deadline = Instant::now() + StdDuration::from_secs(60);
        loop {
            match db.record_metering_data(batch) {
                Ok(out) => {
                    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
                    assert_eq!(out.stored + out.duplicates, batch.len());
                    stored += out.stored;
                    duplicates += out.duplicates;
                    break;
                }
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    retries += 1;
                    std::thread::sleep(StdDuration::from_millis(50));
                }
                Err(e) => panic!("batch failed for good: {e:?}"),
            }
        }
    }
    (stored, duplicates, retries)
}

fn batches_of(ids: &[Vec<String>]) -> Vec<Vec<Sample>> {
    ids.iter()
        .enumerate()
        .map(|(b, batch_ids)| {
            batch_ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let ts = format!("2026-01-01T00:{:02}:{:02}", b % 60, i % 60);
                    sample(id, "cpu", &format!("vm-{}", i % 7), &ts, i as f64)
                })
                .collect()
        })
        .collect()
}

#[test]
fn child_writer() {
    let Ok(job) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (url, prefix) = job.split_once('|').expect("job is URL|PREFIX");
    let mut db = storage::open(url, &StorageOptions::default()).expect("child opens");
    let (stored, duplicates, retries) = write_retrying(db.as_mut(), &batches_of(&ids_for(prefix)));
    println!("RESULT {stored} {duplicates} {retries}");
}

fn two_writer_processes_lose_and_duplicate_nothing(kind: Kind) {
    let t = TestDb::new(kind);
    // Not migrated beforehand: both children race to create the schema.
    let spawn = |prefix: &str| {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{}|{prefix}", t.url))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child test process")
    };
    let children = [spawn("a"), spawn("b")];
    let mut totals = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .split_once("RESULT ")
            .and_then(|(_, rest)| rest.lines().next())
            .unwrap_or_else(|| panic!("no RESULT in {stdout}"));
        let n: Vec<usize> = line.split(' ').map(|x| x.parse().unwrap()).collect();
        assert_eq!(n[0] + n[1], BATCHES * BATCH, "every sample accounted for");
        totals.push((n[0], n[1]));
    }
    let mut want: BTreeSet<String> = BTreeSet::new();
    for prefix in ["a", "b"] {
        want.extend(ids_for(prefix).into_iter().flatten());
    }
    let shared = BATCHES * BATCH / 5;
    assert_eq!(want.len(), 2 * BATCHES * BATCH - shared);
    // Each shared id was stored by exactly one child and reported duplicate by the other.
    assert_eq!(totals[0].0 + totals[1].0, want.len());
    assert_eq!(totals[0].1 + totals[1].1, shared);
    let got = t.message_ids();
    assert_eq!(got.len(), want.len(), "no sample stored twice");
    assert_eq!(
        got.into_iter().collect::<BTreeSet<_>>(),
        want,
        "every message_id stored"
    );
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM resource"),
        7,
        "one resource row per resource, whichever process created it"
    );
}

// ------------------------------------------------------------------ server faults

/// The driver's connection is killed from another session between batches and while batches
/// run: the call that meets the dead connection fails as Unavailable, the next reconnects, and
/// retried batches lose and duplicate nothing.
fn a_killed_connection_is_unavailable_then_recovers(kind: Kind) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let batches = batches_of(&ids_for("k"));
    assert_eq!(db.record_metering_data(&batches[0]).unwrap().stored, BATCH);

    // Killed while idle: the next call fails, nothing of it stored; the one after reconnects.
    assert!(t.kill_connections() >= 1, "the driver holds a connection");
    let err = db.record_metering_data(&batches[1]).unwrap_err();
    assert!(matches!(err, StorageError::Unavailable(_)), "{err:?}");
    assert_eq!(t.scalar("SELECT COUNT(*) FROM sample"), BATCH as i64);
    let out = db.record_metering_data(&batches[1]).unwrap();
    assert_eq!((out.stored, out.duplicates), (BATCH, 0));
    // Reads too.
    t.kill_connections();
    assert!(db
        .get_samples(&SampleFilter::default())
        .unwrap_err()
        .is_transient());
    assert_eq!(
        db.get_samples(&SampleFilter::default()).unwrap().len(),
        2 * BATCH
    );

    // Killed again and again while the remaining batches are written.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        let name = t.name.clone();
        std::thread::spawn(move || {
            let mut kills = 0;
            for _ in 0..20 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(StdDuration::from_millis(40));
                kills += servers::kill_sessions(kind, &name);
            }
            kills
        })
    };
    let (stored, duplicates, retries) = write_retrying(db.as_mut(), &batches[2..]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills = killer.join().unwrap();
    eprintln!("{kind:?}: {kills} kills, {retries} transient failures");
    // A batch that committed just before its connection died may be resent: then its ids
    // come back as duplicates, which is the point of idempotence.
    assert_eq!(stored + duplicates, (BATCHES - 2) * BATCH);
    let got = t.message_ids();
    let want: BTreeSet<String> = ids_for("k").into_iter().flatten().collect();
    assert_eq!(got.len(), want.len(), "nothing stored twice");
    assert_eq!(
        got.into_iter().collect::<BTreeSet<_>>(),
        want,
        "nothing lost"
    );
}

/// A server that is down at open: open succeeds disconnected, calls fail as Unavailable
/// (without a connection attempt more than once a second), and the driver connects once the
/// server is back; a server restart later is survived the same way.
fn a_server_down_at_open_is_waited_for(kind: Kind) {
    let t = TestDb::new(kind);
    t.open(); // migrate
    let proxy = Proxy::start(&kind.addr());
    proxy.set_up(false);
    let url = t.url_via(&proxy.addr);
    let mut db = storage::open(&url, &StorageOptions::default())
        .expect("a server that does not answer is not an open error");
    let batch = vec![sample("x1", "cpu", "r", "2026-01-01T00:00:00", 1.0)];
    let err = db.record_metering_data(&batch).unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    // Back: within a second the driver tries again.
    proxy.set_up(true);
    let started = Instant::now();
    let out = loop {
        match db.record_metering_data(&batch) {
            Ok(out) => break out,
            Err(e) if e.is_transient() && started.elapsed() < StdDuration::from_secs(5) => {
                std::thread::sleep(StdDuration::from_millis(100))
            }
            Err(e) => panic!("did not reconnect: {e:?}"),
        }
    };
    assert_eq!(out.stored, 1);
    assert!(
        started.elapsed() <= StdDuration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A restart: every connection cut, refused for a moment, then back.
    proxy.set_up(false);
    proxy.cut();
    let batch2 = vec![sample("x2", "cpu", "r", "2026-01-01T00:00:01", 2.0)];
    assert!(db.record_metering_data(&batch2).unwrap_err().is_transient());
    assert!(db
        .get_samples(&SampleFilter::default())
        .unwrap_err()
        .is_transient());
    proxy.set_up(true);
    let started = Instant::now();
    loop {
        match db.record_metering_data(&batch2) {
            Ok(out) => {
                assert_eq!(out.stored, 1);
                break;
            }
            Err(e) if e.is_transient() && started.elapsed() < StdDuration::from_secs(5) => {
                std::thread::sleep(StdDuration::from_millis(100))
            }
            Err(e) => panic!("did not reconnect: {e:?}"),
        }
    }
    assert_eq!(t.scalar("SELECT COUNT(*) FROM sample"), 2);
}

/// Refused credentials and a missing database are start-up errors; so are bad parameters. A
/// parameter that does not apply (ceilometer's `charset=utf8`) is ignored.
fn open_errors_are_specific(kind: Kind) {
    let t = TestDb::new(kind);
    let opts = StorageOptions::default();
    let server = kind.addr();
    let scheme = kind.scheme();
    let e = storage::open(
        &format!("{scheme}://no_such_user_x:secret@{server}/{}", t.name),
        &opts,
    )
    .err()
    .expect("unknown user");
    assert!(!e.is_transient(), "{e:?}");
    assert!(!e.to_string().contains("secret"), "{e}");
    let user_part = t
        .url
        .split("://")
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap();
    let e = storage::open(
        &format!("{scheme}://{user_part}@{server}/no_such_db_x"),
        &opts,
    )
    .err()
    .expect("unknown database");
    assert!(!e.is_transient(), "{e:?}");
    assert!(e.to_string().contains("no_such_db_x"), "{e}");
    let e = storage::open(
        &format!("{}&connect_timeout=soon", with_query(&t.url)),
        &opts,
    )
    .err()
    .expect("bad connect_timeout");
    assert!(
        matches!(
            e,
            StorageError::InvalidOption {
                name: "connect_timeout",
                ..
            }
        ),
        "{e:?}"
    );
    let mut db = storage::open(&format!("{}&unheard_of=1", with_query(&t.url)), &opts).unwrap();
    assert_eq!(
        db.record_metering_data(&[sample("p", "cpu", "r", "2026-01-01T00:00:00", 1.0)])
            .unwrap()
            .stored,
        1
    );
}

/// What a server's columns cannot hold is rejected per sample, with the reason; the rest of the
/// batch is stored. (SQLite stores all of these.)
fn values_a_server_cannot_hold_are_rejected_per_sample(kind: Kind) {
    let t = TestDb::new(kind);
    let mut db = t.open();
    let ts = "2026-01-01T00:00:00";
    let mut nul = sample("nul", "cpu", "r", ts, 1.0);
    nul.resource_metadata = Value::Map(vec![(s("name"), s("a\0b"))]).into();
    let long = sample("long", "cpu", &"r".repeat(256), ts, 1.0);
    let ancient = sample("ancient", "cpu", "r", "0999-12-31T23:59:59", 1.0);
    let fits = sample("fits", "cpu", &"é".repeat(255), "1000-01-01T00:00:00", 1.0);
    let out = db
        .record_metering_data(&[nul, long, ancient, fits, sample("ok", "cpu", "r", ts, 1.0)])
        .unwrap();
    let rejected: Vec<usize> = out.rejected.iter().map(|(i, _)| *i).collect();
    match kind {
        Kind::Postgres => {
            assert_eq!(rejected, vec![0], "{:?}", out.rejected);
            assert!(out.rejected[0].1.contains("NUL"), "{:?}", out.rejected);
            assert_eq!(out.stored, 4);
        }
        _ => {
            assert_eq!(rejected, vec![1, 2], "{:?}", out.rejected);
            assert!(out.rejected[0].1.contains("resource_id longer than 255"));
            assert!(
                out.rejected[1].1.contains("year 1000"),
                "{:?}",
                out.rejected
            );
            assert_eq!(out.stored, 3);
        }
    }
    let got = db
        .get_samples(&SampleFilter {
            resource_id: Some("é".repeat(255)),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].timestamp, datetime!(1000-01-01 00:00:00 UTC));
}

fn with_query(url: &str) -> String {
    if url.contains('?') {
        url.to_string()
    } else {
        format!("{url}?")
    }
}

fn every_sample_filter_narrows_as_documented(kind: Kind) {
    let (_t, mut db, known) = loaded(kind);
    let check = |db: &mut Box<dyn Storage>, filter: SampleFilter, pred: &dyn Fn(&Known) -> bool| {
        let want = expect(&known, pred);
        assert!(!want.is_empty(), "vacuous check for {filter:?}");
        assert_eq!(ids(&db.get_samples(&filter).unwrap()), want, "{filter:?}");
    };
    let f = SampleFilter::default;
    check(&mut db, f(), &|_| true);
    check(
        &mut db,
        SampleFilter {
            meter: Some("cpu_util".into()),
            ..f()
        },
        &|k| k.meter == "cpu_util",
    );
    check(
        &mut db,
        SampleFilter {
            resource_id: Some("r1".into()),
            ..f()
        },
        &|k| k.resource == "r1",
    );
    check(
        &mut db,
        SampleFilter {
            project_id: Some("p2".into()),
            ..f()
        },
        &|k| k.project == "p2",
    );
    check(
        &mut db,
        SampleFilter {
            user_id: Some("u1".into()),
            ..f()
        },
        &|k| k.user == "u1",
    );
    check(
        &mut db,
        SampleFilter {
            source: Some("other".into()),
            ..f()
        },
        &|k| k.source == "other",
    );

    // start inclusive, end exclusive, at exact sample instants.
    let start = known[10].ts;
    let end = known[20].ts;
    check(
        &mut db,
        SampleFilter {
            start: Some(start),
            ..f()
        },
        &|k| k.ts >= start,
    );
    check(
        &mut db,
        SampleFilter {
            end: Some(end),
            ..f()
        },
        &|k| k.ts < end,
    );
    check(
        &mut db,
        SampleFilter {
            start: Some(start),
            end: Some(end),
            ..f()
        },
        &|k| k.ts >= start && k.ts < end,
    );
    let got = db
        .get_samples(&SampleFilter {
            start: Some(start),
            end: Some(end),
            ..f()
        })
        .unwrap();
    assert_eq!(got.len(), 10);
    assert_eq!(got.last().unwrap().message_id, known[10].id);

    // Metadata: nested text, int given as text, float, bool, array element, several at once.
    let md = |pairs: &[(&str, &str)]| SampleFilter {
        metadata: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..f()
    };
    check(&mut db, md(&[("flavor.name", "m1.small")]), &|k| {
        k.flavor == "m1.small"
    });
    check(&mut db, md(&[("flavor.vcpus", "1")]), &|k| {
        k.resource == "r1"
    });
    check(&mut db, md(&[("flavor.vcpus", "2.0")]), &|k| {
        k.resource == "r2"
    });
    check(&mut db, md(&[("ram_gb", "0.5")]), &|k| k.resource == "r1");
    check(&mut db, md(&[("public", "true")]), &|k| k.resource == "r2");
    check(&mut db, md(&[("public", "False")]), &|k| k.resource == "r1");
    check(&mut db, md(&[("tags[1]", "r2")]), &|k| k.resource == "r2");
    check(
        &mut db,
        md(&[("tags[0]", "web"), ("flavor.name", "m1.tiny")]),
        &|k| k.resource == "r1",
    );
    check(&mut db, md(&[("display_name", "web-renamed")]), &|k| {
        k.resource == "r1" && k.id.as_str() >= "m030"
    });
    assert!(db
        .get_samples(&md(&[("flavor.name", "m1.huge")]))
        .unwrap()
        .is_empty());
    assert!(db
        .get_samples(&md(&[("tags[0]", "r1")]))
        .unwrap()
        .is_empty());
    assert!(db
        .get_samples(&md(&[("flavor", "m1.tiny")]))
        .unwrap()
        .is_empty());

    // Combined, and limit keeps the newest.
    check(
        &mut db,
        SampleFilter {
            meter: Some("cpu_util".into()),
            resource_id: Some("r2".into()),
            start: Some(start),
            ..f()
        },
        &|k| k.meter == "cpu_util" && k.resource == "r2" && k.ts >= start,
    );
    let got = db
        .get_samples(&SampleFilter {
            limit: Some(3),
            ..f()
        })
        .unwrap();
    assert_eq!(ids(&got), expect(&known, |_| true)[..3].to_vec());
    assert!(db
        .get_samples(&SampleFilter {
            limit: Some(0),
            ..f()
        })
        .unwrap()
        .is_empty());
}

fn meters_and_resources_summarize_matching_samples(kind: Kind) {
    let (_t, mut db, known) = loaded(kind);
    let meters = db.get_meters(&SampleFilter::default()).unwrap();
    let got: BTreeSet<(String, String, String, String)> = meters
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                m.unit.clone(),
                m.resource_id.clone(),
                m.source.clone(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String, String)> = known
        .iter()
        .map(|k| {
            (
                k.meter.into(),
                k.unit.into(),
                k.resource.into(),
                k.source.into(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        meters.len(),
        want.len(),
        "no duplicate rows for metadata versions"
    );
    let disk = meters.iter().find(|m| m.name == "disk.read.bytes").unwrap();
    assert_eq!(disk.counter_type, CounterType::Cumulative);
    assert_eq!(disk.project_id.as_deref(), Some("p1"));

    let only_r2 = db
        .get_meters(&SampleFilter {
            resource_id: Some("r2".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(!only_r2.is_empty() && only_r2.iter().all(|m| m.resource_id == "r2"));
    let limited = db
        .get_meters(&SampleFilter {
            limit: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(limited.len(), 2);

    let resources = db.get_resources(&SampleFilter::default()).unwrap();
    assert_eq!(resources.len(), 2);
    for r in &resources {
        let mine: Vec<&Known> = known
            .iter()
            .filter(|k| k.resource == r.resource_id)
            .collect();
        assert_eq!(
            r.first_sample_timestamp,
            mine.iter().map(|k| k.ts).min().unwrap()
        );
        assert_eq!(
            r.last_sample_timestamp,
            mine.iter().map(|k| k.ts).max().unwrap()
        );
        assert_eq!(r.project_id.as_deref(), Some(mine[0].project));
    }
    // Metadata of the newest sample.
    assert_eq!(resources[0].resource_id, "r1");
    assert_eq!(resources[0].metadata["display_name"], "web-renamed");
    // ...within the filter: before the rename, the old name.
    let early = db
        .get_resources(&SampleFilter {
            end: Some(known[30].ts),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(early[0].metadata["display_name"], "web");
    assert_eq!(early[0].last_sample_timestamp, known[28].ts);
    let by_md = db
        .get_resources(&SampleFilter {
            metadata: vec![("flavor.name".into(), "m1.small".into())],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_md.len(), 1);
    assert_eq!(by_md[0].resource_id, "r2");
    assert_eq!(by_md[0].metadata["public"], true);
}

/// Aggregates computed in the test, to compare with the driver's.
#[derive(Debug, Default)]
struct Agg {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    first: Option<OffsetDateTime>,
    last: Option<OffsetDateTime>,
}

impl Agg {
    fn add(&mut self, k: &Known) {
        if self.count == 0 {
            self.min = k.volume;
            self.max = k.volume;
        }
        self.count += 1;
        self.min = self.min.min(k.volume);
        self.max = self.max.max(k.volume);
        self.sum += k.volume;
        self.first = Some(self.first.map_or(k.ts, |f| f.min(k.ts)));
        self.last = Some(self.last.map_or(k.ts, |l| l.max(k.ts)));
    }
}

fn assert_close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} != {b}");
}

fn assert_stats(got: &storage::Statistics, want: &Agg) {
    assert_eq!(got.count, want.count);
    assert_close(got.min, want.min);
    assert_close(got.max, want.max);
    assert_close(got.sum, want.sum);
    assert_close(got.avg, want.sum / want.count as f64);
    assert_eq!(Some(got.duration_start), want.first);
    assert_eq!(Some(got.duration_end), want.last);
    let span = want.last.unwrap() - want.first.unwrap();
    assert_close(got.duration, span.as_seconds_f64());
}

fn statistics_match_an_independent_computation(kind: Kind) {
    let (_t, mut db, known) = loaded(kind);
    let cpu = |k: &&Known| k.meter == "cpu_util";

    // No period: one bucket per unit over the whole range.
    let filter = SampleFilter {
        meter: Some("cpu_util".into()),
        ..Default::default()
    };
    let got = db.get_meter_statistics(&filter, None).unwrap();
    let mut by_unit: BTreeMap<&str, Agg> = BTreeMap::new();
    for k in known.iter().filter(cpu) {
        by_unit.entry(k.unit).or_default().add(k);
    }
    assert_eq!(got.len(), 2);
    for (g, (unit, want)) in got.iter().zip(&by_unit) {
        assert_eq!(g.unit, *unit);
        assert_eq!(g.period, 0);
        assert_eq!(Some(g.period_start), want.first);
        assert_eq!(Some(g.period_end), want.last);
        assert_stats(g, want);
    }
    assert_eq!(got, db.get_meter_statistics(&filter, Some(0)).unwrap());

    // Period 60 s aligned to the filter's start, which is not a sample instant.
    let start = BASE + Duration::seconds(100);
    let end = BASE + Duration::seconds(1500);
    let filter = SampleFilter {
        meter: Some("cpu_util".into()),
        start: Some(start),
        end: Some(end),
        ..Default::default()
    };
    let got = db.get_meter_statistics(&filter, Some(60)).unwrap();
    let mut buckets: BTreeMap<(i64, &str), Agg> = BTreeMap::new();
    for k in known
        .iter()
        .filter(cpu)
        .filter(|k| k.ts >= start && k.ts < end)
    {
        let idx = (k.ts - start).whole_microseconds() / 60_000_000;
        buckets.entry((idx as i64, k.unit)).or_default().add(k);
    }
    assert_eq!(got.len(), buckets.len());
    for (g, ((idx, unit), want)) in got.iter().zip(&buckets) {
        assert_eq!(g.unit, *unit);
        assert_eq!(g.period, 60);
        assert_eq!(g.period_start, start + Duration::seconds(60 * idx));
        assert_eq!(g.period_end, g.period_start + Duration::seconds(60));
        assert_stats(g, want);
    }
    // Empty buckets are omitted: with 37 s spacing split over two units some are empty.
    let first = got.first().unwrap().period_start;
    let last = got.last().unwrap().period_start;
    assert!(((last - first).whole_seconds() / 60 + 1) as usize * 2 > got.len());

    // No start: aligned to the first matching sample; the last sample is not lost even when
    // it sits exactly a whole number of periods after the first (ceilometer dropped it).
    let filter = SampleFilter {
        resource_id: Some("r1".into()),
        meter: Some("disk.read.bytes".into()),
        ..Default::default()
    };
    let disk: Vec<&Known> = known
        .iter()
        .filter(|k| k.resource == "r1" && k.meter == "disk.read.bytes")
        .collect();
    let anchor = disk.iter().map(|k| k.ts).min().unwrap();
    let period = 148u64; // 4 × 37: samples land exactly on bucket starts
    let got = db.get_meter_statistics(&filter, Some(period)).unwrap();
    assert_eq!(got.iter().map(|g| g.count).sum::<u64>(), disk.len() as u64);
    assert_eq!(got[0].period_start, anchor);
    let mut buckets: BTreeMap<i64, Agg> = BTreeMap::new();
    for k in &disk {
        let idx = ((k.ts - anchor).whole_microseconds() / (period as i128 * 1_000_000)) as i64;
        buckets.entry(idx).or_default().add(k);
    }
    for (g, (idx, want)) in got.iter().zip(&buckets) {
        assert_eq!(
            g.period_start,
            anchor + Duration::seconds(period as i64 * idx)
        );
        assert_stats(g, want);
    }

    // Nothing matches: no statistics.
    let none = SampleFilter {
        meter: Some("nope".into()),
        ..Default::default()
    };
    assert!(db.get_meter_statistics(&none, None).unwrap().is_empty());
    assert!(db.get_meter_statistics(&none, Some(60)).unwrap().is_empty());
}

// ------------------------------------------------------------------ one test per driver

/// `conformance!(name, ...)` makes `sqlite::name`, `postgresql::name` and `mariadb::name`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::Kind::Sqlite) } )*
        }
        mod postgresql {
            $( #[test] fn $name() { super::$name(super::Kind::Postgres) } )*
        }
        mod mariadb {
            $( #[test] fn $name() { super::$name(super::Kind::Mysql) } )*
        }
    };
}

/// Only the server drivers have connections to lose.
macro_rules! server_conformance {
    ($($name:ident),* $(,)?) => {
        mod postgresql_server {
            $( #[test] fn $name() { super::$name(super::Kind::Postgres) } )*
        }
        mod mariadb_server {
            $( #[test] fn $name() { super::$name(super::Kind::Mysql) } )*
        }
    };
}

conformance!(
    stores_and_reads_back_every_field,
    duplicates_within_and_across_batches_are_counted_not_stored,
    duplicates_inside_large_batches_are_attributed_to_their_indices,
    a_partially_bad_batch_stores_the_good_samples,
    metadata_in_another_key_order_is_the_same_resource_row,
    every_sample_filter_narrows_as_documented,
    meters_and_resources_summarize_matching_samples,
    statistics_match_an_independent_computation,
    expiry_deletes_old_samples_and_orphans_and_other_handles_keep_working,
    samples_older_than_the_time_to_live_on_arrival_are_counted_not_stored,
    rollups_answer_aligned_statistics_as_the_raw_computation,
    per_resource_daily_rollups_are_folded_from_the_hourly_ones,
    a_folded_level_whose_source_is_removed_takes_its_buckets,
    a_store_with_direct_levels_is_folded_from_a_day_ahead,
    many_handles_opening_a_fresh_database_at_once_all_succeed,
    two_writer_processes_lose_and_duplicate_nothing,
);

server_conformance!(
    a_killed_connection_is_unavailable_then_recovers,
    a_server_down_at_open_is_waited_for,
    open_errors_are_specific,
    values_a_server_cannot_hold_are_rejected_per_sample,
);

/// A PostgreSQL database of schema version 1 (made with version 1's SQL) is brought to
/// version 2 in place: its samples stay readable and answered raw (the rollups were not
/// backfilled), samples stored afterwards are in the rollups.
#[test]
fn postgresql_version_1_database_migrates_in_place() {
    let t = TestDb::new(Kind::Postgres);
    let day0 = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT) - Duration::days(3);
    {
        let servers::Admin::Postgres(mut c) = t.admin() else {
            unreachable!()
        };
        c.batch_execute(storage::postgres::schema::V1).unwrap();
        c.batch_execute(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version VALUES (1);
             INSERT INTO meter (name, type, unit) VALUES ('cpu', 'gauge', '%');
             INSERT INTO resource (resource_key, resource_id, source_id, resource_metadata)
                 VALUES ('k', 'vm', 'openstack', '{}');",
        )
        .unwrap();
        for i in 0..3i64 {
            let ts = day0 + Duration::hours(i);
            c.execute(
                "INSERT INTO sample (meter_id, resource_id, volume, timestamp, recorded_at,
                                     message_id)
                 VALUES ((SELECT id FROM meter), (SELECT internal_id FROM resource),
                         $1, $2, $2, $3)",
                &[&(i as f64), &ts, &format!("old-{i}")],
            )
            .unwrap();
        }
    }
    let mut db = t.open();
    assert_eq!(
        t.scalar("SELECT version::BIGINT FROM schema_version"),
        storage::postgres::schema::current_version()
    );
    assert_eq!(db.get_samples(&SampleFilter::default()).unwrap().len(), 3);
    let old = SampleFilter {
        meter: Some("cpu".into()),
        start: Some(day0),
        end: Some(day0 + Duration::days(1)),
        ..Default::default()
    };
    let (stats, source) = db.get_meter_statistics_from(&old, Some(3600)).unwrap();
    assert_eq!(
        source,
        storage::StatsSource::Raw,
        "not backfilled: answered raw"
    );
    assert_eq!(stats.len(), 3);
    // Newer samples are counted from the level's start on.
    let later = day0 + Duration::days(2);
    let batch = vec![
        sample(
            "new-1",
            "cpu",
            "vm",
            &iso(later + Duration::minutes(5)),
            4.0,
        ),
        sample(
            "new-2",
            "cpu",
            "vm",
            &iso(later + Duration::minutes(7)),
            6.0,
        ),
    ];
    assert_eq!(db.record_metering_data(&batch).unwrap().stored, 2);
    let new = SampleFilter {
        start: Some(later),
        end: Some(later + Duration::days(1)),
        ..old
    };
    let (stats, source) = db.get_meter_statistics_from(&new, Some(86_400)).unwrap();
    assert_eq!(
        source,
        storage::StatsSource::Rollup {
            granularity: 86_400
        }
    );
    assert_eq!((stats[0].count, stats[0].sum), (2, 10.0));
}

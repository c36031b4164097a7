//! The SQLite driver against real database files in temporary directories.

mod common;

use common::{open_db, s, sample, url_for};
use meter::{CounterType, Sample, Value, Volume};
use rusqlite::Connection;
use std::collections::{BTreeMap, BTreeSet};
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
        smp.resource_metadata = Value::Map(md);
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

fn loaded() -> (tempfile::TempDir, Box<dyn Storage>, Vec<Known>) {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open_db(&dir.path().join("c.db"));
    let (samples, known) = dataset();
    let out = db.record_metering_data(&samples).unwrap();
    assert_eq!(out.stored, samples.len());
    (dir, db, known)
}

/// Expected ids for a predicate, newest first (the order get_samples promises).
fn expect(known: &[Known], pred: impl Fn(&Known) -> bool) -> Vec<String> {
    let mut v: Vec<&Known> = known.iter().filter(|k| pred(k)).collect();
    v.sort_by_key(|k| std::cmp::Reverse(k.ts));
    v.iter().map(|k| k.id.clone()).collect()
}

#[test]
fn stores_and_reads_back_every_field() {
    let dir = tempfile::tempdir().unwrap();
    // The parent directory does not exist yet: open creates it.
    let path = dir.path().join("nested/dir/c.db");
    let mut db = open_db(&path);
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
    let before = OffsetDateTime::now_utc();
    let out = db.record_metering_data(std::slice::from_ref(&smp)).unwrap();
    assert_eq!((out.stored, out.duplicates, out.rejected.len()), (1, 0, 0));
    assert!(path.exists());

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
            && g.recorded_at <= OffsetDateTime::now_utc()
    );
    assert_eq!(
        g.resource_metadata,
        serde_json::json!({"display_name": "vm-vm-1", "flavor": {"name": "m1.tiny", "vcpus": 1}})
    );
    assert_eq!(g.message_id, "id-1");
    assert_eq!(g.message_signature.as_deref(), Some("sig-id-1"));
}

#[test]
fn duplicates_within_and_across_batches_are_counted_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let mut db = open_db(&path);
    let t = "2026-01-01T00:00:00";
    let a = sample("a", "cpu", "r", t, 1.0);
    let b = sample("b", "cpu", "r", t, 2.0);
    let mut a_again = sample("a", "cpu", "r", t, 99.0);
    a_again.resource_id = "elsewhere".into();

    let out = db
        .record_metering_data(&[a.clone(), b.clone(), a_again.clone()])
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (2, 1));
    assert_eq!(out.duplicate_indices, vec![2]);

    // A retried batch stores nothing twice.
    let c = sample("c", "cpu", "r", t, 3.0);
    let out = db.record_metering_data(&[b, c, a]).unwrap();
    assert_eq!((out.stored, out.duplicates), (1, 2));
    assert_eq!(out.duplicate_indices, vec![0, 2]);

    // Across connections too.
    let mut other = open_db(&path);
    let out = other.record_metering_data(&[a_again]).unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 1));

    let got = db.get_samples(&SampleFilter::default()).unwrap();
    let mut got_ids = ids(&got);
    got_ids.sort();
    assert_eq!(got_ids, ["a", "b", "c"]);
    // The first write of "a" won.
    assert_eq!(
        got.iter()
            .find(|g| g.message_id == "a")
            .unwrap()
            .counter_volume,
        1.0
    );
}

#[test]
fn duplicates_inside_large_batches_are_attributed_to_their_indices() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open_db(&dir.path().join("c.db"));
    let t = "2026-01-01T00:00:00";
    let mk = |i: usize| sample(&format!("d{i}"), "cpu", &format!("r{}", i % 4), t, i as f64);
    // Every third id is stored beforehand.
    let before: Vec<Sample> = (0..300).filter(|i| i % 3 == 0).map(mk).collect();
    assert_eq!(db.record_metering_data(&before).unwrap().stored, 100);

    // 300 ids, then 20 repeats of ids that are new in this batch: several multi-row chunks,
    // each mixing new rows with old and repeated ones.
    let mut batch: Vec<Sample> = (0..300).map(mk).collect();
    batch.extend((0..20).map(|k| {
        let mut repeat = mk(1 + 3 * k);
        repeat.counter_volume = Volume::Float(-1.0);
        repeat
    }));
    let out = db.record_metering_data(&batch).unwrap();
    let mut want: Vec<usize> = (0..300).filter(|i| i % 3 == 0).collect();
    want.extend(300..320);
    assert_eq!(out.duplicate_indices, want);
    assert_eq!((out.stored, out.duplicates), (200, 120));
    // The first occurrence was stored, not the repeat.
    let got = db
        .get_samples(&SampleFilter {
            limit: None,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(got.len(), 300);
    let d4 = got.iter().find(|s| s.message_id == "d4").unwrap();
    assert_eq!(d4.counter_volume, 4.0);
}

#[test]
fn a_partially_bad_batch_stores_the_good_samples() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open_db(&dir.path().join("c.db"));
    let t = "2026-01-01T00:00:00Z";
    let batch = vec![
        sample("ok-0", "cpu", "r", t, 1.0),
        sample("bad-ts", "cpu", "r", "yesterday", 1.0),
        sample("bad-nan", "cpu", "r", t, f64::NAN),
        sample("ok-3", "cpu", "r", t, 1.0),
        sample("bad-inf", "cpu", "r", t, f64::INFINITY),
        sample("", "cpu", "r", t, 1.0),
        sample("bad-month", "cpu", "r", "2026-13-01T00:00:00", 1.0),
    ];
    let out = db.record_metering_data(&batch).unwrap();
    assert_eq!(out.stored, 2);
    assert_eq!(out.duplicates, 0);
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

#[test]
fn every_sample_filter_narrows_as_documented() {
    let (_dir, mut db, known) = loaded();
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

#[test]
fn meters_and_resources_summarize_matching_samples() {
    let (_dir, mut db, known) = loaded();
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

#[test]
fn statistics_match_an_independent_computation() {
    let (_dir, mut db, known) = loaded();
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

#[test]
fn expiry_deletes_old_samples_and_orphans_and_other_handles_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let mut writer = open_db(&path);
    let mut janitor = open_db(&path);
    let now = OffsetDateTime::now_utc();
    let old = iso(now - Duration::hours(2));
    let fresh = iso(now - Duration::seconds(5));
    let mut batch = vec![
        sample("old-1", "old.meter", "gone", &old, 1.0),
        sample("old-2", "cpu", "kept", &old, 1.0),
        sample("new-1", "cpu", "kept", &fresh, 1.0),
    ];
    batch[1].resource_metadata = batch[2].resource_metadata.clone();
    assert_eq!(writer.record_metering_data(&batch).unwrap().stored, 3);

    assert_eq!(janitor.clear_expired_metering_data(3600).unwrap(), 2);
    assert_eq!(
        ids(&writer.get_samples(&SampleFilter::default()).unwrap()),
        ["new-1"]
    );
    let conn = Connection::open(&path).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT COUNT(*) FROM resource WHERE resource_id = 'gone'"),
        0
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM meter WHERE name = 'old.meter'"),
        0
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM resource WHERE resource_id = 'kept'"),
        1
    );
    assert_eq!(count("SELECT COUNT(*) FROM metadata m LEFT JOIN resource r ON r.internal_id = m.id WHERE r.internal_id IS NULL"), 0);

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
    assert_eq!(count("SELECT COUNT(*) FROM pragma_foreign_key_check"), 0);
    // Nothing left to expire.
    assert_eq!(janitor.clear_expired_metering_data(3600).unwrap(), 0);
}

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
fn many_handles_opening_a_fresh_file_at_once_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fresh.db");
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut db = open_db(&path);
                let smp = sample(&format!("t{i}"), "cpu", "r", "2026-01-01T00:00:00", 1.0);
                db.record_metering_data(&[smp]).unwrap().stored
            })
        })
        .collect();
    let stored: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(stored, 6);
    let conn = Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
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

#[test]
fn metadata_in_another_key_order_is_the_same_resource_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let mut db = open_db(&path);
    let t = "2026-01-01T00:00:00";
    let a = sample("a", "cpu", "vm", t, 1.0);
    let mut b = sample("b", "cpu", "vm", t, 2.0);
    if let Value::Map(pairs) = &mut b.resource_metadata {
        pairs.reverse();
    }
    assert_ne!(a.resource_metadata, b.resource_metadata);
    let mut c = sample("c", "cpu", "vm", t, 3.0);
    c.resource_metadata = Value::Map(vec![(s("display_name"), s("other"))]);
    assert_eq!(db.record_metering_data(&[a, b, c]).unwrap().stored, 3);
    let conn = Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM resource", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        rows, 2,
        "same metadata in any order: one row; other metadata: another"
    );
}

//! Shared helpers for the storage integration tests: sample builders and store setup.
#![allow(dead_code)]

use meter::{CounterType, Sample, Value, Volume};
use std::path::Path;
use storage::{Storage, StorageOptions};

pub fn s(x: &str) -> Value {
    Value::Str(x.to_string())
}

/// A gauge sample with small nested metadata; tweak fields on the result.
pub fn sample(
    message_id: &str,
    meter: &str,
    resource: &str,
    timestamp: &str,
    volume: f64,
) -> Sample {
    Sample {
        source: "openstack".into(),
        counter_name: meter.into(),
        counter_type: CounterType::Gauge,
        counter_unit: "%".into(),
        counter_volume: Volume::Float(volume),
        user_id: Some("user-1".into()),
        project_id: Some("project-1".into()),
        user_name: None,
        project_name: None,
        resource_id: resource.into(),
        timestamp: timestamp.into(),
        resource_metadata: Value::Map(vec![
            (s("display_name"), s(&format!("vm-{resource}"))),
            (
                s("flavor"),
                Value::Map(vec![(s("name"), s("m1.tiny")), (s("vcpus"), Value::Int(1))]),
            ),
        ])
        .into(),
        message_id: message_id.into(),
        message_signature: Some(format!("sig-{message_id}")),
        monotonic_time: None,
        extra: Vec::new(),
    }
}

/// A rollup level of `seconds` whose buckets are kept forever.
pub fn level(seconds: u64) -> storage::rollup::Granularity {
    storage::rollup::Granularity {
        seconds,
        retention_seconds: 0,
    }
}

pub fn url_for(path: &Path) -> String {
    // An absolute path after `sqlite:///` gives the four-slash absolute form.
    format!("sqlite:///{}", path.display())
}

pub fn open_db(path: &Path) -> Box<dyn Storage> {
    storage::open(&url_for(path), &StorageOptions::default()).expect("open sqlite")
}

/// count, sum, min, max, first and last timestamp of a set of samples, as the tests compute
/// statistics independently of the drivers.
pub type Aggregate = (u64, f64, f64, f64, i64, i64);

/// The aggregate of no sample.
pub const NO_SAMPLES: Aggregate = (0, 0.0, f64::INFINITY, f64::NEG_INFINITY, i64::MAX, i64::MIN);

/// Fold one sample (volume `v` at time `ts`) into `e`.
pub fn fold(e: &mut Aggregate, v: f64, ts: i64) {
    e.0 += 1;
    e.1 += v;
    e.2 = e.2.min(v);
    e.3 = e.3.max(v);
    e.4 = e.4.min(ts);
    e.5 = e.5.max(ts);
}

/// Poll `done` every 20 ms until it holds (work another thread does, such as a reaper's), and
/// fail the test naming `what` after 20 s.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "still waiting: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

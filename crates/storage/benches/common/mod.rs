//! Realistic samples shared by the storage benches: a few meters over many resources, with
//! nested metadata like ceilometer's instance samples.

#![allow(dead_code)]

use meter::{CounterType, Sample, Value, Volume};

/// Samples per batch (one storage write).
pub const BATCH: usize = 1000;

pub fn s(x: &str) -> Value {
    Value::Str(x.to_string())
}

/// Metadata like nova's instance notifications carry.
pub fn metadata(r: usize) -> Value {
    Value::Map(vec![
        (s("display_name"), s(&format!("web-{r:02}"))),
        (s("host"), s(&format!("compute-{:02}.example.net", r % 4))),
        (s("instance_type"), s("m1.small")),
        (
            s("flavor"),
            Value::Map(vec![
                (s("id"), s("2")),
                (s("name"), s("m1.small")),
                (s("vcpus"), Value::Int(1)),
                (s("ram"), Value::Int(2048)),
                (s("disk"), Value::Int(20)),
                (s("ephemeral"), Value::Int(0)),
            ]),
        ),
        (
            s("image"),
            Value::Map(vec![
                (s("id"), s("5c4f7d2e-8a5b-4c3e-9f1a-2b6d8e0c1a3f")),
                (
                    s("links"),
                    Value::Array(vec![Value::Map(vec![
                        (s("href"), s("http://glance.example.net/images/5c4f7d2e")),
                        (s("rel"), s("bookmark")),
                    ])]),
                ),
            ]),
        ),
        (s("status"), s("active")),
        (s("state"), s("running")),
        (s("memory_mb"), Value::Int(2048)),
        (s("root_gb"), Value::Int(20)),
        (
            s("user_metadata"),
            Value::Map(vec![(s("server_group"), s("frontend"))]),
        ),
    ])
}

pub const METERS: [(&str, CounterType, &str); 5] = [
    ("cpu", CounterType::Cumulative, "ns"),
    ("cpu_util", CounterType::Gauge, "%"),
    ("memory.usage", CounterType::Gauge, "MB"),
    ("disk.read.bytes", CounterType::Cumulative, "B"),
    ("network.incoming.bytes", CounterType::Cumulative, "B"),
];

/// Batch number `b`: fresh message ids, timestamps a minute apart per batch.
pub fn batch(b: usize, metadata_by_resource: &[Value]) -> Vec<Sample> {
    (0..BATCH)
        .map(|i| {
            let n = b * BATCH + i;
            let r = i % metadata_by_resource.len();
            let (name, kind, unit) = METERS[(i / 10) % METERS.len()];
            Sample {
                source: "openstack".into(),
                counter_name: name.into(),
                counter_type: kind,
                counter_unit: unit.into(),
                counter_volume: if i % 2 == 0 {
                    Volume::Int(n as i64 * 1000)
                } else {
                    Volume::Float(n as f64 * 0.37)
                },
                user_id: Some("9a8b7c6d5e4f40312a1b2c3d4e5f6071".into()),
                project_id: Some(format!("{:032x}", r % 3)),
                user_name: None,
                project_name: None,
                resource_id: format!("{:08x}-1111-4222-8333-{:012x}", r, r),
                timestamp: format!(
                    "2026-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
                    1 + (b / 40000) % 12,
                    1 + (b / 1440) % 28,
                    (b / 60) % 24,
                    b % 60,
                    i % 60,
                    i
                ),
                resource_metadata: (&metadata_by_resource[r]).into(),
                // uuid1-shaped like ceilometer's: time_low first, so ids from one
                // publisher sort roughly in time order.
                message_id: format!("{:08x}-2b6d-11f0-8{:03x}-0242ac120002", n * 37, n % 4096),
                message_signature: Some(format!("{:064x}", n as u128 * 0x9e3779b97f4a7c15)),
                monotonic_time: None,
                extra: Vec::new(),
            }
        })
        .collect()
}

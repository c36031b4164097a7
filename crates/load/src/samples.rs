//! Realistic signed samples, and the payload file that carries them between runs.
//!
//! A sample looks like what ceilometer's compute agent publishes: eight meters (`cpu`,
//! `memory.usage`, `vcpus`, `disk.read.bytes`, `disk.write.requests` on an instance;
//! `network.incoming.bytes`, `network.outgoing.bytes`, `network.incoming.packets` on its tap
//! interface), 500 instances and their 500 interfaces (1,000 resources), 40 projects, nested
//! resource metadata (flavor and image maps, a tag array with non-ASCII text, floats, booleans,
//! nil), timestamps with microseconds and an offset. Metadata is stable per resource, as it is in
//! a real cloud, so storage sees ~1,000 distinct resources however many samples are sent.
//!
//! Every sample's `message_id` is UUID-shaped and carries its sequence number in the first eight
//! hex digits ([`message_id`], [`seq_of`]), so a reader of the database can tell which sample a
//! row is and match it with the moment it was sent.

use anyhow::{bail, Context, Result};
use meter::Value;
use std::io::{Read, Write};
use std::path::Path;

/// First bytes of a payload file.
const MAGIC: &[u8; 8] = b"CLDLOAD1";

pub const INSTANCES: u64 = 500;
const PROJECTS: u64 = 40;
const USERS: u64 = 97;

struct MeterDef {
    name: &'static str,
    kind: &'static str,
    unit: &'static str,
    on_vnic: bool,
}

const METERS: [MeterDef; 8] = [
    MeterDef {
        name: "cpu",
        kind: "cumulative",
        unit: "ns",
        on_vnic: false,
    },
    MeterDef {
        name: "memory.usage",
        kind: "gauge",
        unit: "MB",
        on_vnic: false,
    },
    MeterDef {
        name: "vcpus",
        kind: "gauge",
        unit: "vcpu",
        on_vnic: false,
    },
    MeterDef {
        name: "disk.read.bytes",
        kind: "cumulative",
        unit: "B",
        on_vnic: false,
    },
    MeterDef {
        name: "disk.write.requests",
        kind: "cumulative",
        unit: "request",
        on_vnic: false,
    },
    MeterDef {
        name: "network.incoming.bytes",
        kind: "cumulative",
        unit: "B",
        on_vnic: true,
    },
    MeterDef {
        name: "network.outgoing.bytes",
        kind: "cumulative",
        unit: "B",
        on_vnic: true,
    },
    MeterDef {
        name: "network.incoming.packets",
        kind: "cumulative",
        unit: "packet",
        on_vnic: true,
    },
];

/// splitmix64: deterministic pseudo-random numbers without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A UUID-shaped id whose first eight hex digits are `seq`.
pub fn message_id(seq: u64) -> String {
    let r = mix(seq ^ 0x5eed);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        seq as u32,
        (r >> 48) as u16,
        (r >> 36) & 0xfff,
        (r >> 24) & 0xfff,
        mix(r) & 0xffff_ffff_ffff
    )
}

/// The sequence number [`message_id`] put in `id`.
pub fn seq_of(id: &str) -> Option<u64> {
    let head = id.get(..8)?;
    u64::from_str_radix(head, 16).ok()
}

fn uuid_hex(tag: u64, i: u64) -> String {
    format!(
        "{:016x}{:016x}",
        mix(tag ^ (i << 8)),
        mix(tag.wrapping_add(i))
    )
}

fn uuid_dashed(tag: u64, i: u64) -> String {
    let h = uuid_hex(tag, i);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn s(x: &str) -> Value {
    Value::Str(x.to_owned())
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
}

const FLAVORS: [(&str, i64, i64, i64); 4] = [
    ("m1.tiny", 1, 512, 1),
    ("m1.small", 1, 2048, 20),
    ("m1.medium", 2, 4096, 40),
    ("m1.large", 4, 8192, 80),
];

fn instance_metadata(inst: u64) -> Value {
    let (flavor, vcpus, ram, disk) = FLAVORS[(inst % 4) as usize];
    let image = uuid_dashed(0x1a9e, inst % 12);
    map(vec![
        ("display_name", s(&format!("vm-{inst}"))),
        ("name", s(&format!("instance-{inst:08x}"))),
        ("instance_id", s(&uuid_dashed(0x1ce, inst))),
        ("instance_type", s(flavor)),
        ("host", s(&uuid_hex(0x4057, inst % 24))),
        ("instance_host", s(&format!("compute-{}", inst % 24))),
        (
            "flavor",
            map(vec![
                ("id", s(&format!("{}", inst % 4 + 1))),
                ("name", s(flavor)),
                ("vcpus", Value::Int(vcpus)),
                ("ram", Value::Int(ram)),
                ("disk", Value::Int(disk)),
                ("ephemeral", Value::Int(0)),
                ("swap", Value::Int(0)),
            ]),
        ),
        ("status", s("active")),
        ("state", s("running")),
        ("task_state", Value::Nil),
        ("image", map(vec![("id", s(&image))])),
        ("image_ref", s(&image)),
        ("image_ref_url", Value::Nil),
        ("architecture", s("x86_64")),
        ("os_type", s("hvm")),
        ("vcpus", Value::Int(vcpus)),
        ("memory_mb", Value::Int(ram)),
        ("disk_gb", Value::Int(disk)),
        ("root_gb", Value::Int(disk)),
        ("ephemeral_gb", Value::Int(0)),
        ("cpu_number", Value::Int(vcpus)),
        ("ratio", Value::Float((mix(inst) % 10_000) as f64 / 9_973.0)),
        ("enabled", Value::Bool(mix(inst ^ 0xe7) & 7 != 0)),
        (
            "user_metadata",
            map(vec![
                ("server_group", s(&format!("grp-{}", inst % 9))),
                ("owner", s("Zoë")),
            ]),
        ),
        (
            "tags",
            Value::Array(vec![s("web"), s("ü"), Value::Int((inst % 3) as i64)]),
        ),
    ])
}

fn vnic_metadata(inst: u64) -> Value {
    let mac = mix(inst ^ 0x3ac) & 0xff_ffff;
    map(vec![
        ("name", s(&format!("tap{}", &uuid_hex(0x7a9, inst)[..11]))),
        (
            "mac",
            s(&format!(
                "fa:16:3e:{:02x}:{:02x}:{:02x}",
                mac >> 16,
                (mac >> 8) & 0xff,
                mac & 0xff
            )),
        ),
        ("fref", Value::Nil),
        ("parameters", map(vec![])),
        (
            "vnic_name",
            s(&format!("tap{}", &uuid_hex(0x7a9, inst)[..11])),
        ),
        ("instance_id", s(&uuid_dashed(0x1ce, inst))),
        ("instance_type", s(FLAVORS[(inst % 4) as usize].0)),
        ("host", s(&uuid_hex(0x4057, inst % 24))),
        ("status", s("active")),
        (
            "flavor",
            map(vec![("name", s(FLAVORS[(inst % 4) as usize].0))]),
        ),
    ])
}

/// An ISO 8601 timestamp with microseconds and `+00:00`, as ceilometer's `isoformat()` gives.
fn iso(micros: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// The instance sample `seq` is about: consecutive groups of eight samples (one per meter)
/// go to pseudo-random instances.
fn instance_of(seq: u64) -> u64 {
    mix(seq / METERS.len() as u64) % INSTANCES
}

/// Sample `seq`'s resource: the instance, or its tap interface for network meters.
pub fn resource_of(seq: u64) -> String {
    resource_for((seq % METERS.len() as u64) as usize, instance_of(seq))
}

/// Sample `seq`, signed with `secret`. `base_micros` is the timestamp of sample 0; each sample
/// is 1 ms later than the one before.
pub fn sample(seq: u64, secret: &str, base_micros: i64) -> Value {
    build(
        (seq % METERS.len() as u64) as usize,
        instance_of(seq),
        resource_of(seq),
        seq,
        base_micros + seq as i64 * 1_000,
        message_id(seq),
        secret,
    )
}

/// One signed sample of `METERS[meter]` on instance `inst` (or its interface).
fn build(
    meter: usize,
    inst: u64,
    resource_id: String,
    seq: u64,
    micros: i64,
    message_id: String,
    secret: &str,
) -> Value {
    let meter = &METERS[meter];
    let noise = mix(seq);
    let metadata = if meter.on_vnic {
        vnic_metadata(inst)
    } else {
        instance_metadata(inst)
    };
    let volume = match meter.name {
        "memory.usage" => Value::Float(256.0 + (noise % 8192) as f64 / 4.0),
        "vcpus" => Value::Int(FLAVORS[(inst % 4) as usize].1),
        _ => Value::Int((seq as i64) * 1_000 + (noise % 100_000) as i64),
    };
    let monotonic = if meter.name == "cpu" {
        Value::Float(1_000.0 + seq as f64 / 1_000.0)
    } else {
        Value::Nil
    };
    let mut v = map(vec![
        ("source", s("openstack")),
        ("counter_name", s(meter.name)),
        ("counter_type", s(meter.kind)),
        ("counter_unit", s(meter.unit)),
        ("counter_volume", volume),
        ("user_id", s(&uuid_hex(0x05e4, inst % USERS))),
        ("user_name", Value::Nil),
        ("project_id", s(&uuid_hex(0x9403, inst % PROJECTS))),
        ("project_name", Value::Nil),
        ("resource_id", Value::Str(resource_id)),
        ("timestamp", s(&iso(micros))),
        ("resource_metadata", metadata),
        ("message_id", s(&message_id)),
        ("monotonic_time", monotonic),
    ]);
    meter::signature::sign(&mut v, secret);
    v
}

/// Instance `inst`'s resource id for `METERS[meter]`: the instance, or its tap interface.
fn resource_for(meter: usize, inst: u64) -> String {
    if METERS[meter].on_vnic {
        format!(
            "instance-{inst:08x}-{}-tap{}",
            uuid_dashed(0x1ce, inst),
            &uuid_hex(0x7a9, inst)[..11]
        )
    } else {
        uuid_dashed(0x1ce, inst)
    }
}

/// 100-ns intervals between the Gregorian reform (UUID v1's epoch) and the Unix epoch.
const UUID_EPOCH_OFFSET: u64 = 0x01B2_1DD2_1381_4000;

/// Python's `str(uuid.uuid1())` as a ceilometer agent on host `node` would make it around
/// `micros`, `tick` 100-ns steps later. The low 32 bits of the clock come first in the text
/// and wrap every 429 s, so ids are random in sort order; the caller passes a random `tick`
/// below 2^32 (agents on many hosts, their clocks and queues) so that every index insert lands
/// on a random page, the worst case and what the issue measured.
pub fn uuid1(micros: i64, tick: u64, node: u64) -> String {
    let t = (micros.max(0) as u64 * 10)
        .wrapping_add(UUID_EPOCH_OFFSET)
        .wrapping_add(tick);
    let clock_seq = 0x8000 | (mix(node ^ 0xc10c) & 0x3fff);
    format!(
        "{:08x}-{:04x}-1{:03x}-{:04x}-{:012x}",
        t as u32,
        (t >> 32) as u16,
        (t >> 48) & 0xfff,
        clock_seq,
        (mix(node) & 0xffff_ffff_ffff) | 0x0100_0000_0000
    )
}

/// A cloud polled as ceilometer's compute agent does: every `interval` each of `instances`
/// instances sends its eight meters (five on the instance, three on its interface: `2 ×
/// instances` resources), the instances' polls spread over the interval. Sample `i` is in round
/// `i / (8 · instances)`; timestamps run from `start_micros` in order, `message_id`s are uuid1
/// text. Used by `collector-load grow`.
#[derive(Debug, Clone, Copy)]
pub struct Fleet {
    pub instances: u64,
    pub start_micros: i64,
    pub interval_micros: i64,
}

impl Fleet {
    /// A fleet whose `count` samples span `days` days from `start_micros`.
    pub fn spanning(count: u64, instances: u64, days: f64, start_micros: i64) -> Fleet {
        let per_round = instances.max(1) * METERS.len() as u64;
        let rounds = count.div_ceil(per_round).max(1);
        Fleet {
            instances: instances.max(1),
            start_micros,
            interval_micros: ((days * 86_400e6) / rounds as f64) as i64,
        }
    }

    pub fn per_round(&self) -> u64 {
        self.instances * METERS.len() as u64
    }

    /// Sample `i`'s timestamp (µs).
    pub fn timestamp(&self, i: u64) -> i64 {
        let round = i / self.per_round();
        let inst = (i % self.per_round()) / METERS.len() as u64;
        self.start_micros
            + round as i64 * self.interval_micros
            + (inst as i64 * self.interval_micros) / self.instances as i64
    }

    /// Sample `i`, signed with `secret`.
    pub fn sample(&self, i: u64, secret: &str) -> Value {
        let j = i % self.per_round();
        let (inst, meter) = (j / METERS.len() as u64, (j % METERS.len() as u64) as usize);
        let ts = self.timestamp(i);
        let id = uuid1(ts, mix(i ^ 0x0a1d) & 0xffff_ffff, inst);
        build(meter, inst, resource_for(meter, inst), i, ts, id, secret)
    }

    /// The resource id of instance `inst` for the `cpu` meter.
    pub fn instance_resource(inst: u64) -> String {
        resource_for(0, inst)
    }
}

/// Encoded samples, one contiguous buffer: sample `i` is `data[offsets[i]..offsets[i + 1]]`.
#[derive(Clone)]
pub struct Payloads {
    data: Vec<u8>,
    offsets: Vec<usize>,
}

impl Payloads {
    /// These without the first `n` (all of them if there are fewer).
    pub fn skip(self, n: usize) -> Payloads {
        let n = n.min(self.len());
        if n == 0 {
            return self;
        }
        let start = self.offsets[n];
        Payloads {
            data: self.data[start..].to_vec(),
            offsets: self.offsets[n..].iter().map(|o| o - start).collect(),
        }
    }

    /// Generate `count` signed samples (seq 0..count). Timestamps start at the current time.
    pub fn generate(count: usize, secret: &str) -> Payloads {
        let base = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
        let mut p = Payloads {
            data: Vec::with_capacity(count * 1_100),
            offsets: Vec::with_capacity(count + 1),
        };
        p.offsets.push(0);
        for seq in 0..count as u64 {
            meter::encode::encode_value(&sample(seq, secret, base), &mut p.data);
            p.offsets.push(p.data.len());
        }
        p
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> &[u8] {
        &self.data[self.offsets[i]..self.offsets[i + 1]]
    }

    /// Bytes of samples `range`, back to back (for an RPC request's array body).
    pub fn concat(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.data[self.offsets[range.start]..self.offsets[range.end]]
    }

    pub fn total_bytes(&self) -> usize {
        self.data.len()
    }

    /// `MAGIC`, u64 LE count, then per sample a u32 LE length and its bytes.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out = Vec::with_capacity(self.data.len() + 4 * self.len() + 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        for i in 0..self.len() {
            let b = self.get(i);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        let mut f =
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        f.write_all(&out)
            .with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }

    /// Read a file written by [`Payloads::save`], keeping at most `limit` samples.
    pub fn load(path: &Path, limit: Option<usize>) -> Result<Payloads> {
        let mut raw = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .with_context(|| format!("read {}", path.display()))?;
        if raw.len() < 16 || &raw[..8] != MAGIC {
            bail!("{}: not a collector-load payload file", path.display());
        }
        let count = u64::from_le_bytes(raw[8..16].try_into()?) as usize;
        let keep = limit.map_or(count, |l| l.min(count));
        let mut p = Payloads {
            data: Vec::with_capacity(raw.len()),
            offsets: Vec::with_capacity(keep + 1),
        };
        p.offsets.push(0);
        let mut pos = 16;
        for _ in 0..keep {
            let Some(len) = raw.get(pos..pos + 4) else {
                bail!("{}: truncated", path.display());
            };
            let len = u32::from_le_bytes(len.try_into()?) as usize;
            let Some(body) = raw.get(pos + 4..pos + 4 + len) else {
                bail!("{}: truncated", path.display());
            };
            p.data.extend_from_slice(body);
            p.offsets.push(p.data.len());
            pos += 4 + len;
        }
        Ok(p)
    }
}

/// The payloads a mode works on: loaded from `--samples FILE` or generated now (untimed).
pub fn obtain(file: Option<&Path>, count: usize, secret: &str) -> Result<Payloads> {
    match file {
        Some(f) => {
            let p = Payloads::load(f, Some(count))?;
            if p.len() < count {
                bail!(
                    "{} holds {} samples; {count} asked for",
                    f.display(),
                    p.len()
                );
            }
            Ok(p)
        }
        None => Ok(Payloads::generate(count, secret)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_sequence_number_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for seq in [0u64, 1, 7, 255, 1 << 20, 0xffff_fffe] {
            let id = message_id(seq);
            assert_eq!(id.len(), 36, "{id}");
            assert_eq!(seq_of(&id), Some(seq));
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn samples_verify_and_decode() {
        let p = Payloads::generate(300, "k");
        let key = meter::SigningKey::new("k");
        for i in 0..p.len() {
            let v = meter::decode_value(p.get(i)).expect("decodes");
            assert!(key.verify(&v), "sample {i} verifies");
            let sample = meter::Sample::from_value(v).expect("is a sample");
            meter::parse_timestamp(&sample.timestamp).expect("timestamp parses");
            assert_eq!(seq_of(&sample.message_id), Some(i as u64));
            assert_eq!(sample.resource_id, resource_of(i as u64));
        }
        assert!(
            p.total_bytes() / p.len() > 500,
            "samples are ceilometer-sized"
        );
    }

    #[test]
    fn runs_cover_about_1000_resources() {
        let resources: std::collections::HashSet<String> = (0..100_000).map(resource_of).collect();
        assert_eq!(resources.len(), 2 * INSTANCES as usize);
    }

    #[test]
    fn fleet_samples_are_ceilometer_shaped() {
        let f = Fleet::spanning(80_000, 1_000, 7.0, 1_700_000_000_000_000);
        assert_eq!(f.per_round(), 8_000);
        let key = meter::SigningKey::new("k");
        let mut ids = std::collections::HashSet::new();
        let mut last_ts = 0;
        let mut sorted_in_order = 0;
        let mut last_id = String::new();
        for i in (0..80_000).step_by(7) {
            let v = f.sample(i, "k");
            assert!(key.verify(&v));
            let s = meter::Sample::from_value(v).expect("is a sample");
            let ts = meter::parse_timestamp(&s.timestamp).expect("parses");
            let us = (ts.unix_timestamp_nanos() / 1000) as i64;
            assert_eq!(us, f.timestamp(i));
            assert!(us >= last_ts, "timestamps in order");
            last_ts = us;
            assert_eq!(
                &s.message_id[14..15],
                "1",
                "uuid version 1: {}",
                s.message_id
            );
            if s.message_id > last_id {
                sorted_in_order += 1;
            }
            last_id = s.message_id.clone();
            assert!(ids.insert(s.message_id));
        }
        // Random in sort order: about half the ids sort after their predecessor.
        let n = ids.len();
        assert!(
            sorted_in_order > n / 4 && sorted_in_order < 3 * n / 4,
            "{sorted_in_order}/{n}"
        );
        // The ten rounds span 7 days.
        assert!(last_ts - f.start_micros > 6 * 86_400_000_000);
    }

    #[test]
    fn payload_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("collector-load-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.bin");
        let p = Payloads::generate(10, "k");
        p.save(&f).unwrap();
        let q = Payloads::load(&f, Some(5)).unwrap();
        assert_eq!(q.len(), 5);
        assert_eq!(q.get(4), p.get(4));
        assert_eq!(q.concat(0..5), p.concat(0..5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn skipping_keeps_the_later_samples_and_their_sequence_numbers() {
        let p = Payloads::generate(10, "k");
        let q = p.clone().skip(3);
        assert_eq!(q.len(), 7);
        for i in 0..7 {
            assert_eq!(q.get(i), p.get(i + 3));
        }
        assert_eq!(q.concat(0..7), p.concat(3..10));
        let id = |b: &[u8]| meter::Sample::decode(b).unwrap().message_id;
        assert_eq!(seq_of(&id(q.get(0))), Some(3));
        assert_eq!(p.clone().skip(0).len(), 10);
        assert!(p.skip(12).is_empty());
    }
}

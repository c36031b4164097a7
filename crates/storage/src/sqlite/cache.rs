//! In-process caches of meter and resource row ids, so the hot path needs no lookup query.
//!
//! Resources are found by a hash of the sample's identifying fields (resource, user, project,
//! source), then by comparing the metadata's msgpack bytes ([`meter::Metadata`]) with the few
//! metadata versions cached for that resource: on a hit nothing is serialized or allocated.
//! (Building the canonical metadata JSON for every sample was a fifth of the driver's CPU
//! time, hashing the whole tree still a tenth, and comparing the trees node by node 5 % of the
//! worker's.) The JSON and its SHA-256 are computed only on a miss, to find or create the row.
//!
//! Validity across processes is the driver's business (ids never change while a row exists;
//! the cache epoch covers deletions); this module only stores and finds.

use meter::{CounterType, Metadata, Sample};
use std::collections::HashMap;
use std::hash::Hasher;

/// Beyond this many entries a cache is emptied and refilled: a bound on memory for
/// deployments with very many resources or ever-changing metadata.
const MAX_ENTRIES: usize = 100_000;

/// Metadata versions kept per resource; the oldest goes first. A resource whose metadata
/// changes on every poll would otherwise make each lookup compare against all its history.
const VERSIONS_PER_RESOURCE: usize = 4;

/// Meter ids by name, then (type, unit): lookups borrow the sample's strings.
#[derive(Default)]
pub struct MeterCache {
    map: HashMap<String, Vec<(CounterType, String, i64)>>,
    len: usize,
}

impl MeterCache {
    pub fn get(&self, s: &Sample) -> Option<i64> {
        self.map
            .get(&s.counter_name)?
            .iter()
            .find(|(t, u, _)| *t == s.counter_type && *u == s.counter_unit)
            .map(|(_, _, id)| *id)
    }

    pub fn insert(&mut self, s: &Sample, id: i64) {
        if self.len >= MAX_ENTRIES {
            self.clear();
        }
        self.len += 1;
        self.map.entry(s.counter_name.clone()).or_default().push((
            s.counter_type,
            s.counter_unit.clone(),
            id,
        ));
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.len = 0;
    }
}

/// What identifies a resource row, owned.
struct ResourceKey {
    resource_id: String,
    user_id: Option<String>,
    project_id: Option<String>,
    source: String,
    metadata: Metadata,
}

impl ResourceKey {
    fn of(s: &Sample) -> Self {
        ResourceKey {
            resource_id: s.resource_id.clone(),
            user_id: s.user_id.clone(),
            project_id: s.project_id.clone(),
            source: s.source.clone(),
            metadata: s.resource_metadata.clone(),
        }
    }

    fn matches(&self, s: &Sample) -> bool {
        self.resource_id == s.resource_id
            && self.user_id == s.user_id
            && self.project_id == s.project_id
            && self.source == s.source
            && self.metadata == s.resource_metadata
    }
}

/// Resource internal ids by fingerprint of the identifying fields, then by metadata.
#[derive(Default)]
pub struct ResourceCache {
    map: HashMap<u64, Vec<(ResourceKey, i64)>>,
    len: usize,
}

impl ResourceCache {
    /// The fingerprint of the sample's resource, to pass to [`get`](Self::get) and
    /// [`insert`](Self::insert).
    pub fn fingerprint(s: &Sample) -> u64 {
        let mut h = Fx(0);
        for part in [
            Some(s.resource_id.as_str()),
            s.user_id.as_deref(),
            s.project_id.as_deref(),
            Some(s.source.as_str()),
        ] {
            match part {
                Some(p) => {
                    h.write_u8(1);
                    h.write_usize(p.len());
                    h.write(p.as_bytes());
                }
                None => h.write_u8(0),
            }
        }
        h.finish()
    }

    pub fn get(&self, fingerprint: u64, s: &Sample) -> Option<i64> {
        self.map
            .get(&fingerprint)?
            .iter()
            .find(|(k, _)| k.matches(s))
            .map(|(_, id)| *id)
    }

    pub fn insert(&mut self, fingerprint: u64, s: &Sample, id: i64) {
        if self.len >= MAX_ENTRIES {
            self.clear();
        }
        let versions = self.map.entry(fingerprint).or_default();
        if versions.len() >= VERSIONS_PER_RESOURCE {
            versions.remove(0);
        } else {
            self.len += 1;
        }
        versions.push((ResourceKey::of(s), id));
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.len = 0;
    }
}

/// The Fx hash (rustc's): a multiply-rotate per 8 bytes, several times faster than SipHash.
/// Not DoS-resistant, which is fine for a cache of signed samples whose collisions are
/// resolved by comparison anyway.
struct Fx(u64);

impl Fx {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter::Value;

    fn sample(md: Value) -> Sample {
        Sample {
            source: "s".into(),
            counter_name: "cpu".into(),
            counter_type: CounterType::Gauge,
            counter_unit: "%".into(),
            counter_volume: meter::Volume::Int(1),
            user_id: None,
            project_id: Some("p".into()),
            user_name: None,
            project_name: None,
            resource_id: "r".into(),
            timestamp: String::new(),
            resource_metadata: md.into(),
            message_id: String::new(),
            message_signature: None,
            monotonic_time: None,
            extra: Vec::new(),
        }
    }

    fn map(pairs: Vec<(&str, Value)>) -> Value {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::Str(k.into()), v))
                .collect(),
        )
    }

    #[test]
    fn hits_only_the_identical_resource() {
        let mut cache = ResourceCache::default();
        let a = sample(map(vec![
            ("x", Value::Float(f64::NAN)),
            ("y", Value::Int(1)),
        ]));
        let fa = ResourceCache::fingerprint(&a);
        cache.insert(fa, &a, 7);
        assert_eq!(cache.get(fa, &a), Some(7));
        assert_eq!(
            cache.get(ResourceCache::fingerprint(&a.clone()), &a.clone()),
            Some(7)
        );

        let mut other_owner = a.clone();
        other_owner.user_id = Some(String::new());
        let mut other_md = a.clone();
        other_md.resource_metadata =
            map(vec![("x", Value::Float(f64::NAN)), ("y", Value::Int(2))]).into();
        assert_ne!(ResourceCache::fingerprint(&other_owner), fa);
        // Same resource, other metadata: same bucket, told apart by the comparison.
        assert_eq!(ResourceCache::fingerprint(&other_md), fa);
        for b in [&other_owner, &other_md] {
            assert_eq!(cache.get(ResourceCache::fingerprint(b), b), None);
            assert_eq!(cache.get(fa, b), None);
        }
        cache.insert(fa, &other_md, 8);
        assert_eq!(cache.get(fa, &other_md), Some(8));
        assert_eq!(cache.get(fa, &a), Some(7));
        // Only the newest versions stay.
        for v in 0..VERSIONS_PER_RESOURCE as i64 {
            let mut next = a.clone();
            next.resource_metadata = map(vec![("v", Value::Int(v))]).into();
            cache.insert(fa, &next, 100 + v);
        }
        assert_eq!(cache.get(fa, &a), None);
        assert_eq!(cache.len, VERSIONS_PER_RESOURCE);
    }

    #[test]
    fn meter_cache_keys_on_name_type_and_unit() {
        let mut cache = MeterCache::default();
        let a = sample(Value::Map(Vec::new()));
        cache.insert(&a, 3);
        let mut b = a.clone();
        b.counter_unit = "ns".into();
        assert_eq!(cache.get(&a), Some(3));
        assert_eq!(cache.get(&b), None);
        cache.clear();
        assert_eq!(cache.get(&a), None);
    }
}

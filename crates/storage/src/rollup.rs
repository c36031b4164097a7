//! Rollups (pre-aggregated statistics), independent of any SQL dialect.
//!
//! As Gnocchi's archive policies do, every stored sample is also folded into buckets of each
//! configured granularity (UTC-aligned: an hour, a day), per meter row and per (meter row,
//! resource id): count, sum, min, max and the first and last timestamps, so avg and the
//! duration follow. The drivers write them in the same transaction as the samples, counting
//! only the samples actually inserted (per resource, a coarser level is folded from a finer one
//! instead: [`Level`]); here is the arithmetic they share: bucketing a batch, which levels a
//! sample goes to, choosing the coarsest granularity that answers a statistics query exactly,
//! and folding bucket rows into [`Statistics`] the way the raw query computes them.

use crate::model::{from_micros, StatsSource};
use crate::partition::floor_to;
use crate::{SampleFilter, Statistics, StorageError};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// One rollup level: bucket length and how long its buckets are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granularity {
    pub seconds: u64,
    /// Buckets older than now − this are deleted; 0 keeps them forever.
    pub retention_seconds: u64,
}

impl Granularity {
    pub fn micros(&self) -> i64 {
        micros_of(self.seconds)
    }
}

/// A length in seconds as microseconds, saturating (a bucket's or a level's step).
pub fn micros_of(seconds: u64) -> i64 {
    i64::try_from(seconds)
        .unwrap_or(i64::MAX / 1_000_000)
        .saturating_mul(1_000_000)
}

/// The defaults: 1 hour kept 90 days, 1 day kept 5 years.
pub fn default_granularities() -> Vec<Granularity> {
    vec![
        Granularity {
            seconds: 3600,
            retention_seconds: 90 * 86_400,
        },
        Granularity {
            seconds: 86_400,
            retention_seconds: 5 * 365 * 86_400,
        },
    ]
}

/// count / sum / min / max / first / last of some samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: i64,
    pub last: i64,
}

impl Agg {
    pub fn of(ts: i64, volume: f64) -> Agg {
        Agg {
            count: 1,
            sum: volume,
            min: volume,
            max: volume,
            first: ts,
            last: ts,
        }
    }

    pub fn merge(&mut self, o: &Agg) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.first = self.first.min(o.first);
        self.last = self.last.max(o.last);
    }
}

/// The key of a per-meter bucket: (granularity seconds, meter row id, bucket start µs).
pub type MeterKey = (u64, i64, i64);
/// The key of a per-(meter, resource) bucket: (granularity seconds, meter row id, resource id,
/// bucket start µs).
pub type ResourceKey<'a> = (u64, i64, &'a str, i64);

/// A batch's inserted samples folded into buckets, ready for the drivers' upserts.
#[derive(Debug, Default)]
pub struct BatchRollup<'a> {
    pub meters: BTreeMap<MeterKey, Agg>,
    pub resources: BTreeMap<ResourceKey<'a>, Agg>,
}

impl<'a> BatchRollup<'a> {
    /// Fold one inserted sample (meter row id, resource id, timestamp µs, volume) in: per meter
    /// at every level of `grans`, per resource at the levels `plan` says ([`Level`]).
    pub fn add(
        &mut self,
        grans: &[Granularity],
        plan: &ResourcePlan,
        meter_id: i64,
        resource: &'a str,
        ts: i64,
        volume: f64,
    ) {
        let one = Agg::of(ts, volume);
        for g in grans {
            let bucket = floor_to(ts, g.micros());
            self.meters
                .entry((g.seconds, meter_id, bucket))
                .and_modify(|a| a.merge(&one))
                .or_insert(one);
        }
        let until = plan
            .until
            .iter()
            .filter(|(_, from)| ts < *from)
            .map(|(g, _)| g);
        for g in plan.direct.iter().chain(until) {
            let bucket = floor_to(ts, g.micros());
            self.resources
                .entry((g.seconds, meter_id, resource, bucket))
                .and_modify(|a| a.merge(&one))
                .or_insert(one);
        }
    }
}

/// A rollup level as `rollup_level` records it: its granularity (seconds); its *source*, the
/// finer level its per-resource buckets are folded from, or 0 when samples are written to them
/// directly; and, for a folded level, `fold_from`, the bucket (µs) from which on it is folded.
///
/// Per resource, a sample is written once to each direct level, and to a folded level only
/// when its timestamp is before `fold_from`. A folded level's buckets from `fold_from` on get
/// no writes of their own until the source's buckets pass their retention, when the expiry
/// merges those (from `fold_from` on) into it and deletes them in one transaction. So every
/// sample is counted exactly once in the union of a level's rows and its source's rows from
/// `fold_from` on: that union answers the level's queries. A new store's levels are folded
/// from the start (`fold_from` = `i64::MIN`); a store whose levels were all direct is converted
/// from a bucket ahead of now (see [`assign_sources`]). Per meter (`rollup_meter`, a few rows per
/// batch) every level is written directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub seconds: u64,
    pub source: u64,
    pub fold_from: i64,
}

impl Level {
    pub fn direct(seconds: u64) -> Level {
        Level {
            seconds,
            source: 0,
            fold_from: i64::MIN,
        }
    }
}

/// The sources every configured level should have, given the levels `registered` before, at
/// `now` (µs): a folded level keeps its source while that source is still configured, and
/// otherwise becomes direct (the driver merges the old source's buckets into it first); a level
/// is folded from the finest configured direct level that divides it, if any: a new one from
/// the start, a registered direct one (a store from before sources, whose buckets count every
/// sample, as its source's do) from the start of the bucket after the next, `fold_from`, so
/// that writers of an older release, which write both levels, have at least a bucket's time to
/// be replaced (docs/storage.md). Sources are always direct levels, so a union is never more
/// than two levels deep.
pub fn assign_sources(config: &[Granularity], registered: &[Level], now: i64) -> Vec<Level> {
    let mut secs: Vec<u64> = config
        .iter()
        .map(|g| g.seconds)
        .filter(|s| *s > 0)
        .collect();
    secs.sort_unstable();
    secs.dedup();
    let mut out: Vec<Level> = Vec::with_capacity(secs.len());
    for &s in &secs {
        let had = registered.iter().find(|l| l.seconds == s);
        // The finest direct level dividing this one (registered before, for a registered one:
        // its buckets must be complete).
        let candidate = out
            .iter()
            .filter(|l| l.source == 0 && s % l.seconds == 0)
            .find(|l| had.is_none() || registered.iter().any(|r| r.seconds == l.seconds))
            .map(|l| l.seconds);
        let level = match (had, candidate) {
            (Some(l), _) if l.source != 0 && secs.contains(&l.source) => *l,
            (Some(_), None) => Level::direct(s),
            (Some(_), Some(c)) => {
                let step = micros_of(s);
                Level {
                    seconds: s,
                    source: c,
                    fold_from: floor_to(now, step).saturating_add(step.saturating_mul(2)),
                }
            }
            (None, Some(c)) => Level {
                seconds: s,
                source: c,
                fold_from: i64::MIN,
            },
            (None, None) => Level::direct(s),
        };
        out.push(level);
    }
    out
}

/// What registering the configured levels changes in `rollup_level` now: each level whose
/// row is new (`None`) or differs (`Some` of the row registered), with the row wanted; empty
/// when nothing is to be done. For a level that had a source, the driver first merges that
/// source's buckets from its `fold_from` on into the level.
pub fn level_changes(config: &[Granularity], registered: &[Level]) -> Vec<(Option<Level>, Level)> {
    assign_sources(config, registered, crate::model::now_micros())
        .into_iter()
        .filter_map(
            |want| match registered.iter().find(|l| l.seconds == want.seconds) {
                Some(had) if *had == want => None,
                had => Some((had.copied(), want)),
            },
        )
        .collect()
}

/// Where a level registered on a store whose newest rollup ends at `newest` (µs) is complete
/// from: the bucket after it (samples stored before were not counted at that level), or the
/// beginning on a store without rollups.
pub fn complete_from(newest: Option<i64>, seconds: u64) -> i64 {
    let step = micros_of(seconds);
    match newest {
        Some(ts) => floor_to(ts, step).saturating_add(step),
        None => i64::MIN,
    }
}

/// Which configured levels a sample is written to per resource: the direct ones, and a folded
/// one while the sample is before its `fold_from`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourcePlan {
    pub direct: Vec<Granularity>,
    pub until: Vec<(Granularity, i64)>,
}

impl ResourcePlan {
    /// The plan of `config`'s levels as registered in `levels` (a level not registered is
    /// written directly).
    pub fn new(config: &[Granularity], levels: &[Level]) -> ResourcePlan {
        let mut plan = ResourcePlan::default();
        for g in config {
            match levels.iter().find(|l| l.seconds == g.seconds) {
                Some(l) if l.source != 0 => {
                    if l.fold_from > i64::MIN {
                        plan.until.push((*g, l.fold_from));
                    }
                }
                _ => plan.direct.push(*g),
            }
        }
        plan
    }
}

/// The granularities whose `rollup_resource` rows answer level `seconds`, each with the first
/// bucket to read: its own (all) and, when it is folded from a finer level, that level's from
/// `fold_from` on.
pub fn resource_granularities(levels: &[Level], seconds: u64) -> Vec<(u64, i64)> {
    match levels.iter().find(|l| l.seconds == seconds) {
        Some(l) if l.source != 0 => vec![(seconds, i64::MIN), (l.source, l.fold_from)],
        _ => vec![(seconds, i64::MIN)],
    }
}

/// The levels folded from `source`, each with its `fold_from`: when `source`'s buckets expire,
/// those from `fold_from` on are merged into the level (earlier ones it counts already).
pub fn folded_from(levels: &[Level], source: u64) -> Vec<(u64, i64)> {
    levels
        .iter()
        .filter(|l| l.source == source && source != 0)
        .map(|l| (l.seconds, l.fold_from))
        .collect()
}

/// The coarsest configured granularity whose buckets answer `filter` with `period` exactly:
/// the filter narrows only by meter, resource and time; its start (required) and end (if any)
/// are multiples of the granularity, as is the period; and the start is inside the
/// granularity's retention. `None`: compute from raw samples.
pub fn exact_granularity(
    grans: &[Granularity],
    filter: &SampleFilter,
    period: Option<u64>,
    now_us: i64,
) -> Option<Granularity> {
    if filter.project_id.is_some()
        || filter.user_id.is_some()
        || filter.source.is_some()
        || !filter.metadata.is_empty()
    {
        return None;
    }
    let start = crate::model::to_micros(filter.start?);
    let end = filter.end.map(crate::model::to_micros);
    let period = period.filter(|p| *p > 0);
    grans
        .iter()
        .filter(|g| g.seconds > 0)
        .filter(|g| start.rem_euclid(g.micros()) == 0)
        .filter(|g| end.map_or(true, |e| e.rem_euclid(g.micros()) == 0))
        .filter(|g| period.map_or(true, |p| p % g.seconds == 0))
        .filter(|g| {
            g.retention_seconds == 0
                || start
                    >= now_us.saturating_sub(
                        i64::try_from(g.retention_seconds)
                            .unwrap_or(i64::MAX)
                            .saturating_mul(1_000_000),
                    )
        })
        .max_by_key(|g| g.seconds)
        .copied()
}

/// The coarsest configured granularity whose `rollup_meter` buckets count the samples of the
/// time range `[lo, hi)` (µs) exactly, for expiry to report a partition's rows without reading
/// them: every inserted sample is counted once at every level, in its batch's transaction, so
/// the buckets of a level that tile the range sum to its samples, provided none of them is past
/// the level's retention at `now_us` and the level has been complete since `lo` (`complete`:
/// `rollup_level`'s (granularity, complete_from) rows). The caller makes sure that no sample
/// outside the range is stored with the range's samples.
pub fn counting_granularity(
    grans: &[Granularity],
    complete: &[(u64, i64)],
    lo: i64,
    hi: i64,
    now_us: i64,
) -> Option<Granularity> {
    grans
        .iter()
        .filter(|g| g.seconds > 0 && lo < hi)
        .filter(|g| lo.rem_euclid(g.micros()) == 0 && hi.rem_euclid(g.micros()) == 0)
        .filter(|g| {
            g.retention_seconds == 0
                || lo
                    >= now_us.saturating_sub(
                        i64::try_from(g.retention_seconds)
                            .unwrap_or(i64::MAX)
                            .saturating_mul(1_000_000),
                    )
        })
        .filter(|g| {
            complete
                .iter()
                .any(|&(s, from)| s == g.seconds && from <= lo)
        })
        .max_by_key(|g| g.seconds)
        .copied()
}

/// One bucket row read back from a rollup: its start (µs), the meter row's unit, the aggregate.
pub struct BucketRow {
    pub bucket: i64,
    pub unit: String,
    pub agg: Agg,
}

fn time_at(us: i64) -> Result<OffsetDateTime, StorageError> {
    from_micros(us).ok_or_else(|| StorageError::Database(format!("timestamp {us} µs out of range")))
}

/// Fold bucket rows (already restricted to `[filter.start, filter.end)`) into the statistics
/// the raw query gives for `filter` and `period`: per unit, and per period counted from
/// `filter.start` when a period is asked for.
pub fn statistics(
    rows: impl IntoIterator<Item = BucketRow>,
    filter: &SampleFilter,
    period: Option<u64>,
) -> Result<Vec<Statistics>, StorageError> {
    let anchor = filter.start.map(crate::model::to_micros).unwrap_or(0);
    let period = period.filter(|p| *p > 0);
    let period_us = match period {
        Some(p) => Some(
            i64::try_from(p)
                .ok()
                .and_then(|p| p.checked_mul(1_000_000))
                .ok_or_else(|| StorageError::InvalidOption {
                    name: "period",
                    value: p.to_string(),
                    reason: "too long".to_string(),
                })?,
        ),
        None => None,
    };
    let mut groups: BTreeMap<(i64, String), Agg> = BTreeMap::new();
    for r in rows {
        let k = match period_us {
            Some(p) => (r.bucket - anchor).div_euclid(p),
            None => 0,
        };
        let key = (k, r.unit);
        groups
            .entry(key)
            .and_modify(|a| a.merge(&r.agg))
            .or_insert(r.agg);
    }
    let mut out = Vec::with_capacity(groups.len());
    for ((k, unit), a) in groups {
        let (start, end) = match period_us {
            Some(p) => {
                let s = anchor + k * p;
                (time_at(s)?, time_at(s.saturating_add(p))?)
            }
            None => (
                match filter.start {
                    Some(t) => t,
                    None => time_at(a.first)?,
                },
                match filter.end {
                    Some(t) => t,
                    None => time_at(a.last)?,
                },
            ),
        };
        out.push(Statistics {
            period_start: start,
            period_end: end,
            period: period.unwrap_or(0),
            count: a.count,
            min: a.min,
            max: a.max,
            avg: a.sum / a.count.max(1) as f64,
            sum: a.sum,
            duration_start: time_at(a.first)?,
            duration_end: time_at(a.last)?,
            duration: (a.last - a.first) as f64 / 1e6,
            unit,
        });
    }
    Ok(out)
}

/// The source to report for a granularity.
pub fn source(g: &Granularity) -> StatsSource {
    StatsSource::Rollup {
        granularity: g.seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn filter(start: Option<OffsetDateTime>, end: Option<OffsetDateTime>) -> SampleFilter {
        SampleFilter {
            meter: Some("cpu".into()),
            start,
            end,
            ..Default::default()
        }
    }

    #[test]
    fn the_coarsest_exact_granularity_answers() {
        let g = default_granularities();
        let now = crate::model::to_micros(datetime!(2026-11-30 12:00 UTC));
        let day = Some(datetime!(2026-11-23 00:00 UTC));
        let end = Some(datetime!(2026-11-30 00:00 UTC));
        let pick = |f: &SampleFilter, p| exact_granularity(&g, f, p, now).map(|g| g.seconds);
        assert_eq!(pick(&filter(day, end), Some(3600)), Some(3600));
        assert_eq!(pick(&filter(day, end), Some(86_400)), Some(86_400));
        assert_eq!(pick(&filter(day, end), None), Some(86_400));
        assert_eq!(pick(&filter(day, None), Some(7200)), Some(3600));
        // Unaligned start, end or period: raw.
        let odd = Some(datetime!(2026-11-23 00:30 UTC));
        assert_eq!(pick(&filter(odd, end), Some(3600)), None);
        assert_eq!(pick(&filter(day, odd), Some(3600)), None);
        assert_eq!(pick(&filter(day, end), Some(60)), None);
        assert_eq!(pick(&filter(None, end), Some(3600)), None);
        // A filter the rollups do not key on: raw.
        let mut f = filter(day, end);
        f.project_id = Some("p".into());
        assert_eq!(pick(&f, Some(3600)), None);
        // Beyond the hourly retention (90 days), only the daily rollup is complete.
        let old = Some(datetime!(2026-01-01 00:00 UTC));
        assert_eq!(pick(&filter(old, end), Some(3600)), None);
        assert_eq!(pick(&filter(old, end), Some(86_400)), Some(86_400));
    }

    #[test]
    fn a_partition_is_counted_by_the_coarsest_level_tiling_it_within_retention() {
        let hour = Granularity {
            seconds: 3600,
            retention_seconds: 90 * 86_400,
        };
        let day = Granularity {
            seconds: 86_400,
            retention_seconds: 0,
        };
        let grans = [hour, day];
        let d = 86_400_000_000i64;
        let now = 100 * d;
        let all = [(3600, i64::MIN), (86_400, i64::MIN)];
        let count = |complete: &[(u64, i64)], lo, hi, now| {
            counting_granularity(&grans, complete, lo, hi, now).map(|g| g.seconds)
        };
        assert_eq!(count(&all, 95 * d, 96 * d, now), Some(86_400));
        // An hourly partition: the daily buckets do not tile it.
        assert_eq!(count(&all, 95 * d, 95 * d + d / 24, now), Some(3600));
        // Unaligned: neither.
        assert_eq!(count(&all, 95 * d + 1, 96 * d, now), None);
        // The daily level registered later than the partition's start: the hourly one.
        assert_eq!(
            count(&[(3600, i64::MIN), (86_400, 96 * d)], 95 * d, 96 * d, now),
            Some(3600)
        );
        // The hourly buckets past their 90 days are gone; a daily level never registered.
        assert_eq!(count(&[(3600, i64::MIN)], 5 * d, 6 * d, now), None);
        assert_eq!(count(&[], 95 * d, 96 * d, now), None);
    }

    #[test]
    fn batch_rollup_counts_each_sample_once_per_granularity() {
        let g = default_granularities();
        let all = ResourcePlan::new(&g, &[]);
        let mut b = BatchRollup::default();
        let h = 3_600_000_000;
        b.add(&g, &all, 1, "r", 10, 2.0);
        b.add(&g, &all, 1, "r", h + 10, 4.0);
        b.add(&g, &all, 1, "s", 20, 1.0);
        assert_eq!(b.meters.len(), 3); // two hours + one day
        let day = b.meters[&(86_400, 1, 0)];
        assert_eq!((day.count, day.sum, day.min, day.max), (3, 7.0, 1.0, 4.0));
        assert_eq!((day.first, day.last), (10, h + 10));
        assert_eq!(b.resources[&(3600, 1, "r", 0)].count, 1);
        assert_eq!(b.resources[&(86_400, 1, "r", 0)].count, 2);
        // Per resource, only the levels written directly, and a folded one before its
        // fold_from.
        let levels = [
            Level::direct(3600),
            Level {
                seconds: 86_400,
                source: 3600,
                fold_from: 2 * h,
            },
        ];
        let plan = ResourcePlan::new(&g, &levels);
        let mut b = BatchRollup::default();
        b.add(&g, &plan, 1, "r", 10, 2.0);
        b.add(&g, &plan, 1, "r", 2 * h, 2.0);
        assert_eq!((b.meters.len(), b.resources.len()), (3, 3));
        assert_eq!(b.resources[&(86_400, 1, "r", 0)].count, 1);
        assert_eq!(b.resources[&(3600, 1, "r", 2 * h)].count, 1);
    }

    fn lv(seconds: u64, source: u64) -> Level {
        Level {
            seconds,
            source,
            fold_from: i64::MIN,
        }
    }

    fn gran(seconds: u64) -> Granularity {
        Granularity {
            seconds,
            retention_seconds: 0,
        }
    }

    #[test]
    fn new_levels_are_folded_from_the_finest_direct_level_dividing_them() {
        let now = 100 * 86_400_000_000 + 5;
        let g = default_granularities();
        assert_eq!(
            assign_sources(&g, &[], now),
            vec![lv(3600, 0), lv(86_400, 3600)]
        );
        // Not a multiple: direct. A multiple of a level that is itself folded: from the
        // finest direct one.
        let g = [gran(3600), gran(5400), gran(86_400), gran(7200)];
        assert_eq!(
            assign_sources(&g, &[], now),
            vec![lv(3600, 0), lv(5400, 0), lv(7200, 3600), lv(86_400, 3600)]
        );
        // A store from before sources (both levels direct) folds the daily level from the
        // start of the day after tomorrow; folded levels keep their sources; a new finer level
        // does not change them, nor is a registered level folded from a level new here.
        let upgraded = assign_sources(&default_granularities(), &[lv(3600, 0), lv(86_400, 0)], now);
        assert_eq!(
            upgraded,
            vec![
                lv(3600, 0),
                Level {
                    seconds: 86_400,
                    source: 3600,
                    fold_from: 102 * 86_400_000_000
                }
            ]
        );
        assert_eq!(
            assign_sources(&default_granularities(), &upgraded, now + 86_400_000_000),
            upgraded
        );
        let g = [gran(60), gran(3600), gran(86_400)];
        assert_eq!(
            assign_sources(&g, &[lv(3600, 0), lv(86_400, 3600)], now),
            vec![lv(60, 0), lv(3600, 0), lv(86_400, 3600)]
        );
        assert_eq!(
            assign_sources(&[gran(60), gran(3600)], &[lv(3600, 0)], now),
            vec![lv(60, 0), lv(3600, 0)]
        );
        // The source no longer configured: direct.
        assert_eq!(
            assign_sources(&[gran(86_400)], &[lv(3600, 0), lv(86_400, 3600)], now),
            vec![lv(86_400, 0)]
        );
        let d = default_granularities();
        let levels = assign_sources(&d, &[], now);
        assert_eq!(
            ResourcePlan::new(&d, &levels),
            ResourcePlan {
                direct: vec![d[0]],
                until: Vec::new()
            }
        );
        assert_eq!(
            ResourcePlan::new(&d, &upgraded).until,
            vec![(d[1], 102 * 86_400_000_000)]
        );
        assert_eq!(
            resource_granularities(&levels, 86_400),
            vec![(86_400, i64::MIN), (3600, i64::MIN)]
        );
        assert_eq!(
            resource_granularities(&levels, 3600),
            vec![(3600, i64::MIN)]
        );
        assert_eq!(
            folded_from(&upgraded, 3600),
            vec![(86_400, 102 * 86_400_000_000)]
        );
        assert!(folded_from(&levels, 86_400).is_empty());
    }

    #[test]
    fn buckets_fold_into_periods_from_the_start() {
        let h = 3_600_000_000i64;
        let start = datetime!(2026-11-23 00:00 UTC);
        let s0 = crate::model::to_micros(start);
        let rows = (0..5).map(|i| BucketRow {
            bucket: s0 + i * h,
            unit: "ns".into(),
            agg: Agg::of(s0 + i * h + 1, i as f64),
        });
        let st = statistics(rows, &filter(Some(start), None), Some(7200)).unwrap();
        assert_eq!(st.len(), 3);
        assert_eq!((st[0].count, st[0].sum, st[0].max), (2, 1.0, 1.0));
        assert_eq!(st[2].count, 1);
        assert_eq!(crate::model::to_micros(st[1].period_start), s0 + 2 * h);
        assert_eq!(st[1].period, 7200);
    }
}

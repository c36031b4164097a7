//! Time partitions of the sample table, independent of any SQL dialect.
//!
//! Samples are stored in partitions by their timestamp: half-open ranges `[lo, hi)` of
//! microseconds, normally aligned to multiples of the configured span (one day by default,
//! UTC). A partition is created when the first sample falling into it arrives; retention drops
//! whole partitions whose `hi` is at or before the cutoff (one straddling the cutoff waits for a
//! later pass). When the span is changed on an existing store, partitions already made keep their
//! range and a new one is clipped so that ranges never overlap.

use std::collections::BTreeMap;

/// One day in microseconds.
pub const DAY_US: i64 = 86_400_000_000;

/// A partition: `[lo, hi)` in µs since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub lo: i64,
    pub hi: i64,
}

impl Range {
    pub fn contains(&self, ts: i64) -> bool {
        self.lo <= ts && ts < self.hi
    }

    /// Whether it overlaps `[start, end)` (either bound open when `None`).
    pub fn overlaps(&self, start: Option<i64>, end: Option<i64>) -> bool {
        start.map_or(true, |s| self.hi > s) && end.map_or(true, |e| self.lo < e)
    }

    /// The table (or partition) name: the prefix and `lo`, `m` standing for a minus sign.
    pub fn name(&self, prefix: &str) -> String {
        if self.lo < 0 {
            format!("{prefix}m{}", self.lo.unsigned_abs())
        } else {
            format!("{prefix}{}", self.lo)
        }
    }
}

/// Floor division (toward −∞), for timestamps before 1970 too.
pub fn floor_to(ts: i64, step: i64) -> i64 {
    ts - ts.rem_euclid(step)
}

/// The partitions known to one store, by `lo`.
#[derive(Debug, Clone, Default)]
pub struct Partitions {
    by_lo: BTreeMap<i64, i64>,
}

impl Partitions {
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range>) -> Partitions {
        Partitions {
            by_lo: ranges.into_iter().map(|r| (r.lo, r.hi)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_lo.is_empty()
    }

    pub fn insert(&mut self, r: Range) {
        self.by_lo.insert(r.lo, r.hi);
    }

    pub fn clear(&mut self) {
        self.by_lo.clear();
    }

    /// The partition holding `ts`, if one exists.
    pub fn find(&self, ts: i64) -> Option<Range> {
        let (&lo, &hi) = self.by_lo.range(..=ts).next_back()?;
        let r = Range { lo, hi };
        r.contains(ts).then_some(r)
    }

    /// The range a new partition for `ts` gets: aligned to `span_us`, clipped against its
    /// neighbours. Call only when [`Partitions::find`] found none.
    pub fn new_range(&self, ts: i64, span_us: i64) -> Range {
        let span = span_us.max(1);
        let mut lo = floor_to(ts, span);
        let mut hi = lo.saturating_add(span);
        if let Some((_, &prev_hi)) = self.by_lo.range(..=ts).next_back() {
            lo = lo.max(prev_hi);
        }
        if let Some((&next_lo, _)) = self.by_lo.range(ts..).next() {
            hi = hi.min(next_lo);
        }
        Range { lo, hi }
    }

    /// Partitions overlapping `[start, end)`, oldest first.
    pub fn overlapping(&self, start: Option<i64>, end: Option<i64>) -> Vec<Range> {
        self.by_lo
            .iter()
            .map(|(&lo, &hi)| Range { lo, hi })
            .filter(|r| r.overlaps(start, end))
            .collect()
    }

    /// Partitions entirely older than `cutoff` (every sample in them has `ts < cutoff`).
    pub fn expired(&self, cutoff: i64) -> Vec<Range> {
        self.by_lo
            .iter()
            .map(|(&lo, &hi)| Range { lo, hi })
            .filter(|r| r.hi <= cutoff)
            .collect()
    }
}

/// Batch planning: the batch rows (by position) grouped by the partition their timestamp falls
/// in, partitions in time order, rows in batch order within each. Partitions missing from
/// `known` are returned with the range a new one gets; the caller creates them.
pub fn plan(
    known: &Partitions,
    timestamps: impl IntoIterator<Item = i64>,
    span_us: i64,
) -> Vec<(Range, Vec<usize>)> {
    let mut planned = known.clone();
    let mut groups: BTreeMap<Range, Vec<usize>> = BTreeMap::new();
    for (i, ts) in timestamps.into_iter().enumerate() {
        let r = match planned.find(ts) {
            Some(r) => r,
            None => {
                let r = planned.new_range(ts, span_us);
                planned.insert(r);
                r
            }
        };
        groups.entry(r).or_default().push(i);
    }
    groups.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_align_to_the_span_also_before_1970() {
        let p = Partitions::default();
        assert_eq!(
            p.new_range(DAY_US + 5, DAY_US),
            Range {
                lo: DAY_US,
                hi: 2 * DAY_US
            }
        );
        assert_eq!(p.new_range(-1, DAY_US), Range { lo: -DAY_US, hi: 0 });
        assert_eq!(Range { lo: -DAY_US, hi: 0 }.name("s_"), "s_m86400000000");
        assert_eq!(Range { lo: 0, hi: 1 }.name("s_"), "s_0");
    }

    #[test]
    fn a_changed_span_never_overlaps_existing_partitions() {
        let mut p = Partitions::default();
        p.insert(Range {
            lo: 0,
            hi: DAY_US / 2,
        });
        // A day-long span around an existing half-day partition: clipped at its end.
        let r = p.new_range(DAY_US / 2 + 1, DAY_US);
        assert_eq!(
            r,
            Range {
                lo: DAY_US / 2,
                hi: DAY_US
            }
        );
        p.insert(Range {
            lo: DAY_US + 10,
            hi: 2 * DAY_US,
        });
        let r = p.new_range(DAY_US + 1, DAY_US);
        assert_eq!(
            r,
            Range {
                lo: DAY_US,
                hi: DAY_US + 10
            }
        );
    }

    #[test]
    fn plan_groups_rows_by_partition_in_time_order() {
        let known = Partitions::from_ranges([Range { lo: 0, hi: 100 }]);
        let plan = plan(&known, [150, 5, 120, 99, -3], 100);
        let got: Vec<(i64, i64, Vec<usize>)> =
            plan.into_iter().map(|(r, v)| (r.lo, r.hi, v)).collect();
        assert_eq!(
            got,
            vec![
                (-100, 0, vec![4]),
                (0, 100, vec![1, 3]),
                (100, 200, vec![0, 2])
            ]
        );
    }

    #[test]
    fn expired_and_overlapping() {
        let p = Partitions::from_ranges([
            Range { lo: 0, hi: 10 },
            Range { lo: 10, hi: 20 },
            Range { lo: 20, hi: 30 },
        ]);
        assert_eq!(p.expired(20).len(), 2);
        assert_eq!(p.expired(19).len(), 1, "a straddling partition waits");
        assert_eq!(
            p.overlapping(Some(10), Some(20)),
            vec![Range { lo: 10, hi: 20 }]
        );
        assert_eq!(p.overlapping(None, Some(11)).len(), 2);
        assert_eq!(p.find(25), Some(Range { lo: 20, hi: 30 }));
        assert_eq!(p.find(30), None);
    }
}

//! Per-thread measurements, merged at the end of a run: per direction and level, messages
//! sent, received, refused and duplicated, latency from `created_ns` (HdrHistogram, 3
//! significant digits, in µs up to one hour), and a time series for the charts.
//!
//! Each peer thread owns its [`Stats`] (no sharing on the message path). Memory is bounded: the
//! histograms have a fixed size, the time series has at most [`SERIES_BUCKETS_MAX`] buckets, and
//! each bucket's latency is a fixed log-scale count array (4 bins per octave), allocated only
//! when a sample lands in it.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::checker::Direction;

/// Latest latency the histograms hold, µs (one hour); longer ones are recorded as this.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Time-series buckets at most.
pub const SERIES_BUCKETS_MAX: usize = 2_000;
/// Log-scale latency bins per time bucket: 4 per octave of µs, up to 2^32 µs.
pub const LAT_BINS: usize = 128;

/// The bin of a latency in µs.
pub fn lat_bin(us: u64) -> usize {
    (((us as f64 + 1.0).log2() * 4.0) as usize).min(LAT_BINS - 1)
}

/// The upper edge of a bin, µs.
pub fn lat_bin_upper_us(bin: usize) -> f64 {
    2f64.powf((bin as f64 + 1.0) / 4.0) - 1.0
}

fn new_histogram() -> Histogram<u64> {
    // Bounds and precision are constants within hdrhistogram's limits.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Counts and latency of one (direction, level).
#[derive(Debug, Clone)]
pub struct LevelStats {
    /// Sent, counted at the level dsplane's rules give it.
    pub sent: u64,
    /// First deliveries, counted at the level dsplane wrote in the frame.
    pub received: u64,
    /// Deliveries beyond the first.
    pub duplicates: u64,
    /// Refused by dsplane.
    pub nacked: u64,
    /// Latency of first deliveries, µs.
    pub latency: Histogram<u64>,
}

impl LevelStats {
    fn new() -> LevelStats {
        LevelStats {
            sent: 0,
            received: 0,
            duplicates: 0,
            nacked: 0,
            latency: new_histogram(),
        }
    }
}

/// One time bucket of one (direction, level).
#[derive(Debug, Clone, Default)]
pub struct Bucket {
    /// Sent in it.
    pub sent: u32,
    /// First deliveries in it.
    pub received: u32,
    /// Refusals in it.
    pub nacked: u32,
    /// Latency of its deliveries by [`lat_bin`].
    pub bins: Option<Box<[u32; LAT_BINS]>>,
}

impl Bucket {
    /// The `q` quantile of its latency (upper bin edge, µs), if it had deliveries.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let bins = self.bins.as_ref()?;
        let total: u64 = bins.iter().map(|&c| u64::from(c)).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (b, &c) in bins.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Some(lat_bin_upper_us(b));
            }
        }
        None
    }
}

/// Delivery order of a scenario's headline traffic against its bulk traffic, at one SU: how
/// many headline frames overtook bulk frames created before them (strict priority lets urgent
/// traffic overtake a backlog; FIFO never does). Bounded: past [`OrderProbe::FRAMES_MAX`] bulk
/// frames the probe stops and reports itself incomplete.
#[derive(Debug, Clone, Default)]
pub struct OrderProbe {
    /// `created_ns` of each bulk frame, in receive order.
    bulk_created: Vec<u64>,
    /// (bulk frames received before it, created_ns) of each headline frame.
    headline: Vec<(usize, u64)>,
    overflow: bool,
}

/// What an [`OrderProbe`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OrderResult {
    /// Headline frames received.
    pub headline: u64,
    /// Of them, those received before a bulk frame created earlier than they were.
    pub overtook_bulk: u64,
    /// Bulk frames received.
    pub bulk: u64,
    /// Whether the probe ran out of room (then the counts cover only the start).
    pub incomplete: bool,
}

impl OrderProbe {
    /// Frames (bulk plus headline) one probe tracks at most.
    pub const FRAMES_MAX: usize = 2_000_000;

    /// A bulk frame was received.
    pub fn on_bulk(&mut self, created_ns: u64) {
        if self.bulk_created.len() + self.headline.len() >= Self::FRAMES_MAX {
            self.overflow = true;
            return;
        }
        self.bulk_created.push(created_ns);
    }

    /// A headline frame was received.
    pub fn on_headline(&mut self, created_ns: u64) {
        if self.bulk_created.len() + self.headline.len() >= Self::FRAMES_MAX {
            self.overflow = true;
            return;
        }
        self.headline.push((self.bulk_created.len(), created_ns));
    }

    /// Counts the overtakes: a headline frame overtook if some bulk frame received after it was
    /// created before it (suffix minimum of the bulk creation times).
    pub fn result(&self) -> OrderResult {
        let mut suffix_min = vec![u64::MAX; self.bulk_created.len() + 1];
        for i in (0..self.bulk_created.len()).rev() {
            suffix_min[i] = suffix_min[i + 1].min(self.bulk_created[i]);
        }
        let overtook = self
            .headline
            .iter()
            .filter(|&&(k, created)| suffix_min[k] < created)
            .count();
        OrderResult {
            headline: self.headline.len() as u64,
            overtook_bulk: overtook as u64,
            bulk: self.bulk_created.len() as u64,
            incomplete: self.overflow,
        }
    }
}

impl OrderResult {
    /// Adds another SU's result.
    pub fn add(&mut self, o: &OrderResult) {
        self.headline += o.headline;
        self.overtook_bulk += o.overtook_bulk;
        self.bulk += o.bulk;
        self.incomplete |= o.incomplete;
    }
}

/// One thread's measurements.
#[derive(Debug, Clone)]
pub struct Stats {
    levels: usize,
    bucket_ns: u64,
    per: Vec<LevelStats>,
    series: Vec<Vec<Bucket>>,
    /// Latency of the headline traffic, µs.
    pub headline: Histogram<u64>,
    headline_series: Vec<Bucket>,
    /// Order of headline against bulk traffic.
    pub order: OrderResult,
    /// Receive time of the last first delivery, ns since the run's origin.
    pub last_received_ns: u64,
}

impl Stats {
    /// Stats for `levels` levels with time buckets of `bucket_ns`.
    pub fn new(levels: u8, bucket_ns: u64) -> Stats {
        let levels = usize::from(levels.max(1));
        Stats {
            levels,
            bucket_ns: bucket_ns.max(1),
            per: (0..2 * levels).map(|_| LevelStats::new()).collect(),
            series: (0..2 * levels).map(|_| preallocated_series()).collect(),
            headline: new_histogram(),
            headline_series: preallocated_series(),
            order: OrderResult::default(),
            last_received_ns: 0,
        }
    }

    /// Number of levels.
    pub fn levels(&self) -> usize {
        self.levels
    }

    /// Width of a time bucket, ns.
    pub fn bucket_ns(&self) -> u64 {
        self.bucket_ns
    }

    fn index(&self, dir: Direction, level: u8) -> usize {
        let l = usize::from(level).clamp(1, self.levels) - 1;
        match dir {
            Direction::Northbound => l,
            Direction::Southbound => self.levels + l,
        }
    }

    fn bucket(&mut self, i: usize, t_ns: u64) -> &mut Bucket {
        let b = ((t_ns / self.bucket_ns) as usize).min(SERIES_BUCKETS_MAX - 1);
        bucket_at(&mut self.series[i], b)
    }

    /// A message was sent at `t_ns` (since the origin), at the level the rules give it.
    pub fn on_sent(&mut self, dir: Direction, level: u8, t_ns: u64) {
        let i = self.index(dir, level);
        self.per[i].sent += 1;
        self.bucket(i, t_ns).sent += 1;
    }

    /// dsplane refused a message.
    pub fn on_nacked(&mut self, dir: Direction, level: u8, t_ns: u64) {
        let i = self.index(dir, level);
        self.per[i].nacked += 1;
        self.bucket(i, t_ns).nacked += 1;
    }

    /// A message was delivered for the first time at `t_ns`, `latency_ns` after its creation.
    pub fn on_received(&mut self, dir: Direction, level: u8, latency_ns: u64, t_ns: u64) {
        let i = self.index(dir, level);
        let us = (latency_ns / 1_000).clamp(1, LATENCY_US_MAX);
        let s = &mut self.per[i];
        s.received += 1;
        s.latency.saturating_record(us);
        let bucket = self.bucket(i, t_ns);
        bucket.received += 1;
        bucket.bins.get_or_insert_with(|| Box::new([0; LAT_BINS]))[lat_bin(us)] += 1;
        self.last_received_ns = self.last_received_ns.max(t_ns);
    }

    /// A message was delivered again.
    pub fn on_duplicate(&mut self, dir: Direction, level: u8) {
        let i = self.index(dir, level);
        self.per[i].duplicates += 1;
    }

    /// A headline message was delivered for the first time at `t_ns`.
    pub fn on_headline(&mut self, latency_ns: u64, t_ns: u64) {
        let us = (latency_ns / 1_000).clamp(1, LATENCY_US_MAX);
        self.headline.saturating_record(us);
        let b = ((t_ns / self.bucket_ns) as usize).min(SERIES_BUCKETS_MAX - 1);
        let bucket = bucket_at(&mut self.headline_series, b);
        bucket.received += 1;
        bucket.bins.get_or_insert_with(|| Box::new([0; LAT_BINS]))[lat_bin(us)] += 1;
    }

    /// The time series of the headline traffic.
    pub fn headline_series(&self) -> &[Bucket] {
        &self.headline_series
    }

    /// The counts of one (direction, level).
    pub fn level(&self, dir: Direction, level: u8) -> &LevelStats {
        &self.per[self.index(dir, level)]
    }

    /// The time series of one (direction, level).
    pub fn series(&self, dir: Direction, level: u8) -> &[Bucket] {
        &self.series[self.index(dir, level)]
    }

    /// Adds another thread's measurements (same levels and bucket width).
    pub fn merge(&mut self, other: &Stats) {
        for (a, b) in self.per.iter_mut().zip(&other.per) {
            a.sent += b.sent;
            a.received += b.received;
            a.duplicates += b.duplicates;
            a.nacked += b.nacked;
            // Same bounds on both sides: adding cannot fail.
            let _ = a.latency.add(&b.latency);
        }
        for (a, b) in self.series.iter_mut().zip(&other.series) {
            merge_series(a, b);
        }
        merge_series(&mut self.headline_series, &other.headline_series);
        let _ = self.headline.add(&other.headline);
        self.order.add(&other.order);
        self.last_received_ns = self.last_received_ns.max(other.last_received_ns);
    }
}

/// Buckets allocated up front: the run's 500 plus its drain. Allocating them as the run goes
/// made the load generator's own memory grow with time, which a soak would take for a leak.
const SERIES_PREALLOCATED: usize = 600;

fn preallocated_series() -> Vec<Bucket> {
    (0..SERIES_PREALLOCATED)
        .map(|_| Bucket {
            bins: Some(Box::new([0; LAT_BINS])),
            ..Bucket::default()
        })
        .collect()
}

fn bucket_at(series: &mut Vec<Bucket>, b: usize) -> &mut Bucket {
    if series.len() <= b {
        series.resize_with(b + 1, Bucket::default);
    }
    &mut series[b]
}

fn merge_series(a: &mut Vec<Bucket>, b: &[Bucket]) {
    if a.len() < b.len() {
        a.resize_with(b.len(), Bucket::default);
    }
    for (x, y) in a.iter_mut().zip(b) {
        x.sent += y.sent;
        x.received += y.received;
        x.nacked += y.nacked;
        if let Some(yb) = &y.bins {
            let xb = x.bins.get_or_insert_with(|| Box::new([0; LAT_BINS]));
            for (p, q) in xb.iter_mut().zip(yb.iter()) {
                *p += q;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_monotone_and_cover_the_range() {
        let mut last = 0;
        for us in [0, 1, 2, 10, 100, 1_000, 10_000, 1_000_000, LATENCY_US_MAX] {
            let b = lat_bin(us);
            assert!(b >= last);
            assert!(lat_bin_upper_us(b) >= us as f64, "{us}");
            last = b;
        }
    }

    #[test]
    fn merge_adds_counts_histograms_and_series() {
        let mut a = Stats::new(4, 1_000_000);
        let mut b = Stats::new(4, 1_000_000);
        a.on_sent(Direction::Northbound, 1, 0);
        b.on_sent(Direction::Northbound, 1, 5_500_000);
        a.on_received(Direction::Northbound, 1, 2_000_000, 100);
        b.on_received(Direction::Northbound, 1, 4_000_000, 5_600_000);
        b.on_received(Direction::Southbound, 9, 1_000, 0); // clamped to the lowest level
        a.merge(&b);
        let l1 = a.level(Direction::Northbound, 1);
        assert_eq!((l1.sent, l1.received), (2, 2));
        assert!(l1.latency.max().abs_diff(4_000) <= 4, "within 0.1 %");
        assert_eq!(a.level(Direction::Southbound, 4).received, 1);
        let s = a.series(Direction::Northbound, 1);
        // Allocated up front; buckets 0 and 5 are the busy ones, the rest are empty.
        assert_eq!(s.len(), SERIES_PREALLOCATED);
        assert!(s[6..].iter().all(|b| b.sent + b.received == 0));
        assert_eq!((s[0].sent, s[5].sent, s[5].received), (1, 1, 1));
        assert!(s[5].quantile_us(0.99).unwrap() >= 4_000.0);
        assert_eq!(a.last_received_ns, 5_600_000);
    }

    #[test]
    fn the_series_is_bounded() {
        let mut a = Stats::new(2, 1);
        a.on_sent(Direction::Northbound, 1, u64::MAX / 2);
        assert_eq!(a.series(Direction::Northbound, 1).len(), SERIES_BUCKETS_MAX);
    }

    #[test]
    fn order_probe_counts_overtakes() {
        // Priority: urgent frames (created at 10, 11) arrive while older bulk (1..4) is still
        // being delivered.
        let mut p = OrderProbe::default();
        p.on_bulk(1);
        p.on_headline(10);
        p.on_bulk(2);
        p.on_headline(11);
        p.on_bulk(3);
        p.on_bulk(4);
        p.on_headline(12);
        assert_eq!(
            p.result(),
            OrderResult {
                headline: 3,
                overtook_bulk: 2,
                bulk: 4,
                incomplete: false
            }
        );
        // FIFO: everything in creation order, no overtakes.
        let mut f = OrderProbe::default();
        for t in 1..5 {
            f.on_bulk(t);
        }
        f.on_headline(10);
        f.on_headline(11);
        assert_eq!(f.result().overtook_bulk, 0);
    }
}

//! Service Request traffic management (ENGINE.md §5, SECMP0067): a capacity for the whole
//! southbound side, an operating threshold below it, and an allocation per Service User.
//!
//! # The rules
//!
//! * Below the operating threshold (`operating_threshold` × `capacity` requests in the last
//!   second) nobody is throttled.
//! * Once intake reaches it, a request from an SU whose allocation bucket (`sr_rate`,
//!   `sr_burst`) is empty is refused with NACK 2 ([`Admit::Throttled`]) at once. An SU within its
//!   allocation is never throttled.
//! * Whatever the load, intake never exceeds `capacity`: every accepted request takes a token
//!   from one engine-wide bucket refilled at `capacity` per second. A request that finds it empty
//!   is refused with NACK 5, overloaded ([`Admit::OverCapacity`]), not NACK 2: the SU did nothing
//!   wrong, the system is full, and PROTOCOL.md's reason 5 says "the sender may retry". For an SU
//!   within its allocation this can only happen while the allocations of the SUs sending add up
//!   to more than `capacity` (or during a burst beyond the engine bucket's 10 ms of burst), which
//!   config review should avoid; the SU's allocation token is then not taken.
//!
//! # Allocation buckets always count
//!
//! Every accepted request takes a token from its SU's bucket when there is one, below the
//! threshold too. So an SU that has been sending beyond its allocation while the system was quiet
//! has an empty bucket at the moment the threshold is crossed, and is throttled from its very
//! next request, as SECMP0067 asks ("at once"), instead of first spending a full `sr_burst`.
//!
//! # What "intake" measures
//!
//! The threshold is compared with the requests *offered* in the last second (accepted or
//! refused), not only those accepted. Measuring accepted requests would oscillate: throttling cuts
//! accepted intake below the threshold, which lifts the throttling, which lets the flood back in.
//! Offered load is the demand the threshold is meant to detect. The measure is a sliding window
//! of ten 100 ms slots plus the current one; the slot that is leaving the window is counted in
//! proportion to the part of it still inside (the usual sliding-window counter), so a steady
//! load of `r`/s reads as `r` at every instant, not in steps of 100 ms.
//!
//! # Several workers
//!
//! SUs are spread over the engine's workers, but the threshold and the capacity are about the
//! whole engine. So the two engine-wide measures live in one shared [`GlobalIntake`] (atomics
//! from [`crate::sync`], so loom can model them), and each worker owns a [`RequestThrottle`] with
//! the allocation buckets of its own SUs, which no other thread touches. A fixed split of
//! `capacity / workers` was the alternative: no shared state at all, but one busy worker could
//! then use only its share while the others idle, and the threshold would trip per worker rather
//! than for the engine.
//!
//! The capacity bucket is a GCRA (one "theoretical arrival time" word, updated by CAS, as in
//! `governor`), in units of 1/16 ns so that rates that do not divide 10⁹ keep their precision;
//! the emission interval is rounded *up*, so rounding can only make intake lower than `capacity`,
//! never higher. Per accepted request a worker does one CAS on the arrival slot and one on the
//! GCRA word; the eleven slot counters are read only for requests beyond their SU's allocation.
//! All orderings are `Relaxed`: these words are counters and a clock, no other memory is
//! published through them, and each read-modify-write is atomic on its own.

use crossbeam_utils::CachePadded;

use crate::config::ServiceRequests;
use crate::limiter::{LimiterError, TokenBucket, RATE_PER_S_MAX};
use crate::sync::{AtomicU64, Ordering};
use crate::wire::NackReason;
use crate::{Nanos, NANOS_PER_SEC};

/// Length of the sliding interval over which intake is measured, ns.
pub const INTAKE_WINDOW_NS: Nanos = NANOS_PER_SEC;
/// Slots in the interval.
const INTAKE_SLOTS: u64 = 10;
/// Length of one slot, ns.
const INTAKE_SLOT_NS: Nanos = INTAKE_WINDOW_NS / INTAKE_SLOTS;
/// Counter cells: the interval's slots plus the one leaving it.
const INTAKE_CELLS: usize = INTAKE_SLOTS as usize + 1;
const _: () = assert!(INTAKE_SLOT_NS * INTAKE_SLOTS == INTAKE_WINDOW_NS);
/// How long a burst the engine-wide capacity bucket absorbs, ns: at most `capacity` × 10 ms
/// requests above the steady rate, so that "never above capacity" holds over any second to 1 %.
pub const CAPACITY_BURST_NS: Nanos = 10_000_000;
/// GCRA time unit: 1/16 ns, so a u64 of it spans 36 years from the intake's origin.
const TICKS_PER_NS: u64 = 16;
/// Most Service Users a worker's throttle may index (the config file's limit).
pub const THROTTLE_USERS_MAX: usize = crate::config::SERVICE_USERS_MAX;
/// `operating_threshold` is kept in parts per million.
const PPM: u64 = 1_000_000;

/// A throttle setting out of range. Configuration validation reports these first, by key.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ThrottleError {
    /// `capacity` must be 1 ..= [`RATE_PER_S_MAX`].
    #[error("capacity {0}/s is out of range: give 1 to {RATE_PER_S_MAX} requests per second")]
    Capacity(u32),
    /// `operating_threshold` must be in (0, 1].
    #[error("operating threshold {0} is out of range: give a fraction greater than 0, at most 1")]
    Threshold(f64),
    /// An SU index at or above [`THROTTLE_USERS_MAX`].
    #[error("service user index {0} is out of range: at most {THROTTLE_USERS_MAX} users")]
    User(u32),
    /// An allocation the token bucket refuses.
    #[error("allocation: {0}")]
    Allocation(#[from] LimiterError),
}

/// What to do with one Service Request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Admit {
    /// Take it.
    Accept,
    /// Refuse it with NACK 2: the SU is over its allocation while intake is at the threshold.
    Throttled,
    /// Refuse it with NACK 5: the engine is at capacity.
    OverCapacity,
}

impl Admit {
    /// The NACK reason to answer with, if refused.
    pub fn nack_reason(self) -> Option<NackReason> {
        match self {
            Admit::Accept => None,
            Admit::Throttled => Some(NackReason::Throttled),
            Admit::OverCapacity => Some(NackReason::Overloaded),
        }
    }
}

/// The engine-wide measures shared by every worker's [`RequestThrottle`]: offered intake over the
/// last second, and the capacity bucket. See the module documentation.
#[derive(Debug)]
pub struct GlobalIntake {
    /// Per 100 ms slot: `(slot number as u32) << 32 | requests offered in it`.
    arrivals: CachePadded<[AtomicU64; INTAKE_CELLS]>,
    /// GCRA theoretical arrival time, ticks since `origin`.
    tat: CachePadded<AtomicU64>,
    /// Ticks per request at `capacity`, rounded up.
    interval: AtomicU64,
    /// Burst tolerance, ticks: `interval` × burst.
    tolerance: AtomicU64,
    /// `capacity` × `operating_threshold` × 1 s, requests, rounded up.
    threshold_requests: AtomicU64,
    capacity: AtomicU64,
    threshold_ppm: AtomicU64,
    origin: Nanos,
}

impl GlobalIntake {
    /// Intake measures for `capacity` requests/s with throttling from `operating_threshold` (a
    /// fraction in (0, 1]) of it, starting at `now`, with a full capacity bucket.
    pub fn new(
        capacity: u32,
        operating_threshold: f64,
        now: Nanos,
    ) -> Result<GlobalIntake, ThrottleError> {
        let intake = GlobalIntake {
            arrivals: CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))),
            tat: CachePadded::new(AtomicU64::new(0)),
            interval: AtomicU64::new(0),
            tolerance: AtomicU64::new(0),
            threshold_requests: AtomicU64::new(0),
            capacity: AtomicU64::new(0),
            threshold_ppm: AtomicU64::new(0),
            origin: now,
        };
        intake.set_capacity(capacity, operating_threshold)?;
        Ok(intake)
    }

    /// The measures for `[service_requests]`.
    pub fn from_config(
        config: &ServiceRequests,
        now: Nanos,
    ) -> Result<GlobalIntake, ThrottleError> {
        GlobalIntake::new(config.capacity, config.operating_threshold, now)
    }

    /// A reload: new capacity and threshold, effective for the next request. The measured intake
    /// and the capacity bucket's state are kept. The words are stored one by one, so a request
    /// decided concurrently may see the old interval with the new tolerance; that can shift one
    /// decision, never the long-run bound.
    pub fn set_capacity(
        &self,
        capacity: u32,
        operating_threshold: f64,
    ) -> Result<(), ThrottleError> {
        if capacity == 0 || capacity > RATE_PER_S_MAX {
            return Err(ThrottleError::Capacity(capacity));
        }
        // Written as a negated range test so that NaN is refused too.
        if !(operating_threshold > 0.0 && operating_threshold <= 1.0) {
            return Err(ThrottleError::Threshold(operating_threshold));
        }
        let ppm = ((operating_threshold * PPM as f64).round() as u64).clamp(1, PPM);
        let capacity = u64::from(capacity);
        let interval = (NANOS_PER_SEC * TICKS_PER_NS).div_ceil(capacity);
        let burst = (capacity * CAPACITY_BURST_NS / NANOS_PER_SEC).max(1);
        let threshold = (capacity * ppm).div_ceil(PPM);
        self.interval.store(interval, Ordering::Relaxed);
        self.tolerance.store(interval * burst, Ordering::Relaxed);
        self.threshold_requests.store(threshold, Ordering::Relaxed);
        self.capacity.store(capacity, Ordering::Relaxed);
        self.threshold_ppm.store(ppm, Ordering::Relaxed);
        Ok(())
    }

    /// Requests per second the engine takes at most.
    pub fn capacity(&self) -> u32 {
        // Stored from a u32.
        self.capacity.load(Ordering::Relaxed) as u32
    }

    /// Requests in the last second at which throttling starts.
    pub fn threshold_requests(&self) -> u64 {
        self.threshold_requests.load(Ordering::Relaxed)
    }

    /// Most requests the capacity bucket lets through at once.
    pub fn burst(&self) -> u64 {
        self.tolerance.load(Ordering::Relaxed) / self.interval.load(Ordering::Relaxed).max(1)
    }

    /// Counts one offered request at `now`.
    pub fn record_arrival(&self, now: Nanos) {
        let slot = now / INTAKE_SLOT_NS;
        let cell = &self.arrivals[(slot % INTAKE_CELLS as u64) as usize];
        let epoch = slot as u32;
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            let (seen, count) = ((current >> 32) as u32, current as u32);
            // A cell already holding a later slot belongs to a worker whose clock is ahead:
            // count this request there rather than wipe that slot.
            let next = if seen == epoch || (epoch.wrapping_sub(seen) as i32) < 0 {
                u64::from(seen) << 32 | u64::from(count.saturating_add(1))
            } else {
                u64::from(epoch) << 32 | 1
            };
            match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Requests offered in the second up to `now` (the sliding-window estimate).
    pub fn offered_last_second(&self, now: Nanos) -> u64 {
        let slot = now / INTAKE_SLOT_NS;
        let elapsed = now % INTAKE_SLOT_NS;
        let count_of = |s: u64| -> u64 {
            let v = self.arrivals[(s % INTAKE_CELLS as u64) as usize].load(Ordering::Relaxed);
            if (v >> 32) as u32 == s as u32 {
                v & u64::from(u32::MAX)
            } else {
                0
            }
        };
        let mut whole = 0;
        for back in 0..INTAKE_SLOTS {
            if let Some(s) = slot.checked_sub(back) {
                whole += count_of(s);
            }
        }
        // The oldest slot is partly outside the window: count the part still inside.
        let leaving = slot.checked_sub(INTAKE_SLOTS).map_or(0, |s| {
            count_of(s) * (INTAKE_SLOT_NS - elapsed) / INTAKE_SLOT_NS
        });
        whole + leaving
    }

    /// Whether offered intake has reached the operating threshold at `now`.
    pub fn at_threshold(&self, now: Nanos) -> bool {
        self.offered_last_second(now) >= self.threshold_requests()
    }

    /// Takes one request's worth of capacity at `now`, if there is one.
    #[must_use = "the request may be accepted only when this returns true"]
    pub fn try_take_capacity(&self, now: Nanos) -> bool {
        let t = now.saturating_sub(self.origin).saturating_mul(TICKS_PER_NS);
        let interval = self.interval.load(Ordering::Relaxed);
        let tolerance = self.tolerance.load(Ordering::Relaxed);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(t).saturating_add(interval);
            if next - t > tolerance {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => tat = actual,
            }
        }
    }
}

/// What a [`RequestThrottle`] has decided since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleStats {
    /// Requests seen.
    pub requests: u64,
    /// Requests accepted.
    pub accepted: u64,
    /// Of those, accepted beyond the SU's allocation because intake was below the threshold.
    pub accepted_over_allocation: u64,
    /// Refused with NACK 2.
    pub throttled: u64,
    /// Refused with NACK 5.
    pub over_capacity: u64,
    /// Requests from an SU index with no allocation (treated as an allocation of zero).
    pub unknown_su: u64,
}

/// The allocation buckets of the Service Users one worker owns. See the module documentation.
///
/// ```
/// use dsplane_core::throttle::{Admit, GlobalIntake, RequestThrottle};
/// const S: u64 = 1_000_000_000;
/// let intake = GlobalIntake::new(1_000, 0.8, 0).unwrap();
/// let mut worker = RequestThrottle::new();
/// worker.add_su(0, 10, 1, 0).unwrap(); // 10/s, burst 1
/// assert_eq!(worker.on_request(&intake, 0, 0), Admit::Accept);
/// // Over its allocation, but the engine is quiet: accepted.
/// assert_eq!(worker.on_request(&intake, 0, 1), Admit::Accept);
/// ```
#[derive(Debug, Default)]
pub struct RequestThrottle {
    /// By SU index; `None` for SUs this worker does not own.
    users: Vec<Option<TokenBucket>>,
    stats: ThrottleStats,
}

impl RequestThrottle {
    /// A throttle owning no SU yet.
    pub fn new() -> RequestThrottle {
        RequestThrottle::default()
    }

    /// Gives SU `su` (its index in the directory) an allocation of `sr_rate` requests/s with
    /// `sr_burst`, with a full bucket as of `now`. An SU already present is replaced.
    pub fn add_su(
        &mut self,
        su: u32,
        sr_rate: u32,
        sr_burst: u32,
        now: Nanos,
    ) -> Result<(), ThrottleError> {
        let at = Self::slot(su)?;
        let bucket = TokenBucket::new(sr_rate, sr_burst, now)?;
        if self.users.len() <= at {
            self.users.resize_with(at + 1, || None);
        }
        self.users[at] = Some(bucket);
        Ok(())
    }

    /// A reload of one SU's allocation: the tokens it has are kept (cut to the new burst). An SU
    /// not yet present is added.
    pub fn set_rates(
        &mut self,
        su: u32,
        sr_rate: u32,
        sr_burst: u32,
        now: Nanos,
    ) -> Result<(), ThrottleError> {
        let at = Self::slot(su)?;
        match self.users.get_mut(at).and_then(Option::as_mut) {
            Some(bucket) => Ok(bucket.set_rate(sr_rate, sr_burst, now)?),
            None => self.add_su(su, sr_rate, sr_burst, now),
        }
    }

    /// Forgets an SU (it moved to another worker, or left the configuration).
    pub fn remove_su(&mut self, su: u32) {
        if let Some(slot) = self.users.get_mut(su as usize) {
            *slot = None;
        }
    }

    /// Counters since the throttle was made.
    pub fn stats(&self) -> ThrottleStats {
        self.stats
    }

    fn slot(su: u32) -> Result<usize, ThrottleError> {
        let at = su as usize;
        if at >= THROTTLE_USERS_MAX {
            return Err(ThrottleError::User(su));
        }
        Ok(at)
    }

    /// Decides on one Service Request from SU `su` at `now`. An SU this throttle has no
    /// allocation for is treated as having an allocation of zero.
    #[must_use = "a refused request must be answered with its NACK"]
    pub fn on_request(&mut self, intake: &GlobalIntake, su: u32, now: Nanos) -> Admit {
        self.stats.requests += 1;
        intake.record_arrival(now);
        let bucket = self.users.get_mut(su as usize).and_then(Option::as_mut);
        if bucket.is_none() {
            self.stats.unknown_su += 1;
        }
        let within = match bucket {
            Some(b) => b.available(now) >= 1,
            None => false,
        };
        // The slot counters are read only for requests beyond their allocation.
        if !within && intake.at_threshold(now) {
            self.stats.throttled += 1;
            return Admit::Throttled;
        }
        if !intake.try_take_capacity(now) {
            self.stats.over_capacity += 1;
            return Admit::OverCapacity;
        }
        self.stats.accepted += 1;
        if within {
            if let Some(b) = self.users.get_mut(su as usize).and_then(Option::as_mut) {
                // Checked available just above at the same instant, so this succeeds.
                let taken = b.try_acquire(now);
                debug_assert!(taken);
            }
        } else {
            self.stats.accepted_over_allocation += 1;
        }
        Admit::Accept
    }
}

// Not under loom: these run real threads on std atomics (the loom models are tests/throttle.rs).
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const S: Nanos = NANOS_PER_SEC;
    const MS: Nanos = 1_000_000;

    #[test]
    fn below_threshold_heavy_su_is_not_throttled() {
        // Threshold 800/s. A heavy SU with 10/s sends 500 in one second, evenly.
        let intake = GlobalIntake::new(1_000, 0.8, 0).unwrap();
        let mut w = RequestThrottle::new();
        w.add_su(0, 10, 10, 0).unwrap();
        for i in 0..500 {
            assert_eq!(
                w.on_request(&intake, 0, i * 2 * MS),
                Admit::Accept,
                "request {i}"
            );
        }
        let st = w.stats();
        assert_eq!(st.accepted, 500);
        assert!(st.accepted_over_allocation >= 480, "{st:?}");
    }

    #[test]
    fn at_threshold_heavy_su_throttled_at_once_light_never() {
        // Capacity 2000/s, threshold 800 requests in the last second. Heavy: 100/s allocation,
        // offers 1000/s; light: 100/s allocation, offers 50/s.
        let intake = GlobalIntake::new(2_000, 0.4, 0).unwrap();
        assert_eq!(intake.threshold_requests(), 800);
        let mut w = RequestThrottle::new();
        w.add_su(1, 100, 10, 0).unwrap();
        w.add_su(2, 100, 10, 0).unwrap();
        let mut first_throttled = None;
        for us in (0..3_000_000u64).step_by(1_000) {
            let now = us * 1_000;
            let admit = w.on_request(&intake, 1, now);
            let offered = intake.offered_last_second(now);
            match admit {
                Admit::Throttled => {
                    assert!(offered >= 800, "throttled at {offered} offered");
                    first_throttled.get_or_insert(now);
                }
                Admit::Accept => {}
                Admit::OverCapacity => panic!("capacity reached at {now}"),
            }
            if us % 20_000 == 0 {
                assert_eq!(
                    w.on_request(&intake, 2, now),
                    Admit::Accept,
                    "light SU at {now}"
                );
            }
        }
        // Heavy's bucket was emptied while the engine was quiet, so it is throttled from the
        // first request after intake reaches 800: at about 800 / 1,050 per second.
        let t = first_throttled.unwrap();
        assert!((755 * MS..=770 * MS).contains(&t), "first throttled at {t}");
        // After that, heavy gets its allocation: 100/s for the two remaining seconds, ± burst.
        let st = w.stats();
        assert!(st.throttled > 1_700, "{st:?}");
    }

    #[test]
    fn threshold_crossing_is_exact() {
        // Threshold 50 requests: throttling starts at the 50th request in the second.
        let intake = GlobalIntake::new(100_000, 0.0005, 0).unwrap();
        assert_eq!(intake.threshold_requests(), 50);
        let mut w = RequestThrottle::new();
        w.add_su(0, 1, 1, 0).unwrap();
        let verdicts: Vec<Admit> = (0..50).map(|i| w.on_request(&intake, 0, i * MS)).collect();
        assert!(verdicts[..49].iter().all(|&a| a == Admit::Accept));
        assert_eq!(verdicts[49], Admit::Throttled);
        // The window slides: 1.5 s later the first 100 ms slot has left, and the SU has one
        // allocation token again.
        assert!(intake.offered_last_second(1_500 * MS) < 50);
        assert_eq!(w.on_request(&intake, 0, 1_500 * MS), Admit::Accept);
    }

    #[test]
    fn sliding_window_reads_a_steady_rate_steadily() {
        let intake = GlobalIntake::new(10_000, 1.0, 0).unwrap();
        // 1000/s for 5 s.
        let mut readings = Vec::new();
        for i in 0..5_000u64 {
            intake.record_arrival(i * MS);
            if i >= 1_100 && i % 37 == 0 {
                readings.push(intake.offered_last_second(i * MS));
            }
        }
        assert!(
            readings.iter().all(|&r| (999..=1_001).contains(&r)),
            "{readings:?}"
        );
        // A second of silence empties it.
        assert_eq!(intake.offered_last_second(6_100 * MS), 0);
    }

    #[test]
    fn intake_never_exceeds_capacity() {
        // Capacity 300/s (an interval that does not divide 10⁹ ns), many SUs all far over.
        let intake = GlobalIntake::new(300, 0.8, 0).unwrap();
        let mut w = RequestThrottle::new();
        for su in 0..50 {
            w.add_su(su, 50, 20, 0).unwrap();
        }
        let mut accepted_at = Vec::new();
        let mut x: u64 = 12345;
        for step in 0..200_000u64 {
            let now = step * 50_000; // 20,000 requests/s offered, 10 s
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let su = (x % 50) as u32;
            if w.on_request(&intake, su, now) == Admit::Accept {
                accepted_at.push(now);
            }
        }
        let burst = intake.burst() as usize;
        assert_eq!(burst, 3);
        // In every one-second window: at most capacity + burst.
        for (i, &t) in accepted_at.iter().enumerate() {
            let within = accepted_at[i..].partition_point(|&u| u < t + S);
            assert!(
                within <= 300 + burst,
                "{within} accepted in the second from {t}"
            );
        }
        assert!(accepted_at.len() <= 3_000 + burst);
        assert!(accepted_at.len() >= 2_990, "{}", accepted_at.len());
    }

    #[test]
    fn over_capacity_is_nack_5_and_spares_the_allocation() {
        // Allocations (2 × 100) above capacity (10): in-allocation SUs meet a full engine.
        let intake = GlobalIntake::new(10, 1.0, 0).unwrap();
        let mut w = RequestThrottle::new();
        w.add_su(0, 100, 100, 0).unwrap();
        let mut admits = Vec::new();
        for _ in 0..3 {
            admits.push(w.on_request(&intake, 0, 0));
        }
        // Burst of the engine bucket is 1 at 10/s.
        assert_eq!(
            admits,
            [Admit::Accept, Admit::OverCapacity, Admit::OverCapacity]
        );
        assert_eq!(
            Admit::OverCapacity.nack_reason(),
            Some(NackReason::Overloaded)
        );
        assert_eq!(Admit::Throttled.nack_reason(), Some(NackReason::Throttled));
        assert_eq!(Admit::Accept.nack_reason(), None);
        assert_eq!(w.users[0].as_mut().unwrap().available(0), 99);
    }

    #[test]
    fn unknown_su_has_no_allocation() {
        let intake = GlobalIntake::new(100, 0.01, 0).unwrap();
        let mut w = RequestThrottle::new();
        assert_eq!(w.on_request(&intake, 7, 0), Admit::Throttled);
        assert_eq!(w.stats().unknown_su, 1);
        assert_eq!(
            w.add_su(THROTTLE_USERS_MAX as u32, 1, 1, 0),
            Err(ThrottleError::User(THROTTLE_USERS_MAX as u32))
        );
        assert_eq!(
            w.add_su(0, 0, 1, 0),
            Err(ThrottleError::Allocation(LimiterError::Rate(0)))
        );
    }

    #[test]
    fn reload_keeps_state() {
        let intake = GlobalIntake::new(1_000, 0.5, 0).unwrap();
        let mut w = RequestThrottle::new();
        w.add_su(0, 10, 10, 0).unwrap();
        for i in 0..600 {
            let _ = w.on_request(&intake, 0, i * MS);
        }
        assert!(intake.at_threshold(600 * MS));
        // Raising the threshold lifts throttling at once; the measured intake is kept.
        intake.set_capacity(1_000, 0.9).unwrap();
        assert!(!intake.at_threshold(600 * MS));
        assert_eq!(intake.offered_last_second(600 * MS), 600);
        // A new allocation keeps the bucket's level (0.99 of a token, 99 ms after the last was
        // taken at 10/s) and earns at the new rate from there.
        w.set_rates(0, 1_000, 10, 599 * MS).unwrap();
        let bucket = w.users[0].as_mut().unwrap();
        assert_eq!(bucket.available(599 * MS), 0);
        assert_eq!(bucket.available(599 * MS + 10_000), 1);
        assert!(intake.set_capacity(0, 0.5).is_err());
        assert!(intake.set_capacity(1, f64::NAN).is_err());
        assert!(intake.set_capacity(1, 0.0).is_err());
        assert_eq!(intake.capacity(), 1_000, "a refused reload changes nothing");
        // A removed SU has no allocation: throttled once intake is at the threshold.
        w.remove_su(0);
        intake.set_capacity(1_000, 0.5).unwrap();
        assert_eq!(w.on_request(&intake, 0, 601 * MS), Admit::Throttled);
        assert_eq!(w.stats().unknown_su, 1);
    }

    #[test]
    fn workers_share_one_capacity() {
        // Four workers, each with its own SUs, one intake: 100/s in all.
        let intake = GlobalIntake::new(100, 0.8, 0).unwrap();
        let mut workers: Vec<RequestThrottle> = (0..4).map(|_| RequestThrottle::new()).collect();
        for (i, w) in workers.iter_mut().enumerate() {
            w.add_su(i as u32, 1_000, 1_000, 0).unwrap();
        }
        let mut accepted = 0;
        for step in 0..10_000u64 {
            let now = step * MS;
            let w = (step % 4) as usize;
            if workers[w].on_request(&intake, w as u32, now) == Admit::Accept {
                accepted += 1;
            }
        }
        // 10 s at 100/s plus the burst of 1.
        assert!((999..=1_001).contains(&accepted), "{accepted}");
    }

    #[test]
    fn threads_never_exceed_capacity_together() {
        let intake = std::sync::Arc::new(GlobalIntake::new(1_000, 0.8, 0).unwrap());
        let handles: Vec<_> = (0..4u32)
            .map(|i| {
                let intake = intake.clone();
                std::thread::spawn(move || {
                    let mut w = RequestThrottle::new();
                    w.add_su(i, 1_000, 1_000, 0).unwrap();
                    let mut accepted = 0u64;
                    for step in 0..50_000u64 {
                        if w.on_request(&intake, i, step * 40_000) == Admit::Accept {
                            accepted += 1;
                        }
                    }
                    accepted
                })
            })
            .collect();
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        // The clocks span 2 s: at most 2,000 + burst 10, whatever the interleaving.
        assert!(total <= 2_010, "{total}");
        assert!(total >= 1_000, "{total}");
    }
}

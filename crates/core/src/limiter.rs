//! The token bucket of one Service User (or CSP link), with the release ramp of ENGINE.md §3.
//!
//! # Model
//!
//! A bucket holds up to `burst` tokens and gains `rate` tokens per second; sending a frame costs one.
//! Time is an argument (`now`, in [`Nanos`] from any monotonic origin): the limiter never reads
//! a clock, so tests can ask what it does at exact instants.
//!
//! # Integer arithmetic
//!
//! The level is kept in **nano-tokens** (1 token = 10⁹), so that `rate` tokens per second is
//! exactly `rate` nano-tokens per nanosecond: a refill is one multiplication, with no rounding at
//! all at a steady rate and no floating point on the message path. The largest level,
//! [`BURST_MAX`] × 10⁹ = 10¹⁵, fits easily in a `u64`; products are taken in `u128`.
//!
//! # The release ramp
//!
//! After an outage (ENGINE.md §3), the rate climbs linearly from `release_start` × `rate` to
//! `rate` over `release_ramp`, so that a Service User's adapter is not hit by its whole backlog at
//! once. Tokens earned during the ramp are the exact integral of that rate,
//!
//! ```text
//! F(t) = rate · t · (2·s·D + (1 − s)·t) / (2·D)      for 0 ≤ t ≤ D (s = start share, D = ramp)
//! ```
//!
//! evaluated in integers (with `s` in parts per million) from the start of the ramp each time, so
//! rounding never accumulates: by the end of the ramp the bucket has earned exactly `F(D)`, however
//! often it was asked. At the start of a ramp the level is cut to `release_start` × `burst`, since
//! a full bucket would otherwise let `burst` frames out at once, which is the burst the ramp exists
//! to prevent.
//!
//! # Why not `governor`
//!
//! governor's GCRA keeps one `u64` and is excellent for a shared, lock-free limiter. Ours is owned
//! by one thread (each SU is owned by one core, ENGINE.md §6), needs a rate that changes over time
//! (the ramp) and must report when the next token comes (to arm the event loop's timer). A plain
//! bucket in nano-tokens does all three with no atomics; the benchmarks compare the two.

use crate::{Nanos, NANOS_PER_SEC};

/// Highest rate a limiter accepts, tokens per second.
pub const RATE_PER_S_MAX: u32 = 10_000_000;
/// Largest burst a limiter accepts, tokens.
pub const BURST_MAX: u32 = 1_000_000;
/// Longest release ramp, nanoseconds: one hour.
pub const RELEASE_RAMP_NS_MAX: Nanos = 3_600 * NANOS_PER_SEC;

/// The least time worth waiting for between two wake-ups of a rate-limited peer. A wake-up costs
/// a worker some 25 µs of CPU on the development VM (the timer, `epoll_wait`, a turn, a write:
/// 26 % of a core at 10 k wake-ups/s), so a peer is woken for as many tokens as 250 µs earns
/// (2 at 10 k/s, 25 at 100 k/s), not for each one, unless the burst is too small for that
/// ([`WAKE_BURST_DIVISOR`]). It is also the most a frame can wait beyond its token for it (an
/// urgent one included): far below what a Service User notices, and below the millisecond
/// the worker used to sleep in.
pub const WAKE_NS_MIN: Nanos = 250_000;
/// A wake-up waits for at most `burst / WAKE_BURST_DIVISOR` tokens, so that it comes while the
/// bucket still has room for three times as many: a wake-up late by up to
/// `3 × burst / 4` token intervals (75 µs at 1 M/s with burst 100) loses no token.
pub const WAKE_BURST_DIVISOR: u32 = 4;

// A wake-up is worth more than a spin: the worker's spin limit stays below the gap.
const _: () = assert!(crate::limits::SPIN_NS_MAX < WAKE_NS_MIN);

/// Parts per million in a whole.
const PPM: u64 = 1_000_000;
/// Nano-tokens in one token.
const NANO: u64 = NANOS_PER_SEC;

// The largest level must fit a u64 with room for one more second of the highest rate.
const _: () = assert!(
    (BURST_MAX as u128) * (NANO as u128) + (RATE_PER_S_MAX as u128) * (NANO as u128)
        < u64::MAX as u128
);

/// A limiter setting out of range. Configuration validation reports these with the key's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimiterError {
    /// `rate` must be 1 ..= [`RATE_PER_S_MAX`].
    #[error("rate {0}/s is out of range: give 1 to {RATE_PER_S_MAX} messages per second")]
    Rate(u32),
    /// `burst` must be 1 ..= [`BURST_MAX`].
    #[error("burst {0} is out of range: give 1 to {BURST_MAX} messages")]
    Burst(u32),
    /// The release ramp must be at most [`RELEASE_RAMP_NS_MAX`].
    #[error("release ramp of {0} ns is longer than the one-hour maximum")]
    Ramp(Nanos),
}

/// The share of the full rate a release ramp starts from, in parts per million (0 < share ≤ 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReleaseStart(u32);

impl ReleaseStart {
    /// No ramp: the full rate at once.
    pub const FULL: ReleaseStart = ReleaseStart(1_000_000);
    /// ENGINE.md's default, 10 % of the rate.
    pub const DEFAULT: ReleaseStart = ReleaseStart(100_000);

    /// A share in parts per million, if it is in 1 ..= 1,000,000.
    pub const fn from_ppm(ppm: u32) -> Option<ReleaseStart> {
        if ppm == 0 || ppm as u64 > PPM {
            None
        } else {
            Some(ReleaseStart(ppm))
        }
    }

    /// A share as a fraction (the config file's `release_start`), if it is in (0, 1]; rounded to
    /// the nearest part per million, and never to zero.
    pub fn from_fraction(share: f64) -> Option<ReleaseStart> {
        if !(share > 0.0 && share <= 1.0) {
            return None;
        }
        // In range, so the cast cannot saturate; at least 1 ppm, so a tiny share still ramps.
        let ppm = (share * PPM as f64).round().max(1.0) as u32;
        ReleaseStart::from_ppm(ppm)
    }

    /// The share in parts per million.
    pub const fn ppm(self) -> u32 {
        self.0
    }
}

impl Default for ReleaseStart {
    fn default() -> Self {
        ReleaseStart::DEFAULT
    }
}

/// A ramp in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ramp {
    /// When it started.
    start: Nanos,
    /// Its length, > 0.
    length: Nanos,
    /// Starting share, ppm, < 1,000,000.
    start_ppm: u64,
    /// Nano-tokens the ramp has credited so far: F(last refill − start).
    credited: u128,
}

/// A token bucket with explicit time. See the module documentation.
///
/// ```
/// use dsplane_core::limiter::TokenBucket;
/// const S: u64 = 1_000_000_000;
/// let mut bucket = TokenBucket::new(10, 2, 0).unwrap(); // 10/s, burst 2, starts full
/// assert!(bucket.try_acquire(0));
/// assert!(bucket.try_acquire(0));
/// assert!(!bucket.try_acquire(0));
/// assert_eq!(bucket.next_ready(0), S / 10); // one token every 100 ms
/// assert!(bucket.try_acquire(S / 10));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate: u32,
    burst: u32,
    /// Current level, nano-tokens, ≤ `burst` × 10⁹.
    level: u64,
    /// Time of the last refill.
    last: Nanos,
    ramp: Option<Ramp>,
}

impl TokenBucket {
    /// Checks a rate and burst without building a bucket (for configuration validation).
    pub fn validate(rate: u32, burst: u32) -> Result<(), LimiterError> {
        if rate == 0 || rate > RATE_PER_S_MAX {
            return Err(LimiterError::Rate(rate));
        }
        if burst == 0 || burst > BURST_MAX {
            return Err(LimiterError::Burst(burst));
        }
        Ok(())
    }

    /// Checks a release ramp's length.
    pub fn validate_release_ramp(ramp: Nanos) -> Result<(), LimiterError> {
        if ramp > RELEASE_RAMP_NS_MAX {
            return Err(LimiterError::Ramp(ramp));
        }
        Ok(())
    }

    /// A full bucket of `burst` tokens gaining `rate` per second, as of `now`.
    pub fn new(rate: u32, burst: u32, now: Nanos) -> Result<TokenBucket, LimiterError> {
        Self::validate(rate, burst)?;
        Ok(TokenBucket {
            rate,
            burst,
            level: u64::from(burst) * NANO,
            last: now,
            ramp: None,
        })
    }

    /// Tokens per second at full rate.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Largest number of tokens held.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    fn capacity(&self) -> u64 {
        u64::from(self.burst) * NANO
    }

    /// Nano-tokens earned by the ramp from its start to `t` ns into it (`t` ≤ length): the
    /// integral F(t) of the module documentation, floored, in exact integer arithmetic.
    fn ramp_credit(rate: u32, ramp: &Ramp, t: Nanos) -> u128 {
        let t = u128::from(t.min(ramp.length));
        let d = u128::from(ramp.length);
        let s = u128::from(ramp.start_ppm);
        let whole = u128::from(PPM);
        // F(t) = x · inner / denom with x = rate·t, inner = 2·s·D + (1 − s)·t, denom = 2·D·10⁶.
        // inner ≤ denom for t ≤ D, so splitting x by denom keeps every product in range:
        // x < 2⁶⁶ and inner, denom < 2⁶³.
        let x = u128::from(rate) * t;
        let inner = 2 * s * d + (whole - s) * t;
        let denom = 2 * d * whole;
        (x / denom) * inner + (x % denom) * inner / denom
    }

    /// Brings the level up to `now`. Time that runs backwards counts as no time.
    ///
    /// Inlined for its first test: a peer sends a run of frames at one `now`, and only the
    /// first of them has anything to add.
    #[inline]
    fn refill(&mut self, now: Nanos) {
        if now > self.last {
            self.refill_since_last(now);
        }
    }

    /// [`Self::refill`] once time has moved on.
    fn refill_since_last(&mut self, now: Nanos) {
        let capacity = self.capacity();
        let mut earned: u128 = 0;
        let mut steady_from = self.last;
        if let Some(ramp) = self.ramp.as_mut() {
            let end = ramp.start + ramp.length;
            let upto = now.min(end);
            let total = Self::ramp_credit(self.rate, ramp, upto - ramp.start);
            earned = total - ramp.credited;
            ramp.credited = total;
            steady_from = end.max(self.last);
            if now >= end {
                self.ramp = None;
            }
        }
        if now > steady_from && self.ramp.is_none() {
            earned += u128::from(self.rate) * u128::from(now - steady_from);
        }
        let level = u128::from(self.level) + earned;
        // Bounded by capacity, so the cast back is exact.
        self.level = level.min(u128::from(capacity)) as u64;
        self.last = now;
    }

    /// Takes one token if there is one.
    #[must_use = "a frame may be sent only when this returns true"]
    #[inline]
    pub fn try_acquire(&mut self, now: Nanos) -> bool {
        self.try_acquire_n(1, now)
    }

    /// Takes `n` tokens if there are that many (and none otherwise).
    #[must_use = "the frames may be sent only when this returns true"]
    #[inline]
    pub fn try_acquire_n(&mut self, n: u32, now: Nanos) -> bool {
        self.refill(now);
        let cost = u64::from(n) * NANO;
        if self.level >= cost {
            self.level -= cost;
            true
        } else {
            false
        }
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Nanos) -> u32 {
        self.refill(now);
        // level ≤ burst × 10⁹, so the quotient fits a u32.
        (self.level / NANO) as u32
    }

    /// The first instant (≥ `now`) at which one token is available.
    pub fn next_ready(&mut self, now: Nanos) -> Nanos {
        self.next_ready_n(1, now)
    }

    /// The first instant (≥ `now`) at which `n` tokens are available (`n` is cut to `burst`,
    /// the most the bucket holds).
    pub fn next_ready_n(&mut self, n: u32, now: Nanos) -> Nanos {
        self.refill(now);
        // The bucket is as of its last refill: a `now` before it (a caller's instant read before
        // another's, within one turn) asks from there, so that the ramp's credit below is never
        // taken before the instant it was last credited to (it would run backwards).
        let now = now.max(self.last);
        let want = u64::from(n.clamp(1, self.burst)) * NANO;
        if self.level >= want {
            return now;
        }
        let needed = u128::from(want - self.level);
        let Some(ramp) = self.ramp else {
            // ceil(needed / rate) ns at the steady rate.
            let wait = needed.div_ceil(u128::from(self.rate));
            return now.saturating_add(wait as u64);
        };
        // During the ramp the rate only grows, so the wait at the current rate is an upper
        // bound; find the exact instant by bisection over the ramp's exact credit.
        let earned_by = |t: Nanos| -> u128 {
            let end = ramp.start + ramp.length;
            if t <= end {
                Self::ramp_credit(self.rate, &ramp, t - ramp.start) - ramp.credited
            } else {
                Self::ramp_credit(self.rate, &ramp, ramp.length) - ramp.credited
                    + u128::from(self.rate) * u128::from(t - end)
            }
        };
        let rate_now = self.effective_rate_ppm(now).max(1);
        // needed nano-tokens at rate_now/10⁶ tokens/s = needed·10⁶/rate_now ns.
        let bound = (needed * u128::from(PPM)).div_ceil(u128::from(rate_now)) as u64;
        let (mut lo, mut hi) = (now, now.saturating_add(bound.max(1)));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if earned_by(mid) >= needed {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        hi
    }

    /// How many tokens a wake-up for this bucket should wait for at `now`: as many as
    /// [`WAKE_NS_MIN`] earns at the current rate (at least one), so that a fast peer does not
    /// cost a wake-up per token, but never more than a quarter of the burst, so that the
    /// wake-up comes well before the bucket is full and no token is lost to a late one.
    pub fn wake_tokens(&self, now: Nanos) -> u32 {
        // rate_ppm / 10⁶ tokens per s × WAKE_NS_MIN / 10⁹ s.
        let earned = u128::from(self.effective_rate_ppm(now)) * u128::from(WAKE_NS_MIN)
            / (u128::from(PPM) * u128::from(NANO));
        let quarter = u128::from(self.burst / WAKE_BURST_DIVISOR);
        // At most burst / 4 ≤ BURST_MAX, so the cast is exact.
        earned.min(quarter).max(1) as u32
    }

    /// When to wake up for this bucket, once it has no token at `now`: the instant
    /// [`TokenBucket::wake_tokens`] tokens are available. What the event loop arms its timer
    /// with.
    pub fn next_wake(&mut self, now: Nanos) -> Nanos {
        self.refill(now);
        let n = self.wake_tokens(now);
        self.next_ready_n(n, now)
    }

    /// Changes rate and burst (a reload) and keeps the state: tokens earned so far are kept (cut
    /// to the new burst), and a ramp in progress carries on towards the new rate.
    pub fn set_rate(&mut self, rate: u32, burst: u32, now: Nanos) -> Result<(), LimiterError> {
        Self::validate(rate, burst)?;
        self.refill(now);
        if let Some(ramp) = self.ramp.as_mut() {
            // Restart the ramp's credit accounting at `now` under the new rate, keeping its
            // progress: the share reached so far becomes the new starting share.
            let elapsed = now.saturating_sub(ramp.start).min(ramp.length);
            let reached = ramp.start_ppm + (PPM - ramp.start_ppm) * elapsed / ramp.length;
            let remaining = ramp.length - elapsed;
            if remaining == 0 || reached >= PPM {
                self.ramp = None;
            } else {
                *ramp = Ramp {
                    start: now,
                    length: remaining,
                    start_ppm: reached.max(1),
                    credited: 0,
                };
            }
        }
        self.rate = rate;
        self.burst = burst;
        self.level = self.level.min(self.capacity());
        Ok(())
    }

    /// Starts a release ramp at `now` (ENGINE.md §3): the rate climbs from `start` × rate to the
    /// full rate over `ramp`, and the level is cut to `start` × burst. `start` = full or a zero
    /// `ramp` means no ramp (any ramp in progress ends).
    pub fn start_release(
        &mut self,
        now: Nanos,
        start: ReleaseStart,
        ramp: Nanos,
    ) -> Result<(), LimiterError> {
        Self::validate_release_ramp(ramp)?;
        self.refill(now);
        let start_ppm = u64::from(start.ppm());
        if start_ppm >= PPM || ramp == 0 {
            self.ramp = None;
            return Ok(());
        }
        let cut = u128::from(self.capacity()) * u128::from(start_ppm) / u128::from(PPM);
        self.level = self.level.min(cut as u64);
        self.ramp = Some(Ramp {
            start: now,
            length: ramp,
            start_ppm,
            credited: 0,
        });
        Ok(())
    }

    /// Whether a release ramp is still in progress at `now`.
    pub fn is_ramping(&self, now: Nanos) -> bool {
        self.ramp.is_some_and(|r| now < r.start + r.length)
    }

    /// The rate at `now`, in millionths of a token per second (so that a ramp's fractional
    /// rates are exact): `rate` × 10⁶ outside a ramp.
    pub fn effective_rate_ppm(&self, now: Nanos) -> u64 {
        let full = u64::from(self.rate) * PPM;
        match self.ramp {
            Some(r) if now < r.start + r.length => {
                let t = u128::from(now.saturating_sub(r.start));
                let share = u128::from(r.start_ppm) * u128::from(r.length)
                    + (u128::from(PPM) - u128::from(r.start_ppm)) * t;
                // rate · share / length, share ≤ 10⁶ · length.
                (u128::from(self.rate) * share / u128::from(r.length)) as u64
            }
            _ => full,
        }
    }

    /// The rate at `now` in whole tokens per second (rounded down), for logs and metrics.
    pub fn effective_rate(&self, now: Nanos) -> u32 {
        (self.effective_rate_ppm(now) / PPM) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = NANOS_PER_SEC;
    const MS: Nanos = 1_000_000;

    fn drain(bucket: &mut TokenBucket, now: Nanos) -> u32 {
        let mut n = 0;
        while bucket.try_acquire(now) {
            n += 1;
        }
        n
    }

    #[test]
    fn starts_full_and_empties_at_burst() {
        let mut b = TokenBucket::new(100, 5, 0).unwrap();
        assert_eq!(b.available(0), 5);
        assert_eq!(drain(&mut b, 0), 5);
        assert_eq!(b.available(0), 0);
    }

    #[test]
    fn a_wake_asked_for_an_instant_before_the_last_refill_during_a_ramp_is_not_earlier_than_it() {
        // A release started, and the bucket refilled, at 10 ms; a pump then asks with an
        // instant read a little earlier in the same turn.
        let mut b = TokenBucket::new(1000, 100, 0).unwrap();
        let start = ReleaseStart::from_fraction(0.1).unwrap();
        b.start_release(10 * MS, start, 1_000 * MS).unwrap();
        while b.try_acquire(10 * MS) {}
        let at = b.next_wake(9 * MS);
        assert!(at > 10 * MS, "{at}");
        assert_eq!(b.next_ready_n(1, 9 * MS), b.next_ready_n(1, 10 * MS));
    }

    #[test]
    fn refills_at_exact_rate() {
        let mut b = TokenBucket::new(1000, 1, 0).unwrap();
        assert!(b.try_acquire(0));
        assert!(
            !b.try_acquire(MS - 1),
            "one token takes exactly 1 ms at 1000/s"
        );
        assert!(b.try_acquire(MS));
        assert!(!b.try_acquire(MS));
        assert_eq!(b.next_ready(MS), 2 * MS);
    }

    #[test]
    fn fractional_intervals_accumulate_without_loss() {
        // 3/s: one token every 333,333,333.3 ns; three in exactly one second.
        // Burst 2, so that polling a little late never overflows the bucket and loses a fraction.
        let mut b = TokenBucket::new(3, 2, 0).unwrap();
        assert_eq!(drain(&mut b, 0), 2);
        let mut sent = 0;
        for ms in 1..=1000 {
            if b.try_acquire(ms * MS) {
                sent += 1;
            }
        }
        assert_eq!(sent, 3);
        assert_eq!(b.next_ready(S), S + 333_333_334);
    }

    #[test]
    fn never_exceeds_burst_after_idle() {
        let mut b = TokenBucket::new(1_000, 10, 0).unwrap();
        assert_eq!(drain(&mut b, 0), 10);
        assert_eq!(b.available(3_600 * S), 10);
    }

    #[test]
    fn long_run_matches_rate() {
        let mut b = TokenBucket::new(250, 1, 0).unwrap();
        let mut sent = 0u32;
        let mut now = 0;
        while now <= 10 * S {
            if b.try_acquire(now) {
                sent += 1;
            }
            now += 100_000;
        }
        // 1 initial token + 250/s for 10 s.
        assert_eq!(sent, 1 + 2_500);
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let mut b = TokenBucket::new(10, 1, S).unwrap();
        assert!(b.try_acquire(S));
        assert!(!b.try_acquire(0));
        assert!(!b.try_acquire(S + S / 10 - 1));
        assert!(b.try_acquire(S + S / 10));
    }

    #[test]
    fn acquire_n_is_all_or_nothing() {
        let mut b = TokenBucket::new(10, 5, 0).unwrap();
        assert!(!b.try_acquire_n(6, 0));
        assert_eq!(b.available(0), 5);
        assert!(b.try_acquire_n(5, 0));
        assert_eq!(b.available(0), 0);
    }

    #[test]
    fn limits_are_checked_at_their_edges() {
        assert!(TokenBucket::new(1, 1, 0).is_ok());
        assert!(TokenBucket::new(RATE_PER_S_MAX, BURST_MAX, 0).is_ok());
        assert_eq!(TokenBucket::new(0, 1, 0), Err(LimiterError::Rate(0)));
        assert_eq!(
            TokenBucket::new(RATE_PER_S_MAX + 1, 1, 0),
            Err(LimiterError::Rate(RATE_PER_S_MAX + 1))
        );
        assert_eq!(TokenBucket::new(1, 0, 0), Err(LimiterError::Burst(0)));
        assert_eq!(
            TokenBucket::new(1, BURST_MAX + 1, 0),
            Err(LimiterError::Burst(BURST_MAX + 1))
        );
        let mut b = TokenBucket::new(1, 1, 0).unwrap();
        assert!(b
            .start_release(0, ReleaseStart::DEFAULT, RELEASE_RAMP_NS_MAX)
            .is_ok());
        assert_eq!(
            b.start_release(0, ReleaseStart::DEFAULT, RELEASE_RAMP_NS_MAX + 1),
            Err(LimiterError::Ramp(RELEASE_RAMP_NS_MAX + 1))
        );
    }

    #[test]
    fn extreme_settings_do_not_overflow() {
        let mut b = TokenBucket::new(RATE_PER_S_MAX, BURST_MAX, 0).unwrap();
        assert!(b.try_acquire_n(BURST_MAX, 0));
        b.start_release(0, ReleaseStart::from_ppm(1).unwrap(), RELEASE_RAMP_NS_MAX)
            .unwrap();
        let half = b.available(RELEASE_RAMP_NS_MAX / 2);
        assert_eq!(half, BURST_MAX);
        assert_eq!(b.available(u64::MAX), BURST_MAX);
        assert!(!b.is_ramping(u64::MAX));
    }

    #[test]
    fn release_start_parsing() {
        assert_eq!(
            ReleaseStart::from_fraction(0.1),
            Some(ReleaseStart::DEFAULT)
        );
        assert_eq!(ReleaseStart::from_fraction(1.0), Some(ReleaseStart::FULL));
        assert_eq!(
            ReleaseStart::from_fraction(1e-9).map(ReleaseStart::ppm),
            Some(1)
        );
        assert_eq!(ReleaseStart::from_fraction(0.0), None);
        assert_eq!(ReleaseStart::from_fraction(-0.5), None);
        assert_eq!(ReleaseStart::from_fraction(1.000_001), None);
        assert_eq!(ReleaseStart::from_fraction(f64::NAN), None);
        assert_eq!(ReleaseStart::from_ppm(0), None);
        assert_eq!(ReleaseStart::from_ppm(1_000_001), None);
    }

    /// 100/s, ramp from 10 % over 10 s: the rate goes 10/s → 100/s linearly, so the ramp earns
    /// F(10 s) = 100 · 10 · (0.1 + 0.9/2) = 550 tokens, and F(5 s) = 100 · 5 · (0.1 + 0.9·0.25)
    /// = 162.5 tokens.
    #[test]
    fn ramp_earns_the_exact_integral() {
        let mut b = TokenBucket::new(100, 1_000, 0).unwrap();
        assert!(b.try_acquire_n(1_000, 0));
        b.start_release(0, ReleaseStart::DEFAULT, 10 * S).unwrap();
        assert!(b.is_ramping(0));
        assert_eq!(b.effective_rate(0), 10);
        assert_eq!(b.available(5 * S), 162);
        assert_eq!(b.effective_rate(5 * S), 55);
        // Asking in many small steps earns exactly the same as asking once.
        let mut stepped = TokenBucket::new(100, 1_000, 0).unwrap();
        assert!(stepped.try_acquire_n(1_000, 0));
        stepped
            .start_release(0, ReleaseStart::DEFAULT, 10 * S)
            .unwrap();
        for ms in 1..10_000 {
            let _ = stepped.available(ms * MS);
        }
        assert_eq!(stepped.available(10 * S), 550);
        assert_eq!(b.available(10 * S), 550);
        assert!(!b.is_ramping(10 * S));
        assert_eq!(b.effective_rate(10 * S), 100);
        // After the ramp, the full rate.
        assert_eq!(b.available(11 * S), 650);
    }

    #[test]
    fn ramp_sends_slowly_at_first() {
        // 1000/s, burst 100, ramp from 10 % over 30 s (the defaults).
        let mut b = TokenBucket::new(1_000, 100, 0).unwrap();
        b.start_release(0, ReleaseStart::DEFAULT, 30 * S).unwrap();
        // The bucket is cut to 10 % of burst.
        assert_eq!(drain(&mut b, 0), 10);
        // First second: ∫ 100 + 30t dt over [0, 1] = 115 tokens.
        let mut first_second = 0;
        for us in 1..=1_000_000u64 {
            if us % 100 == 0 && b.try_acquire(us * 1_000) {
                first_second += 1;
            }
        }
        assert_eq!(first_second, 115);
    }

    #[test]
    fn next_ready_during_ramp_is_exact() {
        let mut b = TokenBucket::new(100, 1, 0).unwrap();
        assert!(b.try_acquire(0));
        b.start_release(0, ReleaseStart::DEFAULT, 10 * S).unwrap();
        let t = b.next_ready(0);
        // F(t) = 1 token: 10t + 4.5t² = 1 → t ≈ 0.09586 s.
        assert!(!b.clone().try_acquire(t - 1));
        assert!(b.clone().try_acquire(t));
        assert!((95_800_000..95_900_000).contains(&t), "{t}");
    }

    #[test]
    fn full_start_or_zero_ramp_means_no_ramp() {
        let mut b = TokenBucket::new(100, 10, 0).unwrap();
        b.start_release(0, ReleaseStart::FULL, 10 * S).unwrap();
        assert!(!b.is_ramping(0));
        assert_eq!(b.available(0), 10);
        b.start_release(0, ReleaseStart::DEFAULT, 0).unwrap();
        assert!(!b.is_ramping(0));
        assert_eq!(b.available(0), 10);
    }

    #[test]
    fn set_rate_keeps_tokens_and_ramp_progress() {
        let mut b = TokenBucket::new(100, 50, 0).unwrap();
        assert_eq!(drain(&mut b, 0), 50);
        assert_eq!(b.available(S / 10), 10);
        // A reload halves the rate: the 10 tokens earned are kept, the state is not reset.
        b.set_rate(50, 50, S / 10).unwrap();
        assert_eq!(b.available(S / 10), 10);
        assert_eq!(b.available(S / 10 + S / 5), 20);
        // A smaller burst cuts the level.
        b.set_rate(50, 5, S).unwrap();
        assert_eq!(b.available(S), 5);
        assert!(b.set_rate(0, 5, S).is_err());
        assert_eq!(b.rate(), 50, "a refused change leaves the bucket as it was");

        let mut r = TokenBucket::new(100, 1_000, 0).unwrap();
        assert!(r.try_acquire_n(1_000, 0));
        r.start_release(0, ReleaseStart::DEFAULT, 10 * S).unwrap();
        r.set_rate(100, 1_000, 5 * S).unwrap();
        // Halfway, the ramp has reached 55 % and carries on from there.
        assert!(r.is_ramping(5 * S));
        assert_eq!(r.effective_rate(5 * S), 55);
        assert_eq!(r.available(10 * S), 550);
        assert!(!r.is_ramping(10 * S));
    }

    #[test]
    fn next_ready_when_available_is_now() {
        let mut b = TokenBucket::new(1, 1, 7).unwrap();
        assert_eq!(b.next_ready(7), 7);
        assert!(b.try_acquire(7));
        assert_eq!(b.next_ready(7), 7 + S);
    }

    #[test]
    fn next_ready_n_waits_for_n_tokens_and_at_most_a_burst() {
        // 1 M/s: a token per µs.
        let mut b = TokenBucket::new(1_000_000, 100, 0).unwrap();
        assert_eq!(drain(&mut b, 0), 100);
        assert_eq!(b.next_ready_n(25, 0), 25_000);
        assert_eq!(b.next_ready_n(1, 0), b.next_ready(0));
        // More than the bucket holds means a full bucket, not never.
        assert_eq!(b.next_ready_n(1_000, 0), 100_000);
        assert_eq!(b.available(25_000), 25);
    }

    #[test]
    fn a_wake_waits_for_a_few_tokens_at_high_rates_and_one_at_low_rates() {
        // 1 k/s: a token per ms, more than WAKE_NS_MIN: wake for each.
        let b = TokenBucket::new(1_000, 100, 0).unwrap();
        assert_eq!(b.wake_tokens(0), 1);
        // 10 k/s: WAKE_NS_MIN earns 2.5.
        let b = TokenBucket::new(10_000, 100, 0).unwrap();
        assert_eq!(b.wake_tokens(0), 2);
        // 100 k/s: 25.
        let b = TokenBucket::new(100_000, 1_000, 0).unwrap();
        assert_eq!(b.wake_tokens(0), 25);
        // 1 M/s: 250 would be earned, but a quarter of the burst is the most.
        let mut b = TokenBucket::new(1_000_000, 100, 0).unwrap();
        assert_eq!(b.wake_tokens(0), 25);
        assert_eq!(drain(&mut b, 0), 100);
        assert_eq!(b.next_wake(0), 25_000);
        // A wake at that instant finds what it waited for, and the bucket far from full.
        assert_eq!(drain(&mut b, 25_000), 25);
        // Burst 1: never more than one token.
        let b = TokenBucket::new(1_000_000, 1, 0).unwrap();
        assert_eq!(b.wake_tokens(0), 1);
    }

    #[test]
    fn a_wake_during_a_ramp_follows_the_ramped_rate() {
        const US: Nanos = 1_000;
        // 1 M/s from 10 %: at the start, 100 k/s, so WAKE_NS_MIN earns 25 tokens (250 at the
        // full rate).
        let mut b = TokenBucket::new(1_000_000, 1_000, 0).unwrap();
        b.start_release(0, ReleaseStart::DEFAULT, S).unwrap();
        let _ = drain(&mut b, 0);
        assert_eq!(b.wake_tokens(0), 25);
        let at = b.next_wake(0);
        // The exact instant: 25 tokens then, fewer a microsecond before.
        assert_eq!(b.clone().available(at), 25);
        assert!(b.clone().available(at - US) < 25);
    }
}

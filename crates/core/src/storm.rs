//! Alert Storm Protection (ENGINE.md §4, SECMP0062): too many alerts of one kind from one device
//! are counted instead of delivered, and the count reaches the Service User as one summary when
//! the window closes.
//!
//! # The rule
//!
//! A key is (`su`, `device`, `alert code`). Its first alert opens a window of `window` ns. The
//! first `threshold` alerts of the key in the window are delivered ([`Verdict::Deliver`]); every
//! further alert in it is counted and not delivered ([`Verdict::Throttled`]). When the window
//! closes, driven by time through [`StormDetector::poll_summaries`] and not by the next alert, a
//! window that throttled anything yields one [`StormSummary`] whose `count` is the number of
//! alerts it stands for, so a device that goes quiet still has its count delivered. Codes on the
//! exclusion list are always delivered and never tracked.
//!
//! Each window counts from zero. A key that keeps storming gets a new window at its first alert
//! after the old one closed, delivers `threshold` alerts again and is throttled again: at most
//! `threshold` alerts plus one summary per key per window reach the SU. The alternative, keeping
//! a key throttled from the first alert of the next window while it stormed in the previous one,
//! cuts a little more traffic, but then a long storm shows the SU no alert at all, only counts,
//! and it needs per-key state that outlives the window (so idle keys could not be dropped at
//! close). SECMP0062 describes the simple rule: over the threshold the excess is discarded and
//! one copy per period is forwarded.
//!
//! The SU is part of the key because the same device alert is addressed to each of its Known
//! Remote Parties (an ESME's 0x8F75 goes to its Supplier and to its Network Operator): counting
//! both copies under one key would halve each recipient's threshold and leave the summary
//! without a recipient. Pass `su = 0` for pure (`device`, `code`) counting.
//!
//! # Bounded state: a FIFO of windows and an index
//!
//! Every tracked key has exactly one open window, and every window of the detector has the same
//! length. Windows therefore close in the order they opened, so the per-key state lives in a
//! ring (`VecDeque<Entry>`) in opening order: the front is always the window that closes soonest,
//! expiry pops from the front, and nothing is ever removed from the middle. Finding a key's
//! entry goes through an open-addressing index of `u32` ring sequence numbers (linear probing,
//! backward-shift deletion, load ≤ ½), sized once for `max_tracked_keys`. An entry is 32 bytes;
//! the index adds 4 bytes per slot. `docs/storm.md` has the measured bytes per key.
//!
//! A window closes and its entry is dropped at the first poll at or after its end, whether or not
//! it owes a summary, so idle keys never stay. The table holds at most `max_tracked_keys`; a new
//! key that finds it full evicts the front entry, the window that would have closed soonest. If
//! that window owes a count, its summary is emitted at once with `early: true` and `window_end`
//! = the eviction instant: no count is ever lost, and the key simply starts a fresh window at its
//! next alert. Refusing new keys instead would leave every storm that starts after the table
//! filled unprotected until the old windows close; evicting the oldest protects the newest storms
//! and costs only some early summaries.
//!
//! Summaries wait in an internal queue until polled, bounded by `max_tracked_keys` as well. If
//! the caller never polls and that queue fills, the detector fails open: it stops closing windows
//! that owe counts, and alerts it cannot account for are delivered, untracked and counted
//! ([`StormStats::untracked`]). An SU may get more alerts, never fewer counts.
//!
//! # Time and reloads
//!
//! `now` is an argument; time that runs backwards counts as no time (the detector keeps the
//! latest instant it was given). [`StormDetector::set_settings`] keeps every count and open
//! window: a new threshold or exclusion list applies to alerts that enter afterwards. A new
//! `window` applies to the windows already open too (they close at their start plus the new
//! length), because the ring's order is only an order of closing when all windows have one
//! length; an operator who shortens the window wants the shorter one now anyway.
//!
//! # Hashing
//!
//! Keys come from the network (device ids in CSP frames), so the index hashes with a hasher
//! seeded at random for each detector (foldhash's `RandomState`) rather than a fixed mixer that
//! crafted ids could collide in: without the seed, nobody can choose ids that share a slot. It is
//! foldhash rather than std's SipHash because every alert is hashed: SipHash cost about 50
//! instructions per alert in the owner's pipeline (`perf/instructions.sh`, mode `owner`),
//! foldhash about 10. A probe is bounded all the same: the index has at least twice as many
//! slots as `max_tracked_keys`.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use crate::config::AlertStorm;
use crate::ids::Eui64;
use crate::{Nanos, NANOS_PER_SEC};

/// Largest `threshold`, alerts per window (the config file's limit).
pub const STORM_THRESHOLD_ALERTS_MAX: u32 = crate::config::BURST_MAX;
/// Longest window, nanoseconds: one day (the config file's `window_s` limit).
pub const STORM_WINDOW_NS_MAX: Nanos = crate::config::STORM_WINDOW_S_MAX as Nanos * NANOS_PER_SEC;
/// Most keys one detector may track (the config file's limit).
pub const STORM_TRACKED_KEYS_MAX: u64 = crate::config::STORM_TRACKED_KEYS_MAX;

/// Ring sequence numbers are kept modulo 2³¹ in the index, with 0 meaning an empty slot.
const SEQ_MODULUS: u64 = 1 << 31;
// Offsets from the ring's front must be unambiguous modulo 2³¹, and the index (2 slots per key,
// rounded up to a power of two) must be addressable.
const _: () = assert!(STORM_TRACKED_KEYS_MAX < SEQ_MODULUS);
const _: () = assert!(STORM_TRACKED_KEYS_MAX <= (usize::MAX / 8) as u64);
/// SU indices are stored in 16 bits.
const _: () = assert!(crate::config::SERVICE_USERS_MAX <= 1 << 16);
/// Smallest index, slots, so that tiny tables still probe sensibly.
const INDEX_SLOTS_MIN: usize = 16;
/// The ring gives memory back when it is less than a quarter full and larger than this.
const RING_SHRINK_ENTRIES_MIN: usize = 4_096;

/// A storm setting out of range. Configuration validation catches these first, with the key name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StormError {
    /// `threshold` must be 1 ..= [`STORM_THRESHOLD_ALERTS_MAX`].
    #[error("storm threshold {0} is out of range: give 1 to {STORM_THRESHOLD_ALERTS_MAX} alerts")]
    Threshold(u32),
    /// `window` must be 1 ns ..= [`STORM_WINDOW_NS_MAX`].
    #[error("storm window of {0} ns is out of range: give more than 0 and at most one day")]
    Window(Nanos),
    /// `max_tracked_keys` must be 1 ..= [`STORM_TRACKED_KEYS_MAX`].
    #[error("max_tracked_keys {0} is out of range: give 1 to {STORM_TRACKED_KEYS_MAX}")]
    TrackedKeys(u64),
}

/// The alert codes never throttled: one bit per code, 8 KiB, so a lookup is one load.
#[derive(Clone, PartialEq, Eq)]
pub struct ExclusionSet(Box<[u64; 1024]>);

impl ExclusionSet {
    /// A set holding `codes` (duplicates are harmless).
    pub fn new(codes: &[u16]) -> ExclusionSet {
        let mut bits = Box::new([0u64; 1024]);
        for &code in codes {
            bits[usize::from(code >> 6)] |= 1 << (code & 63);
        }
        ExclusionSet(bits)
    }

    /// Whether `code` is excluded from throttling.
    #[inline]
    pub fn contains(&self, code: u16) -> bool {
        self.0[usize::from(code >> 6)] & (1 << (code & 63)) != 0
    }

    /// How many codes are excluded.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether no code is excluded.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
}

impl std::fmt::Debug for ExclusionSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let codes = (0..=u16::MAX).filter(|&c| self.contains(c));
        f.debug_set()
            .entries(codes.map(|c| format!("{c:#06X}")))
            .finish()
    }
}

/// What a [`StormDetector`] is told to do: validated, so a detector can always be built from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StormSettings {
    threshold: u32,
    window: Nanos,
    exclusions: ExclusionSet,
    max_tracked_keys: u64,
}

impl StormSettings {
    /// Checks and keeps the settings.
    pub fn new(
        threshold: u32,
        window: Nanos,
        exclusions: &[u16],
        max_tracked_keys: u64,
    ) -> Result<StormSettings, StormError> {
        if threshold == 0 || threshold > STORM_THRESHOLD_ALERTS_MAX {
            return Err(StormError::Threshold(threshold));
        }
        if window == 0 || window > STORM_WINDOW_NS_MAX {
            return Err(StormError::Window(window));
        }
        if max_tracked_keys == 0 || max_tracked_keys > STORM_TRACKED_KEYS_MAX {
            return Err(StormError::TrackedKeys(max_tracked_keys));
        }
        Ok(StormSettings {
            threshold,
            window,
            exclusions: ExclusionSet::new(exclusions),
            max_tracked_keys,
        })
    }

    /// The settings for one of `workers` detectors built from `[alert_storm]`: each gets an equal
    /// share of `max_tracked_keys` (rounded up), so that all of them together stay within it.
    pub fn from_config(config: &AlertStorm, workers: u32) -> Result<StormSettings, StormError> {
        let window = u64::try_from(config.window.as_nanos()).unwrap_or(u64::MAX);
        let share = config.max_tracked_keys.div_ceil(u64::from(workers.max(1)));
        StormSettings::new(config.threshold, window, &config.exclusions, share)
    }

    /// Alerts delivered per key per window.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Window length, ns.
    pub fn window(&self) -> Nanos {
        self.window
    }

    /// Codes never throttled.
    pub fn exclusions(&self) -> &ExclusionSet {
        &self.exclusions
    }

    /// Most keys tracked at once.
    pub fn max_tracked_keys(&self) -> u64 {
        self.max_tracked_keys
    }
}

/// What to do with one alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Deliver it.
    Deliver,
    /// Do not deliver it: it is counted, and its window's summary will stand for it.
    Throttled,
}

/// One STORM_SUMMARY owed to a Service User: `count` alerts of `code` from `device` were
/// throttled in the window `[window_start, window_end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StormSummary {
    /// The recipient, as given to [`StormDetector::on_alert`].
    pub su: u32,
    /// The device that stormed.
    pub device: Eui64,
    /// The alert code it stormed with.
    pub code: u16,
    /// Alerts throttled in the window: the frame's `counter`.
    pub count: u64,
    /// When the window opened (the key's first alert in it).
    pub window_start: Nanos,
    /// When the window closed: its planned end, or for an early summary the eviction instant.
    pub window_end: Nanos,
    /// The key was evicted before its window ended because the table was full.
    pub early: bool,
}

/// What a [`StormDetector`] has counted since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StormStats {
    /// Alerts given to [`StormDetector::on_alert`].
    pub alerts: u64,
    /// Alerts delivered, including the excluded and untracked ones.
    pub delivered: u64,
    /// Alerts throttled.
    pub throttled: u64,
    /// Alerts delivered because their code is excluded.
    pub excluded: u64,
    /// Alerts delivered without tracking because the detector could not account for them (an SU
    /// index above 65,535, or the summary queue full because nobody polls).
    pub untracked: u64,
    /// Windows opened.
    pub windows: u64,
    /// Summaries made (normal and early).
    pub summaries: u64,
    /// Alerts the summaries made so far stand for.
    pub summarised: u64,
    /// Summaries made early, by eviction.
    pub early_summaries: u64,
    /// Keys evicted because the table was full.
    pub evictions: u64,
    /// Keys tracked now.
    pub keys_tracked: u64,
    /// Most keys tracked at once.
    pub keys_peak: u64,
    /// Throttled alerts not yet in a summary: `throttled − summarised`.
    pub owed: u64,
    /// Storms started: windows in which an alert was throttled for the first time. The
    /// [`Verdict::Throttled`] that raised it is the storm's first.
    pub storms: u64,
}

/// The state of one key: 32 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    device: u64,
    /// When its window opened.
    start: Nanos,
    /// Alerts throttled in the window.
    throttled: u64,
    /// Alerts delivered in the window.
    delivered: u32,
    su: u16,
    code: u16,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 32);

impl Entry {
    fn same_key(&self, su: u16, device: u64, code: u16) -> bool {
        self.device == device && self.su == su && self.code == code
    }
}

/// The storm detector of one worker. See the module documentation.
///
/// ```
/// use dsplane_core::ids::Eui64;
/// use dsplane_core::storm::{StormDetector, StormSettings, Verdict};
/// const S: u64 = 1_000_000_000;
/// let settings = StormSettings::new(2, 60 * S, &[], 1_000).unwrap();
/// let mut storm = StormDetector::new(settings, 0);
/// let meter = Eui64(0x00DB_1234_5678_90A0);
/// assert_eq!(storm.on_alert(0, meter, 0x8F75, 0), Verdict::Deliver);
/// assert_eq!(storm.on_alert(0, meter, 0x8F75, S), Verdict::Deliver);
/// assert_eq!(storm.on_alert(0, meter, 0x8F75, 2 * S), Verdict::Throttled);
/// assert_eq!(storm.next_deadline(), Some(60 * S));
/// let mut out = Vec::new();
/// storm.poll_summaries(60 * S, &mut out);
/// assert_eq!(out[0].count, 1);
/// ```
pub struct StormDetector {
    settings: StormSettings,
    /// Open windows in opening order, which is closing order.
    ring: VecDeque<Entry>,
    /// Sequence number of `ring[0]`; entry `i` has `head_seq + i`.
    head_seq: u64,
    /// Open addressing over ring sequence numbers: `seq mod 2³¹ + 1`, 0 = empty. Length a power
    /// of two, at least twice the most keys it may hold.
    index: Box<[u32]>,
    hasher: foldhash::fast::RandomState,
    /// Summaries made and not yet polled.
    pending: VecDeque<StormSummary>,
    /// The latest `now` seen.
    clock: Nanos,
    stats: StormStats,
}

impl StormDetector {
    /// A detector with nothing tracked, as of `now`. The index is allocated here, zeroed, for
    /// `max_tracked_keys` (the OS commits its pages as they are first used).
    pub fn new(settings: StormSettings, now: Nanos) -> StormDetector {
        let slots = index_slots(settings.max_tracked_keys);
        StormDetector {
            settings,
            ring: VecDeque::new(),
            head_seq: 0,
            index: vec![0u32; slots].into_boxed_slice(),
            hasher: foldhash::fast::RandomState::default(),
            pending: VecDeque::new(),
            clock: now,
            stats: StormStats::default(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &StormSettings {
        &self.settings
    }

    /// Counters since the detector was made.
    pub fn stats(&self) -> StormStats {
        self.stats
    }

    /// Heap bytes held now: ring, index, summary queue and exclusion table.
    pub fn memory_bytes(&self) -> usize {
        self.ring.capacity() * std::mem::size_of::<Entry>()
            + std::mem::size_of_val(&*self.index)
            + self.pending.capacity() * std::mem::size_of::<StormSummary>()
            + std::mem::size_of::<[u64; 1024]>()
    }

    /// A live reload. Counts and open windows are kept; the new threshold and exclusions apply to
    /// alerts that enter afterwards, a new window length to the open windows as well (see the
    /// module documentation). A smaller `max_tracked_keys` than the keys now tracked evicts the
    /// soonest-closing ones at once, with early summaries.
    pub fn set_settings(&mut self, settings: StormSettings, now: Nanos) {
        let now = self.tick(now);
        let max = settings.max_tracked_keys;
        self.settings = settings;
        // An operator's cut is honoured at once, even past the summary queue's bound (which the
        // old, larger cap bounded anyway).
        while self.ring.len() as u64 > max && self.evict_front(now, true) {}
        let slots = index_slots(max);
        if slots != self.index.len() {
            self.rebuild_index(slots);
        }
    }

    /// Decides what to do with one alert for Service User `su` (its index in the directory)
    /// from `device` with `code`, at `now`.
    #[must_use = "a throttled alert must not be delivered"]
    pub fn on_alert(&mut self, su: u32, device: Eui64, code: u16, now: Nanos) -> Verdict {
        let now = self.tick(now);
        self.stats.alerts += 1;
        // Windows that ended are closed first, so the verdict never depends on whether the
        // caller polled before this alert.
        self.expire(now);
        if self.settings.exclusions.contains(code) {
            self.stats.excluded += 1;
            return self.deliver();
        }
        let Ok(su) = u16::try_from(su) else {
            return self.untracked();
        };
        let hash = self.hash(su, device.0, code);
        if let Some(offset) = self.find(hash, su, device.0, code) {
            let window = self.settings.window;
            let threshold = self.settings.threshold;
            let entry = &mut self.ring[offset];
            if entry.start.saturating_add(window) <= now {
                // Only when expiry stalled on a full summary queue: fail open.
                return self.untracked();
            }
            return if entry.delivered < threshold {
                entry.delivered += 1;
                self.deliver()
            } else {
                // The simulator's deliberate bug (docs/simulation.md): a throttled alert is not
                // counted for its summary.
                #[cfg(not(dsplane_mutation = "skip_storm_count"))]
                {
                    entry.throttled += 1;
                    self.stats.owed += 1;
                }
                if entry.throttled == 1 {
                    self.stats.storms += 1;
                }
                self.stats.throttled += 1;
                Verdict::Throttled
            };
        }
        if self.ring.len() as u64 >= self.settings.max_tracked_keys && !self.evict_front(now, false)
        {
            return self.untracked();
        }
        self.insert(hash, su, device.0, code, now);
        self.deliver()
    }

    /// Closes every window that ended by `now` and hands out the summaries owed, in closing order
    /// (early summaries in eviction order). Call it at [`next_deadline`](Self::next_deadline).
    pub fn poll_summaries(&mut self, now: Nanos, out: &mut impl Extend<StormSummary>) {
        let now = self.tick(now);
        loop {
            self.expire(now);
            if self.pending.is_empty() {
                break;
            }
            out.extend(self.pending.drain(..));
        }
        self.pending.shrink_to(RING_SHRINK_ENTRIES_MIN);
        let capacity = self.ring.capacity();
        if capacity > RING_SHRINK_ENTRIES_MIN && self.ring.len() < capacity / 4 {
            self.ring.shrink_to(capacity / 2);
        }
    }

    /// When [`poll_summaries`](Self::poll_summaries) next has work: the soonest window end, or
    /// the latest `now` seen if summaries are already waiting. `None` when nothing is tracked.
    /// Polling later than this is harmless: summaries carry their planned `window_end`.
    pub fn next_deadline(&self) -> Option<Nanos> {
        if !self.pending.is_empty() {
            return Some(self.clock);
        }
        self.ring
            .front()
            .map(|e| e.start.saturating_add(self.settings.window))
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    fn tick(&mut self, now: Nanos) -> Nanos {
        self.clock = self.clock.max(now);
        self.clock
    }

    fn deliver(&mut self) -> Verdict {
        self.stats.delivered += 1;
        Verdict::Deliver
    }

    fn untracked(&mut self) -> Verdict {
        self.stats.untracked += 1;
        self.deliver()
    }

    fn hash(&self, su: u16, device: u64, code: u16) -> u64 {
        self.hasher
            .hash_one(u128::from(device) | u128::from(su) << 64 | u128::from(code) << 80)
    }

    fn tag(seq: u64) -> u32 {
        // < 2³¹ + 1, so the cast is exact.
        (seq % SEQ_MODULUS + 1) as u32
    }

    /// The ring offset a non-empty index value points at.
    fn offset_of(&self, tag: u32) -> usize {
        let seq = u64::from(tag - 1);
        ((seq + SEQ_MODULUS - self.head_seq % SEQ_MODULUS) % SEQ_MODULUS) as usize
    }

    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    /// The ring offset of the key's entry.
    fn find(&self, hash: u64, su: u16, device: u64, code: u16) -> Option<usize> {
        let mask = self.mask();
        let mut slot = hash as usize & mask;
        loop {
            let tag = self.index[slot];
            if tag == 0 {
                return None;
            }
            let offset = self.offset_of(tag);
            debug_assert!(offset < self.ring.len(), "index points outside the ring");
            if self
                .ring
                .get(offset)
                .is_some_and(|e| e.same_key(su, device, code))
            {
                return Some(offset);
            }
            slot = (slot + 1) & mask;
        }
    }

    fn insert(&mut self, hash: u64, su: u16, device: u64, code: u16, now: Nanos) {
        let mask = self.mask();
        let mut slot = hash as usize & mask;
        while self.index[slot] != 0 {
            slot = (slot + 1) & mask;
        }
        let seq = self.head_seq + self.ring.len() as u64;
        self.index[slot] = Self::tag(seq);
        // Grow the ring by doubling, but never past the cap, so a full table wastes nothing.
        if self.ring.len() == self.ring.capacity() {
            let max = self.settings.max_tracked_keys as usize;
            let room = max.saturating_sub(self.ring.len()).max(1);
            self.ring.reserve_exact(self.ring.len().max(16).min(room));
        }
        self.ring.push_back(Entry {
            device,
            start: now,
            throttled: 0,
            delivered: 1,
            su,
            code,
        });
        self.stats.windows += 1;
        self.stats.keys_tracked = self.ring.len() as u64;
        self.stats.keys_peak = self.stats.keys_peak.max(self.stats.keys_tracked);
    }

    /// Closes the windows that ended by `now`, oldest first.
    fn expire(&mut self, now: Nanos) {
        let window = self.settings.window;
        while let Some(&front) = self.ring.front() {
            let end = front.start.saturating_add(window);
            if end > now {
                break;
            }
            if front.throttled > 0 {
                if self.pending.len() as u64 >= self.settings.max_tracked_keys {
                    // Nobody is polling; keep the count in the table rather than lose it.
                    break;
                }
                self.summarise(&front, end, false);
            }
            self.remove_front();
        }
    }

    /// Evicts the soonest-closing window to make room. False if it owes a count and the summary
    /// queue is full (and `force` is not set), in which case nothing is evicted.
    fn evict_front(&mut self, now: Nanos, force: bool) -> bool {
        let Some(&front) = self.ring.front() else {
            return false;
        };
        if front.throttled > 0 {
            if !force && self.pending.len() as u64 >= self.settings.max_tracked_keys {
                return false;
            }
            self.summarise(&front, now, true);
            self.stats.early_summaries += 1;
        }
        self.stats.evictions += 1;
        self.remove_front();
        true
    }

    fn summarise(&mut self, entry: &Entry, end: Nanos, early: bool) {
        self.pending.push_back(StormSummary {
            su: u32::from(entry.su),
            device: Eui64(entry.device),
            code: entry.code,
            count: entry.throttled,
            window_start: entry.start,
            window_end: end,
            early,
        });
        self.stats.summaries += 1;
        self.stats.summarised += entry.throttled;
        self.stats.owed -= entry.throttled;
    }

    /// Drops the front entry and its index slot (backward-shift deletion, so no tombstones).
    fn remove_front(&mut self) {
        let Some(&front) = self.ring.front() else {
            return;
        };
        let mask = self.mask();
        let want = Self::tag(self.head_seq);
        let mut hole = self.hash(front.su, front.device, front.code) as usize & mask;
        while self.index[hole] != want {
            if self.index[hole] == 0 {
                // Unreachable while the index mirrors the ring; never loop forever on it.
                debug_assert!(false, "ring entry missing from the index");
                break;
            }
            hole = (hole + 1) & mask;
        }
        if self.index[hole] == want {
            let mut next = hole;
            loop {
                next = (next + 1) & mask;
                let tag = self.index[next];
                if tag == 0 {
                    break;
                }
                let e = self.ring[self.offset_of(tag)];
                let home = self.hash(e.su, e.device, e.code) as usize & mask;
                // The entry may move back into the hole if the hole lies between its home slot
                // and where it sits now.
                if next.wrapping_sub(home) & mask >= next.wrapping_sub(hole) & mask {
                    self.index[hole] = tag;
                    hole = next;
                }
            }
            self.index[hole] = 0;
        }
        self.ring.pop_front();
        self.head_seq += 1;
        self.stats.keys_tracked = self.ring.len() as u64;
    }

    fn rebuild_index(&mut self, slots: usize) {
        let mut index = vec![0u32; slots].into_boxed_slice();
        let mask = slots - 1;
        for (i, e) in self.ring.iter().enumerate() {
            let mut slot = self.hash(e.su, e.device, e.code) as usize & mask;
            while index[slot] != 0 {
                slot = (slot + 1) & mask;
            }
            index[slot] = Self::tag(self.head_seq + i as u64);
        }
        self.index = index;
    }
}

impl std::fmt::Debug for StormDetector {
    /// Settings and counters only: the table may hold millions of keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StormDetector")
            .field("settings", &self.settings)
            .field("stats", &self.stats)
            .field("pending", &self.pending.len())
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// Index slots for `max` keys: a power of two, at least twice `max`, so the load stays ≤ ½.
fn index_slots(max: u64) -> usize {
    // max ≤ STORM_TRACKED_KEYS_MAX, asserted above to fit comfortably.
    (max as usize * 2).next_power_of_two().max(INDEX_SLOTS_MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = NANOS_PER_SEC;
    const D: Eui64 = Eui64(0x00DB_1234_5678_90A0);
    const MAGNETIC: u16 = 0x8F75;

    fn detector(threshold: u32, window: Nanos, exclusions: &[u16], max: u64) -> StormDetector {
        StormDetector::new(
            StormSettings::new(threshold, window, exclusions, max).unwrap(),
            0,
        )
    }

    fn poll(d: &mut StormDetector, now: Nanos) -> Vec<StormSummary> {
        let mut out = Vec::new();
        d.poll_summaries(now, &mut out);
        out
    }

    #[test]
    fn first_threshold_delivered_then_throttled() {
        let mut d = detector(10, 60 * S, &[], 100);
        for i in 0..10 {
            assert_eq!(
                d.on_alert(1, D, MAGNETIC, i * S),
                Verdict::Deliver,
                "alert {i}"
            );
        }
        for i in 10..25 {
            assert_eq!(
                d.on_alert(1, D, MAGNETIC, i * S),
                Verdict::Throttled,
                "alert {i}"
            );
        }
        // Another code, another SU and another device are other keys.
        assert_eq!(d.on_alert(1, D, 0x8F1C, 30 * S), Verdict::Deliver);
        assert_eq!(d.on_alert(2, D, MAGNETIC, 30 * S), Verdict::Deliver);
        assert_eq!(d.on_alert(1, Eui64(7), MAGNETIC, 30 * S), Verdict::Deliver);
        let st = d.stats();
        assert_eq!((st.delivered, st.throttled, st.owed), (13, 15, 15));
        assert_eq!(
            st.storms, 1,
            "one storm: the first throttled alert starts it"
        );
    }

    #[test]
    fn each_window_with_throttling_is_one_storm() {
        let mut d = detector(1, 10 * S, &[], 100);
        for t in [0, 1, 2, 3] {
            let _ = d.on_alert(0, D, MAGNETIC, t * S);
        }
        assert_eq!(d.stats().storms, 1);
        // The window closes; the next one storms again.
        for t in [20, 21, 22] {
            let _ = d.on_alert(0, D, MAGNETIC, t * S);
        }
        assert_eq!(d.stats().storms, 2);
    }

    #[test]
    fn summary_at_window_close_even_if_device_quiet() {
        let mut d = detector(2, 60 * S, &[], 100);
        for t in [5, 6, 7, 8, 9] {
            let _ = d.on_alert(3, D, MAGNETIC, t * S);
        }
        assert_eq!(d.next_deadline(), Some(65 * S));
        assert!(poll(&mut d, 65 * S - 1).is_empty(), "one ns before the end");
        let out = poll(&mut d, 65 * S);
        assert_eq!(
            out,
            vec![StormSummary {
                su: 3,
                device: D,
                code: MAGNETIC,
                count: 3,
                window_start: 5 * S,
                window_end: 65 * S,
                early: false,
            }]
        );
        assert!(d.is_empty(), "a closed window is dropped");
        assert_eq!(d.next_deadline(), None);
        assert_eq!(d.stats().owed, 0);
    }

    #[test]
    fn quiet_window_closes_without_summary() {
        let mut d = detector(2, 10 * S, &[], 100);
        assert_eq!(d.on_alert(0, D, MAGNETIC, 0), Verdict::Deliver);
        assert_eq!(d.on_alert(0, D, MAGNETIC, S), Verdict::Deliver);
        assert!(poll(&mut d, 10 * S).is_empty());
        assert!(d.is_empty());
        assert_eq!(d.stats().summaries, 0);
    }

    #[test]
    fn each_window_counts_from_zero() {
        let mut d = detector(2, 10 * S, &[], 100);
        let verdicts: Vec<Verdict> = (0..4).map(|i| d.on_alert(0, D, 1, i * S)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Deliver,
                Verdict::Deliver,
                Verdict::Throttled,
                Verdict::Throttled
            ]
        );
        // The alert at exactly the window end belongs to a new window, which delivers again;
        // the old window's summary is made even though nobody polled in between.
        assert_eq!(d.on_alert(0, D, 1, 10 * S), Verdict::Deliver);
        assert_eq!(d.on_alert(0, D, 1, 11 * S), Verdict::Deliver);
        assert_eq!(d.on_alert(0, D, 1, 12 * S), Verdict::Throttled);
        let out = poll(&mut d, 10 * S);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].count, out[0].window_start), (2, 0));
        let out = poll(&mut d, 20 * S);
        assert_eq!(
            (out[0].count, out[0].window_start, out[0].window_end),
            (1, 10 * S, 20 * S)
        );
    }

    #[test]
    fn excluded_codes_always_delivered_and_not_tracked() {
        let mut d = detector(1, 60 * S, &[0x8F57], 100);
        for i in 0..100 {
            assert_eq!(d.on_alert(0, D, 0x8F57, i), Verdict::Deliver);
        }
        assert!(d.is_empty());
        assert_eq!(d.stats().excluded, 100);
        // 0x8F75 is not excluded.
        assert_eq!(d.on_alert(0, D, MAGNETIC, 0), Verdict::Deliver);
        assert_eq!(d.on_alert(0, D, MAGNETIC, 0), Verdict::Throttled);
    }

    #[test]
    fn full_table_evicts_soonest_closing_with_early_summary() {
        let mut d = detector(1, 60 * S, &[], 3);
        // Key A storms (owes 2), then B and C fill the table.
        for t in 0..3 {
            let _ = d.on_alert(0, Eui64(0xA), 1, t);
        }
        assert_eq!(d.on_alert(0, Eui64(0xB), 1, 10), Verdict::Deliver);
        assert_eq!(d.on_alert(0, Eui64(0xC), 1, 20), Verdict::Deliver);
        assert_eq!(d.len(), 3);
        // D evicts A, the oldest window: A's count comes out early, stamped with the instant.
        assert_eq!(d.on_alert(0, Eui64(0xD), 1, 30), Verdict::Deliver);
        assert_eq!(d.len(), 3);
        assert_eq!(
            d.next_deadline(),
            Some(30),
            "a waiting summary means poll now"
        );
        let out = poll(&mut d, 30);
        assert_eq!(
            out,
            vec![StormSummary {
                su: 0,
                device: Eui64(0xA),
                code: 1,
                count: 2,
                window_start: 0,
                window_end: 30,
                early: true
            }]
        );
        // E evicts B, which owes nothing: no summary.
        let _ = d.on_alert(0, Eui64(0xE), 1, 40);
        assert!(poll(&mut d, 40).is_empty());
        let st = d.stats();
        assert_eq!((st.evictions, st.early_summaries, st.keys_peak), (2, 1, 3));
        // The other keys are all still found.
        for k in [0xC, 0xD, 0xE] {
            assert_eq!(d.on_alert(0, Eui64(k), 1, 50), Verdict::Throttled, "{k:#x}");
        }
    }

    #[test]
    fn reload_keeps_counts_and_open_windows() {
        let mut d = detector(5, 60 * S, &[], 100);
        for t in 0..7 {
            let _ = d.on_alert(0, D, MAGNETIC, t);
        }
        assert_eq!(d.stats().throttled, 2);
        // A lower threshold and an exclusion of another code: the window and its count stay.
        d.set_settings(StormSettings::new(2, 60 * S, &[0x8F57], 100).unwrap(), 10);
        assert_eq!(d.len(), 1);
        assert_eq!(d.on_alert(0, D, MAGNETIC, 11), Verdict::Throttled);
        // A new key gets the new threshold.
        assert_eq!(d.on_alert(0, Eui64(1), MAGNETIC, 12), Verdict::Deliver);
        assert_eq!(d.on_alert(0, Eui64(1), MAGNETIC, 13), Verdict::Deliver);
        assert_eq!(d.on_alert(0, Eui64(1), MAGNETIC, 14), Verdict::Throttled);
        // Excluding the storming code leaves its open window to close with its count.
        d.set_settings(StormSettings::new(2, 60 * S, &[MAGNETIC], 100).unwrap(), 20);
        assert_eq!(d.on_alert(0, D, MAGNETIC, 21), Verdict::Deliver);
        let out = poll(&mut d, 60 * S + 14);
        assert_eq!(out.iter().map(|s| s.count).collect::<Vec<_>>(), [3, 1]);
    }

    #[test]
    fn reload_with_shorter_window_closes_open_windows_sooner() {
        let mut d = detector(1, 60 * S, &[], 100);
        let _ = d.on_alert(0, D, 1, 0);
        let _ = d.on_alert(0, D, 1, S);
        d.set_settings(StormSettings::new(1, 10 * S, &[], 100).unwrap(), 2 * S);
        assert_eq!(d.next_deadline(), Some(10 * S));
        let out = poll(&mut d, 10 * S);
        assert_eq!((out[0].count, out[0].window_end), (1, 10 * S));
    }

    #[test]
    fn reload_with_smaller_cap_evicts_at_once() {
        let mut d = detector(1, 60 * S, &[], 100);
        for k in 0..10u64 {
            let _ = d.on_alert(0, Eui64(k), 1, k);
            let _ = d.on_alert(0, Eui64(k), 1, k);
        }
        d.set_settings(StormSettings::new(1, 60 * S, &[], 4).unwrap(), 100);
        assert_eq!(d.len(), 4);
        let out = poll(&mut d, 100);
        assert_eq!(out.len(), 6);
        assert!(out.iter().all(|s| s.early && s.count == 1));
        for k in 6..10u64 {
            assert_eq!(d.on_alert(0, Eui64(k), 1, 101), Verdict::Throttled);
        }
        // Growing the cap again rebuilds the index; every key is still found.
        d.set_settings(StormSettings::new(1, 60 * S, &[], 1_000).unwrap(), 102);
        for k in 6..10u64 {
            assert_eq!(d.on_alert(0, Eui64(k), 1, 103), Verdict::Throttled);
        }
    }

    #[test]
    fn time_going_backwards_counts_as_no_time() {
        let mut d = detector(1, 10 * S, &[], 100);
        let _ = d.on_alert(0, D, 1, 100 * S);
        assert_eq!(d.on_alert(0, D, 1, 0), Verdict::Throttled);
        let out = poll(&mut d, 5 * S);
        assert!(out.is_empty(), "an earlier poll closes nothing");
        assert_eq!(poll(&mut d, 110 * S)[0].window_start, 100 * S);
    }

    #[test]
    fn unpolled_detector_fails_open_and_keeps_counts() {
        // Cap 1: one owed summary fills the queue.
        let mut d = detector(1, 10, &[], 1);
        let _ = d.on_alert(0, Eui64(1), 1, 0);
        let _ = d.on_alert(0, Eui64(1), 1, 1);
        // Window of key 1 closes at 10 and its summary waits; key 2 opens.
        let _ = d.on_alert(0, Eui64(2), 1, 10);
        let _ = d.on_alert(0, Eui64(2), 1, 11);
        // Key 2's window closes at 20 but the queue is full: it stays, and its alerts and new
        // keys go untracked rather than lose a count.
        assert_eq!(d.on_alert(0, Eui64(2), 1, 25), Verdict::Deliver);
        assert_eq!(d.on_alert(0, Eui64(3), 1, 25), Verdict::Deliver);
        assert_eq!(d.stats().untracked, 2);
        let out = poll(&mut d, 25);
        assert_eq!(out.iter().map(|s| s.device.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(d.stats().owed, 0);
    }

    #[test]
    fn su_index_beyond_16_bits_goes_untracked() {
        let mut d = detector(1, 10, &[], 10);
        assert_eq!(d.on_alert(70_000, D, 1, 0), Verdict::Deliver);
        assert_eq!(d.on_alert(70_000, D, 1, 0), Verdict::Deliver);
        assert_eq!(d.stats().untracked, 2);
        assert!(d.is_empty());
    }

    #[test]
    fn settings_are_checked_at_their_edges() {
        assert!(StormSettings::new(1, 1, &[], 1).is_ok());
        assert!(StormSettings::new(
            STORM_THRESHOLD_ALERTS_MAX,
            STORM_WINDOW_NS_MAX,
            &[],
            STORM_TRACKED_KEYS_MAX
        )
        .is_ok());
        assert_eq!(
            StormSettings::new(0, 1, &[], 1),
            Err(StormError::Threshold(0))
        );
        assert_eq!(
            StormSettings::new(STORM_THRESHOLD_ALERTS_MAX + 1, 1, &[], 1),
            Err(StormError::Threshold(STORM_THRESHOLD_ALERTS_MAX + 1))
        );
        assert_eq!(StormSettings::new(1, 0, &[], 1), Err(StormError::Window(0)));
        assert_eq!(
            StormSettings::new(1, STORM_WINDOW_NS_MAX + 1, &[], 1),
            Err(StormError::Window(STORM_WINDOW_NS_MAX + 1))
        );
        assert_eq!(
            StormSettings::new(1, 1, &[], 0),
            Err(StormError::TrackedKeys(0))
        );
        assert_eq!(
            StormSettings::new(1, 1, &[], STORM_TRACKED_KEYS_MAX + 1),
            Err(StormError::TrackedKeys(STORM_TRACKED_KEYS_MAX + 1))
        );
    }

    #[test]
    fn settings_from_config_share_the_cap() {
        let config = crate::config::Config::embedded_default().unwrap();
        let s = StormSettings::from_config(&config.alert_storm, 3).unwrap();
        assert_eq!(s.threshold(), 10);
        assert_eq!(s.window(), 60 * S);
        assert_eq!(s.max_tracked_keys(), 4_000_000_u64.div_ceil(3));
        assert!(!s.exclusions().contains(MAGNETIC), "0x8F75 is not excluded");
        assert!(s.exclusions().contains(0x8F57));
    }

    #[test]
    fn exclusion_set_bits() {
        let set = ExclusionSet::new(&[0, 63, 64, 0xFFFF, 64]);
        assert_eq!(set.len(), 4);
        for c in [0, 63, 64, 0xFFFF] {
            assert!(set.contains(c));
        }
        for c in [1, 62, 65, 0xFFFE] {
            assert!(!set.contains(c));
        }
        assert!(ExclusionSet::new(&[]).is_empty());
    }

    #[test]
    fn sequence_numbers_wrap_past_2_pow_31() {
        // Start the ring's numbering just below the wrap, as after 2³¹ windows.
        let mut d = detector(1, 10, &[], 8);
        d.head_seq = SEQ_MODULUS - 3;
        for t in 0..40u64 {
            for k in 0..6u64 {
                let _ = d.on_alert(0, Eui64(k), 1, t * 4);
                let _ = d.on_alert(0, Eui64(k), 1, t * 4);
            }
            let _ = poll(&mut d, t * 4);
        }
        let _ = poll(&mut d, 1_000);
        let st = d.stats();
        assert!(d.head_seq > SEQ_MODULUS);
        assert_eq!(st.owed, 0);
        assert_eq!(st.summarised, st.throttled);
    }
}

//! Priority classification (ENGINE.md §1, SECMP0028): every message gets exactly one level when it
//! enters, from configurable rules, never from its sender.
//!
//! # Rules as an immutable snapshot
//!
//! [`Rules`] is compiled once from the `[priority]` section and never changed: a reload builds a
//! new snapshot and hands each worker an `Arc` of it ([`Classifier::set_rules`]). A message is
//! classified once, on entry, and carries its level from then on, so a reload touches only
//! messages that enter after it (SECMP0028: "the priority determined is not recalculated").
//!
//! # Which rule wins
//!
//! REQUEST rules match an exact SRV (`"2.2"`), a major.minor prefix (`"8.1.*"`) or a major prefix
//! (`"7.*"`), each with or without a mode. The most specific SRV pattern wins; between two rules
//! with the same pattern, the one naming the mode wins over the one that does not. So the lookup
//! is: exact SRV (mode, then any), then major.minor (mode, then any), then major (mode, then
//! any), then `default_level`. Duplicate (pattern, mode) pairs are refused by the config, so there
//! are no ties.
//!
//! The snapshot is laid out for the message path: exact SRVs and major.minor prefixes in sorted
//! arrays (binary search over at most [`crate::config::RULES_MAX`] entries), majors in a 256-entry
//! table, alert codes in a 65,536-entry table of levels, so classifying never hashes or
//! allocates.
//!
//! # Responses inherit their request's level
//!
//! A RESPONSE gets the level its REQUEST was given, found by RequestID (`su_id`, `device_id`,
//! `counter`) in [`InflightRequests`], a table bounded by `requests_max` entries and an expiry
//! age. When it is full the oldest entry is evicted, counted, and logged (at exponentially spaced
//! counts, so a sustained overflow cannot flood the log). The cost of an eviction is small: a
//! response whose request is no longer known is classified by the REQUEST rules on its own
//! `srv`/`mode` (which it copies from its request), which gives the same level unless the rules
//! were reloaded in between. A response to a DCC-scheduled request gets
//! `scheduled_response_level` either way.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;

use crate::config::{Priority, SrvPattern};
use crate::ids::{Eui64, Level, Mode, Srv};
use crate::Nanos;

/// Index of the "any mode" slot in a per-pattern level array; modes use their wire value.
const ANY_MODE: usize = 3;

/// Levels for one SRV pattern, per mode and for any mode; 0 = no rule.
type ModeLevels = [u8; 4];

/// An immutable, compiled snapshot of the `[priority]` rules.
#[derive(Debug, Clone)]
pub struct Rules {
    levels: u8,
    default_level: Level,
    scheduled_response_level: Level,
    exact: Vec<(u32, ModeLevels)>,
    major_minor: Vec<(u16, ModeLevels)>,
    major: Box<[ModeLevels; 256]>,
    alert_levels: Box<[u8; 65_536]>,
}

impl Rules {
    /// Compiles the validated `[priority]` section.
    pub fn new(priority: &Priority) -> Rules {
        let mut exact: Vec<(u32, ModeLevels)> = Vec::new();
        let mut major_minor: Vec<(u16, ModeLevels)> = Vec::new();
        let mut major = Box::new([[0u8; 4]; 256]);
        for rule in &priority.rules {
            let slot = rule.mode.map_or(ANY_MODE, |m| m as usize);
            let levels = match rule.srv {
                SrvPattern::Exact(srv) => entry(&mut exact, srv.0),
                SrvPattern::MajorMinor(ma, mi) => {
                    entry(&mut major_minor, u16::from(ma) << 8 | u16::from(mi))
                }
                // 256 entries for a u8: always there.
                SrvPattern::Major(ma) => major.get_mut(usize::from(ma)),
            };
            if let Some(l) = levels.and_then(|levels| levels.get_mut(slot)) {
                *l = rule.level.get();
            }
        }
        exact.sort_unstable_by_key(|e| e.0);
        major_minor.sort_unstable_by_key(|e| e.0);
        let mut alert_levels = Box::new([priority.alert_level.get(); 65_536]);
        for &(code, level) in &priority.high_priority_alerts {
            // 65,536 entries for a u16: always there.
            if let Some(l) = alert_levels.get_mut(usize::from(code)) {
                *l = level.get();
            }
        }
        Rules {
            levels: priority.levels,
            default_level: priority.default_level,
            scheduled_response_level: priority.scheduled_response_level,
            exact,
            major_minor,
            major,
            alert_levels,
        }
    }

    /// The number of levels.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// The lowest (least urgent) level.
    pub fn lowest(&self) -> Level {
        level(self.levels)
    }

    /// The level of a REQUEST with this SRV and mode.
    pub fn request_level(&self, srv: Srv, mode: Mode) -> Level {
        // A mode's slot, else the any-mode slot; 0 where no rule gives a level. (`get` on the
        // fixed tables compiles to the plain load: every index is in range by its type.)
        let pick = |levels: &ModeLevels| match levels.get(mode as usize).copied() {
            Some(l) if l != 0 => l,
            _ => levels.get(ANY_MODE).copied().unwrap_or(0),
        };
        let by_exact = lookup(&self.exact, srv.0).map_or(0, pick);
        if by_exact != 0 {
            return level(by_exact);
        }
        let key = u16::from(srv.major()) << 8 | u16::from(srv.minor());
        let by_major_minor = lookup(&self.major_minor, key).map_or(0, pick);
        if by_major_minor != 0 {
            return level(by_major_minor);
        }
        let by_major = self.major.get(usize::from(srv.major())).map_or(0, pick);
        if by_major != 0 {
            return level(by_major);
        }
        self.default_level
    }

    /// The level of a RESPONSE whose request is not known: `scheduled_response_level` for a
    /// DCC-scheduled one, else the REQUEST rules on its own SRV and mode.
    pub fn unknown_response_level(&self, srv: Srv, mode: Mode) -> Level {
        match mode {
            Mode::DccScheduled => self.scheduled_response_level,
            _ => self.request_level(srv, mode),
        }
    }

    /// The level of a DEVICE_ALERT or DCC_ALERT with this code.
    pub fn alert_level(&self, code: u16) -> Level {
        level(
            self.alert_levels
                .get(usize::from(code))
                .copied()
                .unwrap_or(0),
        )
    }
}

/// The levels of `key` in `table`, added (empty) if it is not there yet.
fn entry<K: Copy + PartialEq>(table: &mut Vec<(K, ModeLevels)>, key: K) -> Option<&mut ModeLevels> {
    if !table.iter().any(|e| e.0 == key) {
        table.push((key, [0; 4]));
    }
    table.iter_mut().find(|e| e.0 == key).map(|e| &mut e.1)
}

fn lookup<K: Ord + Copy>(table: &[(K, ModeLevels)], key: K) -> Option<&ModeLevels> {
    table
        .binary_search_by_key(&key, |e| e.0)
        .ok()
        .and_then(|i| table.get(i))
        .map(|e| &e.1)
}

/// A level byte from a compiled table. Every byte stored is a validated, non-zero level.
fn level(byte: u8) -> Level {
    // The tables hold only levels from the validated config; the fallback is unreachable but
    // keeps this total rather than panicking.
    Level::new(byte).unwrap_or(Level::URGENT)
}

/// A DUIS RequestID: originator SU, target device, counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// The SU that sent the request.
    pub su: Eui64,
    /// The device it targets.
    pub device: Eui64,
    /// The SU's request counter.
    pub counter: u64,
}

/// What [`InflightRequests`] has counted since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InflightStats {
    /// Requests now tracked.
    pub tracked: usize,
    /// Requests recorded.
    pub recorded: u64,
    /// Responses that found their request.
    pub inherited: u64,
    /// Responses whose request was not (or no longer) known.
    pub unknown: u64,
    /// Entries dropped because they were older than the expiry age.
    pub expired: u64,
    /// Entries evicted, oldest first, because the table was full.
    pub evicted_full: u64,
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    level: Level,
    /// Future-dated requests are answered twice (the DSP's acknowledgement, then the device's
    /// response at execution time), so their entry stays until it expires.
    keep_after_response: bool,
    /// Matches the entry's place in the age queue; an older queue item is stale.
    seq: u64,
}

/// The bounded table of requests awaiting responses, keyed by RequestID.
///
/// Single-threaded: each worker owns one for the SUs it owns (a response is routed to the owner
/// of its `su_id`, the same worker its request entered on).
#[derive(Debug)]
pub struct InflightRequests {
    /// Keyed by RequestIds that SUs choose, so the hash is seeded at random (no collision
    /// flooding), and it is foldhash rather than SipHash: SipHash cost ~235 instructions per
    /// message in the sans-IO pipeline (`perf/instructions.sh`). A `hashbrown::HashTable`
    /// rather than std's `HashMap` (the same table) so that a response finds and removes its
    /// entry in one probe (`find_entry`), without the reservation `HashMap::entry` makes for
    /// an insert that never comes.
    entries: hashbrown::HashTable<(RequestId, Inflight)>,
    hasher: foldhash::fast::RandomState,
    /// (id, seq, recorded at), oldest first. Items whose seq no longer matches the table are
    /// stale and skipped; the queue is compacted when stale items make up half of it.
    ages: VecDeque<(RequestId, u64, Nanos)>,
    /// When the front of `ages` is old enough to expire (`u64::MAX` when `ages` is empty): kept
    /// in step with the front, so that the check every response makes is one compare.
    expire_at: Nanos,
    requests_max: usize,
    age_max: Nanos,
    next_seq: u64,
    stats: InflightStats,
}

impl InflightRequests {
    /// A table of at most `requests_max` entries (at least 1), each kept at most `age_max`.
    pub fn new(requests_max: usize, age_max: Nanos) -> Self {
        let requests_max = requests_max.max(1);
        InflightRequests {
            // Grown as needed, not allocated at the bound: a table allocated for its bound
            // becomes resident page by page as random slots are written, which looks like (and
            // for the operator is) memory growth.
            entries: hashbrown::HashTable::with_capacity(requests_max.min(1 << 10)),
            hasher: foldhash::fast::RandomState::default(),
            ages: VecDeque::with_capacity(requests_max.min(1 << 10)),
            expire_at: Nanos::MAX,
            requests_max,
            age_max,
            next_seq: 0,
            stats: InflightStats::default(),
        }
    }

    /// Records the level a request was given.
    pub fn record(&mut self, id: RequestId, level: Level, mode: Mode, now: Nanos) {
        self.expire(now);
        let hash = self.hasher.hash_one(id);
        if self.entries.find(hash, |(k, _)| *k == id).is_none() {
            while self.entries.len() >= self.requests_max {
                if !self.evict_oldest() {
                    break;
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = Inflight {
            level,
            keep_after_response: mode == Mode::FutureDated,
            seq,
        };
        let hasher = &self.hasher;
        match self
            .entries
            .entry(hash, |(k, _)| *k == id, |(k, _)| hasher.hash_one(k))
        {
            hashbrown::hash_table::Entry::Occupied(mut e) => e.get_mut().1 = entry,
            hashbrown::hash_table::Entry::Vacant(e) => drop(e.insert((id, entry))),
        }
        self.ages.push_back((id, seq, now));
        self.stats.recorded += 1;
        if self.ages.len() > 2 * self.requests_max {
            let (entries, hasher) = (&self.entries, &self.hasher);
            self.ages.retain(|(id, seq, _)| {
                entries
                    .find(hasher.hash_one(id), |(k, _)| k == id)
                    .is_some_and(|(_, e)| e.seq == *seq)
            });
        }
        self.front_moved();
    }

    /// The level recorded for a response's request, forgetting it unless more responses are due.
    pub fn take(&mut self, id: &RequestId, now: Nanos) -> Option<Level> {
        self.expire(now);
        let hash = self.hasher.hash_one(id);
        let found = match self.entries.find_entry(hash, |(k, _)| k == id) {
            Ok(e) if e.get().1.keep_after_response => Some(e.get().1.level),
            Ok(e) => Some(e.remove().0 .1.level),
            Err(_) => None,
        };
        match found {
            Some(_) => self.stats.inherited += 1,
            None => self.stats.unknown += 1,
        }
        found
    }

    /// Drops entries older than the expiry age.
    #[inline]
    pub fn expire(&mut self, now: Nanos) {
        // The usual case, nothing old enough, is one compare, inline: every response asks.
        if now >= self.expire_at {
            self.expire_oldest(now);
        }
    }

    /// Sets `expire_at` from the front of `ages`, after anything that may have changed it.
    fn front_moved(&mut self) {
        self.expire_at = match self.ages.front() {
            None => Nanos::MAX,
            // With no age allowed, everything is old enough whatever the clock says.
            Some(_) if self.age_max == 0 => 0,
            // Never later than the front's expiry, so none is missed; `expire_oldest` checks
            // the age itself.
            Some(&(_, _, at)) => at.saturating_add(self.age_max),
        };
    }

    /// [`Self::expire`]'s loop, once the oldest entry is known to be old enough.
    #[inline(never)]
    fn expire_oldest(&mut self, now: Nanos) {
        while let Some(&(id, seq, at)) = self.ages.front() {
            if now.saturating_sub(at) < self.age_max {
                break;
            }
            self.ages.pop_front();
            if self.remove_if_current(&id, seq) {
                self.stats.expired += 1;
            }
        }
        self.front_moved();
    }

    fn evict_oldest(&mut self) -> bool {
        let evicted = self.evict_oldest_entry();
        self.front_moved();
        evicted
    }

    fn evict_oldest_entry(&mut self) -> bool {
        while let Some((id, seq, _)) = self.ages.pop_front() {
            if self.remove_if_current(&id, seq) {
                self.stats.evicted_full += 1;
                let n = self.stats.evicted_full;
                if n.is_power_of_two() {
                    tracing::warn!(
                        evicted = n,
                        requests_max = self.requests_max,
                        "in-flight request table full: evicting the oldest requests; their responses will be classified by their own SRV and mode"
                    );
                }
                return true;
            }
        }
        false
    }

    fn remove_if_current(&mut self, id: &RequestId, seq: u64) -> bool {
        let hash = self.hasher.hash_one(id);
        match self.entries.find_entry(hash, |(k, _)| k == id) {
            Ok(e) if e.get().1.seq == seq => {
                e.remove();
                true
            }
            _ => false,
        }
    }

    /// Counters, for metrics.
    pub fn stats(&self) -> InflightStats {
        InflightStats {
            tracked: self.entries.len(),
            ..self.stats
        }
    }
}

/// Where a message's level came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelSource {
    /// The REQUEST rules.
    Rules,
    /// A RESPONSE, from its request's recorded level.
    Inherited,
    /// A RESPONSE to a DCC-scheduled request.
    Scheduled,
    /// An alert code's level.
    Alert,
    /// A STORM_SUMMARY: always the lowest level.
    StormSummary,
}

/// One worker's classifier: the current rules snapshot and the in-flight request table.
#[derive(Debug)]
pub struct Classifier {
    rules: Arc<Rules>,
    inflight: InflightRequests,
}

impl Classifier {
    /// A classifier with these rules and an in-flight table of the given bounds.
    pub fn new(rules: Arc<Rules>, requests_max: usize, age_max: Nanos) -> Self {
        Classifier {
            rules,
            inflight: InflightRequests::new(requests_max, age_max),
        }
    }

    /// Swaps in a new rules snapshot. Messages already classified keep their level, and so do
    /// responses to requests recorded before the swap.
    pub fn set_rules(&mut self, rules: Arc<Rules>) {
        self.rules = rules;
    }

    /// The current snapshot.
    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// Classifies a REQUEST and records its level for its response.
    pub fn request(&mut self, id: RequestId, srv: Srv, mode: Mode, now: Nanos) -> Level {
        let level = self.rules.request_level(srv, mode);
        // A DCC-scheduled request's responses are routine whatever the request was.
        let response_level = match mode {
            Mode::DccScheduled => self.rules.scheduled_response_level,
            _ => level,
        };
        self.inflight.record(id, response_level, mode, now);
        level
    }

    /// Classifies a RESPONSE: its request's level if known, else by its own SRV and mode.
    pub fn response(
        &mut self,
        id: RequestId,
        srv: Srv,
        mode: Mode,
        now: Nanos,
    ) -> (Level, LevelSource) {
        match self.inflight.take(&id, now) {
            Some(level) => (level, LevelSource::Inherited),
            None if mode == Mode::DccScheduled => {
                (self.rules.scheduled_response_level, LevelSource::Scheduled)
            }
            None => (self.rules.request_level(srv, mode), LevelSource::Rules),
        }
    }

    /// A RESPONSE's request level, if its request is in the in-flight table (taken out): the
    /// owner's half of classifying a response, whose rules half was done at intake
    /// ([`Rules::unknown_response_level`]).
    pub fn inherit(&mut self, id: &RequestId, now: Nanos) -> Option<Level> {
        self.inflight.take(id, now)
    }

    /// Classifies a DEVICE_ALERT or DCC_ALERT by its code.
    pub fn alert(&self, code: u16) -> Level {
        self.rules.alert_level(code)
    }

    /// The level of a STORM_SUMMARY: the lowest.
    pub fn storm_summary(&self) -> Level {
        self.rules.lowest()
    }

    /// Drops expired in-flight entries; call from the worker's timer.
    pub fn expire(&mut self, now: Nanos) {
        self.inflight.expire(now);
    }

    /// In-flight table counters.
    pub fn inflight_stats(&self) -> InflightStats {
        self.inflight.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const SEC: Nanos = crate::NANOS_PER_SEC;

    fn rules(text: &str) -> Arc<Rules> {
        let config = Config::from_toml_with_env(text, |_| None).unwrap();
        Arc::new(Rules::new(&config.priority))
    }

    fn srv(s: &str) -> Srv {
        s.parse().unwrap()
    }

    fn lvl(n: u8) -> Level {
        Level::new(n).unwrap()
    }

    fn id(counter: u64) -> RequestId {
        RequestId {
            su: Eui64(0x90B3_D51F_3001_0000),
            device: Eui64(0x00DB_1234_5678_90A0),
            counter,
        }
    }

    const RULES: &str = r#"
[engine]
levels = 5
[priority]
default_level = 5
alert_level = 3
rules = [
  { srv = "2.2", level = 1 },
  { srv = "7.*", level = 2 },
  { srv = "7.1", level = 1 },
  { srv = "4.1.1", mode = "on-demand", level = 3 },
  { srv = "4.1.1", level = 4 },
  { srv = "8.1.*", level = 2 },
  { srv = "8.*", mode = "future-dated", level = 3 },
  { srv = "6.*", mode = "dcc-scheduled", level = 4 },
]
high_priority_alerts = [ { code = 0x8F1C, level = 1 }, { code = 0x8F75, level = 2 } ]
"#;

    #[test]
    fn exact_srv_beats_prefix_and_mode_beats_any() {
        let r = rules(RULES);
        assert_eq!(r.request_level(srv("2.2"), Mode::OnDemand), lvl(1));
        assert_eq!(
            r.request_level(srv("7.1"), Mode::OnDemand),
            lvl(1),
            "exact 7.1 over 7.*"
        );
        assert_eq!(
            r.request_level(srv("7.2"), Mode::OnDemand),
            lvl(2),
            "prefix 7.*"
        );
        assert_eq!(
            r.request_level(srv("7.1.5"), Mode::OnDemand),
            lvl(2),
            "7.1.5 is not 7.1"
        );
        assert_eq!(
            r.request_level(srv("4.1.1"), Mode::OnDemand),
            lvl(3),
            "mode-specific rule"
        );
        assert_eq!(
            r.request_level(srv("4.1.1"), Mode::FutureDated),
            lvl(4),
            "any-mode rule"
        );
        assert_eq!(
            r.request_level(srv("8.1.1"), Mode::FutureDated),
            lvl(2),
            "8.1.* over 8.* even with mode"
        );
        assert_eq!(
            r.request_level(srv("8.2"), Mode::FutureDated),
            lvl(3),
            "8.* future-dated"
        );
        assert_eq!(
            r.request_level(srv("8.2"), Mode::OnDemand),
            lvl(5),
            "8.* names a mode: default"
        );
        assert_eq!(r.request_level(srv("6.1"), Mode::DccScheduled), lvl(4));
        assert_eq!(r.request_level(srv("6.1"), Mode::OnDemand), lvl(5));
        assert_eq!(
            r.request_level(srv("11.2"), Mode::OnDemand),
            lvl(5),
            "no rule: default"
        );
        assert_eq!(r.request_level(Srv(0x00FF_FFFF), Mode::OnDemand), lvl(5));
    }

    #[test]
    fn alerts_by_code() {
        let r = rules(RULES);
        assert_eq!(r.alert_level(0x8F1C), lvl(1));
        assert_eq!(r.alert_level(0x8F75), lvl(2));
        assert_eq!(r.alert_level(0x8F35), lvl(3), "alert_level");
        assert_eq!(r.alert_level(0), lvl(3));
        assert_eq!(r.alert_level(0xFFFF), lvl(3));
        assert_eq!(r.lowest(), lvl(5));
    }

    #[test]
    fn response_inherits_its_request_level_across_a_reload() {
        let mut c = Classifier::new(rules(RULES), 16, 3600 * SEC);
        assert_eq!(c.request(id(1), srv("4.1.1"), Mode::OnDemand, 0), lvl(3));
        // The rules change: 4.1.1 on-demand is now level 1.
        c.set_rules(rules(&RULES.replace(
            "mode = \"on-demand\", level = 3",
            "mode = \"on-demand\", level = 1",
        )));
        assert_eq!(
            c.request(id(2), srv("4.1.1"), Mode::OnDemand, SEC),
            lvl(1),
            "new traffic, new rules"
        );
        assert_eq!(
            c.response(id(1), srv("4.1.1"), Mode::OnDemand, 2 * SEC),
            (lvl(3), LevelSource::Inherited),
            "the old request keeps its level"
        );
        assert_eq!(
            c.response(id(2), srv("4.1.1"), Mode::OnDemand, 2 * SEC),
            (lvl(1), LevelSource::Inherited)
        );
        // Answered: forgotten, so a second response falls back to the rules.
        assert_eq!(
            c.response(id(1), srv("4.1.1"), Mode::OnDemand, 3 * SEC),
            (lvl(1), LevelSource::Rules)
        );
        let s = c.inflight_stats();
        assert_eq!(
            (s.tracked, s.recorded, s.inherited, s.unknown),
            (0, 2, 2, 1)
        );
    }

    #[test]
    fn scheduled_and_unknown_responses() {
        let mut c = Classifier::new(rules(RULES), 16, 3600 * SEC);
        // A DCC-scheduled request of a level-1 SRV: its responses are routine.
        assert_eq!(c.request(id(1), srv("2.2"), Mode::DccScheduled, 0), lvl(1));
        assert_eq!(
            c.response(id(1), srv("2.2"), Mode::DccScheduled, 1),
            (lvl(5), LevelSource::Inherited)
        );
        assert_eq!(
            c.response(id(9), srv("2.2"), Mode::DccScheduled, 1),
            (lvl(5), LevelSource::Scheduled)
        );
        assert_eq!(
            c.response(id(9), srv("2.2"), Mode::OnDemand, 1),
            (lvl(1), LevelSource::Rules)
        );
    }

    #[test]
    fn future_dated_requests_stay_for_their_second_response() {
        let mut c = Classifier::new(rules(RULES), 16, 10 * SEC);
        c.request(id(1), srv("8.2"), Mode::FutureDated, 0);
        c.set_rules(rules(
            "[engine]\nlevels = 5\n[priority]\ndefault_level = 5\n",
        ));
        assert_eq!(
            c.response(id(1), srv("8.2"), Mode::FutureDated, SEC).0,
            lvl(3)
        );
        assert_eq!(
            c.response(id(1), srv("8.2"), Mode::FutureDated, 2 * SEC).0,
            lvl(3)
        );
        // …until it expires.
        assert_eq!(
            c.response(id(1), srv("8.2"), Mode::FutureDated, 10 * SEC).0,
            lvl(5)
        );
        assert_eq!(c.inflight_stats().expired, 1);
    }

    #[test]
    fn entries_expire_at_exactly_their_age() {
        let mut t = InflightRequests::new(16, 10 * SEC);
        t.record(id(1), lvl(2), Mode::OnDemand, 0);
        t.record(id(2), lvl(2), Mode::OnDemand, SEC);
        t.expire(10 * SEC - 1);
        assert_eq!(t.stats().tracked, 2);
        t.expire(10 * SEC);
        assert_eq!(t.stats().tracked, 1);
        assert_eq!(t.take(&id(1), 10 * SEC), None);
        assert_eq!(t.take(&id(2), 10 * SEC), Some(lvl(2)));
        assert_eq!(t.stats().expired, 1);
    }

    #[test]
    fn the_expiry_instant_follows_the_front_of_the_age_queue() {
        // Records, answers, evictions (a table of 4), compactions and expiries, with a clock
        // that now and then steps back: after each, the cached instant is the front's.
        for age in [0, 5, 40] {
            let mut t = InflightRequests::new(4, age);
            let mut now: Nanos = 100;
            for n in 0..2_000u64 {
                let x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
                now = if x % 17 == 0 { now - 3 } else { now + x % 4 };
                match x % 5 {
                    0 | 1 => t.record(id(x % 9), lvl(1), Mode::OnDemand, now),
                    2 => t.record(id(x % 9), lvl(1), Mode::FutureDated, now),
                    3 => drop(t.take(&id(x % 9), now)),
                    _ => t.expire(now),
                }
                let front = t.ages.front().map(|&(_, _, at)| at);
                let want = match front {
                    None => Nanos::MAX,
                    Some(_) if age == 0 => 0,
                    Some(at) => at + age,
                };
                assert_eq!(t.expire_at, want, "age {age}, step {n}");
                // Nothing left that the old check would have expired.
                t.expire(now);
                if let Some(&(_, _, at)) = t.ages.front() {
                    assert!(now.saturating_sub(at) < age, "age {age}, step {n}");
                }
            }
        }
    }

    #[test]
    fn a_full_table_evicts_the_oldest_and_counts_it() {
        let mut t = InflightRequests::new(3, 3600 * SEC);
        for n in 1..=5 {
            t.record(id(n), lvl(1), Mode::OnDemand, n);
        }
        let s = t.stats();
        assert_eq!((s.tracked, s.evicted_full), (3, 2));
        assert_eq!(t.take(&id(1), 6), None);
        assert_eq!(t.take(&id(2), 6), None);
        assert_eq!(t.take(&id(3), 6), Some(lvl(1)));
        // Re-recording a known id does not evict anything.
        t.record(id(4), lvl(2), Mode::OnDemand, 7);
        assert_eq!(t.stats().evicted_full, 2);
        assert_eq!(t.take(&id(4), 8), Some(lvl(2)));
    }

    #[test]
    fn the_age_queue_stays_bounded_when_requests_are_answered() {
        let mut t = InflightRequests::new(4, 3600 * SEC);
        for n in 0..10_000 {
            t.record(id(n), lvl(1), Mode::OnDemand, n);
            assert_eq!(t.take(&id(n), n), Some(lvl(1)));
            assert!(
                t.ages.len() <= 2 * 4 + 1,
                "age queue grew to {}",
                t.ages.len()
            );
        }
        // A retransmitted request id replaces its entry without growing the table.
        for _ in 0..100 {
            t.record(id(1), lvl(1), Mode::OnDemand, 20_000);
        }
        assert_eq!(t.stats().tracked, 1);
        assert!(t.ages.len() <= 9);
    }

    #[test]
    fn storm_summaries_are_lowest() {
        let c = Classifier::new(rules(RULES), 1, SEC);
        assert_eq!(c.storm_summary(), lvl(5));
        assert_eq!(c.alert(0x8F1C), lvl(1));
    }
}

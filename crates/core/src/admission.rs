//! Admission of connections that have not finished their HELLO, the delay on failed HELLOs, and
//! the rate limit on refusal log lines (issue 13, `docs/admission.md`).
//!
//! Sans-IO like the rest of the core: every decision takes `now` and returns what to do; the
//! acceptor only moves bytes. Three pieces:
//!
//! * [`HandshakeTable`]: every connection between accept and its HELLO's answer. At most
//!   `per_address_max` from one source address and `pending_max` in all. A newcomer is **always**
//!   admitted: when a cap is reached, an older entry is evicted instead (an already answered one
//!   first, then the oldest of the address holding most). A peer that connects and sends HELLO
//!   at once is in the table for microseconds, so idle connections, however many and from
//!   however many addresses, cannot keep it out: they are the ones evicted.
//! * [`HelloFailures`]: bad tokens per source address. A failure is answered later and later
//!   (after a few free ones), which makes guessing slow; nothing here ever refuses a HELLO
//!   before its token was checked, so the right token always gets in.
//! * [`LogLimiter`]: at most one log line per interval per reason, with the count of lines
//!   left out since the last one.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::collections::HashMap;
use std::net::IpAddr;

use crate::{Nanos, NANOS_PER_SEC};

/// The limits of a [`HandshakeTable`], validated by the config (`[listen]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// `handshakes_pending_max`: connections waiting for (or being refused after) their HELLO.
    pub pending_max: usize,
    /// `handshakes_per_address_max`: of those, from one source address.
    pub per_address_max: usize,
    /// `hello_deadline_ms`: how long a connection has to send its HELLO.
    pub hello_deadline: Nanos,
}

/// Why an entry was evicted to make room for a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Its address already had `per_address_max` entries.
    AddressFull,
    /// The table had `pending_max` entries.
    TableFull,
}

/// An entry evicted by [`HandshakeTable::admit`].
#[derive(Debug)]
pub struct Evicted<T> {
    /// What the caller stored.
    pub item: T,
    /// Why it had to go.
    pub why: Eviction,
    /// Whether it had been answered already (refused and lingering): then it is owed nothing.
    pub answered: bool,
}

#[derive(Debug)]
struct Entry<T> {
    ip: IpAddr,
    since: Nanos,
    deadline: Nanos,
    answered: bool,
    item: T,
}

/// The connections that have not finished their HELLO; see the module docs.
#[derive(Debug)]
pub struct HandshakeTable<T> {
    limits: HandshakeLimits,
    slots: Vec<Option<Entry<T>>>,
    free: Vec<usize>,
    live: usize,
    per_address: HashMap<IpAddr, usize>,
}

impl<T> HandshakeTable<T> {
    /// An empty table. Limits of 0 are read as 1.
    pub fn new(limits: HandshakeLimits) -> HandshakeTable<T> {
        let limits = HandshakeLimits {
            pending_max: limits.pending_max.max(1),
            per_address_max: limits.per_address_max.max(1),
            ..limits
        };
        HandshakeTable {
            limits,
            slots: Vec::with_capacity(limits.pending_max),
            free: Vec::with_capacity(limits.pending_max),
            live: 0,
            per_address: HashMap::with_capacity(limits.pending_max.min(4096)),
        }
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Entries from `ip`.
    pub fn pending_of(&self, ip: IpAddr) -> usize {
        self.per_address.get(&ip).copied().unwrap_or(0)
    }

    /// Admits a new connection from `ip`, evicting an older entry if a cap is reached. Returns
    /// the newcomer's slot (stable until [`HandshakeTable::remove`]) and what was evicted.
    pub fn admit(&mut self, ip: IpAddr, now: Nanos, item: T) -> (usize, Option<Evicted<T>>) {
        let evicted = if self.pending_of(ip) >= self.limits.per_address_max {
            self.victim(Some(ip))
                .and_then(|slot| self.take(slot))
                .map(|e| (e, Eviction::AddressFull))
        } else if self.live >= self.limits.pending_max {
            self.victim(None)
                .and_then(|slot| self.take(slot))
                .map(|e| (e, Eviction::TableFull))
        } else {
            None
        };
        let entry = Entry {
            ip,
            since: now,
            deadline: now.saturating_add(self.limits.hello_deadline),
            answered: false,
            item,
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(entry);
        }
        self.live += 1;
        *self.per_address.entry(ip).or_insert(0) += 1;
        let evicted = evicted.map(|(e, why)| Evicted {
            item: e.item,
            why,
            answered: e.answered,
        });
        (slot, evicted)
    }

    /// The entry to evict: among `ip`'s entries (or, with `None`, among those of the address
    /// holding most), an answered one first, else the oldest. Linear in the table's size, which
    /// is bounded by `pending_max`; it runs only when a cap is reached.
    fn victim(&self, ip: Option<IpAddr>) -> Option<usize> {
        let answered = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i, e)))
            .filter(|(_, e)| e.answered && ip.is_none_or(|ip| e.ip == ip))
            .min_by_key(|(_, e)| e.since)
            .map(|(i, _)| i);
        if answered.is_some() {
            return answered;
        }
        let most = match ip {
            Some(_) => None,
            None => self.per_address.values().copied().max(),
        };
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i, e)))
            .filter(|(_, e)| match (ip, most) {
                (Some(ip), _) => e.ip == ip,
                (None, Some(most)) => self.pending_of(e.ip) == most,
                (None, None) => true,
            })
            .min_by_key(|(_, e)| e.since)
            .map(|(i, _)| i)
    }

    fn take(&mut self, slot: usize) -> Option<Entry<T>> {
        let entry = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        self.live -= 1;
        if let Some(n) = self.per_address.get_mut(&entry.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&entry.ip);
            }
        }
        Some(entry)
    }

    /// Removes an entry (handed to a worker, closed, expired), giving back what was stored.
    pub fn remove(&mut self, slot: usize) -> Option<T> {
        self.take(slot).map(|e| e.item)
    }

    /// What is stored in `slot`.
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.slots
            .get_mut(slot)
            .and_then(Option::as_mut)
            .map(|e| &mut e.item)
    }

    /// Marks an entry answered (refused, or its answer delayed) until `deadline`: it is the
    /// first to be evicted, and [`HandshakeTable::expired`] reports it at `deadline`.
    pub fn answered(&mut self, slot: usize, deadline: Nanos) {
        if let Some(e) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            e.answered = true;
            e.deadline = deadline;
        }
    }

    /// The earliest deadline in the table.
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.slots.iter().flatten().map(|e| e.deadline).min()
    }

    /// Appends the slots whose deadline is at or before `now` to `out`.
    pub fn expired(&self, now: Nanos, out: &mut Vec<usize>) {
        out.extend(
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, e)| e.as_ref().is_some_and(|e| e.deadline <= now))
                .map(|(i, _)| i),
        );
    }
}

/// Failed HELLOs before the answers to further failures are delayed.
pub const HELLO_FAILURES_FREE: u32 = 3;
/// Longest delay of the answer to a failed HELLO (the delay doubles from 1 s).
pub const HELLO_FAILURE_DELAY_MAX: Nanos = 8 * NANOS_PER_SEC;
/// A source address with no failure for this long starts afresh.
pub const HELLO_FAILURE_MEMORY: Nanos = 600 * NANOS_PER_SEC;
/// Addresses whose failures are remembered at once.
pub const HELLO_FAILURE_ADDRESSES_MAX: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Nanos,
}

/// Failed HELLOs per source address; see the module docs.
///
/// Only failures are remembered and only their answers delayed: a HELLO is always checked, and
/// a right token is always accepted, whatever its address did before. A success does not reset
/// the count either, so a peer sharing an address (NAT) with a guesser does not undo its delay.
#[derive(Debug, Default)]
pub struct HelloFailures {
    by_address: HashMap<IpAddr, Failures>,
}

impl HelloFailures {
    /// No failures yet.
    pub fn new() -> HelloFailures {
        HelloFailures::default()
    }

    /// Records a failed HELLO from `ip`; returns how long to wait before answering it.
    pub fn failed(&mut self, ip: IpAddr, now: Nanos) -> Nanos {
        if !self.by_address.contains_key(&ip)
            && self.by_address.len() >= HELLO_FAILURE_ADDRESSES_MAX
        {
            self.by_address
                .retain(|_, f| now.saturating_sub(f.last) < HELLO_FAILURE_MEMORY);
            if self.by_address.len() >= HELLO_FAILURE_ADDRESSES_MAX {
                // Failures from more addresses than can be remembered: a distributed guesser.
                // Delaying a failure costs a real peer nothing, so it gets the longest delay.
                return HELLO_FAILURE_DELAY_MAX;
            }
        }
        let f = self.by_address.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.saturating_sub(f.last) >= HELLO_FAILURE_MEMORY {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count <= HELLO_FAILURES_FREE {
            return 0;
        }
        let shift = (f.count - HELLO_FAILURES_FREE - 1).min(16);
        (NANOS_PER_SEC << shift).min(HELLO_FAILURE_DELAY_MAX)
    }

    /// Failures remembered for `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.by_address.get(&ip).map_or(0, |f| f.count)
    }
}

/// At most one log line per `interval` for each of `N` reasons; see the module docs.
#[derive(Debug)]
pub struct LogLimiter<const N: usize> {
    interval: Nanos,
    last: [Option<Nanos>; N],
    suppressed: [u64; N],
    suppressed_total: u64,
}

impl<const N: usize> LogLimiter<N> {
    /// A limiter letting one line per `interval` through for each reason.
    pub fn new(interval: Nanos) -> LogLimiter<N> {
        LogLimiter {
            interval,
            last: [None; N],
            suppressed: [0; N],
            suppressed_total: 0,
        }
    }

    /// Whether a line for `reason` may be written now: `Some(n)` with the lines left out since
    /// the last one, or `None` (and the line is counted as left out). A reason beyond `N` is
    /// always let through.
    pub fn allow(&mut self, reason: usize, now: Nanos) -> Option<u64> {
        let (Some(last), Some(suppressed)) =
            (self.last.get_mut(reason), self.suppressed.get_mut(reason))
        else {
            return Some(0);
        };
        match *last {
            Some(t) if now.saturating_sub(t) < self.interval => {
                *suppressed += 1;
                self.suppressed_total += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }

    /// Lines left out since the start.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn table(pending_max: usize, per_address_max: usize) -> HandshakeTable<u32> {
        HandshakeTable::new(HandshakeLimits {
            pending_max,
            per_address_max,
            hello_deadline: 3_000 * MS,
        })
    }

    #[test]
    fn up_to_the_caps_nothing_is_evicted() {
        let mut t = table(4, 2);
        for (n, addr) in [1, 1, 2, 2].into_iter().enumerate() {
            let (_, evicted) = t.admit(ip(addr), n as Nanos, n as u32);
            assert!(evicted.is_none());
        }
        assert_eq!(t.len(), 4);
        assert_eq!(t.pending_of(ip(1)), 2);
    }

    #[test]
    fn an_address_at_its_cap_loses_its_oldest_not_the_newcomer() {
        let mut t = table(100, 2);
        t.admit(ip(1), 0, 10);
        t.admit(ip(1), 1, 11);
        t.admit(ip(2), 2, 20);
        let (slot, evicted) = t.admit(ip(1), 3, 12);
        let evicted = evicted.unwrap();
        assert_eq!((evicted.item, evicted.why), (10, Eviction::AddressFull));
        assert_eq!(t.get_mut(slot).copied(), Some(12));
        assert_eq!(t.pending_of(ip(1)), 2);
        assert_eq!(t.pending_of(ip(2)), 1, "another address is not touched");
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn a_full_table_evicts_from_the_address_holding_most() {
        let mut t = table(4, 4);
        t.admit(ip(9), 0, 90); // the oldest, but alone on its address
        t.admit(ip(1), 1, 10);
        t.admit(ip(1), 2, 11);
        t.admit(ip(1), 3, 12);
        let (_, evicted) = t.admit(ip(2), 4, 20);
        let evicted = evicted.unwrap();
        assert_eq!((evicted.item, evicted.why), (10, Eviction::TableFull));
        assert_eq!(t.len(), 4);
        assert_eq!(t.pending_of(ip(9)), 1);
    }

    #[test]
    fn answered_entries_go_first() {
        let mut t = table(3, 3);
        t.admit(ip(1), 0, 10);
        t.admit(ip(1), 1, 11);
        let (late, _) = t.admit(ip(2), 2, 20);
        t.answered(late, 5_000 * MS);
        let (_, evicted) = t.admit(ip(3), 3, 30);
        let evicted = evicted.unwrap();
        assert_eq!((evicted.item, evicted.answered), (20, true));
    }

    #[test]
    fn a_table_of_one_always_admits_the_newcomer() {
        let mut t = table(1, 1);
        for n in 0..10u32 {
            let (slot, evicted) = t.admit(ip(n as u8), n as Nanos, n);
            assert_eq!(evicted.map(|e| e.item), n.checked_sub(1));
            assert_eq!(t.get_mut(slot).copied(), Some(n));
            assert_eq!(t.len(), 1);
        }
    }

    #[test]
    fn deadlines_expire_and_slots_are_reused() {
        let mut t = table(8, 8);
        let (a, _) = t.admit(ip(1), 0, 1);
        let (b, _) = t.admit(ip(1), 1_000 * MS, 2);
        assert_eq!(t.next_deadline(), Some(3_000 * MS));
        let mut out = Vec::new();
        t.expired(3_000 * MS - 1, &mut out);
        assert!(out.is_empty());
        t.expired(3_000 * MS, &mut out);
        assert_eq!(out, vec![a]);
        assert_eq!(t.remove(a), Some(1));
        assert_eq!(t.remove(a), None, "removed once");
        let (c, _) = t.admit(ip(2), 2_000 * MS, 3);
        assert_eq!(c, a, "the slot is reused");
        t.answered(b, 1_500 * MS);
        assert_eq!(t.next_deadline(), Some(1_500 * MS));
        assert_eq!(t.pending_of(ip(1)), 1);
    }

    #[test]
    fn failures_are_free_then_delayed_then_capped() {
        let mut f = HelloFailures::new();
        let a = ip(1);
        for _ in 0..HELLO_FAILURES_FREE {
            assert_eq!(f.failed(a, 0), 0);
        }
        assert_eq!(f.failed(a, 0), NANOS_PER_SEC);
        assert_eq!(f.failed(a, 0), 2 * NANOS_PER_SEC);
        for _ in 0..100 {
            assert!(f.failed(a, 0) <= HELLO_FAILURE_DELAY_MAX);
        }
        assert_eq!(f.failed(a, 0), HELLO_FAILURE_DELAY_MAX);
        assert_eq!(f.failed(ip(2), 0), 0, "other addresses are not touched");
        // A quiet address starts afresh.
        assert_eq!(f.failed(a, HELLO_FAILURE_MEMORY), 0);
        assert_eq!(f.count(a), 1);
    }

    #[test]
    fn failures_from_too_many_addresses_get_the_longest_delay() {
        let mut f = HelloFailures::new();
        for i in 0..HELLO_FAILURE_ADDRESSES_MAX as u32 {
            assert_eq!(f.failed(IpAddr::from(i.to_be_bytes()), 0), 0);
        }
        let newcomer = IpAddr::from([10, 255, 255, 255]);
        assert_eq!(f.failed(newcomer, 1), HELLO_FAILURE_DELAY_MAX);
        // Once the old ones are forgotten there is room again.
        assert_eq!(f.failed(newcomer, HELLO_FAILURE_MEMORY + 1), 0);
    }

    #[test]
    fn log_lines_are_limited_per_reason_with_a_count() {
        let mut l = LogLimiter::<2>::new(1_000 * MS);
        assert_eq!(l.allow(0, 0), Some(0));
        assert_eq!(l.allow(0, 10 * MS), None);
        assert_eq!(l.allow(0, 999 * MS), None);
        assert_eq!(l.allow(1, 999 * MS), Some(0), "reasons are apart");
        assert_eq!(l.allow(0, 1_000 * MS), Some(2));
        assert_eq!(l.allow(0, 1_001 * MS), None);
        assert_eq!(l.suppressed_total(), 3);
        assert_eq!(
            l.allow(7, 0),
            Some(0),
            "an unknown reason is never silenced"
        );
    }
}

//! The lease as one node sees it: a sans-IO state machine driven by explicit time.
//!
//! PostgreSQL holds the lease (one row: the node, its epoch, when it expires, by the server's
//! clock; [`crate::pg`]). This side decides when to ask for it and when to renew it, and, the
//! part that keeps two nodes from delivering at once, until when the node may still act on it.
//!
//! # Until when a node may act
//!
//! A renewal sets the row's expiry to the server's clock at the update plus the lease. The
//! update runs after the node sent it, so the row cannot expire, and no other node can take
//! the lease, before `sent + lease` in real time. The node acts only until
//! `sent + lease - lease / SAFETY_DIVISOR` on its own monotonic clock: the tenth is for the two
//! clocks running at different rates. A node that was stopped (SIGSTOP, a long pause) and
//! wakes past that instant acts on nothing until a renewal says the lease is still its own: a
//! renewal names the epoch, and a takeover raised it, so after a takeover the renewal fails
//! and the node is [`Role::Fenced`], for good.
//!
//! What this assumes of the clocks: the node's monotonic clock and the server's wall clock run
//! at rates within 10 % of each other, and the server's clock is not stepped forward by more
//! than the margin while a lease runs (NTP slews small errors; `docs/ha.md`).

use crate::Nanos;

/// The bounds of `lease_ms`, with the configuration's other limits.
pub use dsplane_core::limits::{LEASE_MS_MAX, LEASE_MS_MIN};
/// Renewals per lease: the active renews every `lease / RENEWS_PER_LEASE`, so that two renewals
/// can fail before it must stop acting.
pub const RENEWS_PER_LEASE: u64 = 3;
/// The part of the lease a node gives up to clock-rate differences: it acts until
/// `sent + lease - lease / SAFETY_DIVISOR`.
pub const SAFETY_DIVISOR: u64 = 10;
/// After a failed request (PostgreSQL unreachable), the next try comes after
/// `lease / RETRY_DIVISOR`.
pub const RETRY_DIVISOR: u64 = 10;

const NANOS_PER_MS: u64 = 1_000_000;

/// A `lease_ms` outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[cluster] lease_ms = {0}: must be from {LEASE_MS_MIN} to {LEASE_MS_MAX} ms")]
pub struct LeaseMsOutOfRange(pub u64);

/// A `lease_ms` within its bounds: what both the lease's state machine and its SQL
/// ([`crate::pg::Db::try_acquire`], [`crate::pg::Db::renew`]) take, so that they cannot disagree
/// or be handed an unchecked value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseMs(u64);

impl LeaseMs {
    /// `ms`, if it is from [`LEASE_MS_MIN`] to [`LEASE_MS_MAX`].
    ///
    /// # Errors
    ///
    /// Out of those bounds.
    pub fn new(ms: u64) -> Result<LeaseMs, LeaseMsOutOfRange> {
        if (LEASE_MS_MIN..=LEASE_MS_MAX).contains(&ms) {
            Ok(LeaseMs(ms))
        } else {
            Err(LeaseMsOutOfRange(ms))
        }
    }

    /// The milliseconds.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// What the node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not holding the lease: it asks for it from time to time.
    Standby,
    /// Holding the lease of this epoch (it may act only while [`Lease::may_act`] says so).
    Active {
        /// The lease's epoch: every write of the node carries it.
        epoch: u64,
    },
    /// Another node took the lease over (a renewal or a fenced write found a newer epoch). The
    /// node must stop: close its connections, ACK nothing more, deliver nothing more. Final.
    Fenced {
        /// The epoch it held.
        epoch: u64,
    },
}

/// Which request an answer is for ([`Lease::poll`] hands one out with each request). An answer
/// whose ticket is not the one in flight (a reply that came after its request was given up, or
/// one for an earlier request) is ignored: credited to a later request, a late "renewed" would
/// count the lease from that later send, past the instant the server set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// What the node is to ask PostgreSQL now ([`Lease::poll`]); the answer goes back with
/// [`Lease::on_acquired`], [`Lease::on_renewed`] or [`Lease::on_failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Take the lease if it has expired (a new epoch).
    Acquire,
    /// Renew the lease of this epoch.
    Renew {
        /// The epoch held.
        epoch: u64,
    },
}

/// The lease as one node sees it. See the module documentation.
#[derive(Debug, Clone)]
pub struct Lease {
    lease: Nanos,
    role: Role,
    /// The request in flight, its ticket, and when it was sent.
    in_flight: Option<(Ticket, Request, Nanos)>,
    /// The next ticket's number.
    tickets: u64,
    /// When the next request is due.
    next_at: Nanos,
    /// While active: the node may act before this instant.
    valid_until: Nanos,
}

impl Lease {
    /// A standby's lease of `lease`, its first request due at once.
    pub fn new(lease: LeaseMs) -> Lease {
        Lease {
            lease: lease.get() * NANOS_PER_MS,
            role: Role::Standby,
            in_flight: None,
            tickets: 0,
            next_at: 0,
            valid_until: 0,
        }
    }

    /// The instant before which the node may act, while active (0 otherwise): what the node's
    /// [`crate::gate::Gate`] is set to.
    pub fn acts_until(&self) -> Nanos {
        match self.role {
            Role::Active { .. } => self.valid_until,
            _ => 0,
        }
    }

    /// What the node is now.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The epoch held, while active (whether or not it may act now).
    pub fn epoch(&self) -> Option<u64> {
        match self.role {
            Role::Active { epoch } => Some(epoch),
            _ => None,
        }
    }

    /// Whether the node may act (accept HELLOs, ACK, deliver) at `now`: it holds the lease and
    /// `now` is before the instant its last renewal guarantees.
    pub fn may_act(&self, now: Nanos) -> bool {
        matches!(self.role, Role::Active { .. }) && now < self.valid_until
    }

    /// The request due at `now`, if any, with the ticket its answer must carry (one at a time;
    /// none once fenced).
    pub fn poll(&mut self, now: Nanos) -> Option<(Ticket, Request)> {
        if self.in_flight.is_some() || now < self.next_at {
            return None;
        }
        let request = match self.role {
            Role::Standby => Request::Acquire,
            Role::Active { epoch } => Request::Renew { epoch },
            Role::Fenced { .. } => return None,
        };
        let ticket = Ticket(self.tickets);
        self.tickets += 1;
        self.in_flight = Some((ticket, request, now));
        Some((ticket, request))
    }

    /// When the caller must next look at `now` or later ([`Lease::poll`], or stop acting):
    /// `None` once fenced, or while a request is in flight and nothing else falls due (its
    /// answer wakes the caller).
    pub fn next_deadline(&self, now: Nanos) -> Option<Nanos> {
        let acting_until = match self.role {
            Role::Fenced { .. } => return None,
            Role::Active { .. } if self.valid_until > now => Some(self.valid_until),
            _ => None,
        };
        let next_request = self.in_flight.is_none().then_some(self.next_at);
        match (acting_until, next_request) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
    }

    /// Takes the request in flight if `ticket` is its own and it is `kind`; else leaves it.
    fn answered(&mut self, ticket: Ticket, acquire: bool) -> Option<(Request, Nanos)> {
        match self.in_flight {
            Some((t, request, sent))
                if t == ticket && matches!(request, Request::Acquire) == acquire =>
            {
                self.in_flight = None;
                Some((request, sent))
            }
            _ => None,
        }
    }

    /// The answer to [`Request::Acquire`] of `ticket`: the new epoch, or `None` (another node
    /// holds a lease that has not expired). Ignored unless that request is in flight.
    pub fn on_acquired(&mut self, ticket: Ticket, epoch: Option<u64>, now: Nanos) {
        let Some((_, sent)) = self.answered(ticket, true) else {
            return;
        };
        match epoch {
            Some(epoch) => {
                self.role = Role::Active { epoch };
                self.renewed_at(sent);
            }
            None => self.next_at = now + self.lease / RENEWS_PER_LEASE,
        }
    }

    /// The answer to [`Request::Renew`] of `ticket`: `true` if the row still had this node's
    /// epoch. `false`: another node took over, and this one is fenced. Ignored unless that
    /// request is in flight.
    pub fn on_renewed(&mut self, ticket: Ticket, ok: bool) {
        let Some((Request::Renew { epoch }, sent)) = self.answered(ticket, false) else {
            return;
        };
        if ok {
            self.renewed_at(sent);
        } else {
            self.fence(epoch);
        }
    }

    /// The request of `ticket` failed or was given up (PostgreSQL unreachable, a timeout):
    /// tried again after `lease / RETRY_DIVISOR`. An active node keeps the lease it has, and may
    /// act until its last renewal runs out; an answer to the given-up request that comes later
    /// is ignored, even if the server did renew (that only errs towards stopping early).
    pub fn on_failed(&mut self, ticket: Ticket, now: Nanos) {
        if matches!(self.in_flight, Some((t, _, _)) if t == ticket) {
            self.in_flight = None;
            self.next_at = now + self.lease / RETRY_DIVISOR;
        }
    }

    /// A fenced write (or anything else) found a newer epoch than the one held: fenced, for
    /// good.
    pub fn on_fenced(&mut self) {
        if let Role::Active { epoch } = self.role {
            self.fence(epoch);
        }
    }

    fn fence(&mut self, epoch: u64) {
        self.role = Role::Fenced { epoch };
        self.in_flight = None;
        self.valid_until = 0;
    }

    fn renewed_at(&mut self, sent: Nanos) {
        self.valid_until = sent + self.lease - self.lease / SAFETY_DIVISOR;
        self.next_at = sent + self.lease / RENEWS_PER_LEASE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = NANOS_PER_MS;
    /// A third of a 1 s lease: when renewals come.
    const THIRD: Nanos = 1_000 * MS / RENEWS_PER_LEASE;

    /// Polls at `now` and expects `request`; its ticket.
    fn asks(l: &mut Lease, now: Nanos, request: Request) -> Ticket {
        let (ticket, got) = l.poll(now).expect("a request due");
        assert_eq!(got, request);
        ticket
    }

    fn lease(ms: u64) -> Lease {
        Lease::new(LeaseMs::new(ms).unwrap())
    }

    #[test]
    fn lease_ms_is_bounded_at_both_edges() {
        assert_eq!(LeaseMs::new(LEASE_MS_MIN).unwrap().get(), LEASE_MS_MIN);
        assert!(LeaseMs::new(LEASE_MS_MAX).is_ok());
        assert_eq!(
            LeaseMs::new(LEASE_MS_MIN - 1).unwrap_err(),
            LeaseMsOutOfRange(LEASE_MS_MIN - 1)
        );
        assert!(LeaseMs::new(0).is_err());
        let e = LeaseMs::new(LEASE_MS_MAX + 1).unwrap_err();
        assert!(e.to_string().contains("lease_ms = 60001"), "{e}");
    }

    #[test]
    fn a_standby_asks_at_once_then_every_third_of_a_lease_and_one_request_at_a_time() {
        let mut l = lease(1_000);
        let t = asks(&mut l, 0, Request::Acquire);
        assert_eq!(l.poll(1), None, "one in flight");
        assert_eq!(l.next_deadline(1), None, "the answer wakes the caller");
        l.on_acquired(t, None, 5 * MS);
        assert_eq!(l.role(), Role::Standby);
        assert!(!l.may_act(5 * MS));
        assert_eq!(l.next_deadline(5 * MS), Some(5 * MS + THIRD));
        assert_eq!(l.poll(5 * MS + THIRD - 1), None);
        asks(&mut l, 5 * MS + THIRD, Request::Acquire);
    }

    #[test]
    fn an_active_node_acts_until_its_renewal_guarantees_and_not_a_nanosecond_more() {
        let mut l = lease(1_000);
        let t = asks(&mut l, 10 * MS, Request::Acquire);
        // The answer comes late; the guarantee counts from when the request was sent.
        l.on_acquired(t, Some(7), 40 * MS);
        assert_eq!(l.role(), Role::Active { epoch: 7 });
        assert_eq!(l.epoch(), Some(7));
        let until = 10 * MS + 900 * MS;
        assert!(l.may_act(until - 1));
        assert!(!l.may_act(until));
        // Renewal due a third of a lease after the request was sent.
        assert_eq!(l.poll(10 * MS + THIRD - 1), None);
        assert_eq!(l.next_deadline(40 * MS), Some(10 * MS + THIRD));
        let t = asks(&mut l, 10 * MS + THIRD, Request::Renew { epoch: 7 });
        // In flight: the next thing due is the end of acting, not the request already sent.
        assert_eq!(l.next_deadline(10 * MS + THIRD), Some(until));
        assert_eq!(
            l.next_deadline(until),
            None,
            "nothing due before the answer"
        );
        l.on_renewed(t, true);
        assert!(l.may_act(10 * MS + THIRD + 900 * MS - 1));
        assert!(!l.may_act(10 * MS + THIRD + 900 * MS));
    }

    #[test]
    fn a_node_that_slept_past_its_lease_acts_on_nothing_and_a_failed_renewal_fences_it() {
        let mut l = lease(1_000);
        let t = asks(&mut l, 0, Request::Acquire);
        l.on_acquired(t, Some(3), MS);
        // SIGSTOP for 5 s: on waking it may not act, whatever it holds in memory.
        let woke = 5_000 * MS;
        assert!(!l.may_act(woke));
        let t = asks(&mut l, woke, Request::Renew { epoch: 3 });
        // Meanwhile another node took epoch 4: the renewal fails.
        l.on_renewed(t, false);
        assert_eq!(l.role(), Role::Fenced { epoch: 3 });
        assert!(!l.may_act(woke));
        assert_eq!(l.poll(woke + 10_000 * MS), None, "fenced is final");
        assert_eq!(l.next_deadline(woke), None);
        l.on_acquired(t, Some(9), woke);
        assert_eq!(
            l.role(),
            Role::Fenced { epoch: 3 },
            "a stray answer changes nothing"
        );
    }

    #[test]
    fn a_late_answer_is_never_credited_to_a_later_request() {
        let mut l = lease(1_000);
        let t = asks(&mut l, 0, Request::Acquire);
        l.on_acquired(t, Some(1), 0);
        // Renewal 1 is sent, times out and is given up; the server may still have run it.
        let first = asks(&mut l, THIRD, Request::Renew { epoch: 1 });
        l.on_failed(first, THIRD + 100 * MS);
        let second = asks(&mut l, THIRD + 200 * MS, Request::Renew { epoch: 1 });
        // The first one's "renewed" arrives now: ignored, and the second stays in flight.
        l.on_renewed(first, true);
        assert!(!l.may_act(900 * MS), "still counted from the acquire only");
        assert_eq!(
            l.poll(THIRD + 300 * MS),
            None,
            "the second is still in flight"
        );
        // A stray acquire answer neither ends the renewal in flight nor makes a role.
        l.on_acquired(first, Some(5), THIRD + 300 * MS);
        assert_eq!(l.role(), Role::Active { epoch: 1 });
        // A failure reported for the given-up request does not end the second either.
        l.on_failed(first, THIRD + 300 * MS);
        // The second's own answer counts, from its own send.
        l.on_renewed(second, false);
        assert_eq!(l.role(), Role::Fenced { epoch: 1 });
    }

    #[test]
    fn unreachable_postgres_is_retried_and_the_active_stops_acting_when_its_lease_runs_out() {
        let mut l = lease(1_000);
        let t = asks(&mut l, 0, Request::Acquire);
        l.on_acquired(t, Some(1), 0);
        let t = asks(&mut l, THIRD, Request::Renew { epoch: 1 });
        l.on_failed(t, 340 * MS);
        assert_eq!(l.role(), Role::Active { epoch: 1 }, "still its own");
        assert_eq!(l.poll(340 * MS + 99 * MS), None);
        let t = asks(&mut l, 440 * MS, Request::Renew { epoch: 1 });
        l.on_failed(t, 450 * MS);
        assert!(l.may_act(899 * MS));
        assert!(
            !l.may_act(900 * MS),
            "the last renewal's guarantee is spent"
        );
        // Past acting, the next thing due is the retry.
        assert_eq!(l.next_deadline(900 * MS), Some(550 * MS));
        // PostgreSQL is back and nobody took over: the renewal succeeds and it acts again.
        let t = asks(&mut l, 950 * MS, Request::Renew { epoch: 1 });
        l.on_renewed(t, true);
        assert!(l.may_act(951 * MS));
        assert!(!l.may_act(950 * MS + 900 * MS));
    }

    #[test]
    fn a_write_that_meets_a_newer_epoch_fences_the_node() {
        let mut l = lease(500);
        let t = asks(&mut l, 0, Request::Acquire);
        l.on_acquired(t, Some(2), 0);
        l.on_fenced();
        assert_eq!(l.role(), Role::Fenced { epoch: 2 });
        assert!(!l.may_act(1));
        // A standby has nothing to fence.
        let mut s = lease(500);
        s.on_fenced();
        assert_eq!(s.role(), Role::Standby);
    }
}

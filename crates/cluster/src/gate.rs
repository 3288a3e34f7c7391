//! [`Gate`]: until when this node may send anything to a peer, read before every socket write.
//!
//! The node's lease thread publishes the instant its last renewal guarantees
//! ([`crate::lease::Lease::acts_until`]); every write of a worker to a peer's socket first asks
//! [`Gate::may_act`]. A node that was stopped (SIGSTOP, a long pause) and wakes past that
//! instant therefore writes nothing, not even what its buffers hold, until a renewal says the
//! lease is still its own; after a takeover that renewal fails, and the node shuts its engine.
//! The clock is `CLOCK_BOOTTIME` ([`boottime_ns`]), which counts time the machine was suspended.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::Nanos;

/// See the module documentation. A single node without `[cluster]` has a gate that is always
/// open ([`Gate::open`]).
#[derive(Debug)]
pub struct Gate {
    /// The instant (on [`boottime_ns`]) before which the node may act; `u64::MAX`: always.
    until: AtomicU64,
}

impl Gate {
    /// Always open: a node that is not part of a cluster.
    pub fn open() -> Gate {
        Gate {
            until: AtomicU64::new(u64::MAX),
        }
    }

    /// Closed until [`Gate::set`] opens it.
    pub fn closed() -> Gate {
        Gate {
            until: AtomicU64::new(0),
        }
    }

    /// The node may act before `until` (0: not at all).
    pub fn set(&self, until: Nanos) {
        self.until.store(until, Ordering::Release);
    }

    /// Whether the node may send to a peer now.
    #[inline]
    pub fn may_act(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until == u64::MAX || boottime_ns() < until
    }
}

/// Nanoseconds on `CLOCK_BOOTTIME`: monotonic, and counting time the machine was suspended.
pub fn boottime_ns() -> Nanos {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write; CLOCK_BOOTTIME exists on every
    // Linux since 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // Cannot happen on Linux; a gate that reads 0 stays shut rather than open.
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_is_open_until_its_instant_and_shut_after() {
        assert!(Gate::open().may_act());
        let g = Gate::closed();
        assert!(!g.may_act());
        g.set(boottime_ns() + 60_000_000_000);
        assert!(g.may_act());
        g.set(boottime_ns().saturating_sub(1));
        assert!(!g.may_act());
    }
}

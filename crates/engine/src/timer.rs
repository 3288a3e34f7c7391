//! The worker's timer: how a worker sleeps until its owner's next deadline
//! ([`Owner::poll_timeout`](crate::owner::Owner::poll_timeout)) with microsecond precision.
//!
//! # Why not the poll timeout alone
//!
//! `mio::Poll::poll` takes its timeout in whole milliseconds (it rounds up), and `epoll_wait`
//! adds the thread's timer slack (50 µs by default) on top. A Service User at 1 M/s with
//! `burst = 100` has its bucket full again 100 µs after it was emptied: a worker that sleeps a
//! millisecond for it throws 90 % of its tokens away (`BENCHMARKS.md`, "Rate accuracy": in one
//! session before this timer, 25 % of the rate was delivered at 1 M/s and 82 % at 100 k/s).
//!
//! # The timer
//!
//! A `timerfd` (`CLOCK_MONOTONIC`, non-blocking, close-on-exec) registered with the worker's
//! `Poll` under [`WORKER_TIMER`]. [`Timer::timeout`] arms it with the deadline, to the
//! nanosecond, and hands `poll` a millisecond timeout a millisecond beyond the deadline, a
//! backstop that never fires first unless the timerfd failed to. A timerfd's expiry is an
//! hrtimer with no slack, so the worker wakes within the kernel's wake-up latency of the
//! deadline (tens of µs on the development VM). The timer is armed only when the deadline
//! changes, so a worker whose deadline stays put makes no extra system call per turn.
//!
//! # Spinning
//!
//! A deadline closer than [`SPIN_NS_MAX`] is not slept for: `poll` gets a zero timeout (the
//! worker busy-polls, still taking whatever arrives), since arming a timer and sleeping costs
//! about as much as the wait. Only when a rate-limited peer is waiting (the caller says so), never
//! for housekeeping or when idle, and never for longer than [`SPIN_NS_MAX`] per deadline. The
//! limiter's wake-ups are [`WAKE_NS_MIN`](crate::limiter::WAKE_NS_MIN) apart, or a quarter of the
//! burst's worth of tokens (25 µs at 1 M/s with burst 100), above the spin limit, so a busy
//! worker still sleeps most of each gap.
//!
//! # The fallback
//!
//! Where no timerfd can be made (a kernel before 2.6.25, a seccomp filter that refuses it, or
//! `DSPLANE_TIMER=poll` in the environment), the worker sleeps in `poll` with millisecond
//! timeouts, as before, and lowers its timer slack to 1 µs (`PR_SET_TIMERSLACK`) so that a
//! millisecond is not 1.05. Short waits are spun as above. The worker then tells its owner not
//! to pace peers in batches (`Owner::set_batch_wakes`), which a millisecond sleep would
//! overshoot. At rates where a bucket refills in about a millisecond this loses tokens again;
//! the figures are in `docs/engine.md`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::limits::SPIN_NS_MAX;
use crate::Nanos;

/// The token of a worker's timer (the waker has `usize::MAX`; connections count from 0).
pub(crate) const WORKER_TIMER: Token = Token(usize::MAX - 1);

/// How far beyond a deadline `poll`'s own timeout is set while the timerfd is armed: a backstop
/// against a lost expiry, late enough never to come first.
const BACKSTOP: Duration = Duration::from_millis(1);

/// The environment variable that forces the fallback (`DSPLANE_TIMER=poll`).
pub(crate) const TIMER_ENV: &str = "DSPLANE_TIMER";

/// The timer slack the fallback asks for, ns (the kernel's default is 50 µs).
const FALLBACK_SLACK_NS: libc::c_ulong = 1_000;

/// A worker's timer. See the module documentation.
#[derive(Debug)]
pub(crate) struct Timer {
    /// The timerfd, registered with the worker's `Poll`; `None` in the fallback.
    fd: Option<OwnedFd>,
    /// The deadline the timerfd is armed for, until it fires or is re-armed.
    armed: Option<Nanos>,
}

impl Timer {
    /// A timer for the worker whose `Poll` has `registry`, on the calling (worker) thread:
    /// a timerfd unless `fallback` is set or one cannot be made, in which case the fallback
    /// (and the reason is logged).
    pub(crate) fn new(registry: &Registry, fallback: bool) -> Timer {
        if !fallback {
            match create_timerfd(registry) {
                Ok(fd) => {
                    return Timer {
                        fd: Some(fd),
                        armed: None,
                    }
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot create a timerfd; rate-limited delivery sleeps in millisecond steps"
                ),
            }
        }
        set_timer_slack(FALLBACK_SLACK_NS);
        Timer {
            fd: None,
            armed: None,
        }
    }

    /// A timer as [`Timer::new`], forced to the fallback when the environment says
    /// `DSPLANE_TIMER=poll`.
    pub(crate) fn from_env(registry: &Registry) -> Timer {
        let fallback = std::env::var_os(TIMER_ENV).is_some_and(|v| v == "poll");
        Timer::new(registry, fallback)
    }

    /// Whether deadlines are kept to the microsecond (a timerfd), not the millisecond.
    pub(crate) fn is_precise(&self) -> bool {
        self.fd.is_some()
    }

    /// The deadline the timerfd is armed for, if any.
    #[cfg(test)]
    fn armed(&self) -> Option<Nanos> {
        self.armed
    }

    /// What to give `poll` at `now` to be woken by `deadline` (both on the engine's clock):
    /// zero when it has passed, or is closer than [`SPIN_NS_MAX`] and `spin` (a rate-limited
    /// peer waits) allows a busy-poll; otherwise the timerfd is armed for it (if not already) and
    /// the backstop returned, or, in the fallback, the wait itself (which `poll` rounds up to
    /// whole milliseconds).
    pub(crate) fn timeout(&mut self, now: Nanos, deadline: Nanos, spin: bool) -> Option<Duration> {
        let wait = deadline.saturating_sub(now);
        if wait == 0 || (spin && wait <= SPIN_NS_MAX) {
            return Some(Duration::ZERO);
        }
        let wait = Duration::from_nanos(wait);
        if let Some(fd) = &self.fd {
            if self.armed != Some(deadline) {
                match arm_timerfd(fd, wait) {
                    Ok(()) => self.armed = Some(deadline),
                    Err(e) => {
                        // Not expected once created; keep delivering, at millisecond steps.
                        tracing::warn!(error = %e, "cannot arm the timerfd; falling back to millisecond sleeps");
                        self.fd = None;
                        self.armed = None;
                        set_timer_slack(FALLBACK_SLACK_NS);
                        return Some(wait);
                    }
                }
            }
            return Some(wait + BACKSTOP);
        }
        Some(wait)
    }

    /// The timer's token was readable: it fired. Reads the expiry count so that the next one is
    /// a new edge for the (edge-triggered) `Poll`.
    pub(crate) fn on_fired(&mut self) {
        let Some(fd) = &self.fd else {
            return;
        };
        let mut expirations = [0u8; 8];
        // SAFETY: `fd` is an open timerfd owned by `self`, and the buffer is 8 writable bytes,
        // the size a timerfd read needs; a non-blocking read with nothing to read fails with
        // EAGAIN, which is ignored.
        let _ = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
        self.armed = None;
    }
}

/// A non-blocking, close-on-exec `CLOCK_MONOTONIC` timerfd, registered for reading.
fn create_timerfd(registry: &Registry) -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes no pointers; a negative return is an error, reported.
    let raw = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by timerfd_create, is open, and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    registry.register(
        &mut SourceFd(&fd.as_raw_fd()),
        WORKER_TIMER,
        Interest::READABLE,
    )?;
    Ok(fd)
}

/// Arms `fd` to expire once, `wait` from now (> 0; a zero `it_value` would disarm it).
fn arm_timerfd(fd: &OwnedFd, wait: Duration) -> io::Result<()> {
    let value = libc::timespec {
        // At most a few hundred ms in practice; saturate rather than wrap.
        tv_sec: libc::time_t::try_from(wait.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 10⁹, so it fits a c_long on every target.
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: value,
    };
    // SAFETY: `fd` is an open timerfd; `spec` is a valid itimerspec on the stack, and the old
    // value is not asked for (null).
    let rc = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling thread's timer slack, best effort (a refusal leaves the default, 50 µs).
fn set_timer_slack(ns: libc::c_ulong) {
    // SAFETY: PR_SET_TIMERSLACK takes its value as the second argument and reads no memory.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};

    const MS: Nanos = 1_000_000;
    /// Long enough that a machine stall never makes a test see a timer fire early.
    const FAR: Nanos = 60_000 * MS;

    /// Polls until the timer's token is readable, for at most `limit`; whether it was.
    fn fired(poll: &mut Poll, timer: &mut Timer, limit: Duration) -> bool {
        let mut events = Events::with_capacity(8);
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            poll.poll(&mut events, Some(limit)).unwrap();
            if events.iter().any(|e| e.token() == WORKER_TIMER) {
                timer.on_fired();
                return true;
            }
        }
        false
    }

    #[test]
    fn a_deadline_that_passed_or_is_close_is_not_slept_for() {
        let poll = Poll::new().unwrap();
        let mut timer = Timer::new(poll.registry(), false);
        assert_eq!(timer.timeout(10 * MS, 10 * MS, false), Some(Duration::ZERO));
        assert_eq!(timer.timeout(10 * MS, 5 * MS, false), Some(Duration::ZERO));
        // Close: spun only when a rate-limited peer waits.
        let close = 10 * MS + SPIN_NS_MAX;
        assert_eq!(timer.timeout(10 * MS, close, true), Some(Duration::ZERO));
        assert_ne!(timer.timeout(10 * MS, close, false), Some(Duration::ZERO));
        // Beyond the spin limit, never spun.
        let beyond = close + 1;
        assert_ne!(timer.timeout(10 * MS, beyond, true), Some(Duration::ZERO));
    }

    #[test]
    fn arming_fires_and_a_fired_timer_is_disarmed() {
        let mut poll = Poll::new().unwrap();
        let mut timer = Timer::new(poll.registry(), false);
        assert!(timer.is_precise(), "a timerfd on any Linux since 2.6.25");
        let timeout = timer.timeout(0, MS, false).unwrap();
        assert_eq!(timer.armed(), Some(MS));
        // The backstop is beyond the deadline.
        assert!(timeout > Duration::from_millis(1));
        assert!(fired(&mut poll, &mut timer, Duration::from_secs(30)));
        assert_eq!(timer.armed(), None);
        // Armed again, it fires again (the expiry count was read: a new edge).
        timer.timeout(0, MS, false);
        assert!(fired(&mut poll, &mut timer, Duration::from_secs(30)));
    }

    #[test]
    fn re_arming_earlier_fires_at_the_earlier_deadline() {
        let mut poll = Poll::new().unwrap();
        let mut timer = Timer::new(poll.registry(), false);
        timer.timeout(0, FAR, false);
        assert_eq!(timer.armed(), Some(FAR));
        timer.timeout(0, MS, false);
        assert_eq!(timer.armed(), Some(MS));
        assert!(fired(&mut poll, &mut timer, Duration::from_secs(30)));
    }

    #[test]
    fn re_arming_later_replaces_the_earlier_deadline() {
        let mut poll = Poll::new().unwrap();
        let mut timer = Timer::new(poll.registry(), false);
        timer.timeout(0, MS, false);
        timer.timeout(0, FAR, false);
        assert_eq!(timer.armed(), Some(FAR));
        // The 1 ms expiry is gone: nothing within 100 ms (the new one is a minute away).
        assert!(!fired(&mut poll, &mut timer, Duration::from_millis(100)));
        assert_eq!(timer.armed(), Some(FAR));
    }

    #[test]
    fn the_same_deadline_is_not_armed_twice() {
        let poll = Poll::new().unwrap();
        let mut timer = Timer::new(poll.registry(), false);
        let first = timer.timeout(0, FAR, false);
        // Later in the same wait: the same deadline, still armed, a shorter backstop.
        let again = timer.timeout(MS, FAR, false);
        assert_eq!(timer.armed(), Some(FAR));
        assert!(again < first);
    }

    #[test]
    fn the_fallback_sleeps_for_the_wait_and_spins_only_close_to_it() {
        let mut poll = Poll::new().unwrap();
        let mut timer = Timer::new(poll.registry(), true);
        assert!(!timer.is_precise());
        assert_eq!(
            timer.timeout(0, 3 * MS, true),
            Some(Duration::from_millis(3))
        );
        assert_eq!(timer.armed(), None);
        assert_eq!(timer.timeout(0, SPIN_NS_MAX, true), Some(Duration::ZERO));
        assert_eq!(
            timer.timeout(0, SPIN_NS_MAX, false),
            Some(Duration::from_nanos(SPIN_NS_MAX))
        );
        // No timerfd, so nothing fires and a stray call is harmless.
        timer.on_fired();
        assert!(!fired(&mut poll, &mut timer, Duration::from_millis(20)));
    }

    #[test]
    fn the_environment_can_force_the_fallback() {
        // Read here, not set: the variable is process-wide and tests run in parallel.
        let poll = Poll::new().unwrap();
        let timer = Timer::from_env(poll.registry());
        let forced = std::env::var_os(TIMER_ENV).is_some_and(|v| v == "poll");
        assert_eq!(timer.is_precise(), !forced);
    }
}

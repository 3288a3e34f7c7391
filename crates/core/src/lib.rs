//! dsplane-core: the sans-IO core of the dataplane, as quinn-proto is quinn's.
//!
//! Plain data structures driven by explicit time (`now` is always an argument, in [`Nanos`]) and
//! tested without sockets or sleeps:
//!
//! * [`config`] (the TOML file of ENGINE.md §10 and its validation) and [`limits`] (the limits
//!   derived from it, and their relations);
//! * [`classify`] (priority levels from rules), [`limiter`] (per-Service-User token buckets with
//!   the release ramp), [`delivery`] (strict priority, window, rate), [`storm`] (alert storm
//!   detection), [`throttle`] (Service Request throttling), [`admission`] (connections before
//!   their HELLO, the delay on bad tokens, the refusal log limit), [`report`] (the alert
//!   monitoring report);
//! * [`owner`]: everything one worker holds for the peers it owns, written through a [`log::Log`]
//!   (the trait; the engine's store on a real or simulated disk implements it), with [`counters`];
//! * the **concurrent pieces**, whose every atomic and cell comes from [`sync`] so that loom can
//!   model them: [`ring`] (the lock-free MPSC priority ring that carries work between cores).
//!
//! No mio, no sockets, no files: the I/O engine (dsplane-engine) moves bytes in and out of these.
//! The protocol's [`ids`] and [`wire`] (dsplane-proto) are re-exported here, so that the core's
//! paths read `dsplane_core::wire::Frame` beside `dsplane_core::owner::Owner`.

#![warn(missing_docs)]

pub use dsplane_proto::{ids, wire};

pub mod admission;
pub mod classify;
pub mod config;
pub mod counters;
pub mod delivery;
pub mod limiter;
pub mod limits;
pub mod log;
pub mod owner;
pub mod report;
pub mod ring;
pub mod storm;
pub mod sync;
pub mod throttle;
pub mod work_queue;

/// Time on the message path: nanoseconds from an arbitrary, monotonic origin.
///
/// The sans-IO core never reads a clock; the I/O layer passes `now` in. Wall-clock values that go on
/// the wire (`created_ns`) are also nanoseconds, but since the Unix epoch.
pub type Nanos = u64;

/// Nanoseconds in one second.
pub const NANOS_PER_SEC: Nanos = 1_000_000_000;

/// A message on one line, for a log line or a one-line error: the lines of `text` (a TOML
/// error's source excerpt, say) trimmed and joined with `; `, leaving out the excerpt's bare
/// `|` gutters and blank lines.
///
/// ```
/// let toml = "TOML parse error at line 6, column 17\n  |\n6 | token = <redacted>\n  |\ninvalid basic string\n";
/// assert_eq!(
///     dsplane_core::one_line(toml),
///     "TOML parse error at line 6, column 17; 6 | token = <redacted>; invalid basic string"
/// );
/// ```
pub fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "|")
        .collect();
    lines.join("; ")
}

//! dsplane: the traffic-management dataplane of a smart-metering Data Service Provider.
//!
//! The crate is split the way quinn splits `quinn-proto` from its socket glue:
//!
//! * a **sans-IO core**, plain data structures driven by explicit time (`now` is always an
//!   argument, in [`Nanos`]) and tested without sockets or sleeps:
//!   * [`ids`]: the domain identifiers (EUI-64, SRV, mode, level), parsed without panics;
//!   * [`wire`]: PROTOCOL.md v1, the 64-byte frame header, frames and the streaming decoder;
//!   * [`config`]: the TOML file of ENGINE.md §10, its defaults and its validation;
//!   * [`classify`]: priority levels from the REQUEST rules and alert levels, responses
//!     inheriting their request's level;
//!   * [`limiter`]: per-Service-User token buckets with the release ramp;
//!   * [`delivery`]: one peer's delivery scheduler (strict priority, window with reserved
//!     level-1 slots, rate, re-send);
//!   * [`storm`]: Alert Storm Protection (SECMP0062), alerts counted into one summary per window;
//!   * [`throttle`]: Service Request throttling (SECMP0067), the engine-wide capacity and each
//!     Service User's allocation;
//!   * [`report`]: the daily alert monitoring report, in bounded memory, saved and merged;
//!   * [`admission`]: connections before their HELLO, the delay on bad tokens, the refusal log
//!     limit;
//! * **storage**, the logs on disk:
//!   * [`wal`]: the write-ahead log format (checksummed records, a COMMIT per batch);
//!   * [`store`]: one worker's log (append, watermarks, SURB spill, group commit, reclaim);
//!   * [`datadir`]: which generation of logs is current (`CURRENT`, `MANIFEST`) and the `LOCK`
//!     that keeps one engine per data directory;
//!   * [`recovery`]: recovery at start-up and `dsplane recover --salvage`;
//! * the **concurrent pieces**, whose every atomic and cell comes from [`sync`] (std normally,
//!   loom under `--cfg loom`) so that loom can model them: [`ring`], the lock-free MPSC priority
//!   ring that carries work between cores;
//! * the **I/O**: [`engine`], the running dataplane (acceptor, pinned mio workers, admin
//!   interface, metrics);
//! * the **tools**: [`client`], a blocking protocol client, and [`loadgen`], the load generator
//!   behind `dsplane demo` and `dsplane-loadgen`.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod admission;
pub mod classify;
pub mod client;
pub mod config;
pub mod counters;
pub mod datadir;
pub mod delivery;
pub mod disk;
pub mod engine;
pub mod ids;
pub mod limiter;
pub mod limits;
pub mod loadgen;
pub mod log;
pub mod owner;
pub mod recovery;
pub mod report;
pub mod ring;
pub mod store;
pub mod storm;
pub mod sync;
pub mod throttle;
pub mod wal;
pub mod wire;

/// Time on the message path: nanoseconds from an arbitrary, monotonic origin.
///
/// The sans-IO core never reads a clock; the I/O layer passes `now` in. Wall-clock values that go on
/// the wire (`created_ns`) are also nanoseconds, but since the Unix epoch.
pub type Nanos = u64;

/// Nanoseconds in one second.
pub const NANOS_PER_SEC: Nanos = 1_000_000_000;

/// Nanoseconds since the Unix epoch, now: the one wall-clock read of the engine (each worker
/// reads it once per turn and passes it in), the client and the load generator.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A message on one line, for a log line or a one-line error: the lines of `text` (a TOML
/// error's source excerpt, say) trimmed and joined with `; `, leaving out the excerpt's bare
/// `|` gutters and blank lines.
///
/// ```
/// let toml = "TOML parse error at line 6, column 17\n  |\n6 | token = <redacted>\n  |\ninvalid basic string\n";
/// assert_eq!(
///     dsplane::one_line(toml),
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

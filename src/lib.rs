//! dsplane: the traffic-management dataplane of a smart-metering Data Service Provider, as one
//! dependency.
//!
//! The code is in the workspace's library crates (README.md, "Crates"):
//!
//! * `dsplane-proto`: [`ids`], [`wire`], [`client`]: the protocol a client needs;
//! * `dsplane-core`: the sans-IO core ([`config`], [`classify`], [`limiter`], [`delivery`],
//!   [`storm`], [`throttle`], [`owner`], [`log`], [`ring`], ...);
//! * `dsplane-engine`: the I/O engine ([`engine`]) and its storage ([`store`], [`wal`], [`disk`],
//!   [`recovery`], [`datadir`]);
//! * `dsplane-loadgen`: the load generator ([`loadgen`]).
//!
//! This crate is the `dsplane` binary; this library is a facade that re-exports those crates'
//! modules under the paths they had before the split (`dsplane::config::Config`), for the
//! binary's own tests and benches, and for a user who wants one dependency rather than four.

#![warn(missing_docs)]

pub use dsplane_core::{
    admission, classify, config, counters, delivery, limiter, limits, log, one_line, owner, report,
    ring, storm, sync, throttle, Nanos, NANOS_PER_SEC,
};
pub use dsplane_engine as engine;
pub use dsplane_engine::{datadir, disk, recovery, store, wal};
pub use dsplane_loadgen as loadgen;
pub use dsplane_proto::{client, ids, unix_now, wire};

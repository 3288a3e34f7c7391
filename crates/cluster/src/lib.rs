//! High availability on PostgreSQL: several dsplane nodes, one active (`docs/ha.md`).
//!
//! This crate holds what decides which node is active and what keeps a node that lost that
//! role from acting on it:
//!
//! - [`lease`]: the lease as a sans-IO state machine, driven by explicit time. It says when to
//!   renew, and until when the node may still act (ACK, deliver) on a lease it last renewed at a
//!   known instant. No clock is read inside, no database is touched.
//! - [`pg`]: the lease, its fencing and the schema in PostgreSQL. Every write of the active runs
//!   in a transaction that first takes a share lock on the fence row and checks its epoch, so a
//!   takeover (an update of that row) waits for the old node's write in flight and refuses every
//!   later one.
//! - [`log`]: the replicated log's frames in PostgreSQL: appended by `COPY` in one fenced
//!   transaction per batch, deleted by lane once delivered, loaded back in order by a new
//!   active.
//! - [`replicated`]: the owner's log for durability `replicated`, sans-IO: ids, one batch per
//!   write-out, spills, the bound on uncommitted frames; [`remote`]: its PostgreSQL side, a
//!   committer thread per worker.
//! - [`gate`]: until when the node may write to a peer, asked before every socket write.
//! - [`testing`]: a PostgreSQL cluster of its own for a test (`initdb` in a temporary directory,
//!   on a free loopback port), and a streaming standby of it, so that `cargo test` needs no
//!   running database.
//!
//! The node itself (standby, takeover, fencing) is `dsplane_engine::cluster::Node`.

#![warn(missing_docs)]

pub mod gate;
pub mod lease;
pub mod log;
pub mod pg;
pub mod remote;
pub mod replicated;
pub mod testing;

/// Nanoseconds on the caller's clock. It must count time the node spends suspended or paused
/// (Linux `CLOCK_BOOTTIME`): a clock that stops while the node is stopped (`CLOCK_MONOTONIC`
/// does across a system suspend) would let a node that wakes believe its lease still runs.
pub type Nanos = u64;

//! Every fixed limit of the dataplane, in one place (in the way of TigerBeetle's
//! `constants.zig`): what bounds memory, work per turn and time. Limits an operator sets are in
//! the configuration file and validated with it ([`crate::config`]); these are the ones the code
//! fixes, each with the reason for its value.

use crate::{Nanos, NANOS_PER_SEC};

pub use crate::limiter::{BURST_MAX, RATE_PER_S_MAX, RELEASE_RAMP_NS_MAX};
pub use crate::wire::PAYLOAD_BYTES_MAX_DEFAULT;

/// Spilled frames loaded back from the SURB at a time, per lane.
pub const LOAD_BATCH: usize = 256;
/// Loads from the SURB in one [`crate::owner::Owner::poll_transmit`] before it gives up for the
/// turn (each load either brings frames or empties a lane's count, so one is almost always
/// enough).
pub const LOADS_PER_POLL_MAX: usize = 64;
/// In-flight requests remembered per owner for response inheritance. An evicted request's
/// response is classified by its own SRV and mode (the same level unless the rules were
/// reloaded in between), so the bound trades little accuracy for ~100 bytes an entry: 64 Ki
/// entries is ~6.5 MiB per worker, and 7 minutes of requests at 160/s per worker.
pub const INFLIGHT_REQUESTS_MAX: usize = 1 << 16;
/// How long a request is remembered: future-dated requests are answered days later.
pub const INFLIGHT_AGE_MAX: Nanos = 7 * 24 * 3600 * NANOS_PER_SEC;
/// How often idle connections, lingering closes, retention and the in-flight table are
/// checked, and the metrics published.
pub const HOUSEKEEPING_INTERVAL: Nanos = NANOS_PER_SEC / 4;

/// Frames each worker's ring holds per level. At 1 µs per frame a worker drains a full level in
/// 8 ms; beyond that, intake holds the frame and stops reading its connection until it goes in
/// (TCP flow control then slows the sender), rather than buffer without bound.
pub const RING_FRAMES_PER_LEVEL: usize = 8192;
/// Envelopes taken from a ring in one go.
pub const RING_BATCH_MAX: usize = 1024;
/// Ring batches an owner takes in one drain of its ring (a turn drains twice) before it goes on
/// to read its peers, send and take their ACKs. Intake workers on other cores can keep a ring
/// full for as long as their senders send; without a bound the owner took frames for the whole
/// of a line-rate `batch` run and sent almost nothing meanwhile (43 pumps for 2 M frames, up to
/// 930,000 frames held in memory, BENCHMARKS.md). Frames left in the ring wait for the next
/// turn, which comes at once (a worker with items in its ring does not sleep); a full ring makes
/// intake stop reading, and TCP slows the sender.
pub const RING_BATCHES_PER_DRAIN_MAX: usize = 4;
const _: () = assert!(
    RING_BATCHES_PER_DRAIN_MAX >= 1,
    "a drain takes at least one batch"
);
/// Envelopes an owner takes from its ring in one go while a rate-limited peer waits for its
/// tokens (`Owner::rate_wake`): between two such pieces it reads the clock, and once the tokens
/// are due it writes what it took and pumps, rather than take a whole [`RING_BATCH_MAX`] first.
/// A bucket of 100 tokens at 10 M/s is full again 10 µs after it ran dry, and a `batch` owner
/// takes a frame in some 0.2–0.3 µs: 32 frames are well inside that, 1,024 are some 25 buckets
/// thrown away. A line-rate `batch` run with `burst = 100` went from 0.295–0.316× the null
/// forwarder to 0.365–0.416× (BENCHMARKS.md, with the sweep that chose 32).
pub const RING_BATCH_PACING: usize = 32;
const _: () = assert!(RING_BATCH_PACING >= 1 && RING_BATCH_PACING <= RING_BATCH_MAX);
/// The most free read chunks a worker keeps (`dsplane_proto::chunk::ChunkPool`): 16 MiB of
/// 64 KiB chunks, so that frames released while new ones are read hand their chunks to the
/// next reads rather than back to the allocator; a chunk returned beyond it is freed.
pub const READ_CHUNKS_FREE_MAX: usize = 256;
/// Reads from one connection in one turn before the others get theirs.
pub const READS_PER_TURN_MAX: usize = 16;
/// How long a connection being closed is kept, half-closed, so its peer reads the last NACK.
pub const LINGER: Nanos = NANOS_PER_SEC;
/// Longest a worker busy-polls (`poll` with a zero timeout) for a deadline rather than sleep:
/// only while a rate-limited peer waits for its tokens, never when idle. About what arming a
/// timer and sleeping through a context switch costs, so waiting closer than this is cheaper
/// awake; and well below [`crate::limiter::WAKE_NS_MIN`], so that a worker pacing a fast peer
/// sleeps most of each gap between wake-ups.
pub const SPIN_NS_MAX: Nanos = 10_000;
/// Times one pump of a rate-limited peer reads the clock again when the peer's bucket runs dry
/// mid-pump (`Worker::pump`): each read may bring up to a burst more frames, so this bounds how
/// long one fast peer holds its worker in a turn (8 bursts of 100 at 10 M/s: 80 µs) while
/// letting a small burst keep up with a high rate. A clock read costs some 25 ns, beside the
/// tens of frames each one lets out.
pub const PUMP_CLOCK_READS_MAX: usize = 8;
/// The shortest `[cluster] lease_ms`: below it a renewal's round trip to PostgreSQL is a large
/// part of the lease.
pub const LEASE_MS_MIN: u64 = 100;
/// The longest `[cluster] lease_ms`: a takeover waits for the lease to expire.
pub const LEASE_MS_MAX: u64 = 60_000;
/// The longest `[cluster] node` name (it goes into the standby's NACK detail).
pub const NODE_NAME_BYTES_MAX: usize = 63;
/// Frames one worker may have written out for PostgreSQL and not yet seen committed (durability
/// `replicated`): while PostgreSQL is unreachable the worker holds them (spilled ones in memory,
/// the rest in the NMS), and past this it refuses new frames with NACK 5. At 1 KiB a frame, some
/// 256 MiB; at 50,000 frames/s, five seconds of a full-rate outage.
pub const REPLICATED_UNCOMMITTED_FRAMES_MAX: usize = 262_144;
/// Listen backlog of the SU and CSP ports.
pub const LISTEN_BACKLOG: i32 = 1024;
/// Most connections one CSP link may hold at once (`csp.connections_max`). Each is spread to a
/// worker of its own as far as there are workers, so a link gains nothing from more connections
/// than there are cores; the acceptor keeps a link's connection slots in one `u64` bitmap.
pub const CSP_CONNECTIONS_MAX: u32 = 64;
const _: () = assert!(CSP_CONNECTIONS_MAX <= u64::BITS);
/// Socket send and receive buffers asked for, bytes.
pub const SOCKET_BUFFER_BYTES: usize = 1 << 20;

//! What the owner needs of its write-ahead log, as a trait: the owner decides which records to
//! write and when a frame may be acknowledged; the log keeps them. The engine's log is
//! `dsplane_engine::store::Store` on real files; the simulator runs the same store on a simulated
//! disk. The trait is here, with the plain types it speaks in ([`LogPos`], [`Stored`],
//! [`Loaded`], [`PeerKey`], [`WalError`]), and its implementation is with the store, so that the
//! core does not depend on the engine.
//!
//! The owner is generic over its log (as TigerBeetle's replica is over its storage), not given a
//! `dyn Log`: every append is on the message path, and a generic keeps it a direct call.

use std::io;
use std::path::PathBuf;

use crate::ids::Eui64;
use crate::wire::Frame;

/// A map keyed by (peer, lane), hashed with foldhash: the log looks one up for every frame it
/// takes (is the lane spilled?), where SipHash's resistance to chosen keys buys nothing (the
/// keys are the configuration's peers).
pub type LaneMap<V> = std::collections::HashMap<(PeerKey, u8), V, foldhash::fast::RandomState>;

/// Segment offsets fit in this many bits of a [`LogPos`].
pub const OFFSET_BITS: u32 = 40;

/// A position in one worker's log: segment number and byte offset, ordered.
pub type LogPos = u64;

/// The lane of the log a frame at `level` goes in: the one FIFO queue (`scheduling = "fifo"`),
/// or its level (lane 0 is level 1). DONE records and spills are kept per lane.
pub fn lane_of(fifo: bool) -> impl Fn(u8) -> u8 + Copy {
    move |level: u8| if fifo { 0 } else { level.saturating_sub(1) }
}

/// The position of byte `offset` of segment `segment`.
pub fn log_pos(segment: u64, offset: u64) -> LogPos {
    (segment << OFFSET_BITS) | offset
}

/// Where a frame's record is, for the bookkeeping of its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its sequence number.
    pub seq: u64,
    /// Its segment.
    pub segment: u64,
}

/// A frame loaded back from the log.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Its record.
    pub stored: Stored,
    /// Its level.
    pub level: u8,
    /// When dsplane took it, ns since the Unix epoch.
    pub enqueued_unix_ns: u64,
    /// The frame.
    pub frame: Frame,
}

/// Which kind of peer a record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerKey {
    /// A Service User, by its EUI-64.
    Su(Eui64),
    /// A CSP link, by a hash of its name (names are what stays stable across restarts).
    Csp(u64),
}

/// An SU as its EUI-64; a CSP link as `csp#` and its name's hash (the name itself is not in
/// the log).
impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Su(id) => id.fmt(f),
            PeerKey::Csp(h) => write!(f, "csp#{h:016x}"),
        }
    }
}

impl PeerKey {
    /// The key of the CSP link called `name`: FNV-1a, stable across builds and platforms.
    pub fn csp(name: &str) -> PeerKey {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        PeerKey::Csp(h)
    }

    /// The kind byte (1: SU, 2: CSP link) and the id, as a log record stores them.
    pub fn parts(self) -> (u8, u64) {
        match self {
            PeerKey::Su(id) => (1, id.0),
            PeerKey::Csp(h) => (2, h),
        }
    }

    /// The key a log record names by `kind` and `id` ([`PeerKey::parts`]); `None` for an
    /// unknown kind.
    pub fn from_parts(kind: u8, id: u64) -> Option<PeerKey> {
        match kind {
            1 => Some(PeerKey::Su(Eui64(id))),
            2 => Some(PeerKey::Csp(id)),
            _ => None,
        }
    }
}

/// Why a segment could not be read to its end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A segment does not start with the segment header.
    #[error("{path}: not a dsplane WAL segment ({why}); dsplane will not start on it")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A damaged record that cannot be a torn write: in a segment that is not the newest, or in
    /// what a later intact batch records as already durable.
    #[error("{path}: damaged record at byte {offset} ({why}); this is corruption, not a torn write, and acknowledged frames may be in it. dsplane will not start on it; `dsplane recover --salvage` keeps what is intact and lists what is not")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The `replicated` log's database failed or holds a damaged row (`why` names it).
    #[error("{why}")]
    Database {
        /// What failed, with the table and row.
        why: String,
    },
    /// A file or directory the log says must exist is not there, or the data directory's
    /// state cannot be determined.
    #[error("{path}: {why}. dsplane will not start without it; restore it, or run `dsplane recover --salvage` to start from what is intact")]
    Missing {
        /// What is missing or damaged.
        path: PathBuf,
        /// Why it must exist.
        why: String,
    },
}

/// A write-ahead log as the owner uses it. See `dsplane_engine::store::Store` for the meaning of
/// each call.
pub trait Log {
    /// Appends an ENQUEUE record (to the buffer: [`Log::write_out`] writes it).
    fn append(
        &mut self,
        peer: PeerKey,
        lane: u8,
        level: u8,
        frame: &Frame,
        enqueued_unix_ns: u64,
        spill: bool,
    ) -> Stored;
    /// Writes what was appended since the last call: where the log now ends.
    ///
    /// # Errors
    ///
    /// The write failed (a full disk): every append since the last success is undone.
    fn write_out(&mut self) -> io::Result<LogPos>;
    /// Marks a frame delivered (or expired): its record is no longer live.
    fn done(&mut self, peer: PeerKey, lane: u8, stored: Stored);
    /// Whether a lane of a peer has frames on disk only (the SURB).
    fn is_spilled(&self, peer: PeerKey, lane: u8) -> bool;
    /// Every (peer, lane) with frames on disk only, and how many: the backlog a restart found.
    fn spills(&self) -> Vec<(PeerKey, u8, u64)>;
    /// Loads up to `max` frames of a spilled lane back, oldest first (`fifo`: the engine
    /// schedules in one lane, [`lane_of`]).
    ///
    /// # Errors
    ///
    /// The records cannot be read.
    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        max: usize,
        fifo: bool,
    ) -> Result<Vec<Loaded>, WalError>;
    /// How far the log is durable (synced).
    fn durable_pos(&self) -> LogPos;
    /// Whether a sync has failed: nothing more may be acknowledged.
    fn flush_failed(&self) -> bool;
    /// Bytes of the log on disk, for the metrics.
    fn disk_bytes(&self) -> u64;
}

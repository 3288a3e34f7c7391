//! What the owner needs of its write-ahead log, as a trait: the owner decides which records to
//! write and when a frame may be acknowledged; the log keeps them. The engine's log is
//! [`crate::store::Store`] on real files; the simulator runs the same store on a simulated disk.
//!
//! The owner is generic over its log (as TigerBeetle's replica is over its storage), not given a
//! `dyn Log`: every append is on the message path, and a generic keeps it a direct call.

use std::io;

use crate::store::{Loaded, LogPos, Store, Stored};
use crate::wal::{PeerKey, WalError};
use crate::wire::Frame;

/// A write-ahead log as the owner uses it. See [`crate::store::Store`] for the meaning of each
/// call.
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
    /// schedules in one lane, [`crate::store::lane_of`]).
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

impl<D: crate::disk::Disk> Log for Store<D> {
    #[inline]
    fn append(
        &mut self,
        peer: PeerKey,
        lane: u8,
        level: u8,
        frame: &Frame,
        enqueued_unix_ns: u64,
        spill: bool,
    ) -> Stored {
        Store::append(self, peer, lane, level, frame, enqueued_unix_ns, spill).0
    }

    fn write_out(&mut self) -> io::Result<LogPos> {
        Store::write_out(self)
    }

    #[inline]
    fn done(&mut self, peer: PeerKey, lane: u8, stored: Stored) {
        Store::done(self, peer, lane, stored);
    }

    #[inline]
    fn is_spilled(&self, peer: PeerKey, lane: u8) -> bool {
        Store::is_spilled(self, peer, lane)
    }

    fn spills(&self) -> Vec<(PeerKey, u8, u64)> {
        Store::spills(self).collect()
    }

    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        max: usize,
        fifo: bool,
    ) -> Result<Vec<Loaded>, WalError> {
        Store::load(self, peer, lane, max, crate::store::lane_of(fifo))
    }

    fn durable_pos(&self) -> LogPos {
        Store::durable_pos(self)
    }

    fn flush_failed(&self) -> bool {
        Store::flush_failed(self)
    }

    fn disk_bytes(&self) -> u64 {
        Store::disk_bytes(self)
    }
}

//! The `replicated` store: the owner's log ([`dsplane_core::log::Log`]) kept in PostgreSQL.
//!
//! # Split
//!
//! [`ReplicatedLog`] is the worker's side, sans-IO: it numbers frames, gathers each turn's
//! appends and deliveries into a [`Batch`], keeps the frames of spilled lanes until they are
//! known to be committed, and answers the owner's questions. Everything that talks to the
//! database is behind [`Remote`]: the engine's [`crate::remote::PgRemote`] (a committer thread
//! and a connection for loads), or the simulator's model of a database.
//!
//! # Positions and ids
//!
//! Every frame gets an id, unique in the table and rising within each lane: a node's workers
//! take blocks of ids from one counter ([`IdBlocks`]) that starts after the highest id in the
//! table when the node takes the lease, so a lane's frames left by earlier actives come before
//! its new ones. The id is the frame's `Stored::seq`, and a position of the log is the id of
//! the last frame appended: a frame may be ACKed once [`Remote::committed`] reaches its id.
//! Batches are committed in the order submitted, so one number says what is committed.
//!
//! # Delivery
//!
//! A lane is delivered (and expires) in id order, so a delivery is "the lane is done through id
//! N", merged per lane in the next batch, which deletes those rows in the same transaction as
//! its appends: the table holds what is not yet delivered. A delete goes in a batch after the
//! one that appended its frame, and batches commit in order.
//!
//! # Spills
//!
//! A spilled lane (its frames are not held in memory, `Log::append`'s `spill`) is a count and
//! the id of its next frame. [`Log::load`] reads committed frames from the table
//! ([`Remote::load`]) and, after them, the lane's frames not yet known to be committed, which
//! this side keeps (their bytes are shared with the batch, not copied). A new active starts
//! with every lane of the table spilled ([`ReplicatedLog::resume`]), and so re-sends its
//! backlog the way a restart does: counted in its lanes, released in priority order with the
//! ramp.
//!
//! # Faults
//!
//! While PostgreSQL is unreachable nothing is committed and nothing is ACKed; the frames
//! waiting are bounded ([`UNCOMMITTED_FRAMES_MAX`]), and past the bound a write is refused
//! (the owner answers NACK 5). A fenced write (another node holds the lease) is final:
//! [`Log::flush_failed`] says so and every write is refused.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dsplane_core::log::{LaneMap, Loaded, Log, LogPos, PeerKey, Stored, WalError};
use dsplane_core::wire::Frame;

/// Frames of one worker written out but not yet committed, beyond which a write is refused
/// (NACK 5): what a worker holds for PostgreSQL while it is unreachable.
pub use dsplane_core::limits::REPLICATED_UNCOMMITTED_FRAMES_MAX as UNCOMMITTED_FRAMES_MAX;

/// Ids a worker takes from [`IdBlocks`] at a time.
pub const ID_BLOCK: u64 = 4096;

/// One frame to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Its id.
    pub id: u64,
    /// Its receiver.
    pub peer: PeerKey,
    /// Its lane.
    pub lane: u8,
    /// Its level.
    pub level: u8,
    /// When dsplane took it, ns since the Unix epoch.
    pub enqueued_ns: u64,
    /// The frame.
    pub frame: Frame,
}

/// A row as the owner takes it back.
impl From<Row> for Loaded {
    fn from(r: Row) -> Loaded {
        Loaded {
            stored: Stored {
                seq: r.id,
                segment: 0,
            },
            level: r.level,
            enqueued_unix_ns: r.enqueued_ns,
            frame: r.frame,
        }
    }
}

/// What one commit writes: appends, then deletions of delivered frames, in one transaction.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Frames to append.
    pub rows: Vec<Row>,
    /// (peer, lane, through id): frames delivered.
    pub done: Vec<(PeerKey, u8, u64)>,
    /// The position this batch makes committed: the id of its last row, or of the last row
    /// before it.
    pub upto: LogPos,
}

impl Batch {
    /// Adds `later` to this batch (a committer merges what waited into one transaction).
    pub fn merge(&mut self, later: Batch) {
        self.rows.extend(later.rows);
        if !later.done.is_empty() {
            // By lane, so that merging many batches of many lanes stays linear.
            let mut at: LaneMap<usize> = self
                .done
                .iter()
                .enumerate()
                .map(|(i, &(p, l, _))| ((p, l), i))
                .collect();
            for (peer, lane, through) in later.done {
                match at.get(&(peer, lane)).and_then(|&i| self.done.get_mut(i)) {
                    Some(d) => d.2 = d.2.max(through),
                    None => {
                        at.insert((peer, lane), self.done.len());
                        self.done.push((peer, lane, through));
                    }
                }
            }
        }
        self.upto = self.upto.max(later.upto);
    }
}

/// What the store asks of the database side. See the module documentation.
pub trait Remote {
    /// Hands a batch over to be committed after the ones before it.
    fn submit(&mut self, batch: Batch);
    /// The highest position committed.
    fn committed(&self) -> LogPos;
    /// Whether a write was refused because another node holds the lease: final.
    fn fenced(&self) -> bool;
    /// Committed frames of (peer, lane) with ids from `from` and below `below`, oldest first,
    /// at most `max`.
    ///
    /// # Errors
    ///
    /// The query failed, or a row is damaged (named).
    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        from: u64,
        below: u64,
        max: usize,
    ) -> Result<Vec<Loaded>, WalError>;
}

/// The counter a node's workers take ids from.
#[derive(Debug)]
pub struct IdBlocks(AtomicU64);

impl IdBlocks {
    /// Ids from `next` (after the highest in the table).
    pub fn new(next: u64) -> Arc<IdBlocks> {
        Arc::new(IdBlocks(AtomicU64::new(next.max(1))))
    }

    fn take(&self) -> u64 {
        self.0.fetch_add(ID_BLOCK, Ordering::Relaxed)
    }
}

/// A spilled lane: how many of its frames are not in memory, and the id of the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneBacklog {
    /// The receiver.
    pub peer: PeerKey,
    /// The lane.
    pub lane: u8,
    /// Frames.
    pub count: u64,
    /// The lowest id among them.
    pub first_id: u64,
}

#[derive(Debug, Default)]
struct Spill {
    count: u64,
    /// Where the next frame is looked for in the table.
    next_id: u64,
    /// The lane's spilled frames not known to be committed (the newest of the lane), in order.
    unconfirmed: VecDeque<Row>,
}

/// An append since the last write out, undone if the write is refused.
#[derive(Debug, Clone, Copy)]
struct Appended {
    peer: PeerKey,
    lane: u8,
    spill: bool,
}

/// One worker's `replicated` log. See the module documentation.
#[derive(Debug)]
pub struct ReplicatedLog<R> {
    remote: R,
    ids: Arc<IdBlocks>,
    next_id: u64,
    block_end: u64,
    rows: Vec<Row>,
    appended: Vec<Appended>,
    done: LaneMap<u64>,
    spills: LaneMap<Spill>,
    /// The position of the last frame written out, and of each batch submitted and not yet
    /// known committed, with its frame count.
    written: LogPos,
    in_flight: VecDeque<(LogPos, usize)>,
    uncommitted: usize,
    uncommitted_max: usize,
}

impl<R: Remote> ReplicatedLog<R> {
    /// A log with nothing in it yet.
    pub fn new(remote: R, ids: Arc<IdBlocks>) -> ReplicatedLog<R> {
        ReplicatedLog {
            remote,
            ids,
            next_id: 0,
            block_end: 0,
            rows: Vec::new(),
            appended: Vec::new(),
            done: LaneMap::default(),
            spills: LaneMap::default(),
            written: 0,
            in_flight: VecDeque::new(),
            uncommitted: 0,
            uncommitted_max: UNCOMMITTED_FRAMES_MAX,
        }
    }

    /// A log that goes on from what earlier actives left in the table: every lane in
    /// `backlog` (this worker's peers) spilled, to be loaded in order.
    pub fn resume(
        remote: R,
        ids: Arc<IdBlocks>,
        backlog: impl IntoIterator<Item = LaneBacklog>,
    ) -> ReplicatedLog<R> {
        let mut log = ReplicatedLog::new(remote, ids);
        for b in backlog {
            if b.count > 0 {
                log.spills.insert(
                    (b.peer, b.lane),
                    Spill {
                        count: b.count,
                        next_id: b.first_id,
                        unconfirmed: VecDeque::new(),
                    },
                );
            }
        }
        log
    }

    /// A bound on frames written out and not yet committed other than
    /// [`UNCOMMITTED_FRAMES_MAX`] (tests).
    pub fn with_uncommitted_max(mut self, max: usize) -> ReplicatedLog<R> {
        self.uncommitted_max = max;
        self
    }

    /// The database side.
    pub fn remote(&self) -> &R {
        &self.remote
    }

    /// The database side.
    pub fn remote_mut(&mut self) -> &mut R {
        &mut self.remote
    }

    /// Frames written out and not yet known to be committed.
    pub fn uncommitted(&self) -> usize {
        self.uncommitted
    }

    fn next_id(&mut self) -> u64 {
        if self.next_id >= self.block_end {
            self.next_id = self.ids.take();
            self.block_end = self.next_id + ID_BLOCK;
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Forgets what is now known to be committed: batches' counts, and spilled frames the
    /// table now holds.
    fn settle(&mut self) {
        let committed = self.remote.committed();
        while let Some(&(pos, n)) = self.in_flight.front() {
            if pos > committed {
                break;
            }
            self.in_flight.pop_front();
            self.uncommitted = self.uncommitted.saturating_sub(n);
        }
        for spill in self.spills.values_mut() {
            while spill.unconfirmed.front().is_some_and(|r| r.id <= committed) {
                spill.unconfirmed.pop_front();
            }
        }
    }
}

fn refused(why: String) -> io::Error {
    io::Error::other(why)
}

impl<R: Remote> Log for ReplicatedLog<R> {
    fn append(
        &mut self,
        peer: PeerKey,
        lane: u8,
        level: u8,
        frame: &Frame,
        enqueued_unix_ns: u64,
        spill: bool,
    ) -> Stored {
        let id = self.next_id();
        let row = Row {
            id,
            peer,
            lane,
            level,
            enqueued_ns: enqueued_unix_ns,
            frame: frame.clone(),
        };
        if spill {
            let s = self.spills.entry((peer, lane)).or_insert_with(|| Spill {
                count: 0,
                next_id: id,
                unconfirmed: VecDeque::new(),
            });
            s.count += 1;
            s.unconfirmed.push_back(row.clone());
        }
        self.rows.push(row);
        self.appended.push(Appended { peer, lane, spill });
        Stored {
            seq: id,
            segment: 0,
        }
    }

    fn write_out(&mut self) -> io::Result<LogPos> {
        self.settle();
        let refusal = if self.remote.fenced() {
            Some("another node holds the lease; this node writes nothing more".to_owned())
        } else if self.uncommitted + self.rows.len() > self.uncommitted_max {
            Some(format!(
                "PostgreSQL has not committed {} frames of this worker (at most {}); is it reachable?",
                self.uncommitted, self.uncommitted_max
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            // Undone: the spilled frames are taken off their lanes, newest first.
            for a in self.appended.drain(..).rev() {
                if !a.spill {
                    continue;
                }
                if let Some(s) = self.spills.get_mut(&(a.peer, a.lane)) {
                    s.count = s.count.saturating_sub(1);
                    s.unconfirmed.pop_back();
                    if s.count == 0 {
                        self.spills.remove(&(a.peer, a.lane));
                    }
                }
            }
            self.rows.clear();
            return Err(refused(why));
        }
        self.appended.clear();
        if self.rows.is_empty() && self.done.is_empty() {
            return Ok(self.written);
        }
        if let Some(last) = self.rows.last() {
            self.written = last.id;
        }
        let n = self.rows.len();
        let batch = Batch {
            rows: std::mem::take(&mut self.rows),
            done: self.done.drain().map(|((p, l), t)| (p, l, t)).collect(),
            upto: self.written,
        };
        if n > 0 {
            self.in_flight.push_back((self.written, n));
            self.uncommitted += n;
        }
        self.remote.submit(batch);
        Ok(self.written)
    }

    fn done(&mut self, peer: PeerKey, lane: u8, stored: Stored) {
        let through = self.done.entry((peer, lane)).or_insert(0);
        *through = (*through).max(stored.seq);
    }

    fn is_spilled(&self, peer: PeerKey, lane: u8) -> bool {
        self.spills.contains_key(&(peer, lane))
    }

    fn spills(&self) -> Vec<(PeerKey, u8, u64)> {
        let mut out: Vec<_> = self
            .spills
            .iter()
            .map(|(&(p, l), s)| (p, l, s.count))
            .collect();
        out.sort_unstable();
        out
    }

    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        max: usize,
        _fifo: bool,
    ) -> Result<Vec<Loaded>, WalError> {
        self.settle();
        let Some(spill) = self.spills.get_mut(&(peer, lane)) else {
            return Ok(Vec::new());
        };
        let want = usize::try_from(spill.count).unwrap_or(usize::MAX).min(max);
        let below = spill.unconfirmed.front().map_or(u64::MAX, |r| r.id);
        let mut out = if spill.next_id < below {
            self.remote.load(peer, lane, spill.next_id, below, want)?
        } else {
            Vec::new()
        };
        while out.len() < want {
            let Some(r) = spill.unconfirmed.pop_front() else {
                break;
            };
            out.push(r.into());
        }
        if let Some(last) = out.last() {
            spill.next_id = last.stored.seq + 1;
        }
        spill.count = spill.count.saturating_sub(out.len() as u64);
        if spill.count == 0 {
            self.spills.remove(&(peer, lane));
        }
        Ok(out)
    }

    fn durable_pos(&self) -> LogPos {
        self.remote.committed()
    }

    fn flush_failed(&self) -> bool {
        self.remote.fenced()
    }

    fn disk_bytes(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests;

//! One worker's durable store: its write-ahead log, the watermarks of what receivers have
//! acknowledged, the spill queues of the Service User Retry Buffer, and the group-commit flusher
//! (ENGINE.md §2, §7).
//!
//! # What is written
//!
//! Every frame a worker takes for a peer it owns is appended as an ENQUEUE record with a sequence
//! number `seq` (unless durability is `none` and the frame stays in memory). When the peer
//! acknowledges frames, a DONE record says "(peer, lane) is acknowledged through `seq`": frames
//! of one peer and lane (a level, or the one FIFO queue) leave in arrival order (the scheduler
//! re-sends unacknowledged frames at the front, in order), so acknowledgements are always a prefix
//! and one number per (peer, lane) says everything. Each batch ends with a COMMIT record, and
//! each new segment starts with a SEGMENT_START of every watermark and of the older segments
//! still needed (`crate::wal` explains how recovery uses them).
//!
//! # Space
//!
//! Each segment counts its live frames (written, not yet acknowledged or expired). A segment
//! other than the one being written whose count reaches zero is named in a DROPPED record and
//! deleted once that record is durable: by the store's reaper thread (unlinking a full segment
//! blocks for tens of milliseconds), or in place when the disk is short of room or there is no
//! thread ([`Flusher::Manual`]). The segment being written is rolled when it is full,
//! and also as soon as everything in it is acknowledged and it holds at least
//! [`RECLAIM_ROLL_BYTES`] (or a write has just failed), so that acknowledged frames never keep a
//! full disk full. A roll on a full disk takes its room from a small reserve file kept in the
//! log's directory ([`RESERVE_FILE`]), which is made again once space returns.
//!
//! # The SURB: frames on disk only
//!
//! When a peer's share of the NMS is full, a frame is written and *not* kept in memory: the
//! (peer, lane) is then spilled, and every later frame of that lane is spilled too until the
//! spill is drained, so that arrival order holds. A spill is a count and a cursor into the log;
//! [`Store::load`] scans forward from the cursor for the lane's next frames. Memory per spilled
//! lane is constant, whatever the backlog: 2 million frames for an absent SU cost a cursor.
//!
//! # Group commit
//!
//! Appends go to a buffer; [`Store::write_out`] writes it to the segment once per worker turn.
//! A flusher thread calls `fdatasync` (every `flush_interval` with `batch`, at once with `sync`)
//! and publishes the position it made durable; the worker sends the ACKs of frames up to it.
//! With [`Flusher::Manual`] there is no thread and the caller runs each group commit with
//! [`Store::flush`] (a simulator, which decides when time passes).
//!
//! # The disk
//!
//! A store writes through a [`Disk`] ([`OsDisk`], real files, unless told otherwise), so that a
//! simulator can run it on [`crate::disk::SimDisk`].

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::Durability;
use crate::disk::{Disk, DiskFile, Open, OsDisk};
use crate::log::{LaneMap, Log};
use crate::wal::{self, PeerKey, Record, SegmentReader, WalError, SEGMENT_HEADER_LEN};
use crate::wire::Frame;
use dsplane_core::work_queue::WorkQueue;

/// Bytes after which a segment is closed and a new one started.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// A segment being written whose frames are all acknowledged is rolled (and so deleted) once it
/// holds this many bytes.
pub const RECLAIM_ROLL_BYTES: u64 = 1 << 20;
/// The file in each log directory that keeps room for a roll on a full disk.
pub const RESERVE_FILE: &str = "reserve";
/// Smallest reserve: a SEGMENT_START of a few thousand watermarks.
pub const RESERVE_BYTES_MIN: u64 = 64 << 10;
// The plain types of the log (positions, where a record is, what comes back) live with the
// `Log` trait in dsplane-core, which the owner is written against; the store uses them from there.
pub use crate::log::{lane_of, log_pos, Loaded, LogPos, Stored};

/// Frames of one (peer, lane) on disk only, and where the first of them is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spill {
    /// Frames of the lane that are on disk only.
    pub count: u64,
    /// Where to start looking for the next one.
    pub segment: u64,
    pub offset: u64,
}

impl Spill {
    /// Counts one more spilled frame of `lane`, at (`segment`, `offset`) if it is the first.
    pub(crate) fn count_one(
        spills: &mut LaneMap<Spill>,
        lane: (PeerKey, u8),
        segment: u64,
        offset: u64,
    ) {
        spills
            .entry(lane)
            .and_modify(|s| s.count += 1)
            .or_insert(Spill {
                count: 1,
                segment,
                offset,
            });
    }
}

/// The state of an existing log, rebuilt by recovery, to go on writing it in place.
#[derive(Debug, Default)]
pub(crate) struct Resume {
    /// The newest segment, appended to from its end.
    pub segment: u64,
    /// Live frames per segment (every segment that must be kept).
    pub live: BTreeMap<u64, u64>,
    pub watermarks: LaneMap<u64>,
    pub spills: LaneMap<Spill>,
    pub next_seq: u64,
}

/// Publishes durable positions from the flusher (a thread, or [`Store::flush`]) to the worker.
#[derive(Debug)]
struct FlushShared<F> {
    /// The segment being written, for `fdatasync`.
    file: Mutex<Arc<F>>,
    /// Highest position written out and waiting to be made durable.
    requested: AtomicU64,
    /// Highest position made durable.
    durable: AtomicU64,
    wake: Condvar,
    wake_lock: Mutex<()>,
    stop: AtomicBool,
    /// The first error `fdatasync` returned, if any; the worker stops ACKing.
    failed: AtomicBool,
}

/// Something to call when the flusher has made more durable (the worker's `mio::Waker`).
pub type Notify = Box<dyn Fn() + Send>;

/// Who makes written records durable, with durability `batch` or `sync`.
pub enum Flusher {
    /// A flusher thread: `fdatasync` every `flush_interval` (at once with `sync`) while there
    /// is something to sync, then `notify`. What the engine uses.
    Thread(Notify),
    /// No thread: the caller calls [`Store::flush`] when it chooses (a deterministic
    /// simulator). [`Store::durable_pos`] and [`Store::flush_failed`] mean the same as with a
    /// thread.
    Manual,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Flusher::Thread(_) => "Flusher::Thread",
            Flusher::Manual => "Flusher::Manual",
        })
    }
}

/// How a log is written.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// When frames count as durable.
    pub durability: Durability,
    /// Group-commit interval for `batch`.
    pub flush_interval: Duration,
    /// Bytes of the reserve file (see the module documentation); 0 for none.
    pub reserve_bytes: u64,
}

/// An append since the last successful write: undone if the write fails.
#[derive(Debug, Clone, Copy)]
struct Uncommitted {
    peer: PeerKey,
    lane: u8,
    segment: u64,
    spill: bool,
}

/// One worker's store, on real files unless `D` says otherwise. See the module documentation.
pub struct Store<D: Disk = OsDisk> {
    disk: D,
    dir: PathBuf,
    options: LogOptions,
    segment: u64,
    offset: u64,
    file: Arc<D::File>,
    buf: Vec<u8>,
    next_seq: u64,
    /// Live frames per segment; a segment is in here until its file is deleted.
    live: BTreeMap<u64, u64>,
    /// Segments with nothing live, named in a DROPPED record: the position that record ends at
    /// once written, and the file is deleted when that is durable.
    dropping: BTreeMap<u64, Option<LogPos>>,
    watermarks: LaneMap<u64>,
    spills: LaneMap<Spill>,
    flush: Arc<FlushShared<D::File>>,
    flusher: Option<std::thread::JoinHandle<()>>,
    /// The reaper thread and its queue of segment files to delete (with [`Flusher::Thread`]):
    /// deleting a full segment takes the kernel tens of milliseconds, not to be spent on the
    /// worker's thread.
    reaper: Option<(Arc<WorkQueue<PathBuf>>, std::thread::JoinHandle<()>)>,
    uncommitted: Vec<Uncommitted>,
    /// The seq of the first append since the last successful write (seqs stay gapless).
    uncommitted_seq: Option<u64>,
    /// (peer, lane) whose DONE is in the buffer: written again if the write fails.
    uncommitted_done: Vec<(PeerKey, u8)>,
    /// The lane of the latest [`Store::done`] and the highest seq acknowledged of it since,
    /// not yet in `watermarks`: acknowledgements come in runs of one lane, so a run costs no
    /// hash lookup per frame ([`Store::settle`] folds it in).
    done_run: Option<((PeerKey, u8), u64)>,
    /// The segment of the latest frames marked done and how many, not yet taken off `live`.
    done_segment: Option<(u64, u64)>,
    /// Frames appended to the segment being written, not yet counted in `live`.
    appended: u64,
    /// (peer, lane) whose watermark rose since its last DONE record was buffered: one DONE of
    /// each, with its watermark, goes in the next batch (may hold duplicates).
    dirty: Vec<(PeerKey, u8)>,
    /// The `durable_through` of the last COMMIT written.
    recorded_durable: LogPos,
    /// Where the last batch holding more than a COMMIT ends.
    data_end: LogPos,
    /// Whether the reserve file is in place.
    reserve_present: bool,
    /// A write failed since the last successful one or roll.
    write_failed: bool,
    /// Where the records of the segment being written begin (after its SEGMENT_START).
    segment_start: u64,
    /// Rolled segments are synced even with durability `none` (while recovery copies a
    /// backlog that may have been acknowledged as durable).
    sync_rolls: bool,
    /// [`Store::close`] has run.
    closed: bool,
    /// Counters.
    pub stats: StoreStats,
}

impl<D: Disk> std::fmt::Debug for Store<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("segment", &self.segment)
            .field("offset", &self.offset)
            .field("spills", &self.spills.len())
            .finish()
    }
}

/// What a store has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// ENQUEUE records written.
    pub enqueued: u64,
    /// Frames written to disk only (spilled).
    pub spilled: u64,
    /// Frames loaded back from a spill.
    pub loaded: u64,
    /// Segments deleted (or handed to the reaper thread to delete).
    pub segments_deleted: u64,
    /// Writes that failed (e.g. disk full).
    pub write_errors: u64,
    /// Times the reserve file was given up to make room for a roll.
    pub reserve_used: u64,
    /// Rolls to a new segment that failed (and were tried again later).
    pub roll_errors: u64,
}

fn segment_start(
    first_seq: u64,
    live_segments: Vec<u64>,
    watermarks: &LaneMap<u64>,
    durable_through: LogPos,
) -> Vec<u8> {
    let mut marks: Vec<(PeerKey, u8, u64)> =
        watermarks.iter().map(|((p, l), s)| (*p, *l, *s)).collect();
    marks.sort_unstable();
    let mut out = Vec::with_capacity(64 + marks.len() * 24 + live_segments.len() * 8);
    Record::SegmentStart {
        first_seq,
        live_segments,
        watermarks: marks,
    }
    .encode(&mut out);
    Record::Commit {
        durable_through,
        next_seq: first_seq,
    }
    .encode(&mut out);
    out
}

impl Store {
    /// Starts a new, empty log in `dir` (which must hold no segments): segment 1, durable
    /// before this returns, and its flusher thread.
    pub fn create(dir: &Path, options: LogOptions, notify: Notify) -> io::Result<Store> {
        Store::create_on(OsDisk, dir, options, Flusher::Thread(notify))
    }
}

impl<D: Disk> Store<D> {
    /// [`Store::create`] on `disk`, with `flusher` making it durable.
    pub fn create_on(
        disk: D,
        dir: &Path,
        options: LogOptions,
        flusher: Flusher,
    ) -> io::Result<Store<D>> {
        disk.create_dir_all(dir)?;
        if !wal::list_segments_on(&disk, dir)?.is_empty() {
            return Err(io::Error::other(format!(
                "{}: a new log cannot start where segments exist",
                dir.display()
            )));
        }
        let first = segment_start(1, Vec::new(), &LaneMap::default(), 0);
        let file = wal::create_segment_on(&disk, dir, 1, &first)?;
        file.sync_all()?;
        disk.sync_dir(dir)?;
        let mut live = BTreeMap::new();
        live.insert(1, 0);
        let resume = Resume {
            segment: 1,
            live,
            next_seq: 1,
            ..Resume::default()
        };
        let offset = SEGMENT_HEADER_LEN + first.len() as u64;
        Store::start(disk, dir, options, flusher, file, offset, resume)
    }

    /// Goes on writing an existing log whose state recovery rebuilt, from the end of its newest
    /// segment.
    pub(crate) fn resume(
        disk: D,
        dir: &Path,
        options: LogOptions,
        flusher: Flusher,
        resume: Resume,
    ) -> io::Result<Store<D>> {
        let path = wal::segment_path(dir, resume.segment);
        let file = disk.open(&path, Open::Append)?;
        let offset = file.size()?;
        Store::start(disk, dir, options, flusher, file, offset, resume)
    }

    fn start(
        disk: D,
        dir: &Path,
        options: LogOptions,
        flusher: Flusher,
        file: D::File,
        offset: u64,
        resume: Resume,
    ) -> io::Result<Store<D>> {
        let file = Arc::new(file);
        let flush = Arc::new(FlushShared {
            file: Mutex::new(Arc::clone(&file)),
            requested: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        let reaper = match &flusher {
            Flusher::Thread(_) => {
                let queue = Arc::new(WorkQueue::new());
                let work = Arc::clone(&queue);
                let disk = disk.clone();
                let thread = std::thread::Builder::new()
                    .name("dsplane-reaper".into())
                    .spawn(move || run_reaper(&disk, &work))?;
                Some((queue, thread))
            }
            Flusher::Manual => None,
        };
        let flusher = match flusher {
            Flusher::Thread(notify) if options.durability != Durability::None => {
                let shared = Arc::clone(&flush);
                let interval = match options.durability {
                    Durability::Sync => Duration::ZERO,
                    _ => options.flush_interval,
                };
                Some(
                    std::thread::Builder::new()
                        .name("dsplane-flusher".into())
                        .spawn(move || run_flusher(&shared, interval, &notify))?,
                )
            }
            _ => None,
        };
        let reserve_present = disk
            .file_len(&dir.join(RESERVE_FILE))
            .is_ok_and(|len| len >= options.reserve_bytes);
        let mut store = Store {
            disk,
            dir: dir.to_owned(),
            options,
            segment: resume.segment,
            offset,
            file,
            buf: Vec::with_capacity(1 << 20),
            next_seq: resume.next_seq.max(1),
            live: resume.live,
            dropping: BTreeMap::new(),
            watermarks: resume.watermarks,
            spills: resume.spills,
            flush,
            flusher,
            reaper,
            uncommitted: Vec::new(),
            uncommitted_seq: None,
            uncommitted_done: Vec::new(),
            done_run: None,
            done_segment: None,
            appended: 0,
            dirty: Vec::new(),
            recorded_durable: 0,
            // What is already in the log counts as data: once it is durable, an idle COMMIT
            // says so.
            data_end: log_pos(resume.segment, offset),
            reserve_present,
            write_failed: false,
            segment_start: offset,
            sync_rolls: false,
            closed: false,
            stats: StoreStats::default(),
        };
        store.live.entry(store.segment).or_insert(0);
        store.make_reserve();
        Ok(store)
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether frames are written before they are ACKed.
    pub fn is_durable(&self) -> bool {
        self.options.durability != Durability::None
    }

    /// Appends an ENQUEUE record; the frame is durable once [`Self::durable_pos`] reaches the
    /// returned position.
    pub fn append(
        &mut self,
        peer: PeerKey,
        lane: u8,
        level: u8,
        frame: &Frame,
        enqueued_unix_ns: u64,
        spill: bool,
    ) -> (Stored, LogPos) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.uncommitted_seq.get_or_insert(seq);
        let record_start = self.offset + self.buf.len() as u64;
        Record::encode_enqueue(&mut self.buf, peer, level, seq, enqueued_unix_ns, frame);
        // Counted in `live` by `settle`: every append until then is to this segment (only
        // `write_out` rolls).
        self.appended += 1;
        self.uncommitted.push(Uncommitted {
            peer,
            lane,
            segment: self.segment,
            spill,
        });
        self.stats.enqueued += 1;
        if spill {
            self.stats.spilled += 1;
            Spill::count_one(&mut self.spills, (peer, lane), self.segment, record_start);
        }
        let stored = Stored {
            seq,
            segment: self.segment,
        };
        (
            stored,
            log_pos(self.segment, self.offset + self.buf.len() as u64),
        )
    }

    /// Whether (peer, lane) has frames on disk only: new frames of that lane must spill too.
    pub fn is_spilled(&self, peer: PeerKey, lane: u8) -> bool {
        // Asked for every frame taken; nothing spilled is the common case, and needs no hash.
        !self.spills.is_empty() && self.spills.contains_key(&(peer, lane))
    }

    /// Frames of (peer, lane) on disk only.
    pub fn spilled(&self, peer: PeerKey, lane: u8) -> u64 {
        self.spills.get(&(peer, lane)).map_or(0, |s| s.count)
    }

    /// Every spilled (peer, lane) and its count (after recovery, to seed the schedulers).
    pub fn spills(&self) -> impl Iterator<Item = (PeerKey, u8, u64)> + '_ {
        self.spills.iter().map(|((p, l), s)| (*p, *l, s.count))
    }

    /// (peer, lane) is acknowledged through the frame `stored`: raises the watermark (its
    /// DONE record goes in the next batch, one per lane whatever the number of frames) and
    /// frees the frame's place in its segment.
    #[inline]
    pub fn done(&mut self, peer: PeerKey, lane: u8, stored: Stored) {
        match &mut self.done_run {
            Some((run, seq)) if *run == (peer, lane) => *seq = (*seq).max(stored.seq),
            _ => {
                if let Some(((peer, lane), seq)) = self.done_run.take() {
                    self.mark_done(peer, lane, seq);
                }
                self.done_run = Some(((peer, lane), stored.seq));
            }
        }
        match &mut self.done_segment {
            Some((segment, n)) if *segment == stored.segment => *n += 1,
            _ => {
                self.settle_segment();
                self.done_segment = Some((stored.segment, 1));
            }
        }
    }

    /// Folds what `append` and `done` keep aside (the run of acknowledgements, the counts of
    /// live frames) into `watermarks` and `live`: before anything reads them.
    fn settle(&mut self) {
        if let Some(((peer, lane), seq)) = self.done_run.take() {
            self.mark_done(peer, lane, seq);
        }
        self.settle_segment();
    }

    fn settle_segment(&mut self) {
        let appended = std::mem::take(&mut self.appended);
        if appended > 0 {
            *self.live.entry(self.segment).or_insert(0) += appended;
        }
        if let Some((segment, n)) = self.done_segment.take() {
            if let Some(live) = self.live.get_mut(&segment) {
                *live = live.saturating_sub(n);
            }
        }
    }

    /// Raises the watermark of (peer, lane) to `seq` (recovery: frames of a peer no longer
    /// configured); its DONE record goes in the next batch.
    pub(crate) fn mark_done(&mut self, peer: PeerKey, lane: u8, seq: u64) {
        let mark = self.watermarks.entry((peer, lane)).or_insert(0);
        if seq > *mark {
            *mark = seq;
            self.dirty.push((peer, lane));
        }
    }

    /// Buffers one DONE record, with its watermark, of every lane whose watermark rose since
    /// the last batch.
    fn write_dones(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &(peer, lane) in &dirty {
            if let Some(&seq) = self.watermarks.get(&(peer, lane)) {
                self.write_done(peer, lane, seq);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Buffers the DONE record of (peer, lane) through `seq`.
    fn write_done(&mut self, peer: PeerKey, lane: u8, seq: u64) {
        Record::Done {
            peer,
            level: lane,
            seq,
        }
        .encode(&mut self.buf);
        self.uncommitted_done.push((peer, lane));
    }

    /// Writes the buffered records to the segment (one `write`, ended by a COMMIT), asks the
    /// flusher to make it durable, rolls to a new segment when this one is full or fully
    /// acknowledged, and deletes segments with nothing live once that is durable. On an error
    /// (a full disk), the partial write is cut off and the buffered frames are forgotten: the
    /// caller refuses them (NACK 5). Watermarks are written again with the next batch.
    pub fn write_out(&mut self) -> io::Result<LogPos> {
        self.settle();
        self.write_dones();
        self.name_dead_segments();
        let durable = self.flushed_pos();
        let idle_commit = self.is_durable()
            && self.buf.is_empty()
            && self.data_end > self.recorded_durable
            && durable >= self.data_end;
        if !self.buf.is_empty() || idle_commit {
            let had_data = !self.buf.is_empty();
            let batch_end = self.offset + self.buf.len() as u64;
            Record::Commit {
                durable_through: durable,
                next_seq: self.next_seq,
            }
            .encode(&mut self.buf);
            if let Err(e) = self.file.append_all(&self.buf) {
                self.undo_batch();
                // Everything here is acknowledged: roll, so the space comes back. Not again
                // for a segment that holds nothing yet (a roll on every failed write would
                // only burn the reserve).
                if self.live.get(&self.segment) == Some(&0) && self.offset > self.segment_start {
                    if let Err(e) = self.roll() {
                        self.roll_failed(&e);
                    }
                }
                // Segments already dropped still go: that is the space a full disk waits for.
                self.delete_dropped();
                return Err(e);
            }
            self.offset += self.buf.len() as u64;
            self.buf.clear();
            self.recorded_durable = durable;
            if had_data {
                self.data_end = log_pos(self.segment, batch_end);
            }
            let written = log_pos(self.segment, self.offset);
            for pos in self.dropping.values_mut() {
                pos.get_or_insert(written);
            }
            self.write_failed = false;
        }
        self.uncommitted.clear();
        self.uncommitted_seq = None;
        self.uncommitted_done.clear();
        let pos = log_pos(self.segment, self.offset);
        if self.is_durable() {
            self.flush.requested.fetch_max(pos, Ordering::Release);
            let _guard = self.flush.wake_lock.lock();
            self.flush.wake.notify_one();
        }
        let acknowledged =
            self.live.get(&self.segment) == Some(&0) && self.offset >= RECLAIM_ROLL_BYTES;
        if self.offset >= SEGMENT_BYTES_MAX || acknowledged {
            // The batch is written: its frames are taken whatever the roll does. A roll that
            // fails is tried again with the next batch.
            if let Err(e) = self.roll() {
                self.roll_failed(&e);
            }
        }
        self.delete_dropped();
        Ok(pos)
    }

    fn roll_failed(&mut self, e: &io::Error) {
        self.stats.roll_errors += 1;
        if self.stats.roll_errors.is_power_of_two() {
            tracing::warn!(dir = %self.dir.display(), error = %e, failures = self.stats.roll_errors, "cannot start a new WAL segment; writing on in this one");
        }
    }

    /// Forgets a batch that could not be written, so that the log on disk and the counts agree.
    fn undo_batch(&mut self) {
        self.stats.write_errors += 1;
        self.write_failed = true;
        // Cut back to the last whole batch, so the log stays readable.
        let _ = self.file.set_len(self.offset);
        self.buf.clear();
        for u in self.uncommitted.drain(..) {
            if let Some(live) = self.live.get_mut(&u.segment) {
                *live = live.saturating_sub(1);
            }
            if u.spill {
                if let Some(s) = self.spills.get_mut(&(u.peer, u.lane)) {
                    s.count -= 1;
                    if s.count == 0 {
                        self.spills.remove(&(u.peer, u.lane));
                    }
                }
            }
        }
        if let Some(seq) = self.uncommitted_seq.take() {
            self.next_seq = seq;
        }
        // DROPPED records not written: named again next time.
        self.dropping.retain(|_, pos| pos.is_some());
        // The watermarks stay in memory; their DONE records go with the next batch.
        let done = std::mem::take(&mut self.uncommitted_done);
        self.dirty.extend(done);
    }

    /// The position the flusher has made durable (0 with durability `none`: nothing is known).
    fn flushed_pos(&self) -> LogPos {
        if self.is_durable() {
            self.flush.durable.load(Ordering::Acquire)
        } else {
            0
        }
    }

    /// Starts the next segment: it is created whole (header, SEGMENT_START) and made durable
    /// before the old one is ended with ROLLED, so a crash leaves either no new segment or a
    /// complete one.
    fn roll(&mut self) -> io::Result<()> {
        if self.is_durable() || self.sync_rolls {
            // Everything requested in the old segment is durable once this returns, so the
            // flusher may move on to the new file.
            self.file.sync_data()?;
            self.flush
                .durable
                .fetch_max(log_pos(self.segment, self.offset), Ordering::Release);
        }
        let next = self.segment + 1;
        let live_segments: Vec<u64> = self
            .live
            .keys()
            .filter(|s| !self.dropping.contains_key(s))
            .copied()
            .collect();
        let durable_through = self.flushed_pos();
        let first = segment_start(
            self.next_seq,
            live_segments,
            &self.watermarks,
            durable_through,
        );
        let file = match wal::create_segment_on(&self.disk, &self.dir, next, &first) {
            Err(e) if wal::is_no_space(&e) && self.give_up_reserve() => {
                wal::create_segment_on(&self.disk, &self.dir, next, &first)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a roll that failed after creating it: it never held a frame (this
                // log never switched to it), so it is made again.
                self.disk.remove_file(&wal::segment_path(&self.dir, next))?;
                wal::create_segment_on(&self.disk, &self.dir, next, &first)
            }
            other => other,
        }?;
        if self.is_durable() {
            file.sync_data()?;
        }
        self.disk.sync_dir(&self.dir)?;
        let mut tail = Vec::with_capacity(64);
        Record::Rolled { next }.encode(&mut tail);
        Record::Commit {
            durable_through,
            next_seq: self.next_seq,
        }
        .encode(&mut tail);
        // The old segment names its successor, so a deleted newest segment is noticed. If this
        // cannot be written (a full disk), the new segment exists anyway and nothing is lost.
        if self.file.append_all(&tail).is_err() {
            let _ = self.file.set_len(self.offset);
        } else if self.is_durable() || self.sync_rolls {
            self.file.sync_data()?;
        }
        let file = Arc::new(file);
        *self.flush.file.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&file);
        self.file = file;
        self.segment = next;
        self.offset = SEGMENT_HEADER_LEN + first.len() as u64;
        self.segment_start = self.offset;
        self.live.insert(next, 0);
        self.recorded_durable = durable_through;
        self.write_failed = false;
        self.make_reserve();
        Ok(())
    }

    /// Names every segment with nothing live (other than the one being written) in a DROPPED
    /// record.
    fn name_dead_segments(&mut self) {
        let dead: Vec<u64> = self
            .live
            .iter()
            .filter(|(seg, live)| {
                **live == 0 && **seg != self.segment && !self.dropping.contains_key(seg)
            })
            .map(|(seg, _)| *seg)
            .collect();
        for segment in dead {
            Record::Dropped { segment }.encode(&mut self.buf);
            self.dropping.insert(segment, None);
        }
    }

    /// Deletes the segments whose DROPPED record is durable.
    fn delete_dropped(&mut self) {
        let durable = if self.is_durable() {
            self.flush.durable.load(Ordering::Acquire)
        } else {
            LogPos::MAX
        };
        let ready: Vec<u64> = self
            .dropping
            .iter()
            .filter(|(_, pos)| pos.is_some_and(|p| p <= durable))
            .map(|(seg, _)| *seg)
            .collect();
        let mut freed = false;
        for seg in ready {
            let mut path = wal::segment_path(&self.dir, seg);
            // Off this thread, unless the disk is short of room (the reserve is gone, or a write
            // failed): then the space is wanted before the next write, and the reserve is made
            // again from it.
            if let Some((queue, _)) = self
                .reaper
                .as_ref()
                .filter(|_| self.reserve_present && !self.write_failed)
            {
                match queue.push(path) {
                    Ok(()) => {
                        self.stats.segments_deleted += 1;
                        self.live.remove(&seg);
                        self.dropping.remove(&seg);
                        continue;
                    }
                    Err(back) => path = back,
                }
            }
            match self.disk.remove_file(&path) {
                Ok(()) => {
                    self.stats.segments_deleted += 1;
                    freed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(segment = seg, error = %e, "cannot delete WAL segment");
                    continue;
                }
            }
            self.live.remove(&seg);
            self.dropping.remove(&seg);
        }
        if freed {
            self.make_reserve();
        }
    }

    /// Puts the reserve file in place if it is missing and there is room for it.
    fn make_reserve(&mut self) {
        let bytes = self.options.reserve_bytes;
        if self.reserve_present || bytes == 0 {
            return;
        }
        let path = self.dir.join(RESERVE_FILE);
        let result = (|| -> io::Result<()> {
            // An existing shorter reserve (a smaller configuration before) is extended, not
            // thrown away.
            let f = self.disk.open(&path, Open::AppendOrCreate)?;
            let zeros = vec![0u8; 64 << 10];
            let mut left = bytes.saturating_sub(f.size()?);
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.append_all(zeros.get(..n).unwrap_or(&zeros))?;
                left -= n as u64;
            }
            f.sync_all()
        })();
        // On an error what was written stays: part of a reserve is still room for a roll.
        if result.is_ok() {
            self.reserve_present = true;
        }
    }

    /// Deletes the reserve file to make room; whether there was one.
    fn give_up_reserve(&mut self) -> bool {
        self.reserve_present = false;
        // Whole or partly made, the file is room.
        if self.disk.remove_file(&self.dir.join(RESERVE_FILE)).is_err() {
            return false;
        }
        self.stats.reserve_used += 1;
        tracing::warn!(dir = %self.dir.display(), "disk full: the log's reserve is used to start a new segment and reclaim acknowledged ones");
        true
    }

    /// The highest position known durable (everything, with durability `none`).
    pub fn durable_pos(&self) -> LogPos {
        if self.is_durable() {
            self.flush.durable.load(Ordering::Acquire)
        } else {
            LogPos::MAX
        }
    }

    /// Bytes of this log on disk (every segment not yet deleted).
    pub fn disk_bytes(&self) -> u64 {
        self.live
            .keys()
            .map(|seg| {
                if *seg == self.segment {
                    self.offset
                } else {
                    self.disk
                        .file_len(&wal::segment_path(&self.dir, *seg))
                        .unwrap_or(0)
                }
            })
            .sum()
    }

    /// Syncs every rolled segment, whatever the durability (recovery's copy of a backlog).
    pub(crate) fn set_sync_rolls(&mut self, on: bool) {
        self.sync_rolls = on;
    }

    /// Makes everything written durable now (recovery, before the generation is named).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()?;
        self.disk.sync_dir(&self.dir)
    }

    /// One group commit now, what the flusher thread does once per interval: syncs what was
    /// written out and advances [`Self::durable_pos`], or on an error sets
    /// [`Self::flush_failed`]. For a store made with [`Flusher::Manual`], whose caller decides
    /// when; harmless beside a thread. Returns the durable position. Like the thread, it does
    /// nothing when nothing new was written, and after a failure it never syncs again (the
    /// kernel may have dropped the pages: a later success would claim what it cannot give).
    pub fn flush(&self) -> io::Result<LogPos> {
        if !self.is_durable() {
            return Ok(LogPos::MAX);
        }
        if self.flush_failed() {
            return Err(io::Error::other(
                "an earlier fdatasync failed: nothing more is made durable",
            ));
        }
        if self.flush.requested.load(Ordering::Acquire) > self.flush.durable.load(Ordering::Acquire)
        {
            flush_once(&self.flush)?;
        }
        Ok(self.durable_pos())
    }

    /// Whether `fdatasync` has failed: nothing more can be ACKed as durable.
    pub fn flush_failed(&self) -> bool {
        self.flush.failed.load(Ordering::Acquire)
    }

    /// Loads up to `max` spilled frames of (peer, lane), in order.
    pub fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        max: usize,
        lane_of: impl Fn(u8) -> u8,
    ) -> Result<Vec<Loaded>, WalError> {
        let mut out = Vec::new();
        if !self.spills.contains_key(&(peer, lane)) {
            return Ok(out);
        }
        // What is buffered is written first, so that the reader sees every record. A write that
        // fails (a full disk) undoes the appends buffered since the last one, spills included,
        // so what is on disk is still all there is to load: the load goes on, from the spill as
        // the undo left it.
        if let Err(e) = self.write_out() {
            tracing::debug!(error = %e, "write before a load failed; loading what is on disk");
        }
        let Some(mut spill) = self.spills.get(&(peer, lane)).copied() else {
            return Ok(out);
        };
        let watermark = self.watermarks.get(&(peer, lane)).copied().unwrap_or(0);
        let segments: Vec<u64> = self
            .live
            .range(spill.segment..)
            .filter(|(s, live)| **live > 0 || **s == self.segment)
            .map(|(s, _)| *s)
            .collect();
        'segments: for seg in segments {
            let start = if seg == spill.segment {
                spill.offset
            } else {
                0
            };
            let path = wal::segment_path(&self.dir, seg);
            let mut reader = SegmentReader::open_on(&self.disk, &path, start)?;
            while let Some((at, record)) = reader.next_record()? {
                spill.segment = seg;
                spill.offset = at;
                if out.len() >= max || spill.count == 0 {
                    break 'segments;
                }
                if let Record::Enqueue {
                    peer: p,
                    level,
                    seq,
                    enqueued_unix_ns,
                    frame,
                } = record
                {
                    if p == peer && lane_of(level) == lane && seq > watermark {
                        out.push(Loaded {
                            stored: Stored { seq, segment: seg },
                            level,
                            enqueued_unix_ns,
                            frame,
                        });
                        spill.count -= 1;
                    }
                }
                spill.offset = reader.offset();
            }
            if let Some(e) = reader.corrupt_error() {
                return Err(e);
            }
        }
        self.stats.loaded += out.len() as u64;
        if spill.count == 0 {
            self.spills.remove(&(peer, lane));
        } else {
            self.spills.insert((peer, lane), spill);
        }
        Ok(out)
    }

    /// Writes what is buffered, makes it durable, ends the log with a COMMIT that says all of
    /// it is durable (so that damage to it later is seen as corruption, not a torn tail), and
    /// stops the flusher.
    pub fn close(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        if self.write_out().is_ok() && self.file.sync_data().is_ok() {
            let end = log_pos(self.segment, self.offset);
            let mut last = Vec::with_capacity(wal::COMMIT_RECORD_LEN);
            Record::Commit {
                durable_through: end,
                next_seq: self.next_seq,
            }
            .encode(&mut last);
            if self.file.append_all(&last).is_ok() {
                self.offset += last.len() as u64;
                let _ = self.file.sync_data();
            } else {
                let _ = self.file.set_len(self.offset);
            }
        }
        self.flush.stop.store(true, Ordering::Release);
        {
            let _guard = self.flush.wake_lock.lock();
            self.flush.wake.notify_one();
        }
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
        // The segments handed to the reaper are deleted before this returns.
        if let Some((queue, t)) = self.reaper.take() {
            queue.close();
            let _ = t.join();
        }
    }
}

/// The reaper thread: deletes the segment files it is given, in order, until the queue closes.
/// A file it cannot delete is left (and logged): nothing reads it again, and the next start's
/// recovery deletes it (a segment left over that nothing needs, see `docs/durability.md`).
fn run_reaper<D: Disk>(disk: &D, queue: &WorkQueue<PathBuf>) {
    while let Some(path) = queue.next() {
        match disk.remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete WAL segment");
            }
        }
    }
}

impl<D: Disk> Drop for Store<D> {
    fn drop(&mut self) {
        self.close();
    }
}

fn run_flusher<F: DiskFile>(shared: &FlushShared<F>, interval: Duration, notify: &Notify) {
    let mut last_sync = std::time::Instant::now() - interval;
    loop {
        {
            let mut guard = shared.wake_lock.lock().unwrap_or_else(|p| p.into_inner());
            while shared.requested.load(Ordering::Acquire) <= shared.durable.load(Ordering::Acquire)
                && !shared.stop.load(Ordering::Acquire)
            {
                guard = shared
                    .wake
                    .wait_timeout(guard, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        // Group commit: at most one sync per interval. Under load, what arrives while one
        // sync runs (or during the rest of its interval) goes in the next; a lone frame after
        // a quiet spell is synced at once instead of waiting a whole interval.
        let since = last_sync.elapsed();
        if since < interval {
            std::thread::sleep(interval - since);
        }
        last_sync = std::time::Instant::now();
        let synced = flush_once(shared);
        notify();
        if synced.is_err() {
            return;
        }
    }
}

/// One group commit: `fdatasync` of the segment being written, then the position it made
/// durable is published; on an error, the log is failed for good (see `docs/durability.md`).
fn flush_once<F: DiskFile>(shared: &FlushShared<F>) -> io::Result<()> {
    // Acquire pairs with the worker's Release `fetch_max` in `write_out`: the bytes up to
    // `target` were written before it was published.
    let target = shared.requested.load(Ordering::Acquire);
    let file = Arc::clone(&shared.file.lock().unwrap_or_else(|p| p.into_inner()));
    match file.sync_data() {
        Ok(()) => {
            // Release pairs with the worker's Acquire load in `durable_pos`.
            shared.durable.fetch_max(target, Ordering::Release);
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "fdatasync failed: no more frames will be acknowledged");
            shared.failed.store(true, Ordering::Release);
            Err(e)
        }
    }
}

/// The store is the engine's [`Log`]: the owner writes through it on real files ([`OsDisk`]) and,
/// in the simulator, on a simulated disk. (Here and not with the trait: the orphan rule puts the
/// impl with `Store`.)
impl<D: Disk> Log for Store<D> {
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
        Store::load(self, peer, lane, max, lane_of(fifo))
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

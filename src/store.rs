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
//! and one number per (peer, lane) says everything. Each new segment starts with a CHECKPOINT of
//! every watermark, so that deleting old segments never loses one.
//!
//! # Space
//!
//! Each segment counts its live frames (written, not yet acknowledged or expired). A segment
//! other than the one being written whose count reaches zero is deleted.
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

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::Durability;
use crate::wal::{self, PeerKey, Record, SegmentEnd, SegmentReader, WalError, SEGMENT_HEADER_LEN};
use crate::wire::Frame;

/// Bytes after which a segment is closed and a new one started.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// Segment offsets fit in this many bits of a [`LogPos`].
const OFFSET_BITS: u32 = 40;

/// A position in one worker's log: segment number and byte offset, ordered.
pub type LogPos = u64;

fn log_pos(segment: u64, offset: u64) -> LogPos {
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

#[derive(Debug, Clone, Copy)]
struct Spill {
    /// Frames of the lane that are on disk only.
    count: u64,
    /// Where to start looking for the next one.
    segment: u64,
    offset: u64,
}

/// Publishes durable positions from the flusher thread to the worker.
#[derive(Debug)]
struct FlushShared {
    /// The segment being written, for `fdatasync`.
    file: Mutex<Arc<File>>,
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

/// One worker's store. See the module documentation.
pub struct Store {
    dir: PathBuf,
    durability: Durability,
    segment: u64,
    offset: u64,
    file: Arc<File>,
    buf: Vec<u8>,
    next_seq: u64,
    /// Live frames per segment.
    live: BTreeMap<u64, u64>,
    watermarks: HashMap<(PeerKey, u8), u64>,
    spills: HashMap<(PeerKey, u8), Spill>,
    flush: Arc<FlushShared>,
    flusher: Option<std::thread::JoinHandle<()>>,
    /// Appends since the last successful write: undone if the write fails.
    uncommitted: Vec<(PeerKey, u8, u64, bool)>,
    /// Counters.
    pub stats: StoreStats,
}

impl std::fmt::Debug for Store {
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
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Writes that failed (e.g. disk full).
    pub write_errors: u64,
}

impl Store {
    /// Opens a fresh log in `dir` (which must hold no segments) and starts its flusher.
    pub fn create(
        dir: &Path,
        durability: Durability,
        flush_interval: Duration,
        notify: Notify,
    ) -> io::Result<Store> {
        fs::create_dir_all(dir)?;
        let segment = wal::list_segments(dir)?.last().map_or(1, |n| n + 1);
        let file = Arc::new(wal::create_segment(dir, segment)?);
        let flush = Arc::new(FlushShared {
            file: Mutex::new(Arc::clone(&file)),
            requested: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        let flusher = if durability == Durability::None {
            None
        } else {
            let shared = Arc::clone(&flush);
            let interval = match durability {
                Durability::Sync => Duration::ZERO,
                _ => flush_interval,
            };
            Some(
                std::thread::Builder::new()
                    .name("dsplane-flusher".into())
                    .spawn(move || run_flusher(&shared, interval, &notify))?,
            )
        };
        let mut live = BTreeMap::new();
        live.insert(segment, 0);
        Ok(Store {
            dir: dir.to_owned(),
            durability,
            segment,
            offset: SEGMENT_HEADER_LEN,
            file,
            buf: Vec::with_capacity(1 << 20),
            next_seq: 1,
            live,
            watermarks: HashMap::new(),
            spills: HashMap::new(),
            flush,
            flusher,
            uncommitted: Vec::new(),
            stats: StoreStats::default(),
        })
    }

    /// Whether frames are written before they are ACKed.
    pub fn is_durable(&self) -> bool {
        self.durability != Durability::None
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
        let record_start = self.offset + self.buf.len() as u64;
        Record::Enqueue {
            peer,
            level,
            seq,
            enqueued_unix_ns,
            frame: frame.clone(),
        }
        .encode(&mut self.buf);
        *self.live.entry(self.segment).or_insert(0) += 1;
        self.uncommitted.push((peer, lane, self.segment, spill));
        self.stats.enqueued += 1;
        if spill {
            self.stats.spilled += 1;
            let (segment, offset) = (self.segment, record_start);
            self.spills
                .entry((peer, lane))
                .and_modify(|s| s.count += 1)
                .or_insert(Spill {
                    count: 1,
                    segment,
                    offset,
                });
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
        self.spills.contains_key(&(peer, lane))
    }

    /// Frames of (peer, lane) on disk only.
    pub fn spilled(&self, peer: PeerKey, lane: u8) -> u64 {
        self.spills.get(&(peer, lane)).map_or(0, |s| s.count)
    }

    /// Every spilled (peer, lane) and its count (after recovery, to seed the schedulers).
    pub fn spills(&self) -> impl Iterator<Item = (PeerKey, u8, u64)> + '_ {
        self.spills.iter().map(|((p, l), s)| (*p, *l, s.count))
    }

    /// (peer, lane) is acknowledged through the frame `stored`: writes the watermark and frees
    /// the frame's place in its segment.
    pub fn done(&mut self, peer: PeerKey, lane: u8, stored: Stored) {
        let mark = self.watermarks.entry((peer, lane)).or_insert(0);
        if stored.seq > *mark {
            *mark = stored.seq;
            Record::Done {
                peer,
                level: lane,
                seq: stored.seq,
            }
            .encode(&mut self.buf);
        }
        if let Some(live) = self.live.get_mut(&stored.segment) {
            *live = live.saturating_sub(1);
        }
    }

    /// Writes the buffered records to the segment (one `write`), rolls to a new segment when
    /// this one is full, deletes segments with nothing live, and asks the flusher to make it
    /// durable. On an error (a full disk), the partial write is cut off and the buffered records
    /// are dropped: the caller refuses the frames they held (NACK 5).
    pub fn write_out(&mut self) -> io::Result<LogPos> {
        if !self.buf.is_empty() {
            let result = (&*self.file).write_all(&self.buf);
            if let Err(e) = result {
                self.stats.write_errors += 1;
                // Cut back to the last whole record, so the log stays readable, and forget
                // what the lost records counted.
                let _ = self.file.set_len(self.offset);
                self.buf.clear();
                for (peer, lane, segment, spill) in self.uncommitted.drain(..) {
                    if let Some(live) = self.live.get_mut(&segment) {
                        *live = live.saturating_sub(1);
                    }
                    if spill {
                        if let Some(s) = self.spills.get_mut(&(peer, lane)) {
                            s.count -= 1;
                            if s.count == 0 {
                                self.spills.remove(&(peer, lane));
                            }
                        }
                    }
                }
                return Err(e);
            }
            self.offset += self.buf.len() as u64;
            self.buf.clear();
        }
        self.uncommitted.clear();
        let pos = log_pos(self.segment, self.offset);
        if self.is_durable() {
            self.flush.requested.fetch_max(pos, Ordering::Release);
            let _guard = self.flush.wake_lock.lock();
            self.flush.wake.notify_one();
        }
        if self.offset >= SEGMENT_BYTES_MAX {
            self.roll()?;
        }
        self.delete_dead_segments();
        Ok(pos)
    }

    fn roll(&mut self) -> io::Result<()> {
        if self.is_durable() {
            // Everything requested in the old segment is durable once this returns, so the
            // flusher may move on to the new file.
            self.file.sync_data()?;
            self.flush
                .durable
                .fetch_max(log_pos(self.segment, self.offset), Ordering::Release);
        }
        let next = self.segment + 1;
        let file = Arc::new(wal::create_segment(&self.dir, next)?);
        wal::sync_dir(&self.dir)?;
        *self.flush.file.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&file);
        self.file = file;
        self.segment = next;
        self.offset = SEGMENT_HEADER_LEN;
        self.live.insert(next, 0);
        let entries: Vec<(PeerKey, u8, u64)> = self
            .watermarks
            .iter()
            .map(|((p, l), s)| (*p, *l, *s))
            .collect();
        Record::Checkpoint(entries).encode(&mut self.buf);
        Ok(())
    }

    fn delete_dead_segments(&mut self) {
        let dead: Vec<u64> = self
            .live
            .iter()
            .filter(|(seg, live)| **live == 0 && **seg != self.segment)
            .map(|(seg, _)| *seg)
            .collect();
        for seg in dead {
            match fs::remove_file(wal::segment_path(&self.dir, seg)) {
                Ok(()) => {
                    self.live.remove(&seg);
                    self.stats.segments_deleted += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.live.remove(&seg);
                }
                Err(e) => tracing::warn!(segment = seg, error = %e, "cannot delete WAL segment"),
            }
        }
    }

    /// The highest position known durable (everything, with durability `none`).
    pub fn durable_pos(&self) -> LogPos {
        if self.is_durable() {
            self.flush.durable.load(Ordering::Acquire)
        } else {
            LogPos::MAX
        }
    }

    /// Bytes of this log on disk (every live segment).
    pub fn disk_bytes(&self) -> u64 {
        self.live
            .keys()
            .map(|seg| {
                if *seg == self.segment {
                    self.offset
                } else {
                    fs::metadata(wal::segment_path(&self.dir, *seg)).map_or(0, |m| m.len())
                }
            })
            .sum()
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
        let Some(mut spill) = self.spills.get(&(peer, lane)).copied() else {
            return Ok(out);
        };
        if let Err(source) = self.write_out() {
            return Err(WalError::Io {
                path: self.dir.clone(),
                source,
            });
        }
        let watermark = self.watermarks.get(&(peer, lane)).copied().unwrap_or(0);
        let segments: Vec<u64> = self.live.range(spill.segment..).map(|(s, _)| *s).collect();
        'segments: for seg in segments {
            let start = if seg == spill.segment {
                spill.offset
            } else {
                0
            };
            let path = wal::segment_path(&self.dir, seg);
            let mut reader = SegmentReader::open(&path, start)?;
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

    /// Stops the flusher after a last flush.
    pub fn close(&mut self) {
        let _ = self.write_out();
        if self.is_durable() {
            let _ = self.file.sync_data();
        }
        self.flush.stop.store(true, Ordering::Release);
        {
            let _guard = self.flush.wake_lock.lock();
            self.flush.wake.notify_one();
        }
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn run_flusher(shared: &FlushShared, interval: Duration, notify: &Notify) {
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
        // Acquire pairs with the worker's Release `fetch_max` in `write_out`: the bytes up to
        // `target` were written before it was published.
        let target = shared.requested.load(Ordering::Acquire);
        let file = Arc::clone(&shared.file.lock().unwrap_or_else(|p| p.into_inner()));
        match file.sync_data() {
            Ok(()) => {
                // Release pairs with the worker's Acquire load in `durable_pos`.
                shared.durable.fetch_max(target, Ordering::Release);
                notify();
            }
            Err(e) => {
                tracing::error!(error = %e, "fdatasync failed: no more frames will be acknowledged");
                shared.failed.store(true, Ordering::Release);
                notify();
                return;
            }
        }
    }
}

// ---- recovery -------------------------------------------------------------------------------

/// The file naming the current generation of logs.
const CURRENT: &str = "CURRENT";

/// How this run's logs are kept.
#[derive(Debug, Clone, Copy)]
pub struct LogSettings {
    /// Workers, one log each.
    pub workers: usize,
    /// When frames count as durable.
    pub durability: Durability,
    /// Group-commit interval for `batch`.
    pub flush_interval: Duration,
}

/// What recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Frames carried into the new generation (not yet acknowledged by their receivers).
    pub frames_recovered: u64,
    /// Frames whose receiver is no longer configured, written to the expiry record instead.
    pub frames_orphaned: u64,
    /// Torn tails cut off: (file, offset).
    pub torn_tails: Vec<(PathBuf, u64)>,
    /// The generation started.
    pub generation: u64,
}

/// Reads the logs of the previous run (whatever its number of workers), and writes every frame
/// not yet acknowledged into a fresh log per worker of this run, in order, owned as `owner`
/// says. Returns the new stores, each with its frames spilled (on disk only, loaded by priority
/// as their peers take them) and the report.
///
/// A crash during recovery is safe: the old generation is deleted only after the new one is
/// durable and named in `CURRENT`.
pub fn recover(
    data_dir: &Path,
    settings: LogSettings,
    owner: impl Fn(PeerKey) -> Option<usize>,
    lane_of: impl Fn(u8) -> u8,
    mut notify: impl FnMut(usize) -> Notify,
    mut orphan: impl FnMut(&Record),
) -> Result<(Vec<Store>, RecoveryReport), WalError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| WalError::Io { path, source }
    };
    fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    let current_path = data_dir.join(CURRENT);
    let old_gen = match fs::read_to_string(&current_path) {
        Ok(text) => text.trim().parse::<u64>().ok(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&current_path)(e)),
    };
    let generation = old_gen.map_or(1, |g| g + 1);
    let gen_dir = |g: u64| data_dir.join(format!("gen-{g}"));
    let new_dir = gen_dir(generation);
    // A previous recovery that crashed before naming its generation left it half-made.
    if new_dir.exists() {
        fs::remove_dir_all(&new_dir).map_err(io_err(&new_dir))?;
    }
    let mut report = RecoveryReport {
        generation,
        ..RecoveryReport::default()
    };

    let LogSettings {
        workers,
        durability,
        flush_interval,
    } = settings;
    let mut stores = Vec::with_capacity(workers);
    for w in 0..workers {
        let dir = new_dir.join(format!("w{w}"));
        stores.push(
            Store::create(&dir, durability, flush_interval, notify(w)).map_err(io_err(&dir))?,
        );
    }

    if let Some(g) = old_gen {
        let old_dir = gen_dir(g);
        let worker_dirs: Vec<PathBuf> = match fs::read_dir(&old_dir) {
            Ok(entries) => {
                let mut v: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect();
                v.sort();
                v
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&old_dir)(e)),
        };
        // Pass 1: watermarks, and torn tails cut off.
        let mut marks: HashMap<(PeerKey, u8), u64> = HashMap::new();
        for dir in &worker_dirs {
            let segments = wal::list_segments(dir).map_err(io_err(dir))?;
            for (i, seg) in segments.iter().enumerate() {
                let path = wal::segment_path(dir, *seg);
                let mut reader = SegmentReader::open(&path, 0)?;
                while let Some((_, record)) = reader.next_record()? {
                    match record {
                        Record::Done { peer, level, seq } => {
                            let m = marks.entry((peer, level)).or_insert(0);
                            *m = (*m).max(seq);
                        }
                        Record::Checkpoint(entries) => {
                            for (peer, level, seq) in entries {
                                let m = marks.entry((peer, level)).or_insert(0);
                                *m = (*m).max(seq);
                            }
                        }
                        Record::Enqueue { .. } => {}
                    }
                }
                if let Some(SegmentEnd::Damaged { offset, why }) = reader.end() {
                    if i + 1 == segments.len() {
                        tracing::warn!(file = %path.display(), offset, why, "cutting off a torn WAL tail");
                        wal::truncate_torn_tail(&path, offset).map_err(io_err(&path))?;
                        report.torn_tails.push((path.clone(), offset));
                    } else if let Some(e) = reader.corrupt_error() {
                        return Err(e);
                    }
                }
            }
        }
        // Pass 2: every frame not acknowledged goes to its owner's new log, in order.
        for dir in &worker_dirs {
            let segments = wal::list_segments(dir).map_err(io_err(dir))?;
            for seg in segments {
                let path = wal::segment_path(dir, seg);
                let mut reader = SegmentReader::open(&path, 0)?;
                while let Some((_, record)) = reader.next_record()? {
                    let Record::Enqueue {
                        peer,
                        level,
                        seq,
                        enqueued_unix_ns,
                        ref frame,
                    } = record
                    else {
                        continue;
                    };
                    let lane = lane_of(level);
                    if seq <= marks.get(&(peer, lane)).copied().unwrap_or(0) {
                        continue;
                    }
                    match owner(peer) {
                        Some(w) if w < stores.len() => {
                            let store = &mut stores[w];
                            store.append(peer, lane, level, frame, enqueued_unix_ns, true);
                            report.frames_recovered += 1;
                            if store.buf.len() >= 4 << 20 {
                                store.write_out().map_err(io_err(&store.dir))?;
                            }
                        }
                        _ => {
                            orphan(&record);
                            report.frames_orphaned += 1;
                        }
                    }
                }
            }
        }
    }
    for store in &mut stores {
        store.write_out().map_err(io_err(&store.dir))?;
        store.file.sync_data().map_err(io_err(&store.dir))?;
        wal::sync_dir(&store.dir).map_err(io_err(&store.dir))?;
    }
    wal::sync_dir(&new_dir).map_err(io_err(&new_dir))?;
    // Name the new generation atomically, then drop the old one.
    let tmp = data_dir.join("CURRENT.tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(format!("{generation}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, &current_path).map_err(io_err(&current_path))?;
    wal::sync_dir(data_dir).map_err(io_err(data_dir))?;
    if let Some(g) = old_gen {
        let old_dir = gen_dir(g);
        if let Err(e) = fs::remove_dir_all(&old_dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %old_dir.display(), error = %e, "cannot delete the previous WAL generation");
            }
        }
    }
    Ok((stores, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Eui64;
    use crate::wire::{Header, Kind};
    use bytes::Bytes;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dsplane-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    const SU: PeerKey = PeerKey::Su(Eui64(0x90B3_D51F_3001_0000));

    fn frame(counter: u64) -> Frame {
        let mut h = Header::new(Kind::Response);
        h.su_id = Eui64(0x90B3_D51F_3001_0000);
        h.counter = counter;
        Frame::new(h, Bytes::from(counter.to_le_bytes().to_vec())).unwrap()
    }

    fn lane(level: u8) -> u8 {
        level
    }

    fn recover_into(dir: &Path, workers: usize) -> (Vec<Store>, RecoveryReport) {
        recover(
            dir,
            LogSettings {
                workers,
                durability: Durability::Batch,
                flush_interval: Duration::from_millis(1),
            },
            |_| Some(0),
            lane,
            |_| Box::new(|| {}),
            |_| {},
        )
        .unwrap()
    }

    #[test]
    fn spilled_frames_load_in_order_and_acknowledged_ones_are_not_recovered() {
        let dir = temp_dir("spill");
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 0);
        let store = &mut stores[0];
        let mut stored = Vec::new();
        for i in 0..10u64 {
            let level = if i % 2 == 0 { 2 } else { 4 };
            let (s, _) = store.append(SU, level, level, &frame(i), i, true);
            stored.push((level, s));
        }
        store.write_out().unwrap();
        assert_eq!(store.spilled(SU, 2), 5);
        let first = store.load(SU, 2, 3, lane).unwrap();
        assert_eq!(
            first
                .iter()
                .map(|l| l.frame.header.counter)
                .collect::<Vec<_>>(),
            vec![0, 2, 4]
        );
        let rest = store.load(SU, 2, 10, lane).unwrap();
        assert_eq!(
            rest.iter()
                .map(|l| l.frame.header.counter)
                .collect::<Vec<_>>(),
            vec![6, 8]
        );
        assert!(!store.is_spilled(SU, 2));
        // Level 2 acknowledged through counter 4, level 4 not at all.
        store.done(SU, 2, first[2].stored);
        store.write_out().unwrap();
        drop(stores);

        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 7, "10 written, 3 acknowledged");
        let store = &mut stores[0];
        let l2 = store.load(SU, 2, 100, lane).unwrap();
        let l4 = store.load(SU, 4, 100, lane).unwrap();
        assert_eq!(
            l2.iter()
                .map(|l| l.frame.header.counter)
                .collect::<Vec<_>>(),
            vec![6, 8]
        );
        assert_eq!(
            l4.iter()
                .map(|l| l.frame.header.counter)
                .collect::<Vec<_>>(),
            vec![1, 3, 5, 7, 9]
        );
        assert_eq!(l4[0].frame.payload.as_ref(), 1u64.to_le_bytes());
        assert_eq!(l4[0].enqueued_unix_ns, 1);
    }

    #[test]
    fn segments_are_deleted_once_everything_in_them_is_acknowledged() {
        let dir = temp_dir("reclaim");
        let (mut stores, _) = recover_into(&dir, 1);
        let store = &mut stores[0];
        let big = Frame::new(Header::new(Kind::Response), Bytes::from(vec![7u8; 1 << 20])).unwrap();
        let mut stored = Vec::new();
        // ~70 MiB: two segments.
        for _ in 0..70 {
            stored.push(store.append(SU, 4, 4, &big, 0, false).0);
            store.write_out().unwrap();
        }
        let wal_dir = store.dir.clone();
        assert_eq!(wal::list_segments(&wal_dir).unwrap().len(), 2);
        for s in &stored {
            store.done(SU, 4, *s);
        }
        store.write_out().unwrap();
        assert_eq!(wal::list_segments(&wal_dir).unwrap().len(), 1);
        assert_eq!(store.stats.segments_deleted, 1);
        drop(stores);
        // The checkpoint at the head of the surviving segment keeps the watermark.
        let (_, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 0);
    }

    #[test]
    fn a_torn_tail_is_cut_and_everything_before_it_recovered() {
        let dir = temp_dir("torn");
        let (mut stores, _) = recover_into(&dir, 1);
        for i in 0..5 {
            stores[0].append(SU, 3, 3, &frame(i), 0, true);
        }
        stores[0].write_out().unwrap();
        let seg_dir = stores[0].dir.clone();
        drop(stores);
        let last = *wal::list_segments(&seg_dir).unwrap().last().unwrap();
        let path = wal::segment_path(&seg_dir, last);
        let len = fs::metadata(&path).unwrap().len();
        // A crash in the middle of the last record.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 4);
        assert_eq!(report.torn_tails.len(), 1);
        let got = stores[0].load(SU, 3, 10, lane).unwrap();
        assert_eq!(
            got.iter()
                .map(|l| l.frame.header.counter)
                .collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn recovery_moves_frames_to_their_new_owner() {
        let dir = temp_dir("owners");
        let (mut stores, _) = recover(
            &dir,
            LogSettings {
                workers: 2,
                durability: Durability::None,
                flush_interval: Duration::ZERO,
            },
            |_| Some(1),
            lane,
            |_| Box::new(|| {}),
            |_| {},
        )
        .unwrap();
        stores[1].append(SU, 1, 1, &frame(1), 0, true);
        stores[1].append(PeerKey::Su(Eui64(5)), 1, 1, &frame(2), 0, true);
        stores[1].write_out().unwrap();
        drop(stores);
        let mut orphans = 0;
        let (mut stores, report) = recover(
            &dir,
            LogSettings {
                workers: 3,
                durability: Durability::None,
                flush_interval: Duration::ZERO,
            },
            |p| (p == SU).then_some(2),
            lane,
            |_| Box::new(|| {}),
            |_| orphans += 1,
        )
        .unwrap();
        assert_eq!((report.frames_recovered, report.frames_orphaned), (1, 1));
        assert_eq!(orphans, 1);
        assert_eq!(stores[2].spilled(SU, 1), 1);
        assert_eq!(
            stores[2].load(SU, 1, 5, lane).unwrap()[0]
                .frame
                .header
                .counter,
            1
        );
        assert_eq!(report.generation, 2);
        assert!(!dir.join("gen-1").exists(), "the old generation is deleted");
    }

    #[test]
    fn durability_is_published_by_the_flusher() {
        let dir = temp_dir("flush");
        let notified = Arc::new(AtomicU64::new(0));
        let n = Arc::clone(&notified);
        let (mut stores, _) = recover(
            &dir,
            LogSettings {
                workers: 1,
                durability: Durability::Batch,
                flush_interval: Duration::from_millis(2),
            },
            |_| Some(0),
            lane,
            move |_| {
                let n = Arc::clone(&n);
                Box::new(move || {
                    n.fetch_add(1, Ordering::Relaxed);
                })
            },
            |_| {},
        )
        .unwrap();
        let store = &mut stores[0];
        let (_, pos) = store.append(SU, 1, 1, &frame(1), 0, false);
        assert!(store.durable_pos() < pos);
        store.write_out().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.durable_pos() < pos {
            assert!(std::time::Instant::now() < deadline, "never durable");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(notified.load(Ordering::Relaxed) >= 1);
    }
}

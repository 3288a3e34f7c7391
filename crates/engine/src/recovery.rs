//! Recovery at start-up, and the operator's salvage (ENGINE.md §2, §7).
//!
//! # What recovery checks
//!
//! Before any worker runs, the current generation is found ([`crate::datadir::resolve`]) and
//! every worker log in it is read and checked:
//!
//! * every worker directory the generation's `MANIFEST` counts is there;
//! * every segment the newest segment's SEGMENT_START names as live, less those it names in a
//!   DROPPED record, is there, and the newest segment does not end by naming a successor (a
//!   deleted newest segment);
//! * every record is intact, except a torn tail: damage in the newest segment where nothing
//!   had been synced yet (`crate::wal` explains how the two are told apart).
//!
//! Anything else is refused with the file (and byte offset) named, and nothing is deleted.
//!
//! # In place, or into a new generation
//!
//! When the workers and the lane mode are those of the generation, and every frame's receiver
//! is still owned by the worker whose log holds it, each log is taken over where it is: the torn
//! tail is cut, dead segments left over are deleted, and the worker goes on appending to its
//! newest segment. This needs no free space, so dsplane restarts on a full disk. Otherwise (the
//! number of cores changed, say), every frame not yet acknowledged is copied in order into a
//! new generation, one log per worker of this run, which is made durable and named in `CURRENT`
//! before the old one is deleted; this needs room for the backlog.
//!
//! # Salvage
//!
//! [`salvage`] is for the operator (`dsplane recover --salvage`), never run by itself. It reads
//! what is intact, skipping each damaged range to the next intact batch, copies every frame it
//! can read into a new generation, and writes down exactly what it could not read: each file,
//! byte range and the seqs of the frames lost. The damaged generation is kept, renamed
//! `gen-N.salvaged`, for whoever wants to look at it.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use crate::datadir::{self, Found, Manifest};
use crate::disk::{Disk, Open, OsDisk};
use crate::log::LaneMap;
use crate::store::{self, Flusher, LogOptions, Notify, Resume, Spill, Store};
use crate::wal::{self, PeerKey, Record, SegmentEnd, SegmentReader, WalError};

/// How this run's logs are kept.
#[derive(Debug, Clone, Copy)]
pub struct LogSettings {
    /// Workers, one log each.
    pub workers: usize,
    /// Whether lanes are the one FIFO queue (`scheduling = "fifo"`).
    pub fifo: bool,
    /// How each log is written.
    pub log: LogOptions,
}

/// What recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Frames not yet acknowledged by their receivers, waiting in the logs.
    pub frames_recovered: u64,
    /// Frames whose receiver is no longer configured, written to the expiry record instead.
    pub frames_orphaned: u64,
    /// Torn tails cut off: (file, offset).
    pub torn_tails: Vec<(PathBuf, u64)>,
    /// The generation this run writes.
    pub generation: u64,
    /// Whether the logs were taken over where they were (no copy).
    pub in_place: bool,
    /// What was repaired or noticed, each a sentence for the log.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strict,
    Salvage,
}

/// One segment to read: the byte ranges that are intact.
#[derive(Debug)]
struct SegmentScan {
    number: u64,
    path: PathBuf,
    readable: Vec<(u64, u64)>,
}

/// One worker log, read and checked.
#[derive(Debug, Default)]
struct WorkerScan {
    segments: Vec<SegmentScan>,
    marks: LaneMap<u64>,
    next_seq: u64,
    /// The newest segment is cut here.
    torn: Option<(PathBuf, u64)>,
    /// Segment files not needed: deleted (dead ones left over, an unfinished roll).
    leftovers: Vec<PathBuf>,
}

/// What a salvage could not read, each a sentence.
/// What a salvage could not read: a sentence each, and how many frames they name (when every
/// one names its count).
#[derive(Debug, Default)]
struct Losses {
    lines: Vec<String>,
    frames: u64,
    uncounted: bool,
}

impl Losses {
    /// A loss whose frames cannot be counted (a whole segment, a whole log).
    fn push(&mut self, line: String) {
        self.uncounted = true;
        self.lines.push(line);
    }

    /// A loss of exactly `frames` frames.
    fn push_counted(&mut self, line: String, frames: u64) {
        self.frames += frames;
        self.lines.push(line);
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

fn raise(marks: &mut LaneMap<u64>, peer: PeerKey, lane: u8, seq: u64) {
    let m = marks.entry((peer, lane)).or_insert(0);
    *m = (*m).max(seq);
}

/// Reads one segment's records (watermarks, seqs), and classifies damage: a torn tail of the
/// newest segment is returned to be cut; anything else is corruption (refused, or in a salvage
/// skipped to the next intact batch and written down). Returns the segment it says the log
/// continues in (its ROLLED record), and its SEGMENT_START, if any.
#[allow(clippy::too_many_arguments)]
fn scan_segment<D: Disk>(
    disk: &D,
    path: &Path,
    number: u64,
    newest: bool,
    mode: Mode,
    scan: &mut WorkerScan,
    losses: &mut Losses,
    dropped: &mut BTreeSet<u64>,
) -> Result<(Option<u64>, Option<Record>), WalError> {
    let mut reader = match SegmentReader::open_on(disk, path, 0) {
        Ok(r) => r,
        Err(e @ WalError::BadHeader { .. }) if mode == Mode::Salvage => {
            losses.push(format!("{e}: the whole segment is skipped"));
            return Ok((None, None));
        }
        Err(e) => return Err(e),
    };
    let version = reader.version();
    let len = reader.file_len();
    let mut from = reader.offset();
    let mut readable = Vec::new();
    let mut rolled = None;
    let mut start = None;
    let mut seq_cursor: Option<u64> = None;
    loop {
        while let Some((_, record)) = reader.next_record()? {
            match &record {
                Record::Enqueue { seq, .. } => {
                    scan.next_seq = scan.next_seq.max(seq + 1);
                    seq_cursor = Some(seq + 1);
                }
                Record::Done { peer, level, seq } => raise(&mut scan.marks, *peer, *level, *seq),
                Record::Checkpoint(entries) => {
                    for (peer, lane, seq) in entries {
                        raise(&mut scan.marks, *peer, *lane, *seq);
                    }
                }
                Record::SegmentStart {
                    first_seq,
                    watermarks,
                    ..
                } => {
                    for (peer, lane, seq) in watermarks {
                        raise(&mut scan.marks, *peer, *lane, *seq);
                    }
                    scan.next_seq = scan.next_seq.max(*first_seq);
                    seq_cursor.get_or_insert(*first_seq);
                    if start.is_none() {
                        start = Some(record.clone());
                    }
                }
                Record::Commit { next_seq, .. } => {
                    scan.next_seq = scan.next_seq.max(*next_seq);
                    seq_cursor = Some(*next_seq);
                }
                Record::Dropped { segment } => {
                    dropped.insert(*segment);
                }
                Record::Rolled { next } => rolled = Some(*next),
            }
        }
        match reader.end() {
            Some(SegmentEnd::Damaged { offset, why }) => {
                readable.push((from, offset));
                let later = if version >= 2 {
                    wal::commits_after_on(disk, path, offset + 1).map_err(io_err(path))?
                } else {
                    Vec::new()
                };
                // Damage in what a later batch records as durable was synced, and may have
                // been acknowledged: corruption. Anything else in the newest segment had not
                // been synced: a torn write (see `crate::wal`).
                let damaged_at = store::log_pos(number, offset);
                let synced = later.iter().any(|c| c.durable_through > damaged_at);
                if newest && !synced {
                    scan.torn = Some((path.to_owned(), offset));
                    break;
                }
                let next_batch = later.first().map(|c| (c.start, c.end, c.next_seq));
                if mode == Mode::Strict {
                    return Err(WalError::Corrupt {
                        path: path.to_owned(),
                        offset,
                        why,
                    });
                }
                // Skip only the damaged record when its length still leads to an intact one;
                // else skip to the next intact batch.
                let resume = match skip_one_record(disk, path, offset, len)? {
                    Some(after) => Some(after),
                    None => next_batch.map(|(_, end, _)| end),
                };
                let next_seq = match resume {
                    Some(at) => first_seq_from(disk, path, at)?,
                    None => None,
                };
                // What was lost, and how many frames when the seqs on either side say.
                let (lost, frames) = match (seq_cursor, next_seq, resume) {
                    (Some(a), Some(b), _) if b == a + 1 => {
                        (format!("the frame with seq {a} (1 frame)"), Some(1))
                    }
                    (Some(a), Some(b), _) if b > a => (
                        format!("the frames with seqs {a} to {} ({} frames)", b - 1, b - a),
                        Some(b - a),
                    ),
                    (Some(_), Some(_), _) => {
                        ("no frame (only bookkeeping records)".to_string(), Some(0))
                    }
                    (Some(a), None, _) => (
                        format!("the frames from seq {a} to the end of the segment"),
                        None,
                    ),
                    (None, _, _) => ("the frames to the end of the segment".to_string(), None),
                };
                let to = resume.unwrap_or(len);
                let line = format!(
                    "{}: bytes {offset} to {to} unreadable ({why}): {lost} of this log are lost, if they were not yet acknowledged; acknowledgements recorded there are lost too, so some frames may be delivered twice",
                    path.display()
                );
                match frames {
                    Some(n) => losses.push_counted(line, n),
                    None => losses.push(line),
                }
                match resume {
                    Some(at) => {
                        if let Some(n) = next_seq {
                            seq_cursor = Some(n);
                        }
                        reader = SegmentReader::open_on(disk, path, at)?;
                        from = at;
                    }
                    None => break,
                }
            }
            _ => {
                readable.push((from, u64::MAX));
                break;
            }
        }
    }
    scan.segments.push(SegmentScan {
        number,
        path: path.to_owned(),
        readable,
    });
    Ok((rolled, start))
}

/// A check failed: refused (strict), or written down with what it costs (salvage).
fn refuse_or_note(
    mode: Mode,
    e: WalError,
    cost: &str,
    losses: &mut Losses,
) -> Result<(), WalError> {
    match mode {
        Mode::Strict => Err(e),
        Mode::Salvage => {
            losses.push(format!("{e}: {cost}"));
            Ok(())
        }
    }
}

/// Where the record after a damaged one at `offset` starts, if the damaged record's length field
/// leads to an intact record (or to the end of the file).
fn skip_one_record<D: Disk>(
    disk: &D,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<Option<u64>, WalError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut prefix = [0u8; 4];
    let read = disk.open(path, Open::Read).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut prefix)
    });
    if read.is_err() {
        return Ok(None);
    }
    let after = offset + wal::RECORD_PREFIX_LEN as u64 + u64::from(u32::from_le_bytes(prefix));
    if after >= len {
        return Ok(None);
    }
    let mut reader = SegmentReader::open_on(disk, path, after)?;
    Ok(match reader.next_record() {
        Ok(Some(_)) => Some(after),
        _ => None,
    })
}

/// The seq the first ENQUEUE from `at` on has (or the next seq a COMMIT names, if one comes
/// first): what a salvage that resumes at `at` lost up to.
fn first_seq_from<D: Disk>(disk: &D, path: &Path, at: u64) -> Result<Option<u64>, WalError> {
    let mut reader = SegmentReader::open_on(disk, path, at)?;
    while let Some((_, record)) = reader.next_record()? {
        match record {
            Record::Enqueue { seq, .. } => return Ok(Some(seq)),
            Record::Commit { next_seq, .. } => return Ok(Some(next_seq)),
            _ => {}
        }
    }
    Ok(None)
}

/// Reads and checks one worker's log (see the module documentation).
fn scan_worker<D: Disk>(
    disk: &D,
    dir: &Path,
    mode: Mode,
    losses: &mut Losses,
) -> Result<WorkerScan, WalError> {
    let mut scan = WorkerScan {
        next_seq: 1,
        ..WorkerScan::default()
    };
    let missing = |path: &Path, why: String| WalError::Missing {
        path: path.to_owned(),
        why,
    };
    if !disk.is_dir(dir) {
        let e = missing(
            dir,
            "the generation's MANIFEST counts this worker, but its log directory is missing".into(),
        );
        refuse_or_note(mode, e, "every frame of this log is lost", losses)?;
        return Ok(scan);
    }
    let mut numbers = wal::list_segments_on(disk, dir).map_err(io_err(dir))?;
    let Some(&newest) = numbers.last() else {
        let e = missing(
            dir,
            "this worker's log holds no segment: it is missing".into(),
        );
        refuse_or_note(mode, e, "every frame of this log is lost", losses)?;
        return Ok(scan);
    };
    let mut newest = newest;
    let mut dropped = BTreeSet::new();
    // The newest segment first: it says which others must exist.
    let path = wal::segment_path(dir, newest);
    let mut first = SegmentReader::open_on(disk, &path, 0);
    let v2 = match &first {
        Ok(r) => r.version() >= 2,
        Err(_) => true,
    };
    if v2 {
        let starts_whole = match &mut first {
            Ok(r) => matches!(r.next_record(), Ok(Some((_, Record::SegmentStart { .. })))),
            Err(_) => false,
        };
        if !starts_whole && numbers.len() >= 2 {
            // A roll that crashed before the new segment was whole: the previous segment does
            // not name it as its successor. Then it never held a frame.
            let previous = numbers[numbers.len() - 2];
            let mut probe = WorkerScan::default();
            let mut probe_losses = Losses::default();
            let (rolled, _) = scan_segment(
                disk,
                &wal::segment_path(dir, previous),
                previous,
                true,
                Mode::Salvage,
                &mut probe,
                &mut probe_losses,
                &mut BTreeSet::new(),
            )?;
            if rolled != Some(newest) {
                scan.leftovers.push(path.clone());
                numbers.pop();
                newest = previous;
            }
        }
    }
    let path = wal::segment_path(dir, newest);
    let (rolled, start) = scan_segment(
        disk,
        &path,
        newest,
        true,
        mode,
        &mut scan,
        losses,
        &mut dropped,
    )?;
    if let Some(next) = rolled {
        let e = missing(
            &wal::segment_path(dir, next),
            format!("segment {newest} ends by naming segment {next} as its successor, which is missing (the newest segment was deleted)"),
        );
        refuse_or_note(
            mode,
            e,
            "the frames in it not yet acknowledged are lost",
            losses,
        )?;
    }
    let expected: BTreeSet<u64> = match &start {
        Some(Record::SegmentStart { live_segments, .. }) => live_segments
            .iter()
            .copied()
            .filter(|s| !dropped.contains(s) && *s < newest)
            .collect(),
        // The first format, or a SEGMENT_START damaged (which the scan above refused, unless
        // this is a salvage): every segment present is read.
        _ => numbers.iter().copied().filter(|s| *s < newest).collect(),
    };
    let present: BTreeSet<u64> = numbers.iter().copied().collect();
    for seg in expected.difference(&present) {
        let e = missing(
            &wal::segment_path(dir, *seg),
            format!("segment {newest} names segment {seg} as still holding frames not yet acknowledged, and it is missing"),
        );
        refuse_or_note(
            mode,
            e,
            "the frames in it not yet acknowledged are lost",
            losses,
        )?;
    }
    let newest_scan = scan.segments.pop();
    for seg in present.iter().filter(|s| **s < newest) {
        let path = wal::segment_path(dir, *seg);
        if expected.contains(seg) {
            scan_segment(
                disk,
                &path,
                *seg,
                false,
                mode,
                &mut scan,
                losses,
                &mut BTreeSet::new(),
            )?;
        } else {
            scan.leftovers.push(path);
        }
    }
    scan.segments.extend(newest_scan);
    Ok(scan)
}

/// Every frame of a scanned log not yet acknowledged, in log order: (segment, offset, record).
fn live_frames<D: Disk>(
    disk: &D,
    scan: &WorkerScan,
    lane_of: impl Fn(u8) -> u8,
    mut each: impl FnMut(u64, u64, Record) -> Result<(), WalError>,
) -> Result<(), WalError> {
    for segment in &scan.segments {
        for &(from, to) in &segment.readable {
            let mut reader = SegmentReader::open_on(disk, &segment.path, from)?;
            while let Some((at, record)) = reader.next_record()? {
                if at >= to {
                    break;
                }
                if let Record::Enqueue {
                    peer, level, seq, ..
                } = &record
                {
                    if *seq
                        > scan
                            .marks
                            .get(&(*peer, lane_of(*level)))
                            .copied()
                            .unwrap_or(0)
                    {
                        each(segment.number, at, record)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Cuts a torn tail and deletes the segments not needed.
fn tidy<D: Disk>(disk: &D, scan: &WorkerScan, report: &mut RecoveryReport) -> Result<(), WalError> {
    if let Some((path, offset)) = &scan.torn {
        tracing::warn!(file = %path.display(), offset, "cutting off a torn WAL tail: the last batch was not completely written before the crash");
        wal::truncate_torn_tail_on(disk, path, *offset).map_err(io_err(path))?;
        report.torn_tails.push((path.clone(), *offset));
    }
    for path in &scan.leftovers {
        tracing::info!(file = %path.display(), "deleting a WAL segment with nothing live left over from before the crash");
        match disk.remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok(())
}

/// Recovers the data directory for this run. Returns one store per worker, with the frames not
/// yet acknowledged waiting in them (spilled: on disk only, loaded by priority as their peers
/// take them), and the report. Refuses (nothing deleted) when the state cannot be trusted.
///
/// `owner` gives the worker that owns a receiver in this run (`None`: no longer configured),
/// `notify` each worker's flusher callback, and `orphan` is called with each frame whose
/// receiver is gone.
pub fn recover(
    data_dir: &Path,
    settings: LogSettings,
    owner: impl Fn(PeerKey) -> Option<usize>,
    mut notify: impl FnMut(usize) -> Notify,
    orphan: impl FnMut(&Record),
) -> Result<(Vec<Store>, RecoveryReport), WalError> {
    recover_on(
        &OsDisk,
        data_dir,
        settings,
        owner,
        |w| Flusher::Thread(notify(w)),
        orphan,
    )
}

/// [`recover`] on `disk`, with `flusher` giving each worker's store its flusher (a thread with
/// its callback, or [`Flusher::Manual`]).
pub fn recover_on<D: Disk>(
    disk: &D,
    data_dir: &Path,
    settings: LogSettings,
    owner: impl Fn(PeerKey) -> Option<usize>,
    mut flusher: impl FnMut(usize) -> Flusher,
    mut orphan: impl FnMut(&Record),
) -> Result<(Vec<Store<D>>, RecoveryReport), WalError> {
    disk.create_dir_all(data_dir).map_err(io_err(data_dir))?;
    let found = datadir::resolve_on(disk, data_dir)?;
    let mut report = RecoveryReport::default();
    let (manifest, legacy, rewrite_current, stale) = match found {
        Found::Fresh { leftovers } => {
            for dir in &leftovers {
                tracing::warn!(dir = %dir.display(), "deleting a generation left by a first start that stopped before it was complete (it never held a frame)");
                disk.remove_dir_all(dir).map_err(io_err(dir))?;
            }
            let manifest = Manifest {
                generation: 1,
                workers: settings.workers,
                fifo: settings.fifo,
            };
            let stores = new_generation(disk, data_dir, &manifest, settings, &mut flusher)?;
            finish_generation(disk, data_dir, &manifest)?;
            report.generation = 1;
            return Ok((stores, report));
        }
        Found::Generation {
            manifest,
            legacy,
            notes,
            rewrite_current,
            stale,
        } => {
            for note in &notes {
                tracing::warn!("{note}");
            }
            report.notes = notes;
            (manifest, legacy, rewrite_current, stale)
        }
    };
    let gen = datadir::gen_dir(data_dir, manifest.generation);
    let mut losses = Losses::default();
    let mut scans = Vec::with_capacity(manifest.workers);
    for w in 0..manifest.workers {
        scans.push(scan_worker(
            disk,
            &datadir::worker_dir(&gen, w),
            Mode::Strict,
            &mut losses,
        )?);
    }
    // The state is known and intact: what is not part of it can go.
    for dir in &stale {
        tracing::warn!(dir = %dir.display(), "deleting a generation that is not the current one (left by a crash during recovery, or superseded)");
        disk.remove_dir_all(dir).map_err(io_err(dir))?;
    }
    if rewrite_current {
        datadir::write_current_on(disk, data_dir, &manifest).map_err(io_err(data_dir))?;
    }
    for scan in &scans {
        tidy(disk, scan, &mut report)?;
    }
    let same_layout =
        !legacy && manifest.workers == settings.workers && manifest.fifo == settings.fifo;
    if same_layout {
        if let Some(stores) = resume_in_place(
            disk,
            &gen,
            &scans,
            settings,
            &owner,
            &mut flusher,
            &mut orphan,
            &mut report,
        )? {
            report.generation = manifest.generation;
            report.in_place = true;
            return Ok((stores, report));
        }
    }
    let why = if legacy {
        "the log is in the first format".to_string()
    } else if manifest.workers != settings.workers {
        format!(
            "the number of workers changed from {} to {}",
            manifest.workers, settings.workers
        )
    } else if manifest.fifo != settings.fifo {
        "the scheduling changed between fifo and priority".to_string()
    } else {
        "receivers moved to other workers (the order of [[csp]] changed?)".to_string()
    };
    tracing::info!("recovering into a new generation: {why}");
    let stores = copy_into_new_generation(
        disk,
        data_dir,
        &manifest,
        &scans,
        settings,
        &owner,
        &mut flusher,
        &mut orphan,
        &mut report,
    )
    .map_err(|e| match e {
        WalError::Io { path, source } if wal::is_no_space(&source) => WalError::Io {
            path,
            source: io::Error::new(
                source.kind(),
                format!("{source}: recovering into a new generation ({why}) needs room for the backlog; free space, or start with the previous settings to recover in place"),
            ),
        },
        e => e,
    })?;
    let old = datadir::gen_dir(data_dir, manifest.generation);
    if let Err(e) = disk.remove_dir_all(&old) {
        tracing::warn!(dir = %old.display(), error = %e, "cannot delete the previous WAL generation");
    }
    Ok((stores, report))
}

/// Takes each worker's log over where it is. `None` if a receiver moved to another worker.
#[allow(clippy::too_many_arguments)]
fn resume_in_place<D: Disk>(
    disk: &D,
    gen: &Path,
    scans: &[WorkerScan],
    settings: LogSettings,
    owner: &impl Fn(PeerKey) -> Option<usize>,
    flusher: &mut impl FnMut(usize) -> Flusher,
    orphan: &mut impl FnMut(&Record),
    report: &mut RecoveryReport,
) -> Result<Option<Vec<Store<D>>>, WalError> {
    let lane_of = store::lane_of(settings.fifo);
    let mut resumes = Vec::with_capacity(scans.len());
    let mut orphans: Vec<Vec<(PeerKey, u8, u64, Record)>> = Vec::with_capacity(scans.len());
    for (w, scan) in scans.iter().enumerate() {
        let Some(newest) = scan.segments.last().map(|s| s.number) else {
            return Ok(None);
        };
        let mut resume = Resume {
            segment: newest,
            watermarks: scan.marks.clone(),
            next_seq: scan.next_seq,
            ..Resume::default()
        };
        for s in &scan.segments {
            resume.live.insert(s.number, 0);
        }
        let mut gone = Vec::new();
        let mut moved = false;
        live_frames(disk, scan, lane_of, |segment, offset, record| {
            let Record::Enqueue {
                peer, level, seq, ..
            } = &record
            else {
                return Ok(());
            };
            let (peer, lane, seq) = (*peer, lane_of(*level), *seq);
            match owner(peer) {
                Some(o) if o == w => {
                    *resume.live.entry(segment).or_insert(0) += 1;
                    Spill::count_one(&mut resume.spills, (peer, lane), segment, offset);
                }
                Some(_) => moved = true,
                None => gone.push((peer, lane, seq, record)),
            }
            Ok(())
        })?;
        if moved {
            return Ok(None);
        }
        resumes.push(resume);
        orphans.push(gone);
    }
    let mut stores = Vec::with_capacity(resumes.len());
    for (w, (resume, gone)) in resumes.into_iter().zip(orphans).enumerate() {
        report.frames_recovered += resume.spills.values().map(|s| s.count).sum::<u64>();
        let dir = datadir::worker_dir(gen, w);
        let mut store = Store::resume(disk.clone(), &dir, settings.log, flusher(w), resume)
            .map_err(io_err(&dir))?;
        for (peer, lane, seq, record) in gone {
            orphan(&record);
            report.frames_orphaned += 1;
            store.mark_done(peer, lane, seq);
        }
        if let Err(e) = store.write_out() {
            // A full disk: the orphans are written down again at the next start.
            tracing::warn!(dir = %dir.display(), error = %e, "cannot record the frames of receivers no longer configured as done");
        }
        stores.push(store);
    }
    Ok(Some(stores))
}

fn new_generation<D: Disk>(
    disk: &D,
    data_dir: &Path,
    manifest: &Manifest,
    settings: LogSettings,
    flusher: &mut impl FnMut(usize) -> Flusher,
) -> Result<Vec<Store<D>>, WalError> {
    let gen = datadir::gen_dir(data_dir, manifest.generation);
    if disk.exists(&gen) {
        // A half-made generation (no MANIFEST) from a crash during an earlier recovery.
        disk.remove_dir_all(&gen).map_err(io_err(&gen))?;
    }
    let mut stores = Vec::with_capacity(settings.workers);
    for w in 0..settings.workers {
        let dir = datadir::worker_dir(&gen, w);
        stores.push(
            Store::create_on(disk.clone(), &dir, settings.log, flusher(w)).map_err(io_err(&dir))?,
        );
    }
    Ok(stores)
}

/// Makes a new generation complete (its MANIFEST) and current (`CURRENT`).
fn finish_generation<D: Disk>(
    disk: &D,
    data_dir: &Path,
    manifest: &Manifest,
) -> Result<(), WalError> {
    let gen = datadir::gen_dir(data_dir, manifest.generation);
    disk.sync_dir(&gen).map_err(io_err(&gen))?;
    datadir::write_manifest_on(disk, data_dir, manifest).map_err(io_err(&gen))?;
    datadir::write_current_on(disk, data_dir, manifest).map_err(io_err(data_dir))
}

/// Copies every frame not yet acknowledged from `scans` into a new generation, in order.
#[allow(clippy::too_many_arguments)]
fn copy_into_new_generation<D: Disk>(
    disk: &D,
    data_dir: &Path,
    old: &Manifest,
    scans: &[WorkerScan],
    settings: LogSettings,
    owner: &impl Fn(PeerKey) -> Option<usize>,
    flusher: &mut impl FnMut(usize) -> Flusher,
    orphan: &mut impl FnMut(&Record),
    report: &mut RecoveryReport,
) -> Result<Vec<Store<D>>, WalError> {
    let manifest = Manifest {
        generation: old.generation + 1,
        workers: settings.workers,
        fifo: settings.fifo,
    };
    let mut stores = new_generation(disk, data_dir, &manifest, settings, flusher)?;
    // The backlog may have been acknowledged as durable: every segment of the copy is synced
    // before the generation is named, whatever this run's durability.
    for store in &mut stores {
        store.set_sync_rolls(true);
    }
    let old_lane = store::lane_of(old.fifo);
    let new_lane = store::lane_of(settings.fifo);
    for scan in scans {
        live_frames(disk, scan, old_lane, |_, _, record| {
            let Record::Enqueue {
                peer,
                level,
                enqueued_unix_ns,
                ref frame,
                ..
            } = record
            else {
                return Ok(());
            };
            match owner(peer).and_then(|w| stores.get_mut(w)) {
                Some(store) => {
                    store.append(peer, new_lane(level), level, frame, enqueued_unix_ns, true);
                    report.frames_recovered += 1;
                    if store.stats.enqueued.is_multiple_of(4096) {
                        let dir = store.dir().to_owned();
                        store.write_out().map_err(io_err(&dir))?;
                    }
                }
                None => {
                    orphan(&record);
                    report.frames_orphaned += 1;
                }
            }
            Ok(())
        })?;
    }
    for store in &mut stores {
        let dir = store.dir().to_owned();
        store.write_out().map_err(io_err(&dir))?;
        store.sync().map_err(io_err(&dir))?;
        store.set_sync_rolls(false);
    }
    finish_generation(disk, data_dir, &manifest)?;
    report.generation = manifest.generation;
    Ok(stores)
}

/// What a check of the data directory found, without changing anything.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The current generation (`None`: a new data directory).
    pub generation: Option<u64>,
    /// Its worker logs.
    pub workers: usize,
    /// Frames not yet acknowledged by their receivers.
    pub frames_waiting: u64,
    /// Torn tails a start would cut off: (file, offset).
    pub torn_tails: Vec<(PathBuf, u64)>,
    /// What a start would repair or notice.
    pub notes: Vec<String>,
}

/// Reads and checks the data directory as a start would, and changes nothing: `dsplane
/// recover` without `--salvage`. The same refusals as [`recover`].
pub fn check(data_dir: &Path) -> Result<CheckReport, WalError> {
    check_on(&OsDisk, data_dir)
}

/// [`check`] on `disk`.
pub fn check_on<D: Disk>(disk: &D, data_dir: &Path) -> Result<CheckReport, WalError> {
    let mut out = CheckReport::default();
    let Found::Generation {
        manifest,
        notes,
        legacy,
        ..
    } = datadir::resolve_on(disk, data_dir)?
    else {
        return Ok(out);
    };
    out.generation = Some(manifest.generation);
    out.workers = manifest.workers;
    out.notes = notes;
    let gen = datadir::gen_dir(data_dir, manifest.generation);
    let lane_of = store::lane_of(manifest.fifo && !legacy);
    let mut losses = Losses::default();
    for w in 0..manifest.workers {
        let scan = scan_worker(
            disk,
            &datadir::worker_dir(&gen, w),
            Mode::Strict,
            &mut losses,
        )?;
        out.torn_tails.extend(scan.torn.clone());
        live_frames(disk, &scan, lane_of, |_, _, _| {
            out.frames_waiting += 1;
            Ok(())
        })?;
    }
    Ok(out)
}

/// What a salvage did.
#[derive(Debug, Default, Clone)]
pub struct SalvageReport {
    /// The generation salvaged from, if one was found.
    pub from_generation: Option<u64>,
    /// The new generation.
    pub generation: u64,
    /// Frames copied (not yet acknowledged when the log was written).
    pub frames_kept: u64,
    /// Frames of receivers no longer configured.
    pub frames_orphaned: u64,
    /// What could not be read, each a sentence.
    pub losses: Vec<String>,
    /// The frames those sentences name as lost, when every one of them names its count; `None`
    /// when one cannot (a whole segment or log unreadable, the generation unknown).
    pub frames_lost: Option<u64>,
    /// Where the damaged generation was kept.
    pub kept_as: Option<PathBuf>,
    /// The file the report was written to.
    pub report_file: PathBuf,
}

/// The operator's salvage: keeps every frame that can be read, writes down exactly what could
/// not be, and starts a new generation from it. See the module documentation. The engine must
/// not be running (the caller holds the data directory's lock).
pub fn salvage(
    data_dir: &Path,
    settings: LogSettings,
    owner: impl Fn(PeerKey) -> Option<usize>,
    orphan: impl FnMut(&Record),
) -> Result<SalvageReport, WalError> {
    salvage_on(
        &OsDisk,
        data_dir,
        settings,
        owner,
        |_| Flusher::Thread(Box::new(|| {})),
        orphan,
    )
}

/// [`salvage`] on `disk`, with `flusher` giving each new store its flusher (see
/// [`recover_on`]).
pub fn salvage_on<D: Disk>(
    disk: &D,
    data_dir: &Path,
    settings: LogSettings,
    owner: impl Fn(PeerKey) -> Option<usize>,
    mut flusher: impl FnMut(usize) -> Flusher,
    mut orphan: impl FnMut(&Record),
) -> Result<SalvageReport, WalError> {
    let mut out = SalvageReport::default();
    let mut losses = Losses::default();
    let found = match datadir::resolve_on(disk, data_dir) {
        Ok(found) => found,
        Err(e) => {
            losses.push(format!(
                "the current generation could not be determined: {e}"
            ));
            fallback_generation(disk, data_dir)?
        }
    };
    let mut report = RecoveryReport::default();
    let mut scans = Vec::new();
    let mut old = Manifest {
        generation: 0,
        workers: settings.workers,
        fifo: settings.fifo,
    };
    let mut stale = Vec::new();
    if let Found::Generation {
        manifest,
        notes,
        stale: s,
        ..
    } = found
    {
        old = manifest;
        stale = s;
        out.from_generation = Some(manifest.generation);
        out.losses.extend(notes);
        let gen = datadir::gen_dir(data_dir, manifest.generation);
        for w in 0..manifest.workers {
            scans.push(scan_worker(
                disk,
                &datadir::worker_dir(&gen, w),
                Mode::Salvage,
                &mut losses,
            )?);
        }
    }
    out.frames_lost = (!losses.uncounted).then_some(losses.frames);
    out.losses.extend(losses.lines);
    // Every generation directory, so the new one never collides with one kept aside.
    let newest = datadir::list_generations(disk, data_dir, true)?
        .last()
        .copied()
        .unwrap_or(0);
    old.generation = old.generation.max(newest);
    let mut stores = copy_into_new_generation(
        disk,
        data_dir,
        &old,
        &scans,
        settings,
        &owner,
        &mut flusher,
        &mut orphan,
        &mut report,
    )?;
    for store in &mut stores {
        store.close();
    }
    drop(stores);
    out.generation = report.generation;
    out.frames_kept = report.frames_recovered;
    out.frames_orphaned = report.frames_orphaned;
    let unix = crate::unix_now() / crate::NANOS_PER_SEC;
    if let Some(g) = out.from_generation {
        let from = datadir::gen_dir(data_dir, g);
        let kept = data_dir.join(format!("gen-{g}.salvaged-{unix}"));
        if disk.exists(&from) {
            disk.rename(&from, &kept).map_err(io_err(&from))?;
            out.kept_as = Some(kept);
        }
    }
    for dir in stale {
        let _ = disk.remove_dir_all(&dir);
    }
    out.report_file = data_dir.join(format!("salvage-{unix}.txt"));
    let mut text = format!(
        "dsplane salvage of {}\nfrom generation: {}\nnew generation: {}\nframes kept: {}\nframes of receivers no longer configured: {}\n",
        data_dir.display(),
        out.from_generation.map_or("none found".to_string(), |g| g.to_string()),
        out.generation,
        out.frames_kept,
        out.frames_orphaned
    );
    if let Some(kept) = &out.kept_as {
        text.push_str(&format!("damaged generation kept as: {}\n", kept.display()));
    }
    text.push_str(&format!("could not be read ({}):\n", out.losses.len()));
    for loss in &out.losses {
        text.push_str(&format!("- {loss}\n"));
    }
    datadir::write_atomic_on(disk, &out.report_file, &text).map_err(io_err(&out.report_file))?;
    Ok(out)
}

/// When even the current generation cannot be determined: the newest generation directory,
/// with as many workers as it has worker directories.
fn fallback_generation<D: Disk>(disk: &D, data_dir: &Path) -> Result<Found, WalError> {
    let Some(&g) = datadir::list_generations(disk, data_dir, false)?.last() else {
        return Ok(Found::Fresh {
            leftovers: Vec::new(),
        });
    };
    let workers = datadir::worker_dirs_in(disk, &datadir::gen_dir(data_dir, g))?;
    Ok(Found::Generation {
        manifest: Manifest {
            generation: g,
            workers,
            fifo: false,
        },
        legacy: false,
        notes: vec![format!(
            "salvaging generation {g}, the newest directory, with the {workers} worker logs found in it"
        )],
        rewrite_current: true,
        stale: Vec::new(),
    })
}

/// Bytes of the reserve kept beside each log for a roll on a full disk: room for a
/// SEGMENT_START of every (peer, lane) watermark.
pub fn reserve_bytes(peers: usize, lanes: usize) -> u64 {
    let marks = (peers.max(1) * lanes.max(1)) as u64;
    (marks * 24 + 4096).max(store::RESERVE_BYTES_MIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::ids::Eui64;
    use crate::wire::{Frame, Header, Kind};
    use bytes::Bytes;
    use std::fs;
    use std::time::Duration;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dsplane-recovery-{name}-{}", std::process::id()));
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
        level - 1
    }

    fn settings(workers: usize, durability: Durability) -> LogSettings {
        LogSettings {
            workers,
            fifo: false,
            log: LogOptions {
                durability,
                flush_interval: Duration::from_millis(1),
                reserve_bytes: 0,
            },
        }
    }

    fn try_recover(dir: &Path, workers: usize) -> Result<(Vec<Store>, RecoveryReport), WalError> {
        recover(
            dir,
            settings(workers, Durability::Batch),
            |_| Some(0),
            |_| Box::new(|| {}),
            |_| {},
        )
    }

    fn recover_into(dir: &Path, workers: usize) -> (Vec<Store>, RecoveryReport) {
        try_recover(dir, workers).unwrap()
    }

    /// A response frame with a payload of `len` bytes.
    fn big_frame(len: usize) -> Frame {
        Frame::new(Header::new(Kind::Response), Bytes::from(vec![7u8; len])).unwrap()
    }

    /// Flips the bits of `mask` in byte `at` of the file.
    fn flip(path: &Path, at: usize, mask: u8) {
        let mut bytes = fs::read(path).unwrap();
        bytes[at] ^= mask;
        fs::write(path, &bytes).unwrap();
    }

    fn file_len(path: &Path) -> usize {
        fs::metadata(path).unwrap().len() as usize
    }

    fn counters(loaded: &[store::Loaded]) -> Vec<u64> {
        loaded.iter().map(|l| l.frame.header.counter).collect()
    }

    /// Appends `n` frames at level 3, one batch each, and returns the worker log's directory.
    fn write_batches(dir: &Path, n: u64) -> PathBuf {
        let (mut stores, _) = recover_into(dir, 1);
        for i in 0..n {
            stores[0].append(SU, 2, 3, &frame(i), 0, true);
            stores[0].write_out().unwrap();
        }
        let wal_dir = stores[0].dir().to_owned();
        drop(stores);
        wal_dir
    }

    fn newest_segment(dir: &Path) -> PathBuf {
        wal::segment_path(dir, *wal::list_segments(dir).unwrap().last().unwrap())
    }

    #[test]
    fn a_batch_of_acknowledgements_writes_one_done_per_lane_which_recovery_reads_as_the_watermark()
    {
        let dir = temp_dir("done-per-lane");
        let (mut stores, _) = recover_into(&dir, 1);
        let store = &mut stores[0];
        let mut stored = Vec::new();
        for i in 0..12u64 {
            let level = if i % 2 == 0 { 2 } else { 4 };
            stored.push((
                level,
                store.append(SU, lane(level), level, &frame(i), 0, false).0,
            ));
        }
        store.write_out().unwrap();
        // Level 2 through counter 8 and level 4 through counter 3, acknowledged alternately
        // (each switch of lane ends a run), and one acknowledgement again (a re-sent frame).
        for (level, s) in [0, 1, 2, 3, 4, 6, 8, 8].map(|i| stored[i]) {
            store.done(SU, lane(level), s);
        }
        store.write_out().unwrap();
        let path = newest_segment(store.dir());
        let mut reader = SegmentReader::open(&path, 0).unwrap();
        let mut dones = Vec::new();
        while let Some((_, record)) = reader.next_record().unwrap() {
            if let Record::Done { peer, level, seq } = record {
                dones.push((peer, level, seq));
            }
        }
        dones.sort_unstable();
        assert_eq!(
            dones,
            vec![
                (SU, lane(2), stored[8].1.seq),
                (SU, lane(4), stored[3].1.seq)
            ],
            "one DONE per lane, with the highest seq acknowledged"
        );
        drop(stores);
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!(
            report.frames_recovered,
            12 - 7,
            "5 of level 2 and 2 of level 4 acknowledged"
        );
        let store = &mut stores[0];
        assert_eq!(
            counters(&store.load(SU, lane(2), 100, lane).unwrap()),
            vec![10]
        );
        assert_eq!(
            counters(&store.load(SU, lane(4), 100, lane).unwrap()),
            vec![5, 7, 9, 11]
        );
    }

    #[test]
    fn spilled_frames_load_in_order_and_acknowledged_ones_are_not_recovered() {
        let dir = temp_dir("spill");
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!((report.frames_recovered, report.generation), (0, 1));
        let store = &mut stores[0];
        for i in 0..10u64 {
            let level = if i % 2 == 0 { 2 } else { 4 };
            store.append(SU, lane(level), level, &frame(i), i, true);
        }
        store.write_out().unwrap();
        assert_eq!(store.spilled(SU, 1), 5);
        let first = store.load(SU, 1, 3, lane).unwrap();
        assert_eq!(counters(&first), vec![0, 2, 4]);
        let rest = store.load(SU, 1, 10, lane).unwrap();
        assert_eq!(counters(&rest), vec![6, 8]);
        assert!(!store.is_spilled(SU, 1));
        // Level 2 acknowledged through counter 4, level 4 not at all.
        store.done(SU, 1, first[2].stored);
        store.write_out().unwrap();
        drop(stores);

        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 7, "10 written, 3 acknowledged");
        assert!(
            report.in_place,
            "same workers: the log is taken over where it is"
        );
        assert_eq!(report.generation, 1);
        let store = &mut stores[0];
        assert_eq!(counters(&store.load(SU, 1, 100, lane).unwrap()), vec![6, 8]);
        let l4 = store.load(SU, 3, 100, lane).unwrap();
        assert_eq!(counters(&l4), vec![1, 3, 5, 7, 9]);
        assert_eq!(l4[0].frame.payload.as_ref(), 1u64.to_le_bytes());
        assert_eq!(l4[0].enqueued_unix_ns, 1);
        // New frames go on in the same log, with fresh seqs, and a second restart sees both.
        store.append(SU, 1, 2, &frame(100), 0, true);
        store.write_out().unwrap();
        drop(stores);
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 8);
        assert_eq!(
            counters(&stores[0].load(SU, 1, 100, lane).unwrap()),
            vec![6, 8, 100]
        );
    }

    fn wait_durable() {
        std::thread::sleep(Duration::from_millis(5));
    }

    #[test]
    fn segments_are_deleted_once_everything_in_them_is_acknowledged_even_the_active_one() {
        let dir = temp_dir("reclaim");
        let (mut stores, _) = recover_into(&dir, 1);
        let store = &mut stores[0];
        let big = big_frame(1 << 20);
        let mut stored = Vec::new();
        // ~70 MiB: two segments.
        for _ in 0..70 {
            stored.push(store.append(SU, 3, 4, &big, 0, false).0);
            store.write_out().unwrap();
        }
        let wal_dir = store.dir().to_owned();
        assert_eq!(wal::list_segments(&wal_dir).unwrap().len(), 2);
        for s in &stored {
            store.done(SU, 3, *s);
        }
        // The DONE records, then the roll of the fully acknowledged active segment, then the
        // DROPPED records; each segment goes once its DROPPED record is durable.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while wal::list_segments(&wal_dir).unwrap() != vec![3] {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                wal::list_segments(&wal_dir)
            );
            store.write_out().unwrap();
            wait_durable();
        }
        assert_eq!(store.stats.segments_deleted, 2);
        assert!(store.disk_bytes() < 4096, "{}", store.disk_bytes());
        drop(stores);
        // The SEGMENT_START at the head of the surviving segment keeps the watermark.
        let (_, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 0);
    }

    #[test]
    fn a_torn_tail_is_cut_and_everything_before_it_recovered() {
        let dir = temp_dir("torn");
        let (mut stores, _) = recover_into(&dir, 1);
        for i in 0..5 {
            stores[0].append(SU, 2, 3, &frame(i), 0, true);
        }
        stores[0].write_out().unwrap();
        let seg_dir = stores[0].dir().to_owned();
        // A crash, not a clean close: no final COMMIT.
        std::mem::forget(stores);
        let path = newest_segment(&seg_dir);
        let len = fs::metadata(&path).unwrap().len();
        // A crash in the middle of the last batch (its last record and its COMMIT).
        let cut = len - wal::COMMIT_RECORD_LEN as u64 - 5;
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 4);
        assert_eq!(report.torn_tails.len(), 1);
        assert_eq!(
            counters(&stores[0].load(SU, 2, 10, lane).unwrap()),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn a_flipped_bit_before_a_later_batch_is_corruption_and_refused() {
        let dir = temp_dir("bitflip");
        let wal_dir = write_batches(&dir, 20);
        let path = newest_segment(&wal_dir);
        let middle = file_len(&path) / 2;
        flip(&path, middle, 0x10);
        let before = fs::read(&path).unwrap();
        match try_recover(&dir, 1) {
            Err(WalError::Corrupt {
                path: p, offset, ..
            }) => {
                assert_eq!(p, path);
                assert!(
                    offset <= middle as u64 && offset + 200 > middle as u64,
                    "{offset}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "nothing cut, nothing deleted"
        );
        // The same damage after a clean close is corruption too: the close's COMMIT says all
        // of it was durable.
        let dir = temp_dir("bitflip-last");
        let wal_dir = write_batches(&dir, 3);
        let path = newest_segment(&wal_dir);
        flip(
            &path,
            file_len(&path) - wal::COMMIT_RECORD_LEN * 2 - 10,
            0x01,
        );
        assert!(matches!(
            try_recover(&dir, 1),
            Err(WalError::Corrupt { .. })
        ));
    }

    /// 70 frames of 1 MiB, waiting: a log of two segments. Returns its directory.
    fn two_segment_log(dir: &Path) -> PathBuf {
        let (mut stores, _) = recover_into(dir, 1);
        let big = big_frame(1 << 20);
        for _ in 0..70 {
            stores[0].append(SU, 3, 4, &big, 0, true);
            stores[0].write_out().unwrap();
        }
        stores[0].dir().to_owned()
    }

    #[test]
    fn missing_segments_and_worker_logs_are_refused() {
        // The newest segment deleted: the one before it names its successor.
        let dir = temp_dir("missing-newest");
        let wal_dir = two_segment_log(&dir);
        let segs = wal::list_segments(&wal_dir).unwrap();
        assert_eq!(segs.len(), 2);
        let copy = temp_dir("missing-older");
        copy_dir(&dir, &copy);
        fs::remove_file(wal::segment_path(&wal_dir, segs[1])).unwrap();
        let e = try_recover(&dir, 1).unwrap_err().to_string();
        assert!(
            e.contains("successor") && e.contains(&format!("{:020}.wal", segs[1])),
            "{e}"
        );
        // The older segment deleted: the newest names it as live.
        let copy_wal = datadir::worker_dir(&datadir::gen_dir(&copy, 1), 0);
        fs::remove_file(wal::segment_path(&copy_wal, segs[0])).unwrap();
        let e = try_recover(&copy, 1).unwrap_err().to_string();
        assert!(
            e.contains("still holding frames") && e.contains(&format!("{:020}.wal", segs[0])),
            "{e}"
        );
        // A worker's directory deleted.
        let dir = temp_dir("missing-worker");
        let (stores, _) = recover_into(&dir, 2);
        drop(stores);
        fs::remove_dir_all(datadir::worker_dir(&datadir::gen_dir(&dir, 1), 1)).unwrap();
        let e = try_recover(&dir, 2).unwrap_err().to_string();
        assert!(e.contains("w1") && e.contains("missing"), "{e}");
    }

    #[test]
    fn damage_in_an_older_segment_is_corruption_even_at_its_end() {
        let dir = temp_dir("older-damaged");
        let wal_dir = two_segment_log(&dir);
        let older = wal::segment_path(&wal_dir, wal::list_segments(&wal_dir).unwrap()[0]);
        // In its last record (ROLLED and COMMIT follow): the place of a torn tail, were it the
        // newest segment.
        flip(&older, file_len(&older) - wal::COMMIT_RECORD_LEN - 4, 0x01);
        match try_recover(&dir, 1) {
            Err(WalError::Corrupt { path, .. }) => assert_eq!(path, older),
            other => panic!("{other:?}"),
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap().flatten() {
            let target = to.join(e.file_name());
            if e.path().is_dir() {
                copy_dir(&e.path(), &target);
            } else {
                fs::copy(e.path(), target).unwrap();
            }
        }
    }

    #[test]
    fn recovery_moves_frames_to_their_new_owner_in_a_new_generation() {
        let dir = temp_dir("owners");
        let (mut stores, _) = recover(
            &dir,
            settings(2, Durability::None),
            |_| Some(1),
            |_| Box::new(|| {}),
            |_| {},
        )
        .unwrap();
        stores[1].append(SU, 0, 1, &frame(1), 0, true);
        stores[1].append(PeerKey::Su(Eui64(5)), 0, 1, &frame(2), 0, true);
        stores[1].write_out().unwrap();
        drop(stores);
        let mut orphans = 0;
        let (mut stores, report) = recover(
            &dir,
            settings(3, Durability::None),
            |p| (p == SU).then_some(2),
            |_| Box::new(|| {}),
            |_| orphans += 1,
        )
        .unwrap();
        assert_eq!((report.frames_recovered, report.frames_orphaned), (1, 1));
        assert!(!report.in_place);
        assert_eq!(orphans, 1);
        assert_eq!(stores[2].spilled(SU, 0), 1);
        assert_eq!(counters(&stores[2].load(SU, 0, 5, lane).unwrap()), vec![1]);
        assert_eq!(report.generation, 2);
        assert!(!dir.join("gen-1").exists(), "the old generation is deleted");
    }

    #[test]
    fn a_generation_half_made_by_a_crash_during_recovery_is_deleted() {
        let dir = temp_dir("half-made");
        write_batches(&dir, 3);
        // A crash while copying into generation 2: its directory exists, its MANIFEST not.
        fs::create_dir_all(datadir::gen_dir(&dir, 2).join("w0")).unwrap();
        fs::write(datadir::gen_dir(&dir, 2).join("w0").join("junk"), b"x").unwrap();
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!((report.generation, report.frames_recovered), (1, 3));
        assert!(!datadir::gen_dir(&dir, 2).exists());
        assert_eq!(stores[0].load(SU, 2, 10, lane).unwrap().len(), 3);
    }

    /// Where the ENQUEUE records of a segment start.
    fn enqueue_offsets(path: &Path) -> Vec<u64> {
        let mut r = SegmentReader::open(path, 0).unwrap();
        let mut out = Vec::new();
        while let Some((at, record)) = r.next_record().unwrap() {
            if matches!(record, Record::Enqueue { .. }) {
                out.push(at);
            }
        }
        out
    }

    #[test]
    fn salvage_keeps_what_is_intact_and_lists_the_frames_it_lost() {
        let dir = temp_dir("salvage");
        let wal_dir = write_batches(&dir, 20);
        let path = newest_segment(&wal_dir);
        let tenth = enqueue_offsets(&path)[9] as usize;
        // Inside the tenth frame's record body.
        flip(&path, tenth + 40, 0x10);
        let out = salvage(&dir, settings(1, Durability::Batch), |_| Some(0), |_| {}).unwrap();
        assert_eq!(out.frames_kept, 19, "{out:?}");
        assert_eq!(out.losses.len(), 1, "{:?}", out.losses);
        let loss = &out.losses[0];
        assert!(loss.contains(&path.display().to_string()), "{loss}");
        assert!(loss.contains("(1 frame)"), "{loss}");
        assert_eq!(out.frames_lost, Some(1));
        let text = fs::read_to_string(&out.report_file).unwrap();
        assert!(text.contains(loss.as_str()));
        assert!(
            out.kept_as.as_ref().unwrap().exists(),
            "the damaged generation is kept"
        );
        // The next start recovers the salvaged generation in place.
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!((report.generation, report.frames_recovered), (2, 19));
        let got = counters(&stores[0].load(SU, 2, 100, lane).unwrap());
        assert_eq!(got.len(), 19);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    }

    #[test]
    fn a_log_of_the_first_format_is_read_and_recovered_into_a_new_generation() {
        use std::io::Write;
        let dir = temp_dir("legacy");
        let w0 = datadir::worker_dir(&datadir::gen_dir(&dir, 4), 0);
        fs::create_dir_all(&w0).unwrap();
        fs::write(dir.join(datadir::CURRENT), b"4\n").unwrap();
        // What the first format wrote: a v1 header, a CHECKPOINT, frames, a DONE.
        let mut bytes = wal::SEGMENT_MAGIC_V1.to_vec();
        bytes.extend_from_slice(&1u64.to_le_bytes());
        Record::Checkpoint(vec![]).encode(&mut bytes);
        for seq in 1..=5u64 {
            Record::Enqueue {
                peer: SU,
                level: 3,
                seq,
                enqueued_unix_ns: seq,
                frame: frame(seq),
            }
            .encode(&mut bytes);
        }
        Record::Done {
            peer: SU,
            level: 2,
            seq: 2,
        }
        .encode(&mut bytes);
        // …and a torn tail: in the first format, damage at the end of the newest segment.
        bytes.extend_from_slice(&[200, 0, 0, 0, 1]);
        fs::File::create(wal::segment_path(&w0, 1))
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let (mut stores, report) = recover_into(&dir, 1);
        assert_eq!((report.generation, report.frames_recovered), (5, 3));
        assert!(!report.in_place);
        assert_eq!(report.torn_tails.len(), 1);
        assert!(!datadir::gen_dir(&dir, 4).exists());
        assert_eq!(
            counters(&stores[0].load(SU, 2, 10, lane).unwrap()),
            vec![3, 4, 5]
        );
        // From then on the data directory is of the current format.
        assert!(matches!(
            datadir::resolve(&dir).unwrap(),
            Found::Generation { legacy: false, .. }
        ));
    }

    #[test]
    fn a_first_start_that_stopped_before_its_manifest_starts_fresh() {
        // gen-1's logs were created, then the process died before MANIFEST and CURRENT.
        let dir = temp_dir("fresh-interrupted");
        let w0 = datadir::worker_dir(&datadir::gen_dir(&dir, 1), 0);
        std::mem::forget(
            Store::create(&w0, settings(1, Durability::Batch).log, Box::new(|| {})).unwrap(),
        );
        let (_, report) = recover_into(&dir, 1);
        assert_eq!((report.generation, report.frames_recovered), (1, 0));
        // The same with a frame in it is not a fresh start: refused.
        let dir = temp_dir("fresh-with-frames");
        write_batches(&dir, 1);
        fs::remove_file(dir.join(datadir::CURRENT)).unwrap();
        fs::remove_file(datadir::gen_dir(&dir, 1).join(datadir::MANIFEST)).unwrap();
        assert!(matches!(
            try_recover(&dir, 1),
            Err(WalError::Missing { .. })
        ));
    }

    #[test]
    fn a_damaged_current_beside_a_newer_generation_with_frames_and_no_manifest_is_refused() {
        let dir = temp_dir("two-faults");
        write_batches(&dir, 2);
        // Generation 2 holds frames and its MANIFEST is gone; CURRENT is damaged too.
        let w0 = datadir::worker_dir(&datadir::gen_dir(&dir, 2), 0);
        let mut store =
            Store::create(&w0, settings(1, Durability::None).log, Box::new(|| {})).unwrap();
        store.append(SU, 2, 3, &frame(9), 0, true);
        store.write_out().unwrap();
        drop(store);
        fs::write(dir.join(datadir::CURRENT), b"garbage").unwrap();
        let e = try_recover(&dir, 1).unwrap_err().to_string();
        assert!(
            e.contains("gen-2") && e.contains("may be the current"),
            "{e}"
        );
        assert!(datadir::gen_dir(&dir, 2).exists() && datadir::gen_dir(&dir, 1).exists());
    }

    #[test]
    fn a_power_loss_tear_inside_an_unsynced_batch_is_a_torn_tail() {
        let dir = temp_dir("powerloss");
        let (mut stores, _) = recover_into(&dir, 1);
        stores[0].append(SU, 2, 3, &frame(0), 0, true);
        let pos = stores[0].write_out().unwrap();
        while stores[0].durable_pos() < pos {
            std::thread::sleep(Duration::from_millis(1));
        }
        let synced = fs::metadata(newest_segment(stores[0].dir())).unwrap().len();
        // One batch of 200 frames, written but not synced when the power went.
        for i in 1..=200 {
            stores[0].append(SU, 2, 3, &frame(i), 0, true);
        }
        stores[0].write_out().unwrap();
        let wal_dir = stores[0].dir().to_owned();
        std::mem::forget(stores);
        let path = newest_segment(&wal_dir);
        let mut bytes = fs::read(&path).unwrap();
        // The batch's last page (with its COMMIT) reached the disk, an earlier one did not.
        let page = ((synced as usize / 4096) + 1) * 4096;
        assert!(page + 4096 < bytes.len() - 64);
        bytes[page..page + 4096].fill(0);
        fs::write(&path, &bytes).unwrap();
        assert!(!wal::commits_after(&path, page as u64).unwrap().is_empty());
        let (_, report) = recover_into(&dir, 1);
        assert_eq!(report.torn_tails.len(), 1, "{report:?}");
        assert!(report.frames_recovered >= 1, "the synced frame is kept");
    }

    #[test]
    fn a_written_batch_is_taken_even_when_the_roll_after_it_fails() {
        let dir = temp_dir("rollfail");
        let (mut stores, _) = recover_into(&dir, 1);
        let store = &mut stores[0];
        let big = big_frame(1 << 20);
        // Segment 2 cannot be created: a directory is in its place.
        fs::create_dir_all(wal::segment_path(store.dir(), 2)).unwrap();
        for i in 0..70u64 {
            store.append(SU, 3, 4, &big, i, false);
            assert!(store.write_out().is_ok(), "frame {i}: written, so taken");
        }
        assert!(store.stats.roll_errors > 0);
        let wal_dir = store.dir().to_owned();
        std::mem::forget(stores);
        fs::remove_dir(wal::segment_path(&wal_dir, 2)).unwrap();
        let (_, report) = recover_into(&dir, 1);
        assert_eq!(report.frames_recovered, 70);
    }

    /// On a full disk, failed writes never keep a segment whose DROPPED record is durable: it is
    /// deleted, and that is the space intake waits for. Needs a tmpfs (root).
    #[test]
    fn a_full_disk_still_deletes_dropped_segments() {
        let mnt = temp_dir("dropped-tmpfs");
        fs::create_dir_all(&mnt).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mnt.clone());
        let dir = mnt.join("w0");
        let options = LogOptions {
            durability: Durability::Batch,
            flush_interval: Duration::from_millis(1),
            reserve_bytes: 64 << 10,
        };
        let mut store = Store::create(&dir, options, Box::new(|| {})).unwrap();
        let big = big_frame(100 << 10);
        let mut stored = Vec::new();
        for _ in 0..12 {
            stored.push(store.append(SU, 3, 4, &big, 0, false).0);
            store.write_out().unwrap();
        }
        for s in &stored {
            store.done(SU, 3, *s);
        }
        store.write_out().unwrap();
        assert_eq!(
            wal::list_segments(&dir).unwrap(),
            vec![1, 2],
            "rolled once acknowledged"
        );
        let mut filler = fs::File::create(mnt.join("filler")).unwrap();
        while std::io::Write::write_all(&mut filler, &[1u8; 4096]).is_ok() {}
        let pos = store.write_out().unwrap();
        while store.durable_pos() < pos {
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..50 {
            store.append(SU, 3, 4, &big, 0, false);
            let _ = store.write_out();
        }
        let segments = wal::list_segments(&dir).unwrap();
        drop(store);
        assert!(!segments.contains(&1), "{segments:?}");
        assert!(
            segments.len() <= 2,
            "no roll per failed write: {segments:?}"
        );
    }

    #[test]
    fn durability_is_published_by_the_flusher() {
        let dir = temp_dir("flush");
        let notified = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n = std::sync::Arc::clone(&notified);
        let (mut stores, _) = recover(
            &dir,
            settings(1, Durability::Batch),
            |_| Some(0),
            move |_| {
                let n = std::sync::Arc::clone(&n);
                Box::new(move || {
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })
            },
            |_| {},
        )
        .unwrap();
        let store = &mut stores[0];
        let (_, pos) = store.append(SU, 0, 1, &frame(1), 0, false);
        assert!(store.durable_pos() < pos);
        store.write_out().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.durable_pos() < pos {
            assert!(std::time::Instant::now() < deadline, "never durable");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(notified.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    }
}

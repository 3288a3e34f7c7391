//! The write-ahead log: append-only segment files of checksummed records (ENGINE.md §2, §7).
//!
//! # Format
//!
//! A log is a directory of segment files `00000000000000000001.wal`, `…2.wal`, each starting with
//! a 16-byte header (`DSPLWAL2` and the segment number) followed by records:
//!
//! ```text
//! len u32 | crc32c u32 | body (len bytes)
//! body = kind u8 | level u8 | peer_kind u8 | 5 bytes 0 | peer_id u64 | seq u64 | …
//!   ENQUEUE    … | enqueued_unix_ns u64 | 64-byte frame header | payload
//!   DONE       (seq = the peer's level is acknowledged through this seq)
//! body = kind u8 | 7 bytes 0 | …
//!   COMMIT        "DSPLCMIT" | durable_through u64 | next_seq u64
//!   DROPPED       segment u64
//!   ROLLED        next segment u64
//!   SEGMENT_START (kind u8 | 3 × 0 | live u32 | marks u32 | 4 × 0) | first_seq u64
//!                 | live × segment u64 | marks × (level u8, peer_kind u8, 6 × 0, peer_id u64, seq u64)
//! ```
//!
//! Every integer is little-endian, like the wire protocol. The checksum covers the body, so a
//! torn write (a crash in the middle of a record) or a flipped bit is detected.
//!
//! # Telling a torn tail from corruption
//!
//! A crash can only tear what was being written when it happened: the last group-commit batch
//! of the newest segment. Every batch (one `write`) ends with a COMMIT record that carries the
//! position the flusher had made durable when the batch was written (`durable_through`), and
//! an idle log writes one more COMMIT once its last batch is durable. So after a damaged record:
//!
//! * if an intact COMMIT after it ([`commits_after`] scans for their magic, so a damaged length
//!   field cannot hide them) says the damaged bytes were already durable when its batch was
//!   written, they were synced, and may have been acknowledged: that is corruption.
//! * otherwise the damage is in what had not been synced: a torn write, cut off there. That
//!   is not always the very last batch: with several writes between two `fdatasync`s, a power
//!   loss may keep a later page and lose an earlier one, so intact records after the damage do
//!   not by themselves prove corruption; a durable position does.
//!
//! Damage in a segment that is not the newest is always corruption: older segments were
//! complete and synced before the log moved on. Recovery refuses to start on corruption and
//! names the file and byte offset; `dsplane recover --salvage` is the operator's way past it.
//! The same approach as PostgreSQL's (per-record CRCs and a checksummed, synced "durable up to"
//! position) and TigerBeetle's (a torn write can only be the newest prepare).
//!
//! # Knowing which files should exist
//!
//! Each segment starts with a SEGMENT_START record: every watermark (so that deleting older
//! segments never loses one), the first seq of the segment, and the older segments that still
//! hold live frames. A segment that is deleted is first named in a DROPPED record, and a segment
//! that was rolled ends with ROLLED. Recovery checks the segments present against these, so a
//! deleted file is found rather than silently skipped.
//!
//! # Why a segmented log and not an embedded store
//!
//! See `docs/durability.md`: every write is an append, group commit is one `fdatasync`, and
//! space comes back by deleting whole files.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::disk::{Disk, DiskFile, Open, OsDisk};
use crate::wire::{Frame, Header, HEADER_LEN, PAYLOAD_BYTES_MAX_CEILING};

/// Magic at the start of every segment this version writes.
pub const SEGMENT_MAGIC: &[u8; 8] = b"DSPLWAL2";
/// Magic of the first format: still read (and recovered into a new generation), never written.
pub const SEGMENT_MAGIC_V1: &[u8; 8] = b"DSPLWAL1";
/// The first eight bytes after a COMMIT body's fixed part: what a scan for the next intact batch
/// boundary looks for after a damaged record.
pub const COMMIT_MAGIC: &[u8; 8] = b"DSPLCMIT";
/// Bytes of the segment header.
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// Bytes before a record's body: length and checksum.
pub const RECORD_PREFIX_LEN: usize = 8;
/// Bytes of the fixed part of every body.
const BODY_FIXED_LEN: usize = 24;
/// Bytes of an ENQUEUE body before the payload.
const ENQUEUE_FIXED_LEN: usize = BODY_FIXED_LEN + 8 + HEADER_LEN;
/// Largest record body: an ENQUEUE with the largest payload the protocol allows.
pub const RECORD_BODY_BYTES_MAX: usize = ENQUEUE_FIXED_LEN + PAYLOAD_BYTES_MAX_CEILING as usize;
/// Most entries in one CHECKPOINT or SEGMENT_START.
pub const CHECKPOINT_ENTRIES_MAX: usize = 1 << 20;
/// Most older live segments one SEGMENT_START names (64 Ki × 64 MiB is 4 PiB of log).
pub const LIVE_SEGMENTS_MAX: usize = 1 << 16;
/// Bytes of a COMMIT record, prefix included.
pub const COMMIT_RECORD_LEN: usize = RECORD_PREFIX_LEN + 32;
/// Largest body of any record.
const BODY_BYTES_MAX: usize =
    RECORD_BODY_BYTES_MAX + 24 + CHECKPOINT_ENTRIES_MAX * 24 + LIVE_SEGMENTS_MAX * 8;

// The peer a record is for and the log's error are the owner's vocabulary too: they live with
// the `Log` trait in dsplane-core and are used from there.
pub use crate::log::{PeerKey, WalError};

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A frame taken responsibility for.
    Enqueue {
        /// Its receiver.
        peer: PeerKey,
        /// The level it was given.
        level: u8,
        /// Its sequence number in this log (increasing).
        seq: u64,
        /// When dsplane took it, ns since the Unix epoch (for `retention_h`).
        enqueued_unix_ns: u64,
        /// The frame.
        frame: Frame,
    },
    /// Every frame of (`peer`, `level`) up to `seq` has been acknowledged by the receiver (or
    /// expired): frames of one peer and level leave in arrival order, so one number says it.
    Done {
        /// The receiver.
        peer: PeerKey,
        /// The level.
        level: u8,
        /// Acknowledged through this seq.
        seq: u64,
    },
    /// Every (peer, level) watermark at the start of a segment (the first format; read only).
    Checkpoint(Vec<(PeerKey, u8, u64)>),
    /// The end of one group-commit batch.
    Commit {
        /// Every byte of this log before this position was durable (`fdatasync` returned) when
        /// the batch was written: those frames may have been acknowledged. 0 when durability is
        /// `none`.
        durable_through: u64,
        /// The seq the next ENQUEUE gets: seqs are gapless, so a salvage can say which frames
        /// it could not read.
        next_seq: u64,
    },
    /// The first record of every segment of this format.
    SegmentStart {
        /// The seq of the first ENQUEUE written in this segment.
        first_seq: u64,
        /// Older segments that still held live frames when this one was started.
        live_segments: Vec<u64>,
        /// Every (peer, lane) watermark, so that deleting older segments never loses one.
        watermarks: Vec<(PeerKey, u8, u64)>,
    },
    /// `segment` has nothing live; it is deleted once this record is durable.
    Dropped {
        /// The segment.
        segment: u64,
    },
    /// The last record of a segment that was rolled: the log continues in `next`.
    Rolled {
        /// The next segment.
        next: u64,
    },
}

fn put_marker(out: &mut Vec<u8>, kind: u8) {
    out.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
}

fn put_entries(out: &mut Vec<u8>, entries: &[(PeerKey, u8, u64)]) {
    for (peer, level, seq) in entries {
        let (peer_kind, peer_id) = peer.parts();
        out.extend_from_slice(&[*level, peer_kind, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&peer_id.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
    }
}

fn get_entries(body: &[u8], at: usize, count: usize) -> Option<Vec<(PeerKey, u8, u64)>> {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
    };
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let at = at + i * 24;
        let level = *body.get(at)?;
        let peer = PeerKey::from_parts(*body.get(at + 1)?, u64_at(at + 8)?)?;
        entries.push((peer, level, u64_at(at + 16)?));
    }
    Some(entries)
}

fn put_fixed(out: &mut Vec<u8>, kind: u8, level: u8, peer: PeerKey, seq: u64) {
    let (peer_kind, peer_id) = peer.parts();
    out.extend_from_slice(&[kind, level, peer_kind, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&peer_id.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
}
impl Record {
    /// Appends the record (prefix and body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; RECORD_PREFIX_LEN]);
        match self {
            Record::Enqueue {
                peer,
                level,
                seq,
                enqueued_unix_ns,
                frame,
            } => {
                Self::enqueue_body(out, *peer, *level, *seq, *enqueued_unix_ns, frame);
            }
            Record::Done { peer, level, seq } => put_fixed(out, 2, *level, *peer, *seq),
            Record::Checkpoint(entries) => {
                out.extend_from_slice(&[3, 0, 0, 0]);
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                put_entries(out, entries);
            }
            Record::Commit {
                durable_through,
                next_seq,
            } => {
                put_marker(out, 4);
                out.extend_from_slice(COMMIT_MAGIC);
                out.extend_from_slice(&durable_through.to_le_bytes());
                out.extend_from_slice(&next_seq.to_le_bytes());
            }
            Record::Dropped { segment } => {
                put_marker(out, 5);
                out.extend_from_slice(&segment.to_le_bytes());
            }
            Record::Rolled { next } => {
                put_marker(out, 6);
                out.extend_from_slice(&next.to_le_bytes());
            }
            Record::SegmentStart {
                first_seq,
                live_segments,
                watermarks,
            } => {
                out.extend_from_slice(&[7, 0, 0, 0]);
                out.extend_from_slice(&(live_segments.len() as u32).to_le_bytes());
                out.extend_from_slice(&(watermarks.len() as u32).to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&first_seq.to_le_bytes());
                for seg in live_segments {
                    out.extend_from_slice(&seg.to_le_bytes());
                }
                put_entries(out, watermarks);
            }
        }
        Self::seal(out, start);
    }

    /// Encodes an ENQUEUE record of `frame` onto `out`, as [`Record::encode`] does, from a
    /// borrowed frame (the log's hot path: no reference to the payload is taken).
    pub fn encode_enqueue(
        out: &mut Vec<u8>,
        peer: PeerKey,
        level: u8,
        seq: u64,
        enqueued_unix_ns: u64,
        frame: &Frame,
    ) {
        // The prefix and the body's fixed part (the same bytes `enqueue_body` writes) built
        // on the stack, then one reservation for them and the payload: a capacity check per
        // field showed in the owner's profile.
        let (peer_kind, peer_id) = peer.parts();
        let mut head = [0u8; RECORD_PREFIX_LEN + ENQUEUE_FIXED_LEN];
        let (_prefix, body) = head.split_at_mut(RECORD_PREFIX_LEN);
        let (fixed, rest) = body.split_at_mut(BODY_FIXED_LEN);
        let (kinds, ids) = fixed.split_at_mut(8);
        kinds.copy_from_slice(&[1, level, peer_kind, 0, 0, 0, 0, 0]);
        let (id, seq_bytes) = ids.split_at_mut(8);
        id.copy_from_slice(&peer_id.to_le_bytes());
        seq_bytes.copy_from_slice(&seq.to_le_bytes());
        let (stamp, header) = rest.split_at_mut(8);
        stamp.copy_from_slice(&enqueued_unix_ns.to_le_bytes());
        header.copy_from_slice(&frame.header_bytes());
        let start = out.len();
        out.reserve(head.len() + frame.payload.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&frame.payload);
        Self::seal(out, start);
    }

    fn enqueue_body(
        out: &mut Vec<u8>,
        peer: PeerKey,
        level: u8,
        seq: u64,
        enqueued_unix_ns: u64,
        frame: &Frame,
    ) {
        put_fixed(out, 1, level, peer, seq);
        out.extend_from_slice(&enqueued_unix_ns.to_le_bytes());
        out.extend_from_slice(&frame.header_bytes());
        out.extend_from_slice(&frame.payload);
    }

    /// Writes the length and checksum of the record begun at `start` into its prefix.
    fn seal(out: &mut [u8], start: usize) {
        let body_len = (out.len() - start - RECORD_PREFIX_LEN) as u32;
        let (prefix, body) = out.split_at_mut(start + RECORD_PREFIX_LEN);
        let crc = crate::checksum::crc32c(body);
        // The prefix is the RECORD_PREFIX_LEN bytes pushed at `start`: length, then checksum.
        if let Some(p) = prefix.get_mut(start..) {
            let mut encoded = [0u8; RECORD_PREFIX_LEN];
            let (len, sum) = encoded.split_at_mut(4);
            len.copy_from_slice(&body_len.to_le_bytes());
            sum.copy_from_slice(&crc.to_le_bytes());
            p.copy_from_slice(&encoded);
        }
    }

    /// Decodes a body whose checksum was verified. `None` if it makes no sense (which, with a
    /// good checksum, means a bug or a format from elsewhere).
    pub fn decode(body: &[u8]) -> Option<Record> {
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
        };
        let u32_at = |at: usize| -> Option<usize> {
            Some(u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize)
        };
        let kind = *body.first()?;
        match kind {
            3 => {
                let count = u32_at(4)?;
                if count > CHECKPOINT_ENTRIES_MAX || body.len() != 8 + count * 24 {
                    return None;
                }
                return Some(Record::Checkpoint(get_entries(body, 8, count)?));
            }
            4 if body.len() == 32 && body.get(8..16)? == COMMIT_MAGIC => {
                return Some(Record::Commit {
                    durable_through: u64_at(16)?,
                    next_seq: u64_at(24)?,
                });
            }
            5 if body.len() == 16 => {
                return Some(Record::Dropped {
                    segment: u64_at(8)?,
                })
            }
            6 if body.len() == 16 => return Some(Record::Rolled { next: u64_at(8)? }),
            7 => {
                let (live, marks) = (u32_at(4)?, u32_at(8)?);
                if live > LIVE_SEGMENTS_MAX
                    || marks > CHECKPOINT_ENTRIES_MAX
                    || body.len() != 24 + live * 8 + marks * 24
                {
                    return None;
                }
                let live_segments = (0..live)
                    .map(|i| u64_at(24 + i * 8))
                    .collect::<Option<Vec<u64>>>()?;
                return Some(Record::SegmentStart {
                    first_seq: u64_at(16)?,
                    live_segments,
                    watermarks: get_entries(body, 24 + live * 8, marks)?,
                });
            }
            1 | 2 => {}
            _ => return None,
        }
        let level = *body.get(1)?;
        let peer = PeerKey::from_parts(*body.get(2)?, u64_at(8)?)?;
        let seq = u64_at(16)?;
        match kind {
            1 => {
                let enqueued_unix_ns = u64_at(24)?;
                let header_bytes: &[u8; HEADER_LEN] =
                    body.get(32..32 + HEADER_LEN)?.try_into().ok()?;
                let header = Header::decode(header_bytes, PAYLOAD_BYTES_MAX_CEILING).ok()?;
                let payload = body.get(ENQUEUE_FIXED_LEN..)?;
                if payload.len() != header.payload_len as usize {
                    return None;
                }
                Some(Record::Enqueue {
                    peer,
                    level,
                    seq,
                    enqueued_unix_ns,
                    frame: Frame {
                        header,
                        payload: bytes::Bytes::copy_from_slice(payload),
                    },
                })
            }
            2 if body.len() == BODY_FIXED_LEN => Some(Record::Done { peer, level, seq }),
            _ => None,
        }
    }
}

/// The file name of segment `n`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.wal"))
}

/// The segment numbers in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    list_segments_on(&OsDisk, dir)
}

/// [`list_segments`] on `disk`.
pub fn list_segments_on<D: Disk>(disk: &D, dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    let entries = match disk.read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in entries {
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Creates segment `n` in `dir` with its header and `first` (its SEGMENT_START record) in one
/// write. If the write fails (a full disk), the file is removed again.
pub fn create_segment(dir: &Path, n: u64, first: &[u8]) -> io::Result<File> {
    create_segment_on(&OsDisk, dir, n, first)
}

/// [`create_segment`] on `disk`.
pub fn create_segment_on<D: Disk>(
    disk: &D,
    dir: &Path,
    n: u64,
    first: &[u8],
) -> io::Result<D::File> {
    let path = segment_path(dir, n);
    let file = disk.open(&path, Open::CreateNew)?;
    let mut bytes = Vec::with_capacity(SEGMENT_HEADER_LEN as usize + first.len());
    bytes.extend_from_slice(SEGMENT_MAGIC);
    bytes.extend_from_slice(&n.to_le_bytes());
    bytes.extend_from_slice(first);
    if let Err(e) = file.append_all(&bytes) {
        drop(file);
        let _ = disk.remove_file(&path);
        return Err(e);
    }
    Ok(file)
}

/// Whether an I/O error means the file system is full.
pub fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

/// How a segment read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentEnd {
    /// At the end of the file, after a whole record.
    Clean,
    /// At a record that is short or fails its checksum, starting at this offset.
    Damaged {
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// Reads one segment's records in order (of a real file unless `F` says otherwise).
#[derive(Debug)]
pub struct SegmentReader<F = File> {
    path: PathBuf,
    reader: BufReader<F>,
    offset: u64,
    len: u64,
    body: Vec<u8>,
    end: Option<SegmentEnd>,
    version: u8,
}

impl SegmentReader {
    /// Opens a segment and checks its header; reading starts at `offset` (at least the header's
    /// end).
    pub fn open(path: &Path, offset: u64) -> Result<SegmentReader, WalError> {
        SegmentReader::open_on(&OsDisk, path, offset)
    }
}

impl<F: DiskFile> SegmentReader<F> {
    /// [`SegmentReader::open`] on `disk`.
    pub fn open_on<D: Disk<File = F>>(
        disk: &D,
        path: &Path,
        offset: u64,
    ) -> Result<SegmentReader<F>, WalError> {
        let io_err = |source| WalError::Io {
            path: path.to_owned(),
            source,
        };
        let file = disk.open(path, Open::Read).map_err(io_err)?;
        let len = file.size().map_err(io_err)?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        let bad = |why| {
            Err(WalError::BadHeader {
                path: path.to_owned(),
                why,
            })
        };
        if len < SEGMENT_HEADER_LEN || reader.read_exact(&mut header).is_err() {
            return bad("shorter than a segment header");
        }
        let version = match &header[..8] {
            m if m == SEGMENT_MAGIC => 2,
            m if m == SEGMENT_MAGIC_V1 => 1,
            _ => return bad("bad magic"),
        };
        let mut number = [0u8; 8];
        number.copy_from_slice(&header[8..]);
        let number = u64::from_le_bytes(number);
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if named.is_some_and(|n| n != number) {
            return bad("the segment number in its header is not the one in its name");
        }
        let offset = offset.max(SEGMENT_HEADER_LEN);
        reader.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        let end = (offset > len).then_some(SegmentEnd::Damaged {
            offset,
            why: "starts past the end of the file",
        });
        Ok(SegmentReader {
            path: path.to_owned(),
            reader,
            offset,
            len,
            body: Vec::new(),
            end,
            version,
        })
    }

    /// The format of the segment: 1 (`DSPLWAL1`, read only) or 2.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Bytes in the file.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// The next record and the offset it starts at; `None` at the end (see [`Self::end`]).
    pub fn next_record(&mut self) -> Result<Option<(u64, Record)>, WalError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let at = self.offset;
        if at == self.len {
            self.end = Some(SegmentEnd::Clean);
            return Ok(None);
        }
        let damaged = |why| Some(SegmentEnd::Damaged { offset: at, why });
        if self.len - at < RECORD_PREFIX_LEN as u64 {
            self.end = damaged("short record prefix");
            return Ok(None);
        }
        let mut prefix = [0u8; RECORD_PREFIX_LEN];
        self.read_exact_at(&mut prefix)?;
        let body_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let crc = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        if body_len > BODY_BYTES_MAX {
            self.end = damaged("impossible record length");
            return Ok(None);
        }
        if self.len - at - (RECORD_PREFIX_LEN as u64) < body_len as u64 {
            self.end = damaged("record runs past the end of the file");
            return Ok(None);
        }
        self.body.resize(body_len, 0);
        let mut body = std::mem::take(&mut self.body);
        let read = self.read_exact_at(&mut body);
        self.body = body;
        read?;
        if crate::checksum::crc32c(&self.body) != crc {
            self.end = damaged("checksum mismatch");
            return Ok(None);
        }
        let Some(record) = Record::decode(&self.body) else {
            self.end = damaged("unknown record");
            return Ok(None);
        };
        self.offset = at + (RECORD_PREFIX_LEN + body_len) as u64;
        Ok(Some((at, record)))
    }

    fn read_exact_at(&mut self, buf: &mut [u8]) -> Result<(), WalError> {
        self.reader.read_exact(buf).map_err(|source| WalError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// How reading ended, once [`Self::next_record`] has returned `None`.
    pub fn end(&self) -> Option<SegmentEnd> {
        self.end
    }

    /// The offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The damage as an error (when it cannot be a torn tail).
    pub fn corrupt_error(&self) -> Option<WalError> {
        match self.end {
            Some(SegmentEnd::Damaged { offset, why }) => Some(WalError::Corrupt {
                path: self.path.clone(),
                offset,
                why,
            }),
            _ => None,
        }
    }
}

/// An intact COMMIT record found by [`commits_after`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundCommit {
    /// Where it starts.
    pub start: u64,
    /// Where it ends (the next record starts).
    pub end: u64,
    /// Its `durable_through`.
    pub durable_through: u64,
    /// Its `next_seq`.
    pub next_seq: u64,
}

/// Every intact COMMIT record that starts at or after `from` in the segment at `path`, in
/// order. Found by their magic, so a damaged length field before them does not hide them.
/// Reads the rest of the file: only for damaged logs.
pub fn commits_after(path: &Path, from: u64) -> io::Result<Vec<FoundCommit>> {
    commits_after_on(&OsDisk, path, from)
}

/// [`commits_after`] on `disk`.
pub fn commits_after_on<D: Disk>(disk: &D, path: &Path, from: u64) -> io::Result<Vec<FoundCommit>> {
    let mut file = disk.open(path, Open::Read)?;
    file.seek(SeekFrom::Start(from))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest)?;
    let mut out = Vec::new();
    // The magic sits 16 bytes into the record: 8 of prefix, 8 of the body's fixed part.
    let mut at = 0;
    while let Some(found) = rest
        .get(at..)
        .and_then(|tail| tail.windows(8).position(|w| w == COMMIT_MAGIC))
    {
        let magic = at + found;
        at = magic + 1;
        let Some(start) = magic.checked_sub(16) else {
            continue;
        };
        let Some(record) = rest.get(start..start + COMMIT_RECORD_LEN) else {
            continue;
        };
        let (prefix, body) = record.split_at(RECORD_PREFIX_LEN);
        let word = |at: usize| {
            prefix
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        if word(0) != Some(body.len() as u32) || word(4) != Some(crate::checksum::crc32c(body)) {
            continue;
        }
        if let Some(Record::Commit {
            durable_through,
            next_seq,
        }) = Record::decode(body)
        {
            let start = from + start as u64;
            out.push(FoundCommit {
                start,
                end: start + COMMIT_RECORD_LEN as u64,
                durable_through,
                next_seq,
            });
        }
    }
    Ok(out)
}

/// Cuts a segment at `offset` (a torn tail), making the cut durable.
pub fn truncate_torn_tail(path: &Path, offset: u64) -> io::Result<()> {
    truncate_torn_tail_on(&OsDisk, path, offset)
}

/// [`truncate_torn_tail`] on `disk`.
pub fn truncate_torn_tail_on<D: Disk>(disk: &D, path: &Path, offset: u64) -> io::Result<()> {
    let file = disk.open(path, Open::Append)?;
    file.set_len(offset)?;
    file.sync_all()
}

/// Makes a directory's entries (created, renamed, deleted files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    OsDisk.sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Eui64;
    use crate::wire::Kind;
    use bytes::Bytes;
    use std::fs;
    use std::io::Write;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dsplane-wal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn enqueue(seq: u64, payload: &'static [u8]) -> Record {
        let mut h = Header::new(Kind::Response);
        h.su_id = Eui64(0x90B3_D51F_3001_0000);
        h.counter = seq;
        Record::Enqueue {
            peer: PeerKey::Su(Eui64(0x90B3_D51F_3001_0000)),
            level: 2,
            seq,
            enqueued_unix_ns: 1_700_000_000_000_000_000 + seq,
            frame: Frame::new(h, Bytes::from_static(payload)).unwrap(),
        }
    }

    fn write(dir: &Path, n: u64, records: &[Record]) -> (PathBuf, Vec<u64>) {
        let mut file = create_segment(dir, n, &[]).unwrap();
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for r in records {
            r.encode(&mut buf);
            ends.push(SEGMENT_HEADER_LEN + buf.len() as u64);
        }
        file.write_all(&buf).unwrap();
        (segment_path(dir, n), ends)
    }

    fn read_all(path: &Path) -> (Vec<Record>, SegmentEnd) {
        let mut r = SegmentReader::open(path, 0).unwrap();
        let mut out = Vec::new();
        while let Some((_, rec)) = r.next_record().unwrap() {
            out.push(rec);
        }
        (out, r.end().unwrap())
    }

    #[test]
    fn encode_enqueue_writes_what_encode_writes() {
        for (seq, payload) in [(1, &b"hello"[..]), (2, &b""[..]), (3, &[7u8; 300][..])] {
            let payload: &'static [u8] = Box::leak(payload.to_vec().into_boxed_slice());
            let record = enqueue(seq, payload);
            let Record::Enqueue {
                peer,
                level,
                seq,
                enqueued_unix_ns,
                frame,
            } = &record
            else {
                unreachable!()
            };
            let (mut a, mut b) = (vec![9u8; 3], vec![9u8; 3]);
            record.encode(&mut a);
            Record::encode_enqueue(&mut b, *peer, *level, *seq, *enqueued_unix_ns, frame);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn records_round_trip() {
        let dir = temp_dir("round-trip");
        let records = vec![
            Record::Checkpoint(vec![
                (PeerKey::Su(Eui64(1)), 1, 5),
                (PeerKey::csp("csp-north"), 4, 9),
            ]),
            enqueue(1, b"hello"),
            enqueue(2, b""),
            Record::Done {
                peer: PeerKey::Su(Eui64(7)),
                level: 3,
                seq: 2,
            },
            Record::Checkpoint(vec![]),
        ];
        let (path, _) = write(&dir, 1, &records);
        let (read, end) = read_all(&path);
        assert_eq!(read, records);
        assert_eq!(end, SegmentEnd::Clean);
        assert_eq!(list_segments(&dir).unwrap(), vec![1]);
    }

    #[test]
    fn a_torn_tail_is_found_at_every_cut_and_cut_off() {
        let dir = temp_dir("torn");
        let records: Vec<Record> = (1..=3).map(|s| enqueue(s, b"payload bytes")).collect();
        let (path, ends) = write(&dir, 1, &records);
        let full = fs::read(&path).unwrap();
        // Every possible crash point inside the third record.
        for cut in ends[1] + 1..ends[2] {
            fs::write(&path, &full[..cut as usize]).unwrap();
            let (read, end) = read_all(&path);
            assert_eq!(read.len(), 2, "cut at {cut}");
            assert!(
                matches!(end, SegmentEnd::Damaged { offset, .. } if offset == ends[1]),
                "cut at {cut}: {end:?}"
            );
        }
        truncate_torn_tail(&path, ends[1]).unwrap();
        let (read, end) = read_all(&path);
        assert_eq!((read.len(), end), (2, SegmentEnd::Clean));
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let dir = temp_dir("bitflip");
        let records: Vec<Record> = (1..=3).map(|s| enqueue(s, b"payload")).collect();
        let (path, ends) = write(&dir, 1, &records);
        let mut bytes = fs::read(&path).unwrap();
        let inside_second = ends[0] as usize + 30;
        bytes[inside_second] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let mut r = SegmentReader::open(&path, 0).unwrap();
        let mut n = 0;
        while r.next_record().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 1);
        assert!(matches!(
            r.end(),
            Some(SegmentEnd::Damaged {
                why: "checksum mismatch",
                ..
            })
        ));
        assert!(matches!(r.corrupt_error(), Some(WalError::Corrupt { .. })));
    }

    #[test]
    fn a_bad_header_is_refused() {
        let dir = temp_dir("header");
        let path = dir.join("00000000000000000001.wal");
        fs::write(&path, b"not a wal").unwrap();
        assert!(matches!(
            SegmentReader::open(&path, 0),
            Err(WalError::BadHeader { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let dir = temp_dir("garbage");
        let path = dir.join("00000000000000000001.wal");
        let mut seed = 0x1234_5678_u64;
        for round in 0..200 {
            let mut bytes = SEGMENT_MAGIC.to_vec();
            bytes.extend_from_slice(&1u64.to_le_bytes());
            for _ in 0..(round * 7 % 300) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                bytes.push((seed >> 33) as u8);
            }
            fs::write(&path, &bytes).unwrap();
            let mut r = SegmentReader::open(&path, 0).unwrap();
            while r.next_record().unwrap().is_some() {}
            assert!(r.end().is_some());
        }
    }

    #[test]
    fn csp_keys_are_stable() {
        // FNV-1a of "a" is a published constant: the key must not change across builds.
        assert_eq!(PeerKey::csp("a"), PeerKey::Csp(0xaf63_dc4c_8601_ec8c));
    }
}

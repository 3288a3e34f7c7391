//! The write-ahead log: append-only segment files of checksummed records (ENGINE.md §2, §7).
//!
//! # Format
//!
//! A log is a directory of segment files `00000000000000000001.wal`, `…2.wal`, each starting with
//! a 16-byte header (`DSPLWAL1` and the segment number) followed by records:
//!
//! ```text
//! len u32 | crc32c u32 | body (len bytes)
//! body = kind u8 | level u8 | peer_kind u8 | 5 bytes 0 | peer_id u64 | seq u64 | …
//!   ENQUEUE    … | enqueued_unix_ns u64 | 64-byte frame header | payload
//!   DONE       (seq = the peer's level is acknowledged through this seq)
//!   CHECKPOINT … | count u32 | count × (level u8, peer_kind u8, 6 × 0, peer_id u64, seq u64)
//! ```
//!
//! Every integer is little-endian, like the wire protocol. The checksum covers the body, so a
//! torn write (a crash in the middle of a record) or a flipped bit is detected.
//!
//! # Torn tails
//!
//! A crash can leave the last record of the newest segment incomplete. [`SegmentReader`] stops
//! at the first record that is short or fails its checksum and reports where; recovery cuts the
//! newest segment there ([`truncate_torn_tail`]). The same damage in an older segment cannot be a
//! torn write (older segments were complete and synced before the log moved on), so it is
//! reported as corruption and recovery refuses to guess.
//!
//! # Why a segmented log and not an embedded store
//!
//! See `docs/durability.md`: every write is an append, group commit is one `fdatasync`, and
//! space comes back by deleting whole files.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::ids::Eui64;
use crate::wire::{Frame, Header, HEADER_LEN, PAYLOAD_BYTES_MAX_CEILING};

/// Magic at the start of every segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"DSPLWAL1";
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
/// Most entries in one CHECKPOINT.
pub const CHECKPOINT_ENTRIES_MAX: usize = 1 << 20;

/// Which kind of peer a record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerKey {
    /// A Service User, by its EUI-64.
    Su(Eui64),
    /// A CSP link, by a hash of its name (names are what stays stable across restarts).
    Csp(u64),
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

    fn parts(self) -> (u8, u64) {
        match self {
            PeerKey::Su(id) => (1, id.0),
            PeerKey::Csp(h) => (2, h),
        }
    }

    fn from_parts(kind: u8, id: u64) -> Option<PeerKey> {
        match kind {
            1 => Some(PeerKey::Su(Eui64(id))),
            2 => Some(PeerKey::Csp(id)),
            _ => None,
        }
    }
}

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
    /// Every (peer, level) watermark at the start of a segment, so that deleting older
    /// segments never loses a watermark.
    Checkpoint(Vec<(PeerKey, u8, u64)>),
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
    #[error("{path}: not a dsplane WAL segment (bad header)")]
    BadHeader {
        /// The file.
        path: PathBuf,
    },
    /// A record in a segment that is not the newest is damaged: not a torn write.
    #[error("{path}: damaged record at byte {offset} ({why}); the log cannot be trusted past it. Move the file aside to start without it (its frames are then lost)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}

fn put_fixed(out: &mut Vec<u8>, kind: u8, level: u8, peer: PeerKey, seq: u64) {
    let (peer_kind, peer_id) = peer.parts();
    out.extend_from_slice(&[kind, level, peer_kind, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&peer_id.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
}
// Indexing here is safe: `p` is the 8-byte prefix just pushed (split at `start + 8`).
impl Record {
    /// Appends the record (prefix and body) to `out`.
    // Indexing here is safe: see the module documentation.
    #[allow(clippy::indexing_slicing, clippy::expect_used, clippy::unwrap_used)]
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
                put_fixed(out, 1, *level, *peer, *seq);
                out.extend_from_slice(&enqueued_unix_ns.to_le_bytes());
                out.extend_from_slice(&frame.header_bytes());
                out.extend_from_slice(&frame.payload);
            }
            Record::Done { peer, level, seq } => put_fixed(out, 2, *level, *peer, *seq),
            Record::Checkpoint(entries) => {
                out.extend_from_slice(&[3, 0, 0, 0]);
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for (peer, level, seq) in entries {
                    let (peer_kind, peer_id) = peer.parts();
                    out.extend_from_slice(&[*level, peer_kind, 0, 0, 0, 0, 0, 0]);
                    out.extend_from_slice(&peer_id.to_le_bytes());
                    out.extend_from_slice(&seq.to_le_bytes());
                }
            }
        }
        let body_len = (out.len() - start - RECORD_PREFIX_LEN) as u32;
        let (prefix, body) = out.split_at_mut(start + RECORD_PREFIX_LEN);
        let crc = crc32c::crc32c(body);
        if let Some(p) = prefix.get_mut(start..) {
            p[..4].copy_from_slice(&body_len.to_le_bytes());
            p[4..].copy_from_slice(&crc.to_le_bytes());
        }
    }

    /// Decodes a body whose checksum was verified. `None` if it makes no sense (which, with a
    /// good checksum, means a bug or a format from elsewhere).
    pub fn decode(body: &[u8]) -> Option<Record> {
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
        };
        let kind = *body.first()?;
        if kind == 3 {
            let count = u32::from_le_bytes(body.get(4..8)?.try_into().ok()?) as usize;
            if count > CHECKPOINT_ENTRIES_MAX || body.len() != 8 + count * 24 {
                return None;
            }
            let mut entries = Vec::with_capacity(count);
            for i in 0..count {
                let at = 8 + i * 24;
                let level = *body.get(at)?;
                let peer = PeerKey::from_parts(*body.get(at + 1)?, u64_at(at + 8)?)?;
                entries.push((peer, level, u64_at(at + 16)?));
            }
            return Some(Record::Checkpoint(entries));
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
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
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

/// Creates segment `n` in `dir` with its header.
pub fn create_segment(dir: &Path, n: u64) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .append(true)
        .open(segment_path(dir, n))?;
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..].copy_from_slice(&n.to_le_bytes());
    file.write_all(&header)?;
    Ok(file)
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

/// Reads one segment's records in order.
#[derive(Debug)]
pub struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    len: u64,
    body: Vec<u8>,
    end: Option<SegmentEnd>,
}

impl SegmentReader {
    /// Opens a segment and checks its header; reading starts at `offset` (at least the header's
    /// end).
    pub fn open(path: &Path, offset: u64) -> Result<SegmentReader, WalError> {
        let io_err = |source| WalError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        if len < SEGMENT_HEADER_LEN
            || reader.read_exact(&mut header).is_err()
            || &header[..8] != SEGMENT_MAGIC
        {
            return Err(WalError::BadHeader {
                path: path.to_owned(),
            });
        }
        let offset = offset.max(SEGMENT_HEADER_LEN);
        reader.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        Ok(SegmentReader {
            path: path.to_owned(),
            reader,
            offset,
            len,
            body: Vec::new(),
            end: None,
        })
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
        if body_len > RECORD_BODY_BYTES_MAX + CHECKPOINT_ENTRIES_MAX * 24 {
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
        if crc32c::crc32c(&self.body) != crc {
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

    /// The damage as an error (for a segment that is not the newest).
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

/// Cuts a segment at `offset` (a torn tail), making the cut durable.
pub fn truncate_torn_tail(path: &Path, offset: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(offset)?;
    file.sync_all()
}

/// Makes a directory's entries (created, renamed, deleted files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;
    use bytes::Bytes;

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
        let mut file = create_segment(dir, n).unwrap();
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

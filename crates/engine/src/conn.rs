//! One peer connection inside a worker: its socket, its frame decoder, and its outgoing bytes.
//!
//! Outgoing frames are copied into one contiguous buffer, header and payload, so that a turn's
//! frames for a connection leave in one `write`: at 128-byte payloads, copying 192 bytes costs
//! less than queueing two reference-counted chunks per frame and handing the kernel 2 iovecs
//! per frame (`docs/engine.md`, "The data path"). Payloads over [`COPY_BYTES_MAX`] are not
//! copied: the buffer so far becomes a chunk, the payload `Bytes` follows it, and the few chunks
//! go out with one vectored write.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use mio::net::TcpStream;

use super::shared::PeerRef;
use crate::owner::Transmit;
use crate::wire::{Frame, FrameDecoder, Header, HEADER_LEN};
use crate::Nanos;
use dsplane_cluster::gate::Gate;

/// Most chunks handed to one `writev` (Linux's `IOV_MAX` is 1024). Chunks are whole runs of
/// small frames or large payloads, so 64 is many hundreds of kilobytes.
const WRITE_SLICES_MAX: usize = 64;

/// Payloads up to this size are copied into the connection's buffer; larger ones go out as their
/// own `Bytes`, uncopied. At 4 KiB the copy costs about what queueing a chunk does.
pub(crate) const COPY_BYTES_MAX: usize = 4096;

/// Bytes queued for one connection beyond which the scheduler stops handing it frames: a peer
/// that does not read cannot make dsplane buffer without bound, and its frames stay in its
/// scheduler (counted, bounded, re-sendable) instead of in socket-side buffers.
pub(crate) const OUT_BYTES_MAX: usize = 1 << 20;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Carrying traffic.
    Open,
    /// Finishing: sending what is queued (a final NACK), then half-closing and reading until the
    /// peer closes or `deadline`, so that the peer reads the NACK instead of a reset.
    Closing { deadline: Nanos },
}

#[derive(Debug)]
pub(crate) struct Conn {
    /// Asked before every write ([`Conn::flush`]).
    gate: Arc<Gate>,
    pub stream: TcpStream,
    pub decoder: FrameDecoder,
    pub peer: PeerRef,
    pub addr: std::net::SocketAddr,
    /// Chunks ready to write, in order, before `tail`.
    out: VecDeque<Bytes>,
    /// The contiguous buffer being filled; `tail_at` bytes of it are already written.
    tail: Vec<u8>,
    tail_at: usize,
    /// Whether anything was queued since the last [`Conn::tick`].
    queued_since_tick: bool,
    /// Bytes queued and not yet written (`out` and the rest of `tail`).
    out_bytes: usize,
    /// When the peer last sent anything (PING counts).
    pub last_rx: Nanos,
    /// Highest data `msg_id` received on this connection.
    pub last_msg_id: u64,
    /// Highest `msg_id` taken responsibility for and not yet ACKed.
    pub ack_due: Option<u64>,
    pub state: ConnState,
    pub write_shut: bool,
    /// Unique within its worker, so that a late durability ticket for a closed connection is
    /// not applied to a new one in the same slot.
    pub id: u64,
    /// Data frames taken, in msg_id order, waiting to be durable or durable: the cumulative ACK
    /// advances over the durable prefix only.
    pub pending: VecDeque<Pending>,
    /// Frames of a read batch that did not fit their owners' rings: (owner, ring level,
    /// envelope), in arrival order. While there are any, nothing more is read from this
    /// connection.
    pub stalled: Vec<(usize, crate::ids::Level, super::shared::Envelope)>,
    /// The last data `msg_id` of the batch `stalled` belongs to: ACKed (durability `none`) once
    /// they are all in.
    pub stalled_through: u64,
}

/// A data frame taken on a connection whose durability is not known yet, or that waits for an
/// older one to be durable before it is ACKed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub msg_id: u64,
    /// The ring it went to its owner through (see [`crate::owner::Ticket::ring`]).
    pub ring: u16,
    /// Durable: ACKed once every older frame is.
    pub done: bool,
}

/// Applies a run's durability ([`crate::owner::TicketRun`]) to a connection's pending frames:
/// the frames through `ring` with a `msg_id` from `first` to `last` are `durable`, or refused
/// (taken out, their `msg_id`s pushed on `refused`: each gets a NACK). A frame already decided
/// keeps its decision. Then the durable prefix leaves: the highest `msg_id` that may now be
/// ACKed, if it moved.
///
/// Runs from one owner come in `msg_id` order, so the usual durable run starts at the oldest
/// pending frame: that is looked at first, and the binary search is for runs that overtake
/// another owner's (or another level's) frames. A refusal (a failed write: rare) takes its
/// frames out in one pass over the pending frames.
pub(crate) fn resolve_run(
    pending: &mut VecDeque<Pending>,
    first: u64,
    last: u64,
    ring: u16,
    durable: bool,
    refused: &mut Vec<u64>,
) -> Option<u64> {
    if durable {
        let start = match pending.front() {
            Some(p) if p.msg_id == first => 0,
            _ => pending.partition_point(|p| p.msg_id < first),
        };
        for p in pending.range_mut(start..) {
            if p.msg_id > last {
                break;
            }
            if p.ring == ring {
                p.done = true;
            }
        }
    } else {
        pending.retain(|p| {
            let out = (first..=last).contains(&p.msg_id) && p.ring == ring && !p.done;
            if out {
                refused.push(p.msg_id);
            }
            !out
        });
    }
    let mut through = None;
    while let Some(&Pending {
        msg_id, done: true, ..
    }) = pending.front()
    {
        through = Some(msg_id);
        pending.pop_front();
    }
    through
}

impl Conn {
    pub(crate) fn new(
        stream: TcpStream,
        decoder: FrameDecoder,
        peer: PeerRef,
        addr: std::net::SocketAddr,
        now: Nanos,
        id: u64,
        gate: Arc<Gate>,
    ) -> Conn {
        Conn {
            gate,
            stream,
            decoder,
            peer,
            addr,
            out: VecDeque::new(),
            tail: Vec::new(),
            tail_at: 0,
            queued_since_tick: false,
            out_bytes: 0,
            last_rx: now,
            last_msg_id: 0,
            ack_due: None,
            state: ConnState::Open,
            write_shut: false,
            id,
            pending: VecDeque::new(),
            stalled: Vec::new(),
            stalled_through: 0,
        }
    }

    /// Reads once from the socket into the decoder (see [`FrameDecoder::fill_with`]): `read(2)`
    /// straight into the decoder's spare space, which is not zeroed first.
    pub(crate) fn read(&mut self) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = self.stream.as_raw_fd();
        let read = |spare: &mut bytes::buf::UninitSlice| {
            // SAFETY: `spare` is valid for writes of `spare.len()` bytes for this call, and `fd`
            // is this connection's open socket.
            let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        };
        // SAFETY: `read` only hands the spare space to read(2), which writes at most
        // `spare.len()` bytes at its start, reads none, and returns the count it wrote.
        unsafe { self.decoder.fill_with(usize::MAX, read) }
    }

    /// Whether the scheduler may hand this connection more frames.
    pub(crate) fn has_room(&self) -> bool {
        self.state == ConnState::Open && self.out_bytes < OUT_BYTES_MAX
    }

    /// Queues a frame.
    pub(crate) fn queue(&mut self, frame: &Frame) {
        self.queue_parts(&frame.header, &frame.payload);
    }

    /// Queues a frame given as its header and payload: both copied into the buffer, or, for a
    /// payload over [`COPY_BYTES_MAX`], the header copied and the payload queued as it is.
    pub(crate) fn queue_parts(&mut self, header: &Header, payload: &Bytes) {
        let mut header = *header;
        // Saturating only for a payload over 4 GiB; the peer then refuses it as too long.
        header.payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.queue_encoded(&header.to_bytes(), payload);
    }

    /// Queues a frame the owner lends ([`Owner::poll_transmit_ref`]): its header written
    /// stamped straight from the owner's, with no copy of the header first.
    ///
    /// [`Owner::poll_transmit_ref`]: crate::owner::Owner::poll_transmit_ref
    pub(crate) fn queue_transmit(&mut self, t: &Transmit<'_>) {
        if t.payload.len() <= COPY_BYTES_MAX {
            // Header and payload written into `tail` together (one reservation).
            self.before_queue(t.payload.len());
            t.header
                .encode_stamped_into(&mut self.tail, t.msg_id, t.priority, t.payload);
        } else {
            self.queue_encoded(&t.header_bytes(), t.payload);
        }
    }

    /// Queues a frame as its encoded header (`payload_len` set) and its payload.
    fn queue_encoded(&mut self, header: &[u8; HEADER_LEN], payload: &Bytes) {
        self.before_queue(payload.len());
        self.tail.extend_from_slice(header);
        if payload.len() <= COPY_BYTES_MAX {
            self.tail.extend_from_slice(payload);
        } else {
            self.seal_tail();
            self.out.push_back(payload.clone());
        }
    }

    /// What queueing a frame of `payload_len` bytes does before its bytes go in: the unwritten
    /// rest moved to the front if it is time, and the counts.
    fn before_queue(&mut self, payload_len: usize) {
        if self.tail_at > 0 {
            // After a short write: move the unwritten rest to the front once it is small beside
            // what was written (at most a quarter of a byte moved per byte written), or once a
            // whole OUT_BYTES_MAX is written (which bounds the buffer to about twice that).
            let rest = self.tail.len().saturating_sub(self.tail_at);
            if rest.saturating_mul(4) <= self.tail_at || self.tail_at >= OUT_BYTES_MAX {
                self.tail.drain(..self.tail_at);
                self.tail_at = 0;
            }
        }
        self.queued_since_tick = true;
        self.out_bytes += HEADER_LEN + payload_len;
    }

    /// Bytes queued and not yet written.
    pub(crate) fn unwritten(&self) -> usize {
        self.out_bytes
    }

    /// The housekeeping tick: a connection that queued nothing since the last one and has
    /// nothing left to write gives its buffer back (an idle peer holds no megabyte).
    pub(crate) fn tick(&mut self) {
        if !std::mem::take(&mut self.queued_since_tick) && self.out_bytes == 0 {
            self.tail = Vec::new();
            self.tail_at = 0;
        }
    }

    /// Turns what `tail` holds unwritten into a chunk of `out`.
    fn seal_tail(&mut self) {
        if self.tail_at < self.tail.len() {
            let mut tail = std::mem::take(&mut self.tail);
            if self.tail_at > 0 {
                tail.drain(..self.tail_at);
            }
            self.out.push_back(Bytes::from(tail));
        } else {
            self.tail.clear();
        }
        self.tail_at = 0;
    }

    /// The durability of a run of pending frames is known: see [`resolve_run`]. The ACK then
    /// advances over the durable prefix.
    pub(crate) fn resolve_run(
        &mut self,
        first: u64,
        last: u64,
        ring: u16,
        durable: bool,
        refused: &mut Vec<u64>,
    ) {
        if let Some(through) = resolve_run(&mut self.pending, first, last, ring, durable, refused) {
            self.ack_due = Some(through);
        }
    }

    /// Queues the ACK that is due, if any.
    pub(crate) fn queue_ack(&mut self) {
        if let Some(id) = self.ack_due.take() {
            self.queue(&Frame::ack(id));
        }
    }

    /// Writes as much as the socket takes: one `write` of the buffer when there are no chunks
    /// (the common case), else one `writev` of the chunks and the buffer. `Ok(true)` when
    /// everything queued is written.
    pub(crate) fn flush(&mut self) -> io::Result<bool> {
        // A node whose lease may have passed to another writes nothing to a peer, not even what
        // is buffered; the worker's housekeeping tries again once the gate is open.
        if !self.gate.may_act() {
            return Ok(false);
        }
        loop {
            let written = if self.out.is_empty() {
                let Some(rest) = self.tail.get(self.tail_at..) else {
                    // Cannot happen (`tail_at` never passes the end); start the buffer afresh.
                    self.tail.clear();
                    self.tail_at = 0;
                    return Ok(true);
                };
                if rest.is_empty() {
                    self.tail.clear();
                    self.tail_at = 0;
                    return Ok(true);
                }
                self.stream.write(rest)
            } else {
                // On the stack: no allocation per write.
                let mut slices = [IoSlice::new(&[]); WRITE_SLICES_MAX + 1];
                let mut count = 0;
                for (slot, chunk) in slices.iter_mut().zip(self.out.iter()) {
                    *slot = IoSlice::new(chunk);
                    count += 1;
                }
                if count < WRITE_SLICES_MAX {
                    if let (Some(slot), Some(rest)) =
                        (slices.get_mut(count), self.tail.get(self.tail_at..))
                    {
                        *slot = IoSlice::new(rest);
                        count += 1;
                    }
                }
                // `count` is at most WRITE_SLICES_MAX + 1, so `get` always finds the slices.
                let filled = slices.get(..count).unwrap_or_default();
                self.stream.write_vectored(filled)
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn consume(&mut self, mut written: usize) {
        self.out_bytes = self.out_bytes.saturating_sub(written);
        while written > 0 {
            let Some(front) = self.out.front_mut() else {
                // The rest was from `tail`.
                self.tail_at = (self.tail_at + written).min(self.tail.len());
                break;
            };
            if front.len() <= written {
                written -= front.len();
                self.out.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(frames: &[(u64, u16)]) -> VecDeque<Pending> {
        frames
            .iter()
            .map(|&(msg_id, ring)| Pending {
                msg_id,
                ring,
                done: false,
            })
            .collect()
    }

    fn left(p: &VecDeque<Pending>) -> Vec<(u64, bool)> {
        p.iter().map(|p| (p.msg_id, p.done)).collect()
    }

    #[test]
    fn a_run_marks_only_its_rings_frames_and_the_ack_waits_for_the_oldest() {
        // 1, 3, 4 went through ring 0; 2 and 5 through ring 1.
        let mut p = pending(&[(1, 0), (2, 1), (3, 0), (4, 0), (5, 1)]);
        let mut refused = Vec::new();
        // Ring 1's run 2-5 is durable first: nothing is ACKed, 1 is not.
        assert_eq!(resolve_run(&mut p, 2, 5, 1, true, &mut refused), None);
        assert_eq!(
            left(&p),
            [(1, false), (2, true), (3, false), (4, false), (5, true)]
        );
        // Ring 0's run 1-4: everything up to 5 may be ACKed.
        assert_eq!(resolve_run(&mut p, 1, 4, 0, true, &mut refused), Some(5));
        assert!(p.is_empty());
        assert!(refused.is_empty());
    }

    #[test]
    fn a_refused_run_takes_out_its_undecided_frames_and_names_them() {
        let mut p = pending(&[(1, 0), (2, 0), (3, 1), (4, 0), (6, 0)]);
        let mut refused = Vec::new();
        // 2 was decided durable alone before (a throttled alert).
        assert_eq!(resolve_run(&mut p, 2, 2, 0, true, &mut refused), None);
        // The run 1-4 of ring 0 is refused: 1 and 4, not 2 (decided) nor 3 (ring 1) nor 6.
        assert_eq!(resolve_run(&mut p, 1, 4, 0, false, &mut refused), Some(2));
        assert_eq!(refused, [1, 4]);
        assert_eq!(left(&p), [(3, false), (6, false)]);
    }

    #[test]
    fn a_run_for_frames_no_longer_pending_changes_nothing() {
        let mut p = pending(&[(7, 0), (8, 0)]);
        let mut refused = Vec::new();
        assert_eq!(resolve_run(&mut p, 1, 6, 0, true, &mut refused), None);
        assert_eq!(resolve_run(&mut p, 9, 12, 0, false, &mut refused), None);
        assert_eq!(left(&p), [(7, false), (8, false)]);
        assert!(refused.is_empty());
    }
}

//! One peer connection inside a worker: its socket, its frame decoder, and its queue of
//! outgoing byte chunks, written with vectored writes (many frames per syscall, payloads never
//! copied: a frame goes out as its 64 header bytes and its payload `Bytes`).

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::{Buf, Bytes, BytesMut};
use mio::net::TcpStream;

use super::shared::PeerRef;
use crate::wire::{Frame, FrameDecoder, HEADER_LEN};
use crate::Nanos;

/// Most chunks handed to one `writev` (Linux's `IOV_MAX` is 1024; 64 already moves hundreds of
/// kilobytes of small frames per call).
const WRITE_SLICES_MAX: usize = 64;

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
    pub stream: TcpStream,
    pub decoder: FrameDecoder,
    pub peer: PeerRef,
    pub addr: std::net::SocketAddr,
    out: VecDeque<Bytes>,
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
    /// Data frames taken, in msg_id order, waiting to be durable (`false`) or durable (`true`):
    /// the cumulative ACK advances over the durable prefix only.
    pub pending: VecDeque<(u64, bool)>,
    /// A frame that did not fit its owner's ring: (owner, ring level, envelope). While it is
    /// here, nothing more is read from this connection.
    pub stalled: Option<(usize, crate::ids::Level, Box<super::shared::Envelope>)>,
}

impl Conn {
    pub(crate) fn new(
        stream: TcpStream,
        decoder: FrameDecoder,
        peer: PeerRef,
        addr: std::net::SocketAddr,
        now: Nanos,
        id: u64,
    ) -> Conn {
        Conn {
            stream,
            decoder,
            peer,
            addr,
            out: VecDeque::new(),
            out_bytes: 0,
            last_rx: now,
            last_msg_id: 0,
            ack_due: None,
            state: ConnState::Open,
            write_shut: false,
            id,
            pending: VecDeque::new(),
            stalled: None,
        }
    }

    /// Whether the scheduler may hand this connection more frames.
    pub(crate) fn has_room(&self) -> bool {
        self.state == ConnState::Open && self.out_bytes < OUT_BYTES_MAX
    }

    fn push_chunk(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.out_bytes += chunk.len();
            self.out.push_back(chunk);
        }
    }

    /// Queues a frame; the header is encoded into `scratch` (a worker-wide buffer, split off so
    /// that many headers share one allocation) and the payload is queued as is.
    pub(crate) fn queue(&mut self, frame: &Frame, scratch: &mut BytesMut) {
        if scratch.capacity() - scratch.len() < HEADER_LEN {
            scratch.reserve(HEADER_LEN * 1024);
        }
        scratch.extend_from_slice(&frame.header_bytes());
        let header = scratch.split().freeze();
        self.push_chunk(header);
        self.push_chunk(frame.payload.clone());
    }

    /// A pending frame's durability is known: `true` durable, `false` refused. Returns whether
    /// the frame was pending here. Then advances the ACK over the durable prefix.
    pub(crate) fn resolve(&mut self, msg_id: u64, durable: bool) -> bool {
        let i = self.pending.partition_point(|(m, _)| *m < msg_id);
        let found = match self.pending.get_mut(i) {
            Some((m, done)) if *m == msg_id => {
                *done = durable;
                true
            }
            _ => false,
        };
        if found && !durable {
            self.pending.remove(i);
        }
        while let Some(&(m, true)) = self.pending.front() {
            self.ack_due = Some(m);
            self.pending.pop_front();
        }
        found
    }

    /// Queues the ACK that is due, if any.
    pub(crate) fn queue_ack(&mut self, scratch: &mut BytesMut) {
        if let Some(id) = self.ack_due.take() {
            self.queue(&Frame::ack(id), scratch);
        }
    }

    /// Writes as much as the socket takes. `Ok(true)` when everything queued is written.
    pub(crate) fn flush(&mut self) -> io::Result<bool> {
        while !self.out.is_empty() {
            // On the stack: no allocation per write.
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES_MAX];
            let mut count = 0;
            for (slot, chunk) in slices.iter_mut().zip(self.out.iter()) {
                *slot = IoSlice::new(chunk);
                count += 1;
            }
            // `count` is at most WRITE_SLICES_MAX (the zip stops there), so `get` always finds
            // the slices; were it not to, the empty write below would end as WriteZero.
            let filled = slices.get(..count).unwrap_or_default();
            let written = match self.stream.write_vectored(filled) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.consume(written);
        }
        Ok(true)
    }

    fn consume(&mut self, mut written: usize) {
        self.out_bytes -= written;
        while written > 0 {
            let Some(front) = self.out.front_mut() else {
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

//! A worker's intake: reading frames from its connections, checking them, giving them their
//! level (the owner's intake half) and handing them to the rings of their receivers' owners,
//! then ACKing them (at once with durability `none`, else once their owner has made them
//! durable). A full ring stalls the connection: it is not read until its frame goes in.

use std::io;

use super::Worker;
use crate::conn::ConnState;
use crate::limits::READS_PER_TURN_MAX;
use crate::owner::{Destination, Envelope, PeerRef, Ticket};
use crate::wire::{Frame, Kind, NackReason};

impl Worker {
    pub(super) fn on_readable(&mut self, slot: usize) {
        for _ in 0..READS_PER_TURN_MAX {
            if !self.process_frames(slot) {
                return;
            }
            let now = self.now();
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if conn.stalled.is_some() {
                // Not a byte more until the held frame is in its ring (`retry_stalled`).
                return self.flush_acks(slot);
            }
            match conn.decoder.fill_from(&mut conn.stream, usize::MAX) {
                Ok(0) => {
                    // The peer closed; whatever it sent before is processed (and ACKed).
                    self.process_frames(slot);
                    self.flush_acks(slot);
                    return self.close(slot, "closed by the peer");
                }
                Ok(_) => conn.last_rx = now,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.process_frames(slot);
                    self.flush_acks(slot);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let reason = format!("read failed: {e}");
                    return self.close(slot, &reason);
                }
            }
        }
        // Budget spent with data left: finish this batch, come back next turn.
        if self.process_frames(slot) {
            self.flush_acks(slot);
            self.more_to_read.push(slot);
        }
    }
    /// Retries the frames held back by a full ring; a connection whose frame went in carries
    /// on reading.
    pub(super) fn retry_stalled(&mut self) {
        for slot in std::mem::take(&mut self.stalled) {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let Some((owner, level, envelope)) = conn.stalled.take() else {
                continue;
            };
            let msg_id = envelope.frame.header.msg_id;
            let durable = envelope.ticket.is_some();
            let Some(link) = self.shared.workers.get(owner) else {
                continue;
            };
            match crate::push(link, level, *envelope) {
                Ok(()) => {
                    if durable {
                        conn.pending.push_back((msg_id, false));
                    } else {
                        conn.ack_due = Some(msg_id);
                    }
                    self.on_readable(slot);
                }
                Err(envelope) => {
                    conn.stalled = Some((owner, level, envelope));
                    self.stalled.push(slot);
                }
            }
        }
    }
    pub(super) fn flush_acks(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            if conn.state == ConnState::Open {
                conn.queue_ack(&mut self.scratch);
            }
        }
        self.on_writable(slot);
    }
    /// Handles every complete frame buffered on a connection. `false` when the connection is
    /// gone.
    pub(super) fn process_frames(&mut self, slot: usize) -> bool {
        loop {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return false;
            };
            if conn.state != ConnState::Open || conn.stalled.is_some() {
                return true;
            }
            match conn.decoder.next_frame() {
                Ok(None) => return true,
                Ok(Some(frame)) => self.on_frame(slot, frame),
                Err(e) => {
                    tracing::info!(addr = %conn.addr, error = %e, "malformed frame; closing the connection");
                    self.close_with(slot, e.msg_id, NackReason::Malformed, &e.to_string());
                    return true;
                }
            }
        }
    }
    pub(super) fn nack(&mut self, slot: usize, msg_id: u64, reason: NackReason, detail: &str) {
        self.owner.counters().nack(reason);
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            conn.queue(&Frame::nack(msg_id, reason, detail), &mut self.scratch);
        }
    }
    pub(super) fn on_frame(&mut self, slot: usize, frame: Frame) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let peer = conn.peer;
        let kind = frame.header.kind;
        let msg_id = frame.header.msg_id;
        if kind.is_data() {
            if msg_id <= conn.last_msg_id {
                let detail = format!(
                    "msg_id {msg_id} does not increase (last was {})",
                    conn.last_msg_id
                );
                return self.close_with(slot, msg_id, NackReason::Malformed, &detail);
            }
            conn.last_msg_id = msg_id;
        }
        match (peer, kind) {
            (PeerRef::Csp(_), Kind::Ack) => self.on_link_ack(slot, msg_id),
            (_, Kind::Ack) => self.owner.on_peer_ack(peer, msg_id),
            (_, Kind::Ping) => {
                let mut pong = Frame::pong();
                pong.header.msg_id = msg_id;
                conn.queue(&pong, &mut self.scratch);
            }
            (_, Kind::Pong) => {}
            (PeerRef::Su(su), Kind::Request) => self.on_request(slot, su, frame),
            (PeerRef::Csp(_), Kind::Response | Kind::DeviceAlert | Kind::DccAlert) => {
                self.on_northbound(slot, frame)
            }
            (PeerRef::Su(_), _) => {
                let detail = format!("{kind} is not accepted from a Service User");
                self.nack(slot, msg_id, NackReason::UnexpectedKind, &detail);
            }
            (PeerRef::Csp(_), _) => {
                let detail = format!("{kind} is not accepted from a CSP");
                self.nack(slot, msg_id, NackReason::UnexpectedKind, &detail);
            }
        }
    }
    /// A REQUEST from Service User `su` (southbound, ENGINE.md §5): checked, admitted and given
    /// its level by the owner (this worker owns the SU), and handed to the CSP's owner.
    pub(super) fn on_request(&mut self, slot: usize, su: u32, mut frame: Frame) {
        let h = frame.header;
        let own_id = self.shared.sus.get(su as usize).map(|s| s.config.id);
        if Some(h.su_id) != own_id {
            return self.nack(
                slot,
                h.msg_id,
                NackReason::Unauthorised,
                "su_id is not this connection's Service User",
            );
        }
        let Some(csp) = self.shared.route(h.device_id) else {
            return self.nack(
                slot,
                h.msg_id,
                NackReason::UnknownDestination,
                "no CSP serves this device",
            );
        };
        let now = self.now();
        let level = match self.owner.admit_request(su, &h, &self.shared.intake, now) {
            Ok(level) => level,
            Err(reason) => {
                let detail = match reason {
                    NackReason::Throttled => {
                        "over your Service Request allocation (SECMP0067); retry later"
                    }
                    _ => "Service Request capacity reached; retry later",
                };
                return self.nack(slot, h.msg_id, reason, detail);
            }
        };
        // Senders' priorities are ignored: dsplane writes its own on the way out.
        frame.header.priority = 0;
        let Some(owner) = self.shared.owner(PeerRef::Csp(csp)) else {
            return;
        };
        self.forward(slot, owner, Destination::Southbound { csp, level }, frame);
    }
    /// Pushes a frame taken on connection `slot` into its owner's ring, and ACKs it at once
    /// (durability `none`) or once its owner has made it durable.
    pub(super) fn forward(&mut self, slot: usize, owner: usize, to: Destination, frame: Frame) {
        let ring_level = to.level();
        let msg_id = frame.header.msg_id;
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let ticket = self.shared.durable.then_some(Ticket {
            origin: self.index as u16,
            slot: slot as u32,
            conn_id: conn.id,
            msg_id,
        });
        let envelope = Envelope {
            to,
            frame,
            ticket,
            enqueued_unix_ns: self.unix_turn,
        };
        let Some(link) = self.shared.workers.get(owner) else {
            return;
        };
        if let Err(envelope) = crate::push(link, ring_level, envelope) {
            // The owner's ring is full: hold the frame and stop reading this connection until
            // it goes in, so that TCP's flow control slows the sender down (rather than
            // refusing frames that the owner will have room for a moment later).
            conn.stalled = Some((owner, ring_level, envelope));
            if !self.stalled.contains(&slot) {
                self.stalled.push(slot);
            }
            return;
        }
        match ticket {
            Some(_) => conn.pending.push_back((msg_id, false)),
            None => conn.ack_due = Some(msg_id),
        }
    }
    /// A RESPONSE or alert from a CSP (northbound, ENGINE.md §2): its level is decided here, once,
    /// and travels with it to the SU's owner (which may replace a response's by its request's).
    pub(super) fn on_northbound(&mut self, slot: usize, mut frame: Frame) {
        let h = frame.header;
        let Some(su) = self.shared.su(h.su_id) else {
            return self.nack(
                slot,
                h.msg_id,
                NackReason::UnknownDestination,
                "no such Service User",
            );
        };
        frame.header.priority = 0;
        let level = self.owner.intake_level(&h);
        let Some(owner) = self.shared.owner(PeerRef::Su(su)) else {
            return;
        };
        self.forward(slot, owner, Destination::Northbound { su, level }, frame);
    }
}

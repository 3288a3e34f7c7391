//! A worker's intake: reading frames from its connections, checking them, giving them their
//! level (the owner's intake half) and handing them to the rings of their receivers' owners,
//! then ACKing them (at once with durability `none`, else once their owner has made them
//! durable). A full ring stalls the connection: it is not read until its frame goes in.

use std::io;
use std::ops::ControlFlow;

use super::Worker;
use crate::conn::ConnState;
use crate::conn::Pending;
use crate::limits::READS_PER_TURN_MAX;
use crate::owner::{Destination, Envelope, PeerRef, Ticket};
use crate::wire::{Frame, FrameDecoder, Kind, NackReason};

impl Worker {
    pub(super) fn on_readable(&mut self, slot: usize) {
        for _ in 0..READS_PER_TURN_MAX {
            if !self.process_frames(slot) {
                return;
            }
            let now = self.turn_now;
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if !conn.stalled.is_empty() {
                // Not a byte more until the held frames are in their rings (`retry_stalled`).
                return self.flush_acks(slot);
            }
            match conn.read() {
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
    /// Retries the frames held back by full rings, in order; a connection whose frames all
    /// went in is ACKed (durability `none`) and carries on reading.
    pub(super) fn retry_stalled(&mut self) {
        for slot in std::mem::take(&mut self.stalled) {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let held = std::mem::take(&mut conn.stalled);
            // A group whose frame did not fit keeps its later frames too, to stay in order.
            let mut full: Vec<(usize, crate::ids::Level)> = Vec::new();
            for (owner, level, envelope) in held {
                if full.contains(&(owner, level)) {
                    conn.stalled.push((owner, level, envelope));
                    continue;
                }
                let Some(link) = self.shared.workers.get(owner) else {
                    continue;
                };
                if let Err(envelope) = crate::push(link, level, envelope) {
                    conn.stalled.push((owner, level, *envelope));
                    full.push((owner, level));
                }
            }
            if conn.stalled.is_empty() {
                if self.ticket_origin.is_none() {
                    conn.ack_due = Some(conn.stalled_through);
                }
                self.on_readable(slot);
            } else {
                self.stalled.push(slot);
            }
        }
    }
    pub(super) fn flush_acks(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            if conn.state == ConnState::Open {
                conn.queue_ack();
            }
        }
        self.on_writable(slot);
    }
    /// Handles every complete frame buffered on a connection, as one batch: its frames go to
    /// their owners' rings together, one bulk push per (owner, level), then the batch is ACKed
    /// (durability `none`). `false` when the connection is gone.
    pub(super) fn process_frames(&mut self, slot: usize) -> bool {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            self.hand_over(slot);
            return false;
        };
        if conn.state != ConnState::Open || !conn.stalled.is_empty() {
            self.hand_over(slot);
            return true;
        }
        let conn_id = conn.id;
        // The decoder leaves the connection for the batch, so that each frame goes to
        // `on_frame` (which takes the whole worker) as it is decoded (`decode_each`: no
        // `Result<Option<Frame>>` per frame). Nothing reads a connection's decoder meanwhile.
        // The closure is inlined into the decoder's loop (it is only the glue around `on_frame`).
        let mut decoder = std::mem::replace(&mut conn.decoder, FrameDecoder::unallocated(0));
        let decoded = decoder.decode_each(
            #[inline(always)]
            |frame| {
                self.on_frame(slot, frame);
                // The frame may have closed the connection: then the rest is not taken.
                match self.conns.get(slot).and_then(Option::as_ref) {
                    Some(conn) if conn.state == ConnState::Open && conn.stalled.is_empty() => {
                        ControlFlow::Continue(())
                    }
                    _ => ControlFlow::Break(()),
                }
            },
        );
        let open = match self.conns.get_mut(slot).and_then(Option::as_mut) {
            Some(conn) if conn.id == conn_id => {
                conn.decoder = decoder;
                if let Err(e) = decoded {
                    tracing::info!(addr = %conn.addr, error = %e, "malformed frame; closing the connection");
                    self.close_with(slot, e.msg_id, NackReason::Malformed, &e.to_string());
                }
                true
            }
            _ => false,
        };
        self.hand_over(slot);
        open
    }

    /// Hands the batch gathered in the outbox to the owners' rings: one bulk push per (owner,
    /// level), so one slot claim and one doorbell per group. Frames that do not fit are held on
    /// the connection (which is then not read until they go in); the batch's ACK (durability
    /// `none`) covers the frames before the first one held.
    pub(super) fn hand_over(&mut self, slot: usize) {
        let Some(last) = self.batch_last.take() else {
            return;
        };
        let mut held = Vec::new();
        for group in self.outbox_used.drain(..) {
            let Some(out) = self.outbox.get_mut(group) else {
                continue;
            };
            let Some(link) = self.shared.workers.get(out.owner) else {
                out.items.clear();
                continue;
            };
            crate::push_bulk(link, out.level, &mut out.items);
            held.extend(out.items.drain(..).map(|e| (out.owner, out.level, e)));
        }
        let durable = self.ticket_origin.is_some();
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if held.is_empty() {
            if !durable {
                conn.ack_due = Some(last);
            }
            return;
        }
        // Back in arrival order (msg_id order), whatever group they came from.
        held.sort_by_key(|(_, _, e)| e.frame.header.msg_id);
        if !durable {
            let first_held = held.first().map(|(_, _, e)| e.frame.header.msg_id);
            if let Some(through) = first_held.and_then(|m| m.checked_sub(1)).filter(|&t| t > 0) {
                conn.ack_due = Some(through);
            }
        }
        conn.stalled = held;
        conn.stalled_through = last;
        if !self.stalled.contains(&slot) {
            self.stalled.push(slot);
        }
    }
    pub(super) fn nack(&mut self, slot: usize, msg_id: u64, reason: NackReason, detail: &str) {
        self.owner.counters().nack(reason);
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            conn.queue(&Frame::nack(msg_id, reason, detail));
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
                conn.queue(&pong);
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
        let now = self.turn_now;
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
    /// Adds a frame taken on connection `slot` to the batch for its owner's ring ([`Self::hand_over`]
    /// pushes the batch); with durability, its ACK waits for its owner to make it durable.
    pub(super) fn forward(&mut self, slot: usize, owner: usize, to: Destination, frame: Frame) {
        let level = to.level();
        let msg_id = frame.header.msg_id;
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let group = owner * self.levels + level.index();
        // The ring's number on this worker (one per owner and level) goes in the ticket: the
        // owner's acknowledgements come back as runs of one connection and ring.
        const _: () = assert!(
            crate::config::CORES_MAX as usize * crate::ids::LEVELS_MAX as usize
                <= u16::MAX as usize + 1,
            "every ring number fits a ticket's u16"
        );
        let ring = group as u16;
        let ticket = self.ticket_origin.map(|origin| Ticket {
            origin,
            slot: slot as u32,
            conn_id: conn.id,
            msg_id,
            ring,
        });
        if ticket.is_some() {
            conn.pending.push_back(Pending {
                msg_id,
                ring,
                done: false,
            });
        }
        let envelope = Envelope {
            to,
            frame,
            ticket,
            enqueued_unix_ns: self.unix_turn,
        };
        let Some(out) = self.outbox.get_mut(group) else {
            return;
        };
        if out.items.is_empty() {
            self.outbox_used.push(group);
        }
        out.items.push(envelope);
        self.batch_last = Some(msg_id);
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

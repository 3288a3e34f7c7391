//! A CSP link's connections, which may be held by several workers (`csp.connections_max`).
//!
//! Connection k of link c is held by worker `(owner_of_csp(c) + k) % workers`, so that the
//! link's northbound intake (reading, checking, classifying, pushing into the SU owners' rings,
//! ACKing) runs on as many cores as it has connections. Southbound delivery stays the link
//! owner's: its [`Owner`](crate::owner::Owner) holds the link's queues, window and limiter, and
//! one sender state per connection (its own `msg_id` sequence and unacknowledged list, at most
//! its share of the window). For a connection held elsewhere:
//!
//! * the holder tells the owner when it opens and closes ([`Control::LinkOpened`],
//!   [`Control::LinkClosed`]); on a close, only what that connection had not acknowledged goes
//!   back to the link's queues, to be re-sent on another connection in priority order;
//! * the owner's pump hands the holder the frames for it, already stamped with their `msg_id`s,
//!   in one [`Control::LinkTransmit`] per connection per pump, and the holder writes them;
//! * the holder hands the CSP's ACKs on it back ([`Control::LinkAcks`]), at most one per
//!   connection per turn and only when it moves past what was last handed back, never beyond
//!   what the owner sent.
//!
//! Both channels stay bounded: frames on their way to a holder, or queued on its connection,
//! are in flight as far as the owner is concerned, so they are at most the connection's share
//! of the window; ACKs handed back are at most one per frame sent. A frame for a connection that
//! closed meanwhile is dropped by the holder: the owner has already put it back.
//!
//! A connection held by the owner itself is written directly, as an SU's is.

use super::{Control, PumpClock, Worker};
use crate::limits::LOADS_PER_POLL_MAX;
use crate::owner::PeerRef;
use crate::shared::LinkAck;
use crate::wire::Frame;
use crate::Nanos;

/// Where a connection of a CSP link is, as a worker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkConn {
    /// Held here, in this connection slot.
    Here(usize),
    /// Held by worker `holder`, where its connection id is `conn_id` (on the link's owner only).
    There { holder: usize, conn_id: u64 },
}

/// A CSP link connection held by this worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeldLink {
    csp: u32,
    conn: usize,
    /// Highest `msg_id` written on it: an ACK beyond it is not handed back beyond it.
    sent_max: u64,
    /// Highest ACK handed back to the owner.
    ack_forwarded: u64,
    /// Highest ACK received and not yet handed back.
    ack_due: u64,
}

impl Worker {
    fn owns_link(&self, csp: u32) -> bool {
        self.shared.owner(PeerRef::Csp(csp)) == Some(self.index)
    }

    fn link_entry(&mut self, csp: u32, conn: usize) -> Option<&mut Option<LinkConn>> {
        let conns = self.links.get_mut(csp as usize)?;
        if conns.len() <= conn {
            conns.resize(conn + 1, None);
        }
        conns.get_mut(conn)
    }

    /// Connection `conn` of link `csp` was adopted here, in `slot`, with id `conn_id`.
    pub(super) fn adopt_link(&mut self, csp: u32, conn: usize, slot: usize, conn_id: u64) {
        if self.held_links.len() <= slot {
            self.held_links.resize(slot + 1, None);
        }
        if let Some(held) = self.held_links.get_mut(slot) {
            *held = Some(HeldLink {
                csp,
                conn,
                sent_max: 0,
                ack_forwarded: 0,
                ack_due: 0,
            });
        }
        if self.owns_link(csp) {
            return self.on_link_opened(csp, conn, LinkConn::Here(slot));
        }
        if let Some(entry) = self.link_entry(csp, conn) {
            *entry = Some(LinkConn::Here(slot));
        }
        self.tell_link_owner(
            csp,
            Control::LinkOpened {
                csp,
                conn,
                holder: self.index,
                conn_id,
            },
        );
    }

    fn tell_link_owner(&self, csp: u32, control: Control) {
        let Some(link) =
            (self.shared.owner(PeerRef::Csp(csp))).and_then(|w| self.shared.workers.get(w))
        else {
            return;
        };
        if link.control.send(control).is_ok() {
            let _ = link.waker.wake();
        }
    }

    /// On the link's owner: connection `conn` opened, here or on another worker.
    pub(super) fn on_link_opened(&mut self, csp: u32, conn: usize, at: LinkConn) {
        if let Some(entry) = self.link_entry(csp, conn) {
            *entry = Some(at);
        }
        // Requests already in the ring for the link are taken in first, as for any connect.
        self.drain_ring_held();
        let now = self.now();
        self.owner.on_connect_conn(PeerRef::Csp(csp), conn, now);
    }

    /// On the link's owner: a connection held by another worker closed.
    pub(super) fn on_link_closed(&mut self, csp: u32, conn: usize, conn_id: u64) {
        let Some(entry) = self.link_entry(csp, conn) else {
            return;
        };
        if let Some(LinkConn::There { conn_id: id, .. }) = *entry {
            if id == conn_id {
                *entry = None;
                self.owner.on_disconnect_conn(PeerRef::Csp(csp), conn);
            }
        }
    }

    /// A connection slot closes: if it held a link connection, the link's owner learns it
    /// (after the last ACK it had), and the connection may be claimed again.
    pub(super) fn detach_link(&mut self, slot: usize) {
        let Some(held) = self.held_links.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let conn_id = self
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .map_or(0, |c| c.id);
        let (csp, conn) = (held.csp, held.conn);
        if let Some(entry) = self.link_entry(csp, conn) {
            *entry = None;
        }
        if self.owns_link(csp) {
            self.owner.on_disconnect_conn(PeerRef::Csp(csp), conn);
        } else {
            if held.ack_due > held.ack_forwarded {
                let ack = LinkAck {
                    csp,
                    conn,
                    conn_id,
                    msg_id: held.ack_due,
                };
                self.tell_link_owner(csp, Control::LinkAcks(vec![ack]));
            }
            self.tell_link_owner(csp, Control::LinkClosed { csp, conn, conn_id });
        }
        // Freed only once the owner has been told: a new connection in its place is held by
        // this same worker, whose LinkOpened then follows the LinkClosed on the owner's channel.
        self.shared.release_link_conn(csp, conn);
    }

    /// The CSP acknowledged `msg_id` on the link connection in `slot`.
    pub(super) fn on_link_ack(&mut self, slot: usize, msg_id: u64) {
        let Some(held) = self.held_links.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let (csp, conn) = (held.csp, held.conn);
        if self.shared.owner(PeerRef::Csp(csp)) == Some(self.index) {
            return self.owner.on_peer_ack_conn(PeerRef::Csp(csp), conn, msg_id);
        }
        // Never beyond what was written: so at most one hand-back per frame sent.
        let msg_id = msg_id.min(held.sent_max);
        if msg_id > held.ack_due {
            held.ack_due = msg_id;
        }
        if held.ack_due > held.ack_forwarded && !self.link_acks_due.contains(&slot) {
            self.link_acks_due.push(slot);
        }
    }

    /// Hands the ACKs received this turn on link connections held here to the links' owners:
    /// one message per owner.
    pub(super) fn forward_link_acks(&mut self) {
        if self.link_acks_due.is_empty() {
            return;
        }
        let mut by_owner: Vec<(usize, Vec<LinkAck>)> = Vec::new();
        for slot in std::mem::take(&mut self.link_acks_due) {
            let conn_id = self
                .conns
                .get(slot)
                .and_then(Option::as_ref)
                .map_or(0, |c| c.id);
            let Some(held) = self.held_links.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if held.ack_due <= held.ack_forwarded {
                continue;
            }
            held.ack_forwarded = held.ack_due;
            let ack = LinkAck {
                csp: held.csp,
                conn: held.conn,
                conn_id,
                msg_id: held.ack_due,
            };
            let Some(owner) = self.shared.owner(PeerRef::Csp(held.csp)) else {
                continue;
            };
            match by_owner.iter_mut().find(|(o, _)| *o == owner) {
                Some((_, acks)) => acks.push(ack),
                None => by_owner.push((owner, vec![ack])),
            }
        }
        for (owner, acks) in by_owner {
            if let Some(link) = self.shared.workers.get(owner) {
                if link.control.send(Control::LinkAcks(acks)).is_ok() {
                    let _ = link.waker.wake();
                }
            }
        }
    }

    /// On the link's owner: ACKs from the workers holding its other connections.
    pub(super) fn on_link_acks(&mut self, acks: &[LinkAck]) {
        for ack in acks {
            let Some(Some(LinkConn::There { conn_id, .. })) = self
                .links
                .get(ack.csp as usize)
                .and_then(|c| c.get(ack.conn))
            else {
                continue;
            };
            if *conn_id == ack.conn_id {
                self.owner
                    .on_peer_ack_conn(PeerRef::Csp(ack.csp), ack.conn, ack.msg_id);
            }
        }
    }

    /// On the holder: frames from the link's owner for a connection held here.
    pub(super) fn on_link_transmit(
        &mut self,
        csp: u32,
        conn: usize,
        conn_id: u64,
        frames: &[Frame],
    ) {
        let Some(Some(LinkConn::Here(slot))) =
            self.links.get(csp as usize).and_then(|c| c.get(conn))
        else {
            // Closed meanwhile: the owner has put these frames back in the link's queues.
            return;
        };
        let slot = *slot;
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.id != conn_id {
            return;
        }
        for frame in frames {
            c.queue(frame);
        }
        if let (Some(held), Some(last)) = (
            self.held_links.get_mut(slot).and_then(Option::as_mut),
            frames.last(),
        ) {
            held.sent_max = held.sent_max.max(last.header.msg_id);
        }
        self.on_writable(slot);
    }

    /// The connections of link `csp` that may take a frame now: those held here with room in
    /// their output, and every one held elsewhere (whose share of the window bounds them).
    fn link_room(&self, csp: u32) -> u64 {
        let Some(conns) = self.links.get(csp as usize) else {
            return 0;
        };
        let mut room = 0u64;
        for (k, at) in conns.iter().enumerate().take(64) {
            let free = match at {
                Some(LinkConn::Here(slot)) => self
                    .conns
                    .get(*slot)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.has_room()),
                Some(LinkConn::There { .. }) => true,
                None => false,
            };
            if free {
                room |= 1 << k;
            }
        }
        room
    }

    /// On the link's owner: moves the link's next requests to its connections while they have
    /// room, as [`Worker::pump`] does for one connection (the clock read again when the link's
    /// bucket runs dry mid-pump, the same way); before each load from the SURB, what was handed
    /// out is written (or handed to its holder) first. Frames for a connection on this worker
    /// are copied from the owner's (no reference count); those for another worker's are cloned
    /// to cross to it.
    pub(super) fn pump_link(&mut self, csp: u32, now: Nanos) {
        let peer = PeerRef::Csp(csp);
        if !self.owns_link(csp)
            || self
                .links
                .get(csp as usize)
                .is_none_or(|c| c.iter().all(Option::is_none))
        {
            return;
        }
        let mut clock = PumpClock::new(now);
        for _ in 0..LOADS_PER_POLL_MAX {
            let mut written = 0u64;
            let mut outbox: Vec<(usize, Vec<Frame>)> = Vec::new();
            // Connections with room, kept up to date as frames are queued (only the one just
            // queued to can have filled up).
            let mut room = self.link_room(csp);
            loop {
                while room != 0 {
                    let Some((k, t)) =
                        self.owner
                            .poll_transmit_to_ref(peer, room, clock.now, self.unix_turn)
                    else {
                        break;
                    };
                    let at = self.links.get(csp as usize).and_then(|c| c.get(k)).copied();
                    match at.flatten() {
                        Some(LinkConn::Here(slot)) => {
                            match self.conns.get_mut(slot).and_then(Option::as_mut) {
                                Some(c) => {
                                    c.queue_transmit(&t);
                                    written |= 1 << k;
                                    if !c.has_room() {
                                        room &= !(1 << k);
                                    }
                                }
                                None => room &= !(1 << k),
                            }
                        }
                        Some(LinkConn::There { .. }) => {
                            let frame = Frame {
                                header: t.stamped(),
                                payload: t.payload.clone(),
                            };
                            match outbox.iter_mut().find(|(c, _)| *c == k) {
                                Some((_, frames)) => frames.push(frame),
                                None => outbox.push((k, vec![frame])),
                            }
                        }
                        // Cannot happen (the owner picks open connections only, and this table
                        // follows them); if it did, the frame goes back rather than be lost.
                        None => {
                            self.owner.on_disconnect_conn(peer, k);
                            room &= !(1 << k);
                        }
                    }
                }
                let going = (written != 0 || !outbox.is_empty()) && room != 0;
                if !clock.carry_on(self.owner.rate_blocked_until(), going, || self.shared.now()) {
                    break;
                }
            }
            for k in 0..64usize {
                if written & (1 << k) != 0 {
                    if let Some(Some(LinkConn::Here(slot))) =
                        self.links.get(csp as usize).and_then(|c| c.get(k)).copied()
                    {
                        self.on_writable(slot);
                    }
                }
            }
            for (k, frames) in outbox {
                let Some(Some(LinkConn::There { holder, conn_id })) =
                    self.links.get(csp as usize).and_then(|c| c.get(k)).copied()
                else {
                    continue;
                };
                if let Some(link) = self.shared.workers.get(holder) {
                    let transmit = Control::LinkTransmit {
                        csp,
                        conn: k,
                        conn_id,
                        frames,
                    };
                    if link.control.send(transmit).is_ok() {
                        let _ = link.waker.wake();
                    }
                }
            }
            if !self.owner.take_load_due() {
                return;
            }
        }
    }
}

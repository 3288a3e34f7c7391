//! One worker: a pinned thread with its own `mio::Poll` and the connections of the peers it
//! owns. It moves bytes; its [`Owner`] decides (classification, Alert Storm Protection, the NMS
//! and SURB tiers, scheduling, which acknowledgements may go out, expiry). Nothing here is
//! shared: other threads reach a worker only through its MPSC priority ring (frames) and its
//! control channel (connections, tickets, operator actions, and for a CSP link with connections
//! on several workers its requests and ACKs: see [`link`]), and wake it with its `mio::Waker`.
//!
//! # One turn of the loop
//!
//! 1. Poll (sleeping only when the ring is empty and nothing is ready; see the park protocol
//!    in [`crate::ring`]), until the owner's next timeout at the latest.
//! 2. Read from ready connections: every complete frame is validated, given its level (the
//!    owner's intake half), and pushed into the ring of the worker that owns its receiver, then
//!    ACKed in one cumulative ACK per read batch (durability `none`), or once its owner has made
//!    it durable. Reads are bounded per connection per turn, so one busy peer cannot starve the
//!    others; a full ring stalls the connection until its frame goes in.
//! 3. Adopt connections from the acceptor, and apply operator actions.
//! 4. Drain the ring into the owner, one log write per batch.
//! 5. Carry out the owner's events (acknowledgements to their intake workers, expiry records)
//!    and pump every connected peer: the owner's next frames, as far as
//!    [`OUT_BYTES_MAX`](super::conn::OUT_BYTES_MAX) allows, written out with vectored writes.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::io::{self, Write};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use mio::{Events, Interest, Poll, Token};

use super::conn::{Conn, ConnState};
use super::shared::{Adopt, Control, Shared};
use super::timer::{Timer, WORKER_TIMER};
use crate::ids::Level;
use crate::limits::{
    LINGER, PUMP_CLOCK_READS_MAX, READ_CHUNKS_FREE_MAX, RING_BATCHES_PER_DRAIN_MAX, RING_BATCH_MAX,
    RING_BATCH_PACING,
};
use crate::owner::{Envelope, Event, Owner, PeerRef, TicketRun};
use crate::ring;
use crate::wire::ChunkPool;
use crate::wire::{Frame, NackReason};
use crate::{Nanos, NANOS_PER_SEC};

mod intake;
mod link;

use link::{HeldLink, LinkConn};

/// Bytes a pump queues for a connection before it writes them: one `write` per this many, so
/// that the peer starts reading while the rest of the turn's frames are copied.
const WRITE_BYTES_MIN: usize = 256 * 1024;

/// The token of a worker's waker.
pub(crate) const WORKER_WAKER: Token = Token(usize::MAX);

/// Frames of one read batch for one (owner, ring level).
struct OutGroup {
    owner: usize,
    level: Level,
    items: Vec<Envelope>,
}

pub(crate) struct Worker {
    index: usize,
    poll: Poll,
    shared: Arc<Shared>,
    ring: ring::Consumer<Envelope>,
    control: Receiver<Control>,
    owner: Owner<crate::cluster::EngineLog>,
    conns: Vec<Option<Conn>>,
    /// The connection slot of each SU (by directory index), while connected.
    su_conn: Vec<Option<usize>>,
    /// Where each connection of each CSP link is (by directory index, then connection): on
    /// the link's owner, every open one (here or on another worker); elsewhere, those held here.
    links: Vec<Vec<Option<LinkConn>>>,
    /// The CSP link connection held in each connection slot, if any.
    held_links: Vec<Option<HeldLink>>,
    /// Slots of held link connections with an ACK to hand to their link's owner this turn.
    link_acks_due: Vec<usize>,
    /// Acknowledgements decided by the owner, by intake worker, to hand over.
    by_origin: Vec<Vec<(TicketRun, bool)>>,
    /// `on_tickets`' list of the slots whose ACK may have moved, and of the `msg_id`s a run
    /// refused (kept for their allocations).
    touched: Vec<usize>,
    refused: Vec<u64>,
    /// Connections whose read budget ran out with data left.
    more_to_read: Vec<usize>,
    /// Connections holding frames that did not fit their owners' rings.
    stalled: Vec<usize>,
    /// The read batch being gathered, per (owner, level): index `owner * levels + level`.
    outbox: Vec<OutGroup>,
    /// The groups of `outbox` holding frames, in the order they were first used.
    outbox_used: Vec<usize>,
    /// The last data `msg_id` added to the outbox, while it holds a batch.
    batch_last: Option<u64>,
    levels: usize,
    /// With durability, this worker's index in the tickets of the frames it takes in.
    ticket_origin: Option<u16>,
    next_conn_id: u64,
    expiry_log: Option<std::fs::File>,
    /// Monotonic time of this turn ([`Shared::now`]).
    turn_now: Nanos,
    /// Wall-clock time of this turn, ns since the Unix epoch.
    unix_turn: u64,
    /// The read chunks of this worker's connections, given back by whichever worker drops the
    /// last frame cut from one ([`ChunkPool`]).
    chunks: ChunkPool,
}

impl Worker {
    pub(crate) fn new(
        index: usize,
        poll: Poll,
        shared: Arc<Shared>,
        ring: ring::Consumer<Envelope>,
        control: Receiver<Control>,
        owner: Owner<crate::cluster::EngineLog>,
    ) -> Worker {
        let workers = shared.workers.len();
        let levels = shared.config.engine.levels;
        let durable = shared.durable;
        Worker {
            index,
            poll,
            su_conn: vec![None; shared.sus.len()],
            links: vec![Vec::new(); shared.csps.len()],
            held_links: Vec::new(),
            link_acks_due: Vec::new(),
            shared,
            ring,
            control,
            owner,
            conns: Vec::new(),
            by_origin: vec![Vec::new(); workers],
            touched: Vec::new(),
            refused: Vec::new(),
            more_to_read: Vec::new(),
            stalled: Vec::new(),
            outbox: (0..workers)
                .flat_map(|owner| {
                    (1..=levels).filter_map(move |l| {
                        Level::new(l).map(|level| OutGroup {
                            owner,
                            level,
                            items: Vec::new(),
                        })
                    })
                })
                .collect(),
            outbox_used: Vec::new(),
            batch_last: None,
            levels: usize::from(levels),
            ticket_origin: durable.then_some(index as u16),
            next_conn_id: 1,
            expiry_log: None,
            turn_now: 0,
            unix_turn: crate::unix_now(),
            chunks: ChunkPool::new(READ_CHUNKS_FREE_MAX),
        }
    }

    fn now(&self) -> Nanos {
        self.shared.now()
    }

    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut timer = Timer::from_env(self.poll.registry());
        self.owner.set_batch_wakes(timer.is_precise());
        loop {
            if self.shared.is_shutting_down() {
                self.shut_down();
                return;
            }
            let now = self.now();
            let timeout = if !self.more_to_read.is_empty() {
                Some(Duration::ZERO)
            } else {
                let mut until = self.owner.poll_timeout();
                if !self.stalled.is_empty() {
                    // A full ring drains in well under a millisecond; try again then.
                    until = until.min(now + NANOS_PER_SEC / 1000);
                }
                // Awake for a near deadline only when frames wait for their tokens.
                let spin = self.owner.rate_wake().is_some_and(|r| r <= until);
                timer.timeout(now, until, spin)
            };
            // Park protocol: announce that we may sleep, then re-check the ring, so that a
            // producer either sees us parked (and wakes us) or we see its item.
            let sleep = timeout != Some(Duration::ZERO) && self.ring.prepare_park();
            let timeout = if sleep { timeout } else { Some(Duration::ZERO) };
            let polled = self.poll.poll(&mut events, timeout);
            // The clock is read once per turn, not per frame or per read: the monotonic one for
            // the limiters, the storm windows and idle times, the wall clock for intake stamps
            // (`retention_h`, the report's day) and latency; a turn is short beside their grain.
            self.turn_now = self.now();
            self.unix_turn = crate::unix_now();
            if sleep {
                self.ring.cancel_park();
            }
            if let Err(e) = polled {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(worker = self.index, error = %e, "poll failed; worker stops");
                    return;
                }
            }
            for event in events.iter() {
                let token = event.token();
                if token == WORKER_WAKER {
                    continue;
                }
                if token == WORKER_TIMER {
                    timer.on_fired();
                    continue;
                }
                let slot = token.0;
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.on_readable(slot);
                }
                if event.is_writable() {
                    self.on_writable(slot);
                }
            }
            for slot in std::mem::take(&mut self.more_to_read) {
                self.on_readable(slot);
            }
            self.retry_stalled();
            self.forward_link_acks();
            // The ring first: what is in it entered before any reload now waiting in the control
            // channel (its level, decided at intake, travels with it). A drain takes at most
            // `RING_BATCHES_PER_DRAIN_MAX` batches: from a ring kept full, the rest waits for
            // the next turn (and meets the reload's storm thresholds and rates, not its levels).
            self.drain_ring();
            self.drain_control();
            self.drain_ring();
            let now = self.turn_now;
            let housekeeping = self.owner.handle_timeout(now, self.unix_turn);
            self.owner.resolve_durable();
            self.carry_out();
            self.pump_all(now);
            // The owner's housekeeping tick is the worker's too (idle connections, lingering
            // closes, the metrics).
            if housekeeping {
                self.housekeeping(now);
                self.publish();
            }
        }
    }

    // ---- the owner's side -------------------------------------------------------------------

    fn drain_control(&mut self) {
        let now = self.turn_now;
        while let Ok(control) = self.control.try_recv() {
            match control {
                Control::Adopt(adopt) => self.adopt(adopt),
                Control::Tickets(tickets) => self.on_tickets(&tickets),
                Control::Pause { su, paused } => self.owner.set_paused(su, paused, now),
                Control::Reload(reload) => self.owner.reload(&reload.owner, now),
                Control::Restrict(restricted) => self.owner.set_restricted(restricted, now),
                Control::LinkOpened {
                    csp,
                    conn,
                    holder,
                    conn_id,
                } => self.on_link_opened(csp, conn, LinkConn::There { holder, conn_id }),
                Control::LinkClosed { csp, conn, conn_id } => {
                    self.on_link_closed(csp, conn, conn_id)
                }
                Control::LinkAcks(acks) => self.on_link_acks(&acks),
                Control::LinkTransmit {
                    csp,
                    conn,
                    conn_id,
                    frames,
                } => self.on_link_transmit(csp, conn, conn_id, &frames),
            }
        }
    }

    fn drain_ring(&mut self) {
        self.drain_ring_up_to(RING_BATCHES_PER_DRAIN_MAX, true);
    }

    /// Takes in everything the ring holds now, for a peer that connects: its frames there belong
    /// to its backlog, and its release (with the ramp) must see them. At most twice the ring's
    /// capacity, so that intake refilling the ring meanwhile cannot hold the connect up. No
    /// pump in the middle: the release waits for the whole backlog.
    fn drain_ring_held(&mut self) {
        let held = self.ring.levels() * self.ring.capacity_per_level();
        self.drain_ring_up_to(2 * held.div_ceil(RING_BATCH_MAX) + 1, false);
    }

    /// Takes at most `batches_max` batches from the ring (see [`Drain`]). With `pace`, while a
    /// rate-limited peer waits for its tokens, the ring is taken in pieces of
    /// [`RING_BATCH_PACING`] with a clock read between them, and once the tokens are due what was
    /// taken is written and the peers are pumped then, not at the end of the turn: a bucket of
    /// 100 at 10 M/s is full again long before a batch of 1,024 has been taken and written.
    fn drain_ring_up_to(&mut self, batches_max: usize, pace: bool) {
        drain(&mut RingDrain(self), batches_max, pace);
    }

    /// Carries out what the owner decided: acknowledgements go to the workers that took the
    /// frames in (this one directly), expiry records to this worker's expiry file.
    fn carry_out(&mut self) {
        let mut any = false;
        for (run, durable) in self.owner.acks() {
            if let Some(list) = self.by_origin.get_mut(usize::from(run.first.origin)) {
                list.push((run, durable));
                any = true;
            }
        }
        while let Some(event) = self.owner.poll_event() {
            match event {
                Event::Expired(record) => self.write_expired(&record),
            }
        }
        if !any {
            return;
        }
        for origin in 0..self.by_origin.len() {
            let Some(list) = self.by_origin.get_mut(origin) else {
                continue;
            };
            if list.is_empty() {
                continue;
            }
            if origin == self.index {
                let list = std::mem::take(list);
                self.on_tickets(&list);
                if let Some(slot) = self.by_origin.get_mut(origin) {
                    // Keep the allocation for the next turn.
                    *slot = list;
                    slot.clear();
                }
            } else if let Some(link) = self.shared.workers.get(origin) {
                if link
                    .control
                    .send(Control::Tickets(std::mem::take(list)))
                    .is_ok()
                {
                    let _ = link.waker.wake();
                }
            }
        }
    }

    fn write_expired(&mut self, record: &crate::owner::ExpiredRecord) {
        if self.expiry_log.is_none() {
            let path =
                (self.shared.config.engine.data_dir).join(format!("expired-w{}.jsonl", self.index));
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                Ok(f) => self.expiry_log = Some(f),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the expiry record")
                }
            }
        }
        if let Some(f) = self.expiry_log.as_mut() {
            let mut line = serde_json::to_vec(record).unwrap_or_default();
            line.push(b'\n');
            if let Err(e) = f.write_all(&line) {
                tracing::error!(error = %e, "cannot write the expiry record");
            }
        }
    }

    /// Frames taken in on this worker's connections are durable (or refused) at their owner.
    fn on_tickets(&mut self, runs: &[(TicketRun, bool)]) {
        // Slots whose ACK may have moved (a run per batch: the list stays short).
        let mut touched = std::mem::take(&mut self.touched);
        let mut refused = std::mem::take(&mut self.refused);
        for &(run, durable) in runs {
            let ticket = run.first;
            let slot = ticket.slot as usize;
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if conn.id != ticket.conn_id {
                continue;
            }
            conn.resolve_run(
                ticket.msg_id,
                run.last_msg_id,
                ticket.ring,
                durable,
                &mut refused,
            );
            for msg_id in refused.drain(..) {
                self.owner.counters().nack(NackReason::Overloaded);
                conn.queue(&Frame::nack(
                    msg_id,
                    NackReason::Overloaded,
                    "could not be written to disk",
                ));
            }
            if !touched.contains(&slot) {
                touched.push(slot);
            }
        }
        for &slot in &touched {
            self.flush_acks(slot);
        }
        touched.clear();
        self.touched = touched;
        self.refused = refused;
    }

    fn pump_all(&mut self, now: Nanos) {
        self.owner.start_pump();
        for su in 0..self.su_conn.len() {
            if let Some(&Some(slot)) = self.su_conn.get(su) {
                self.pump(PeerRef::Su(su as u32), slot, now);
            }
        }
        for csp in 0..self.links.len() {
            self.pump_link(csp as u32, now);
        }
        // Loads from the SURB may have expired frames.
        self.carry_out();
    }

    /// Moves the owner's next frames for `peer` into its connection while it has room, and
    /// writes them out; before each load from the SURB, what was queued is written first.
    ///
    /// When the peer's bucket runs dry while frames went out, the clock is read again (at most
    /// [`PUMP_CLOCK_READS_MAX`] times): if its next tokens are due by then, the pump carries on
    /// at the later instant. A bucket of 100 tokens at 10 M/s refills in 10 µs, less than a busy
    /// turn lasts, so a pump held to the turn's clock would send one burst per turn and throw
    /// the rest of the rate away.
    fn pump(&mut self, peer: PeerRef, slot: usize, now: Nanos) {
        let mut clock = PumpClock::new(now);
        for _ in 0..crate::limits::LOADS_PER_POLL_MAX {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            let mut queued = false;
            loop {
                if conn.has_room() {
                    let mut failed = None;
                    self.owner
                        .transmit_each(peer, clock.now, self.unix_turn, |t| {
                            conn.queue_transmit(t);
                            queued = true;
                            if conn.unwritten() >= WRITE_BYTES_MIN {
                                // Start the peer reading while the rest is being copied.
                                if let Err(e) = conn.flush() {
                                    failed = Some(e);
                                    return false;
                                }
                            }
                            conn.has_room()
                        });
                    if let Some(e) = failed {
                        let reason = format!("write failed: {e}");
                        return self.close(slot, &reason);
                    }
                }
                let going = queued && conn.has_room();
                if !clock.carry_on(self.owner.rate_blocked_until(), going, || self.shared.now()) {
                    break;
                }
            }
            if queued {
                self.on_writable(slot);
            }
            if !self.owner.take_load_due() {
                return;
            }
        }
    }

    /// Publishes a copy of the owner's metrics for `/metrics`, and its alert report.
    fn publish(&mut self) {
        if let Some(report) = self.owner.take_report() {
            let mut shared = self
                .shared
                .report
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            shared.merge(&report);
        }
        let metrics = self.owner.snapshot();
        if let Ok(mut all) = self.shared.metrics.lock() {
            if let Some(slot) = all.get_mut(self.index) {
                slot.clone_from(metrics);
            }
        }
    }

    // ---- connections ------------------------------------------------------------------------

    /// An SU's one connection. A CSP link's are in `links` (it may hold several, and a second
    /// HELLO never takes one over).
    fn conn_of(&mut self, peer: PeerRef) -> Option<&mut Option<usize>> {
        match peer {
            PeerRef::Su(i) => self.su_conn.get_mut(i as usize),
            PeerRef::Csp(_) => None,
        }
    }

    fn adopt(&mut self, adopt: Adopt) {
        let Adopt {
            mut stream,
            mut decoder,
            peer,
            addr,
            link_conn,
        } = adopt;
        let slot = match self.conns.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            let name = self.shared.peer_label(peer);
            tracing::warn!(peer = %name, %addr, error = %e, "cannot register connection; closed");
            self.shared.connection_closed(peer);
            if let PeerRef::Csp(csp) = peer {
                self.shared.release_link_conn(csp, link_conn);
            }
            return;
        }
        let now = self.turn_now;
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        decoder.use_pool(self.chunks.clone());
        let gate = Arc::clone(&self.shared.gate);
        let mut conn = Conn::new(stream, decoder, peer, addr, now, id, gate);
        conn.queue(&Frame::hello_ok());
        if let Some(s) = self.conns.get_mut(slot) {
            *s = Some(conn);
        }
        // A second HELLO for the same peer takes over: the old connection is closed and what it
        // had not acknowledged goes back to the front of the queues, to be re-sent here.
        if let Some(old) = self.conn_of(peer).and_then(|c| *c) {
            let reason = format!("taken over by a newer connection from {addr}");
            self.close(old, &reason);
        }
        if let PeerRef::Csp(csp) = peer {
            self.adopt_link(csp, link_conn, slot, id);
        } else {
            // Frames already in the ring for this peer belong to its backlog: take them in
            // first, so that the release (and its ramp) sees them.
            self.drain_ring_held();
            self.owner.on_connect(peer, now);
            if let Some(c) = self.conn_of(peer) {
                *c = Some(slot);
            }
        }
        let reason = match peer {
            PeerRef::Su(_) => "HELLO accepted on the SU port",
            PeerRef::Csp(_) => "HELLO accepted on the CSP port",
        };
        tracing::info!(peer = %self.shared.peer_label(peer), %addr, reason, worker = self.index, "connected");
        // Frames that came with the HELLO are already in the decoder.
        self.on_readable(slot);
    }

    /// Detaches a connection from its peer (whose unacknowledged frames go back to the queues).
    fn detach(&mut self, slot: usize) {
        let Some(peer) = self
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .map(|c| c.peer)
        else {
            return;
        };
        if let Some(c) = self.conn_of(peer) {
            if *c == Some(slot) {
                *c = None;
                self.owner.on_disconnect(peer);
            }
        }
        self.detach_link(slot);
    }

    fn peer_name(&self, peer: PeerRef) -> String {
        self.shared.peer_label(peer)
    }

    /// Closes a connection and logs why. A connection that was closing after a final NACK
    /// was logged then ([`Self::close_with`]), with that NACK's reason.
    fn close(&mut self, slot: usize, reason: &str) {
        self.detach(slot);
        if let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) {
            self.shared.connection_closed(conn.peer);
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if conn.state == ConnState::Open {
                let peer = self.peer_name(conn.peer);
                tracing::info!(%peer, addr = %conn.addr, reason, worker = self.index, "disconnected");
            }
        }
    }

    /// Sends a final NACK and closes: the peer is detached at once, its socket lingers until
    /// the NACK is written and the peer closes (or [`LINGER`] passes).
    fn close_with(&mut self, slot: usize, msg_id: u64, reason: NackReason, detail: &str) {
        // What the connection sent before goes in (and is ACKed) first.
        self.hand_over(slot);
        self.owner.counters().nack(reason);
        self.detach(slot);
        let now = self.turn_now;
        let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) else {
            return;
        };
        if conn.state == ConnState::Open {
            let peer = self.peer_name(conn.peer);
            let why = format!("NACK {reason}: {detail}");
            tracing::info!(%peer, addr = %conn.addr, reason = %why, worker = self.index, "disconnected");
        }
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        conn.queue_ack();
        conn.queue(&Frame::nack(msg_id, reason, detail));
        conn.state = ConnState::Closing {
            deadline: now + LINGER,
        };
        self.on_writable(slot);
    }

    fn on_writable(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        match conn.flush() {
            Ok(true) => {
                if matches!(conn.state, ConnState::Closing { .. }) && !conn.write_shut {
                    conn.write_shut = true;
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            Ok(false) => {}
            Err(e) => {
                let reason = format!("write failed: {e}");
                self.close(slot, &reason);
            }
        }
    }

    /// Idle connections and lingering closes.
    fn housekeeping(&mut self, now: Nanos) {
        let idle = self.shared.config.engine.idle_timeout.as_nanos() as Nanos;
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            conn.tick();
            if conn.unwritten() > 0 {
                // Output held while the gate was shut (a lease renewal late) goes now.
                self.on_writable(slot);
            }
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            match conn.state {
                ConnState::Open if now.saturating_sub(conn.last_rx) > idle => {
                    let reason = format!(
                        "idle timeout: nothing received for {} s (engine.idle_timeout_s)",
                        idle / NANOS_PER_SEC
                    );
                    self.close(slot, &reason);
                }
                ConnState::Closing { deadline } if now >= deadline => {
                    self.close(slot, "closed after a final NACK")
                }
                _ => {}
            }
        }
    }

    fn shut_down(&mut self) {
        for slot in 0..self.conns.len() {
            if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                let _ = conn.flush();
            }
            self.close(slot, "dsplane shutting down");
        }
        self.publish();
        tracing::info!(
            worker = self.index,
            frames_held = self.owner.held(),
            "worker stopped"
        );
    }
}

/// A pump's clock: the turn's instant, moved on when the peer's bucket runs dry mid-pump and a
/// fresh read of the clock finds its next tokens due (see [`Worker::pump`]); at most
/// [`PUMP_CLOCK_READS_MAX`] reads per pump.
pub(super) struct PumpClock {
    pub(super) now: Nanos,
    reads: usize,
}

impl PumpClock {
    pub(super) fn new(now: Nanos) -> PumpClock {
        PumpClock { now, reads: 0 }
    }

    /// Whether the pump carries on, at the later [`PumpClock::now`]: only if the last poll gave
    /// nothing for want of tokens (`due`, from [`Owner::rate_blocked_until`], says until when),
    /// `going` (the pump sent something and still has room), reads are left, and the tokens
    /// are due by the clock (`read_clock`, read only then).
    pub(super) fn carry_on(
        &mut self,
        due: Option<Nanos>,
        going: bool,
        read_clock: impl FnOnce() -> Nanos,
    ) -> bool {
        let Some(due) = due else {
            return false;
        };
        if !going || self.reads == PUMP_CLOCK_READS_MAX {
            return false;
        }
        self.reads += 1;
        let later = read_clock();
        if later < due {
            return false;
        }
        self.now = later;
        true
    }
}

/// What `Consumer::pop_bulk` extends with the ring's envelopes: each is taken by the owner as it
/// comes out of its slot.
struct TakeEach<'a> {
    owner: &'a mut Owner<crate::cluster::EngineLog>,
    now: Nanos,
}

impl Extend<(usize, Envelope)> for TakeEach<'_> {
    fn extend<I: IntoIterator<Item = (usize, Envelope)>>(&mut self, items: I) {
        for (_, envelope) in items {
            let _ = self.owner.take(envelope, self.now);
        }
    }
}

/// What a drain ([`drain`]) does to the worker, apart from its rules: so that the tests drive
/// the same loop over a ring and an owner of their own.
trait DrainSteps {
    /// When the tokens of a rate-limited peer waiting for them are due, if one waits.
    fn rate_wake(&mut self) -> Option<Nanos>;
    /// Takes up to `max` envelopes from the ring into the owner; how many.
    fn take(&mut self, max: usize) -> usize;
    /// The clock, read again.
    fn now(&mut self) -> Nanos;
    /// Writes what was taken and carries out the owner's decisions.
    fn commit(&mut self);
    /// Pumps every peer at `now`, the turn going on from that instant.
    fn pump(&mut self, now: Nanos);
}

/// The worker as a drain sees it.
struct RingDrain<'a>(&'a mut Worker);

impl DrainSteps for RingDrain<'_> {
    fn rate_wake(&mut self) -> Option<Nanos> {
        self.0.owner.rate_wake()
    }

    fn take(&mut self, max: usize) -> usize {
        let w = &mut *self.0;
        // Each envelope goes from its ring slot straight into `take`, not through a list.
        let mut taker = TakeEach {
            owner: &mut w.owner,
            now: w.turn_now,
        };
        w.ring.pop_bulk(&mut taker, max)
    }

    fn now(&mut self) -> Nanos {
        self.0.shared.now()
    }

    fn commit(&mut self) {
        let _ = self.0.owner.commit();
        self.0.carry_out();
    }

    fn pump(&mut self, now: Nanos) {
        // The clock only moves on.
        self.0.turn_now = now;
        self.0.pump_all(now);
    }
}

/// Takes at most `batches_max` batches from the ring, by the rules of [`Drain`]. With `pace`,
/// while a rate-limited peer waits for its tokens, the ring is taken in pieces of
/// [`RING_BATCH_PACING`] with a clock read between them, and once the tokens are due what was
/// taken is written and the peers are pumped then, not at the end of the turn: a bucket of 100
/// at 10 M/s is full again long before a batch of 1,024 has been taken and written.
fn drain(io: &mut impl DrainSteps, batches_max: usize, pace: bool) {
    let mut drain = Drain::new(batches_max);
    loop {
        let pacing = if pace { io.rate_wake() } else { None };
        let asked = drain.piece(pacing.is_some());
        let n = io.take(asked);
        let done = drain.took(n, asked);
        let pump = match pacing {
            Some(due) if !done => Some(io.now()).filter(|&now| now >= due),
            _ => None,
        };
        if drain.commit_now(done, pump.is_some()) {
            io.commit();
        }
        if let Some(now) = pump {
            io.pump(now);
        }
        if done {
            return;
        }
    }
}

/// One drain of the owner's ring ([`drain`]), apart from the ring and the
/// owner so that its rules are tested alone: how much to take next, when to write what was
/// taken ([`Owner::commit`], before any pump, since only written frames are placed), and when
/// to stop.
///
/// - A piece is a batch of [`RING_BATCH_MAX`], or [`RING_BATCH_PACING`] while a peer waits for
///   its tokens; never beyond the drain's `batches_max` batches, and never more than a batch
///   taken and not yet written.
/// - The drain stops at a short piece (the ring is empty) or at its bound: from a ring kept
///   full, the rest waits for the next turn ([`RING_BATCHES_PER_DRAIN_MAX`]).
#[derive(Debug)]
struct Drain {
    frames_max: usize,
    taken: usize,
    uncommitted: usize,
}

impl Drain {
    fn new(batches_max: usize) -> Drain {
        Drain {
            frames_max: batches_max * RING_BATCH_MAX,
            taken: 0,
            uncommitted: 0,
        }
    }

    /// How many envelopes to take next.
    fn piece(&self, pacing: bool) -> usize {
        let piece = if pacing {
            RING_BATCH_PACING
        } else {
            RING_BATCH_MAX
        };
        piece
            .min(self.frames_max - self.taken)
            .min(RING_BATCH_MAX - self.uncommitted)
    }

    /// `n` taken of `asked`; whether the drain is over.
    fn took(&mut self, n: usize, asked: usize) -> bool {
        self.taken += n;
        self.uncommitted += n;
        n < asked || self.taken >= self.frames_max
    }

    /// Whether what was taken is to be written now: at the end, before a pump, or when a whole
    /// batch waits.
    fn commit_now(&mut self, done: bool, pumping: bool) -> bool {
        let commit =
            self.uncommitted > 0 && (done || pumping || self.uncommitted >= RING_BATCH_MAX);
        if commit {
            self.uncommitted = 0;
        }
        commit
    }
}

#[cfg(test)]
mod pump_clock_tests {
    use super::*;

    #[test]
    fn a_pump_carries_on_only_for_tokens_due_and_at_most_pump_clock_reads_max_times() {
        let mut clock = PumpClock::new(100);
        let unread = || -> Nanos { panic!("the clock is read only when it may carry on") };
        // Stopped for another reason than tokens, or nothing sent, or no room: no clock read.
        assert!(!clock.carry_on(None, true, unread));
        assert!(!clock.carry_on(Some(150), false, unread));
        assert_eq!(clock.now, 100);
        // Tokens not yet due by the clock: a read spent, the instant kept.
        assert!(!clock.carry_on(Some(150), true, || 149));
        assert_eq!(clock.now, 100);
        // Due: carries on at the later instant, until the reads are spent.
        for i in 1..PUMP_CLOCK_READS_MAX {
            let later = 150 + i as Nanos;
            assert!(clock.carry_on(Some(150), true, || later), "read {i}");
            assert_eq!(clock.now, later);
        }
        assert!(!clock.carry_on(Some(150), true, unread), "reads spent");
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;

    /// A ring that holds `left` envelopes (`None`: its producers keep it full), with `pacing`
    /// and `due` saying, piece by piece, whether a peer waits for tokens and whether they are
    /// due; it records what the drain does: `Take(n)`, `Commit(frames)`, `Pump`.
    struct Fake<P, D> {
        left: Option<usize>,
        pacing: P,
        due: D,
        steps: Vec<Step>,
        uncommitted: usize,
    }

    impl<P: FnMut() -> bool, D: FnMut() -> bool> DrainSteps for Fake<P, D> {
        fn rate_wake(&mut self) -> Option<Nanos> {
            (self.pacing)().then_some(1)
        }

        fn take(&mut self, max: usize) -> usize {
            assert!(max >= 1, "a piece asks for something");
            let n = self.left.map_or(max, |l| l.min(max));
            if let Some(l) = self.left.as_mut() {
                *l -= n;
            }
            self.steps.push(Step::Take(n));
            self.uncommitted += n;
            n
        }

        fn now(&mut self) -> Nanos {
            Nanos::from((self.due)())
        }

        fn commit(&mut self) {
            let n = std::mem::take(&mut self.uncommitted);
            self.steps.push(Step::Commit(n));
        }

        fn pump(&mut self, _now: Nanos) {
            self.steps.push(Step::Pump);
        }
    }

    /// Runs the engine's drain loop over a [`Fake`] ring; what it did.
    fn drive(
        batches_max: usize,
        held: Option<usize>,
        pacing: impl FnMut() -> bool,
        due: impl FnMut() -> bool,
    ) -> Vec<Step> {
        let mut fake = Fake {
            left: held,
            pacing,
            due,
            steps: Vec::new(),
            uncommitted: 0,
        };
        drain(&mut fake, batches_max, true);
        fake.steps
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Step {
        Take(usize),
        Commit(usize),
        Pump,
    }

    fn taken(steps: &[Step]) -> usize {
        steps
            .iter()
            .map(|s| match s {
                Step::Take(n) => *n,
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn a_drain_stops_after_its_batches_even_when_the_ring_stays_full() {
        let steps = drive(RING_BATCHES_PER_DRAIN_MAX, None, || false, || false);
        let batch = [Step::Take(RING_BATCH_MAX), Step::Commit(RING_BATCH_MAX)];
        assert_eq!(steps, batch.repeat(RING_BATCHES_PER_DRAIN_MAX));
    }

    #[test]
    fn a_drain_stops_at_the_first_short_batch_or_an_empty_ring() {
        let steps = drive(8, Some(RING_BATCH_MAX + 17), || false, || false);
        assert_eq!(
            steps,
            [
                Step::Take(RING_BATCH_MAX),
                Step::Commit(RING_BATCH_MAX),
                Step::Take(17),
                Step::Commit(17),
            ]
        );
        // An empty ring: one look, nothing to write.
        assert_eq!(drive(8, Some(0), || true, || true), [Step::Take(0)]);
    }

    #[test]
    fn while_a_peer_waits_for_tokens_the_ring_is_taken_in_pieces_and_written_only_by_batches() {
        // Tokens never due: pieces of RING_BATCH_PACING, written once a whole batch waits.
        let steps = drive(2, None, || true, || false);
        let per_batch = RING_BATCH_MAX / RING_BATCH_PACING;
        let mut batch = vec![Step::Take(RING_BATCH_PACING); per_batch];
        batch.push(Step::Commit(RING_BATCH_MAX));
        assert_eq!(steps, batch.repeat(2));
    }

    #[test]
    fn tokens_due_mid_drain_have_what_was_taken_written_then_a_pump() {
        // Due after every third piece.
        let mut pieces = 0;
        let steps = drive(
            1,
            None,
            || true,
            || {
                pieces += 1;
                pieces % 3 == 0
            },
        );
        assert_eq!(
            &steps[..7],
            [
                Step::Take(RING_BATCH_PACING),
                Step::Take(RING_BATCH_PACING),
                Step::Take(RING_BATCH_PACING),
                Step::Commit(3 * RING_BATCH_PACING),
                Step::Pump,
                Step::Take(RING_BATCH_PACING),
                Step::Take(RING_BATCH_PACING),
            ]
        );
        assert_eq!(taken(&steps), RING_BATCH_MAX, "the bound holds");
        // The last piece ends the drain: written, and no pump (the turn's own follows).
        assert_eq!(
            steps.last(),
            Some(&Step::Commit(RING_BATCH_MAX % (3 * RING_BATCH_PACING)))
        );
    }

    #[test]
    fn every_drain_writes_all_it_took_before_a_pump_and_never_holds_more_than_a_batch() {
        // Pseudo-random pacing, due times and ring contents.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2_000 {
            let batches_max = 1 + (next() % 5) as usize;
            let held = match next() % 3 {
                0 => None,
                _ => Some((next() % (6 * RING_BATCH_MAX as u64)) as usize),
            };
            let seed = next();
            let mut r = seed;
            let mut bit = move || {
                r = r.rotate_left(7).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                r >> 63 == 1
            };
            let mut r2 = seed ^ 0xFFFF;
            let mut bit2 = move || {
                r2 = r2.rotate_left(11).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                r2 >> 62 == 0
            };
            let steps = drive(batches_max, held, &mut bit, &mut bit2);
            let mut uncommitted = 0;
            let mut written = 0;
            for s in &steps {
                match *s {
                    Step::Take(n) => {
                        uncommitted += n;
                        assert!(uncommitted <= RING_BATCH_MAX, "{steps:?}");
                    }
                    Step::Commit(n) => {
                        assert_eq!(n, uncommitted);
                        written += n;
                        uncommitted = 0;
                    }
                    Step::Pump => assert_eq!(uncommitted, 0, "a pump with frames unwritten"),
                }
            }
            let all = taken(&steps);
            assert_eq!(written, all, "everything taken is written by the end");
            assert!(all <= batches_max * RING_BATCH_MAX);
            let expected = held.map_or(batches_max * RING_BATCH_MAX, |h| {
                h.min(batches_max * RING_BATCH_MAX)
            });
            assert_eq!(all, expected, "a drain takes all it may");
        }
    }
}

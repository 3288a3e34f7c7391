//! One worker: a pinned thread with its own `mio::Poll`, the connections of the peers it owns,
//! their delivery schedulers and its classifier. Nothing here is shared: other threads reach a
//! worker only through its MPSC priority ring (frames) and its control channel (connections),
//! and wake it with its `mio::Waker`.
//!
//! # One turn of the loop
//!
//! 1. Poll (sleeping only when the ring is empty and nothing is ready; see the park protocol
//!    in [`crate::ring`]).
//! 2. Read from ready connections: every complete frame is validated, classified, admitted and
//!    pushed into the ring of the worker that owns its receiver, then ACKed in one cumulative
//!    ACK per read batch. Reads are bounded per connection per turn, so one busy peer cannot
//!    starve the others.
//! 3. Adopt connections from the acceptor.
//! 4. Drain the ring into the receivers' schedulers (strict priority, FIFO within a level).
//! 5. Pump every connected peer's scheduler into its connection's output, as far as its rate,
//!    its window and [`OUT_BYTES_MAX`](super::conn::OUT_BYTES_MAX) allow, and write it out with
//!    vectored writes.

use std::io;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Interest, Poll, Token};

use super::conn::{Conn, ConnState};
use super::shared::{Adopt, Control, Envelope, PeerRef, Shared};
use crate::classify::{Classifier, RequestId};
use crate::config::Scheduling;
use crate::delivery::{Blocked, DeliveryScheduler, DeliverySettings};
use crate::ids::{Level, Mode};
use crate::limiter::{ReleaseStart, TokenBucket};
use crate::ring;
use crate::wire::{Frame, Kind, NackReason};
use crate::{Nanos, NANOS_PER_SEC};

/// The token of a worker's waker.
pub(crate) const WORKER_WAKER: Token = Token(usize::MAX);
/// Reads from one connection in one turn before the others get theirs.
const READS_PER_TURN_MAX: usize = 16;
/// Envelopes taken from the ring in one go.
const RING_BATCH_MAX: usize = 1024;
/// How often idle connections, lingering closes and the in-flight table are checked.
const HOUSEKEEPING_INTERVAL: Nanos = NANOS_PER_SEC / 4;
/// How long a connection being closed is kept, half-closed, so its peer reads the last NACK.
const LINGER: Nanos = NANOS_PER_SEC;
/// In-flight requests remembered per worker for response inheritance.
const INFLIGHT_REQUESTS_MAX: usize = 1 << 20;
/// How long a request is remembered: future-dated requests are answered days later.
const INFLIGHT_AGE_MAX: Nanos = 7 * 24 * 3600 * NANOS_PER_SEC;

/// A peer this worker owns.
struct PeerState {
    sched: DeliveryScheduler<Frame>,
    /// Its connection's slot, while connected.
    conn: Option<usize>,
}

pub(crate) struct Worker {
    index: usize,
    poll: Poll,
    shared: Arc<Shared>,
    ring: ring::Consumer<Envelope>,
    control: Receiver<Control>,
    conns: Vec<Option<Conn>>,
    sus: Vec<Option<PeerState>>,
    csps: Vec<Option<PeerState>>,
    classifier: Classifier,
    origin: Instant,
    scratch: BytesMut,
    popped: Vec<(usize, Envelope)>,
    /// Connections whose read budget ran out with data left.
    more_to_read: Vec<usize>,
    /// Earliest instant a rate-limited peer may send again.
    rate_wake: Option<Nanos>,
    next_housekeeping: Nanos,
}

fn settings(shared: &Shared, window: u32, frames_max: u64) -> DeliverySettings {
    let engine = &shared.config.engine;
    let delivery = &shared.config.delivery;
    DeliverySettings {
        levels: engine.levels,
        window,
        window_reserved_top: delivery.window_reserved_top.min(window.saturating_sub(1)),
        frames_max: usize::try_from(frames_max).unwrap_or(usize::MAX),
        prioritised: engine.scheduling == Scheduling::Priority,
        release_start: delivery.release_start,
        release_ramp: delivery.release_ramp.as_nanos() as Nanos,
    }
}

impl Worker {
    pub(crate) fn new(
        index: usize,
        poll: Poll,
        shared: Arc<Shared>,
        ring: ring::Consumer<Envelope>,
        control: Receiver<Control>,
    ) -> Worker {
        let origin = Instant::now();
        let sus = shared
            .sus
            .iter()
            .map(|su| {
                (su.owner == index).then(|| {
                    let d = &su.config.delivery;
                    let mut s = settings(&shared, d.window, su.held_max);
                    s.window_reserved_top = d.window_reserved_top.min(d.window.saturating_sub(1));
                    s.release_start = d.release_start;
                    s.release_ramp = d.release_ramp.as_nanos() as Nanos;
                    let limiter = TokenBucket::new(d.rate, d.burst, 0)
                        .expect("rate and burst were validated with the configuration");
                    PeerState {
                        sched: DeliveryScheduler::new(s, limiter),
                        conn: None,
                    }
                })
            })
            .collect();
        let csps = shared
            .csps
            .iter()
            .map(|csp| {
                (csp.owner == index).then(|| {
                    let c = &csp.config;
                    let mut s = settings(&shared, c.window, csp.held_max);
                    // A CSP link is not an SU coming back from an outage: no release ramp.
                    s.release_start = ReleaseStart::FULL;
                    let limiter = TokenBucket::new(c.rate, c.burst, 0)
                        .expect("rate and burst were validated with the configuration");
                    PeerState {
                        sched: DeliveryScheduler::new(s, limiter),
                        conn: None,
                    }
                })
            })
            .collect();
        let classifier = Classifier::new(
            Arc::clone(&shared.rules),
            INFLIGHT_REQUESTS_MAX,
            INFLIGHT_AGE_MAX,
        );
        Worker {
            index,
            poll,
            shared,
            ring,
            control,
            conns: Vec::new(),
            sus,
            csps,
            classifier,
            origin,
            scratch: BytesMut::with_capacity(64 * 1024),
            popped: Vec::with_capacity(RING_BATCH_MAX),
            more_to_read: Vec::new(),
            rate_wake: None,
            next_housekeeping: 0,
        }
    }

    fn now(&self) -> Nanos {
        self.origin.elapsed().as_nanos() as Nanos
    }

    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.shared.is_shutting_down() {
                self.shut_down();
                return;
            }
            let now = self.now();
            let busy = !self.more_to_read.is_empty();
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                let until = self
                    .rate_wake
                    .map_or(self.next_housekeeping, |r| r.min(self.next_housekeeping));
                Some(Duration::from_nanos(until.saturating_sub(now)))
            };
            // Park protocol: announce that we may sleep, then re-check the ring, so that a
            // producer either sees us parked (and wakes us) or we see its item.
            let sleep = timeout != Some(Duration::ZERO) && self.ring.prepare_park();
            let timeout = if sleep { timeout } else { Some(Duration::ZERO) };
            let polled = self.poll.poll(&mut events, timeout);
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
            self.drain_control();
            self.drain_ring();
            self.pump_all();
            let now = self.now();
            if now >= self.next_housekeeping {
                self.housekeeping(now);
                self.next_housekeeping = now + HOUSEKEEPING_INTERVAL;
            }
        }
    }

    // ---- connections ------------------------------------------------------------------------

    fn drain_control(&mut self) {
        while let Ok(control) = self.control.try_recv() {
            match control {
                Control::Adopt(adopt) => self.adopt(adopt),
            }
        }
    }

    fn adopt(&mut self, adopt: Adopt) {
        let Adopt {
            mut stream,
            decoder,
            peer,
            addr,
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
            tracing::warn!(error = %e, %addr, "cannot register connection");
            return;
        }
        let now = self.now();
        let mut conn = Conn::new(stream, decoder, peer, addr, now);
        conn.queue(&Frame::hello_ok(), &mut self.scratch);
        self.conns[slot] = Some(conn);
        // A second HELLO for the same peer takes over: the old connection is closed and what it
        // had not acknowledged goes back to the front of the queues, to be re-sent here.
        if let Some(old) = self.peer_mut(peer).and_then(|p| p.conn) {
            tracing::info!(peer = %self.peer_name(peer), %addr, "takeover: closing the older connection");
            self.close(old);
        }
        // Frames already in the ring for this peer belong to its backlog: take them in first,
        // so that the release (and its ramp) sees them.
        self.drain_ring();
        if let Some(state) = self.peer_mut(peer) {
            state.sched.on_connect(now);
            state.conn = Some(slot);
        }
        tracing::info!(peer = %self.peer_name(peer), %addr, worker = self.index, "connected");
        // Frames that came with the HELLO are already in the decoder.
        self.on_readable(slot);
    }

    fn peer_mut(&mut self, peer: PeerRef) -> Option<&mut PeerState> {
        match peer {
            PeerRef::Su(i) => self.sus.get_mut(i as usize)?.as_mut(),
            PeerRef::Csp(i) => self.csps.get_mut(i as usize)?.as_mut(),
        }
    }

    fn peer_name(&self, peer: PeerRef) -> String {
        match peer {
            PeerRef::Su(i) => self.shared.sus[i as usize].config.id.to_string(),
            PeerRef::Csp(i) => self.shared.csps[i as usize].config.name.clone(),
        }
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
        if let Some(state) = self.peer_mut(peer) {
            if state.conn == Some(slot) {
                state.conn = None;
                state.sched.on_disconnect();
            }
        }
    }

    fn close(&mut self, slot: usize) {
        self.detach(slot);
        if let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            tracing::debug!(addr = %conn.addr, "connection closed");
        }
    }

    /// Sends a final NACK and closes: the peer is detached at once, its socket lingers until
    /// the NACK is written and the peer closes (or [`LINGER`] passes).
    fn close_with(&mut self, slot: usize, msg_id: u64, reason: NackReason, detail: &str) {
        self.detach(slot);
        let now = self.now();
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        conn.queue_ack(&mut self.scratch);
        conn.queue(&Frame::nack(msg_id, reason, detail), &mut self.scratch);
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
                tracing::debug!(addr = %conn.addr, error = %e, "write failed; closing");
                self.close(slot);
            }
        }
    }

    fn on_readable(&mut self, slot: usize) {
        for _ in 0..READS_PER_TURN_MAX {
            if !self.process_frames(slot) {
                return;
            }
            let now = self.now();
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            match conn.decoder.fill_from(&mut conn.stream, usize::MAX) {
                Ok(0) => {
                    // The peer closed; whatever it sent before is processed (and ACKed).
                    self.process_frames(slot);
                    self.flush_acks(slot);
                    return self.close(slot);
                }
                Ok(_) => conn.last_rx = now,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.process_frames(slot);
                    self.flush_acks(slot);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(addr = %conn.addr, error = %e, "read failed; closing");
                    return self.close(slot);
                }
            }
        }
        // Budget spent with data left: finish this batch, come back next turn.
        if self.process_frames(slot) {
            self.flush_acks(slot);
            self.more_to_read.push(slot);
        }
    }

    fn flush_acks(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            if conn.state == ConnState::Open {
                conn.queue_ack(&mut self.scratch);
            }
        }
        self.on_writable(slot);
    }

    /// Handles every complete frame buffered on a connection. `false` when the connection is
    /// gone.
    fn process_frames(&mut self, slot: usize) -> bool {
        loop {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return false;
            };
            if conn.state != ConnState::Open {
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

    fn nack(&mut self, slot: usize, msg_id: u64, reason: NackReason, detail: &str) {
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            conn.queue(&Frame::nack(msg_id, reason, detail), &mut self.scratch);
        }
    }

    fn accept_frame(&mut self, slot: usize, msg_id: u64) {
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            conn.ack_due = Some(msg_id);
        }
    }

    fn on_frame(&mut self, slot: usize, frame: Frame) {
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
            (_, Kind::Ack) => self.on_peer_ack(peer, msg_id),
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

    /// A peer acknowledged our frames up to `msg_id`: they leave its scheduler and free its
    /// admission budget.
    fn on_peer_ack(&mut self, peer: PeerRef, msg_id: u64) {
        let Some(state) = self.peer_mut(peer) else {
            return;
        };
        let released = state.sched.on_ack(msg_id, |_, _| {});
        self.shared.release(peer, released as u64);
    }

    /// A REQUEST from Service User `su` (southbound, ENGINE.md §5).
    fn on_request(&mut self, slot: usize, su: u32, mut frame: Frame) {
        let h = frame.header;
        let own_id = self.shared.sus[su as usize].config.id;
        if h.su_id != own_id {
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
        if !self.shared.admit(PeerRef::Csp(csp)) {
            return self.nack(
                slot,
                h.msg_id,
                NackReason::Overloaded,
                "southbound queue full",
            );
        }
        let now = self.now();
        let mode = Mode::from_wire(h.mode).unwrap_or(Mode::OnDemand);
        let id = RequestId {
            su: h.su_id,
            device: h.device_id,
            counter: h.counter,
        };
        let level = self.classifier.request(id, h.srv, mode, now);
        // Senders' priorities are ignored: dsplane writes its own on the way out.
        frame.header.priority = 0;
        let owner = self.shared.csps[csp as usize].owner;
        let envelope = Envelope::Southbound { csp, level, frame };
        if super::push(&self.shared.workers[owner], level, envelope).is_err() {
            self.shared.release(PeerRef::Csp(csp), 1);
            return self.nack(slot, h.msg_id, NackReason::Overloaded, "ring full");
        }
        self.accept_frame(slot, h.msg_id);
    }

    /// A RESPONSE or alert from a CSP (northbound, ENGINE.md §2).
    fn on_northbound(&mut self, slot: usize, mut frame: Frame) {
        let h = frame.header;
        let Some(su) = self.shared.su(h.su_id) else {
            return self.nack(
                slot,
                h.msg_id,
                NackReason::UnknownDestination,
                "no such Service User",
            );
        };
        if !self.shared.admit(PeerRef::Su(su)) {
            return self.nack(
                slot,
                h.msg_id,
                NackReason::Overloaded,
                "Service User's buffers are full",
            );
        }
        frame.header.priority = 0;
        // The owner classifies (a response inherits from the owner's in-flight table); the ring
        // level is the rules' view, so that urgent traffic crosses cores first.
        let provisional = self.provisional_level(&frame);
        let owner = self.shared.sus[su as usize].owner;
        if super::push(
            &self.shared.workers[owner],
            provisional,
            Envelope::Northbound { su, frame },
        )
        .is_err()
        {
            self.shared.release(PeerRef::Su(su), 1);
            return self.nack(slot, h.msg_id, NackReason::Overloaded, "ring full");
        }
        self.accept_frame(slot, h.msg_id);
    }

    fn provisional_level(&self, frame: &Frame) -> Level {
        let h = &frame.header;
        let rules = self.classifier.rules();
        match h.kind {
            Kind::DeviceAlert | Kind::DccAlert => rules.alert_level(h.alert_code),
            _ => rules
                .unknown_response_level(h.srv, Mode::from_wire(h.mode).unwrap_or(Mode::OnDemand)),
        }
    }

    // ---- queues -----------------------------------------------------------------------------

    fn drain_ring(&mut self) {
        loop {
            self.popped.clear();
            let n = self.ring.pop_bulk(&mut self.popped, RING_BATCH_MAX);
            if n == 0 {
                return;
            }
            let now = self.now();
            for (_, envelope) in std::mem::take(&mut self.popped) {
                self.deliver(envelope, now);
            }
            if n < RING_BATCH_MAX {
                return;
            }
        }
    }

    fn deliver(&mut self, envelope: Envelope, now: Nanos) {
        let (peer, level, frame) = match envelope {
            Envelope::Northbound { su, frame } => {
                let h = &frame.header;
                let level = match h.kind {
                    Kind::Response => {
                        let id = RequestId {
                            su: h.su_id,
                            device: h.device_id,
                            counter: h.counter,
                        };
                        let mode = Mode::from_wire(h.mode).unwrap_or(Mode::OnDemand);
                        self.classifier.response(id, h.srv, mode, now).0
                    }
                    Kind::DeviceAlert | Kind::DccAlert => self.classifier.alert(h.alert_code),
                    _ => self.classifier.storm_summary(),
                };
                (PeerRef::Su(su), level, frame)
            }
            Envelope::Southbound { csp, level, frame } => (PeerRef::Csp(csp), level, frame),
        };
        let Some(state) = self.peer_mut(peer) else {
            tracing::error!(?peer, "frame for a peer this worker does not own; dropped");
            self.shared.release(peer, 1);
            return;
        };
        if state.sched.enqueue(level, frame).is_err() {
            // Admission bounds what is held for a peer by its scheduler's own bound, so this
            // is a broken invariant, not an operating condition.
            tracing::error!(?peer, "scheduler full after admission; frame dropped");
            self.shared.release(peer, 1);
        }
    }

    fn pump_all(&mut self) {
        self.rate_wake = None;
        let now = self.now();
        let peers: Vec<PeerRef> = (0..self.sus.len())
            .filter(|&i| self.sus[i].as_ref().is_some_and(|s| s.conn.is_some()))
            .map(|i| PeerRef::Su(i as u32))
            .chain(
                (0..self.csps.len())
                    .filter(|&i| self.csps[i].as_ref().is_some_and(|s| s.conn.is_some()))
                    .map(|i| PeerRef::Csp(i as u32)),
            )
            .collect();
        for peer in peers {
            self.pump(peer, now);
        }
    }

    /// Moves frames from a peer's scheduler to its connection while it may send.
    fn pump(&mut self, peer: PeerRef, now: Nanos) {
        let (state, conns, scratch) = match peer {
            PeerRef::Su(i) => (
                self.sus.get_mut(i as usize).and_then(Option::as_mut),
                &mut self.conns,
                &mut self.scratch,
            ),
            PeerRef::Csp(i) => (
                self.csps.get_mut(i as usize).and_then(Option::as_mut),
                &mut self.conns,
                &mut self.scratch,
            ),
        };
        let Some(state) = state else { return };
        let Some(slot) = state.conn else { return };
        let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let mut queued = false;
        while conn.has_room() {
            match state.sched.next_send(now) {
                Ok(out) => {
                    let mut frame = out.item.clone();
                    frame.header.msg_id = out.msg_id;
                    frame.header.priority = out.level.get();
                    conn.queue(&frame, scratch);
                    queued = true;
                }
                Err(Blocked::Rate(at)) => {
                    self.rate_wake = Some(self.rate_wake.map_or(at, |w| w.min(at)));
                    break;
                }
                Err(_) => break,
            }
        }
        if queued {
            self.on_writable(slot);
        }
    }

    fn housekeeping(&mut self, now: Nanos) {
        let idle = self.shared.config.engine.idle_timeout.as_nanos() as Nanos;
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_ref() else {
                continue;
            };
            match conn.state {
                ConnState::Open if now.saturating_sub(conn.last_rx) > idle => {
                    tracing::info!(addr = %conn.addr, "idle timeout; closing");
                    self.close(slot);
                }
                ConnState::Closing { deadline } if now >= deadline => self.close(slot),
                _ => {}
            }
        }
        self.classifier.expire(now);
    }

    fn shut_down(&mut self) {
        for slot in 0..self.conns.len() {
            if let Some(conn) = self.conns[slot].as_mut() {
                let _ = conn.flush();
            }
            self.close(slot);
        }
        let held: usize = self
            .sus
            .iter()
            .chain(self.csps.iter())
            .flatten()
            .map(|p| p.sched.held())
            .sum();
        tracing::info!(worker = self.index, frames_held = held, "worker stopped");
    }
}

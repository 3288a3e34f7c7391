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

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use mio::{Events, Interest, Poll, Token};

use super::conn::{Conn, ConnState};
use super::metrics::{Outcome as Seen, PeerSnapshot, SuOutcome, WorkerMetrics};
use super::shared::{Adopt, Control, Destination, Envelope, PeerRef, Reload, Shared, Ticket};
use crate::classify::{Classifier, RequestId};
use crate::config::Scheduling;
use crate::delivery::{Blocked, DeliveryScheduler, DeliverySettings};
use crate::ids::{AlertCode, Level, Mode};
use crate::limiter::{ReleaseStart, TokenBucket};
use crate::report::{utc_day, AlertReport, Outcome};
use crate::ring;
use crate::store::{LogPos, Store, Stored};
use crate::storm::{StormDetector, StormSettings, StormSummary, Verdict};
use crate::throttle::RequestThrottle;
use crate::wal::PeerKey;
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
/// In-flight requests remembered per worker for response inheritance. An evicted request's
/// response is classified by its own SRV and mode (the same level unless the rules were
/// reloaded in between), so the bound trades little accuracy for ~100 bytes an entry: 64 Ki
/// entries is ~6.5 MiB per worker, and 7 minutes of requests at 160/s per worker.
const INFLIGHT_REQUESTS_MAX: usize = 1 << 16;
/// How long a request is remembered: future-dated requests are answered days later.
const INFLIGHT_AGE_MAX: Nanos = 7 * 24 * 3600 * NANOS_PER_SEC;
/// Spilled frames loaded back from disk at a time, per lane.
const LOAD_BATCH: usize = 256;

/// A frame waiting in memory for its peer.
#[derive(Debug)]
pub(crate) struct Held {
    frame: Frame,
    /// Its record in the log, if it has one.
    stored: Option<Stored>,
    /// When dsplane took it, ns since the Unix epoch (for `retention_h`).
    enqueued_unix_ns: u64,
}

/// A peer this worker owns.
struct PeerState {
    sched: DeliveryScheduler<Held>,
    /// Its connection's slot, while connected.
    conn: Option<usize>,
    /// Its key in the log.
    key: PeerKey,
    /// Most frames held in memory for it (its NMS share); beyond, they spill to disk.
    memory_max: usize,
    /// Paused by an operator.
    paused: bool,
    /// How long a frame may wait.
    retention: Nanos,
    /// Frames staged for memory in the batch being written (not yet in `sched`).
    staged_memory: usize,
}

/// A frame taken from the ring, written (or not) to the log, waiting for the write to succeed.
struct Staged {
    peer: PeerRef,
    level: Level,
    held: Held,
    spill: bool,
    ticket: Option<Ticket>,
}

/// The state of a peer this worker owns, borrowed from its table alone (so that the caller can
/// borrow the worker's other fields, such as the store, beside it).
fn peer_in<'a>(
    sus: &'a mut [Option<PeerState>],
    csps: &'a mut [Option<PeerState>],
    peer: PeerRef,
) -> Option<&'a mut PeerState> {
    match peer {
        PeerRef::Su(i) => sus.get_mut(i as usize)?.as_mut(),
        PeerRef::Csp(i) => csps.get_mut(i as usize)?.as_mut(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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
    scratch: BytesMut,
    popped: Vec<(usize, Envelope)>,
    /// Connections whose read budget ran out with data left.
    more_to_read: Vec<usize>,
    /// Connections holding a frame that did not fit its owner's ring.
    stalled: Vec<usize>,
    /// Earliest instant a rate-limited peer may send again.
    rate_wake: Option<Nanos>,
    next_housekeeping: Nanos,
    store: Store,
    /// Tickets of frames written, waiting for the log to be durable up to their position.
    awaiting: VecDeque<(LogPos, Ticket)>,
    staged: Vec<Staged>,
    next_conn_id: u64,
    restricted: bool,
    expiry_log: Option<std::fs::File>,
    fifo: bool,
    /// Frames staged for memory in the batch being written, all peers.
    staged_memory: usize,
    /// Wall-clock time of this turn, ns since the Unix epoch.
    unix_turn: u64,
    /// Alert Storm Protection for the SUs this worker owns.
    storm: StormDetector,
    summaries: Vec<StormSummary>,
    /// SECMP0067 allocations of the SUs this worker owns.
    throttle: RequestThrottle,
    /// Alerts seen since the last merge into the shared report.
    report: AlertReport,
    metrics: WorkerMetrics,
    /// Frames expired (the log line says the SU and level of each).
    expired: u64,
    /// Storms started, as last logged: the detector's count moving on is a storm's first alert.
    storms_seen: u64,
}

fn settings(shared: &Shared, window: u32, memory_max: u64) -> DeliverySettings {
    let engine = &shared.config.engine;
    let delivery = &shared.config.delivery;
    // The memory share decides what spills; the scheduler's own bound is a safety net above
    // it, leaving room for one load batch per lane and a window in flight.
    let frames_max = usize::try_from(memory_max)
        .unwrap_or(usize::MAX)
        .saturating_add(usize::from(engine.levels) * LOAD_BATCH + window as usize);
    DeliverySettings {
        levels: engine.levels,
        window,
        window_reserved_top: delivery.window_reserved_top.min(window.saturating_sub(1)),
        frames_max,
        prioritised: engine.scheduling == Scheduling::Priority,
        release_start: delivery.release_start,
        release_ramp: delivery.release_ramp.as_nanos() as Nanos,
    }
}

impl Worker {
    // The expects below cannot fire: every rate and burst was validated with the configuration
    // against the limiter's own limits (config re-exports them), and the storm fallback is fixed.
    #[allow(clippy::expect_used)]
    pub(crate) fn new(
        index: usize,
        poll: Poll,
        shared: Arc<Shared>,
        ring: ring::Consumer<Envelope>,
        control: Receiver<Control>,
        store: Store,
    ) -> Worker {
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
                        key: su.key,
                        memory_max: usize::try_from(su.held_max).unwrap_or(usize::MAX),
                        paused: false,
                        retention: d.retention.as_nanos() as Nanos,
                        staged_memory: 0,
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
                        key: csp.key,
                        memory_max: usize::try_from(csp.held_max).unwrap_or(usize::MAX),
                        paused: false,
                        retention: shared.config.delivery.retention.as_nanos() as Nanos,
                        staged_memory: 0,
                    }
                })
            })
            .collect();
        let storm_settings = StormSettings::from_config(
            &shared.config.alert_storm,
            shared.workers.len() as u32,
        )
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "alert storm settings refused; storms are not throttled");
            StormSettings::new(u32::MAX / 2, NANOS_PER_SEC, &[], 1)
                .expect("a fixed, valid fallback")
        });
        let storm = StormDetector::new(storm_settings, shared.now());
        let mut throttle = RequestThrottle::new();
        for (i, su) in shared.sus.iter().enumerate() {
            if su.owner == index {
                if let Err(e) = throttle.add_su(
                    i as u32,
                    su.config.sr_rate,
                    su.config.sr_burst,
                    shared.now(),
                ) {
                    tracing::error!(peer = %su.config.id, error = %e, "Service Request allocation refused");
                }
            }
        }
        let classifier = Classifier::new(
            Arc::clone(&shared.rules),
            INFLIGHT_REQUESTS_MAX,
            INFLIGHT_AGE_MAX,
        );
        let mut worker = Worker {
            index,
            poll,
            shared,
            ring,
            control,
            conns: Vec::new(),
            sus,
            csps,
            classifier,
            scratch: BytesMut::with_capacity(64 * 1024),
            popped: Vec::with_capacity(RING_BATCH_MAX),
            more_to_read: Vec::new(),
            stalled: Vec::new(),
            rate_wake: None,
            next_housekeeping: 0,
            store,
            awaiting: VecDeque::new(),
            staged: Vec::new(),
            next_conn_id: 1,
            restricted: false,
            expiry_log: None,
            fifo: false,
            staged_memory: 0,
            unix_turn: unix_now(),
            storm,
            summaries: Vec::new(),
            throttle,
            report: AlertReport::new(),
            metrics: WorkerMetrics::default(),
            expired: 0,
            storms_seen: 0,
        };
        worker.fifo = worker.shared.config.engine.scheduling == Scheduling::Fifo;
        // Frames recovered from the previous run wait on disk: count them in their lanes, so
        // that each peer's release (with its ramp) includes them, in priority order.
        let spills: Vec<(PeerKey, u8, u64)> = worker.store.spills().collect();
        let mut recovered = 0;
        for (key, lane, count) in spills {
            if let Some(state) = worker.state_by_key(key) {
                state.sched.set_spilled_lane(usize::from(lane), count);
                recovered += count;
            }
        }
        if recovered > 0 {
            tracing::info!(
                worker = index,
                frames = recovered,
                "backlog recovered from the log"
            );
        }
        worker
    }

    fn state_by_key(&mut self, key: PeerKey) -> Option<&mut PeerState> {
        self.sus
            .iter_mut()
            .chain(self.csps.iter_mut())
            .flatten()
            .find(|p| p.key == key)
    }

    fn now(&self) -> Nanos {
        self.shared.now()
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
            } else if !self.stalled.is_empty() {
                // A full ring drains in well under a millisecond; try again then.
                Some(Duration::from_millis(1))
            } else {
                let mut until = self
                    .rate_wake
                    .map_or(self.next_housekeeping, |r| r.min(self.next_housekeeping));
                if let Some(deadline) = self.storm.next_deadline() {
                    until = until.min(deadline);
                }
                Some(Duration::from_nanos(until.saturating_sub(now)))
            };
            // Park protocol: announce that we may sleep, then re-check the ring, so that a
            // producer either sees us parked (and wakes us) or we see its item.
            let sleep = timeout != Some(Duration::ZERO) && self.ring.prepare_park();
            let timeout = if sleep { timeout } else { Some(Duration::ZERO) };
            let polled = self.poll.poll(&mut events, timeout);
            // One wall-clock read per turn, not per frame: it stamps intake (`retention_h`, the
            // report's day) and measures latency, where a turn's length is below their grain.
            self.unix_turn = unix_now();
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
            self.retry_stalled();
            // The ring first: what is in it entered before any reload now waiting in the control
            // channel, and keeps the rules it entered under.
            self.drain_ring();
            self.drain_control();
            self.drain_ring();
            self.storm_summaries();
            self.resolve_tickets();
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
                Control::Tickets(tickets) => self.on_tickets(&tickets),
                Control::Pause { su, paused } => {
                    let now = self.now();
                    let restricted = self.restricted;
                    if let Some(state) = self.sus.get_mut(su as usize).and_then(Option::as_mut) {
                        state.paused = paused;
                        state.sched.set_paused(paused || restricted, now);
                    }
                }
                Control::Reload(reload) => self.reload(&reload),
                Control::Restrict(restricted) => {
                    let now = self.now();
                    self.restricted = restricted;
                    for state in self.sus.iter_mut().flatten() {
                        state.sched.set_paused(state.paused || restricted, now);
                    }
                }
            }
        }
    }

    /// Applies a reload: rules for frames classified from now on, storm thresholds and
    /// exclusions, rates. Limiters, throttles and storm windows keep their state.
    fn reload(&mut self, reload: &Reload) {
        let now = self.now();
        self.classifier.set_rules(Arc::clone(&reload.rules));
        self.storm.set_settings(reload.storm.clone(), now);
        for &(su, rate, burst, sr_rate, sr_burst) in &reload.sus {
            if let Some(state) = self.sus.get_mut(su as usize).and_then(Option::as_mut) {
                if let Err(e) = state.sched.limiter_mut().set_rate(rate, burst, now) {
                    tracing::warn!(error = %e, "reload: rate refused");
                }
                if let Err(e) = self.throttle.set_rates(su, sr_rate, sr_burst, now) {
                    tracing::warn!(error = %e, "reload: Service Request allocation refused");
                }
            }
        }
        for &(csp, rate, burst) in &reload.csps {
            if let Some(state) = self.csps.get_mut(csp as usize).and_then(Option::as_mut) {
                if let Err(e) = state.sched.limiter_mut().set_rate(rate, burst, now) {
                    tracing::warn!(error = %e, "reload: rate refused");
                }
            }
        }
    }

    /// Windows that closed with throttled alerts: one STORM_SUMMARY per key, at the lowest
    /// level, through the same path as any frame.
    fn storm_summaries(&mut self) {
        let now = self.now();
        if self.storm.next_deadline().is_none_or(|d| d > now) {
            return;
        }
        self.summaries.clear();
        let mut out = std::mem::take(&mut self.summaries);
        self.storm.poll_summaries(now, &mut out);
        let unix = unix_now();
        for summary in out.drain(..) {
            let Some(entry) = self.shared.sus.get(summary.su as usize) else {
                continue;
            };
            let mut h = crate::wire::Header::new(Kind::StormSummary);
            h.su_id = entry.config.id;
            h.device_id = summary.device;
            h.alert_code = summary.code;
            h.counter = summary.count;
            h.created_ns = unix;
            tracing::info!(peer = %entry.config.id, device = %summary.device, alert_code = %AlertCode(summary.code), count = summary.count, early = summary.early, "alert storm summary: one STORM_SUMMARY stands for the alerts throttled in the window");
            let envelope = Envelope {
                to: Destination::Northbound { su: summary.su },
                frame: Frame {
                    header: h,
                    payload: bytes::Bytes::new(),
                },
                ticket: None,
                enqueued_unix_ns: unix,
            };
            self.stage(envelope, now);
        }
        self.summaries = out;
        self.commit_staged();
    }

    /// Frames taken in on this worker's connections are durable (or refused) at their owner.
    fn on_tickets(&mut self, tickets: &[(Ticket, bool)]) {
        let mut touched = Vec::new();
        for &(ticket, durable) in tickets {
            let slot = ticket.slot as usize;
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if conn.id != ticket.conn_id {
                continue;
            }
            if conn.resolve(ticket.msg_id, durable) && !durable {
                self.metrics.nack(NackReason::Overloaded);
                conn.queue(
                    &Frame::nack(
                        ticket.msg_id,
                        NackReason::Overloaded,
                        "could not be written to disk",
                    ),
                    &mut self.scratch,
                );
            }
            if !touched.contains(&slot) {
                touched.push(slot);
            }
        }
        for slot in touched {
            self.flush_acks(slot);
        }
    }

    /// Hands the tickets of frames now durable back to the workers that took them in.
    fn resolve_tickets(&mut self) {
        if self.awaiting.is_empty() {
            return;
        }
        let mut by_origin: Vec<Vec<(Ticket, bool)>> = vec![Vec::new(); self.shared.workers.len()];
        if self.store.flush_failed() {
            // fdatasync failed: what it covered cannot be trusted to be on disk (the kernel may
            // have dropped the pages), so none of it is ACKed; the senders get NACK 5 and may
            // retry, and the operator has the log line.
            for (_, ticket) in self.awaiting.drain(..) {
                if let Some(list) = by_origin.get_mut(usize::from(ticket.origin)) {
                    list.push((ticket, false));
                }
            }
            return self.send_tickets(by_origin);
        }
        let durable = self.store.durable_pos();
        while let Some(&(pos, ticket)) = self.awaiting.front() {
            if pos > durable {
                break;
            }
            self.awaiting.pop_front();
            if let Some(list) = by_origin.get_mut(usize::from(ticket.origin)) {
                list.push((ticket, true));
            }
        }
        self.send_tickets(by_origin);
    }

    /// Hands one ticket back (a throttled alert, a refused frame): no per-worker lists.
    fn send_ticket(&mut self, ticket: Ticket, durable: bool) {
        let origin = usize::from(ticket.origin);
        if origin == self.index {
            self.on_tickets(&[(ticket, durable)]);
        } else if let Some(link) = self.shared.workers.get(origin) {
            if link
                .control
                .send(Control::Tickets(vec![(ticket, durable)]))
                .is_ok()
            {
                let _ = link.waker.wake();
            }
        }
    }

    fn send_tickets(&mut self, by_origin: Vec<Vec<(Ticket, bool)>>) {
        for (origin, list) in by_origin.into_iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            if origin == self.index {
                self.on_tickets(&list);
            } else {
                if let Some(link) = self.shared.workers.get(origin) {
                    if link.control.send(Control::Tickets(list)).is_ok() {
                        let _ = link.waker.wake();
                    }
                }
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
        let adopt_peer = peer;
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
            let peer = self.peer_name(peer);
            tracing::warn!(%peer, %addr, error = %e, "cannot register connection; closed");
            self.shared.connection_closed(adopt_peer);
            return;
        }
        let now = self.now();
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let mut conn = Conn::new(stream, decoder, peer, addr, now, id);
        conn.queue(&Frame::hello_ok(), &mut self.scratch);
        if let Some(s) = self.conns.get_mut(slot) {
            *s = Some(conn);
        }
        // A second HELLO for the same peer takes over: the old connection is closed and what it
        // had not acknowledged goes back to the front of the queues, to be re-sent here.
        if let Some(old) = self.peer_mut(peer).and_then(|p| p.conn) {
            let reason = format!("taken over by a newer connection from {addr}");
            self.close(old, &reason);
        }
        // Frames already in the ring for this peer belong to its backlog: take them in first,
        // so that the release (and its ramp) sees them.
        self.drain_ring();
        if let Some(state) = self.peer_mut(peer) {
            state.sched.on_connect(now);
            state.conn = Some(slot);
        }
        let reason = match peer {
            PeerRef::Su(_) => "HELLO accepted on the SU port",
            PeerRef::Csp(_) => "HELLO accepted on the CSP port",
        };
        tracing::info!(peer = %self.peer_name(peer), %addr, reason, worker = self.index, "connected");
        // Frames that came with the HELLO are already in the decoder.
        self.on_readable(slot);
    }

    fn peer_mut(&mut self, peer: PeerRef) -> Option<&mut PeerState> {
        peer_in(&mut self.sus, &mut self.csps, peer)
    }

    fn peer_name(&self, peer: PeerRef) -> String {
        self.shared.peer_label(peer)
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
        self.metrics.nack(reason);
        self.detach(slot);
        let now = self.now();
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
                let reason = format!("write failed: {e}");
                self.close(slot, &reason);
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
    fn retry_stalled(&mut self) {
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
            match super::push(link, level, *envelope) {
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

    fn nack(&mut self, slot: usize, msg_id: u64, reason: NackReason, detail: &str) {
        self.metrics.nack(reason);
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            conn.queue(&Frame::nack(msg_id, reason, detail), &mut self.scratch);
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

    /// A peer acknowledged our frames up to `msg_id`: they leave its scheduler, their log
    /// records are marked done, and their memory is freed.
    fn on_peer_ack(&mut self, peer: PeerRef, msg_id: u64) {
        let fifo = self.fifo;
        let (state, store) = (
            peer_in(&mut self.sus, &mut self.csps, peer),
            &mut self.store,
        );
        let Some(state) = state else {
            return;
        };
        let key = state.key;
        let lane_of = crate::store::lane_of(fifo);
        let metrics = &mut self.metrics;
        let direction = usize::from(matches!(peer, PeerRef::Csp(_)));
        let released = state.sched.on_ack(msg_id, |level, held| {
            metrics.count(
                direction,
                held.frame.header.kind,
                level.get(),
                Seen::Delivered,
                1,
            );
            if let PeerRef::Su(su) = peer {
                metrics.count_su(su, level.get(), SuOutcome::Delivered);
            }
            if let Some(stored) = held.stored {
                store.done(key, lane_of(level.get()), stored);
            }
        });
        self.shared
            .memory_frames
            .fetch_sub(released as u64, Ordering::Relaxed);
    }

    /// A REQUEST from Service User `su` (southbound, ENGINE.md §5).
    fn on_request(&mut self, slot: usize, su: u32, mut frame: Frame) {
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
        let admit = self.throttle.on_request(&self.shared.intake, su, now);
        if let Some(reason) = admit.nack_reason() {
            let detail = match reason {
                NackReason::Throttled => {
                    "over your Service Request allocation (SECMP0067); retry later"
                }
                _ => "Service Request capacity reached; retry later",
            };
            return self.nack(slot, h.msg_id, reason, detail);
        }
        let mode = Mode::from_wire(h.mode).unwrap_or(Mode::OnDemand);
        let id = RequestId {
            su: h.su_id,
            device: h.device_id,
            counter: h.counter,
        };
        let level = self.classifier.request(id, h.srv, mode, now);
        // Senders' priorities are ignored: dsplane writes its own on the way out.
        frame.header.priority = 0;
        let Some(owner) = self.shared.owner(PeerRef::Csp(csp)) else {
            return;
        };
        self.forward(
            slot,
            owner,
            Destination::Southbound { csp, level },
            level,
            frame,
        );
    }

    /// Pushes a frame taken on connection `slot` into its owner's ring, and ACKs it at once
    /// (durability `none`) or once its owner has made it durable.
    fn forward(
        &mut self,
        slot: usize,
        owner: usize,
        to: Destination,
        ring_level: Level,
        frame: Frame,
    ) {
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
        if let Err(envelope) = super::push(link, ring_level, envelope) {
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
        frame.header.priority = 0;
        // The owner classifies (a response inherits from the owner's in-flight table); the ring
        // level is the rules' view, so that urgent traffic crosses cores first.
        let provisional = self.provisional_level(&frame);
        let Some(owner) = self.shared.owner(PeerRef::Su(su)) else {
            return;
        };
        self.forward(
            slot,
            owner,
            Destination::Northbound { su },
            provisional,
            frame,
        );
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
                self.stage(envelope, now);
            }
            self.commit_staged();
            if n < RING_BATCH_MAX {
                return;
            }
        }
    }

    /// Classifies a frame for a peer this worker owns and decides its tier: memory (the NMS)
    /// while the peer's share and the total allow and its lane has nothing on disk, else disk
    /// only (the SURB). Writes its log record when it has one; [`Self::commit_staged`] acts
    /// once the write has succeeded.
    fn stage(&mut self, envelope: Envelope, now: Nanos) {
        let Envelope {
            to,
            mut frame,
            ticket,
            enqueued_unix_ns,
        } = envelope;
        let (peer, level) = match to {
            Destination::Northbound { su } => {
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
                if h.kind == Kind::DeviceAlert {
                    let verdict = self.storm.on_alert(su, h.device_id, h.alert_code, now);
                    self.report.record(
                        utc_day(enqueued_unix_ns),
                        h.alert_code,
                        h.device_id,
                        Outcome::from(verdict),
                    );
                    if verdict == Verdict::Throttled {
                        let storms = self.storm.stats().storms;
                        if storms != self.storms_seen {
                            self.storms_seen = storms;
                            let settings = self.storm.settings();
                            tracing::warn!(
                                peer = %self.shared.peer_label(PeerRef::Su(su)),
                                device = %h.device_id,
                                alert_code = %AlertCode(h.alert_code),
                                threshold = settings.threshold(),
                                window_s = settings.window() / NANOS_PER_SEC,
                                "alert storm started: further alerts of this device and code are counted, not delivered, until the window closes"
                            );
                        }
                        self.metrics
                            .count(0, h.kind, level.get(), Seen::Throttled, 1);
                        self.metrics.count_su(su, level.get(), SuOutcome::Throttled);
                        // Counted, not delivered: the window's STORM_SUMMARY stands for it.
                        // Its sender's ACK needs nothing written.
                        if let Some(t) = ticket {
                            self.send_ticket(t, true);
                        }
                        return;
                    }
                }
                (PeerRef::Su(su), level)
            }
            Destination::Southbound { csp, level } => (PeerRef::Csp(csp), level),
        };
        let durable = self.shared.durable;
        let memory_full = self.shared.memory_frames.load(Ordering::Relaxed)
            + self.staged_memory as u64
            >= self.shared.memory_frames_max;
        let (state, store) = (
            peer_in(&mut self.sus, &mut self.csps, peer),
            &mut self.store,
        );
        let Some(state) = state else {
            let peer = self.shared.peer_label(peer);
            tracing::error!(%peer, "frame for a peer this worker does not own; refused");
            if let Some(t) = ticket {
                self.send_ticket(t, false);
            }
            return;
        };
        let lane = state.sched.lane_of(level) as u8;
        let spill = store.is_spilled(state.key, lane)
            || state.sched.held() + state.staged_memory >= state.memory_max
            || memory_full;
        if !spill {
            state.staged_memory += 1;
            self.staged_memory += 1;
        }
        if !spill && !state.sched.is_available() {
            // It will wait: copy the payload out of the receive buffer it shares with other
            // frames, so that a long wait pins only its own bytes.
            frame.payload = bytes::Bytes::copy_from_slice(&frame.payload);
        }
        let stored = (durable || spill).then(|| {
            store
                .append(
                    state.key,
                    lane,
                    level.get(),
                    &frame,
                    enqueued_unix_ns,
                    spill,
                )
                .0
        });
        self.staged.push(Staged {
            peer,
            level,
            held: Held {
                frame,
                stored,
                enqueued_unix_ns,
            },
            spill,
            ticket,
        });
    }

    /// Writes the staged records out (one write) and then places the frames: in memory, or
    /// counted as spilled. If the write fails (a full disk), frames that were to be ACKed when
    /// durable are refused (NACK 5); frames already ACKed (durability `none`) stay in memory.
    fn commit_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let written = self.store.write_out();
        self.staged_memory = 0;
        for state in self.sus.iter_mut().chain(self.csps.iter_mut()).flatten() {
            state.staged_memory = 0;
        }
        let mut refused = vec![Vec::new(); self.shared.workers.len()];
        if let Err(e) = &written {
            tracing::error!(worker = self.index, error = %e, "cannot write the log; refusing frames (NACK 5) until it can");
        }
        for staged in std::mem::take(&mut self.staged) {
            let Staged {
                peer,
                level,
                mut held,
                spill,
                ticket,
            } = staged;
            match (&written, ticket) {
                (Err(_), Some(t)) => {
                    if let Some(list) = refused.get_mut(usize::from(t.origin)) {
                        list.push((t, false));
                    }
                    continue;
                }
                (Ok(pos), Some(t)) => self.awaiting.push_back((*pos, t)),
                _ => {}
            }
            let direction = usize::from(matches!(peer, PeerRef::Csp(_)));
            self.metrics.count(
                direction,
                held.frame.header.kind,
                level.get(),
                Seen::Taken,
                1,
            );
            let Some(state) = self.peer_mut(peer) else {
                continue;
            };
            if spill && written.is_ok() {
                state.sched.add_spilled(level, 1);
                continue;
            }
            if written.is_err() {
                held.stored = None;
            }
            if state.sched.enqueue(level, held).is_err() {
                let peer = self.shared.peer_label(peer);
                tracing::error!(%peer, "scheduler bound reached; frame dropped");
                continue;
            }
            self.shared.memory_frames.fetch_add(1, Ordering::Relaxed);
        }
        self.send_tickets(refused);
    }

    /// Brings up to [`LOAD_BATCH`] spilled frames of a lane back into memory.
    fn load_spilled(&mut self, peer: PeerRef, lane: usize) {
        let fifo = self.fifo;
        let shared = Arc::clone(&self.shared);
        let now_unix = unix_now();
        let (state, store) = (
            peer_in(&mut self.sus, &mut self.csps, peer),
            &mut self.store,
        );
        let Some(state) = state else { return };
        let key = state.key;
        let loaded = match store.load(key, lane as u8, LOAD_BATCH, crate::store::lane_of(fifo)) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(peer = %shared.peer_label(peer), lane, error = %e, "cannot read spilled frames; they are skipped");
                state.sched.set_spilled_lane(lane, 0);
                return;
            }
        };
        if loaded.is_empty() {
            tracing::error!(
                peer = %shared.peer_label(peer),
                lane,
                counted = state.sched.spilled_in(lane),
                "spilled frames not found in the log"
            );
            state.sched.set_spilled_lane(lane, 0);
            return;
        }
        let mut expired = Vec::new();
        let mut n = 0;
        for l in loaded {
            let Some(level) = Level::new(l.level) else {
                continue;
            };
            let held = Held {
                frame: l.frame,
                stored: Some(l.stored),
                enqueued_unix_ns: l.enqueued_unix_ns,
            };
            if now_unix.saturating_sub(held.enqueued_unix_ns) > state.retention {
                // Counted off the spill as if loaded, then expired.
                state
                    .sched
                    .set_spilled_lane(lane, state.sched.spilled_in(lane).saturating_sub(1));
                expired.push((level, held));
            } else {
                state.sched.load(level, held);
                n += 1;
            }
        }
        self.shared.memory_frames.fetch_add(n, Ordering::Relaxed);
        for (level, held) in expired {
            self.expire(peer, level, held, false);
        }
    }

    /// A frame waited longer than `retention_h`: counted, logged, written to the expiry record,
    /// and its log record marked done.
    fn expire(&mut self, peer: PeerRef, level: Level, held: Held, in_memory: bool) {
        let name = self.peer_name(peer);
        let fifo = self.fifo;
        let Some(key) = self.peer_mut(peer).map(|s| s.key) else {
            return;
        };
        if let Some(stored) = held.stored {
            self.store
                .done(key, crate::store::lane_of(fifo)(level.get()), stored);
        }
        if in_memory {
            self.shared.memory_frames.fetch_sub(1, Ordering::Relaxed);
        }
        let h = &held.frame.header;
        self.metrics.count(
            usize::from(matches!(peer, PeerRef::Csp(_))),
            h.kind,
            level.get(),
            Seen::Expired,
            1,
        );
        if let PeerRef::Su(su) = peer {
            self.metrics.count_su(su, level.get(), SuOutcome::Expired);
        }
        tracing::warn!(peer = %name, level = level.get(), kind = %h.kind, device = %h.device_id, counter = h.counter, "frame expired after retention_h");
        let line = format!(
            "{{\"expired_unix_ns\":{},\"peer\":\"{}\",\"level\":{},\"kind\":\"{}\",\"srv\":\"{}\",\"alert_code\":{},\"su_id\":\"{}\",\"device_id\":\"{}\",\"counter\":{},\"created_ns\":{},\"enqueued_unix_ns\":{}}}\n",
            unix_now(),
            name,
            level.get(),
            h.kind,
            h.srv,
            h.alert_code,
            h.su_id,
            h.device_id,
            h.counter,
            h.created_ns,
            held.enqueued_unix_ns
        );
        if self.expiry_log.is_none() {
            let path = self
                .shared
                .config
                .engine
                .data_dir
                .join(format!("expired-w{}.jsonl", self.index));
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
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::error!(error = %e, "cannot write the expiry record");
            }
        }
        self.expired += 1;
    }

    fn pump_all(&mut self) {
        self.rate_wake = None;
        let now = self.now();
        // `pump` skips peers this worker does not own or that are not connected.
        let sus = (0..self.sus.len()).map(|i| PeerRef::Su(i as u32));
        let csps = (0..self.csps.len()).map(|i| PeerRef::Csp(i as u32));
        for peer in sus.chain(csps) {
            // Each round either fills the connection or stops at a lane on disk, which is
            // loaded before the next round.
            for _ in 0..64 {
                match self.pump(peer, now) {
                    Some(lane) => self.load_spilled(peer, lane),
                    None => break,
                }
            }
        }
    }

    /// Moves frames from a peer's scheduler to its connection while it may send. Returns the
    /// lane whose frames must be loaded from disk first, if that is what stopped it.
    fn pump(&mut self, peer: PeerRef, now: Nanos) -> Option<usize> {
        let now_unix = self.unix_turn;
        let direction = usize::from(matches!(peer, PeerRef::Csp(_)));
        let metrics = &mut self.metrics;
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
        let state = state?;
        let slot = state.conn?;
        let conn = conns.get_mut(slot).and_then(Option::as_mut)?;
        let mut queued = false;
        let mut load = None;
        while conn.has_room() {
            match state.sched.next_send(now) {
                Ok(out) => {
                    let mut frame = out.item.frame.clone();
                    frame.header.msg_id = out.msg_id;
                    frame.header.priority = out.level.get();
                    if frame.header.created_ns > 0 {
                        metrics.latency(
                            direction,
                            out.level.get(),
                            now_unix.saturating_sub(frame.header.created_ns),
                        );
                    }
                    conn.queue(&frame, scratch);
                    queued = true;
                }
                Err(Blocked::Rate(at)) => {
                    self.rate_wake = Some(self.rate_wake.map_or(at, |w| w.min(at)));
                    break;
                }
                Err(Blocked::Load(lane)) => {
                    load = Some(lane);
                    break;
                }
                Err(_) => break,
            }
        }
        if queued {
            self.on_writable(slot);
        }
        load
    }

    fn housekeeping(&mut self, now: Nanos) {
        let idle = self.shared.config.engine.idle_timeout.as_nanos() as Nanos;
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) else {
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
        self.classifier.expire(now);
        self.publish_metrics();
        if self.report.days().next().is_some() {
            if let Ok(mut shared) = self.shared.report.lock() {
                shared.merge(&self.report);
                self.report = AlertReport::new();
            }
        }
        let now_unix = unix_now();
        let mut expired = Vec::new();
        let sus = self
            .sus
            .iter_mut()
            .enumerate()
            .map(|(i, s)| (PeerRef::Su(i as u32), s));
        let csps = self
            .csps
            .iter_mut()
            .enumerate()
            .map(|(i, s)| (PeerRef::Csp(i as u32), s));
        for (peer, state) in sus.chain(csps) {
            let Some(state) = state.as_mut() else {
                continue;
            };
            let retention = state.retention;
            let gone = state
                .sched
                .take_expired(|h| now_unix.saturating_sub(h.enqueued_unix_ns) > retention);
            expired.extend(gone.into_iter().map(|(level, held)| (peer, level, held)));
        }
        for (peer, level, held) in expired {
            self.expire(peer, level, held, true);
        }
        if let Err(e) = self.store.write_out() {
            tracing::error!(error = %e, "cannot write the log");
        }
    }

    /// Publishes a copy of this worker's metrics for `/metrics`, with the gauges read now.
    fn publish_metrics(&mut self) {
        let mut depth = Vec::new();
        let mut peers = Vec::new();
        let sus = self
            .sus
            .iter()
            .enumerate()
            .map(|(i, s)| (PeerRef::Su(i as u32), s));
        let csps = self
            .csps
            .iter()
            .enumerate()
            .map(|(i, s)| (PeerRef::Csp(i as u32), s));
        for (peer, state) in sus.chain(csps) {
            let Some(state) = state else { continue };
            let name = self.peer_name(peer);
            let mut snapshot = PeerSnapshot {
                peer,
                connected: state.conn.is_some(),
                nms: 0,
                surb: 0,
            };
            for lane in 0..state.sched.lanes() {
                let level = lane as u8 + 1;
                let nms = state.sched.waiting_in(lane) as u64;
                let surb = state.sched.spilled_in(lane);
                snapshot.nms += nms;
                snapshot.surb += surb;
                depth.push((name.clone(), "nms", level, nms));
                depth.push((name.clone(), "surb", level, surb));
            }
            peers.push(snapshot);
        }
        let storm = self.storm.stats();
        self.metrics.queue_depth = depth;
        self.metrics.peers = peers;
        self.metrics.storm_keys_tracked = storm.keys_tracked;
        self.metrics.storm_alerts_owed = storm.owed;
        self.metrics.storm_summaries = storm.summaries;
        self.metrics.storms_started = storm.storms;
        self.metrics.surb_bytes = self.store.disk_bytes();
        self.metrics.inflight_requests_evicted = self.classifier.inflight_stats().evicted_full;
        if let Ok(mut all) = self.shared.metrics.lock() {
            if let Some(slot) = all.get_mut(self.index) {
                slot.clone_from(&self.metrics);
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

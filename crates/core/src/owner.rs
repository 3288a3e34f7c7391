//! The owner: everything a worker decides for the peers it owns, as a state machine driven by
//! explicit time, in the way of quinn-proto's `Connection`. It reads no clock, opens no socket
//! and knows nothing of mio; the engine's worker feeds it events and carries out what it asks.
//!
//! # Inputs
//!
//! * [`Owner::admit_request`]: a REQUEST read on an SU's connection (the SU's owner reads it):
//!   the Service Request allocation (SECMP0067), then its level, recorded for its response.
//! * [`Owner::intake_level`]: the level of a RESPONSE or alert read on a CSP link, decided once
//!   at intake and carried with the frame ([`Destination`]).
//! * [`Owner::take`] and [`Owner::commit`]: frames handed over from the rings, for peers this
//!   owner owns: storm check, the tier ([`Nms`] or [`Surb`]), the log record; `commit` writes
//!   the batch (one write) and places the frames.
//! * [`Owner::on_peer_ack`], [`Owner::on_connect`], [`Owner::on_disconnect`]: what the peers do.
//! * [`Owner::set_paused`], [`Owner::set_restricted`], [`Owner::reload`]: operator actions.
//! * [`Owner::handle_timeout`]: time passing (storm windows, retention, the in-flight table).
//!
//! # Outputs
//!
//! * [`Owner::poll_transmit`]: the next frame a connected peer may be sent now (strict priority,
//!   window, rate, ramp), stamped with its `msg_id` and level.
//! * [`Owner::acks`]: acknowledgements that may now go to senders (`(ticket, true)`: the frame
//!   is durable, or was throttled and counted; `(ticket, false)`: refused, NACK 5). A queue of
//!   their own, of 32-byte entries: on the durable path there is one per frame.
//! * [`Owner::poll_event`]: the rarer things to carry out, expiry records ([`Event::Expired`]).
//! * [`Owner::poll_timeout`]: when to call [`Owner::handle_timeout`] or pump again.
//! * [`Owner::counters`]: the metrics, and [`Owner::take_report`]: the alert report.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::classify::{Classifier, RequestId, Rules};
use crate::config::{Config, Scheduling};
use crate::counters::{Outcome as Seen, PeerSnapshot, SuOutcome, WorkerMetrics};
use crate::delivery::{Blocked, DeliveryScheduler, DeliverySettings};
use crate::ids::{AlertCode, Eui64, Level, Mode};
use crate::limiter::{LimiterError, ReleaseStart, TokenBucket};
use crate::limits;
use crate::log::Log;
use crate::log::PeerKey;
use crate::log::{LogPos, Stored};
use crate::report::{utc_day, AlertReport, Outcome};
use crate::storm::{StormDetector, StormError, StormSettings, StormSummary, Verdict};
use crate::throttle::{GlobalIntake, RequestThrottle, ThrottleError};
use crate::wire::{Frame, Header, Kind, NackReason};
use crate::{Nanos, NANOS_PER_SEC};

/// Which way a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a CSP to a Service User: RESPONSEs, alerts, storm summaries.
    Northbound = 0,
    /// From a Service User to a CSP: REQUESTs.
    Southbound = 1,
}

impl Direction {
    /// Its index in per-direction tables.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A peer, by its index in the directory (the configuration's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRef {
    /// A Service User.
    Su(u32),
    /// A CSP link.
    Csp(u32),
}

impl PeerRef {
    /// The direction of the frames sent to this peer.
    #[inline]
    pub fn direction(self) -> Direction {
        match self {
            PeerRef::Su(_) => Direction::Northbound,
            PeerRef::Csp(_) => Direction::Southbound,
        }
    }
}

/// Who to acknowledge once a frame is durable: opaque to the owner, which hands it back in
/// [`Owner::acks`]. The engine puts the intake worker, the connection and the `msg_id` in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The worker that took the frame in.
    pub origin: u16,
    /// Its connection's slot on that worker.
    pub slot: u32,
    /// The connection's id, so that a ticket for a closed connection whose slot was reused is
    /// recognised and dropped.
    pub conn_id: u64,
    /// The frame's `msg_id` on that connection.
    pub msg_id: u64,
    /// The ring it came to this owner through (the engine numbers them per intake worker):
    /// frames of one connection through one ring are taken in `msg_id` order.
    pub ring: u16,
}

/// The acknowledgement of a run of frames: `first` and every later frame of the same
/// connection through the same ring up to `last_msg_id`.
///
/// Frames of one connection through one ring reach the owner in `msg_id` order, so the frames
/// of that connection and ring with a `msg_id` between two that were committed next to each
/// other were taken between them: they are in the run, or their acknowledgement (a throttled
/// alert, a refusal) was handed back before it. The owner merges the tickets of a batch that
/// way, and one run crosses to the intake worker instead of a ticket per frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketRun {
    /// The ticket of the run's first frame.
    pub first: Ticket,
    /// The `msg_id` of its last frame.
    pub last_msg_id: u64,
}

impl TicketRun {
    /// The run of one frame.
    pub fn one(ticket: Ticket) -> TicketRun {
        TicketRun {
            first: ticket,
            last_msg_id: ticket.msg_id,
        }
    }

    /// Takes in `ticket` if it is the next frame of the run's connection and ring.
    #[inline]
    fn extend(&mut self, ticket: &Ticket) -> bool {
        let f = &self.first;
        let next = f.conn_id == ticket.conn_id
            && f.slot == ticket.slot
            && f.origin == ticket.origin
            && f.ring == ticket.ring
            && ticket.msg_id > self.last_msg_id;
        if next {
            self.last_msg_id = ticket.msg_id;
        }
        next
    }
}

/// The receiver of an [`Envelope`], with the level decided at intake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A RESPONSE or alert for Service User `su`. A response's `level` is the rules' view of it
    /// (its own SRV and mode); the SU's owner replaces it by its request's level if it has the
    /// request in its in-flight table. An alert's is final.
    Northbound {
        /// The SU.
        su: u32,
        /// The level decided at intake.
        level: Level,
    },
    /// A REQUEST for CSP link `csp`.
    Southbound {
        /// The CSP link.
        csp: u32,
        /// The level decided at intake.
        level: Level,
    },
}

impl Destination {
    /// The level decided at intake (a response's may still be replaced by its request's).
    #[inline]
    pub fn level(self) -> Level {
        match self {
            Destination::Northbound { level, .. } | Destination::Southbound { level, .. } => level,
        }
    }
}

/// A frame handed from the worker that read it to the owner of its receiver.
#[derive(Debug)]
pub struct Envelope {
    /// Its receiver and level.
    pub to: Destination,
    /// The frame.
    pub frame: Frame,
    /// Set when durability asks for the frame to be on disk before it is ACKed.
    pub ticket: Option<Ticket>,
    /// When dsplane took it, ns since the Unix epoch.
    pub enqueued_unix_ns: u64,
}

/// What became of a frame handed to [`Owner::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Staged for the next [`Owner::commit`] (in memory, or in the SURB), at this level.
    Staged(Level),
    /// A DEVICE_ALERT throttled by Alert Storm Protection: counted for its window's summary.
    Throttled,
    /// Refused: its receiver is not this owner's (its sender gets NACK 5).
    Refused,
}

/// A frame to send, from [`Owner::poll_transmit_ref`], lent: the header as the owner holds it,
/// the `msg_id` and level (`priority`) it goes out with on its connection, and the payload.
/// Nothing is copied until the I/O writes it ([`Header::to_bytes_stamped`]).
#[derive(Debug)]
pub struct Transmit<'a> {
    /// The header as taken in; its `msg_id` and `priority` are not what goes out.
    pub header: &'a Header,
    /// The `msg_id` on the connection it goes out on.
    pub msg_id: u64,
    /// The level it goes out with, in the header's `priority` field.
    pub priority: u8,
    /// The payload, as held by the owner until the peer acknowledges it.
    pub payload: &'a Bytes,
}

impl Transmit<'_> {
    /// The header as it goes out (a copy, stamped; `payload_len` as taken in).
    pub fn stamped(&self) -> Header {
        let mut header = *self.header;
        header.msg_id = self.msg_id;
        header.priority = self.priority;
        header
    }

    /// The header's 64 bytes as they go out, `payload_len` included.
    #[inline]
    pub fn header_bytes(&self) -> [u8; crate::wire::HEADER_LEN] {
        // Saturating only for a payload over 4 GiB; the peer then refuses it as too long.
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        self.header
            .to_bytes_stamped(self.msg_id, self.priority, len)
    }
}

/// What the owner asks of the I/O around it, beside frames to send ([`Owner::poll_transmit`])
/// and acknowledgements ([`Owner::acks`]).
#[derive(Debug)]
pub enum Event {
    /// A frame waited longer than `retention_h`: append this to the expiry record.
    Expired(ExpiredRecord),
}

/// One line of the expiry record (`expired-w<N>.jsonl`), as JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExpiredRecord {
    /// When it expired, ns since the Unix epoch.
    pub expired_unix_ns: u64,
    /// Its receiver.
    pub peer: String,
    /// Its level.
    pub level: u8,
    /// Its kind.
    pub kind: String,
    /// Its SRV.
    pub srv: String,
    /// Its alert code (0 for other kinds).
    pub alert_code: u16,
    /// Its Service User.
    pub su_id: String,
    /// Its device.
    pub device_id: String,
    /// Its counter.
    pub counter: u64,
    /// Its `created_ns`.
    pub created_ns: u64,
    /// When dsplane took it, ns since the Unix epoch.
    pub enqueued_unix_ns: u64,
}

/// Why an owner cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// A delivery rate or burst out of the limiter's range.
    #[error("{peer}: delivery rate refused: {source}")]
    Rate {
        /// The peer.
        peer: String,
        /// Why.
        #[source]
        source: LimiterError,
    },
    /// A Service Request allocation out of range.
    #[error("{peer}: Service Request allocation refused: {source}")]
    Allocation {
        /// The peer.
        peer: String,
        /// Why.
        #[source]
        source: ThrottleError,
    },
    /// Alert storm settings out of range.
    #[error("alert storm settings refused: {0}")]
    Storm(#[from] StormError),
}

/// A frame waiting in memory for its peer.
#[derive(Debug)]
pub struct Held {
    /// The frame.
    pub frame: Frame,
    /// Its record in the log, if it has one.
    pub stored: Option<Stored>,
    /// When dsplane took it, ns since the Unix epoch (for `retention_h`).
    pub enqueued_unix_ns: u64,
}

/// How one peer is set up.
#[derive(Debug, Clone)]
pub struct PeerSetup {
    /// Its name in log lines and the expiry record.
    pub label: String,
    /// Its SU id (storm summaries carry it); [`Eui64`] zero for a CSP link.
    pub su_id: Eui64,
    /// Its key in the log.
    pub key: PeerKey,
    /// Its scheduler.
    pub delivery: DeliverySettings,
    /// Its delivery rate, frames per second, and burst.
    pub rate: u32,
    /// See `rate`.
    pub burst: u32,
    /// Most frames held in memory for it (its NMS share); beyond, they go to the SURB.
    pub memory_max: usize,
    /// How long a frame may wait.
    pub retention: Nanos,
    /// Its Service Request allocation (rate, burst): SUs only.
    pub allocation: Option<(u32, u32)>,
}

/// How an owner is set up: the peers it owns (by directory index, `None` where another worker
/// owns the peer) and the engine-wide settings.
#[derive(Debug, Clone)]
pub struct OwnerSetup {
    /// Its index among the workers (log lines).
    pub index: usize,
    /// Every SU, `Some` where this owner owns it.
    pub sus: Vec<Option<PeerSetup>>,
    /// Every CSP link, `Some` where this owner owns it.
    pub csps: Vec<Option<PeerSetup>>,
    /// The priority rules at start-up.
    pub rules: Arc<Rules>,
    /// Alert Storm Protection's settings.
    pub storm: StormSettings,
    /// Whether frames are made durable before they are ACKed.
    pub durable: bool,
    /// `scheduling = "fifo"`: one lane.
    pub fifo: bool,
}

/// The worker that owns Service User `su` when `workers` run: a multiplicative hash, so that
/// consecutive ids do not all land on one worker.
pub fn owner_of_su(su: Eui64, workers: usize) -> usize {
    let mixed = su.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % workers.max(1) as u64) as usize
}

/// The worker that owns CSP link `csp` (its index) when `workers` run.
pub fn owner_of_csp(csp: usize, workers: usize) -> usize {
    csp % workers.max(1)
}

fn delivery_settings(config: &Config, window: u32, memory_max: u64) -> DeliverySettings {
    let engine = &config.engine;
    let delivery = &config.delivery;
    // The memory share decides what spills; the scheduler's own bound is a safety net above
    // it, leaving room for one load batch per lane and a window in flight.
    let frames_max = usize::try_from(memory_max)
        .unwrap_or(usize::MAX)
        .saturating_add(usize::from(engine.levels) * limits::LOAD_BATCH + window as usize);
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

impl OwnerSetup {
    /// The set-up of owner `index` of `workers`, from a validated configuration.
    ///
    /// # Errors
    ///
    /// Alert storm settings the storm detector refuses.
    pub fn from_config(config: &Config, index: usize, workers: usize) -> Result<Self, OwnerError> {
        let sus = config
            .service_users
            .iter()
            .map(|su| {
                (owner_of_su(su.id, workers) == index).then(|| {
                    let d = &su.delivery;
                    let mut delivery = delivery_settings(config, d.window, d.nms_per_su);
                    delivery.window_reserved_top =
                        d.window_reserved_top.min(d.window.saturating_sub(1));
                    delivery.release_start = d.release_start;
                    delivery.release_ramp = d.release_ramp.as_nanos() as Nanos;
                    PeerSetup {
                        label: su.id.to_string(),
                        su_id: su.id,
                        key: PeerKey::Su(su.id),
                        delivery,
                        rate: d.rate,
                        burst: d.burst,
                        memory_max: usize::try_from(d.nms_per_su).unwrap_or(usize::MAX),
                        retention: d.retention.as_nanos() as Nanos,
                        allocation: Some((su.sr_rate, su.sr_burst)),
                    }
                })
            })
            .collect();
        let csps = config
            .csps
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (owner_of_csp(i, workers) == index).then(|| {
                    let held_max = config.delivery.nms_per_su;
                    let mut delivery = delivery_settings(config, c.window, held_max);
                    // A CSP link is not an SU coming back from an outage: no release ramp.
                    delivery.release_start = ReleaseStart::FULL;
                    PeerSetup {
                        label: c.name.clone(),
                        su_id: Eui64(0),
                        key: PeerKey::csp(&c.name),
                        delivery,
                        rate: c.rate,
                        burst: c.burst,
                        memory_max: usize::try_from(held_max).unwrap_or(usize::MAX),
                        retention: config.delivery.retention.as_nanos() as Nanos,
                        allocation: None,
                    }
                })
            })
            .collect();
        Ok(OwnerSetup {
            index,
            sus,
            csps,
            rules: Arc::new(Rules::new(&config.priority)),
            storm: StormSettings::from_config(&config.alert_storm, workers as u32)?,
            durable: config.engine.durability != crate::config::Durability::None,
            fifo: config.engine.scheduling == Scheduling::Fifo,
        })
    }
}

/// A Service User's delivery rates after a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuRates {
    /// Its directory index.
    pub su: u32,
    /// Delivery rate, frames per second.
    pub rate: u32,
    /// Delivery burst.
    pub burst: u32,
    /// Service Request allocation rate (SECMP0067), requests per second.
    pub sr_rate: u32,
    /// Service Request allocation burst.
    pub sr_burst: u32,
}

/// A CSP link's delivery rate after a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CspRates {
    /// Its directory index.
    pub csp: u32,
    /// Delivery rate, frames per second.
    pub rate: u32,
    /// Delivery burst.
    pub burst: u32,
}

/// What a live reload changes in an owner: rules for frames classified from now on, storm
/// thresholds and exclusions, rates. Limiters, throttles and storm windows keep their state.
#[derive(Debug, Clone)]
pub struct Reload {
    /// The new rules.
    pub rules: Arc<Rules>,
    /// The new storm settings.
    pub storm: StormSettings,
    /// Every SU's rates.
    pub sus: Vec<SuRates>,
    /// Every CSP link's rates.
    pub csps: Vec<CspRates>,
}

/// The Northbound Message Store (ENGINE.md's NMS), as one owner sees it: frames held in memory,
/// bounded per peer (its share, `nms_per_su`) and in total across every owner (`nms_total`, a
/// count the owners share).
#[derive(Debug)]
pub struct Nms {
    /// Frames held in memory by every owner together.
    total: Arc<AtomicU64>,
    /// `nms_total`.
    total_max: u64,
    /// Frames given a place in memory in the batch being written (not yet counted in `total`).
    staged: u64,
}

impl Nms {
    /// The NMS of one owner: `total` is shared by every owner of the engine.
    pub fn new(total: Arc<AtomicU64>, total_max: u64) -> Nms {
        Nms {
            total,
            total_max,
            staged: 0,
        }
    }

    /// Frames held in memory by every owner together.
    pub fn held(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Whether a frame for a peer holding `peer_held` of its `share` may go to memory.
    #[inline]
    fn has_room(&self, peer_held: usize, share: usize) -> bool {
        peer_held < share && self.held() + self.staged < self.total_max
    }

    #[inline]
    fn add(&self, n: u64) {
        if n > 0 {
            self.total.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[inline]
    fn release(&self, n: u64) {
        if n > 0 {
            self.total.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// The Service User Retry Buffer (ENGINE.md's SURB), as one owner sees it: the log, holding the
/// frames that went to disk only, by peer and lane, beside the durable copies of the frames held
/// in the [`Nms`]. A lane with frames in the SURB takes every new frame of that lane to the
/// SURB too, so that a lane is always delivered in order.
#[derive(Debug)]
pub struct Surb<L> {
    log: L,
    fifo: bool,
}

impl<L: Log> Surb<L> {
    /// The log's lane of a level.
    #[inline]
    fn lane(&self, level: Level) -> u8 {
        crate::log::lane_of(self.fifo)(level.get())
    }

    /// The log behind it.
    pub fn log(&self) -> &L {
        &self.log
    }

    /// The log behind it.
    pub fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }
}

/// A peer this owner owns.
struct PeerState {
    sched: DeliveryScheduler<Held>,
    connected: bool,
    label: String,
    su_id: Eui64,
    key: PeerKey,
    memory_max: usize,
    paused: bool,
    retention: Nanos,
    /// Frames staged for memory in the batch being written (not yet in `sched`).
    staged_memory: usize,
    /// The last load from the SURB failed (logged once until one succeeds).
    load_failed: bool,
}

/// A frame taken from the ring, written (or not) to the log, waiting for the write.
struct Staged {
    peer: PeerRef,
    level: Level,
    held: Held,
    spill: bool,
    ticket: Option<Ticket>,
}

/// See the module documentation.
pub struct Owner<L> {
    index: usize,
    sus: Vec<Option<PeerState>>,
    csps: Vec<Option<PeerState>>,
    classifier: Classifier,
    nms: Nms,
    surb: Surb<L>,
    durable: bool,
    restricted: bool,
    /// Tickets of frames written, waiting for the log to be durable up to their position.
    /// Runs of the tickets of one batch each (see [`TicketRun`]).
    awaiting: VecDeque<(LogPos, TicketRun)>,
    staged: Vec<Staged>,
    acks: Vec<(TicketRun, bool)>,
    events: VecDeque<Event>,
    /// Earliest instant a rate-limited peer may send again, from the last pump.
    rate_wake: Option<Nanos>,
    /// When the peer of the last [`Owner::poll_transmit_ref`] that gave nothing may send again,
    /// if that was for want of tokens (`None` after one that gave a frame, or stopped for
    /// another reason).
    last_rate_block: Option<Nanos>,
    /// Frames were handed out since the last load from the SURB (see `take_load_due`).
    sent_since_load: bool,
    /// Writes to the log are failing: logged once when they start to, and once when they work
    /// again (a database that stays away would otherwise log every batch refused).
    write_failing: bool,
    /// `poll_transmit` stopped before a load so that what it handed out is written first.
    load_due: bool,
    next_housekeeping: Nanos,
    storm: StormDetector,
    summaries: Vec<StormSummary>,
    /// Storms started, as last logged: the detector's count moving on is a storm's first alert.
    storms_seen: u64,
    throttle: RequestThrottle,
    report: AlertReport,
    metrics: WorkerMetrics,
}

impl<L> std::fmt::Debug for Owner<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("index", &self.index)
            .field("awaiting", &self.awaiting.len())
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

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

/// Counts a frame going out in the latency histogram of its direction and level: its age since
/// the sender stamped it (`created_ns`; a frame without a stamp is not counted).
#[inline]
fn record_latency(
    metrics: &mut WorkerMetrics,
    direction: Direction,
    level: Level,
    held: &Held,
    unix: u64,
) {
    let created_ns = held.frame.header.created_ns;
    if created_ns > 0 {
        metrics.latency(direction, level.get(), unix.saturating_sub(created_ns));
    }
}

/// The acknowledgement of a frame decided as it is taken (a throttled alert, a refusal). Out
/// of line and cold, so that `take`'s usual path is compiled without it.
#[cold]
#[inline(never)]
fn ack_at_once(acks: &mut Vec<(TicketRun, bool)>, ticket: Option<Ticket>, durable: bool) {
    if let Some(ticket) = ticket {
        acks.push((TicketRun::one(ticket), durable));
    }
}

/// A frame its peer acknowledged leaves: counted, and its log record marked done.
fn delivered<L: Log>(
    metrics: &mut WorkerMetrics,
    log: &mut L,
    fifo: bool,
    key: PeerKey,
    peer: PeerRef,
    level: Level,
    held: Held,
) {
    metrics.count(
        peer.direction(),
        held.frame.header.kind,
        level.get(),
        Seen::Delivered,
        1,
    );
    if let PeerRef::Su(su) = peer {
        metrics.count_su(su, level.get(), SuOutcome::Delivered);
    }
    if let Some(stored) = held.stored {
        log.done(key, crate::log::lane_of(fifo)(level.get()), stored);
    }
}

fn peer_state(setup: PeerSetup) -> Result<PeerState, OwnerError> {
    let limiter =
        TokenBucket::new(setup.rate, setup.burst, 0).map_err(|source| OwnerError::Rate {
            peer: setup.label.clone(),
            source,
        })?;
    Ok(PeerState {
        sched: DeliveryScheduler::new(setup.delivery, limiter),
        connected: false,
        label: setup.label,
        su_id: setup.su_id,
        key: setup.key,
        memory_max: setup.memory_max,
        paused: false,
        retention: setup.retention,
        staged_memory: 0,
        load_failed: false,
    })
}

impl<L: Log> Owner<L> {
    /// An owner over `log` (which may hold a backlog from the previous run: it is counted in
    /// its peers' lanes, so that each release, with its ramp, includes it in priority order).
    ///
    /// # Errors
    ///
    /// A rate, burst or allocation the limiters refuse.
    pub fn new(setup: OwnerSetup, log: L, nms: Nms, now: Nanos) -> Result<Owner<L>, OwnerError> {
        let mut throttle = RequestThrottle::new();
        let mut sus = Vec::with_capacity(setup.sus.len());
        for (i, su) in setup.sus.into_iter().enumerate() {
            let Some(su) = su else {
                sus.push(None);
                continue;
            };
            if let Some((rate, burst)) = su.allocation {
                throttle
                    .add_su(i as u32, rate, burst, now)
                    .map_err(|source| OwnerError::Allocation {
                        peer: su.label.clone(),
                        source,
                    })?;
            }
            sus.push(Some(peer_state(su)?));
        }
        let csps = setup
            .csps
            .into_iter()
            .map(|c| c.map(peer_state).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let mut owner = Owner {
            index: setup.index,
            sus,
            csps,
            classifier: Classifier::new(
                setup.rules,
                limits::INFLIGHT_REQUESTS_MAX,
                limits::INFLIGHT_AGE_MAX,
            ),
            nms,
            surb: Surb {
                log,
                fifo: setup.fifo,
            },
            durable: setup.durable,
            restricted: false,
            awaiting: VecDeque::new(),
            staged: Vec::new(),
            acks: Vec::new(),
            events: VecDeque::new(),
            rate_wake: None,
            last_rate_block: None,
            sent_since_load: false,
            write_failing: false,
            load_due: false,
            next_housekeeping: now,
            storm: StormDetector::new(setup.storm, now),
            summaries: Vec::new(),
            storms_seen: 0,
            throttle,
            report: AlertReport::new(),
            metrics: WorkerMetrics::default(),
        };
        let mut recovered = 0;
        for (key, lane, count) in owner.surb.log.spills() {
            if let Some(state) = owner.state_by_key(key) {
                state.sched.set_spilled_lane(usize::from(lane), count);
                recovered += count;
            }
        }
        if recovered > 0 {
            tracing::info!(
                worker = owner.index,
                frames = recovered,
                "backlog recovered from the log"
            );
        }
        Ok(owner)
    }

    fn state_by_key(&mut self, key: PeerKey) -> Option<&mut PeerState> {
        self.sus
            .iter_mut()
            .chain(self.csps.iter_mut())
            .flatten()
            .find(|p| p.key == key)
    }

    fn peer_mut(&mut self, peer: PeerRef) -> Option<&mut PeerState> {
        peer_in(&mut self.sus, &mut self.csps, peer)
    }

    /// The peers this owner owns.
    pub fn peers(&self) -> impl Iterator<Item = PeerRef> + '_ {
        let sus = (self.sus.iter().enumerate())
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| PeerRef::Su(i as u32));
        let csps = (self.csps.iter().enumerate())
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| PeerRef::Csp(i as u32));
        sus.chain(csps)
    }

    /// The disk tier and the log behind it.
    pub fn surb(&self) -> &Surb<L> {
        &self.surb
    }

    /// The disk tier and the log behind it (the engine closes the log on shutdown through it).
    pub fn surb_mut(&mut self) -> &mut Surb<L> {
        &mut self.surb
    }

    /// The metrics counted so far (the engine counts the NACKs of intake into them too).
    pub fn counters(&mut self) -> &mut WorkerMetrics {
        &mut self.metrics
    }

    /// Frames held in memory for every peer of this owner.
    pub fn held(&self) -> usize {
        self.sus
            .iter()
            .chain(self.csps.iter())
            .flatten()
            .map(|p| p.sched.held())
            .sum()
    }

    // ---- intake -----------------------------------------------------------------------------

    /// A REQUEST from Service User `su` (which this owner owns): its Service Request allocation
    /// first (SECMP0067), then its level by the rules, recorded for its response.
    ///
    /// # Errors
    ///
    /// The NACK reason when the allocation or the engine's capacity refuses it.
    pub fn admit_request(
        &mut self,
        su: u32,
        h: &Header,
        intake: &GlobalIntake,
        now: Nanos,
    ) -> Result<Level, NackReason> {
        let admit = self.throttle.on_request(intake, su, now);
        if let Some(reason) = admit.nack_reason() {
            return Err(reason);
        }
        let mode = Mode::from_wire(h.mode).unwrap_or(Mode::OnDemand);
        let id = RequestId {
            su: h.su_id,
            device: h.device_id,
            counter: h.counter,
        };
        Ok(self.classifier.request(id, h.srv, mode, now))
    }

    /// The level of a RESPONSE or alert read from a CSP, decided once here and carried with the
    /// frame: an alert's by its code, a response's by its own SRV and mode (its SU's owner
    /// replaces that by its request's level, [`Destination::Northbound`]).
    pub fn intake_level(&self, h: &Header) -> Level {
        let rules = self.classifier.rules();
        match h.kind {
            Kind::DeviceAlert | Kind::DccAlert => rules.alert_level(h.alert_code),
            Kind::Response => rules
                .unknown_response_level(h.srv, Mode::from_wire(h.mode).unwrap_or(Mode::OnDemand)),
            _ => rules.lowest(),
        }
    }

    // ---- taking frames in -------------------------------------------------------------------

    /// Takes a frame handed over for a peer this owner owns: a response gets its request's
    /// level, an alert goes through Alert Storm Protection, and the frame gets its tier (memory
    /// while its peer's share and the total allow and its lane has nothing on disk, else disk
    /// only) and its log record. Nothing is placed before [`Owner::commit`] writes the batch.
    pub fn take(&mut self, envelope: Envelope, now: Nanos) -> Taken {
        let Envelope {
            to,
            mut frame,
            ticket,
            enqueued_unix_ns,
        } = envelope;
        let (peer, level) = match to {
            Destination::Northbound { su, level } => {
                let h = &frame.header;
                let level = match h.kind {
                    Kind::Response => {
                        let id = RequestId {
                            su: h.su_id,
                            device: h.device_id,
                            counter: h.counter,
                        };
                        self.classifier.inherit(&id, now).unwrap_or(level)
                    }
                    _ => level,
                };
                if h.kind == Kind::DeviceAlert
                    && self.storm_verdict(su, &frame, level, enqueued_unix_ns, now)
                        == Verdict::Throttled
                {
                    // Counted, not delivered: the window's STORM_SUMMARY stands for it. Its
                    // sender's ACK needs nothing written.
                    ack_at_once(&mut self.acks, ticket, true);
                    return Taken::Throttled;
                }
                (PeerRef::Su(su), level)
            }
            Destination::Southbound { csp, level } => (PeerRef::Csp(csp), level),
        };
        let durable = self.durable;
        let lane = self.surb.lane(level);
        let nms = &mut self.nms;
        let log = &mut self.surb.log;
        let Some(state) = peer_in(&mut self.sus, &mut self.csps, peer) else {
            tracing::error!(?peer, "frame for a peer this worker does not own; refused");
            ack_at_once(&mut self.acks, ticket, false);
            return Taken::Refused;
        };
        let spill = log.is_spilled(state.key, lane)
            || !nms.has_room(state.sched.held() + state.staged_memory, state.memory_max);
        if !spill {
            state.staged_memory += 1;
            nms.staged += 1;
            if !state.sched.is_available() {
                // It will wait: copy the payload out of the receive buffer it shares with other
                // frames, so that a long wait pins only its own bytes.
                frame.payload = Bytes::copy_from_slice(&frame.payload);
            }
        }
        let stored = (durable || spill).then(|| {
            log.append(
                state.key,
                lane,
                level.get(),
                &frame,
                enqueued_unix_ns,
                spill,
            )
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
        Taken::Staged(level)
    }

    /// Alert Storm Protection's verdict on a DEVICE_ALERT for `su`, recorded in the alert
    /// report; a throttled one is counted, and a storm's start logged.
    fn storm_verdict(
        &mut self,
        su: u32,
        frame: &Frame,
        level: Level,
        enqueued_unix_ns: u64,
        now: Nanos,
    ) -> Verdict {
        let h = &frame.header;
        let verdict = self.storm.on_alert(su, h.device_id, h.alert_code, now);
        self.report.record(
            utc_day(enqueued_unix_ns),
            h.alert_code,
            h.device_id,
            Outcome::from(verdict),
        );
        if verdict != Verdict::Throttled {
            return verdict;
        }
        let storms = self.storm.stats().storms;
        if storms != self.storms_seen {
            self.storms_seen = storms;
            let settings = self.storm.settings();
            let peer = (self.sus.get(su as usize).and_then(Option::as_ref))
                .map_or_else(|| format!("su {su}"), |s| s.label.clone());
            tracing::warn!(
                %peer,
                device = %h.device_id,
                alert_code = %AlertCode(h.alert_code),
                threshold = settings.threshold(),
                window_s = settings.window() / NANOS_PER_SEC,
                "alert storm started: further alerts of this device and code are counted, not delivered, until the window closes"
            );
        }
        self.metrics.count(
            Direction::Northbound,
            h.kind,
            level.get(),
            Seen::Throttled,
            1,
        );
        self.metrics.count_su(su, level.get(), SuOutcome::Throttled);
        verdict
    }

    /// Writes the frames taken since the last call (one write) and places them: in memory, or
    /// counted in the SURB. If the write fails (a full disk), frames that were to be ACKed when
    /// durable are refused (NACK 5); frames already ACKed (durability `none`) stay in memory.
    /// `false` when the write failed.
    pub fn commit(&mut self) -> bool {
        if self.staged.is_empty() {
            return true;
        }
        let written = self.surb.log.write_out();
        self.nms.staged = 0;
        for state in self.sus.iter_mut().chain(self.csps.iter_mut()).flatten() {
            state.staged_memory = 0;
        }
        match &written {
            Err(e) if !self.write_failing => {
                self.write_failing = true;
                tracing::error!(worker = self.index, error = %e, "cannot write the log; refusing frames (NACK 5) until it can");
            }
            Ok(_) if self.write_failing => {
                self.write_failing = false;
                tracing::info!(worker = self.index, "the log takes frames again");
            }
            _ => {}
        }
        let mut staged = std::mem::take(&mut self.staged);
        // Added to the NMS once per batch: its total is shared by every worker, and an atomic
        // add per frame bounced its cache line between them.
        let mut held_now = 0;
        for s in staged.drain(..) {
            let Staged {
                peer,
                level,
                mut held,
                spill,
                ticket,
            } = s;
            match (&written, ticket) {
                (Err(_), Some(ticket)) => {
                    self.acks.push((TicketRun::one(ticket), false));
                    continue;
                }
                // The simulator's deliberate bug (docs/simulation.md): ACK before durable.
                #[cfg(dsplane_mutation = "ack_before_durable")]
                (Ok(_), Some(ticket)) => self.acks.push((TicketRun::one(ticket), true)),
                #[cfg(not(dsplane_mutation = "ack_before_durable"))]
                (Ok(pos), Some(ticket)) => {
                    let merged = match self.awaiting.back_mut() {
                        Some((at, run)) if at == pos => run.extend(&ticket),
                        _ => false,
                    };
                    if !merged {
                        self.awaiting.push_back((*pos, TicketRun::one(ticket)));
                    }
                }
                _ => {}
            }
            self.metrics.count(
                peer.direction(),
                held.frame.header.kind,
                level.get(),
                Seen::Taken,
                1,
            );
            let Some(state) = peer_in(&mut self.sus, &mut self.csps, peer) else {
                continue;
            };
            if spill && written.is_ok() {
                // The simulator's deliberate bug (docs/simulation.md): the SURB's frames of a
                // lane are not counted, so the lane forgets them.
                #[cfg(not(dsplane_mutation = "forget_spilled_lane"))]
                state.sched.add_spilled(level, 1);
                continue;
            }
            if written.is_err() {
                held.stored = None;
            }
            if state.sched.enqueue(level, held).is_err() {
                tracing::error!(peer = %state.label, "scheduler bound reached; frame dropped");
                continue;
            }
            held_now += 1;
        }
        self.nms.add(held_now);
        self.staged = staged;
        written.is_ok()
    }

    /// Hands back, in [`Owner::acks`], the tickets of frames the log has made durable. After a
    /// failed sync nothing it covered can be trusted to be on disk (the kernel may have dropped
    /// the pages): every ticket waiting is refused (NACK 5, the senders may retry).
    pub fn resolve_durable(&mut self) {
        if self.awaiting.is_empty() {
            return;
        }
        if self.surb.log.flush_failed() {
            for (_, run) in self.awaiting.drain(..) {
                self.acks.push((run, false));
            }
            return;
        }
        let durable = self.surb.log.durable_pos();
        while let Some(&(pos, run)) = self.awaiting.front() {
            if pos > durable {
                break;
            }
            self.awaiting.pop_front();
            self.acks.push((run, true));
        }
    }

    /// The next thing the owner asks of the I/O.
    #[inline]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The acknowledgements decided since the last call, in order, as runs ([`TicketRun`]):
    /// `(run, true)` may be ACKed to its sender, `(run, false)` must be refused (NACK 5). A
    /// later run may cover a frame an earlier one already decided; the earlier decision holds.
    #[inline]
    pub fn acks(&mut self) -> std::vec::Drain<'_, (TicketRun, bool)> {
        self.acks.drain(..)
    }

    // ---- peers ------------------------------------------------------------------------------

    /// A peer's connection came (a take-over is a disconnect and a connect): its connection 0.
    pub fn on_connect(&mut self, peer: PeerRef, now: Nanos) {
        self.on_connect_conn(peer, 0, now);
    }

    /// Connection `conn` of a peer came (a CSP link may hold several, numbered from 0 below
    /// its `connections_max`; an SU holds connection 0 only). Its `msg_id`s start at 1.
    pub fn on_connect_conn(&mut self, peer: PeerRef, conn: usize, now: Nanos) {
        if let Some(state) = self.peer_mut(peer) {
            state.sched.connect(conn, now);
            state.connected = true;
        }
    }

    /// A peer's connections went: what they had not acknowledged goes back to the front of its
    /// queues.
    pub fn on_disconnect(&mut self, peer: PeerRef) {
        if let Some(state) = self.peer_mut(peer) {
            if state.connected {
                state.connected = false;
                state.sched.on_disconnect();
            }
        }
    }

    /// Connection `conn` of a peer went: what it had not acknowledged goes back to the queues,
    /// each frame to its place by arrival, to be sent again on another connection (in priority
    /// order) or after a reconnect. What the other connections have in flight stays theirs.
    pub fn on_disconnect_conn(&mut self, peer: PeerRef, conn: usize) {
        if let Some(state) = self.peer_mut(peer) {
            state.sched.disconnect(conn);
            state.connected = state.sched.is_connected();
        }
    }

    /// A peer acknowledged our frames up to `msg_id` on its connection 0: see
    /// [`Owner::on_peer_ack_conn`].
    pub fn on_peer_ack(&mut self, peer: PeerRef, msg_id: u64) {
        self.on_peer_ack_conn(peer, 0, msg_id);
    }

    /// A peer acknowledged the frames sent on its connection `conn` up to `msg_id`: they leave
    /// its scheduler, their log records are marked done, and their memory is freed (a frame
    /// acknowledged ahead of an older one of its lane still in flight on another connection
    /// waits for it, see [`crate::delivery`]).
    pub fn on_peer_ack_conn(&mut self, peer: PeerRef, conn: usize, msg_id: u64) {
        let fifo = self.surb.fifo;
        let log = &mut self.surb.log;
        let Some(state) = peer_in(&mut self.sus, &mut self.csps, peer) else {
            return;
        };
        let key = state.key;
        let metrics = &mut self.metrics;
        let released = state.sched.ack(conn, msg_id, |level, held| {
            delivered(metrics, log, fifo, key, peer, level, held);
        });
        self.nms.release(released as u64);
    }

    /// An operator paused (`true`) or resumed Service User `su`.
    pub fn set_paused(&mut self, su: u32, paused: bool, now: Nanos) {
        let restricted = self.restricted;
        if let Some(state) = self.sus.get_mut(su as usize).and_then(Option::as_mut) {
            state.paused = paused;
            state.sched.set_paused(paused || restricted, now);
        }
    }

    /// An operator restricted (`true`) or restored the whole northbound side.
    pub fn set_restricted(&mut self, restricted: bool, now: Nanos) {
        self.restricted = restricted;
        for state in self.sus.iter_mut().flatten() {
            state.sched.set_paused(state.paused || restricted, now);
        }
    }

    /// Applies a reload: rules for frames classified from now on, storm thresholds and
    /// exclusions, rates. Limiters, throttles and storm windows keep their state.
    pub fn reload(&mut self, reload: &Reload, now: Nanos) {
        self.classifier.set_rules(Arc::clone(&reload.rules));
        self.storm.set_settings(reload.storm.clone(), now);
        for r in &reload.sus {
            if let Some(state) = self.sus.get_mut(r.su as usize).and_then(Option::as_mut) {
                if let Err(e) = state.sched.limiter_mut().set_rate(r.rate, r.burst, now) {
                    tracing::warn!(peer = %state.label, error = %e, "reload: rate refused");
                }
                if let Err(e) = self.throttle.set_rates(r.su, r.sr_rate, r.sr_burst, now) {
                    tracing::warn!(peer = %state.label, error = %e, "reload: Service Request allocation refused");
                }
            }
        }
        for r in &reload.csps {
            if let Some(state) = self.csps.get_mut(r.csp as usize).and_then(Option::as_mut) {
                if let Err(e) = state.sched.limiter_mut().set_rate(r.rate, r.burst, now) {
                    tracing::warn!(peer = %state.label, error = %e, "reload: rate refused");
                }
            }
        }
    }

    // ---- sending ----------------------------------------------------------------------------

    /// Tells every peer's scheduler whether the worker's timer can wake it for a batch of
    /// tokens (a timerfd) or only in millisecond steps (`false`: each token goes as soon as
    /// anything wakes the worker); see [`DeliveryScheduler::set_batch_wakes`].
    pub fn set_batch_wakes(&mut self, batch: bool) {
        let sus = self.sus.iter_mut().flatten();
        for state in sus.chain(self.csps.iter_mut().flatten()) {
            state.sched.set_batch_wakes(batch);
        }
    }

    /// Starts a round of pumps: forgets the rate wake-up of the last one.
    pub fn start_pump(&mut self) {
        self.rate_wake = None;
        self.sent_since_load = false;
        self.load_due = false;
    }

    /// Whether the last [`Owner::poll_transmit`] stopped to let the frames it gave be written
    /// before it reads the SURB: call it again for the same peer once they are.
    pub fn take_load_due(&mut self) -> bool {
        std::mem::take(&mut self.load_due)
    }

    /// The next frame `peer` may be sent now, if it is connected and its window, rate and ramp
    /// allow: stamped with its `msg_id` on this connection and its level. Frames its lane holds
    /// on disk are loaded first (up to [`limits::LOAD_BATCH`] at a time). For a peer with
    /// several connections, [`Owner::poll_transmit_to`] says which one it is for.
    pub fn poll_transmit(&mut self, peer: PeerRef, now: Nanos, unix: u64) -> Option<Frame> {
        self.poll_transmit_ref(peer, now, unix).map(|t| Frame {
            header: t.stamped(),
            payload: t.payload.clone(),
        })
    }

    /// The next frame `peer` may be sent now on one of the connections in `conns` (bit i:
    /// connection i can take a frame now), and which: the open one with the fewest frames in
    /// flight and room in its share of the window. Stamped with that connection's next `msg_id`
    /// and its level.
    pub fn poll_transmit_to(
        &mut self,
        peer: PeerRef,
        conns: u64,
        now: Nanos,
        unix: u64,
    ) -> Option<(usize, Frame)> {
        self.poll_transmit_to_ref(peer, conns, now, unix)
            .map(|(conn, t)| {
                (
                    conn,
                    Frame {
                        header: t.stamped(),
                        payload: t.payload.clone(),
                    },
                )
            })
    }

    /// [`Owner::poll_transmit_to`] with the payload lent, as [`Owner::poll_transmit_ref`]
    /// does: the I/O copies it out, or clones it only to hand it to another thread.
    pub fn poll_transmit_to_ref(
        &mut self,
        peer: PeerRef,
        conns: u64,
        now: Nanos,
        unix: u64,
    ) -> Option<(usize, Transmit<'_>)> {
        let (conn, msg_id, level) = self.next_header(peer, conns, now, unix)?;
        let state = peer_in(&mut self.sus, &mut self.csps, peer)?;
        let held = state.sched.newest_unacked(conn)?;
        Some((
            conn,
            Transmit {
                header: &held.frame.header,
                msg_id,
                priority: level.get(),
                payload: &held.frame.payload,
            },
        ))
    }

    /// [`Owner::poll_transmit`] without taking a reference to the payload: the frame's header,
    /// stamped, and its payload borrowed from the owner, for the I/O to copy out (the engine's
    /// hot path: no reference count is touched).
    pub fn poll_transmit_ref(
        &mut self,
        peer: PeerRef,
        now: Nanos,
        unix: u64,
    ) -> Option<Transmit<'_>> {
        let (conn, msg_id, level) = self.next_header(peer, u64::MAX, now, unix)?;
        // The frame just handed out is the newest unacknowledged one of its connection.
        let state = peer_in(&mut self.sus, &mut self.csps, peer)?;
        let held = state.sched.newest_unacked(conn)?;
        Some(Transmit {
            header: &held.frame.header,
            msg_id,
            priority: level.get(),
            payload: &held.frame.payload,
        })
    }

    /// [`Owner::poll_transmit_ref`] for as many frames as `each` takes, in the same order: `each`
    /// gets each frame lent, stamped, and returns whether it has room for another. Returns how
    /// many went. The engine's send path: with one connection the scheduler hands out runs of
    /// frames (`DeliveryScheduler::send_each`), checking the window, the pacing and the tokens
    /// once per run. As with `poll_transmit_ref`, it may stop to have what it gave written
    /// before it reads the SURB ([`Owner::take_load_due`]).
    pub fn transmit_each(
        &mut self,
        peer: PeerRef,
        now: Nanos,
        unix: u64,
        mut each: impl FnMut(&Transmit<'_>) -> bool,
    ) -> usize {
        self.last_rate_block = None;
        let direction = peer.direction();
        let mut sent = 0;
        for _ in 0..limits::LOADS_PER_POLL_MAX {
            let Some(state) = peer_in(&mut self.sus, &mut self.csps, peer) else {
                return sent;
            };
            if !state.connected {
                return sent;
            }
            let metrics = &mut self.metrics;
            let (n, blocked) = state.sched.send_each(now, usize::MAX, |out| {
                record_latency(metrics, direction, out.level, out.item, unix);
                each(&Transmit {
                    header: &out.item.frame.header,
                    msg_id: out.msg_id,
                    priority: out.level.get(),
                    payload: &out.item.frame.payload,
                })
            });
            sent += n;
            if n > 0 {
                self.sent_since_load = true;
            }
            // `None`: `each` has no room.
            match blocked {
                Some(blocked) if self.blocked_retry(peer, blocked, unix) => {}
                _ => return sent,
            }
        }
        sent
    }

    /// What a send that stopped on `blocked` leaves to do; `true` when it may ask again at
    /// once (the lane it needed was loaded from the SURB). Out of tokens: the rate wake-up.
    /// On the SURB: what was sent goes out before the disk is read (the I/O writes it, sees
    /// `load_due`, and asks again; the receiver's ACKs then come back sooner), else the load.
    fn blocked_retry(&mut self, peer: PeerRef, blocked: Blocked, unix: u64) -> bool {
        match blocked {
            Blocked::Rate(at) => {
                self.rate_wake = Some(self.rate_wake.map_or(at, |w| w.min(at)));
                self.last_rate_block = Some(at);
                false
            }
            Blocked::Load(lane) => {
                if self.sent_since_load {
                    self.sent_since_load = false;
                    self.load_due = true;
                    return false;
                }
                self.load_spilled(peer, lane, unix)
            }
            Blocked::Empty | Blocked::Unavailable | Blocked::Window => false,
        }
    }

    /// Hands out `peer`'s next frame on one of `conns` (see [`Owner::poll_transmit_to`]) and
    /// returns its connection, `msg_id` and level.
    fn next_header(
        &mut self,
        peer: PeerRef,
        conns: u64,
        now: Nanos,
        unix: u64,
    ) -> Option<(usize, u64, Level)> {
        self.last_rate_block = None;
        for _ in 0..limits::LOADS_PER_POLL_MAX {
            let state = peer_in(&mut self.sus, &mut self.csps, peer)?;
            if !state.connected {
                return None;
            }
            match state.sched.next_send_to(conns, now) {
                Ok(out) => {
                    record_latency(
                        &mut self.metrics,
                        peer.direction(),
                        out.level,
                        out.item,
                        unix,
                    );
                    self.sent_since_load = true;
                    return Some((out.conn, out.msg_id, out.level));
                }
                Err(blocked) => {
                    if !self.blocked_retry(peer, blocked, unix) {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Brings up to [`limits::LOAD_BATCH`] frames of a lane back from the SURB into memory;
    /// those older than `retention_h` expire instead.
    /// `false` when nothing could be loaded (the log could not be read).
    fn load_spilled(&mut self, peer: PeerRef, lane: usize, unix: u64) -> bool {
        let fifo = self.surb.fifo;
        let log = &mut self.surb.log;
        let Some(state) = peer_in(&mut self.sus, &mut self.csps, peer) else {
            return false;
        };
        let loaded = match log.load(state.key, lane as u8, limits::LOAD_BATCH, fifo) {
            Ok(l) => {
                state.load_failed = false;
                l
            }
            Err(e) => {
                // Never skipped: the frames stay counted and the load is tried again on the next
                // pump; the lane (and, by strict priority, the lanes below it) waits meanwhile.
                if !state.load_failed {
                    tracing::error!(peer = %state.label, lane, error = %e, "cannot read spilled frames; their lane waits until they can be read");
                    state.load_failed = true;
                }
                return false;
            }
        };
        if loaded.is_empty() {
            tracing::error!(
                peer = %state.label,
                lane,
                counted = state.sched.spilled_in(lane),
                "spilled frames not found in the log"
            );
            state.sched.set_spilled_lane(lane, 0);
            return true;
        }
        let mut expired = Vec::new();
        let mut n = 0;
        // Frames expire in their lane's order only (see `DeliveryScheduler::take_expired`):
        // with a frame of the lane in flight, expired ones are loaded and wait their turn.
        let may_expire = !state.sched.unacked_in(lane);
        for l in loaded {
            let Some(level) = Level::new(l.level) else {
                // A checksummed record cannot say this unless written by another build.
                tracing::error!(peer = %state.label, seq = l.stored.seq, level = l.level, "a frame in the log has a level no configuration allows; it is not delivered");
                continue;
            };
            let held = Held {
                frame: l.frame,
                stored: Some(l.stored),
                enqueued_unix_ns: l.enqueued_unix_ns,
            };
            if may_expire && unix.saturating_sub(held.enqueued_unix_ns) > state.retention {
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
        self.nms.add(n);
        for (level, held) in expired {
            self.expire(peer, level, held, false, unix);
        }
        true
    }

    /// A frame waited longer than `retention_h`: counted, logged, handed out for the expiry
    /// record, and its log record marked done.
    fn expire(&mut self, peer: PeerRef, level: Level, held: Held, in_memory: bool, unix: u64) {
        let lane = self.surb.lane(level);
        let Some(state) = peer_in(&mut self.sus, &mut self.csps, peer) else {
            return;
        };
        let name = state.label.clone();
        if let Some(stored) = held.stored {
            self.surb.log.done(state.key, lane, stored);
        }
        if in_memory {
            self.nms.release(1);
        }
        let h = &held.frame.header;
        self.metrics
            .count(peer.direction(), h.kind, level.get(), Seen::Expired, 1);
        if let PeerRef::Su(su) = peer {
            self.metrics.count_su(su, level.get(), SuOutcome::Expired);
        }
        tracing::warn!(peer = %name, level = level.get(), kind = %h.kind, device = %h.device_id, counter = h.counter, "frame expired after retention_h");
        self.events.push_back(Event::Expired(ExpiredRecord {
            expired_unix_ns: unix,
            peer: name,
            level: level.get(),
            kind: h.kind.to_string(),
            srv: h.srv.to_string(),
            alert_code: h.alert_code,
            su_id: h.su_id.to_string(),
            device_id: h.device_id.to_string(),
            counter: h.counter,
            created_ns: h.created_ns,
            enqueued_unix_ns: held.enqueued_unix_ns,
        }));
    }

    // ---- time -------------------------------------------------------------------------------

    /// When the owner next needs [`Owner::handle_timeout`] (or a pump, for a rate-limited peer).
    pub fn poll_timeout(&self) -> Nanos {
        let mut at = self.next_housekeeping;
        if let Some(r) = self.rate_wake {
            at = at.min(r);
        }
        if let Some(d) = self.storm.next_deadline() {
            at = at.min(d);
        }
        at
    }

    /// When the earliest rate-limited peer of the last pump may send again, if one is waiting
    /// for tokens: the part of [`Owner::poll_timeout`] that says frames are waiting, so that the
    /// worker may stay awake for it (a short spin) but never for housekeeping.
    pub fn rate_wake(&self) -> Option<Nanos> {
        self.rate_wake
    }

    /// Whether the last [`Owner::poll_transmit_ref`] (or [`Owner::poll_transmit_to`]) gave
    /// nothing because its peer had no token, and if so from when it may send again. A worker
    /// whose pump took long enough for that instant to pass may ask again at a later `now`
    /// rather than wait for its next turn: a bucket of 100 tokens at 10 M/s refills in 10 µs,
    /// less than a busy turn lasts.
    pub fn rate_blocked_until(&self) -> Option<Nanos> {
        self.last_rate_block
    }

    /// Time passed: storm windows that closed send their summaries; every
    /// [`limits::HOUSEKEEPING_INTERVAL`], frames older than their retention expire and the
    /// in-flight table forgets old requests. `true` when the housekeeping ran (the engine
    /// publishes its metrics then).
    pub fn handle_timeout(&mut self, now: Nanos, unix: u64) -> bool {
        self.storm_summaries(now, unix);
        if now < self.next_housekeeping {
            return false;
        }
        self.next_housekeeping = now + limits::HOUSEKEEPING_INTERVAL;
        self.classifier.expire(now);
        let mut expired = Vec::new();
        let sus = (self.sus.iter_mut().enumerate()).map(|(i, s)| (PeerRef::Su(i as u32), s));
        let csps = (self.csps.iter_mut().enumerate()).map(|(i, s)| (PeerRef::Csp(i as u32), s));
        for (peer, state) in sus.chain(csps) {
            let Some(state) = state.as_mut() else {
                continue;
            };
            let retention = state.retention;
            let gone = state
                .sched
                .take_expired(|h| unix.saturating_sub(h.enqueued_unix_ns) > retention);
            expired.extend(gone.into_iter().map(|(level, held)| (peer, level, held)));
        }
        for (peer, level, held) in expired {
            self.expire(peer, level, held, true, unix);
        }
        // Acknowledged frames that waited behind the ones that just expired.
        let (fifo, log, metrics) = (self.surb.fifo, &mut self.surb.log, &mut self.metrics);
        let mut released = 0;
        let sus = (self.sus.iter_mut().enumerate()).map(|(i, s)| (PeerRef::Su(i as u32), s));
        let csps = (self.csps.iter_mut().enumerate()).map(|(i, s)| (PeerRef::Csp(i as u32), s));
        for (peer, state) in sus.chain(csps) {
            if let Some(state) = state.as_mut() {
                let key = state.key;
                released += state.sched.release_retired(|level, held| {
                    delivered(metrics, log, fifo, key, peer, level, held);
                });
            }
        }
        self.nms.release(released as u64);
        if let Err(e) = self.surb.log.write_out() {
            tracing::error!(error = %e, "cannot write the log");
        }
        true
    }

    /// Windows that closed with throttled alerts: one STORM_SUMMARY per key, at the lowest
    /// level, through the same path as any frame.
    fn storm_summaries(&mut self, now: Nanos, unix: u64) {
        if self.storm.next_deadline().is_none_or(|d| d > now) {
            return;
        }
        let mut out = std::mem::take(&mut self.summaries);
        out.clear();
        self.storm.poll_summaries(now, &mut out);
        let level = self.classifier.storm_summary();
        for summary in out.drain(..) {
            let Some(state) = self.sus.get(summary.su as usize).and_then(Option::as_ref) else {
                continue;
            };
            let mut h = Header::new(Kind::StormSummary);
            h.su_id = state.su_id;
            h.device_id = summary.device;
            h.alert_code = summary.code;
            h.counter = summary.count;
            h.created_ns = unix;
            tracing::info!(peer = %state.label, device = %summary.device, alert_code = %AlertCode(summary.code), count = summary.count, early = summary.early, "alert storm summary: one STORM_SUMMARY stands for the alerts throttled in the window");
            let _ = self.take(
                Envelope {
                    to: Destination::Northbound {
                        su: summary.su,
                        level,
                    },
                    frame: Frame {
                        header: h,
                        payload: Bytes::new(),
                    },
                    ticket: None,
                    enqueued_unix_ns: unix,
                },
                now,
            );
        }
        self.summaries = out;
        let _ = self.commit();
    }

    // ---- what it shows ----------------------------------------------------------------------

    /// The alert report counted since the last call, if any alert was seen.
    pub fn take_report(&mut self) -> Option<AlertReport> {
        // No day counted: nothing to hand over.
        self.report.days().next()?;
        Some(std::mem::take(&mut self.report))
    }

    /// Fills the gauges of the metrics (queue depths, peers, storm and SURB figures) as they
    /// are now, for publication; `connected` says which peers have a connection.
    pub fn snapshot(&mut self) -> &WorkerMetrics {
        let mut depth = Vec::new();
        let mut peers = Vec::new();
        let sus = (self.sus.iter().enumerate()).map(|(i, s)| (PeerRef::Su(i as u32), s));
        let csps = (self.csps.iter().enumerate()).map(|(i, s)| (PeerRef::Csp(i as u32), s));
        for (peer, state) in sus.chain(csps) {
            let Some(state) = state else { continue };
            let mut snapshot = PeerSnapshot {
                peer,
                connected: state.connected,
                nms: 0,
                surb: 0,
            };
            for lane in 0..state.sched.lanes() {
                let level = lane as u8 + 1;
                let nms = state.sched.waiting_in(lane) as u64;
                let surb = state.sched.spilled_in(lane);
                snapshot.nms += nms;
                snapshot.surb += surb;
                depth.push((state.label.clone(), "nms", level, nms));
                depth.push((state.label.clone(), "surb", level, surb));
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
        self.metrics.surb_bytes = self.surb.log.disk_bytes();
        self.metrics.inflight_requests_evicted = self.classifier.inflight_stats().evicted_full;
        &self.metrics
    }

    /// Alert Storm Protection's figures.
    pub fn storm_stats(&self) -> crate::storm::StormStats {
        self.storm.stats()
    }

    /// Frames of `peer` waiting in memory and on disk, per lane: (NMS, SURB).
    pub fn depth(&self, peer: PeerRef) -> Vec<(usize, u64)> {
        let state = match peer {
            PeerRef::Su(i) => self.sus.get(i as usize),
            PeerRef::Csp(i) => self.csps.get(i as usize),
        };
        let Some(Some(state)) = state else {
            return Vec::new();
        };
        (0..state.sched.lanes())
            .map(|lane| (state.sched.waiting_in(lane), state.sched.spilled_in(lane)))
            .collect()
    }
}

#[cfg(test)]
mod tests;

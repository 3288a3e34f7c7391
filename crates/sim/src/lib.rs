//! dsplane's deterministic simulator, in the way of TigerBeetle's VOPR and FoundationDB's
//! simulation: the engine's real decision code (the owner with its classifier, delivery
//! schedulers, Alert Storm Protection and Service Request throttle; the store, its WAL and
//! recovery) runs against simulated time, a simulated network of peers and a simulated disk
//! ([`dsplane_engine::disk::SimDisk`]), all driven from one seed, while invariants are checked as it
//! runs. Only the I/O is simulated: what the engine's worker does with sockets and rings, the
//! [`World`] does with queues.
//!
//! A run is a function of its seed: the same seed replays the same run, event for event.
//!
//! The owners run on one of two stores ([`StoreKind`]): the disk store of one engine, with its
//! crashes and disk faults, or the `replicated` store of a cluster of nodes over a simulated
//! PostgreSQL, with takeovers, pauses and fencing (the `replicated` module). What the store
//! model adds to a run is behind the `StoreModel` trait; the peers, the traffic and the
//! invariants are the same for both.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use dsplane_core::log::Log;
use dsplane_core::{Nanos, NANOS_PER_SEC};
use dsplane_engine::config::{Config, Durability};
use dsplane_engine::disk::{SimDisk, SimRng};
use dsplane_engine::ids::{Eui64, Level, Srv};
use dsplane_engine::limits::{LOAD_BATCH, RING_BATCH_MAX};
use dsplane_engine::owner::{
    owner_of_csp, owner_of_su, Destination, Envelope, Event, Nms, Owner, OwnerSetup, PeerRef,
    Reload, Taken, Ticket,
};
use dsplane_engine::recovery::{self, LogSettings};
use dsplane_engine::store::{Flusher, LogOptions, Store};
use dsplane_engine::throttle::GlobalIntake;
use dsplane_engine::wire::{Frame, Header, Kind, NackReason};

mod replicated;

const MS: Nanos = 1_000_000;
/// The simulated wall clock at the start of a run (2026-01-01).
const UNIX_START: u64 = 1_767_225_600 * NANOS_PER_SEC;
/// Frames a peer's connection holds on the way to it (its socket buffers): beyond, the owner's
/// pump stops, as the worker's stops at `OUT_BYTES_MAX`.
const INBOX_MAX: usize = 96;
/// Envelopes each simulated ring holds per level (small, so that intake stalls).
const RING_PER_LEVEL: usize = 512;
/// Ticks of the drain at the end of a run, at most.
const DRAIN_TICKS_MAX: u64 = 400_000;
const DATA_DIR: &str = "/sim/data";
/// A DEVICE_ALERT code that storms (strong magnetic field, not excluded).
const STORM_CODE: u16 = 0x8F75;
/// A code that is always excluded from throttling (supply interrupted).
const EXCLUDED_CODE: u16 = 0x8F57;

/// Which store the owners run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreKind {
    /// One engine's disk store (durability `none`, `batch` or `sync`, as the seed draws), with
    /// crashes and disk faults.
    #[default]
    Disk,
    /// The `replicated` store: 2 or 3 nodes over one simulated PostgreSQL, one active at a time
    /// by the lease, with crashes and pauses of the active, an unreachable database, takeovers
    /// and fencing (docs/simulation.md).
    Replicated,
}

/// How long a run is, and on which store.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Steps of traffic and faults before the drain.
    pub steps: u64,
    /// Events kept for the trace of a failure.
    pub trace_len: usize,
    /// The store the owners run on.
    pub store: StoreKind,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            steps: 3_000,
            trace_len: 40,
            store: StoreKind::Disk,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Simulated time, ns.
    pub simulated_ns: u64,
    /// Frames ACKed to their senders (promises made).
    pub acked: u64,
    /// Frames delivered to their receivers (first deliveries).
    pub delivered: u64,
    /// Frames expired.
    pub expired: u64,
    /// Alerts throttled by Alert Storm Protection.
    pub throttled: u64,
    /// Crashes (and recoveries).
    pub crashes: u64,
    /// Of those, deaths in the middle of a recovery.
    pub deaths_in_recovery: u64,
    /// Recoveries that refused a damaged log.
    pub refusals: u64,
    /// Salvages run after a refusal.
    pub salvages: u64,
    /// Frames NACKed (5) because the log could not be written or synced.
    pub refused_writes: u64,
    /// Requests throttled (SECMP0067).
    pub requests_throttled: u64,
    /// Runs whose storm invariant was judged (no crash or takeover lost counts kept in memory).
    pub storms_judged: u64,
    /// Frames a receiver got again after its first copy (at-least-once: a re-send after a
    /// crash or a takeover).
    pub duplicates: u64,
    /// `replicated`: leases taken (the first active of a run included).
    pub acquisitions: u64,
    /// `replicated`: leases taken while an earlier epoch's node was still alive or had been
    /// active (every acquisition after a run's first).
    pub takeovers: u64,
    /// `replicated`: of the takeovers, those whose active before was alive, holding its owners
    /// and their frames in memory (paused, or cut off from the database).
    pub superseded: u64,
    /// `replicated`: nodes that woke from a pause past their lease, so could not act.
    pub woke_unable: u64,
    /// `replicated`: nodes that found themselves fenced (a failed renewal or a refused write).
    pub fenced: u64,
    /// `replicated`: pauses (SIGSTOP) of the active.
    pub pauses: u64,
    /// `replicated`: periods the database was unreachable.
    pub outages: u64,
    /// `replicated`: commits applied whose answer was lost, so retried.
    pub unknown_commits: u64,
    /// `replicated`: transactions the database refused for a stale epoch.
    pub refused_commits: u64,
}

impl Summary {
    /// Adds another run's figures to these.
    pub fn add(&mut self, other: &Summary) {
        self.simulated_ns += other.simulated_ns;
        self.acked += other.acked;
        self.delivered += other.delivered;
        self.expired += other.expired;
        self.throttled += other.throttled;
        self.crashes += other.crashes;
        self.deaths_in_recovery += other.deaths_in_recovery;
        self.refusals += other.refusals;
        self.salvages += other.salvages;
        self.refused_writes += other.refused_writes;
        self.requests_throttled += other.requests_throttled;
        self.storms_judged += other.storms_judged;
        self.duplicates += other.duplicates;
        self.acquisitions += other.acquisitions;
        self.takeovers += other.takeovers;
        self.superseded += other.superseded;
        self.woke_unable += other.woke_unable;
        self.fenced += other.fenced;
        self.pauses += other.pauses;
        self.outages += other.outages;
        self.unknown_commits += other.unknown_commits;
        self.refused_commits += other.refused_commits;
    }
}

/// A failed run: the invariant, and what happened just before.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The store it ran on.
    pub store: StoreKind,
    /// The step it failed at.
    pub step: u64,
    /// What went wrong.
    pub what: String,
    /// The last events, oldest first.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed at step {}: {}",
            self.seed, self.step, self.what
        )?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        let store = match self.store {
            StoreKind::Disk => "",
            StoreKind::Replicated => " --replicated",
        };
        write!(
            f,
            "replay: cargo run --release -p dsplane-sim --{store} --seed {}",
            self.seed
        )
    }
}

/// Runs one seed; a panic anywhere in the engine's code is a failure too.
pub fn run(seed: u64, options: Options) -> Result<Summary, Failure> {
    let trace = std::sync::Arc::new(std::sync::Mutex::new((0u64, VecDeque::<String>::new())));
    let inner = std::sync::Arc::clone(&trace);
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match options.store {
            StoreKind::Disk => World::<DiskStore>::new(seed, options, inner)?.run(),
            StoreKind::Replicated => World::<replicated::Cluster>::new(seed, options, inner)?.run(),
        }));
    match result {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".to_owned());
            let t = trace.lock().map(|t| t.clone()).unwrap_or_default();
            Err(Failure {
                seed,
                store: options.store,
                step: t.0,
                what: format!("panic: {what}"),
                trace: t.1.into_iter().collect(),
            })
        }
    }
}

/// The parameters a seed draws.
#[derive(Debug, Clone)]
struct Params {
    workers: usize,
    levels: u8,
    durability: Durability,
    sus: usize,
    csps: usize,
    crashes: bool,
    disk_faults: bool,
    window: u32,
    rate: u32,
    burst: u32,
    nms_per_su: u64,
    nms_total: u64,
    storm_threshold: u32,
    storm_window_s: u32,
    sr_rate: u32,
    sr_burst: u32,
    /// `[service_requests]`: engine-wide requests per second, and the share of it past which
    /// Service Users over their allocation are throttled.
    capacity: u32,
    threshold_percent: u32,
    /// Every CSP link's `connections_max`: 1, or 2 (a link then opens and closes a second
    /// connection, held by the next worker).
    connections_max: u32,
}

impl Params {
    fn draw(rng: &mut SimRng) -> Params {
        let crashes = !rng.one_in(4) && std::env::var_os("SIM_NO_CRASHES").is_none();
        let durability = match rng.below(3) {
            0 if !crashes => Durability::None,
            1 => Durability::Sync,
            _ => Durability::Batch,
        };
        let mut p = Params {
            workers: 1 + rng.below(3) as usize,
            levels: 3 + rng.below(3) as u8,
            durability,
            sus: 2 + rng.below(4) as usize,
            csps: 1 + rng.below(3) as usize,
            crashes,
            disk_faults: crashes
                && !rng.one_in(3)
                && std::env::var_os("SIM_NO_DISK_FAULTS").is_none(),
            window: 4 + rng.below(60) as u32,
            rate: 200 + rng.below(5_000) as u32,
            burst: 5 + rng.below(100) as u32,
            nms_per_su: 8 + rng.below(300),
            nms_total: 0,
            storm_threshold: 2 + rng.below(20) as u32,
            storm_window_s: 1 + rng.below(5) as u32,
            sr_rate: 20 + rng.below(200) as u32,
            sr_burst: 2 + rng.below(20) as u32,
            capacity: 100 + rng.below(3_000) as u32,
            threshold_percent: 30 + rng.below(60) as u32,
            connections_max: 1,
        };
        p.nms_total = p.nms_per_su + rng.below(2_000);
        // Drawn last, so that the draws above are a seed's as they were.
        p.connections_max = 1 + rng.below(2) as u32;
        p
    }

    fn toml(&self) -> String {
        let mut t = String::new();
        let durability = match self.durability {
            Durability::None => "none",
            Durability::Batch => "batch",
            Durability::Sync => "sync",
            Durability::Replicated => "replicated",
        };
        let _ = write!(
            t,
            "[engine]\nlevels = {}\ndata_dir = \"{DATA_DIR}\"\ndurability = \"{durability}\"\nflush_interval_ms = 2\n\
             [delivery]\nrate = {}\nburst = {}\nwindow = {}\nwindow_reserved_top = 1\nnms_per_su = {}\nnms_total = {}\n\
             release_start = 0.2\nrelease_ramp_s = 2\nretention_h = 48\n\
             [service_requests]\ncapacity = {}\noperating_threshold = {}\nsr_rate = {}\nsr_burst = {}\n",
            self.levels,
            self.rate,
            self.burst,
            self.window,
            self.nms_per_su,
            self.nms_total,
            self.capacity,
            self.threshold_percent as f64 / 100.0,
            self.sr_rate,
            self.sr_burst
        );
        for i in 0..self.sus {
            let _ = write!(
                t,
                "[[service_user]]\nid = \"{}\"\ntoken = \"sim-su-token-{i}\"\n",
                su_id(i)
            );
        }
        let step = u64::MAX / self.csps as u64;
        for i in 0..self.csps {
            let lo = Eui64(step * i as u64);
            let hi = Eui64(if i + 1 == self.csps {
                u64::MAX
            } else {
                step * (i as u64 + 1) - 1
            });
            let _ = write!(
                t,
                "[[csp]]\nname = \"csp-{i}\"\ntoken = \"sim-csp-token-{i}\"\nrate = {}\nburst = {}\nwindow = {}\nconnections_max = {}\ndevice_ranges = [\"{lo}..{hi}\"]\n",
                self.rate * 2,
                self.burst,
                self.window,
                self.connections_max
            );
        }
        let top = self.levels;
        let _ = write!(
            t,
            "[priority]\ndefault_level = {top}\nscheduled_response_level = {top}\nalert_level = {}\n\
             rules = [{{ srv = \"2.2\", level = 1 }}, {{ srv = \"7.*\", level = 1 }}, {{ srv = \"8.1.1\", level = 2 }}, {{ srv = \"4.1.1\", level = 3 }}]\n\
             high_priority_alerts = [{{ code = 0x8F57, level = 1 }}]\n\
             [alert_storm]\nthreshold = {}\nwindow_s = {}\nexclusions = [0x8F57]\nmax_tracked_keys = 100000\n",
            top.min(3),
            self.storm_threshold,
            self.storm_window_s
        );
        t
    }
}

fn su_id(i: usize) -> Eui64 {
    Eui64(0x90B3_D51F_3001_0000 + i as u64)
}

/// SRVs the simulated Service Users ask for, of every level under the simulator's rules.
const SRVS: [Srv; 6] = [
    Srv::new(2, 2, 0),
    Srv::new(7, 1, 0),
    Srv::new(8, 1, 1),
    Srv::new(4, 1, 1),
    Srv::new(4, 4, 2),
    Srv::new(6, 2, 1),
];

/// One connection of a simulated peer.
#[derive(Debug)]
struct Conn {
    epoch: u64,
    /// Frames on their way to the peer: (arrival, frame).
    inbox: VecDeque<(Nanos, Frame)>,
    /// The peer's next `msg_id` for what it sends.
    next_msg_id: u64,
    /// The highest `msg_id` of ours the peer has received, and when it will ACK it.
    ack_due: Option<(Nanos, u64)>,
    /// Sent on this connection so far, per level: frames of the peer's `pending` lists.
    sent: HashSet<u64>,
}

/// A simulated peer (an SU or a CSP link).
#[derive(Debug)]
struct Peer {
    peer: PeerRef,
    owner: usize,
    conn: Option<Conn>,
    /// A CSP link's second connection (`csp.connections_max = 2`), held by the next worker:
    /// the link's requests are spread over both, each with its own `msg_id`s and ACKs.
    extra: Option<Conn>,
    reading: bool,
    ack_delay: Nanos,
    /// SUs: sends more requests than its allocation allows.
    greedy: bool,
    /// A well-behaved SU's own pacing of requests: (tokens, last refill).
    pace: (f64, Nanos),
    /// Frames placed at its owner for it and not yet acknowledged by it, per level, oldest
    /// first: what strict priority and FIFO are checked against.
    pending: Vec<VecDeque<u64>>,
    /// A mirror of its delivery limiter: (tokens, last refill).
    bucket: (f64, Nanos),
    /// CSPs: requests received, to answer.
    to_answer: VecDeque<Header>,
}

/// What the simulator knows of a frame it made.
#[derive(Debug, Clone)]
struct Known {
    to: PeerRef,
    /// Its level when it was placed (its owner's decision).
    level: Option<Level>,
}

/// What a store model adds to a run: how the owners come to be, the store's faults, its part
/// of each turn, whether the peers are served at all, and its own checks. The disk store of one
/// engine is [`DiskStore`]; the replicated store of a cluster is [`replicated::Cluster`].
///
/// Its functions take the whole [`World`], as the store's events reach into everything: a
/// crash drops the owners and every connection.
trait StoreModel: Sized {
    /// The owners' log.
    type Log: Log;
    /// The model's state before [`StoreModel::start`].
    fn new() -> Self;
    /// The store's say in the seed's parameters (after they are drawn).
    fn adjust(_params: &mut Params) {}
    /// Builds the owners at the start of a run.
    fn start(w: &mut World<Self>) -> Result<(), Failure>;
    /// The step's fault draw `r` when it is one of the store's (40 to 49 of 1000).
    fn fault(w: &mut World<Self>, r: u64) -> Result<(), Failure>;
    /// After the step's faults (a fault that ends, a restart that falls due).
    fn after_faults(w: &mut World<Self>) -> Result<(), Failure>;
    /// The store's part of a turn before the owners run: whether a group commit is due.
    fn turn_start(w: &mut World<Self>) -> Result<bool, Failure>;
    /// The store's part of worker `worker`'s turn, after its timeouts.
    fn owner_turn(w: &mut World<Self>, worker: usize, flush_due: bool) -> Result<(), Failure>;
    /// Whether the owners may deal with the peers now (take HELLOs and frames, ACK, deliver).
    fn served(w: &World<Self>) -> bool;
    /// An ACK or a frame goes from the owners to a peer (`what` says which): the model's check.
    fn reaches_peer(w: &World<Self>, what: &dyn Fn() -> String) -> Result<(), Failure>;
    /// The drain begins: the store's faults end.
    fn drain_start(w: &mut World<Self>) -> Result<(), Failure>;
    /// Whether the store has nothing left to do before the final checks.
    fn settled(w: &World<Self>) -> bool;
    /// The store's own checks at the end of a run.
    fn check_end(w: &mut World<Self>) -> Result<(), Failure>;
}

/// The disk store of one engine: `store::Store` on a `SimDisk`, with crashes, crashes during a
/// recovery, and disk faults.
struct DiskStore {
    disk: SimDisk,
    next_flush: Nanos,
    sync_failed: bool,
    crash_at: Option<u64>,
    disk_full_until: Option<u64>,
}

/// The simulated engine and its peers.
struct World<S: StoreModel> {
    seed: u64,
    options: Options,
    rng: SimRng,
    params: Params,
    config: Config,
    now: Nanos,
    /// Added to the wall clock: an outage of days makes frames expire.
    unix_offset: u64,
    /// The store model's own state.
    store: S,
    owners: Vec<Owner<S::Log>>,
    rings: Vec<Vec<VecDeque<Envelope>>>,
    intake: GlobalIntake,
    peers: Vec<Peer>,
    next_epoch: u64,
    next_id: u64,
    known: HashMap<u64, Known>,
    /// (kind, device, counter) of each frame: expiry records name frames by these.
    by_key: HashMap<(String, u64, u64), u64>,
    /// Tickets handed out: (origin, slot, conn epoch, msg_id) → (frame id, ring).
    tickets: HashMap<(u16, u32, u64, u64), (u64, u16)>,
    /// Frames ACKed to their senders: the promise.
    acked: HashSet<u64>,
    /// Alerts throttled: ACKed, and stood for by a summary, not delivered.
    throttled_ids: HashSet<u64>,
    delivered: HashSet<u64>,
    expired: HashSet<u64>,
    /// Throttled alerts per (su, device, code), and what the summaries delivered say.
    throttled: HashMap<(u32, u64, u16), u64>,
    summarised: HashMap<(u32, u64, u16), u64>,
    summaries_seen: HashSet<(u32, u64, u16, u64)>,
    /// Set once a crash may have lost storm counts (kept in memory only).
    storm_counts_lost: bool,
    /// Salvages reported losses: acknowledged frames may be missing, as reported.
    losses_reported: bool,
    /// Frames the salvages said they lost.
    frames_reported_lost: u64,
    restricted: bool,
    paused: Vec<bool>,
    step: u64,
    summary: Summary,
    trace: std::sync::Arc<std::sync::Mutex<(u64, VecDeque<String>)>>,
    /// The frames `SIM_WATCH` names, read once.
    watched: Vec<u64>,
}

type Trace = std::sync::Arc<std::sync::Mutex<(u64, VecDeque<String>)>>;

impl<S: StoreModel> World<S> {
    fn new(seed: u64, options: Options, trace: Trace) -> Result<World<S>, Failure> {
        let mut rng = SimRng::new(seed);
        let mut params = Params::draw(&mut rng);
        S::adjust(&mut params);
        let config = Config::from_toml_with_env(&params.toml(), |_| None).map_err(|e| Failure {
            seed,
            store: options.store,
            step: 0,
            what: format!("the simulator's configuration was refused: {e}"),
            trace: vec![params.toml()],
        })?;
        let intake =
            GlobalIntake::from_config(&config.service_requests, 0).map_err(|e| Failure {
                seed,
                store: options.store,
                step: 0,
                what: e.to_string(),
                trace: Vec::new(),
            })?;
        let levels = usize::from(params.levels);
        let mut peers = Vec::new();
        for (i, su) in config.service_users.iter().enumerate() {
            peers.push(Peer {
                peer: PeerRef::Su(i as u32),
                owner: owner_of_su(su.id, params.workers),
                conn: None,
                extra: None,
                reading: true,
                ack_delay: rng.below(20) * MS,
                greedy: rng.one_in(3),
                pace: (f64::from(params.sr_burst) * 0.5, 0),
                pending: vec![VecDeque::new(); levels],
                bucket: (f64::from(params.burst), 0),
                to_answer: VecDeque::new(),
            });
        }
        for i in 0..config.csps.len() {
            peers.push(Peer {
                peer: PeerRef::Csp(i as u32),
                owner: owner_of_csp(i, params.workers),
                conn: None,
                extra: None,
                reading: true,
                ack_delay: rng.below(10) * MS,
                greedy: false,
                pace: (0.0, 0),
                pending: vec![VecDeque::new(); levels],
                bucket: (f64::from(params.burst), 0),
                to_answer: VecDeque::new(),
            });
        }
        let sus = config.service_users.len();
        let mut world = World {
            seed,
            options,
            rng,
            params,
            config,
            now: 0,
            unix_offset: 0,
            store: S::new(),
            owners: Vec::new(),
            rings: Vec::new(),
            intake,
            peers,
            next_epoch: 1,
            next_id: 1,
            known: HashMap::new(),
            by_key: HashMap::new(),
            tickets: HashMap::new(),
            acked: HashSet::new(),
            throttled_ids: HashSet::new(),
            delivered: HashSet::new(),
            expired: HashSet::new(),
            throttled: HashMap::new(),
            summarised: HashMap::new(),
            summaries_seen: HashSet::new(),
            storm_counts_lost: false,
            losses_reported: false,
            frames_reported_lost: 0,
            restricted: false,
            paused: vec![false; sus],
            step: 0,
            summary: Summary::default(),
            trace,
            watched: std::env::var("SIM_WATCH")
                .map(|w| w.split(',').filter_map(|x| x.trim().parse().ok()).collect())
                .unwrap_or_default(),
        };
        world.note(format!("parameters {:?}", world.params));
        S::start(&mut world)?;
        Ok(world)
    }

    fn fail(&self, what: impl Into<String>) -> Failure {
        let t = self.trace.lock().map(|t| t.1.clone()).unwrap_or_default();
        Failure {
            seed: self.seed,
            store: self.options.store,
            step: self.step,
            what: what.into(),
            trace: t.into_iter().collect(),
        }
    }

    fn note(&self, line: String) {
        if let Ok(mut t) = self.trace.lock() {
            t.0 = self.step;
            t.1.push_back(format!("[{:>9.3} s] {line}", self.now as f64 / 1e9));
            while t.1.len() > self.options.trace_len {
                t.1.pop_front();
            }
        }
    }

    /// Notes an event of a frame named in `SIM_WATCH` (`SIM_WATCH=12,40`), when debugging a
    /// seed; the line is made only for those.
    fn watch(&self, id: u64, what: impl FnOnce() -> String) {
        if self.watched.contains(&id) {
            self.note(format!("frame {id}: {}", what()));
        }
    }

    fn unix(&self) -> u64 {
        UNIX_START + self.now + self.unix_offset
    }

    /// Builds one owner per worker over `logs` (one log each, in worker order), as the
    /// engine's start-up does, with empty rings and every peer disconnected.
    fn install_owners(&mut self, logs: Vec<S::Log>) -> Result<(), Failure> {
        let workers = self.params.workers;
        let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        self.owners.clear();
        for (index, log) in logs.into_iter().enumerate() {
            let setup = OwnerSetup::from_config(&self.config, index, workers)
                .map_err(|e| self.fail(e.to_string()))?;
            let nms = Nms::new(
                std::sync::Arc::clone(&total),
                self.config.delivery.nms_total,
            );
            let owner =
                Owner::new(setup, log, nms, self.now).map_err(|e| self.fail(e.to_string()))?;
            self.owners.push(owner);
        }
        self.rings = (0..workers)
            .map(|_| (0..self.params.levels).map(|_| VecDeque::new()).collect())
            .collect();
        self.restricted = false;
        self.paused.iter_mut().for_each(|p| *p = false);
        self.disconnect_all();
        Ok(())
    }

    /// Every peer's connections are gone (the process that held them died, or it lost the
    /// lease and the peers went to the new active).
    fn disconnect_all(&mut self) {
        for p in &mut self.peers {
            p.conn = None;
            p.extra = None;
            // A new limiter for every peer: the mirror starts full as well.
            p.bucket = (f64::from(self.params.burst), self.now);
        }
    }

    /// The owners are gone with their memory: what each peer waits for is what was promised
    /// (ACKed frames come back from the log; others may), the tickets of frames in the rings
    /// die with them, and throttled alerts' counts kept in memory may be lost.
    fn owners_lost(&mut self) {
        if self.owners.iter().any(|o| o.storm_stats().owed > 0) {
            self.storm_counts_lost = true;
        }
        self.owners.clear();
        self.rings.clear();
        self.tickets.clear();
        for p in &mut self.peers {
            for lane in &mut p.pending {
                lane.retain(|id| self.acked.contains(id));
            }
        }
    }

    fn run(&mut self) -> Result<Summary, Failure> {
        for step in 0..self.options.steps {
            self.step = step;
            self.now += 1 + self.rng.below(2 * MS);
            self.traffic()?;
            self.faults()?;
            self.tick()?;
        }
        self.drain()?;
        self.check_end()?;
        S::check_end(self)?;
        self.summary.simulated_ns = self.now;
        self.summary.acked = self.acked.len() as u64;
        self.summary.delivered = self.delivered.len() as u64;
        self.summary.expired = self.expired.len() as u64;
        Ok(self.summary.clone())
    }

    // ---- peers ------------------------------------------------------------------------------

    fn connect(&mut self, p: usize) -> Result<(), Failure> {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let Some(peer) = self.peers.get_mut(p) else {
            return Ok(());
        };
        let (who, owner) = (peer.peer, peer.owner);
        let took_over = peer.conn.is_some();
        if took_over && matches!(who, PeerRef::Csp(_)) {
            // A CSP link's second HELLO never takes over: it is refused (NACK 5) while its
            // connections are open, so nothing changes.
            self.note(format!("{who:?} HELLO refused: its connection is open"));
            return Ok(());
        }
        peer.conn = Some(Conn {
            epoch,
            inbox: VecDeque::new(),
            next_msg_id: 1,
            ack_due: None,
            sent: HashSet::new(),
        });
        peer.reading = true;
        if let Some(o) = self.owners.get_mut(owner) {
            if took_over {
                o.on_disconnect(who);
            }
        }
        // The worker takes the ring's frames for the peer in before the release.
        self.take_in(owner)?;
        if let Some(o) = self.owners.get_mut(owner) {
            o.on_connect(who, self.now);
        }
        self.note(format!(
            "{who:?} connects (epoch {epoch}, take-over {took_over})"
        ));
        self.carry_out(owner)
    }

    fn disconnect(&mut self, p: usize) {
        let Some(peer) = self.peers.get_mut(p) else {
            return;
        };
        if peer.conn.take().is_none() {
            return;
        }
        let (who, owner) = (peer.peer, peer.owner);
        if let Some(o) = self.owners.get_mut(owner) {
            // A CSP link's other connection, if open, stays.
            o.on_disconnect_conn(who, 0);
        }
        self.note(format!("{who:?} disconnects"));
    }

    /// A CSP link opens its second connection, or closes it.
    fn toggle_extra(&mut self, p: usize) -> Result<(), Failure> {
        let epoch = self.next_epoch;
        let Some(peer) = self.peers.get_mut(p) else {
            return Ok(());
        };
        let (who, owner) = (peer.peer, peer.owner);
        if !matches!(who, PeerRef::Csp(_)) || self.params.connections_max < 2 {
            return Ok(());
        }
        if peer.extra.take().is_some() {
            if let Some(o) = self.owners.get_mut(owner) {
                o.on_disconnect_conn(who, 1);
            }
            self.note(format!("{who:?} closes its second connection"));
            return Ok(());
        }
        self.next_epoch += 1;
        peer.extra = Some(Conn {
            epoch,
            inbox: VecDeque::new(),
            next_msg_id: 1,
            ack_due: None,
            sent: HashSet::new(),
        });
        self.take_in(owner)?;
        if let Some(o) = self.owners.get_mut(owner) {
            o.on_connect_conn(who, 1, self.now);
        }
        self.note(format!(
            "{who:?} opens its second connection (epoch {epoch})"
        ));
        self.carry_out(owner)
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A peer sends a frame: the worker's intake (checks, the owner's intake half, the ring).
    fn send_from(&mut self, p: usize, mut h: Header) -> Result<(), Failure> {
        // A CSP link with two connections sends on either; the second is read by the worker
        // after the link's owner.
        let on_extra =
            self.peers.get(p).is_some_and(|peer| peer.extra.is_some()) && self.rng.one_in(2);
        let Some(peer) = self.peers.get(p) else {
            return Ok(());
        };
        let Some(conn) = (if on_extra {
            peer.extra.as_ref()
        } else {
            peer.conn.as_ref()
        }) else {
            return Ok(());
        };
        let reader = if on_extra {
            (peer.owner + 1) % self.params.workers
        } else {
            peer.owner
        };
        let (who, epoch) = (peer.peer, conn.epoch);
        let (to, receiver_owner) = match (who, h.kind) {
            (PeerRef::Su(_), Kind::Request) => {
                let csp = self
                    .config
                    .csps
                    .iter()
                    .position(|c| c.device_ranges.iter().any(|r| r.contains(h.device_id)));
                let Some(csp) = csp else {
                    return Ok(());
                };
                (
                    PeerRef::Csp(csp as u32),
                    owner_of_csp(csp, self.params.workers),
                )
            }
            (PeerRef::Csp(_), _) => {
                let su = self
                    .config
                    .service_users
                    .iter()
                    .position(|s| s.id == h.su_id);
                let Some(su) = su else { return Ok(()) };
                (
                    PeerRef::Su(su as u32),
                    owner_of_su(h.su_id, self.params.workers),
                )
            }
            _ => return Ok(()),
        };
        let id = self.new_id();
        let peer = &mut self.peers[p];
        let Some(conn) = (if on_extra {
            peer.extra.as_mut()
        } else {
            peer.conn.as_mut()
        }) else {
            return Ok(());
        };
        h.msg_id = conn.next_msg_id;
        conn.next_msg_id += 1;
        let destination = match (who, to) {
            (PeerRef::Su(su), PeerRef::Csp(csp)) => {
                match self.owners[reader].admit_request(su, &h, &self.intake, self.now) {
                    Ok(level) => Destination::Southbound { csp, level },
                    Err(reason) => {
                        if reason == NackReason::Throttled {
                            self.summary.requests_throttled += 1;
                            if !self.peers[p].greedy {
                                return Err(self.fail(format!(
                                    "SECMP0067 throttled {who:?}, which paces its requests within its allocation"
                                )));
                            }
                        }
                        return Ok(());
                    }
                }
            }
            (_, PeerRef::Su(su)) => Destination::Northbound {
                su,
                level: self.owners[reader].intake_level(&h),
            },
            _ => return Ok(()),
        };
        // A full ring level stalls the sender (the engine holds the frame and stops reading the
        // connection): here the frame is not sent.
        let ring_level = destination.level();
        if self.rings[receiver_owner][ring_level.index()].len() >= RING_PER_LEVEL {
            return Ok(());
        }
        let durable = self.config.engine.durability != Durability::None;
        // Numbered as the engine numbers its rings: one per (owner, level).
        let ring =
            (receiver_owner * usize::from(self.config.engine.levels) + ring_level.index()) as u16;
        let ticket = durable.then_some(Ticket {
            origin: reader as u16,
            slot: p as u32,
            conn_id: epoch,
            msg_id: h.msg_id,
            ring,
        });
        if let Some(t) = ticket {
            self.tickets
                .insert((t.origin, t.slot, t.conn_id, t.msg_id), (id, ring));
        } else {
            // Durability `none`: ACKed once it is in the ring.
            self.acked.insert(id);
        }
        self.known.insert(id, Known { to, level: None });
        self.by_key
            .insert((h.kind.to_string(), h.device_id.0, h.counter), id);
        self.watch(id, || {
            format!(
                "sent by {who:?}: {} device {} counter {} msg_id {}",
                h.kind, h.device_id, h.counter, h.msg_id
            )
        });
        let frame = Frame {
            header: h,
            payload: Bytes::copy_from_slice(&id.to_le_bytes()),
        };
        let enqueued_unix_ns = self.unix();
        self.rings[receiver_owner][ring_level.index()].push_back(Envelope {
            to: destination,
            frame,
            ticket,
            enqueued_unix_ns,
        });
        Ok(())
    }

    fn traffic(&mut self) -> Result<(), Failure> {
        if !S::served(self) {
            // No node may act: the peers' HELLOs and frames go unanswered, so they send none.
            return Ok(());
        }
        let sus = self.params.sus;
        let n = self.peers.len();
        for _ in 0..1 + self.rng.below(4) {
            let p = self.rng.below(n as u64) as usize;
            if self.peers[p].conn.is_none() {
                if self.rng.one_in(3) {
                    self.connect(p)?;
                }
                continue;
            }
            match self.peers[p].peer {
                PeerRef::Su(_) => {
                    // A well-behaved SU keeps within 80 % of its allocation.
                    if !self.peers[p].greedy {
                        let rate = f64::from(self.params.sr_rate) * 0.8;
                        let burst = f64::from(self.params.sr_burst) * 0.8;
                        let (tokens, last) = self.peers[p].pace;
                        let tokens = (tokens + rate * (self.now - last) as f64 / 1e9).min(burst);
                        self.peers[p].pace = (tokens, self.now);
                        if tokens < 1.0 {
                            continue;
                        }
                        self.peers[p].pace.0 -= 1.0;
                    }
                    let id = self.next_id;
                    let mut h = Header::new(Kind::Request);
                    h.su_id = su_id(p);
                    h.device_id = Eui64(self.rng.next_u64());
                    h.srv = SRVS[self.rng.below(SRVS.len() as u64) as usize];
                    h.counter = id;
                    h.created_ns = self.unix();
                    self.send_from(p, h)?;
                }
                PeerRef::Csp(_) => {
                    let mut h;
                    if let Some(req) = self.peers[p].to_answer.pop_front() {
                        h = Header::new(Kind::Response);
                        h.su_id = req.su_id;
                        h.device_id = req.device_id;
                        h.srv = req.srv;
                        h.counter = req.counter;
                    } else {
                        h = Header::new(Kind::DeviceAlert);
                        h.su_id = su_id(self.rng.below(sus as u64) as usize);
                        let storm = self.rng.one_in(2);
                        h.device_id = Eui64(if storm { 7 } else { self.rng.next_u64() });
                        h.alert_code = match self.rng.below(10) {
                            0 => EXCLUDED_CODE,
                            1..=6 => STORM_CODE,
                            _ => 0x8000 + self.rng.below(0x7F) as u16,
                        };
                        h.counter = self.next_id;
                    }
                    h.created_ns = self.unix();
                    self.send_from(p, h)?;
                }
            }
        }
        Ok(())
    }

    fn faults(&mut self) -> Result<(), Failure> {
        let n = self.peers.len() as u64;
        let r = self.rng.below(1000);
        if (40..50).contains(&r) {
            S::fault(self, r)?;
            return S::after_faults(self);
        }
        if !S::served(self) {
            // Nobody serves the peers (no node may act): they and the operators wait.
            return S::after_faults(self);
        }
        match r {
            0..=9 => {
                let p = self.rng.below(n) as usize;
                self.disconnect(p);
            }
            10..=14 => {
                let p = self.rng.below(n) as usize;
                if self.peers[p].conn.is_some() {
                    self.connect(p)?; // take-over (an SU's; a CSP's is refused)
                }
            }
            35..=39 if self.params.connections_max > 1 => {
                let p = self.params.sus + self.rng.below(self.params.csps as u64) as usize;
                self.toggle_extra(p)?;
            }
            15..=24 => {
                let p = self.rng.below(n) as usize;
                self.peers[p].reading = !self.peers[p].reading;
                self.note(format!(
                    "{:?} reading {}",
                    self.peers[p].peer, self.peers[p].reading
                ));
            }
            25..=29 => {
                let su = self.rng.below(self.params.sus as u64) as usize;
                self.paused[su] = !self.paused[su];
                let paused = self.paused[su];
                for o in &mut self.owners {
                    o.set_paused(su as u32, paused, self.now);
                }
                self.note(format!("operator: SU {su} paused {paused}"));
            }
            30..=31 => {
                self.restricted = !self.restricted;
                for o in &mut self.owners {
                    o.set_restricted(self.restricted, self.now);
                }
                self.note(format!("operator: restricted {}", self.restricted));
            }
            32..=33 => self.reload(),
            34 if self.rng.one_in(8) => {
                // An outage of two days, as far as the wall clock is concerned.
                self.unix_offset += 49 * 3600 * NANOS_PER_SEC;
                self.note("the wall clock jumps 49 h".into());
            }
            _ => {}
        }
        S::after_faults(self)
    }

    fn reload(&mut self) {
        let levels = self.params.levels;
        let threshold = 2 + self.rng.below(20) as u32;
        let top = 1 + self.rng.below(u64::from(levels)) as u8;
        let text = self.params.toml().replace(
            "{ srv = \"4.1.1\", level = 3 }",
            &format!("{{ srv = \"4.1.1\", level = {top} }}"),
        );
        let text = text.replace(
            &format!("threshold = {}", self.params.storm_threshold),
            &format!("threshold = {threshold}"),
        );
        let Ok(new) = Config::from_toml_with_env(&text, |_| None) else {
            return;
        };
        let Ok(storm) = dsplane_engine::storm::StormSettings::from_config(
            &new.alert_storm,
            self.params.workers as u32,
        ) else {
            return;
        };
        let reload = Reload {
            rules: std::sync::Arc::new(dsplane_engine::classify::Rules::new(&new.priority)),
            storm,
            sus: new
                .service_users
                .iter()
                .enumerate()
                .map(|(i, s)| dsplane_engine::owner::SuRates {
                    su: i as u32,
                    rate: s.delivery.rate,
                    burst: s.delivery.burst,
                    sr_rate: s.sr_rate,
                    sr_burst: s.sr_burst,
                })
                .collect(),
            csps: new
                .csps
                .iter()
                .enumerate()
                .map(|(i, c)| dsplane_engine::owner::CspRates {
                    csp: i as u32,
                    rate: c.rate,
                    burst: c.burst,
                })
                .collect(),
        };
        for o in &mut self.owners {
            o.reload(&reload, self.now);
        }
        self.note(format!(
            "reload: 4.1.1 at level {top}, storm threshold {threshold}"
        ));
    }

    /// Durability: after a recovery, every frame ACKed to its sender and not yet delivered is in
    /// the log (more may be: frames not yet ACKed, or delivered but not yet acknowledged).
    /// `after` names what the log was recovered after (a crash, a takeover).
    fn check_recovered(&mut self, after: &str) -> Result<(), Failure> {
        for p in 0..self.peers.len() {
            let who = self.peers[p].peer;
            let promised: usize = self.peers[p].pending.iter().map(VecDeque::len).sum();
            let w = self.peers[p].owner;
            let depth: u64 = self.owners[w]
                .depth(who)
                .iter()
                .map(|(nms, surb)| *nms as u64 + surb)
                .sum();
            self.note(format!(
                "after recovery {who:?}: {promised} promised frames waiting, {depth} found"
            ));
            if (depth as usize) < promised {
                return Err(self.fail(format!(
                    "after {after}, {who:?} had {promised} frames ACKed to their senders waiting, and recovery found {depth}"
                )));
            }
        }
        Ok(())
    }

    // ---- the owners -------------------------------------------------------------------------

    fn tick(&mut self) -> Result<(), Failure> {
        let now = self.now;
        let unix = self.unix();
        let flush_due = S::turn_start(self)?;
        if S::served(self) {
            for w in 0..self.owners.len() {
                self.take_in(w)?;
                let _ = self.owners[w].handle_timeout(now, unix);
                S::owner_turn(self, w, flush_due)?;
                self.owners[w].resolve_durable();
                self.carry_out(w)?;
                self.pump(w)?;
                self.carry_out(w)?;
            }
            self.peers_read()?;
        }
        self.check_memory()?;
        Ok(())
    }

    /// The owner takes its ring in, and the simulator notes what became of each frame.
    fn take_in(&mut self, w: usize) -> Result<(), Failure> {
        let mut batch = Vec::new();
        'levels: for ring in self.rings[w].iter_mut() {
            while let Some(e) = ring.pop_front() {
                batch.push(e);
                if batch.len() == RING_BATCH_MAX {
                    break 'levels;
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut staged = Vec::new();
        for e in batch {
            let id = frame_id(&e.frame);
            let su = match e.to {
                Destination::Northbound { su, .. } => Some(su),
                Destination::Southbound { .. } => None,
            };
            let key = (e.frame.header.device_id.0, e.frame.header.alert_code);
            let has_ticket = e.ticket.is_some();
            match self.owners[w].take(e, self.now) {
                Taken::Staged(level) => staged.push((id, has_ticket, level)),
                Taken::Throttled => {
                    self.summary.throttled += 1;
                    if let Some(su) = su {
                        *self.throttled.entry((su, key.0, key.1)).or_default() += 1;
                    }
                    // Counted, not delivered: its window's summary stands for it.
                    if let Some(id) = id {
                        self.throttled_ids.insert(id);
                    }
                }
                Taken::Refused => return Err(self.fail("a frame was refused by its own owner")),
            }
        }
        let written = self.owners[w].commit();
        for (id, has_ticket, level) in staged {
            let Some(id) = id else { continue };
            if !written && has_ticket {
                continue; // NACK 5 follows
            }
            let Some(known) = self.known.get_mut(&id) else {
                continue;
            };
            known.level = Some(level);
            let to = known.to;
            self.watch(id, || format!("placed at level {} for {to:?}", level.get()));
            if let Some(peer) = self.peer_index(to) {
                self.peers[peer].pending[level.index()].push_back(id);
            }
        }
        Ok(())
    }

    fn peer_index(&self, peer: PeerRef) -> Option<usize> {
        match peer {
            PeerRef::Su(i) => Some(i as usize),
            PeerRef::Csp(i) => Some(self.params.sus + i as usize),
        }
    }

    fn carry_out(&mut self, w: usize) -> Result<(), Failure> {
        let Some(owner) = self.owners.get_mut(w) else {
            return Ok(());
        };
        // Each run as the frames it covers: those of its connection and ring still waiting
        // (a frame decided before keeps its decision), as the engine's intake applies it.
        let acks: Vec<(Ticket, bool)> = owner
            .acks()
            .flat_map(|(run, durable)| {
                (run.first.msg_id..=run.last_msg_id).map(move |msg_id| {
                    (
                        Ticket {
                            msg_id,
                            ..run.first
                        },
                        durable,
                    )
                })
            })
            .collect();
        let mut events = Vec::new();
        while let Some(e) = owner.poll_event() {
            events.push(e);
        }
        for (ticket, durable) in acks {
            S::reaches_peer(self, &|| {
                let answer = if durable { "an ACK" } else { "a NACK" };
                format!(
                    "{answer} for msg_id {} of slot {}",
                    ticket.msg_id, ticket.slot
                )
            })?;
            let key = (ticket.origin, ticket.slot, ticket.conn_id, ticket.msg_id);
            let Some(&(id, ring)) = self.tickets.get(&key) else {
                continue;
            };
            if ring != ticket.ring {
                continue;
            }
            self.tickets.remove(&key);
            let sender = self.peers.get(ticket.slot as usize);
            let open = sender.is_some_and(|p| {
                [p.conn.as_ref(), p.extra.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|c| c.epoch == ticket.conn_id)
            });
            self.watch(id, || {
                format!("ticket back: durable {durable}, sender still connected {open}")
            });
            if durable && open {
                self.acked.insert(id);
            } else if !durable {
                self.summary.refused_writes += 1;
            }
        }
        for e in events {
            match e {
                Event::Expired(r) => {
                    let kind = r.kind.clone();
                    let device = r
                        .device_id
                        .parse::<Eui64>()
                        .map_err(|_| self.fail("expiry record with a bad device"))?;
                    if kind == Kind::StormSummary.to_string() {
                        // An expired summary is accounted for by its expiry record.
                        let su = r.su_id.parse::<Eui64>().ok().and_then(|id| {
                            self.config.service_users.iter().position(|s| s.id == id)
                        });
                        let Some(su) = su else {
                            return Err(self.fail(format!("an expired summary of no SU: {r:?}")));
                        };
                        let key = (su as u32, device.0, r.alert_code);
                        if self
                            .summaries_seen
                            .insert((key.0, key.1, key.2, r.created_ns))
                        {
                            *self.summarised.entry(key).or_default() += r.counter;
                        }
                        continue;
                    }
                    let Some(&id) = self.by_key.get(&(kind, device.0, r.counter)) else {
                        self.note(format!("an expiry record of no known frame: {r:?}"));
                        continue;
                    };
                    self.watch(id, || "expired".into());
                    self.expired.insert(id);
                    for p in &mut self.peers {
                        for lane in &mut p.pending {
                            lane.retain(|x| *x != id);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn pump(&mut self, w: usize) -> Result<(), Failure> {
        self.owners[w].start_pump();
        let unix = self.unix();
        for p in 0..self.peers.len() {
            if self.peers[p].owner != w {
                continue;
            }
            if let PeerRef::Su(_) = self.peers[p].peer {
                self.pump_su(w, p, unix)?;
                continue;
            }
            loop {
                let peer = &self.peers[p];
                // The connections with room: bit 0 the first, bit 1 a CSP link's second.
                let room = [peer.conn.as_ref(), peer.extra.as_ref()]
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_some_and(|c| c.inbox.len() < INBOX_MAX))
                    .fold(0u64, |m, (k, _)| m | 1 << k);
                if room == 0 {
                    break;
                }
                let who = peer.peer;
                let sent = self.owners[w].poll_transmit_to(who, room, self.now, unix);
                // A load from the SURB may have expired older frames: their records first.
                self.carry_out(w)?;
                let Some((k, frame)) = sent else {
                    // It stopped to have what it gave written before a load: ask again.
                    if self.owners[w].take_load_due() {
                        continue;
                    }
                    break;
                };
                if room & (1 << k) == 0 {
                    return Err(self.fail(format!(
                        "{who:?}: a frame for connection {k}, which had no room"
                    )));
                }
                if !self.deliver(p, k, frame)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// A frame the owner sent on connection `k` of peer `p`: checked, then put in that
    /// connection's inbox to arrive after a random latency. `false` if the connection is gone.
    fn deliver(&mut self, p: usize, k: usize, frame: Frame) -> Result<bool, Failure> {
        let who = self.peers[p].peer;
        if let Some(id) = frame_id(&frame) {
            self.watch(id, || {
                format!(
                    "sent to {who:?} as msg_id {} level {}",
                    frame.header.msg_id, frame.header.priority
                )
            });
        }
        S::reaches_peer(self, &|| {
            format!(
                "a {} (frame {:?}) to {who:?}",
                frame.header.kind,
                frame_id(&frame)
            )
        })?;
        self.check_send(p, k, &frame)?;
        let latency = MS / 10 + self.rng.below(3 * MS);
        let peer = &mut self.peers[p];
        let Some(conn) = (if k == 0 {
            peer.conn.as_mut()
        } else {
            peer.extra.as_mut()
        }) else {
            return Ok(false);
        };
        let at = conn
            .inbox
            .back()
            .map_or(0, |(t, _)| *t)
            .max(self.now + latency);
        conn.inbox.push_back((at, frame));
        Ok(true)
    }

    /// An SU's pump, as the engine's: the owner lends runs of frames (`Owner::transmit_each`)
    /// while its one connection's inbox has room; each is then checked and delivered as the
    /// CSP links' frames are, one by one.
    fn pump_su(&mut self, w: usize, p: usize, unix: u64) -> Result<(), Failure> {
        loop {
            let peer = &self.peers[p];
            let free = peer
                .conn
                .as_ref()
                .map_or(0, |c| INBOX_MAX.saturating_sub(c.inbox.len()));
            if free == 0 {
                return Ok(());
            }
            let who = peer.peer;
            let mut frames = Vec::new();
            self.owners[w].transmit_each(who, self.now, unix, |t| {
                frames.push(Frame {
                    header: t.stamped(),
                    payload: t.payload.clone(),
                });
                frames.len() < free
            });
            // A load from the SURB may have expired older frames: their records first.
            self.carry_out(w)?;
            let full = frames.len() == free;
            for frame in frames {
                if !self.deliver(p, 0, frame)? {
                    return Err(self.fail(format!("{who:?}: a frame sent while disconnected")));
                }
            }
            // It stopped to have what it gave written before a load: ask again.
            if !full && !self.owners[w].take_load_due() {
                return Ok(());
            }
        }
    }

    /// Strict priority, FIFO within a level, and the rate, for one frame the owner sends on
    /// connection `k` of peer `p`. Over a link's connections together: a frame sent on either
    /// is sent.
    fn check_send(&mut self, p: usize, k: usize, frame: &Frame) -> Result<(), Failure> {
        let level = Level::new(frame.header.priority).ok_or_else(|| {
            self.fail(format!("a frame sent with level {}", frame.header.priority))
        })?;
        let who = self.peers[p].peer;
        // The rate: a mirror of the peer's token bucket never runs more than a token short.
        if let PeerRef::Su(_) = who {
            let (rate, burst) = (f64::from(self.params.rate), f64::from(self.params.burst));
            let (tokens, last) = self.peers[p].bucket;
            let tokens = (tokens + rate * (self.now - last) as f64 / 1e9).min(burst) - 1.0;
            self.peers[p].bucket = (tokens, self.now);
            if tokens < -1.0 {
                return Err(self.fail(format!(
                    "{who:?} was sent more than its rate ({rate}/s) plus burst ({burst})"
                )));
            }
        }
        let id = frame_id(frame);
        let peer = &self.peers[p];
        if peer.conn.is_none() && peer.extra.is_none() {
            return Ok(());
        }
        let no_sets = HashSet::new();
        let (first, second) = (
            peer.conn.as_ref().map_or(&no_sets, |c| &c.sent),
            peer.extra.as_ref().map_or(&no_sets, |c| &c.sent),
        );
        let unsent = |i: &&u64| !first.contains(*i) && !second.contains(*i);
        // Strict priority: nothing placed earlier at a more urgent level waits unsent.
        for l in 0..level.index() {
            if let Some(waiting) = peer.pending[l].iter().find(unsent) {
                return Err(self.fail(format!(
                    "{who:?}: a level {} frame was sent while frame {waiting} of level {} waited",
                    level.get(),
                    l + 1
                )));
            }
        }
        if let Some(id) = id {
            if let Some(pos) = peer.pending[level.index()].iter().position(|i| *i == id) {
                // FIFO: every frame placed before it at its level was sent first.
                if let Some(earlier) = peer.pending[level.index()].iter().take(pos).find(unsent) {
                    return Err(self.fail(format!(
                        "{who:?}: frame {id} of level {} overtook frame {earlier} of its level",
                        level.get()
                    )));
                }
                let peer = &mut self.peers[p];
                let conn = if k == 0 {
                    peer.conn.as_mut()
                } else {
                    peer.extra.as_mut()
                };
                if let Some(c) = conn {
                    c.sent.insert(id);
                }
            }
        }
        Ok(())
    }

    /// Connection `k` of peer `p`: 0 its first, 1 a CSP link's second.
    fn conn_mut(&mut self, p: usize, k: usize) -> Option<&mut Conn> {
        let peer = self.peers.get_mut(p)?;
        if k == 0 {
            peer.conn.as_mut()
        } else {
            peer.extra.as_mut()
        }
    }

    /// Peers read what reached them and acknowledge it; CSPs note requests to answer.
    fn peers_read(&mut self) -> Result<(), Failure> {
        for p in 0..self.peers.len() {
            for k in 0..2 {
                self.peer_reads(p, k)?;
            }
        }
        Ok(())
    }

    /// Peer `p` reads what reached it on its connection `k`, and acknowledges it there.
    fn peer_reads(&mut self, p: usize, k: usize) -> Result<(), Failure> {
        {
            let now = self.now;
            let ack_delay = self.peers[p].ack_delay;
            let reading = self.peers[p].reading;
            let who = self.peers[p].peer;
            let owner = self.peers[p].owner;
            let mut got = Vec::new();
            let mut ack = None;
            if let Some(conn) = self.conn_mut(p, k) {
                while reading && conn.inbox.front().is_some_and(|(t, _)| *t <= now) {
                    let Some((_, frame)) = conn.inbox.pop_front() else {
                        break;
                    };
                    // A delayed, cumulative ACK: due a delay after the first frame it covers.
                    let due = conn.ack_due.map_or(now + ack_delay, |(due, _)| due);
                    conn.ack_due = Some((due, frame.header.msg_id));
                    got.push(frame);
                }
                if let Some((due, msg_id)) = conn.ack_due {
                    if due <= now {
                        ack = Some(msg_id);
                        conn.ack_due = None;
                    }
                }
            }
            for frame in got {
                self.received(p, who, frame)?;
            }
            if let Some(msg_id) = ack {
                if let Some(o) = self.owners.get_mut(owner) {
                    o.on_peer_ack_conn(who, k, msg_id);
                }
                // What the peer acknowledged leaves its pending lists.
                if let Some(conn) = self.conn_mut(p, k) {
                    let sent = std::mem::take(&mut conn.sent);
                    for lane in &mut self.peers[p].pending {
                        lane.retain(|id| !sent.contains(id) || !self.delivered.contains(id));
                    }
                    let kept = sent
                        .into_iter()
                        .filter(|id| !self.delivered.contains(id))
                        .collect();
                    if let Some(conn) = self.conn_mut(p, k) {
                        conn.sent = kept;
                    }
                }
            }
        }
        Ok(())
    }

    fn received(&mut self, p: usize, who: PeerRef, frame: Frame) -> Result<(), Failure> {
        let h = frame.header;
        if h.kind == Kind::StormSummary {
            let PeerRef::Su(su) = who else {
                return Err(self.fail("a storm summary sent to a CSP"));
            };
            if self
                .summaries_seen
                .insert((su, h.device_id.0, h.alert_code, h.created_ns))
            {
                *self
                    .summarised
                    .entry((su, h.device_id.0, h.alert_code))
                    .or_default() += h.counter;
            }
            return Ok(());
        }
        let Some(id) = frame_id(&frame) else {
            return Err(self.fail(format!("{who:?} got a {} with no id", h.kind)));
        };
        let Some(known) = self.known.get(&id) else {
            return Err(self.fail(format!(
                "{who:?} got frame {id}, which the simulator never sent"
            )));
        };
        if known.to != who {
            return Err(self.fail(format!(
                "frame {id} for {:?} was delivered to {who:?}",
                known.to
            )));
        }
        self.watch(id, || format!("received by {who:?} as msg_id {}", h.msg_id));
        if !self.delivered.insert(id) {
            self.summary.duplicates += 1;
        } else if h.kind == Kind::Request {
            if let Some(peer) = self.peers.get_mut(p) {
                peer.to_answer.push_back(h);
            }
        }
        Ok(())
    }

    fn check_memory(&self) -> Result<(), Failure> {
        let held: usize = self.owners.iter().map(Owner::held).sum();
        let peers = self.peers.len() as u64;
        let lanes = u64::from(self.params.levels);
        let bound = self.params.nms_total
            + peers * (lanes * LOAD_BATCH as u64 + u64::from(self.params.window));
        if held as u64 > bound {
            return Err(self.fail(format!(
                "{held} frames held in memory, above the bound of {bound} (nms_total {} plus a load batch per lane and a window per peer)",
                self.params.nms_total
            )));
        }
        Ok(())
    }

    // ---- the end ----------------------------------------------------------------------------

    /// No more traffic or faults: every peer connects and reads, operators restore, until
    /// nothing is left to deliver.
    fn drain(&mut self) -> Result<(), Failure> {
        self.note("drain: faults off, every peer connected and reading".into());
        S::drain_start(self)?;
        self.restricted = false;
        for su in 0..self.paused.len() {
            self.paused[su] = false;
        }
        for o in &mut self.owners {
            o.set_restricted(false, self.now);
            for su in 0..self.params.sus {
                o.set_paused(su as u32, false, self.now);
            }
        }
        for p in 0..self.peers.len() {
            self.peers[p].reading = true;
            self.peers[p].to_answer.clear();
        }
        for i in 0..DRAIN_TICKS_MAX {
            // Peers connect as soon as they are served (a takeover may have closed their
            // connections, or no node may act yet).
            if S::served(self) {
                for p in 0..self.peers.len() {
                    if self.peers[p].conn.is_none() {
                        self.connect(p)?;
                    }
                }
            }
            self.now += MS;
            self.tick()?;
            if i % 256 == 0 && self.settled() {
                break;
            }
        }
        Ok(())
    }

    fn settled(&self) -> bool {
        let held: usize = self.owners.iter().map(Owner::held).sum();
        let spilled = self.owners.iter().any(|o| {
            o.peers()
                .any(|p| o.depth(p).iter().any(|(nms, surb)| *nms > 0 || *surb > 0))
        });
        let owed = self.owners.iter().any(|o| o.storm_stats().owed > 0);
        held == 0
            && !spilled
            && !owed
            && self.rings.iter().flatten().all(VecDeque::is_empty)
            && S::settled(self)
    }

    fn check_end(&mut self) -> Result<(), Failure> {
        let mut missing: Vec<u64> = self
            .acked
            .iter()
            .filter(|id| {
                !self.delivered.contains(id)
                    && !self.expired.contains(id)
                    && !self.throttled_ids.contains(id)
            })
            .copied()
            .collect();
        missing.sort_unstable();
        if !missing.is_empty() && missing.len() as u64 > self.frames_reported_lost {
            let first = missing[0];
            let known = self.known.get(&first).cloned();
            return Err(self.fail(format!(
                "{} frames ACKed to their senders were neither delivered nor expired (first: {first}, {known:?}); settled: {}",
                missing.len(),
                self.settled()
            )));
        }
        if !self.storm_counts_lost {
            self.summary.storms_judged = 1;
            for (key, throttled) in &self.throttled {
                let summarised = self.summarised.get(key).copied().unwrap_or(0);
                if summarised != *throttled {
                    return Err(self.fail(format!(
                        "storm summaries for SU {} device {:#x} code {:#06x} say {summarised} alerts, {throttled} were throttled",
                        key.0, key.1, key.2
                    )));
                }
            }
            for (key, summarised) in &self.summarised {
                if !self.throttled.contains_key(key) {
                    return Err(self.fail(format!(
                        "a storm summary of {summarised} alerts for {key:?}, none of which was throttled"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl StoreModel for DiskStore {
    type Log = Store<SimDisk>;

    fn new() -> Self {
        DiskStore {
            disk: SimDisk::new(),
            next_flush: 0,
            sync_failed: false,
            crash_at: None,
            disk_full_until: None,
        }
    }

    fn start(w: &mut World<Self>) -> Result<(), Failure> {
        w.start()
    }

    fn fault(w: &mut World<Self>, r: u64) -> Result<(), Failure> {
        match r {
            40..=42 if w.params.crashes => w.crash("a crash")?,
            43 if w.params.disk_faults && w.store.disk_full_until.is_none() => {
                w.store.disk.fill();
                w.store.disk_full_until = Some(w.step + 20 + w.rng.below(200));
                w.note("disk full".into());
            }
            44 if w.params.disk_faults && !w.store.sync_failed => {
                w.store.disk.fail_syncs(1);
                w.note("the next fsync fails".into());
            }
            45 if w.params.disk_faults && w.rng.one_in(3) => {
                let skip = w.rng.below(1 << 20);
                let flipped = w.store.disk.flip_random_bit(&mut w.rng, skip, |p| {
                    p.extension().is_some_and(|e| e == "wal")
                });
                w.note(format!("bit flip at {flipped:?}"));
                w.crash("a crash after a bit flip")?;
            }
            _ => {}
        }
        Ok(())
    }

    fn after_faults(w: &mut World<Self>) -> Result<(), Failure> {
        if w.store.disk_full_until.is_some_and(|s| s <= w.step) {
            w.store.disk.set_capacity(None);
            w.store.disk_full_until = None;
            w.note("disk space back".into());
        }
        if w.store.crash_at.is_some_and(|s| s <= w.step) {
            w.store.crash_at = None;
            w.crash("the restart after a failed fsync")?;
        }
        Ok(())
    }

    fn turn_start(w: &mut World<Self>) -> Result<bool, Failure> {
        // Group commit: the flusher syncs every flush interval (at once with `sync`).
        let flush_due = w.now >= w.store.next_flush;
        if flush_due {
            // Disk latency: a sync takes 0.1-5 ms on top of the interval, so durability (and
            // every ACK waiting for it) comes later than the group commit asked for.
            let latency = MS / 10 + w.rng.below(5 * MS);
            w.store.next_flush =
                w.now + w.config.engine.flush_interval.as_nanos() as Nanos + latency;
        }
        Ok(flush_due)
    }

    fn owner_turn(w: &mut World<Self>, worker: usize, flush_due: bool) -> Result<(), Failure> {
        if flush_due && w.owners[worker].surb().log().flush_failed() {
            // as the engine: nothing more is acknowledged; the operator restarts it
        } else if flush_due {
            let durable = w.config.engine.durability != Durability::None;
            if durable && w.owners[worker].surb().log().flush().is_err() {
                w.store.sync_failed = true;
                w.note(format!("fsync failed on worker {worker}"));
                if w.params.crashes {
                    w.store.crash_at = Some(w.step + 1 + w.rng.below(50));
                }
            }
        }
        Ok(())
    }

    fn served(_w: &World<Self>) -> bool {
        true
    }

    fn reaches_peer(_w: &World<Self>, _what: &dyn Fn() -> String) -> Result<(), Failure> {
        Ok(())
    }

    fn drain_start(w: &mut World<Self>) -> Result<(), Failure> {
        w.store.disk.set_capacity(None);
        if w.store.sync_failed {
            w.crash("the restart after a failed fsync")?;
        }
        Ok(())
    }

    fn settled(_w: &World<Self>) -> bool {
        true
    }

    fn check_end(_w: &mut World<Self>) -> Result<(), Failure> {
        Ok(())
    }
}

/// The disk store's start-up and crash: recovery (and salvage) on the simulated disk.
impl World<DiskStore> {
    fn settings(&self) -> LogSettings {
        LogSettings {
            workers: self.params.workers,
            fifo: false,
            log: LogOptions {
                durability: self.config.engine.durability,
                flush_interval: self.config.engine.flush_interval,
                reserve_bytes: recovery::reserve_bytes(
                    self.params.sus + self.params.csps,
                    usize::from(self.params.levels),
                ),
            },
        }
    }

    /// Recovers the logs and builds the owners, as the engine's start-up does. A refused log
    /// is salvaged (as an operator would, with `dsplane recover --salvage`), and the loss must
    /// be reported.
    fn start(&mut self) -> Result<(), Failure> {
        let workers = self.params.workers;
        let config = &self.config;
        let owner_of_key = |key| dsplane_engine::owner_in(config, workers)(key);
        let dir = Path::new(DATA_DIR);
        // Sometimes the process dies in the middle of its recovery, at an operation the seed
        // chooses; the next start recovers from whatever that left.
        let recovered = loop {
            let dies = self.params.crashes && self.rng.one_in(5);
            let at = self.rng.below(300);
            if dies {
                self.store.disk.die_after(at);
            }
            let recovered = recovery::recover_on(
                &self.store.disk,
                dir,
                self.settings(),
                owner_of_key,
                |_| Flusher::Manual,
                |_| {},
            );
            if self.store.disk.has_died() {
                drop(recovered);
                self.summary.crashes += 1;
                self.summary.deaths_in_recovery += 1;
                self.note(format!(
                    "the process died during its recovery, at disk operation {at}"
                ));
                self.store.disk.crash(&mut self.rng);
                continue;
            }
            self.store.disk.live_on();
            break recovered;
        };
        let stores = match recovered {
            Ok((stores, report)) => {
                self.note(format!(
                    "recovered: {} frames, {} torn tails, in place {}",
                    report.frames_recovered,
                    report.torn_tails.len(),
                    report.in_place
                ));
                stores
            }
            Err(e) => {
                self.summary.refusals += 1;
                self.note(format!("recovery refused: {e}"));
                let salvaged = recovery::salvage_on(
                    &self.store.disk,
                    dir,
                    self.settings(),
                    owner_of_key,
                    |_| Flusher::Manual,
                    |_| {},
                )
                .map_err(|e| self.fail(format!("salvage failed after a refusal: {e}")))?;
                self.summary.salvages += 1;
                self.note(format!("salvaged: losses {:?}", salvaged.losses));
                if salvaged.losses.is_empty() {
                    return Err(self.fail(format!(
                        "recovery refused the log ({e}) but salvage reported no loss"
                    )));
                }
                self.losses_reported = true;
                // A loss the salvage could not count allows any number missing.
                self.frames_reported_lost = match salvaged.frames_lost {
                    Some(n) => self.frames_reported_lost.saturating_add(n),
                    None => u64::MAX,
                };
                // Which frames the salvage lost is not known here: order is checked from now on
                // only for frames taken after it.
                for p in &mut self.peers {
                    p.pending.iter_mut().for_each(VecDeque::clear);
                }
                let (stores, _) = recovery::recover_on(
                    &self.store.disk,
                    dir,
                    self.settings(),
                    owner_of_key,
                    |_| Flusher::Manual,
                    |_| {},
                )
                .map_err(|e| self.fail(format!("recovery refused a salvaged log: {e}")))?;
                stores
            }
        };
        self.install_owners(stores)
    }

    fn crash(&mut self, why: &str) -> Result<(), Failure> {
        self.summary.crashes += 1;
        self.note(format!("{why}: every owner and connection is gone"));
        // Throttled alerts are counted in memory until their window's summary is taken; what
        // each peer was waiting for: the frames promised (ACKed) come back, others may.
        self.owners_lost();
        self.store.disk.crash(&mut self.rng);
        self.store.disk.set_capacity(None);
        self.store.disk_full_until = None;
        self.store.sync_failed = false;
        self.start()?;
        self.check_recovered("a crash")?;
        // Sometimes the new run dies at once, before it wrote anything but its recovery.
        if self.params.crashes && self.rng.one_in(6) {
            self.summary.crashes += 1;
            self.note("a crash right after recovery".into());
            self.owners.clear();
            self.store.disk.crash(&mut self.rng);
            self.start()?;
            self.check_recovered("a crash")?;
        }
        Ok(())
    }
}

fn frame_id(frame: &Frame) -> Option<u64> {
    let bytes: [u8; 8] = frame.payload.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_exactly() {
        let options = Options {
            steps: 400,
            trace_len: 10,
            ..Options::default()
        };
        for seed in [3, 7, 11] {
            let a = format!(
                "{:?}",
                run(seed, options)
                    .map(|s| format!("{s:?}"))
                    .map_err(|f| f.to_string())
            );
            let b = format!(
                "{:?}",
                run(seed, options)
                    .map(|s| format!("{s:?}"))
                    .map_err(|f| f.to_string())
            );
            assert_eq!(a, b, "seed {seed} did not replay");
        }
    }

    #[test]
    fn a_replicated_seed_replays_exactly() {
        let options = Options {
            steps: 400,
            trace_len: 10,
            store: StoreKind::Replicated,
        };
        for seed in [3, 7, 11] {
            let a = format!("{:?}", run(seed, options).map_err(|f| f.to_string()));
            let b = format!("{:?}", run(seed, options).map_err(|f| f.to_string()));
            assert_eq!(a, b, "seed {seed} did not replay");
        }
    }

    /// The replicated model passes, and its seeds do what it is there for: takeovers, some from
    /// an active still alive, fencing, commits refused and retried.
    #[test]
    fn a_few_replicated_seeds_pass_with_takeovers_and_fencing() {
        let options = Options {
            store: StoreKind::Replicated,
            ..Options::default()
        };
        let mut totals = Summary::default();
        for seed in 0..24 {
            match run(seed, options) {
                Ok(s) => totals.add(&s),
                Err(f) => panic!("{f}"),
            }
        }
        assert!(totals.acked > 10_000, "{totals:?}");
        assert!(totals.takeovers > 0 && totals.superseded > 0, "{totals:?}");
        assert!(
            totals.fenced > 0 && totals.refused_commits > 0,
            "{totals:?}"
        );
        assert!(
            totals.woke_unable > 0 && totals.unknown_commits > 0,
            "{totals:?}"
        );
        assert!(totals.duplicates > 0, "{totals:?}");
    }

    #[test]
    fn a_few_seeds_pass() {
        for seed in 0..16 {
            if let Err(f) = run(seed, Options::default()) {
                panic!("{f}");
            }
        }
    }
}

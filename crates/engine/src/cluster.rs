//! A node of a cluster (`[cluster]`, durability `replicated`; `docs/ha.md`): one of several
//! dsplane hosts on one PostgreSQL, exactly one of them active.
//!
//! [`Node`] runs a thread that is, in turn:
//!
//! - **standby**: its SU and CSP ports answer every HELLO with NACK 5 and the detail
//!   `standby; active node is <name>`, then close; it asks PostgreSQL for the lease every
//!   third of a lease, and keeps trying while PostgreSQL cannot be reached.
//! - **active**, once it holds the lease: it loads what is left in the log (per lane, counted as
//!   backlog and released in priority order with the ramp, as after a restart), numbers its
//!   frames after it, and runs the [`Engine`] with a `replicated` log per worker and the node's
//!   [`Gate`]. It renews the lease every third of a lease and sets the gate to the instant each
//!   renewal guarantees; every write to a peer asks the gate first.
//! - **fenced**: a renewal or a write found a newer epoch (another node took over while this one
//!   was stopped or cut off). The gate shuts at once, so nothing more reaches a peer; the engine
//!   is stopped, its connections closed; and the node is a standby again.
//!
//! A clean stop (SIGTERM) stops the engine, commits what it can, and gives the lease up so that
//! a standby takes over at once instead of after the lease runs out.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use dsplane_cluster::gate::{boottime_ns, Gate};
use dsplane_cluster::lease::{Lease, LeaseMs, Request, Role};
use dsplane_cluster::pg::{ClusterError, Db};
use dsplane_cluster::remote::PgRemote;
use dsplane_cluster::replicated::{LaneBacklog, ReplicatedLog};
use dsplane_core::log::{Loaded, Log, LogPos, PeerKey, Stored, WalError};

use crate::config::{Cluster, Config};
use crate::error::EngineError;
use crate::store::Store;
use crate::wire::{Frame, Header, NackReason, HEADER_LEN};
use crate::Engine;

/// A worker's log: the local WAL, or the `replicated` log in PostgreSQL. One enum rather than
/// a generic worker: the match is one predictable branch per call, and the worker's code is
/// compiled once.
#[derive(Debug)]
pub enum EngineLog {
    /// Durability `none`, `batch` or `sync`.
    Local(Store),
    /// Durability `replicated`.
    Replicated(ReplicatedLog<PgRemote>),
}

macro_rules! each {
    ($self:ident, $log:ident => $e:expr) => {
        match $self {
            EngineLog::Local($log) => $e,
            EngineLog::Replicated($log) => $e,
        }
    };
}

impl Log for EngineLog {
    #[inline]
    fn append(
        &mut self,
        peer: PeerKey,
        lane: u8,
        level: u8,
        frame: &Frame,
        enqueued_unix_ns: u64,
        spill: bool,
    ) -> Stored {
        each!(self, l => Log::append(l, peer, lane, level, frame, enqueued_unix_ns, spill))
    }
    fn write_out(&mut self) -> std::io::Result<LogPos> {
        each!(self, l => Log::write_out(l))
    }
    #[inline]
    fn done(&mut self, peer: PeerKey, lane: u8, stored: Stored) {
        each!(self, l => Log::done(l, peer, lane, stored))
    }
    #[inline]
    fn is_spilled(&self, peer: PeerKey, lane: u8) -> bool {
        each!(self, l => Log::is_spilled(l, peer, lane))
    }
    fn spills(&self) -> Vec<(PeerKey, u8, u64)> {
        each!(self, l => Log::spills(l))
    }
    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        max: usize,
        fifo: bool,
    ) -> Result<Vec<Loaded>, WalError> {
        each!(self, l => Log::load(l, peer, lane, max, fifo))
    }
    fn durable_pos(&self) -> LogPos {
        each!(self, l => Log::durable_pos(l))
    }
    fn flush_failed(&self) -> bool {
        each!(self, l => Log::flush_failed(l))
    }
    fn disk_bytes(&self) -> u64 {
        each!(self, l => Log::disk_bytes(l))
    }
}

/// What an active node's engine starts from: its epoch, where its ids go on, and the log's
/// backlog.
pub struct ReplicatedSetup {
    /// The libpq connection string.
    pub conninfo: String,
    /// The lease's epoch.
    pub epoch: u64,
    /// The id after the highest in the table.
    pub next_id: u64,
    /// Every lane left in the table.
    pub backlog: Vec<LaneBacklog>,
    /// The node's gate.
    pub gate: Arc<Gate>,
    /// Set by any worker's committer that finds itself fenced.
    pub fenced: Arc<AtomicBool>,
    /// Called when `fenced` is set (wakes the node's thread).
    pub on_fenced: Arc<dyn Fn() + Send + Sync>,
}

/// The NACK detail of a standby.
pub fn standby_detail(active: Option<&str>) -> String {
    match active {
        Some(name) => format!("standby; active node is {name}"),
        None => "standby; no active node".to_owned(),
    }
}

/// Pause of the standby's accept loop between looks at its ports.
const STANDBY_POLL: Duration = Duration::from_millis(10);
/// How long a standby waits for a HELLO before refusing the connection anyway.
const STANDBY_HELLO_WAIT: Duration = Duration::from_millis(200);

/// A standby's ports: every connection gets NACK 5 and is closed.
struct StandbyPorts {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StandbyPorts {
    fn bind(
        config: &Config,
        active: Arc<Mutex<Option<String>>>,
    ) -> Result<StandbyPorts, EngineError> {
        let bind = |addr: SocketAddr, port: crate::error::Port| {
            let l = TcpListener::bind(addr).map_err(|source| EngineError::Bind {
                port,
                addr,
                source,
            })?;
            l.set_nonblocking(true)
                .map_err(|source| EngineError::Bind { port, addr, source })?;
            Ok::<_, EngineError>(l)
        };
        let listeners = [
            bind(config.listen.su, crate::error::Port::Su)?,
            bind(config.listen.csp, crate::error::Port::Csp)?,
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("dsplane-standby".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let mut idle = true;
                        for l in &listeners {
                            while !stop.load(Ordering::Acquire) {
                                let Ok((stream, _)) = l.accept() else {
                                    break;
                                };
                                idle = false;
                                let name = active
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .clone();
                                refuse(stream, &standby_detail(name.as_deref()));
                            }
                        }
                        if idle {
                            std::thread::sleep(STANDBY_POLL);
                        }
                    }
                })
                .map_err(|source| EngineError::Spawn {
                    thread: crate::error::EngineThread::Acceptor,
                    source,
                })?
        };
        Ok(StandbyPorts {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StandbyPorts {
    /// Closes the ports (the active's engine binds them again).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads the HELLO's header (for its msg_id) if it comes soon, answers NACK 5 and closes.
fn refuse(mut stream: TcpStream, detail: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(STANDBY_HELLO_WAIT));
    let _ = stream.set_write_timeout(Some(STANDBY_HELLO_WAIT));
    let mut header = [0u8; HEADER_LEN];
    let msg_id = match stream.read_exact(&mut header) {
        Ok(()) => {
            Header::decode(&header, crate::wire::PAYLOAD_BYTES_MAX_CEILING).map_or(0, |h| h.msg_id)
        }
        Err(_) => 0,
    };
    let nack = Frame::nack(msg_id, NackReason::Overloaded, detail);
    let mut bytes = Vec::with_capacity(nack.wire_len());
    bytes.extend_from_slice(&nack.header_bytes());
    bytes.extend_from_slice(&nack.payload);
    let _ = stream.write_all(&bytes);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// What the node's thread is asked from outside.
#[derive(Debug, Default)]
struct Control {
    stop: AtomicBool,
    /// Wakes the node's thread early (a stop, a fenced write).
    wake: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Control {
    fn poke(&self) {
        *self.wake.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cv.notify_all();
    }

    fn sleep(&self, d: Duration) {
        let mut woken = self.wake.lock().unwrap_or_else(PoisonError::into_inner);
        if !*woken {
            woken = self
                .cv
                .wait_timeout(woken, d)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *woken = false;
    }
}

/// A node of a cluster. See the module documentation.
pub struct Node {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
    engine: EngineAddrs,
}

/// The SU and CSP addresses an active node's engine bound (none while standing by).
type EngineAddrs = Arc<Mutex<Option<(SocketAddr, SocketAddr)>>>;

/// Stops a [`Node`] from another thread (a signal handler's).
#[derive(Clone)]
pub struct NodeStopper(Arc<Control>);

impl NodeStopper {
    /// Asks the node to stop: its engine if active, its ports if standby.
    pub fn stop(&self) {
        self.0.stop.store(true, Ordering::Release);
        self.0.poke();
    }
}

impl Node {
    /// Checks PostgreSQL (reachable, these credentials, a schema this build knows, created if
    /// absent) and starts the node's thread as a standby.
    ///
    /// # Errors
    ///
    /// No `[cluster]`, PostgreSQL refusing the credentials or holding a newer schema, or the
    /// standby's ports cannot be bound. PostgreSQL unreachable is not an error: the standby
    /// keeps trying.
    pub fn start(config: Config) -> Result<Node, EngineError> {
        let cluster = config
            .cluster
            .clone()
            .ok_or(EngineError::ClusterNeedsNode)?;
        let lease =
            LeaseMs::new(cluster.lease_ms).map_err(|e| EngineError::Cluster(e.to_string()))?;
        match Db::connect(cluster.postgres.expose_str()).and_then(|mut db| db.init()) {
            Ok(version) => {
                tracing::info!(node = %cluster.node, schema = version, "PostgreSQL reached; schema ready")
            }
            Err(e @ (ClusterError::Unreachable { .. } | ClusterError::Query(_))) => {
                tracing::warn!(node = %cluster.node, error = %e, "PostgreSQL cannot be reached yet; standing by and trying again");
            }
            Err(e) => return Err(EngineError::Cluster(e.to_string())),
        }
        let control = Arc::new(Control::default());
        let engine: EngineAddrs = Arc::default();
        let active = Arc::new(Mutex::new(None));
        let ports = StandbyPorts::bind(&config, Arc::clone(&active))?;
        tracing::info!(node = %cluster.node, su = %config.listen.su, csp = %config.listen.csp, "standby: refusing HELLOs until this node holds the lease");
        let thread = {
            let control = Arc::clone(&control);
            let engine = Arc::clone(&engine);
            std::thread::Builder::new()
                .name("dsplane-node".into())
                .spawn(move || {
                    NodeLoop {
                        config,
                        cluster,
                        lease,
                        control,
                        engine,
                        active,
                        renew_failing: AtomicBool::new(false),
                    }
                    .run(Some(ports));
                })
                .map_err(|source| EngineError::Spawn {
                    thread: crate::error::EngineThread::Acceptor,
                    source,
                })?
        };
        Ok(Node {
            control,
            thread: Some(thread),
            engine,
        })
    }

    /// A handle to stop the node from another thread.
    pub fn stopper(&self) -> NodeStopper {
        NodeStopper(Arc::clone(&self.control))
    }

    /// The SU and CSP addresses of its engine, while active (with port 0 in `[listen]`, the
    /// ones bound).
    pub fn engine_addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        *self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the node to stop (after [`NodeStopper::stop`]).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the node's thread panicked");
            }
        }
    }
}

struct NodeLoop {
    config: Config,
    cluster: Cluster,
    lease: LeaseMs,
    control: Arc<Control>,
    engine: EngineAddrs,
    /// The active node's name, as the standby last read it (for its NACK).
    active: Arc<Mutex<Option<String>>>,
    /// Renewals are failing (logged once until one succeeds).
    renew_failing: AtomicBool,
}

impl NodeLoop {
    fn stopping(&self) -> bool {
        self.control.stop.load(Ordering::Acquire)
    }

    fn conninfo(&self) -> &str {
        self.cluster.postgres.expose_str()
    }

    /// A connection for the lease, its statements bounded by a third of the lease.
    fn lease_db(&self) -> Result<Db, ClusterError> {
        let mut db = Db::connect(self.conninfo())?;
        db.set_timeouts(self.lease.get() / 3)?;
        Ok(db)
    }

    fn run(self, mut ports: Option<StandbyPorts>) {
        let mut db: Option<Db> = None;
        while !self.stopping() {
            if ports.is_none() {
                match StandbyPorts::bind(&self.config, Arc::clone(&self.active)) {
                    Ok(p) => ports = Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, "standby cannot bind its ports; trying again");
                        self.control.sleep(Duration::from_millis(self.lease.get()));
                        continue;
                    }
                }
            }
            let Some((epoch, sent)) = self.stand_by(&mut db) else {
                break;
            };
            // The active's engine binds the ports.
            drop(ports.take());
            self.lead(epoch, sent, &mut db);
        }
        drop(ports);
        tracing::info!(node = %self.cluster.node, "node stopped");
    }

    /// Asks for the lease until it is this node's: its epoch, and when the request that took it
    /// was sent (the lease runs from no earlier than that). `None` once the node is stopped.
    fn stand_by(&self, db: &mut Option<Db>) -> Option<(u64, u64)> {
        let mut failures = 0u64;
        loop {
            if self.stopping() {
                return None;
            }
            let sent = boottime_ns();
            let outcome = connect(db, || self.lease_db()).and_then(|d| {
                let got = d.try_acquire(&self.cluster.node, self.lease)?;
                if got.is_none() {
                    let holder = d.holder()?;
                    *self.active.lock().unwrap_or_else(PoisonError::into_inner) =
                        holder.filter(|h| !h.expired).map(|h| h.node);
                }
                Ok(got)
            });
            match outcome {
                Ok(Some(epoch)) => return Some((epoch, sent)),
                Ok(None) => failures = 0,
                Err(e) => {
                    if failures == 0 {
                        tracing::warn!(node = %self.cluster.node, error = %e, "standby cannot reach PostgreSQL; trying again");
                    }
                    failures += 1;
                    *db = None;
                }
            }
            self.control
                .sleep(Duration::from_millis(self.lease.get() / 3));
        }
    }

    /// Runs the engine while the lease is this node's.
    fn lead(&self, epoch: u64, sent: u64, db: &mut Option<Db>) {
        // The lease runs from the server's instant, which is after `sent`: counted from `sent`,
        // the node stops acting before the row can expire.
        let mut lease = Lease::new(self.lease);
        if let Some((ticket, Request::Acquire)) = lease.poll(sent) {
            lease.on_acquired(ticket, Some(epoch), sent);
        }
        let gate = Arc::new(Gate::closed());
        gate.set(lease.acts_until());
        let fenced = Arc::new(AtomicBool::new(false));
        tracing::info!(node = %self.cluster.node, epoch, "lease taken: this node is active");
        let engine = match self.take_over(epoch, db, &mut lease, &gate, &fenced) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(node = %self.cluster.node, epoch, error = %e, "cannot become active; giving the lease up");
                if let Some(d) = db.as_mut() {
                    let _ = d.release(&self.cluster.node, epoch);
                }
                self.control.sleep(Duration::from_millis(self.lease.get()));
                return;
            }
        };
        *self.engine.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((engine.su_addr(), engine.csp_addr()));
        tracing::info!(node = %self.cluster.node, epoch, "active: accepting HELLOs and delivering");
        loop {
            if fenced.load(Ordering::Acquire) {
                lease.on_fenced();
            }
            if self.stopping() || matches!(lease.role(), Role::Fenced { .. }) {
                break;
            }
            self.renew_due(&mut lease, db, &gate);
            let now = boottime_ns();
            let wait = lease
                .next_deadline(now)
                .map_or(self.lease.get() * 1_000_000 / 10, |d| d.saturating_sub(now));
            self.control
                .sleep(Duration::from_nanos(wait.max(1_000_000)));
        }
        // Fenced or stopping: nothing more reaches a peer from here on.
        gate.set(0);
        let was_fenced = matches!(lease.role(), Role::Fenced { .. });
        if was_fenced {
            tracing::error!(node = %self.cluster.node, epoch, "fenced: another node took the lease over; closing every connection and standing by");
        }
        engine.shutdown();
        engine.join();
        *self.engine.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if !was_fenced {
            // A clean stop: the lease goes at once.
            if let Ok(d) = connect(db, || self.lease_db()) {
                if matches!(d.release(&self.cluster.node, epoch), Ok(true)) {
                    tracing::info!(node = %self.cluster.node, epoch, "lease given up");
                }
            }
        }
    }

    /// Renews the lease if a renewal is due, and sets the gate from the answer.
    fn renew_due(&self, lease: &mut Lease, db: &mut Option<Db>, gate: &Gate) {
        let now = boottime_ns();
        if let Some((ticket, Request::Renew { epoch })) = lease.poll(now) {
            let result = connect(db, || self.lease_db())
                .and_then(|d| d.renew(&self.cluster.node, epoch, self.lease));
            match result {
                Ok(ok) => {
                    if self.renew_failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(node = %self.cluster.node, epoch, "lease renewed again");
                    }
                    lease.on_renewed(ticket, ok);
                }
                Err(e) => {
                    // Once per streak: the retries come every tenth of a lease.
                    if !self.renew_failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(node = %self.cluster.node, epoch, error = %e, "cannot renew the lease; delivering stops when it runs out, retrying");
                    }
                    *db = None;
                    lease.on_failed(ticket, boottime_ns());
                }
            }
            gate.set(lease.acts_until());
        }
    }

    /// What a new active starts from, read on a connection of its own (a large backlog may take
    /// longer than a lease statement's bound): the layout check, the lanes left, the next id.
    fn read_log(&self) -> Result<(Vec<dsplane_cluster::log::LaneCount>, u64), EngineError> {
        let cluster_err = |e: ClusterError| EngineError::Cluster(e.to_string());
        let mut d = Db::connect(self.conninfo()).map_err(cluster_err)?;
        let layout = lane_layout(&self.config);
        if let Some(theirs) = d.claim_layout(&layout).map_err(cluster_err)? {
            return Err(EngineError::Cluster(format!(
                "the log's lanes were written by a node with {theirs}, this one has {layout}; every node of a cluster must have the same engine.scheduling and engine.levels (or let the log drain first)"
            )));
        }
        let lanes = dsplane_cluster::log::backlog(&mut d).map_err(cluster_err)?;
        let next_id = dsplane_cluster::log::next_id(&mut d).map_err(cluster_err)?;
        Ok((lanes, next_id))
    }

    /// Loads the backlog, renewing the lease meanwhile, and starts the engine on it.
    fn take_over(
        &self,
        epoch: u64,
        db: &mut Option<Db>,
        lease: &mut Lease,
        gate: &Arc<Gate>,
        fenced: &Arc<AtomicBool>,
    ) -> Result<Engine, EngineError> {
        let loaded = std::thread::scope(|s| {
            let reading = s.spawn(|| self.read_log());
            // A table of millions of rows takes a while to count: the lease must not run out
            // meanwhile, or another standby would take it and do the same.
            while !reading.is_finished() {
                self.renew_due(lease, db, gate);
                if matches!(lease.role(), Role::Fenced { .. }) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            reading
                .join()
                .unwrap_or_else(|_| Err(EngineError::Cluster("the log's reader panicked".into())))
        });
        if matches!(lease.role(), Role::Fenced { .. }) {
            return Err(EngineError::Cluster(
                "fenced while loading the log: another node took the lease".into(),
            ));
        }
        let (lanes, next_id) = loaded?;
        let backlog: Vec<LaneBacklog> = lanes
            .into_iter()
            .filter_map(|l| {
                Some(LaneBacklog {
                    peer: PeerKey::from_parts(l.peer_kind, l.peer_id)?,
                    lane: l.lane,
                    count: l.count,
                    first_id: l.first_id,
                })
            })
            .collect();
        let frames: u64 = backlog.iter().map(|b| b.count).sum();
        tracing::info!(node = %self.cluster.node, epoch, frames, lanes = backlog.len(), next_id, "log loaded from PostgreSQL");
        let control = Arc::clone(&self.control);
        let setup = ReplicatedSetup {
            conninfo: self.conninfo().to_owned(),
            epoch,
            next_id,
            backlog,
            gate: Arc::clone(gate),
            fenced: Arc::clone(fenced),
            on_fenced: Arc::new(move || control.poke()),
        };
        Engine::start_replicated(self.config.clone(), setup)
    }
}

/// How the log's lanes are laid out, which every node of a cluster must share: a lane is a
/// level, or the one FIFO queue (`dsplane_core::log::lane_of`).
fn lane_layout(config: &Config) -> String {
    match config.engine.scheduling {
        crate::config::Scheduling::Fifo => "scheduling fifo".to_owned(),
        _ => format!("scheduling priority, {} levels", config.engine.levels),
    }
}

/// The connection in `db`, made with `open` if there is none.
fn connect(
    db: &mut Option<Db>,
    open: impl FnOnce() -> Result<Db, ClusterError>,
) -> Result<&mut Db, ClusterError> {
    let d = match db.take() {
        Some(d) => d,
        None => open()?,
    };
    Ok(db.insert(d))
}

//! dsplane-engine: the running dataplane: an acceptor thread and one pinned worker per core (ENGINE.md §6).
//!
//! # Shape
//!
//! ```text
//!            SU port ─┐                     ┌─ worker 0: Poll, SU/CSP connections it owns,
//!  acceptor  CSP port ─┤ HELLO, token check  │   their schedulers, its classifier
//!  (thread)            └─ hand-off ─────────▶├─ worker 1: …
//!                                            └─ …
//!  worker A reads a frame for a peer owned by worker B
//!      ──▶ B's MPSC priority ring (lock-free) ──▶ mio::Waker ──▶ B schedules and sends it
//! ```
//!
//! Every SU and CSP link is owned by one worker (an SU by a hash of its id, a CSP link by its
//! index), so its scheduler, limiter and in-flight table are touched by one thread only, without
//! locks. What is shared (`Shared`, in `shared.rs`): the rings (one consumer each: the owner); the
//! control channels that carry new connections from the acceptor and operator actions from the
//! admin interface; the engine-wide Service Request intake of SECMP0067
//! ([`crate::throttle::GlobalIntake`], atomics); one relaxed counter of the frames held in memory
//! for every receiver together; and, off the message path, the configuration being reloaded, the
//! alert report and the workers' published metrics, each behind a mutex.
//!
//! # What bounds memory
//!
//! * **Intake.** A worker pushes each frame it reads into its owner's ring, which holds
//!   [`RING_FRAMES_PER_LEVEL`] frames per level. When that level is full the frame is held on its
//!   connection (one frame per connection) and nothing more is read from that connection until
//!   the frame goes in, so TCP's flow control slows the sender; no frame is refused for a full
//!   ring. A frame is ACKed once it is in the ring (durability `none`) or once its owner has
//!   written it durably (otherwise), never before it has a place.
//! * **Frames waiting for their receiver.** The owner keeps a frame in memory (the NMS) while its
//!   receiver holds fewer than its share (`delivery.nms_per_su`) and the shared counter
//!   (`Shared::memory_frames`) is below `delivery.nms_total`; otherwise the frame goes to the
//!   SURB, on disk in the worker's log, and is loaded back a batch at a time as the receiver takes
//!   frames. The counter is read `Relaxed` and added to after a batch is placed, so workers
//!   placing batches at once may pass `nms_total` by what the others place in one batch: the bound
//!   holds to within a few batches, not exactly.
//! * **Output.** A connection takes frames from its scheduler only while less than
//!   `OUT_BYTES_MAX` (1 MiB, `conn.rs`) is queued for
//!   it.
//! * **Before HELLO.** [`crate::admission`] caps the handshakes in progress (per address and in
//!   all) and the acceptor reads at most one HELLO's bytes from each.
//!
//! What is refused rather than held: a Service Request over its SU's allocation or the engine's
//! capacity (NACK, [`crate::throttle`]), and frames whose log write failed (NACK 5, durability
//! other than `none`).
//!
//! The sans-IO pieces do the deciding: [`crate::wire`] (framing), [`crate::classify`] (levels),
//! [`crate::delivery`] (strict priority, window, rate, ramp) and [`crate::limiter`]; the code here
//! only moves bytes and envelopes between them.

#![warn(missing_docs)]

// The I/O around the core: the write-ahead log and the disk it is written on.
pub mod checksum;
pub mod cluster;
pub mod datadir;
pub mod disk;
pub mod recovery;
pub mod store;
pub mod wal;

// The core's modules, and the protocol's through it, under the paths this crate's code was
// written with (`crate::config`, `crate::wire`): one dependency on the engine gives them all.
pub use dsplane_core::{
    admission, classify, config, counters, delivery, ids, limiter, limits, log, one_line, owner,
    report, ring, storm, sync, throttle, wire, Nanos, NANOS_PER_SEC,
};
pub use dsplane_proto::{client, unix_now};

mod acceptor;
mod admin;
mod conn;
mod error;
mod metrics;
mod shared;
mod timer;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::{Poll, Waker};

use crate::config::Config;
use crate::ids::Level;
use shared::{Envelope, Shared, WorkerLink};

pub use error::{EngineError, EngineThread, Port};

/// Pins the calling worker thread to `core`. A refusal is not fatal: the worker runs unpinned,
/// slower under load but correct, and a WARN says which worker and core, and why (typically a
/// seccomp filter or a cpuset that excludes the core). A service manager that *kills* on the
/// call (systemd's `SystemCallFilter=` without `SystemCallErrorNumber=`) cannot be survived
/// here, which is why the shipped unit allows `sched_setaffinity` (tools/systemd/dsplane.service).
fn pin_worker(worker: usize, core: Option<core_affinity::CoreId>) {
    let Some(id) = core else {
        tracing::warn!(
            worker,
            "core pinning unavailable (the CPU list could not be read); running unpinned"
        );
        return;
    };
    if core_affinity::set_for_current(id) {
        tracing::info!(worker, core = id.id, "worker pinned");
    } else {
        // Read at once: errno is the thread's own and nothing has run since the call.
        let error = io::Error::last_os_error();
        tracing::warn!(
            worker,
            core = id.id,
            error = %error,
            "core pinning refused; running unpinned"
        );
    }
}

/// Frames each worker's ring holds per level ([`crate::limits::RING_FRAMES_PER_LEVEL`]).
pub use crate::limits::RING_FRAMES_PER_LEVEL;
use crate::limits::{LISTEN_BACKLOG, SOCKET_BUFFER_BYTES};

/// A running engine. Dropping it does not stop it; call [`Engine::shutdown`] and
/// [`Engine::join`].
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    /// Held until the engine is joined: one engine per data_dir.
    _lock: crate::datadir::DataDirLock,
    su_addr: SocketAddr,
    csp_addr: SocketAddr,
    admin_addr: SocketAddr,
    acceptor_waker: Arc<Waker>,
    threads: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Binds the SU and CSP ports and starts the acceptor and the workers.
    ///
    /// # Errors
    ///
    /// An [`EngineError`] naming what failed: the data directory's lock (another engine holds
    /// it), a port that cannot be bound, recovery refusing the data directory, or a ring, event
    /// loop or thread that cannot be created.
    pub fn start(config: Config) -> Result<Engine, EngineError> {
        Engine::start_with_rings(config, RING_FRAMES_PER_LEVEL)
    }

    /// [`Engine::start`] with rings of `frames_per_level` (a power of two) instead of
    /// [`RING_FRAMES_PER_LEVEL`]: for tests that need a ring to fill (intake holding frames,
    /// the ACK of a batch held back).
    ///
    /// # Errors
    ///
    /// As [`Engine::start`].
    #[doc(hidden)]
    pub fn start_with_rings(
        config: Config,
        frames_per_level: usize,
    ) -> Result<Engine, EngineError> {
        if config.cluster.is_some() {
            return Err(EngineError::ClusterNeedsNode);
        }
        Engine::start_inner(config, frames_per_level, None)
    }

    /// The engine of an active node of a cluster ([`crate::cluster::Node`] starts it once it
    /// holds the lease): a `replicated` log per worker, going on from `setup`'s backlog, and
    /// every write to a peer asking `setup.gate`.
    ///
    /// # Errors
    ///
    /// As [`Engine::start`], or a committer thread that cannot be started.
    pub fn start_replicated(
        config: Config,
        setup: crate::cluster::ReplicatedSetup,
    ) -> Result<Engine, EngineError> {
        Engine::start_inner(config, RING_FRAMES_PER_LEVEL, Some(setup))
    }

    fn start_inner(
        config: Config,
        frames_per_level: usize,
        replicated: Option<crate::cluster::ReplicatedSetup>,
    ) -> Result<Engine, EngineError> {
        let workers = worker_count(&config);
        // One engine per data_dir, checked before anything is bound: the lock is held until
        // this engine is joined.
        let lock =
            crate::datadir::DataDirLock::acquire(&config.engine.data_dir).map_err(|reason| {
                EngineError::DataDirLock {
                    data_dir: config.engine.data_dir.clone(),
                    reason,
                }
            })?;
        let (su_listener, su_addr) = listen(Port::Su, config.listen.su)?;
        let (csp_listener, csp_addr) = listen(Port::Csp, config.listen.csp)?;

        let mut links = Vec::with_capacity(workers);
        let mut parts = Vec::with_capacity(workers);
        for index in 0..workers {
            let thread = EngineThread::Worker(index);
            let poll = Poll::new().map_err(EngineError::poll(thread))?;
            let waker = Waker::new(poll.registry(), worker::WORKER_WAKER)
                .map_err(EngineError::poll(thread))?;
            let waker = Arc::new(waker);
            let (producer, consumer) =
                ring::channel(usize::from(config.engine.levels), frames_per_level).map_err(
                    |source| EngineError::Ring {
                        worker: index,
                        source,
                    },
                )?;
            let (control_tx, control_rx) = mpsc::channel();
            links.push(WorkerLink {
                ring: producer,
                waker,
                control: control_tx,
            });
            parts.push((poll, consumer, control_rx));
        }
        let wakers: Vec<Arc<Waker>> = links.iter().map(|l| Arc::clone(&l.waker)).collect();
        let intake = crate::throttle::GlobalIntake::from_config(&config.service_requests, 0)
            .map_err(EngineError::Intake)?;
        let report = load_report(&config.engine.data_dir);
        let gate = replicated.as_ref().map_or_else(
            || Arc::new(dsplane_cluster::gate::Gate::open()),
            |r| Arc::clone(&r.gate),
        );
        let shared = Arc::new(Shared::new(config, links, intake, report, gate));
        let stores = match replicated {
            Some(setup) => replicated_stores(&shared, setup, &wakers)?,
            None => local_stores(&shared, workers, &wakers)?,
        };

        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut threads = Vec::with_capacity(workers + 1);
        // Start-up returns once every worker is in its loop, so nothing waits on a worker that is
        // still being built.
        let ready = Arc::new(std::sync::Barrier::new(workers + 1));
        // The owners are built here, so that a refusal stops the start-up with its reason.
        let mut owners = Vec::with_capacity(workers);
        for (index, store) in stores.into_iter().enumerate() {
            let setup = crate::owner::OwnerSetup::from_config(&shared.config, index, workers)
                .map_err(|source| EngineError::Owner {
                    worker: index,
                    source,
                })?;
            let nms =
                crate::owner::Nms::new(Arc::clone(&shared.memory_frames), shared.memory_frames_max);
            owners.push(
                crate::owner::Owner::new(setup, store, nms, shared.now()).map_err(|source| {
                    EngineError::Owner {
                        worker: index,
                        source,
                    }
                })?,
            );
        }
        for (index, ((poll, consumer, control_rx), owner)) in
            parts.into_iter().zip(owners).enumerate()
        {
            let shared = Arc::clone(&shared);
            let ready = Arc::clone(&ready);
            let core = cores.get(index % cores.len().max(1)).copied();
            let handle = std::thread::Builder::new()
                .name(format!("dsplane-worker-{index}"))
                .spawn(move || {
                    pin_worker(index, core);
                    let worker =
                        worker::Worker::new(index, poll, shared, consumer, control_rx, owner);
                    ready.wait();
                    worker.run();
                })
                .map_err(|source| EngineError::Spawn {
                    thread: EngineThread::Worker(index),
                    source,
                })?;
            threads.push(handle);
        }

        ready.wait();
        let (admin, admin_addr) =
            admin::Admin::bind(shared.config.listen.admin, Arc::clone(&shared))?;
        threads.push(
            std::thread::Builder::new()
                .name("dsplane-admin".into())
                .spawn(move || admin.run())
                .map_err(|source| EngineError::Spawn {
                    thread: EngineThread::Admin,
                    source,
                })?,
        );

        let poll = Poll::new().map_err(EngineError::poll(EngineThread::Acceptor))?;
        let acceptor_waker = Waker::new(poll.registry(), acceptor::ACCEPTOR_WAKER)
            .map_err(EngineError::poll(EngineThread::Acceptor))?;
        let acceptor_waker = Arc::new(acceptor_waker);
        let acceptor = acceptor::Acceptor::new(
            poll,
            mio::net::TcpListener::from_std(su_listener),
            mio::net::TcpListener::from_std(csp_listener),
            Arc::clone(&shared),
        )?;
        threads.push(
            std::thread::Builder::new()
                .name("dsplane-acceptor".into())
                .spawn(move || acceptor.run())
                .map_err(|source| EngineError::Spawn {
                    thread: EngineThread::Acceptor,
                    source,
                })?,
        );
        tracing::info!(su = %su_addr, csp = %csp_addr, admin = %admin_addr, workers, "dsplane running");
        Ok(Engine {
            shared,
            _lock: lock,
            su_addr,
            csp_addr,
            admin_addr,
            acceptor_waker,
            threads,
        })
    }

    /// The address the SU port is bound to (useful with port 0).
    pub fn su_addr(&self) -> SocketAddr {
        self.su_addr
    }

    /// The address the admin interface is bound to.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The address the CSP port is bound to.
    pub fn csp_addr(&self) -> SocketAddr {
        self.csp_addr
    }

    /// The configuration file that reloads (SIGHUP, `POST /reload`) read again.
    pub fn set_config_path(&self, path: std::path::PathBuf) {
        if let Ok(mut p) = self.shared.config_path.lock() {
            *p = Some(path);
        }
    }

    /// A handle that can stop the engine from another thread (e.g. a signal handler thread).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            shared: Arc::clone(&self.shared),
            acceptor_waker: Arc::clone(&self.acceptor_waker),
        }
    }

    /// Asks every thread to stop: no new connections, nothing new handed out.
    pub fn shutdown(&self) {
        self.stopper().stop();
    }

    /// Waits for every thread to finish.
    pub fn join(self) {
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!("an engine thread panicked");
            }
        }
        // The workers merged their last alerts on the way out.
        save_report(&self.shared);
    }
}

/// Stops or reloads an [`Engine`] from anywhere (e.g. a signal-handling thread).
#[derive(Debug, Clone)]
pub struct Stopper {
    shared: Arc<Shared>,
    acceptor_waker: Arc<Waker>,
}

impl Stopper {
    /// Asks the engine to stop.
    pub fn stop(&self) {
        self.shared.request_shutdown();
        let _ = self.acceptor_waker.wake();
    }

    /// Re-reads the configuration file given to [`Engine::set_config_path`] and applies what
    /// can change while running (rules, alert levels, exclusions, thresholds, rates) to traffic
    /// entering from now on, and new tokens to HELLOs from now on. Returns notes: changes that
    /// need a restart, and which tokens changed.
    ///
    /// # Errors
    ///
    /// The file cannot be read or is not valid, or it drops or adds a peer or a key, or empties
    /// the rules ([`crate::config::reload_refusal`]): nothing of it is applied.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        reload(&self.shared)
    }
}

/// How this run's logs are kept, from the configuration.
pub fn log_settings(config: &Config, workers: usize) -> crate::recovery::LogSettings {
    let engine = &config.engine;
    let lanes = if engine.scheduling == crate::config::Scheduling::Fifo {
        1
    } else {
        usize::from(engine.levels)
    };
    crate::recovery::LogSettings {
        workers,
        fifo: engine.scheduling == crate::config::Scheduling::Fifo,
        log: crate::store::LogOptions {
            durability: engine.durability,
            flush_interval: engine.flush_interval,
            reserve_bytes: crate::recovery::reserve_bytes(
                config.service_users.len() + config.csps.len(),
                lanes,
            ),
        },
    }
}

/// Which worker owns each receiver of `config` when `workers` run (as the engine assigns them):
/// for recovery and salvage outside a running engine.
pub fn owner_in(
    config: &Config,
    workers: usize,
) -> impl Fn(crate::wal::PeerKey) -> Option<usize> + '_ {
    move |key| match key {
        crate::wal::PeerKey::Su(id) => config
            .service_users
            .iter()
            .any(|su| su.id == id)
            .then(|| crate::owner::owner_of_su(id, workers)),
        crate::wal::PeerKey::Csp(_) => config
            .csps
            .iter()
            .position(|c| crate::wal::PeerKey::csp(&c.name) == key)
            .map(|i| crate::owner::owner_of_csp(i, workers)),
    }
}

/// The number of workers a configuration runs (`cores = 0`: one per available core).
pub fn worker_count(config: &Config) -> usize {
    match config.engine.cores {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    }
}

/// The local logs of a single node: recovery's. What the previous run took and its receivers
/// did not acknowledge waits in this run's logs (in place, or copied per owner) before
/// anything new is taken.
fn local_stores(
    shared: &Shared,
    workers: usize,
    wakers: &[Arc<Waker>],
) -> Result<Vec<crate::cluster::EngineLog>, EngineError> {
    let engine = &shared.config.engine;
    let expiry_path = engine.data_dir.join("expired-recovery.jsonl");
    let (stores, report) = crate::recovery::recover(
        &engine.data_dir,
        log_settings(&shared.config, workers),
        |key| shared.owner_of_key(key),
        |w| {
            let waker = wakers.get(w).map(Arc::clone);
            Box::new(move || {
                if let Some(waker) = &waker {
                    let _ = waker.wake();
                }
            })
        },
        |record| write_orphan(&expiry_path, record),
    )
    .map_err(|source| EngineError::Recovery {
        data_dir: engine.data_dir.clone(),
        source,
    })?;
    tracing::info!(
        frames = report.frames_recovered,
        orphaned = report.frames_orphaned,
        torn_tails = report.torn_tails.len(),
        generation = report.generation,
        in_place = report.in_place,
        data_dir = %engine.data_dir.display(),
        "log recovered"
    );
    Ok(stores
        .into_iter()
        .map(crate::cluster::EngineLog::Local)
        .collect())
}

/// The `replicated` logs of an active node: a committer per worker, each lane of the backlog
/// with the worker that owns its peer. Lanes of peers no longer configured stay in the table
/// (counted in the log line) until a configuration names them again.
fn replicated_stores(
    shared: &Shared,
    setup: crate::cluster::ReplicatedSetup,
    wakers: &[Arc<Waker>],
) -> Result<Vec<crate::cluster::EngineLog>, EngineError> {
    use dsplane_cluster::remote::{PgRemote, RemoteOptions};
    use dsplane_cluster::replicated::{IdBlocks, ReplicatedLog};
    let ids = IdBlocks::new(setup.next_id);
    let mut per_worker: Vec<Vec<_>> = wakers.iter().map(|_| Vec::new()).collect();
    let mut orphaned = 0;
    for lane in setup.backlog {
        match shared
            .owner_of_key(lane.peer)
            .and_then(|w| per_worker.get_mut(w))
        {
            Some(w) => w.push(lane),
            None => orphaned += lane.count,
        }
    }
    if orphaned > 0 {
        tracing::warn!(
            frames = orphaned,
            "frames in the log for peers no longer configured; they stay in PostgreSQL until a configuration names their peers again"
        );
    }
    let lease_ms = shared.config.cluster.as_ref().map_or(1_000, |c| c.lease_ms);
    let mut stores = Vec::with_capacity(wakers.len());
    for (worker, (waker, backlog)) in wakers.iter().zip(per_worker).enumerate() {
        let waker = Arc::clone(waker);
        let fenced = Arc::clone(&setup.fenced);
        let on_fenced = Arc::clone(&setup.on_fenced);
        let notify = Box::new(move || {
            let _ = waker.wake();
        });
        let remote = PgRemote::start(
            RemoteOptions {
                conninfo: setup.conninfo.clone(),
                epoch: setup.epoch,
                flush_interval: shared.config.engine.flush_interval,
                // A commit that takes half a lease has lost its use; and a node stopped inside
                // one holds up a takeover (the fence lock) for this long at most.
                statement_timeout_ms: lease_ms / 2,
                worker,
                fenced: Some(dsplane_cluster::remote::FenceSignal {
                    flag: fenced,
                    notify: on_fenced,
                }),
            },
            notify,
        )
        .map_err(|source| EngineError::Spawn {
            thread: EngineThread::Worker(worker),
            source,
        })?;
        stores.push(crate::cluster::EngineLog::Replicated(
            ReplicatedLog::resume(remote, Arc::clone(&ids), backlog),
        ));
    }
    Ok(stores)
}

/// Writes a recovered frame whose receiver is no longer configured to the expiry record.
pub fn write_orphan(expiry_path: &std::path::Path, record: &crate::wal::Record) {
    if let crate::wal::Record::Enqueue {
        peer, level, frame, ..
    } = record
    {
        tracing::warn!(
            %peer,
            level,
            counter = frame.header.counter,
            "recovered frame for a peer no longer configured; written to the expiry record"
        );
        let mut line = orphan_line(
            &peer.to_string(),
            *level,
            frame.header.kind.as_str(),
            frame.header.counter,
        );
        line.push('\n');
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(expiry_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    }
}

/// One line of the expiry record for a recovered frame whose receiver is gone (without its
/// newline): a JSON object, the fields in this order.
fn orphan_line(peer: &str, level: u8, kind: &str, counter: u64) -> String {
    #[derive(serde::Serialize)]
    struct Orphan<'a> {
        reason: &'a str,
        peer: &'a str,
        level: u8,
        kind: &'a str,
        counter: u64,
    }
    let record = Orphan {
        reason: "receiver no longer configured",
        peer,
        level,
        kind,
        counter,
    };
    // A struct of strings and integers always serializes; the fallback is never taken.
    serde_json::to_string(&record).unwrap_or_default()
}

/// The file of the alert monitoring report in `data_dir`.
pub const ALERT_REPORT_FILE: &str = "alert-report.bin";

fn load_report(data_dir: &std::path::Path) -> crate::report::AlertReport {
    let path = data_dir.join(ALERT_REPORT_FILE);
    match std::fs::File::open(&path) {
        Ok(mut f) => match crate::report::AlertReport::load_from(&mut f) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "alert report unreadable; starting a new one");
                crate::report::AlertReport::new()
            }
        },
        Err(_) => crate::report::AlertReport::new(),
    }
}

/// Writes the alert report to `data_dir` (a temporary file renamed over the old one).
fn save_report(shared: &Shared) {
    let dir = &shared.config.engine.data_dir;
    let tmp = dir.join(format!("{ALERT_REPORT_FILE}.tmp"));
    let result = (|| -> Result<(), String> {
        let report = shared
            .report
            .lock()
            .map_err(|_| "report lock poisoned".to_string())?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        report.save_to(&mut f).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, dir.join(ALERT_REPORT_FILE)).map_err(|e| e.to_string())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot save the alert report");
    }
}

/// Reloads the configuration file and logs what happened: each change applied, each note, or
/// the refusal, on one line each; counts the reload taken or refused.
fn reload(shared: &Shared) -> Result<Vec<String>, String> {
    use std::sync::atomic::Ordering;
    let path = shared
        .config_path
        .lock()
        .map_err(|_| "lock poisoned".to_string())?
        .clone();
    let file = path.as_ref().map_or_else(
        || "the embedded configuration".to_owned(),
        |p| p.display().to_string(),
    );
    match reload_file(shared, path.as_deref(), &file) {
        Ok((changes, warnings)) => {
            shared.reloads[0].fetch_add(1, Ordering::Relaxed);
            shared
                .config_loaded_unix_ns
                .store(crate::unix_now(), Ordering::Relaxed);
            for w in &warnings {
                tracing::warn!(file = %file, "reload: {w}");
            }
            for c in &changes {
                tracing::info!(file = %file, "reload changed {c}");
            }
            tracing::info!(
                file = %file,
                changes = changes.len(),
                "configuration reloaded: new rules and rates apply to traffic entering from now on"
            );
            Ok(warnings)
        }
        Err(e) => {
            shared.reloads[1].fetch_add(1, Ordering::Relaxed);
            let e = crate::one_line(&e);
            tracing::error!(file = %file, error = %e, "reload refused; the running configuration is unchanged");
            Err(e)
        }
    }
}

/// Reads, checks and applies a reload: (what changed, notes).
fn reload_file(
    shared: &Shared,
    path: Option<&std::path::Path>,
    file: &str,
) -> Result<(Vec<String>, Vec<String>), String> {
    let config = match path {
        Some(p) => Config::load(p).map_err(|e| e.in_file(p))?,
        None => Config::embedded_default().map_err(|e| e.to_string())?,
    };
    let mut applied = shared
        .applied
        .lock()
        .map_err(|_| "lock poisoned".to_string())?;
    let (reload, warnings) = shared.reload_from(&applied, &config, file)?;
    let changes = shared::reload_changes(&applied, &config);
    shared.apply_reload(reload);
    *applied = config;
    Ok((changes, warnings))
}

/// Pushes an envelope into a worker's ring at `level`, waking the worker if it sleeps. Hands
/// the envelope back (boxed: the rare path pays the allocation) when that level is full.
fn push(link: &WorkerLink, level: Level, envelope: Envelope) -> Result<(), Box<Envelope>> {
    match link.ring.push(level.index(), envelope) {
        Ok(wake) => {
            if wake.is_needed() {
                if let Err(e) = link.waker.wake() {
                    tracing::warn!(error = %e, "cannot wake worker");
                }
            }
            Ok(())
        }
        Err(e) => Err(Box::new(e.into_inner())),
    }
}

/// Pushes `items` into `link`'s ring at `level`, in order, as many as fit (the rest stay in
/// `items`), and wakes its worker once if it was parked.
fn push_bulk(link: &WorkerLink, level: Level, items: &mut Vec<Envelope>) {
    match link.ring.push_bulk(level.index(), items) {
        Ok(pushed) => {
            if pushed.wake.is_needed() {
                if let Err(e) = link.waker.wake() {
                    tracing::warn!(error = %e, "cannot wake worker");
                }
            }
        }
        // Levels come from the configuration the rings were made for; were one out of range,
        // its frames stay in `items` and are held like those of a full ring.
        Err(e) => tracing::error!(level = e.level_index, "no ring lane for this level"),
    }
}

/// A non-blocking listener for `port` on `addr`, and the address it is bound to (the port
/// chosen when `addr` asks for port 0).
fn listen(
    port: Port,
    addr: SocketAddr,
) -> Result<(std::net::TcpListener, SocketAddr), EngineError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let failed = || EngineError::listen(port, addr);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(failed())?;
    socket.set_reuse_address(true).map_err(failed())?;
    socket.set_nonblocking(true).map_err(failed())?;
    socket
        .bind(&addr.into())
        .map_err(|source| EngineError::Bind { port, addr, source })?;
    socket.listen(LISTEN_BACKLOG).map_err(failed())?;
    let listener: std::net::TcpListener = socket.into();
    let bound = listener.local_addr().map_err(failed())?;
    Ok((listener, bound))
}

/// Socket options for a peer connection: no Nagle delay (frames are small and latency
/// matters), and large buffers so that one `writev` moves many frames.
fn tune_stream(stream: &mio::net::TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphan_line_is_one_json_object_with_its_strings_escaped() {
        let line = orphan_line("csp \"a\\b\"", 2, "ALERT", 7);
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(
            line,
            r#"{"reason":"receiver no longer configured","peer":"csp \"a\\b\"","level":2,"kind":"ALERT","counter":7}"#
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["peer"], "csp \"a\\b\"");
        assert_eq!(v["level"], 2);
        assert_eq!(v["counter"], 7);
        assert_eq!(v["kind"], "ALERT");
    }
}

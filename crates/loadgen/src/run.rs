//! Running a scenario: the engine (spawned in-process or already running), one thread per SU
//! and per CSP link over real TCP, the drain at the end, and the merge of what every thread saw.
//!
//! # Threads
//!
//! Every peer thread owns one [`Client`] connection and loops: send what its [`Source`] says is
//! due (registering each message with the [`Checker`] *before* it goes out, so a receipt is never
//! seen first), then read for up to a millisecond: dsplane's ACKs and NACKs of what it sent, and
//! data frames for it, each verified (trailer checksum) and acknowledged in batches. A CSP thread
//! answers every REQUEST it receives with a RESPONSE carrying the same RequestID, as a CSP would.
//!
//! The SU thread of the `outage` scenario closes its connection at the outage's start (after
//! acknowledging everything it has) and reconnects at its end.
//!
//! # End of a run
//!
//! After `duration` nobody sends; the threads keep reading until every message dsplane
//! acknowledged has been received and every message sent has been acknowledged or refused, or
//! until nothing has arrived for [`STALL`], or `drain_max` has passed. What is still missing then
//! is lost.
//!
//! Alert Storm Protection is the exception: an alert it throttles is never delivered, and the
//! STORM_SUMMARY that stands for it comes only when its window closes, up to `window_s` after
//! the alert entered. So while alerts are acknowledged, undelivered and not yet summarised, the
//! drain waits, past a stall and past `drain_max`, until every storm window that can hold one
//! has closed (`window_s` + [`STALL`] after the last alert entered). The spawned engine's
//! window is fitted to the run ([`spawned_storm_window_s`]) so that this costs seconds.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::classify::Rules;
use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::engine::Engine;
use crate::ids::{Eui64, Mode};
use crate::wire::{Frame, Header, Kind};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checker::{Checker, Delivery, Direction, Endpoint, Sent};
use crate::data::{Catalogue, Template};
use crate::payload::{self, flags, Trailer};
use crate::replay::ReplayFile;
use crate::report::{self, RunReport};
use crate::scenario::{self, MessageSpec, PlanParams, ScenarioKind, Source};
use crate::stats::{OrderProbe, Stats};

/// Messages one thread builds and sends in one go at most.
const SEND_BATCH_MAX: usize = 256;
/// Messages one thread has sent and dsplane has not yet acknowledged or refused, at most; past
/// it the thread stops sending until ACKs come back (bounds memory if dsplane stalls).
const PENDING_MAX: usize = 50_000;
/// Replies a CSP thread holds before sending, at most (beyond: not answered, counted).
const REPLIES_MAX: usize = 20_000;
/// Frames received before an ACK is sent at the latest (well under dsplane's window of 64).
const ACK_EVERY: u32 = 16;
/// How long a thread reads before it looks at its send schedule again.
const RECV_SLICE: Duration = Duration::from_millis(1);
/// A drain ends when nothing has arrived for this long.
pub const STALL: Duration = Duration::from_secs(3);
/// How long an SU going down waits for ACKs of what it sent before it closes.
const QUIESCE_MAX: Duration = Duration::from_millis(500);
/// How long the first connection of each peer looks for the active node (a takeover may be
/// under way when the run starts).
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// How long one reconnect looks for the active node before it is noted as failed. The thread
/// tries again after it until the run ends, so this only bounds how long the thread is deaf to
/// the end of the run, and how often a failure is noted.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(2);

/// Which engine a run talks to.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start one in-process with the load generator's own configuration.
    Spawn {
        /// `[engine] scheduling = "fifo"` instead of priority.
        fifo: bool,
    },
    /// An engine already running, on one node or several (one active, the others standbys).
    Remote {
        /// Its SU port: every node's address; the active node's is found, and found again
        /// after a takeover ([`Client::connect_any`]).
        su_addrs: Vec<SocketAddr>,
        /// Its CSP port, every node's address likewise.
        csp_addrs: Vec<SocketAddr>,
        /// Service Users to play, with their tokens.
        sus: Vec<(Eui64, String)>,
        /// CSP tokens, one thread each.
        csp_tokens: Vec<String>,
        /// Its configuration file, for the levels messages should get (default: the embedded one).
        config: Option<PathBuf>,
    },
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which scenario.
    pub scenario: ScenarioKind,
    /// Which engine.
    pub target: Target,
    /// Run twice, spawning a priority engine then a FIFO one (ignores `target`).
    pub compare: bool,
    /// Traffic time.
    pub duration: Duration,
    /// Longest drain after it.
    pub drain_max: Duration,
    /// Seed of the traffic.
    pub seed: u64,
    /// Service Users (spawned engine).
    pub sus: usize,
    /// CSP links (spawned engine).
    pub csp_links: usize,
    /// Northbound base rate, msg/s over all CSP links.
    pub rate: f64,
    /// Requests/s per SU.
    pub req_rate: f64,
    /// Northbound delivery rate per SU (the spawned engine's `[delivery] rate`; for a running
    /// engine, say what it is configured with).
    pub su_rate: u32,
    /// DUIS request files to replay instead of the generated request mix.
    pub replay: Option<PathBuf>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scenario: ScenarioKind::Steady,
            target: Target::Spawn { fifo: false },
            compare: false,
            duration: Duration::from_secs(10),
            drain_max: Duration::from_secs(30),
            seed: 1,
            sus: 4,
            csp_links: 2,
            rate: 1_500.0,
            req_rate: 50.0,
            su_rate: 2_000,
            replay: None,
            progress: false,
        }
    }
}

/// What can stop a run before it produces a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The embedded data is broken.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The replay directory.
    #[error("replay: {0}")]
    Replay(#[from] crate::replay::ReplayError),
    /// The engine configuration (generated or given).
    #[error("engine configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The in-process engine did not start.
    #[error("cannot start the engine: {0}")]
    Engine(#[source] crate::engine::EngineError),
    /// A peer could not connect.
    #[error("{peer} cannot connect: {source}")]
    Connect {
        /// Which peer.
        peer: String,
        /// Why.
        source: ClientError,
    },
    /// The options do not make sense.
    #[error("{0}")]
    Usage(String),
}

/// The id of generated SU `i`: 90-B3-D5-1F-30-01-00-00, …-01, … (the demo SU first).
pub fn generated_su_id(i: usize) -> Eui64 {
    Eui64(0x90B3_D51F_3001_0000 + i as u64)
}

/// The spawned engine's release ramp, seconds, and the share of the rate it starts at: short,
/// so that runs of a few seconds show a whole release.
pub const SPAWNED_RELEASE_RAMP_S: u32 = 1;
/// See [`SPAWNED_RELEASE_RAMP_S`].
pub const SPAWNED_RELEASE_START: f64 = 0.25;

/// The spawned engine's `[alert_storm] window_s` for a run of `duration`: a fifth of the run,
/// 1 to 60 s. The storm scenario floods from 20 % to 80 % of the run, so its last window closes
/// before the traffic ends and its summary arrives within the run. The default 60 s window
/// would still be open when a 10 s run ends: every throttled alert would then be waiting for a
/// summary the run never sees.
pub fn spawned_storm_window_s(duration: Duration) -> u32 {
    (duration.as_secs_f64() / 5.0).clamp(1.0, 60.0) as u32
}

/// The load generator's engine configuration: loopback ports chosen by the OS, no durability,
/// `data_dir` for what the engine keeps on disk even so, `su_ids` Service Users, `csp_links` CSP
/// links splitting the device space in equal ranges, the rules of the embedded demo
/// configuration, a short release ramp ([`SPAWNED_RELEASE_RAMP_S`]) so that runs of a few
/// seconds show a whole release, and storm windows of `storm_window_s` (see
/// [`spawned_storm_window_s`]).
pub fn engine_config_toml(
    data_dir: &Path,
    su_ids: &[Eui64],
    csp_links: usize,
    su_rate: u32,
    fifo: bool,
    storm_window_s: u32,
) -> String {
    use std::fmt::Write;
    let per_su: u64 = 200_000;
    let total = per_su * (su_ids.len() as u64 + csp_links as u64).max(1);
    let mut t = format!(
        r#"# Written by dsplane-loadgen for an in-process engine.
[engine]
cores = 0
levels = 4
data_dir = "{data_dir}"
durability = "none"
idle_timeout_s = 60
scheduling = "{scheduling}"

[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"

[delivery]
rate = {su_rate}
burst = {burst}
window = 64
window_reserved_top = 8
nms_per_su = {per_su}
nms_total = {total}
release_start = {release_start}
release_ramp_s = {release_ramp_s}

[service_requests]
capacity = 1000000
operating_threshold = 0.8
sr_rate = 100000
sr_burst = 10000

[priority]
default_level = 4
scheduled_response_level = 4
alert_level = 3
rules = [
  {{ srv = "2.2", level = 1 }},
  {{ srv = "7.*", level = 1 }},
  {{ srv = "8.1.1", level = 2 }},
  {{ srv = "4.1.1", mode = "on-demand", level = 3 }},
]
high_priority_alerts = [
  {{ code = 0x8F1C, level = 1 }},
  {{ code = 0x8F57, level = 1 }},
  {{ code = 0x81C0, level = 1 }},
]

[alert_storm]
threshold = 10
window_s = {storm_window_s}
"#,
        data_dir = data_dir.display().to_string().replace('\\', "/"),
        scheduling = if fifo { "fifo" } else { "priority" },
        burst = (su_rate / 10).max(1),
        release_start = SPAWNED_RELEASE_START,
        release_ramp_s = SPAWNED_RELEASE_RAMP_S,
    );
    for (i, id) in su_ids.iter().enumerate() {
        let _ = write!(
            t,
            "\n[[service_user]]\nid = \"{id}\"\ntoken = \"{}\"\n",
            su_token(i)
        );
    }
    for c in 0..csp_links.max(1) {
        let range = if csp_links > 1 {
            let s = scenario::DeviceSpace::of_link(c, csp_links);
            format!("\"{}..{}\"", Eui64(s.first), Eui64(s.last))
        } else {
            String::new()
        };
        let _ = write!(
            t,
            "\n[[csp]]\nname = \"csp-{c}\"\ntoken = \"{}\"\nrate = 100000\nburst = 10000\ndevice_ranges = [{range}]\n",
            csp_token(c)
        );
    }
    t
}

fn su_token(i: usize) -> String {
    format!("loadgen-su-{i}")
}

fn csp_token(c: usize) -> String {
    format!("loadgen-csp-{c}")
}

/// Runs the scenario (twice with `compare`) and returns one report per run.
///
/// # Errors
///
/// [`RunError`] when a run cannot start; check failures are in the reports, not errors.
pub fn run(opts: &Options) -> Result<Vec<RunReport>, RunError> {
    let catalogue = Catalogue::embedded()?;
    let replay = match &opts.replay {
        Some(dir) => Some(crate::replay::load_dir(dir)?),
        None => None,
    };
    if opts.compare {
        let mut out = Vec::new();
        for fifo in [false, true] {
            let mut o = opts.clone();
            o.target = Target::Spawn { fifo };
            out.push(run_once(&o, &catalogue, replay.as_deref())?);
        }
        Ok(out)
    } else {
        Ok(vec![run_once(opts, &catalogue, replay.as_deref())?])
    }
}

/// A started engine, stopped on drop, and its data directory, removed once it has stopped.
struct Spawned(Option<(Engine, PathBuf)>);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some((e, data_dir)) = self.0.take() {
            e.shutdown();
            e.join();
            let _ = std::fs::remove_dir_all(data_dir);
        }
    }
}

/// A data directory of its own for each in-process engine: runs in other processes (a test
/// suite, a second `dsplane demo`) must not share one engine's generations and report file.
fn spawned_data_dir() -> PathBuf {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("dsplane-loadgen-{}-{n}", std::process::id()))
}

struct Setup {
    label: &'static str,
    su_addrs: Vec<SocketAddr>,
    csp_addrs: Vec<SocketAddr>,
    sus: Vec<(Eui64, String)>,
    csp_tokens: Vec<String>,
    rules: Rules,
    levels: u8,
    urgent_alerts: Vec<u16>,
    csp_ranges: bool,
    /// The engine's `[alert_storm] window_s`: how long a throttled alert may wait for its summary.
    storm_window: Duration,
    /// Its `[delivery]` release settings, for the report: (release_start, release_ramp_s).
    release: (f64, u32),
    engine: Spawned,
}

fn setup(opts: &Options, replay: Option<&[ReplayFile]>) -> Result<Setup, RunError> {
    match &opts.target {
        Target::Spawn { fifo } => {
            if opts.sus == 0 || opts.csp_links == 0 {
                return Err(RunError::Usage(
                    "--sus and --csp-links must be at least 1".into(),
                ));
            }
            // Replay files name their SUs: those come first, generated ones make up the rest.
            let mut ids: Vec<Eui64> = Vec::new();
            for f in replay.unwrap_or_default() {
                if !ids.contains(&f.request.su) {
                    ids.push(f.request.su);
                }
            }
            let mut i = 0;
            while ids.len() < opts.sus {
                let id = generated_su_id(i);
                if !ids.contains(&id) {
                    ids.push(id);
                }
                i += 1;
            }
            let data_dir = spawned_data_dir();
            let toml = engine_config_toml(
                &data_dir,
                &ids,
                opts.csp_links,
                opts.su_rate,
                *fifo,
                spawned_storm_window_s(opts.duration),
            );
            let config = Config::from_toml(&toml)?;
            let storm_window = config.alert_storm.window;
            let release = release_of(&config);
            let rules = Rules::new(&config.priority);
            let levels = config.engine.levels;
            let urgent_alerts = config
                .priority
                .high_priority_alerts
                .iter()
                .map(|a| a.0)
                .collect();
            let engine = match Engine::start(config) {
                Ok(e) => e,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&data_dir);
                    return Err(RunError::Engine(e));
                }
            };
            Ok(Setup {
                label: if *fifo { "fifo" } else { "priority" },
                su_addrs: vec![engine.su_addr()],
                csp_addrs: vec![engine.csp_addr()],
                sus: ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| (*id, su_token(i)))
                    .collect(),
                csp_tokens: (0..opts.csp_links).map(csp_token).collect(),
                rules,
                levels,
                urgent_alerts,
                csp_ranges: opts.csp_links > 1,
                storm_window,
                release,
                engine: Spawned(Some((engine, data_dir))),
            })
        }
        Target::Remote {
            su_addrs,
            csp_addrs,
            sus,
            csp_tokens,
            config,
        } => {
            if sus.is_empty() || csp_tokens.is_empty() {
                return Err(RunError::Usage(
                    "at least one --su and one --csp-token".into(),
                ));
            }
            if su_addrs.is_empty() || csp_addrs.is_empty() {
                return Err(RunError::Usage(
                    "at least one --su-addr and one --csp-addr".into(),
                ));
            }
            let config = match config {
                Some(path) => Config::load(path)?,
                None => Config::embedded_default()?,
            };
            Ok(Setup {
                label: "remote",
                su_addrs: su_addrs.clone(),
                csp_addrs: csp_addrs.clone(),
                sus: sus.clone(),
                csp_tokens: csp_tokens.clone(),
                rules: Rules::new(&config.priority),
                levels: config.engine.levels,
                urgent_alerts: config
                    .priority
                    .high_priority_alerts
                    .iter()
                    .map(|a| a.0)
                    .collect(),
                csp_ranges: false,
                storm_window: config.alert_storm.window,
                release: release_of(&config),
                engine: Spawned(None),
            })
        }
    }
}

/// A configuration's release settings: (`release_start`, `release_ramp_s`).
fn release_of(config: &Config) -> (f64, u32) {
    (
        f64::from(config.delivery.release_start.ppm()) / 1e6,
        config.delivery.release_ramp.as_secs() as u32,
    )
}

/// What every peer thread shares.
struct Shared<'a> {
    origin: Instant,
    stop_sending: AtomicBool,
    done: AtomicBool,
    sent: AtomicU64,
    received: AtomicU64,
    checker: Mutex<Checker>,
    rules: &'a Rules,
    catalogue: &'a Catalogue,
    su_ids: Vec<Eui64>,
    su_index: HashMap<Eui64, usize>,
    csp_links: usize,
    csp_ranges: bool,
    notes: Mutex<Vec<String>>,
    /// Disconnects and reconnects of the outage, for the charts' markers.
    events: Mutex<Vec<report::RunEvent>>,
}

impl Shared<'_> {
    fn checker(&self) -> MutexGuard<'_, Checker> {
        // A thread that panicked holding the lock leaves the checker usable: its counts are
        // plain integers.
        self.checker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, text: String) {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        if notes.len() < 50 {
            notes.push(text);
        }
    }

    /// Records that `what` happened now; `marker` is its word on the charts.
    fn event(&self, what: String, marker: &str) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() < 50 {
            events.push(report::RunEvent {
                t_s: self.origin.elapsed().as_secs_f64(),
                what,
                marker: marker.to_owned(),
            });
        }
    }

    fn t_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

fn wall_ns() -> u64 {
    dsplane_proto::unix_now()
}

fn run_once(
    opts: &Options,
    catalogue: &Catalogue,
    replay: Option<&[ReplayFile]>,
) -> Result<RunReport, RunError> {
    let setup = setup(opts, replay)?;
    let su_ids: Vec<Eui64> = setup.sus.iter().map(|s| s.0).collect();
    let params = PlanParams {
        scenario: opts.scenario,
        seed: opts.seed,
        duration_s: opts.duration.as_secs_f64(),
        sus: su_ids.len(),
        csp_links: setup.csp_tokens.len(),
        csp_ranges: setup.csp_ranges,
        rate: opts.rate,
        req_rate: opts.req_rate,
        su_rate: f64::from(opts.su_rate),
    };
    let plan = scenario::plan(&params, catalogue, &setup.urgent_alerts, &su_ids, replay);
    let flows: Vec<String> = plan
        .csps
        .iter()
        .flat_map(|c| c.source.flows())
        .chain(plan.sus.iter().flat_map(|s| s.source.flows()))
        .map(|f| f.name.to_owned())
        .fold(Vec::new(), |mut v, n| {
            if !v.contains(&n) {
                v.push(n);
            }
            v
        });

    // Connect everybody first, so that traffic starts at one origin.
    let mut su_clients = Vec::new();
    for (id, token) in &setup.sus {
        let c = Client::connect_any_su(&setup.su_addrs, *id, token, CONNECT_DEADLINE).map_err(
            |source| RunError::Connect {
                peer: format!("SU {id}"),
                source,
            },
        )?;
        su_clients.push(c);
    }
    let mut csp_clients = Vec::new();
    for (i, token) in setup.csp_tokens.iter().enumerate() {
        let c = Client::connect_any_csp(&setup.csp_addrs, token, CONNECT_DEADLINE).map_err(
            |source| RunError::Connect {
                peer: format!("CSP link {i}"),
                source,
            },
        )?;
        csp_clients.push(c);
    }

    let run_span = opts.duration + opts.drain_max;
    // About 500 points over the traffic time, never more than the series can hold.
    let bucket_ns = (opts.duration.as_nanos() as u64 / 500)
        .max(20_000_000)
        .max(run_span.as_nanos() as u64 / (crate::stats::SERIES_BUCKETS_MAX as u64 - 1));
    let shared = Shared {
        origin: Instant::now(),
        stop_sending: AtomicBool::new(false),
        done: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        checker: Mutex::new(Checker::new(if setup.csp_ranges {
            setup.csp_tokens.len() as u32
        } else {
            0
        })),
        rules: &setup.rules,
        catalogue,
        su_index: su_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
        su_ids: su_ids.clone(),
        csp_links: setup.csp_tokens.len(),
        csp_ranges: setup.csp_ranges,
        notes: Mutex::new(Vec::new()),
        events: Mutex::new(Vec::new()),
    };

    let progress = if opts.progress {
        let pb = ProgressBar::new(opts.duration.as_millis() as u64);
        pb.set_style(
            ProgressStyle::with_template("{prefix} {spinner} [{bar:30}] {elapsed:>4}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_prefix(format!(
            "{} {} ({} s)",
            opts.scenario.as_str(),
            setup.label,
            opts.duration.as_secs_f64()
        ));
        pb
    } else {
        ProgressBar::hidden()
    };

    let mut drain_s = 0.0;
    let mut all_stats = Stats::new(setup.levels, bucket_ns);
    std::thread::scope(|scope| {
        let shared = &shared;
        let mut handles = Vec::new();
        for ((i, client), su_plan) in su_clients.into_iter().enumerate().zip(plan.sus) {
            let (id, token) = setup.sus[i].clone();
            let su_addrs = setup.su_addrs.clone();
            let levels = setup.levels;
            handles.push(scope.spawn(move || {
                let mut peer = Peer::new(
                    shared,
                    Endpoint::Su(id),
                    scenario::su_stream(i),
                    client,
                    su_plan.source,
                    Stats::new(levels, bucket_ns),
                );
                peer.replay = su_plan.replay.map(|files| {
                    files
                        .iter()
                        .map(|f| (f.request.clone(), Template::around_request_id(&f.text)))
                        .collect()
                });
                peer.reconnect = Some(Box::new(move || {
                    Client::connect_any_su(&su_addrs, id, &token, RECONNECT_DEADLINE)
                }));
                peer.run(su_plan.outage)
            }));
        }
        for ((c, client), csp_plan) in csp_clients.into_iter().enumerate().zip(plan.csps) {
            let token = setup.csp_tokens[c].clone();
            let csp_addrs = setup.csp_addrs.clone();
            let levels = setup.levels;
            handles.push(scope.spawn(move || {
                let mut peer = Peer::new(
                    shared,
                    Endpoint::Csp(c as u32),
                    scenario::csp_stream(c),
                    client,
                    csp_plan.source,
                    Stats::new(levels, bucket_ns),
                );
                peer.replies_on = csp_plan.replies;
                peer.reconnect = Some(Box::new(move || {
                    Client::connect_any_csp(&csp_addrs, &token, RECONNECT_DEADLINE)
                }));
                peer.run(None)
            }));
        }

        drain_s = supervise(shared, opts, setup.storm_window, &progress);
        shared.done.store(true, Ordering::Release);
        for h in handles {
            match h.join() {
                Ok(stats) => all_stats.merge(&stats),
                Err(_) => shared.note("a peer thread panicked".into()),
            }
        }
    });
    progress.finish_and_clear();
    let wall_s = shared.origin.elapsed().as_secs_f64();
    drop(setup.engine);

    let verdict = shared.checker().finish();
    let notes = shared.notes.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut events = shared
        .events
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    events.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    Ok(report::build_run_report(report::RunInputs {
        label: setup.label,
        scenario: opts.scenario,
        seed: opts.seed,
        duration_s: opts.duration.as_secs_f64(),
        drain_s,
        wall_s,
        sus: su_ids.len(),
        csp_links: shared.csp_links,
        rate: opts.rate,
        req_rate: opts.req_rate,
        su_rate: opts.su_rate,
        release: setup.release,
        storm_window_s: setup.storm_window.as_secs(),
        headline: plan.headline,
        flows,
        stats: &all_stats,
        verdict,
        notes,
        events,
    }))
}

/// Watches the run: progress, the end of the traffic, the drain. Returns the drain's length, s.
/// `storm_window` is the engine's storm window: how long after the last alert entered a
/// summary may still come (see the module docs).
fn supervise(
    shared: &Shared<'_>,
    opts: &Options,
    storm_window: Duration,
    progress: &ProgressBar,
) -> f64 {
    let tick = Duration::from_millis(50);
    let mut drain_start: Option<Instant> = None;
    let mut last_received = 0;
    let mut last_progress = Instant::now();
    let mut last_alerts_acked = 0;
    let mut last_alert = Instant::now();
    loop {
        std::thread::sleep(tick);
        let elapsed = shared.origin.elapsed();
        let sent = shared.sent.load(Ordering::Relaxed);
        let received = shared.received.load(Ordering::Relaxed);
        let ((awaiting_delivery, awaiting_ack), awaiting_summary, alerts_acked) = {
            let checker = shared.checker();
            (
                checker.pending(),
                checker.awaiting_summary(),
                checker.alerts_acked(),
            )
        };
        if received != last_received {
            last_received = received;
            last_progress = Instant::now();
        }
        if alerts_acked != last_alerts_acked {
            last_alerts_acked = alerts_acked;
            last_alert = Instant::now();
        }
        progress.set_position(elapsed.as_millis().min(opts.duration.as_millis()) as u64);
        match drain_start {
            None => {
                progress.set_message(format!(
                    "sent {sent}  received {received}  in flight {}",
                    awaiting_delivery + awaiting_ack
                ));
                if elapsed >= opts.duration {
                    shared.stop_sending.store(true, Ordering::Release);
                    drain_start = Some(Instant::now());
                }
            }
            Some(start) => {
                // A window holding a throttled alert closes at most `storm_window` after the
                // alert entered; its summary follows within a stall's time.
                let windows_open =
                    awaiting_summary > 0 && last_alert.elapsed() < storm_window + STALL;
                progress.set_message(if windows_open {
                    format!("draining: {awaiting_delivery} to deliver ({awaiting_summary} alerts may be in open storm windows), {awaiting_ack} to acknowledge")
                } else {
                    format!("draining: {awaiting_delivery} to deliver, {awaiting_ack} to acknowledge")
                });
                let finished = awaiting_delivery == 0 && awaiting_ack == 0;
                let stalled = last_progress.elapsed() >= STALL;
                let too_long = start.elapsed() >= opts.drain_max;
                if finished || (!windows_open && (stalled || too_long)) {
                    if too_long && start.elapsed() >= opts.drain_max + tick {
                        shared.note(format!(
                            "the drain went on {:.1} s past --drain-s for storm windows to close",
                            (start.elapsed() - opts.drain_max).as_secs_f64()
                        ));
                    }
                    if !finished {
                        shared.note(format!(
                            "drain ended after {:.1} s ({}) with {awaiting_delivery} acknowledged frames undelivered and {awaiting_ack} unacknowledged",
                            start.elapsed().as_secs_f64(),
                            if stalled { "nothing arrived for 3 s" } else { "--drain-s reached" }
                        ));
                    }
                    return start.elapsed().as_secs_f64();
                }
            }
        }
    }
}

/// A message sent and not yet acknowledged or refused.
#[derive(Debug, Clone, Copy)]
struct Pending {
    msg_id: u64,
    seq: u64,
    dir: Direction,
    level: u8,
    nacked: bool,
}

/// A received data frame, checked outside the lock.
struct Received {
    header: Header,
    check: Result<Trailer, payload::Corruption>,
    latency_ns: u64,
    t_ns: u64,
}

type Reconnect = Box<dyn FnMut() -> Result<Client, ClientError> + Send>;

/// One peer thread.
struct Peer<'s, 'a> {
    shared: &'s Shared<'a>,
    endpoint: Endpoint,
    stream: u64,
    next_seq: u64,
    client: Option<Client>,
    reconnect: Option<Reconnect>,
    source: Source,
    pending: VecDeque<Pending>,
    /// Highest msg_id received, and the one last acknowledged.
    recv_top: u64,
    acked_top: u64,
    since_ack: u32,
    replies_on: bool,
    replies: VecDeque<MessageSpec>,
    replies_dropped: u64,
    replay: Option<Vec<(crate::replay::DuisRequest, Template)>>,
    stats: Stats,
    probe: OrderProbe,
    specs: Vec<MessageSpec>,
    acked_events: Vec<Pending>,
    nacked_events: Vec<(Pending, Option<crate::wire::NackReason>)>,
    received_events: Vec<Received>,
    summaries: Vec<Header>,
}

impl<'s, 'a> Peer<'s, 'a> {
    fn new(
        shared: &'s Shared<'a>,
        endpoint: Endpoint,
        stream: u64,
        client: Client,
        source: Source,
        stats: Stats,
    ) -> Self {
        Peer {
            shared,
            endpoint,
            stream,
            next_seq: 1,
            client: Some(client),
            reconnect: None,
            source,
            pending: VecDeque::new(),
            recv_top: 0,
            acked_top: 0,
            since_ack: 0,
            replies_on: false,
            replies: VecDeque::new(),
            replies_dropped: 0,
            replay: None,
            stats,
            probe: OrderProbe::default(),
            specs: Vec::with_capacity(SEND_BATCH_MAX),
            acked_events: Vec::new(),
            nacked_events: Vec::new(),
            received_events: Vec::new(),
            summaries: Vec::new(),
        }
    }

    fn name(&self) -> String {
        match self.endpoint {
            Endpoint::Su(id) => format!("SU {id}"),
            Endpoint::Csp(i) => format!("CSP link {i}"),
        }
    }

    fn run(mut self, outage: Option<(f64, f64)>) -> Stats {
        #[derive(PartialEq)]
        enum Phase {
            Up,
            Down,
            Restored,
        }
        let mut phase = Phase::Up;
        while !self.shared.done.load(Ordering::Acquire) {
            let now_s = self.shared.origin.elapsed().as_secs_f64();
            if let Some((down, up)) = outage {
                if phase == Phase::Up && now_s >= down {
                    self.go_down();
                    self.shared
                        .event(format!("{} disconnects", self.name()), "disconnects");
                    phase = Phase::Down;
                    continue;
                }
                if phase == Phase::Down {
                    if now_s < up {
                        std::thread::sleep(Duration::from_secs_f64((up - now_s).min(0.005)));
                        continue;
                    }
                    self.try_reconnect();
                    if self.client.is_some() {
                        self.shared
                            .event(format!("{} reconnects", self.name()), "reconnects");
                        phase = Phase::Restored;
                    }
                    continue;
                }
            }
            if self.client.is_none() {
                std::thread::sleep(Duration::from_millis(100));
                self.try_reconnect();
                continue;
            }
            if !self.shared.stop_sending.load(Ordering::Acquire) {
                self.send_due(now_s);
            }
            self.receive_for(RECV_SLICE);
            self.apply_events();
        }
        // Done: acknowledge what was read, then close.
        self.receive_for(Duration::ZERO);
        self.apply_events();
        self.send_ack();
        if self.replies_dropped > 0 {
            self.shared.note(format!(
                "{}: {} requests not answered: the reply queue was full",
                self.name(),
                self.replies_dropped
            ));
        }
        self.stats.order = self.probe.result();
        self.stats
    }

    /// The planned outage: acknowledge what was received, wait (briefly) for dsplane to
    /// acknowledge what was sent, and close the connection.
    fn go_down(&mut self) {
        let start = Instant::now();
        while !self.pending.is_empty() && start.elapsed() < QUIESCE_MAX && self.client.is_some() {
            self.receive_for(RECV_SLICE);
            self.apply_events();
        }
        self.send_ack();
        if let Some(c) = self.client.take() {
            let _ = c.stream().shutdown(std::net::Shutdown::Both);
        }
        self.lost_connection();
    }

    fn try_reconnect(&mut self) {
        if let Some(connect) = self.reconnect.as_mut() {
            match connect() {
                Ok(c) => {
                    self.client = Some(c);
                    self.recv_top = 0;
                    self.acked_top = 0;
                    self.since_ack = 0;
                }
                Err(e) => self
                    .shared
                    .note(format!("{}: reconnect failed: {e}", self.name())),
            }
        }
    }

    /// The connection is gone: what dsplane neither acknowledged nor refused can no longer be
    /// (its `msg_id`s belonged to that connection).
    fn lost_connection(&mut self) {
        self.client = None;
        let abandoned: Vec<u64> = self
            .pending
            .drain(..)
            .filter(|p| !p.nacked)
            .map(|p| p.seq)
            .collect();
        if !abandoned.is_empty() {
            let mut checker = self.shared.checker();
            for seq in abandoned {
                checker.abandon(seq);
            }
        }
    }

    fn send_due(&mut self, now_s: f64) {
        if self.pending.len() >= PENDING_MAX {
            return;
        }
        self.specs.clear();
        while self.specs.len() < SEND_BATCH_MAX / 2 {
            match self.replies.pop_front() {
                Some(r) => self.specs.push(r),
                None => break,
            }
        }
        self.source.due(now_s, &mut self.specs, SEND_BATCH_MAX);
        if self.specs.is_empty() {
            return;
        }
        let wall = wall_ns();
        let t = self.shared.t_ns();
        let specs = std::mem::take(&mut self.specs);
        let mut frames = Vec::with_capacity(specs.len());
        let mut sents = Vec::with_capacity(specs.len());
        let mut meta = Vec::with_capacity(specs.len());
        for spec in &specs {
            let (frame, sent, level) = self.build(spec, wall);
            meta.push((sent.seq, Direction::of(spec.kind), level));
            frames.push(frame);
            sents.push(sent);
        }
        self.specs = specs;
        {
            let mut checker = self.shared.checker();
            for s in sents {
                checker.sent(s);
            }
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let first = client.next_msg_id();
        let n = frames.len() as u64;
        let result = client.send_batch(frames);
        for (i, (seq, dir, level)) in meta.into_iter().enumerate() {
            self.pending.push_back(Pending {
                msg_id: first + i as u64,
                seq,
                dir,
                level,
                nacked: false,
            });
            self.stats.on_sent(dir, level, t);
        }
        self.shared.sent.fetch_add(n, Ordering::Relaxed);
        if let Err(e) = result {
            self.shared
                .note(format!("{}: send failed: {e}; reconnecting", self.name()));
            self.lost_connection();
        }
    }

    fn build(&mut self, spec: &MessageSpec, wall: u64) -> (Frame, Sent, u8) {
        let shared = self.shared;
        let seq = self.stream << 40 | self.next_seq;
        self.next_seq += 1;
        let mut spec = *spec;
        let mut template = None;
        if let (Some(i), Some(files)) = (spec.replay, self.replay.as_ref()) {
            if let Some((req, t)) = files.get(i as usize) {
                spec.mode = req.mode_at(i128::from(wall));
                template = Some(t);
            }
        }
        let mut h = Header::new(spec.kind);
        h.su_id = shared.su_ids.get(spec.su).copied().unwrap_or_default();
        h.device_id = spec.device;
        h.counter = spec.counter;
        h.created_ns = wall;
        let cat = shared.catalogue;
        let template = match spec.kind {
            Kind::Request => {
                h.srv = spec.srv;
                h.mode = spec.mode as u8;
                template.unwrap_or_else(|| cat.request_template(spec.srv))
            }
            Kind::DeviceAlert | Kind::DccAlert => {
                h.alert_code = spec.alert_code;
                cat.alert_template(spec.alert_code)
            }
            _ => {
                h.srv = spec.srv;
                h.mode = spec.mode as u8;
                cat.response_template(spec.srv, spec.error)
            }
        };
        let dest = match Direction::of(spec.kind) {
            Direction::Northbound => h.su_id.0,
            Direction::Southbound => {
                scenario::csp_dest(spec.device, shared.csp_links, shared.csp_ranges)
            }
        };
        let trailer = Trailer {
            flags: spec.flags,
            seq,
            dest,
        };
        let payload = payload::build(template, &h, trailer);
        let level = scenario::expected_level(shared.rules, &spec);
        let sent = Sent {
            seq,
            kind: spec.kind,
            dest,
            su: h.su_id,
            device: h.device_id,
            alert_code: h.alert_code,
        };
        let mut frame = Frame::empty(spec.kind);
        frame.header = h;
        frame.header.payload_len = payload.len() as u32;
        frame.payload = payload;
        (frame, sent, level)
    }

    /// Reads for up to `budget` (at least what is already buffered).
    fn receive_for(&mut self, budget: Duration) {
        let deadline = Instant::now() + budget;
        let mut handled = 0;
        loop {
            let Some(client) = self.client.as_mut() else {
                return;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match client.recv(left) {
                Ok(Some(frame)) => {
                    self.on_frame(frame);
                    handled += 1;
                    if self.since_ack >= ACK_EVERY {
                        self.send_ack();
                    }
                    if handled >= 4 * SEND_BATCH_MAX {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if !self.shared.done.load(Ordering::Acquire) {
                        self.shared
                            .note(format!("{}: connection lost: {e}", self.name()));
                    }
                    self.lost_connection();
                    return;
                }
            }
        }
        self.send_ack();
    }

    fn send_ack(&mut self) {
        if self.recv_top > self.acked_top {
            if let Some(c) = self.client.as_mut() {
                if c.ack(self.recv_top).is_ok() {
                    self.acked_top = self.recv_top;
                    self.since_ack = 0;
                }
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        let h = frame.header;
        match h.kind {
            Kind::Ack => {
                while self.pending.front().is_some_and(|p| p.msg_id <= h.msg_id) {
                    if let Some(p) = self.pending.pop_front() {
                        if !p.nacked {
                            self.acked_events.push(p);
                        }
                    }
                }
            }
            Kind::Nack => {
                let reason = h.nack_reason();
                if let Ok(i) = self.pending.binary_search_by_key(&h.msg_id, |p| p.msg_id) {
                    let p = &mut self.pending[i];
                    if !p.nacked {
                        p.nacked = true;
                        self.nacked_events.push((*p, reason));
                    }
                } else {
                    self.shared.note(format!(
                        "{}: NACK {:?} of msg_id {} ({})",
                        self.name(),
                        reason,
                        h.msg_id,
                        String::from_utf8_lossy(&frame.payload)
                    ));
                }
            }
            Kind::Ping => {
                if let Some(c) = self.client.as_mut() {
                    let mut pong = Frame::pong();
                    pong.header.msg_id = h.msg_id;
                    let _ = c.send_frame(&pong);
                }
            }
            Kind::StormSummary => {
                self.mark_received(h.msg_id);
                self.summaries.push(h);
            }
            Kind::Request | Kind::Response | Kind::DeviceAlert | Kind::DccAlert => {
                self.mark_received(h.msg_id);
                let check = payload::verify(&h, &frame.payload);
                self.received_events.push(Received {
                    header: h,
                    check,
                    latency_ns: wall_ns().saturating_sub(h.created_ns),
                    t_ns: self.shared.t_ns(),
                });
            }
            Kind::Hello | Kind::HelloOk | Kind::Pong => {}
        }
    }

    fn mark_received(&mut self, msg_id: u64) {
        self.recv_top = self.recv_top.max(msg_id);
        self.since_ack += 1;
    }

    /// Applies what was read to the checker (one lock) and the stats.
    fn apply_events(&mut self) {
        if self.acked_events.is_empty()
            && self.nacked_events.is_empty()
            && self.received_events.is_empty()
            && self.summaries.is_empty()
        {
            return;
        }
        let received = std::mem::take(&mut self.received_events);
        let mut outcomes = Vec::with_capacity(received.len());
        {
            let mut checker = self.shared.checker();
            for p in &self.acked_events {
                checker.acked(p.seq);
            }
            for (p, reason) in &self.nacked_events {
                checker.nacked(p.seq, *reason);
            }
            for r in &received {
                outcomes.push(checker.received(self.endpoint, &r.header, r.check));
            }
            if let Endpoint::Su(id) = self.endpoint {
                for s in &self.summaries {
                    checker.storm_summary(id, s);
                }
            }
        }
        let t = self.shared.t_ns();
        for (p, _) in self.nacked_events.drain(..) {
            self.stats.on_nacked(p.dir, p.level, t);
        }
        self.acked_events.clear();
        self.summaries.clear();
        let mut first = 0;
        for (r, outcome) in received.into_iter().zip(outcomes) {
            let dir = Direction::of(r.header.kind);
            match outcome {
                Delivery::First => {
                    first += 1;
                    self.stats
                        .on_received(dir, r.header.priority, r.latency_ns, r.t_ns);
                    let fl = r.check.map(|t| t.flags).unwrap_or(0);
                    if fl & flags::HEADLINE != 0 {
                        self.stats.on_headline(r.latency_ns, r.t_ns);
                        self.probe.on_headline(r.header.created_ns);
                    } else if fl & flags::BACKLOG != 0 {
                        self.probe.on_bulk(r.header.created_ns);
                    }
                    if self.replies_on && r.header.kind == Kind::Request {
                        self.queue_reply(&r.header);
                    }
                }
                Delivery::Duplicate => self.stats.on_duplicate(dir, r.header.priority),
                _ => {}
            }
        }
        self.shared.received.fetch_add(first, Ordering::Relaxed);
    }

    /// A CSP answers a request with a response carrying the same RequestID, SRV and mode.
    fn queue_reply(&mut self, req: &Header) {
        let Some(&su) = self.shared.su_index.get(&req.su_id) else {
            return;
        };
        // Requests that arrive after the traffic stopped are not answered (the run is over).
        if self.shared.stop_sending.load(Ordering::Acquire) {
            return;
        }
        if self.replies.len() >= REPLIES_MAX {
            self.replies_dropped += 1;
            return;
        }
        self.replies.push_back(MessageSpec {
            kind: Kind::Response,
            srv: req.srv,
            mode: Mode::from_wire(req.mode).unwrap_or(Mode::OnDemand),
            alert_code: 0,
            su,
            device: req.device_id,
            counter: req.counter,
            flags: flags::REPLY,
            error: false,
            replay: None,
        });
    }
}

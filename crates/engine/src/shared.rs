//! What every thread of the engine can see: the directory of peers (fixed at start-up) and the
//! tokens they present (replaced whole by a reload), the links into each worker (its ring, its
//! waker, its control channel), and the count of frames held in memory by every owner
//! together (`memory_frames`, bounded by `nms_total`; each owner's `Nms` reads and moves it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, PoisonError, RwLock};

use mio::Waker;

use crate::classify::Rules;
use crate::config::{Config, Csp, DeviceRange, Secret, ServiceUser};
use crate::ids::{AlertCode, Eui64, Level};
pub(crate) use crate::owner::{Envelope, PeerRef, TicketRun};
use crate::ring;
use crate::wal::PeerKey;

/// A connection handed from the acceptor to the worker that owns its peer.
#[derive(Debug)]
pub(crate) struct Adopt {
    pub stream: mio::net::TcpStream,
    pub decoder: crate::wire::FrameDecoder,
    pub peer: PeerRef,
    pub addr: std::net::SocketAddr,
    /// For a CSP link, which of its connections this is (claimed by the acceptor, see
    /// [`Shared::claim_link_conn`]); 0 for an SU.
    pub link_conn: usize,
}

/// A CSP's cumulative ACK on connection `conn` of link `csp`, from the worker holding the
/// connection to the link's owner. `conn_id` is the connection's id on the holding worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkAck {
    pub csp: u32,
    pub conn: usize,
    pub conn_id: u64,
    pub msg_id: u64,
}

/// What the acceptor, the admin interface and other workers tell a worker.
#[derive(Debug)]
pub(crate) enum Control {
    /// Take this authenticated connection.
    Adopt(Adopt),
    /// To a CSP link's owner: connection `conn` of link `csp` opened on worker `holder`
    /// (with this id there), and may be sent requests.
    LinkOpened {
        csp: u32,
        conn: usize,
        holder: usize,
        conn_id: u64,
    },
    /// To a CSP link's owner: that connection closed; what it had not acknowledged goes back to
    /// the link's queues.
    LinkClosed { csp: u32, conn: usize, conn_id: u64 },
    /// To a CSP link's owner: what the CSP acknowledged on connections held by the sender, at
    /// most one per connection per turn of the sender, and only when it moves on.
    LinkAcks(Vec<LinkAck>),
    /// From a CSP link's owner to the worker holding connection `conn`: requests to write on
    /// it, already stamped with that connection's `msg_id`s. Bounded by the connection's share
    /// of the link's window (the owner sends no more until the CSP acknowledges).
    LinkTransmit {
        csp: u32,
        conn: usize,
        conn_id: u64,
        frames: Vec<crate::wire::Frame>,
    },
    /// Frames this worker took in are now durable at their owner (`true`) or could not be
    /// written (`false`: NACK 5), as runs of one connection and ring each.
    Tickets(Vec<(TicketRun, bool)>),
    /// An operator paused (`true`) or resumed an SU.
    Pause { su: u32, paused: bool },
    /// An operator restricted (`true`) or restored the whole northbound side.
    Restrict(bool),
    /// New rules, thresholds and rates, for traffic entering from now on.
    Reload(Arc<Reload>),
}

/// What a live reload changes (ENGINE.md §8): the owners' part (rules, alert levels,
/// exclusions, thresholds, rates; limiter and storm state are kept, not reset), and the tokens.
#[derive(Debug)]
pub(crate) struct Reload {
    pub owner: crate::owner::Reload,
    /// Every peer's token from the new file, for HELLOs from now on; taken out by
    /// [`Shared::apply_reload`] before the rest goes to the workers.
    pub tokens: Tokens,
    /// Every CSP link's `connections_max` from the new file, for HELLOs from now on.
    pub csp_connections_max: Vec<u32>,
}

/// The tokens peers must present in HELLO, by directory index. A reload replaces them whole;
/// the acceptor reads them once per HELLO, so a HELLO is checked against one file's tokens,
/// never a mix. Connections already authenticated are not checked again.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    pub su: Vec<Secret>,
    pub csp: Vec<Secret>,
}

/// One configured Service User.
#[derive(Debug)]
pub(crate) struct SuEntry {
    pub config: ServiceUser,
    /// The worker that owns it.
    pub owner: usize,
}

/// One configured CSP link.
#[derive(Debug)]
pub(crate) struct CspEntry {
    pub config: Csp,
    pub owner: usize,
    pub key: PeerKey,
    /// Its connections open (bit k: connection k), claimed by the acceptor at HELLO and freed
    /// by the worker holding the connection when it closes.
    pub conns_open: AtomicU64,
    /// `connections_max` as last applied (start-up, then each reload): for HELLOs from now on.
    pub connections_max: AtomicU32,
}

/// The way into one worker.
#[derive(Debug)]
pub(crate) struct WorkerLink {
    pub ring: ring::Producer<Envelope>,
    pub waker: Arc<Waker>,
    pub control: Sender<Control>,
}

/// Everything shared. Built once; afterwards only atomics change, and the tokens and the
/// applied configuration, which a reload replaces.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The start-up configuration. What a reload changes is applied to the workers and to
    /// [`Shared::tokens`], not here; see [`Shared::applied`].
    pub config: Config,
    pub sus: Vec<SuEntry>,
    /// SU index by EUI-64, looked up for every northbound frame: foldhash, not SipHash (the keys
    /// are the configuration's).
    su_index: HashMap<Eui64, u32, foldhash::fast::RandomState>,
    pub csps: Vec<CspEntry>,
    /// (range, CSP index), in file order.
    routes: Vec<(DeviceRange, u32)>,
    /// The CSP that takes devices no range claims: the first one configured with no ranges.
    default_csp: Option<u32>,
    /// Frames held in memory for every receiver together, and the bound on it (`nms_total`):
    /// beyond it frames go to the SURB (disk) instead.
    pub memory_frames: Arc<AtomicU64>,
    pub memory_frames_max: u64,
    /// Whether frames are made durable before they are ACKed.
    pub durable: bool,
    pub workers: Vec<WorkerLink>,
    pub shutdown: AtomicBool,
    /// Until when this node may write to a peer (always, without `[cluster]`): asked before
    /// every write to a peer's socket ([`Gate`]).
    pub gate: Arc<Gate>,
    /// The one clock origin of every worker, so that times compare across them.
    pub origin: std::time::Instant,
    /// SECMP0067: the engine-wide intake measure and capacity.
    pub intake: crate::throttle::GlobalIntake,
    /// The alert monitoring report, merged from the workers once a second.
    pub report: std::sync::Mutex<crate::report::AlertReport>,
    /// Connections open on the SU port ([0]) and the CSP port ([1]), counted from accept to
    /// close, against `listen.connections_max`.
    pub connections: [AtomicU64; 2],
    /// Each worker's latest published metrics, merged on scrape.
    pub metrics: std::sync::Mutex<Vec<super::metrics::WorkerMetrics>>,
    /// NACKs sent by the acceptor (handshake refusals), by reason.
    pub acceptor_nacks: [AtomicU64; 7],
    /// Connections waiting for their HELLO now (both ports), as the acceptor last saw them.
    pub handshakes_pending: AtomicU64,
    /// Handshakes closed to make room for newer ones (`handshakes_*_max`).
    pub handshakes_evicted: AtomicU64,
    /// Refusal log lines left out by the rate limit (one per second per reason).
    pub log_lines_suppressed: AtomicU64,
    /// The configuration file, for reloads; `None` for the embedded default.
    pub config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// The tokens HELLOs are checked against (the start-up ones until a reload changes them).
    /// Each SU's and CSP's `config.token` in the directory stays the start-up one: read tokens
    /// here, through [`Shared::su_by_token`] and [`Shared::csp_by_token`].
    tokens: RwLock<Tokens>,
    /// The configuration last applied: the start-up one, then each reload's. A reload holds
    /// the lock from its checks to its end, so that two (SIGHUP and `POST /reload`) never
    /// interleave, and each is checked against the one before it.
    pub applied: std::sync::Mutex<Config>,
    /// Each SU paused by an operator (`POST /su/{id}/pause`), by directory index: what the admin
    /// interface asked for, which the owner applies on its next turn.
    pub su_paused: Vec<AtomicBool>,
    /// The whole northbound side restricted by an operator (`POST /restrict`).
    pub restricted: AtomicBool,
    /// Reloads taken ([0]) and refused ([1]).
    pub reloads: [AtomicU64; 2],
    /// When the configuration now applied was loaded: start-up, then each reload taken; ns since
    /// the Unix epoch.
    pub config_loaded_unix_ns: AtomicU64,
}

impl Shared {
    /// Nanoseconds since the engine's origin: the `now` of every sans-IO piece.
    pub(crate) fn now(&self) -> crate::Nanos {
        self.origin.elapsed().as_nanos() as crate::Nanos
    }

    /// Builds a reload from `new`, read from `file`, for an engine running `running` (the last
    /// configuration applied). A file that would drop or add peers, keys or every rule is
    /// refused ([`crate::config::reload_refusal`]). What cannot change while running is named in
    /// the returned notes and left as it was; changed tokens are named there too.
    pub(crate) fn reload_from(
        &self,
        running: &Config,
        new: &Config,
        file: &str,
    ) -> Result<(Reload, Vec<String>), String> {
        let mut warnings = Vec::new();
        let old = &self.config;
        if new.engine.levels != old.engine.levels {
            return Err(format!(
                "engine.levels changed ({} → {}): restart to apply",
                old.engine.levels, new.engine.levels
            ));
        }
        if let Some(why) = crate::config::reload_refusal(running, new, file) {
            return Err(why);
        }
        let cluster_of = |c: &Config| {
            c.cluster.as_ref().map(|c| {
                (
                    c.node.clone(),
                    c.lease_ms,
                    c.postgres.expose_str().to_owned(),
                )
            })
        };
        if cluster_of(new) != cluster_of(old) {
            return Err(format!("{file}: [cluster] changed: restart to apply"));
        }
        for (changed, key) in [
            (new.listen.su != old.listen.su, "listen.su"),
            (new.listen.csp != old.listen.csp, "listen.csp"),
            (new.listen.admin != old.listen.admin, "listen.admin"),
            (new.engine.cores != old.engine.cores, "engine.cores"),
            (
                new.engine.durability != old.engine.durability,
                "engine.durability",
            ),
            (
                new.engine.data_dir != old.engine.data_dir,
                "engine.data_dir",
            ),
            (
                new.engine.scheduling != old.engine.scheduling,
                "engine.scheduling",
            ),
        ] {
            if changed {
                warnings.push(format!("{key} changed: restart to apply"));
            }
        }
        let storm =
            crate::storm::StormSettings::from_config(&new.alert_storm, self.workers.len() as u32)
                .map_err(|e| e.to_string())?;
        if new.admin_token != old.admin_token {
            warnings.push(
                "admin.token changed: restart to apply (the admin interface asks for the token it started with)"
                    .to_owned(),
            );
        }
        // `reload_refusal` saw to it that the new file has exactly the running peers.
        let mut sus = Vec::with_capacity(self.sus.len());
        let mut tokens = Tokens {
            su: self.sus.iter().map(|s| s.config.token.clone()).collect(),
            csp: self.csps.iter().map(|c| c.config.token.clone()).collect(),
        };
        for su in &new.service_users {
            let i = self
                .su(su.id)
                .ok_or_else(|| format!("service_user {} is not in the running engine", su.id))?;
            sus.push(crate::owner::SuRates {
                su: i,
                rate: su.delivery.rate,
                burst: su.delivery.burst,
                sr_rate: su.sr_rate,
                sr_burst: su.sr_burst,
            });
            if let Some(t) = tokens.su.get_mut(i as usize) {
                t.clone_from(&su.token);
            }
        }
        let mut csps = Vec::with_capacity(self.csps.len());
        let mut csp_connections_max: Vec<u32> = self
            .csps
            .iter()
            .map(|c| c.connections_max.load(Ordering::Relaxed))
            .collect();
        for c in &new.csps {
            let i = self
                .csps
                .iter()
                .position(|e| e.config.name == c.name)
                .ok_or_else(|| format!("csp {} is not in the running engine", c.name))?;
            csps.push(crate::owner::CspRates {
                csp: i as u32,
                rate: c.rate,
                burst: c.burst,
            });
            if let Some(t) = tokens.csp.get_mut(i) {
                t.clone_from(&c.token);
            }
            if let Some(m) = csp_connections_max.get_mut(i) {
                *m = c.connections_max;
            }
        }
        let changed = self.tokens_changed(&tokens);
        if !changed.is_empty() {
            warnings.push(format!(
                "token changed for {}: a HELLO must now present the new token and the old one is refused; connections already open stay open",
                changed.join(", ")
            ));
        }
        self.intake
            .set_capacity(
                new.service_requests.capacity,
                new.service_requests.operating_threshold,
            )
            .map_err(|e| e.to_string())?;
        Ok((
            Reload {
                owner: crate::owner::Reload {
                    rules: Arc::new(Rules::new(&new.priority)),
                    storm,
                    sus,
                    csps,
                },
                tokens,
                csp_connections_max,
            },
            warnings,
        ))
    }

    /// The peers whose token in `new` differs from the one HELLOs are checked against now.
    fn tokens_changed(&self, new: &Tokens) -> Vec<String> {
        let now = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        let sus = (now.su.iter().zip(&new.su).enumerate())
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| format!("service_user {}", self.peer_label(PeerRef::Su(i as u32))));
        let csps = (now.csp.iter().zip(&new.csp).enumerate())
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| format!("csp {}", self.peer_label(PeerRef::Csp(i as u32))));
        sus.chain(csps).collect()
    }

    /// Applies a reload: the tokens for HELLOs from now on, the rest on every worker.
    pub(crate) fn apply_reload(&self, mut reload: Reload) {
        let tokens = std::mem::take(&mut reload.tokens);
        *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = tokens;
        // A lowered limit refuses HELLOs from now on; connections already open stay open.
        for (entry, max) in self.csps.iter().zip(&reload.csp_connections_max) {
            entry.connections_max.store(*max, Ordering::Relaxed);
        }
        let reload = Arc::new(reload);
        for w in &self.workers {
            if w.control.send(Control::Reload(Arc::clone(&reload))).is_ok() {
                let _ = w.waker.wake();
            }
        }
    }
}

/// What a reload from `old` to `new` changes among what applies while running, one line each,
/// for the log: `alert_storm.threshold: 10 → 20`, `service_user[90-B3-…].rate: 50 → 80`.
/// Tokens are not compared here (the reload's notes name the peers whose token changed).
pub(crate) fn reload_changes(old: &Config, new: &Config) -> Vec<String> {
    fn diff(out: &mut Vec<String>, key: &str, a: String, b: String) {
        if a != b {
            out.push(format!("{key}: {a} → {b}"));
        }
    }
    let alerts = |a: &[(u16, Level)]| {
        let list: Vec<String> = a
            .iter()
            .map(|(code, level)| format!("{} level {}", AlertCode(*code), level.get()))
            .collect();
        format!("[{}]", list.join(", "))
    };
    let codes = |c: &[u16]| {
        let list: Vec<String> = c.iter().map(|c| AlertCode(*c).to_string()).collect();
        format!("[{}]", list.join(", "))
    };
    let mut out = Vec::new();
    let (p, q) = (&old.priority, &new.priority);
    if p.rules != q.rules {
        let same = p.rules.iter().zip(&q.rules).filter(|(a, b)| a == b).count();
        out.push(format!(
            "priority.rules: {} rules → {} rules ({} changed, added or removed)",
            p.rules.len(),
            q.rules.len(),
            p.rules.len().max(q.rules.len()) - same
        ));
    }
    diff(
        &mut out,
        "priority.high_priority_alerts",
        alerts(&p.high_priority_alerts),
        alerts(&q.high_priority_alerts),
    );
    for (key, a, b) in [
        ("priority.default_level", p.default_level, q.default_level),
        ("priority.alert_level", p.alert_level, q.alert_level),
        (
            "priority.scheduled_response_level",
            p.scheduled_response_level,
            q.scheduled_response_level,
        ),
    ] {
        diff(&mut out, key, a.get().to_string(), b.get().to_string());
    }
    let (s, t) = (&old.alert_storm, &new.alert_storm);
    let storm = [
        (
            "alert_storm.threshold",
            s.threshold.to_string(),
            t.threshold.to_string(),
        ),
        (
            "alert_storm.window_s",
            s.window.as_secs().to_string(),
            t.window.as_secs().to_string(),
        ),
        (
            "alert_storm.max_tracked_keys",
            s.max_tracked_keys.to_string(),
            t.max_tracked_keys.to_string(),
        ),
        (
            "alert_storm.exclusions",
            codes(&s.exclusions),
            codes(&t.exclusions),
        ),
    ];
    for (key, a, b) in storm {
        diff(&mut out, key, a, b);
    }
    let (r, u) = (&old.service_requests, &new.service_requests);
    diff(
        &mut out,
        "service_requests.capacity",
        r.capacity.to_string(),
        u.capacity.to_string(),
    );
    diff(
        &mut out,
        "service_requests.operating_threshold",
        r.operating_threshold.to_string(),
        u.operating_threshold.to_string(),
    );
    for su in &new.service_users {
        let Some(was) = old.service_users.iter().find(|o| o.id == su.id) else {
            continue;
        };
        for (key, a, b) in [
            ("rate", was.delivery.rate, su.delivery.rate),
            ("burst", was.delivery.burst, su.delivery.burst),
            ("sr_rate", was.sr_rate, su.sr_rate),
            ("sr_burst", was.sr_burst, su.sr_burst),
        ] {
            let key = format!("service_user[{}].{key}", su.id);
            diff(&mut out, &key, a.to_string(), b.to_string());
        }
    }
    for csp in &new.csps {
        let Some(was) = old.csps.iter().find(|o| o.name == csp.name) else {
            continue;
        };
        for (key, a, b) in [
            ("rate", was.rate, csp.rate),
            ("burst", was.burst, csp.burst),
            ("connections_max", was.connections_max, csp.connections_max),
        ] {
            let key = format!("csp[{}].{key}", csp.name);
            diff(&mut out, &key, a.to_string(), b.to_string());
        }
    }
    out
}

use crate::owner::owner_of_su;
use dsplane_cluster::gate::Gate;

impl Shared {
    pub(crate) fn new(
        config: Config,
        workers: Vec<WorkerLink>,
        intake: crate::throttle::GlobalIntake,
        report: crate::report::AlertReport,
        gate: Arc<Gate>,
    ) -> Shared {
        let n = workers.len();
        let sus: Vec<SuEntry> = config
            .service_users
            .iter()
            .map(|su| SuEntry {
                owner: owner_of_su(su.id, n),
                config: su.clone(),
            })
            .collect();
        let su_index = sus
            .iter()
            .enumerate()
            .map(|(i, s)| (s.config.id, i as u32))
            .collect();
        let csps: Vec<CspEntry> = config
            .csps
            .iter()
            .enumerate()
            .map(|(i, c)| CspEntry {
                owner: crate::owner::owner_of_csp(i, n),
                key: PeerKey::csp(&c.name),
                conns_open: AtomicU64::new(0),
                connections_max: AtomicU32::new(c.connections_max),
                config: c.clone(),
            })
            .collect();
        let routes = csps
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.config.device_ranges.iter().map(move |r| (*r, i as u32)))
            .collect();
        let default_csp = csps
            .iter()
            .position(|c| c.config.device_ranges.is_empty())
            .map(|i| i as u32);
        let tokens = Tokens {
            su: sus.iter().map(|s| s.config.token.clone()).collect(),
            csp: csps.iter().map(|c| c.config.token.clone()).collect(),
        };
        Shared {
            su_paused: sus.iter().map(|_| AtomicBool::new(false)).collect(),
            restricted: AtomicBool::new(false),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
            config_loaded_unix_ns: AtomicU64::new(crate::unix_now()),
            applied: std::sync::Mutex::new(config.clone()),
            tokens: RwLock::new(tokens),
            memory_frames_max: config.delivery.nms_total,
            durable: config.engine.durability != crate::config::Durability::None,
            config,
            sus,
            su_index,
            csps,
            routes,
            default_csp,
            memory_frames: Arc::new(AtomicU64::new(0)),
            workers,
            shutdown: AtomicBool::new(false),
            gate,
            origin: std::time::Instant::now(),
            intake,
            report: std::sync::Mutex::new(report),
            config_path: std::sync::Mutex::new(None),
            connections: [AtomicU64::new(0), AtomicU64::new(0)],
            metrics: std::sync::Mutex::new(vec![super::metrics::WorkerMetrics::default(); n]),
            acceptor_nacks: std::array::from_fn(|_| AtomicU64::new(0)),
            handshakes_pending: AtomicU64::new(0),
            handshakes_evicted: AtomicU64::new(0),
            log_lines_suppressed: AtomicU64::new(0),
        }
    }

    /// The SU with this id.
    pub(crate) fn su(&self, id: Eui64) -> Option<u32> {
        self.su_index.get(&id).copied()
    }

    /// The CSP serving `device` (ENGINE.md §5): the first range containing it, else the CSP
    /// with no ranges.
    pub(crate) fn route(&self, device: Eui64) -> Option<u32> {
        self.routes
            .iter()
            .find(|(range, _)| range.contains(device))
            .map(|(_, csp)| *csp)
            .or(self.default_csp)
    }

    /// The CSP whose token this is, comparing against every CSP's token in constant time each
    /// (and all of them, so the time taken does not say which one matched).
    pub(crate) fn csp_by_token(&self, token: &[u8]) -> Option<u32> {
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        let mut found = None;
        for (i, expected) in tokens.csp.iter().enumerate() {
            if token_eq(expected.expose(), token) && found.is_none() {
                found = Some(i as u32);
            }
        }
        found
    }

    /// The SU `id`, if this is its token. The comparison runs even for an unknown SU, so the
    /// time taken does not tell which SU ids exist.
    pub(crate) fn su_by_token(&self, id: Eui64, token: &[u8]) -> Option<u32> {
        let su = self.su(id);
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        let expected = su
            .and_then(|i| tokens.su.get(i as usize))
            .map_or(&b"\0unknown-service-user"[..], |t| t.expose());
        let matches = token_eq(expected, token);
        su.filter(|_| matches)
    }

    /// Renders `/metrics`: the workers' latest copies merged.
    pub(crate) fn render_metrics(&self) -> String {
        let mut merged = super::metrics::WorkerMetrics::default();
        if let Ok(all) = self.metrics.lock() {
            for m in all.iter() {
                merged.merge(m);
            }
        }
        super::metrics::render(&merged, &self.engine_figures())
    }

    /// The workers' latest snapshots of the peers they own, merged.
    pub(crate) fn peer_snapshots(&self) -> Vec<super::metrics::PeerSnapshot> {
        match self.metrics.lock() {
            Ok(all) => all.iter().flat_map(|m| m.peers.iter().copied()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The engine-wide figures a scrape shows beside the workers' counters.
    fn engine_figures(&self) -> super::metrics::EngineFigures {
        super::metrics::EngineFigures {
            acceptor_nacks: std::array::from_fn(|i| self.acceptor_nacks[i].load(Ordering::Relaxed)),
            connections: [
                self.connections[0].load(Ordering::Relaxed),
                self.connections[1].load(Ordering::Relaxed),
            ],
            admission: super::metrics::Admission {
                handshakes_pending: self.handshakes_pending.load(Ordering::Relaxed),
                handshakes_evicted: self.handshakes_evicted.load(Ordering::Relaxed),
                log_lines_suppressed: self.log_lines_suppressed.load(Ordering::Relaxed),
            },
            su_names: self.sus.iter().map(|s| s.config.id.to_string()).collect(),
            su_paused: self
                .su_paused
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .collect(),
            restricted: self.restricted.load(Ordering::Relaxed),
            reloads: [
                self.reloads[0].load(Ordering::Relaxed),
                self.reloads[1].load(Ordering::Relaxed),
            ],
            config_loaded_unix_s: self.config_loaded_unix_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// The worker that owns a peer.
    pub(crate) fn owner(&self, peer: PeerRef) -> Option<usize> {
        match peer {
            PeerRef::Su(i) => self.sus.get(i as usize).map(|s| s.owner),
            PeerRef::Csp(i) => self.csps.get(i as usize).map(|c| c.owner),
        }
    }

    /// A peer's name for logs and metrics: an SU's EUI-64, a CSP link's name.
    pub(crate) fn peer_label(&self, peer: PeerRef) -> String {
        match peer {
            PeerRef::Su(i) => self.sus.get(i as usize).map(|s| s.config.id.to_string()),
            PeerRef::Csp(i) => self.csps.get(i as usize).map(|c| c.config.name.clone()),
        }
        .unwrap_or_else(|| match peer {
            PeerRef::Su(i) => format!("service user #{i}"),
            PeerRef::Csp(i) => format!("csp #{i}"),
        })
    }

    /// Counts a NACK the acceptor sent.
    pub(crate) fn count_acceptor_nack(&self, reason: crate::wire::NackReason) {
        if let Some(c) = self.acceptor_nacks.get(reason as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The open-connection counter of a role's port.
    pub(crate) fn connections_of(&self, role: crate::wire::Role) -> &AtomicU64 {
        match role {
            crate::wire::Role::Su => &self.connections[0],
            crate::wire::Role::Csp => &self.connections[1],
        }
    }

    /// A connection of this kind of peer closed.
    pub(crate) fn connection_closed(&self, peer: PeerRef) {
        let role = match peer {
            PeerRef::Su(_) => crate::wire::Role::Su,
            PeerRef::Csp(_) => crate::wire::Role::Csp,
        };
        self.connections_of(role).fetch_sub(1, Ordering::Relaxed);
    }

    /// Claims a connection of CSP link `csp` for a HELLO: the lowest free below its
    /// `connections_max`, or `None` when it holds that many already.
    pub(crate) fn claim_link_conn(&self, csp: u32) -> Option<usize> {
        let entry = self.csps.get(csp as usize)?;
        let max = entry
            .connections_max
            .load(Ordering::Relaxed)
            .min(crate::limits::CSP_CONNECTIONS_MAX);
        // Relaxed: the bits are claimed by the acceptor alone and freed by the workers; what
        // a connection carries is handed over through the control channels, not through them.
        let mut open = entry.conns_open.load(Ordering::Relaxed);
        loop {
            let k = (!open).trailing_zeros();
            if k >= max {
                return None;
            }
            match entry.conns_open.compare_exchange_weak(
                open,
                open | 1 << k,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(k as usize),
                Err(now) => open = now,
            }
        }
    }

    /// Connection `conn` of CSP link `csp` closed (or was never adopted): it may be claimed
    /// again.
    pub(crate) fn release_link_conn(&self, csp: u32, conn: usize) {
        if let (Some(entry), true) = (self.csps.get(csp as usize), conn < 64) {
            entry
                .conns_open
                .fetch_and(!(1u64 << conn), Ordering::Relaxed);
        }
    }

    /// The worker that holds connection `conn` of CSP link `csp`: the link's owner for the
    /// first, the next workers for the others, so that a link's intake runs on as many cores
    /// as it has connections (up to the number of workers).
    pub(crate) fn link_conn_worker(&self, csp: u32, conn: usize) -> Option<usize> {
        let owner = self.csps.get(csp as usize)?.owner;
        Some((owner + conn) % self.workers.len().max(1))
    }

    /// The worker owning the peer with this log key, if it is configured.
    pub(crate) fn owner_of_key(&self, key: PeerKey) -> Option<usize> {
        match key {
            PeerKey::Su(id) => self.su(id).map(|i| self.sus[i as usize].owner),
            PeerKey::Csp(_) => self.csps.iter().find(|c| c.key == key).map(|c| c.owner),
        }
    }

    /// Whether a shutdown was asked for. Acquire pairs with the Release store in
    /// [`Shared::request_shutdown`].
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    pub(crate) fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        for w in &self.workers {
            // A worker whose poll is gone has already stopped.
            let _ = w.waker.wake();
        }
    }
}

/// Compares two tokens in time that depends only on their lengths, not on where they differ.
pub(crate) fn token_eq(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(!e);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_eq(b"secret", b"secret"));
        assert!(!token_eq(b"secret", b"secreT"));
        assert!(!token_eq(b"secret", b"secret2"));
        assert!(!token_eq(b"secret", b"secre"));
        assert!(!token_eq(b"secret", b""));
        assert!(!token_eq(b"a", b"\x9e"));
    }

    #[test]
    fn owners_spread_over_workers() {
        let mut counts = [0usize; 4];
        for i in 0..4_000u64 {
            counts[owner_of_su(Eui64(0x90B3_D51F_3001_0000 + i), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(owner_of_su(Eui64(42), 1), 0);
    }
}

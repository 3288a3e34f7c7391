//! Scenarios (ENGINE.md §9) as deterministic traffic plans.
//!
//! A scenario is a set of [`Flow`]s per sending thread: "from t = 2 s to t = 5 s, 2,000 msg/s of
//! routine responses and alerts for SU 0". A [`Source`] turns its flows into [`MessageSpec`]s
//! as time passes (open loop: how many are due depends only on the clock, not on how fast
//! dsplane answers), drawing every choice from a seeded [`Rng`], so that the same seed gives the
//! same sequence of messages on every run. Time is a parameter (sans-IO), which is also how the
//! tests check determinism without sockets.
//!
//! | scenario | what it plays |
//! |---|---|
//! | `steady` | every SU sends a realistic request mix; the CSPs send responses and alerts for every SU and answer each request |
//! | `storm` | `steady`, plus a few devices flooding one alert code (0x8F75, strong magnetic field) at one SU |
//! | `outage` | SU 0 is disconnected while a backlog of routine responses and alerts builds for it, then reconnects while urgent traffic (SRV 2.2 top-ups, 7.x supply) keeps arriving: the headline is that urgent traffic's latency |
//! | `scheduled-flood` | bulk DCC-scheduled reads (requests and their responses) above the SUs' delivery rate, while on-demand top-ups keep coming: the headline is the top-ups' latency |

use std::sync::Arc;

use crate::classify::Rules;
use crate::ids::{Eui64, Mode, Srv};
use crate::wire::Kind;
use serde::Serialize;

use crate::checker::csp_for_device;
use crate::data::Catalogue;
use crate::payload::flags;
use crate::replay::ReplayFile;
use crate::rng::Rng;

/// The four scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// A realistic mix, steady rates.
    Steady,
    /// A few devices flooding one alert code.
    Storm,
    /// An SU down while its backlog builds, then back while urgent traffic arrives.
    Outage,
    /// Bulk scheduled reads against on-demand top-ups.
    ScheduledFlood,
}

impl ScenarioKind {
    /// Its name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioKind::Steady => "steady",
            ScenarioKind::Storm => "storm",
            ScenarioKind::Outage => "outage",
            ScenarioKind::ScheduledFlood => "scheduled-flood",
        }
    }
}

/// The alert code of the storm scenario: strong magnetic field, which storm protection must
/// throttle (it is not on the exclusion list).
pub const STORM_ALERT_CODE: u16 = 0x8F75;
/// Devices flooding in the storm scenario.
pub const STORM_DEVICES: u64 = 3;
/// The SU taken down in the outage scenario.
pub const OUTAGE_SU: usize = 0;

/// The knobs of a plan.
#[derive(Debug, Clone)]
pub struct PlanParams {
    /// Which scenario.
    pub scenario: ScenarioKind,
    /// Seed of every random choice.
    pub seed: u64,
    /// Seconds of traffic.
    pub duration_s: f64,
    /// Service Users played.
    pub sus: usize,
    /// CSP links played (one thread each).
    pub csp_links: usize,
    /// When the CSP links split the device space (`csp_links` equal ranges): requests are then
    /// checked to arrive at the CSP that serves their device.
    pub csp_ranges: bool,
    /// Northbound base rate, messages/s over all CSP links.
    pub rate: f64,
    /// Requests/s per SU.
    pub req_rate: f64,
    /// Northbound delivery rate per SU the engine is configured with: sizes backlogs and floods.
    pub su_rate: f64,
}

/// One message to send, before it gets its seq, `created_ns` and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageSpec {
    /// REQUEST, RESPONSE or DEVICE_ALERT.
    pub kind: Kind,
    /// SRV (requests, responses).
    pub srv: Srv,
    /// Mode of operation (requests, responses).
    pub mode: Mode,
    /// Alert code (alerts).
    pub alert_code: u16,
    /// Index of the SU (originator of a request, recipient otherwise).
    pub su: usize,
    /// Target or source device.
    pub device: Eui64,
    /// Request counter.
    pub counter: u64,
    /// [`flags`].
    pub flags: u32,
    /// A DUIS error response instead of a success (responses only).
    pub error: bool,
    /// Index of the replay file it comes from, if any.
    pub replay: Option<u32>,
}

/// Weighted SRV choices with their modes.
#[derive(Debug, Clone)]
pub struct RequestMix {
    choices: Vec<(Srv, Mode, u32)>,
    total: u64,
}

impl RequestMix {
    fn new(choices: Vec<(Srv, Mode, u32)>) -> RequestMix {
        let total = choices.iter().map(|c| u64::from(c.2)).sum();
        RequestMix { choices, total }
    }

    /// Adds every SRV of `prefix` allowing `mode`, sharing `weight` between them.
    fn add(
        choices: &mut Vec<(Srv, Mode, u32)>,
        cat: &Catalogue,
        prefix: &str,
        mode: Mode,
        weight: u32,
    ) {
        let srvs = cat.srvs_matching(prefix, mode);
        let each = (weight * 100 / srvs.len().max(1) as u32).max(1);
        choices.extend(srvs.into_iter().map(|s| (s, mode, each)));
    }

    /// What Service Users send day to day: mostly reads, some tariff and configuration work, a
    /// steady trickle of top-ups and supply operations, the odd commissioning.
    pub fn steady(cat: &Catalogue) -> RequestMix {
        let mut c = Vec::new();
        Self::add(&mut c, cat, "4.", Mode::OnDemand, 36);
        Self::add(&mut c, cat, "4.", Mode::FutureDated, 4);
        Self::add(&mut c, cat, "4.", Mode::DccScheduled, 6);
        Self::add(&mut c, cat, "1.", Mode::OnDemand, 8);
        Self::add(&mut c, cat, "6.", Mode::OnDemand, 10);
        Self::add(&mut c, cat, "3.", Mode::OnDemand, 3);
        Self::add(&mut c, cat, "11.", Mode::OnDemand, 4);
        Self::add(&mut c, cat, "2.2", Mode::OnDemand, 8);
        Self::add(&mut c, cat, "7.", Mode::OnDemand, 4);
        Self::add(&mut c, cat, "8.1.1", Mode::OnDemand, 2);
        RequestMix::new(c)
    }

    /// Time-critical supply traffic: top-ups (2.2) and supply enable/disable/arm (7.1–7.3).
    pub fn urgent(cat: &Catalogue) -> RequestMix {
        let mut c = Vec::new();
        Self::add(&mut c, cat, "2.2", Mode::OnDemand, 3);
        for srv in ["7.1", "7.2", "7.3"] {
            Self::add(&mut c, cat, srv, Mode::OnDemand, 1);
        }
        RequestMix::new(c)
    }

    /// Routine work that can wait: reads, tariff and configuration updates.
    pub fn routine(cat: &Catalogue) -> RequestMix {
        let mut c = Vec::new();
        Self::add(&mut c, cat, "4.", Mode::OnDemand, 6);
        Self::add(&mut c, cat, "1.", Mode::OnDemand, 2);
        Self::add(&mut c, cat, "6.", Mode::OnDemand, 2);
        RequestMix::new(c)
    }

    /// Bulk DCC-scheduled reads.
    pub fn scheduled(cat: &Catalogue) -> RequestMix {
        let mut c = Vec::new();
        Self::add(&mut c, cat, "4.", Mode::DccScheduled, 1);
        RequestMix::new(c)
    }

    fn draw(&self, rng: &mut Rng) -> (Srv, Mode) {
        let mut x = rng.below(self.total);
        for &(srv, mode, w) in &self.choices {
            if x < u64::from(w) {
                return (srv, mode);
            }
            x -= u64::from(w);
        }
        self.choices
            .last()
            .map_or((Srv::new(4, 1, 1), Mode::OnDemand), |c| (c.0, c.1))
    }
}

/// Alert codes: the GBCS list, with the configured high-priority ones now and then.
#[derive(Debug, Clone)]
pub struct AlertMix {
    routine: Vec<u16>,
    urgent: Vec<u16>,
    urgent_share: f64,
}

impl AlertMix {
    /// Every GBCS code; `urgent` (the configured high-priority alerts) make up `urgent_share`.
    pub fn new(cat: &Catalogue, urgent: &[u16], urgent_share: f64) -> AlertMix {
        let urgent: Vec<u16> = cat
            .alerts
            .iter()
            .map(|a| a.code)
            .filter(|c| urgent.contains(c))
            .collect();
        let routine = cat
            .alerts
            .iter()
            .map(|a| a.code)
            .filter(|c| !urgent.contains(c) && *c != STORM_ALERT_CODE)
            .collect();
        AlertMix {
            routine,
            urgent_share: if urgent.is_empty() { 0.0 } else { urgent_share },
            urgent,
        }
    }

    fn draw(&self, rng: &mut Rng) -> u16 {
        let list = if rng.chance(self.urgent_share) {
            &self.urgent
        } else {
            &self.routine
        };
        rng.pick(list).copied().unwrap_or(STORM_ALERT_CODE)
    }
}

/// What a flow sends.
#[derive(Debug, Clone)]
pub enum Mix {
    /// REQUESTs from the SU thread's own SU.
    Requests(Arc<RequestMix>),
    /// The replay files of this SU, in order, round and round.
    Replay(Arc<Vec<ReplayFile>>),
    /// RESPONSEs (`response_share`) and DEVICE_ALERTs.
    Northbound {
        /// Share of responses, the rest alerts.
        response_share: f64,
        /// SRVs of the responses.
        responses: Arc<RequestMix>,
        /// Codes of the alerts.
        alerts: Arc<AlertMix>,
    },
    /// One alert code from a few devices.
    Storm {
        /// The code.
        code: u16,
        /// How many devices.
        devices: u64,
    },
}

/// A stream of messages at a constant rate between two instants.
#[derive(Debug, Clone)]
pub struct Flow {
    /// For the report.
    pub name: &'static str,
    /// Start, seconds from the start of the run.
    pub start_s: f64,
    /// End (exclusive).
    pub end_s: f64,
    /// Messages/s.
    pub rate: f64,
    /// SU indices it is for (or, for requests, the one SU sending them), round-robin by draw.
    pub targets: Vec<usize>,
    /// What it sends.
    pub mix: Mix,
    /// [`flags`] on every message.
    pub flags: u32,
}

impl Flow {
    /// Messages this flow sends over the whole run.
    pub fn total(&self) -> u64 {
        (self.rate * (self.end_s - self.start_s).max(0.0)).floor() as u64
    }
}

/// The device space a sender draws devices from: `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpace {
    /// First EUI-64.
    pub first: u64,
    /// Last EUI-64 (inclusive).
    pub last: u64,
}

impl DeviceSpace {
    /// Every device.
    pub const ALL: DeviceSpace = DeviceSpace {
        first: 0,
        last: u64::MAX,
    };

    /// Range `index` of `links` equal consecutive ranges (matching
    /// [`crate::checker::csp_for_device`]).
    pub fn of_link(index: usize, links: usize) -> DeviceSpace {
        if links <= 1 {
            return DeviceSpace::ALL;
        }
        let first = range_first(index, links);
        let last = if index + 1 >= links {
            u64::MAX
        } else {
            range_first(index + 1, links) - 1
        };
        DeviceSpace { first, last }
    }

    /// A device of the space.
    pub fn draw(&self, rng: &mut Rng) -> Eui64 {
        match (self.last - self.first).checked_add(1) {
            Some(len) => Eui64(self.first + rng.below(len)),
            None => Eui64(rng.next_u64()),
        }
    }
}

/// First EUI-64 of range `index` of `links`: ceil(index × 2^64 / links).
fn range_first(index: usize, links: usize) -> u64 {
    let n = (index as u128) << 64;
    n.div_ceil(links as u128).min(u128::from(u64::MAX)) as u64
}

#[derive(Debug, Clone)]
struct FlowState {
    flow: Flow,
    emitted: u64,
    rng: Rng,
}

/// One sending thread's messages: its flows, driven by the clock.
#[derive(Debug, Clone)]
pub struct Source {
    flows: Vec<FlowState>,
    devices: DeviceSpace,
    next_counter: u64,
}

impl Source {
    /// A source of `flows`; `stream` makes its random choices independent of other threads'.
    pub fn new(seed: u64, stream: u64, flows: Vec<Flow>, devices: DeviceSpace) -> Source {
        let flows = flows
            .into_iter()
            .enumerate()
            .map(|(i, flow)| FlowState {
                flow,
                emitted: 0,
                rng: Rng::new(seed, stream << 8 | i as u64),
            })
            .collect();
        Source {
            flows,
            devices,
            next_counter: stream << 32 | 1,
        }
    }

    /// The flows.
    pub fn flows(&self) -> impl Iterator<Item = &Flow> {
        self.flows.iter().map(|f| &f.flow)
    }

    /// Appends to `out` the messages due by `now_s` (at most `max` in all), flow by flow.
    pub fn due(&mut self, now_s: f64, out: &mut Vec<MessageSpec>, max: usize) {
        for state in &mut self.flows {
            let f = &state.flow;
            if now_s < f.start_s || f.targets.is_empty() {
                continue;
            }
            let until = now_s.min(f.end_s);
            let target = (f.rate * (until - f.start_s)).floor().max(0.0) as u64;
            while state.emitted < target && out.len() < max {
                let counter = self.next_counter;
                self.next_counter += 1;
                out.push(draw(&mut state.rng, f, self.devices, counter));
                state.emitted += 1;
            }
        }
    }

    /// Whether every flow has sent everything it will ever send.
    pub fn finished(&self) -> bool {
        self.flows.iter().all(|s| s.emitted >= s.flow.total())
    }
}

fn draw(rng: &mut Rng, f: &Flow, devices: DeviceSpace, counter: u64) -> MessageSpec {
    let su = *rng.pick(&f.targets).unwrap_or(&0);
    let mut m = MessageSpec {
        kind: Kind::Response,
        srv: Srv(0),
        mode: Mode::OnDemand,
        alert_code: 0,
        su,
        device: devices.draw(rng),
        counter,
        flags: f.flags,
        error: false,
        replay: None,
    };
    match &f.mix {
        Mix::Requests(mix) => {
            m.kind = Kind::Request;
            (m.srv, m.mode) = mix.draw(rng);
        }
        Mix::Replay(files) => {
            // Round and round the files in order; the counter advances each pass (RequestIDs
            // stay unique) and the device and SRV come from the file.
            let n = files.len().max(1) as u64;
            let i = (counter & 0xFFFF_FFFF).saturating_sub(1) % n;
            if let Some(file) = files.get(i as usize) {
                let pass = (counter & 0xFFFF_FFFF).saturating_sub(1) / n;
                m.kind = Kind::Request;
                m.srv = file.request.srv;
                m.device = file.request.device;
                m.counter = file.request.counter.wrapping_add(pass);
                m.replay = Some(i as u32);
            }
        }
        Mix::Northbound {
            response_share,
            responses,
            alerts,
        } => {
            if rng.chance(*response_share) {
                (m.srv, m.mode) = responses.draw(rng);
                m.error = rng.chance(0.02);
            } else {
                m.kind = Kind::DeviceAlert;
                m.alert_code = alerts.draw(rng);
            }
        }
        Mix::Storm { code, devices: n } => {
            m.kind = Kind::DeviceAlert;
            m.alert_code = *code;
            // The same few devices every time: the first ones of the space.
            m.device = Eui64(devices.first.wrapping_add(rng.below((*n).max(1))));
        }
    }
    m
}

/// The level dsplane's rules give a message (what the report counts it as when sent).
pub fn expected_level(rules: &Rules, m: &MessageSpec) -> u8 {
    match m.kind {
        Kind::Request => rules.request_level(m.srv, m.mode).get(),
        Kind::DeviceAlert | Kind::DccAlert => rules.alert_level(m.alert_code).get(),
        _ => rules.unknown_response_level(m.srv, m.mode).get(),
    }
}

/// An SU thread's plan.
#[derive(Debug, Clone)]
pub struct SuPlan {
    /// Its requests.
    pub source: Source,
    /// The replay files it sends (its [`MessageSpec::replay`] indices point into them).
    pub replay: Option<Arc<Vec<ReplayFile>>>,
    /// Disconnected over [down, up) seconds, if the scenario takes it down.
    pub outage: Option<(f64, f64)>,
}

/// A CSP thread's plan.
#[derive(Debug, Clone)]
pub struct CspPlan {
    /// Its responses and alerts.
    pub source: Source,
    /// Whether it answers every request it receives with a response.
    pub replies: bool,
}

/// The whole plan: one entry per thread.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Per SU.
    pub sus: Vec<SuPlan>,
    /// Per CSP link.
    pub csps: Vec<CspPlan>,
    /// What the scenario's headline measures, for the report.
    pub headline: Option<&'static str>,
}

/// Stream number of SU thread `i` (seq and counter spaces).
pub fn su_stream(i: usize) -> u64 {
    0x100 + i as u64
}

/// Stream number of CSP thread `i`.
pub fn csp_stream(i: usize) -> u64 {
    0x200 + i as u64
}

/// Builds the plan of `p`.
///
/// `urgent_alerts` are the configured high-priority alert codes; `replay`, if given, replaces the
/// SUs' request mix with the files (each SU sends the files whose RequestID names it).
pub fn plan(
    p: &PlanParams,
    cat: &Catalogue,
    urgent_alerts: &[u16],
    su_ids: &[Eui64],
    replay: Option<&[ReplayFile]>,
) -> Plan {
    let d = p.duration_s;
    let n = p.sus.max(1);
    let links = p.csp_links.max(1) as f64;
    let steady = Arc::new(RequestMix::steady(cat));
    let urgent = Arc::new(RequestMix::urgent(cat));
    let routine = Arc::new(RequestMix::routine(cat));
    let scheduled = Arc::new(RequestMix::scheduled(cat));
    let alerts = Arc::new(AlertMix::new(cat, urgent_alerts, 0.03));
    // The outage backlog is routine: no high-priority alert among its alerts, so that level 1
    // measures only what arrives once the SU is back.
    let routine_alerts = Arc::new(AlertMix::new(cat, urgent_alerts, 0.0));
    let northbound = |responses: &Arc<RequestMix>, share: f64| Mix::Northbound {
        response_share: share,
        responses: Arc::clone(responses),
        alerts: Arc::clone(&alerts),
    };
    let routine_northbound = Mix::Northbound {
        response_share: 0.7,
        responses: Arc::clone(&routine),
        alerts: routine_alerts,
    };
    let flow = |name, start_s, end_s, rate: f64, targets: Vec<usize>, mix, flags| Flow {
        name,
        start_s,
        end_s,
        rate,
        targets,
        mix,
        flags,
    };
    let all: Vec<usize> = (0..n).collect();

    // Outage timing: down at 20 %, the backlog stops building at 45 %, up at 50 %.
    let (down, backlog_end, up) = (0.2 * d, 0.45 * d, 0.5 * d);
    // Flood timing: 10 % to 50 %, on half of the SUs (at least one).
    let (flood_start, flood_end) = (0.1 * d, 0.5 * d);
    let flooded: Vec<usize> = (0..n.div_ceil(2)).collect();

    let mut sus = Vec::with_capacity(n);
    for i in 0..n {
        let mut my_files = None;
        let mix = match replay {
            Some(files) => {
                let mine: Vec<ReplayFile> = files
                    .iter()
                    .filter(|f| su_ids.get(i) == Some(&f.request.su))
                    .cloned()
                    .collect();
                (!mine.is_empty()).then(|| {
                    let mine = Arc::new(mine);
                    my_files = Some(Arc::clone(&mine));
                    Mix::Replay(mine)
                })
            }
            None => Some(Mix::Requests(Arc::clone(&steady))),
        };
        let mut flows = Vec::new();
        let outage = (p.scenario == ScenarioKind::Outage && i == OUTAGE_SU).then_some((down, up));
        if let Some(mix) = mix {
            match outage {
                Some((down, up)) => {
                    flows.push(flow(
                        "requests",
                        0.0,
                        down,
                        p.req_rate,
                        vec![i],
                        mix.clone(),
                        0,
                    ));
                    flows.push(flow("requests", up, d, p.req_rate, vec![i], mix, 0));
                }
                None => flows.push(flow("requests", 0.0, d, p.req_rate, vec![i], mix, 0)),
            }
        }
        if p.scenario == ScenarioKind::ScheduledFlood && flooded.contains(&i) {
            flows.push(flow(
                "scheduled reads",
                flood_start,
                flood_end,
                p.req_rate * 5.0,
                vec![i],
                Mix::Requests(Arc::clone(&scheduled)),
                flags::FLOOD,
            ));
        }
        sus.push(SuPlan {
            source: Source::new(p.seed, su_stream(i), flows, DeviceSpace::ALL),
            replay: my_files,
            outage,
        });
    }

    let mut csps = Vec::with_capacity(p.csp_links.max(1));
    for c in 0..p.csp_links.max(1) {
        let base = p.rate / links;
        let mut flows = Vec::new();
        match p.scenario {
            ScenarioKind::Outage => {
                let others: Vec<usize> = (0..n).filter(|&i| i != OUTAGE_SU).collect();
                let share = base / n as f64;
                if !others.is_empty() {
                    flows.push(flow(
                        "responses and alerts",
                        0.0,
                        d,
                        share * others.len() as f64,
                        others,
                        northbound(&steady, 0.7),
                        0,
                    ));
                }
                let down_su = vec![OUTAGE_SU];
                flows.push(flow(
                    "responses and alerts",
                    0.0,
                    down,
                    share,
                    down_su.clone(),
                    northbound(&steady, 0.7),
                    0,
                ));
                flows.push(flow(
                    "responses and alerts",
                    up,
                    d,
                    share,
                    down_su.clone(),
                    northbound(&steady, 0.7),
                    0,
                ));
                flows.push(flow(
                    "outage backlog (routine + alerts)",
                    down,
                    backlog_end,
                    p.su_rate / links,
                    down_su.clone(),
                    routine_northbound.clone(),
                    flags::BACKLOG,
                ));
                flows.push(flow(
                    "urgent after restore (2.2, 7.x)",
                    up,
                    d,
                    (p.su_rate / 20.0).max(10.0) / links,
                    down_su,
                    northbound(&urgent, 1.0),
                    flags::HEADLINE,
                ));
            }
            ScenarioKind::ScheduledFlood => {
                flows.push(flow(
                    "responses and alerts",
                    0.0,
                    d,
                    base,
                    all.clone(),
                    northbound(&steady, 0.7),
                    0,
                ));
                flows.push(flow(
                    "scheduled read responses",
                    flood_start,
                    flood_end,
                    p.su_rate * 1.5 * flooded.len() as f64 / links,
                    flooded.clone(),
                    northbound(&scheduled, 1.0),
                    flags::FLOOD | flags::BACKLOG,
                ));
                flows.push(flow(
                    "on-demand top-ups (2.2, 7.x)",
                    0.0,
                    d,
                    (p.su_rate / 40.0).max(5.0) * flooded.len() as f64 / links,
                    flooded.clone(),
                    northbound(&urgent, 1.0),
                    flags::HEADLINE,
                ));
            }
            ScenarioKind::Storm => {
                flows.push(flow(
                    "responses and alerts",
                    0.0,
                    d,
                    base,
                    all.clone(),
                    northbound(&steady, 0.7),
                    0,
                ));
                flows.push(flow(
                    "alert storm (0x8F75)",
                    0.2 * d,
                    0.8 * d,
                    base,
                    vec![1 % n],
                    Mix::Storm {
                        code: STORM_ALERT_CODE,
                        devices: STORM_DEVICES,
                    },
                    flags::STORM,
                ));
            }
            ScenarioKind::Steady => {
                flows.push(flow(
                    "responses and alerts",
                    0.0,
                    d,
                    base,
                    all.clone(),
                    northbound(&steady, 0.7),
                    0,
                ));
            }
        }
        let devices = if p.csp_ranges {
            DeviceSpace::of_link(c, p.csp_links)
        } else {
            DeviceSpace::ALL
        };
        csps.push(CspPlan {
            source: Source::new(p.seed, csp_stream(c), flows, devices),
            replies: true,
        });
    }
    let headline = match p.scenario {
        ScenarioKind::Outage => Some("urgent responses (2.2, 7.x) for the SU back from its outage"),
        ScenarioKind::ScheduledFlood => {
            Some("on-demand top-ups (2.2, 7.x) for the SUs under the scheduled flood")
        }
        _ => None,
    };
    Plan {
        sus,
        csps,
        headline,
    }
}

/// The CSP index serving `device` when `links` CSPs split the space (for the request trailer).
pub fn csp_dest(device: Eui64, links: usize, ranges: bool) -> u64 {
    if ranges {
        u64::from(csp_for_device(device, links as u32)) + 1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(scenario: ScenarioKind, seed: u64) -> PlanParams {
        PlanParams {
            scenario,
            seed,
            duration_s: 4.0,
            sus: 3,
            csp_links: 2,
            csp_ranges: true,
            rate: 600.0,
            req_rate: 40.0,
            su_rate: 1000.0,
        }
    }

    fn su_ids() -> Vec<Eui64> {
        (0..3).map(|i| Eui64(0x90B3_D51F_3001_0000 + i)).collect()
    }

    /// Every message of every thread, driving the clock in uneven steps.
    fn generate(p: &PlanParams) -> Vec<Vec<MessageSpec>> {
        let cat = Catalogue::embedded().unwrap();
        let plan = plan(p, &cat, &[0x8F1C], &su_ids(), None);
        let mut out = Vec::new();
        for mut source in plan
            .sus
            .into_iter()
            .map(|s| s.source)
            .chain(plan.csps.into_iter().map(|c| c.source))
        {
            let mut msgs = Vec::new();
            let mut t = 0.0;
            while t <= p.duration_s + 0.1 {
                source.due(t, &mut msgs, usize::MAX);
                t += 0.0137;
            }
            assert!(source.finished());
            out.push(msgs);
        }
        out
    }

    #[test]
    fn same_seed_same_traffic() {
        for scenario in [
            ScenarioKind::Steady,
            ScenarioKind::Storm,
            ScenarioKind::Outage,
            ScenarioKind::ScheduledFlood,
        ] {
            let a = generate(&params(scenario, 42));
            let b = generate(&params(scenario, 42));
            assert_eq!(a, b, "{scenario:?}");
            let c = generate(&params(scenario, 43));
            assert_ne!(a, c, "{scenario:?}: another seed, other traffic");
        }
    }

    #[test]
    fn batching_does_not_change_the_sequence() {
        let p = params(ScenarioKind::Steady, 7);
        let cat = Catalogue::embedded().unwrap();
        let mut one = plan(&p, &cat, &[], &su_ids(), None).csps.remove(0).source;
        let mut other = one.clone();
        let mut a = Vec::new();
        one.due(4.0, &mut a, usize::MAX);
        let mut b = Vec::new();
        let mut t = 0.0;
        while t < 4.0 {
            other.due(t, &mut b, 3);
            t += 0.001;
        }
        other.due(4.0, &mut b, usize::MAX);
        assert_eq!(a, b);
    }

    #[test]
    fn rates_and_windows_are_kept() {
        let p = params(ScenarioKind::Outage, 1);
        let all = generate(&p);
        // SU 0 sends nothing while it is down: 40/s for 0.8 s before and 2 s after.
        assert_eq!(all[0].len(), 32 + 80);
        // The backlog and the urgent traffic after the restore go to SU 0 only.
        let csp: Vec<&MessageSpec> = all[3].iter().chain(&all[4]).collect();
        let backlog: Vec<_> = csp
            .iter()
            .filter(|m| m.flags & flags::BACKLOG != 0)
            .collect();
        let urgent: Vec<_> = csp
            .iter()
            .filter(|m| m.flags & flags::HEADLINE != 0)
            .collect();
        assert_eq!(
            backlog.len(),
            2 * 500,
            "su_rate for 1 s, split over two links"
        );
        assert_eq!(urgent.len(), 2 * 50, "su_rate/20 for 2 s");
        assert!(backlog.iter().chain(&urgent).all(|m| m.su == OUTAGE_SU));
        assert!(urgent
            .iter()
            .all(|m| m.kind == Kind::Response && matches!(m.srv.major(), 2 | 7)));
    }

    #[test]
    fn csps_send_for_devices_in_their_range() {
        let all = generate(&params(ScenarioKind::Steady, 3));
        for (c, msgs) in all[3..].iter().enumerate() {
            assert!(msgs.iter().all(|m| csp_for_device(m.device, 2) == c as u32));
        }
        assert_eq!(DeviceSpace::of_link(1, 2).last, u64::MAX);
        assert_eq!(DeviceSpace::of_link(0, 2).last, (1 << 63) - 1);
        for links in 2..7 {
            for i in 0..links {
                let s = DeviceSpace::of_link(i, links);
                assert_eq!(csp_for_device(Eui64(s.first), links as u32), i as u32);
                assert_eq!(csp_for_device(Eui64(s.last), links as u32), i as u32);
                if i + 1 < links {
                    assert_eq!(DeviceSpace::of_link(i + 1, links).first, s.last + 1);
                }
            }
        }
    }

    #[test]
    fn the_steady_mix_spans_every_level() {
        let cat = Catalogue::embedded().unwrap();
        let config = crate::config::Config::embedded_default().unwrap();
        let rules = Rules::new(&config.priority);
        let all = generate(&params(ScenarioKind::Steady, 9));
        let mut per_level = [0u32; 5];
        for m in all.iter().flatten() {
            per_level[usize::from(expected_level(&rules, m))] += 1;
        }
        assert!(per_level[1..].iter().all(|&n| n > 0), "{per_level:?}");
        assert!(
            per_level[4] > per_level[1],
            "routine outnumbers urgent: {per_level:?}"
        );
        let _ = cat;
    }
}

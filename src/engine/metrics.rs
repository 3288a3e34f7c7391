//! Metrics: each worker counts into its own plain counters and histograms (no atomics, no
//! sharing on the message path) and publishes a copy every housekeeping tick (250 ms); a scrape
//! of `/metrics` merges the latest copies and renders the Prometheus text format.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::wire::{Kind, NackReason};

/// Directions: 0 northbound (to an SU), 1 southbound (to a CSP).
pub(crate) const DIRECTIONS: [&str; 2] = ["northbound", "southbound"];
/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Taken in by its owner (in memory or on disk).
    Taken = 0,
    /// Acknowledged by its receiver.
    Delivered = 1,
    /// Counted by Alert Storm Protection instead of delivered.
    Throttled = 2,
    /// Expired after `retention_h`.
    Expired = 3,
}
const OUTCOMES: [&str; 4] = ["taken", "delivered", "throttled", "expired"];
const KINDS: usize = 12;
const LEVELS: usize = 17;
/// Latency is recorded in microseconds, up to an hour, to 3 significant digits.
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// One worker's counters.
#[derive(Debug, Clone)]
pub(crate) struct WorkerMetrics {
    messages: Vec<u64>,
    /// NACKs sent, by reason (index = aux).
    pub nacks: [u64; 7],
    /// Per level (index 1..=16): latency from `created_ns` to the frame being handed to its
    /// receiver's connection.
    latency: Vec<Option<Histogram<u64>>>,
    /// (peer, tier, level, frames): filled at publication.
    pub queue_depth: Vec<(String, &'static str, u8, u64)>,
    pub storm_keys_tracked: u64,
    pub storm_alerts_owed: u64,
    pub storm_summaries: u64,
    pub surb_bytes: u64,
    pub inflight_requests_evicted: u64,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            messages: vec![0; DIRECTIONS.len() * KINDS * LEVELS * OUTCOMES.len()],
            nacks: [0; 7],
            latency: (0..LEVELS).map(|_| None).collect(),
            queue_depth: Vec::new(),
            storm_keys_tracked: 0,
            storm_alerts_owed: 0,
            storm_summaries: 0,
            surb_bytes: 0,
            inflight_requests_evicted: 0,
        }
    }
}

fn index(direction: usize, kind: Kind, level: u8, outcome: Outcome) -> usize {
    ((direction * KINDS + kind as usize % KINDS) * LEVELS + usize::from(level) % LEVELS)
        * OUTCOMES.len()
        + outcome as usize
}

impl WorkerMetrics {
    /// Counts `n` messages.
    #[inline]
    pub(crate) fn count(
        &mut self,
        direction: usize,
        kind: Kind,
        level: u8,
        outcome: Outcome,
        n: u64,
    ) {
        if let Some(c) = self
            .messages
            .get_mut(index(direction, kind, level, outcome))
        {
            *c += n;
        }
    }

    /// Counts a NACK sent.
    #[inline]
    pub(crate) fn nack(&mut self, reason: NackReason) {
        if let Some(c) = self.nacks.get_mut(reason as usize) {
            *c += 1;
        }
    }

    /// Records one message's latency at its level.
    #[inline]
    pub(crate) fn latency(&mut self, level: u8, latency_ns: u64) {
        let Some(slot) = self.latency.get_mut(usize::from(level)) else {
            return;
        };
        let h = slot.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("fixed, valid bounds")
        });
        let _ = h.record((latency_ns / 1_000).clamp(1, LATENCY_US_MAX));
    }

    /// Adds another worker's counters to these.
    pub(crate) fn merge(&mut self, other: &WorkerMetrics) {
        for (a, b) in self.messages.iter_mut().zip(&other.messages) {
            *a += b;
        }
        for (a, b) in self.nacks.iter_mut().zip(&other.nacks) {
            *a += b;
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            if let Some(b) = b {
                match a {
                    Some(a) => {
                        let _ = a.add(b);
                    }
                    None => *a = Some(b.clone()),
                }
            }
        }
        self.queue_depth.extend(other.queue_depth.iter().cloned());
        self.storm_keys_tracked += other.storm_keys_tracked;
        self.storm_alerts_owed += other.storm_alerts_owed;
        self.storm_summaries += other.storm_summaries;
        self.surb_bytes += other.surb_bytes;
        self.inflight_requests_evicted += other.inflight_requests_evicted;
    }
}

fn kind_name(i: usize) -> Option<&'static str> {
    Kind::from_u8(i as u8).map(Kind::as_str)
}

const NACK_REASONS: [&str; 7] = [
    "",
    "malformed",
    "throttled",
    "unauthorised",
    "unknown_destination",
    "overloaded",
    "unexpected_kind",
];

/// Renders merged metrics, plus the engine-wide gauges, in the Prometheus text format.
/// The acceptor's admission figures (`docs/admission.md`).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Admission {
    pub handshakes_pending: u64,
    pub handshakes_evicted: u64,
    pub log_lines_suppressed: u64,
}

pub(crate) fn render(
    m: &WorkerMetrics,
    acceptor_nacks: &[u64; 7],
    connections: [u64; 2],
    admission: &Admission,
) -> String {
    let mut out = String::with_capacity(16 * 1024);
    out.push_str("# HELP dsplane_messages_total Messages by direction, kind, level and outcome.\n");
    out.push_str("# TYPE dsplane_messages_total counter\n");
    for (d, direction) in DIRECTIONS.iter().enumerate() {
        for k in 0..KINDS {
            let Some(kind) = kind_name(k) else { continue };
            for level in 0..LEVELS {
                for (o, outcome) in OUTCOMES.iter().enumerate() {
                    let i = ((d * KINDS + k) * LEVELS + level) * OUTCOMES.len() + o;
                    let v = m.messages.get(i).copied().unwrap_or(0);
                    if v > 0 {
                        let _ = writeln!(
                            out,
                            "dsplane_messages_total{{direction=\"{direction}\",kind=\"{kind}\",level=\"{level}\",outcome=\"{outcome}\"}} {v}"
                        );
                    }
                }
            }
        }
    }
    out.push_str("# HELP dsplane_nacks_total NACKs sent, by reason.\n");
    out.push_str("# TYPE dsplane_nacks_total counter\n");
    for (reason, name) in NACK_REASONS.iter().enumerate().skip(1) {
        let v = m.nacks[reason] + acceptor_nacks[reason];
        let _ = writeln!(out, "dsplane_nacks_total{{reason=\"{name}\"}} {v}");
    }
    out.push_str("# HELP dsplane_latency_seconds Latency from created_ns to the frame leaving for its receiver, by level.\n");
    out.push_str("# TYPE dsplane_latency_seconds summary\n");
    for (level, h) in m.latency.iter().enumerate() {
        let Some(h) = h else { continue };
        for q in [0.5, 0.99, 0.999, 1.0] {
            let v = h.value_at_quantile(q) as f64 / 1e6;
            let _ = writeln!(
                out,
                "dsplane_latency_seconds{{level=\"{level}\",quantile=\"{q}\"}} {v}"
            );
        }
        let sum = h.mean() * h.len() as f64 / 1e6;
        let _ = writeln!(
            out,
            "dsplane_latency_seconds_sum{{level=\"{level}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "dsplane_latency_seconds_count{{level=\"{level}\"}} {}",
            h.len()
        );
    }
    out.push_str("# HELP dsplane_queue_depth Frames waiting per peer, tier (nms: memory, surb: disk) and level.\n");
    out.push_str("# TYPE dsplane_queue_depth gauge\n");
    for (peer, tier, level, n) in &m.queue_depth {
        let _ = writeln!(
            out,
            "dsplane_queue_depth{{peer=\"{peer}\",tier=\"{tier}\",level=\"{level}\"}} {n}"
        );
    }
    let gauges = [
        (
            "dsplane_storm_keys_tracked",
            "gauge",
            "Alert-storm keys (SU, device, code) tracked.",
            m.storm_keys_tracked,
        ),
        (
            "dsplane_storm_alerts_owed",
            "gauge",
            "Alerts throttled in windows still open: owed by a coming STORM_SUMMARY.",
            m.storm_alerts_owed,
        ),
        (
            "dsplane_storm_summaries_total",
            "counter",
            "STORM_SUMMARY frames issued.",
            m.storm_summaries,
        ),
        (
            "dsplane_surb_bytes",
            "gauge",
            "Bytes of write-ahead log on disk (the SURB and the durable copies).",
            m.surb_bytes,
        ),
        (
            "dsplane_inflight_requests_evicted_total",
            "counter",
            "Requests evicted from the in-flight table before their response.",
            m.inflight_requests_evicted,
        ),
        (
            "dsplane_handshakes_pending",
            "gauge",
            "Connections waiting for their HELLO (both ports).",
            admission.handshakes_pending,
        ),
        (
            "dsplane_handshakes_evicted_total",
            "counter",
            "Handshakes closed with NACK 5 to make room for newer ones.",
            admission.handshakes_evicted,
        ),
        (
            "dsplane_log_lines_suppressed_total",
            "counter",
            "Refusal log lines left out by the rate limit (one per second per reason).",
            admission.log_lines_suppressed,
        ),
    ];
    for (name, kind, help, v) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    out.push_str(
        "# HELP dsplane_connections Authenticated connections open per port.\n# TYPE dsplane_connections gauge\n",
    );
    let _ = writeln!(out, "dsplane_connections{{port=\"su\"}} {}", connections[0]);
    let _ = writeln!(
        out,
        "dsplane_connections{{port=\"csp\"}} {}",
        connections[1]
    );
    out
}

//! Metrics: each worker counts into its own plain counters and histograms (no atomics, no
//! sharing on the message path) and publishes a copy every housekeeping tick (250 ms); a scrape
//! of `/metrics` merges the latest copies and renders the Prometheus text format.
//!
//! # Cardinality
//!
//! Every label takes values from a set the configuration fixes: direction, kind, level,
//! outcome, NACK reason, and the configured SUs and CSP links. Nothing is labelled by device,
//! so the number of series is bounded by the config file, whatever the traffic.
//!
//! # Latency
//!
//! `dsplane_latency_seconds` is a Prometheus histogram, built at scrape time from the
//! HdrHistograms the workers keep (microseconds, 3 significant digits). A bucket `le="b"`
//! counts the values whose HdrHistogram bin lies wholly at or below `b`, so a value within
//! 0.1 % below a bound may be counted in the next bucket, never the reverse. `_sum` is the sum
//! of each bin's middle value times its count: approximate to the same 0.1 %.

use std::fmt::Write as _;

pub(crate) use crate::counters::{
    PeerSnapshot, WorkerMetrics, DIRECTIONS, KINDS, LATENCY_BUCKETS_US, LEVELS, OUTCOMES,
    SU_OUTCOMES,
};
use crate::wire::Kind;

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

/// The acceptor's admission figures (`docs/admission.md`).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Admission {
    pub handshakes_pending: u64,
    pub handshakes_evicted: u64,
    pub log_lines_suppressed: u64,
}

/// What a scrape shows beside the workers' counters: engine-wide figures read from
/// [`super::shared::Shared`] at scrape time.
#[derive(Debug, Default)]
pub(crate) struct EngineFigures {
    pub acceptor_nacks: [u64; 7],
    /// Authenticated connections open on the SU port and the CSP port.
    pub connections: [u64; 2],
    pub admission: Admission,
    /// Each configured SU's EUI-64, by directory index.
    pub su_names: Vec<String>,
    /// Each SU paused by an operator, by directory index.
    pub su_paused: Vec<bool>,
    /// The whole northbound side restricted by an operator.
    pub restricted: bool,
    /// Reloads taken and refused.
    pub reloads: [u64; 2],
    /// When the configuration now applied was loaded, seconds since the Unix epoch.
    pub config_loaded_unix_s: f64,
}

/// Writes one family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A bucket bound in seconds as Prometheus clients write it (`0.0001`, `2.5`, `60`).
fn seconds(us: u64) -> String {
    format!("{}", us as f64 / 1e6)
}

/// Renders merged metrics, plus the engine-wide figures, in the Prometheus text format.
pub(crate) fn render(m: &WorkerMetrics, engine: &EngineFigures) -> String {
    let mut out = String::with_capacity(16 * 1024);
    family(
        &mut out,
        "dsplane_build_info",
        "gauge",
        "Always 1; the version of the running dsplane in its label.",
    );
    let _ = writeln!(
        out,
        "dsplane_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    family(
        &mut out,
        "dsplane_messages_total",
        "counter",
        "Messages by direction, kind, level and outcome.",
    );
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
    family(
        &mut out,
        "dsplane_su_messages_total",
        "counter",
        "Frames for each Service User by level: delivered (acknowledged by it), throttled (counted by Alert Storm Protection), expired (retention_h).",
    );
    for (su, name) in engine.su_names.iter().enumerate() {
        for level in 0..LEVELS {
            for (o, outcome) in SU_OUTCOMES.iter().enumerate() {
                let i = (su * LEVELS + level) * SU_OUTCOMES.len() + o;
                let v = m.su_outcomes.get(i).copied().unwrap_or(0);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "dsplane_su_messages_total{{su=\"{name}\",level=\"{level}\",outcome=\"{outcome}\"}} {v}"
                    );
                }
            }
        }
    }
    family(
        &mut out,
        "dsplane_nacks_total",
        "counter",
        "NACKs sent, by reason.",
    );
    for (reason, name) in NACK_REASONS.iter().enumerate().skip(1) {
        let v = m.nacks[reason] + engine.acceptor_nacks[reason];
        let _ = writeln!(out, "dsplane_nacks_total{{reason=\"{name}\"}} {v}");
    }
    family(
        &mut out,
        "dsplane_latency_seconds",
        "histogram",
        "Latency from created_ns to the frame leaving for its receiver, by direction and level; from HdrHistograms, so bucket counts and _sum are exact to 0.1 %.",
    );
    for (d, direction) in DIRECTIONS.iter().enumerate() {
        for level in 0..LEVELS {
            let Some(Some(h)) = m.latency.get(d * LEVELS + level) else {
                continue;
            };
            let labels = format!("direction=\"{direction}\",level=\"{level}\"");
            // Recorded bins in increasing order: one pass fills every bucket.
            let mut cumulative = [0u64; LATENCY_BUCKETS_US.len()];
            let mut sum_us = 0f64;
            for v in h.iter_recorded() {
                let value = v.value_iterated_to();
                let count = v.count_at_value();
                sum_us += h.median_equivalent(value) as f64 * count as f64;
                let top = h.highest_equivalent(value);
                for (bound, c) in LATENCY_BUCKETS_US.iter().zip(cumulative.iter_mut()) {
                    if top <= *bound {
                        *c += count;
                    }
                }
            }
            for (bound, c) in LATENCY_BUCKETS_US.iter().zip(cumulative) {
                let _ = writeln!(
                    out,
                    "dsplane_latency_seconds_bucket{{{labels},le=\"{}\"}} {c}",
                    seconds(*bound)
                );
            }
            let n = h.len();
            let _ = writeln!(
                out,
                "dsplane_latency_seconds_bucket{{{labels},le=\"+Inf\"}} {n}"
            );
            let _ = writeln!(
                out,
                "dsplane_latency_seconds_sum{{{labels}}} {}",
                sum_us / 1e6
            );
            let _ = writeln!(out, "dsplane_latency_seconds_count{{{labels}}} {n}");
        }
    }
    family(
        &mut out,
        "dsplane_queue_depth",
        "gauge",
        "Frames waiting per peer, tier (nms: memory, surb: disk) and level.",
    );
    for (peer, tier, level, n) in &m.queue_depth {
        let _ = writeln!(
            out,
            "dsplane_queue_depth{{peer=\"{peer}\",tier=\"{tier}\",level=\"{level}\"}} {n}"
        );
    }
    family(
        &mut out,
        "dsplane_su_connected",
        "gauge",
        "1 while the Service User has a connection open, else 0.",
    );
    for (su, name) in engine.su_names.iter().enumerate() {
        let connected = m
            .peers
            .iter()
            .any(|p| p.peer == super::shared::PeerRef::Su(su as u32) && p.connected);
        let _ = writeln!(
            out,
            "dsplane_su_connected{{su=\"{name}\"}} {}",
            u8::from(connected)
        );
    }
    family(
        &mut out,
        "dsplane_su_paused",
        "gauge",
        "1 while an operator has paused the Service User (POST /su/{id}/pause), else 0.",
    );
    for (name, paused) in engine.su_names.iter().zip(&engine.su_paused) {
        let _ = writeln!(
            out,
            "dsplane_su_paused{{su=\"{name}\"}} {}",
            u8::from(*paused)
        );
    }
    family(
        &mut out,
        "dsplane_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP, POST /reload), taken (success) or refused (failure).",
    );
    let _ = writeln!(
        out,
        "dsplane_config_reloads_total{{result=\"success\"}} {}",
        engine.reloads[0]
    );
    let _ = writeln!(
        out,
        "dsplane_config_reloads_total{{result=\"failure\"}} {}",
        engine.reloads[1]
    );
    let gauges = [
        (
            "dsplane_northbound_restricted",
            "gauge",
            "1 while an operator has restricted the whole northbound side (POST /restrict), else 0.",
            u64::from(engine.restricted),
        ),
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
            "dsplane_storms_started_total",
            "counter",
            "Alert storms started: (SU, device, code) windows in which an alert was throttled.",
            m.storms_started,
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
            engine.admission.handshakes_pending,
        ),
        (
            "dsplane_handshakes_evicted_total",
            "counter",
            "Handshakes closed with NACK 5 to make room for newer ones.",
            engine.admission.handshakes_evicted,
        ),
        (
            "dsplane_log_lines_suppressed_total",
            "counter",
            "Refusal log lines left out by the rate limit (one per second per reason).",
            engine.admission.log_lines_suppressed,
        ),
    ];
    for (name, kind, help, v) in gauges {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        &mut out,
        "dsplane_config_loaded_timestamp_seconds",
        "gauge",
        "When the configuration now applied was loaded (start-up or the last reload taken), seconds since the Unix epoch.",
    );
    let _ = writeln!(
        out,
        "dsplane_config_loaded_timestamp_seconds {}",
        engine.config_loaded_unix_s
    );
    family(
        &mut out,
        "dsplane_connections",
        "gauge",
        "Authenticated connections open per port.",
    );
    let _ = writeln!(
        out,
        "dsplane_connections{{port=\"su\"}} {}",
        engine.connections[0]
    );
    let _ = writeln!(
        out,
        "dsplane_connections{{port=\"csp\"}} {}",
        engine.connections[1]
    );
    process_metrics(&mut out);
    out
}

/// The process metrics the official Prometheus client libraries export, read from
/// `/proc/self` (Linux; elsewhere each family whose source cannot be read is left out).
fn process_metrics(out: &mut String) {
    // USER_HZ, the unit of /proc/<pid>/stat's times, is 100 on every Linux architecture's ABI
    // (the Go client's procfs library assumes the same).
    const USER_HZ: f64 = 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.get(key.len()..)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    if let Some(rss) = kib("VmRSS:") {
        family(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {rss}");
    }
    if let Some(vsz) = kib("VmSize:") {
        family(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        let _ = writeln!(out, "process_virtual_memory_bytes {vsz}");
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory's own descriptor, open while it is read, is counted out.
        let fds = dir.count().saturating_sub(1);
        family(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        let _ = writeln!(out, "process_open_fds {fds}");
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        });
    if let Some(max) = max_fds {
        family(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        let _ = writeln!(out, "process_max_fds {max}");
    }
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5), starttime 22; `fields` starts at 3.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        family(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(
            out,
            "process_cpu_seconds_total {}",
            (utime + stime) as f64 / USER_HZ
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        family(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        let _ = writeln!(
            out,
            "process_start_time_seconds {}",
            boot as f64 + start as f64 / USER_HZ
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::SuOutcome;
    use crate::owner::Direction;

    #[test]
    fn latency_buckets_are_cumulative_and_end_at_the_count() {
        let mut m = WorkerMetrics::default();
        for us in [50, 100, 300, 2_000, 70_000_000] {
            m.latency(Direction::Northbound, 2, us * 1_000);
        }
        m.latency(Direction::Southbound, 1, 1_000_000);
        let text = render(&m, &EngineFigures::default());
        let bucket = |labels: &str, le: &str| -> u64 {
            let key = format!("dsplane_latency_seconds_bucket{{{labels},le=\"{le}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&key)).unwrap();
            line[key.len()..].parse().unwrap()
        };
        let nb = r#"direction="northbound",level="2""#;
        assert_eq!(bucket(nb, "0.0001"), 2);
        assert_eq!(bucket(nb, "0.00025"), 2);
        assert_eq!(bucket(nb, "0.0005"), 3);
        assert_eq!(bucket(nb, "0.0025"), 4);
        assert_eq!(bucket(nb, "60"), 4, "70 s is beyond the last bound");
        assert_eq!(bucket(nb, "+Inf"), 5);
        assert!(text.contains(&format!("dsplane_latency_seconds_count{{{nb}}} 5\n")));
        let sb = r#"direction="southbound",level="1""#;
        assert_eq!(bucket(sb, "0.0005"), 0);
        assert_eq!(bucket(sb, "0.001"), 1);
        let sum_key = format!("dsplane_latency_seconds_sum{{{nb}}} ");
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&sum_key))
            .unwrap()
            .parse()
            .unwrap();
        let exact = (50 + 100 + 300 + 2_000 + 70_000_000) as f64 / 1e6;
        assert!((sum - exact).abs() / exact < 0.001, "{sum} vs {exact}");
    }

    #[test]
    fn per_su_counts_are_labelled_by_su_and_level() {
        let mut a = WorkerMetrics::default();
        a.count_su(1, 3, SuOutcome::Throttled);
        let mut b = WorkerMetrics::default();
        b.count_su(1, 3, SuOutcome::Throttled);
        b.count_su(0, 1, SuOutcome::Delivered);
        a.merge(&b);
        let engine = EngineFigures {
            su_names: vec![
                "90-B3-D5-1F-30-01-00-00".into(),
                "90-B3-D5-1F-30-01-00-01".into(),
            ],
            su_paused: vec![false, true],
            ..EngineFigures::default()
        };
        let text = render(&a, &engine);
        assert!(text.contains(
            "dsplane_su_messages_total{su=\"90-B3-D5-1F-30-01-00-01\",level=\"3\",outcome=\"throttled\"} 2\n"
        ));
        assert!(text.contains(
            "dsplane_su_messages_total{su=\"90-B3-D5-1F-30-01-00-00\",level=\"1\",outcome=\"delivered\"} 1\n"
        ));
        assert!(text.contains("dsplane_su_paused{su=\"90-B3-D5-1F-30-01-00-01\"} 1\n"));
        assert!(text.contains("dsplane_su_paused{su=\"90-B3-D5-1F-30-01-00-00\"} 0\n"));
    }
}

//! What a run reports: the per-level table on the terminal, a JSON summary, and a self-contained
//! HTML page with inline SVG charts (no script, no network: it opens anywhere).

use std::fmt::Write as _;

use serde::Serialize;

use crate::checker::{Direction, Verdict};
use crate::scenario::ScenarioKind;
use crate::stats::{Bucket, OrderResult, Stats};

/// Latency figures, ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    fn of(h: &hdrhistogram::Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1_000.0;
        Latency {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1_000.0,
        }
    }
}

/// One row of the per-level table.
#[derive(Debug, Clone, Serialize)]
pub struct LevelRow {
    /// Northbound or southbound.
    pub direction: Direction,
    /// The level.
    pub level: u8,
    /// Sent, at the level dsplane's rules give the message.
    pub sent: u64,
    /// Received for the first time, at the level dsplane wrote in the frame.
    pub received: u64,
    /// Received again.
    pub duplicates: u64,
    /// Refused by dsplane.
    pub nacked: u64,
    /// `received` per second of the run (traffic and drain).
    pub throughput_per_s: f64,
    /// From `created_ns` to receipt.
    pub latency_ms: Latency,
}

/// The scenario's headline traffic.
#[derive(Debug, Clone, Serialize)]
pub struct Headline {
    /// What it is.
    pub description: String,
    /// Received.
    pub received: u64,
    /// Its latency.
    pub latency_ms: Latency,
    /// Its delivery order against the bulk traffic.
    pub order: OrderResult,
}

/// One level's time series.
#[derive(Debug, Clone, Serialize)]
pub struct LevelSeries {
    /// The level.
    pub level: u8,
    /// Sent per bucket.
    pub sent: Vec<u32>,
    /// First deliveries per bucket.
    pub received: Vec<u32>,
    /// Estimated queue depth at each bucket's end: sent − received − refused so far.
    pub depth: Vec<i64>,
    /// Median latency of the bucket's deliveries (log-binned: within 19 %), ms.
    pub p50_ms: Vec<Option<f64>>,
    /// 99th percentile, likewise.
    pub p99_ms: Vec<Option<f64>>,
}

/// The time series of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Bucket width, ms.
    pub bucket_ms: f64,
    /// Northbound, per level.
    pub northbound: Vec<LevelSeries>,
    /// Southbound, per level.
    pub southbound: Vec<LevelSeries>,
    /// The headline traffic's p99 per bucket, ms (empty without a headline).
    pub headline_p99_ms: Vec<Option<f64>>,
}

/// The run's settings, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    /// Seed.
    pub seed: u64,
    /// Traffic time, s.
    pub duration_s: f64,
    /// Drain time, s.
    pub drain_s: f64,
    /// Whole run, s.
    pub wall_s: f64,
    /// Service Users.
    pub sus: usize,
    /// CSP links.
    pub csp_links: usize,
    /// Northbound base rate, msg/s.
    pub rate: f64,
    /// Requests/s per SU.
    pub req_rate: f64,
    /// Delivery rate per SU, msg/s.
    pub su_rate: u32,
    /// The engine's `release_start`: the share of the rate a release starts at.
    pub release_start: f64,
    /// The engine's `release_ramp_s`: how long a release takes to reach the full rate, s.
    pub release_ramp_s: u32,
    /// The engine's storm window (`alert_storm.window_s`), s.
    pub storm_window_s: u64,
    /// The flows played.
    pub flows: Vec<String>,
}

/// Something that happened during a run, marked on its time charts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunEvent {
    /// When, seconds from the start of the traffic (the charts' time axis).
    pub t_s: f64,
    /// What, in a few words: `SU 90-B3-D5-1F-30-01-00-00 disconnects`.
    pub what: String,
    /// The word on the chart's marker: `disconnects`, `reconnects`.
    pub marker: String,
}

/// Everything about one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `priority`, `fifo` (spawned engines) or `remote`.
    pub label: String,
    /// The scenario.
    pub scenario: ScenarioKind,
    /// Settings.
    pub settings: RunSettings,
    /// Per direction and level.
    pub levels: Vec<LevelRow>,
    /// The headline traffic, for scenarios that have one.
    pub headline: Option<Headline>,
    /// The end-to-end checks.
    pub checks: Verdict,
    /// Whether the checks passed.
    pub passed: bool,
    /// Things worth knowing (reconnects, drain cut short, refusals).
    pub notes: Vec<String>,
    /// Events in time order (the outage's disconnect and reconnect), marked on the charts.
    pub events: Vec<RunEvent>,
    /// For the charts.
    pub series: Series,
}

/// What [`build_run_report`] needs.
pub struct RunInputs<'a> {
    /// Run label.
    pub label: &'static str,
    /// Scenario.
    pub scenario: ScenarioKind,
    /// Seed.
    pub seed: u64,
    /// Traffic time, s.
    pub duration_s: f64,
    /// Drain time, s.
    pub drain_s: f64,
    /// Whole run, s.
    pub wall_s: f64,
    /// SUs.
    pub sus: usize,
    /// CSP links.
    pub csp_links: usize,
    /// Base rate.
    pub rate: f64,
    /// Request rate per SU.
    pub req_rate: f64,
    /// SU delivery rate.
    pub su_rate: u32,
    /// The engine's (`release_start`, `release_ramp_s`).
    pub release: (f64, u32),
    /// The engine's storm window, s.
    pub storm_window_s: u64,
    /// Headline description.
    pub headline: Option<&'static str>,
    /// Flow names.
    pub flows: Vec<String>,
    /// Merged stats.
    pub stats: &'a Stats,
    /// Checks.
    pub verdict: Verdict,
    /// Notes.
    pub notes: Vec<String>,
    /// Events.
    pub events: Vec<RunEvent>,
}

fn level_series(stats: &Stats, dir: Direction, level: u8, len: usize) -> LevelSeries {
    let buckets = stats.series(dir, level);
    let empty = Bucket::default();
    let mut depth = 0i64;
    let mut out = LevelSeries {
        level,
        sent: Vec::with_capacity(len),
        received: Vec::with_capacity(len),
        depth: Vec::with_capacity(len),
        p50_ms: Vec::with_capacity(len),
        p99_ms: Vec::with_capacity(len),
    };
    for i in 0..len {
        let b = buckets.get(i).unwrap_or(&empty);
        depth += i64::from(b.sent) - i64::from(b.received) - i64::from(b.nacked);
        out.sent.push(b.sent);
        out.received.push(b.received);
        out.depth.push(depth);
        out.p50_ms.push(b.quantile_us(0.5).map(|us| us / 1_000.0));
        out.p99_ms.push(b.quantile_us(0.99).map(|us| us / 1_000.0));
    }
    out
}

/// Builds the report of one run.
pub fn build_run_report(i: RunInputs<'_>) -> RunReport {
    let stats = i.stats;
    let levels = stats.levels() as u8;
    let elapsed_s = (stats.last_received_ns as f64 / 1e9)
        .max(i.duration_s)
        .max(1e-3);
    let mut rows = Vec::new();
    for dir in [Direction::Northbound, Direction::Southbound] {
        for level in 1..=levels {
            let s = stats.level(dir, level);
            rows.push(LevelRow {
                direction: dir,
                level,
                sent: s.sent,
                received: s.received,
                duplicates: s.duplicates,
                nacked: s.nacked,
                throughput_per_s: s.received as f64 / elapsed_s,
                latency_ms: Latency::of(&s.latency),
            });
        }
    }
    let len = [Direction::Northbound, Direction::Southbound]
        .iter()
        .flat_map(|&d| (1..=levels).map(move |l| (d, l)))
        // Buckets are allocated up front: the series ends at the last one with any activity.
        .map(|(d, l)| {
            stats
                .series(d, l)
                .iter()
                .rposition(|b| b.sent + b.received + b.nacked > 0)
                .map_or(0, |i| i + 1)
        })
        .max()
        .unwrap_or(0);
    let series = Series {
        bucket_ms: stats.bucket_ns() as f64 / 1e6,
        northbound: (1..=levels)
            .map(|l| level_series(stats, Direction::Northbound, l, len))
            .collect(),
        southbound: (1..=levels)
            .map(|l| level_series(stats, Direction::Southbound, l, len))
            .collect(),
        headline_p99_ms: if i.headline.is_some() {
            (0..len)
                .map(|b| {
                    stats
                        .headline_series()
                        .get(b)
                        .and_then(|x| x.quantile_us(0.99))
                        .map(|us| us / 1_000.0)
                })
                .collect()
        } else {
            Vec::new()
        },
    };
    let headline = i.headline.map(|d| Headline {
        description: d.to_owned(),
        received: stats.headline.len(),
        latency_ms: Latency::of(&stats.headline),
        order: stats.order,
    });
    let passed = i.verdict.passed();
    RunReport {
        label: i.label.to_owned(),
        scenario: i.scenario,
        settings: RunSettings {
            seed: i.seed,
            duration_s: i.duration_s,
            drain_s: i.drain_s,
            wall_s: i.wall_s,
            sus: i.sus,
            csp_links: i.csp_links,
            rate: i.rate,
            req_rate: i.req_rate,
            su_rate: i.su_rate,
            release_start: i.release.0,
            release_ramp_s: i.release.1,
            storm_window_s: i.storm_window_s,
            flows: i.flows,
        },
        levels: rows,
        headline,
        checks: i.verdict,
        passed,
        notes: i.notes,
        events: i.events,
        series,
    }
}

/// The comparison of a priority run and a FIFO run of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Northbound p99 latency per level, both ways.
    pub northbound_p99_ms: Vec<CompareRow>,
    /// The headline traffic's p99, both ways.
    pub headline_p99_ms: Option<CompareRow>,
}

/// One compared figure.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    /// Level (0 for the headline).
    pub level: u8,
    /// With strict priority.
    pub priority: f64,
    /// With FIFO.
    pub fifo: f64,
    /// fifo / priority.
    pub fifo_over_priority: f64,
}

fn ratio(fifo: f64, prio: f64) -> f64 {
    if prio > 0.0 {
        fifo / prio
    } else {
        0.0
    }
}

/// Compares the runs labelled `priority` and `fifo`, if both are there.
pub fn compare(runs: &[RunReport]) -> Option<Comparison> {
    let prio = runs.iter().find(|r| r.label == "priority")?;
    let fifo = runs.iter().find(|r| r.label == "fifo")?;
    let rows = prio
        .levels
        .iter()
        .zip(&fifo.levels)
        .filter(|(p, _)| p.direction == Direction::Northbound)
        .map(|(p, f)| CompareRow {
            level: p.level,
            priority: p.latency_ms.p99,
            fifo: f.latency_ms.p99,
            fifo_over_priority: ratio(f.latency_ms.p99, p.latency_ms.p99),
        })
        .collect();
    let headline = match (&prio.headline, &fifo.headline) {
        (Some(p), Some(f)) => Some(CompareRow {
            level: 0,
            priority: p.latency_ms.p99,
            fifo: f.latency_ms.p99,
            fifo_over_priority: ratio(f.latency_ms.p99, p.latency_ms.p99),
        }),
        _ => None,
    };
    Some(Comparison {
        northbound_p99_ms: rows,
        headline_p99_ms: headline,
    })
}

/// The JSON summary file.
#[derive(Debug, Clone, Serialize)]
pub struct Summary<'a> {
    /// `dsplane-loadgen`.
    pub tool: &'static str,
    /// Crate version.
    pub version: &'static str,
    /// Every run passed its checks.
    pub passed: bool,
    /// The runs.
    pub runs: &'a [RunReport],
    /// Priority against FIFO, with `--compare`.
    pub comparison: Option<Comparison>,
}

/// The JSON summary of `runs`.
pub fn summary(runs: &[RunReport]) -> Summary<'_> {
    Summary {
        tool: "dsplane-loadgen",
        version: env!("CARGO_PKG_VERSION"),
        passed: runs.iter().all(|r| r.passed),
        runs,
        comparison: compare(runs),
    }
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn checks_line(v: &Verdict) -> String {
    let nacked: u64 = v.nacked.values().sum();
    format!(
        "lost {}, corrupted {}, misdelivered {}, unknown {}; duplicates {}, refused {}, unconfirmed {}, throttled {}",
        v.lost, v.corrupted, v.misdelivered, v.unknown, v.duplicates, nacked, v.unconfirmed, v.throttled
    )
}

/// The per-level table of one run, for the terminal.
pub fn text_table(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} · {} · {} SUs, {} CSP links · {:.1} s traffic + {:.1} s drain · checks {}",
        r.scenario.as_str(),
        r.label,
        r.settings.sus,
        r.settings.csp_links,
        r.settings.duration_s,
        r.settings.drain_s,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    let _ = writeln!(
        s,
        "  {:<10} {:>3} {:>8} {:>8} {:>5} {:>5} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "direction",
        "lvl",
        "sent",
        "received",
        "dup",
        "nack",
        "msg/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms"
    );
    for row in r.levels.iter().filter(|row| row.sent + row.received > 0) {
        let l = &row.latency_ms;
        let _ = writeln!(
            s,
            "  {:<10} {:>3} {:>8} {:>8} {:>5} {:>5} {:>8.0} {:>9} {:>9} {:>9} {:>9}",
            row.direction.as_str(),
            row.level,
            row.sent,
            row.received,
            row.duplicates,
            row.nacked,
            row.throughput_per_s,
            fmt_ms(l.p50),
            fmt_ms(l.p99),
            fmt_ms(l.p999),
            fmt_ms(l.max)
        );
    }
    if let Some(h) = &r.headline {
        let _ = writeln!(
            s,
            "  headline: {}: {} received, p50 {} ms, p99 {} ms, max {} ms; {} of them overtook older backlog",
            h.description,
            h.received,
            fmt_ms(h.latency_ms.p50),
            fmt_ms(h.latency_ms.p99),
            fmt_ms(h.latency_ms.max),
            h.order.overtook_bulk
        );
    }
    let _ = writeln!(s, "  checks: {}", checks_line(&r.checks));
    for e in &r.checks.examples {
        let _ = writeln!(s, "    {e}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}

/// The comparison table, for the terminal.
pub fn text_comparison(c: &Comparison) -> String {
    let mut s = String::from("priority vs FIFO, northbound p99 latency (ms)\n");
    let _ = writeln!(
        s,
        "  {:<10} {:>10} {:>10} {:>10}",
        "level", "priority", "fifo", "fifo/prio"
    );
    for r in c
        .northbound_p99_ms
        .iter()
        .filter(|r| r.priority + r.fifo > 0.0)
    {
        let _ = writeln!(
            s,
            "  {:<10} {:>10} {:>10} {:>9.1}x",
            r.level,
            fmt_ms(r.priority),
            fmt_ms(r.fifo),
            r.fifo_over_priority
        );
    }
    if let Some(r) = &c.headline_p99_ms {
        let _ = writeln!(
            s,
            "  {:<10} {:>10} {:>10} {:>9.1}x",
            "headline",
            fmt_ms(r.priority),
            fmt_ms(r.fifo),
            r.fifo_over_priority
        );
    }
    s
}

// ---- HTML ---------------------------------------------------------------------------------------

const LEVEL_COLOURS: [&str; 8] = [
    "#d62728", "#ff7f0e", "#1f77b4", "#7f7f7f", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn colour(level: u8) -> &'static str {
    LEVEL_COLOURS[(usize::from(level).max(1) - 1) % LEVEL_COLOURS.len()]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of a chart: (x, y) points, `None` y breaks the line.
pub struct Line {
    /// Legend text.
    pub name: String,
    /// Stroke colour.
    pub colour: &'static str,
    /// Points.
    pub points: Vec<(f64, Option<f64>)>,
}

const W: f64 = 560.0;
const H: f64 = 250.0;
const ML: f64 = 60.0;
const MR: f64 = 110.0;
const MT: f64 = 28.0;
const MB: f64 = 36.0;

fn nice_step(range: f64) -> f64 {
    let raw = range / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let n = if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    };
    n * mag
}

/// An SVG line chart; `log_y` plots y on a log scale (values ≤ 0 are left out).
pub fn line_chart(title: &str, y_label: &str, lines: &[Line], log_y: bool) -> String {
    line_chart_marked(title, y_label, lines, log_y, &[])
}

/// [`line_chart`] with a dashed vertical marker at each event's time, labelled with its
/// `marker` word (`class="marker"` on the line, for readers and tests).
pub fn line_chart_marked(
    title: &str,
    y_label: &str,
    lines: &[Line],
    log_y: bool,
    events: &[RunEvent],
) -> String {
    let xs = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .chain(events.iter().map(|e| e.t_s));
    let x_max = xs.fold(0.0f64, f64::max).max(1e-9);
    let ys: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().filter_map(|p| p.1))
        .filter(|y| !log_y || *y > 0.0)
        .collect();
    let (mut y_min, mut y_max) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
    if ys.is_empty() {
        (y_min, y_max) = (if log_y { 0.01 } else { 0.0 }, 1.0);
    }
    if log_y {
        y_min = 10f64.powf(y_min.log10().floor());
        y_max = 10f64.powf(y_max.log10().ceil());
        if y_max <= y_min {
            y_max = y_min * 10.0;
        }
    } else {
        y_min = y_min.min(0.0);
        if y_max <= y_min {
            y_max = y_min + 1.0;
        }
    }
    let px = |x: f64| ML + x / x_max * (W - ML - MR);
    let py = |y: f64| {
        let f = if log_y {
            (y.log10() - y_min.log10()) / (y_max.log10() - y_min.log10())
        } else {
            (y - y_min) / (y_max - y_min)
        };
        H - MB - f * (H - MT - MB)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11"><text x="{ML}" y="16" font-weight="bold" font-size="12">{}</text>"##,
        esc(title)
    );
    // Axes and grid.
    let _ = write!(
        s,
        r##"<rect x="{ML}" y="{MT}" width="{}" height="{}" fill="none" stroke="#ccc"/>"##,
        W - ML - MR,
        H - MT - MB
    );
    if log_y {
        let mut v = y_min;
        while v <= y_max * 1.0001 {
            let y = py(v);
            let _ = write!(
                s,
                r##"<line x1="{ML}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - MR,
                ML - 4.0,
                y + 4.0,
                trim_num(v)
            );
            v *= 10.0;
        }
    } else {
        let step = nice_step(y_max - y_min);
        let mut v = (y_min / step).ceil() * step;
        while v <= y_max + step * 1e-6 {
            let y = py(v);
            let _ = write!(
                s,
                r##"<line x1="{ML}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - MR,
                ML - 4.0,
                y + 4.0,
                trim_num(v)
            );
            v += step;
        }
    }
    let step = nice_step(x_max);
    let mut v = 0.0;
    while v <= x_max + step * 1e-6 {
        let x = px(v);
        let _ = write!(
            s,
            r##"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - MB + 14.0,
            trim_num(v)
        );
        v += step;
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">time (s)</text><text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>"##,
        ML + (W - ML - MR) / 2.0,
        H - 4.0,
        MT + (H - MT - MB) / 2.0,
        MT + (H - MT - MB) / 2.0,
        esc(y_label)
    );
    for (i, line) in lines.iter().enumerate() {
        let mut segment: Vec<String> = Vec::new();
        let flush = |seg: &mut Vec<String>, s: &mut String| {
            if seg.len() == 1 {
                seg.push(seg[0].clone());
            }
            if !seg.is_empty() {
                let _ = write!(
                    s,
                    r##"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"##,
                    line.colour,
                    seg.join(" ")
                );
            }
            seg.clear();
        };
        for &(x, y) in &line.points {
            match y {
                Some(y) if !log_y || y > 0.0 => {
                    segment.push(format!("{:.1},{:.1}", px(x), py(y)));
                }
                _ => flush(&mut segment, &mut s),
            }
        }
        flush(&mut segment, &mut s);
        let ly = MT + 6.0 + i as f64 * 15.0;
        let _ = write!(
            s,
            r##"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"##,
            W - MR + 8.0,
            W - MR + 24.0,
            line.colour,
            W - MR + 28.0,
            ly + 4.0,
            esc(&line.name)
        );
    }
    // Markers over the lines.
    for (j, e) in events.iter().enumerate() {
        let x = px(e.t_s.max(0.0));
        let _ = write!(
            s,
            r##"<line class="marker" x1="{x:.1}" x2="{x:.1}" y1="{MT}" y2="{}" stroke="#d62728" stroke-width="1" stroke-dasharray="4 3"><title>{}</title></line><text x="{:.1}" y="{}" fill="#d62728" font-size="10">{}</text>"##,
            H - MB,
            esc(&format!("{} at {:.1} s", e.what, e.t_s)),
            x + 3.0,
            MT + 11.0 + (j % 2) as f64 * 11.0,
            esc(&e.marker)
        );
    }
    s.push_str("</svg>");
    s
}

fn trim_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1.0 {
        format!("{}", (v * 100.0).round() / 100.0)
    } else {
        format!("{}", (v * 10_000.0).round() / 10_000.0)
    }
}

fn series_lines(
    r: &RunReport,
    dir: Direction,
    pick: impl Fn(&LevelSeries, usize) -> Option<f64>,
) -> Vec<Line> {
    let dt = r.series.bucket_ms / 1_000.0;
    let list = match dir {
        Direction::Northbound => &r.series.northbound,
        Direction::Southbound => &r.series.southbound,
    };
    list.iter()
        .filter(|ls| ls.sent.iter().chain(&ls.received).any(|&n| n > 0))
        .map(|ls| Line {
            name: format!("level {}", ls.level),
            colour: colour(ls.level),
            points: (0..ls.sent.len())
                .map(|i| ((i as f64 + 1.0) * dt, pick(ls, i)))
                .collect(),
        })
        .collect()
}

fn run_section(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<section><h2>{} <span class=\"{}\">{}</span></h2>",
        esc(&r.label),
        if r.passed { "ok" } else { "bad" },
        if r.passed {
            "checks passed"
        } else {
            "checks FAILED"
        }
    );
    let _ = write!(
        s,
        "<p>{} SUs, {} CSP links, {} s of traffic + {:.1} s drain; base rate {} msg/s, {} requests/s per SU, SU delivery rate {} msg/s; release ramp {} s from {} % of the rate; storm window {} s; seed {}.</p>",
        r.settings.sus,
        r.settings.csp_links,
        trim_num(r.settings.duration_s),
        r.settings.drain_s,
        r.settings.rate,
        r.settings.req_rate,
        r.settings.su_rate,
        r.settings.release_ramp_s,
        trim_num(r.settings.release_start * 100.0),
        r.settings.storm_window_s,
        r.settings.seed
    );
    if !r.events.is_empty() {
        let list: Vec<String> = r
            .events
            .iter()
            .map(|e| format!("{} at {:.1} s", e.what, e.t_s))
            .collect();
        let _ = write!(
            s,
            "<p>Marked on the charts (dashed red lines): {}.</p>",
            esc(&list.join("; "))
        );
    }
    s.push_str("<table><tr><th>direction</th><th>level</th><th>sent</th><th>received</th><th>dup</th><th>refused</th><th>msg/s</th><th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th></tr>");
    for row in r.levels.iter().filter(|row| row.sent + row.received > 0) {
        let l = &row.latency_ms;
        let _ = write!(
            s,
            "<tr><td>{}</td><td><span class=\"dot\" style=\"background:{}\"></span>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            row.direction.as_str(),
            colour(row.level),
            row.level,
            row.sent,
            row.received,
            row.duplicates,
            row.nacked,
            row.throughput_per_s,
            fmt_ms(l.p50),
            fmt_ms(l.p99),
            fmt_ms(l.p999),
            fmt_ms(l.max)
        );
    }
    s.push_str("</table>");
    if let Some(h) = &r.headline {
        let _ = write!(
            s,
            "<p class=\"headline\"><b>Headline</b>: {}: {} received, p50 {} ms, p99 {} ms, max {} ms. {} of them overtook backlog created before them.</p>",
            esc(&h.description),
            h.received,
            fmt_ms(h.latency_ms.p50),
            fmt_ms(h.latency_ms.p99),
            fmt_ms(h.latency_ms.max),
            h.order.overtook_bulk
        );
    }
    let _ = write!(s, "<p>Checks: {}.</p>", esc(&checks_line(&r.checks)));
    if !r.checks.examples.is_empty() || !r.notes.is_empty() {
        s.push_str("<ul>");
        for e in r.checks.examples.iter().chain(&r.notes) {
            let _ = write!(s, "<li>{}</li>", esc(e));
        }
        s.push_str("</ul>");
    }
    let mut lines = series_lines(r, Direction::Northbound, |ls, i| ls.p99_ms[i]);
    if r.headline.is_some() {
        let dt = r.series.bucket_ms / 1_000.0;
        lines.push(Line {
            name: "headline".into(),
            colour: "#000000",
            points: r
                .series
                .headline_p99_ms
                .iter()
                .enumerate()
                .map(|(i, v)| ((i as f64 + 1.0) * dt, *v))
                .collect(),
        });
    }
    s.push_str(&line_chart_marked(
        "Northbound latency p99 per level (by receive time)",
        "ms (log)",
        &lines,
        true,
        &r.events,
    ));
    s.push_str(&line_chart_marked(
        "Northbound queue depth estimate (sent − received − refused)",
        "messages",
        &series_lines(r, Direction::Northbound, |ls, i| Some(ls.depth[i] as f64)),
        false,
        &r.events,
    ));
    s.push_str(&line_chart_marked(
        "Southbound latency p99 per level",
        "ms (log)",
        &series_lines(r, Direction::Southbound, |ls, i| ls.p99_ms[i]),
        true,
        &r.events,
    ));
    s.push_str("</section>");
    s
}

fn comparison_section(c: &Comparison) -> String {
    let mut s = String::from("<section class=\"wide\"><h2>Priority vs FIFO</h2><table><tr><th>northbound p99</th><th>priority ms</th><th>fifo ms</th><th>fifo / priority</th></tr>");
    let rows = c
        .northbound_p99_ms
        .iter()
        .filter(|r| r.priority + r.fifo > 0.0)
        .map(|r| (format!("level {}", r.level), r))
        .chain(c.headline_p99_ms.iter().map(|r| ("headline".to_owned(), r)));
    for (name, r) in rows {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}×</td></tr>",
            esc(&name),
            fmt_ms(r.priority),
            fmt_ms(r.fifo),
            r.fifo_over_priority
        );
    }
    s.push_str("</table>");
    // Bars, log scale.
    let bars: Vec<(String, f64, f64)> = c
        .northbound_p99_ms
        .iter()
        .filter(|r| r.priority + r.fifo > 0.0)
        .map(|r| (format!("level {}", r.level), r.priority, r.fifo))
        .chain(
            c.headline_p99_ms
                .iter()
                .map(|r| ("headline".to_owned(), r.priority, r.fifo)),
        )
        .collect();
    s.push_str(&bar_chart("p99 latency, priority vs FIFO (ms, log)", &bars));
    s.push_str("</section>");
    s
}

fn bar_chart(title: &str, bars: &[(String, f64, f64)]) -> String {
    let vals: Vec<f64> = bars
        .iter()
        .flat_map(|b| [b.1, b.2])
        .filter(|v| *v > 0.0)
        .collect();
    let lo = 10f64.powf(
        vals.iter()
            .copied()
            .fold(f64::MAX, f64::min)
            .log10()
            .floor(),
    );
    let hi = 10f64.powf(vals.iter().copied().fold(f64::MIN, f64::max).log10().ceil());
    let (lo, hi) = if vals.is_empty() || hi <= lo {
        (0.01, 1.0)
    } else {
        (lo, hi)
    };
    let py = |v: f64| {
        let f = (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
        H - MB - f * (H - MT - MB)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11"><text x="{ML}" y="16" font-weight="bold" font-size="12">{}</text>"##,
        esc(title)
    );
    let mut v = lo;
    while v <= hi * 1.0001 {
        let y = py(v);
        let _ = write!(
            s,
            r##"<line x1="{ML}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - MR,
            ML - 4.0,
            y + 4.0,
            trim_num(v)
        );
        v *= 10.0;
    }
    let group = (W - ML - MR) / bars.len().max(1) as f64;
    let bw = group * 0.35;
    for (i, (name, p, f)) in bars.iter().enumerate() {
        let x0 = ML + i as f64 * group + group * 0.12;
        for (j, (v, c)) in [(*p, "#2ca02c"), (*f, "#7f7f7f")].iter().enumerate() {
            let x = x0 + j as f64 * bw;
            let y = py(*v);
            let _ = write!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{c}"><title>{}</title></rect>"##,
                bw - 2.0,
                (H - MB - y).max(0.0),
                fmt_ms(*v)
            );
        }
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
            x0 + bw,
            H - MB + 14.0,
            esc(name)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{}" y="{MT}" width="12" height="10" fill="#2ca02c"/><text x="{}" y="{}">priority</text><rect x="{}" y="{}" width="12" height="10" fill="#7f7f7f"/><text x="{}" y="{}">FIFO</text></svg>"##,
        W - MR + 8.0,
        W - MR + 24.0,
        MT + 9.0,
        W - MR + 8.0,
        MT + 16.0,
        W - MR + 24.0,
        MT + 25.0
    );
    s
}

/// The self-contained HTML report of `runs`, titled `dsplane-loadgen: <scenario>`.
pub fn html(runs: &[RunReport]) -> String {
    let scenario = runs.first().map_or("", |r| r.scenario.as_str());
    html_titled(runs, &format!("dsplane-loadgen: {scenario}"))
}

/// When a report is written, as its header shows it: `2026-11-23 14:05 UTC`.
fn utc_now() -> String {
    let ns = dsplane_proto::unix_now();
    let day = dsplane_core::report::utc_day(ns);
    let minute_of_day = ns / 60_000_000_000 % (24 * 60);
    format!(
        "{} {:02}:{:02} UTC",
        dsplane_core::report::date_of(day),
        minute_of_day / 60,
        minute_of_day % 60
    )
}

/// The self-contained HTML report of `runs` under `title` (`dsplane demo`), with the date it
/// was written (UTC), the version of dsplane that wrote it, and the runs' settings.
pub fn html_titled(runs: &[RunReport], title: &str) -> String {
    let title = esc(title);
    let version = env!("CARGO_PKG_VERSION");
    let generated = utc_now();
    let settings = runs.first().map_or_else(String::new, |r| {
        let st = &r.settings;
        format!(
            "{} scenario, {} s of traffic per run, {} SUs, {} CSP links, base rate {} msg/s, {} requests/s per SU, SU delivery rate {} msg/s, release ramp {} s from {} % of the rate, storm window {} s, seed {}",
            r.scenario.as_str(),
            trim_num(st.duration_s),
            st.sus,
            st.csp_links,
            st.rate,
            st.req_rate,
            st.su_rate,
            st.release_ramp_s,
            trim_num(st.release_start * 100.0),
            st.storm_window_s,
            st.seed
        )
    });
    let mut s = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif;margin:24px;color:#222}} h1{{font-size:20px}} h2{{font-size:16px}}
.runs{{display:flex;flex-wrap:wrap;gap:24px}} section{{flex:1 1 580px;max-width:620px}} section.wide{{max-width:none;flex-basis:100%}}
table{{border-collapse:collapse;font-size:12px;margin:8px 0}} td,th{{border:1px solid #ddd;padding:3px 6px;text-align:right}} th{{background:#f4f4f4}}
.ok{{color:#2ca02c;font-size:13px}} .bad{{color:#d62728;font-size:13px}} .dot{{display:inline-block;width:9px;height:9px;border-radius:5px;margin-right:4px}}
.headline{{background:#f7f7e8;padding:6px}} svg{{display:block;margin:8px 0}} p,li{{font-size:13px}}
</style></head><body><h1>{title}</h1>
<p class="meta">dsplane {version} · {generated} · settings: {settings}.</p>
<p>Latency is from each message's <code>created_ns</code> (set by the load generator when it built the message) to its receipt, per priority level dsplane wrote in the frame; the table's percentiles come from HdrHistogram (3 significant digits), the charts' from log-scale bins per time bucket (within 19 %). Queue depth is an estimate: messages sent minus received minus refused, per level, counting a sent message at the level dsplane's rules give it.</p>"#
    );
    if let Some(c) = compare(runs) {
        s.push_str(&comparison_section(&c));
    }
    s.push_str("<div class=\"runs\">");
    for r in runs {
        s.push_str(&run_section(r));
    }
    s.push_str("</div></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg() {
        let lines = vec![Line {
            name: "level 1".into(),
            colour: colour(1),
            points: vec![
                (0.1, Some(0.5)),
                (0.2, None),
                (0.3, Some(120.0)),
                (0.4, Some(3.0)),
            ],
        }];
        let svg = line_chart("t <x>", "ms", &lines, true);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("t &lt;x&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2, "broken at the gap");
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let bars = bar_chart("b", &[("level 1".into(), 0.2, 900.0)]);
        roxmltree::Document::parse(&bars).unwrap();
        // Empty data still draws.
        roxmltree::Document::parse(&line_chart("e", "y", &[], false)).unwrap();
        // Markers: one dashed line per event, labelled, within the plot even with no data.
        let events = [RunEvent {
            t_s: 2.5,
            what: "SU 90-B3-D5-1F-30-01-00-00 disconnects".into(),
            marker: "disconnects".into(),
        }];
        let marked = line_chart_marked("m", "ms", &[], false, &events);
        roxmltree::Document::parse(&marked).unwrap();
        assert_eq!(marked.matches("class=\"marker\"").count(), 1);
        assert!(marked.contains(">disconnects</text>") && marked.contains("at 2.5 s"));
    }
}

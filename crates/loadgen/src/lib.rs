//! dsplane's bundled load generator (ENGINE.md §9): it plays Service Users and CSPs at once, over
//! real TCP, against a running engine or one it starts in-process, and reports per priority
//! level what was sent and received, throughput, and latency from `created_ns`, with end-to-end
//! checks that nothing was lost, corrupted or delivered to the wrong peer.
//!
//! The pieces, each testable on its own:
//!
//! * [`data`]: the real domain data (SRV catalogue, GBCS alert codes, DUIS samples), embedded;
//! * [`scenario`]: the four scenarios as deterministic, seeded traffic plans (time is a
//!   parameter);
//! * [`replay`]: DUIS XML request files as traffic;
//! * [`payload`]: the check trailer appended to every payload, with its checksum;
//! * [`checker`]: lost / corrupted / misdelivered / duplicate accounting, bounded by what is in
//!   flight;
//! * [`stats`]: per-level HdrHistograms and time series;
//! * [`run`]: the peer threads, the in-process engine, the drain;
//! * [`report`]: the terminal table, the JSON summary and the HTML report.
//!
//! [`run_demo`] is what `dsplane demo` runs: the outage scenario against a priority engine and a
//! FIFO one, side by side. The `dsplane-loadgen` binary (`src/main.rs` of this crate) is a thin
//! command line over this library; the library is a crate of its own, beside the engine, so that
//! the `dsplane` binary can run it too.
//!
//! ```no_run
//! use dsplane_loadgen::run::{run, Options};
//! use dsplane_loadgen::scenario::ScenarioKind;
//!
//! let runs = run(&Options { scenario: ScenarioKind::Outage, compare: true, ..Options::default() }).unwrap();
//! print!("{}", dsplane_loadgen::report::text_table(&runs[0]));
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

// The paths this crate's code was written with (`crate::wire`, `crate::engine::Engine`).
pub use dsplane_core::{classify, config, ids, wire};
pub use dsplane_engine as engine;
pub use dsplane_proto::client;

pub mod checker;
pub mod data;
pub mod payload;
pub mod replay;
pub mod report;
pub mod rng;
pub mod run;
pub mod scenario;
pub mod soak;
pub mod stats;

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use report::RunReport;

/// Writes the JSON summary of `runs` to `path`.
///
/// # Errors
///
/// The file cannot be written.
pub fn write_json(path: &Path, runs: &[RunReport]) -> io::Result<()> {
    let text = serde_json::to_string_pretty(&report::summary(runs)).map_err(io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// Writes the HTML report of `runs` to `path`.
///
/// # Errors
///
/// The file cannot be written.
pub fn write_html(path: &Path, runs: &[RunReport]) -> io::Result<()> {
    std::fs::write(path, report::html(runs))
}

/// Prints every run's table, and the comparison when there is one.
///
/// # Errors
///
/// `out` fails.
pub fn print_tables(out: &mut dyn Write, runs: &[RunReport]) -> io::Result<()> {
    for r in runs {
        writeln!(out, "{}", report::text_table(r))?;
    }
    if let Some(c) = report::compare(runs) {
        write!(out, "{}", report::text_comparison(&c))?;
    }
    Ok(())
}

/// What `dsplane demo` runs: the `outage` scenario for `duration`, against an in-process engine
/// with strict priority and then one with FIFO (the same seeded traffic both times), printing
/// both tables, the comparison and a one-line verdict on the urgent traffic to `out`, and writing
/// the HTML report to `html` if given. `progress` shows a progress bar on a terminal (stderr).
/// Returns the reports; every check passed when [`report::summary`]`(…).passed`.
///
/// # Errors
///
/// A run that could not start (engine, connection), `out` failing, or the report not written.
pub fn run_demo(
    duration: Duration,
    progress: bool,
    out: &mut dyn Write,
    html: Option<&Path>,
) -> Result<Vec<RunReport>, Box<dyn std::error::Error + Send + Sync>> {
    let opts = run::Options {
        scenario: scenario::ScenarioKind::Outage,
        compare: true,
        duration,
        progress,
        ..run::Options::default()
    };
    writeln!(
        out,
        "dsplane demo: the outage scenario, {} s, with strict priority and then FIFO…\n",
        duration.as_secs_f64()
    )?;
    out.flush()?;
    let runs = run::run(&opts)?;
    print_tables(out, &runs)?;
    if let Some(h) = report::compare(&runs).and_then(|c| c.headline_p99_ms) {
        // `ratio` is 0 when the priority p99 is 0 (nothing urgent arrived): say nothing then.
        if h.fifo_over_priority > 0.0 {
            writeln!(
                out,
                "\nurgent traffic after the outage: p99 {:.1} ms with priority, {:.1} ms with FIFO ({:.0}x)",
                h.priority, h.fifo, h.fifo_over_priority
            )?;
        }
    }
    if let Some(path) = html {
        std::fs::write(
            path,
            report::html_titled(&runs, "dsplane demo: priority vs FIFO after an outage"),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        writeln!(out, "HTML report: {}", path.display())?;
    }
    Ok(runs)
}

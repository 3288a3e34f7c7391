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
//! FIFO one, side by side.
//!
//! ```no_run
//! use dsplane_loadgen::run::{run, Options};
//! use dsplane_loadgen::scenario::ScenarioKind;
//!
//! let runs = run(&Options { scenario: ScenarioKind::Outage, compare: true, ..Options::default() }).unwrap();
//! print!("{}", dsplane_loadgen::report::text_table(&runs[0]));
//! ```

#![warn(missing_docs)]

pub mod checker;
pub mod data;
pub mod payload;
pub mod replay;
pub mod report;
pub mod rng;
pub mod run;
pub mod scenario;
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
/// with strict priority and then one with FIFO, printing both tables and the comparison to `out`
/// and writing the HTML report to `html` if given. Returns the reports; every check passed when
/// [`report::summary`]`(…).passed`.
///
/// # Errors
///
/// A run that could not start (engine, connection), or `out` failing.
pub fn run_demo(
    duration: Duration,
    out: &mut dyn Write,
    html: Option<&Path>,
) -> Result<Vec<RunReport>, Box<dyn std::error::Error + Send + Sync>> {
    let opts = run::Options {
        scenario: scenario::ScenarioKind::Outage,
        compare: true,
        duration,
        ..run::Options::default()
    };
    writeln!(
        out,
        "dsplane demo: the outage scenario, {} s, with strict priority and then FIFO…",
        duration.as_secs_f64()
    )?;
    let runs = run::run(&opts)?;
    print_tables(out, &runs)?;
    if let Some(path) = html {
        write_html(path, &runs)?;
        writeln!(out, "report: {}", path.display())?;
    }
    Ok(runs)
}

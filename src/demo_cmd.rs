//! `dsplane demo`: the outage scenario of the load generator against two in-process engines, one
//! with strict priority and one FIFO, so that a newcomer sees in one command what priority buys.
//! The work is [`dsplane::loadgen::run_demo`]; this is its command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

/// The options of `dsplane demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Seconds of traffic in each of the two runs (each is followed by a drain of a few seconds).
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// Write the HTML report (tables and charts, one self-contained file) here.
    #[arg(long, value_name = "FILE", default_value = "dsplane-demo-report.html")]
    html: PathBuf,
}

/// Runs the demo. Exit code 0 when every check (nothing lost, corrupted or misdelivered) passed
/// in both runs, 1 when one failed, 2 when the demo could not run.
pub fn run(args: DemoArgs) -> ExitCode {
    let duration = match Duration::try_from_secs_f64(args.duration_s) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            eprintln!("dsplane demo: --duration-s must be a positive number of seconds");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout();
    let runs = match dsplane::loadgen::run_demo(duration, true, &mut stdout, Some(&args.html)) {
        Ok(runs) => runs,
        Err(e) => {
            eprintln!("dsplane demo: {e}");
            return ExitCode::from(2);
        }
    };
    if runs.iter().all(|r| r.passed) {
        ExitCode::SUCCESS
    } else {
        eprintln!("dsplane demo: checks FAILED (see the tables above)");
        ExitCode::FAILURE
    }
}

//! `dsplane-loadgen`: the command line of the load generator, over the `dsplane_loadgen` library
//! of this crate. See the library's docs and the README's "Load generator" section.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dsplane_loadgen::ids::Eui64;
use dsplane_loadgen::run::{self, Options, Target};
use dsplane_loadgen::scenario::ScenarioKind;

#[derive(Parser)]
#[command(
    name = "dsplane-loadgen",
    version,
    about = "dsplane's load generator: plays SUs and CSPs over TCP, checks loss and misdelivery, reports latency per priority level"
)]
struct Cli {
    /// The scenario.
    #[arg(value_enum, default_value = "steady")]
    scenario: ScenarioKind,

    /// Start an engine in-process (ports 0, durability none) instead of connecting to one.
    #[arg(long)]
    spawn_engine: bool,
    /// With --spawn-engine: first come, first served (`[engine] scheduling = "fifo"`).
    #[arg(long, requires = "spawn_engine")]
    fifo: bool,
    /// Run the scenario twice, on an in-process priority engine and then a FIFO one.
    #[arg(long, conflicts_with_all = ["fifo", "su_addr", "csp_addr"])]
    compare: bool,

    /// SU port of a running engine: one address, or every node's, comma-separated (A,B,C); the
    /// active node's is found, and found again after a takeover.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "ADDR[,ADDR...]",
        default_value = "127.0.0.1:7100"
    )]
    su_addr: Vec<SocketAddr>,
    /// CSP port of a running engine: one address, or every node's, comma-separated (A,B,C).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "ADDR[,ADDR...]",
        default_value = "127.0.0.1:7200"
    )]
    csp_addr: Vec<SocketAddr>,
    /// A Service User of the running engine, ID:TOKEN (repeat for more; default: the demo SU).
    #[arg(long = "su", value_name = "ID:TOKEN")]
    su: Vec<String>,
    /// A CSP token of the running engine (repeat: one connection each; default: the demo CSP).
    #[arg(long = "csp-token", value_name = "TOKEN")]
    csp_token: Vec<String>,
    /// The running engine's config file, for the levels messages should get (default: embedded).
    #[arg(long)]
    config: Option<PathBuf>,

    /// Service Users (in-process engine).
    #[arg(long, default_value_t = 4)]
    sus: usize,
    /// CSP links (in-process engine), splitting the device space between them.
    #[arg(long, default_value_t = 2)]
    csp_links: usize,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Longest drain after the traffic, seconds.
    #[arg(long, default_value_t = 30.0)]
    drain_s: f64,
    /// Northbound base rate, messages/s over all CSP links.
    #[arg(long, default_value_t = 1500.0)]
    rate: f64,
    /// Requests/s per SU.
    #[arg(long, default_value_t = 50.0)]
    req_rate: f64,
    /// Northbound delivery rate per SU, msg/s: the in-process engine's `[delivery] rate`; for a
    /// running engine, the rate it is configured with (sizes backlogs and floods).
    #[arg(long, default_value_t = 2000)]
    su_rate: u32,
    /// Seed of the traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replay the DUIS request files (*.xml) of this directory as the SUs' requests.
    #[arg(long, value_name = "DIR")]
    replay: Option<PathBuf>,

    /// Write the JSON summary here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "dsplane-loadgen-report.html"
    )]
    html: PathBuf,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Soak: sample this process's resident memory every second (run with --spawn-engine so the
    /// engine is in-process) and fail if it grows by more than 32 MiB after the warm-up.
    #[arg(long)]
    soak: bool,
}

fn parse_su(text: &str) -> Result<(Eui64, String), String> {
    let (id, token) = text
        .split_once(':')
        .ok_or_else(|| format!("--su {text:?}: expected ID:TOKEN"))?;
    let id: Eui64 = id.parse().map_err(|e| format!("--su {text:?}: {e}"))?;
    Ok((id, token.to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let secs = |s: f64, name: &str| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| format!("--{name} must be a non-negative number"))
    };
    let (duration, drain_max) = match (
        secs(cli.duration_s, "duration-s"),
        secs(cli.drain_s, "drain-s"),
    ) {
        (Ok(d), Ok(r)) => (d, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("dsplane-loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let target = if cli.spawn_engine || cli.compare {
        Target::Spawn { fifo: cli.fifo }
    } else {
        let sus = if cli.su.is_empty() {
            vec![(run::generated_su_id(0), "demo-su-token".to_owned())]
        } else {
            match cli
                .su
                .iter()
                .map(|s| parse_su(s))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("dsplane-loadgen: {e}");
                    return ExitCode::from(2);
                }
            }
        };
        let csp_tokens = if cli.csp_token.is_empty() {
            vec!["demo-csp-token".to_owned()]
        } else {
            cli.csp_token.clone()
        };
        Target::Remote {
            su_addrs: cli.su_addr.clone(),
            csp_addrs: cli.csp_addr.clone(),
            sus,
            csp_tokens,
            config: cli.config.clone(),
        }
    };
    let opts = Options {
        scenario: cli.scenario,
        target,
        compare: cli.compare,
        duration,
        drain_max,
        seed: cli.seed,
        sus: cli.sus,
        csp_links: cli.csp_links,
        rate: cli.rate,
        req_rate: cli.req_rate,
        su_rate: cli.su_rate,
        replay: cli.replay.clone(),
        progress: !cli.quiet,
    };
    let (result, samples) = if cli.soak {
        dsplane_loadgen::soak::sample_while(Duration::from_secs(1), || run::run(&opts))
    } else {
        (run::run(&opts), Vec::new())
    };
    let runs = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dsplane-loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let soak = cli.soak.then(|| {
        dsplane_loadgen::soak::judge(&samples, dsplane_loadgen::soak::SOAK_GROWTH_BYTES_MAX)
    });
    let mut stdout = std::io::stdout();
    let _ = dsplane_loadgen::print_tables(&mut stdout, &runs);
    if let Err(e) = dsplane_loadgen::write_html(&cli.html, &runs) {
        eprintln!("dsplane-loadgen: cannot write {}: {e}", cli.html.display());
        return ExitCode::from(2);
    }
    println!("HTML report: {}", cli.html.display());
    if let Some(path) = &cli.json {
        if let Err(e) = dsplane_loadgen::write_json(path, &runs) {
            eprintln!("dsplane-loadgen: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
        println!("JSON summary: {}", path.display());
    }
    if let Some(v) = &soak {
        println!(
            "soak: {} samples; resident {} MiB after warm-up, {} MiB at the end, peak {} MiB; slope {:+.1} KiB/min; {}",
            v.samples,
            v.start_bytes >> 20,
            v.end_bytes >> 20,
            v.peak_bytes >> 20,
            v.slope_bytes_per_min / 1024.0,
            if v.passed { "PASSED" } else { "FAILED (memory grew)" }
        );
        if !v.passed {
            return ExitCode::FAILURE;
        }
    }
    if runs.iter().all(|r| r.passed) {
        ExitCode::SUCCESS
    } else {
        eprintln!("dsplane-loadgen: checks FAILED");
        ExitCode::FAILURE
    }
}

//! The `dsplane` command: `run` and `check-config` (ENGINE.md §8).

mod check_cmd;
mod client_cmd;
mod cluster_cmd;
mod demo_cmd;
mod generate_cmd;
mod recover_cmd;
mod run_log;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use dsplane::config::Config;
use dsplane::engine::Engine;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Parser)]
#[command(
    name = "dsplane",
    version,
    about = "Traffic-management dataplane for a smart-metering DSP"
)]
struct Cli {
    /// Log format on stderr: `human` or `json` (one object per line). Also DSPLANE_LOG_FORMAT.
    #[arg(
        long,
        global = true,
        env = "DSPLANE_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start the dataplane (with no --config: the embedded demo configuration).
    Run {
        /// The TOML configuration file (ENGINE.md §10).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// A protocol client: `client su` prints what an SU receives, `client csp` sends it a mix of
    /// traffic (defaults: the embedded demo configuration's ports, ids and tokens; `--addr A,B,C`
    /// for every node of several, the active one found again after a takeover).
    #[command(subcommand)]
    Client(client_cmd::ClientCommand),
    /// Reports: `report alerts [--day YYYY-MM-DD]`, the alert monitoring report of a day.
    Report {
        #[command(subcommand)]
        what: ReportWhat,
    },
    /// High availability on PostgreSQL: `cluster init --config FILE` creates the tables.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCommand),
    /// Validate a configuration file and print the effective configuration, tokens redacted.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// See the difference priority makes: the outage scenario against an in-process engine with
    /// strict priority and one with FIFO, both tables side by side (2 × 20 s of traffic by default).
    Demo(demo_cmd::DemoArgs),
    /// Check the write-ahead log of a data_dir without starting the engine; with --salvage,
    /// keep what is intact of a damaged log and write down exactly what is not.
    Recover(recover_cmd::RecoverArgs),
    /// Print the completion script for a shell (packaging: tools/package/build-deb.sh).
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the dsplane(1) manual page, or write every page into --dir (packaging).
    #[command(hide = true)]
    Man(generate_cmd::ManArgs),
}

#[derive(Subcommand)]
enum ReportWhat {
    /// Per alert code: received, delivered, throttled, distinct devices, top devices.
    Alerts {
        /// The configuration whose `data_dir` holds the report (default: the embedded one).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The day, UTC (default: today).
        #[arg(long)]
        day: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("DSPLANE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let json = matches!(cli.log_format, LogFormat::Json);
    match cli.command {
        Command::Client(command) => client_cmd::run(command),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Recover(args) => recover_cmd::run(args),
        Command::Completions { shell } => generate_cmd::completions(shell, Cli::command()),
        Command::Man(args) => generate_cmd::man(args, Cli::command()),
        Command::Cluster(command) => cluster_cmd::run(command),
        Command::CheckConfig { file } => check_cmd::run(&file),
        Command::Run { config } => {
            let embedded = config.is_none();
            let config_path = config.clone();
            let loaded = match &config {
                Some(path) => Config::load(path).map_err(|e| e.in_file(path)),
                None => Config::embedded_default().map_err(|e| e.to_string()),
            };
            let config = match loaded {
                Ok(c) => c,
                Err(e) => {
                    run_log::error(json, &e);
                    return ExitCode::from(2);
                }
            };
            run(config, embedded, path_of(config_path), json)
        }
        Command::Report {
            what: ReportWhat::Alerts { config, day },
        } => report_alerts(config, day),
    }
}

fn path_of(path: Option<PathBuf>) -> Option<PathBuf> {
    path.map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

/// `dsplane report alerts`: the alert monitoring report of one day, as a table, from the file
/// the engine keeps in `data_dir` (written every few seconds while it runs).
fn report_alerts(config: Option<PathBuf>, day: Option<String>) -> ExitCode {
    let loaded = match &config {
        Some(path) => Config::load(path).map_err(|e| e.in_file(path)),
        None => Config::embedded_default().map_err(|e| e.to_string()),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsplane: {e}");
            return ExitCode::from(2);
        }
    };
    let day = match day {
        Some(d) => match dsplane::report::day_of_date(&d) {
            Some(day) => day,
            None => {
                eprintln!("dsplane: --day must be a date, YYYY-MM-DD (got {d:?})");
                return ExitCode::from(2);
            }
        },
        None => dsplane::report::utc_day(dsplane::unix_now()),
    };
    let path = config
        .engine
        .data_dir
        .join(dsplane::engine::ALERT_REPORT_FILE);
    let report = match std::fs::File::open(&path) {
        Ok(mut f) => match dsplane::report::AlertReport::load_from(&mut f) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dsplane: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            eprintln!(
                "dsplane: no alert report at {} ({e}); has dsplane run with this data_dir?",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.day_summary(day));
    ExitCode::SUCCESS
}

/// `run` with `[cluster]`: a node that stands by until it holds the lease, then is active
/// (`docs/ha.md`). SIGHUP is not applied to a node: a reload must reach every node alike, and a
/// restart of one node at a time (each standby first) does that.
fn run_node(config: Config, mut signals: Signals, json: bool) -> ExitCode {
    let node = match dsplane::engine::cluster::Node::start(config) {
        Ok(n) => n,
        Err(e) => {
            run_log::error(json, &format!("cannot start: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let stopper = node.stopper();
    let handle = signals.handle();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal == SIGHUP {
                tracing::warn!("SIGHUP: a node of a cluster does not reload; restart the nodes one at a time, standbys first");
                continue;
            }
            tracing::info!(signal, "shutting down");
            stopper.stop();
            return;
        }
    });
    node.join();
    handle.close();
    tracing::info!("dsplane stopped");
    ExitCode::SUCCESS
}

fn run(config: Config, embedded: bool, config_path: Option<PathBuf>, json: bool) -> ExitCode {
    if embedded {
        run_log::banner(&config, json);
    }
    for su in &config.service_users {
        tracing::info!(peer = %su.id, name = %su.name, rate = su.delivery.rate, "service user configured");
    }
    for csp in &config.csps {
        tracing::info!(peer = %csp.name, rate = csp.rate, "CSP link configured");
    }
    // The handlers go in before the engine starts: a SIGHUP's default action is to end the
    // process, so one sent as soon as "dsplane running" is logged (`systemctl reload` right
    // after a start) would kill it. Signals that arrive early wait in `signals` until the
    // thread below reads them, after the config path is set.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            run_log::error(json, &format!("cannot install signal handlers: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if config.cluster.is_some() {
        return run_node(config, signals, json);
    }
    let engine = match Engine::start(config) {
        Ok(e) => e,
        Err(e) => {
            run_log::error(json, &format!("cannot start: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = config_path {
        engine.set_config_path(path);
    }
    let stopper = engine.stopper();
    let handle = signals.handle();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal == SIGHUP {
                // The engine logs the outcome: what changed, or why it was refused.
                let _ = stopper.reload();
                continue;
            }
            tracing::info!(
                signal,
                "shutting down: no new connections, nothing new handed out"
            );
            stopper.stop();
            return;
        }
    });
    engine.join();
    handle.close();
    tracing::info!("dsplane stopped");
    ExitCode::SUCCESS
}

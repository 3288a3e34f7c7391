//! The `dsplane` command: `run` and `check-config` (ENGINE.md §8).

mod client_cmd;
mod demo_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dsplane::config::Config;
use dsplane::engine::Engine;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Parser)]
#[command(
    name = "dsplane",
    version,
    about = "Traffic-management dataplane for a smart-metering DSP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// traffic (defaults: the embedded demo configuration's ports, ids and tokens).
    #[command(subcommand)]
    Client(client_cmd::ClientCommand),
    /// Validate a configuration file and print the effective configuration, tokens redacted.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// See the difference priority makes: the outage scenario against an in-process engine with
    /// strict priority and one with FIFO, both tables side by side (2 × 20 s of traffic by default).
    Demo(demo_cmd::DemoArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DSPLANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Client(command) => client_cmd::run(command),
        Command::Demo(args) => demo_cmd::run(args),
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                print!("{}", config.effective_toml());
                eprintln!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let embedded = config.is_none();
            let loaded = match &config {
                Some(path) => Config::load(path),
                None => Config::embedded_default(),
            };
            let config = match loaded {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dsplane: {e}");
                    return ExitCode::from(2);
                }
            };
            run(config, embedded)
        }
    }
}

fn run(config: Config, embedded: bool) -> ExitCode {
    if embedded {
        // The demo configuration's ids and tokens, so that a newcomer can connect at once.
        eprintln!("dsplane: no --config given; running the embedded demo configuration");
        for su in &config.service_users {
            eprintln!(
                "  demo Service User {} token {:?} on {}",
                su.id,
                su.token.expose_str(),
                config.listen.su
            );
        }
        for csp in &config.csps {
            eprintln!(
                "  demo CSP {:?} token {:?} on {}",
                csp.name,
                csp.token.expose_str(),
                config.listen.csp
            );
        }
    }
    for su in &config.service_users {
        tracing::info!(su = %su.id, name = %su.name, rate = su.delivery.rate, "service user configured");
    }
    for csp in &config.csps {
        tracing::info!(csp = %csp.name, rate = csp.rate, "CSP link configured");
    }
    let engine = match Engine::start(config) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("dsplane: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stopper = engine.stopper();
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dsplane: cannot install signal handlers: {e}");
            engine.shutdown();
            engine.join();
            return ExitCode::FAILURE;
        }
    };
    let handle = signals.handle();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            tracing::info!(
                signal,
                "shutting down: no new connections, nothing new handed out"
            );
            stopper.stop();
        }
    });
    engine.join();
    handle.close();
    tracing::info!("dsplane stopped");
    ExitCode::SUCCESS
}

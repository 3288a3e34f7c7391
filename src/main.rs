//! The `dsplane` command: `run` and `check-config` (ENGINE.md §8).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dsplane::config::Config;

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
    /// Validate a configuration file and print the effective configuration, tokens redacted.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DSPLANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
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
            run(config)
        }
    }
}

fn run(config: Config) -> ExitCode {
    for su in &config.service_users {
        tracing::info!(su = %su.id, name = %su.name, rate = su.delivery.rate, "service user configured");
    }
    for csp in &config.csps {
        tracing::info!(csp = %csp.name, rate = csp.rate, "CSP link configured");
    }
    // The network engine (issue 3) is not built yet: today `run` validates the configuration,
    // reports what it would serve and stops.
    eprintln!(
        "dsplane: configuration valid ({} service users, {} CSP links, {} levels); the network engine is not built yet",
        config.service_users.len(),
        config.csps.len(),
        config.engine.levels
    );
    ExitCode::SUCCESS
}

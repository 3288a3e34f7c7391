//! `dsplane recover`: check a data directory without starting the engine, or, with
//! `--salvage`, keep what is intact of a damaged one and write down what is not.

use std::path::PathBuf;
use std::process::ExitCode;

use dsplane::config::Config;
use dsplane::datadir::DataDirLock;
use dsplane::engine;
use dsplane::recovery;

/// Options of `dsplane recover`.
#[derive(clap::Args)]
pub struct RecoverArgs {
    /// The configuration of the engine whose `data_dir` to check (default: the embedded one).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Copy every frame that can still be read into a new generation, list what could not be
    /// read in `data_dir/salvage-<time>.txt`, and keep the damaged generation aside. Frames in
    /// damaged records are lost: run this only when a start refuses the log and no intact copy
    /// of the data directory exists.
    #[arg(long)]
    salvage: bool,
}

/// Runs `dsplane recover`. Exit 0: the log is intact (or was salvaged); 1: a start would refuse
/// it; 2: the configuration or the lock is the problem.
pub fn run(args: RecoverArgs) -> ExitCode {
    let loaded = match &args.config {
        Some(path) => Config::load(path),
        None => Config::embedded_default(),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsplane recover: {e}");
            return ExitCode::from(2);
        }
    };
    let data_dir = config.engine.data_dir.clone();
    let _lock = match DataDirLock::acquire(&data_dir) {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("dsplane recover: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.salvage {
        return match recovery::check(&data_dir) {
            Ok(report) => {
                for note in &report.notes {
                    println!("note: {note}");
                }
                match report.generation {
                    None => println!("{}: no log yet (a new data directory)", data_dir.display()),
                    Some(g) => println!(
                        "{}: generation {g}, {} worker logs, intact; {} frames waiting for their receivers; {} torn tails a start would cut off",
                        data_dir.display(),
                        report.workers,
                        report.frames_waiting,
                        report.torn_tails.len()
                    ),
                }
                for (path, offset) in &report.torn_tails {
                    println!("torn tail: {} at byte {offset}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                ExitCode::from(1)
            }
        };
    }
    let workers = engine::worker_count(&config);
    let expiry_path = data_dir.join("expired-recovery.jsonl");
    match recovery::salvage(
        &data_dir,
        engine::log_settings(&config, workers),
        engine::owner_in(&config, workers),
        |record| engine::write_orphan(&expiry_path, record),
    ) {
        Ok(report) => {
            println!(
                "salvaged into generation {}: {} frames kept, {} for receivers no longer configured",
                report.generation, report.frames_kept, report.frames_orphaned
            );
            println!("could not be read ({}):", report.losses.len());
            for loss in &report.losses {
                println!("- {loss}");
            }
            if let Some(kept) = &report.kept_as {
                println!("the damaged generation is kept as {}", kept.display());
            }
            println!("written down in {}", report.report_file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dsplane recover --salvage: {e}");
            ExitCode::from(1)
        }
    }
}

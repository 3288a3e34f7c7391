//! `dsplane-sim`: runs the deterministic simulator over many seeds, or replays one.
//!
//! ```text
//! cargo run --release -p dsplane-sim -- --seeds 1000        seeds 0..1000
//! cargo run --release -p dsplane-sim -- --seed 42           replay seed 42, with its trace
//! cargo run --release -p dsplane-sim -- --replicated --seeds 100   the replicated store model
//! ```

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use dsplane_sim::{run, Options, StoreKind};

/// dsplane's deterministic simulator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Run this many seeds, from --first.
    #[arg(long, default_value_t = 100, conflicts_with = "seed")]
    seeds: u64,
    /// The first seed of --seeds.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Replay one seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Steps of traffic and faults per seed, before the drain.
    #[arg(long, default_value_t = 3_000)]
    steps: u64,
    /// Events kept for a failure's trace.
    #[arg(long, default_value_t = 40)]
    trace: usize,
    /// Keep going after a failure (count failing seeds).
    #[arg(long)]
    keep_going: bool,
    /// Run the owners on the `replicated` store (2 or 3 nodes over a simulated PostgreSQL,
    /// with takeovers and fencing) instead of one engine's disk store.
    #[arg(long)]
    replicated: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if std::env::var_os("SIM_LOG").is_some() {
        // The engine's own log lines, for a seed being replayed.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .init();
    }
    let options = Options {
        steps: args.steps,
        trace_len: args.trace,
        store: if args.replicated {
            StoreKind::Replicated
        } else {
            StoreKind::Disk
        },
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first..args.first + args.seeds).collect(),
    };
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut totals = dsplane_sim::Summary::default();
    for &seed in &seeds {
        match run(seed, options) {
            Ok(s) => {
                totals.add(&s);
                if args.seed.is_some() {
                    println!("seed {seed} passed: {s:?}");
                }
            }
            Err(f) => {
                eprintln!("{f}");
                failed.push(seed);
                if !args.keep_going {
                    break;
                }
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let ran = if args.keep_going || failed.is_empty() {
        seeds.len()
    } else {
        seeds
            .iter()
            .position(|s| Some(s) == failed.first())
            .map_or(seeds.len(), |i| i + 1)
    };
    let simulated = totals.simulated_ns as f64 / 1e9;
    let head = format!(
        "{ran} seeds, {} failed; {simulated:.1} simulated s in {wall:.1} s of wall clock ({:.1} simulated s per s); ACKed {}, delivered {} (duplicates {}), expired {}, alerts throttled {} (storms judged in {} runs)",
        failed.len(),
        simulated / wall.max(1e-9),
        totals.acked,
        totals.delivered,
        totals.duplicates,
        totals.expired,
        totals.throttled,
        totals.storms_judged,
    );
    if args.replicated {
        println!(
            "{head}, node crashes {}, pauses {} (woke past the lease {}), database outages {}, leases taken {} (takeovers {}, {} from an active still alive), nodes fenced {}, commits refused for a stale epoch {}, commits with an unknown outcome {}, writes refused {}, requests throttled {}",
            totals.crashes,
            totals.pauses,
            totals.woke_unable,
            totals.outages,
            totals.acquisitions,
            totals.takeovers,
            totals.superseded,
            totals.fenced,
            totals.refused_commits,
            totals.unknown_commits,
            totals.refused_writes,
            totals.requests_throttled,
        );
    } else {
        println!(
            "{head}, crashes {} ({} during a recovery), refused logs {}, salvages {}, writes refused {}, requests throttled {}",
            totals.crashes,
            totals.deaths_in_recovery,
            totals.refusals,
            totals.salvages,
            totals.refused_writes,
            totals.requests_throttled,
        );
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failing seeds: {failed:?}");
        ExitCode::FAILURE
    }
}

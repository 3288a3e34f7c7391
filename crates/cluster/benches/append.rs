//! The replicated log's append into PostgreSQL: `COPY … BINARY` against a multi-row
//! `INSERT … unnest`, each batch one transaction fenced by the lease's epoch, on a throwaway
//! local cluster (`fsync = on`, `synchronous_commit = on`, no standby), in one run.
//!
//! Frames of 192 bytes (a 64-byte header and a 128-byte payload, as in `benches/line_rate.rs`),
//! to one SU over 4 lanes. Each (method, batch size) appends `FRAMES` frames, `RUNS` times
//! interleaved; "+ delete" also deletes the batch before, as delivery would, so the table stays
//! small. Prints the median frames/s, the range, and the ratio to `INSERT` at the same size.
//!
//! Usage: `cargo bench -p dsplane-cluster --bench append -- [FRAMES] [RUNS]` (default 200,000
//! and 3; `--quick`: 20,000 once).

use std::time::Instant;

use dsplane_cluster::log::{self, FrameRow};
use dsplane_cluster::pg::Db;
use dsplane_cluster::testing::TempPostgres;

const FRAME_BYTES: usize = 192;
const BATCHES: [usize; 3] = [100, 1_000, 10_000];
const SU: u64 = 0x90B3_D51F_3001_0000;

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Copy,
    Insert,
    CopyDelete,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Copy => "COPY",
            Method::Insert => "INSERT unnest",
            Method::CopyDelete => "COPY + delete",
        }
    }
}

fn run(
    db: &mut Db,
    epoch: u64,
    method: Method,
    batch: usize,
    frames: usize,
    next: &mut u64,
) -> f64 {
    let frame = vec![0xA5u8; FRAME_BYTES];
    let started = Instant::now();
    let mut done = 0;
    let mut previous: Option<(u8, u64)> = None;
    while done < frames {
        let n = batch.min(frames - done);
        let rows: Vec<FrameRow<'_>> = (0..n)
            .map(|i| {
                let id = *next + i as u64;
                FrameRow {
                    id,
                    peer_kind: 1,
                    peer_id: SU,
                    lane: (id % 4) as u8,
                    level: (id % 4) as u8 + 1,
                    enqueued_ns: id,
                    frame: &frame,
                }
            })
            .collect();
        match method {
            Method::Insert => log::append_by_insert(db, epoch, &rows).unwrap(),
            Method::Copy | Method::CopyDelete => log::append(db, epoch, &rows).unwrap(),
        }
        if method == Method::CopyDelete {
            if let Some((_, through)) = previous {
                for lane in 0..4 {
                    log::delete_through(db, epoch, 1, SU, lane, through).unwrap();
                }
            }
            previous = Some((0, *next + n as u64 - 1));
        }
        *next += n as u64;
        done += n;
    }
    let rate = frames as f64 / started.elapsed().as_secs_f64();
    // Empty the table between measurements, outside the timing.
    db.client()
        .batch_execute("TRUNCATE dsplane_frames")
        .unwrap();
    rate
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut numbers = args.iter().filter_map(|a| a.parse::<usize>().ok());
    let (frames, runs) = if quick {
        (20_000, 1)
    } else {
        (
            numbers.next().unwrap_or(200_000),
            numbers.next().unwrap_or(3),
        )
    };
    let Some(pg) = TempPostgres::start("bench-append") else {
        return;
    };
    let mut db = Db::connect(&pg.conninfo()).unwrap();
    db.init().unwrap();
    let lease = dsplane_cluster::lease::LeaseMs::new(60_000).unwrap();
    let epoch = db.try_acquire("bench", lease).unwrap().unwrap();
    let methods = [Method::Insert, Method::Copy, Method::CopyDelete];
    let mut results = vec![vec![Vec::new(); methods.len()]; BATCHES.len()];
    let mut next = 1;
    for _ in 0..runs {
        for (b, &batch) in BATCHES.iter().enumerate() {
            for (m, &method) in methods.iter().enumerate() {
                let r = run(&mut db, epoch, method, batch, frames, &mut next);
                results[b][m].push(r);
            }
        }
    }
    println!("{frames} frames of {FRAME_BYTES} B per measurement, {runs} runs each, interleaved; fsync on, synchronous_commit on, local PostgreSQL, no standby");
    println!(
        "{:<8} {:<14} {:>12} {:>22} {:>10}",
        "batch", "method", "median/s", "range", "× INSERT"
    );
    for (b, &batch) in BATCHES.iter().enumerate() {
        let insert = median(&mut results[b][0].clone());
        for (m, &method) in methods.iter().enumerate() {
            let r = &mut results[b][m];
            let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.iter().copied().fold(0.0, f64::max);
            let med = median(r);
            println!(
                "{batch:<8} {:<14} {:>10.0} {:>10.0}–{:<10.0} {:>9.2}×",
                method.name(),
                med,
                lo,
                hi,
                med / insert
            );
        }
    }
}

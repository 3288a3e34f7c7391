//! How northbound throughput scales with worker cores, CSP connections and Service Users
//! (`docs/engine.md`, "How throughput scales"): the engine end to end over loopback, one CSP
//! link sending RESPONSEs over 1 or 2 connections (`csp.connections_max = 2`) to 1 or 2 SUs, on
//! `cores = 1` and `cores = 2`, every combination in the same run.
//!
//! * Each CSP connection sends its share of `FRAMES` RESPONSEs (128-byte payloads, alternating
//!   between the SUs), in writes of 256 frames; a thread drains the engine's ACKs to it.
//! * Each SU reads up to 1 MiB at a time, parses the frames itself and sends one cumulative ACK
//!   after each read.
//! * The engine: `rate = 10000000`, `window = 65536`, the NMS sized to hold the run, durability
//!   `none`, priority scheduling (the `line_rate` bench's settings).
//!
//! A run is timed from the first write to every SU having read all of its frames. Each
//! combination runs `RUNS` times, interleaved with the others so that slow spells of a shared
//! machine fall on all of them; the median and range are printed, with each median's ratio to
//! the 1-core, 1-connection, 1-SU one. The clients run on the same machine as the engine.
//!
//! Usage: `cargo bench --bench csp_scaling -- [FRAMES] [RUNS]` (default 1,000,000 and 3); with
//! `--quick` it runs 20,000 frames once, as a smoke test; `CSP_SCALING_ONLY=2/1/1` (cores,
//! connections, SUs) runs one shape.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, HEADER_LEN};

const SUS: [Eui64; 2] = [Eui64(0x90B3_D51F_3001_0000), Eui64(0x90B3_D51F_3001_0001)];
const PAYLOAD_LEN: usize = 128;
const FRAMES_PER_WRITE: usize = 256;
const SU_READ_BYTES: usize = 1 << 20;

/// One combination: worker cores, CSP connections, SUs.
#[derive(Debug, Clone, Copy)]
struct Shape {
    cores: u32,
    conns: usize,
    sus: usize,
}

fn shapes() -> Vec<Shape> {
    let mut out = Vec::new();
    for cores in [1, 2] {
        for conns in [1, 2] {
            for sus in [1, 2] {
                out.push(Shape { cores, conns, sus });
            }
        }
    }
    out
}

fn data_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("dsplane-bench-csp-scaling-{}", std::process::id()))
}

fn engine_config(shape: Shape, frames: usize) -> Config {
    let dir = data_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let nms = frames + 1_000;
    let mut sus = String::new();
    for (i, su) in SUS.iter().enumerate().take(shape.sus) {
        sus.push_str(&format!(
            "[[service_user]]\nid = \"{su}\"\ntoken = \"scaling-su-{i}\"\n"
        ));
    }
    let text = format!(
        r#"
[engine]
cores = {cores}
levels = 4
durability = "none"
data_dir = "{dir}"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
rate = 10000000
burst = 1000000
window = 65536
nms_per_su = {nms}
nms_total = {nms}
release_start = 1.0
{sus}
[[csp]]
name = "c"
token = "scaling-csp"
rate = 10000000
burst = 1000000
connections_max = 2
"#,
        cores = shape.cores,
        dir = dir.display(),
    );
    Config::from_toml(&text).unwrap()
}

/// One connection's bytes: `frames` RESPONSEs with msg_ids from 1, to the first `sus` SUs in
/// turn, each to its own device, over SRVs of every level. `base` keeps counters apart.
fn csp_bytes(frames: usize, sus: usize, base: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(frames * (HEADER_LEN + PAYLOAD_LEN));
    common::responses(&SUS[..sus], 1..=frames as u64, base, PAYLOAD_LEN, &mut out);
    out
}

/// An SU: reads up to 1 MiB at a time, counts the data frames in it, and sends one cumulative
/// ACK after each read, until `frames` have come.
fn su_reader(mut read: TcpStream, mut write: TcpStream, frames: usize) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; SU_READ_BYTES];
        let mut parse = common::SuParse::default();
        let mut count = 0usize;
        while count < frames {
            let n = match read.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let last = parse.take(&buf[..n]);
            count = parse.count as usize;
            if let Some(msg_id) = last {
                let _ = write.write_all(&Frame::ack(msg_id).header_bytes());
            }
        }
    })
}

/// One run: frames per second.
fn run(shape: Shape, bytes: &[Arc<Vec<u8>>], frames: usize) -> f64 {
    let engine = Engine::start(engine_config(shape, frames)).unwrap();
    let sus: Vec<Client> = (0..shape.sus)
        .map(|i| Client::connect_su(engine.su_addr(), SUS[i], &format!("scaling-su-{i}")).unwrap())
        .collect();
    let csps: Vec<Client> = (0..shape.conns)
        .map(|_| Client::connect_csp(engine.csp_addr(), "scaling-csp").unwrap())
        .collect();
    let mut readers = Vec::new();
    for su in &sus {
        let s = su.stream().try_clone().unwrap();
        s.set_nodelay(true).unwrap();
        readers.push(su_reader(s.try_clone().unwrap(), s, frames / shape.sus));
    }
    let mut backs = Vec::new();
    let mut writers = Vec::new();
    let started = Instant::now();
    for (csp, bytes) in csps.iter().zip(bytes) {
        let mut s = csp.stream().try_clone().unwrap();
        s.set_nodelay(true).unwrap();
        backs.push(common::drain(&s));
        // Shared, not copied: a copy of hundreds of MB would be timed with the run.
        let bytes = Arc::clone(bytes);
        writers.push(std::thread::spawn(move || {
            let chunk = FRAMES_PER_WRITE * (HEADER_LEN + PAYLOAD_LEN);
            for part in bytes.chunks(chunk) {
                s.write_all(part).unwrap();
            }
            s
        }));
    }
    for r in readers {
        r.join().unwrap();
    }
    let elapsed = started.elapsed();
    for w in writers {
        let s = w.join().unwrap();
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    drop((csps, sus));
    engine.shutdown();
    engine.join();
    for b in backs {
        let _ = b.join();
    }
    let _ = std::fs::remove_dir_all(data_dir());
    frames as f64 / elapsed.as_secs_f64()
}

/// What each CSP connection of a shape sends.
type ConnBytes = Vec<Arc<Vec<u8>>>;

fn main() {
    let args = common::bench_args();
    let quick = args.iter().any(|a| a == "--quick");
    let mut numbers = args.iter().filter_map(|a| a.parse::<usize>().ok());
    let (frames, runs) = if quick {
        (20_000, 1)
    } else {
        (
            numbers.next().unwrap_or(1_000_000),
            numbers.next().unwrap_or(3),
        )
    };
    // Divisible by every split below.
    let frames = frames / 4 * 4;
    // `CSP_SCALING_ONLY=2/1/1` (cores/connections/SUs) runs one shape.
    let only = std::env::var("CSP_SCALING_ONLY").ok();
    let shapes: Vec<Shape> = shapes()
        .into_iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o == format!("{}/{}/{}", s.cores, s.conns, s.sus))
        })
        .collect();
    // Per shape: each connection's bytes.
    // The same bytes for shapes that differ only in cores.
    let mut made: Vec<((usize, usize), ConnBytes)> = Vec::new();
    let mut bytes: Vec<ConnBytes> = Vec::new();
    for s in &shapes {
        let key = (s.conns, s.sus);
        if let Some((_, b)) = made.iter().find(|(k, _)| *k == key) {
            bytes.push(b.clone());
            continue;
        }
        let b: ConnBytes = (0..s.conns)
            .map(|c| Arc::new(csp_bytes(frames / s.conns, s.sus, (c * frames) as u64)))
            .collect();
        made.push((key, b.clone()));
        bytes.push(b);
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
    for _ in 0..runs {
        for (i, s) in shapes.iter().enumerate() {
            results[i].push(run(*s, &bytes[i], frames));
        }
    }
    let base = common::median(&mut results[0].clone());
    println!("{frames} RESPONSEs of {PAYLOAD_LEN} B in all, {runs} runs each, interleaved");
    println!(
        "{:<5} {:>9} {:>4} {:>12} {:>24} {:>9}",
        "cores", "CSP conns", "SUs", "median/s", "range", "× 1/1/1"
    );
    for (s, r) in shapes.iter().zip(&mut results) {
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(0.0, f64::max);
        let m = common::median(r);
        println!(
            "{:<5} {:>9} {:>4} {:>10.3} M {:>9.3}–{:<9.3} M {:>8.2}×",
            s.cores,
            s.conns,
            s.sus,
            m / 1e6,
            lo / 1e6,
            hi / 1e6,
            m / base
        );
    }
}

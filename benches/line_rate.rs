//! Line rate (issue 16, its measurement): the engine end to end against a plain byte-copying
//! forwarder, in the same run, with the client shape of the issue.
//!
//! * One CSP connection sends `FRAMES` RESPONSE frames (128-byte payloads), in writes of 256
//!   frames; a thread drains what comes back to it (the engine's ACKs).
//! * One connected SU reads up to 1 MiB at a time, parses the frames itself (header decode, no
//!   queues) and sends one cumulative ACK after each read.
//! * The null forwarder: a thread that `read`s up to 256 KiB from the CSP's socket and
//!   `write_all`s it to the SU's socket (no HELLO, no parsing).
//! * The engine: `cores = 2`, `rate = 10000000`, `window = 65536`, the NMS sized to hold the run;
//!   durability `none` and `batch`, `burst` 100 and 1,000,000, priority and FIFO scheduling.
//!
//! A run is timed from the CSP's first write to the SU having read every frame. Each contender
//! runs `RUNS` times, interleaved with the others, so that the machine's slow spells fall on all
//! of them; the median, the range and the ratio of medians to the null forwarder are printed.
//!
//! Usage: `cargo bench --bench line_rate -- [FRAMES] [RUNS]` (default 2,000,000 and 3). Any
//! other argument (`cargo bench` passes `--bench`) is ignored; with `--quick` it runs 20,000
//! frames once, as a smoke test.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, HEADER_LEN};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const PAYLOAD_LEN: usize = 128;
const FRAMES_PER_WRITE: usize = 256;
const SU_READ_BYTES: usize = 1 << 20;
const FORWARDER_READ_BYTES: usize = 256 * 1024;

/// One contender: a name and, for the engine, its settings.
#[derive(Debug, Clone, Copy)]
struct Contender {
    name: &'static str,
    engine: Option<(&'static str, &'static str, u32)>, // durability, scheduling, burst
}

const CONTENDERS: [Contender; 6] = [
    Contender {
        name: "null forwarder",
        engine: None,
    },
    Contender {
        name: "none, priority, burst 100",
        engine: Some(("none", "priority", 100)),
    },
    Contender {
        name: "none, priority, burst 1M",
        engine: Some(("none", "priority", 1_000_000)),
    },
    Contender {
        name: "none, fifo, burst 1M",
        engine: Some(("none", "fifo", 1_000_000)),
    },
    Contender {
        name: "batch, priority, burst 100",
        engine: Some(("batch", "priority", 100)),
    },
    Contender {
        name: "batch, priority, burst 1M",
        engine: Some(("batch", "priority", 1_000_000)),
    },
];

fn engine_config(durability: &str, scheduling: &str, burst: u32, frames: usize) -> Config {
    let dir = std::env::temp_dir().join(format!(
        "dsplane-bench-line-rate-{durability}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let nms = frames + 1_000;
    let text = format!(
        r#"
[engine]
cores = 2
levels = 4
durability = "{durability}"
data_dir = "{}"
scheduling = "{scheduling}"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
rate = 10000000
burst = {burst}
window = 65536
nms_per_su = {nms}
nms_total = {nms}
release_start = 1.0
[[service_user]]
id = "{SU1}"
token = "line-rate-su"
[[csp]]
name = "c"
token = "line-rate-csp"
rate = 10000000
burst = 1000000
"#,
        dir.display()
    );
    Config::from_toml(&text).unwrap()
}

/// The CSP's bytes: `frames` RESPONSEs, each to its own device, over SRVs of every level.
fn csp_bytes(frames: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(frames * (HEADER_LEN + PAYLOAD_LEN));
    common::responses(&[SU1], 1..=frames as u64, 0, PAYLOAD_LEN, &mut out);
    out
}

/// The SU: reads up to 1 MiB at a time, counts the data frames in it (its own parse), and sends
/// one cumulative ACK after each read. Returns when `frames` have been read.
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
                let ack = Frame::ack(msg_id);
                let _ = write.write_all(&ack.header_bytes());
            }
        }
    })
}

/// One run: frames per second.
fn run(contender: Contender, bytes: &[u8], frames: usize) -> f64 {
    let mut engine = None;
    let mut forwarder = None;
    let (csp, su) = match contender.engine {
        None => {
            let (csp_addr, su_addr, handle) = common::null_forwarder(FORWARDER_READ_BYTES);
            forwarder = Some(handle);
            let csp = TcpStream::connect(csp_addr).unwrap();
            // The forwarder accepts the CSP first, then the SU.
            std::thread::sleep(Duration::from_millis(20));
            let su = TcpStream::connect(su_addr).unwrap();
            (csp, su)
        }
        Some((durability, scheduling, burst)) => {
            let e = Engine::start(engine_config(durability, scheduling, burst, frames)).unwrap();
            let csp = Client::connect_csp(e.csp_addr(), "line-rate-csp").unwrap();
            let su = Client::connect_su(e.su_addr(), SU1, "line-rate-su").unwrap();
            let streams = (
                csp.stream().try_clone().unwrap(),
                su.stream().try_clone().unwrap(),
            );
            engine = Some((e, csp, su));
            streams
        }
    };
    csp.set_nodelay(true).unwrap();
    su.set_nodelay(true).unwrap();
    let back = common::drain(&csp);
    let reader = su_reader(su.try_clone().unwrap(), su, frames);
    let mut csp_write = csp;
    let chunk = FRAMES_PER_WRITE * (HEADER_LEN + PAYLOAD_LEN);
    let started = Instant::now();
    for part in bytes.chunks(chunk) {
        csp_write.write_all(part).unwrap();
    }
    reader.join().unwrap();
    let elapsed = started.elapsed();
    let _ = csp_write.shutdown(std::net::Shutdown::Both);
    if let Some(h) = forwarder {
        let _ = h.join();
    }
    if let Some((e, csp, su)) = engine {
        drop((csp, su));
        e.shutdown();
        e.join();
    }
    let _ = back.join();
    for durability in ["none", "batch"] {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!(
            "dsplane-bench-line-rate-{durability}-{}",
            std::process::id()
        )));
    }
    frames as f64 / elapsed.as_secs_f64()
}

fn main() {
    let args = common::bench_args();
    let quick = args.iter().any(|a| a == "--quick");
    let mut numbers = args.iter().filter_map(|a| a.parse::<usize>().ok());
    let (frames, runs) = if quick {
        (20_000, 1)
    } else {
        (
            numbers.next().unwrap_or(2_000_000),
            numbers.next().unwrap_or(3),
        )
    };
    let bytes = csp_bytes(frames);
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); CONTENDERS.len()];
    // LINE_RATE_ONLY=substring runs only the contenders whose name contains it (for profiling).
    let only = std::env::var("LINE_RATE_ONLY").unwrap_or_default();
    for _ in 0..runs {
        for (i, c) in CONTENDERS.iter().enumerate() {
            if !c.name.contains(only.as_str()) {
                results[i].push(f64::NAN);
                continue;
            }
            results[i].push(run(*c, &bytes, frames));
        }
    }
    let null = common::median(&mut results[0].clone());
    println!("{frames} frames of {PAYLOAD_LEN} B, {runs} runs each, interleaved");
    println!(
        "{:<28} {:>12} {:>24} {:>8}",
        "contender", "median/s", "range", "× null"
    );
    for (c, r) in CONTENDERS.iter().zip(&mut results) {
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(0.0, f64::max);
        let m = common::median(r);
        println!(
            "{:<28} {:>10.2} M {:>9.2}–{:<9.2} M {:>7.3}×",
            c.name,
            m / 1e6,
            lo / 1e6,
            hi / 1e6,
            m / null
        );
    }
}

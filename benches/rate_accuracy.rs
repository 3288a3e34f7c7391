//! Rate accuracy: how close one Service User's delivered rate is to its configured `[delivery]
//! rate` when its queue never runs dry, at 10 k, 100 k and 1 M frames/s with `burst = 100`.
//!
//! The comparison is with the configured rate itself (the error in %), which is the target: the
//! worker's sleep, not the machine's speed, is what is measured, as long as the engine can carry
//! the rate at all (`benches/line_rate.rs`: well over 1 M/s with `burst = 100`).
//!
//! * The engine: `cores = 2`, durability `none` (the disk is not what is measured), `burst = 100`,
//!   `window = 65536` (never the limit: the SU ACKs after every read), `release_start = 1.0` (no
//!   ramp), the NMS sized to hold the preload.
//! * The CSP preloads the SU's queue while the SU is away: rate × (skip + window + 0.4 s)
//!   RESPONSEs with 128-byte payloads, in writes of 256 frames, and waits for its last ACK. More
//!   than the rate drains while the SU is measured, so the queue is never empty.
//! * The SU then connects (its own HELLO, so no byte is read by anyone else), reads up to 1 MiB
//!   at a time, counts the data frames in it, ACKs cumulatively after each read, and notes
//!   (time, frames so far) after each read.
//! * The delivered rate is taken between the first read at least `SKIP` after the first frame
//!   (the first burst and the start-up are left out) and the last read within `WINDOW` after that.
//!
//! Two contenders, beside each other: the worker's timer as shipped (a timerfd,
//! `crates/engine/src/timer.rs`) and its fallback (millisecond poll timeouts and short spins,
//! forced with `DSPLANE_TIMER=poll`). Each (contender, rate) runs `RUNS` times, interleaved within
//! each round so that the machine's slow spells fall on all of them. Printed per contender and
//! rate: the median and range over the runs, the median's error against the configured rate, and
//! the CPU time of the engine's workers (both together, % of one core, median) from the SU's
//! HELLO to its last read.
//!
//! Usage: `cargo bench --bench rate_accuracy -- [RUNS]` (default 5). `--quick` runs once with a
//! 300 ms window, as a smoke test; other arguments (`cargo bench` passes `--bench`) are ignored.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, Role, HEADER_LEN};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const SU_TOKEN: &str = "rate-accuracy-su";
const CSP_TOKEN: &str = "rate-accuracy-csp";
const RATES: [u32; 3] = [10_000, 100_000, 1_000_000];
const BURST: u32 = 100;
const WINDOW_FRAMES: u32 = 65_536;
const PAYLOAD_LEN: usize = 128;
const FRAMES_PER_WRITE: u64 = 256;
const SU_READ_BYTES: usize = 1 << 20;
/// Left out at the start of each measurement: the first burst and the connection's start-up.
const SKIP: Duration = Duration::from_millis(100);
/// Preloaded beyond what skip + window need, so that the queue is never empty.
const PRELOAD_MARGIN: Duration = Duration::from_millis(400);

fn data_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "dsplane-bench-rate-accuracy-{}",
        std::process::id()
    ))
}

fn engine_config(rate: u32, nms: u64) -> Config {
    let dir = data_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        r#"
[engine]
cores = 2
levels = 4
durability = "none"
data_dir = "{}"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
rate = {rate}
burst = {BURST}
window = {WINDOW_FRAMES}
nms_per_su = {nms}
nms_total = {nms}
release_start = 1.0
[[service_user]]
id = "{SU1}"
token = "{SU_TOKEN}"
[[csp]]
name = "c"
token = "{CSP_TOKEN}"
rate = 10000000
burst = 1000000
"#,
        dir.display()
    );
    Config::from_toml(&text).unwrap()
}

/// RESPONSEs `first ..= last` (msg_ids), each to its own device, over SRVs of every level.
fn csp_bytes(first: u64, last: u64, out: &mut Vec<u8>) {
    out.clear();
    common::responses(&[SU1], first..=last, 0, PAYLOAD_LEN, out);
}

/// Sends `frames` RESPONSEs for the SU and returns once the engine has ACKed the last one.
fn preload(engine: &Engine, frames: u64) -> Client {
    let mut csp = Client::connect_csp(engine.csp_addr(), CSP_TOKEN).unwrap();
    let mut write = csp.stream().try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(FRAMES_PER_WRITE as usize * (HEADER_LEN + PAYLOAD_LEN));
        let mut next = 1;
        while next <= frames {
            let last = (next + FRAMES_PER_WRITE - 1).min(frames);
            csp_bytes(next, last, &mut buf);
            write.write_all(&buf).unwrap();
            next = last + 1;
        }
    });
    csp.wait_ack(frames, Duration::from_secs(60)).unwrap();
    writer.join().unwrap();
    csp
}

/// The SU: connects with its own HELLO, then reads, counts and ACKs until `until` after its
/// first data frame. Returns (time, data frames so far) after each read.
fn su_measure(engine: &Engine, until: Duration) -> Vec<(Instant, u64)> {
    let mut stream = TcpStream::connect(engine.su_addr()).unwrap();
    stream.set_nodelay(true).unwrap();
    let hello = Frame::hello(Role::Su, SU1, SU_TOKEN).unwrap();
    stream.write_all(&hello.header_bytes()).unwrap();
    stream.write_all(&hello.payload).unwrap();
    let mut samples = Vec::with_capacity(1 << 20);
    let mut buf = vec![0u8; SU_READ_BYTES];
    let mut parse = common::SuParse::default();

    let mut first: Option<Instant> = None;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let at = Instant::now();
        let last = parse.take(&buf[..n]);
        let count = parse.count;
        if let Some(msg_id) = last {
            stream
                .write_all(&Frame::ack(msg_id).header_bytes())
                .unwrap();
            let start = *first.get_or_insert(at);
            samples.push((at, count));
            if at - start >= until {
                break;
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    samples
}

/// The delivered rate, frames/s, between the first read `SKIP` after the first frame and the
/// last read within `window` after that.
fn delivered_rate(samples: &[(Instant, u64)], window: Duration) -> f64 {
    let t0 = samples[0].0;
    let from = samples.iter().position(|s| s.0 - t0 >= SKIP).unwrap();
    let to = samples
        .iter()
        .rposition(|s| s.0 - samples[from].0 <= window)
        .unwrap();
    let (a, b) = (samples[from], samples[to]);
    (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64()
}

/// CPU time so far of this process's engine workers, in clock ticks (1/100 s on Linux).
fn worker_cpu_ticks() -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("dsplane-worker") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // After the command's ")": state is field 3, utime 14 and stime 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ticks
}

/// The timer a contender's engine uses, as its workers read it from the environment.
#[derive(Debug, Clone, Copy)]
struct Contender {
    name: &'static str,
    dsplane_timer: &'static str,
}

const CONTENDERS: [Contender; 2] = [
    Contender {
        name: "timerfd",
        dsplane_timer: "timerfd",
    },
    Contender {
        name: "poll fallback",
        dsplane_timer: "poll",
    },
];

/// One run at `rate`: the delivered rate, frames/s, and the workers' CPU, % of one core.
fn run(contender: Contender, rate: u32, window: Duration) -> (f64, f64) {
    // Read by each worker as it starts; no engine is running now.
    std::env::set_var("DSPLANE_TIMER", contender.dsplane_timer);
    let frames = (f64::from(rate) * (SKIP + window + PRELOAD_MARGIN).as_secs_f64()) as u64;
    let engine = Engine::start(engine_config(rate, frames + 1_000)).unwrap();
    let csp = preload(&engine, frames);
    let (cpu_from, from) = (worker_cpu_ticks(), Instant::now());
    let samples = su_measure(&engine, SKIP + window);
    let cpu = (worker_cpu_ticks() - cpu_from) as f64 / from.elapsed().as_secs_f64();
    drop(csp);
    engine.shutdown();
    engine.join();
    let _ = std::fs::remove_dir_all(data_dir());
    (delivered_rate(&samples, window), cpu)
}

fn main() {
    let args = common::bench_args();
    let quick = args.iter().any(|a| a == "--quick");
    let (runs, window) = if quick {
        (1, Duration::from_millis(300))
    } else {
        let runs = args.iter().find_map(|a| a.parse::<usize>().ok());
        (runs.unwrap_or(5), Duration::from_secs(1))
    };
    // Other work on the machine takes the workers' CPU and loses tokens: say how busy it was.
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut results: Vec<Vec<Vec<(f64, f64)>>> = vec![vec![Vec::new(); RATES.len()]; 2];
    for _ in 0..runs {
        for (c, contender) in CONTENDERS.iter().enumerate() {
            for (i, &rate) in RATES.iter().enumerate() {
                results[c][i].push(run(*contender, rate, window));
            }
        }
    }
    println!(
        "burst {BURST}, window {WINDOW_FRAMES}, {PAYLOAD_LEN} B payloads; {runs} runs per rate, \
         interleaved; measured over {} ms after the first {} ms",
        window.as_millis(),
        SKIP.as_millis()
    );
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = |l: &str| l.split_whitespace().next().unwrap_or("?").to_owned();
    println!(
        "load average (1 min) {} before, {} after, on {} CPUs",
        load(&load_before),
        load(&load_after),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<18} {:>10} {:>12} {:>25} {:>8} {:>6}   runs",
        "", "rate/s", "median/s", "range/s", "error", "cpu%"
    );
    for (contender, by_rate) in CONTENDERS.iter().zip(&results) {
        for (&rate, r) in RATES.iter().zip(by_rate) {
            let mut rates: Vec<f64> = r.iter().map(|x| x.0).collect();
            let mut cpu: Vec<f64> = r.iter().map(|x| x.1).collect();
            let each: Vec<String> = rates.iter().map(|x| format!("{x:.0}")).collect();
            let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rates.iter().copied().fold(0.0, f64::max);
            let m = common::median(&mut rates);
            let error = (m / f64::from(rate) - 1.0) * 100.0;
            println!(
                "RATE {:<13} {:>10} {:>12.0} {:>12.0}–{:<12.0} {:>+7.2}% {:>6.0}   {}",
                contender.name,
                rate,
                m,
                lo,
                hi,
                error,
                common::median(&mut cpu),
                each.join(" ")
            );
        }
    }
}

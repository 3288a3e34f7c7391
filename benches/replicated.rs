//! Durability `replicated` beside `batch` (issue 17's measurement), in one run: how many frames
//! a second the engine ACKs when an ACK means "committed in PostgreSQL" against "`fdatasync`ed
//! to the local WAL".
//!
//! * One CSP connection sends `FRAMES` RESPONSE frames (128-byte payloads) in writes of 256
//!   frames, keeping at most `CSP_WINDOW` (65,536) unacknowledged, as a CSP's link would; a
//!   thread reads the engine's ACKs and stops the clock at the ACK of the last frame. A NACK
//!   spoils the run (it is counted and printed). Without the window a CSP that writes faster
//!   than PostgreSQL commits fills the worker's bound on uncommitted frames
//!   (`REPLICATED_UNCOMMITTED_FRAMES_MAX`) and is refused with NACK 5, as it should be.
//! * One connected SU reads, parses and sends one cumulative ACK per read, so delivered frames
//!   are deleted from the log as they would be in service (the replicated store's deletes ride
//!   in the same group commits as its appends).
//! * `batch`: the engine on its own, the local WAL on this machine's disk.
//! * `replicated`: a node of a cluster (the same engine behind the lease) on a PostgreSQL of the
//!   bench's own (`initdb` in a temporary directory, `fsync = on`, local socket over TCP
//!   loopback), one committer per worker.
//! * Both: `cores = 2`, `flush_interval_ms = 2`, the NMS sized to hold the run.
//!
//! Each contender runs `RUNS` times, interleaved; the median, range and ratio are printed.
//!
//! Usage: `cargo bench --bench replicated -- [FRAMES] [RUNS]` (default 500,000 and 3); `--quick`
//! runs 20,000 frames once.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::cluster::Node;
use dsplane::engine::Engine;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, Header, Kind, HEADER_LEN, PAYLOAD_BYTES_MAX_DEFAULT};
use dsplane_cluster::testing::TempPostgres;

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const PAYLOAD_LEN: usize = 128;
const FRAMES_PER_WRITE: usize = 256;
/// Frames the CSP keeps in flight (sent, not yet ACKed).
const CSP_WINDOW: u64 = 65_536;

fn config(durability: &str, frames: usize, cluster: Option<&str>, run: usize) -> Config {
    let dir = std::env::temp_dir().join(format!(
        "dsplane-bench-replicated-{durability}-{}-{run}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let nms = frames + 1_000;
    let cluster = cluster.map_or_else(String::new, |c| {
        format!("[cluster]\nnode = \"bench\"\npostgres = \"{c}\"\nlease_ms = 2000\n")
    });
    let text = format!(
        r#"
[engine]
cores = 2
durability = "{durability}"
flush_interval_ms = 2
data_dir = "{}"
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
[[service_user]]
id = "{SU1}"
token = "bench-su"
[[csp]]
name = "c"
token = "bench-csp"
rate = 10000000
burst = 1000000
{cluster}
"#,
        dir.display()
    );
    Config::from_toml(&text).unwrap()
}

/// Reads the engine's answers on the CSP connection until the ACK of `last`; returns when it
/// came, and how many NACKs came before it.
fn ack_reader(
    mut stream: TcpStream,
    last: u64,
    acked: Arc<AtomicU64>,
) -> JoinHandle<(Instant, u64)> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        let mut nacks = 0;
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => panic!("the engine closed the CSP's connection"),
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            let mut at = 0;
            while let Some(head) = pending.get(at..at + HEADER_LEN) {
                let h =
                    Header::decode(head.try_into().unwrap(), PAYLOAD_BYTES_MAX_DEFAULT).unwrap();
                let len = HEADER_LEN + h.payload_len as usize;
                if pending.len() < at + len {
                    break;
                }
                if h.kind == Kind::Ack {
                    acked.fetch_max(h.msg_id, Ordering::Release);
                }
                match h.kind {
                    Kind::Ack if h.msg_id >= last => return (Instant::now(), nacks),
                    Kind::Nack => nacks += 1,
                    _ => {}
                }
                at += len;
            }
            pending.drain(..at);
        }
    })
}

/// The SU: parses what it reads and ACKs it.
fn su_reader(mut read: TcpStream, mut write: TcpStream, frames: usize) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut parse = common::SuParse::default();
        while (parse.count as usize) < frames {
            let n = match read.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let Some(msg_id) = parse.take(&buf[..n]) {
                let _ = write.write_all(&Frame::ack(msg_id).header_bytes());
            }
        }
    })
}

/// One run: frames ACKed per second, and NACKs.
fn run(replicated: Option<&TempPostgres>, bytes: &[u8], frames: usize, n: usize) -> (f64, u64) {
    let (durability, conninfo) = match replicated {
        Some(pg) => ("replicated", Some(pg.conninfo())),
        None => ("batch", None),
    };
    let config = config(durability, frames, conninfo.as_deref(), n);
    let (engine, node, csp_addr, su_addr) = if replicated.is_some() {
        let (su, csp) = (config.listen.su, config.listen.csp);
        let node = Node::start(config).unwrap();
        (None, Some(node), csp, su)
    } else {
        let e = Engine::start(config).unwrap();
        let (csp, su) = (e.csp_addr(), e.su_addr());
        (Some(e), None, csp, su)
    };
    let (csp_addrs, su_addrs) = if let Some(node) = &node {
        // Port 0 is bound by the active's engine; the node knows it once active.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(addrs) = node.engine_addrs() {
                break (vec![addrs.1], vec![addrs.0]);
            }
            assert!(Instant::now() < deadline, "the node never became active");
            std::thread::sleep(Duration::from_millis(10));
        }
    } else {
        (vec![csp_addr], vec![su_addr])
    };
    let csp = Client::connect_any_csp(&csp_addrs, "bench-csp", Duration::from_secs(10)).unwrap();
    let su = Client::connect_any_su(&su_addrs, SU1, "bench-su", Duration::from_secs(10)).unwrap();
    let (csp_stream, su_stream) = (
        csp.stream().try_clone().unwrap(),
        su.stream().try_clone().unwrap(),
    );
    csp_stream.set_nodelay(true).unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let acks = ack_reader(
        csp_stream.try_clone().unwrap(),
        frames as u64,
        Arc::clone(&acked),
    );
    let reader = su_reader(su_stream.try_clone().unwrap(), su_stream, frames);
    let mut write = csp_stream;
    let started = Instant::now();
    for (i, part) in bytes
        .chunks(FRAMES_PER_WRITE * (HEADER_LEN + PAYLOAD_LEN))
        .enumerate()
    {
        let sent = (i * FRAMES_PER_WRITE) as u64;
        while sent.saturating_sub(acked.load(Ordering::Acquire)) >= CSP_WINDOW {
            std::thread::sleep(Duration::from_micros(200));
        }
        write.write_all(part).unwrap();
    }
    let (acked_at, nacks) = acks.join().unwrap();
    let elapsed = acked_at - started;
    reader.join().unwrap();
    drop((csp, su, write));
    if let Some(e) = engine {
        e.shutdown();
        e.join();
    }
    if let Some(node) = node {
        node.stopper().stop();
        node.join();
    }
    (frames as f64 / elapsed.as_secs_f64(), nacks)
}

fn main() {
    if let Ok(filter) = std::env::var("DSPLANE_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let args = common::bench_args();
    let quick = args.iter().any(|a| a == "--quick");
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let frames = if quick {
        20_000
    } else {
        numbers.first().copied().unwrap_or(500_000)
    };
    let runs = if quick {
        1
    } else {
        numbers.get(1).copied().unwrap_or(3)
    };
    let Some(pg) = TempPostgres::start("bench-replicated") else {
        eprintln!("replicated: PostgreSQL is not installed; nothing measured");
        return;
    };
    let mut bytes = Vec::with_capacity(frames * (HEADER_LEN + PAYLOAD_LEN));
    common::responses(&[SU1], 1..=frames as u64, 0, PAYLOAD_LEN, &mut bytes);
    let mut batch = Vec::new();
    let mut replicated = Vec::new();
    let mut nacks = 0;
    for n in 0..runs {
        let (r, k) = run(None, &bytes, frames, n);
        batch.push(r);
        nacks += k;
        let (r, k) = run(Some(&pg), &bytes, frames, n);
        replicated.push(r);
        nacks += k;
    }
    let show = |name: &str, v: &mut Vec<f64>| {
        let lo = v.iter().copied().fold(f64::MAX, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        let med = common::median(v);
        println!("{name:<12} median {med:>10.0} frames/s  range [{lo:.0} – {hi:.0}]  ({runs} runs of {frames})");
        med
    };
    let b = show("batch", &mut batch);
    let r = show("replicated", &mut replicated);
    println!("replicated / batch: {:.3}; NACKs: {nacks}", r / b);
}

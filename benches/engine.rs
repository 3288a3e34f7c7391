//! End to end: northbound messages per second through the engine over loopback, 128-byte
//! payloads, with strict priority and with FIFO scheduling (`[engine] scheduling = "fifo"`),
//! beside a null forwarder, in the same run.
//!
//! The null forwarder is the limit of this machine for this traffic: one thread that reads bytes
//! from the CSP's socket and writes them straight to the SU's socket (no parsing, no HELLO, no
//! ACKs, no queues). Against it, the engine runs with `durability = "none"`, 2 workers, and the
//! SU's rate, burst and window at their maxima, so that neither the log nor the limiter is the
//! bottleneck: what is measured is the dataplane itself (decode, classify, admit, ring, schedule,
//! encode, vectored write) plus the ACKs each way.
//!
//! The traffic is the same for every contender: a CSP sends batches of 1,000 frames (70 %
//! RESPONSEs over SRVs of every level, 30 % DEVICE_ALERTs, 3 % of them high priority; each to a
//! different device, so no storm rule could apply), keeping at most 8 batches ahead of what the
//! SU has received; the SU reads everything and ACKs every 256 frames. The CSP's own socket is
//! drained by a thread of its own, so the engine's ACKs never back up. One iteration is one
//! batch; a measurement ends when the SU has received every frame sent.
//!
//! Target (issue 7): the engine ≥ 0.7× the null forwarder.
//!
//! Run: `cargo bench --bench engine`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Ratios, Rng};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const BATCH: u64 = 1_000;
/// Batches the CSP may be ahead of what the SU has received.
const BATCHES_AHEAD: u64 = 8;
const PAYLOAD_LEN: usize = 128;
const SAMPLES: usize = 10;

/// The engine under test, or the null forwarder.
enum Target {
    Engine(Engine),
    Null(JoinHandle<()>),
}

struct Running {
    target: Option<Target>,
    csp: Option<Client>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    sent: u64,
    rng: Rng,
    payload: Bytes,
}

fn engine_config(scheduling: &str) -> Config {
    let dir = std::env::temp_dir().join(format!(
        "dsplane-bench-engine-{scheduling}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        r#"
[engine]
cores = 2
levels = 4
durability = "none"
data_dir = "{}"
scheduling = "{scheduling}"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
rate = 10000000
burst = 1000000
window = 65536
window_reserved_top = 8
nms_per_su = 1000000
nms_total = 1000000
release_start = 1.0
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su"
[[csp]]
name = "c"
token = "csp"
rate = 10000000
burst = 1000000
[priority]
default_level = 4
scheduled_response_level = 4
alert_level = 3
rules = [
  {{ srv = "2.2", level = 1 }},
  {{ srv = "7.*", level = 1 }},
  {{ srv = "8.1.1", level = 2 }},
  {{ srv = "4.1.1", mode = "on-demand", level = 3 }},
]
high_priority_alerts = [{{ code = 0x8F1C, level = 1 }}]
"#,
        dir.display()
    );
    Config::from_toml(&text).unwrap()
}

/// Reads every frame on the SU's connection, counts the data frames and ACKs every 256.
fn su_reader(mut su: Client, received: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = 0;
        let mut since_ack = 0;
        let mut count = 0u64;
        while !stop.load(Ordering::Relaxed) {
            match su.recv(Duration::from_millis(20)) {
                Ok(Some(f)) if f.header.kind.is_data() => {
                    last = f.header.msg_id;
                    count += 1;
                    since_ack += 1;
                    if since_ack >= 256 {
                        let _ = su.ack(last);
                        since_ack = 0;
                        received.store(count, Ordering::Release);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    if since_ack > 0 {
                        let _ = su.ack(last);
                        since_ack = 0;
                    }
                    received.store(count, Ordering::Release);
                }
                Err(_) => return,
            }
            // Publish often enough for the sender's flow control without a store per frame.
            if count.is_multiple_of(64) {
                received.store(count, Ordering::Release);
            }
        }
    })
}

fn start(contender: &str) -> Running {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (target, csp, su) = match contender {
        "null_forwarder" => {
            let (csp_addr, su_addr, handle) = common::null_forwarder(64 * 1024);
            let csp = Client::connect_raw(csp_addr).unwrap();
            let su = Client::connect_raw(su_addr).unwrap();
            (Target::Null(handle), csp, su)
        }
        "dsplane_priority" | "dsplane_fifo" => {
            let scheduling = if contender == "dsplane_fifo" {
                "fifo"
            } else {
                "priority"
            };
            let engine = Engine::start(engine_config(scheduling)).unwrap();
            let csp = Client::connect_csp(engine.csp_addr(), "csp").unwrap();
            let su = Client::connect_su(engine.su_addr(), SU1, "su").unwrap();
            (Target::Engine(engine), csp, su)
        }
        other => unreachable!("no contender {other}"),
    };
    let threads = vec![
        su_reader(su, Arc::clone(&received), Arc::clone(&stop)),
        common::drain(csp.stream()),
    ];
    Running {
        target: Some(target),
        csp: Some(csp),
        received,
        stop,
        threads,
        sent: 0,
        rng: Rng(3),
        payload: Bytes::from(vec![0x5A; PAYLOAD_LEN]),
    }
}

impl Running {
    fn frame(&mut self) -> Frame {
        // (SRV, mode byte): levels 1, 1, 2, 3 and the default 4 under the rules above.
        const SRVS: [(Srv, u8); 5] = [
            (Srv::new(2, 2, 0), 0),
            (Srv::new(7, 1, 0), 0),
            (Srv::new(8, 1, 1), 0),
            (Srv::new(4, 1, 1), 0),
            (Srv::new(6, 2, 1), 1),
        ];
        let rng = &mut self.rng;
        let mut h = if rng.below(100) < 70 {
            let mut h = Header::new(Kind::Response);
            let (srv, mode) = SRVS[rng.below(SRVS.len() as u64) as usize];
            h.srv = srv;
            h.mode = mode;
            h.counter = rng.next() >> 16;
            h
        } else {
            let mut h = Header::new(Kind::DeviceAlert);
            h.alert_code = if rng.below(100) < 3 {
                0x8F1C
            } else {
                0x8F00 | rng.below(0x70) as u16
            };
            h
        };
        h.su_id = SU1;
        h.device_id = Eui64(rng.next());
        Frame::new(h, self.payload.clone()).unwrap()
    }

    fn send_batch(&mut self) {
        let frames: Vec<Frame> = (0..BATCH).map(|_| self.frame()).collect();
        // End-to-end flow control, the same for every contender: stay at most 8 batches
        // ahead of what the SU has received.
        let ahead = BATCHES_AHEAD * BATCH;
        while self
            .sent
            .saturating_sub(self.received.load(Ordering::Acquire))
            > ahead
        {
            // Sleep, not yield: on 2 cores a yielding sender takes the CPU the engine's workers
            // need (a quarter of all samples in a profile of this bench).
            std::thread::sleep(Duration::from_micros(100));
        }
        self.csp.as_mut().unwrap().send_batch(frames).unwrap();
        self.sent += BATCH;
    }

    fn wait_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.received.load(Ordering::Acquire) < self.sent {
            assert!(
                Instant::now() < deadline,
                "frames lost: the SU never got them"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the CSP ends the null forwarder, which closes the SU.
        if let Some(csp) = self.csp.take() {
            let _ = csp.stream().shutdown(std::net::Shutdown::Both);
        }
        match self.target.take() {
            Some(Target::Engine(e)) => {
                e.shutdown();
                e.join();
            }
            Some(Target::Null(handle)) => {
                let _ = handle.join();
            }
            None => {}
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn northbound(c: &mut Criterion) {
    let label = "northbound_128B";
    let mut ratios = Ratios::new(label, BATCH, SAMPLES);
    let mut group = c.benchmark_group(label);
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(SAMPLES);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    for contender in ["dsplane_priority", "dsplane_fifo", "null_forwarder"] {
        let mut running = start(contender);
        group.bench_function(contender, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    running.send_batch();
                }
                running.wait_all();
                ratios.record(contender, iters, t.elapsed())
            })
        });
        drop(running);
    }
    group.finish();
    ratios.print(&[
        ("dsplane_priority", "null_forwarder"),
        ("dsplane_fifo", "null_forwarder"),
        ("dsplane_priority", "dsplane_fifo"),
    ]);
    for name in ["dsplane_priority", "dsplane_fifo", "null_forwarder"] {
        if let Some(s) = ratios.summary(name) {
            println!(
                "RATE  {label}/{name}: median {:.0} messages/s, range {:.0}-{:.0}",
                1e9 / s.median,
                1e9 / s.max,
                1e9 / s.min
            );
        }
    }
}

criterion_group!(benches, northbound);
criterion_main!(benches);

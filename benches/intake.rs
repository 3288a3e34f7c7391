//! Intake throughput with `durability = "batch"` (group commit: ACK after `fdatasync`) against
//! `none` (ACK on intake), in the same run: issue 4's goal is batch ≥ 0.5× none.
//!
//! A CSP sends 100-byte alerts in batches of 1,000, keeping up to 8 batches unacknowledged (a
//! sender that waits for each ACK before sending more measures the flush latency, not intake);
//! a Service User takes and acknowledges everything, so frames flow through and the log's
//! segments are reclaimed as they go.
//!
//! Run: `cargo bench --bench intake`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, Header, Kind};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const BATCH: u64 = 1_000;
/// Batches sent ahead of their ACKs.
const BATCHES_IN_FLIGHT: usize = 8;

struct Running {
    /// The engine's data directory, removed when it stops (a run of `none` leaves gigabytes of
    /// SURB in it).
    dir: std::path::PathBuf,
    engine: Option<Engine>,
    csp: Client,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    next: u64,
    in_flight: std::collections::VecDeque<u64>,
}

fn start(durability: &str) -> Running {
    let dir = std::env::temp_dir().join(format!(
        "dsplane-bench-intake-{durability}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
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
window_reserved_top = 8
release_start = 1.0
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su"
[[csp]]
name = "c"
token = "csp"
"#,
        dir.display()
    );
    let engine = Engine::start(Config::from_toml(&text).unwrap()).unwrap();
    let csp = Client::connect_csp(engine.csp_addr(), "csp").unwrap();
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let reader = std::thread::spawn(move || {
        let mut last = 0;
        let mut since_ack = 0;
        while !stop2.load(Ordering::Relaxed) {
            match su.recv(Duration::from_millis(20)) {
                Ok(Some(f)) if f.header.kind.is_data() => {
                    last = f.header.msg_id;
                    since_ack += 1;
                    if since_ack >= 256 {
                        let _ = su.ack(last);
                        since_ack = 0;
                    }
                }
                Ok(_) => {
                    if since_ack > 0 {
                        let _ = su.ack(last);
                        since_ack = 0;
                    }
                }
                Err(_) => return,
            }
        }
    });
    Running {
        dir,
        engine: Some(engine),
        csp,
        stop,
        reader: Some(reader),
        next: 0,
        in_flight: std::collections::VecDeque::new(),
    }
}

impl Running {
    fn send_batch(&mut self) {
        let payload = Bytes::from_static(&[0x5A; 100]);
        let start = self.next;
        let frames = (start..start + BATCH).map(|i| {
            let mut h = Header::new(Kind::DeviceAlert);
            h.su_id = SU1;
            // A device each: a storm would be throttled, not taken in.
            h.device_id = Eui64(i);
            h.counter = i;
            Frame::new(h, payload.clone()).unwrap()
        });
        let last = self.csp.send_batch(frames).unwrap();
        self.in_flight.push_back(last);
        self.next += BATCH;
        if self.in_flight.len() > BATCHES_IN_FLIGHT {
            self.wait_oldest();
        }
    }

    fn wait_oldest(&mut self) {
        if let Some(id) = self.in_flight.pop_front() {
            let others = self.csp.wait_ack(id, Duration::from_secs(60)).unwrap();
            assert!(others.is_empty(), "refused: {:?}", others.first());
        }
    }

    fn wait_all(&mut self) {
        if let Some(&last) = self.in_flight.back() {
            self.in_flight.clear();
            let others = self.csp.wait_ack(last, Duration::from_secs(60)).unwrap();
            assert!(others.is_empty(), "refused: {:?}", others.first());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if let Some(e) = self.engine.take() {
            e.shutdown();
            e.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn intake(c: &mut Criterion) {
    let mut group = c.benchmark_group("intake");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    for durability in ["none", "batch"] {
        let mut running = start(durability);
        group.bench_function(durability, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    running.send_batch();
                }
                running.wait_all();
                t.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, intake);
criterion_main!(benches);

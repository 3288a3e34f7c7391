//! Intake against full rings, on a real engine whose rings hold 8 frames a level: a CSP's read
//! batch (hundreds of frames) never fits, so intake holds what did not go in, stops reading the
//! connection, and ACKs only the frames before the first one held until the rest are in. Every
//! frame still reaches the SU, once and in the order sent (within its level), and the CSP's last ACK covers them
//! all, with durability `none` (ACK once in the ring) and `batch` (ACK once durable).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const FRAMES: u64 = 20_000;
const RING_FRAMES_PER_LEVEL: usize = 8;
const T: Duration = Duration::from_secs(30);

fn config(durability: &str, dir: &std::path::Path) -> Config {
    let text = format!(
        r#"
[engine]
cores = 2
data_dir = "{}"
durability = "{durability}"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
rate = 1000000
burst = 100000
window = 65536
nms_per_su = 100000
nms_total = 100000
release_start = 1.0
[[service_user]]
id = "{SU1}"
token = "su1-token"
[[csp]]
name = "csp-a"
token = "csp-token"
"#,
        dir.display()
    );
    Config::from_toml(&text).unwrap()
}

/// RESPONSEs (with no recorded request, so all at the level of their fallback rule); the counter
/// says the order they were sent in.
fn frames() -> Vec<Frame> {
    let srvs: [Srv; 4] = [
        Srv::new(2, 2, 0),
        Srv::new(8, 1, 1),
        Srv::new(4, 1, 1),
        Srv::new(6, 2, 1),
    ];
    (1..=FRAMES)
        .map(|i| {
            let mut h = Header::new(Kind::Response);
            h.su_id = SU1;
            h.device_id = Eui64(i);
            h.counter = i;
            h.srv = srvs[i as usize % srvs.len()];
            Frame::new(h, Bytes::from(vec![7u8; 8])).unwrap()
        })
        .collect()
}

fn run(durability: &str) {
    let dir = std::env::temp_dir().join(format!(
        "dsplane-ring-full-{durability}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = Engine::start_with_rings(config(durability, &dir), RING_FRAMES_PER_LEVEL).unwrap();
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let reader = std::thread::spawn(move || {
        // The counters seen per level, in arrival order.
        let mut by_level: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
        let mut seen = 0;
        let deadline = Instant::now() + T;
        while seen < FRAMES && Instant::now() < deadline {
            let Some(f) = su.recv(Duration::from_secs(5)).unwrap() else {
                break;
            };
            if f.header.kind != Kind::Response {
                continue;
            }
            by_level
                .entry(f.header.priority)
                .or_default()
                .push(f.header.counter);
            seen += 1;
            su.ack(f.header.msg_id).unwrap();
        }
        (seen, by_level)
    });
    let last = csp.send_batch(frames()).unwrap();
    assert_eq!(last, FRAMES);
    csp.wait_ack(last, T).unwrap();
    assert_eq!(csp.acked(), FRAMES, "the last ACK covers every frame");
    let (seen, by_level) = reader.join().unwrap();
    assert_eq!(seen, FRAMES, "every frame reached the SU");
    let mut all: Vec<u64> = by_level.values().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len() as u64, FRAMES, "no frame twice, none missing");
    for (level, counters) in &by_level {
        assert!(
            counters.windows(2).all(|w| w[0] < w[1]),
            "level {level} out of order"
        );
    }
    engine.shutdown();
    engine.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn full_rings_hold_frames_and_ack_them_once_in_with_durability_none() {
    run("none");
}

#[test]
fn full_rings_hold_frames_and_ack_them_once_durable_with_durability_batch() {
    run("batch");
}

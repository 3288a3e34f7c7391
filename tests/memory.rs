//! Memory stays bounded whatever the backlog (ENGINE.md §2): frames for an absent Service User
//! beyond its NMS share go to disk, so queuing 2 million of them must not raise the process's
//! peak resident memory by more than the NMS budget plus a fixed overhead.
//!
//! Debug builds queue 200,000 frames (to keep `cargo test` quick); `.ci/run` runs this file in
//! release with the full 2,000,000.

use std::time::Duration;

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, Header, Kind};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const NMS_PER_SU: u64 = 10_000;
/// What one frame held in the NMS may cost, generously: the frame, its bookkeeping, its
/// payload copy and allocator slack.
const NMS_BYTES_PER_FRAME: u64 = 1_024;
/// Everything that does not grow with the backlog: buffers, the write-ahead log's write
/// buffer, per-connection state, allocator arenas.
const FIXED_OVERHEAD_BYTES: u64 = 48 << 20;

/// `VmHWM` (peak resident set) or `VmRSS` of this process, bytes.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Resets the peak so that it measures from here (Linux ≥ 4.0: write 5 to clear_refs).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[test]
fn two_million_frames_for_an_absent_su_stay_within_the_nms_budget() {
    let frames: u64 = if cfg!(debug_assertions) {
        200_000
    } else {
        2_000_000
    };
    let dir = std::env::temp_dir().join(format!("dsplane-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        r#"
[engine]
cores = 2
durability = "none"
data_dir = "{}"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
rate = 1000000
burst = 100000
release_start = 1.0
nms_per_su = {NMS_PER_SU}
nms_total = {NMS_PER_SU}
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"
[[csp]]
name = "csp-a"
token = "csp-token"
"#,
        dir.display()
    );
    let engine = Engine::start(Config::from_toml(&text).unwrap()).unwrap();
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let payload = Bytes::from(vec![0x5A; 100]);
    let frame = |i: u64| {
        // Responses: alerts would also fill the storm detector's table, which has its own
        // bound (`max_tracked_keys`, 40 bytes a key: docs/storm.md) measured on its own.
        let mut h = Header::new(Kind::Response);
        h.su_id = SU1;
        h.device_id = Eui64(i);
        h.counter = i;
        Frame::new(h, payload.clone()).unwrap()
    };
    // Warm up (connections, buffers, the first NMS share), then measure from here.
    let warm = csp.send_batch((0..NMS_PER_SU).map(frame)).unwrap();
    assert!(csp
        .wait_ack(warm, Duration::from_secs(60))
        .unwrap()
        .is_empty());
    let baseline = status_kib("VmRSS:");
    let peak_reset = reset_peak();
    let batch = 5_000;
    let mut sent = NMS_PER_SU;
    while sent < frames {
        let n = batch.min(frames - sent);
        let last = csp.send_batch((sent..sent + n).map(frame)).unwrap();
        let nacks = csp.wait_ack(last, Duration::from_secs(60)).unwrap();
        assert!(nacks.is_empty(), "refused: {:?}", nacks.first());
        sent += n;
    }
    let peak = status_kib(if peak_reset { "VmHWM:" } else { "VmRSS:" });
    let growth = peak.saturating_sub(baseline);
    let budget = NMS_PER_SU * NMS_BYTES_PER_FRAME + FIXED_OVERHEAD_BYTES;
    println!(
        "{frames} frames queued for an absent SU: resident {} MiB at the start, peak {} MiB, growth {} MiB (budget {} MiB)",
        baseline >> 20,
        peak >> 20,
        growth >> 20,
        budget >> 20
    );
    assert!(growth <= budget, "grew {growth} bytes, budget {budget}");

    // And they are all there: the SU gets them back from disk, in order.
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let check = frames.min(30_000);
    let mut next = 0;
    while next < check {
        let f = su.recv(Duration::from_secs(30)).unwrap().expect("frame");
        assert_eq!(f.header.counter, next);
        su.ack(f.header.msg_id).unwrap();
        next += 1;
    }
    engine.shutdown();
    engine.join();
    let _ = std::fs::remove_dir_all(&dir);
}

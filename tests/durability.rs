//! Durability (ENGINE.md §2, §3, §7): what dsplane ACKed survives a restart and a `kill -9`,
//! comes back in priority order with the release ramp, and a torn log tail is cut off.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::{Client, ClientError};
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind};

mod common;

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const T: Duration = Duration::from_secs(20);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsplane-dur-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config_text(data_dir: &Path, durability: &str, delivery: &str) -> String {
    format!(
        r#"
[engine]
cores = 2
data_dir = "{}"
durability = "{durability}"
flush_interval_ms = 2
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
{delivery}
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"
[[csp]]
name = "csp-a"
token = "csp-token"
[priority]
rules = [ {{ srv = "2.2", level = 1 }}, {{ srv = "8.1.1", level = 2 }}, {{ srv = "4.1.1", level = 3 }} ]
"#,
        data_dir.display()
    )
}

fn start(text: &str) -> Engine {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    Engine::start(Config::from_toml(text).unwrap()).unwrap()
}

fn stop(engine: Engine) {
    engine.shutdown();
    engine.join();
}

const SRVS: [(&str, u8); 4] = [("1.1.1", 4), ("4.1.1", 3), ("8.1.1", 2), ("2.2", 1)];

fn response(counter: u64) -> Frame {
    let mut h = Header::new(Kind::Response);
    h.su_id = SU1;
    h.device_id = Eui64(0x00DB_0000_0000_0000 + counter);
    h.srv = SRVS[(counter * 3 % 4) as usize].0.parse::<Srv>().unwrap();
    h.counter = counter;
    let mut payload = counter.to_le_bytes().to_vec();
    payload.extend_from_slice(&[counter as u8; 100]);
    Frame::new(h, Bytes::from(payload)).unwrap()
}

/// The current generation's directory, from `CURRENT` ("generation N" on its second line).
fn current_generation(data_dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(data_dir.join("CURRENT")).unwrap();
    let n = text
        .lines()
        .find_map(|l| l.strip_prefix("generation "))
        .unwrap_or_else(|| panic!("CURRENT: {text}"));
    data_dir.join(format!("gen-{n}"))
}

/// The worker log directories of the current generation.
fn worker_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(current_generation(data_dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The segment files of one worker log, oldest first.
fn segments(worker_dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(worker_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segs.sort();
    segs
}

fn level_of(counter: u64) -> u8 {
    SRVS[(counter * 3 % 4) as usize].1
}

/// Receives until nothing comes for `quiet`, acknowledging everything; returns the frames.
fn drain(su: &mut Client, quiet: Duration) -> Vec<Frame> {
    let mut got = Vec::new();
    loop {
        match su.recv(quiet) {
            Ok(Some(f)) if f.header.kind.is_data() => {
                su.ack(f.header.msg_id).unwrap();
                got.push(f);
            }
            Ok(Some(_)) => {}
            Ok(None) => return got,
            Err(e) => panic!("{e}"),
        }
    }
}

fn assert_priority_order(got: &[Frame]) {
    let order: Vec<(u8, u64)> = got
        .iter()
        .map(|f| (f.header.priority, f.header.counter))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "strict level order, FIFO within level");
    for f in got {
        assert_eq!(f.header.priority, level_of(f.header.counter));
        let c = f.header.counter;
        assert_eq!(&f.payload[..8], c.to_le_bytes(), "payload of {c}");
        assert_eq!(f.payload.len(), 108);
    }
}

#[test]
fn acknowledged_frames_survive_a_restart_and_come_back_in_priority_order() {
    let dir = temp_dir("restart");
    let text = config_text(
        &dir,
        "batch",
        "release_start = 1.0\nrate = 100000\nburst = 10000\nnms_per_su = 100",
    );
    let engine = start(&text);
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let last = csp.send_batch((0..2_000).map(response)).unwrap();
    assert!(csp.wait_ack(last, T).unwrap().is_empty());
    // Half are delivered and acknowledged before the restart.
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let mut first = Vec::new();
    while first.len() < 1_000 {
        let f = su.recv(T).unwrap().unwrap();
        su.ack(f.header.msg_id).unwrap();
        first.push(f);
    }
    // Let the ACKs reach dsplane before it stops.
    std::thread::sleep(Duration::from_millis(300));
    drop(su);
    drop(csp);
    stop(engine);

    let engine = start(&text);
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let second = drain(&mut su, Duration::from_secs(2));
    stop(engine);
    assert_priority_order(&second);
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for f in first.iter().chain(second.iter()) {
        *seen.entry(f.header.counter).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2_000, "every frame delivered");
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    assert_eq!(
        duplicates, 0,
        "acknowledged frames are not re-sent after a clean stop"
    );
}

#[test]
fn a_restart_with_a_backlog_releases_it_in_priority_order_with_the_ramp() {
    let dir = temp_dir("ramp");
    let text = config_text(
        &dir,
        "batch",
        "rate = 200\nburst = 200\nrelease_start = 0.1\nrelease_ramp_s = 10\nnms_per_su = 50",
    );
    let engine = start(&text);
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let last = csp.send_batch((0..1_000).map(response)).unwrap();
    assert!(csp.wait_ack(last, T).unwrap().is_empty());
    drop(csp);
    stop(engine);

    let engine = start(&text);
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let begin = Instant::now();
    let mut got = Vec::new();
    while begin.elapsed() < Duration::from_secs(1) {
        if let Some(f) = su.recv(Duration::from_millis(50)).unwrap() {
            su.ack(f.header.msg_id).unwrap();
            got.push(f);
        }
    }
    stop(engine);
    // Cut to 10 % of the burst (20), then 20/s climbing by 18/s²: ~49 in the first second,
    // where an unramped release would send 200 + 200.
    assert!(
        (30..=80).contains(&got.len()),
        "{} in the first second",
        got.len()
    );
    assert_priority_order(&got);
    assert!(got.iter().all(|f| f.header.priority == 1), "level 1 first");
}

#[test]
fn a_torn_log_tail_is_cut_off_and_everything_before_it_delivered() {
    let dir = temp_dir("torn");
    let text = config_text(
        &dir,
        "sync",
        "release_start = 1.0\nrate = 100000\nburst = 10000",
    );
    let engine = start(&text);
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let last = csp.send_batch((0..200).map(response)).unwrap();
    assert!(csp.wait_ack(last, T).unwrap().is_empty());
    drop(csp);
    stop(engine);
    // A crash in the middle of writing one more record: a prefix that claims a long body.
    let mut torn = 0;
    for w in worker_dirs(&dir) {
        let last_seg = segments(&w).pop().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&last_seg)
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 4, 1]).unwrap();
        torn += 1;
    }
    assert!(torn >= 1);
    let engine = start(&text);
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let got = drain(&mut su, Duration::from_secs(2));
    stop(engine);
    assert_eq!(got.len(), 200);
    assert_priority_order(&got);
}

/// The real binary, killed with SIGKILL while frames stream in: every frame it ACKed is
/// delivered after the restart.
#[test]
fn nothing_acknowledged_is_lost_to_kill_9() {
    let dir = temp_dir("kill9");
    let config = dir.join("dsplane.toml");
    std::fs::write(
        &config,
        config_text(
            &dir.join("data"),
            "batch",
            "release_start = 1.0\nrate = 100000\nburst = 10000\nnms_per_su = 1000",
        ),
    )
    .unwrap();
    let (mut child, su_addr, csp_addr) = spawn(&config);

    // Stream frames in until the kill; remember the highest counter ACKed.
    let acked = Arc::new(AtomicU64::new(0));
    let stop_flag = Arc::new(AtomicBool::new(false));
    let sender = {
        let acked = Arc::clone(&acked);
        let stop_flag = Arc::clone(&stop_flag);
        std::thread::spawn(move || {
            let mut csp = Client::connect_csp(csp_addr, "csp-token").unwrap();
            let mut counter = 0u64;
            let mut msg_to_counter = std::collections::VecDeque::new();
            while !stop_flag.load(Ordering::Relaxed) {
                for _ in 0..50 {
                    let id = match csp.send(response(counter)) {
                        Ok(id) => id,
                        Err(_) => return,
                    };
                    msg_to_counter.push_back((id, counter));
                    counter += 1;
                }
                loop {
                    match csp.recv(Duration::from_millis(1)) {
                        Ok(Some(f)) if f.header.kind == Kind::Ack => {
                            while let Some(&(id, c)) = msg_to_counter.front() {
                                if id > f.header.msg_id {
                                    break;
                                }
                                acked.store(c + 1, Ordering::Release);
                                msg_to_counter.pop_front();
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
            }
        })
    };
    let deadline = Instant::now() + T;
    while acked.load(Ordering::Acquire) < 3_000 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A SU takes part of the stream, so that some frames are acknowledged by their receiver.
    let mut su = Client::connect_su(su_addr, SU1, "su1-token").unwrap();
    let mut before = Vec::new();
    for _ in 0..500 {
        if let Some(f) = su.recv(T).unwrap() {
            su.ack(f.header.msg_id).unwrap();
            before.push(f.header.counter);
        }
    }
    let status = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait();
    stop_flag.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let acked_through = acked.load(Ordering::Acquire);
    drop(su);

    let (mut child, su_addr, _) = spawn(&config);
    let mut su = Client::connect_su(su_addr, SU1, "su1-token").unwrap();
    let mut after = Vec::new();
    loop {
        match su.recv(Duration::from_secs(2)) {
            Ok(Some(f)) if f.header.kind.is_data() => {
                su.ack(f.header.msg_id).unwrap();
                after.push(f.header.counter);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(ClientError::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for c in before.iter().chain(after.iter()) {
        *seen.entry(*c).or_insert(0) += 1;
    }
    let lost: Vec<u64> = (0..acked_through)
        .filter(|c| !seen.contains_key(c))
        .collect();
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    println!(
        "acked {acked_through}, delivered before kill {}, after restart {}, duplicates {duplicates}",
        before.len(),
        after.len()
    );
    assert!(
        lost.is_empty(),
        "{} ACKed frames lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

fn spawn(config: &Path) -> (Child, std::net::SocketAddr, std::net::SocketAddr) {
    let d = common::spawn_dsplane(config);
    // Keep draining the child's log so it never blocks on a full pipe.
    let lines = d.lines;
    std::thread::spawn(move || while lines.recv().is_ok() {});
    (d.child, d.su, d.csp)
}

/// A full disk answers NACK 5 (never an ACK for a frame it could not write), and intake
/// recovers once space returns. Needs a small file system of its own: a tmpfs, which only root
/// may mount; elsewhere the test says so and stops.
#[test]
fn a_full_disk_answers_nack_5_and_recovers_when_space_returns() {
    let dir = temp_dir("diskfull");
    let mount = dir.join("fs");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let text = config_text(&mount.join("data"), "batch", "release_start = 1.0");
    let engine = start(&text);
    // Take most of the space with a file we can delete later.
    let filler = mount.join("filler");
    std::fs::write(&filler, vec![0u8; 2 << 20]).unwrap();
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let big = |i: u64| {
        // A device each, so that Alert Storm Protection has nothing to throttle.
        let mut h = Header::new(Kind::DeviceAlert);
        h.su_id = SU1;
        h.device_id = Eui64(i);
        h.counter = i;
        Frame::new(h, Bytes::from(vec![7u8; 32 * 1024])).unwrap()
    };
    let mut acked = 0;
    let mut refused = 0;
    for i in 0..200 {
        let id = csp.send(big(i)).unwrap();
        let others = csp.wait_ack(id, T).unwrap();
        if others
            .iter()
            .any(|f| f.header.nack_reason() == Some(dsplane::wire::NackReason::Overloaded))
        {
            refused += 1;
            break;
        }
        acked += 1;
    }
    assert!(
        refused == 1,
        "the disk never filled ({acked} frames of 32 KiB taken)"
    );
    assert!(acked > 10, "{acked}");
    // Space returns: frames are taken again.
    std::fs::remove_file(&filler).unwrap();
    let id = csp.send(big(1_000)).unwrap();
    assert!(
        csp.wait_ack(id, T).unwrap().is_empty(),
        "taken again once there is room"
    );
    // Everything ACKed is there for the SU: the refused frame is not.
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let got = drain(&mut su, Duration::from_secs(1));
    stop(engine);
    let counters: Vec<u64> = got.iter().map(|f| f.header.counter).collect();
    let mut want: Vec<u64> = (0..acked).collect();
    want.push(1_000);
    assert_eq!(counters, want);
}

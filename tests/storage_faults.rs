//! Storage faults (issue 13, items 1–6): the real binary restarted on a data_dir that was
//! damaged on purpose. Whatever is damaged, dsplane either delivers every acknowledged frame or
//! refuses to start, naming the file (and offset), and deletes nothing; `dsplane recover
//! --salvage` keeps what is intact and lists exactly what is not; one engine per data_dir; a
//! full disk never wedges intake or a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::{Client, ClientError};
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, Header, Kind, NackReason};

mod common;

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const T: Duration = Duration::from_secs(30);
/// Small frames before and after the big ones.
const SMALL_BEFORE: u64 = 600;
const BIG: u64 = 66;
const SMALL_AFTER: u64 = 400;
const TOTAL: u64 = SMALL_BEFORE + BIG + SMALL_AFTER;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsplane-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_config(dir: &Path, data_dir: &Path) -> PathBuf {
    write_config_with(dir, data_dir, 1 << 20)
}

fn write_config_with(dir: &Path, data_dir: &Path, max_payload: u32) -> PathBuf {
    let config = dir.join("dsplane.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[engine]
cores = 2
data_dir = "{}"
durability = "batch"
flush_interval_ms = 2
max_payload = {max_payload}
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
release_start = 1.0
rate = 100000
burst = 10000
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"
[[csp]]
name = "csp-a"
token = "csp-token"
"#,
            data_dir.display()
        ),
    )
    .unwrap();
    config
}

fn response(counter: u64, payload_len: usize) -> Frame {
    let mut h = Header::new(Kind::Response);
    h.su_id = SU1;
    h.device_id = Eui64(0x00DB_0000_0000_0000 + counter);
    h.counter = counter;
    let mut payload = counter.to_le_bytes().to_vec();
    payload.resize(payload_len.max(8), counter as u8);
    Frame::new(h, Bytes::from(payload)).unwrap()
}

fn kill(child: &mut std::process::Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Sends frames in batches of 100, waiting for each batch's ACKs (so each is a group commit of
/// its own and durable before the next).
fn send_acked(csp: &mut Client, frames: impl Iterator<Item = Frame>) {
    let frames: Vec<Frame> = frames.collect();
    for chunk in frames.chunks(100) {
        let last = csp.send_batch(chunk.iter().cloned()).unwrap();
        let refused = csp.wait_ack(last, T).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
    }
}

/// A backlog for an absent SU, every frame ACKed: small frames, 66 of 1 MiB (so the log rolls
/// to a second segment), small frames again; then the engine is killed with SIGKILL.
fn make_backlog(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let data = dir.join("data");
    let config = write_config(&dir, &data);
    let mut d = common::spawn_dsplane(&config);
    let mut csp = Client::connect_csp(d.csp, "csp-token").unwrap();
    send_acked(&mut csp, (0..SMALL_BEFORE).map(|c| response(c, 100)));
    send_acked(
        &mut csp,
        (SMALL_BEFORE..SMALL_BEFORE + BIG).map(|c| response(c, 1 << 20)),
    );
    send_acked(
        &mut csp,
        (SMALL_BEFORE + BIG..TOTAL).map(|c| response(c, 100)),
    );
    drop(csp);
    kill(&mut d.child, "-KILL");
    (dir, data)
}

/// A copy of a pristine backlog to damage.
fn copy_of(pristine: &Path, name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let data = dir.join("data");
    copy_dir(pristine, &data);
    (write_config(&dir, &data), data)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Every file under `dir` and its bytes: to show that a refusal deleted nothing.
fn listing(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(listing(&e.path()));
        } else if e.file_name() != "LOCK" {
            out.insert(e.path(), std::fs::read(e.path()).unwrap());
        }
    }
    out
}

fn current_generation(data: &Path) -> PathBuf {
    let text = std::fs::read_to_string(data.join("CURRENT")).unwrap();
    let n = text
        .lines()
        .find_map(|l| l.strip_prefix("generation "))
        .unwrap();
    data.join(format!("gen-{n}"))
}

/// The worker log holding the SU's frames (the one with more than one segment).
fn su_log(data: &Path) -> (PathBuf, Vec<PathBuf>) {
    for w in 0..2 {
        let dir = current_generation(data).join(format!("w{w}"));
        let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "wal"))
            .collect();
        segs.sort();
        if segs.len() > 1 {
            return (dir, segs);
        }
    }
    panic!("no worker log rolled to a second segment");
}

/// Starts the binary, drains the SU, stops it with SIGTERM: the counters delivered, sorted.
fn deliver_all(config: &Path) -> Vec<u64> {
    let mut d = common::spawn_dsplane(config);
    let mut su = Client::connect_su(d.su, SU1, "su1-token").unwrap();
    let mut got = drain(&mut su, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(200));
    kill(&mut d.child, "-TERM");
    got.sort_unstable();
    got
}

/// Runs `dsplane ARGS…` to its end, or for at most 15 s (a `run` that starts is stopped with
/// SIGTERM then, and reported as exit code 0): (exit code, stdout, stderr).
fn run_binary(args: &[&str], config: &Path) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsplane"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("DSPLANE_LOG", "warn")
        .env_remove("DSPLANE_LOG_FORMAT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut started = false;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            started = true;
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let code = if started {
        0
    } else {
        out.status.code().unwrap_or(-1)
    };
    (
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A start that must be refused: exits non-zero by itself, names what is wrong, deletes
/// nothing.
fn assert_refused(config: &Path, data: &Path, names: &[&str]) -> String {
    let before = listing(data);
    let (code, _, stderr) = run_binary(&["run"], config);
    assert_ne!(code, 0, "started on a damaged data_dir: {stderr}");
    for name in names {
        assert!(stderr.contains(name), "the refusal names {name}: {stderr}");
    }
    assert_eq!(listing(data), before, "a refusal deletes nothing");
    stderr
}

#[test]
fn damage_to_the_data_dir_is_refused_or_survived_never_silently_lost() {
    let (_pristine_dir, pristine) = make_backlog("pristine");
    let all: Vec<u64> = (0..TOTAL).collect();

    // 1. CURRENT deleted, emptied, overwritten or flipped: found from the directories.
    let intact = std::fs::read(pristine.join("CURRENT")).unwrap();
    let mut flipped = intact.clone();
    flipped[intact.len() / 2] ^= 0x02;
    let damages: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("deleted", None),
        ("empty", Some(Vec::new())),
        ("x", Some(b"x".to_vec())),
        ("0", Some(b"0".to_vec())),
        ("7", Some(b"7".to_vec())),
        ("flipped", Some(flipped)),
    ];
    for (what, damage) in damages {
        let (config, data) = copy_of(&pristine, &format!("current-{what}"));
        match damage {
            None => std::fs::remove_file(data.join("CURRENT")).unwrap(),
            Some(bytes) => std::fs::write(data.join("CURRENT"), bytes).unwrap(),
        }
        // `dsplane recover` says what a start will do, and changes nothing.
        let (code, stdout, _) = run_binary(&["recover"], &config);
        assert_eq!(code, 0, "CURRENT {what}: {stdout}");
        assert!(
            stdout.contains("CURRENT") && stdout.contains(&format!("{TOTAL} frames waiting")),
            "CURRENT {what}: {stdout}"
        );
        let got = deliver_all(&config);
        assert_eq!(
            got, all,
            "CURRENT {what}: every acknowledged frame delivered"
        );
        // CURRENT is whole again.
        assert_eq!(std::fs::read(data.join("CURRENT")).unwrap(), intact);
    }

    // 2. One flipped bit in the middle of the newest segment: corruption, not a torn tail.
    let (config, data) = copy_of(&pristine, "bitflip");
    let (_, segs) = su_log(&data);
    let newest = segs.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    // Inside a frame's payload (a run of equal bytes), from the middle of the segment on.
    let middle = (bytes.len() / 2..bytes.len() - 64)
        .find(|&i| bytes[i..i + 64].iter().all(|b| *b == bytes[i]))
        .unwrap()
        + 32;
    bytes[middle] ^= 0x10;
    std::fs::write(newest, &bytes).unwrap();
    let name = newest.file_name().unwrap().to_str().unwrap();
    let refusal = assert_refused(&config, &data, &[name, "byte", "corruption"]);
    assert!(refusal.contains("--salvage"), "{refusal}");
    // `dsplane recover` says the same, and changes nothing.
    let before = listing(&data);
    let (code, stdout, _) = run_binary(&["recover"], &config);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains(name) && stdout.contains("byte"), "{stdout}");
    assert_eq!(listing(&data), before);
    // The operator salvages: what is intact is kept, and what is not is listed exactly.
    let (code, stdout, stderr) = run_binary(&["recover", "--salvage"], &config);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let lost: u64 = stdout
        .lines()
        .find(|l| l.starts_with("- "))
        .and_then(|l| l.split(" frame)").next())
        .and_then(|s| s.split(" frames)").next())
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the salvage says how many frames it lost: {stdout}"));
    assert_eq!(
        lost, 1,
        "one flipped bit in one frame loses that frame: {stdout}"
    );
    let report = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("salvage-"))
        .expect("a salvage report in data_dir");
    let text = std::fs::read_to_string(report.path()).unwrap();
    assert!(text.contains(name) && text.contains("bytes"), "{text}");
    let got = deliver_all(&config);
    assert_eq!(
        got.len() as u64,
        TOTAL - lost,
        "every frame but the {lost} listed as lost"
    );

    // 3. Missing files: the older segment, the newest, a worker directory, the generation.
    let (config, data) = copy_of(&pristine, "no-older");
    let (_, segs) = su_log(&data);
    std::fs::remove_file(&segs[0]).unwrap();
    let name = segs[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert_refused(&config, &data, &[&name, "missing"]);

    let (config, data) = copy_of(&pristine, "no-newest");
    let (_, segs) = su_log(&data);
    let newest = segs.last().unwrap();
    std::fs::remove_file(newest).unwrap();
    let name = newest.file_name().unwrap().to_str().unwrap().to_owned();
    assert_refused(&config, &data, &[&name, "missing"]);

    for w in ["w0", "w1"] {
        let (config, data) = copy_of(&pristine, &format!("no-{w}"));
        std::fs::remove_dir_all(current_generation(&data).join(w)).unwrap();
        assert_refused(&config, &data, &[w, "missing"]);
    }

    let (config, data) = copy_of(&pristine, "no-generation");
    let gen = current_generation(&data);
    std::fs::remove_dir_all(&gen).unwrap();
    let name = gen.file_name().unwrap().to_str().unwrap().to_owned();
    assert_refused(&config, &data, &[&name, "missing"]);

    // 6. A generation left half-made by a crash during recovery is deleted at the next start.
    let (config, data) = copy_of(&pristine, "half-made");
    let gen = current_generation(&data);
    let n: u64 = gen
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .strip_prefix("gen-")
        .unwrap()
        .parse()
        .unwrap();
    let half = data.join(format!("gen-{}", n + 1));
    std::fs::create_dir_all(half.join("w0")).unwrap();
    std::fs::write(
        half.join("w0").join("00000000000000000001.wal"),
        b"DSPLWAL2",
    )
    .unwrap();
    let got = deliver_all(&config);
    assert_eq!(got, all);
    assert!(!half.exists(), "the half-made generation is deleted");
}

/// Item 5, one engine per data_dir: a second `dsplane run` on the same data_dir (other ports) is
/// refused with the directory and the first one's pid.
#[test]
fn a_second_engine_on_the_same_data_dir_is_refused() {
    let dir = temp_dir("lock");
    let data = dir.join("data");
    let config = write_config(&dir, &data);
    let mut first = common::spawn_dsplane(&config);
    let (code, _, stderr) = run_binary(&["run"], &config);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&data.display().to_string())
            && stderr.contains(&format!("pid {}", first.child.id())),
        "{stderr}"
    );
    // The first is unharmed.
    let mut csp = Client::connect_csp(first.csp, "csp-token").unwrap();
    send_acked(&mut csp, (0..10).map(|c| response(c, 100)));
    kill(&mut first.child, "-TERM");
    // Once it has stopped, the data_dir is free.
    let got = deliver_all(&config);
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

/// The binary, killed when the test ends however it ends (so its tmpfs can be unmounted).
struct Running(common::Dsplane);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

/// A tmpfs of `size` for the full-disk tests (root only; elsewhere the test says so and stops).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let mount = dir.join("fs");
        std::fs::create_dir_all(&mount).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
            return None;
        }
        Some(Tmpfs(mount))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn alert(i: u64, payload: usize) -> Frame {
    // A device each, so that Alert Storm Protection has nothing to throttle.
    let mut h = Header::new(Kind::DeviceAlert);
    h.su_id = SU1;
    h.device_id = Eui64(0x00DB_0000_0000_0000 + i);
    h.counter = i;
    Frame::new(h, Bytes::from(vec![7u8; payload])).unwrap()
}

/// Sends one frame and waits for its answer: whether it was taken (ACK) or refused (NACK 5).
fn offer(csp: &mut Client, frame: Frame) -> bool {
    let id = csp.send(frame).unwrap();
    let others = csp.wait_ack(id, T).unwrap();
    !others
        .iter()
        .any(|f| f.header.nack_reason() == Some(NackReason::Overloaded))
}

/// Fills the disk through the engine: frames of 32 KiB until one is refused. Returns how many
/// were taken.
fn fill(csp: &mut Client, from: u64) -> u64 {
    for i in 0..400 {
        if !offer(csp, alert(from + i, 32 * 1024)) {
            assert!(i > 10, "the disk filled after {i} frames");
            return i;
        }
    }
    panic!("the disk never filled");
}

/// Receives until nothing comes for `quiet`, acknowledging: the counters.
fn drain(su: &mut Client, quiet: Duration) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        match su.recv(quiet) {
            Ok(Some(f)) if f.header.kind.is_data() => {
                su.ack(f.header.msg_id).unwrap();
                got.push(f.header.counter);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(ClientError::Closed) => return got,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Item 4: after the SU has acknowledged everything, a full disk takes frames again: the fully
/// acknowledged segment being written is rolled and deleted, with room from the reserve.
#[test]
fn a_full_disk_is_not_wedged_by_acknowledged_frames() {
    let dir = temp_dir("wedge");
    let Some(fs) = Tmpfs::mount(&dir, "6m") else {
        return;
    };
    let config = write_config_with(&dir, &fs.0.join("data"), 65_536);
    let mut d = Running(common::spawn_dsplane(&config));
    let mut csp = Client::connect_csp(d.0.csp, "csp-token").unwrap();
    let taken = fill(&mut csp, 0);
    // The SU takes and acknowledges the whole backlog.
    let mut su = Client::connect_su(d.0.su, SU1, "su1-token").unwrap();
    let got = drain(&mut su, Duration::from_secs(1));
    assert_eq!(got, (0..taken).collect::<Vec<_>>());
    // Nothing is queued: frames must be taken again, by themselves, within seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next = 10_000;
    while !offer(&mut csp, alert(next, 1024)) {
        assert!(
            Instant::now() < deadline,
            "every frame refused on an empty queue: acknowledged frames keep the disk full"
        );
        next += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the disk is usable again: most of it is free for a new backlog.
    let again = fill(&mut csp, 20_000);
    assert!(again * 2 > taken, "{again} frames after, {taken} before");
    kill(&mut d.0.child, "-TERM");
}

/// Item 4: a restart on a full disk: recovery goes on in place, frames get NACK 5 while the disk is
/// really full, the backlog is delivered, and frames are taken again when space returns.
#[test]
fn a_restart_on_a_full_disk_recovers_in_place() {
    let dir = temp_dir("full-restart");
    let Some(fs) = Tmpfs::mount(&dir, "6m") else {
        return;
    };
    let config = write_config_with(&dir, &fs.0.join("data"), 65_536);
    let mut d = Running(common::spawn_dsplane(&config));
    let mut csp = Client::connect_csp(d.0.csp, "csp-token").unwrap();
    let taken = fill(&mut csp, 0);
    drop(csp);
    kill(&mut d.0.child, "-KILL");
    // Whatever room is left goes to a filler file.
    let filler = fs.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
    }
    let mut d = Running(common::spawn_dsplane(&config));
    let mut csp = Client::connect_csp(d.0.csp, "csp-token").unwrap();
    assert!(
        !offer(&mut csp, alert(5_000, 32 * 1024)),
        "the disk is full: NACK 5"
    );
    let mut su = Client::connect_su(d.0.su, SU1, "su1-token").unwrap();
    let got = drain(&mut su, Duration::from_secs(1));
    assert_eq!(
        got,
        (0..taken).collect::<Vec<_>>(),
        "the backlog, all of it"
    );
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !offer(&mut csp, alert(6_000, 1024)) {
        assert!(Instant::now() < deadline, "never taken again");
        std::thread::sleep(Duration::from_millis(100));
    }
    kill(&mut d.0.child, "-TERM");
}

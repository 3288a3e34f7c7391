//! Logs an operator can follow, on the real binary in JSON mode: every line is JSON (the
//! no-config banner and start-up errors too), connects and disconnects name the peer, the
//! address and the reason, a storm's start and summary are logged with the alert code as
//! `0x8F75`, a reload says what it changed, a refusal is one line, and no line shows `Some(`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, Header, Kind};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dsplane");
const SU1: &str = "90-B3-D5-1F-30-01-00-00";

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dsplane-logs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `dsplane --log-format json ARGS` with its stderr lines on a channel.
fn spawn_json(args: &[&str], cwd: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["--log-format", "json"])
        .args(args)
        .current_dir(cwd)
        .env("DSPLANE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Parses a log line, failing the test if it is not one JSON object.
fn json(line: &str) -> Value {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert!(v.is_object(), "{line}");
    v
}

/// Reads lines until one satisfies `until` (returned with all before it) or `timeout`.
fn read_until(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    timeout: Duration,
    until: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            return None;
        };
        let v = json(&line);
        seen.push(line);
        if until(&v) {
            return Some(v);
        }
    }
    None
}

fn stop(mut child: Child, rx: &mpsc::Receiver<String>, seen: &mut Vec<String>) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        json(&line);
        seen.push(line);
    }
}

#[test]
fn the_no_config_banner_and_start_up_errors_are_json_lines() {
    // The embedded configuration listens on fixed loopback ports: if they are taken, the
    // start-up error must be a JSON line too, so either outcome is checked.
    let dir = temp_dir("banner");
    let (child, rx) = spawn_json(&["run"], &dir);
    let mut seen = Vec::new();
    let end = read_until(&rx, &mut seen, Duration::from_secs(30), |v| {
        v["message"] == "dsplane running" || v["level"] == "ERROR"
    });
    stop(child, &rx, &mut seen);
    assert!(end.is_some(), "neither running nor an error: {seen:?}");
    let demo_su = seen
        .iter()
        .map(|l| json(l))
        .find(|v| v["message"] == "demo Service User")
        .unwrap_or_else(|| panic!("no banner line for the demo SU: {seen:?}"));
    assert_eq!(demo_su["peer"], SU1);
    assert_eq!(demo_su["token"], "demo-su-token");
    assert!(seen.iter().any(|l| json(l)["message"] == "demo CSP"));

    // A config that does not parse: one JSON error line, naming the file and line.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[engine]\ncores = 1\n[listen\n").unwrap();
    let out = Command::new(BIN)
        .args(["--log-format", "json", "run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    let v = json(lines[0]);
    assert_eq!(v["level"], "ERROR");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("bad.toml") && message.contains("line 3"),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
    // In human mode the same error is one line as well.
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&bad)
        .env_remove("DSPLANE_LOG_FORMAT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

fn config_text(data: &std::path::Path, threshold: u32) -> String {
    format!(
        "[engine]\ncores = 1\ndurability = \"none\"\ndata_dir = \"{}\"\n[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[service_user]]\nid = \"{SU1}\"\ntoken = \"su-token\"\n[[csp]]\nname = \"csp-a\"\ntoken = \"csp-token\"\n[alert_storm]\nthreshold = {threshold}\nwindow_s = 1\nexclusions = [ 1 ]\n",
        data.display()
    )
}

#[test]
fn connects_disconnects_storms_and_reloads_are_logged_for_an_operator() {
    let dir = temp_dir("follow");
    let file = dir.join("dsplane.toml");
    std::fs::write(&file, config_text(&dir.join("data"), 1)).unwrap();
    let (child, rx) = spawn_json(&["run", "--config", file.to_str().unwrap()], &dir);
    let mut seen = Vec::new();
    let running = read_until(&rx, &mut seen, Duration::from_secs(30), |v| {
        v["message"] == "dsplane running"
    })
    .unwrap_or_else(|| panic!("not running: {seen:?}"));
    let su_addr: SocketAddr = running["su"].as_str().unwrap().parse().unwrap();
    let csp_addr: SocketAddr = running["csp"].as_str().unwrap().parse().unwrap();

    let su_id: Eui64 = SU1.parse().unwrap();
    let su = Client::connect_su(su_addr, su_id, "su-token").unwrap();
    let su_local = su.stream().local_addr().unwrap().to_string();
    let mut csp = Client::connect_csp(csp_addr, "csp-token").unwrap();
    let connected = read_until(&rx, &mut seen, Duration::from_secs(10), |v| {
        v["message"] == "connected" && v["peer"] == SU1
    })
    .expect("a connect line for the SU");
    assert_eq!(connected["level"], "INFO");
    assert_eq!(connected["addr"], su_local.as_str());
    assert!(connected["reason"].is_string());
    read_until(&rx, &mut seen, Duration::from_secs(10), |v| {
        v["message"] == "connected" && v["peer"] == "csp-a"
    })
    .expect("a connect line for the CSP");

    drop(su);
    let gone = read_until(&rx, &mut seen, Duration::from_secs(10), |v| {
        v["message"] == "disconnected" && v["peer"] == SU1
    })
    .expect("a disconnect line for the SU");
    assert_eq!(gone["level"], "INFO");
    assert_eq!(gone["addr"], su_local.as_str());
    assert_eq!(gone["reason"], "closed by the peer");

    // A storm: threshold 1, so the second 0x8F75 from the meter starts it.
    let alert = |i: u64| {
        let mut h = Header::new(Kind::DeviceAlert);
        h.su_id = su_id;
        h.device_id = Eui64(0x00DB_1234_5678_0001);
        h.alert_code = 0x8F75;
        h.counter = i;
        Frame::new(h, Bytes::from_static(b"alert")).unwrap()
    };
    let last = csp.send_batch((0..4).map(alert)).unwrap();
    csp.wait_ack(last, Duration::from_secs(10)).unwrap();
    let started = read_until(&rx, &mut seen, Duration::from_secs(10), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("alert storm started"))
    })
    .expect("a storm start line");
    assert_eq!(started["peer"], SU1);
    assert_eq!(started["alert_code"], "0x8F75");
    assert_eq!(started["device"], "00-DB-12-34-56-78-00-01");
    let summary = read_until(&rx, &mut seen, Duration::from_secs(10), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("alert storm summary"))
    })
    .expect("a storm summary line");
    assert_eq!(summary["alert_code"], "0x8F75");
    assert_eq!(summary["count"], 3);

    // A reload says what it changed.
    std::fs::write(&file, config_text(&dir.join("data"), 5)).unwrap();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let changed = read_until(&rx, &mut seen, Duration::from_secs(10), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("alert_storm.threshold: 1 → 5"))
    });
    assert!(changed.is_some(), "no change line: {seen:?}");
    // A refused reload is one line that says why.
    std::fs::write(&file, "[engine\n").unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let refused = read_until(&rx, &mut seen, Duration::from_secs(10), |v| {
        v["message"] == "reload refused; the running configuration is unchanged"
    })
    .expect("a refusal line");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("line 1") && !error.contains('\n'), "{error}");

    drop(csp);
    stop(child, &rx, &mut seen);
    for line in &seen {
        assert!(!line.contains("Some("), "debug text in: {line}");
        let v = json(line);
        // One field name for the peer: `peer`, never `su` or `csp` holding a name.
        let fields = v.as_object().unwrap();
        if v["message"] != "dsplane running" {
            assert!(
                !fields.contains_key("su") && !fields.contains_key("csp"),
                "{line}"
            );
        }
        if let Some(code) = v["alert_code"].as_str() {
            assert!(
                code.len() == 6
                    && code.starts_with("0x")
                    && code[2..]
                        .chars()
                        .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()),
                "{line}"
            );
        }
    }
    assert!(
        seen.iter().any(|l| {
            let v = json(l);
            v["message"] == "disconnected" && v["peer"] == "csp-a"
        }),
        "the CSP's disconnect is logged too"
    );
}

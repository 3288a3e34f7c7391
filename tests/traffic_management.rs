//! Alert Storm Protection, SECMP0067 throttling, the alert report and live reload, over TCP
//! against the real engine (ENGINE.md §4, §5, §8).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind, NackReason};

mod common;

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const SU2: Eui64 = Eui64(0x90B3_D51F_3001_0001);
const DEV_A: Eui64 = Eui64(0x00DB_0000_0000_000A);
const DEV_B: Eui64 = Eui64(0x00DB_0000_0000_000B);
const T: Duration = Duration::from_secs(10);

fn write_config(name: &str, body: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("dsplane-tm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
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
release_start = 1.0
rate = 100000
burst = 10000
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"
[[service_user]]
id = "90-B3-D5-1F-30-01-00-01"
token = "su2-token"
[[csp]]
name = "csp-a"
token = "csp-token"
{body}
"#,
        dir.join("data").display()
    );
    let path = dir.join("dsplane.toml");
    std::fs::write(&path, text).unwrap();
    (path, dir)
}

fn start(path: &std::path::Path) -> Engine {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let engine = Engine::start(Config::load(path).unwrap()).unwrap();
    engine.set_config_path(path.to_path_buf());
    engine
}

fn alert(device: Eui64, code: u16, counter: u64) -> Frame {
    let mut h = Header::new(Kind::DeviceAlert);
    h.su_id = SU1;
    h.device_id = device;
    h.alert_code = code;
    h.counter = counter;
    Frame::new(h, Bytes::from_static(b"<alert/>")).unwrap()
}

fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    common::http(addr, method, path, None)
}

#[test]
fn a_storming_device_an_excluded_code_and_a_quiet_device_side_by_side() {
    let (path, dir) = write_config(
        "storm",
        "[alert_storm]\nthreshold = 5\nwindow_s = 1\nexclusions = [0x8F57]\n",
    );
    let engine = start(&path);
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let mut frames = Vec::new();
    for i in 0..30 {
        frames.push(alert(DEV_A, 0x8F75, i)); // strong magnetic field: storms
        frames.push(alert(DEV_A, 0x8F57, 100 + i)); // excluded: never throttled
    }
    for i in 0..3 {
        frames.push(alert(DEV_B, 0x8F75, 200 + i)); // a quiet device
    }
    let last = csp.send_batch(frames).unwrap();
    assert!(
        csp.wait_ack(last, T).unwrap().is_empty(),
        "every alert is acknowledged"
    );

    // The device goes quiet: its summary still comes, when the window closes.
    let mut alerts: HashMap<(Eui64, u16), u64> = HashMap::new();
    let mut summaries = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        if let Some(f) = su.recv(Duration::from_millis(100)).unwrap() {
            if !f.header.kind.is_data() {
                continue;
            }
            su.ack(f.header.msg_id).unwrap();
            match f.header.kind {
                Kind::DeviceAlert => {
                    *alerts
                        .entry((f.header.device_id, f.header.alert_code))
                        .or_insert(0) += 1
                }
                Kind::StormSummary => summaries.push(f.header),
                k => panic!("unexpected {k}"),
            }
        }
    }
    assert_eq!(alerts[&(DEV_A, 0x8F75)], 5, "the threshold, then throttled");
    assert_eq!(
        alerts[&(DEV_A, 0x8F57)],
        30,
        "the exclusion list is never throttled"
    );
    assert_eq!(alerts[&(DEV_B, 0x8F75)], 3, "a quiet device is untouched");
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    let s = summaries[0];
    assert_eq!((s.device_id, s.alert_code, s.counter), (DEV_A, 0x8F75, 25));
    assert_eq!(s.priority, 4, "at the lowest level");

    // The report counts it all.
    let today = dsplane::report::utc_day(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let date = dsplane::report::date_of(today);
    std::thread::sleep(Duration::from_millis(400)); // one housekeeping merge
    let (status, body) = http(
        engine.admin_addr(),
        "GET",
        &format!("/report/alerts?day={date}"),
    );
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let code = json["codes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"] == 0x8F75)
        .expect("0x8F75 in the report");
    assert_eq!(code["received"], 33);
    assert_eq!(code["delivered"], 8);
    assert_eq!(code["throttled"], 25);
    assert_eq!(code["distinct_devices"], 2);
    engine.shutdown();
    engine.join();

    // Kept across restarts: the table from the command line reads the saved report.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dsplane"))
        .args(["report", "alerts", "--config"])
        .arg(&path)
        .args(["--day", &date])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("0x8F75") || table.contains("0x8f75"),
        "{table}"
    );

    // And a restarted engine still serves it.
    let engine = start(&path);
    let (status, body) = http(
        engine.admin_addr(),
        "GET",
        &format!("/report/alerts?day={date}"),
    );
    engine.shutdown();
    engine.join();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let received: u64 = json["codes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["code"] == 0x8F75)
        .map(|c| c["received"].as_u64().unwrap())
        .sum();
    assert_eq!(received, 33, "kept across the restart");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_heavy_request_sender_is_throttled_and_a_light_one_is_not() {
    // Throttling starts above 1 % of 10,000/s = 100 requests in a second; each SU may send
    // 10/s with a burst of 5.
    let (path, _dir) = write_config(
        "throttle",
        "[service_requests]\ncapacity = 10000\noperating_threshold = 0.01\nsr_rate = 10\nsr_burst = 5\n",
    );
    let engine = start(&path);
    let _csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let mut heavy = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let mut light = Client::connect_su(engine.su_addr(), SU2, "su2-token").unwrap();
    let request = |su: Eui64, i: u64| {
        let mut h = Header::new(Kind::Request);
        h.su_id = su;
        h.device_id = DEV_A;
        h.srv = "4.1.1".parse::<Srv>().unwrap();
        h.counter = i;
        Frame::new(h, Bytes::from_static(b"<read/>")).unwrap()
    };
    let last = heavy.send_batch((0..300).map(|i| request(SU1, i))).unwrap();
    let heavy_replies = heavy.wait_ack(last, T);
    let nacks: Vec<Option<NackReason>> = match heavy_replies {
        Ok(others) => others.iter().map(|f| f.header.nack_reason()).collect(),
        Err(_) => Vec::new(),
    };
    // Its last request may itself be refused; read what else is there.
    let mut nacks = nacks;
    while let Some(f) = heavy.recv(Duration::from_millis(200)).unwrap() {
        if f.header.kind == Kind::Nack {
            nacks.push(f.header.nack_reason());
        }
    }
    let throttled = nacks
        .iter()
        .filter(|r| **r == Some(NackReason::Throttled))
        .count();
    assert!(
        throttled >= 100,
        "the heavy SU was throttled {throttled} times"
    );
    // The light SU, within its allocation, is never affected, even now.
    std::thread::sleep(Duration::from_millis(20));
    let last = light.send_batch((0..5).map(|i| request(SU2, i))).unwrap();
    assert!(
        light.wait_ack(last, T).unwrap().is_empty(),
        "the light SU was refused"
    );
    engine.shutdown();
    engine.join();
}

#[test]
fn a_reload_applies_to_new_traffic_only() {
    let (path, _dir) = write_config(
        "reload",
        "[priority]\nrules = [ { srv = \"2.2\", level = 1 } ]\n",
    );
    let engine = start(&path);
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let response = |i: u64| {
        let mut h = Header::new(Kind::Response);
        h.su_id = SU1;
        h.srv = "1.1.1".parse::<Srv>().unwrap();
        h.counter = i;
        Frame::new(h, Bytes::new()).unwrap()
    };
    let last = csp.send_batch((0..3).map(response)).unwrap();
    csp.wait_ack(last, T).unwrap();
    // 1.1.1 becomes urgent.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "rules = [ { srv = \"2.2\", level = 1 } ]",
        "rules = [ { srv = \"2.2\", level = 1 }, { srv = \"1.1.1\", level = 1 } ]",
    );
    std::fs::write(&path, text).unwrap();
    let (status, body) = http(engine.admin_addr(), "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(100));
    let last = csp.send_batch((3..6).map(response)).unwrap();
    csp.wait_ack(last, T).unwrap();
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let mut got = Vec::new();
    while got.len() < 6 {
        let f = su.recv(T).unwrap().unwrap();
        su.ack(f.header.msg_id).unwrap();
        got.push((f.header.counter, f.header.priority));
    }
    // The new ones at level 1 go first; the ones taken before keep level 4.
    assert_eq!(got, vec![(3, 1), (4, 1), (5, 1), (0, 4), (1, 4), (2, 4)]);
    // A bad file is refused and the running configuration kept.
    std::fs::write(&path, "[engine]\nlevels = 0\n").unwrap();
    let (status, body) = http(engine.admin_addr(), "POST", "/reload");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("engine.levels"), "{body}");
    engine.shutdown();
    engine.join();
}

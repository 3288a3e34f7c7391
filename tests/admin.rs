//! The admin interface as an HTTP client sees it: 405 with `Allow` for a wrong method, a 404
//! that lists the endpoints, and `GET /status`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, Header, Kind};

mod common;

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const SU2: Eui64 = Eui64(0x90B3_D51F_3001_0001);
const T: Duration = Duration::from_secs(10);

/// One request: (status line, headers, body) as sent.
fn raw(addr: SocketAddr, method: &str, path: &str) -> (String, Vec<String>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n").map(str::to_owned);
    let status = lines.next().unwrap();
    (status, lines.collect(), body.to_owned())
}

fn start(name: &str) -> (Engine, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("dsplane-admin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "[engine]\ncores = 2\ndurability = \"none\"\ndata_dir = \"{}\"\n[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[delivery]\nrelease_start = 1.0\nrate = 100000\nburst = 10000\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\nname = \"supplier-a\"\ntoken = \"su1\"\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-01\"\ntoken = \"su2\"\n[[csp]]\nname = \"csp-a\"\ntoken = \"csp\"\n",
        dir.display()
    );
    let file = dir.join("dsplane.toml");
    std::fs::write(&file, &text).unwrap();
    let engine = Engine::start(Config::from_toml(&text).unwrap()).unwrap();
    engine.set_config_path(file.clone());
    (engine, file)
}

#[test]
fn a_wrong_method_gets_405_with_allow_and_an_unknown_path_lists_the_endpoints() {
    let (engine, _) = start("methods");
    let admin = engine.admin_addr();
    for (method, path, allow) in [
        ("POST", "/metrics", "GET"),
        ("DELETE", "/healthz", "GET"),
        ("POST", "/status", "GET"),
        ("GET", "/reload", "POST"),
        ("GET", "/restrict", "POST"),
        ("PUT", "/su/90-B3-D5-1F-30-01-00-00/pause", "POST"),
    ] {
        let (status, headers, body) = raw(admin, method, path);
        assert!(
            status.starts_with("HTTP/1.1 405 "),
            "{method} {path}: {status}"
        );
        assert!(
            headers.iter().any(|h| h == &format!("Allow: {allow}")),
            "{method} {path}: {headers:?}"
        );
        assert!(body.contains(allow), "{body}");
    }
    // A GET /reload must not reload: nothing was counted.
    let (_, metrics) = common::http(admin, "GET", "/metrics", None);
    assert!(metrics.contains("dsplane_config_reloads_total{result=\"success\"} 0\n"));

    let (status, headers, body) = raw(admin, "GET", "/nothing-here");
    assert!(status.starts_with("HTTP/1.1 404 "), "{status}");
    assert!(!headers.iter().any(|h| h.starts_with("Allow:")));
    for endpoint in [
        "GET /healthz",
        "GET /metrics",
        "GET /status",
        "GET /report/alerts",
        "POST /reload",
        "POST /su/{EUI-64}/pause",
        "POST /su/{EUI-64}/resume",
        "POST /restrict",
        "POST /restore",
    ] {
        assert!(body.contains(endpoint), "{endpoint} not listed:\n{body}");
    }
    engine.shutdown();
    engine.join();
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && s.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.chars()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19].contains(&i) || c.is_ascii_digit())
}

fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = common::http(admin, "GET", "/status", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn status_shows_each_su_its_queues_the_restriction_and_the_config() {
    let (engine, file) = start("status");
    let admin = engine.admin_addr();
    let _su1 = Client::connect_su(engine.su_addr(), SU1, "su1").unwrap();
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp").unwrap();
    // Seven responses for the SU that is away: they wait in memory.
    let last = csp
        .send_batch((0..7).map(|i| {
            let mut h = Header::new(Kind::Response);
            h.su_id = SU2;
            h.srv = "1.1.1".parse().unwrap();
            h.counter = i;
            Frame::new(h, Bytes::from_static(b"r")).unwrap()
        }))
        .unwrap();
    csp.wait_ack(last, T).unwrap();
    std::thread::sleep(Duration::from_millis(600)); // two publications

    let s = status(admin);
    assert_eq!(s["workers"], 2);
    assert_eq!(s["restricted"], false);
    let shown = std::fs::canonicalize(&file).unwrap_or(file.clone());
    assert!(
        s["config"]["file"] == file.display().to_string()
            || s["config"]["file"] == shown.display().to_string(),
        "{s}"
    );
    let loaded = s["config"]["loaded_at"].as_str().unwrap().to_owned();
    assert!(is_rfc3339_utc(&loaded), "{loaded}");
    let sus = s["service_users"].as_array().unwrap();
    assert_eq!(sus.len(), 2);
    assert_eq!(sus[0]["id"], "90-B3-D5-1F-30-01-00-00");
    assert_eq!(sus[0]["name"], "supplier-a");
    assert_eq!(sus[0]["state"], "connected");
    assert_eq!(sus[1]["id"], "90-B3-D5-1F-30-01-00-01");
    assert_eq!(sus[1]["state"], "away");
    assert_eq!(sus[1]["queue_depth"]["nms"], 7, "{s}");
    assert_eq!(sus[1]["queue_depth"]["surb"], 0);
    assert_eq!(sus[0]["queue_depth"]["nms"], 0);
    assert_eq!(s["csps"][0]["name"], "csp-a");
    assert_eq!(s["csps"][0]["state"], "connected");

    // Paused and restricted show at once: they are the operator's own actions.
    assert_eq!(
        common::http(admin, "POST", "/su/90-B3-D5-1F-30-01-00-00/pause", None).0,
        200
    );
    assert_eq!(common::http(admin, "POST", "/restrict", None).0, 200);
    let s = status(admin);
    assert_eq!(s["service_users"][0]["state"], "paused");
    assert_eq!(s["service_users"][0]["paused"], true);
    assert_eq!(s["restricted"], true);
    // A reload taken moves the load time on (to the second).
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(common::http(admin, "POST", "/reload", None).0, 200);
    let s = status(admin);
    let reloaded = s["config"]["loaded_at"].as_str().unwrap();
    assert!(
        is_rfc3339_utc(reloaded) && reloaded > loaded.as_str(),
        "{reloaded} after {loaded}"
    );
    engine.shutdown();
    engine.join();
}

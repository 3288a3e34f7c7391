//! Operator actions over the admin interface (pause, resume, restrict, restore) and the expiry
//! of frames older than `retention_h` (ENGINE.md §2, §3).

use std::time::Duration;

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind};

mod common;

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const T: Duration = Duration::from_secs(10);

fn config(
    name: &str,
    extra_engine: &str,
    delivery: &str,
    admin: &str,
) -> (Config, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("dsplane-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        r#"
[engine]
cores = 2
durability = "none"
data_dir = "{}"
{extra_engine}
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[admin]
{admin}
[delivery]
release_start = 1.0
rate = 100000
burst = 10000
{delivery}
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"
[[csp]]
name = "csp-a"
token = "csp-token"
[priority]
rules = [ {{ srv = "2.2", level = 1 }} ]
"#,
        dir.display()
    );
    (Config::from_toml(&text).unwrap(), dir)
}

use common::http;

fn response(counter: u64, srv: &str) -> Frame {
    let mut h = Header::new(Kind::Response);
    h.su_id = SU1;
    h.srv = srv.parse::<Srv>().unwrap();
    h.counter = counter;
    Frame::new(h, Bytes::from(counter.to_le_bytes().to_vec())).unwrap()
}

fn receive(su: &mut Client, quiet: Duration) -> Vec<(u8, u64)> {
    let mut got = Vec::new();
    while let Some(f) = su.recv(quiet).unwrap() {
        if f.header.kind.is_data() {
            su.ack(f.header.msg_id).unwrap();
            got.push((f.header.priority, f.header.counter));
        }
    }
    got
}

#[test]
fn pause_resume_restrict_restore() {
    let (cfg, _) = config("pause", "", "", "token = \"admin-secret\"");
    let engine = Engine::start(cfg).unwrap();
    let admin = engine.admin_addr();
    assert_eq!(
        http(admin, "GET", "/healthz", None).0,
        401,
        "a token is set"
    );
    assert_eq!(http(admin, "GET", "/healthz", Some("wrong")).0, 401);
    assert_eq!(http(admin, "GET", "/healthz", Some("admin-secret")).0, 200);
    assert_eq!(
        http(admin, "POST", "/su/nonsense/pause", Some("admin-secret")).0,
        400
    );
    assert_eq!(
        http(
            admin,
            "POST",
            "/su/00-00-00-00-00-00-00-09/pause",
            Some("admin-secret")
        )
        .0,
        404
    );

    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let (status, body) = http(
        admin,
        "POST",
        "/su/90-B3-D5-1F-30-01-00-00/pause",
        Some("admin-secret"),
    );
    assert_eq!(
        (status, body.trim()),
        (200, "90-B3-D5-1F-30-01-00-00 paused")
    );
    std::thread::sleep(Duration::from_millis(100));
    let last = csp
        .send_batch((0..20).map(|i| response(i, if i % 5 == 4 { "2.2" } else { "1.1.1" })))
        .unwrap();
    assert!(
        csp.wait_ack(last, T).unwrap().is_empty(),
        "kept, not refused"
    );
    assert!(
        receive(&mut su, Duration::from_millis(300)).is_empty(),
        "paused: nothing sent"
    );
    assert_eq!(
        http(
            admin,
            "POST",
            "/su/90-B3-D5-1F-30-01-00-00/resume",
            Some("admin-secret")
        )
        .0,
        200
    );
    let got = receive(&mut su, Duration::from_millis(500));
    assert_eq!(got.len(), 20);
    assert!(
        got[..4].iter().all(|(level, _)| *level == 1),
        "urgent first: {got:?}"
    );

    assert_eq!(
        http(admin, "POST", "/restrict", Some("admin-secret")).0,
        200
    );
    std::thread::sleep(Duration::from_millis(100));
    let last = csp
        .send_batch((100..105).map(|i| response(i, "1.1.1")))
        .unwrap();
    csp.wait_ack(last, T).unwrap();
    assert!(
        receive(&mut su, Duration::from_millis(300)).is_empty(),
        "restricted"
    );
    assert_eq!(http(admin, "POST", "/restore", Some("admin-secret")).0, 200);
    assert_eq!(receive(&mut su, Duration::from_millis(500)).len(), 5);
    engine.shutdown();
    engine.join();
}

#[test]
fn frames_past_retention_expire_into_the_expiry_record() {
    // Three frames fit in memory; the other seven wait on disk. All expire.
    let (mut cfg, dir) = config("expiry", "", "nms_per_su = 3", "");
    cfg.service_users[0].delivery.retention = Duration::from_millis(300);
    let engine = Engine::start(cfg).unwrap();
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let last = csp
        .send_batch((0..10).map(|i| response(i, "1.1.1")))
        .unwrap();
    csp.wait_ack(last, T).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    assert!(
        receive(&mut su, Duration::from_millis(500)).is_empty(),
        "expired frames are not sent"
    );
    // A fresh frame still goes through.
    csp.send(response(99, "1.1.1")).unwrap();
    assert_eq!(receive(&mut su, Duration::from_millis(500)), vec![(4, 99)]);
    engine.shutdown();
    engine.join();
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("expired-w") {
            lines.extend(
                std::fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .map(str::to_owned),
            );
        }
    }
    assert_eq!(lines.len(), 10, "{lines:?}");
    for c in 0..10 {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("\"counter\":{c},"))),
            "counter {c} in the expiry record"
        );
    }
    assert!(lines
        .iter()
        .all(|l| l.contains("\"peer\":\"90-B3-D5-1F-30-01-00-00\"") && l.contains("\"level\":4")));
}

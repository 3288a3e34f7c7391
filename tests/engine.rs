//! The real engine on loopback: priority order, overtaking, rate, southbound routing and
//! response inheritance, and every refusal of PROTOCOL.md. Each test starts its own engine on
//! port 0 and stops it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::{Client, ClientError};
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind, NackReason, Role, HEADER_LEN};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const SU2: Eui64 = Eui64(0x90B3_D51F_3001_0001);
const DEVICE: Eui64 = Eui64(0x00DB_1234_5678_90A0);
const T: Duration = Duration::from_secs(10);

/// A config on ephemeral ports with two SUs and one CSP; `delivery` replaces the `[delivery]`
/// body and `extra` is appended.
fn config(delivery: &str, extra: &str) -> Config {
    let data_dir = temp_data_dir();
    // No ramp unless a test asks for one, so that rates are steady from the first frame.
    let ramp = if delivery.contains("release_start") {
        ""
    } else {
        "release_start = 1.0"
    };
    let text = format!(
        r#"
[engine]
cores = 2
data_dir = "{data_dir}"
durability = "none"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
{ramp}
{delivery}
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"
[[service_user]]
id = "90-B3-D5-1F-30-01-00-01"
token = "su2-token"
[priority]
default_level = 4
scheduled_response_level = 4
alert_level = 3
rules = [ {{ srv = "2.2", level = 1 }}, {{ srv = "7.*", level = 1 }}, {{ srv = "8.1.1", level = 2 }},
          {{ srv = "4.1.1", mode = "on-demand", level = 3 }} ]
high_priority_alerts = [ {{ code = 0x8F1C, level = 1 }} ]
{extra}
"#
    );
    Config::from_toml(&text).unwrap()
}

/// A fresh data directory per engine, so tests running side by side never share a log.
fn temp_data_dir() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("dsplane-engine-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.display().to_string()
}

fn default_csp() -> &'static str {
    "[[csp]]\nname = \"csp-a\"\ntoken = \"csp-token\"\nrate = 100000\nburst = 1000\nwindow = 1000\n"
}

fn start(delivery: &str, extra: &str) -> Running {
    // Warnings and errors go to the test's captured output, shown when it fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let extra = if extra.contains("[[csp]]") {
        extra.to_owned()
    } else {
        format!("{}{extra}", default_csp())
    };
    Running(Some(Engine::start(config(delivery, &extra)).unwrap()))
}

/// Stops the engine when the test ends, pass or fail.
struct Running(Option<Engine>);

impl Running {
    fn su(&self, id: Eui64, token: &str) -> Client {
        Client::connect_su(self.0.as_ref().unwrap().su_addr(), id, token).unwrap()
    }
    fn csp(&self) -> Client {
        Client::connect_csp(self.0.as_ref().unwrap().csp_addr(), "csp-token").unwrap()
    }
    fn su_addr(&self) -> std::net::SocketAddr {
        self.0.as_ref().unwrap().su_addr()
    }
    fn csp_addr(&self) -> std::net::SocketAddr {
        self.0.as_ref().unwrap().csp_addr()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(engine) = self.0.take() {
            engine.shutdown();
            engine.join();
        }
    }
}

fn srv(text: &str) -> Srv {
    text.parse().unwrap()
}

fn frame(kind: Kind, su: Eui64, srv_: Srv, alert: u16, counter: u64, payload: Vec<u8>) -> Frame {
    let mut h = Header::new(kind);
    h.su_id = su;
    // Alerts come from a device each, so that Alert Storm Protection (tested on its own) has
    // nothing to throttle here.
    h.device_id = if kind == Kind::DeviceAlert {
        Eui64(DEVICE.0 + counter)
    } else {
        DEVICE
    };
    h.srv = srv_;
    h.alert_code = alert;
    h.counter = counter;
    h.created_ns = 1_700_000_000_000_000_000 + counter;
    // Senders' priorities must be ignored.
    h.priority = 1;
    Frame::new(h, Bytes::from(payload)).unwrap()
}

fn response(su: Eui64, srv_: &str, counter: u64) -> Frame {
    frame(Kind::Response, su, srv(srv_), 0, counter, payload(counter))
}

fn request(su: Eui64, srv_: &str, counter: u64) -> Frame {
    frame(Kind::Request, su, srv(srv_), 0, counter, payload(counter))
}

/// A payload that says which frame it is and covers every byte value.
fn payload(counter: u64) -> Vec<u8> {
    let mut p = counter.to_le_bytes().to_vec();
    p.extend((0..=255u8).cycle().skip(counter as usize % 256).take(300));
    p
}

/// Receives `n` data frames, acknowledging each at once.
fn recv_acking(client: &mut Client, n: usize) -> Vec<Frame> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let f = client
            .recv(T)
            .unwrap()
            .unwrap_or_else(|| panic!("timed out after {} of {n} frames", got.len()));
        if f.header.kind.is_data() {
            client.ack(f.header.msg_id).unwrap();
            got.push(f);
        }
    }
    got
}

fn expect_nack(client: &mut Client, msg_id: u64, reason: NackReason) {
    let deadline = Instant::now() + T;
    loop {
        let f = client
            .recv(deadline.saturating_duration_since(Instant::now()))
            .unwrap()
            .expect("no NACK came");
        if f.header.kind == Kind::Nack {
            assert_eq!(f.header.nack_reason(), Some(reason), "{f:?}");
            assert_eq!(f.header.msg_id, msg_id);
            return;
        }
        assert_eq!(f.header.kind, Kind::Ack, "unexpected {f:?}");
    }
}

fn expect_closed(client: &mut Client) {
    let deadline = Instant::now() + T;
    loop {
        match client.recv(Duration::from_millis(200)) {
            Err(ClientError::Closed) => return,
            Err(ClientError::Io(_)) => return,
            Ok(_) => assert!(Instant::now() < deadline, "connection was not closed"),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn backlog_arrives_in_level_order_and_fifo_within_level() {
    let engine = start("rate = 100000\nburst = 10000\nwindow = 1000", "");
    let mut csp = engine.csp();
    // (kind, srv or alert code, expected level)
    let mix: [(Kind, &str, u16, u8); 6] = [
        (Kind::Response, "1.1.1", 0, 4),
        (Kind::Response, "2.2", 0, 1),
        (Kind::DeviceAlert, "0.0", 0x8F75, 3),
        (Kind::Response, "8.1.1", 0, 2),
        (Kind::DeviceAlert, "0.0", 0x8F1C, 1),
        (Kind::Response, "4.1.1", 0, 3),
    ];
    let mut expected_level = std::collections::HashMap::new();
    let frames: Vec<Frame> = (0..600u64)
        .map(|i| {
            let (kind, s, code, level) = mix[(i * 7 % 6) as usize];
            expected_level.insert(i, level);
            frame(kind, SU1, srv(s), code, i, payload(i))
        })
        .collect();
    let last = csp.send_batch(frames).unwrap();
    assert!(csp.wait_ack(last, T).unwrap().is_empty(), "no NACKs");

    let mut su = engine.su(SU1, "su1-token");
    let got = recv_acking(&mut su, 600);
    let mut last_seen = [None::<u64>; 5];
    let mut prev_level = 0;
    for (i, f) in got.iter().enumerate() {
        let counter = f.header.counter;
        let level = f.header.priority;
        assert_eq!(level, expected_level[&counter], "frame {counter}");
        assert!(level >= prev_level, "level {level} after {prev_level}");
        prev_level = level;
        if let Some(before) = last_seen[level as usize] {
            assert!(counter > before, "FIFO within level {level}");
        }
        last_seen[level as usize] = Some(counter);
        assert_eq!(
            f.payload.as_ref(),
            payload(counter).as_slice(),
            "payload byte for byte"
        );
        assert_eq!(f.header.msg_id, i as u64 + 1);
        assert_eq!(f.header.su_id, SU1);
        assert_eq!(f.header.created_ns, 1_700_000_000_000_000_000 + counter);
    }
    // Nothing more, nothing for the other SU.
    assert!(su.recv(Duration::from_millis(200)).unwrap().is_none());
    let mut su2 = engine.su(SU2, "su2-token");
    assert!(su2.recv(Duration::from_millis(200)).unwrap().is_none());
}

#[test]
fn urgent_frame_overtakes_a_rate_limited_backlog_and_a_full_window() {
    // 20/s, burst 5, window 8 of which 2 are for level 1 only.
    let engine = start(
        "rate = 20\nburst = 5\nwindow = 8\nwindow_reserved_top = 2",
        "",
    );
    let mut csp = engine.csp();
    let routine: Vec<Frame> = (0..100).map(|i| response(SU1, "1.1.1", i)).collect();
    let last = csp.send_batch(routine).unwrap();
    csp.wait_ack(last, T).unwrap();

    let mut su = engine.su(SU1, "su1-token");
    // Hold every frame unacknowledged: routine frames stop at 8 − 2 = 6.
    let mut held = Vec::new();
    while held.len() < 6 {
        let f = su.recv(T).unwrap().expect("routine frame");
        assert_eq!(f.header.priority, 4);
        held.push(f);
    }
    assert!(
        su.recv(Duration::from_millis(500)).unwrap().is_none(),
        "a 7th routine frame went out with a full window"
    );
    // A top-up arrives: it overtakes the 94 waiting routine frames and uses a reserved slot.
    let urgent_id = csp.send(response(SU1, "2.2", 1000)).unwrap();
    csp.wait_ack(urgent_id, T).unwrap();
    let f = su.recv(T).unwrap().expect("urgent frame");
    assert_eq!((f.header.counter, f.header.priority), (1000, 1));
    assert_eq!(f.header.msg_id, 7);
}

#[test]
fn steady_delivery_is_within_ten_percent_of_the_rate() {
    let engine = start("rate = 200\nburst = 10\nwindow = 64", "");
    let mut csp = engine.csp();
    let n = 600u64;
    let last = csp
        .send_batch((0..n).map(|i| response(SU1, "1.1.1", i)))
        .unwrap();
    csp.wait_ack(last, T).unwrap();
    let mut su = engine.su(SU1, "su1-token");
    let mut times = Vec::with_capacity(n as usize);
    while (times.len() as u64) < n {
        let f = su.recv(T).unwrap().expect("frame");
        times.push(Instant::now());
        su.ack(f.header.msg_id).unwrap();
    }
    // After the first burst of 10, frames 10..599 come at the rate.
    let elapsed = times[n as usize - 1] - times[10];
    let rate = (n - 11) as f64 / elapsed.as_secs_f64();
    assert!(
        (180.0..=220.0).contains(&rate),
        "rate {rate:.1}/s, want 200 ± 10 %"
    );
}

#[test]
fn southbound_goes_in_level_order_and_responses_inherit_their_requests_level() {
    let engine = start("rate = 100000\nburst = 10000\nwindow = 1000", "");
    let mut su = engine.su(SU1, "su1-token");
    let srvs = [("1.1.1", 4u8), ("2.2", 1), ("8.1.1", 2), ("4.1.1", 3)];
    let requests: Vec<Frame> = (0..40u64)
        .map(|i| request(SU1, srvs[(i % 4) as usize].0, i))
        .collect();
    let last = su.send_batch(requests).unwrap();
    assert!(su.wait_ack(last, T).unwrap().is_empty());

    let mut csp = engine.csp();
    let got = recv_acking(&mut csp, 40);
    let order: Vec<(u8, u64)> = got
        .iter()
        .map(|f| (f.header.priority, f.header.counter))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "level order, FIFO within level");
    for f in &got {
        assert_eq!(f.header.kind, Kind::Request);
        assert_eq!(f.header.su_id, SU1);
        assert_eq!(f.header.priority, srvs[(f.header.counter % 4) as usize].1);
        assert_eq!(f.payload.as_ref(), payload(f.header.counter).as_slice());
    }
    // The CSP answers request 1 (2.2, level 1) with a response whose own SRV would be level 4,
    // and request 0 (1.1.1, level 4) with one whose SRV would be level 1: each inherits.
    let swapped_1 = frame(Kind::Response, SU1, srv("1.1.1"), 0, 1, payload(1));
    let swapped_0 = frame(Kind::Response, SU1, srv("2.2"), 0, 0, payload(0));
    let last = csp.send_batch([swapped_0, swapped_1]).unwrap();
    csp.wait_ack(last, T).unwrap();
    let back = recv_acking(&mut su, 2);
    // The SU is connected and idle, so each goes as soon as it arrives: compare by counter.
    let mut levels: Vec<(u64, u8)> = back
        .iter()
        .map(|f| (f.header.counter, f.header.priority))
        .collect();
    levels.sort();
    assert_eq!(levels, vec![(0, 4), (1, 1)]);
}

#[test]
fn requests_are_routed_by_device_range() {
    let csps = "[[csp]]\nname = \"low\"\ntoken = \"csp-token\"\nrate = 100000\ndevice_ranges = [\"00-00-00-00-00-00-00-00..7F-FF-FF-FF-FF-FF-FF-FF\"]\n\
                [[csp]]\nname = \"high\"\ntoken = \"csp-high-token\"\nrate = 100000\ndevice_ranges = [\"80-00-00-00-00-00-00-00..8F-FF-FF-FF-FF-FF-FF-FF\"]\n";
    let engine = start("", csps);
    let mut low = engine.csp();
    let mut high = Client::connect_csp(engine.csp_addr(), "csp-high-token").unwrap();
    let mut su = engine.su(SU1, "su1-token");
    let mut to_high = request(SU1, "1.1.1", 1);
    to_high.header.device_id = Eui64(0x8000_0000_0000_0001);
    let mut nowhere = request(SU1, "1.1.1", 2);
    nowhere.header.device_id = Eui64(0xF000_0000_0000_0000);
    let a = su.send(request(SU1, "1.1.1", 0)).unwrap();
    let b = su.send(to_high).unwrap();
    let c = su.send(nowhere).unwrap();
    expect_nack(&mut su, c, NackReason::UnknownDestination);
    let _ = (a, b);
    assert_eq!(recv_acking(&mut low, 1)[0].header.counter, 0);
    assert_eq!(recv_acking(&mut high, 1)[0].header.counter, 1);
}

#[test]
fn a_spoofed_su_id_gets_nack_3_and_the_connection_carries_on() {
    let engine = start("", "");
    let mut su = engine.su(SU1, "su1-token");
    let spoofed = su.send(request(SU2, "2.2", 1)).unwrap();
    expect_nack(&mut su, spoofed, NackReason::Unauthorised);
    let good = su.send(request(SU1, "2.2", 2)).unwrap();
    assert!(su.wait_ack(good, T).unwrap().is_empty());
    let mut csp = engine.csp();
    let got = recv_acking(&mut csp, 1);
    assert_eq!(got[0].header.counter, 2, "the spoofed request was dropped");
}

#[test]
fn refusals_of_protocol_md() {
    let engine = start("", "");
    // A CSP HELLO on the SU port, an SU HELLO on the CSP port: NACK 6.
    for (addr, role) in [(engine.su_addr(), Role::Csp), (engine.csp_addr(), Role::Su)] {
        match Client::connect(addr, role, SU1, "su1-token") {
            Err(ClientError::Refused { reason, .. }) => {
                assert_eq!(reason, Some(NackReason::UnexpectedKind))
            }
            other => panic!("{other:?}"),
        }
    }
    // A data frame before HELLO: NACK 6 and closed.
    let mut raw = Client::connect_raw(engine.su_addr()).unwrap();
    raw.send(request(SU1, "2.2", 1)).unwrap();
    expect_nack(&mut raw, 1, NackReason::UnexpectedKind);
    expect_closed(&mut raw);
    // A REQUEST from a CSP, a RESPONSE from an SU: NACK 6, connection kept.
    let mut csp = engine.csp();
    let id = csp.send(request(SU1, "2.2", 1)).unwrap();
    expect_nack(&mut csp, id, NackReason::UnexpectedKind);
    let mut su = engine.su(SU1, "su1-token");
    let id = su.send(response(SU1, "2.2", 1)).unwrap();
    expect_nack(&mut su, id, NackReason::UnexpectedKind);
    // A response for an SU nobody configured: NACK 4.
    let id = csp.send(response(Eui64(99), "2.2", 1)).unwrap();
    expect_nack(&mut csp, id, NackReason::UnknownDestination);
    // PING is answered.
    su.send_frame(&Frame::ping()).unwrap();
    let pong = su.recv(T).unwrap().unwrap();
    assert_eq!(pong.header.kind, Kind::Pong);
    // Last, since three bad tokens make this address wait (tests/hostile.rs).
    // Bad token, unknown SU: NACK 3.
    for (id, token) in [(SU1, "wrong"), (Eui64(7), "su1-token")] {
        match Client::connect_su(engine.su_addr(), id, token) {
            Err(ClientError::Refused { reason, .. }) => {
                assert_eq!(reason, Some(NackReason::Unauthorised))
            }
            other => panic!("{other:?}"),
        }
    }
    match Client::connect_csp(engine.csp_addr(), "su1-token") {
        Err(ClientError::Refused { reason, .. }) => {
            assert_eq!(reason, Some(NackReason::Unauthorised))
        }
        other => panic!("{other:?}"),
    }
}

/// The header of a valid REQUEST from SU1, as bytes, for corrupting.
fn valid_request_bytes(msg_id: u64) -> Vec<u8> {
    let mut f = request(SU1, "2.2", 1);
    f.header.msg_id = msg_id;
    let mut b = f.header_bytes().to_vec();
    b.extend_from_slice(&f.payload);
    b
}

#[test]
fn every_malformed_frame_gets_nack_1_and_costs_only_its_connection() {
    let engine = start("rate = 100000\nburst = 1000", "");
    let mut bystander = engine.su(SU2, "su2-token");
    let mut csp = engine.csp();
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, Corrupt); 8] = [
        ("bad magic", |b| b[0] = b'X'),
        ("bad version", |b| b[4] = 2),
        ("kind 0", |b| b[5] = 0),
        ("kind 12", |b| b[5] = 12),
        ("reserved not zero", |b| b[60] = 1),
        ("mode 3", |b| b[6] = 3),
        ("payload over max_payload", |b| {
            b[56..60].copy_from_slice(&(65_537u32).to_le_bytes())
        }),
        ("msg_id not increasing", |b| {
            b[40..48].copy_from_slice(&0u64.to_le_bytes())
        }),
    ];
    for (i, (name, corrupt)) in cases.iter().enumerate() {
        let mut su = engine.su(SU1, "su1-token");
        let ok = su.send(request(SU1, "2.2", 100)).unwrap();
        su.wait_ack(ok, T).unwrap();
        let mut bytes = valid_request_bytes(2);
        corrupt(&mut bytes);
        let msg_id = u64::from_le_bytes(bytes[40..48].try_into().unwrap());
        su.send_raw(&bytes).unwrap();
        expect_nack(&mut su, msg_id, NackReason::Malformed);
        expect_closed(&mut su);
        // The other peers never noticed.
        let id = csp.send(response(SU2, "2.2", i as u64)).unwrap();
        csp.wait_ack(id, T).unwrap();
        let f = recv_acking(&mut bystander, 1);
        assert_eq!(f[0].header.counter, i as u64, "after {name}");
    }
    assert_eq!(HEADER_LEN, 64);
}

#[test]
fn a_second_hello_takes_over_and_gets_the_unacknowledged_frames_again() {
    let engine = start("rate = 100000\nburst = 1000", "");
    let mut csp = engine.csp();
    let last = csp
        .send_batch((0..5).map(|i| response(SU1, "1.1.1", i)))
        .unwrap();
    csp.wait_ack(last, T).unwrap();
    let mut first = engine.su(SU1, "su1-token");
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let f = first.recv(T).unwrap().unwrap();
        seen.push(f.header.counter);
    }
    // Acknowledge the first two only.
    first.ack(2).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut second = engine.su(SU1, "su1-token");
    expect_closed(&mut first);
    let again = recv_acking(&mut second, 3);
    let ids: Vec<(u64, u64)> = again
        .iter()
        .map(|f| (f.header.msg_id, f.header.counter))
        .collect();
    assert_eq!(ids, vec![(1, 2), (2, 3), (3, 4)]);
    assert!(second.recv(Duration::from_millis(200)).unwrap().is_none());
}

#[test]
fn a_reconnect_releases_the_backlog_on_a_ramp() {
    // 100/s, burst 100, ramp from 10 % over 10 s: the first second releases about
    // 10 (cut burst) + 14.5 tokens, far below the 100 + 100 an unramped link would.
    let engine = start(
        "rate = 100\nburst = 100\nwindow = 1000\nrelease_start = 0.1\nrelease_ramp_s = 10",
        "",
    );
    let mut csp = engine.csp();
    let last = csp
        .send_batch((0..300).map(|i| response(SU1, "1.1.1", i)))
        .unwrap();
    csp.wait_ack(last, T).unwrap();
    let mut su = engine.su(SU1, "su1-token");
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(1) {
        if let Some(f) = su.recv(Duration::from_millis(50)).unwrap() {
            su.ack(f.header.msg_id).unwrap();
            n += 1;
        }
    }
    assert!(
        (15..=40).contains(&n),
        "{n} frames in the first second of a ramp"
    );
}

#[test]
fn beyond_its_nms_share_an_absent_sus_traffic_goes_to_disk_and_keeps_its_order() {
    // A share of 5 frames in memory: the other 295 wait in the SURB, on disk only.
    let engine = start("nms_per_su = 5\nrate = 100000\nburst = 1000", "");
    let mut csp = engine.csp();
    let srvs = [("1.1.1", 4u8), ("4.1.1", 3), ("8.1.1", 2), ("2.2", 1)];
    let last = csp
        .send_batch((0..300u64).map(|i| response(SU1, srvs[(i * 5 % 4) as usize].0, i)))
        .unwrap();
    assert!(csp.wait_ack(last, T).unwrap().is_empty(), "nothing refused");
    let mut su = engine.su(SU1, "su1-token");
    let got = recv_acking(&mut su, 300);
    let order: Vec<(u8, u64)> = got
        .iter()
        .map(|f| (f.header.priority, f.header.counter))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(
        order, sorted,
        "strict level order, FIFO within level, across both tiers"
    );
    for f in &got {
        assert_eq!(
            f.header.priority,
            srvs[(f.header.counter * 5 % 4) as usize].1
        );
        assert_eq!(f.payload.as_ref(), payload(f.header.counter).as_slice());
    }
    assert!(
        su.recv(Duration::from_millis(200)).unwrap().is_none(),
        "no duplicates"
    );
}

#[test]
fn an_idle_connection_is_closed_and_ping_keeps_one_open() {
    let text = "[[csp]]\nname = \"csp-a\"\ntoken = \"csp-token\"\n";
    let mut cfg = config("", text);
    cfg.engine.idle_timeout = Duration::from_secs(1);
    let engine = Running(Some(Engine::start(cfg).unwrap()));
    let mut quiet = engine.su(SU1, "su1-token");
    let mut chatty = engine.su(SU2, "su2-token");
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2_500) {
        chatty.send_frame(&Frame::ping()).unwrap();
        let pong = chatty.recv(T).unwrap().expect("PONG");
        assert_eq!(pong.header.kind, Kind::Pong);
        std::thread::sleep(Duration::from_millis(250));
    }
    expect_closed(&mut quiet);
    chatty.send_frame(&Frame::ping()).unwrap();
    assert_eq!(chatty.recv(T).unwrap().unwrap().header.kind, Kind::Pong);
}

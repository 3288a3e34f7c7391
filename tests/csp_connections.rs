//! A CSP link with several connections (`csp.connections_max`), on a real engine of two
//! workers over loopback: HELLOs up to the limit are accepted and the next is refused (NACK 5,
//! closed); each connection has its own `msg_id` sequence and its own cumulative ACKs both ways;
//! the link's requests are spread over its connections (the second is held by the other
//! worker); and what a closed connection had not acknowledged is re-sent on the other.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::{Client, ClientError};
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind, NackReason, Role};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const DEVICE: Eui64 = Eui64(0x00DB_1234_5678_90A0);
const T: Duration = Duration::from_secs(10);

/// Stops the engine when the test ends, pass or fail.
struct Running(Option<Engine>, std::path::PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(engine) = self.0.take() {
            engine.shutdown();
            engine.join();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

impl Running {
    fn engine(&self) -> &Engine {
        self.0.as_ref().unwrap()
    }
    fn csp(&self) -> Result<Client, ClientError> {
        Client::connect_csp(self.engine().csp_addr(), "csp-token")
    }
    fn su(&self) -> Client {
        Client::connect_su(self.engine().su_addr(), SU1, "su1-token").unwrap()
    }
}

fn start(name: &str, connections_max: u32) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = std::env::temp_dir().join(format!("dsplane-csp-conns-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        r#"
[engine]
cores = 2
data_dir = "{}"
durability = "none"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[delivery]
rate = 100000
burst = 10000
window = 1000
release_start = 1.0
[service_requests]
sr_rate = 100000
sr_burst = 10000
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"
[[csp]]
name = "csp-a"
token = "csp-token"
rate = 100000
burst = 1000
window = 1000
connections_max = {connections_max}
"#,
        dir.display()
    );
    let config = Config::from_toml(&text).unwrap();
    Running(Some(Engine::start(config).unwrap()), dir)
}

fn frame(kind: Kind, counter: u64) -> Frame {
    let mut h = Header::new(kind);
    h.su_id = SU1;
    h.device_id = DEVICE;
    h.srv = "1.1.1".parse::<Srv>().unwrap();
    h.counter = counter;
    h.created_ns = 1_700_000_000_000_000_000 + counter;
    Frame::new(h, Bytes::from(counter.to_le_bytes().to_vec())).unwrap()
}

/// A HELLO beyond the link's limit: NACK 5 with a detail naming the limit, then the close.
fn assert_refused_and_closed(engine: &Running) {
    let mut raw = Client::connect_raw(engine.engine().csp_addr()).unwrap();
    raw.send_frame(&Frame::hello(Role::Csp, Eui64(0), "csp-token").unwrap())
        .unwrap();
    let nack = raw.recv(T).unwrap().expect("an answer to the HELLO");
    assert_eq!(nack.header.kind, Kind::Nack);
    assert_eq!(nack.header.nack_reason(), Some(NackReason::Overloaded));
    let detail = String::from_utf8_lossy(&nack.payload).into_owned();
    assert!(
        detail.contains("csp-a") && detail.contains("connections_max"),
        "{detail}"
    );
    assert!(
        matches!(raw.recv(T), Err(ClientError::Closed)),
        "closed after the NACK"
    );
}

/// Reads data frames from both connections until `n` have come in all, ACKing those of
/// connection `a` at once (if `ack_a`) and never those of `b`: (frames of a, frames of b).
fn read_both(a: &mut Client, b: &mut Client, n: usize, ack_a: bool) -> (Vec<Frame>, Vec<Frame>) {
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + T;
    while got_a.len() + got_b.len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out with {} + {} of {n}",
            got_a.len(),
            got_b.len()
        );
        while let Some(f) = a.recv(Duration::from_millis(5)).unwrap() {
            if f.header.kind == Kind::Request {
                if ack_a {
                    a.ack(f.header.msg_id).unwrap();
                }
                got_a.push(f);
            }
        }
        while let Some(f) = b.recv(Duration::from_millis(5)).unwrap() {
            if f.header.kind == Kind::Request {
                got_b.push(f);
            }
        }
    }
    (got_a, got_b)
}

fn msg_ids(frames: &[Frame]) -> Vec<u64> {
    frames.iter().map(|f| f.header.msg_id).collect()
}

#[test]
fn a_link_holds_up_to_connections_max_each_with_its_own_msg_ids_and_acks() {
    let engine = start("two", 2);
    let mut su = engine.su();
    let mut a = engine.csp().unwrap();
    let mut b = engine.csp().unwrap();
    assert_refused_and_closed(&engine);

    // Northbound: both connections' frames reach the SU, and each connection gets its own
    // cumulative ACKs (its msg_ids start at 1, as the other's do).
    let from_a: Vec<Frame> = (0..20).map(|i| frame(Kind::Response, i)).collect();
    let from_b: Vec<Frame> = (100..130).map(|i| frame(Kind::Response, i)).collect();
    let last_a = a.send_batch(from_a).unwrap();
    let last_b = b.send_batch(from_b).unwrap();
    assert_eq!((last_a, last_b), (20, 30));
    assert!(a.wait_ack(last_a, T).unwrap().is_empty());
    assert!(b.wait_ack(last_b, T).unwrap().is_empty());
    assert_eq!((a.acked(), b.acked()), (20, 30), "each its own ACKs");
    let mut counters = BTreeSet::new();
    while counters.len() < 50 {
        let f = su.recv(T).unwrap().expect("every response reaches the SU");
        if f.header.kind == Kind::Response {
            su.ack(f.header.msg_id).unwrap();
            counters.insert(f.header.counter);
        }
    }
    let want: BTreeSet<u64> = (0..20).chain(100..130).collect();
    assert_eq!(counters, want);

    // Southbound: the SU's requests go over both connections, each with its own msg_ids
    // from 1. Connection a acknowledges what it gets; b acknowledges nothing.
    let requests: Vec<Frame> = (1000..1040).map(|i| frame(Kind::Request, i)).collect();
    let last = su.send_batch(requests).unwrap();
    assert!(su.wait_ack(last, T).unwrap().is_empty());
    let (got_a, got_b) = read_both(&mut a, &mut b, 40, true);
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "spread over both: {} and {}",
        got_a.len(),
        got_b.len()
    );
    assert_eq!(
        msg_ids(&got_a),
        (1..=got_a.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        msg_ids(&got_b),
        (1..=got_b.len() as u64).collect::<Vec<_>>()
    );
    let all: BTreeSet<u64> = got_a
        .iter()
        .chain(&got_b)
        .map(|f| f.header.counter)
        .collect();
    assert_eq!(all, (1000..1040).collect());

    // b closes with everything it got unacknowledged: exactly those are re-sent on a, whose
    // msg_ids go on from where they were.
    let unacked_on_b: BTreeSet<u64> = got_b.iter().map(|f| f.header.counter).collect();
    drop(b);
    let mut again = Vec::new();
    while again.len() < unacked_on_b.len() {
        let f = a
            .recv(T)
            .unwrap()
            .unwrap_or_else(|| panic!("{} of {} re-sent", again.len(), unacked_on_b.len()));
        if f.header.kind == Kind::Request {
            a.ack(f.header.msg_id).unwrap();
            again.push(f);
        }
    }
    let resent: BTreeSet<u64> = again.iter().map(|f| f.header.counter).collect();
    assert_eq!(resent, unacked_on_b);
    let next = got_a.len() as u64 + 1;
    assert_eq!(
        msg_ids(&again),
        (next..next + again.len() as u64).collect::<Vec<_>>()
    );
    assert!(
        a.recv(Duration::from_millis(200)).unwrap().is_none(),
        "nothing more"
    );

    // b's place is free again: a new connection is accepted.
    let _b2 = engine.csp().unwrap();
}

#[test]
fn with_one_connection_a_second_csp_hello_is_refused_while_the_first_is_open() {
    let engine = start("one", 1);
    let mut first = engine.csp().unwrap();
    assert_refused_and_closed(&engine);
    // The first is untouched: it still carries traffic.
    let id = first.send(frame(Kind::Response, 1)).unwrap();
    assert!(first.wait_ack(id, T).unwrap().is_empty());
    // Once it is closed, a new HELLO is accepted at once (within the acceptor's short wait
    // for a close it has yet to see).
    drop(first);
    let mut second = engine.csp().unwrap();
    let id = second.send(frame(Kind::Response, 2)).unwrap();
    assert_eq!(id, 1, "its own msg_ids");
    assert!(second.wait_ack(id, T).unwrap().is_empty());
}

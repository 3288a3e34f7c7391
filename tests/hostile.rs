//! Hostile and broken peers (issue 9): connection limits, bad-token back-off, a HELLO never
//! sent, a CSP that disconnects mid-frame, an SU that stops reading. Nothing a peer does may
//! cost another peer.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::{Client, ClientError};
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind, NackReason};

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const SU2: Eui64 = Eui64(0x90B3_D51F_3001_0001);
const T: Duration = Duration::from_secs(10);

fn engine(name: &str, extra: &str) -> Engine {
    let dir = std::env::temp_dir().join(format!("dsplane-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        r#"
[engine]
cores = 2
durability = "none"
data_dir = "{}"
idle_timeout_s = 1
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
{extra}
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
[priority]
rules = [ {{ srv = "2.2", level = 1 }} ]
"#,
        dir.display()
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    Engine::start(Config::from_toml(&text).unwrap()).unwrap()
}

fn stop(e: Engine) {
    e.shutdown();
    e.join();
}

fn refused_with(result: Result<Client, ClientError>) -> (Option<NackReason>, String) {
    match result {
        Err(ClientError::Refused { reason, detail }) => (reason, detail),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn response(su: Eui64, srv: &str, counter: u64, payload: usize) -> Frame {
    let mut h = Header::new(Kind::Response);
    h.su_id = su;
    h.srv = srv.parse::<Srv>().unwrap();
    h.counter = counter;
    Frame::new(h, Bytes::from(vec![counter as u8; payload])).unwrap()
}

#[test]
fn a_port_refuses_connections_beyond_its_limit_clearly() {
    let e = engine("limit", "connections_max = 2");
    let a = TcpStream::connect(e.su_addr()).unwrap();
    let _b = Client::connect_su(e.su_addr(), SU1, "su1-token").unwrap();
    let mut c = Client::connect_raw(e.su_addr()).unwrap();
    let f = c.recv(T).unwrap().expect("a refusal");
    assert_eq!(f.header.nack_reason(), Some(NackReason::Overloaded));
    assert!(String::from_utf8_lossy(&f.payload).contains("connection limit"));
    // The CSP port has its own limit.
    let _csp = Client::connect_csp(e.csp_addr(), "csp-token").unwrap();
    // One closes: room again.
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    let _d = Client::connect_su(e.su_addr(), SU2, "su2-token").unwrap();
    stop(e);
}

#[test]
fn repeated_bad_tokens_make_an_address_wait() {
    let e = engine("backoff", "");
    for _ in 0..3 {
        let (reason, _) = refused_with(Client::connect_su(e.su_addr(), SU1, "wrong"));
        assert_eq!(reason, Some(NackReason::Unauthorised));
    }
    // Now even the right token waits.
    let (reason, detail) = refused_with(Client::connect_su(e.su_addr(), SU1, "su1-token"));
    assert_eq!(reason, Some(NackReason::Unauthorised));
    assert!(detail.contains("retry in"), "{detail}");
    std::thread::sleep(Duration::from_millis(1_100));
    let _ok = Client::connect_su(e.su_addr(), SU1, "su1-token").unwrap();
    stop(e);
}

#[test]
fn a_connection_that_never_says_hello_is_closed() {
    let e = engine("nohello", "");
    let mut silent = Client::connect_raw(e.su_addr()).unwrap();
    let start = Instant::now();
    loop {
        match silent.recv(Duration::from_millis(100)) {
            Err(_) => break,
            Ok(_) => assert!(start.elapsed() < Duration::from_secs(5), "still open"),
        }
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    stop(e);
}

#[test]
fn a_csp_that_disconnects_mid_frame_costs_nothing_else() {
    let e = engine("midframe", "");
    let mut su = Client::connect_su(e.su_addr(), SU1, "su1-token").unwrap();
    let broken = Client::connect_csp(e.csp_addr(), "csp-token").unwrap();
    let whole = response(SU1, "1.1.1", 1, 100);
    let mut bytes = whole.header_bytes().to_vec();
    bytes.extend_from_slice(&whole.payload[..40]);
    let mut stream = broken.stream().try_clone().unwrap();
    stream.write_all(&bytes).unwrap();
    drop(stream);
    drop(broken);
    std::thread::sleep(Duration::from_millis(200));
    let mut csp = Client::connect_csp(e.csp_addr(), "csp-token").unwrap();
    let id = csp.send(response(SU1, "1.1.1", 2, 100)).unwrap();
    assert!(csp.wait_ack(id, T).unwrap().is_empty());
    let f = su.recv(T).unwrap().unwrap();
    assert_eq!(f.header.counter, 2, "the half frame was never delivered");
    assert!(su.recv(Duration::from_millis(200)).unwrap().is_none());
    stop(e);
}

#[test]
fn an_su_that_stops_reading_does_not_slow_the_others() {
    let e = engine("stuck", "");
    // SU1 connects and never reads nor acknowledges; its traffic keeps coming.
    let stuck = Client::connect_su(e.su_addr(), SU1, "su1-token").unwrap();
    // It never reads, but it sends PINGs, so the 1 s idle timeout does not close it: dsplane has
    // to cope with a connected peer whose socket stays full.
    let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pinger = {
        let mut stream = stuck.stream().try_clone().unwrap();
        let alive = std::sync::Arc::clone(&alive);
        std::thread::spawn(move || {
            let ping = Frame::ping();
            let mut bytes = ping.header_bytes().to_vec();
            bytes.extend_from_slice(&ping.payload);
            while alive.load(std::sync::atomic::Ordering::Relaxed) {
                if stream.write_all(&bytes).is_err() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            true
        })
    };
    let mut su2 = Client::connect_su(e.su_addr(), SU2, "su2-token").unwrap();
    let mut csp = Client::connect_csp(e.csp_addr(), "csp-token").unwrap();
    let last = csp
        .send_batch((0..20_000).map(|i| response(SU1, "1.1.1", i, 1_000)))
        .unwrap();
    assert!(csp
        .wait_ack(last, Duration::from_secs(60))
        .unwrap()
        .is_empty());
    // SU2's urgent frames still go straight through.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let id = csp.send(response(SU2, "2.2", 100_000 + i, 100)).unwrap();
        csp.wait_ack(id, T).unwrap();
        let f = su2.recv(T).unwrap().expect("urgent frame for SU2");
        su2.ack(f.header.msg_id).unwrap();
        assert_eq!((f.header.counter, f.header.priority), (100_000 + i, 1));
        worst = worst.max(t.elapsed());
    }
    println!("worst urgent round trip for SU2 beside a stuck SU1: {worst:?}");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    alive.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(
        pinger.join().unwrap(),
        "the stuck SU's connection was closed"
    );
    drop(stuck);
    stop(e);
}

//! Hostile and broken peers (issue 9): connection limits, bad-token back-off, a HELLO never
//! sent, a CSP that disconnects mid-frame, an SU that stops reading. Nothing a peer does may
//! cost another peer.

mod common;

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
    engine_with(name, 1, extra)
}

/// An engine whose `[engine] idle_timeout_s` is `idle_s`, with `extra` in `[listen]`.
fn engine_with(name: &str, idle_s: u32, extra: &str) -> Engine {
    let dir = std::env::temp_dir().join(format!("dsplane-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        r#"
[engine]
cores = 2
durability = "none"
data_dir = "{}"
idle_timeout_s = {idle_s}
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
        Err(ClientError::Refused { reason, detail, .. }) => (reason, detail),
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
    let e = engine("limit", "connections_max = 1");
    // Connections that have not said HELLO do not count against the limit: it is the peers'.
    let idle: Vec<_> = (0..3)
        .map(|_| TcpStream::connect(e.su_addr()).unwrap())
        .collect();
    let a = Client::connect_su(e.su_addr(), SU1, "su1-token").unwrap();
    let (reason, detail) = refused_with(Client::connect_su(e.su_addr(), SU2, "su2-token"));
    assert_eq!(reason, Some(NackReason::Overloaded));
    assert!(detail.contains("connection limit"), "{detail}");
    // The CSP port has its own limit.
    let _csp = Client::connect_csp(e.csp_addr(), "csp-token").unwrap();
    // One closes: room again.
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    let _d = Client::connect_su(e.su_addr(), SU2, "su2-token").unwrap();
    drop(idle);
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

// ---------------------------------------------------------------------------------------------
// Issue 13: peers that cannot lock others out.

/// Many idle TCP connections that never send HELLO, from chosen loopback source addresses
/// (bind before connect), reconnected as soon as dsplane closes them.
struct Attacker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<AttackStats>,
}

#[derive(Debug, Default)]
struct AttackStats {
    /// Connections opened, first ones and reconnections.
    connects: u64,
    /// Connections dsplane closed with NACK 5 and a detail.
    nacked_overloaded: u64,
    /// Connections closed with another NACK (e.g. no HELLO in time).
    nacked_other: u64,
    /// Connections closed with no NACK at all.
    closed_silently: u64,
    /// One NACK 5 detail, as sent.
    detail: String,
}

fn connect_from(
    source: std::net::Ipv4Addr,
    to: std::net::SocketAddr,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SockAddr::from(std::net::SocketAddr::from((source, 0))))?;
    s.connect_timeout(&SockAddr::from(to), Duration::from_secs(1))?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

impl Attacker {
    /// `sources`: (address, connections from it); connections alternate between `targets`.
    fn start(
        targets: Vec<std::net::SocketAddr>,
        sources: Vec<(std::net::Ipv4Addr, usize)>,
    ) -> Attacker {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut stats = AttackStats::default();
            let plan: Vec<(std::net::Ipv4Addr, std::net::SocketAddr)> = sources
                .iter()
                .flat_map(|&(ip, n)| (0..n).map(move |i| (ip, i)))
                .enumerate()
                .map(|(k, (ip, _))| (ip, targets[k % targets.len()]))
                .collect();
            let mut socks: Vec<Option<(TcpStream, Vec<u8>)>> = plan.iter().map(|_| None).collect();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                // At most this many new connections per pass, so the attack is a steady churn
                // rather than a run on the ephemeral ports.
                let mut budget = 40;
                for (k, slot) in socks.iter_mut().enumerate() {
                    if let Some((s, buf)) = slot {
                        let mut chunk = [0u8; 1024];
                        let closed = match std::io::Read::read(s, &mut chunk) {
                            Ok(0) => true,
                            Ok(n) => {
                                buf.extend_from_slice(&chunk[..n]);
                                false
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                            Err(_) => true,
                        };
                        if closed {
                            if buf.len() >= 64 && buf[5] == Kind::Nack as u8 {
                                let aux = u16::from_le_bytes([buf[14], buf[15]]);
                                let len = u32::from_le_bytes([buf[56], buf[57], buf[58], buf[59]])
                                    as usize;
                                let detail =
                                    String::from_utf8_lossy(&buf[64..(64 + len).min(buf.len())])
                                        .into_owned();
                                if aux == NackReason::Overloaded as u16 && !detail.is_empty() {
                                    stats.nacked_overloaded += 1;
                                    stats.detail = detail;
                                } else {
                                    stats.nacked_other += 1;
                                }
                            } else {
                                stats.closed_silently += 1;
                            }
                            *slot = None;
                        }
                    }
                    if slot.is_none() && budget > 0 {
                        budget -= 1;
                        let (ip, to) = plan[k];
                        if let Ok(s) = connect_from(ip, to) {
                            stats.connects += 1;
                            *slot = Some((s, Vec::new()));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            stats
        });
        Attacker { stop, thread }
    }

    fn stop(self) -> AttackStats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn loopback(last: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 0, last)
}

/// Waits until `n` connections were opened by the attacker (or 20 s).
fn wait_established(n: usize) {
    // The attacker opens 40 per 2 ms pass at most: give it time for all of them.
    std::thread::sleep(Duration::from_millis((n as u64 / 40 + 1) * 4 + 1_000));
}

#[test]
fn idle_connections_from_attackers_do_not_lock_peers_out() {
    // idle_timeout_s = 30: the HELLO deadline is dsplane's own, not cut short by the idle timeout.
    let e = engine_with("attack", 30, "");
    // 1,100 idle connections from 100 addresses (11 each), and 100 more from one address, on
    // both ports: beyond the engine-wide and the per-address caps on pending handshakes.
    let mut sources: Vec<_> = (2..102).map(|i| (loopback(i), 11)).collect();
    sources.push((loopback(200), 100));
    let attacker = Attacker::start(vec![e.su_addr(), e.csp_addr()], sources);
    wait_established(1_200);
    let mut worst = Duration::ZERO;
    let mut attempts = 0;
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        let t = Instant::now();
        let su = Client::connect_su(e.su_addr(), SU1, "su1-token");
        let su_time = t.elapsed();
        assert!(
            su.is_ok(),
            "SU HELLO under attack: {:?} after {su_time:?}",
            su.err()
        );
        let t = Instant::now();
        let csp = Client::connect_csp(e.csp_addr(), "csp-token");
        let csp_time = t.elapsed();
        assert!(
            csp.is_ok(),
            "CSP HELLO under attack: {:?} after {csp_time:?}",
            csp.err()
        );
        worst = worst.max(su_time).max(csp_time);
        attempts += 2;
        drop((su, csp));
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = attacker.stop();
    println!("legit HELLO under attack: {attempts} of {attempts} in, worst {worst:?}; attacker: {stats:?}");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    assert!(
        stats.nacked_overloaded > 0,
        "excess connections were not told: {stats:?}"
    );
    assert!(stats.detail.contains("handshake"), "{stats:?}");
    assert_eq!(stats.closed_silently, 0, "{stats:?}");
    stop(e);
}

#[test]
fn the_right_token_gets_in_after_bad_tokens_from_the_same_address() {
    let e = engine_with("righttoken", 30, "");
    // Bad tokens, answered: the address has used up its free failures.
    for _ in 0..4 {
        let (reason, _) = refused_with(Client::connect_su(e.su_addr(), SU1, "wrong"));
        assert_eq!(reason, Some(NackReason::Unauthorised));
    }
    // Then, again and again, more bad tokens left waiting beside the right ones: the right SU
    // and CSP tokens from the same address get in at once.
    let mut guessers = Vec::new();
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        for _ in 0..3 {
            let mut g = Client::connect_raw(e.su_addr()).unwrap();
            g.send_frame(
                &Frame::hello(dsplane::wire::Role::Su, SU2, &format!("guess-{i}")).unwrap(),
            )
            .unwrap();
            guessers.push(g);
        }
        let t = Instant::now();
        let su = Client::connect_su(e.su_addr(), SU1, "su1-token");
        let csp = Client::connect_csp(e.csp_addr(), "csp-token");
        let took = t.elapsed();
        assert!(su.is_ok(), "right SU token refused: {:?}", su.err());
        assert!(csp.is_ok(), "right CSP token refused: {:?}", csp.err());
        worst = worst.max(took);
    }
    println!("right tokens after bad ones from the same address: worst {worst:?}");
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    stop(e);
}

#[test]
fn repeated_bad_tokens_make_an_address_wait() {
    let e = engine("backoff", "");
    // The first failures are answered at once.
    for _ in 0..3 {
        let t = Instant::now();
        let (reason, _) = refused_with(Client::connect_su(e.su_addr(), SU1, "wrong"));
        assert_eq!(reason, Some(NackReason::Unauthorised));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    // Beyond them, a bad token waits for its answer, so guessing is slow.
    let t = Instant::now();
    let (reason, detail) = refused_with(Client::connect_su(e.su_addr(), SU1, "wrong"));
    assert_eq!(reason, Some(NackReason::Unauthorised));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "answered after {:?}",
        t.elapsed()
    );
    assert!(detail.contains("bad token"), "{detail}");
    // The right token is not made to wait.
    let t = Instant::now();
    let _ok = Client::connect_su(e.su_addr(), SU1, "su1-token").unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    stop(e);
}

/// One request written as is; (status, elapsed), or `None` when no status line came in `within`.
fn http_within(
    addr: std::net::SocketAddr,
    request: &str,
    within: Duration,
) -> Option<(u16, String, Duration)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, within).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    s.set_write_timeout(Some(within)).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match std::io::Read::read(&mut s, &mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        if t.elapsed() > within {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body, t.elapsed()))
}

const GET_HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
const GET_METRICS: &str = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Joins the engine on another thread; how long it took, or `None` after `within`.
fn join_within(e: Engine, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        e.shutdown();
        e.join();
        let _ = tx.send(());
    });
    rx.recv_timeout(within).ok().map(|()| t.elapsed())
}

#[test]
fn a_stuck_admin_client_does_not_freeze_the_admin_interface_or_shutdown() {
    let e = engine("adminstuck", "");
    let admin = e.admin_addr();
    // Headers that promise a large body, then nothing.
    let mut stuck = TcpStream::connect(admin).unwrap();
    stuck
        .write_all(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        for request in [GET_HEALTHZ, GET_METRICS] {
            let answer = http_within(admin, request, Duration::from_secs(2));
            let (status, body, took) = answer.expect("the admin interface did not answer");
            assert_eq!(status, 200, "{body}");
            worst = worst.max(took);
        }
    }
    println!("/healthz and /metrics beside a stuck admin client: worst {worst:?}");
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    // Shutdown does not wait for the stuck client.
    let took = join_within(e, Duration::from_secs(3));
    drop(stuck);
    let took = took.expect("shutdown waited on a stuck admin client");
    println!("shutdown with a stuck admin client connected: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn an_admin_request_body_over_the_limit_gets_413() {
    let e = engine("admin413", "");
    let admin = e.admin_addr();
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        .unwrap();
    // Send the body from another thread: dsplane may answer (and close) before reading it.
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..31 {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = std::io::Read::read(&mut s, &mut chunk) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    drop(s);
    let _ = writer.join();
    // A body within the limit is still fine.
    let (status, _, _) = http_within(
        admin,
        "POST /restore HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(status, 200);
    stop(e);
}

fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

#[test]
fn a_thousand_admin_connections_do_not_start_a_thousand_threads() {
    let e = engine("admin1000", "");
    let admin = e.admin_addr();
    let before = threads_now();
    // 1,000 requests at once, each stopping halfway through its headers.
    let conns: Vec<TcpStream> = (0..1_000)
        .filter_map(|_| {
            let mut s = TcpStream::connect(admin).ok()?;
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
            Some(s)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = threads_now();
    // The operator still gets an answer.
    let answer = http_within(admin, GET_HEALTHZ, Duration::from_secs(2));
    println!(
        "{} stuck admin connections: threads {before} -> {during}; /healthz {answer:?}",
        conns.len()
    );
    assert!(
        during < before + 100,
        "threads grew from {before} to {during}"
    );
    let (status, _, took) = answer.expect("no answer beside 1,000 stuck connections");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(conns);
    let took = join_within(e, Duration::from_secs(3)).expect("shutdown hung");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn refused_connections_do_not_flood_the_log() {
    let dir = std::env::temp_dir().join(format!("dsplane-hostile-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("dsplane.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[engine]
cores = 1
durability = "none"
data_dir = "{}"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"
[[csp]]
name = "csp-a"
token = "csp-token"
"#,
            dir.join("data").display()
        ),
    )
    .unwrap();
    let mut d = common::spawn_dsplane(&config);
    let mut sources: Vec<_> = (2..102).map(|i| (loopback(i), 11)).collect();
    sources.push((loopback(200), 100));
    let attacker = Attacker::start(vec![d.su, d.csp], sources);
    wait_established(1_200);
    std::thread::sleep(Duration::from_secs(3));
    let ok = Client::connect_su(d.su, SU1, "su1-token").is_ok();
    let stats = attacker.stop();
    std::thread::sleep(Duration::from_millis(300));
    let _ = d.child.kill();
    let _ = d.child.wait();
    let lines: Vec<String> = d.lines.try_iter().collect();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    println!(
        "log under attack: {} lines, {bytes} bytes; attacker {stats:?}",
        lines.len()
    );
    for l in lines.iter().take(20) {
        println!("  {l}");
    }
    assert!(ok, "the SU could not connect under attack");
    assert!(
        stats.connects > 1_500,
        "the attack did not churn: {stats:?}"
    );
    // At most about one line per second per reason, each with its count of suppressed ones.
    assert!(lines.len() < 80, "{} lines, {bytes} bytes", lines.len());
    let suppressed: u64 = lines
        .iter()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        suppressed > 1_000,
        "lines left out are not counted: {suppressed}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn admission_limits_are_checked_at_their_edges() {
    let parse = |listen: &str| {
        Config::from_toml(&format!("[listen]\n{listen}\n"))
            .map(|c| c.listen)
            .map_err(|e| e.to_string())
    };
    // (key, lowest, highest, what else the lowest needs)
    let limits = [
        (
            "handshakes_pending_max",
            1u64,
            65_536u64,
            "handshakes_per_address_max = 1",
        ),
        ("handshakes_per_address_max", 1, 1_024, ""),
        ("hello_deadline_ms", 100, 60_000, ""),
        ("admin_connections_max", 1, 4_096, ""),
        ("admin_workers", 1, 64, ""),
        ("admin_request_deadline_ms", 100, 60_000, ""),
        ("admin_body_bytes_max", 0, 16 * 1024 * 1024, ""),
    ];
    for (key, lowest, highest, with) in limits {
        for ok in [lowest, highest] {
            let text = format!("{key} = {ok}\n{with}");
            assert!(parse(&text).is_ok(), "{text}: {:?}", parse(&text).err());
        }
        for bad in [lowest.checked_sub(1), Some(highest + 1)]
            .into_iter()
            .flatten()
        {
            let err = parse(&format!("{key} = {bad}\n{with}")).unwrap_err();
            assert!(
                err.contains(&format!("listen.{key}")) && err.contains(&bad.to_string()),
                "{err}"
            );
        }
    }
    // Per address never above the total.
    let err = parse("handshakes_pending_max = 8\nhandshakes_per_address_max = 9").unwrap_err();
    assert!(err.contains("listen.handshakes_per_address_max"), "{err}");
    let d = parse("").unwrap();
    assert_eq!(
        (
            d.handshakes_pending_max,
            d.handshakes_per_address_max,
            d.hello_deadline,
            d.admin_connections_max,
            d.admin_workers,
            d.admin_request_deadline,
            d.admin_body_bytes_max
        ),
        (
            1_024,
            16,
            Duration::from_secs(3),
            64,
            2,
            Duration::from_secs(5),
            65_536
        )
    );
}

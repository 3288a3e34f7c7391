//! `dsplane client su|csp --addr A,B,C` against several nodes: the active one is found past
//! standbys and closed ports, and a lost connection is followed to the node active next, the
//! CSP sending again every frame that was not acknowledged.
//!
//! The old active and the standbys are played by threads on plain TCP listeners; the node that
//! takes over is a real in-process engine.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::engine::Engine;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, FrameDecoder, Header, Kind, NackReason, PAYLOAD_BYTES_MAX_DEFAULT};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_dsplane");
const SU: Eui64 = Eui64(0x90B3_D51F_3001_0000);
/// The longest a fake node serves, so that its threads end by themselves even when a test
/// fails first.
const FAKE_NODE_LIFE: Duration = Duration::from_secs(60);
/// How long a fake node's connection waits for the client to read or write, at most.
const FAKE_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// One connection to a fake node.
struct Conn {
    stream: TcpStream,
    decoder: FrameDecoder,
}

impl Conn {
    /// The next frame from the client, or `None` once it has gone away or said nothing in time.
    fn read(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.decoder.next_frame().ok()? {
                return Some(frame);
            }
            if self.decoder.fill_from(&mut self.stream, usize::MAX).ok()? == 0 {
                return None;
            }
        }
    }

    fn write(&mut self, frame: &Frame) {
        let mut bytes = frame.header_bytes().to_vec();
        bytes.extend_from_slice(&frame.payload);
        let _ = self.stream.write_all(&bytes);
    }

    /// Closes its side, then reads until the client closes too: a clean close, so that the
    /// client reads every frame written before it.
    fn close(mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        while self.read().is_some() {}
    }
}

/// A node played by threads: its n-th connection (from 0) is given, HELLO read, to
/// `serve(n, conn)` on a thread of its own.
struct FakeNode {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

type Serve = fn(u32, Conn);

impl FakeNode {
    fn start(serve: Serve) -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let born = Instant::now();
                let connections = AtomicU32::new(0);
                while !stop.load(Ordering::Relaxed) && born.elapsed() < FAKE_NODE_LIFE {
                    let stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        Err(_) => return,
                    };
                    let n = connections.fetch_add(1, Ordering::Relaxed);
                    std::thread::spawn(move || {
                        stream.set_nonblocking(false).unwrap();
                        stream.set_read_timeout(Some(FAKE_READ_TIMEOUT)).unwrap();
                        let mut conn = Conn {
                            stream,
                            decoder: FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT),
                        };
                        if conn.read().is_some_and(|f| f.header.kind == Kind::Hello) {
                            serve(n, conn);
                        }
                    });
                }
            })
        };
        FakeNode {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a standby does with a HELLO.
fn standby(_: u32, mut conn: Conn) {
    conn.write(&Frame::nack(
        0,
        NackReason::Overloaded,
        "standby; active node is n2",
    ));
    conn.close();
}

/// An active node that dies (its connection closes) after taking 5 frames from a CSP and
/// acknowledging the first 2; a standby from then on.
fn csp_active_that_dies(n: u32, mut conn: Conn) {
    if n > 0 {
        return standby(n, conn);
    }
    conn.write(&Frame::hello_ok());
    let mut data = 0;
    while data < 5 {
        match conn.read() {
            Some(f) if f.header.kind.is_data() => data += 1,
            Some(_) => {}
            None => return,
        }
    }
    conn.write(&Frame::ack(2));
    conn.close();
}

/// An active node that delivers 2 frames to an SU, reads their ACKs and dies; a standby from
/// then on.
fn su_active_that_dies(n: u32, mut conn: Conn) {
    if n > 0 {
        return standby(n, conn);
    }
    conn.write(&Frame::hello_ok());
    for msg_id in 1..=2 {
        let mut h = Header::new(Kind::Response);
        h.msg_id = msg_id;
        h.su_id = SU;
        h.priority = 3;
        h.counter = 100 + msg_id;
        conn.write(&Frame::new(h, Bytes::from_static(b"from the old active")).unwrap());
    }
    while let Some(f) = conn.read() {
        if f.header.kind == Kind::Ack && f.header.msg_id >= 2 {
            break;
        }
    }
    conn.close();
}

fn engine(name: &str) -> Engine {
    let dir = std::env::temp_dir().join(format!("dsplane-failover-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    common::small_engine(&dir.join("data"))
}

fn client(args: &[&str]) -> (Output, String, String) {
    let out = Command::new(BIN).arg("client").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// The `counter`s of every frame the SU receives until none comes for a while, sorted (dsplane
/// delivers them by level, not in arrival order).
fn counters_received(engine: &Engine) -> Vec<u64> {
    let mut su = Client::connect_su(engine.su_addr(), SU, "su-token").unwrap();
    let mut counters = Vec::new();
    while let Some(f) = su.recv(Duration::from_secs(3)).unwrap() {
        if f.header.kind.is_data() {
            counters.push(f.header.counter);
            su.ack(f.header.msg_id).unwrap();
        }
    }
    counters.sort_unstable();
    counters
}

#[test]
fn client_csp_finds_the_active_node_past_a_closed_port_and_a_standby() {
    let engine = engine("csp-find");
    let standby = FakeNode::start(standby);
    let addrs = format!(
        "{},{},{}",
        common::closed_port(),
        standby.addr,
        engine.csp_addr()
    );
    let (out, _, err) = client(&[
        "csp",
        "--addr",
        &addrs,
        "--token",
        "csp-token",
        "--count",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("5 accepted, 0 refused"), "{err}");
    assert_eq!(counters_received(&engine), [0, 1, 2, 3, 4]);
    engine.shutdown();
    engine.join();
}

#[test]
fn client_csp_sends_what_was_not_acknowledged_again_to_the_node_that_takes_over() {
    let engine = engine("csp-resend");
    let old_active = FakeNode::start(csp_active_that_dies);
    let addrs = format!("{},{}", old_active.addr, engine.csp_addr());
    let (out, _, err) = client(&[
        "csp",
        "--addr",
        &addrs,
        "--token",
        "csp-token",
        "--count",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("5 accepted, 0 refused"), "{err}");
    assert!(
        err.contains(&format!("reconnected to {}", engine.csp_addr())),
        "{err}"
    );
    assert!(err.contains("with 3 frames not acknowledged"), "{err}");
    // The two the old active acknowledged are its own; the new one got the other three.
    assert_eq!(counters_received(&engine), [2, 3, 4]);
    engine.shutdown();
    engine.join();
}

#[test]
fn client_su_follows_a_takeover_and_reads_on() {
    let engine = engine("su-follow");
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let mut last = 0;
    for counter in 10..13 {
        let mut h = Header::new(Kind::Response);
        h.su_id = SU;
        h.counter = counter;
        last = csp
            .send(Frame::new(h, Bytes::from_static(b"from the new active")).unwrap())
            .unwrap();
    }
    csp.wait_ack(last, Duration::from_secs(10)).unwrap();
    let old_active = FakeNode::start(su_active_that_dies);
    let addrs = format!("{},{}", old_active.addr, engine.su_addr());
    let (out, table, err) = client(&[
        "su",
        "--addr",
        &addrs,
        "--token",
        "su-token",
        "--idle-exit-s",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        table.matches("from the old active").count(),
        2,
        "{table}\n{err}"
    );
    assert_eq!(
        table.matches("from the new active").count(),
        3,
        "{table}\n{err}"
    );
    assert!(
        err.contains(&format!("reconnected to {}", engine.su_addr())),
        "{err}"
    );
    assert!(err.contains("5 frames in"), "{err}");
    engine.shutdown();
    engine.join();
}

//! The acceptor thread: accepts on the SU and CSP ports, runs the HELLO handshake, and hands
//! each authenticated connection to the worker that owns its peer.
//!
//! Authentication happens here, off the workers, so that a slow or hostile client that never
//! finishes its HELLO costs a worker nothing. What may wait for a HELLO, and for how long, is
//! decided by [`crate::admission`] (`docs/admission.md`):
//!
//! * every connection is accepted, however many wait: up to [`ACCEPTS_PER_TURN`] per port on
//!   each turn of the loop, the next turn coming at once while more are queued, and a full
//!   [`HandshakeTable`] evicts an older handshake (NACK 5 and a detail) rather than refusing the
//!   newcomer, so a peer that sends its HELLO right after connecting always gets through;
//! * a connection has `listen.hello_deadline_ms` to send its HELLO, and reads nothing beyond it
//!   (at most [`HELLO_BYTES_MAX`] bytes are held for it);
//! * `listen.connections_max` counts authenticated connections only, from HELLO_OK to close,
//!   so idle connections cannot take the peers' places;
//! * a bad token is answered later and later ([`HelloFailures`]); a right token is accepted at
//!   once, whatever its address did before;
//! * every refusal is logged at most once a second per reason, with the count of those left
//!   out since the last line.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::shared::{Adopt, Control, PeerRef, Shared};
use super::{EngineError, EngineThread};
use crate::admission::{Eviction, HandshakeLimits, HandshakeTable, HelloFailures, LogLimiter};
use crate::wire::{
    Frame, FrameDecoder, Header, Kind, NackReason, Role, HEADER_LEN, TOKEN_BYTES_MAX,
};
use crate::{Nanos, NANOS_PER_SEC};

/// The most bytes read from a connection before its HELLO is answered: one HELLO frame.
pub(crate) const HELLO_BYTES_MAX: usize = HEADER_LEN + TOKEN_BYTES_MAX;
/// How long a refused connection is kept, half-closed, so the peer reads its NACK.
const LINGER: Nanos = NANOS_PER_SEC;
/// Connections accepted from one port per turn of the loop, so that a flood on one port
/// cannot starve the other port or the handshakes in progress. The rest wait for the next turn,
/// which comes at once.
const ACCEPTS_PER_TURN: usize = 256;
/// At most one log line per reason in this interval.
const LOG_INTERVAL: Nanos = NANOS_PER_SEC;
/// How long a CSP HELLO beyond its link's `connections_max` waits for a connection of the
/// link to close before it is refused (NACK 5). A CSP that closes a connection and opens a new
/// one at once would otherwise race the worker that has yet to see the close; a real second
/// connection beyond the limit is refused this much later.
const LINK_CONN_GRACE: Nanos = 200 * NANOS_PER_SEC / 1000;
/// How often such a HELLO looks again within the grace.
const LINK_CONN_RETRY: Nanos = 5 * NANOS_PER_SEC / 1000;

const SU_LISTENER: Token = Token(0);
const CSP_LISTENER: Token = Token(1);
pub(crate) const ACCEPTOR_WAKER: Token = Token(2);
const FIRST_PENDING: usize = 3;

/// Why a connection was refused or closed before HELLO_OK: one log line per second each.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    AddressFull,
    TableFull,
    ConnectionLimit,
    LinkFull,
    BadToken,
    NoHello,
    Malformed,
    UnexpectedKind,
    AcceptFailed,
}
const REFUSALS: usize = 9;

/// A connection that has not finished its HELLO.
struct Pending {
    stream: TcpStream,
    /// The HELLO as it arrives; nothing beyond it is read here.
    hello: [u8; HELLO_BYTES_MAX],
    hello_len: usize,
    role: Role,
    addr: SocketAddr,
    /// Refused: input is discarded until the peer closes or the deadline.
    refused: bool,
    /// A NACK owed at the deadline: the answer to a bad token, delayed.
    owed: Option<Frame>,
    /// A CSP HELLO with the right token whose link holds `connections_max` connections: it
    /// looks again until this instant ([`LINK_CONN_GRACE`]), then is refused.
    link_full: Option<(PeerRef, Nanos)>,
}

/// What reading a pending connection gave.
enum Step {
    /// A whole first frame: its header and payload (the token, for a HELLO).
    Frame(Header, usize),
    /// A frame that is not a HELLO, or a malformed header: no need to read its payload.
    Refuse(u64, NackReason, String),
    /// More bytes needed.
    Wait,
    /// The peer closed or the socket failed.
    Closed,
}

pub(crate) struct Acceptor {
    poll: Poll,
    su: TcpListener,
    csp: TcpListener,
    shared: Arc<Shared>,
    table: HandshakeTable<Pending>,
    failures: HelloFailures,
    logs: LogLimiter<REFUSALS>,
    /// Whether the SU and the CSP listener may still have connections queued (accepting
    /// stopped at [`ACCEPTS_PER_TURN`]).
    more_su: bool,
    more_csp: bool,
    expired: Vec<usize>,
}

impl Acceptor {
    pub(crate) fn new(
        poll: Poll,
        mut su: TcpListener,
        mut csp: TcpListener,
        shared: Arc<Shared>,
    ) -> Result<Acceptor, EngineError> {
        let failed = || EngineError::poll(EngineThread::Acceptor);
        poll.registry()
            .register(&mut su, SU_LISTENER, Interest::READABLE)
            .map_err(failed())?;
        poll.registry()
            .register(&mut csp, CSP_LISTENER, Interest::READABLE)
            .map_err(failed())?;
        let listen = &shared.config.listen;
        // A short idle timeout shortens the wait for HELLO too.
        let hello_deadline = listen
            .hello_deadline
            .min(shared.config.engine.idle_timeout)
            .as_nanos() as Nanos;
        let table = HandshakeTable::new(HandshakeLimits {
            pending_max: listen.handshakes_pending_max as usize,
            per_address_max: listen.handshakes_per_address_max as usize,
            hello_deadline,
        });
        Ok(Acceptor {
            poll,
            su,
            csp,
            shared,
            table,
            failures: HelloFailures::new(),
            logs: LogLimiter::new(LOG_INTERVAL),
            // Connections may have queued before the listeners were registered.
            more_su: true,
            more_csp: true,
            expired: Vec::new(),
        })
    }

    fn now(&self) -> Nanos {
        self.shared.now()
    }

    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.shared.is_shutting_down() {
            let timeout = if self.more_su || self.more_csp {
                Some(Duration::ZERO)
            } else {
                let now = self.now();
                self.table
                    .next_deadline()
                    .map(|d| Duration::from_nanos(d.saturating_sub(now)))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "acceptor poll failed; no new connections");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    SU_LISTENER => self.more_su = true,
                    CSP_LISTENER => self.more_csp = true,
                    ACCEPTOR_WAKER => {}
                    Token(t) => self.readable(t.wrapping_sub(FIRST_PENDING)),
                }
            }
            if self.more_su {
                self.accept(Role::Su);
            }
            if self.more_csp {
                self.accept(Role::Csp);
            }
            self.expire();
            self.shared
                .handshakes_pending
                .store(self.table.len() as u64, Ordering::Relaxed);
        }
        tracing::info!("acceptor stopped: no new connections");
    }

    /// Logs a refusal, at most once per [`LOG_INTERVAL`] per reason.
    fn log(&mut self, why: Refusal, addr: Option<SocketAddr>, message: &str) {
        let now = self.now();
        match self.logs.allow(why as usize, now) {
            Some(suppressed) => {
                let addr = addr.map_or_else(String::new, |a| a.to_string());
                match why {
                    Refusal::NoHello | Refusal::Malformed | Refusal::UnexpectedKind => {
                        tracing::info!(%addr, suppressed, "{message}")
                    }
                    _ => tracing::warn!(%addr, suppressed, "{message}"),
                }
            }
            None => {
                self.shared
                    .log_lines_suppressed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn accept(&mut self, role: Role) {
        for _ in 0..ACCEPTS_PER_TURN {
            let listener = match role {
                Role::Su => &self.su,
                Role::Csp => &self.csp,
            };
            let (stream, addr) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *self.more(role) = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: try again on the next event rather than spin.
                    *self.more(role) = false;
                    let message = format!("accept failed on the {role} port: {e}");
                    self.log(Refusal::AcceptFailed, None, &message);
                    return;
                }
            };
            self.admit(stream, addr, role);
        }
        // More may be queued: the next turn comes at once and takes them.
        *self.more(role) = true;
    }

    fn more(&mut self, role: Role) -> &mut bool {
        match role {
            Role::Su => &mut self.more_su,
            Role::Csp => &mut self.more_csp,
        }
    }

    fn admit(&mut self, stream: TcpStream, addr: SocketAddr, role: Role) {
        if let Err(e) = super::tune_stream(&stream) {
            tracing::debug!(error = %e, %addr, "socket options refused");
        }
        let now = self.now();
        let pending = |stream| Pending {
            stream,
            hello: [0; HELLO_BYTES_MAX],
            hello_len: 0,
            role,
            addr,
            refused: false,
            owed: None,
            link_full: None,
        };
        let (slot, evicted) = self.table.admit(addr.ip(), now, pending(stream));
        if let Some(evicted) = evicted {
            let why = evicted.why;
            let mut old = evicted.item;
            let _ = self.poll.registry().deregister(&mut old.stream);
            if let Some(owed) = old.owed.take() {
                // A bad token whose delayed answer is given now.
                send_nack(&mut old.stream, &owed);
            } else if let Some((peer, _)) = old.link_full {
                // A CSP HELLO waiting for its link to have room: refused now.
                self.shared.count_acceptor_nack(NackReason::Overloaded);
                let detail = format!(
                    "CSP link {} already holds its connections (csp.connections_max)",
                    self.shared.peer_label(peer)
                );
                send_nack(
                    &mut old.stream,
                    &Frame::nack(0, NackReason::Overloaded, &detail),
                );
            } else if !evicted.answered {
                let pending_max = self.shared.config.listen.handshakes_pending_max;
                let per_address_max = self.shared.config.listen.handshakes_per_address_max;
                let (detail, reason, message) = match why {
                    Eviction::AddressFull => (
                        format!("too many handshakes pending from your address ({per_address_max}); send HELLO as soon as you connect"),
                        Refusal::AddressFull,
                        format!("handshakes pending from one address at their limit ({per_address_max}): closed the oldest"),
                    ),
                    Eviction::TableFull => (
                        format!("too many handshakes pending ({pending_max}); send HELLO as soon as you connect"),
                        Refusal::TableFull,
                        format!("handshakes pending at their limit ({pending_max}): closed the oldest from the address holding most"),
                    ),
                };
                self.shared.count_acceptor_nack(NackReason::Overloaded);
                self.shared
                    .handshakes_evicted
                    .fetch_add(1, Ordering::Relaxed);
                send_nack(
                    &mut old.stream,
                    &Frame::nack(0, NackReason::Overloaded, &detail),
                );
                self.log(reason, Some(old.addr), &message);
            }
        }
        let registered = match self.table.get_mut(slot) {
            Some(p) => self.poll.registry().register(
                &mut p.stream,
                Token(slot + FIRST_PENDING),
                Interest::READABLE,
            ),
            None => return,
        };
        if let Err(e) = registered {
            tracing::warn!(error = %e, %addr, "cannot register connection");
            self.table.remove(slot);
            return;
        }
        // Bytes may already be there; edge-triggered readiness would not report them again.
        self.readable(slot);
    }

    fn readable(&mut self, slot: usize) {
        loop {
            let Some(p) = self.table.get_mut(slot) else {
                return;
            };
            let payload_bytes_max = self.shared.config.engine.payload_bytes_max;
            let step = if p.refused {
                drain(p)
            } else {
                read_hello(p, payload_bytes_max)
            };
            match step {
                Step::Wait => return,
                Step::Closed => return self.close(slot),
                Step::Refuse(msg_id, reason, detail) => {
                    let addr = self.table.get_mut(slot).map(|p| p.addr);
                    let why = match reason {
                        NackReason::Malformed => Refusal::Malformed,
                        _ => Refusal::UnexpectedKind,
                    };
                    self.log(
                        why,
                        addr,
                        &format!("connection refused before HELLO: {detail}"),
                    );
                    self.refuse(slot, Frame::nack(msg_id, reason, &detail), 0);
                }
                Step::Frame(header, token_len) => return self.on_hello(slot, header, token_len),
            }
        }
    }

    /// A whole HELLO arrived: check it, then hand the connection over or refuse it.
    fn on_hello(&mut self, slot: usize, header: Header, token_len: usize) {
        let Some(p) = self.table.get_mut(slot) else {
            return;
        };
        let (role, addr) = (p.role, p.addr);
        let token = p
            .hello
            .get(HEADER_LEN..HEADER_LEN + token_len)
            .unwrap_or_default()
            .to_vec();
        match self.handshake(role, &header, &token) {
            Ok(peer) => self.authenticated(slot, peer),
            Err((reason, detail)) => {
                let nack = Frame::nack(header.msg_id, reason, detail);
                if reason != NackReason::Unauthorised {
                    self.log(Refusal::UnexpectedKind, Some(addr), detail);
                    return self.refuse(slot, nack, 0);
                }
                let now = self.now();
                let delay = self.failures.failed(addr.ip(), now);
                let failures = self.failures.count(addr.ip());
                let role = match role {
                    Role::Su => "SU",
                    Role::Csp => "CSP",
                };
                let message = format!(
                    "{role} HELLO refused: {detail} ({failures} failures from this address; answer delayed {} ms)",
                    delay / 1_000_000
                );
                self.log(Refusal::BadToken, Some(addr), &message);
                self.refuse(slot, nack, delay);
            }
        }
    }

    /// Checks a connection's first frame: a HELLO for this port's role with a known identity
    /// and its token.
    fn handshake(
        &self,
        role: Role,
        header: &Header,
        token: &[u8],
    ) -> Result<PeerRef, (NackReason, &'static str)> {
        if header.kind != Kind::Hello {
            return Err((NackReason::UnexpectedKind, "send HELLO first"));
        }
        if header.role() != Some(role) {
            return Err((
                NackReason::UnexpectedKind,
                "HELLO role does not match this port",
            ));
        }
        let token_ok = !token.is_empty() && token.len() <= TOKEN_BYTES_MAX;
        match role {
            Role::Su => match self.shared.su_by_token(header.su_id, token) {
                Some(i) if token_ok => Ok(PeerRef::Su(i)),
                _ => Err((NackReason::Unauthorised, "unknown SU or bad token")),
            },
            Role::Csp => match self.shared.csp_by_token(token) {
                Some(i) if token_ok => Ok(PeerRef::Csp(i)),
                _ => Err((NackReason::Unauthorised, "bad token")),
            },
        }
    }

    /// A right HELLO: counted against its port's `connections_max` (and a CSP's against its
    /// link's) and handed to its worker.
    fn authenticated(&mut self, slot: usize, peer: PeerRef) {
        let Some(role) = self.table.get_mut(slot).map(|p| p.role) else {
            return;
        };
        let link_conn = match peer {
            PeerRef::Su(_) => 0,
            PeerRef::Csp(csp) => match self.shared.claim_link_conn(csp) {
                Some(k) => k,
                None => return self.link_full(slot, peer),
            },
        };
        let release = |shared: &Shared| {
            if let PeerRef::Csp(csp) = peer {
                shared.release_link_conn(csp, link_conn);
            }
        };
        let counter = self.shared.connections_of(role);
        let limit = u64::from(self.shared.config.listen.connections_max);
        if counter.fetch_add(1, Ordering::Relaxed) >= limit {
            counter.fetch_sub(1, Ordering::Relaxed);
            release(&self.shared);
            let addr = self.table.get_mut(slot).map(|p| p.addr);
            let message = format!("{role} port at its connection limit ({limit}); refusing");
            self.log(Refusal::ConnectionLimit, addr, &message);
            let nack = Frame::nack(
                0,
                NackReason::Overloaded,
                "connection limit reached; retry later",
            );
            return self.refuse(slot, nack, 0);
        }
        let Some(mut p) = self.table.remove(slot) else {
            self.shared.connection_closed(peer);
            release(&self.shared);
            return;
        };
        if let Err(e) = self.poll.registry().deregister(&mut p.stream) {
            tracing::warn!(error = %e, "deregister failed");
        }
        // An SU's connection goes to its owner; a CSP link's k-th to the k-th worker from the
        // link's owner, so that the link's intake is spread over cores.
        let holder = match peer {
            PeerRef::Su(_) => self.shared.owner(peer),
            PeerRef::Csp(csp) => self.shared.link_conn_worker(csp, link_conn),
        };
        let Some(link) = holder.and_then(|w| self.shared.workers.get(w)) else {
            self.shared.connection_closed(peer);
            release(&self.shared);
            return;
        };
        let adopt = Adopt {
            stream: p.stream,
            // Nothing beyond the HELLO was read: what follows it is still in the socket, for the
            // worker to read.
            decoder: FrameDecoder::new(self.shared.config.engine.payload_bytes_max),
            peer,
            addr: p.addr,
            link_conn,
        };
        if link.control.send(Control::Adopt(adopt)).is_err() {
            tracing::warn!("worker gone; connection dropped");
            self.shared.connection_closed(peer);
            release(&self.shared);
            return;
        }
        if let Err(e) = link.waker.wake() {
            tracing::warn!(error = %e, "cannot wake worker");
        }
    }

    /// A CSP HELLO whose link holds `connections_max` connections: it looks again every
    /// [`LINK_CONN_RETRY`] for up to [`LINK_CONN_GRACE`] (a connection the CSP has just closed
    /// may not be seen closed yet), then is refused with NACK 5 and closed. It never takes a
    /// connection over.
    fn link_full(&mut self, slot: usize, peer: PeerRef) {
        let now = self.now();
        let Some(p) = self.table.get_mut(slot) else {
            return;
        };
        let give_up = match p.link_full {
            Some((_, at)) => at,
            None => now + LINK_CONN_GRACE,
        };
        if now < give_up {
            p.link_full = Some((peer, give_up));
            self.table
                .answered(slot, (now + LINK_CONN_RETRY).min(give_up));
            return;
        }
        p.link_full = None;
        let addr = p.addr;
        let name = self.shared.peer_label(peer);
        let max = match peer {
            PeerRef::Csp(csp) => self.shared.csps.get(csp as usize),
            PeerRef::Su(_) => None,
        }
        .map_or(0, |c| c.connections_max.load(Ordering::Relaxed));
        let detail = format!(
            "CSP link {name} already holds its {max} connection(s) (csp.connections_max); close one, or raise the limit"
        );
        let message = format!("CSP HELLO refused: {detail}");
        self.log(Refusal::LinkFull, Some(addr), &message);
        self.refuse(slot, Frame::nack(0, NackReason::Overloaded, &detail), 0);
    }

    /// Refuses a pending connection with `nack`, now (`delay` 0) or after `delay`. Either way it
    /// is answered: its input is discarded, and it is the first to go when room is needed.
    fn refuse(&mut self, slot: usize, nack: Frame, delay: Nanos) {
        let now = self.now();
        self.shared
            .count_acceptor_nack(nack.header.nack_reason().unwrap_or(NackReason::Malformed));
        let Some(p) = self.table.get_mut(slot) else {
            return;
        };
        p.refused = true;
        if delay == 0 {
            send_nack(&mut p.stream, &nack);
            self.table.answered(slot, now + LINGER);
        } else {
            p.owed = Some(nack);
            self.table.answered(slot, now + delay);
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut p) = self.table.remove(slot) {
            let _ = self.poll.registry().deregister(&mut p.stream);
        }
    }

    fn expire(&mut self) {
        let now = self.now();
        let mut expired = std::mem::take(&mut self.expired);
        expired.clear();
        self.table.expired(now, &mut expired);
        for &slot in &expired {
            let Some(p) = self.table.get_mut(slot) else {
                continue;
            };
            if let Some(owed) = p.owed.take() {
                // A bad token's delayed answer: given now, then the usual linger.
                send_nack(&mut p.stream, &owed);
                self.table.answered(slot, now + LINGER);
            } else if let Some((peer, _)) = p.link_full {
                // A CSP HELLO waiting for a connection of its link to close: look again.
                self.authenticated(slot, peer);
            } else if p.refused {
                self.close(slot);
            } else {
                let addr = p.addr;
                let deadline_ms = self.shared.config.listen.hello_deadline.as_millis();
                let nack = Frame::nack(
                    0,
                    NackReason::UnexpectedKind,
                    &format!("no HELLO within {deadline_ms} ms"),
                );
                self.shared.count_acceptor_nack(NackReason::UnexpectedKind);
                if let Some(p) = self.table.get_mut(slot) {
                    send_nack(&mut p.stream, &nack);
                }
                self.close(slot);
                self.log(Refusal::NoHello, Some(addr), "no HELLO in time; closed");
            }
        }
        self.expired = expired;
    }
}

/// Reads what is missing of the first frame, never beyond it.
fn read_hello(p: &mut Pending, payload_bytes_max: u32) -> Step {
    loop {
        let want = match p.hello.first_chunk::<HEADER_LEN>() {
            Some(bytes) if p.hello_len >= HEADER_LEN => {
                let header = match Header::decode(bytes, payload_bytes_max) {
                    Ok(h) => h,
                    Err(e) => return Step::Refuse(e.msg_id, NackReason::Malformed, e.to_string()),
                };
                if header.kind != Kind::Hello {
                    return Step::Refuse(
                        header.msg_id,
                        NackReason::UnexpectedKind,
                        "send HELLO first".into(),
                    );
                }
                let payload = header.payload_len as usize;
                if payload > TOKEN_BYTES_MAX {
                    // Too long to be a token: checked as an empty one, so it fails like any bad
                    // token (and its address is slowed down like any guesser's).
                    return Step::Frame(header, 0);
                }
                if p.hello_len >= HEADER_LEN + payload {
                    return Step::Frame(header, payload);
                }
                HEADER_LEN + payload
            }
            _ => HEADER_LEN,
        };
        let Some(spare) = p.hello.get_mut(p.hello_len..want) else {
            return Step::Closed;
        };
        match io::Read::read(&mut p.stream, spare) {
            Ok(0) => return Step::Closed,
            Ok(n) => p.hello_len += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Closed,
        }
    }
}

/// Discards what a refused peer still sends, until it closes.
fn drain(p: &mut Pending) -> Step {
    let mut sink = [0u8; 4096];
    loop {
        match io::Read::read(&mut p.stream, &mut sink) {
            Ok(0) => return Step::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Closed,
        }
    }
}

/// Writes one NACK and half-closes. A fresh socket's send buffer takes a short frame; if it
/// does not, the close says enough.
fn send_nack(stream: &mut TcpStream, nack: &Frame) {
    let mut bytes = Vec::with_capacity(nack.wire_len());
    bytes.extend_from_slice(&nack.header_bytes());
    bytes.extend_from_slice(&nack.payload);
    let _ = io::Write::write_all(stream, &bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

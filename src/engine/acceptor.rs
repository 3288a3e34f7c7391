//! The acceptor thread: accepts on the SU and CSP ports, runs the HELLO handshake, and hands
//! each authenticated connection to the worker that owns its peer.
//!
//! Authentication happens here, off the workers, so that a slow or hostile client that never
//! finishes its HELLO costs a worker nothing. A connection waits at most
//! [`HANDSHAKE_TIMEOUT`] for its HELLO, and at most [`HANDSHAKES_PENDING_MAX`] wait at once.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::shared::{Adopt, Control, PeerRef, Shared};
use crate::wire::{Frame, FrameDecoder, Kind, NackReason, Role};
use crate::{Nanos, NANOS_PER_SEC};

/// How long a new connection has to send its HELLO.
pub(crate) const HANDSHAKE_TIMEOUT: Nanos = 10 * NANOS_PER_SEC;
/// Most connections waiting for their HELLO at once; beyond it new ones are closed at once.
pub(crate) const HANDSHAKES_PENDING_MAX: usize = 1024;
/// How long a refused connection is kept, half-closed, so the peer reads its NACK.
const LINGER: Nanos = NANOS_PER_SEC;
/// Failed HELLOs an address may make before it has to wait.
const BAD_HELLOS_FREE: u32 = 3;
/// Longest wait imposed on an address after failed HELLOs (the wait doubles from 1 s).
const BACKOFF_MAX: Nanos = 60 * NANOS_PER_SEC;
/// Addresses whose failures are remembered at once.
const BACKOFF_ADDRESSES_MAX: usize = 10_000;

/// Failed HELLOs from one address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// Refused until then.
    until: Nanos,
}

const SU_LISTENER: Token = Token(0);
const CSP_LISTENER: Token = Token(1);
pub(crate) const ACCEPTOR_WAKER: Token = Token(2);
const FIRST_PENDING: usize = 3;

struct Pending {
    stream: TcpStream,
    decoder: FrameDecoder,
    role: Role,
    addr: SocketAddr,
    deadline: Nanos,
    /// Refused: draining until the peer closes or the deadline.
    refused: bool,
    /// Counted against the port's connection limit (until handed to a worker or dropped).
    counted: bool,
}

pub(crate) struct Acceptor {
    poll: Poll,
    su: TcpListener,
    csp: TcpListener,
    shared: Arc<Shared>,
    pending: Vec<Option<Pending>>,
    origin: Instant,
    /// Addresses that sent bad tokens: after [`BAD_HELLOS_FREE`] failures they wait 1 s, 2 s,
    /// 4 s… (at most [`BACKOFF_MAX`]) before they are heard again.
    failures: std::collections::HashMap<std::net::IpAddr, Failures>,
    handshake_timeout: Nanos,
}

impl Acceptor {
    pub(crate) fn new(
        poll: Poll,
        mut su: TcpListener,
        mut csp: TcpListener,
        shared: Arc<Shared>,
    ) -> io::Result<Acceptor> {
        poll.registry()
            .register(&mut su, SU_LISTENER, Interest::READABLE)?;
        poll.registry()
            .register(&mut csp, CSP_LISTENER, Interest::READABLE)?;
        // A short idle timeout shortens the wait for HELLO too.
        let handshake_timeout =
            HANDSHAKE_TIMEOUT.min(shared.config.engine.idle_timeout.as_nanos() as Nanos);
        Ok(Acceptor {
            poll,
            su,
            csp,
            shared,
            pending: Vec::new(),
            origin: Instant::now(),
            failures: std::collections::HashMap::new(),
            handshake_timeout,
        })
    }

    fn now(&self) -> Nanos {
        self.origin.elapsed().as_nanos() as Nanos
    }

    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(256);
        while !self.shared.is_shutting_down() {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "acceptor poll failed; no new connections");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    SU_LISTENER => self.accept(Role::Su),
                    CSP_LISTENER => self.accept(Role::Csp),
                    ACCEPTOR_WAKER => {}
                    Token(t) => self.readable(t - FIRST_PENDING),
                }
            }
            self.expire();
        }
        tracing::info!("acceptor stopped: no new connections");
    }

    fn next_timeout(&self) -> Option<std::time::Duration> {
        let now = self.now();
        self.pending
            .iter()
            .flatten()
            .map(|p| p.deadline)
            .min()
            .map(|d| std::time::Duration::from_nanos(d.saturating_sub(now)))
    }

    fn accept(&mut self, role: Role) {
        loop {
            let listener = match role {
                Role::Su => &self.su,
                Role::Csp => &self.csp,
            };
            let (stream, addr) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: log and try again on the next event rather than spin.
                    tracing::warn!(error = %e, ?role, "accept failed");
                    return;
                }
            };
            let live = self.pending.iter().flatten().count();
            if live >= HANDSHAKES_PENDING_MAX {
                tracing::warn!(%addr, limit = HANDSHAKES_PENDING_MAX, "too many connections waiting for HELLO; closing");
                continue;
            }
            let counter = self.shared.connections_of(role);
            let limit = u64::from(self.shared.config.listen.connections_max);
            if counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= limit {
                counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%addr, ?role, limit, "connection limit reached; refusing");
                refuse_now(
                    stream,
                    NackReason::Overloaded,
                    "connection limit reached; retry later",
                );
                continue;
            }
            let now = self.now();
            if let Some(f) = self.failures.get(&addr.ip()) {
                if f.until > now {
                    let wait_s = (f.until - now).div_ceil(NANOS_PER_SEC);
                    counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(%addr, failures = f.count, wait_s, "refusing an address that sent bad tokens");
                    self.shared.count_acceptor_nack(NackReason::Unauthorised);
                    refuse_now(
                        stream,
                        NackReason::Unauthorised,
                        &format!("too many failed HELLOs from your address; retry in {wait_s} s"),
                    );
                    continue;
                }
            }
            if let Err(e) = super::tune_stream(&stream) {
                tracing::debug!(error = %e, %addr, "socket options refused");
            }
            let slot = match self.pending.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.pending.push(None);
                    self.pending.len() - 1
                }
            };
            let mut pending = Pending {
                stream,
                decoder: FrameDecoder::new(self.shared.config.engine.payload_bytes_max),
                role,
                addr,
                deadline: self.now() + self.handshake_timeout,
                refused: false,
                counted: true,
            };
            if let Err(e) = self.poll.registry().register(
                &mut pending.stream,
                Token(slot + FIRST_PENDING),
                Interest::READABLE,
            ) {
                tracing::warn!(error = %e, %addr, "cannot register connection");
                counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            if let Some(s) = self.pending.get_mut(slot) {
                *s = Some(pending);
            }
            // Bytes may already be there; edge-triggered readiness would not report them again.
            self.readable(slot);
        }
    }

    fn readable(&mut self, slot: usize) {
        let Some(Some(mut p)) = self.pending.get_mut(slot).map(Option::take) else {
            return;
        };
        loop {
            if p.refused {
                // Discard what the refused peer still sends until it closes.
                let mut sink = [0u8; 4096];
                match io::Read::read(&mut p.stream, &mut sink) {
                    Ok(0) => return self.drop_pending(p),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return self.drop_pending(p),
                }
            }
            match p.decoder.next_frame() {
                Ok(Some(frame)) => match self.handshake(&mut p, &frame) {
                    Ok(peer) => {
                        self.failures.remove(&p.addr.ip());
                        return self.hand_off(p, peer);
                    }
                    Err((msg_id, reason, detail)) => {
                        if reason == NackReason::Unauthorised {
                            self.record_failure(p.addr.ip());
                        }
                        self.refuse(&mut p, msg_id, reason, detail);
                        continue;
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(addr = %p.addr, error = %e, "malformed frame before HELLO");
                    self.refuse(&mut p, e.msg_id, NackReason::Malformed, &e.to_string());
                    continue;
                }
            }
            match p.decoder.fill_from(&mut p.stream, usize::MAX) {
                Ok(0) => return self.drop_pending(p),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_pending(p),
            }
        }
        if let Some(s) = self.pending.get_mut(slot) {
            *s = Some(p);
        }
    }

    /// Checks a connection's first frame: it must be a HELLO for this port's role with a
    /// known identity and its token.
    fn handshake(
        &self,
        p: &mut Pending,
        frame: &Frame,
    ) -> Result<PeerRef, (u64, NackReason, &'static str)> {
        let msg_id = frame.header.msg_id;
        if frame.header.kind != Kind::Hello {
            return Err((msg_id, NackReason::UnexpectedKind, "send HELLO first"));
        }
        if frame.header.role() != Some(p.role) {
            return Err((
                msg_id,
                NackReason::UnexpectedKind,
                "HELLO role does not match this port",
            ));
        }
        let token = frame.payload.as_ref();
        let token_ok = !token.is_empty() && token.len() <= crate::wire::TOKEN_BYTES_MAX;
        match p.role {
            Role::Su => match self.shared.su_by_token(frame.header.su_id, token) {
                Some(i) if token_ok => Ok(PeerRef::Su(i)),
                _ => {
                    tracing::warn!(addr = %p.addr, su = %frame.header.su_id, "SU HELLO refused: unknown SU or bad token");
                    Err((msg_id, NackReason::Unauthorised, "unknown SU or bad token"))
                }
            },
            Role::Csp => match self.shared.csp_by_token(token) {
                Some(i) if token_ok => Ok(PeerRef::Csp(i)),
                _ => {
                    tracing::warn!(addr = %p.addr, "CSP HELLO refused: bad token");
                    Err((msg_id, NackReason::Unauthorised, "bad token"))
                }
            },
        }
    }

    fn record_failure(&mut self, ip: std::net::IpAddr) {
        let now = self.now();
        if self.failures.len() >= BACKOFF_ADDRESSES_MAX && !self.failures.contains_key(&ip) {
            self.failures.retain(|_, f| f.until > now);
            if self.failures.len() >= BACKOFF_ADDRESSES_MAX {
                tracing::warn!(%ip, "too many addresses with failed HELLOs to remember one more");
                return;
            }
        }
        let f = self
            .failures
            .entry(ip)
            .or_insert(Failures { count: 0, until: 0 });
        f.count = f.count.saturating_add(1);
        if f.count >= BAD_HELLOS_FREE {
            let shift = (f.count - BAD_HELLOS_FREE).min(6);
            f.until = now + (NANOS_PER_SEC << shift).min(BACKOFF_MAX);
            tracing::warn!(%ip, failures = f.count, wait_ms = (f.until - now) / 1_000_000, "repeated bad HELLOs: backing off");
        }
    }

    fn refuse(&self, p: &mut Pending, msg_id: u64, reason: NackReason, detail: &str) {
        self.shared.count_acceptor_nack(reason);
        let nack = Frame::nack(msg_id, reason, detail);
        let mut bytes = Vec::with_capacity(nack.wire_len());
        bytes.extend_from_slice(&nack.header_bytes());
        bytes.extend_from_slice(&nack.payload);
        // A fresh socket's send buffer takes a 64-byte frame; if it does not, the close says
        // enough.
        let _ = io::Write::write_all(&mut p.stream, &bytes);
        let _ = p.stream.shutdown(std::net::Shutdown::Write);
        p.refused = true;
        p.deadline = self.now() + LINGER;
    }

    fn hand_off(&mut self, mut p: Pending, peer: PeerRef) {
        if let Err(e) = self.poll.registry().deregister(&mut p.stream) {
            tracing::warn!(error = %e, "deregister failed");
        }
        let Some(link) = self
            .shared
            .owner(peer)
            .and_then(|w| self.shared.workers.get(w))
        else {
            self.shared.connection_closed(peer);
            return;
        };
        let adopt = Adopt {
            stream: p.stream,
            decoder: p.decoder,
            peer,
            addr: p.addr,
        };
        if link.control.send(Control::Adopt(adopt)).is_err() {
            tracing::warn!("worker gone; connection dropped");
            self.shared.connection_closed(peer);
            return;
        }
        if let Err(e) = link.waker.wake() {
            tracing::warn!(error = %e, "cannot wake worker");
        }
    }

    fn drop_pending(&mut self, mut p: Pending) {
        let _ = self.poll.registry().deregister(&mut p.stream);
        if p.counted {
            self.shared
                .connections_of(p.role)
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn expire(&mut self) {
        let now = self.now();
        for slot in 0..self.pending.len() {
            let expired = self
                .pending
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|p| p.deadline <= now);
            if expired {
                if let Some(p) = self.pending.get_mut(slot).and_then(Option::take) {
                    if !p.refused {
                        tracing::info!(addr = %p.addr, "no HELLO in time; closing");
                    }
                    self.drop_pending(p);
                }
            }
        }
    }
}

/// Refuses a connection at once: one NACK (msg_id 0) and close.
fn refuse_now(mut stream: TcpStream, reason: NackReason, detail: &str) {
    let nack = Frame::nack(0, reason, detail);
    let mut bytes = Vec::with_capacity(nack.wire_len());
    bytes.extend_from_slice(&nack.header_bytes());
    bytes.extend_from_slice(&nack.payload);
    let _ = io::Write::write_all(&mut stream, &bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

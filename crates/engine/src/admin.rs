//! The admin interface: HTTP on its own threads (ENGINE.md §3, §8). The message path never
//! waits on it: an operator action becomes a control message to the workers, like a new
//! connection does.
//!
//! | method and path              | what |
//! |------------------------------|------|
//! | `GET /healthz`               | `ok` while the engine runs |
//! | `GET /metrics`               | Prometheus text format (see `docs/operations.md`) |
//! | `GET /status`                | JSON: version, workers, restriction, config file and load time, each SU (connected, paused or away, its queue per tier) and each CSP link (connected or away, its queue per tier) |
//! | `POST /su/{EUI-64}/pause`    | the SU is unavailable: its traffic is kept (NMS, then SURB) |
//! | `POST /su/{EUI-64}/resume`   | available again: its backlog is released with the ramp |
//! | `POST /restrict`             | the whole northbound side is unavailable |
//! | `POST /restore`              | lifts the restriction: every backlog released with the ramp |
//! | `POST /reload`               | re-reads the config file: rules, alert levels, exclusions, thresholds, rates |
//! | `GET /report/alerts?day=D`   | the alert monitoring report of day `D` (YYYY-MM-DD, default today, UTC), JSON |
//!
//! When `[admin] token` is set, every request needs `Authorization: Bearer <token>`, else 401.
//! A known path asked with another method gets 405 and an `Allow` header naming the one it
//! takes; an unknown path gets 404 and the list above.
//!
//! # A server no client can stall (issue 13, `docs/admission.md`)
//!
//! One thread (`dsplane-admin`) owns every admin socket, non-blocking, on its own `mio::Poll`:
//! it accepts, reads each request's headers and body, writes each response, and saves the alert
//! report every few seconds. It never blocks on a client, so neither a stuck client nor a
//! thousand of them stops `/healthz`, the report save or shutdown. Limits, from `[listen]`:
//!
//! * `admin_connections_max` connections at once; at the cap the oldest one still sending its
//!   request is closed (503) to make room, so a newcomer is always heard;
//! * `admin_request_deadline_ms` to send the whole request, headers and body (else 408);
//! * [`HEAD_BYTES_MAX`] of headers (else 431), `admin_body_bytes_max` of body (else 413, at
//!   once, from `Content-Length`); no chunked bodies (501);
//! * one request per connection (`Connection: close`).
//!
//! A parsed request goes to a fixed pool of `admin_workers` threads, which compute the answer
//! (render metrics, reload the config, send control messages) and never touch a socket; the
//! answer comes back through a channel and a `mio::Waker`. Nothing here spawns a thread per
//! connection, and shutdown waits for no client: the I/O thread drops every connection and the
//! workers finish at most the request in hand.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::shared::{token_eq, Control, Shared};
use super::{EngineError, EngineThread, Port};
use crate::ids::Eui64;

use crate::unix_now;

/// How often the alert report is written to `data_dir`.
const REPORT_SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// Largest request line and headers together.
pub(crate) const HEAD_BYTES_MAX: usize = 8 * 1024;
/// How long a connection is kept, half-closed, after its response, so the client reads it.
const LINGER: Duration = Duration::from_secs(1);
/// Longest sleep of the I/O thread: how soon it sees a shutdown.
const POLL_MAX: Duration = Duration::from_millis(100);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// A request as the handlers see it: the head only (no endpoint takes a body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    /// The target as sent, path and query.
    pub target: String,
    pub authorization: Option<String>,
    pub content_length: u64,
}

/// Why a request head was refused, with its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// 400: not HTTP/1.x, or a header that does not parse.
    Malformed,
    /// 431: no end of headers within [`HEAD_BYTES_MAX`].
    TooLarge,
    /// 501: `Transfer-Encoding` (chunked bodies) is not supported.
    Chunked,
}

impl HeadError {
    fn status(self) -> u16 {
        match self {
            HeadError::Malformed => 400,
            HeadError::TooLarge => 431,
            HeadError::Chunked => 501,
        }
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` while the blank line that ends it
/// has not arrived, else the request and the head's length.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= HEAD_BYTES_MAX {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if end + 4 > HEAD_BYTES_MAX {
        return Err(HeadError::TooLarge);
    }
    let head = std::str::from_utf8(buf.get(..end).unwrap_or_default())
        .map_err(|_| HeadError::Malformed)?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (first.next(), first.next(), first.next(), first.next())
    else {
        return Err(HeadError::Malformed);
    };
    if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(HeadError::Malformed);
    }
    let mut request = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        authorization: None,
        content_length: 0,
    };
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HeadError::Malformed)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            request.content_length = value.parse().map_err(|_| HeadError::Malformed)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::Chunked);
        } else if name.eq_ignore_ascii_case("authorization") {
            request.authorization = Some(value.to_owned());
        }
    }
    Ok(Some((request, end + 4)))
}

/// An answer, before it is written.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// The `Allow` header of a 405: the method the path takes.
    pub allow: Option<&'static str>,
}

/// Every endpoint, as a 404 lists them: (method, path).
const ENDPOINTS: [(&str, &str); 9] = [
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/status"),
    ("GET", "/report/alerts?day=YYYY-MM-DD"),
    ("POST", "/reload"),
    ("POST", "/su/{EUI-64}/pause"),
    ("POST", "/su/{EUI-64}/resume"),
    ("POST", "/restrict"),
    ("POST", "/restore"),
];

/// The method a known path takes, `None` for an unknown path.
fn method_of(parts: &[&str]) -> Option<&'static str> {
    match parts {
        ["healthz"] | ["metrics"] | ["status"] | ["report", "alerts"] => Some("GET"),
        ["reload"] | ["restrict"] | ["restore"] | ["su", _, "pause" | "resume"] => Some("POST"),
        _ => None,
    }
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=UTF-8",
            body: body.into(),
            allow: None,
        }
    }

    fn json(value: &serde_json::Value) -> Response {
        match serde_json::to_string_pretty(value) {
            Ok(json) => Response {
                status: 200,
                content_type: "application/json",
                body: json + "\n",
                allow: None,
            },
            Err(e) => Response::text(500, format!("{e}\n")),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            413 => "Content Too Large",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "",
        };
        let allow = self
            .allow
            .map_or_else(String::new, |m| format!("Allow: {m}\r\n"));
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// Where a connection is.
enum State {
    /// Reading the request head.
    Head,
    /// Reading (and discarding) `remaining` bytes of body.
    Body { remaining: u64, request: Request },
    /// At a worker.
    Waiting,
    /// Writing the response from `at`.
    Writing { out: Vec<u8>, at: usize },
    /// Answered and half-closed: discarding input until the client closes.
    Closing,
}

struct Conn {
    stream: TcpStream,
    id: u64,
    since: Instant,
    deadline: Instant,
    buf: Vec<u8>,
    state: State,
}

impl Conn {
    /// Still sending its request, or done: closing it loses no answer.
    fn evictable(&self) -> bool {
        matches!(
            self.state,
            State::Head | State::Body { .. } | State::Closing
        )
    }
}

struct Job {
    slot: usize,
    id: u64,
    request: Request,
}

struct Done {
    slot: usize,
    id: u64,
    out: Vec<u8>,
}

pub(crate) struct Admin {
    poll: Poll,
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Admin {
    pub(crate) fn bind(
        addr: SocketAddr,
        shared: Arc<Shared>,
    ) -> Result<(Admin, SocketAddr), EngineError> {
        let listener = std::net::TcpListener::bind(addr).map_err(|source| EngineError::Bind {
            port: Port::Admin,
            addr,
            source,
        })?;
        let failed = || EngineError::listen(Port::Admin, addr);
        listener.set_nonblocking(true).map_err(failed())?;
        let bound = listener.local_addr().map_err(failed())?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new().map_err(EngineError::poll(EngineThread::Admin))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(EngineError::poll(EngineThread::Admin))?;
        Ok((
            Admin {
                poll,
                listener,
                shared,
            },
            bound,
        ))
    }

    pub(crate) fn run(self) {
        let Admin {
            poll,
            listener,
            shared,
        } = self;
        let waker = match Waker::new(poll.registry(), WAKER) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                tracing::error!(error = %e, "admin interface cannot start");
                return;
            }
        };
        let listen = shared.config.listen;
        let conns_max = listen.admin_connections_max as usize;
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(conns_max);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::new();
        for i in 0..listen.admin_workers {
            let (jobs, done, waker, shared) = (
                Arc::clone(&job_rx),
                done_tx.clone(),
                Arc::clone(&waker),
                Arc::clone(&shared),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("dsplane-admin-worker-{i}"))
                .spawn(move || work(&jobs, &done, &waker, &shared));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => tracing::error!(error = %e, "cannot start an admin worker"),
            }
        }
        drop(done_tx);
        let mut io = AdminIo {
            poll,
            listener,
            shared: Arc::clone(&shared),
            conns: (0..conns_max).map(|_| None).collect(),
            next_id: 0,
            jobs: job_tx,
            done: done_rx,
        };
        io.run();
        // Dropping the job sender ends the workers once they finish the request in hand; no
        // worker ever waits on a client.
        let AdminIo { jobs, conns, .. } = io;
        drop(jobs);
        drop(conns);
        for w in workers {
            let _ = w.join();
        }
        super::save_report(&shared);
    }
}

/// An admin worker: computes answers, touches no socket.
fn work(
    jobs: &Mutex<mpsc::Receiver<Job>>,
    done: &mpsc::Sender<Done>,
    waker: &Waker,
    shared: &Shared,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let response = handle(shared, &job.request);
        let out = response.to_bytes();
        if done
            .send(Done {
                slot: job.slot,
                id: job.id,
                out,
            })
            .is_err()
        {
            return;
        }
        let _ = waker.wake();
    }
}

struct AdminIo {
    poll: Poll,
    listener: TcpListener,
    shared: Arc<Shared>,
    conns: Vec<Option<Conn>>,
    next_id: u64,
    jobs: mpsc::SyncSender<Job>,
    done: mpsc::Receiver<Done>,
}

impl AdminIo {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut last_save = Instant::now();
        while !self.shared.is_shutting_down() {
            let now = Instant::now();
            // The alert report survives restarts: saved every few seconds, and at the end,
            // whatever the clients do.
            if now.duration_since(last_save) >= REPORT_SAVE_INTERVAL {
                super::save_report(&self.shared);
                last_save = now;
            }
            let next = self
                .conns
                .iter()
                .flatten()
                .filter(|c| !matches!(c.state, State::Waiting))
                .map(|c| c.deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(POLL_MAX);
            let save_in = REPORT_SAVE_INTERVAL.saturating_sub(now.duration_since(last_save));
            let timeout = next.min(POLL_MAX).min(save_in);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "admin poll failed; admin interface stopped");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => self.progress(t.wrapping_sub(FIRST_CONN)),
                }
            }
            while let Ok(done) = self.done.try_recv() {
                self.answered(done);
            }
            self.expire();
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, addr) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    return;
                }
            };
            let slot = match self.conns.iter().position(Option::is_none) {
                Some(slot) => Some(slot),
                None => self.evict_oldest(),
            };
            let Some(slot) = slot else {
                // Every connection is at a worker or being answered: nothing to evict.
                let _ = stream.write_all(&Response::text(503, "admin interface busy\n").to_bytes());
                tracing::debug!(%addr, "admin connection refused: busy");
                continue;
            };
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(slot + FIRST_CONN),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(error = %e, "cannot register an admin connection");
                continue;
            }
            let now = Instant::now();
            let id = self.next_id;
            self.next_id += 1;
            if let Some(s) = self.conns.get_mut(slot) {
                *s = Some(Conn {
                    stream,
                    id,
                    since: now,
                    deadline: now + self.shared.config.listen.admin_request_deadline,
                    buf: Vec::new(),
                    state: State::Head,
                });
            }
            self.progress(slot);
        }
    }

    /// Closes the oldest connection that is still sending its request (503) or already
    /// answered, and gives its slot.
    fn evict_oldest(&mut self) -> Option<usize> {
        let slot = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| c.evictable())
            .min_by_key(|(_, c)| (!matches!(c.state, State::Closing), c.since))
            .map(|(i, _)| i)?;
        if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
            if !matches!(c.state, State::Closing) {
                let _ = c.stream.write_all(
                    &Response::text(503, "too many admin connections; this one was the oldest\n")
                        .to_bytes(),
                );
                tracing::debug!("admin connections at their limit: closed the oldest");
            }
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
        Some(slot)
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// Reads or writes what a connection's state asks for, as far as it can without waiting.
    fn progress(&mut self, slot: usize) {
        let body_max = u64::from(self.shared.config.listen.admin_body_bytes_max);
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            match &mut c.state {
                State::Waiting => return,
                State::Writing { out, at } => {
                    match c.stream.write(out.get(*at..).unwrap_or_default()) {
                        Ok(n) => {
                            *at += n;
                            if *at >= out.len() || n == 0 {
                                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                                c.state = State::Closing;
                                c.deadline = Instant::now() + LINGER;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.close(slot),
                    }
                }
                State::Closing => {
                    let mut sink = [0u8; 4096];
                    match c.stream.read(&mut sink) {
                        Ok(0) => return self.close(slot),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.close(slot),
                    }
                }
                State::Head => {
                    match parse_head(&c.buf) {
                        Ok(Some((request, len))) => {
                            if request.content_length > body_max {
                                let body = format!(
                                    "request body over the limit of {body_max} bytes (listen.admin_body_bytes_max)\n"
                                );
                                self.respond(slot, &Response::text(413, body));
                                continue;
                            }
                            let already = (c.buf.len() - len.min(c.buf.len())) as u64;
                            c.buf = Vec::new();
                            c.state = State::Body {
                                remaining: request.content_length.saturating_sub(already),
                                request,
                            };
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let body = match e {
                                HeadError::Chunked => {
                                    "chunked bodies are not supported; send Content-Length\n"
                                }
                                HeadError::TooLarge => "request headers too large\n",
                                HeadError::Malformed => "malformed HTTP request\n",
                            };
                            self.respond(slot, &Response::text(e.status(), body));
                            continue;
                        }
                    }
                    let mut chunk = [0u8; 2048];
                    let room = HEAD_BYTES_MAX.saturating_sub(c.buf.len()).min(chunk.len());
                    match c.stream.read(chunk.get_mut(..room).unwrap_or_default()) {
                        Ok(0) => return self.close(slot),
                        Ok(n) => c.buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.close(slot),
                    }
                }
                State::Body { remaining, request } => {
                    if *remaining == 0 {
                        let job = Job {
                            slot,
                            id: c.id,
                            request: request.clone(),
                        };
                        c.state = State::Waiting;
                        if self.jobs.try_send(job).is_err() {
                            self.respond(slot, &Response::text(503, "admin interface busy\n"));
                            continue;
                        }
                        return;
                    }
                    let mut sink = [0u8; 4096];
                    let want = (*remaining).min(sink.len() as u64) as usize;
                    match c.stream.read(sink.get_mut(..want).unwrap_or_default()) {
                        Ok(0) => return self.close(slot),
                        Ok(n) => *remaining -= n as u64,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.close(slot),
                    }
                }
            }
        }
    }

    /// Starts writing `response` on a connection.
    fn respond(&mut self, slot: usize, response: &Response) {
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            c.state = State::Writing {
                out: response.to_bytes(),
                at: 0,
            };
            c.deadline = Instant::now() + self.shared.config.listen.admin_request_deadline;
        }
    }

    /// A worker's answer: written if its connection is still there.
    fn answered(&mut self, done: Done) {
        let Some(c) = self.conns.get_mut(done.slot).and_then(Option::as_mut) else {
            return;
        };
        if c.id != done.id || !matches!(c.state, State::Waiting) {
            return;
        }
        c.state = State::Writing {
            out: done.out,
            at: 0,
        };
        c.deadline = Instant::now() + self.shared.config.listen.admin_request_deadline;
        self.progress(done.slot);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if c.deadline > now || matches!(c.state, State::Waiting) {
                continue;
            }
            if matches!(c.state, State::Head | State::Body { .. }) {
                let deadline_ms = self.shared.config.listen.admin_request_deadline.as_millis();
                let _ = c.stream.write_all(
                    &Response::text(
                        408,
                        format!("the whole request must arrive within {deadline_ms} ms\n"),
                    )
                    .to_bytes(),
                );
                tracing::debug!("admin request not received in time; closed");
            }
            self.close(slot);
        }
    }
}

fn authorised(shared: &Shared, request: &Request) -> bool {
    let Some(token) = &shared.config.admin_token else {
        return true;
    };
    request
        .authorization
        .as_deref()
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| token_eq(token.expose(), given.as_bytes()))
}

/// The answer to one request.
pub(crate) fn handle(shared: &Shared, request: &Request) -> Response {
    if !authorised(shared, request) {
        return Response::text(
            401,
            "unauthorised: give Authorization: Bearer <admin token>\n",
        );
    }
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((&request.target, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let Some(allowed) = method_of(&parts) else {
        let mut body = format!("no endpoint {path}; the endpoints are:\n");
        for (method, path) in ENDPOINTS {
            body.push_str(&format!("  {method} {path}\n"));
        }
        return Response::text(404, body);
    };
    if request.method != allowed {
        return Response {
            allow: Some(allowed),
            ..Response::text(
                405,
                format!("{path} takes {allowed}, not {}\n", request.method),
            )
        };
    }
    match (request.method.as_str(), parts.as_slice()) {
        ("GET", ["healthz"]) => Response::text(200, "ok\n"),
        ("GET", ["metrics"]) => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: shared.render_metrics(),
            allow: None,
        },
        ("GET", ["status"]) => Response::json(&status(shared)),
        ("GET", ["report", "alerts"]) => {
            let day = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("day="))
                .map(crate::report::day_of_date)
                .unwrap_or_else(|| Some(crate::report::utc_day(unix_now())));
            let Some(day) = day else {
                return Response::text(400, "day must be YYYY-MM-DD\n");
            };
            let summary = match shared.report.lock() {
                Ok(r) => r.day_summary(day),
                Err(_) => return Response::text(500, "report unavailable\n"),
            };
            match serde_json::to_value(&summary) {
                Ok(json) => Response::json(&json),
                Err(e) => Response::text(500, format!("{e}\n")),
            }
        }
        ("POST", ["reload"]) => match super::reload(shared) {
            Ok(warnings) => {
                let mut body = String::from("reloaded\n");
                for w in warnings {
                    body.push_str(&format!("warning: {w}\n"));
                }
                Response::text(200, body)
            }
            Err(e) => Response::text(400, format!("reload refused: {e}\n")),
        },
        ("POST", ["su", id, action @ ("pause" | "resume")]) => {
            let Ok(id) = id.parse::<Eui64>() else {
                return Response::text(400, "not an EUI-64, e.g. 90-B3-D5-1F-30-01-00-00\n");
            };
            let Some(su) = shared.su(id) else {
                return Response::text(404, "no such Service User\n");
            };
            let paused = *action == "pause";
            let Some(owner) = shared.sus.get(su as usize).map(|s| s.owner) else {
                return Response::text(404, "no such Service User\n");
            };
            if let Some(flag) = shared.su_paused.get(su as usize) {
                flag.store(paused, std::sync::atomic::Ordering::Relaxed);
            }
            send(shared, owner, Control::Pause { su, paused });
            tracing::info!(peer = %id, paused, "operator action: {action}");
            let done = if paused { "paused" } else { "resumed" };
            Response::text(200, format!("{id} {done}\n"))
        }
        ("POST", [action @ ("restrict" | "restore")]) => {
            let restricted = *action == "restrict";
            shared
                .restricted
                .store(restricted, std::sync::atomic::Ordering::Relaxed);
            for w in 0..shared.workers.len() {
                send(shared, w, Control::Restrict(restricted));
            }
            tracing::info!(restricted, "operator action: northbound {action}");
            let done = if restricted { "restricted" } else { "restored" };
            Response::text(200, format!("northbound {done}\n"))
        }
        _ => Response::text(500, "endpoint without a handler\n"),
    }
}

/// `GET /status`: what an operator asks first, as JSON.
fn status(shared: &Shared) -> serde_json::Value {
    use super::shared::PeerRef;
    use std::sync::atomic::Ordering;
    let snapshots = shared.peer_snapshots();
    let snapshot = |peer: PeerRef| snapshots.iter().find(|s| s.peer == peer).copied();
    let sus: Vec<serde_json::Value> = shared
        .sus
        .iter()
        .enumerate()
        .map(|(i, su)| {
            let seen = snapshot(PeerRef::Su(i as u32));
            let connected = seen.is_some_and(|s| s.connected);
            let paused = shared
                .su_paused
                .get(i)
                .is_some_and(|p| p.load(Ordering::Relaxed));
            let state = match (paused, connected) {
                (true, _) => "paused",
                (false, true) => "connected",
                (false, false) => "away",
            };
            serde_json::json!({
                "id": su.config.id.to_string(),
                "name": su.config.name,
                "state": state,
                "connected": connected,
                "paused": paused,
                "worker": su.owner,
                "queue_depth": {
                    "nms": seen.map_or(0, |s| s.nms),
                    "surb": seen.map_or(0, |s| s.surb),
                },
            })
        })
        .collect();
    let csps: Vec<serde_json::Value> = shared
        .csps
        .iter()
        .enumerate()
        .map(|(i, csp)| {
            let seen = snapshot(PeerRef::Csp(i as u32));
            let connected = seen.is_some_and(|s| s.connected);
            serde_json::json!({
                "name": csp.config.name,
                "state": if connected { "connected" } else { "away" },
                "connected": connected,
                "worker": csp.owner,
                "queue_depth": {
                    "nms": seen.map_or(0, |s| s.nms),
                    "surb": seen.map_or(0, |s| s.surb),
                },
            })
        })
        .collect();
    let file = shared
        .config_path
        .lock()
        .ok()
        .and_then(|p| p.as_ref().map(|p| p.display().to_string()));
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "workers": shared.workers.len(),
        "restricted": shared.restricted.load(Ordering::Relaxed),
        "config": {
            "file": file,
            "loaded_at": rfc3339(shared.config_loaded_unix_ns.load(Ordering::Relaxed)),
        },
        "service_users": sus,
        "csps": csps,
    })
}

/// `2026-11-23T10:15:30Z`: an instant in ns since the Unix epoch, UTC, to the second.
fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let day = crate::report::utc_day(unix_ns);
    let of_day = secs % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        crate::report::date_of(day),
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

fn send(shared: &Shared, worker: usize, control: Control) {
    if let Some(link) = shared.workers.get(worker) {
        if link.control.send(control).is_ok() {
            let _ = link.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_parsed_once_whole() {
        let text = b"POST /su/x/pause?a=b HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\nAuthorization: Bearer t\r\n\r\nhello";
        for cut in 0..text.len() - 5 {
            assert_eq!(parse_head(&text[..cut]), Ok(None), "cut at {cut}");
        }
        let (r, len) = parse_head(text).unwrap().unwrap();
        assert_eq!(len, text.len() - 5);
        assert_eq!(
            r,
            Request {
                method: "POST".into(),
                target: "/su/x/pause?a=b".into(),
                authorization: Some("Bearer t".into()),
                content_length: 5,
            }
        );
    }

    #[test]
    fn bad_heads_get_their_status() {
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(HEAD_BYTES_MAX));
        assert_eq!(parse_head(long.as_bytes()), Err(HeadError::TooLarge));
        assert_eq!(
            parse_head(&vec![b'a'; HEAD_BYTES_MAX]),
            Err(HeadError::TooLarge)
        );
        assert!(parse_head(&vec![b'a'; HEAD_BYTES_MAX - 1])
            .unwrap()
            .is_none());
        for bad in [
            &b"GET / HTTP/1.1 extra\r\n\r\n"[..],
            b"GET nothing HTTP/1.1\r\n\r\n",
            b"GET / SPDY/3\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"\xff / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_head(bad), Err(HeadError::Malformed), "{bad:?}");
        }
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::Chunked)
        );
        assert_eq!(HeadError::TooLarge.status(), 431);
    }

    #[test]
    fn instants_are_written_in_rfc_3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_428_930_999_000_000), "2026-11-23T10:15:30Z");
    }

    #[test]
    fn every_listed_endpoint_has_its_method() {
        for (method, path) in ENDPOINTS {
            let path = path.split('?').next().unwrap().replace("{EUI-64}", "x");
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            assert_eq!(method_of(&parts), Some(method), "{path}");
        }
    }

    #[test]
    fn a_response_says_its_length_and_closes() {
        let bytes = Response::text(413, "too big\n").to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 413 Content Too Large\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 8\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\ntoo big\n"));
    }
}

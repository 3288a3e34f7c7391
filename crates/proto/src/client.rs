//! A small blocking client of PROTOCOL.md, for tests, the load generator and Service Users'
//! engineers trying dsplane out.
//!
//! It does the HELLO handshake, numbers the data frames it sends (`msg_id` 1, 2, 3… per
//! connection, as PROTOCOL.md asks), and reads frames with a timeout. It does not acknowledge
//! anything by itself: the caller decides when a frame is processed and calls [`Client::ack`],
//! which is how a test holds a window full of unacknowledged frames.
//!
//! ```no_run
//! use dsplane_proto::client::Client;
//! use dsplane_proto::ids::Eui64;
//! use std::time::Duration;
//!
//! let su: Eui64 = "90-B3-D5-1F-30-01-00-00".parse().unwrap();
//! let mut client = Client::connect_su("127.0.0.1:7100", su, "demo-su-token").unwrap();
//! while let Some(frame) = client.recv(Duration::from_secs(1)).unwrap() {
//!     println!("{:?} at level {}", frame.header.kind, frame.header.priority);
//!     client.ack(frame.header.msg_id).unwrap();
//! }
//! ```
//!
//! # Several nodes
//!
//! With high availability dsplane runs on several nodes, exactly one of them active. A standby
//! answers HELLO with NACK 5 (overloaded) whose detail starts with [`STANDBY_DETAIL_PREFIX`]
//! (`standby; active node is n2`, or `standby; no active node`) and closes the connection.
//! [`Client::connect_any`] (and [`Client::connect_any_su`], [`Client::connect_any_csp`]) take
//! every configured address and connect to whichever node is active: a standby, an address
//! where nothing listens, a node that does not answer in time or closes before it answers is
//! passed over, and the list is tried again after [`CONNECT_ANY_PAUSE`] until the deadline, so
//! a takeover under way is waited for. Any other refusal (a wrong token, an unknown SU) ends it
//! at once: every node would refuse the same credentials, so trying again only hides the error.
//!
//! ```no_run
//! use dsplane_proto::client::Client;
//! use dsplane_proto::ids::Eui64;
//! use std::net::SocketAddr;
//! use std::time::Duration;
//!
//! let nodes: Vec<SocketAddr> = vec!["10.0.0.1:7100".parse().unwrap(), "10.0.0.2:7100".parse().unwrap()];
//! let su: Eui64 = "90-B3-D5-1F-30-01-00-00".parse().unwrap();
//! let client = Client::connect_any_su(&nodes, su, "demo-su-token", Duration::from_secs(10)).unwrap();
//! println!("connected to the active node, {}", client.peer_addr());
//! ```

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::ids::Eui64;
use crate::wire::{
    DecodeError, Frame, FrameDecoder, Kind, NackReason, Role, PAYLOAD_BYTES_MAX_CEILING,
};

/// How long [`Client::connect_su`] and [`Client::connect_csp`] wait for HELLO_OK.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the detail of a standby's NACK 5 to a HELLO starts with: `standby; active node is
/// <name>`, or `standby; no active node` while it knows of none.
pub const STANDBY_DETAIL_PREFIX: &str = "standby;";

/// How long [`Client::connect_any`] pauses after a round over its addresses found no active
/// node: short against a takeover (a lease, a second by default), long enough not to spin on a
/// list of standbys.
pub const CONNECT_ANY_PAUSE: Duration = Duration::from_millis(75);

/// How long one attempt of [`Client::connect_any`] waits for its TCP connection, and then again
/// for the answer to its HELLO. A node that accepts and never answers (stopped, or hung) costs
/// every round this much, so it is short. The cost: dsplane delays its refusal of an address's
/// fourth and later bad tokens by 1 s doubling to 8 s (`docs/admission.md`), and a refusal
/// delayed past this is seen as no answer, which [`ClientError::NoActiveNode`] says.
pub const CONNECT_ANY_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong talking to dsplane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// dsplane sent bytes that are not a valid frame.
    #[error("dsplane sent a malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// dsplane refused the HELLO ([`is_standby_refusal`] tells whether it was a standby).
    #[error("{addr} refused the HELLO: NACK {}: {detail}", reason_text(.reason))]
    Refused {
        /// The address that refused it.
        addr: SocketAddr,
        /// The NACK reason.
        reason: Option<NackReason>,
        /// The NACK's detail text.
        detail: String,
    },
    /// dsplane answered the HELLO with something other than HELLO_OK or NACK.
    #[error("expected HELLO_OK, got {0}")]
    Unexpected(Kind),
    /// The token is empty or longer than 256 bytes.
    #[error("a token must be 1 to 256 bytes")]
    Token,
    /// dsplane closed the connection.
    #[error("dsplane closed the connection")]
    Closed,
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// [`Client::connect_any`] was given no address.
    #[error("no address to connect to")]
    NoAddress,
    /// [`Client::connect_any`] found no active node before its deadline: what each address
    /// answered last.
    #[error(
        "no active dsplane node after {:.1} s of trying {}: {}",
        .waited.as_secs_f64(),
        plural(.answers.len(), "address", "addresses"),
        AnswersText(.answers)
    )]
    NoActiveNode {
        /// How long it tried.
        waited: Duration,
        /// One per address, in the order given.
        answers: Vec<NodeAnswer>,
    },
}

/// What one address answered [`Client::connect_any`], the last time it was tried.
#[derive(Debug)]
#[non_exhaustive]
pub struct NodeAnswer {
    /// The address.
    pub addr: SocketAddr,
    /// How many times it was tried.
    pub attempts: u32,
    /// What the last attempt ended with: a standby's refusal ([`is_standby_refusal`]), a
    /// connection error, [`ClientError::Timeout`], [`ClientError::Closed`], or a frame that is
    /// not dsplane's answer to a HELLO.
    pub last: ClientError,
}

/// `10.0.0.2:7100 (3 tries): a standby, its NACK says "standby; active node is n2"`, or
/// `10.0.0.3:7100: connection error: Connection refused (os error 111)`.
impl fmt::Display for NodeAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.attempts > 1 {
            write!(f, " ({} tries)", self.attempts)?;
        }
        match &self.last {
            ClientError::Refused { detail, .. } if is_standby_refusal(&self.last) => {
                write!(f, ": a standby, its NACK says \"{detail}\"")
            }
            ClientError::Timeout => write!(
                f,
                ": accepted the connection but did not answer the HELLO within {} s (stopped, \
                 hung, or delaying its refusal of repeated bad tokens)",
                CONNECT_ANY_ATTEMPT_TIMEOUT.as_secs()
            ),
            ClientError::Closed => write!(f, ": closed the connection before answering the HELLO"),
            other => write!(f, ": {other}"),
        }
    }
}

/// The answers of [`ClientError::NoActiveNode`], `; `-separated.
struct AnswersText<'a>(&'a [NodeAnswer]);

impl fmt::Display for AnswersText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, answer) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{answer}")?;
        }
        Ok(())
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Whether `error` is a standby's refusal of a HELLO: NACK 5 (overloaded) with a detail that
/// starts with [`STANDBY_DETAIL_PREFIX`]. Another node may be active: try the other addresses.
///
/// A NACK 5 with another detail (a CSP link with all its connections open, too many handshakes
/// pending) comes from the active node itself and is not a standby's.
pub fn is_standby_refusal(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Refused {
            reason: Some(NackReason::Overloaded),
            detail,
            ..
        } if detail.starts_with(STANDBY_DETAIL_PREFIX)
    )
}

/// Whether [`Client::connect_any`] passes over an address that answered with `error` and goes
/// on with the next: a standby, or a node that cannot be reached, does not answer in time, or
/// answers with something that is not dsplane's answer to a HELLO (another address may be
/// right). A refusal for any other reason would be the same on every node, so it is returned.
fn try_another_node(error: &ClientError) -> bool {
    match error {
        ClientError::Refused { .. } => is_standby_refusal(error),
        ClientError::Io(_)
        | ClientError::Decode(_)
        | ClientError::Unexpected(_)
        | ClientError::Closed
        | ClientError::Timeout => true,
        ClientError::Token | ClientError::NoAddress | ClientError::NoActiveNode { .. } => false,
    }
}

/// A NACK reason as a message shows it, `unknown` for an `aux` PROTOCOL.md does not define.
fn reason_text(reason: &Option<NackReason>) -> String {
    reason.map_or_else(|| "reason unknown".to_owned(), |r| r.to_string())
}

/// One connection to dsplane, as an SU or a CSP.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    /// The address connected to.
    addr: SocketAddr,
    decoder: FrameDecoder,
    next_msg_id: u64,
    out: Vec<u8>,
    /// Highest `msg_id` dsplane has acknowledged on this connection.
    acked: u64,
}

impl Client {
    /// Connects to the SU port as Service User `su_id` and waits for HELLO_OK.
    pub fn connect_su(
        addr: impl ToSocketAddrs,
        su_id: Eui64,
        token: &str,
    ) -> Result<Client, ClientError> {
        Self::connect(addr, Role::Su, su_id, token)
    }

    /// Connects to the CSP port with a CSP's token and waits for HELLO_OK.
    pub fn connect_csp(addr: impl ToSocketAddrs, token: &str) -> Result<Client, ClientError> {
        Self::connect(addr, Role::Csp, Eui64(0), token)
    }

    /// Connects and sends HELLO with any role (tests use this to send the wrong one).
    pub fn connect(
        addr: impl ToSocketAddrs,
        role: Role,
        su_id: Eui64,
        token: &str,
    ) -> Result<Client, ClientError> {
        let hello = Frame::hello(role, su_id, token).map_err(|_| ClientError::Token)?;
        let mut client = Client::connect_raw(addr)?;
        client.hello(&hello, HELLO_TIMEOUT)?;
        Ok(client)
    }

    /// [`Client::connect_any`] as Service User `su_id`.
    pub fn connect_any_su(
        addrs: &[SocketAddr],
        su_id: Eui64,
        token: &str,
        deadline: Duration,
    ) -> Result<Client, ClientError> {
        Self::connect_any(addrs, Role::Su, su_id, token, deadline)
    }

    /// [`Client::connect_any`] as a CSP.
    pub fn connect_any_csp(
        addrs: &[SocketAddr],
        token: &str,
        deadline: Duration,
    ) -> Result<Client, ClientError> {
        Self::connect_any(addrs, Role::Csp, Eui64(0), token, deadline)
    }

    /// Connects to whichever of the nodes at `addrs` is active, trying them in turn, again and
    /// again, for up to `deadline`.
    ///
    /// An address is passed over when nothing listens there, when its node is a standby
    /// ([`is_standby_refusal`]), when it does not answer within [`CONNECT_ANY_ATTEMPT_TIMEOUT`],
    /// closes before it answers, or answers with something that is not dsplane's answer to a
    /// HELLO. After a round with no active node it pauses [`CONNECT_ANY_PAUSE`] and starts
    /// again from the first address. Every address is tried at least once, however short the
    /// deadline; after the first round no attempt starts once the deadline has passed, and one
    /// started before it runs its course, so that what each address answered is its own.
    ///
    /// # Errors
    ///
    /// * [`ClientError::Refused`] at once, naming the address, for any refusal but a standby's
    ///   (a wrong token, an unknown SU): every node would refuse it alike;
    /// * [`ClientError::Token`] for a token of the wrong length, [`ClientError::NoAddress`]
    ///   for an empty `addrs`;
    /// * [`ClientError::NoActiveNode`] when the deadline passed, with what each address
    ///   answered last.
    pub fn connect_any(
        addrs: &[SocketAddr],
        role: Role,
        su_id: Eui64,
        token: &str,
        deadline: Duration,
    ) -> Result<Client, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoAddress);
        }
        let hello = Frame::hello(role, su_id, token).map_err(|_| ClientError::Token)?;
        let start = Instant::now();
        let mut answers: Vec<NodeAnswer> = Vec::with_capacity(addrs.len());
        let mut round = 0u32;
        loop {
            for (i, &addr) in addrs.iter().enumerate() {
                // An attempt is never cut short by the deadline, so that every answer recorded
                // is the node's own, not a timeout of ours.
                if round > 0 && start.elapsed() >= deadline {
                    break;
                }
                let error = match Client::connect_once(addr, &hello, CONNECT_ANY_ATTEMPT_TIMEOUT) {
                    Ok(client) => return Ok(client),
                    Err(e) if try_another_node(&e) => e,
                    Err(e) => return Err(e),
                };
                match answers.get_mut(i) {
                    Some(answer) => {
                        answer.attempts += 1;
                        answer.last = error;
                    }
                    None => answers.push(NodeAnswer {
                        addr,
                        attempts: 1,
                        last: error,
                    }),
                }
            }
            round += 1;
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(CONNECT_ANY_PAUSE));
        }
        Err(ClientError::NoActiveNode {
            waited: start.elapsed(),
            answers,
        })
    }

    /// One attempt of [`Client::connect_any`]: the TCP connection and then the answer to
    /// `hello`, each within `timeout`.
    fn connect_once(
        addr: SocketAddr,
        hello: &Frame,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        let mut client = Client::from_stream(stream, addr)?;
        client.hello(hello, timeout)?;
        Ok(client)
    }

    /// Sends `hello` and waits up to `timeout` for HELLO_OK.
    fn hello(&mut self, hello: &Frame, timeout: Duration) -> Result<(), ClientError> {
        self.send_frame(hello)?;
        match self.recv(timeout)? {
            Some(f) if f.header.kind == Kind::HelloOk => Ok(()),
            Some(f) if f.header.kind == Kind::Nack => Err(ClientError::Refused {
                addr: self.addr,
                reason: f.header.nack_reason(),
                detail: String::from_utf8_lossy(&f.payload).into_owned(),
            }),
            Some(f) => Err(ClientError::Unexpected(f.header.kind)),
            None => Err(ClientError::Timeout),
        }
    }

    /// A TCP connection with no HELLO sent, for tests of what dsplane does before HELLO.
    pub fn connect_raw(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr)?;
        let addr = stream.peer_addr()?;
        Client::from_stream(stream, addr)
    }

    fn from_stream(stream: TcpStream, addr: SocketAddr) -> Result<Client, ClientError> {
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            addr,
            decoder: FrameDecoder::new(PAYLOAD_BYTES_MAX_CEILING),
            next_msg_id: 1,
            out: Vec::with_capacity(64 * 1024),
            acked: 0,
        })
    }

    /// Sends a frame; a data frame gets the next `msg_id`, which is returned (other kinds are
    /// sent as given, and return their own `msg_id`).
    pub fn send(&mut self, mut frame: Frame) -> io::Result<u64> {
        let msg_id = self.number(&mut frame);
        self.send_frame(&frame)?;
        Ok(msg_id)
    }

    /// Sends many frames in one write, numbering the data frames; returns the last `msg_id`.
    pub fn send_batch(&mut self, frames: impl IntoIterator<Item = Frame>) -> io::Result<u64> {
        let mut last = 0;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        for mut frame in frames {
            last = self.number(&mut frame);
            out.extend_from_slice(&frame.header_bytes());
            out.extend_from_slice(&frame.payload);
        }
        let result = self.stream.write_all(&out);
        self.out = out;
        result.map(|()| last)
    }

    fn number(&mut self, frame: &mut Frame) -> u64 {
        if frame.header.kind.is_data() {
            frame.header.msg_id = self.next_msg_id;
            self.next_msg_id += 1;
        }
        frame.header.msg_id
    }

    /// Sends a frame exactly as given (no numbering).
    pub fn send_frame(&mut self, frame: &Frame) -> io::Result<()> {
        let mut buf = Vec::with_capacity(frame.wire_len());
        buf.extend_from_slice(&frame.header_bytes());
        buf.extend_from_slice(&frame.payload);
        self.stream.write_all(&buf)
    }

    /// Sends raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Acknowledges every frame up to `msg_id`.
    pub fn ack(&mut self, msg_id: u64) -> io::Result<()> {
        self.send_frame(&Frame::ack(msg_id))
    }

    /// The next frame, or `None` if none came within `timeout`.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] once dsplane has closed the connection and every frame before
    /// the close has been returned.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                if frame.header.kind == Kind::Ack {
                    self.acked = self.acked.max(frame.header.msg_id);
                }
                return Ok(Some(frame));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.decoder.fill_from(&mut self.stream, usize::MAX) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Err(ClientError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads until the ACK covering `msg_id` arrives; returns the other frames read meanwhile
    /// (NACKs, data, PONGs) in order.
    pub fn wait_ack(&mut self, msg_id: u64, timeout: Duration) -> Result<Vec<Frame>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        loop {
            // ACKs are cumulative: one read earlier may already cover `msg_id`.
            if self.acked >= msg_id {
                return Ok(others);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(f) if f.header.kind == Kind::Ack && f.header.msg_id >= msg_id => {
                    return Ok(others)
                }
                Some(f) if f.header.kind == Kind::Ack => {}
                // A NACK of the frame itself ends the wait too: no ACK will cover it.
                Some(f) if f.header.kind == Kind::Nack && f.header.msg_id >= msg_id => {
                    others.push(f);
                    return Ok(others);
                }
                Some(f) => others.push(f),
                None => return Err(ClientError::Timeout),
            }
        }
    }

    /// The highest `msg_id` dsplane has acknowledged so far (ACKs are cumulative).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The `msg_id` the next data frame will get.
    pub fn next_msg_id(&self) -> u64 {
        self.next_msg_id
    }

    /// The address this client is connected to (with [`Client::connect_any`], the active
    /// node's).
    pub fn peer_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The underlying socket, e.g. to shut it down in a test.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PAYLOAD_BYTES_MAX_DEFAULT;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;

    /// The longest a fake node serves, so that its thread ends by itself even when a test
    /// fails before dropping it.
    const FAKE_NODE_LIFE: Duration = Duration::from_secs(60);
    /// Deadlines the tests that must connect give: far longer than they need, so that a slow
    /// machine cannot fail them.
    const GENEROUS: Duration = Duration::from_secs(30);

    /// A node on 127.0.0.1 played by a thread: it reads each connection's HELLO, answers it
    /// with `answer(n, hello)` (n counts HELLOs from 0) and closes the connection.
    struct FakeNode {
        addr: SocketAddr,
        hellos: Arc<AtomicU32>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl FakeNode {
        fn start(answer: impl Fn(u32, &Frame) -> Frame + Send + 'static) -> FakeNode {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let hellos = Arc::new(AtomicU32::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (hellos, stop) = (hellos.clone(), stop.clone());
                std::thread::spawn(move || {
                    let born = Instant::now();
                    while !stop.load(Ordering::Relaxed) && born.elapsed() < FAKE_NODE_LIFE {
                        let mut stream = match listener.accept() {
                            Ok((stream, _)) => stream,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(2));
                                continue;
                            }
                            Err(_) => return,
                        };
                        let Some(hello) = read_hello(&mut stream) else {
                            continue;
                        };
                        let n = hellos.fetch_add(1, Ordering::SeqCst);
                        let reply = answer(n, &hello);
                        let mut bytes = reply.header_bytes().to_vec();
                        bytes.extend_from_slice(&reply.payload);
                        let _ = stream.write_all(&bytes);
                        // Dropped: closed, as a standby closes after its NACK.
                    }
                })
            };
            FakeNode {
                addr,
                hellos,
                stop,
                thread: Some(thread),
            }
        }

        /// A standby naming `active` (or none).
        fn standby(active: Option<&str>) -> FakeNode {
            let detail = match active {
                Some(name) => format!("standby; active node is {name}"),
                None => "standby; no active node".to_owned(),
            };
            FakeNode::start(move |_, hello| {
                Frame::nack(hello.header.msg_id, NackReason::Overloaded, &detail)
            })
        }

        /// The active node: HELLO_OK for `token`, NACK 3 for any other.
        fn active(token: &'static str) -> FakeNode {
            FakeNode::start(move |_, hello| active_answer(hello, token))
        }

        /// How many HELLOs it has answered.
        fn hellos(&self) -> u32 {
            self.hellos.load(Ordering::SeqCst)
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

    fn active_answer(hello: &Frame, token: &str) -> Frame {
        if hello.hello_token() == Some(token) {
            Frame::hello_ok()
        } else {
            Frame::nack(hello.header.msg_id, NackReason::Unauthorised, "bad token")
        }
    }

    /// The HELLO a client sent, or `None` if it sent something else or went away.
    fn read_hello(stream: &mut TcpStream) -> Option<Frame> {
        stream.set_nonblocking(false).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
        loop {
            if let Some(frame) = decoder.next_frame().ok()? {
                return (frame.header.kind == Kind::Hello).then_some(frame);
            }
            if decoder.fill_from(stream, usize::MAX).ok()? == 0 {
                return None;
            }
        }
    }

    /// A loopback address nothing listens on (bound, then released).
    fn closed_port() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn su() -> Eui64 {
        Eui64(0x90B3_D51F_3001_0000)
    }

    fn refusal(reason: Option<NackReason>, detail: &str) -> ClientError {
        ClientError::Refused {
            addr: closed_port(),
            reason,
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn a_standby_refusal_is_nack_5_with_the_standby_detail() {
        let overloaded = Some(NackReason::Overloaded);
        assert!(is_standby_refusal(&refusal(
            overloaded,
            "standby; active node is n2"
        )));
        assert!(is_standby_refusal(&refusal(
            overloaded,
            "standby; no active node"
        )));
        // NACK 5 from the active node itself, and other reasons, are not.
        assert!(!is_standby_refusal(&refusal(
            overloaded,
            "connection limit reached; retry later"
        )));
        assert!(!is_standby_refusal(&refusal(overloaded, "")));
        assert!(!is_standby_refusal(&refusal(
            Some(NackReason::Unauthorised),
            "standby; no active node"
        )));
        assert!(!is_standby_refusal(&refusal(
            None,
            "standby; no active node"
        )));
        assert!(!is_standby_refusal(&ClientError::Timeout));
        assert!(!is_standby_refusal(&ClientError::Closed));
    }

    #[test]
    fn connects_to_the_active_node_past_closed_ports_and_standbys() {
        let named = FakeNode::standby(Some("n4"));
        let unnamed = FakeNode::standby(None);
        let active = FakeNode::active("right");
        let addrs = [closed_port(), named.addr, unnamed.addr, active.addr];
        let client = Client::connect_any_su(&addrs, su(), "right", GENEROUS).unwrap();
        assert_eq!(client.peer_addr(), active.addr);
        assert_eq!(
            (named.hellos(), unnamed.hellos(), active.hellos()),
            (1, 1, 1)
        );
    }

    #[test]
    fn cycles_over_the_addresses_until_a_standby_takes_over() {
        // The first node is a standby for its first three HELLOs, then active: a takeover.
        let taking_over = FakeNode::start(|n, hello| {
            if n < 3 {
                Frame::nack(0, NackReason::Overloaded, "standby; active node is n9")
            } else {
                active_answer(hello, "right")
            }
        });
        let standby = FakeNode::standby(Some("n1"));
        let addrs = [taking_over.addr, standby.addr];
        let client = Client::connect_any_csp(&addrs, "right", GENEROUS).unwrap();
        assert_eq!(client.peer_addr(), taking_over.addr);
        assert_eq!(taking_over.hellos(), 4);
        assert!(standby.hellos() >= 3, "{}", standby.hellos());
    }

    #[test]
    fn every_address_is_tried_once_however_short_the_deadline() {
        let standby = FakeNode::standby(Some("n2"));
        let active = FakeNode::active("right");
        let addrs = [standby.addr, active.addr];
        let client = Client::connect_any_su(&addrs, su(), "right", Duration::ZERO).unwrap();
        assert_eq!(client.peer_addr(), active.addr);
    }

    #[test]
    fn a_wrong_token_is_returned_at_once_and_never_tried_again() {
        let standby = FakeNode::standby(Some("n2"));
        let active = FakeNode::active("right");
        let after = FakeNode::active("right");
        let addrs = [standby.addr, active.addr, after.addr];
        match Client::connect_any_su(&addrs, su(), "wrong", GENEROUS) {
            Err(ClientError::Refused {
                addr,
                reason,
                detail,
            }) => {
                assert_eq!(addr, active.addr);
                assert_eq!(reason, Some(NackReason::Unauthorised));
                assert_eq!(detail, "bad token");
            }
            other => panic!("expected the refusal, got {other:?}"),
        }
        assert_eq!(
            (standby.hellos(), active.hellos(), after.hellos()),
            (1, 1, 0)
        );
    }

    #[test]
    fn a_nack_5_that_is_not_a_standby_s_is_returned_at_once() {
        let full = FakeNode::start(|_, _| {
            Frame::nack(
                0,
                NackReason::Overloaded,
                "connection limit reached; retry later",
            )
        });
        let active = FakeNode::active("right");
        let e = Client::connect_any_csp(&[full.addr, active.addr], "right", GENEROUS).unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Refused {
                    reason: Some(NackReason::Overloaded),
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(&full.addr.to_string()), "{e}");
        assert_eq!((full.hellos(), active.hellos()), (1, 0));
    }

    #[test]
    fn a_node_that_accepts_and_never_answers_is_passed_over() {
        // Bound and never accepted from: the kernel completes the TCP handshake, nobody reads
        // the HELLO (a stopped node).
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let active = FakeNode::active("right");
        let addrs = [silent.local_addr().unwrap(), active.addr];
        let client = Client::connect_any_su(&addrs, su(), "right", GENEROUS).unwrap();
        assert_eq!(client.peer_addr(), active.addr);
    }

    #[test]
    fn past_the_deadline_the_error_names_every_address_and_its_last_answer() {
        let closed = closed_port();
        let standby = FakeNode::standby(Some("n2"));
        let e = Client::connect_any_su(
            &[closed, standby.addr],
            su(),
            "right",
            Duration::from_millis(300),
        )
        .unwrap_err();
        let ClientError::NoActiveNode { answers, .. } = &e else {
            panic!("expected NoActiveNode, got {e:?}");
        };
        assert_eq!(answers.len(), 2);
        assert_eq!(answers[0].addr, closed);
        assert!(
            matches!(answers[0].last, ClientError::Io(_)),
            "{:?}",
            answers[0].last
        );
        assert_eq!(answers[1].addr, standby.addr);
        assert!(
            is_standby_refusal(&answers[1].last),
            "{:?}",
            answers[1].last
        );
        assert_eq!(answers[1].attempts, standby.hellos());
        let text = e.to_string();
        assert!(text.starts_with("no active dsplane node after"), "{text}");
        assert!(text.contains("2 addresses"), "{text}");
        assert!(text.contains(&closed.to_string()), "{text}");
        assert!(text.contains(&standby.addr.to_string()), "{text}");
        assert!(
            text.contains("a standby, its NACK says \"standby; active node is n2\""),
            "{text}"
        );
    }

    #[test]
    fn no_address_and_a_bad_token_length_fail_before_connecting() {
        assert!(matches!(
            Client::connect_any_su(&[], su(), "right", GENEROUS),
            Err(ClientError::NoAddress)
        ));
        let active = FakeNode::active("right");
        assert!(matches!(
            Client::connect_any_csp(&[active.addr], "", GENEROUS),
            Err(ClientError::Token)
        ));
        assert_eq!(active.hellos(), 0);
    }
}

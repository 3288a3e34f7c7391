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

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::ids::Eui64;
use crate::wire::{
    DecodeError, Frame, FrameDecoder, Kind, NackReason, Role, PAYLOAD_BYTES_MAX_CEILING,
};

/// How long [`Client::connect_su`] and [`Client::connect_csp`] wait for HELLO_OK.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// dsplane refused the HELLO.
    #[error("HELLO refused: NACK {}: {detail}", reason_text(.reason))]
    Refused {
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
}

/// A NACK reason as a message shows it, `unknown` for an `aux` PROTOCOL.md does not define.
fn reason_text(reason: &Option<NackReason>) -> String {
    reason.map_or_else(|| "reason unknown".to_owned(), |r| r.to_string())
}

/// One connection to dsplane, as an SU or a CSP.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
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
        client.send_frame(&hello)?;
        match client.recv(HELLO_TIMEOUT)? {
            Some(f) if f.header.kind == Kind::HelloOk => Ok(client),
            Some(f) if f.header.kind == Kind::Nack => Err(ClientError::Refused {
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
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
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

    /// The underlying socket, e.g. to shut it down in a test.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

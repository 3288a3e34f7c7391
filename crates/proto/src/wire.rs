//! The wire protocol of PROTOCOL.md: the 64-byte frame header, the frames dsplane sends, and a
//! streaming, zero-copy decoder.
//!
//! This module is sans-IO: it turns bytes into [`Frame`]s and back and never touches a socket or
//! a clock. The event loop reads into a [`FrameDecoder`] and writes what [`Frame::header_bytes`]
//! and [`Frame::payload`] hand it.
//!
//! # Why a fixed 64-byte header
//!
//! Every frame starts with the same 64 bytes: one cache line on the machines dsplane runs on. The
//! fields are fixed-width, little-endian and naturally aligned, so the header is eight `u64`
//! words and decoding it is eight loads with no length-dependent control flow. There are no
//! varints or text to scan, so the cost of a header does not depend on what a peer puts in it,
//! and a hostile peer cannot make parsing slow.
//!
//! # Why every rule is one compare
//!
//! Almost every header that arrives is valid, so [`Header::decode`] is written for that case. It
//! reads the header as its eight little-endian words once, and every rule is a compare on one of
//! two words: magic and version are the low five bytes of word 0 (one mask and compare), kind and
//! mode are its next two bytes (one range compare each: kind 0 wraps to 255, so one unsigned
//! compare checks both ends of 1–11), and word 7 is `payload_len` with the reserved field above
//! it, so "reserved is 0 and the length is within the limit" is one compare of the whole word
//! against the limit. The results are ORed without short-circuiting into one flag: a valid
//! header costs these four compares and nothing else, and the compiler may test them in any
//! order (it emits a short chain of never-taken branches), because the order in which errors are
//! named is not decided here. Only when the flag is set does a `#[cold]`, out-of-line function
//! work out, from the two words, which rule was broken first, to name it in the [`WireError`].
//! Malformed frames end the connection anyway (NACK reason 1), so their cost does not matter.
//!
//! The error path returns the small [`WireError`] by value and the caller adds the `msg_id`:
//! nothing on the valid path takes the address of the result, so once inlined the decoded fields
//! go straight from registers to wherever the caller keeps the header, rather than through a
//! temporary `Result` on the stack (which cost a copy and a stalled store-to-load forward when
//! the error path wrote the whole `DecodeError` through a pointer).
//!
//! # The zero-copy path
//!
//! [`FrameDecoder`] reads into fixed-size chunks ([`crate::chunk`]). Bytes are read (or fed)
//! onto the end of the chunk being filled; as soon as 64 bytes are present the header is
//! validated, before the payload arrives, so a frame announcing a payload over the limit is
//! refused after 64 bytes rather than after the decoder has buffered megabytes of it. Once the
//! payload is complete it is cut out of the chunk: the [`Frame::payload`] handed out is a
//! reference-counted view of the chunk (one [`Bytes`] per decode call, sliced per frame), not a
//! copy. The chunk goes back to its [`ChunkPool`] when the last frame cut from it is dropped, and
//! is read into again, so a steady stream allocates nothing and faults in no fresh memory.

//! # Limits
//!
//! A payload is at most `payload_bytes_max` bytes (default [`PAYLOAD_BYTES_MAX_DEFAULT`], never
//! more than [`PAYLOAD_BYTES_MAX_CEILING`]). A decoder holds at most
//! [`FrameDecoder::buffered_bytes_max`] bytes: one whole frame plus one read chunk
//! ([`READ_CHUNK_BYTES_MAX`]). No input can make any function here panic; a malformed header is a
//! [`DecodeError`] that names the frame's `msg_id` so that the engine can NACK it.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::fmt;
use std::io;
use std::ops::ControlFlow;

use bytes::{BufMut, Bytes, BytesMut};

use crate::chunk::Chunk;
pub use crate::chunk::{ChunkPool, CHUNK_BYTES};

use crate::ids::{Eui64, Mode, Srv};

/// Length of every frame header, in bytes: one cache line.
pub const HEADER_LEN: usize = 64;

/// The first four bytes of every header, `D` `S` `P` `L`, read as a little-endian `u32`.
pub const MAGIC: u32 = 0x4C50_5344;

/// The protocol version this module speaks.
pub const VERSION: u8 = 1;

/// The largest payload any configuration may allow (PROTOCOL.md's hard ceiling of 16 MiB).
///
/// A limit passed to [`Header::decode`] or [`FrameDecoder::new`] above this is lowered to it.
pub const PAYLOAD_BYTES_MAX_CEILING: u32 = 16 * 1024 * 1024;

/// The payload limit when the configuration names none (`max_payload`).
pub const PAYLOAD_BYTES_MAX_DEFAULT: u32 = 65_536;

/// The longest token a HELLO may carry, in bytes.
pub const TOKEN_BYTES_MAX: usize = 256;

/// The longest detail text a NACK carries, in bytes.
pub const NACK_DETAIL_BYTES_MAX: usize = 256;

/// The most bytes [`FrameDecoder::fill_from`] reads in one call, and the slack a decoder keeps
/// above one whole frame so that a read never has to wait for the previous frame to be taken.
pub const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// Highest defined `mode` byte (2, DCC-scheduled).
const MODE_MAX: u8 = Mode::DccScheduled as u8;

/// Number of defined kinds; they are numbered `1..=KIND_COUNT`.
const KIND_COUNT: u8 = 11;

/// Word 0 bits holding magic (bytes 0–3) and version (byte 4).
const WORD0_FIXED_MASK: u64 = 0x0000_00FF_FFFF_FFFF;

/// What those bits must hold.
const WORD0_FIXED_EXPECTED: u64 = MAGIC as u64 | (VERSION as u64) << 32;

// The header layout is eight u64 words; the decoder's bound must be able to hold a whole frame.
const _: () = assert!(HEADER_LEN == 8 * std::mem::size_of::<u64>());
const _: () = assert!(PAYLOAD_BYTES_MAX_DEFAULT <= PAYLOAD_BYTES_MAX_CEILING);
const _: () = assert!(WORD0_FIXED_EXPECTED & !WORD0_FIXED_MASK == 0);
const _: () = assert!(KIND_COUNT == Kind::Pong as u8);

/// What a frame is, the header's `kind` byte.
///
/// The default is [`Kind::Ping`], the kind with no fields and no payload, so that
/// `Header::default()` is a valid frame on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Kind {
    /// Peer → dsplane, the first frame on a connection; payload is the token.
    Hello = 1,
    /// dsplane → peer: the HELLO was accepted.
    HelloOk = 2,
    /// SU → dsplane → CSP: a Service Request.
    Request = 3,
    /// CSP → dsplane → SU: the response to a REQUEST.
    Response = 4,
    /// CSP → dsplane → SU: an alert raised by a device.
    DeviceAlert = 5,
    /// dsplane or CSP → SU: an alert raised by the DCC.
    DccAlert = 6,
    /// Both ways: acknowledges every data frame up to `msg_id`.
    Ack = 7,
    /// dsplane → peer: the frame `msg_id` was refused, for the reason in `aux`.
    Nack = 8,
    /// dsplane → SU: stands for `counter` alerts of code `alert_code` dropped in a storm.
    StormSummary = 9,
    /// Both ways: keeps an idle connection alive.
    #[default]
    Ping = 10,
    /// Both ways: the answer to a PING.
    Pong = 11,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 11] = [
        Kind::Hello,
        Kind::HelloOk,
        Kind::Request,
        Kind::Response,
        Kind::DeviceAlert,
        Kind::DccAlert,
        Kind::Ack,
        Kind::Nack,
        Kind::StormSummary,
        Kind::Ping,
        Kind::Pong,
    ];

    /// The kind for a header byte, or `None` for values PROTOCOL.md does not define.
    pub const fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::HelloOk,
            3 => Kind::Request,
            4 => Kind::Response,
            5 => Kind::DeviceAlert,
            6 => Kind::DccAlert,
            7 => Kind::Ack,
            8 => Kind::Nack,
            9 => Kind::StormSummary,
            10 => Kind::Ping,
            11 => Kind::Pong,
            _ => return None,
        })
    }

    /// Whether frames of this kind are data frames: numbered by `msg_id`, acknowledged, and
    /// re-sent after a reconnect until they are.
    pub const fn is_data(self) -> bool {
        matches!(
            self,
            Kind::Request
                | Kind::Response
                | Kind::DeviceAlert
                | Kind::DccAlert
                | Kind::StormSummary
        )
    }

    /// The name PROTOCOL.md uses (`HELLO_OK`, `DEVICE_ALERT`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Hello => "HELLO",
            Kind::HelloOk => "HELLO_OK",
            Kind::Request => "REQUEST",
            Kind::Response => "RESPONSE",
            Kind::DeviceAlert => "DEVICE_ALERT",
            Kind::DccAlert => "DCC_ALERT",
            Kind::Ack => "ACK",
            Kind::Nack => "NACK",
            Kind::StormSummary => "STORM_SUMMARY",
            Kind::Ping => "PING",
            Kind::Pong => "PONG",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a frame was refused: the `aux` field of a NACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum NackReason {
    /// The frame broke the framing rules; the connection is closed.
    Malformed = 1,
    /// The SU is over its Service Request rate; it may send the frame again later.
    Throttled = 2,
    /// Bad token, or a `su_id` that is not the connection's own.
    Unauthorised = 3,
    /// No SU or CSP is configured for the frame's destination.
    UnknownDestination = 4,
    /// Every buffer for the frame is full; the sender may retry.
    Overloaded = 5,
    /// The kind is not allowed for this role or connection state.
    UnexpectedKind = 6,
}

impl NackReason {
    /// The reason for an `aux` value, or `None` for values PROTOCOL.md does not define.
    pub const fn from_u16(aux: u16) -> Option<NackReason> {
        Some(match aux {
            1 => NackReason::Malformed,
            2 => NackReason::Throttled,
            3 => NackReason::Unauthorised,
            4 => NackReason::UnknownDestination,
            5 => NackReason::Overloaded,
            6 => NackReason::UnexpectedKind,
            _ => return None,
        })
    }

    /// The reason's name, as metrics and logs write it: `unauthorised`, `unknown_destination`.
    pub const fn as_str(self) -> &'static str {
        match self {
            NackReason::Malformed => "malformed",
            NackReason::Throttled => "throttled",
            NackReason::Unauthorised => "unauthorised",
            NackReason::UnknownDestination => "unknown_destination",
            NackReason::Overloaded => "overloaded",
            NackReason::UnexpectedKind => "unexpected_kind",
        }
    }
}

/// `3 (unauthorised)`: the wire value and its name.
impl fmt::Display for NackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", *self as u16, self.as_str())
    }
}

/// Which side of dsplane a peer is on: the `aux` field of a HELLO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Role {
    /// A Service User (supplier or network operator adapter), on the SU port.
    Su = 1,
    /// A Communication Service Provider (the WAN side), on the CSP port.
    Csp = 2,
}

impl Role {
    /// The role for an `aux` value, or `None` for values PROTOCOL.md does not define.
    pub const fn from_u16(aux: u16) -> Option<Role> {
        match aux {
            1 => Some(Role::Su),
            2 => Some(Role::Csp),
            _ => None,
        }
    }
}

/// `SU` or `CSP`, as the documents write them.
impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Su => "SU",
            Role::Csp => "CSP",
        })
    }
}

/// Why a header was refused. Every variant is a malformed frame: NACK reason 1, and the
/// connection is closed because the stream can no longer be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The first four bytes are not `DSPL`.
    #[error(
        "bad magic {found:#010x}, expected {MAGIC:#010x} (\"DSPL\"): the peer does not speak the \
         dsplane protocol or the stream is out of step; check what is connected to this port"
    )]
    BadMagic {
        /// The four bytes read as a little-endian u32.
        found: u32,
    },
    /// A protocol version this build does not speak.
    #[error(
        "protocol version {found} is not supported, this dsplane speaks version {VERSION}: \
         upgrade or downgrade the peer to match"
    )]
    BadVersion {
        /// The version byte.
        found: u8,
    },
    /// A kind byte outside 1–11.
    #[error(
        "unknown frame kind {found}, defined kinds are 1-11: the peer is sending frames this \
         protocol version does not define"
    )]
    UnknownKind {
        /// The kind byte.
        found: u8,
    },
    /// The reserved field (bytes 60–63) is not zero.
    #[error(
        "reserved header field is {found:#x}, must be 0: the peer's encoder is faulty or the \
         stream is out of step"
    )]
    ReservedNotZero {
        /// The reserved field.
        found: u32,
    },
    /// `payload_len` is over the configured limit.
    #[error(
        "payload_len {len} is over the limit of {max} bytes: send smaller payloads, or raise \
         engine.max_payload (at most 16 MiB)"
    )]
    PayloadTooLong {
        /// The announced (or offered) payload length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// A mode byte outside 0–2.
    #[error(
        "mode {found} is not defined: use 0 (on-demand), 1 (future-dated) or 2 (DCC-scheduled), \
         and 0 on kinds other than REQUEST and RESPONSE"
    )]
    BadMode {
        /// The mode byte.
        found: u8,
    },
}

impl WireError {
    /// The NACK reason to answer with: always [`NackReason::Malformed`].
    pub const fn nack_reason(&self) -> NackReason {
        NackReason::Malformed
    }
}

/// A refused header, with the `msg_id` it carried so that the engine can NACK it by number.
///
/// The `msg_id` is whatever bytes 40–47 held. When the magic is wrong it means nothing, but the
/// NACK that names it is still the right answer before the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed frame (msg_id {msg_id}): {error}")]
pub struct DecodeError {
    /// The frame's `msg_id` field.
    pub msg_id: u64,
    /// What was wrong with it.
    pub error: WireError,
}

impl DecodeError {
    /// The NACK reason to answer with: always [`NackReason::Malformed`].
    pub const fn nack_reason(&self) -> NackReason {
        self.error.nack_reason()
    }
}

/// A HELLO token that PROTOCOL.md does not allow (it must be 1–256 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "HELLO token is {len} bytes, it must be 1-{TOKEN_BYTES_MAX} bytes of UTF-8: fix the token in \
     the configuration"
)]
pub struct TokenLenError {
    /// The length of the refused token, in bytes.
    pub len: usize,
}

/// A decoded frame header, PROTOCOL.md's 64-byte layout as fields.
///
/// A header that came out of [`Header::decode`] always has a defined kind and mode and a
/// `payload_len` within the limit it was decoded with; one built by hand can hold any mode and
/// length, and the encoder writes what it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// Mode of operation of a REQUEST or RESPONSE (see [`Mode`]); 0 on other kinds.
    pub mode: u8,
    /// Priority level dsplane gives a data frame it sends (1 most urgent); senders write 0.
    pub priority: u8,
    /// Service Reference Variant.
    pub srv: Srv,
    /// GBCS alert code, DCC alert number, or the throttled code of a STORM_SUMMARY.
    pub alert_code: u16,
    /// HELLO: role. NACK: reason. 0 otherwise.
    pub aux: u16,
    /// The Service User: originator of a REQUEST, recipient of a RESPONSE or alert.
    pub su_id: Eui64,
    /// Target (REQUEST) or source (RESPONSE, DEVICE_ALERT) device.
    pub device_id: Eui64,
    /// Request counter; STORM_SUMMARY: how many alerts it stands for.
    pub counter: u64,
    /// The sender's sequence number for this frame on this connection.
    pub msg_id: u64,
    /// When the message was created at its origin, ns since the Unix epoch.
    pub created_ns: u64,
    /// Payload bytes after the header.
    pub payload_len: u32,
}

impl Header {
    /// A header of `kind` with every other field 0.
    pub const fn new(kind: Kind) -> Header {
        Header {
            kind,
            mode: 0,
            priority: 0,
            srv: Srv(0),
            alert_code: 0,
            aux: 0,
            su_id: Eui64(0),
            device_id: Eui64(0),
            counter: 0,
            msg_id: 0,
            created_ns: 0,
            payload_len: 0,
        }
    }

    /// The mode of operation, or `None` if the byte is not one PROTOCOL.md defines (only
    /// possible for a header built by hand).
    pub const fn operation_mode(&self) -> Option<Mode> {
        Mode::from_wire(self.mode)
    }

    /// The role a HELLO announces, or `None` if this is not a HELLO or the role is undefined.
    pub const fn role(&self) -> Option<Role> {
        match self.kind {
            Kind::Hello => Role::from_u16(self.aux),
            _ => None,
        }
    }

    /// The reason a NACK gives, or `None` if this is not a NACK or the reason is undefined.
    pub const fn nack_reason(&self) -> Option<NackReason> {
        match self.kind {
            Kind::Nack => NackReason::from_u16(self.aux),
            _ => None,
        }
    }

    /// The eight little-endian words of the wire layout.
    const fn words(&self) -> [u64; 8] {
        self.words_stamped(self.msg_id, self.priority, self.payload_len)
    }

    /// The words with `msg_id`, `priority` and `payload_len` given rather than the header's own.
    const fn words_stamped(&self, msg_id: u64, priority: u8, payload_len: u32) -> [u64; 8] {
        [
            MAGIC as u64
                | (VERSION as u64) << 32
                | (self.kind as u64) << 40
                | (self.mode as u64) << 48
                | (priority as u64) << 56,
            self.srv.0 as u64 | (self.alert_code as u64) << 32 | (self.aux as u64) << 48,
            self.su_id.0,
            self.device_id.0,
            self.counter,
            msg_id,
            self.created_ns,
            // The reserved high half is always written as 0.
            payload_len as u64,
        ]
    }

    /// The 64-byte wire form with `msg_id`, `priority` and `payload_len` replaced: what a
    /// sender writes for a frame it holds, stamped for its connection, without copying the
    /// header first. The same bytes as [`Header::to_bytes`] of a copy with those three fields set.
    #[inline]
    pub fn to_bytes_stamped(
        &self,
        msg_id: u64,
        priority: u8,
        payload_len: u32,
    ) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let words = self.words_stamped(msg_id, priority, payload_len);
        for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Appends the frame of this header and `payload` to `out`: the header stamped with
    /// `msg_id`, `priority` and `payload.len()` ([`Header::to_bytes_stamped`]), then the
    /// payload. One reservation for both, rather than a capacity check for each: what a sender
    /// does to queue a frame it holds into a connection's contiguous buffer.
    #[inline]
    pub fn encode_stamped_into(
        &self,
        out: &mut Vec<u8>,
        msg_id: u64,
        priority: u8,
        payload: &[u8],
    ) {
        // Saturating only for a payload over 4 GiB; the peer then refuses it as too long.
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let words = self.words_stamped(msg_id, priority, len);
        let total = HEADER_LEN + payload.len();
        out.reserve(total);
        // SAFETY: `reserve` made room for `total` bytes past `out.len()`, and the writes fill
        // exactly those: the header's eight words (unaligned little-endian stores, written
        // where they go rather than into a local first), then the payload, which cannot overlap
        // `out`'s spare capacity (a shared borrow while `out` is borrowed mutably); `set_len`
        // then covers only the bytes just written.
        unsafe {
            let end = out.as_mut_ptr().add(out.len());
            for (i, word) in words.into_iter().enumerate() {
                end.add(8 * i)
                    .cast::<[u8; 8]>()
                    .write_unaligned(word.to_le_bytes());
            }
            std::ptr::copy_nonoverlapping(payload.as_ptr(), end.add(HEADER_LEN), payload.len());
            out.set_len(out.len() + total);
        }
    }

    /// Writes the 64-byte wire form into `out`.
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        for (chunk, word) in out.chunks_exact_mut(8).zip(self.words()) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
    }

    /// The 64-byte wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        self.encode(&mut out);
        out
    }

    /// Appends the 64-byte wire form to `buf`.
    pub fn put(&self, buf: &mut BytesMut) {
        buf.put_slice(&self.to_bytes());
    }

    /// Decodes and validates a header, refusing one whose `payload_len` is over
    /// `payload_bytes_max` (itself capped at [`PAYLOAD_BYTES_MAX_CEILING`]).
    ///
    /// ```
    /// use dsplane_proto::wire::{Header, Kind, WireError, PAYLOAD_BYTES_MAX_DEFAULT};
    /// let mut h = Header::new(Kind::Ack);
    /// h.msg_id = 7;
    /// let bytes = h.to_bytes();
    /// assert_eq!(Header::decode(&bytes, PAYLOAD_BYTES_MAX_DEFAULT), Ok(h));
    ///
    /// let mut bad = bytes;
    /// bad[5] = 0; // kind 0
    /// let err = Header::decode(&bad, PAYLOAD_BYTES_MAX_DEFAULT).unwrap_err();
    /// assert_eq!((err.msg_id, err.error), (7, WireError::UnknownKind { found: 0 }));
    /// ```
    #[inline]
    pub fn decode(bytes: &[u8; HEADER_LEN], payload_bytes_max: u32) -> Result<Header, DecodeError> {
        let payload_bytes_max = payload_bytes_max.min(PAYLOAD_BYTES_MAX_CEILING);
        let [w0, w1, su_id, device_id, counter, msg_id, created_ns, w7] = header_words(bytes);

        // Worked out once and used both as the check and as the value: every defined kind is
        // its own byte, so the match compiles to one range compare and no table or second test.
        let kind = Kind::from_u8((w0 >> 40) as u8);
        let mode = (w0 >> 48) as u8;
        let payload_len = w7 as u32;

        // `|`, not `||`: every condition is computed, and none is tested before another. Word 7
        // is `payload_len` with the reserved field above it, so one unsigned compare of the
        // whole word checks both: it is at most the (32-bit) limit exactly when reserved is 0
        // and the length is within the limit. (The same rules as `valid_kind`, which
        // `FrameDecoder::decode_each` uses; written out here because built on `valid_kind` and
        // `from_words` this loop measured 46 instructions a header rather than 41, and a test
        // holds the two to the same answers.)
        let malformed = (w0 & WORD0_FIXED_MASK != WORD0_FIXED_EXPECTED)
            | kind.is_none()
            | (mode > MODE_MAX)
            | (w7 > u64::from(payload_bytes_max));
        match kind {
            Some(kind) if !malformed => Ok(Header {
                kind,
                mode,
                priority: (w0 >> 56) as u8,
                srv: Srv(w1 as u32),
                alert_code: (w1 >> 32) as u16,
                aux: (w1 >> 48) as u16,
                su_id: Eui64(su_id),
                device_id: Eui64(device_id),
                counter,
                msg_id,
                created_ns,
                payload_len,
            }),
            _ => Err(DecodeError {
                msg_id,
                error: reject(w0, w7, payload_bytes_max),
            }),
        }
    }

    /// [`Header::decode`]'s checks, on the header's words 0 and 7 (every checked field is in
    /// them): its kind if every rule holds, `None` if one does not ([`reject`] says which).
    ///
    /// Apart from [`Header::from_words`] so that [`FrameDecoder::decode_each`] can keep the
    /// words, not a built header, while it splits the payload off, and build the header once,
    /// where the frame is handed out (10 instructions a message fewer in the pipeline than
    /// `decode` there). `payload_bytes_max` is at most [`PAYLOAD_BYTES_MAX_CEILING`].
    #[inline(always)]
    fn valid_kind(w0: u64, w7: u64, payload_bytes_max: u32) -> Option<Kind> {
        // Worked out once and used both as the check and as the value: every defined kind is
        // its own byte, so the match compiles to one range compare and no table or second test.
        let kind = Kind::from_u8((w0 >> 40) as u8);
        let mode = (w0 >> 48) as u8;

        // `|`, not `||`: every condition is computed, and none is tested before another. Word 7
        // is `payload_len` with the reserved field above it, so one unsigned compare of the
        // whole word checks both: it is at most the (32-bit) limit exactly when reserved is 0
        // and the length is within the limit.
        let malformed = (w0 & WORD0_FIXED_MASK != WORD0_FIXED_EXPECTED)
            | kind.is_none()
            | (mode > MODE_MAX)
            | (w7 > u64::from(payload_bytes_max));
        match kind {
            Some(kind) if !malformed => Some(kind),
            _ => None,
        }
    }

    /// The header of words that passed [`Header::valid_kind`], which gave `kind`.
    #[inline(always)]
    const fn from_words(kind: Kind, words: [u64; 8]) -> Header {
        let [w0, w1, su_id, device_id, counter, msg_id, created_ns, w7] = words;
        Header {
            kind,
            mode: (w0 >> 48) as u8,
            priority: (w0 >> 56) as u8,
            srv: Srv(w1 as u32),
            alert_code: (w1 >> 32) as u16,
            aux: (w1 >> 48) as u16,
            su_id: Eui64(su_id),
            device_id: Eui64(device_id),
            counter,
            msg_id,
            created_ns,
            // The reserved high half was checked to be 0.
            payload_len: w7 as u32,
        }
    }
}

/// The header as the eight little-endian words of its layout.
#[inline(always)]
fn header_words(bytes: &[u8; HEADER_LEN]) -> [u64; 8] {
    let (chunks, _) = bytes.as_chunks::<8>();
    let mut words = [0u64; 8];
    for (word, chunk) in words.iter_mut().zip(chunks) {
        *word = u64::from_le_bytes(*chunk);
    }
    words
}

/// Works out which rule a header broke, once the fast check has said that one was, from the
/// two words that hold every checked field.
///
/// Kept out of line and marked cold so that the valid path stays small. The rules are tried in
/// the order a reader would check them (is this our protocol at all, then field by field); the
/// last is taken without a test, because the fast check guarantees one of them failed.
#[cold]
#[inline(never)]
fn reject(w0: u64, w7: u64, payload_bytes_max: u32) -> WireError {
    let magic = w0 as u32;
    let version = (w0 >> 32) as u8;
    let kind = (w0 >> 40) as u8;
    let mode = (w0 >> 48) as u8;
    let payload_len = w7 as u32;
    let reserved = (w7 >> 32) as u32;

    if magic != MAGIC {
        WireError::BadMagic { found: magic }
    } else if version != VERSION {
        WireError::BadVersion { found: version }
    } else if Kind::from_u8(kind).is_none() {
        WireError::UnknownKind { found: kind }
    } else if reserved != 0 {
        WireError::ReservedNotZero { found: reserved }
    } else if payload_len > payload_bytes_max {
        WireError::PayloadTooLong {
            len: payload_len,
            max: payload_bytes_max,
        }
    } else {
        debug_assert!(mode > MODE_MAX, "reject called on a valid header");
        WireError::BadMode { found: mode }
    }
}

/// A whole frame: header and payload.
///
/// The payload is a [`Bytes`]: when the frame came from a [`FrameDecoder`] it is a view into the
/// receive buffer, and cloning or forwarding it copies no payload bytes.
///
/// `header.payload_len` is not trusted when encoding: [`Frame::header_bytes`] and
/// [`Frame::encode_into`] write `payload.len()` in its place, so that a frame can never announce
/// a length other than what follows it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The payload, `header.payload_len` bytes.
    pub payload: Bytes,
}

impl Frame {
    /// A frame of `header` and `payload`, with `payload_len` set from the payload.
    ///
    /// Refuses a payload over [`PAYLOAD_BYTES_MAX_CEILING`], which no peer would accept.
    pub fn new(mut header: Header, payload: Bytes) -> Result<Frame, WireError> {
        match u32::try_from(payload.len()) {
            Ok(len) if len <= PAYLOAD_BYTES_MAX_CEILING => {
                header.payload_len = len;
                Ok(Frame { header, payload })
            }
            _ => Err(WireError::PayloadTooLong {
                len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                max: PAYLOAD_BYTES_MAX_CEILING,
            }),
        }
    }

    /// A frame of `kind` with no payload and every field 0.
    pub const fn empty(kind: Kind) -> Frame {
        Frame {
            header: Header::new(kind),
            payload: Bytes::new(),
        }
    }

    /// The HELLO a peer opens a connection with: `aux` = `role`, the SU's `su_id` (anything,
    /// usually 0, for a CSP), and the token as payload.
    pub fn hello(role: Role, su_id: Eui64, token: &str) -> Result<Frame, TokenLenError> {
        let len = token.len();
        if len == 0 || len > TOKEN_BYTES_MAX {
            return Err(TokenLenError { len });
        }
        let mut frame = Frame::empty(Kind::Hello);
        frame.header.aux = role as u16;
        frame.header.su_id = su_id;
        frame.header.payload_len = len as u32;
        frame.payload = Bytes::copy_from_slice(token.as_bytes());
        Ok(frame)
    }

    /// The answer to an accepted HELLO.
    pub const fn hello_ok() -> Frame {
        Frame::empty(Kind::HelloOk)
    }

    /// Acknowledges every data frame with `msg_id` up to and including `msg_id`.
    pub const fn ack(msg_id: u64) -> Frame {
        let mut frame = Frame::empty(Kind::Ack);
        frame.header.msg_id = msg_id;
        frame
    }

    /// Refuses the frame `msg_id` for `reason`, with a human-readable `detail` cut to at most
    /// [`NACK_DETAIL_BYTES_MAX`] bytes (at a character boundary, so it stays valid UTF-8).
    pub fn nack(msg_id: u64, reason: NackReason, detail: &str) -> Frame {
        let mut end = detail.len().min(NACK_DETAIL_BYTES_MAX);
        // Index 0 is always a boundary, so this stops.
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        let detail = detail.get(..end).unwrap_or_default();
        let mut frame = Frame::empty(Kind::Nack);
        frame.header.msg_id = msg_id;
        frame.header.aux = reason as u16;
        frame.header.payload_len = detail.len() as u32;
        frame.payload = Bytes::copy_from_slice(detail.as_bytes());
        frame
    }

    /// A keep-alive.
    pub const fn ping() -> Frame {
        Frame::empty(Kind::Ping)
    }

    /// The answer to a PING.
    pub const fn pong() -> Frame {
        Frame::empty(Kind::Pong)
    }

    /// The token of a HELLO, if this is a HELLO whose payload is a token PROTOCOL.md allows
    /// (1–256 bytes of UTF-8).
    pub fn hello_token(&self) -> Option<&str> {
        if self.header.kind != Kind::Hello
            || self.payload.is_empty()
            || self.payload.len() > TOKEN_BYTES_MAX
        {
            return None;
        }
        std::str::from_utf8(&self.payload).ok()
    }

    /// The 64 header bytes to write before the payload, with `payload_len` = `payload.len()`.
    ///
    /// Together with [`Frame::payload`] this is the two-slice vectored write that sends a frame
    /// without copying its payload.
    pub fn header_bytes(&self) -> [u8; HEADER_LEN] {
        let mut header = self.header;
        // Saturating is only reachable for a payload over 4 GiB put in by hand; the peer then
        // refuses the frame as too long instead of reading a wrapped length.
        header.payload_len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        header.to_bytes()
    }

    /// Appends the whole frame, header then payload, to `buf`.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        buf.reserve(HEADER_LEN + self.payload.len());
        buf.put_slice(&self.header_bytes());
        buf.put_slice(&self.payload);
    }

    /// Bytes on the wire: header and payload.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// Splits a byte stream into validated [`Frame`]s without copying payloads.
///
/// Feed it bytes with [`feed`](FrameDecoder::feed) or [`fill_from`](FrameDecoder::fill_from),
/// then call [`next_frame`](FrameDecoder::next_frame) until it returns `Ok(None)`, or take every
/// whole frame at once with [`decode_each`](FrameDecoder::decode_each). A header is validated as
/// soon as its 64 bytes are present, before its payload arrives.
///
/// **Bounded.** The decoder never holds more than [`buffered_bytes_max`] bytes: one whole frame
/// (`HEADER_LEN + payload_bytes_max`) plus one read chunk ([`READ_CHUNK_BYTES_MAX`]). `feed` and
/// `fill_from` take only what fits and say how much they took; when nothing fits, a whole frame
/// is waiting, so draining `next_frame` always makes room. Chunks are [`CHUNK_BYTES`] (a frame
/// larger than that gets a chunk of its own size, not pooled), and a frame the caller still
/// holds keeps its whole chunk alive: a chunk is freed, or goes back to its pool, when the last
/// frame cut from it is dropped. A pool keeps at most its `chunks_max` free chunks.
///
/// **Poisoned by errors.** After a malformed header nothing later in the stream can be trusted,
/// so the decoder drops what it holds and every later `next_frame` returns the same error.
///
/// ```
/// use dsplane_proto::wire::{Frame, FrameDecoder, PAYLOAD_BYTES_MAX_DEFAULT};
/// let mut wire = bytes::BytesMut::new();
/// Frame::ack(3).encode_into(&mut wire);
/// Frame::ping().encode_into(&mut wire);
///
/// let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
/// assert_eq!(decoder.feed(&wire), wire.len());
/// assert_eq!(decoder.next_frame(), Ok(Some(Frame::ack(3))));
/// assert_eq!(decoder.next_frame(), Ok(Some(Frame::ping())));
/// assert_eq!(decoder.next_frame(), Ok(None));
/// ```
///
/// [`buffered_bytes_max`]: FrameDecoder::buffered_bytes_max
#[derive(Debug)]
pub struct FrameDecoder {
    /// The chunk being read into and cut from (see [`crate::chunk`]); `None` until the first
    /// read, and after an error.
    chunk: Option<Chunk>,
    /// Where chunks come from and go back to.
    pool: Option<ChunkPool>,
    /// The header at the front of the bytes, once validated, while its payload is still arriving.
    pending: Option<Header>,
    payload_bytes_max: u32,
    /// Set by the first error; returned by every later call.
    poisoned: Option<DecodeError>,
}

/// A read is made into the chunk being filled only if at least this much of it is spare (or
/// all it asks for is); otherwise a new chunk is started, so that reads stay large.
const READ_SPARE_MIN: usize = 4096;

impl FrameDecoder {
    /// A decoder refusing payloads over `payload_bytes_max` (capped at
    /// [`PAYLOAD_BYTES_MAX_CEILING`]), with a pool of its own that keeps one free chunk.
    ///
    /// Allocates one read chunk up front, so that typical frames need no growth.
    pub fn new(payload_bytes_max: u32) -> FrameDecoder {
        let pool = ChunkPool::new(1);
        FrameDecoder {
            chunk: Some(Chunk::new(CHUNK_BYTES, Some(&pool))),
            ..FrameDecoder::with_pool(payload_bytes_max, pool)
        }
    }

    /// A decoder like [`FrameDecoder::new`]'s whose chunks come from, and go back to, `pool`,
    /// which other decoders may share. Allocates nothing until its first read or feed.
    pub fn with_pool(payload_bytes_max: u32, pool: ChunkPool) -> FrameDecoder {
        FrameDecoder {
            pool: Some(pool),
            ..FrameDecoder::unallocated(payload_bytes_max)
        }
    }

    /// A decoder like [`FrameDecoder::new`]'s that has allocated nothing yet, and has no pool:
    /// its first read or feed allocates. A placeholder for a decoder moved out for a while.
    pub fn unallocated(payload_bytes_max: u32) -> FrameDecoder {
        FrameDecoder {
            chunk: None,
            pool: None,
            pending: None,
            payload_bytes_max: payload_bytes_max.min(PAYLOAD_BYTES_MAX_CEILING),
            poisoned: None,
        }
    }

    /// Takes its next chunks from `pool`, and gives them back there.
    pub fn use_pool(&mut self, pool: ChunkPool) {
        self.pool = Some(pool);
    }

    /// The payload limit in force.
    pub fn payload_bytes_max(&self) -> u32 {
        self.payload_bytes_max
    }

    /// The most bytes this decoder ever holds: one whole frame plus one read chunk.
    pub fn buffered_bytes_max(&self) -> usize {
        HEADER_LEN + self.payload_bytes_max as usize + READ_CHUNK_BYTES_MAX
    }

    /// Bytes received and not yet handed out as frames.
    pub fn buffered_len(&self) -> usize {
        self.chunk.as_ref().map_or(0, |c| c.data().len())
    }

    /// Whether an error has ended this stream.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Room left before the bound.
    fn room(&self) -> usize {
        self.buffered_bytes_max()
            .saturating_sub(self.buffered_len())
    }

    /// Makes the chunk being filled one with at least `spare` bytes spare and room for the
    /// whole frame at the front, starting a new chunk (and copying into it what is buffered,
    /// usually one partial frame) if this one has not.
    fn make_room(&mut self, spare: usize) {
        let front = HEADER_LEN + self.pending.map_or(0, |h| h.payload_len as usize);
        let buffered = match &self.chunk {
            Some(c) => {
                let fits = c.consumed() + front <= c.capacity();
                if fits && c.spare_len() >= spare {
                    return;
                }
                c.data().len()
            }
            None => 0,
        };
        let capacity = if buffered + spare <= CHUNK_BYTES && front <= CHUNK_BYTES {
            CHUNK_BYTES
        } else {
            CHUNK_BYTES.max(buffered + spare).max(front)
        };
        let mut chunk = Chunk::new(capacity, self.pool.as_ref());
        if let Some(old) = &self.chunk {
            // (All of it fits: the capacity is at least `buffered`.)
            chunk.append(old.data());
        }
        // The old chunk goes back to the pool once the frames cut from it are dropped.
        self.chunk = Some(chunk);
    }

    /// Appends as much of `data` as fits under the bound and returns how many bytes it took.
    ///
    /// Taking less than all of `data` means whole frames are waiting: drain
    /// [`next_frame`](FrameDecoder::next_frame), then feed the rest. Once poisoned, the decoder
    /// takes and drops everything, since the stream is being abandoned.
    #[must_use = "bytes beyond the returned count were not taken"]
    pub fn feed(&mut self, data: &[u8]) -> usize {
        if self.poisoned.is_some() {
            return data.len();
        }
        let taken = data.get(..self.room()).unwrap_or(data);
        if taken.is_empty() {
            return 0;
        }
        self.make_room(taken.len());
        // (All of it fits: `make_room` made the spare part at least that large.)
        self.chunk.as_mut().map_or(0, |chunk| chunk.append(taken))
    }

    /// How much one read may bring: `max_bytes`, at most [`READ_CHUNK_BYTES_MAX`] and the room
    /// left. A full buffer asked for more is an error (see [`FrameDecoder::fill_from`]).
    fn read_size(&self, max_bytes: usize) -> io::Result<usize> {
        let want = max_bytes.min(READ_CHUNK_BYTES_MAX).min(self.room());
        if want == 0 && max_bytes != 0 && self.poisoned.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "FrameDecoder is full: call next_frame until it returns None before reading more",
            ));
        }
        Ok(want)
    }

    /// The spare space of the chunk for one read of at most `want` bytes.
    fn read_space(&mut self, want: usize) -> &mut [std::mem::MaybeUninit<u8>] {
        self.make_room(want.min(READ_SPARE_MIN));
        match &mut self.chunk {
            Some(chunk) => {
                let spare = chunk.spare();
                let n = want.min(spare.len());
                spare.get_mut(..n).unwrap_or_default()
            }
            None => &mut [],
        }
    }

    /// Marks `n` bytes read (and drops them if the stream was poisoned meanwhile).
    fn read_done(&mut self, n: usize) {
        if let Some(chunk) = &mut self.chunk {
            chunk.commit(n);
        }
        if self.poisoned.is_some() {
            self.chunk = None;
        }
    }

    /// Reads once from `reader` onto the end of the buffer, at most `max_bytes`,
    /// [`READ_CHUNK_BYTES_MAX`] and the room left, and returns the count read (0 at end of
    /// stream, or if `max_bytes` is 0). A read may bring less than that when it lands at the end
    /// of a chunk.
    ///
    /// # Errors
    ///
    /// The reader's error, unchanged (including `WouldBlock` and `Interrupted`); or
    /// `ErrorKind::OutOfMemory` if the buffer is full, which only happens when the caller did
    /// not drain [`next_frame`](FrameDecoder::next_frame) first. Returning `Ok(0)` there would be
    /// mistaken for the end of the stream.
    pub fn fill_from<R: io::Read>(
        &mut self,
        reader: &mut R,
        max_bytes: usize,
    ) -> io::Result<usize> {
        let want = self.read_size(max_bytes)?;
        if want == 0 {
            return Ok(0);
        }
        let len = self.read_space(want).len();
        let Some(chunk) = self.chunk.as_mut() else {
            return Ok(0);
        };
        // The spare space is zeroed before the read, which keeps this safe for any reader; it
        // costs a `memset` of at most one read. A reader claiming more than it was given is
        // buggy; never keep bytes it did not write.
        let read = reader.read(chunk.spare_zeroed(len)).map(|n| n.min(len));
        self.read_done(*read.as_ref().unwrap_or(&0));
        read
    }

    /// Like [`fill_from`](FrameDecoder::fill_from), but `read` is given the spare space as
    /// uninitialised memory (`read(2)` writes it). The engine's intake reads sockets this way.
    ///
    /// `read` gets the spare space, at most `max_bytes`, [`READ_CHUNK_BYTES_MAX`] and the room
    /// left, and returns how many bytes it wrote there (0 at end of stream).
    ///
    /// # Errors
    ///
    /// As [`fill_from`](FrameDecoder::fill_from).
    ///
    /// # Safety
    ///
    /// `read` must not read the space it is given, and the count it returns must be bytes it has
    /// written at its start. A count over the space given is clamped to it; the space past the
    /// count is never exposed.
    pub unsafe fn fill_with(
        &mut self,
        max_bytes: usize,
        read: impl FnOnce(&mut bytes::buf::UninitSlice) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let want = self.read_size(max_bytes)?;
        if want == 0 {
            return Ok(0);
        }
        let space = self.read_space(want);
        let len = space.len();
        let n = read(bytes::buf::UninitSlice::uninit(space))?.min(len);
        self.read_done(n);
        Ok(n)
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that ended the
    /// stream. [`FrameDecoder::decode_each`] does the same for every frame buffered at once.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] as soon as a header is malformed, before its payload has arrived; the
    /// same error again on every later call.
    #[inline]
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        match self.decode_each(ControlFlow::Break)? {
            ControlFlow::Break(frame) => Ok(Some(frame)),
            ControlFlow::Continue(()) => Ok(None),
        }
    }

    /// Hands every complete frame buffered to `each`, in order, until `each` breaks (the frames
    /// after the one it broke on stay buffered) or more bytes are needed.
    ///
    /// The same frames as calling [`next_frame`](FrameDecoder::next_frame) until it returns
    /// `Ok(None)`, with the same checks, but each frame is built where `each` takes it rather than
    /// returned through a `Result<Option<Frame>>`, and the checks for a poisoned stream and a
    /// header waiting for its payload are made once per call rather than once per frame: this is
    /// how the engine's intake takes a read's frames.
    ///
    /// Returns `Continue(())` when every whole frame was taken, or what `each` broke with.
    ///
    /// ```
    /// use std::ops::ControlFlow;
    /// use dsplane_proto::wire::{Frame, FrameDecoder, PAYLOAD_BYTES_MAX_DEFAULT};
    /// let mut wire = bytes::BytesMut::new();
    /// Frame::ack(3).encode_into(&mut wire);
    /// Frame::ping().encode_into(&mut wire);
    ///
    /// let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
    /// assert_eq!(decoder.feed(&wire), wire.len());
    /// let mut frames = Vec::new();
    /// let taken = decoder.decode_each(|frame| {
    ///     frames.push(frame);
    ///     ControlFlow::<()>::Continue(())
    /// });
    /// assert_eq!(taken, Ok(ControlFlow::Continue(())));
    /// assert_eq!(frames, [Frame::ack(3), Frame::ping()]);
    /// ```
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] as soon as a header is malformed (the frames before it have been handed
    /// to `each`); the same error again on every later call.
    #[inline(always)]
    pub fn decode_each<B>(
        &mut self,
        mut each: impl FnMut(Frame) -> ControlFlow<B>,
    ) -> Result<ControlFlow<B>, DecodeError> {
        if let Some(error) = self.poisoned {
            return Err(error);
        }
        let Some(chunk) = &mut self.chunk else {
            return Ok(ControlFlow::Continue(()));
        };
        let data = chunk.data();
        // One view of the chunk per call, if it may hold a payload; each payload is a slice of
        // it (a reference count each, no allocation).
        let window = if data.len() > HEADER_LEN {
            chunk.window()
        } else {
            Bytes::new()
        };
        // How far into `data` the frames handed out reach.
        let mut at = 0;
        let mut flow = ControlFlow::Continue(());
        let mut failed = None;
        if let Some(header) = self.pending {
            // The header at the front was validated by an earlier call; its payload may be in now.
            if data.len() < HEADER_LEN + header.payload_len as usize {
                return Ok(ControlFlow::Continue(()));
            }
            self.pending = None;
            let payload = cut(&window, at, header.payload_len);
            at = HEADER_LEN + header.payload_len as usize;
            flow = each(Frame { header, payload });
        }
        // The usual case, a whole frame buffered, leaves `pending` alone: it is written only
        // when a header's payload has yet to arrive.
        while flow.is_continue() {
            let Some(bytes) = data.get(at..).and_then(<[u8]>::first_chunk::<HEADER_LEN>) else {
                break;
            };
            // The header's words are kept, not the header, until the frame is handed out: the
            // header is then built once, where `each` takes it, rather than built here and
            // copied about the stack around the payload's cut.
            let words = header_words(bytes);
            let [w0, .., msg_id, _, w7] = words;
            // (`payload_bytes_max` was capped at the ceiling when the decoder was made.)
            let Some(kind) = Header::valid_kind(w0, w7, self.payload_bytes_max) else {
                failed = Some(DecodeError {
                    msg_id,
                    error: reject(w0, w7, self.payload_bytes_max),
                });
                break;
            };
            // Checked: the reserved half above it is 0.
            let payload_len = w7 as u32;
            let end = at + HEADER_LEN + payload_len as usize;
            if data.len() < end {
                self.pending = Some(Header::from_words(kind, words));
                break;
            }
            let payload = cut(&window, at, payload_len);
            at = end;
            flow = each(Frame {
                header: Header::from_words(kind, words),
                payload,
            });
        }
        chunk.consume(at);
        if let Some(error) = failed {
            return Err(self.poison(error));
        }
        match flow {
            ControlFlow::Break(b) => Ok(ControlFlow::Break(b)),
            ControlFlow::Continue(()) => Ok(ControlFlow::Continue(())),
        }
    }

    /// Ends the stream with `error` (see [`Self::next_frame`]).
    #[cold]
    fn poison(&mut self, error: DecodeError) -> DecodeError {
        self.poisoned = Some(error);
        // Free the buffer: nothing after a malformed header is ever read.
        self.chunk = None;
        error
    }
}

/// The payload of the frame at `at` in the chunk's unconsumed bytes, whose header says
/// `payload_len` and which the caller has checked is all there: a slice of the call's window
/// (a view of those bytes), not a copy.
#[inline(always)]
fn cut(window: &Bytes, at: usize, payload_len: u32) -> Bytes {
    if payload_len == 0 {
        // No need to share the chunk (and touch its reference count) for nothing.
        return Bytes::new();
    }
    let start = at + HEADER_LEN;
    window.slice(start..start + payload_len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `from` through `fill_with` as a socket would (copy into the spare space).
    fn fill_with_from(d: &mut FrameDecoder, from: &mut &[u8], max: usize) -> io::Result<usize> {
        // SAFETY: the closure writes `n` bytes at the start of the space and reads none of it.
        unsafe {
            d.fill_with(max, |spare| {
                let n = from.len().min(spare.len());
                spare[..n].copy_from_slice(&from[..n]);
                *from = &from[n..];
                Ok(n)
            })
        }
    }

    #[test]
    fn a_stamped_header_is_the_header_with_its_three_fields_set() {
        let mut h = Header::new(Kind::DeviceAlert);
        (h.su_id, h.device_id, h.counter) = (Eui64(u64::MAX - 3), Eui64(0x0102_0304), 77);
        (h.msg_id, h.priority, h.payload_len, h.created_ns) = (5, 2, 9, 1_700_000_000);
        (h.alert_code, h.mode, h.aux) = (0x8F1C, 1, 0xBEEF);
        for (msg_id, priority, len) in [(6, 1, 0), (u64::MAX, 255, u32::MAX), (5, 2, 9)] {
            let mut copy = h;
            (copy.msg_id, copy.priority, copy.payload_len) = (msg_id, priority, len);
            assert_eq!(h.to_bytes_stamped(msg_id, priority, len), copy.to_bytes());
        }
    }

    #[test]
    fn encode_stamped_into_appends_the_stamped_header_and_the_payload() {
        let mut h = Header::new(Kind::Response);
        (h.su_id, h.counter, h.msg_id, h.payload_len) = (Eui64(9), 4, 1, 999);
        let mut out = b"before".to_vec();
        for (msg_id, priority, payload) in [(7, 2, &b"abc"[..]), (8, 1, b""), (9, 4, &[5; 300])] {
            let start = out.len();
            h.encode_stamped_into(&mut out, msg_id, priority, payload);
            let len = payload.len() as u32;
            assert_eq!(
                out[start..start + HEADER_LEN],
                h.to_bytes_stamped(msg_id, priority, len)
            );
            assert_eq!(&out[start + HEADER_LEN..], payload);
        }
        assert_eq!(&out[..6], b"before");
    }

    #[test]
    fn fill_with_reads_unzeroed_space_like_fill_from() {
        let mut wire = Vec::new();
        for i in 1..=300u64 {
            let mut h = Header::new(Kind::Response);
            h.msg_id = i;
            let f = Frame::new(h, Bytes::from(vec![i as u8; 100 + i as usize])).unwrap();
            wire.extend_from_slice(&f.header_bytes());
            wire.extend_from_slice(&f.payload);
        }
        let mut d = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
        let mut from = &wire[..];
        let mut seen = 0u64;
        loop {
            let n = fill_with_from(&mut d, &mut from, 1000).unwrap();
            assert!(n <= 1000);
            while let Some(f) = d.next_frame().unwrap() {
                seen += 1;
                assert_eq!(f.header.msg_id, seen);
                assert_eq!(f.payload.len(), 100 + seen as usize);
                assert!(f.payload.iter().all(|&b| b == seen as u8));
            }
            if n == 0 {
                break;
            }
        }
        assert_eq!(seen, 300);
        // A reader claiming more than it was given is clamped to the space.
        let mut d = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
        // SAFETY: the closure writes every byte it reports (and claims more, which is clamped).
        let n = unsafe {
            d.fill_with(10, |spare| {
                let len = spare.len();
                for i in 0..len {
                    spare.write_byte(i, 0);
                }
                Ok(len + 5)
            })
        }
        .unwrap();
        assert_eq!((n, d.buffered_len()), (10, 10));
        // An error passes through and keeps nothing.
        // SAFETY: the closure writes nothing and reports an error.
        let e = unsafe { d.fill_with(10, |_| Err(io::ErrorKind::WouldBlock.into())) };
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(d.buffered_len(), 10);
    }

    #[test]
    fn payload_is_a_view_of_the_receive_buffer() {
        let mut wire = BytesMut::new();
        for payload in [&b"first"[..], b"second payload"] {
            let header = Header::new(Kind::Request);
            Frame::new(header, Bytes::copy_from_slice(payload))
                .unwrap()
                .encode_into(&mut wire);
        }
        let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
        assert_eq!(decoder.feed(&wire), wire.len());
        let start = decoder.chunk.as_ref().unwrap().data().as_ptr() as usize;
        let end = start + decoder.buffered_len();

        let first = decoder.next_frame().unwrap().unwrap();
        let second = decoder.next_frame().unwrap().unwrap();
        let first_at = first.payload.as_ptr() as usize;
        let second_at = second.payload.as_ptr() as usize;
        assert_eq!(first_at, start + HEADER_LEN);
        assert_eq!(second_at, first_at + first.payload.len() + HEADER_LEN);
        assert_eq!(second_at + second.payload.len(), end);
        assert_eq!(&first.payload[..], b"first");
        assert_eq!(&second.payload[..], b"second payload");
    }

    #[test]
    fn decode_each_hands_out_what_next_frame_would_and_stops_where_told() {
        let mut wire = BytesMut::new();
        let mut frames = Vec::new();
        for i in 1..=5u64 {
            let mut h = Header::new(Kind::Response);
            h.msg_id = i;
            let f = Frame::new(h, Bytes::from(vec![i as u8; (i as usize - 1) * 7])).unwrap();
            f.encode_into(&mut wire);
            frames.push(f);
        }
        // The last frame's payload is cut short: its header waits, validated, for the rest.
        let cut = wire.len() - 3;
        let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
        assert_eq!(decoder.feed(&wire[..cut]), cut);
        let mut seen = Vec::new();
        // Breaking on the second frame leaves the others buffered.
        let r = decoder.decode_each(|f| {
            seen.push(f);
            if seen.len() == 2 {
                ControlFlow::Break("second")
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(r, Ok(ControlFlow::Break("second")));
        let r = decoder.decode_each(|f| {
            seen.push(f);
            ControlFlow::<()>::Continue(())
        });
        assert_eq!(r, Ok(ControlFlow::Continue(())));
        assert_eq!(seen, frames[..4]);
        assert!(decoder.pending.is_some());
        // Nothing more until the rest arrives; then the pending frame comes out.
        assert_eq!(
            decoder.decode_each(ControlFlow::Break),
            Ok(ControlFlow::Continue(()))
        );
        assert_eq!(decoder.feed(&wire[cut..]), 3);
        assert_eq!(
            decoder.decode_each(ControlFlow::Break),
            Ok(ControlFlow::Break(frames[4].clone()))
        );
        assert_eq!(decoder.buffered_len(), 0);

        // A malformed header after good frames: the good ones are handed out, then the error,
        // and the same error on every later call.
        let mut bad = BytesMut::new();
        frames[0].encode_into(&mut bad);
        frames[1].encode_into(&mut bad);
        let mut h = frames[2].header_bytes();
        h[5] = 0; // kind 0
        bad.extend_from_slice(&h);
        let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
        assert_eq!(decoder.feed(&bad), bad.len());
        let mut seen = Vec::new();
        let r = decoder.decode_each(|f| {
            seen.push(f);
            ControlFlow::<()>::Continue(())
        });
        let error = DecodeError {
            msg_id: 3,
            error: WireError::UnknownKind { found: 0 },
        };
        assert_eq!(r, Err(error));
        assert_eq!(seen, frames[..2]);
        assert_eq!(decoder.decode_each(ControlFlow::Break), Err(error));
        assert_eq!(decoder.next_frame(), Err(error));
    }

    /// `n` RESPONSE frames with payloads of `len` bytes, numbered from 1.
    fn responses(n: u64, len: usize) -> (Vec<u8>, Vec<Frame>) {
        let mut wire = BytesMut::new();
        let mut frames = Vec::new();
        for i in 1..=n {
            let mut h = Header::new(Kind::Response);
            h.msg_id = i;
            let f = Frame::new(h, Bytes::from(vec![i as u8; len])).unwrap();
            f.encode_into(&mut wire);
            frames.push(f);
        }
        (wire.to_vec(), frames)
    }

    #[test]
    fn read_chunks_go_back_to_the_pool_when_their_frames_are_dropped_and_are_read_into_again() {
        // 1,000 frames of 192 bytes: about three chunks' worth, read 10,000 bytes at a time, so
        // that frames straddle reads and chunks.
        let (wire, frames) = responses(1000, 128);
        let pool = ChunkPool::new(8);
        let mut d = FrameDecoder::with_pool(PAYLOAD_BYTES_MAX_DEFAULT, pool.clone());
        let mut from = &wire[..];
        let mut got = Vec::new();
        let mut chunks = std::collections::HashSet::new();
        loop {
            let n = fill_with_from(&mut d, &mut from, 10_000).unwrap();
            chunks.insert(
                d.chunk.as_ref().unwrap().data().as_ptr() as usize
                    - d.chunk.as_ref().unwrap().consumed(),
            );
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            if n == 0 {
                break;
            }
            if got.len() > 500 {
                // The frames so far are delivered and dropped: their chunks are free again.
                got.drain(..)
                    .zip(&frames)
                    .for_each(|(f, want)| assert_eq!(&f, want));
                assert!(pool.free_chunks() >= 1, "a dropped chunk went back");
            }
        }
        drop(got);
        assert!(
            chunks.len() <= 8,
            "{} distinct chunks for 26 reads: the pool's came back",
            chunks.len()
        );
        assert_eq!(d.buffered_len(), 0);
        // Every chunk is free once the decoder lets go of the last one too.
        drop(d);
        assert!(pool.free_chunks() >= 2);
        assert!(pool.free_chunks() <= pool.chunks_max());
    }

    #[test]
    fn frames_straddling_chunks_and_frames_larger_than_a_chunk_are_whole() {
        // Payloads of 0, 100 KiB (over a chunk) and 33 KiB (over half of one), mixed.
        let mut wire = BytesMut::new();
        let mut frames = Vec::new();
        for (i, len) in [0, 100 * 1024, 33 * 1024, 7, 0, 100 * 1024, 40_000]
            .into_iter()
            .enumerate()
        {
            let mut h = Header::new(Kind::DeviceAlert);
            h.msg_id = i as u64 + 1;
            let f = Frame::new(h, Bytes::from(vec![i as u8 + 1; len])).unwrap();
            f.encode_into(&mut wire);
            frames.push(f);
        }
        for read in [1, 63, 64, 4096, 65_536] {
            let pool = ChunkPool::new(4);
            let mut d = FrameDecoder::with_pool(200 * 1024, pool);
            let mut from = &wire[..];
            let mut got = Vec::new();
            loop {
                let n = fill_with_from(&mut d, &mut from, read).unwrap();
                assert!(d.buffered_len() <= d.buffered_bytes_max());
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
                if n == 0 {
                    break;
                }
            }
            assert_eq!(got, frames, "reads of {read}");
        }
    }

    #[test]
    fn header_is_held_until_payload_completes() {
        let frame = Frame::new(Header::new(Kind::Response), Bytes::from_static(b"abc")).unwrap();
        let mut wire = BytesMut::new();
        frame.encode_into(&mut wire);
        let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
        assert_eq!(decoder.feed(&wire[..HEADER_LEN + 1]), HEADER_LEN + 1);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert!(decoder.pending.is_some());
        assert_eq!(decoder.buffered_len(), HEADER_LEN + 1);
        assert_eq!(decoder.feed(&wire[HEADER_LEN + 1..]), 2);
        assert_eq!(decoder.next_frame(), Ok(Some(frame)));
        assert!(decoder.pending.is_none());
        assert_eq!(decoder.buffered_len(), 0);
    }

    /// PROTOCOL.md's rules written the obvious way, independent of `Header::decode`'s tricks:
    /// each field from its own bytes, each rule in turn with an early return, in the order the
    /// errors are documented to take precedence (magic, version, kind, reserved, length, mode).
    fn reference_decode(b: &[u8; HEADER_LEN], limit: u32) -> Result<Header, DecodeError> {
        let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let max = limit.min(PAYLOAD_BYTES_MAX_CEILING);
        let msg_id = u64_at(40);
        let fail = |error| Err(DecodeError { msg_id, error });
        if u32_at(0) != MAGIC {
            return fail(WireError::BadMagic { found: u32_at(0) });
        }
        if b[4] != VERSION {
            return fail(WireError::BadVersion { found: b[4] });
        }
        let Some(&kind) = Kind::ALL.iter().find(|k| **k as u8 == b[5]) else {
            return fail(WireError::UnknownKind { found: b[5] });
        };
        if u32_at(60) != 0 {
            return fail(WireError::ReservedNotZero { found: u32_at(60) });
        }
        if u32_at(56) > max {
            return fail(WireError::PayloadTooLong {
                len: u32_at(56),
                max,
            });
        }
        if b[6] > 2 {
            return fail(WireError::BadMode { found: b[6] });
        }
        Ok(Header {
            kind,
            mode: b[6],
            priority: b[7],
            srv: Srv(u32_at(8)),
            alert_code: u16_at(12),
            aux: u16_at(14),
            su_id: Eui64(u64_at(16)),
            device_id: Eui64(u64_at(24)),
            counter: u64_at(32),
            msg_id,
            created_ns: u64_at(48),
            payload_len: u32_at(56),
        })
    }

    /// splitmix64: a fixed sequence, so that a failure repeats.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A valid header with every field random and a length at most `limit`.
    fn random_valid_header(rng: &mut Rng, limit: u32) -> [u8; HEADER_LEN] {
        let mut h = Header::new(Kind::ALL[rng.below(11) as usize]);
        h.mode = rng.below(3) as u8;
        h.priority = rng.next() as u8;
        h.srv = Srv(rng.next() as u32);
        h.alert_code = rng.next() as u16;
        h.aux = rng.next() as u16;
        h.su_id = Eui64(rng.next());
        h.device_id = Eui64(rng.next());
        h.counter = rng.next();
        h.msg_id = rng.next();
        h.created_ns = rng.next();
        h.payload_len = rng.below(u64::from(limit) + 1) as u32;
        h.to_bytes()
    }

    /// Payload limits worth trying: the edges, the default, the ceiling and above it.
    const LIMITS: [u32; 8] = [
        0,
        1,
        255,
        PAYLOAD_BYTES_MAX_DEFAULT,
        PAYLOAD_BYTES_MAX_CEILING - 1,
        PAYLOAD_BYTES_MAX_CEILING,
        PAYLOAD_BYTES_MAX_CEILING + 1,
        u32::MAX,
    ];

    fn assert_agrees(bytes: &[u8; HEADER_LEN], limit: u32) {
        assert_eq!(
            Header::decode(bytes, limit),
            reference_decode(bytes, limit),
            "limit {limit}, header {bytes:02x?}"
        );
        // The halves `FrameDecoder::decode_each` decodes with give the same answer.
        let words = header_words(bytes);
        let capped = limit.min(PAYLOAD_BYTES_MAX_CEILING);
        let halves = Header::valid_kind(words[0], words[7], capped)
            .map(|kind| Header::from_words(kind, words));
        assert_eq!(
            halves,
            Header::decode(bytes, limit).ok(),
            "limit {limit}, header {bytes:02x?}"
        );
    }

    #[test]
    fn decode_agrees_with_the_reference_on_every_value_of_every_checked_byte() {
        // Bytes 0-7 hold magic, version, kind, mode and priority, 56-63 the length and the
        // reserved field: every value of each, on valid headers with lengths at and around
        // each limit, covers every invalid value of every field, each rule's edges, and a
        // length byte pushing the length over the limit.
        let mut rng = Rng(1);
        for limit in LIMITS {
            let capped = limit.min(PAYLOAD_BYTES_MAX_CEILING);
            for len in [0, capped / 2, capped] {
                let mut good = random_valid_header(&mut rng, limit);
                good[56..60].copy_from_slice(&len.to_le_bytes());
                assert!(Header::decode(&good, limit).is_ok());
                for at in (0..8).chain(56..HEADER_LEN) {
                    for value in 0..=u8::MAX {
                        let mut bytes = good;
                        bytes[at] = value;
                        assert_agrees(&bytes, limit);
                    }
                }
            }
        }
    }

    #[test]
    fn decode_agrees_with_the_reference_on_random_and_mutated_headers() {
        let mut rng = Rng(7);
        let mut accepted = 0u32;
        let mut refused = [0u32; 6];
        for round in 0..300_000u32 {
            let limit = match rng.below(4) {
                0 => LIMITS[rng.below(LIMITS.len() as u64) as usize],
                1 => rng.next() as u32,
                _ => PAYLOAD_BYTES_MAX_DEFAULT,
            };
            let mut bytes = random_valid_header(&mut rng, limit.min(PAYLOAD_BYTES_MAX_CEILING));
            match round % 4 {
                // Entirely random bytes (almost always a bad magic).
                0 => bytes.iter_mut().for_each(|b| *b = rng.next() as u8),
                // One to four random bytes anywhere set to random values.
                1 => {
                    for _ in 0..=rng.below(4) {
                        bytes[rng.below(HEADER_LEN as u64) as usize] = rng.next() as u8;
                    }
                }
                // One or more checked fields made invalid at once, so that the order in which
                // errors are named is tested too.
                2 => {
                    for _ in 0..=rng.below(3) {
                        match rng.below(6) {
                            0 => bytes[rng.below(4) as usize] ^= 1 << rng.below(8),
                            1 => bytes[4] = [0, 2, 255, rng.next() as u8][rng.below(4) as usize],
                            2 => {
                                bytes[5] = [0, 12, 16, 255, rng.next() as u8][rng.below(5) as usize]
                            }
                            3 => bytes[6] = 3 + rng.below(253) as u8,
                            4 => bytes[60 + rng.below(4) as usize] |= 1 << rng.below(8),
                            _ => {
                                let len = limit
                                    .min(PAYLOAD_BYTES_MAX_CEILING)
                                    .saturating_add(1 + rng.below(u64::from(u32::MAX)) as u32);
                                bytes[56..60].copy_from_slice(&len.to_le_bytes());
                            }
                        }
                    }
                }
                // Left valid.
                _ => {}
            }
            assert_agrees(&bytes, limit);
            match Header::decode(&bytes, limit) {
                Ok(_) => accepted += 1,
                Err(e) => {
                    refused[match e.error {
                        WireError::BadMagic { .. } => 0,
                        WireError::BadVersion { .. } => 1,
                        WireError::UnknownKind { .. } => 2,
                        WireError::ReservedNotZero { .. } => 3,
                        WireError::PayloadTooLong { .. } => 4,
                        WireError::BadMode { .. } => 5,
                    }] += 1
                }
            }
        }
        // The mix must reach every outcome often, or the agreement above proves little.
        assert!(accepted > 50_000, "{accepted} accepted");
        assert!(refused.iter().all(|&n| n > 5_000), "refused {refused:?}");
    }

    #[test]
    fn every_fast_path_rejection_is_classified() {
        // Each single-field corruption must be caught by the fast check and named by `reject`.
        let good = Header::new(Kind::Ping).to_bytes();
        let cases: [(usize, u8, WireError); 6] = [
            (0, b'X', WireError::BadMagic { found: 0x4C50_5358 }),
            (4, 2, WireError::BadVersion { found: 2 }),
            (5, 12, WireError::UnknownKind { found: 12 }),
            (63, 1, WireError::ReservedNotZero { found: 0x0100_0000 }),
            (57, 1, WireError::PayloadTooLong { len: 256, max: 255 }),
            (6, 3, WireError::BadMode { found: 3 }),
        ];
        for (at, value, want) in cases {
            let mut bad = good;
            bad[at] = value;
            assert_eq!(Header::decode(&bad, 255).map_err(|e| e.error), Err(want));
        }
    }
}

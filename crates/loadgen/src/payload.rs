//! The check trailer every generated payload ends with, and its checksum.
//!
//! dsplane forwards payloads byte for byte (PROTOCOL.md), so the load generator can append 32
//! bytes of its own after the DUIS body and find them intact at the receiver:
//!
//! | bytes | field    | meaning |
//! |------:|----------|---------|
//! | 4     | magic    | `LGv1` |
//! | 4     | flags    | what the message stands for in its scenario ([`flags`]) |
//! | 8     | seq      | the message's unique number (sending stream << 40 \| n) |
//! | 8     | dest     | northbound: the EUI-64 of the SU it is for; southbound: CSP index + 1 (0 = any) |
//! | 8     | checksum | over the payload before it and the header fields dsplane must not change |
//!
//! The header fields covered are everything but `msg_id` and `priority`, which dsplane rewrites:
//! kind, mode, srv, alert code, su_id, device_id, counter and `created_ns`. A flipped payload
//! byte, a rewritten `su_id` or a changed `created_ns` all fail the checksum.

use crate::wire::Header;
use bytes::{BufMut, Bytes, BytesMut};

use crate::data::Template;

/// Bytes of the trailer.
pub const TRAILER_LEN: usize = 32;
/// The trailer's first four bytes.
pub const TRAILER_MAGIC: [u8; 4] = *b"LGv1";

/// What a message stands for in its scenario (bits of [`Trailer::flags`]).
pub mod flags {
    /// Sent to an SU while it was disconnected: the outage backlog.
    pub const BACKLOG: u32 = 1;
    /// The urgent traffic a scenario's headline is about (outage: sent to the SU after it came
    /// back; scheduled flood: the on-demand top-ups).
    pub const HEADLINE: u32 = 1 << 1;
    /// A CSP's response to a request it received.
    pub const REPLY: u32 = 1 << 2;
    /// Part of an alert storm.
    pub const STORM: u32 = 1 << 3;
    /// Part of a bulk scheduled flood.
    pub const FLOOD: u32 = 1 << 4;
}

/// The decoded trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trailer {
    /// [`flags`].
    pub flags: u32,
    /// The message's unique number.
    pub seq: u64,
    /// Where it must arrive (see the module docs).
    pub dest: u64,
}

/// Why a payload fails the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// Shorter than a trailer, or without its magic.
    #[error("no load-generator trailer")]
    NoTrailer,
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
}

/// A 64-bit hash of the payload and the header fields dsplane must keep (word at a time, with a
/// multiply-rotate step per word: fast, and any single changed bit changes it).
pub fn checksum(header: &Header, body: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    let mut mix = |w: u64| h = (h ^ w).wrapping_mul(K).rotate_left(29);
    mix(u64::from(header.kind as u8)
        | u64::from(header.mode) << 8
        | u64::from(header.alert_code) << 16
        | u64::from(header.srv.0) << 32);
    mix(header.su_id.0);
    mix(header.device_id.0);
    mix(header.counter);
    mix(header.created_ns);
    mix(body.len() as u64);
    let mut chunks = body.chunks_exact(8);
    for c in &mut chunks {
        mix(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
    }
    let mut tail = [0u8; 8];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    mix(u64::from_le_bytes(tail));
    h ^ (h >> 32)
}

/// The `su:device:counter` RequestID text of a header.
pub fn request_id(header: &Header) -> String {
    format!("{}:{}:{}", header.su_id, header.device_id, header.counter)
}

/// Builds a payload: the template with the header's RequestID filled in, then the trailer.
pub fn build(template: &Template, header: &Header, trailer: Trailer) -> Bytes {
    let id = request_id(header);
    build_raw(
        &[
            template.before.as_bytes(),
            id.as_bytes(),
            template.after.as_bytes(),
        ],
        header,
        trailer,
    )
}

/// Builds a payload from body parts and the trailer.
pub fn build_raw(parts: &[&[u8]], header: &Header, trailer: Trailer) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut buf = BytesMut::with_capacity(len + TRAILER_LEN);
    for p in parts {
        buf.put_slice(p);
    }
    buf.put_slice(&TRAILER_MAGIC);
    buf.put_u32_le(trailer.flags);
    buf.put_u64_le(trailer.seq);
    buf.put_u64_le(trailer.dest);
    let sum = checksum(header, &buf);
    buf.put_u64_le(sum);
    buf.freeze()
}

/// Reads the trailer of a received payload, checking it against the received header.
///
/// # Errors
///
/// [`Corruption`] when there is no trailer or the checksum does not match.
pub fn verify(header: &Header, payload: &[u8]) -> Result<Trailer, Corruption> {
    let Some(at) = payload.len().checked_sub(TRAILER_LEN) else {
        return Err(Corruption::NoTrailer);
    };
    let t = &payload[at..];
    let word = |i: usize| u64::from_le_bytes(t[i..i + 8].try_into().unwrap_or([0; 8]));
    if t[..4] != TRAILER_MAGIC {
        return Err(Corruption::NoTrailer);
    }
    let trailer = Trailer {
        flags: u32::from_le_bytes(t[4..8].try_into().unwrap_or([0; 4])),
        seq: word(8),
        dest: word(16),
    };
    if checksum(header, &payload[..payload.len() - 8]) != word(24) {
        return Err(Corruption::Checksum);
    }
    Ok(trailer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Eui64, Srv};
    use crate::wire::Kind;

    fn header() -> Header {
        let mut h = Header::new(Kind::Response);
        h.srv = Srv::new(2, 2, 0);
        h.su_id = Eui64(0x90B3_D51F_3001_0000);
        h.device_id = Eui64(0x00DB_1234_5678_90A0);
        h.counter = 1007;
        h.created_ns = 1_700_000_000_000_000_000;
        h
    }

    fn template() -> Template {
        Template {
            before: "<sr:RequestID>".into(),
            after: "</sr:RequestID>".into(),
        }
    }

    #[test]
    fn round_trip() {
        let h = header();
        let t = Trailer {
            flags: flags::BACKLOG,
            seq: 42,
            dest: h.su_id.0,
        };
        let p = build(&template(), &h, t);
        assert!(std::str::from_utf8(&p[..p.len() - TRAILER_LEN])
            .unwrap()
            .contains("90-B3-D5-1F-30-01-00-00:00-DB-12-34-56-78-90-A0:1007"));
        assert_eq!(verify(&h, &p), Ok(t));
        // dsplane may rewrite msg_id and priority.
        let mut forwarded = h;
        forwarded.msg_id = 9;
        forwarded.priority = 1;
        assert_eq!(verify(&forwarded, &p), Ok(t));
    }

    #[test]
    fn any_flipped_bit_or_changed_field_is_caught() {
        let h = header();
        let p = build(&template(), &h, Trailer::default());
        for i in 0..p.len() - TRAILER_LEN {
            let mut bad = p.to_vec();
            bad[i] ^= 0x04;
            assert_eq!(verify(&h, &bad), Err(Corruption::Checksum), "byte {i}");
        }
        let mut other = h;
        other.su_id = Eui64(1);
        assert_eq!(verify(&other, &p), Err(Corruption::Checksum));
        let mut other = h;
        other.created_ns += 1;
        assert_eq!(verify(&other, &p), Err(Corruption::Checksum));
        assert_eq!(verify(&h, b"short"), Err(Corruption::NoTrailer));
        assert_eq!(verify(&h, &[0u8; 40]), Err(Corruption::NoTrailer));
    }
}

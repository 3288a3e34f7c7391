//! The wire protocol of PROTOCOL.md through the public API: the test vector byte for byte, round
//! trips, every way a header can be malformed, the payload limit at its edge, the streaming
//! decoder under any chunking, its bound and its poisoning, and property tests that no input
//! panics.

use std::io;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use dsplane_proto::ids::{Eui64, Mode, Srv};
use dsplane_proto::wire::{
    DecodeError, Frame, FrameDecoder, Header, Kind, NackReason, Role, TokenLenError, WireError,
    HEADER_LEN, MAGIC, NACK_DETAIL_BYTES_MAX, PAYLOAD_BYTES_MAX_CEILING, PAYLOAD_BYTES_MAX_DEFAULT,
    READ_CHUNK_BYTES_MAX, TOKEN_BYTES_MAX, VERSION,
};

/// PROTOCOL.md's test vector: header and the payload `hi`.
const VECTOR: [u8; 66] = [
    0x44, 0x53, 0x50, 0x4c, 0x01, 0x03, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x00, 0x00, 0x01, 0x30, 0x1f, 0xd5, 0xb3, 0x90, 0xa0, 0x90, 0x78, 0x56, 0x34, 0x12, 0xdb,
    0x00, //
    0xef, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x00, 0x00, 0x2a, 0x36, 0xfe, 0x9c, 0x97, 0x17, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x68, 0x69,
];

fn vector_frame() -> Frame {
    let mut header = Header::new(Kind::Request);
    header.mode = Mode::OnDemand as u8;
    header.srv = "2.2".parse::<Srv>().unwrap();
    header.su_id = "90-B3-D5-1F-30-01-00-00".parse::<Eui64>().unwrap();
    header.device_id = "00-DB-12-34-56-78-90-A0".parse::<Eui64>().unwrap();
    header.counter = 1007;
    header.msg_id = 1;
    header.created_ns = 1_700_000_000_000_000_000;
    Frame::new(header, Bytes::from_static(b"hi")).unwrap()
}

fn header_of(bytes: &[u8]) -> [u8; HEADER_LEN] {
    bytes[..HEADER_LEN].try_into().unwrap()
}

/// Feeds `stream` in pieces of the given sizes (cycled; 0 counts as 1), draining frames after
/// each piece, and returns every frame or the first error.
fn decode_chunked(
    stream: &[u8],
    chunk_sizes: &[usize],
    payload_bytes_max: u32,
) -> Result<Vec<Frame>, DecodeError> {
    let mut decoder = FrameDecoder::new(payload_bytes_max);
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut sizes = chunk_sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(1).clamp(1, rest.len());
        let mut piece = &rest[..size];
        rest = &rest[size..];
        while !piece.is_empty() {
            let taken = decoder.feed(piece);
            piece = &piece[taken..];
            assert!(decoder.buffered_len() <= decoder.buffered_bytes_max());
            while let Some(frame) = decoder.next_frame()? {
                frames.push(frame);
            }
        }
    }
    assert_eq!(
        decoder.buffered_len(),
        0,
        "a complete stream leaves nothing behind"
    );
    Ok(frames)
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut wire = BytesMut::new();
    for frame in frames {
        frame.encode_into(&mut wire);
    }
    wire
}

/// A mixed stream: every kind, payloads from empty to 16 KB, about 1.2 MiB in all.
fn sample_frames() -> Vec<Frame> {
    (0..240u64)
        .map(|i| {
            let kind = Kind::ALL[(i % 11) as usize];
            let mut header = Header::new(kind);
            header.mode = (i % 3) as u8;
            header.priority = (i % 5) as u8;
            header.srv = Srv::new(8, 7, (i % 4) as u8);
            header.alert_code = 0x8F75;
            header.aux = i as u16;
            header.su_id = Eui64(0x90B3_D51F_3001_0000 + i);
            header.device_id = Eui64(!i);
            header.counter = i * 3;
            header.msg_id = i + 1;
            header.created_ns = 1_700_000_000_000_000_000 + i;
            let len = if i % 3 == 0 {
                0
            } else {
                ((i * 7919) % 16_000) as usize
            };
            let payload: Vec<u8> = (0..len).map(|b| (b as u64 ^ i) as u8).collect();
            Frame::new(header, Bytes::from(payload)).unwrap()
        })
        .collect()
}

#[test]
fn protocol_test_vector_encodes_byte_for_byte() {
    let frame = vector_frame();
    assert_eq!(frame.header.srv, Srv(0x0002_0200));
    assert_eq!(frame.header.su_id, Eui64(0x90B3_D51F_3001_0000));
    assert_eq!(frame.header.payload_len, 2);
    let mut wire = BytesMut::new();
    frame.encode_into(&mut wire);
    assert_eq!(&wire[..], &VECTOR[..]);
    assert_eq!(frame.header_bytes(), header_of(&VECTOR));
    assert_eq!(frame.header.to_bytes(), header_of(&VECTOR));
    let mut put = BytesMut::new();
    frame.header.put(&mut put);
    assert_eq!(&put[..], &VECTOR[..HEADER_LEN]);
    assert_eq!(frame.wire_len(), VECTOR.len());
}

#[test]
fn protocol_test_vector_decodes() {
    let header = Header::decode(&header_of(&VECTOR), PAYLOAD_BYTES_MAX_DEFAULT).unwrap();
    assert_eq!(header, vector_frame().header);
    assert_eq!(header.operation_mode(), Some(Mode::OnDemand));
    assert_eq!(header.srv.to_string(), "2.2");
    assert_eq!(header.su_id.to_string(), "90-B3-D5-1F-30-01-00-00");
    assert_eq!(header.device_id.to_string(), "00-DB-12-34-56-78-90-A0");

    let frames = decode_chunked(&VECTOR, &[VECTOR.len()], PAYLOAD_BYTES_MAX_DEFAULT).unwrap();
    assert_eq!(frames, vec![vector_frame()]);
    assert_eq!(&frames[0].payload[..], b"hi");
}

#[test]
fn magic_reads_as_dspl() {
    assert_eq!(&MAGIC.to_le_bytes(), b"DSPL");
    assert_eq!(VERSION, 1);
}

#[test]
fn kinds_are_numbered_and_named_as_in_protocol() {
    let names = [
        "HELLO",
        "HELLO_OK",
        "REQUEST",
        "RESPONSE",
        "DEVICE_ALERT",
        "DCC_ALERT",
        "ACK",
        "NACK",
        "STORM_SUMMARY",
        "PING",
        "PONG",
    ];
    for (i, (kind, name)) in Kind::ALL.into_iter().zip(names).enumerate() {
        assert_eq!(kind as u8 as usize, i + 1);
        assert_eq!(Kind::from_u8(i as u8 + 1), Some(kind));
        assert_eq!(kind.to_string(), name);
    }
    assert_eq!(Kind::from_u8(0), None);
    for byte in 12..=u8::MAX {
        assert_eq!(Kind::from_u8(byte), None);
    }
    let data: Vec<Kind> = Kind::ALL.into_iter().filter(|k| k.is_data()).collect();
    assert_eq!(
        data,
        [
            Kind::Request,
            Kind::Response,
            Kind::DeviceAlert,
            Kind::DccAlert,
            Kind::StormSummary
        ]
    );
}

#[test]
fn nack_reasons_and_roles_from_aux() {
    for (aux, reason) in [
        (1, NackReason::Malformed),
        (2, NackReason::Throttled),
        (3, NackReason::Unauthorised),
        (4, NackReason::UnknownDestination),
        (5, NackReason::Overloaded),
        (6, NackReason::UnexpectedKind),
    ] {
        assert_eq!(NackReason::from_u16(aux), Some(reason));
        assert_eq!(reason as u16, aux);
    }
    assert_eq!(NackReason::from_u16(0), None);
    assert_eq!(NackReason::from_u16(7), None);
    assert_eq!(Role::from_u16(1), Some(Role::Su));
    assert_eq!(Role::from_u16(2), Some(Role::Csp));
    assert_eq!(Role::from_u16(0), None);
    assert_eq!(Role::from_u16(3), None);
}

#[test]
fn every_kind_round_trips_through_header_and_decoder() {
    for kind in Kind::ALL {
        let mut header = Header::new(kind);
        header.mode = 2;
        header.priority = 16;
        header.srv = Srv(0x0008_0701);
        header.alert_code = u16::MAX;
        header.aux = 0xABCD;
        header.su_id = Eui64(u64::MAX);
        header.device_id = Eui64(0x00DB_1234_5678_90A0);
        header.counter = u64::MAX - 1;
        header.msg_id = u64::MAX;
        header.created_ns = u64::MAX - 2;
        header.payload_len = 3;
        let bytes = header.to_bytes();
        assert_eq!(Header::decode(&bytes, 3), Ok(header), "{kind}");

        let frame = Frame::new(header, Bytes::from_static(b"xyz")).unwrap();
        let frames = decode_chunked(
            &encode_all(std::slice::from_ref(&frame)),
            &[5],
            PAYLOAD_BYTES_MAX_DEFAULT,
        )
        .unwrap();
        assert_eq!(frames, vec![frame], "{kind}");
    }
}

/// A valid header with the given byte changed, and msg_id 0xFEED to look for in the error.
fn corrupted(at: usize, value: u8) -> [u8; HEADER_LEN] {
    let mut header = Header::new(Kind::Request);
    header.msg_id = 0xFEED;
    header.payload_len = 10;
    let mut bytes = header.to_bytes();
    bytes[at] = value;
    bytes
}

#[test]
fn every_wire_error_from_a_hand_made_header() {
    let cases = [
        (
            corrupted(3, 0x00),
            WireError::BadMagic { found: 0x0050_5344 },
        ),
        (
            corrupted(0, b'd'),
            WireError::BadMagic { found: 0x4C50_5364 },
        ),
        (corrupted(4, 0), WireError::BadVersion { found: 0 }),
        (corrupted(4, 2), WireError::BadVersion { found: 2 }),
        (corrupted(5, 0), WireError::UnknownKind { found: 0 }),
        (corrupted(5, 12), WireError::UnknownKind { found: 12 }),
        (corrupted(5, 255), WireError::UnknownKind { found: 255 }),
        (corrupted(60, 1), WireError::ReservedNotZero { found: 1 }),
        (
            corrupted(63, 0x80),
            WireError::ReservedNotZero { found: 0x8000_0000 },
        ),
        (
            corrupted(56, 11),
            WireError::PayloadTooLong { len: 11, max: 10 },
        ),
        (
            corrupted(59, 1),
            WireError::PayloadTooLong {
                len: 0x0100_000A,
                max: 10,
            },
        ),
        (corrupted(6, 3), WireError::BadMode { found: 3 }),
        (corrupted(6, 255), WireError::BadMode { found: 255 }),
    ];
    for (bytes, want) in cases {
        let err = Header::decode(&bytes, 10).unwrap_err();
        assert_eq!(
            err,
            DecodeError {
                msg_id: 0xFEED,
                error: want
            }
        );
        assert_eq!(err.nack_reason(), NackReason::Malformed);
        assert_eq!(want.nack_reason(), NackReason::Malformed);
        assert!(err.to_string().contains("65261"), "{err}");

        // The decoder refuses it as soon as the header is in, without waiting for the payload.
        let mut decoder = FrameDecoder::new(10);
        assert_eq!(decoder.feed(&bytes), HEADER_LEN);
        assert_eq!(decoder.next_frame(), Err(err));
    }
}

#[test]
fn magic_is_checked_before_other_fields() {
    // Everything wrong at once: the first thing to report is that this is not our protocol.
    let bytes = [0xFFu8; HEADER_LEN];
    let err = Header::decode(&bytes, PAYLOAD_BYTES_MAX_DEFAULT).unwrap_err();
    assert_eq!(err.error, WireError::BadMagic { found: u32::MAX });
    assert_eq!(err.msg_id, u64::MAX);
}

#[test]
fn error_messages_say_what_to_do() {
    let messages = [
        WireError::BadMagic { found: 1 }.to_string(),
        WireError::BadVersion { found: 2 }.to_string(),
        WireError::UnknownKind { found: 12 }.to_string(),
        WireError::ReservedNotZero { found: 1 }.to_string(),
        WireError::PayloadTooLong { len: 9, max: 8 }.to_string(),
        WireError::BadMode { found: 3 }.to_string(),
    ];
    assert!(messages[0].contains("0x4c505344"), "{}", messages[0]);
    assert!(messages[1].contains("version 1"), "{}", messages[1]);
    assert!(messages[4].contains("max_payload"), "{}", messages[4]);
    for message in messages {
        assert!(message.contains(':'), "{message}");
    }
}

#[test]
fn payload_len_at_the_limit_is_accepted_and_one_more_refused() {
    for max in [0, 1, 1000, PAYLOAD_BYTES_MAX_DEFAULT] {
        let mut header = Header::new(Kind::DeviceAlert);
        header.msg_id = 9;
        header.payload_len = max;
        assert_eq!(Header::decode(&header.to_bytes(), max), Ok(header));
        header.payload_len = max + 1;
        assert_eq!(
            Header::decode(&header.to_bytes(), max),
            Err(DecodeError {
                msg_id: 9,
                error: WireError::PayloadTooLong { len: max + 1, max }
            })
        );

        // And through the decoder, with a real payload of exactly `max` bytes.
        let frame =
            Frame::new(Header::new(Kind::Response), vec![7u8; max as usize].into()).unwrap();
        let frames =
            decode_chunked(&encode_all(std::slice::from_ref(&frame)), &[4096], max).unwrap();
        assert_eq!(frames, vec![frame]);
    }
}

#[test]
fn a_limit_above_the_ceiling_is_lowered_to_it() {
    let mut header = Header::new(Kind::Request);
    header.payload_len = PAYLOAD_BYTES_MAX_CEILING;
    assert_eq!(Header::decode(&header.to_bytes(), u32::MAX), Ok(header));
    header.payload_len = PAYLOAD_BYTES_MAX_CEILING + 1;
    assert_eq!(
        Header::decode(&header.to_bytes(), u32::MAX).map_err(|e| e.error),
        Err(WireError::PayloadTooLong {
            len: PAYLOAD_BYTES_MAX_CEILING + 1,
            max: PAYLOAD_BYTES_MAX_CEILING
        })
    );
    let decoder = FrameDecoder::new(u32::MAX);
    assert_eq!(decoder.payload_bytes_max(), PAYLOAD_BYTES_MAX_CEILING);
}

#[test]
fn a_huge_length_is_refused_after_the_header_alone() {
    let mut header = Header::new(Kind::Request);
    header.msg_id = 42;
    header.payload_len = u32::MAX;
    let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
    let bytes = header.to_bytes();
    assert_eq!(decoder.feed(&bytes[..HEADER_LEN - 1]), HEADER_LEN - 1);
    assert_eq!(decoder.next_frame(), Ok(None));
    assert_eq!(decoder.feed(&bytes[HEADER_LEN - 1..]), 1);
    let err = decoder.next_frame().unwrap_err();
    assert_eq!(err.msg_id, 42);
    assert!(matches!(
        err.error,
        WireError::PayloadTooLong { len: u32::MAX, .. }
    ));
}

#[test]
fn one_byte_seven_bytes_and_one_mebibyte_at_a_time_give_the_same_frames() {
    let frames = sample_frames();
    let wire = encode_all(&frames);
    assert!(
        wire.len() > 1 << 20,
        "a 1 MiB chunk must not hold the whole stream"
    );
    for chunk in [1, 7, 1 << 20] {
        let got = decode_chunked(&wire, &[chunk], PAYLOAD_BYTES_MAX_DEFAULT).unwrap();
        assert_eq!(got, frames, "chunk {chunk}");
    }
    let got = decode_chunked(
        &wire,
        &[1, 63, 64, 65, 4096, 0, 3],
        PAYLOAD_BYTES_MAX_DEFAULT,
    );
    assert_eq!(got.unwrap(), frames);
}

#[test]
fn feed_takes_only_what_fits_under_the_bound() {
    let frames = sample_frames();
    let wire = encode_all(&frames);
    let mut decoder = FrameDecoder::new(4096);
    let bound = HEADER_LEN + 4096 + READ_CHUNK_BYTES_MAX;
    assert_eq!(decoder.buffered_bytes_max(), bound);
    let taken = decoder.feed(&wire);
    assert_eq!(taken, bound);
    assert_eq!(decoder.buffered_len(), bound);
    assert_eq!(decoder.feed(&wire[taken..]), 0, "full until drained");
    assert!(
        decoder.next_frame().unwrap().is_some(),
        "full means a frame is ready"
    );
    assert!(decoder.feed(&wire[taken..]) > 0);
}

#[test]
fn poisoned_decoder_repeats_its_error_forever() {
    let mut wire = encode_all(&[Frame::ping()]);
    wire.extend_from_slice(&corrupted(4, 9));
    wire.extend_from_slice(&encode_all(&[Frame::pong()]));
    let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
    assert_eq!(decoder.feed(&wire), wire.len());
    assert_eq!(decoder.next_frame(), Ok(Some(Frame::ping())));
    let err = decoder.next_frame().unwrap_err();
    assert_eq!(err.error, WireError::BadVersion { found: 9 });
    assert_eq!(err.msg_id, 0xFEED);
    assert!(decoder.is_poisoned());
    assert_eq!(decoder.buffered_len(), 0, "what followed is dropped");

    let more = encode_all(&[Frame::ack(1), Frame::hello_ok()]);
    assert_eq!(decoder.feed(&more), more.len(), "taken and dropped");
    assert_eq!(decoder.buffered_len(), 0);
    for _ in 0..3 {
        assert_eq!(decoder.next_frame(), Err(err));
    }
    let mut reader = io::Cursor::new(more.to_vec());
    assert_eq!(decoder.fill_from(&mut reader, 1024).unwrap(), more.len());
    assert_eq!(decoder.buffered_len(), 0);
    assert_eq!(decoder.next_frame(), Err(err));
}

#[test]
fn payloads_are_views_of_one_receive_buffer() {
    let frames = sample_frames();
    let wire = encode_all(&frames[..10]);
    let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
    assert_eq!(decoder.feed(&wire), wire.len());
    let mut got = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        got.push(frame);
    }
    // Each non-empty payload starts exactly one header after the end of the previous one: they
    // are consecutive slices of the buffer the stream was fed into, not copies.
    let mut previous_end: Option<usize> = None;
    let mut gap = 0;
    for frame in &got {
        gap += HEADER_LEN;
        if frame.payload.is_empty() {
            continue;
        }
        let at = frame.payload.as_ptr() as usize;
        if let Some(end) = previous_end {
            assert_eq!(at, end + gap);
        }
        previous_end = Some(at + frame.payload.len());
        gap = 0;
        let clone = frame.clone();
        assert_eq!(
            clone.payload.as_ptr(),
            frame.payload.as_ptr(),
            "clone shares"
        );
    }
    assert!(previous_end.is_some());
    assert_eq!(got, frames[..10]);
}

#[test]
fn fill_from_reads_straight_into_the_decoder() {
    let frames = sample_frames();
    let wire = encode_all(&frames).to_vec();
    let mut reader = io::Cursor::new(wire.clone());
    let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
    let mut got = Vec::new();
    let mut total = 0;
    loop {
        let n = decoder.fill_from(&mut reader, 10_000).unwrap();
        assert!(n <= 10_000);
        total += n;
        while let Some(frame) = decoder.next_frame().unwrap() {
            got.push(frame);
        }
        if n == 0 {
            break;
        }
    }
    assert_eq!(total, wire.len());
    assert_eq!(got, frames);
    assert_eq!(decoder.buffered_len(), 0);
}

struct Failing(io::ErrorKind);

impl io::Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(self.0.into())
    }
}

#[test]
fn fill_from_passes_reader_errors_through_and_keeps_nothing() {
    let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT);
    assert_eq!(decoder.feed(&VECTOR[..10]), 10);
    let err = decoder
        .fill_from(&mut Failing(io::ErrorKind::WouldBlock), 4096)
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    assert_eq!(decoder.buffered_len(), 10);
    assert_eq!(decoder.feed(&VECTOR[10..]), VECTOR.len() - 10);
    assert_eq!(decoder.next_frame(), Ok(Some(vector_frame())));
}

#[test]
fn fill_from_a_full_decoder_is_an_error_not_end_of_stream() {
    let wire = encode_all(&sample_frames());
    let mut decoder = FrameDecoder::new(1024);
    let mut reader = io::Cursor::new(wire.to_vec());
    let mut read = 0;
    let err = loop {
        match decoder.fill_from(&mut reader, usize::MAX) {
            Ok(n) => {
                assert!(n > 0 && n <= READ_CHUNK_BYTES_MAX);
                read += n;
            }
            Err(err) => break err,
        }
    };
    assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
    assert_eq!(read, decoder.buffered_bytes_max());
    assert!(decoder.next_frame().unwrap().is_some());
    assert!(decoder.fill_from(&mut reader, usize::MAX).unwrap() > 0);
}

#[test]
fn hello_carries_role_su_and_token() {
    let su = Eui64(0x90B3_D51F_3001_0000);
    let hello = Frame::hello(Role::Su, su, "s3cret").unwrap();
    assert_eq!(hello.header.kind, Kind::Hello);
    assert_eq!(hello.header.aux, 1);
    assert_eq!(hello.header.role(), Some(Role::Su));
    assert_eq!(hello.header.su_id, su);
    assert_eq!(hello.header.payload_len, 6);
    assert_eq!(hello.hello_token(), Some("s3cret"));
    let csp = Frame::hello(Role::Csp, Eui64(0), &"t".repeat(TOKEN_BYTES_MAX)).unwrap();
    assert_eq!(csp.header.role(), Some(Role::Csp));
    assert_eq!(csp.hello_token().map(str::len), Some(TOKEN_BYTES_MAX));

    assert_eq!(
        Frame::hello(Role::Su, su, ""),
        Err(TokenLenError { len: 0 })
    );
    assert_eq!(
        Frame::hello(Role::Su, su, &"t".repeat(TOKEN_BYTES_MAX + 1)),
        Err(TokenLenError { len: 257 })
    );

    // A received HELLO with a token PROTOCOL.md does not allow has no token.
    let mut bad = hello.clone();
    bad.payload = Bytes::from_static(&[0xFF, 0xFE]);
    assert_eq!(bad.hello_token(), None);
    bad.payload = Bytes::new();
    assert_eq!(bad.hello_token(), None);
    assert_eq!(Frame::ping().hello_token(), None);
    assert_eq!(Frame::ping().header.role(), None);
}

#[test]
fn control_frame_builders() {
    assert_eq!(Frame::hello_ok().header, Header::new(Kind::HelloOk));
    assert_eq!(Frame::ping().header, Header::new(Kind::Ping));
    assert_eq!(Frame::pong().header, Header::new(Kind::Pong));
    assert_eq!(Frame::default(), Frame::ping());
    let ack = Frame::ack(77);
    assert_eq!((ack.header.kind, ack.header.msg_id), (Kind::Ack, 77));
    assert!(ack.payload.is_empty());

    let nack = Frame::nack(5, NackReason::Throttled, "over SECMP0067 rate");
    assert_eq!(nack.header.kind, Kind::Nack);
    assert_eq!(nack.header.msg_id, 5);
    assert_eq!(nack.header.aux, 2);
    assert_eq!(nack.header.nack_reason(), Some(NackReason::Throttled));
    assert_eq!(&nack.payload[..], b"over SECMP0067 rate");
    assert_eq!(nack.header.payload_len, 19);
    assert_eq!(Frame::ack(1).header.nack_reason(), None);
}

#[test]
fn nack_detail_is_cut_at_a_character_boundary() {
    // 86 three-byte characters are 258 bytes; the cut must fall at 255, not inside a character.
    let detail = "€".repeat(86);
    let nack = Frame::nack(1, NackReason::Malformed, &detail);
    assert_eq!(nack.payload.len(), 255);
    assert_eq!(std::str::from_utf8(&nack.payload).unwrap(), "€".repeat(85));
    assert_eq!(nack.header.payload_len, 255);

    let ascii = "x".repeat(1000);
    let nack = Frame::nack(1, NackReason::Malformed, &ascii);
    assert_eq!(nack.payload.len(), NACK_DETAIL_BYTES_MAX);
    assert!(Frame::nack(1, NackReason::Overloaded, "")
        .payload
        .is_empty());
}

#[test]
fn encoding_writes_the_real_payload_length() {
    let mut frame = Frame::new(Header::new(Kind::Request), Bytes::from_static(b"abc")).unwrap();
    frame.header.payload_len = 999;
    let header = Header::decode(&frame.header_bytes(), PAYLOAD_BYTES_MAX_DEFAULT).unwrap();
    assert_eq!(header.payload_len, 3);
    let mut wire = BytesMut::new();
    frame.encode_into(&mut wire);
    assert_eq!(wire.len(), HEADER_LEN + 3);
    assert_eq!(&wire[..HEADER_LEN], &frame.header_bytes());
    assert_eq!(&wire[HEADER_LEN..], b"abc");
}

#[test]
fn frame_new_refuses_a_payload_over_the_ceiling() {
    let big = Bytes::from(vec![0u8; PAYLOAD_BYTES_MAX_CEILING as usize + 1]);
    assert_eq!(
        Frame::new(Header::new(Kind::Request), big),
        Err(WireError::PayloadTooLong {
            len: PAYLOAD_BYTES_MAX_CEILING + 1,
            max: PAYLOAD_BYTES_MAX_CEILING
        })
    );
}

fn any_header(payload_len_max: u32) -> impl Strategy<Value = Header> {
    (
        proptest::sample::select(Kind::ALL.to_vec()),
        0..=2u8,
        any::<u8>(),
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        0..=payload_len_max,
    )
        .prop_map(
            |(
                kind,
                mode,
                priority,
                srv,
                alert_code,
                aux,
                su,
                device,
                counter,
                msg_id,
                created,
                len,
            )| {
                Header {
                    kind,
                    mode,
                    priority,
                    srv: Srv(srv),
                    alert_code,
                    aux,
                    su_id: Eui64(su),
                    device_id: Eui64(device),
                    counter,
                    msg_id,
                    created_ns: created,
                    payload_len: len,
                }
            },
        )
}

fn any_frame() -> impl Strategy<Value = Frame> {
    (
        any_header(0),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(header, payload)| Frame::new(header, Bytes::from(payload)).unwrap())
}

proptest! {
    #[test]
    fn any_valid_header_round_trips(header in any_header(PAYLOAD_BYTES_MAX_CEILING)) {
        let bytes = header.to_bytes();
        prop_assert_eq!(Header::decode(&bytes, PAYLOAD_BYTES_MAX_CEILING), Ok(header));
    }

    #[test]
    fn any_64_bytes_decode_without_panic_and_canonically(
        bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN),
        max in any::<u32>(),
    ) {
        let header: [u8; HEADER_LEN] = bytes.try_into().unwrap();
        match Header::decode(&header, max) {
            // Every byte is a field or checked reserved bits, so accepted bytes re-encode
            // identically: nothing is silently ignored.
            Ok(decoded) => prop_assert_eq!(decoded.to_bytes(), header),
            Err(err) => prop_assert_eq!(err.msg_id, u64::from_le_bytes(header[40..48].try_into().unwrap())),
        }
    }

    #[test]
    fn nearly_valid_headers_decode_without_panic_and_canonically(
        header in any_header(PAYLOAD_BYTES_MAX_DEFAULT),
        flips in proptest::collection::vec((0..HEADER_LEN, any::<u8>()), 0..3),
    ) {
        // Random bytes almost never pass the magic check; this explores the other rules.
        let mut bytes = header.to_bytes();
        for (at, value) in flips {
            bytes[at] = value;
        }
        if let Ok(decoded) = Header::decode(&bytes, PAYLOAD_BYTES_MAX_DEFAULT) {
            prop_assert_eq!(decoded.to_bytes(), bytes);
        }
    }

    #[test]
    fn arbitrary_streams_in_arbitrary_chunks_never_panic(
        prefix in proptest::collection::vec(any_frame(), 0..4),
        noise in proptest::collection::vec(any::<u8>(), 0..600),
        chunks in proptest::collection::vec(0..200usize, 1..20),
        max in 0..1024u32,
    ) {
        let mut wire = encode_all(&prefix).to_vec();
        wire.extend_from_slice(&noise);
        let mut decoder = FrameDecoder::new(max);
        let mut rest = &wire[..];
        let mut sizes = chunks.iter().copied().cycle();
        while !rest.is_empty() {
            let size = sizes.next().unwrap_or(1).clamp(1, rest.len());
            let taken = decoder.feed(&rest[..size]);
            rest = &rest[taken..];
            prop_assert!(decoder.buffered_len() <= decoder.buffered_bytes_max());
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => prop_assert!(frame.payload.len() <= max as usize),
                    Ok(None) => break,
                    Err(err) => {
                        prop_assert_eq!(decoder.next_frame(), Err(err));
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn valid_streams_in_arbitrary_chunks_decode_to_the_same_frames(
        frames in proptest::collection::vec(any_frame(), 0..12),
        chunks in proptest::collection::vec(0..400usize, 1..20),
    ) {
        let wire = encode_all(&frames);
        let got = decode_chunked(&wire, &chunks, PAYLOAD_BYTES_MAX_DEFAULT);
        prop_assert_eq!(got, Ok(frames));
    }
}

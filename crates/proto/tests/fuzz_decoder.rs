//! The fuzz target `fuzz/fuzz_targets/decoder.rs`, as a property test, so that `cargo test`
//! (and CI, which has no nightly toolchain) exercises the same checks on every run; the seed
//! corpus in `fuzz/corpus/decoder/` is replayed too.

use dsplane_proto::wire::{FrameDecoder, HEADER_LEN};
use proptest::prelude::*;

include!("../../../fuzz/check.rs");

#[test]
fn the_seed_corpus_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/decoder");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        check(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 5);
}

/// A valid frame's bytes, to splice into random data so that the decoder gets past the header
/// check often enough to matter.
fn valid_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        1u8..=11,
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(kind, msg_id, payload)| {
            let mut h =
                dsplane_proto::wire::Header::new(dsplane_proto::wire::Kind::from_u8(kind).unwrap());
            h.msg_id = msg_id;
            let f = dsplane_proto::wire::Frame::new(h, bytes::Bytes::from(payload)).unwrap();
            let mut b = f.header_bytes().to_vec();
            b.extend_from_slice(&f.payload);
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2_000)) {
        check(&data);
    }

    #[test]
    fn valid_frames_with_damage(
        chunk in 1u8..=255,
        frames in proptest::collection::vec(valid_frame(), 1..8),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let mut data = vec![chunk];
        for f in frames {
            data.extend(f);
        }
        for (at, x) in flips {
            let i = 1 + at % (data.len() - 1);
            data[i] ^= x;
        }
        check(&data);
    }
}

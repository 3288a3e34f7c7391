//! The streaming frame decoder against arbitrary bytes in arbitrary chunks.
//!
//! Run: `cargo +nightly fuzz run decoder fuzz/corpus/decoder` (from the repository root, with
//! `cargo install cargo-fuzz`). `tests/fuzz_decoder.rs` runs the same checks under proptest in
//! `cargo test`, so CI exercises them without nightly.
//!
//! Checks: no input panics; the decoder never holds more than its bound; every frame it yields
//! re-encodes to exactly the bytes it was decoded from (so nothing is skipped or invented);
//! after an error every later call returns the same error.

#![no_main]

use dsplane::wire::{FrameDecoder, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = FrameDecoder::new(4096);
    let mut consumed = 0usize;
    let mut fed = 0usize;
    let mut error = None;
    while fed < input.len() && error.is_none() {
        let end = (fed + chunk).min(input.len());
        let took = decoder.feed(&input[fed..end]);
        fed += took;
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let len = HEADER_LEN + frame.payload.len();
                    let mut again = frame.header_bytes().to_vec();
                    again.extend_from_slice(&frame.payload);
                    assert_eq!(&input[consumed..consumed + len], &again[..]);
                    consumed += len;
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        assert!(decoder.buffered_len() <= decoder.buffered_bytes_max());
        if took == 0 && error.is_none() && decoder.buffered_len() == 0 {
            break;
        }
    }
    if let Some(e) = error {
        assert_eq!(decoder.next_frame(), Err(e));
    }
});

//! The streaming frame decoder against arbitrary bytes in arbitrary chunks.
//!
//! Run: `cargo +nightly fuzz run decoder fuzz/corpus/decoder` (from the repository root, with
//! `cargo install cargo-fuzz`). `crates/proto/tests/fuzz_decoder.rs` runs the same checks under proptest in
//! `cargo test`, so CI exercises them without nightly.
//!
//! Checks: no input panics; the decoder never holds more than its bound; every frame it yields
//! re-encodes to exactly the bytes it was decoded from (so nothing is skipped or invented);
//! after an error every later call returns the same error.

#![no_main]

use dsplane_proto::wire::{FrameDecoder, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

include!("../check.rs");

fuzz_target!(|data: &[u8]| check(data));

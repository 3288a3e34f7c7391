// The checks of the decoder fuzz target, shared word for word by `fuzz/fuzz_targets/decoder.rs`
// (cargo-fuzz, nightly) and `crates/proto/tests/fuzz_decoder.rs` (proptest, in `cargo test`) through
// `include!`, so the two can never drift apart. Expects `FrameDecoder` and `HEADER_LEN` of
// `dsplane_proto::wire` in scope.

/// The body of the fuzz target: no panic, the bound holds, frames re-encode to exactly the bytes
/// they came from, and an error repeats.
fn check(data: &[u8]) {
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
}

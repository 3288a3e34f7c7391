//! Header decode and validation (`Header::decode`: the header read as eight words, every rule a
//! compare on word 0 or word 7, ORed into one flag) beside a straightforward field-by-field
//! decoder with an early return per rule (`common::naive`), in the same run, over the same 1,024
//! varied valid headers.
//!
//! Target (issue 7): ≤ 5 ns per header (here) and ≤ 40 instructions (`perf/instructions.sh`).
//!
//! Run: `cargo bench --bench wire`.

#[path = "../../../benches/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{naive, sample_headers, Ratios};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsplane_proto::wire::{Header, HEADER_LEN, PAYLOAD_BYTES_MAX_DEFAULT};

const HEADERS: usize = 1024;
const SAMPLES: usize = 30;

fn decode_all(
    headers: &[[u8; HEADER_LEN]],
    iters: u64,
    decode: impl Fn(&[u8; HEADER_LEN], u32) -> Result<Header, dsplane_proto::wire::DecodeError>,
) -> Duration {
    let t = Instant::now();
    let mut sum = 0u64;
    for _ in 0..iters {
        for bytes in headers {
            // black_box on the input: the compiler may not hoist or fold the decode.
            match decode(black_box(bytes), PAYLOAD_BYTES_MAX_DEFAULT) {
                // The whole header goes through black_box: every field must be produced, as
                // FrameDecoder keeps the whole header, so no decoder can skip unused fields.
                Ok(h) => sum = sum.wrapping_add(black_box(h).counter),
                Err(e) => sum = sum.wrapping_add(e.msg_id),
            }
        }
    }
    black_box(sum);
    t.elapsed()
}

fn header_decode(c: &mut Criterion) {
    let headers = sample_headers(HEADERS, 7);
    // Both decoders must agree before their speed means anything.
    for h in &headers {
        assert_eq!(
            Header::decode(h, PAYLOAD_BYTES_MAX_DEFAULT),
            naive::decode(h, PAYLOAD_BYTES_MAX_DEFAULT)
        );
    }
    let mut ratios = Ratios::new("header_decode", HEADERS as u64, SAMPLES);
    let mut group = c.benchmark_group("header_decode");
    group.throughput(Throughput::Elements(HEADERS as u64));
    group.sample_size(SAMPLES);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("dsplane", |b| {
        b.iter_custom(|iters| {
            ratios.record(
                "dsplane",
                iters,
                decode_all(&headers, iters, Header::decode),
            )
        })
    });
    group.bench_function("naive", |b| {
        b.iter_custom(|iters| {
            ratios.record("naive", iters, decode_all(&headers, iters, naive::decode))
        })
    });
    group.finish();
    ratios.print(&[("dsplane", "naive")]);
}

criterion_group!(benches, header_decode);
criterion_main!(benches);

//! The Service User limiter (`dsplane_core::limiter::TokenBucket`: integer nano-tokens, owned by one
//! core, time passed in) beside `governor` (GCRA on an atomic), direct and keyed, in the same run.
//!
//! * `direct`: one limiter, checked over and over.
//! * `keyed`: 1,000 Service Users checked in a fixed pseudo-random order. Ours is a
//!   `Vec<TokenBucket>` indexed by the SU's index, as each worker holds its SUs' schedulers;
//!   governor's is its keyed limiter (a `DashMap` by default) keyed by the SU's EUI-64, which is
//!   how one would give every SU its own limit with it.
//!
//! Every check succeeds (rates and bursts are set so that none is refused): the common path.
//! Ours is given `now` as the scheduler gives it (one clock read per pump, then many checks);
//! `dsplane_clock` reads `Instant` for every check, the worst case. governor reads its clock
//! (quanta) inside every check; `governor_*_fake_clock` uses its `FakeRelativeClock` instead, so
//! the GCRA alone is measured.
//!
//! Target (issue 7): a check ≤ 10 ns and ≥ 3× governor keyed.
//!
//! Run: `cargo bench --bench limiter`.

#[path = "../../../benches/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use common::{Ratios, Rng};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsplane_core::limiter::{TokenBucket, BURST_MAX, RATE_PER_S_MAX};
use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};

/// Checks per iteration.
const CHECKS: usize = 1024;
const SERVICE_USERS: usize = 1000;
const SAMPLES: usize = 30;

/// A governor quota no benchmark run can exhaust: 10⁹ a second, burst 10⁹.
fn governor_quota() -> Quota {
    let n = NonZeroU32::new(1_000_000_000).unwrap();
    Quota::per_second(n).allow_burst(n)
}

/// Ours at the highest rate it accepts; `now` advances by one token's interval per check.
const STEP_NS: u64 = 1_000_000_000 / RATE_PER_S_MAX as u64;

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group.throughput(Throughput::Elements(CHECKS as u64));
    group.sample_size(SAMPLES);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
}

fn direct(c: &mut Criterion) {
    let mut ratios = Ratios::new("limiter_direct", CHECKS as u64, SAMPLES);
    let mut group = c.benchmark_group("limiter_direct");
    configure(&mut group);

    let mut bucket = TokenBucket::new(RATE_PER_S_MAX, BURST_MAX, 0).unwrap();
    let mut now = 0u64;
    group.bench_function("dsplane", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let mut ok = 0u64;
            for _ in 0..iters {
                for _ in 0..CHECKS {
                    now += STEP_NS;
                    ok += u64::from(bucket.try_acquire(black_box(now)));
                }
            }
            assert_eq!(ok, iters * CHECKS as u64, "a check was refused");
            ratios.record("dsplane", iters, t.elapsed())
        })
    });

    // Time from a real clock on every check: what a caller without a cached `now` pays.
    let origin = Instant::now();
    let mut bucket = TokenBucket::new(RATE_PER_S_MAX, BURST_MAX, 0).unwrap();
    group.bench_function("dsplane_clock", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let mut ok = 0u64;
            for _ in 0..iters * CHECKS as u64 {
                let now = origin.elapsed().as_nanos() as u64;
                ok += u64::from(bucket.try_acquire(now));
            }
            black_box(ok);
            ratios.record("dsplane_clock", iters, t.elapsed())
        })
    });

    let limiter = RateLimiter::direct(governor_quota());
    group.bench_function("governor_direct", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let mut ok = 0u64;
            for _ in 0..iters * CHECKS as u64 {
                ok += u64::from(black_box(&limiter).check().is_ok());
            }
            assert_eq!(ok, iters * CHECKS as u64, "a check was refused");
            ratios.record("governor_direct", iters, t.elapsed())
        })
    });

    let limiter = RateLimiter::direct_with_clock(governor_quota(), FakeRelativeClock::default());
    group.bench_function("governor_direct_fake_clock", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let mut ok = 0u64;
            for _ in 0..iters * CHECKS as u64 {
                ok += u64::from(black_box(&limiter).check().is_ok());
            }
            assert_eq!(ok, iters * CHECKS as u64, "a check was refused");
            ratios.record("governor_direct_fake_clock", iters, t.elapsed())
        })
    });
    group.finish();
    ratios.print(&[
        ("dsplane", "governor_direct"),
        ("dsplane", "governor_direct_fake_clock"),
        ("dsplane_clock", "governor_direct"),
    ]);
}

fn keyed(c: &mut Criterion) {
    let mut ratios = Ratios::new("limiter_keyed", CHECKS as u64, SAMPLES);
    let mut group = c.benchmark_group("limiter_keyed");
    configure(&mut group);

    // The same order of SUs for every contender: indices for ours, EUI-64s for governor.
    let mut rng = Rng(11);
    let order: Vec<usize> = (0..CHECKS)
        .map(|_| rng.below(SERVICE_USERS as u64) as usize)
        .collect();
    let ids: Vec<u64> = order
        .iter()
        .map(|&i| 0x90B3_D51F_3000_0000 | i as u64)
        .collect();

    let mut buckets: Vec<TokenBucket> = (0..SERVICE_USERS)
        .map(|_| TokenBucket::new(RATE_PER_S_MAX, BURST_MAX, 0).unwrap())
        .collect();
    let mut now = 0u64;
    group.bench_function("dsplane", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let mut ok = 0u64;
            for _ in 0..iters {
                for &su in &order {
                    now += STEP_NS;
                    ok += u64::from(buckets[black_box(su)].try_acquire(black_box(now)));
                }
            }
            assert_eq!(ok, iters * CHECKS as u64, "a check was refused");
            ratios.record("dsplane", iters, t.elapsed())
        })
    });

    let limiter = RateLimiter::keyed(governor_quota());
    group.bench_function("governor_keyed", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let mut ok = 0u64;
            for _ in 0..iters {
                for id in &ids {
                    ok += u64::from(limiter.check_key(black_box(id)).is_ok());
                }
            }
            assert_eq!(ok, iters * CHECKS as u64, "a check was refused");
            ratios.record("governor_keyed", iters, t.elapsed())
        })
    });

    let limiter = RateLimiter::dashmap_with_clock(governor_quota(), FakeRelativeClock::default());
    group.bench_function("governor_keyed_fake_clock", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let mut ok = 0u64;
            for _ in 0..iters {
                for id in &ids {
                    ok += u64::from(limiter.check_key(black_box(id)).is_ok());
                }
            }
            assert_eq!(ok, iters * CHECKS as u64, "a check was refused");
            ratios.record("governor_keyed_fake_clock", iters, t.elapsed())
        })
    });
    group.finish();
    ratios.print(&[
        ("dsplane", "governor_keyed"),
        ("dsplane", "governor_keyed_fake_clock"),
    ]);
}

criterion_group!(benches, direct, keyed);
criterion_main!(benches);

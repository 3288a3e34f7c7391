//! The MPSC priority ring (`dsplane_core::ring`) beside the obvious alternatives, in the same run:
//! `crossbeam_queue::ArrayQueue`, `std::sync::mpsc::sync_channel` and a `Mutex<BinaryHeap>`
//! (the textbook priority queue), with 1 and 2 producers, popping one at a time or in bulk; and
//! the 4-level ring against a plain 1-level ring; and producers handing over batches of 64, the
//! ring's `push_bulk` against ArrayQueue pushing them one at a time.
//!
//! Every contender gets the same capacity (1,024 slots; per level for the ring), the same 8-byte
//! items, and the same waiting policy: a full push or an empty pop backs off with crossbeam's
//! `Backoff::snooze` (spin, then yield). The consumer is pinned to core 0 and the producers to
//! core 1 (this machine has 2 cores; with 2 producers they share theirs). `DSPLANE_BENCH_PIN=0`
//! leaves the threads unpinned: the producers then truly race each other and the consumer, but
//! 3 busy threads on 2 cores make every contender's times bimodal.
//! One iteration moves 10,000 items from the producers to the consumer (the bench thread).
//!
//! Targets (issue 7): 2 producers, bulk, ≥ 1.5× ArrayQueue; 4 levels ≥ 0.85× 1 level. For
//! `push_bulk`: 2 producers ≥ 1.0× ArrayQueue.
//!
//! Run: `cargo bench --bench ring`; the `RATIO` lines at the end of each group are the result.

#[path = "../../../benches/common/mod.rs"]
mod common;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TryRecvError, TrySendError};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use common::Ratios;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::Backoff;
use dsplane_core::ring;

/// Items moved per iteration.
const ITEMS: u64 = 10_000;
/// Slots per queue (per level for the ring), as in a small engine ring.
const CAPACITY: usize = 1024;
/// Most items taken by one bulk pop.
const BULK_MAX: usize = 256;
/// Items per producer batch in the `push_bulk` group.
const PUSH_BATCH: usize = 64;
const SAMPLES: usize = 20;

/// The producing side of a queue under test; the consuming side is a closure in [`run`].
trait Push: Sync {
    /// Pushes `item` at `level` (ignored by queues without levels); `false` when full.
    fn push(&self, level: usize, item: u64) -> bool;

    /// Pushes every item of `batch` at `level`, in order, backing off while the queue is full,
    /// and leaves `batch` empty. A queue without a bulk push pushes one item at a time.
    fn push_batch(&self, level: usize, batch: &mut Vec<u64>, backoff: &Backoff) {
        for &item in batch.iter() {
            while !self.push(level, item) {
                backoff.snooze();
            }
            backoff.reset();
        }
        batch.clear();
    }
}

impl Push for ring::Producer<u64> {
    fn push(&self, level: usize, item: u64) -> bool {
        // `Wake` only matters to a consumer that parks; this one never does.
        ring::Producer::push(self, level, item).is_ok()
    }
}

/// The ring with its own bulk push: one CAS and one doorbell write per run that fits.
struct BulkRing(ring::Producer<u64>);

impl Push for BulkRing {
    fn push(&self, level: usize, item: u64) -> bool {
        Push::push(&self.0, level, item)
    }

    fn push_batch(&self, level: usize, batch: &mut Vec<u64>, backoff: &Backoff) {
        while !batch.is_empty() {
            match self.0.push_bulk(level, batch) {
                // `wake` is ignored as in `push`: this consumer never parks.
                Ok(pushed) if pushed.pushed > 0 => backoff.reset(),
                Ok(_) => backoff.snooze(),
                Err(err) => panic!("{err}"),
            }
        }
    }
}

impl Push for ArrayQueue<u64> {
    fn push(&self, _level: usize, item: u64) -> bool {
        ArrayQueue::push(self, item).is_ok()
    }
}

impl Push for SyncSender<u64> {
    fn push(&self, _level: usize, item: u64) -> bool {
        match self.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            Err(TrySendError::Disconnected(_)) => panic!("receiver gone"),
        }
    }
}

/// The textbook priority queue: a binary heap under a lock, ordered by (level, arrival).
struct Heap {
    heap: Mutex<BinaryHeap<Reverse<(usize, u64, u64)>>>,
    seq: AtomicU64,
}

impl Push for Heap {
    fn push(&self, level: usize, item: u64) -> bool {
        let mut heap = self.heap.lock().unwrap();
        if heap.len() >= CAPACITY {
            return false;
        }
        // The arrival number keeps FIFO order within a level, as the ring does.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        heap.push(Reverse((level, seq, item)));
        true
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Pop {
    Single,
    Bulk,
}

/// Pins the calling thread to core `index` if there is one: the consumer to core 0, every
/// producer to core 1. As in the engine (pinned workers), the consumer never waits for a core
/// behind a producer; without pinning, 3 busy threads on this machine's 2 cores made every
/// contender's times bimodal.
/// `DSPLANE_BENCH_PIN=0` leaves the threads to the scheduler.
fn pin(index: usize) {
    if std::env::var_os("DSPLANE_BENCH_PIN").is_some_and(|v| v == "0") {
        return;
    }
    if let Some(core) = core_affinity::get_core_ids().and_then(|ids| ids.get(index).copied()) {
        core_affinity::set_for_current(core);
    }
}

/// Moves `total` items from `producers` threads through `q` to this thread; returns the time
/// from the start signal to the last item taken. Producer `p` pushes its `i`th item at level
/// `i % levels`, one at a time; or, with `batch`, in batches of that many (the last may be
/// shorter), batch `j` at level `j % levels`, through [`Push::push_batch`].
fn transfer<Q: Push>(
    q: &Q,
    producers: usize,
    levels: usize,
    batch: Option<usize>,
    total: u64,
    mut pop: impl FnMut(&mut Vec<u64>) -> usize,
) -> Duration {
    let start = Barrier::new(producers + 1);
    std::thread::scope(|s| {
        for p in 0..producers as u64 {
            let start = &start;
            s.spawn(move || {
                pin(1);
                let share = total / producers as u64 + u64::from(p < total % producers as u64);
                let mut items = Vec::with_capacity(batch.unwrap_or(0));
                start.wait();
                let backoff = Backoff::new();
                if let Some(batch) = batch {
                    for (j, first) in (0..share).step_by(batch).enumerate() {
                        // Filling the batch is part of both contenders' time alike.
                        items.extend((first..share.min(first + batch as u64)).map(|i| p << 48 | i));
                        q.push_batch(j % levels, &mut items, &backoff);
                    }
                    return;
                }
                for i in 0..share {
                    while !q.push(i as usize % levels, p << 48 | i) {
                        backoff.snooze();
                    }
                    backoff.reset();
                }
            });
        }
        let mut out = Vec::with_capacity(BULK_MAX);
        let mut sum = 0u64;
        pin(0);
        start.wait();
        let t = Instant::now();
        let mut taken = 0;
        let backoff = Backoff::new();
        while taken < total {
            out.clear();
            let n = pop(&mut out);
            if n == 0 {
                backoff.snooze();
            } else {
                backoff.reset();
                taken += n as u64;
                sum = sum.wrapping_add(out.iter().sum::<u64>());
            }
        }
        let elapsed = t.elapsed();
        std::hint::black_box(sum);
        elapsed
    })
}

fn run(
    name: &str,
    producers: usize,
    levels: usize,
    batch: Option<usize>,
    pop: Pop,
    iters: u64,
) -> Duration {
    let total = iters * ITEMS;
    match name {
        "dsplane_ring" | "ring_1_level" | "ring_4_levels" | "ring_push_bulk" => {
            let (tx, mut rx) = ring::channel::<u64>(levels, CAPACITY).unwrap();
            let mut popped: Vec<(usize, u64)> = Vec::with_capacity(BULK_MAX);
            let pop = |out: &mut Vec<u64>| match pop {
                Pop::Single => rx.pop().map(|(_, v)| out.push(v)).is_some() as usize,
                Pop::Bulk => {
                    popped.clear();
                    let n = rx.pop_bulk(&mut popped, BULK_MAX);
                    out.extend(popped.iter().map(|&(_, v)| v));
                    n
                }
            };
            if name == "ring_push_bulk" {
                transfer(&BulkRing(tx), producers, levels, batch, total, pop)
            } else {
                transfer(&tx, producers, levels, batch, total, pop)
            }
        }
        "arrayqueue" => {
            let q = ArrayQueue::new(CAPACITY);
            transfer(&q, producers, levels, batch, total, |out| match pop {
                Pop::Single => q.pop().map(|v| out.push(v)).is_some() as usize,
                Pop::Bulk => {
                    // ArrayQueue has no bulk pop: the bulk consumer loops.
                    let before = out.len();
                    out.extend(std::iter::from_fn(|| q.pop()).take(BULK_MAX));
                    out.len() - before
                }
            })
        }
        "sync_channel" => {
            let (tx, rx) = sync_channel(CAPACITY);
            transfer(&tx, producers, levels, batch, total, |out| match pop {
                Pop::Single => match rx.try_recv() {
                    Ok(v) => {
                        out.push(v);
                        1
                    }
                    Err(TryRecvError::Empty) => 0,
                    Err(TryRecvError::Disconnected) => panic!("senders gone"),
                },
                Pop::Bulk => {
                    let before = out.len();
                    out.extend(rx.try_iter().take(BULK_MAX));
                    out.len() - before
                }
            })
        }
        "mutex_binaryheap" => {
            let q = Heap {
                heap: Mutex::new(BinaryHeap::with_capacity(CAPACITY)),
                seq: AtomicU64::new(0),
            };
            transfer(&q, producers, levels, batch, total, |out| match pop {
                Pop::Single => {
                    let item = q.heap.lock().unwrap().pop();
                    item.map(|Reverse((_, _, v))| out.push(v)).is_some() as usize
                }
                Pop::Bulk => {
                    // One lock for the whole batch: the heap's own bulk pop.
                    let mut heap = q.heap.lock().unwrap();
                    let n = BULK_MAX.min(heap.len());
                    out.extend((0..n).filter_map(|_| heap.pop().map(|Reverse((_, _, v))| v)));
                    n
                }
            })
        }
        other => unreachable!("no contender {other}"),
    }
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group.throughput(Throughput::Elements(ITEMS));
    group.sample_size(SAMPLES);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
}

/// Our ring (1 level, a plain MPSC queue here) against the three alternatives.
fn mpsc(c: &mut Criterion) {
    const OTHERS: [&str; 3] = ["arrayqueue", "sync_channel", "mutex_binaryheap"];
    for producers in [1, 2] {
        for pop in [Pop::Single, Pop::Bulk] {
            let label = format!(
                "mpsc/{producers}p-{}",
                if pop == Pop::Bulk { "bulk" } else { "single" }
            );
            let mut ratios = Ratios::new(&label, ITEMS, SAMPLES);
            let mut group = c.benchmark_group(&label);
            configure(&mut group);
            for name in ["dsplane_ring"].into_iter().chain(OTHERS) {
                group.bench_function(name, |b| {
                    b.iter_custom(|iters| {
                        let d = run(name, producers, 1, None, pop, iters);
                        ratios.record(name, iters, d)
                    })
                });
            }
            group.finish();
            let pairs: Vec<(&str, &str)> = OTHERS.iter().map(|o| ("dsplane_ring", *o)).collect();
            ratios.print(&pairs);
        }
    }
}

/// The 4-level ring (items spread over the levels, as priority traffic is) against a 1-level
/// ring with the same capacity per level (the engine sizes every level alike).
fn levels(c: &mut Criterion) {
    for producers in [1, 2] {
        let label = format!("levels/{producers}p-bulk");
        let mut ratios = Ratios::new(&label, ITEMS, SAMPLES);
        let mut group = c.benchmark_group(&label);
        configure(&mut group);
        for (name, levels) in [("ring_4_levels", 4), ("ring_1_level", 1)] {
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let d = run(name, producers, levels, None, Pop::Bulk, iters);
                    ratios.record(name, iters, d)
                })
            });
        }
        group.finish();
        ratios.print(&[("ring_4_levels", "ring_1_level")]);
    }
}

/// Batches of [`PUSH_BATCH`] items on the producer side, as the engine's intake hands them over:
/// the ring's `push_bulk` (one CAS and one doorbell write per run that fits) against ArrayQueue,
/// which has no bulk push, so its producers push the same batches one item at a time (the honest
/// alternative), and against the ring pushing them one at a time too. The consumer `pop_bulk`s
/// (ArrayQueue's loops `pop`).
fn push_bulk(c: &mut Criterion) {
    for producers in [1, 2] {
        let label = format!("push_bulk/{producers}p");
        let mut ratios = Ratios::new(&label, ITEMS, SAMPLES);
        let mut group = c.benchmark_group(&label);
        configure(&mut group);
        for (name, runner) in [
            ("ring_push_bulk", "ring_push_bulk"),
            ("arrayqueue", "arrayqueue"),
            ("ring_push", "dsplane_ring"),
        ] {
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let d = run(runner, producers, 1, Some(PUSH_BATCH), Pop::Bulk, iters);
                    ratios.record(name, iters, d)
                })
            });
        }
        group.finish();
        ratios.print(&[
            ("ring_push_bulk", "arrayqueue"),
            ("ring_push_bulk", "ring_push"),
            ("ring_push", "arrayqueue"),
        ]);
    }
}

criterion_group!(benches, mpsc, levels, push_bulk);
criterion_main!(benches);

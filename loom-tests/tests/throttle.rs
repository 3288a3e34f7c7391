//! loom models of `dsplane_core::throttle::GlobalIntake`, the one piece of SECMP0067 throttling that
//! workers share, through its public API only.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p loom-tests --release --test throttle`.
//! Without `--cfg loom` this file compiles to nothing (the throttle's single-threaded behaviour
//! is tested in `crates/core/src/throttle.rs`).

#![cfg(loom)]

use dsplane_core::throttle::GlobalIntake;
use loom::sync::Arc;
use loom::thread;

/// 100 ms, the length of one intake slot.
const SLOT: u64 = 100_000_000;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// Two workers race for the last unit of capacity (capacity 10/s has a burst of 1): exactly one
/// gets it, whatever the interleaving of their CAS loops.
#[test]
fn capacity_is_never_handed_out_twice() {
    model(|| {
        let intake = Arc::new(GlobalIntake::new(10, 1.0, 0).unwrap());
        assert_eq!(intake.burst(), 1);
        let other = intake.clone();
        let t = thread::spawn(move || u32::from(other.try_take_capacity(0)));
        let mine = u32::from(intake.try_take_capacity(0));
        assert_eq!(mine + t.join().unwrap(), 1);
    });
}

/// Two workers take two units each from a burst of 2 (capacity 200/s): exactly two in all.
#[test]
fn burst_is_shared_exactly() {
    model(|| {
        let intake = Arc::new(GlobalIntake::new(200, 1.0, 0).unwrap());
        assert_eq!(intake.burst(), 2);
        let other = intake.clone();
        let t = thread::spawn(move || {
            u32::from(other.try_take_capacity(0)) + u32::from(other.try_take_capacity(0))
        });
        let mine = u32::from(intake.try_take_capacity(0)) + u32::from(intake.try_take_capacity(0));
        assert_eq!(mine + t.join().unwrap(), 2);
    });
}

/// Arrivals counted by two workers in the same slot are never lost.
#[test]
fn arrivals_in_one_slot_all_count() {
    model(|| {
        let intake = Arc::new(GlobalIntake::new(1_000, 0.5, 0).unwrap());
        let other = intake.clone();
        let t = thread::spawn(move || {
            other.record_arrival(1);
            other.record_arrival(2);
        });
        intake.record_arrival(3);
        t.join().unwrap();
        assert_eq!(intake.offered_last_second(SLOT - 1), 3);
    });
}

/// A worker whose clock is a full cycle of slots ahead reuses the cell a slower worker is
/// writing: the slower arrival is either wiped by the newer slot (written first) or counted in
/// it (written after), never lost from a slot still in the window, and the newer slot always
/// keeps its own arrival.
#[test]
fn a_slot_reused_across_workers_keeps_the_newer_count() {
    model(|| {
        let intake = Arc::new(GlobalIntake::new(1_000, 0.5, 0).unwrap());
        let other = intake.clone();
        // Eleven slots apart: the same cell.
        let late = 11 * SLOT + 1;
        let t = thread::spawn(move || other.record_arrival(late));
        intake.record_arrival(1);
        t.join().unwrap();
        let offered = intake.offered_last_second(late);
        assert!((1..=2).contains(&offered), "{offered}");
    });
}

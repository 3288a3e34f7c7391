//! loom models of `dsplane_core::ring`, through its public API only.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release` (see the README). Each
//! model prints its iteration count and time to stderr (`-- --nocapture` to see them).
//! Capacities are the smallest that show the behaviour, and the preemption bound is 3 (2 for the
//! three-thread model, where 3 costs 1.1 M iterations, and for the two-producer `push_bulk`
//! models), `LOOM_MAX_PREEMPTIONS` overriding it, so the suite takes under a minute on two cores.

#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use dsplane_core::ring::{channel, Consumer, Producer, PushError, Wake};
use loom::thread;

/// Explores `f` under loom with the given preemption bound and reports how much it explored.
fn model(name: &str, preemption_bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(preemption_bound);
    }
    // A std counter, deliberately outside the model: it only counts executions.
    let iterations = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = iterations.clone();
    let start = Instant::now();
    builder.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!(
        "ring::{name}: {} iterations in {:.2?} (preemption bound {:?})",
        iterations.load(Ordering::Relaxed),
        start.elapsed(),
        builder.preemption_bound,
    );
}

/// Pushes where the model guarantees room.
fn push_ok<T: Send>(producer: &Producer<T>, level: usize, item: T) -> Wake {
    match producer.push(level, item) {
        Ok(wake) => wake,
        Err(err) => panic!("push refused: {err:?}"),
    }
}

/// Pops, yielding to the other threads while the ring is empty.
fn pop_spin<T>(consumer: &mut Consumer<T>) -> (usize, T) {
    loop {
        if let Some(popped) = consumer.pop() {
            return popped;
        }
        thread::yield_now();
    }
}

/// 1. Two producers push two items each to one level while the consumer pops: nothing is lost
///    or duplicated, and each producer's items come out in the order it pushed them.
#[test]
fn two_producers_one_level_nothing_lost_fifo_per_producer() {
    model("two_producers_one_level", 2, || {
        let (producer, mut consumer) = channel::<(usize, u32)>(1, 4).unwrap();
        let producers: Vec<_> = (0..2)
            .map(|id| {
                let producer = producer.clone();
                thread::spawn(move || {
                    for seq in 0..2 {
                        let _ = push_ok(&producer, 0, (id, seq));
                    }
                })
            })
            .collect();
        drop(producer);
        // Pops race every stage of the pushes; whatever they miss, a drain after the join must
        // find. (Spinning until all four arrive took 1.2 M iterations and 90 s; this, 80 k.)
        let mut popped: Vec<_> = (0..3).filter_map(|_| consumer.pop()).collect();
        for handle in producers {
            handle.join().unwrap();
        }
        popped.extend(std::iter::from_fn(|| consumer.pop()));
        let mut next = [0u32; 2];
        for (level, (id, seq)) in popped {
            assert_eq!(level, 0);
            assert_eq!(seq, next[id], "producer {id} out of order");
            next[id] += 1;
        }
        assert_eq!(next, [2, 2], "lost or duplicated");
        assert_eq!(consumer.pop(), None);
        assert!(consumer.is_empty());
    });
}

/// 2a. Pushes to two levels from two threads, popped after both finish: strict priority, FIFO
///     within a level.
#[test]
fn priority_after_join_is_strict() {
    model("priority_after_join", 3, || {
        let (producer, mut consumer) = channel::<u32>(2, 2).unwrap();
        let routine = {
            let producer = producer.clone();
            thread::spawn(move || {
                let _ = push_ok(&producer, 1, 10);
                let _ = push_ok(&producer, 1, 11);
            })
        };
        let urgent = thread::spawn(move || {
            let _ = push_ok(&producer, 0, 0);
            let _ = push_ok(&producer, 0, 1);
        });
        routine.join().unwrap();
        urgent.join().unwrap();
        let popped: Vec<_> = std::iter::from_fn(|| consumer.pop()).collect();
        assert_eq!(popped, [(0, 0), (0, 1), (1, 10), (1, 11)]);
    });
}

/// 2b. One producer pushes `a` at level 1, `b` at level 0, `c` at level 1 while the consumer
///     pops. `a` and `b` may come out in either order (the consumer may take `a` before `b`
///     exists), but `c` was pushed after both, so once it is seen they must already have been
///     popped: a more urgent item pushed earlier is never overtaken, and FIFO holds.
#[test]
fn priority_concurrent_never_overtakes_an_earlier_urgent_item() {
    model("priority_concurrent", 3, || {
        let (producer, mut consumer) = channel::<char>(2, 2).unwrap();
        let pusher = thread::spawn(move || {
            let _ = push_ok(&producer, 1, 'a');
            let _ = push_ok(&producer, 0, 'b');
            let _ = push_ok(&producer, 1, 'c');
        });
        let popped: Vec<_> = (0..3).map(|_| pop_spin(&mut consumer)).collect();
        pusher.join().unwrap();
        assert_eq!(popped[2], (1, 'c'), "popped {popped:?}");
        assert!(
            popped[..2] == [(1, 'a'), (0, 'b')] || popped[..2] == [(0, 'b'), (1, 'a')],
            "popped {popped:?}"
        );
        assert_eq!(consumer.pop(), None);
    });
}

/// 3. A full lane hands the item back; a concurrent pop frees a slot and the retried push lands
///    behind the others. At capacities 2 and 4.
#[test]
fn full_hands_back_and_concurrent_pop_frees_a_slot() {
    for capacity in [2usize, 4] {
        model(
            &format!("full_then_pop_capacity_{capacity}"),
            3,
            move || {
                let (producer, mut consumer) = channel::<usize>(1, capacity).unwrap();
                assert_eq!(consumer.pop(), None);
                for i in 0..capacity {
                    let _ = push_ok(&producer, 0, i);
                }
                match producer.push(0, capacity) {
                    Err(PushError::Full(back)) => assert_eq!(back, capacity),
                    other => panic!("expected Full, got {other:?}"),
                }
                let pusher = thread::spawn(move || {
                    let mut item = capacity;
                    loop {
                        match producer.push(0, item) {
                            Ok(_) => return,
                            Err(PushError::Full(back)) => {
                                assert_eq!(back, capacity, "Full handed back another item");
                                item = back;
                                thread::yield_now();
                            }
                            Err(err) => panic!("unexpected {err:?}"),
                        }
                    }
                });
                for expected in 0..=capacity {
                    assert_eq!(pop_spin(&mut consumer), (0, expected));
                }
                pusher.join().unwrap();
                assert_eq!(consumer.pop(), None);
                assert!(consumer.is_empty());
            },
        );
    }
}

/// 4a. The consumer drains a level (its second pop finds the lane empty, clears the bit, looks
///     again) while a producer pushes to it. After the join, a plain pop must find the item: it is
///     never stranded in a lane whose bit was cleared.
#[test]
fn drain_racing_a_push_never_strands_it() {
    model("drain_races_push", 3, || {
        let (producer, mut consumer) = channel::<u32>(1, 2).unwrap();
        let _ = push_ok(&producer, 0, 1);
        let pusher = thread::spawn(move || {
            let _ = push_ok(&producer, 0, 2);
        });
        let mut popped: Vec<_> = (0..2).filter_map(|_| consumer.pop()).collect();
        pusher.join().unwrap();
        popped.extend(std::iter::from_fn(|| consumer.pop()));
        assert_eq!(popped, [(0, 1), (0, 2)]);
        // And the bit left behind, if any, does not stop the consumer from parking.
        assert_eq!(consumer.pop(), None);
        assert!(consumer.prepare_park());
    });
}

/// 4b. The same race across two levels: a level-1 item is drained while a producer pushes at
///     level 0 and then level 1.
#[test]
fn drain_racing_pushes_on_two_levels_never_strands_them() {
    model("drain_races_push_two_levels", 3, || {
        let (producer, mut consumer) = channel::<u32>(2, 2).unwrap();
        let _ = push_ok(&producer, 1, 10);
        let pusher = thread::spawn(move || {
            let _ = push_ok(&producer, 0, 0);
            let _ = push_ok(&producer, 1, 11);
        });
        let mut popped: Vec<_> = (0..2).filter_map(|_| consumer.pop()).collect();
        pusher.join().unwrap();
        popped.extend(std::iter::from_fn(|| consumer.pop()));
        assert_eq!(popped.len(), 3, "popped {popped:?}");
        let at = |item| popped.iter().position(|&(_, x)| x == item).unwrap();
        assert!(at(10) < at(11) && at(0) < at(11), "popped {popped:?}");
    });
}

/// 5a. No lost wake-up: the consumer pops, and when the ring looks empty announces it is parking
///     and parks (loom's `thread::park`) unless told not to; the producer wakes it when its push
///     says `NeedsWake`. A lost wake-up leaves the consumer parked forever, which loom reports as
///     a deadlock. And if the consumer did sleep, it was this push that was told to wake it.
#[test]
fn park_never_loses_a_wake_up() {
    model("park_one_producer", 3, || {
        let (producer, mut consumer) = channel::<u32>(1, 2).unwrap();
        let sleeper = thread::spawn(move || {
            let mut parks = 0;
            loop {
                if let Some(popped) = consumer.pop() {
                    return (popped, parks);
                }
                if consumer.prepare_park() {
                    parks += 1;
                    thread::park();
                    consumer.cancel_park();
                }
            }
        });
        let wakee = sleeper.thread().clone();
        let pusher = thread::spawn(move || {
            let wake = push_ok(&producer, 0, 7);
            if wake.is_needed() {
                wakee.unpark();
            }
            wake
        });
        let wake = pusher.join().unwrap();
        let (popped, parks) = sleeper.join().unwrap();
        assert_eq!(popped, (0, 7));
        if parks > 0 {
            assert_eq!(
                wake,
                Wake::NeedsWake,
                "the consumer slept but nobody was told"
            );
        }
    });
}

/// 5b. The same with two producers on two levels: whichever pushes, a parked consumer is woken
///     and gets both items.
#[test]
fn park_never_loses_a_wake_up_two_producers() {
    model("park_two_producers", 3, || {
        let (producer, mut consumer) = channel::<u32>(2, 2).unwrap();
        let sleeper = thread::spawn(move || {
            let mut popped = Vec::new();
            while popped.len() < 2 {
                if let Some(item) = consumer.pop() {
                    popped.push(item);
                    continue;
                }
                if consumer.prepare_park() {
                    thread::park();
                    consumer.cancel_park();
                }
            }
            popped
        });
        let wakee = sleeper.thread().clone();
        let pushers: Vec<_> = [(0usize, 0u32), (1, 10)]
            .into_iter()
            .map(|(level, item)| {
                let producer = producer.clone();
                let wakee = wakee.clone();
                thread::spawn(move || {
                    if push_ok(&producer, level, item).is_needed() {
                        wakee.unpark();
                    }
                })
            })
            .collect();
        drop(producer);
        for handle in pushers {
            handle.join().unwrap();
        }
        let mut popped = sleeper.join().unwrap();
        popped.sort_unstable();
        assert_eq!(popped, [(0, 0), (1, 10)]);
    });
}

/// Bulk-pushes the whole of `items`, retrying (and yielding) while the lane is full, and wakes
/// `wakee` whenever a push says so. Returns how many pushes were told to wake it.
fn push_bulk_all<T: Send>(
    producer: &Producer<T>,
    level: usize,
    mut items: Vec<T>,
    wakee: &thread::Thread,
) -> usize {
    let mut wakes = 0;
    while !items.is_empty() {
        let pushed = match producer.push_bulk(level, &mut items) {
            Ok(pushed) => pushed,
            Err(err) => panic!("push_bulk refused: {err:?}"),
        };
        if pushed.wake.is_needed() {
            wakes += 1;
            wakee.unpark();
        }
        if pushed.pushed == 0 {
            thread::yield_now();
        }
    }
    wakes
}

/// Pops (`pop_bulk` if `bulk`) until `count` items have come out, parking whenever the ring
/// looks empty and `prepare_park` allows. A lost wake-up leaves this thread parked for good,
/// which loom reports as a deadlock.
fn pop_or_park<T>(consumer: &mut Consumer<T>, count: usize, bulk: bool) -> Vec<(usize, T)> {
    let mut popped = Vec::new();
    while popped.len() < count {
        let before = popped.len();
        if bulk {
            consumer.pop_bulk(&mut popped, count - before);
        } else {
            popped.extend(consumer.pop());
        }
        if popped.len() > before {
            continue;
        }
        if consumer.prepare_park() {
            thread::park();
            consumer.cancel_park();
        }
    }
    popped
}

/// Checks that `popped` holds each producer's items `0..counts[id]` exactly once, in order.
fn assert_each_producer_in_order(popped: &[(usize, (usize, u32))], counts: &[u32]) {
    let mut next = vec![0u32; counts.len()];
    for &(_, (id, seq)) in popped {
        assert_eq!(seq, next[id], "producer {id} out of order: {popped:?}");
        next[id] += 1;
    }
    assert_eq!(next, counts, "lost or duplicated: {popped:?}");
}

/// 6a. `push_bulk` of three items racing a single `push` into one lane (room for all four),
///     against a consumer that pops one at a time and parks whenever the ring looks empty:
///     nothing is lost or duplicated, each producer's items come out in its order, and the
///     consumer is never left asleep with items in the ring.
#[test]
fn push_bulk_beside_push_with_parking() {
    model("push_bulk_beside_push_with_parking", 2, || {
        let (producer, mut consumer) = channel::<(usize, u32)>(1, 4).unwrap();
        let wakee = thread::current();
        let bulk = {
            let producer = producer.clone();
            let wakee = wakee.clone();
            thread::spawn(move || {
                push_bulk_all(&producer, 0, vec![(0, 0), (0, 1), (0, 2)], &wakee);
            })
        };
        let single = thread::spawn(move || {
            if push_ok(&producer, 0, (1, 0)).is_needed() {
                wakee.unpark();
            }
        });
        let popped = pop_or_park(&mut consumer, 4, false);
        bulk.join().unwrap();
        single.join().unwrap();
        assert_each_producer_in_order(&popped, &[3, 1]);
        assert_eq!(consumer.pop(), None);
    });
}

/// 6b. Two `push_bulk`s of two items each into a lane of two slots, against a consumer that
///     `pop_bulk`s and parks: each batch may fit only in part (a run cut short by a slot the
///     consumer has not emptied, or by the other producer's claim) and is retried. Nothing is
///     lost, overwritten or duplicated, each producer's items come out in order, and no
///     wake-up is lost.
#[test]
fn two_push_bulks_into_a_small_lane_with_parking() {
    model("two_push_bulks_small_lane_with_parking", 2, || {
        let (producer, mut consumer) = channel::<(usize, u32)>(1, 2).unwrap();
        let wakee = thread::current();
        let pushers: Vec<_> = (0..2)
            .map(|id| {
                let producer = producer.clone();
                let wakee = wakee.clone();
                thread::spawn(move || {
                    push_bulk_all(&producer, 0, vec![(id, 0), (id, 1)], &wakee);
                })
            })
            .collect();
        drop(producer);
        let popped = pop_or_park(&mut consumer, 4, true);
        for handle in pushers {
            handle.join().unwrap();
        }
        assert_each_producer_in_order(&popped, &[2, 2]);
        assert_eq!(consumer.pop(), None);
    });
}

/// 6c. With one producer, a consumer that slept was woken by a push that was told to: a
///     `push_bulk` says `NeedsWake` exactly when `push` would.
#[test]
fn push_bulk_tells_the_waker() {
    model("push_bulk_tells_the_waker", 3, || {
        let (producer, mut consumer) = channel::<u32>(1, 2).unwrap();
        let sleeper = thread::spawn(move || {
            let mut parks = 0;
            let mut popped = Vec::new();
            while popped.len() < 2 {
                if consumer.pop_bulk(&mut popped, 2) > 0 {
                    continue;
                }
                if consumer.prepare_park() {
                    parks += 1;
                    thread::park();
                    consumer.cancel_park();
                }
            }
            (popped, parks)
        });
        let wakee = sleeper.thread().clone();
        let wakes = push_bulk_all(&producer, 0, vec![7, 8], &wakee);
        let (popped, parks) = sleeper.join().unwrap();
        assert_eq!(popped, [(0, 7), (0, 8)]);
        if parks > 0 {
            assert!(wakes > 0, "the consumer slept but nobody was told");
        }
        assert!(wakes <= 1, "{wakes} wake-ups for one batch");
    });
}

/// 7. Strict priority with runs on both sides: one producer bulk-pushes `a0 a1` at level 1, then
///    pushes `b` at level 0, then `c` at level 1, while the consumer `pop_bulk`s. `c` was pushed
///    after `b`, so a run of level 1 taken in one go must never carry `c` past `b`; and each
///    level stays FIFO.
#[test]
fn pop_bulk_run_never_overtakes_an_earlier_urgent_item() {
    model("pop_bulk_run_priority", 3, || {
        let (producer, mut consumer) = channel::<char>(2, 4).unwrap();
        let pusher = thread::spawn(move || {
            let mut batch = vec!['a', 'A'];
            let pushed = producer.push_bulk(1, &mut batch).unwrap();
            assert_eq!(pushed.pushed, 2);
            let _ = push_ok(&producer, 0, 'b');
            let _ = push_ok(&producer, 1, 'c');
        });
        let mut popped = Vec::new();
        while popped.len() < 4 {
            if consumer.pop_bulk(&mut popped, 4) == 0 {
                thread::yield_now();
            }
        }
        pusher.join().unwrap();
        let at = |item| popped.iter().position(|&(_, x)| x == item).unwrap();
        assert!(at('a') < at('A') && at('A') < at('c'), "popped {popped:?}");
        assert!(at('b') < at('c'), "c overtook b: popped {popped:?}");
        assert_eq!(consumer.pop(), None);
    });
}

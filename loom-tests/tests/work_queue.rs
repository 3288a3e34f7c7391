//! loom models of `dsplane_core::work_queue::WorkQueue`, the queue of segment deletions from a
//! worker to its store's reaper thread, through its public API only.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p loom-tests --release --test work_queue`.
//! A lost wake-up leaves the helper waiting for ever, which loom reports as a deadlock.

#![cfg(loom)]

use dsplane_core::work_queue::WorkQueue;
use loom::sync::Arc;
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

fn helper(q: &Arc<WorkQueue<u32>>) -> thread::JoinHandle<Vec<u32>> {
    let q = Arc::clone(q);
    thread::spawn(move || {
        let mut got = Vec::new();
        while let Some(i) = q.next() {
            got.push(i);
        }
        got
    })
}

/// Two items then a close, racing the helper: it takes both, in order, and returns (a push or a
/// close whose wake-up is lost would leave it waiting: a deadlock).
#[test]
fn every_item_is_taken_once_in_order_then_the_helper_returns() {
    model(|| {
        let q = Arc::new(WorkQueue::new());
        let t = helper(&q);
        q.push(1).unwrap();
        q.push(2).unwrap();
        q.close();
        assert_eq!(t.join().unwrap(), vec![1, 2]);
    });
}

/// A push is taken without a close behind it (the worker goes on without closing for hours): the
/// helper answers on a second queue, which `main` waits on. A push whose wake-up is lost leaves
/// both waiting: a deadlock. (The models above would not see it: the close's wake-up covers it.)
#[test]
fn a_push_alone_wakes_the_helper() {
    model(|| {
        let q = Arc::new(WorkQueue::new());
        let reply = Arc::new(WorkQueue::new());
        let t = {
            let (q, reply) = (Arc::clone(&q), Arc::clone(&reply));
            thread::spawn(move || {
                while let Some(i) = q.next() {
                    reply.push(i).unwrap();
                }
            })
        };
        q.push(1).unwrap();
        assert_eq!(reply.next(), Some(1));
        q.push(2).unwrap();
        assert_eq!(reply.next(), Some(2));
        q.close();
        t.join().unwrap();
    });
}

/// A close with nothing queued, racing a helper about to wait: it returns.
#[test]
fn a_close_wakes_an_idle_helper() {
    model(|| {
        let q = Arc::new(WorkQueue::<u32>::new());
        let t = helper(&q);
        q.close();
        assert_eq!(t.join().unwrap(), Vec::<u32>::new());
    });
}

/// Two producers racing each other and the helper: nothing lost or duplicated; after the close
/// a push is refused and handed back.
#[test]
fn two_producers_lose_nothing() {
    model(|| {
        let q = Arc::new(WorkQueue::new());
        let t = helper(&q);
        let other = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.push(10).unwrap())
        };
        q.push(1).unwrap();
        other.join().unwrap();
        q.close();
        assert_eq!(q.push(3), Err(3));
        let mut got = t.join().unwrap();
        got.sort_unstable();
        assert_eq!(got, vec![1, 10]);
    });
}

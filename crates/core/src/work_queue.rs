//! A queue from one thread to a helper thread that works through it, in order: the log's
//! segment deletions, which take tens of milliseconds each for a full segment (the kernel frees
//! its page cache and blocks) and so are done off the worker's thread (see
//! `dsplane_engine::store`).
//!
//! One lock and one condition variable; the helper sleeps while the queue is empty and open.
//! [`WorkQueue::close`] lets it finish what is queued and then return. Modelled in
//! `loom-tests/tests/work_queue.rs`.

use std::collections::VecDeque;
use std::sync::PoisonError;

use crate::sync::{Condvar, Mutex};

/// Items handed from one thread to a helper thread (see the module documentation).
#[derive(Debug)]
pub struct WorkQueue<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> Default for WorkQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> WorkQueue<T> {
    /// An empty, open queue.
    pub fn new() -> Self {
        WorkQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
        }
    }

    /// Queues `item` for the helper; hands it back if the queue is closed (the caller does the
    /// work itself).
    pub fn push(&self, item: T) -> Result<(), T> {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.closed {
                return Err(item);
            }
            state.items.push_back(item);
        }
        self.wake.notify_one();
        Ok(())
    }

    /// No more items: the helper returns from [`WorkQueue::next`] once it has taken every item
    /// already queued.
    pub fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.wake.notify_all();
    }

    /// The helper's next item, oldest first, waiting while the queue is empty and open; `None`
    /// once it is closed and empty.
    pub fn next(&self) -> Option<T> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn items_come_out_in_order_and_close_ends_the_helper() {
        let q = std::sync::Arc::new(WorkQueue::new());
        let helper = {
            let q = std::sync::Arc::clone(&q);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Some(i) = q.next() {
                    got.push(i);
                }
                got
            })
        };
        for i in 0..100 {
            q.push(i).unwrap();
        }
        q.close();
        assert_eq!(q.push(100), Err(100), "a closed queue hands the item back");
        assert_eq!(helper.join().unwrap(), (0..100).collect::<Vec<_>>());
    }
}

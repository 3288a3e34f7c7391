//! The one place the concurrent code takes its atomics and cells from.
//!
//! Normally these are `std`'s types. Built with `RUSTFLAGS="--cfg loom"` (see `loom-tests/`),
//! they are loom's, so the model checker sees every load, store and cell access. Code on a
//! concurrent path must import from here, never from `std::sync` directly (tokio's `loom` module
//! is the model).
//!
//! `UnsafeCell` differs between the two: loom's cell only gives access through closures
//! (`with`, `with_mut`), so that it can track it. std's is wrapped here with the same interface,
//! which compiles to a plain pointer access.

// `allow(unused_imports)` below: the shim offers the whole set, and not every concurrent piece
// needs every type (the ring uses only `AtomicU64`, `AtomicUsize`, `Arc` and `UnsafeCell`).

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::{Condvar, Mutex};
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::thread;

#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::{Condvar, Mutex};
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::thread;

/// `std::cell::UnsafeCell` with loom's closure-based interface.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a shared pointer to the contents.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with a mutable pointer to the contents.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Spin-loop hint; under loom a yield, so that the model explores the other threads.
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

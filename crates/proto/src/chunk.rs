//! The read chunks a [`FrameDecoder`](crate::wire::FrameDecoder) fills, and the pool that
//! recycles them.
//!
//! A decoder reads into one chunk until it is full, then starts another, carrying over the
//! partial frame at its end. The payloads it cuts out of a chunk are views of it ([`Bytes`]),
//! not copies, and the chunk lives until the last of them is dropped, on whatever thread that
//! happens (the owner of the frame's Service User, usually not the thread that read it). A
//! [`ChunkPool`] then takes the chunk back, and the next chunk any decoder of the pool needs is
//! that one.
//!
//! A read so allocates nothing in steady state, whatever the allocator does with blocks freed
//! on another thread than the one that allocated them. A pool keeps at most `chunks_max` free
//! chunks; a chunk returned beyond that is freed, so an idle pool holds a bounded amount of
//! memory.
//!
//! # How bytes are shared while the chunk is still being written
//!
//! Bytes are written into a chunk only past its filled part, and a view is only ever of its
//! filled part: a region is written once, and read only afterwards. The views are made once per
//! decode call, as one [`Bytes`] (a *window*) over the chunk's filled, unconsumed part, and each
//! payload is a slice of the window. A window owns a reference to the chunk's memory
//! ([`Arc`]), so the memory outlives every view. No `&mut` to a region ever coexists with a
//! `&` to it: the spare part handed to a read is disjoint from every window.

use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::wire::{HEADER_LEN, READ_CHUNK_BYTES_MAX};

/// The capacity of a pooled chunk: one read and a header. Chunks made larger, for a frame over a
/// read, are not pooled.
pub const CHUNK_BYTES: usize = HEADER_LEN + READ_CHUNK_BYTES_MAX;

/// The free read chunks of the decoders that share it (the engine has one per worker). Cheap to
/// clone: clones share the same chunks.
#[derive(Clone, Debug)]
pub struct ChunkPool(Arc<Pool>);

#[derive(Debug)]
struct Pool {
    free: Mutex<Vec<Box<[MaybeUninit<u8>]>>>,
    chunks_max: usize,
}

impl ChunkPool {
    /// A pool that keeps at most `chunks_max` free chunks of [`CHUNK_BYTES`] each.
    pub fn new(chunks_max: usize) -> ChunkPool {
        ChunkPool(Arc::new(Pool {
            free: Mutex::new(Vec::with_capacity(chunks_max.min(1024))),
            chunks_max,
        }))
    }

    /// The most free chunks it keeps.
    pub fn chunks_max(&self) -> usize {
        self.0.chunks_max
    }

    /// How many free chunks it holds now.
    pub fn free_chunks(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<[MaybeUninit<u8>]>>> {
        // The list is valid whatever a panicking holder did (a push or a pop is all it does).
        self.0.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A chunk of [`CHUNK_BYTES`]: a free one, or a new one.
    fn take(&self) -> Box<[MaybeUninit<u8>]> {
        let free = self.lock().pop();
        free.unwrap_or_else(|| Box::new_uninit_slice(CHUNK_BYTES))
    }

    /// Takes a chunk back, unless it is not of the pooled size or the pool is full.
    fn give(&self, chunk: Box<[MaybeUninit<u8>]>) {
        if chunk.len() != CHUNK_BYTES {
            return;
        }
        let mut free = self.lock();
        if free.len() < self.0.chunks_max {
            free.push(chunk);
        }
    }
}

/// A chunk's memory, not initialised when allocated: only its filled part is ever read. Freed,
/// or given back to its pool, when the decoder and every window have let go of it.
struct Memory {
    base: NonNull<MaybeUninit<u8>>,
    len: usize,
    pool: Option<ChunkPool>,
}

// SAFETY: `Memory` owns its allocation (it came from `Box::into_raw` and is freed only in
// `drop`). Across threads, windows only read their regions, and the one decoder that writes
// writes only past every window (see the module comment), so no byte is written while another
// thread can read it.
unsafe impl Send for Memory {}
// SAFETY: as for `Send`: shared access is reads of regions no one writes any more.
unsafe impl Sync for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), self.len);
        // SAFETY: `base` and `len` are those of the boxed slice this was made from, and this is
        // the last reference to it (the `Arc` is gone), so it is rebuilt once.
        let chunk = unsafe { Box::from_raw(slice) };
        if let Some(pool) = &self.pool {
            pool.give(chunk);
        }
    }
}

/// A view of `memory[start..end]`, the owner of one window.
struct Window {
    memory: Arc<Memory>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `start <= end <= len` (a window is made of a chunk's `consumed..filled`), the
        // memory is alive (held by `self.memory`), and this region was filled (initialised)
        // before the window was made and is never written again.
        unsafe {
            std::slice::from_raw_parts(
                self.memory.base.as_ptr().add(self.start).cast::<u8>(),
                self.end - self.start,
            )
        }
    }
}

/// The chunk a decoder is filling: `[0, consumed)` has been handed out, `[consumed, filled)` is
/// received and not yet handed out, `[filled, len)` is spare.
pub(crate) struct Chunk {
    memory: Arc<Memory>,
    consumed: usize,
    filled: usize,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("capacity", &self.memory.len)
            .field("consumed", &self.consumed)
            .field("filled", &self.filled)
            .finish()
    }
}

impl Chunk {
    /// An empty chunk of `capacity` bytes: from `pool` if it is of the pooled size.
    pub(crate) fn new(capacity: usize, pool: Option<&ChunkPool>) -> Chunk {
        let bytes = match pool {
            Some(pool) if capacity == CHUNK_BYTES => pool.take(),
            _ => Box::new_uninit_slice(capacity),
        };
        let len = bytes.len();
        let base = NonNull::from(Box::leak(bytes)).cast::<MaybeUninit<u8>>();
        Chunk {
            memory: Arc::new(Memory {
                base,
                len,
                pool: pool.cloned(),
            }),
            consumed: 0,
            filled: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.memory.len
    }

    /// Where the bytes not yet handed out start.
    pub(crate) fn consumed(&self) -> usize {
        self.consumed
    }

    /// The bytes received and not yet handed out.
    pub(crate) fn data(&self) -> &[u8] {
        // SAFETY: `consumed <= filled <= len`; the region is alive (this chunk holds the
        // memory) and filled, so initialised and never written again.
        unsafe {
            std::slice::from_raw_parts(
                self.memory.base.as_ptr().add(self.consumed).cast::<u8>(),
                self.filled - self.consumed,
            )
        }
    }

    /// How many bytes the spare part holds.
    pub(crate) fn spare_len(&self) -> usize {
        self.memory.len - self.filled
    }

    /// The spare part, for a read to write into.
    pub(crate) fn spare(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: `filled <= len`; the region is alive, and no window covers it (windows end at
        // or before `filled`), so this is the only reference to it; `&mut self` keeps another
        // one from being made through this chunk while it lives.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.memory.base.as_ptr().add(self.filled),
                self.memory.len - self.filled,
            )
        }
    }

    /// The first `n` spare bytes (at most the spare part), zeroed, for a reader that takes
    /// initialised memory.
    pub(crate) fn spare_zeroed(&mut self, n: usize) -> &mut [u8] {
        let spare = self.spare();
        let n = n.min(spare.len());
        let (spare, _) = spare.split_at_mut(n);
        spare.fill(MaybeUninit::new(0));
        // SAFETY: every byte of `spare` was just initialised.
        unsafe { &mut *(std::ptr::from_mut(spare) as *mut [u8]) }
    }

    /// Copies as much of `bytes` as fits into the spare part and marks it received; returns
    /// how much.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> usize {
        let spare = self.spare();
        let n = bytes.len().min(spare.len());
        // SAFETY: `n` bytes fit in both; `spare` is memory no one else refers to (see
        // `spare`), so it cannot overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), spare.as_mut_ptr().cast(), n) };
        self.commit(n);
        n
    }

    /// Marks the first `n` spare bytes as received (at most the spare part).
    ///
    /// The caller has initialised them: that is what makes [`Chunk::data`] and the windows
    /// sound, so this is only called after a write of those bytes (a read, [`Chunk::append`]).
    pub(crate) fn commit(&mut self, n: usize) {
        self.filled += n.min(self.memory.len - self.filled);
    }

    /// Marks the first `n` received bytes as handed out (at most all of them).
    pub(crate) fn consume(&mut self, n: usize) {
        self.consumed += n.min(self.filled - self.consumed);
    }

    /// One view of the received bytes not yet handed out, [`Chunk::data`], to slice payloads
    /// from: the chunk's memory lives until every slice of it is dropped.
    pub(crate) fn window(&self) -> Bytes {
        Bytes::from_owner(Window {
            memory: Arc::clone(&self.memory),
            start: self.consumed,
            end: self.filled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_comes_back_when_its_last_view_is_dropped() {
        let pool = ChunkPool::new(4);
        let mut chunk = Chunk::new(CHUNK_BYTES, Some(&pool));
        assert_eq!(chunk.capacity(), CHUNK_BYTES);
        assert_eq!(chunk.append(b"abcdef"), 6);
        chunk.consume(1);
        let window = chunk.window();
        assert_eq!(&window[..], b"bcdef");
        let view = window.slice(1..3);
        let at = chunk.data().as_ptr();
        // More bytes go in after the window, which does not see them.
        assert_eq!(chunk.append(b"gh"), 2);
        assert_eq!(chunk.data(), b"bcdefgh");
        assert_eq!(&window[..], b"bcdef");
        drop((window, chunk));
        assert_eq!(pool.free_chunks(), 0, "a view still holds it");
        assert_eq!(&view[..], b"cd");
        drop(view);
        assert_eq!(pool.free_chunks(), 1);
        let again = Chunk::new(CHUNK_BYTES, Some(&pool));
        assert_eq!(again.data().len(), 0);
        assert_eq!(
            again.data().as_ptr(),
            at.wrapping_sub(1),
            "the same memory again"
        );
        assert_eq!(pool.free_chunks(), 0);
    }

    #[test]
    fn the_pool_keeps_at_most_chunks_max_and_no_odd_sizes() {
        let pool = ChunkPool::new(2);
        let chunks: Vec<_> = (0..3)
            .map(|_| Chunk::new(CHUNK_BYTES, Some(&pool)))
            .collect();
        drop(chunks);
        assert_eq!(pool.free_chunks(), 2, "the third was freed");
        drop(Chunk::new(CHUNK_BYTES * 2, Some(&pool)));
        drop(Chunk::new(100, Some(&pool)));
        assert_eq!(pool.free_chunks(), 2);
        let none = ChunkPool::new(0);
        drop(Chunk::new(CHUNK_BYTES, Some(&none)));
        assert_eq!(none.free_chunks(), 0);
    }

    #[test]
    fn commit_and_consume_stay_within_the_chunk() {
        let mut chunk = Chunk::new(10, None);
        assert_eq!(chunk.append(&[7; 25]), 10);
        assert_eq!(chunk.data(), [7; 10]);
        assert_eq!(chunk.spare_zeroed(5), [0u8; 0]);
        assert_eq!(chunk.data().len(), 10);
        assert!(chunk.spare().is_empty());
        chunk.consume(11);
        assert_eq!((chunk.consumed(), chunk.data().len()), (10, 0));
        assert!(chunk.window().is_empty());
    }
}

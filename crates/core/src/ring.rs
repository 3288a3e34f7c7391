//! The lock-free MPSC priority ring that carries work from any core to the core that owns it
//! (ENGINE.md §6: "work crosses cores only through lock-free MPSC priority rings").
//!
//! # Shape
//!
//! A ring has one *lane* per priority level (index 0 the most urgent, so level 1 of the DSP
//! documents is lane 0). Each lane is a bounded multi-producer, single-consumer array queue in the
//! style of Dmitry Vyukov's bounded queue: a power-of-two array of slots, each with a sequence
//! number saying whose turn the slot is, a `tail` that producers claim positions from with a CAS,
//! and a `head` that only the consumer advances, so it lives in the [`Consumer`] and is never
//! shared. Over all lanes sits one *doorbell* word: bit `i` says "lane `i` may be non-empty", and
//! bit 63 (`PARKED`) says "the consumer is going to sleep". Everything is allocated by
//! [`channel`]; pushing and popping never allocate.
//!
//! # Pushing
//!
//! A producer reads `tail`, looks at the slot it names and compares its sequence number with the
//! position: equal means free for this lap, so it CASes `tail` one further, writes the item and
//! stores `position + 1` into the slot's sequence (the publication). One lap behind means the
//! consumer has not emptied the slot yet: the lane is full and the item is handed back in
//! [`PushError::Full`]. Producers need no copy of the consumer's head: the slot's sequence number
//! already says whether the consumer is done with it, so there is nothing to cache.
//!
//! After publishing, the producer sets its lane's bit in the doorbell with one `fetch_or`. The
//! value that returns also says whether the consumer had announced it was parking; if so the
//! producer clears `PARKED` and, if it was the one to clear it, `push` returns
//! [`Wake::NeedsWake`]. The ring does not own the wake-up mechanism: the engine's consumer sleeps
//! in `mio::Poll` and the producer that got `NeedsWake` calls its `mio::Waker`.
//!
//! [`Producer::push_bulk`] does the same for a batch, with one CAS and one doorbell write for all
//! of it. It counts the free slots from `tail` on, up to the batch's length (and at most a lap):
//! slot by slot, each whose sequence number equals its position is free for this lap; the first
//! still one lap behind ends the run, which may make it shorter than the batch; one already
//! claimed means `tail` has moved, so it reads `tail` again and counts again. It then CASes
//! `tail` forward by the whole run. The CAS succeeding means `tail` was still where the count
//! began, so no other producer claimed any position in the run, and a free slot stays free until
//! the producer that claimed it publishes: every slot counted is still free, and now this
//! producer's alone. It writes and publishes the items one slot after the other, in order, with
//! nothing that can fail between the claim and the last publication (a claimed slot never
//! published would hold up its lane for good), and only then sets the lane's bit, once, with the
//! same `fetch_or` and wake-up rule as `push`. The consumer may take the first items of the run
//! before the last are published; it then finds the next head unpublished, clears the bit, and
//! the batch's `fetch_or`, which comes after every publication, sets it again. What did not fit
//! stays in the caller's `Vec`, moved to its front in order, without allocating.
//!
//! # Popping in strict priority
//!
//! The consumer reads the doorbell and looks at the most urgent lane whose bit is set
//! (`trailing_zeros`). If that lane's head slot is published it reads the doorbell once more
//! before taking the item: if a more urgent bit has appeared meanwhile it goes there first. That
//! second look is what makes the priority strict rather than approximate: an item seen in the
//! slot was published after everything its producer pushed before it, so the second read of the
//! doorbell cannot miss their bits (read-write coherence, no extra ordering needed).
//!
//! [`Consumer::pop_bulk`] takes a *run* at a time: having found the most urgent lane's head
//! published, it looks at the slots after it (up to what it may still take, and at most a lap)
//! while they are published too, and only then reads the doorbell again. That one read comes
//! after the Acquire load of every item in the run, so the argument above holds for each of them:
//! if no more urgent bit is set, no more urgent item pushed before any item of the run is still
//! waiting, and the whole run is taken. One doorbell load per run instead of per item, and
//! the same items in the same order as `pop` called repeatedly would give, short of pushes racing
//! with it (which either may see first).
//!
//! If the lane's head slot is not published, the consumer clears the lane's bit *and then looks at
//! the slot again*. A producer that published between the two looks may have set its bit before
//! the clear, and its bit is now gone; the second look catches exactly that item, and the consumer
//! puts the bit back. A producer whose `fetch_or` comes after the clear leaves the bit set. Either
//! way no published item is left in a lane whose bit is clear.
//!
//! # Parking without losing a wake-up
//!
//! [`Consumer::prepare_park`] sets `PARKED` with a `fetch_or` on the same doorbell word and
//! parks only if no level bit was set. Because the park announcement and every producer's level
//! bit are read-modify-writes of *one* atomic, they are totally ordered by that atomic's
//! modification order whatever the memory orderings: either the producer's `fetch_or` comes first
//! and the consumer sees the level bit and does not sleep, or the consumer's comes first and the
//! producer sees `PARKED` and is told to wake it. This is the Dekker pattern with the two flags
//! packed into one word, which needs no `SeqCst` at all.
//!
//! # Orderings
//!
//! | operation | ordering | pairs with |
//! |---|---|---|
//! | producer (`push`, and `push_bulk` for each slot it counts): slot `seq` load | Acquire | consumer's Release store of `seq` when it frees the slot, so its read of the old item happens before the new write |
//! | producer (`push`, and `push_bulk` for each slot it claimed): slot `seq` store (publish) | Release | consumer's Acquire load of `seq` before it reads the item |
//! | producer: doorbell `fetch_or(level bit)`, once per `push` or per non-empty `push_bulk`, after its last publication | Release | consumer's Acquire `fetch_and` (the clear), so the second look sees every slot published before it |
//! | consumer: slot `seq` load (`is_ready`, for each item of a `pop_bulk` run) | Acquire | the producer's Release publication, so its write of the item, and everything it pushed before, happen before the read |
//! | consumer: slot `seq` store (free) | Release | the next lap's producer's Acquire load of `seq` |
//! | consumer: doorbell `fetch_and(!level bit)` | Acquire | producers' Release `fetch_or` |
//! | `tail` CAS (by 1 or by a run), doorbell loads (including the re-read after a run), `PARKED` set and clear | Relaxed | atomicity or coherence is all they need; the data is carried by the slot `seq` |
//!
//! # What it does not promise
//!
//! * A producer stopped between claiming a position and publishing it (preempted, say) holds up
//!   the items behind it *in its lane*; other lanes go on. This is inherent in the Vyukov design
//!   and why the two steps are a few instructions apart with nothing that can panic between them.
//!   That producer sets the lane's bit when it does publish, so nothing is stranded. A
//!   `push_bulk` holds its lane for the writing of its whole run (a move per item, still nothing
//!   that can block).
//! * A level bit can be set on an empty lane (the consumer took the item before its producer set
//!   the bit). The consumer clears it on its next pop; it costs a look, never an item.
//! * Strict priority is between items whose pushes are ordered (the same producer, or otherwise
//!   synchronised), short of the hold-up above; two pushes racing with a pop may be seen in
//!   either order.
//! * Dropping the [`Consumer`] does not stop producers: their items stay until the last handle is
//!   dropped, and are dropped then.
//!
//! # Example
//!
//! ```
//! use dsplane_core::ring::{channel, Wake};
//!
//! let (producer, mut consumer) = channel::<&str>(3, 8).unwrap();
//! assert_eq!(producer.push(2, "routine").unwrap(), Wake::NotNeeded);
//! assert_eq!(producer.push(0, "urgent").unwrap(), Wake::NotNeeded);
//! assert_eq!(consumer.pop(), Some((0, "urgent")));
//! assert_eq!(consumer.pop(), Some((2, "routine")));
//! assert_eq!(consumer.pop(), None);
//! ```

use std::fmt;
use std::mem::MaybeUninit;

use crossbeam_utils::CachePadded;

use crate::sync::{Arc, AtomicU64, AtomicUsize, Ordering, UnsafeCell};

/// Most levels a ring can have: one doorbell bit each, below `PARKED`.
pub const RING_LEVELS_MAX: usize = 32;

/// Fewest slots per level. A Vyukov queue needs two: with one, the sequence number a producer
/// publishes (`position + 1`) is the very value that marks the slot free for the next lap, so a
/// second producer would overwrite an item the consumer has not taken.
pub const RING_CAPACITY_MIN: usize = 2;

/// Most slots per level. A ring is allocated whole at start-up, so this bounds its memory: at the
/// most, 32 levels of 2^20 slots of 24 bytes (a 16-byte item and its sequence number) is 768 MiB,
/// which a misread config should not be able to ask for by accident.
pub const RING_CAPACITY_MAX: usize = 1 << 20;

/// Doorbell bit: the consumer has announced it is going to sleep.
const PARKED: u64 = 1 << 63;

/// Doorbell bits that belong to levels.
const LEVEL_BITS: u64 = (1 << RING_LEVELS_MAX) - 1;

const _: () = {
    // Level bits must stay clear of PARKED.
    assert!(RING_LEVELS_MAX < 63);
    // Every configurable priority level needs a lane.
    assert!(crate::ids::LEVELS_MAX as usize <= RING_LEVELS_MAX);
    assert!(RING_CAPACITY_MIN >= 2);
    assert!(RING_CAPACITY_MIN.is_power_of_two());
    assert!(RING_CAPACITY_MAX.is_power_of_two());
    assert!(RING_CAPACITY_MIN <= RING_CAPACITY_MAX);
    // A slot's sequence number is compared with a position as a signed distance; laps must fit.
    assert!(RING_CAPACITY_MAX <= (isize::MAX as usize) / 2);
};

/// Why [`channel`] refused to build a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// A ring needs at least one level.
    #[error("a ring needs at least one level")]
    LevelsZero,
    /// More levels than the doorbell word has bits for.
    #[error("{levels} levels asked for, at most {RING_LEVELS_MAX} are supported")]
    LevelsAboveMax {
        /// The number asked for.
        levels: usize,
    },
    /// Fewer than [`RING_CAPACITY_MIN`] slots per level.
    #[error("capacity per level {capacity} is below the minimum {RING_CAPACITY_MIN}")]
    CapacityBelowMin {
        /// The number asked for.
        capacity: usize,
    },
    /// The capacity must be a power of two, so that a position maps to a slot with a mask.
    #[error("capacity per level {capacity} is not a power of two")]
    CapacityNotPowerOfTwo {
        /// The number asked for.
        capacity: usize,
    },
    /// More than [`RING_CAPACITY_MAX`] slots per level.
    #[error("capacity per level {capacity} is above the maximum {RING_CAPACITY_MAX}")]
    CapacityAboveMax {
        /// The number asked for.
        capacity: usize,
    },
}

/// A push that was refused; the item is handed back.
#[derive(Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushError<T> {
    /// The level's lane is full: the consumer is behind. Retry later, shed, or spill.
    Full(T),
    /// The level index is not below [`Producer::levels`]: a caller bug, but not worth a panic.
    BadLevel(T),
}

impl<T> PushError<T> {
    /// The item that was not pushed.
    pub fn into_inner(self) -> T {
        match self {
            PushError::Full(item) | PushError::BadLevel(item) => item,
        }
    }
}

// Like crossbeam's TrySendError: no `T: Debug` bound, so any item type can be `unwrap`ped.
impl<T> fmt::Debug for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Full(_) => f.write_str("Full(..)"),
            PushError::BadLevel(_) => f.write_str("BadLevel(..)"),
        }
    }
}

impl<T> fmt::Display for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Full(_) => f.write_str("the ring's lane for this level is full"),
            PushError::BadLevel(_) => f.write_str("no such level in this ring"),
        }
    }
}

impl<T> std::error::Error for PushError<T> {}

/// What a successful push asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a consumer that parked sleeps until the producer told `NeedsWake` wakes it"]
pub enum Wake {
    /// The consumer is awake, or will see the item before it sleeps.
    NotNeeded,
    /// The consumer had parked (or was about to) and this push was chosen to wake it: the caller
    /// must wake it now, with whatever it sleeps on (the engine: its `mio::Waker`). At most one
    /// push per [`Consumer::prepare_park`] gets this (rarely one whose park was then withdrawn:
    /// a spurious wake-up, never a lost one).
    NeedsWake,
}

impl Wake {
    /// Whether the caller must wake the consumer.
    pub fn is_needed(self) -> bool {
        self == Wake::NeedsWake
    }
}

/// What [`Producer::push_bulk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a consumer that parked sleeps until the producer told `NeedsWake` wakes it"]
pub struct BulkPushed {
    /// How many items from the front of the batch went in; the rest are still in it, in order.
    pub pushed: usize,
    /// Whether the caller must wake the consumer, exactly as for [`Producer::push`]; always
    /// [`Wake::NotNeeded`] when nothing was pushed.
    pub wake: Wake,
}

/// [`Producer::push_bulk`] was given a level index not below [`Producer::levels`]: a caller bug,
/// but not worth a panic. Nothing was pushed; the items are still in the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no level index {level_index} in this ring")]
pub struct BadLevel {
    /// The index asked for.
    pub level_index: usize,
}

/// Builds a ring of `levels` lanes of `capacity_per_level` slots each, allocated now.
///
/// `levels` is in `1..=`[`RING_LEVELS_MAX`]; `capacity_per_level` is a power of two in
/// [`RING_CAPACITY_MIN`]`..=`[`RING_CAPACITY_MAX`].
pub fn channel<T: Send>(
    levels: usize,
    capacity_per_level: usize,
) -> Result<(Producer<T>, Consumer<T>), RingError> {
    channel_from(levels, capacity_per_level, 0)
}

/// [`channel`] with every lane's positions starting at `start`, so that tests can reach the
/// wrap-around of `usize` positions without 2^64 pushes.
fn channel_from<T: Send>(
    levels: usize,
    capacity: usize,
    start: usize,
) -> Result<(Producer<T>, Consumer<T>), RingError> {
    if levels == 0 {
        return Err(RingError::LevelsZero);
    }
    if levels > RING_LEVELS_MAX {
        return Err(RingError::LevelsAboveMax { levels });
    }
    if capacity < RING_CAPACITY_MIN {
        return Err(RingError::CapacityBelowMin { capacity });
    }
    if !capacity.is_power_of_two() {
        return Err(RingError::CapacityNotPowerOfTwo { capacity });
    }
    if capacity > RING_CAPACITY_MAX {
        return Err(RingError::CapacityAboveMax { capacity });
    }
    // Slot `i` is first used by the first position at or after `start` that maps to it; with
    // `start` a multiple of the capacity that is `start + i`.
    debug_assert_eq!(start % capacity, 0);
    let shared = Arc::new(Shared {
        doorbell: CachePadded::new(AtomicU64::new(0)),
        lanes: (0..levels).map(|_| Lane::new(capacity, start)).collect(),
        capacity,
    });
    let producer = Producer {
        shared: shared.clone(),
    };
    let consumer = Consumer {
        shared,
        heads: vec![start; levels].into_boxed_slice(),
    };
    Ok((producer, consumer))
}

/// One slot of a lane.
struct Slot<T> {
    /// Whose turn it is. For the position `p` that maps here: `p` means free for a producer,
    /// `p + 1` means holding `p`'s item for the consumer, `p + capacity` means free for the next
    /// lap.
    seq: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// One level's bounded MPSC queue.
struct Lane<T> {
    /// Next position to claim; CASed by producers. Padded because every producer of this level
    /// writes it, and nothing else should share its cache line.
    tail: CachePadded<AtomicUsize>,
    slots: Box<[Slot<T>]>,
    mask: usize,
}

impl<T> Lane<T> {
    fn new(capacity: usize, start: usize) -> Self {
        let slots = (0..capacity)
            .map(|i| Slot {
                seq: AtomicUsize::new(start.wrapping_add(i)),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Lane {
            tail: CachePadded::new(AtomicUsize::new(start)),
            slots,
            mask: capacity - 1,
        }
    }

    fn slot(&self, position: usize) -> &Slot<T> {
        &self.slots[position & self.mask]
    }

    /// Claims a position and publishes `item` in it, or hands it back if the lane is full.
    fn push(&self, item: T) -> Result<(), T> {
        // Relaxed: only a starting guess; the slot's sequence number decides.
        let mut position = self.tail.load(Ordering::Relaxed);
        loop {
            let slot = self.slot(position);
            // Acquire: pairs with the consumer's Release store in `take`, so its read of the
            // previous lap's item happens before our write below.
            let seq = slot.seq.load(Ordering::Acquire);
            // Signed lap distance; positions wrap around usize, so compare by difference.
            let distance = seq.wrapping_sub(position) as isize;
            if distance == 0 {
                // Relaxed: the CAS only has to pick one owner for `position`; the data is
                // published by the Release store of `seq` below.
                match self.tail.compare_exchange_weak(
                    position,
                    position.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: the CAS made this thread the only owner of `position`, and the
                        // slot's `seq == position` (read with Acquire) says the consumer is done
                        // with the previous lap's item: nobody else touches the cell until the
                        // Release store below hands it to the consumer.
                        slot.value.with_mut(|cell| unsafe { (*cell).write(item) });
                        // Release: pairs with the consumer's Acquire load in `is_ready`.
                        slot.seq.store(position.wrapping_add(1), Ordering::Release);
                        return Ok(());
                    }
                    Err(current) => position = current,
                }
            } else if distance < 0 {
                // The slot still holds the item from one lap ago: the lane is full.
                return Err(item);
            } else {
                // Another producer claimed `position` since we read `tail`; catch up.
                crate::sync::spin_hint();
                position = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Claims the run of free positions at `tail`, as many as `items` has (at most the capacity),
    /// with one CAS, and publishes the items from the front of `items` in them, in order. Returns
    /// how many; they are gone from `items`, the rest are still there in order. Zero means the
    /// lane is full (or `items` is empty).
    fn push_bulk(&self, items: &mut Vec<T>) -> usize {
        // At most a lap: beyond it a position maps to a slot counted already (whose `seq` would
        // end the count there anyway).
        let wanted = items.len().min(self.slots.len());
        if wanted == 0 {
            return 0;
        }
        // Relaxed: as in `push`, a starting guess.
        let mut position = self.tail.load(Ordering::Relaxed);
        let claimed = 'claim: loop {
            // How many slots from `position` on are free for this lap, up to `wanted`.
            let mut free = 0;
            while free < wanted {
                let at = position.wrapping_add(free);
                // Acquire: as in `push`, pairs with the consumer's Release store in `take`, so
                // its read of the previous lap's item happens before our write below.
                let seq = self.slot(at).seq.load(Ordering::Acquire);
                let distance = seq.wrapping_sub(at) as isize;
                if distance == 0 {
                    free += 1;
                } else if distance < 0 {
                    // The consumer has not emptied this slot yet: the run of free slots ends here.
                    break;
                } else {
                    // Another producer claimed `at` since we read `tail`, so `tail` has moved past
                    // `position` and the CAS would fail; catch up and count again.
                    crate::sync::spin_hint();
                    position = self.tail.load(Ordering::Relaxed);
                    continue 'claim;
                }
            }
            if free == 0 {
                return 0;
            }
            // Relaxed: as in `push`, the CAS only picks one owner for each position. Succeeding
            // means `tail` was still `position`, so nobody else has claimed any of the `free`
            // positions, and each slot stays free (`seq == at`) until its owner, us, publishes.
            match self.tail.compare_exchange_weak(
                position,
                position.wrapping_add(free),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break free,
                Err(current) => position = current,
            }
        };
        // Every claimed position is published below, in order, with nothing that can fail or
        // panic in between (`claimed <= items.len()`, so the drain cannot panic, and moving an
        // item cannot): a claimed position left unpublished would stall the lane for good. The
        // rest of `items` is moved to its front when the drain is dropped, after the last
        // publication.
        for (offset, item) in items.drain(..claimed).enumerate() {
            let at = position.wrapping_add(offset);
            let slot = self.slot(at);
            // SAFETY: the CAS made this thread the only owner of `at`, and the slot's `seq == at`
            // (read with Acquire before the CAS) says the consumer is done with the previous
            // lap's item: nobody else touches the cell until the Release store below.
            slot.value.with_mut(|cell| unsafe { (*cell).write(item) });
            // Release: pairs with the consumer's Acquire load in `is_ready`.
            slot.seq.store(at.wrapping_add(1), Ordering::Release);
        }
        claimed
    }

    /// Whether the item at `head` is published. Consumer only.
    fn is_ready(&self, head: usize) -> bool {
        // Acquire: pairs with the producer's Release store of `seq` in `push`, so its write of
        // the item happens before our read in `take`.
        self.slot(head).seq.load(Ordering::Acquire) == head.wrapping_add(1)
    }

    /// Moves the item at `head` out and frees its slot for the next lap.
    ///
    /// # Safety
    ///
    /// Only the consumer may call this, with its head for this lane, after [`Lane::is_ready`]
    /// returned true for it; and then only once per position.
    unsafe fn take(&self, head: usize) -> T {
        let slot = self.slot(head);
        // SAFETY: `is_ready(head)` saw `seq == head + 1` with Acquire, so the producer's write is
        // visible and complete; no producer touches the slot again until the store below, and the
        // caller takes each position once, so the value is initialised and read exactly once.
        let item = slot
            .value
            .with(|cell| unsafe { (*cell).assume_init_read() });
        // Release: pairs with the Acquire load of `seq` in `push` of the next lap's producer.
        slot.seq
            .store(head.wrapping_add(self.slots.len()), Ordering::Release);
        item
    }
}

/// What producers and the consumer share.
struct Shared<T> {
    /// Level bits and `PARKED`. Padded: every push writes it, and its own line keeps those
    /// writes from slowing reads of the lanes' fields.
    doorbell: CachePadded<AtomicU64>,
    lanes: Box<[Lane<T>]>,
    capacity: usize,
}

// SAFETY: the cells in the slots are only reached through the Vyukov protocol above, which hands
// each item from exactly one producer to the one consumer; items cross threads, hence `T: Send`.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as for `Send`: shared access to `Shared` is what producers and the consumer do, and the
// protocol keeps their accesses to any one cell apart in time.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Every producer and the consumer are gone (this is the last `Arc`, whose drop ordered
        // their accesses before ours), so no position is half claimed: a slot holds an item
        // exactly when its sequence number is one past a position that maps to it.
        for lane in self.lanes.iter() {
            for (index, slot) in lane.slots.iter().enumerate() {
                // Relaxed: we are the only thread left (see above).
                let seq = slot.seq.load(Ordering::Relaxed);
                if seq.wrapping_sub(index) & lane.mask == 1 {
                    // SAFETY: the slot was published (`seq` one past its position) and never
                    // taken, so it holds an initialised item, dropped here once.
                    slot.value
                        .with_mut(|cell| unsafe { (*cell).assume_init_drop() });
                }
            }
        }
    }
}

/// The pushing side; clone one for each thread that pushes.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Producer<T> {
    fn clone(&self) -> Self {
        Producer {
            shared: self.shared.clone(),
        }
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("levels", &self.levels())
            .field("capacity_per_level", &self.capacity_per_level())
            .finish_non_exhaustive()
    }
}

impl<T: Send> Producer<T> {
    /// Pushes `item` at `level_index` (0 the most urgent).
    ///
    /// On success, says whether the caller must wake the consumer ([`Wake::NeedsWake`]). On
    /// failure, hands the item back: [`PushError::Full`] if the level's lane is full,
    /// [`PushError::BadLevel`] if there is no such level.
    pub fn push(&self, level_index: usize, item: T) -> Result<Wake, PushError<T>> {
        let Some(lane) = self.shared.lanes.get(level_index) else {
            return Err(PushError::BadLevel(item));
        };
        lane.push(item).map_err(PushError::Full)?;
        Ok(self.ring(level_index))
    }

    /// Pushes items from the front of `items` into lane `level_index`, in order, as many as fit;
    /// what did not fit stays in `items`, in order. Claims the run of free slots with one CAS
    /// where it can (another producer's claim in the middle of the count makes it count again)
    /// and rings the doorbell once for the whole batch, after the last item is published.
    ///
    /// [`BulkPushed::pushed`] says how many went in; fewer than `items` had means the lane is
    /// full (or was, for a moment: the consumer may have made room since). An empty `items`, or
    /// a full lane, writes nothing, the doorbell included. Never allocates: the items left over
    /// are moved to the front of the same `Vec`.
    ///
    /// ```
    /// use dsplane_core::ring::{channel, Wake};
    ///
    /// let (producer, mut consumer) = channel::<u32>(2, 4).unwrap();
    /// let mut batch = vec![1, 2, 3, 4, 5, 6];
    /// let pushed = producer.push_bulk(1, &mut batch).unwrap();
    /// assert_eq!((pushed.pushed, pushed.wake), (4, Wake::NotNeeded));
    /// assert_eq!(batch, [5, 6]);
    /// let mut out = Vec::new();
    /// assert_eq!(consumer.pop_bulk(&mut out, 8), 4);
    /// assert_eq!(out, [(1, 1), (1, 2), (1, 3), (1, 4)]);
    /// ```
    ///
    /// # Errors
    ///
    /// [`BadLevel`] if there is no such level; nothing is pushed. (Handing back a count of zero
    /// instead would look like a full lane to a caller that retries, for ever.)
    pub fn push_bulk(
        &self,
        level_index: usize,
        items: &mut Vec<T>,
    ) -> Result<BulkPushed, BadLevel> {
        let Some(lane) = self.shared.lanes.get(level_index) else {
            return Err(BadLevel { level_index });
        };
        let pushed = lane.push_bulk(items);
        let wake = if pushed == 0 {
            Wake::NotNeeded
        } else {
            self.ring(level_index)
        };
        Ok(BulkPushed { pushed, wake })
    }

    /// Sets `level_index`'s bit in the doorbell, after the caller published its items there, and
    /// says whether the consumer must be woken.
    fn ring(&self, level_index: usize) -> Wake {
        let doorbell = &self.shared.doorbell;
        // Release: pairs with the consumer's Acquire clear in `find_run`, so a consumer whose
        // clear removes this bit sees our slots published when it looks again.
        let before = doorbell.fetch_or(1 << level_index, Ordering::Release);
        // Relaxed for both: the park decision rests on the modification order of this one word
        // (the consumer's `fetch_or(PARKED)` is either before ours, and we saw it, or after, and
        // it saw our level bit). Of the producers that saw `PARKED`, the one whose clear removes it
        // wakes the consumer; the wake-up mechanism then orders the rest.
        if before & PARKED != 0 && doorbell.fetch_and(!PARKED, Ordering::Relaxed) & PARKED != 0 {
            Wake::NeedsWake
        } else {
            Wake::NotNeeded
        }
    }
}

impl<T> Producer<T> {
    /// Number of levels.
    pub fn levels(&self) -> usize {
        self.shared.lanes.len()
    }

    /// Slots per level.
    pub fn capacity_per_level(&self) -> usize {
        self.shared.capacity
    }
}

/// The popping side; there is exactly one.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// Per lane, the next position to take. Only the consumer reads or writes it, so it is not
    /// shared at all.
    heads: Box<[usize]>,
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("levels", &self.levels())
            .field("capacity_per_level", &self.capacity_per_level())
            .field("len_hint", &self.len_hint())
            .finish_non_exhaustive()
    }
}

impl<T> Consumer<T> {
    /// Takes the most urgent item, with its level index, or `None` if the ring looks empty.
    pub fn pop(&mut self) -> Option<(usize, T)> {
        // Relaxed: a starting point only; `find_run` reads each slot with Acquire.
        let bits = self.shared.doorbell.load(Ordering::Relaxed);
        let (level, _) = self.find_run(bits, 1).0?;
        // SAFETY: `find_run` just found a ready run of at least one item at `level`'s head.
        Some((level, unsafe { self.take_next(level) }))
    }

    /// Takes up to `max` items, most urgent first, into `out`; returns how many.
    ///
    /// Like calling [`Consumer::pop`] `max` times, with the same guarantee of strict priority,
    /// but with fewer doorbell reads: it takes a run of published items from a lane at a time and
    /// reads the doorbell once per run, not once per item. (A more urgent push racing with the
    /// run may land after it, where repeated pops might have taken it first; such a push is not
    /// ordered before the run's items, so either order is allowed.)
    pub fn pop_bulk<E: Extend<(usize, T)>>(&mut self, out: &mut E, max: usize) -> usize {
        let mut taken = 0;
        // Relaxed: as in `pop`.
        let mut bits = self.shared.doorbell.load(Ordering::Relaxed);
        while taken < max {
            let (run, fresh) = self.find_run(bits, max - taken);
            let Some((level, run)) = run else { break };
            bits = fresh;
            let lane = &self.shared.lanes[level];
            let head = &mut self.heads[level];
            let mut moved = 0;
            // Each item is taken, and the head moved past it, as `extend` pulls it, so an `out`
            // that panics or stops pulling leaves no item both taken and still counted as there.
            out.extend((0..run).map(|_| {
                let at = *head;
                // SAFETY: we are the consumer, `*head` is our head for this lane, and `find_run`
                // saw the `run` positions from the old head published; each is taken once,
                // since the head moves past it at once.
                let item = unsafe { lane.take(at) };
                *head = at.wrapping_add(1);
                moved += 1;
                (level, item)
            }));
            taken += moved;
            if moved < run {
                break;
            }
        }
        taken
    }

    /// Takes the item at `level`'s head and moves the head past it.
    ///
    /// # Safety
    ///
    /// The item at `level`'s head must belong to a run that [`Consumer::find_run`] returned and
    /// that has not been taken whole yet (the head has moved by less than the run's length).
    unsafe fn take_next(&mut self, level: usize) -> T {
        let head = self.heads[level];
        // SAFETY: per this function's contract, the item at `head` was seen published by
        // `find_run` and not taken since; `heads` moves past it at once.
        let item = unsafe { self.shared.lanes[level].take(head) };
        self.heads[level] = head.wrapping_add(1);
        item
    }

    /// The core of `pop`: starting from `bits`, a recent reading of the doorbell, finds the most
    /// urgent lane with a published item at its head, and how many published items follow it
    /// there, up to `limit` (at least 1) in all. Returns (level, run length), if any, and the
    /// last doorbell reading, a start for the next call.
    ///
    /// The doorbell is read again after the whole run is seen published, so the argument for
    /// strict priority (module doc) holds for every item of the run, not just the first.
    fn find_run(&self, mut bits: u64, limit: usize) -> (Option<(usize, usize)>, u64) {
        let doorbell = &self.shared.doorbell;
        loop {
            let levels = bits & LEVEL_BITS;
            if levels == 0 {
                return (None, bits);
            }
            let level = levels.trailing_zeros() as usize;
            let lane = &self.shared.lanes[level];
            let head = self.heads[level];
            if lane.is_ready(head) {
                // Within a lap: beyond it, `is_ready` would look at the head's slot again.
                let limit = limit.min(lane.slots.len());
                let mut run = 1;
                while run < limit && lane.is_ready(head.wrapping_add(run)) {
                    run += 1;
                }
                // Relaxed: the Acquire in `is_ready` made everything pushed before each item of
                // the run happen before this load, so by coherence it cannot miss their level
                // bits.
                let now = doorbell.load(Ordering::Relaxed);
                if now & ((1 << level) - 1) != 0 {
                    // Something more urgent arrived since `bits` was read: go there first.
                    bits = now;
                    continue;
                }
                return (Some((level, run)), now);
            }
            let bit = 1 << level;
            // Acquire: pairs with producers' Release `fetch_or`; whoever set this bit before our
            // clear has published its slots, and the look below sees them.
            let before = doorbell.fetch_and(!bit, Ordering::Acquire);
            bits = before & !bit;
            if lane.is_ready(head) {
                // Published between the two looks; its producer's bit may be the one we just
                // cleared, so put it back. Relaxed: only we read it for this purpose, in order.
                doorbell.fetch_or(bit, Ordering::Relaxed);
                bits |= bit;
            }
        }
    }

    /// Announces that the consumer is about to sleep. Returns `true` if it may sleep: then the
    /// next push to any level returns [`Wake::NeedsWake`] and its caller wakes the consumer.
    /// Returns `false` if some level may hold an item; pop instead.
    ///
    /// After sleeping, for whatever reason (woken, timed out, spurious), call
    /// [`Consumer::cancel_park`] so that producers stop being asked to wake an awake consumer.
    pub fn prepare_park(&mut self) -> bool {
        let doorbell = &self.shared.doorbell;
        // Relaxed: a cheap early answer; the decision is the `fetch_or` below.
        if doorbell.load(Ordering::Relaxed) & LEVEL_BITS != 0 {
            return false;
        }
        // Relaxed: the decision rests on this word's modification order alone (see `push`); the
        // items themselves are read later with Acquire in `pop`.
        let before = doorbell.fetch_or(PARKED, Ordering::Relaxed);
        if before & LEVEL_BITS != 0 {
            self.cancel_park();
            return false;
        }
        true
    }

    /// Withdraws a [`Consumer::prepare_park`]; harmless if a producer already did.
    pub fn cancel_park(&mut self) {
        // Relaxed: only the park decision depends on this bit, and it is ordered by this word.
        self.shared.doorbell.fetch_and(!PARKED, Ordering::Relaxed);
    }

    /// Whether no level has a published item at its head right now.
    pub fn is_empty(&self) -> bool {
        self.shared
            .lanes
            .iter()
            .zip(self.heads.iter())
            .all(|(lane, &head)| !lane.is_ready(head))
    }

    /// Items claimed by producers and not yet taken, over all levels; counts pushes still in
    /// progress, so only a hint.
    pub fn len_hint(&self) -> usize {
        self.shared
            .lanes
            .iter()
            .zip(self.heads.iter())
            // Relaxed: a hint; `tail` is never behind `head` in this thread's view, since the
            // Acquire in `is_ready` before each take ordered the claim before it.
            .map(|(lane, &head)| lane.tail.load(Ordering::Relaxed).wrapping_sub(head))
            .sum()
    }

    /// Number of levels.
    pub fn levels(&self) -> usize {
        self.shared.lanes.len()
    }

    /// Slots per level.
    pub fn capacity_per_level(&self) -> usize {
        self.shared.capacity
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Pushes and insists it succeeds; the wake-up is irrelevant where nobody parks.
    fn push<T: Send>(producer: &Producer<T>, level: usize, item: T) {
        let _wake = producer.push(level, item).expect("push refused");
    }

    /// Runs `body` on its own thread and fails the test if it takes longer than `limit`, so a
    /// lost wake-up or a livelock fails instead of hanging the suite.
    fn with_timeout(limit: Duration, body: impl FnOnce() + Send + 'static) {
        let (done_tx, done_rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            body();
            let _ = done_tx.send(());
        });
        match done_rx.recv_timeout(limit) {
            Ok(()) => worker.join().expect("test body panicked"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The body panicked before sending; surface its panic.
                worker.join().expect("test body panicked");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("test did not finish within {limit:?}"),
        }
    }

    #[test]
    fn channel_refuses_bad_shapes() {
        let err = |levels, capacity| channel::<u8>(levels, capacity).unwrap_err();
        assert_eq!(err(0, 4), RingError::LevelsZero);
        assert_eq!(err(33, 4), RingError::LevelsAboveMax { levels: 33 });
        assert_eq!(err(1, 0), RingError::CapacityBelowMin { capacity: 0 });
        assert_eq!(err(1, 1), RingError::CapacityBelowMin { capacity: 1 });
        assert_eq!(
            err(1, 12),
            RingError::CapacityNotPowerOfTwo { capacity: 12 }
        );
        assert_eq!(
            err(1, RING_CAPACITY_MAX * 2),
            RingError::CapacityAboveMax {
                capacity: RING_CAPACITY_MAX * 2
            }
        );
        let (producer, consumer) = channel::<u8>(RING_LEVELS_MAX, RING_CAPACITY_MIN).unwrap();
        assert_eq!(producer.levels(), 32);
        assert_eq!(consumer.capacity_per_level(), 2);
        let (producer, _consumer) = channel::<u8>(1, RING_CAPACITY_MAX).unwrap();
        assert_eq!(producer.capacity_per_level(), RING_CAPACITY_MAX);
    }

    #[test]
    fn pops_in_strict_priority_then_fifo() {
        let (producer, mut consumer) = channel(4, 8).unwrap();
        for (level, item) in [(3, 30), (1, 10), (3, 31), (0, 0), (2, 20), (1, 11), (0, 1)] {
            push(&producer, level, item);
        }
        assert_eq!(consumer.len_hint(), 7);
        let popped: Vec<_> = std::iter::from_fn(|| consumer.pop()).collect();
        assert_eq!(
            popped,
            [(0, 0), (0, 1), (1, 10), (1, 11), (2, 20), (3, 30), (3, 31)]
        );
        assert!(consumer.is_empty());
        assert_eq!(consumer.len_hint(), 0);
    }

    #[test]
    fn highest_level_bit_works() {
        let (producer, mut consumer) = channel(RING_LEVELS_MAX, 2).unwrap();
        push(&producer, 31, 31);
        push(&producer, 16, 16);
        assert_eq!(consumer.pop(), Some((16, 16)));
        assert_eq!(consumer.pop(), Some((31, 31)));
        assert_eq!(consumer.pop(), None);
    }

    #[test]
    fn pop_bulk_drains_most_urgent_first_up_to_max() {
        let (producer, mut consumer) = channel(3, 4).unwrap();
        for (level, item) in [(2, 'c'), (0, 'a'), (1, 'b'), (0, 'A'), (2, 'C')] {
            push(&producer, level, item);
        }
        let mut out = Vec::new();
        assert_eq!(consumer.pop_bulk(&mut out, 3), 3);
        assert_eq!(out, [(0, 'a'), (0, 'A'), (1, 'b')]);
        // A more urgent item arriving between batches goes first.
        push(&producer, 0, 'z');
        assert_eq!(consumer.pop_bulk(&mut out, 10), 3);
        assert_eq!(out[3..], [(0, 'z'), (2, 'c'), (2, 'C')]);
        assert_eq!(consumer.pop_bulk(&mut out, 10), 0);
    }

    #[test]
    fn full_and_bad_level_hand_the_item_back() {
        let (producer, mut consumer) = channel(2, 4).unwrap();
        for i in 0..4 {
            push(&producer, 1, i);
        }
        match producer.push(1, 99) {
            Err(PushError::Full(item)) => assert_eq!(item, 99),
            other => panic!("expected Full, got {other:?}"),
        }
        // The other level is independent.
        push(&producer, 0, 7);
        match producer.push(2, 42) {
            Err(PushError::BadLevel(item)) => assert_eq!(item, 42),
            other => panic!("expected BadLevel, got {other:?}"),
        }
        assert_eq!(producer.push(5, 5).unwrap_err().into_inner(), 5);
        assert_eq!(consumer.pop(), Some((0, 7)));
        assert_eq!(consumer.pop(), Some((1, 0)));
        // One slot freed: one push fits, the next does not.
        push(&producer, 1, 4);
        assert!(matches!(producer.push(1, 5), Err(PushError::Full(5))));
        let rest: Vec<_> = std::iter::from_fn(|| consumer.pop()).collect();
        assert_eq!(rest, [(1, 1), (1, 2), (1, 3), (1, 4)]);
    }

    #[test]
    fn wraps_around_the_slots_many_times() {
        let (producer, mut consumer) = channel(2, 2).unwrap();
        let mut next = [0u32; 2];
        let mut expect = [0u32; 2];
        for round in 0..50_000u32 {
            // Fill a varying amount, then drain it, so heads and tails meet at every offset.
            let fill = (round % 3) as usize;
            for i in 0..fill {
                let level = (round as usize + i) % 2;
                if producer.push(level, next[level]).is_ok() {
                    next[level] += 1;
                }
            }
            while let Some((level, item)) = consumer.pop() {
                assert_eq!(item, expect[level], "FIFO broken at level {level}");
                expect[level] += 1;
            }
        }
        assert_eq!(next, expect);
        assert!(next[0] > 10_000 && next[1] > 10_000);
    }

    #[test]
    fn wraps_around_usize_positions() {
        let capacity = 4;
        let start = 0usize.wrapping_sub(capacity * 3);
        let (producer, mut consumer) = channel_from(1, capacity, start).unwrap();
        for i in 0..(capacity * 6) as u32 {
            push(&producer, 0, i);
            push(&producer, 0, i + 1000);
            assert_eq!(consumer.pop(), Some((0, i)));
            assert_eq!(consumer.len_hint(), 1);
            assert_eq!(consumer.pop(), Some((0, i + 1000)));
        }
        for i in 0..capacity as u32 {
            push(&producer, 0, i);
        }
        assert!(matches!(producer.push(0, 9), Err(PushError::Full(9))));
        assert_eq!(consumer.len_hint(), capacity);
        // Positions have wrapped past zero.
        assert!(consumer.heads[0] < start);
    }

    /// Items counted when dropped, to check nothing leaks and nothing is dropped twice.
    struct Counted(Arc<StdAtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn drop_drops_remaining_items_once() {
        let dropped = Arc::new(StdAtomicUsize::new(0));
        let count = || dropped.load(std::sync::atomic::Ordering::Relaxed);
        {
            let (producer, mut consumer) = channel(3, 4).unwrap();
            for level in 0..3 {
                for _ in 0..3 {
                    push(&producer, level, Counted(dropped.clone()));
                }
            }
            drop(consumer.pop());
            assert_eq!(count(), 1);
            // The consumer goes first; pushes still land and must still be dropped.
            drop(consumer);
            push(&producer, 2, Counted(dropped.clone()));
            assert_eq!(count(), 1);
        }
        assert_eq!(count(), 10);

        // Also after wrapping, with slots in every state.
        dropped.store(0, std::sync::atomic::Ordering::Relaxed);
        {
            let (producer, mut consumer) = channel_from(1, 4, 0usize.wrapping_sub(4)).unwrap();
            for _ in 0..6 {
                push(&producer, 0, Counted(dropped.clone()));
                drop(consumer.pop());
            }
            push(&producer, 0, Counted(dropped.clone()));
            push(&producer, 0, Counted(dropped.clone()));
            assert_eq!(count(), 6);
        }
        assert_eq!(count(), 8);
    }

    #[test]
    fn parking_asks_exactly_one_push_to_wake() {
        let (producer, mut consumer) = channel(2, 4).unwrap();
        assert!(consumer.prepare_park());
        assert_eq!(producer.push(1, 1).unwrap(), Wake::NeedsWake);
        assert_eq!(producer.push(0, 2).unwrap(), Wake::NotNeeded);
        consumer.cancel_park();
        // Items are waiting: do not sleep.
        assert!(!consumer.prepare_park());
        assert_eq!(producer.push(0, 3).unwrap(), Wake::NotNeeded);
        assert_eq!(consumer.pop_bulk(&mut Vec::new(), 10), 3);
        // The bit of a drained level is cleared by the pop that finds it empty, after which
        // parking is allowed again.
        assert_eq!(consumer.pop(), None);
        assert!(consumer.prepare_park());
        consumer.cancel_park();
        assert_eq!(producer.push(0, 4).unwrap(), Wake::NotNeeded);
    }

    /// Items in the stress tests: (producer, sequence number).
    type Tagged = (usize, u32);

    /// Pushes `count` tagged items from each of `producers` threads, spreading them over the
    /// levels; the consumer checks nothing is lost or duplicated and each producer's items come
    /// out of a level in the order they went in.
    fn stress(producers: usize, count: u32, levels: usize, capacity: usize) {
        let (producer, mut consumer) = channel::<Tagged>(levels, capacity).unwrap();
        let handles: Vec<_> = (0..producers)
            .map(|id| {
                let producer = producer.clone();
                std::thread::spawn(move || {
                    for seq in 0..count {
                        let level = (seq as usize * 7 + id) % levels;
                        let mut item = (id, seq);
                        loop {
                            match producer.push(level, item) {
                                Ok(_) => break,
                                Err(PushError::Full(back)) => {
                                    item = back;
                                    std::thread::yield_now();
                                }
                                Err(other) => panic!("unexpected {other:?}"),
                            }
                        }
                    }
                })
            })
            .collect();
        drop(producer);
        drain_in_order(
            &mut consumer,
            handles,
            count,
            levels,
            |level, &(id, seq)| {
                assert_eq!(
                    (seq as usize * 7 + id) % levels,
                    level,
                    "item on wrong level"
                );
                (id, seq)
            },
        );
    }

    /// Pops until every producer's `count` items came, checking that each producer's items of a
    /// level arrive in the order it sent them (`place` gives an item's producer and sequence
    /// number, and checks its level), then joins the producers and checks the ring is empty.
    fn drain_in_order<T>(
        consumer: &mut Consumer<T>,
        handles: Vec<std::thread::JoinHandle<()>>,
        count: u32,
        levels: usize,
        place: impl Fn(usize, &T) -> (usize, u32),
    ) {
        let producers = handles.len();
        let total = producers * count as usize;
        // Per (producer, level): the last sequence number seen there, or None before any.
        let mut last: Vec<Vec<Option<u32>>> = vec![vec![None; levels]; producers];
        let mut seen = vec![0u32; producers];
        let mut received = 0;
        let mut batch = Vec::with_capacity(64);
        while received < total {
            batch.clear();
            if consumer.pop_bulk(&mut batch, 64) == 0 {
                std::thread::yield_now();
                continue;
            }
            for (level, item) in &batch {
                let (id, seq) = place(*level, item);
                if let Some(previous) = last[id][*level] {
                    assert!(
                        seq > previous,
                        "producer {id} level {level}: {seq} after {previous}"
                    );
                }
                last[id][*level] = Some(seq);
                seen[id] += 1;
                received += 1;
            }
        }
        for handle in handles {
            handle.join().unwrap();
        }
        assert!(consumer.pop().is_none());
        assert!(
            seen.iter().all(|&n| n == count),
            "per-producer counts {seen:?}"
        );
    }

    #[test]
    fn stress_three_producers_one_level() {
        with_timeout(Duration::from_secs(120), || stress(3, 100_000, 1, 64));
    }

    #[test]
    fn stress_three_producers_four_levels() {
        with_timeout(Duration::from_secs(120), || stress(3, 100_000, 4, 16));
    }

    /// Bulk-pushes and insists the whole batch went in; returns the wake-up.
    fn push_all<T: Send + Clone>(producer: &Producer<T>, level: usize, items: &[T]) -> Wake {
        let mut batch = items.to_vec();
        let pushed = producer.push_bulk(level, &mut batch).expect("bad level");
        assert_eq!(pushed.pushed, items.len(), "batch did not fit");
        assert!(batch.is_empty());
        pushed.wake
    }

    #[test]
    fn push_bulk_keeps_order_within_a_lane() {
        let (producer, mut consumer) = channel(1, 8).unwrap();
        push(&producer, 0, 0);
        let _ = push_all(&producer, 0, &[1, 2, 3]);
        push(&producer, 0, 4);
        let _ = push_all(&producer, 0, &[5, 6]);
        let _ = push_all(&producer, 0, &[7]);
        assert_eq!(consumer.len_hint(), 8);
        let mut out = Vec::new();
        assert_eq!(consumer.pop_bulk(&mut out, 100), 8);
        let items: Vec<_> = out.iter().map(|&(_, item)| item).collect();
        assert_eq!(items, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(out.iter().all(|&(level, _)| level == 0));
        assert_eq!(consumer.pop(), None);
    }

    #[test]
    fn push_bulk_when_full_pushes_what_fits_and_leaves_the_rest_in_order() {
        let (producer, mut consumer) = channel(2, 4).unwrap();
        push(&producer, 1, 0);
        let mut batch = vec![1, 2, 3, 4, 5, 6];
        let pushed = producer.push_bulk(1, &mut batch).unwrap();
        assert_eq!(pushed.pushed, 3);
        assert_eq!(batch, [4, 5, 6]);
        // Full: nothing moves.
        let pushed = producer.push_bulk(1, &mut batch).unwrap();
        assert_eq!((pushed.pushed, pushed.wake), (0, Wake::NotNeeded));
        assert_eq!(batch, [4, 5, 6]);
        // The other level is independent.
        let _ = push_all(&producer, 0, &[100]);
        assert_eq!(consumer.pop(), Some((0, 100)));
        assert_eq!(consumer.pop(), Some((1, 0)));
        assert_eq!(consumer.pop(), Some((1, 1)));
        // Two slots freed: two of the three fit.
        assert_eq!(producer.push_bulk(1, &mut batch).unwrap().pushed, 2);
        assert_eq!(batch, [6]);
        let rest: Vec<_> = std::iter::from_fn(|| consumer.pop()).collect();
        assert_eq!(rest, [(1, 2), (1, 3), (1, 4), (1, 5)]);
        // A batch longer than a whole lap fills the lap, no more.
        let mut long: Vec<u32> = (10..20).collect();
        assert_eq!(producer.push_bulk(1, &mut long).unwrap().pushed, 4);
        assert_eq!(long, [14, 15, 16, 17, 18, 19]);
        let rest: Vec<_> = std::iter::from_fn(|| consumer.pop()).collect();
        assert_eq!(rest, [(1, 10), (1, 11), (1, 12), (1, 13)]);
    }

    #[test]
    fn push_bulk_to_a_bad_level_pushes_nothing() {
        let (producer, mut consumer) = channel(2, 4).unwrap();
        let mut batch = vec![1, 2];
        assert_eq!(
            producer.push_bulk(2, &mut batch),
            Err(BadLevel { level_index: 2 })
        );
        assert_eq!(batch, [1, 2]);
        assert_eq!(consumer.pop(), None);
    }

    #[test]
    fn bulk_pushes_pop_in_strict_priority_then_fifo() {
        let (producer, mut consumer) = channel(4, 8).unwrap();
        let _ = push_all(&producer, 3, &[30, 31, 32]);
        let _ = push_all(&producer, 1, &[10, 11]);
        let _ = push_all(&producer, 0, &[0]);
        push(&producer, 2, 20);
        let _ = push_all(&producer, 0, &[1, 2]);
        let _ = push_all(&producer, 2, &[21, 22, 23]);
        // Small batches, so that runs are cut by `max` as well as by the lanes.
        let mut out = Vec::new();
        while consumer.pop_bulk(&mut out, 3) > 0 {}
        assert_eq!(
            out,
            [
                (0, 0),
                (0, 1),
                (0, 2),
                (1, 10),
                (1, 11),
                (2, 20),
                (2, 21),
                (2, 22),
                (2, 23),
                (3, 30),
                (3, 31),
                (3, 32)
            ]
        );
        // A more urgent batch arriving between two pop_bulks goes first.
        let _ = push_all(&producer, 3, &[33, 34, 35]);
        out.clear();
        assert_eq!(consumer.pop_bulk(&mut out, 1), 1);
        let _ = push_all(&producer, 1, &[12, 13]);
        assert_eq!(consumer.pop_bulk(&mut out, 10), 4);
        assert_eq!(out, [(3, 33), (1, 12), (1, 13), (3, 34), (3, 35)]);
    }

    #[test]
    fn push_bulk_wakes_exactly_as_push_does() {
        let (producer, mut consumer) = channel(2, 4).unwrap();
        let doorbell = || producer.shared.doorbell.load(Ordering::Relaxed);
        assert!(consumer.prepare_park());
        // An empty batch writes nothing, not even the doorbell: the consumer stays parked.
        let before = doorbell();
        let pushed = producer.push_bulk(1, &mut Vec::new()).unwrap();
        assert_eq!((pushed.pushed, pushed.wake), (0, Wake::NotNeeded));
        assert_eq!(doorbell(), before);
        // The first batch wakes it, once.
        assert_eq!(push_all(&producer, 1, &[1, 2, 3]), Wake::NeedsWake);
        assert_eq!(push_all(&producer, 0, &[4]), Wake::NotNeeded);
        assert_eq!(producer.push(0, 5).unwrap(), Wake::NotNeeded);
        consumer.cancel_park();
        assert!(!consumer.prepare_park());
        assert_eq!(consumer.pop_bulk(&mut Vec::new(), 10), 5);
        assert_eq!(consumer.pop(), None);
        assert!(consumer.prepare_park());
        // A push_bulk that fits nothing writes nothing: fill level 1 while parked, then try more.
        assert_eq!(push_all(&producer, 1, &[6, 7, 8, 9]), Wake::NeedsWake);
        let before = doorbell();
        let pushed = producer.push_bulk(1, &mut vec![10]).unwrap();
        assert_eq!((pushed.pushed, pushed.wake), (0, Wake::NotNeeded));
        assert_eq!(doorbell(), before);
        consumer.cancel_park();
        assert_eq!(consumer.pop_bulk(&mut Vec::new(), 10), 4);
        // A single push after a bulk one is told to wake a parked consumer too.
        assert_eq!(consumer.pop(), None);
        assert!(consumer.prepare_park());
        assert_eq!(producer.push(1, 11).unwrap(), Wake::NeedsWake);
    }

    #[test]
    fn push_bulk_wraps_around_usize_positions() {
        let capacity = 4;
        let start = 0usize.wrapping_sub(capacity * 3);
        let (producer, mut consumer) = channel_from(1, capacity, start).unwrap();
        let mut next = 0u32;
        let mut expect = 0u32;
        for round in 0..(capacity * 8) {
            // Batches of 1 to 5 against a lane of 4: some fit, some fit in part.
            let mut batch: Vec<u32> = (next..next + (round % 5) as u32 + 1).collect();
            let pushed = producer.push_bulk(0, &mut batch).unwrap().pushed;
            next += pushed as u32;
            assert_eq!(
                batch.first().copied(),
                Some(next).filter(|_| !batch.is_empty())
            );
            // Drain all but one, so the heads and tails meet at every offset.
            while consumer.len_hint() > round % 2 {
                assert_eq!(consumer.pop(), Some((0, expect)));
                expect += 1;
            }
        }
        while let Some((_, item)) = consumer.pop() {
            assert_eq!(item, expect);
            expect += 1;
        }
        assert_eq!(expect, next);
        assert!(consumer.heads[0] < start, "positions did not wrap");
    }

    #[test]
    fn push_bulk_items_are_dropped_once() {
        let dropped = Arc::new(StdAtomicUsize::new(0));
        let count = || dropped.load(std::sync::atomic::Ordering::Relaxed);
        let mut left = Vec::new();
        {
            let (producer, mut consumer) = channel(1, 4).unwrap();
            let mut batch: Vec<_> = (0..6).map(|_| Counted(dropped.clone())).collect();
            assert_eq!(producer.push_bulk(0, &mut batch).unwrap().pushed, 4);
            drop(consumer.pop());
            assert_eq!(count(), 1);
            left.append(&mut batch);
        }
        // The ring dropped its 3; the 2 that did not fit are still the caller's.
        assert_eq!(count(), 4);
        drop(left);
        assert_eq!(count(), 6);
    }

    /// Items in the mixed stress test: (producer, sequence number, level pushed at).
    type Placed = (usize, u32, usize);

    /// Like [`stress`], with producer 0 pushing one item at a time and the others in batches of
    /// 1 to `capacity + 3` items (so some fit only in part), each batch at one level.
    fn stress_bulk(producers: usize, count: u32, levels: usize, capacity: usize) {
        let (producer, mut consumer) = channel::<Placed>(levels, capacity).unwrap();
        let handles: Vec<_> = (0..producers)
            .map(|id| {
                let producer = producer.clone();
                std::thread::spawn(move || {
                    let mut batch = Vec::with_capacity(capacity + 3);
                    let mut seq = 0;
                    let mut round = 0usize;
                    while seq < count {
                        let level = (round * 7 + id) % levels;
                        let size = if id == 0 {
                            1
                        } else {
                            round % (capacity + 3) + 1
                        };
                        let end = count.min(seq + size as u32);
                        batch.extend((seq..end).map(|s| (id, s, level)));
                        seq = end;
                        round += 1;
                        while !batch.is_empty() {
                            if id == 0 {
                                let Some(item) = batch.pop() else { break };
                                if let Err(PushError::Full(back)) = producer.push(level, item) {
                                    batch.push(back);
                                    std::thread::yield_now();
                                }
                            } else if producer.push_bulk(level, &mut batch).unwrap().pushed == 0 {
                                std::thread::yield_now();
                            }
                        }
                    }
                })
            })
            .collect();
        drop(producer);
        drain_in_order(
            &mut consumer,
            handles,
            count,
            levels,
            |level, &(id, seq, at)| {
                assert_eq!(level, at, "item on wrong level");
                (id, seq)
            },
        );
    }

    #[test]
    fn stress_bulk_three_producers_one_level() {
        with_timeout(Duration::from_secs(120), || stress_bulk(3, 100_000, 1, 16));
    }

    #[test]
    fn stress_bulk_three_producers_four_levels() {
        with_timeout(Duration::from_secs(120), || stress_bulk(3, 100_000, 4, 8));
    }

    #[test]
    fn park_and_wake_with_real_threads_never_hangs() {
        with_timeout(Duration::from_secs(120), || {
            const PRODUCERS: usize = 3;
            const COUNT: u32 = 20_000;
            let (producer, mut consumer) = channel::<Tagged>(2, 8).unwrap();
            let parks = Arc::new(StdAtomicUsize::new(0));
            let consumer_thread = {
                let parks = parks.clone();
                std::thread::spawn(move || {
                    let mut next = [0u32; PRODUCERS];
                    let mut received = 0;
                    while received < PRODUCERS * COUNT as usize {
                        if let Some((_, (id, seq))) = consumer.pop() {
                            // Each producer pushes to one level, so its items come out in order.
                            assert_eq!(seq, next[id], "producer {id}");
                            next[id] += 1;
                            received += 1;
                            continue;
                        }
                        if consumer.prepare_park() {
                            parks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            // No timeout: a lost wake-up hangs here and the guard fails the test.
                            std::thread::park();
                            consumer.cancel_park();
                        }
                    }
                })
            };
            let wakee = consumer_thread.thread().clone();
            let producers: Vec<_> = (0..PRODUCERS)
                .map(|id| {
                    let producer = producer.clone();
                    let wakee = wakee.clone();
                    std::thread::spawn(move || {
                        let mut wakes = 0usize;
                        for seq in 0..COUNT {
                            let mut item = (id, seq);
                            loop {
                                match producer.push(id % 2, item) {
                                    Ok(wake) => {
                                        if wake.is_needed() {
                                            wakes += 1;
                                            wakee.unpark();
                                        }
                                        break;
                                    }
                                    Err(PushError::Full(back)) => {
                                        item = back;
                                        std::thread::yield_now();
                                    }
                                    Err(other) => panic!("unexpected {other:?}"),
                                }
                            }
                            // Pause now and then so the consumer runs dry and parks.
                            if seq % 64 == 0 {
                                std::thread::sleep(Duration::from_micros(50));
                            }
                        }
                        wakes
                    })
                })
                .collect();
            drop(producer);
            let wakes: usize = producers.into_iter().map(|h| h.join().unwrap()).sum();
            consumer_thread.join().unwrap();
            let parks = parks.load(std::sync::atomic::Ordering::Relaxed);
            // The producers pause hundreds of times, so the consumer runs dry and parks; if it
            // never did, this test exercised nothing.
            assert!(parks > 0 && wakes > 0, "{parks} parks, {wakes} wakes");
        });
    }

    #[test]
    fn park_and_wake_with_bulk_pushes_never_hangs() {
        with_timeout(Duration::from_secs(120), || {
            const PRODUCERS: usize = 3;
            const COUNT: u32 = 20_000;
            let (producer, mut consumer) = channel::<Tagged>(2, 8).unwrap();
            let parks = Arc::new(StdAtomicUsize::new(0));
            let consumer_thread = {
                let parks = parks.clone();
                std::thread::spawn(move || {
                    let mut next = [0u32; PRODUCERS];
                    let mut received = 0;
                    let mut out = Vec::with_capacity(16);
                    while received < PRODUCERS * COUNT as usize {
                        out.clear();
                        if consumer.pop_bulk(&mut out, 16) > 0 {
                            for &(_, (id, seq)) in &out {
                                assert_eq!(seq, next[id], "producer {id}");
                                next[id] += 1;
                                received += 1;
                            }
                            continue;
                        }
                        if consumer.prepare_park() {
                            parks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            std::thread::park();
                            consumer.cancel_park();
                        }
                    }
                })
            };
            let wakee = consumer_thread.thread().clone();
            let producers: Vec<_> = (0..PRODUCERS)
                .map(|id| {
                    let producer = producer.clone();
                    let wakee = wakee.clone();
                    std::thread::spawn(move || {
                        let mut wakes = 0usize;
                        // Batches of 2 to 11 against lanes of 8: some fit only in part.
                        let mut batch = Vec::with_capacity(16);
                        let mut seq = 0;
                        let mut round = 0u32;
                        while seq < COUNT {
                            let end = COUNT.min(seq + round % 10 + 2);
                            batch.extend((seq..end).map(|s| (id, s)));
                            seq = end;
                            round += 1;
                            while !batch.is_empty() {
                                let pushed = producer.push_bulk(id % 2, &mut batch).unwrap();
                                if pushed.wake.is_needed() {
                                    wakes += 1;
                                    wakee.unpark();
                                }
                                if pushed.pushed == 0 {
                                    std::thread::yield_now();
                                }
                            }
                            if round.is_multiple_of(16) {
                                std::thread::sleep(Duration::from_micros(50));
                            }
                        }
                        wakes
                    })
                })
                .collect();
            drop(producer);
            let wakes: usize = producers.into_iter().map(|h| h.join().unwrap()).sum();
            consumer_thread.join().unwrap();
            let parks = parks.load(std::sync::atomic::Ordering::Relaxed);
            assert!(parks > 0 && wakes > 0, "{parks} parks, {wakes} wakes");
        });
    }
}

//! The delivery scheduler of one peer (a Service User northbound, a CSP link southbound):
//! strict priority, FIFO within a level, at the peer's rate, within its in-flight window
//! (ENGINE.md §1–§3). Sans-IO: time is an argument and the caller moves the bytes.
//!
//! # What it decides
//!
//! Frames wait in one FIFO queue per level. [`DeliveryScheduler::next_send`] hands out the head of
//! the most urgent non-empty level when three things allow it:
//!
//! 1. the peer is **available** (connected, not paused, not restricted);
//! 2. the **window** has room: at most `window` frames unacknowledged, and the last
//!    `window_reserved_top` slots are for level 1 only, so a window full of routine frames never
//!    holds back an urgent one;
//! 3. the **rate limiter** has a token (every frame costs one, urgent ones included: an SU that
//!    asked for a lower rate gets it for everything, urgent frames simply go first).
//!
//! If the most urgent waiting frame may not go, nothing goes: a level-N frame is never sent while
//! a more urgent one waits and the peer could take it, and when the peer cannot take the urgent
//! one (window full), it cannot take the routine one either.
//!
//! # Acknowledgement and reconnection
//!
//! A frame handed out moves to the unacknowledged list with its `msg_id` (1, 2, 3… per
//! connection). A cumulative ACK releases every frame up to its `msg_id`. When the connection is
//! lost, unacknowledged frames go back to the *front* of their level's queue in their original
//! order, so after the reconnect they are re-sent first within their level, and in priority order
//! across levels (PROTOCOL.md, "Connection life" step 3). Reconnecting with a backlog starts the
//! limiter's release ramp (ENGINE.md §3), so the adapter is not hit by everything at once.
//!
//! # Several connections
//!
//! A peer may hold several connections at once (a CSP link with `connections_max` above 1;
//! an SU always has one, connection 0). Each connection has its own `msg_id` sequence and its
//! own unacknowledged list; the window is the peer's, over all of them, and each connection
//! may hold at most its share of it (`window` divided by the connections open, rounded up), so
//! one that stops acknowledging cannot take the whole window. [`DeliveryScheduler::next_send_to`]
//! gives the next frame to the open connection with the fewest frames in flight (ties in turn).
//! When one connection goes, only its unacknowledged frames go back, each to its place by
//! arrival in its level's queue (every queue is kept in arrival order), to be re-sent on
//! another connection in priority order.
//!
//! The log records deliveries as one watermark per lane ("done through this frame"), so a
//! frame may be released only once every older frame of its lane has left. With one connection
//! ACKs come in that order. With several they need not (connection B acknowledges a frame sent
//! after one still in flight on connection A, or after one that came back from a closed
//! connection): such a frame is *retired*, held until nothing older of its lane is held, then
//! released. Retired frames still count in [`DeliveryScheduler::held`].
//!
//! # Bounds
//!
//! The scheduler holds at most `frames_max` frames, waiting and unacknowledged together;
//! [`DeliveryScheduler::enqueue`] hands the frame back beyond that, and the caller answers
//! NACK 5 (overloaded) or moves it to a lower tier. Re-queuing unacknowledged frames on a
//! disconnect never exceeds the bound, since they were already counted.

use std::collections::BTreeMap;

use crate::ids::Level;
use crate::limiter::{ReleaseStart, TokenBucket};
use crate::Nanos;

/// The settings of one peer's scheduler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliverySettings {
    /// Number of priority levels.
    pub levels: u8,
    /// In-flight window, frames.
    pub window: u32,
    /// Window slots only level 1 may use.
    pub window_reserved_top: u32,
    /// Most frames held, waiting and unacknowledged together.
    pub frames_max: usize,
    /// Strict priority (`true`) or first come, first served (`false`: the FIFO baseline, one
    /// queue, no reserved slots).
    pub prioritised: bool,
    /// The release ramp's starting share of the rate.
    pub release_start: ReleaseStart,
    /// The release ramp's length.
    pub release_ramp: Nanos,
}

impl DeliverySettings {
    /// Whether frames of `level` may fill the whole window (urgent ones, or every one in FIFO
    /// mode) rather than stop `window_reserved_top` short of it.
    #[inline]
    fn full_window(&self, level: Level) -> bool {
        level == Level::URGENT || !self.prioritised
    }
}

/// Why a frame may not be sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Nothing is waiting.
    Empty,
    /// The peer is unavailable (disconnected, paused or restricted).
    Unavailable,
    /// The in-flight window is full for the most urgent waiting frame.
    Window,
    /// The rate limiter has no token now; come back at this instant, when it has enough to be
    /// worth a wake-up ([`TokenBucket::next_wake`]).
    Rate(Nanos),
    /// The most urgent waiting frames of this lane (queue index) are on disk only: load some
    /// with [`DeliveryScheduler::load`] and ask again.
    Load(usize),
}

/// A frame handed out for sending.
#[derive(Debug)]
pub struct Outgoing<'a, T> {
    /// The connection it is for (0 for a peer with one connection).
    pub conn: usize,
    /// The `msg_id` to write in its header: its connection's next.
    pub msg_id: u64,
    /// Its level, to write in the header's `priority` byte.
    pub level: Level,
    /// The frame.
    pub item: &'a T,
}

/// Takes the items of the first `n` slots of `run` out of `slots` (each slot freed to `free`)
/// and hands each to `each` with its level and arrival: the release loop of an ACK, one copy for
/// both of its cases so that the one-connection case keeps a loop of its own (no branch per
/// frame) without a second body to keep in step.
#[inline(always)]
fn take_run<T>(
    slots: &mut [Slot<T>],
    free: &mut Vec<usize>,
    run: &Ring,
    n: usize,
    mut each: impl FnMut(Level, u64, T),
) {
    for k in 0..n {
        let Some(at) = run.get(k) else {
            break;
        };
        let Some(slot) = slots.get_mut(at) else {
            continue;
        };
        if let Some(item) = slot.item.take() {
            free.push(at);
            each(slot.level, slot.arrival, item);
        }
    }
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Frames handed out, re-sends included.
    pub sent: u64,
    /// Frames handed out again after a reconnect.
    pub resent: u64,
    /// Frames acknowledged by the peer.
    pub acked: u64,
}

/// A frame held in memory, waiting or in flight: it stays in its slot from `enqueue` until it
/// is released, and the queues and unacknowledged lists hold slot numbers, so a frame is moved
/// in once and out once rather than from queue to queue.
#[derive(Debug)]
struct Slot<T> {
    /// `None` while the slot is free.
    item: Option<T>,
    level: Level,
    /// It was sent before, on a connection that went.
    resend: bool,
    /// When it joined the scheduler (a count): every queue is in this order.
    arrival: u64,
}

/// A FIFO of slot numbers: a ring whose capacity is a power of two, so that a push or a pop is
/// a few instructions, inlined on the send path (std's `VecDeque` push and pop were calls). It
/// grows like a `VecDeque` (doubling) and, like one, keeps its capacity.
#[derive(Debug, Default)]
struct Ring {
    /// The slots; its length is the capacity, 0 or a power of two.
    buf: Vec<usize>,
    /// Where the front is.
    head: usize,
    len: usize,
}

impl Ring {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`th from the front.
    #[inline]
    fn get(&self, i: usize) -> Option<usize> {
        if i >= self.len {
            return None;
        }
        let at = (self.head + i) & (self.buf.len() - 1);
        debug_assert!(at < self.buf.len());
        // SAFETY: a ring never holds more than its capacity (`len <= buf.len()`: `push_back`
        // grows a full ring before it adds, `grow` and `set` allocate more than they put in),
        // so `i < len` means `buf.len()` is not 0; it is a power of two (`grow` doubles or
        // takes 8, `set` takes a power of two), so the index masked with `buf.len() - 1` is
        // below it.
        Some(unsafe { *self.buf.get_unchecked(at) })
    }

    #[inline]
    fn front(&self) -> Option<usize> {
        self.get(0)
    }

    fn back(&self) -> Option<usize> {
        self.len.checked_sub(1).and_then(|i| self.get(i))
    }

    #[inline]
    fn push_back(&mut self, v: usize) {
        if self.len == self.buf.len() {
            self.grow();
        }
        let at = (self.head + self.len) & (self.buf.len() - 1);
        debug_assert!(at < self.buf.len());
        // SAFETY: after the grow above `len < buf.len()`, so `buf.len()` is not 0, and it is a
        // power of two (see `get`): the masked index is below it.
        unsafe { *self.buf.get_unchecked_mut(at) = v };
        self.len += 1;
    }

    #[inline]
    fn pop_front(&mut self) -> Option<usize> {
        let v = self.front()?;
        self.drop_front();
        Some(v)
    }

    /// Drops the front, which the caller has just seen (`front` was `Some`).
    #[inline]
    fn drop_front(&mut self) {
        debug_assert!(self.len > 0, "drop_front on an empty ring");
        self.head = (self.head + 1) & self.buf.len().wrapping_sub(1);
        self.len -= 1;
    }

    /// Drops the first `n` (at most all).
    #[inline]
    fn skip(&mut self, n: usize) {
        let n = n.min(self.len);
        if n > 0 {
            self.head = (self.head + n) & (self.buf.len() - 1);
            self.len -= n;
        }
    }

    /// Appends the first `n` of `from` (at most all of it), in order: a send run's slots going
    /// from their lane to the unacknowledged, copied a contiguous piece at a time.
    fn extend_from_front(&mut self, from: &Ring, n: usize) {
        let n = n.min(from.len);
        while self.len + n > self.buf.len() {
            self.grow();
        }
        let mut copied = 0;
        while copied < n {
            // Both capacities are powers of two (`get`), and not 0: `from` holds `n > 0`, and
            // this one was grown past `len + n`.
            let src = (from.head + copied) & (from.buf.len() - 1);
            let dst = (self.head + self.len) & (self.buf.len() - 1);
            let piece = (n - copied)
                .min(from.buf.len() - src)
                .min(self.buf.len() - dst);
            let (Some(to), Some(source)) = (
                self.buf.get_mut(dst..dst + piece),
                from.buf.get(src..src + piece),
            ) else {
                return;
            };
            to.copy_from_slice(source);
            self.len += piece;
            copied += piece;
        }
    }

    /// Front to back.
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter_map(|i| self.get(i))
    }

    /// Replaces the contents with `items`, front first. The capacity stays a power of two and
    /// at least what it holds, which `get` and `push_back` rely on.
    fn set(&mut self, items: &[usize]) {
        let capacity = items.len().next_power_of_two().max(self.buf.len()).max(8);
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(items);
        buf.resize(capacity, 0);
        self.buf = buf;
        self.head = 0;
        self.len = items.len();
    }

    /// Takes everything out, front first (the capacity is kept).
    fn take_all(&mut self) -> Vec<usize> {
        let all: Vec<usize> = self.iter().collect();
        self.head = 0;
        self.len = 0;
        all
    }

    /// Doubles the capacity (8 at first): always a power of two, always more than it holds,
    /// which `get` and `push_back` rely on.
    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let items: Vec<usize> = self.iter().collect();
        let capacity = (self.buf.len() * 2).max(8);
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(&items);
        buf.resize(capacity, 0);
        self.buf = buf;
        self.head = 0;
    }
}

/// One connection's sending side.
#[derive(Debug)]
struct Sender {
    open: bool,
    next_msg_id: u64,
    /// Slots of the frames sent and not yet acknowledged, in send order: the front one has
    /// `msg_id` `next_msg_id - unacked.len()` (a connection's `msg_id`s are consecutive).
    unacked: Ring,
}

impl Sender {
    /// The `msg_id` of the oldest unacknowledged frame (if there is one).
    fn first_unacked_msg_id(&self) -> u64 {
        self.next_msg_id - self.unacked.len() as u64
    }

    fn new() -> Self {
        Sender {
            open: false,
            next_msg_id: 1,
            unacked: Ring::default(),
        }
    }
}

/// One peer's scheduler. `T` is the frame type; the scheduler never looks inside it.
#[derive(Debug)]
pub struct DeliveryScheduler<T> {
    settings: DeliverySettings,
    /// The in-flight window, frames (`settings.window`).
    window: usize,
    /// The part of the window every level may use (`window - window_reserved_top`).
    window_routine: usize,
    /// Every frame held in memory (waiting, in flight), by slot; never more slots than the most
    /// frames held at once (at most `frames_max`, plus what `load` and a disconnect put back).
    slots: Vec<Slot<T>>,
    /// Free slots, the most recently freed last.
    free: Vec<usize>,
    /// Per level (index 0 = level 1), or one queue when not prioritised: slots, each queue in
    /// arrival order.
    queues: Vec<Ring>,
    /// Bit i set = `queues[i]` is non-empty or lane i has spilled frames.
    nonempty: u32,
    waiting: usize,
    /// Per lane: frames waiting on disk only (the SURB), behind those in `queues`.
    spilled: Vec<u64>,
    /// Per connection (0 first; more only for a peer that opens several).
    senders: Vec<Sender>,
    /// Connections open.
    open: usize,
    /// Frames in flight on every connection together.
    in_flight: usize,
    /// Acknowledged frames waiting for older frames of their lane to leave, by arrival.
    retired: BTreeMap<u64, (Level, T)>,
    next_arrival: u64,
    /// Where the search for the least loaded connection starts, so that ties go in turn.
    turn: usize,
    /// The last lane (`queues.len() - 1`; 0 when not prioritised): a level's lane is its index,
    /// at most this.
    lane_max: usize,
    paused: bool,
    /// `open > 0 && !paused`, kept in step with both: what every send checks first.
    available: bool,
    limiter: TokenBucket,
    /// Set when the limiter ran out of tokens: the peer is being paced, and sending resumes only
    /// once a wake-up's worth of tokens ([`TokenBucket::wake_tokens`]) is in. A paced peer then
    /// gets its frames in batches, one write and one wake-up per batch, rather than one frame
    /// each time something else (an ACK) wakes the worker; no token is lost by it, since the
    /// batch is taken long before the bucket is full.
    paced: bool,
    /// Whether a paced peer waits for a wake-up's worth of tokens (`paced` above). Off when the
    /// event loop cannot wake in time for it (a millisecond timer): then every token is taken
    /// as soon as anything wakes the loop.
    batch_wakes: bool,
    stats: DeliveryStats,
}

impl<T> DeliveryScheduler<T> {
    /// A scheduler sending at `limiter`'s rate.
    pub fn new(settings: DeliverySettings, limiter: TokenBucket) -> Self {
        let queue_count = if settings.prioritised {
            usize::from(settings.levels.max(1))
        } else {
            1
        };
        DeliveryScheduler {
            settings,
            window: settings.window as usize,
            window_routine: settings.window.saturating_sub(settings.window_reserved_top) as usize,
            slots: Vec::new(),
            free: Vec::new(),
            queues: (0..queue_count).map(|_| Ring::default()).collect(),
            nonempty: 0,
            waiting: 0,
            spilled: vec![0; queue_count],
            senders: vec![Sender::new()],
            open: 0,
            in_flight: 0,
            retired: BTreeMap::new(),
            next_arrival: 0,
            turn: 0,
            lane_max: queue_count - 1,
            paused: false,
            available: false,
            limiter,
            paced: false,
            batch_wakes: true,
            stats: DeliveryStats::default(),
        }
    }

    /// Counts `n` frames of `level` as waiting on disk only, behind everything in memory.
    pub fn add_spilled(&mut self, level: Level, n: u64) {
        if n > 0 {
            let i = self.queue_index(level);
            self.spilled[i] += n;
            self.nonempty |= 1 << i;
        }
    }

    /// Counts `n` frames as waiting on disk only in a lane (after recovery, or to correct the
    /// count when the disk holds fewer than counted).
    pub fn set_spilled_lane(&mut self, lane: usize, n: u64) {
        if let Some(count) = self.spilled.get_mut(lane) {
            *count = n;
            if n > 0 {
                self.nonempty |= 1 << lane;
            } else if self.queues[lane].is_empty() {
                self.nonempty &= !(1 << lane);
            }
        }
    }

    /// Frames waiting in memory in a lane.
    pub fn waiting_in(&self, lane: usize) -> usize {
        self.queues.get(lane).map_or(0, Ring::len)
    }

    /// Number of lanes (levels, or 1 in FIFO mode).
    pub fn lanes(&self) -> usize {
        self.queues.len()
    }

    /// Frames of a lane waiting on disk only.
    pub fn spilled_in(&self, lane: usize) -> u64 {
        self.spilled.get(lane).copied().unwrap_or(0)
    }

    /// A spilled frame of `level`, loaded back into memory: it joins the back of its lane (in
    /// memory, everything before it has already been loaded or sent).
    pub fn load(&mut self, level: Level, item: T) {
        let i = self.queue_index(level);
        self.spilled[i] = self.spilled[i].saturating_sub(1);
        self.push_back(i, level, item);
    }

    /// Queues a frame at the back of queue `i`, as the newest arrival.
    #[inline(always)]
    fn push_back(&mut self, i: usize, level: Level, item: T) {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let slot = Slot {
            item: Some(item),
            level,
            resend: false,
            arrival,
        };
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at] = slot;
                at
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.queues[i].push_back(at);
        self.nonempty |= 1 << i;
        self.waiting += 1;
    }

    /// Takes the frame out of slot `at` and frees the slot.
    #[inline]
    fn take_slot(&mut self, at: usize) -> Option<(Level, T)> {
        let slot = self.slots.get_mut(at)?;
        let item = slot.item.take()?;
        self.free.push(at);
        Some((slot.level, item))
    }

    /// The level of the frame in slot `at`.
    fn level_of(&self, at: usize) -> Level {
        self.slots.get(at).map_or(Level::URGENT, |s| s.level)
    }

    /// The arrival of the frame in slot `at`.
    fn arrival_of(&self, at: usize) -> u64 {
        self.slots.get(at).map_or(u64::MAX, |s| s.arrival)
    }

    /// Whether a frame of `lane` has been sent and not yet acknowledged, on any connection.
    /// (A retired frame, acknowledged and not yet released, does not count: it is newer than
    /// a frame of its lane still held, and an expiry takes the oldest first.)
    pub fn unacked_in(&self, lane: usize) -> bool {
        self.senders
            .iter()
            .flat_map(|s| s.unacked.iter())
            .any(|at| self.queue_index(self.level_of(at)) == lane)
    }

    /// Takes out, from the front of every lane, the waiting frames for which `expired` says
    /// so (the oldest wait at the front); unacknowledged frames are left to their peer.
    ///
    /// A lane with a frame in flight is left alone: the log records acknowledgements and
    /// expiries as one number per lane (everything through this frame is done), so a frame may
    /// leave only after every older frame of its lane, and the frames in flight are older than
    /// any waiting. Its expired frames go once the frames in flight are acknowledged, or come
    /// back to the front of the lane when their connection goes.
    pub fn take_expired(&mut self, mut expired: impl FnMut(&T) -> bool) -> Vec<(Level, T)> {
        let mut out = Vec::new();
        for i in 0..self.queues.len() {
            if self.unacked_in(i) {
                continue;
            }
            while let Some(at) = self.queues[i].front() {
                let is_expired = self
                    .slots
                    .get(at)
                    .and_then(|s| s.item.as_ref())
                    .is_some_and(&mut expired);
                if !is_expired {
                    break;
                }
                self.queues[i].pop_front();
                self.waiting -= 1;
                if let Some(taken) = self.take_slot(at) {
                    out.push(taken);
                }
            }
            if self.queues[i].is_empty() && self.spilled[i] == 0 {
                self.nonempty &= !(1 << i);
            }
        }
        out
    }

    #[inline]
    fn queue_index(&self, level: Level) -> usize {
        level.index().min(self.lane_max)
    }

    /// Queues a frame at the back of its level, or hands it back when the scheduler is full.
    #[inline(always)]
    pub fn enqueue(&mut self, level: Level, item: T) -> Result<(), T> {
        if self.held() >= self.settings.frames_max {
            return Err(item);
        }
        let i = self.queue_index(level);
        self.push_back(i, level, item);
        Ok(())
    }

    /// Frames held in memory: waiting, unacknowledged, and acknowledged but not yet released.
    pub fn held(&self) -> usize {
        self.waiting + self.in_flight + self.retired.len()
    }

    /// Frames waiting to be sent, in memory and spilled.
    pub fn waiting(&self) -> usize {
        self.waiting + self.spilled.iter().sum::<u64>() as usize
    }

    /// Frames waiting at one level (in FIFO mode every frame is counted at its own level).
    pub fn waiting_at(&self, level: Level) -> usize {
        if self.settings.prioritised {
            self.queues.get(level.index()).map_or(0, Ring::len)
        } else {
            self.queues[0]
                .iter()
                .filter(|&at| self.level_of(at) == level)
                .count()
        }
    }

    /// Frames sent and not yet acknowledged, on every connection.
    pub fn unacked(&self) -> usize {
        self.in_flight
    }

    /// Frames sent on connection `conn` and not yet acknowledged.
    pub fn unacked_on(&self, conn: usize) -> usize {
        self.senders.get(conn).map_or(0, |s| s.unacked.len())
    }

    /// Whether frames may be sent: a connection is open and the peer is not paused.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.available
    }

    /// Sets `available` after `open` or `paused` changed.
    fn availability_changed(&mut self) {
        self.available = self.open > 0 && !self.paused;
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.open > 0
    }

    /// Whether connection `conn` is open.
    pub fn is_open(&self, conn: usize) -> bool {
        self.senders.get(conn).is_some_and(|s| s.open)
    }

    /// The peer has connected (or a takeover connection replaced the old one, after
    /// [`Self::on_disconnect`]): connection 0 opens.
    pub fn on_connect(&mut self, now: Nanos) {
        self.connect(0, now);
    }

    /// Connection `conn` opened: its `msg_id`s start at 1. The first connection to open
    /// releases a waiting backlog with the ramp; more connections only add room.
    pub fn connect(&mut self, conn: usize, now: Nanos) {
        if self.is_open(conn) {
            // Never called so by the owner; treated as the connection going and coming back.
            self.disconnect(conn);
        }
        while self.senders.len() <= conn {
            self.senders.push(Sender::new());
        }
        let sender = &mut self.senders[conn];
        sender.open = true;
        sender.next_msg_id = 1;
        self.open += 1;
        self.availability_changed();
        if self.open == 1 {
            self.start_release_if_backlog(now);
        }
    }

    /// Every connection is gone: unacknowledged frames go back to the front of their queues.
    pub fn on_disconnect(&mut self) {
        for conn in 0..self.senders.len() {
            self.disconnect(conn);
        }
    }

    /// Connection `conn` is gone: the frames it had not acknowledged go back to their queues,
    /// each to its place by arrival (ahead of everything that was never sent), to go out again
    /// on another connection or after a reconnect.
    pub fn disconnect(&mut self, conn: usize) {
        let Some(sender) = self.senders.get_mut(conn) else {
            return;
        };
        if !sender.open {
            return;
        }
        sender.open = false;
        self.open -= 1;
        // `availability_changed`, written out: `sender` is still borrowed.
        self.available = self.open > 0 && !self.paused;
        let back = sender.unacked.take_all();
        self.in_flight -= back.len();
        // Each lane's queue, merged with what comes back to it, in arrival order.
        let mut merged: Vec<Vec<usize>> = vec![Vec::new(); self.queues.len()];
        for at in back {
            let Some(slot) = self.slots.get_mut(at) else {
                continue;
            };
            slot.resend = true;
            let level = slot.level;
            let i = self.queue_index(level);
            merged[i].push(at);
            self.nonempty |= 1 << i;
            self.waiting += 1;
        }
        for (i, mut lane) in merged.into_iter().enumerate() {
            if lane.is_empty() {
                continue;
            }
            lane.extend(self.queues[i].iter());
            let slots = &self.slots;
            lane.sort_by_key(|&at| slots.get(at).map_or(u64::MAX, |s| s.arrival));
            self.queues[i].set(&lane);
        }
    }

    /// An operator paused (`true`) or resumed (`false`) the peer; a resume with a backlog is a
    /// restore and releases it with the ramp.
    pub fn set_paused(&mut self, paused: bool, now: Nanos) {
        let was = self.paused;
        self.paused = paused;
        self.availability_changed();
        if was && !paused && self.open > 0 {
            self.start_release_if_backlog(now);
        }
    }

    fn start_release_if_backlog(&mut self, now: Nanos) {
        if self.waiting() > 0 {
            // The ramp's length was validated with the configuration; a refusal here would only
            // mean no ramp, which is logged rather than allowed to stop delivery.
            if let Err(error) = self.limiter.start_release(
                now,
                self.settings.release_start,
                self.settings.release_ramp,
            ) {
                tracing::warn!(%error, "release ramp refused; releasing at the full rate");
            }
        }
    }

    /// Whether a peer that ran out of tokens resumes only with a wake-up's worth
    /// ([`TokenBucket::wake_tokens`]; the default), or with its next token: for an event loop
    /// whose timer has millisecond steps, where waiting for a batch would sleep past it.
    pub fn set_batch_wakes(&mut self, batch: bool) {
        self.batch_wakes = batch;
        self.paced &= batch;
    }

    /// The limiter, e.g. to change its rate on a reload (its state is kept).
    pub fn limiter_mut(&mut self) -> &mut TokenBucket {
        &mut self.limiter
    }

    /// Hands out the next frame to send, on any open connection, or says why none may go now.
    pub fn next_send(&mut self, now: Nanos) -> Result<Outgoing<'_, T>, Blocked> {
        self.next_send_to(u64::MAX, now)
    }

    /// The open connection among `conns` (bit i: connection i may take a frame now) with the
    /// fewest frames in flight and room in its share of the window; ties go in turn.
    #[inline]
    fn pick_connection(&self, conns: u64) -> Option<usize> {
        if let [only] = self.senders.as_slice() {
            // One connection (every SU, and a link with `connections_max = 1`): the window is
            // all its own, and the caller has checked it. No division on this, the usual path.
            return (only.open && conns & 1 != 0).then_some(0);
        }
        self.pick_among_connections(conns)
    }

    /// [`Self::pick_connection`] for a peer with several connections.
    fn pick_among_connections(&self, conns: u64) -> Option<usize> {
        let n = self.senders.len();
        // `open` ≥ 1 here (the caller checked availability).
        let share = (self.settings.window as usize).div_ceil(self.open.max(1));
        let mut best: Option<(usize, usize)> = None;
        for step in 0..n {
            let c = (self.turn + step) % n;
            let sender = &self.senders[c];
            if !sender.open || c >= 64 || conns & (1 << c) == 0 || sender.unacked.len() >= share {
                continue;
            }
            if best.is_none_or(|(_, load)| sender.unacked.len() < load) {
                best = Some((c, sender.unacked.len()));
            }
        }
        best.map(|(c, _)| c)
    }

    /// The most urgent lane with a frame waiting and the slot of its front frame, or why no
    /// frame may go: what [`Self::next_send_to`] and a send run start with.
    #[inline(always)]
    fn front_lane(&mut self) -> Result<(usize, usize), Blocked> {
        if self.nonempty == 0 {
            return Err(Blocked::Empty);
        }
        if !self.is_available() {
            return Err(Blocked::Unavailable);
        }
        let i = self.nonempty.trailing_zeros() as usize;
        // The simulator's deliberate bug (docs/simulation.md): level 2 goes before level 1.
        #[cfg(dsplane_mutation = "level2_before_level1")]
        let i = if self.nonempty & 0b11 == 0b11 { 1 } else { i };
        match self.queues.get(i).and_then(Ring::front) {
            Some(at) => Ok((i, at)),
            None => Err(self.nothing_in_memory(i)),
        }
    }

    /// Hands out the next frame to send on one of the connections in `conns` (bit i:
    /// connection i has room now), or says why none may go now ([`Blocked::Window`] when none of
    /// those connections may take one).
    #[inline(always)]
    pub fn next_send_to(&mut self, conns: u64, now: Nanos) -> Result<Outgoing<'_, T>, Blocked> {
        let (i, at) = self.front_lane()?;
        // The frame is borrowed here, once, and handed out at the end: nothing below takes the
        // whole scheduler mutably while it is held (only other fields).
        let Some(Slot {
            item: Some(item),
            level,
            resend,
            ..
        }) = self.slots.get(at)
        else {
            return Err(Blocked::Empty);
        };
        let (level, resend) = (*level, *resend);
        let limit = if self.settings.full_window(level) {
            self.window
        } else {
            self.window_routine
        };
        if self.in_flight >= limit {
            return Err(Blocked::Window);
        }
        let Some(conn) = self.pick_connection(conns) else {
            return Err(Blocked::Window);
        };
        if self.paced && !Self::unpace(&mut self.limiter, &mut self.paced, now) {
            return Err(Blocked::Rate(self.limiter.next_wake(now)));
        }
        if !self.limiter.try_acquire(now) {
            return Err(Self::out_of_tokens(
                &mut self.limiter,
                &mut self.paced,
                self.batch_wakes,
                now,
            ));
        }
        // The front of queue `i` (looked at above) leaves it.
        let queue = &mut self.queues[i];
        queue.drop_front();
        if queue.is_empty() && self.spilled[i] == 0 {
            self.nonempty &= !(1 << i);
        }
        self.waiting -= 1;
        self.in_flight += 1;
        self.turn = conn + 1;
        let sender = &mut self.senders[conn];
        let msg_id = sender.next_msg_id;
        sender.next_msg_id += 1;
        sender.unacked.push_back(at);
        self.stats.sent += 1;
        self.stats.resent += u64::from(resend);
        Ok(Outgoing {
            conn,
            msg_id,
            level,
            item,
        })
    }

    /// Hands frames out to `each` one after another, the same frames in the same order as
    /// repeated [`Self::next_send`] calls would hand out, until `each` returns `false` (it has
    /// no room for another), `max` have gone, or no frame may go now. Returns how many went and,
    /// when it stopped because none more may go, why.
    ///
    /// With one connection (every SU) it works by runs: the frames at the front of the most
    /// urgent lane go one after another, and what does not change from one to the next (the
    /// lane, the window's room, the pacing, the tokens, the counters) is checked and updated
    /// once per run rather than once per frame. With several it calls [`Self::next_send_to`].
    #[inline(always)]
    pub fn send_each(
        &mut self,
        now: Nanos,
        max: usize,
        mut each: impl FnMut(Outgoing<'_, T>) -> bool,
    ) -> (usize, Option<Blocked>) {
        let mut sent = 0;
        while sent < max {
            let run = if self.senders.len() == 1 {
                self.send_run(now, max - sent, &mut each)
            } else {
                self.next_send_to(u64::MAX, now).map(|out| (1, each(out)))
            };
            match run {
                Ok((n, more)) => {
                    sent += n;
                    if !more {
                        break;
                    }
                }
                Err(blocked) => return (sent, Some(blocked)),
            }
        }
        (sent, None)
    }

    /// One run of [`Self::send_each`] on connection 0 (the only one): at most `max` frames from
    /// the front of the most urgent lane, as far as the window's room, the tokens and `each`
    /// allow. Returns how many went (at least one) and whether `each` wants more.
    #[inline(always)]
    fn send_run(
        &mut self,
        now: Nanos,
        max: usize,
        each: &mut impl FnMut(Outgoing<'_, T>) -> bool,
    ) -> Result<(usize, bool), Blocked> {
        // The checks of `next_send_to`, in its order, once.
        let (i, at) = self.front_lane()?;
        let Some(Slot {
            item: Some(_),
            level,
            ..
        }) = self.slots.get(at)
        else {
            return Err(Blocked::Empty);
        };
        // Every frame of a lane has the same limit: with priority, lane 0 holds the urgent
        // level alone (a level's lane is its index), and in FIFO every level has the whole
        // window.
        let full_window = self.settings.full_window(*level);
        let limit = if full_window {
            self.window
        } else {
            self.window_routine
        };
        if self.in_flight >= limit {
            return Err(Blocked::Window);
        }
        if self.pick_connection(u64::MAX).is_none() {
            return Err(Blocked::Window);
        }
        if self.paced && !Self::unpace(&mut self.limiter, &mut self.paced, now) {
            return Err(Blocked::Rate(self.limiter.next_wake(now)));
        }
        let tokens = self.limiter.available(now) as usize;
        if tokens == 0 {
            return Err(Self::out_of_tokens(
                &mut self.limiter,
                &mut self.paced,
                self.batch_wakes,
                now,
            ));
        }
        let (queues, slots, senders, stats) = (
            &mut self.queues,
            &self.slots,
            &mut self.senders,
            &mut self.stats,
        );
        let (Some(queue), Some(sender)) = (queues.get_mut(i), senders.first_mut()) else {
            return Err(Blocked::Empty);
        };
        let n = queue.len().min(limit - self.in_flight).min(tokens).min(max);
        let mut k = 0;
        let mut more = true;
        while k < n && more {
            let Some(at) = queue.get(k) else {
                break;
            };
            let Some(Slot {
                item: Some(item),
                level,
                resend,
                ..
            }) = slots.get(at)
            else {
                break;
            };
            debug_assert_eq!(
                self.settings.full_window(*level),
                full_window,
                "a lane mixes limits"
            );
            stats.resent += u64::from(*resend);
            more = each(Outgoing {
                conn: 0,
                msg_id: sender.next_msg_id + k as u64,
                level: *level,
                item,
            });
            k += 1;
        }
        // The run's frames leave their lane together, for the unacknowledged.
        sender.unacked.extend_from_front(queue, k);
        queue.skip(k);
        if queue.is_empty() && self.spilled.get(i).is_none_or(|&s| s == 0) {
            self.nonempty &= !(1 << i);
        }
        sender.next_msg_id += k as u64;
        stats.sent += k as u64;
        self.waiting -= k;
        self.in_flight += k;
        self.turn = 1;
        // (There were `tokens` ≥ k at `now`.)
        let took = self.limiter.try_acquire_n(k as u32, now);
        debug_assert!(took, "{k} tokens of {tokens}");
        Ok((k, more))
    }

    /// Why lane `i`, whose bit is set, has nothing in memory to send.
    #[cold]
    fn nothing_in_memory(&mut self, i: usize) -> Blocked {
        if self.spilled.get(i).is_some_and(|&n| n > 0) {
            return Blocked::Load(i);
        }
        // Cannot happen (the bit says non-empty); repair the bitmap rather than stall.
        self.nonempty &= !(1 << i);
        Blocked::Empty
    }

    /// A paced peer may send again once a wake-up's worth of tokens is in. (On the fields it
    /// needs, so that `next_send_to` can call it while it holds the frame it is looking at.)
    #[cold]
    fn unpace(limiter: &mut TokenBucket, paced: &mut bool, now: Nanos) -> bool {
        if limiter.available(now) < limiter.wake_tokens(now) {
            return false;
        }
        *paced = false;
        true
    }

    /// The limiter has no token: the peer is paced from now on (with batched wake-ups). (On
    /// the fields it needs, as `unpace`.)
    #[cold]
    fn out_of_tokens(
        limiter: &mut TokenBucket,
        paced: &mut bool,
        batch_wakes: bool,
        now: Nanos,
    ) -> Blocked {
        *paced = batch_wakes;
        Blocked::Rate(limiter.next_wake(now))
    }

    /// The frame [`DeliveryScheduler::next_send_to`] handed out last on connection `conn`,
    /// while it is unacknowledged.
    pub fn newest_unacked(&self, conn: usize) -> Option<&T> {
        let at = self.senders.get(conn)?.unacked.back()?;
        self.slots.get(at)?.item.as_ref()
    }

    /// A cumulative ACK on connection 0: see [`Self::ack`].
    pub fn on_ack(&mut self, msg_id: u64, released: impl FnMut(Level, T)) -> usize {
        self.ack(0, msg_id, released)
    }

    /// A cumulative ACK on connection `conn`: every frame it had unacknowledged up to `msg_id`
    /// is acknowledged, and released (`released` is called for each, e.g. to reclaim its disk
    /// space) once nothing older of its lane is held. Returns how many were released, which
    /// may include frames acknowledged earlier on other connections.
    pub fn ack(&mut self, conn: usize, msg_id: u64, mut released: impl FnMut(Level, T)) -> usize {
        // The simulator's deliberate bug (docs/simulation.md): a frame acknowledged on one
        // connection is released at once, even ahead of an older one of its lane in flight.
        let single = cfg!(dsplane_mutation = "release_ahead_of_older") || self.senders.len() == 1;
        let Some(sender) = self.senders.get_mut(conn) else {
            return 0;
        };
        // The frames up to `msg_id` are the first `acked` of the list (msg_ids are consecutive).
        let first = sender.first_unacked_msg_id();
        let acked = if msg_id < first {
            0
        } else {
            (msg_id - first)
                .saturating_add(1)
                .min(sender.unacked.len() as u64) as usize
        };
        let mut n = 0;
        let (slots, free) = (&mut self.slots, &mut self.free);
        if single {
            // One connection: ACKs come in send order, and within a lane that is arrival
            // order, so nothing older of the lane can still be held.
            take_run(slots, free, &sender.unacked, acked, |level, _, item| {
                released(level, item);
                n += 1;
            });
        } else {
            let retired = &mut self.retired;
            take_run(
                slots,
                free,
                &sender.unacked,
                acked,
                |level, arrival, item| {
                    retired.insert(arrival, (level, item));
                },
            );
        }
        sender.unacked.skip(acked);
        self.in_flight -= acked;
        self.stats.acked += acked as u64;
        n + self.release_retired(released)
    }

    /// Releases the retired frames that no older frame of their lane is held behind any more
    /// (after an ACK on another connection or an expiry). Returns how many.
    pub fn release_retired(&mut self, mut released: impl FnMut(Level, T)) -> usize {
        if self.retired.is_empty() {
            return 0;
        }
        // The oldest frame each lane still holds, waiting or in flight.
        let mut oldest: Vec<u64> = self
            .queues
            .iter()
            .map(|q| q.front().map_or(u64::MAX, |at| self.arrival_of(at)))
            .collect();
        for at in self.senders.iter().flat_map(|s| s.unacked.iter()) {
            let i = self.queue_index(self.level_of(at));
            oldest[i] = oldest[i].min(self.arrival_of(at));
        }
        let ready: Vec<u64> = self
            .retired
            .iter()
            .filter(|(arrival, (level, _))| **arrival < oldest[self.queue_index(*level)])
            .map(|(arrival, _)| *arrival)
            .collect();
        for arrival in &ready {
            if let Some((level, item)) = self.retired.remove(arrival) {
                released(level, item);
            }
        }
        ready.len()
    }

    /// Counters.
    pub fn stats(&self) -> DeliveryStats {
        self.stats
    }

    /// Takes every held frame out, acknowledged but unreleased first, then unacknowledged (in
    /// send order, connection by connection), then waiting (in priority order): for a shutdown
    /// that hands them to a lower tier.
    pub fn drain(&mut self) -> Vec<(Level, T)> {
        let mut out: Vec<(Level, T)> = std::mem::take(&mut self.retired).into_values().collect();
        let mut order: Vec<usize> = Vec::with_capacity(self.in_flight + self.waiting);
        for sender in &mut self.senders {
            order.extend(sender.unacked.take_all());
        }
        self.in_flight = 0;
        for q in &mut self.queues {
            order.extend(q.take_all());
        }
        out.extend(order.into_iter().filter_map(|at| self.take_slot(at)));
        // Nothing is held in memory any more.
        self.slots.clear();
        self.free.clear();
        self.waiting = 0;
        self.nonempty = 0;
        for (i, n) in self.spilled.iter().enumerate() {
            if *n > 0 {
                self.nonempty |= 1 << i;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NANOS_PER_SEC as S;

    fn level(n: u8) -> Level {
        Level::new(n).unwrap()
    }

    fn settings() -> DeliverySettings {
        DeliverySettings {
            levels: 4,
            window: 8,
            window_reserved_top: 2,
            frames_max: 1_000,
            prioritised: true,
            release_start: ReleaseStart::FULL,
            release_ramp: 0,
        }
    }

    /// A scheduler with a generous limiter (rate 1000/s, burst 1000), connected at time 0.
    fn connected(settings: DeliverySettings) -> DeliveryScheduler<u32> {
        let mut s = DeliveryScheduler::new(settings, TokenBucket::new(1_000, 1_000, 0).unwrap());
        s.on_connect(0);
        s
    }

    /// `send_each` hands out what repeated `next_send` calls hand out, stops for the same
    /// reason, and leaves the scheduler in the same state: two schedulers driven through the
    /// same random operations (enqueues at every level, sends of random sizes, ACKs, the clock,
    /// pauses, reconnects with resends, a tight limiter and a small window), one sending frame
    /// by frame and one with `send_each`, compared after every send.
    #[test]
    fn send_each_hands_out_what_next_send_would() {
        let mut sent_total = 0;
        for seed in 1..=200u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let prioritised = seed % 3 != 0;
            let make = || {
                let mut s = DeliveryScheduler::new(
                    DeliverySettings {
                        prioritised,
                        window: 12,
                        window_reserved_top: 3,
                        ..settings()
                    },
                    TokenBucket::new(20_000, 7, 0).unwrap(),
                );
                s.on_connect(0);
                s
            };
            let (mut by_frame, mut by_run) = (make(), make());
            let (mut now, mut item) = (0, 0u32);
            for _ in 0..400 {
                match next(10) {
                    0..=3 => {
                        for _ in 0..=next(6) {
                            let l = level(next(4) as u8 + 1);
                            item += 1;
                            assert_eq!(by_frame.enqueue(l, item), by_run.enqueue(l, item));
                        }
                    }
                    4..=6 => {
                        let max = next(20) as usize + 1;
                        let mut want = Vec::new();
                        let mut why = None;
                        for _ in 0..max {
                            match by_frame.next_send(now) {
                                Ok(o) => want.push((o.conn, o.msg_id, o.level, *o.item)),
                                Err(b) => {
                                    why = Some(b);
                                    break;
                                }
                            }
                        }
                        let mut got = Vec::new();
                        let (n, blocked) = by_run.send_each(now, max, |o| {
                            got.push((o.conn, o.msg_id, o.level, *o.item));
                            true
                        });
                        assert_eq!(got, want, "seed {seed}");
                        assert_eq!((n, blocked), (want.len(), why), "seed {seed}");
                        sent_total += n;
                    }
                    7 => {
                        let acked = by_frame.stats().sent;
                        let upto = if acked == 0 { 0 } else { next(acked) + 1 };
                        let (mut a, mut b) = (Vec::new(), Vec::new());
                        by_frame.on_ack(upto, |l, i| a.push((l, i)));
                        by_run.on_ack(upto, |l, i| b.push((l, i)));
                        assert_eq!(a, b, "seed {seed}");
                    }
                    8 => now += next(400_000),
                    _ => match next(3) {
                        0 => {
                            by_frame.on_disconnect();
                            by_run.on_disconnect();
                            by_frame.on_connect(now);
                            by_run.on_connect(now);
                        }
                        1 => {
                            let paused = next(2) == 0;
                            by_frame.set_paused(paused, now);
                            by_run.set_paused(paused, now);
                        }
                        _ => {}
                    },
                }
                assert_eq!(by_frame.stats(), by_run.stats(), "seed {seed}");
                assert_eq!(
                    (
                        by_frame.waiting(),
                        by_frame.held(),
                        by_frame.in_flight,
                        by_frame.nonempty
                    ),
                    (
                        by_run.waiting(),
                        by_run.held(),
                        by_run.in_flight,
                        by_run.nonempty
                    ),
                    "seed {seed}"
                );
            }
        }
        assert!(sent_total > 10_000, "the runs sent {sent_total}");
    }

    #[test]
    fn a_ring_takes_the_front_of_another_across_both_wraps() {
        for (from_head, to_head, n) in [(0, 0, 5), (6, 0, 5), (3, 7, 8), (7, 5, 3), (2, 2, 0)] {
            let mut from = Ring::default();
            // Rotate each ring so that its front sits at the given place.
            for _ in 0..from_head {
                from.push_back(0);
                from.pop_front();
            }
            for v in 1..=8 {
                from.push_back(v);
            }
            let mut to = Ring::default();
            for _ in 0..to_head {
                to.push_back(0);
                to.pop_front();
            }
            to.push_back(100);
            to.extend_from_front(&from, n);
            let want: Vec<usize> = std::iter::once(100).chain(1..=n).collect();
            assert_eq!(
                to.iter().collect::<Vec<_>>(),
                want,
                "{from_head} {to_head} {n}"
            );
            assert_eq!(from.len(), 8, "the source keeps its items");
        }
    }

    /// `send_each` stops when `each` has no room for more, after the frame it was given.
    #[test]
    fn send_each_stops_where_each_says() {
        let mut s = connected(settings());
        for i in 0..6 {
            s.enqueue(level(3), i).unwrap();
        }
        let mut got = Vec::new();
        let (n, blocked) = s.send_each(0, usize::MAX, |o| {
            got.push(*o.item);
            got.len() < 2
        });
        assert_eq!((n, blocked, got), (2, None, vec![0, 1]));
        assert_eq!(s.next_send(0).map(|o| *o.item).ok(), Some(2));
    }

    /// Sends and acknowledges everything that may go at `now`; returns the frames in order.
    fn send_all(s: &mut DeliveryScheduler<u32>, now: Nanos) -> Vec<u32> {
        let mut out = Vec::new();
        while let Ok(sent) = s.next_send(now) {
            out.push(*sent.item);
            let id = sent.msg_id;
            s.on_ack(id, |_, _| {});
        }
        out
    }

    #[test]
    fn the_slot_ring_keeps_its_order_across_wrap_around_and_growth() {
        let mut r = Ring::default();
        let mut model = std::collections::VecDeque::new();
        let mut next = 0;
        // Pushes and pops in uneven runs, so the front moves round the ring and the ring grows
        // while it is wrapped.
        for round in 0..200 {
            for _ in 0..(round % 7 + 1) {
                r.push_back(next);
                model.push_back(next);
                next += 1;
            }
            for _ in 0..(round % 5) {
                assert_eq!(r.pop_front(), model.pop_front());
            }
            if round % 11 == 0 {
                let n = round % 3;
                r.skip(n);
                for _ in 0..n.min(model.len()) {
                    model.pop_front();
                }
            }
            assert_eq!(r.len(), model.len());
            assert_eq!(r.front(), model.front().copied());
            assert_eq!(r.back(), model.back().copied());
            assert!(r.iter().eq(model.iter().copied()));
        }
        let all: Vec<usize> = model.iter().copied().collect();
        r.set(&all[1..]);
        assert!(r.iter().eq(all[1..].iter().copied()));
        assert_eq!(r.take_all(), all[1..].to_vec());
        assert!(r.is_empty() && r.pop_front().is_none() && r.back().is_none());
    }

    #[test]
    fn slots_are_reused_and_a_drain_frees_them_all() {
        let mut s = connected(settings());
        for round in 0..50 {
            for i in 0..5 {
                s.enqueue(level(1 + (i % 4) as u8), round * 10 + i).unwrap();
            }
            let sent = send_all(&mut s, 0);
            assert_eq!(sent.len(), 5);
        }
        // Never more slots than frames held at once.
        assert!(s.slots.len() <= 5, "{} slots", s.slots.len());
        s.enqueue(level(2), 1).unwrap();
        assert!(s.next_send(0).is_ok());
        s.enqueue(level(3), 2).unwrap();
        assert_eq!(s.drain().len(), 2);
        assert!(s.slots.is_empty() && s.free.is_empty());
    }

    #[test]
    fn strict_priority_then_fifo_within_level() {
        let mut s = connected(settings());
        for (l, item) in [
            (4, 40),
            (3, 30),
            (4, 41),
            (1, 10),
            (2, 20),
            (3, 31),
            (1, 11),
        ] {
            s.enqueue(level(l), item).unwrap();
        }
        assert_eq!(send_all(&mut s, 0), vec![10, 11, 20, 30, 31, 40, 41]);
        assert_eq!(s.next_send(0).err(), Some(Blocked::Empty));
    }

    #[test]
    fn fifo_mode_ignores_levels() {
        let mut s = connected(DeliverySettings {
            prioritised: false,
            ..settings()
        });
        for (l, item) in [(4, 40), (1, 10), (3, 30)] {
            s.enqueue(level(l), item).unwrap();
        }
        assert_eq!(s.waiting_at(level(1)), 1);
        assert_eq!(send_all(&mut s, 0), vec![40, 10, 30]);
    }

    #[test]
    fn reserved_window_slots_are_kept_for_level_one() {
        let mut s = connected(settings()); // window 8, 2 reserved
        for i in 0..10 {
            s.enqueue(level(4), i).unwrap();
        }
        let mut ids = Vec::new();
        while let Ok(sent) = s.next_send(0) {
            ids.push(sent.msg_id);
        }
        assert_eq!(
            ids,
            (1..=6).collect::<Vec<_>>(),
            "routine frames stop at 8 - 2"
        );
        assert_eq!(s.next_send(0).err(), Some(Blocked::Window));
        // An urgent frame overtakes the waiting routine ones and uses a reserved slot.
        s.enqueue(level(1), 100).unwrap();
        s.enqueue(level(1), 101).unwrap();
        s.enqueue(level(1), 102).unwrap();
        let sent = s.next_send(0).unwrap();
        assert_eq!((*sent.item, sent.msg_id, sent.level), (100, 7, level(1)));
        assert_eq!(*s.next_send(0).unwrap().item, 101);
        // Now the whole window is used: even level 1 waits.
        assert_eq!(s.next_send(0).err(), Some(Blocked::Window));
        assert_eq!(s.unacked(), 8);
        // A cumulative ACK frees slots; the urgent frame goes first.
        assert_eq!(s.on_ack(4, |_, _| {}), 4);
        assert_eq!(*s.next_send(0).unwrap().item, 102);
        assert_eq!(*s.next_send(0).unwrap().item, 6);
        assert_eq!(
            s.next_send(0).err(),
            Some(Blocked::Window),
            "6 routine in flight again"
        );
    }

    #[test]
    fn rate_limit_says_when_to_come_back() {
        let mut s = DeliveryScheduler::new(settings(), TokenBucket::new(10, 1, 0).unwrap());
        s.on_connect(0);
        for i in 0..3 {
            s.enqueue(level(2), i).unwrap();
        }
        assert!(s.next_send(0).is_ok());
        assert_eq!(s.next_send(0).err(), Some(Blocked::Rate(S / 10)));
        assert_eq!(s.next_send(S / 10 - 1).err(), Some(Blocked::Rate(S / 10)));
        assert_eq!(*s.next_send(S / 10).unwrap().item, 1);
    }

    #[test]
    fn a_paced_peer_resumes_with_a_batch_not_a_token() {
        // 1 M/s, burst 100: a wake-up's worth is 25 tokens.
        let wide = DeliverySettings {
            window: 1_000,
            ..settings()
        };
        let mut s = DeliveryScheduler::new(wide, TokenBucket::new(1_000_000, 100, 0).unwrap());
        s.on_connect(0);
        for i in 0..200 {
            s.enqueue(level(2), i).unwrap();
        }
        let mut sent = 0;
        while s.next_send(0).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 100, "the burst");
        assert_eq!(s.next_send(0).err(), Some(Blocked::Rate(25_000)));
        // A token is in, but the peer is paced: it waits for the batch.
        assert_eq!(s.next_send(1_000).err(), Some(Blocked::Rate(25_000)));
        assert_eq!(s.next_send(24_999).err(), Some(Blocked::Rate(25_000)));
        let mut batch = 0;
        while s.next_send(25_000).is_ok() {
            batch += 1;
        }
        assert_eq!(batch, 25);
        assert_eq!(s.on_ack(125, |_, _| {}), 125);
        // Without batched wake-ups, the next token goes as soon as it is in.
        s.set_batch_wakes(false);
        assert_eq!(s.next_send(25_000).err(), Some(Blocked::Rate(50_000)));
        assert!(s.next_send(26_000).is_ok());
    }

    #[test]
    fn nothing_goes_while_unavailable() {
        let mut s = DeliveryScheduler::new(settings(), TokenBucket::new(10, 10, 0).unwrap());
        s.enqueue(level(1), 1).unwrap();
        assert_eq!(s.next_send(0).err(), Some(Blocked::Unavailable));
        s.on_connect(0);
        s.set_paused(true, 0);
        assert_eq!(s.next_send(0).err(), Some(Blocked::Unavailable));
        s.set_paused(false, 0);
        assert!(s.next_send(0).is_ok());
    }

    #[test]
    fn reconnect_resends_unacked_first_in_priority_order() {
        let mut s = connected(settings());
        for (l, item) in [(3, 30), (3, 31), (4, 40), (2, 20)] {
            s.enqueue(level(l), item).unwrap();
        }
        let mut sent = Vec::new();
        while let Ok(o) = s.next_send(0) {
            sent.push((o.msg_id, *o.item));
        }
        assert_eq!(sent, vec![(1, 20), (2, 30), (3, 31), (4, 40)]);
        let mut released = Vec::new();
        s.on_ack(1, |l, item| released.push((l, item)));
        assert_eq!(released, vec![(level(2), 20)]);
        // A new frame arrives at level 3 while the link is down.
        s.on_disconnect();
        s.enqueue(level(3), 32).unwrap();
        s.enqueue(level(1), 10).unwrap();
        assert_eq!(s.waiting(), 5);
        assert_eq!(s.unacked(), 0);
        s.on_connect(S);
        let mut again = Vec::new();
        while let Ok(o) = s.next_send(S) {
            again.push((o.msg_id, *o.item));
        }
        // msg_ids restart at 1; level 1 first, then the unacknowledged frames ahead of the new
        // one in their level, in their original order.
        assert_eq!(again, vec![(1, 10), (2, 30), (3, 31), (4, 32), (5, 40)]);
        assert_eq!(s.stats().resent, 3);
        assert_eq!(s.stats().sent, 9);
    }

    #[test]
    fn ack_beyond_what_was_sent_is_harmless() {
        let mut s = connected(settings());
        s.enqueue(level(2), 1).unwrap();
        assert!(s.next_send(0).is_ok());
        assert_eq!(s.on_ack(0, |_, _| {}), 0);
        assert_eq!(s.on_ack(u64::MAX, |_, _| {}), 1);
        assert_eq!(s.on_ack(u64::MAX, |_, _| {}), 0);
        assert_eq!(s.stats().acked, 1);
    }

    #[test]
    fn frames_max_bounds_waiting_and_unacked_together() {
        let mut s = connected(DeliverySettings {
            frames_max: 3,
            ..settings()
        });
        s.enqueue(level(4), 1).unwrap();
        s.enqueue(level(4), 2).unwrap();
        assert!(s.next_send(0).is_ok());
        s.enqueue(level(4), 3).unwrap();
        assert_eq!(
            s.enqueue(level(1), 4),
            Err(4),
            "the 4th frame is handed back"
        );
        s.on_disconnect();
        assert_eq!(s.held(), 3, "re-queued frames were already counted");
        assert_eq!(s.enqueue(level(1), 4), Err(4));
    }

    #[test]
    fn reconnect_with_backlog_releases_on_a_ramp() {
        let ramped = DeliverySettings {
            release_start: ReleaseStart::DEFAULT,
            release_ramp: 10 * S,
            frames_max: 100_000,
            window: 65_536,
            ..settings()
        };
        let mut s = DeliveryScheduler::new(ramped, TokenBucket::new(100, 100, 0).unwrap());
        for i in 0..5_000 {
            s.enqueue(level(4), i).unwrap();
        }
        s.on_connect(0);
        // The bucket is cut to 10 % of its burst, then the rate climbs 10/s → 100/s over 10 s:
        // 10 + ∫₀¹ (10 + 9t) dt = 10 + 14.5 = 24 in the first second (whole tokens).
        let mut first = 0;
        let mut now = 0;
        while now <= S {
            first += send_all(&mut s, now).len();
            now += S / 1_000;
        }
        assert_eq!(first, 24);
        // Without a backlog there is no ramp: the full burst is there at once.
        let mut idle = DeliveryScheduler::new(ramped, TokenBucket::new(100, 100, 0).unwrap());
        idle.on_connect(0);
        for i in 0..200 {
            idle.enqueue(level(4), i).unwrap();
        }
        assert_eq!(send_all(&mut idle, 0).len(), 100);
    }

    #[test]
    fn spilled_frames_keep_their_place_in_strict_priority() {
        let mut s = connected(settings());
        s.enqueue(level(3), 30).unwrap();
        s.add_spilled(level(2), 2);
        assert_eq!(s.waiting(), 3);
        // Level 2 has frames on disk only: ask for them before letting level 3 go.
        assert_eq!(s.next_send(0).err(), Some(Blocked::Load(1)));
        s.load(level(2), 20);
        assert_eq!(*s.next_send(0).unwrap().item, 20);
        assert_eq!(s.next_send(0).err(), Some(Blocked::Load(1)));
        s.load(level(2), 21);
        assert_eq!(send_all(&mut s, 0), vec![21, 30]);
        assert_eq!(s.spilled_in(1), 0);
        assert_eq!(s.next_send(0).err(), Some(Blocked::Empty));
    }

    #[test]
    fn expired_frames_are_taken_from_the_front() {
        let mut s = DeliveryScheduler::new(settings(), TokenBucket::new(10, 10, 0).unwrap());
        for (l, item) in [(4, 1), (4, 2), (4, 9), (2, 3), (2, 8)] {
            s.enqueue(level(l), item).unwrap();
        }
        // Items below 5 are "old"; 9 is not, so 2's neighbour behind it is not looked at.
        let gone = s.take_expired(|&item| item < 5);
        assert_eq!(gone, vec![(level(2), 3), (level(4), 1), (level(4), 2)]);
        assert_eq!(s.waiting(), 2);
        s.on_connect(0);
        assert_eq!(send_all(&mut s, 0), vec![8, 9]);
    }

    /// Found by the simulator: an expiry is recorded in the log as "the lane is done through
    /// this frame", so a frame may expire only once every older frame of its lane has left. A
    /// frame in flight (sent, not acknowledged) is older than every waiting one of its lane.
    #[test]
    fn a_lane_with_a_frame_in_flight_expires_nothing() {
        let mut s = connected(settings());
        for (l, item) in [(3, 1), (3, 2), (3, 3), (2, 7)] {
            s.enqueue(level(l), item).unwrap();
        }
        let sent = s.next_send(0).unwrap();
        assert_eq!((*sent.item, sent.level), (7, level(2)));
        let sent = s.next_send(0).unwrap();
        assert_eq!(*sent.item, 1);
        let first_of_level_3 = sent.msg_id;
        assert!(s.unacked_in(level(3).index()) && s.unacked_in(level(2).index()));
        // Everything is past its retention, but both lanes have a frame in flight.
        assert_eq!(s.take_expired(|_| true), vec![]);
        // Level 2's frame is acknowledged: that lane has nothing left; level 3's still waits.
        s.on_ack(first_of_level_3 - 1, |_, _| {});
        assert!(!s.unacked_in(level(2).index()));
        assert_eq!(s.take_expired(|_| true), vec![]);
        s.on_ack(first_of_level_3, |_, _| {});
        assert_eq!(s.take_expired(|_| true), vec![(level(3), 2), (level(3), 3)]);
        // A disconnect puts the frames in flight back at the front, where they expire first.
        s.enqueue(level(4), 10).unwrap();
        s.enqueue(level(4), 11).unwrap();
        assert_eq!(*s.next_send(0).unwrap().item, 10);
        s.on_disconnect();
        assert_eq!(
            s.take_expired(|_| true),
            vec![(level(4), 10), (level(4), 11)]
        );
    }

    #[test]
    fn drain_returns_unacked_then_waiting_by_priority() {
        let mut s = connected(settings());
        for (l, item) in [(4, 40), (2, 20)] {
            s.enqueue(level(l), item).unwrap();
        }
        assert!(s.next_send(0).is_ok());
        s.enqueue(level(1), 10).unwrap();
        let drained: Vec<u32> = s.drain().into_iter().map(|(_, t)| t).collect();
        assert_eq!(drained, vec![20, 10, 40]);
        assert_eq!(s.held(), 0);
        assert_eq!(s.next_send(0).err(), Some(Blocked::Empty));
    }

    /// Everything that may go now on any connection: (connection, msg_id, item).
    fn send_any(s: &mut DeliveryScheduler<u32>, now: Nanos) -> Vec<(usize, u64, u32)> {
        let mut out = Vec::new();
        while let Ok(o) = s.next_send(now) {
            out.push((o.conn, o.msg_id, *o.item));
        }
        out
    }

    #[test]
    fn two_connections_share_the_window_each_with_its_own_msg_ids() {
        let mut s = connected(settings()); // window 8, 2 reserved for level 1
        s.connect(1, 0);
        for i in 0..10 {
            s.enqueue(level(4), i).unwrap();
        }
        // Routine frames fill 8 - 2 slots, spread in turn, each connection counting from 1.
        assert_eq!(
            send_any(&mut s, 0),
            vec![
                (0, 1, 0),
                (1, 1, 1),
                (0, 2, 2),
                (1, 2, 3),
                (0, 3, 4),
                (1, 3, 5)
            ]
        );
        assert_eq!((s.unacked(), s.unacked_on(0), s.unacked_on(1)), (6, 3, 3));
        // Connection 1 acknowledges; connection 0 does not. The least loaded connection takes
        // the next frames, up to the routine part of the window (6) in all.
        let mut released = Vec::new();
        assert_eq!(
            s.ack(1, 3, |_, item| released.push(item)),
            0,
            "older frames of the lane are in flight on 0"
        );
        assert!(released.is_empty());
        assert_eq!(send_any(&mut s, 0), vec![(1, 4, 6), (1, 5, 7), (1, 6, 8)]);
        // Level-1 frames may use the reserved slots, up to each connection's share (8 / 2).
        s.enqueue(level(1), 100).unwrap();
        s.enqueue(level(1), 101).unwrap();
        assert_eq!(send_any(&mut s, 0), vec![(0, 4, 100), (1, 7, 101)]);
        s.enqueue(level(1), 102).unwrap();
        assert_eq!(
            s.next_send(0).err(),
            Some(Blocked::Window),
            "both connections hold their share: 8 in flight"
        );
        // Connection 0 acknowledges everything: what it had, and what connection 1 had
        // acknowledged behind it, leaves, in arrival order.
        assert_eq!(s.ack(0, 4, |_, item| released.push(item)), 7);
        assert_eq!(released, vec![0, 1, 2, 3, 4, 5, 100]);
        assert_eq!(s.ack(1, 7, |_, item| released.push(item)), 4);
        assert_eq!(send_any(&mut s, 0), vec![(0, 5, 102), (1, 8, 9)]);
    }

    #[test]
    fn a_connection_with_no_room_is_skipped() {
        let mut s = connected(settings());
        s.connect(1, 0);
        for i in 0..3 {
            s.enqueue(level(2), i).unwrap();
        }
        // Connection 0's socket is full: everything goes on 1.
        let mut on = Vec::new();
        while let Ok(o) = s.next_send_to(0b10, 0) {
            on.push((o.conn, o.msg_id));
        }
        assert_eq!(on, vec![(1, 1), (1, 2), (1, 3)]);
        s.enqueue(level(2), 3).unwrap();
        assert_eq!(
            s.next_send_to(0b100, 0).err(),
            Some(Blocked::Window),
            "no such connection"
        );
    }

    #[test]
    fn a_closed_connection_gives_back_only_its_frames_in_arrival_order() {
        let mut s = connected(settings());
        s.connect(1, 0);
        for (l, item) in [(3, 30), (3, 31), (3, 32), (3, 33), (4, 40)] {
            s.enqueue(level(l), item).unwrap();
        }
        let sent = send_any(&mut s, 0);
        assert_eq!(
            sent,
            vec![(0, 1, 30), (1, 1, 31), (0, 2, 32), (1, 2, 33), (0, 3, 40)]
        );
        s.enqueue(level(3), 34).unwrap();
        s.enqueue(level(1), 10).unwrap();
        // Connection 0 goes: 30, 32 and 40 come back, ahead of 34 (never sent) in their levels;
        // 31 and 33 stay in flight on connection 1.
        s.disconnect(0);
        assert!(s.is_available() && !s.is_open(0) && s.is_open(1));
        assert_eq!((s.unacked_on(0), s.unacked_on(1), s.waiting()), (0, 2, 5));
        let again = send_any(&mut s, 0);
        assert_eq!(
            again,
            vec![(1, 3, 10), (1, 4, 30), (1, 5, 32), (1, 6, 34)],
            "level 1 first, then the frames given back, in priority then arrival order; 40 waits for the window of one connection (8 - 2 routine)"
        );
        assert_eq!(s.stats().resent, 2);
        // Connection 0 comes back: its msg_ids start at 1 again.
        s.connect(0, 0);
        s.ack(1, 6, |_, _| {});
        assert_eq!(send_any(&mut s, 0), vec![(0, 1, 40)]);
    }

    #[test]
    fn a_frame_acknowledged_ahead_of_an_older_one_waits_for_it() {
        let mut s = connected(settings());
        s.connect(1, 0);
        for item in [1, 2, 3] {
            s.enqueue(level(2), item).unwrap();
        }
        s.enqueue(level(3), 9).unwrap();
        assert_eq!(
            send_any(&mut s, 0),
            vec![(0, 1, 1), (1, 1, 2), (0, 2, 3), (1, 2, 9)]
        );
        let mut released = Vec::new();
        // Connection 1 acknowledges 2 (level 2) and 9 (level 3): 9 is the oldest of its lane
        // and leaves; 2 waits for 1, still in flight on connection 0.
        assert_eq!(s.ack(1, 2, |_, i| released.push(i)), 1);
        assert_eq!(released, vec![9]);
        assert_eq!(s.held(), 3, "2 is retired, 1 and 3 in flight");
        assert!(s.unacked_in(level(2).index()));
        // Connection 0 goes: 1 and 3 come back; 2 still waits for 1.
        s.disconnect(0);
        assert_eq!(s.release_retired(|_, i| released.push(i)), 0);
        // Sent again on 1 and acknowledged: 1, 2 and 3 leave, in arrival order.
        assert_eq!(send_any(&mut s, 0), vec![(1, 3, 1), (1, 4, 3)]);
        assert_eq!(s.ack(1, 3, |_, i| released.push(i)), 2);
        assert_eq!(s.ack(1, 4, |_, i| released.push(i)), 1);
        assert_eq!(released, vec![9, 1, 2, 3]);
        assert_eq!(s.held(), 0);
        assert_eq!(s.stats().acked, 4);
    }

    #[test]
    fn expiry_takes_frames_given_back_before_the_retired_behind_them() {
        let mut s = connected(settings());
        s.connect(1, 0);
        for item in [1, 2] {
            s.enqueue(level(4), item).unwrap();
        }
        assert_eq!(send_any(&mut s, 0), vec![(0, 1, 1), (1, 1, 2)]);
        s.ack(1, 1, |_, _| panic!("1 is older and in flight"));
        s.disconnect(0);
        s.disconnect(1);
        assert!(!s.is_available());
        // 1 waits (given back), 2 is retired behind it: 1 may expire, then 2 is released.
        assert_eq!(s.take_expired(|_| true), vec![(level(4), 1)]);
        let mut released = Vec::new();
        assert_eq!(s.release_retired(|_, i| released.push(i)), 1);
        assert_eq!(released, vec![2]);
        assert_eq!(s.held(), 0);
    }
}

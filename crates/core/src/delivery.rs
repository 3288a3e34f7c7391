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
//! # Bounds
//!
//! The scheduler holds at most `frames_max` frames, waiting and unacknowledged together;
//! [`DeliveryScheduler::enqueue`] hands the frame back beyond that, and the caller answers
//! NACK 5 (overloaded) or moves it to a lower tier. Re-queuing unacknowledged frames on a
//! disconnect never exceeds the bound, since they were already counted.

use std::collections::VecDeque;

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
    /// The `msg_id` to write in its header.
    pub msg_id: u64,
    /// Its level, to write in the header's `priority` byte.
    pub level: Level,
    /// The frame.
    pub item: &'a T,
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

/// One peer's scheduler. `T` is the frame type; the scheduler never looks inside it.
#[derive(Debug)]
pub struct DeliveryScheduler<T> {
    settings: DeliverySettings,
    /// Per level (index 0 = level 1), or one queue when not prioritised: (level, frame, re-send).
    queues: Vec<VecDeque<(Level, T, bool)>>,
    /// Bit i set = `queues[i]` is non-empty or lane i has spilled frames.
    nonempty: u32,
    waiting: usize,
    /// Per lane: frames waiting on disk only (the SURB), behind those in `queues`.
    spilled: Vec<u64>,
    /// In send order: (msg_id, level, frame).
    unacked: VecDeque<(u64, Level, T)>,
    next_msg_id: u64,
    connected: bool,
    paused: bool,
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
            queues: (0..queue_count).map(|_| VecDeque::new()).collect(),
            nonempty: 0,
            waiting: 0,
            spilled: vec![0; queue_count],
            unacked: VecDeque::new(),
            next_msg_id: 1,
            connected: false,
            paused: false,
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
        self.queues.get(lane).map_or(0, VecDeque::len)
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
        self.queues[i].push_back((level, item, false));
        self.nonempty |= 1 << i;
        self.waiting += 1;
    }

    /// Whether a frame of `lane` has been sent and not yet acknowledged.
    pub fn unacked_in(&self, lane: usize) -> bool {
        self.unacked
            .iter()
            .any(|(_, level, _)| self.queue_index(*level) == lane)
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
            while self.queues[i]
                .front()
                .is_some_and(|(_, item, _)| expired(item))
            {
                if let Some((level, item, _)) = self.queues[i].pop_front() {
                    out.push((level, item));
                    self.waiting -= 1;
                }
            }
            if self.queues[i].is_empty() && self.spilled[i] == 0 {
                self.nonempty &= !(1 << i);
            }
        }
        out
    }

    fn queue_index(&self, level: Level) -> usize {
        if self.settings.prioritised {
            level.index().min(self.queues.len() - 1)
        } else {
            0
        }
    }

    /// Queues a frame at the back of its level, or hands it back when the scheduler is full.
    pub fn enqueue(&mut self, level: Level, item: T) -> Result<(), T> {
        if self.held() >= self.settings.frames_max {
            return Err(item);
        }
        let i = self.queue_index(level);
        self.queues[i].push_back((level, item, false));
        self.nonempty |= 1 << i;
        self.waiting += 1;
        Ok(())
    }

    /// Frames held in memory: waiting plus unacknowledged.
    pub fn held(&self) -> usize {
        self.waiting + self.unacked.len()
    }

    /// Frames waiting to be sent, in memory and spilled.
    pub fn waiting(&self) -> usize {
        self.waiting + self.spilled.iter().sum::<u64>() as usize
    }

    /// Frames waiting at one level (in FIFO mode every frame is counted at its own level).
    pub fn waiting_at(&self, level: Level) -> usize {
        if self.settings.prioritised {
            self.queues.get(level.index()).map_or(0, VecDeque::len)
        } else {
            self.queues[0]
                .iter()
                .filter(|(l, _, _)| *l == level)
                .count()
        }
    }

    /// Frames sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Whether frames may be sent: connected and not paused.
    pub fn is_available(&self) -> bool {
        self.connected && !self.paused
    }

    /// The peer has connected (or a takeover connection replaced the old one, after
    /// [`Self::on_disconnect`]): `msg_id`s restart at 1, and a waiting backlog is released with the
    /// ramp.
    pub fn on_connect(&mut self, now: Nanos) {
        self.connected = true;
        self.next_msg_id = 1;
        self.start_release_if_backlog(now);
    }

    /// The connection is gone: unacknowledged frames go back to the front of their queues.
    pub fn on_disconnect(&mut self) {
        self.connected = false;
        while let Some((_, level, item)) = self.unacked.pop_back() {
            let i = self.queue_index(level);
            self.queues[i].push_front((level, item, true));
            self.nonempty |= 1 << i;
            self.waiting += 1;
        }
    }

    /// An operator paused (`true`) or resumed (`false`) the peer; a resume with a backlog is a
    /// restore and releases it with the ramp.
    pub fn set_paused(&mut self, paused: bool, now: Nanos) {
        let was = self.paused;
        self.paused = paused;
        if was && !paused && self.connected {
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

    /// Hands out the next frame to send, or says why none may go now.
    pub fn next_send(&mut self, now: Nanos) -> Result<Outgoing<'_, T>, Blocked> {
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
        let level = match self.queues[i].front() {
            Some((level, _, _)) => *level,
            None if self.spilled[i] > 0 => return Err(Blocked::Load(i)),
            None => {
                // Cannot happen (the bit says non-empty); repair the bitmap rather than stall.
                self.nonempty &= !(1 << i);
                return Err(Blocked::Empty);
            }
        };
        let limit = if level == Level::URGENT || !self.settings.prioritised {
            self.settings.window
        } else {
            self.settings
                .window
                .saturating_sub(self.settings.window_reserved_top)
        };
        if self.unacked.len() >= limit as usize {
            return Err(Blocked::Window);
        }
        if self.paced {
            if self.limiter.available(now) < self.limiter.wake_tokens(now) {
                return Err(Blocked::Rate(self.limiter.next_wake(now)));
            }
            self.paced = false;
        }
        if !self.limiter.try_acquire(now) {
            self.paced = self.batch_wakes;
            return Err(Blocked::Rate(self.limiter.next_wake(now)));
        }
        let Some((level, item, resend)) = self.queues[i].pop_front() else {
            return Err(Blocked::Empty);
        };
        if self.queues[i].is_empty() && self.spilled[i] == 0 {
            self.nonempty &= !(1 << i);
        }
        self.waiting -= 1;
        let msg_id = self.next_msg_id;
        self.next_msg_id += 1;
        self.stats.sent += 1;
        self.stats.resent += u64::from(resend);
        self.unacked.push_back((msg_id, level, item));
        let (msg_id, level, item) = self
            .unacked
            .back()
            .map(|(m, l, t)| (*m, *l, t))
            .ok_or(Blocked::Empty)?;
        Ok(Outgoing {
            msg_id,
            level,
            item,
        })
    }

    /// The frame [`DeliveryScheduler::next_send`] handed out last, while it is unacknowledged.
    pub fn newest_unacked(&self) -> Option<&T> {
        self.unacked.back().map(|(_, _, item)| item)
    }

    /// A cumulative ACK: releases every unacknowledged frame up to `msg_id`, calling `released`
    /// for each (e.g. to reclaim its disk space). Returns how many were released.
    pub fn on_ack(&mut self, msg_id: u64, mut released: impl FnMut(Level, T)) -> usize {
        let mut n = 0;
        while self.unacked.front().is_some_and(|(m, _, _)| *m <= msg_id) {
            if let Some((_, level, item)) = self.unacked.pop_front() {
                released(level, item);
                n += 1;
            }
        }
        self.stats.acked += n as u64;
        n
    }

    /// Counters.
    pub fn stats(&self) -> DeliveryStats {
        self.stats
    }

    /// Takes every held frame out, unacknowledged first (in send order) then waiting (in
    /// priority order): for a shutdown that hands them to a lower tier.
    pub fn drain(&mut self) -> Vec<(Level, T)> {
        let mut out: Vec<(Level, T)> = self.unacked.drain(..).map(|(_, l, t)| (l, t)).collect();
        for q in &mut self.queues {
            out.extend(q.drain(..).map(|(l, t, _)| (l, t)));
        }
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
}

//! A worker's counters: messages by direction, kind, level and outcome, NACKs by reason, per-SU
//! outcomes and latency histograms. Plain integers and HdrHistograms, touched by one thread:
//! the owner counts into them on the message path, the engine publishes a copy every
//! housekeeping tick and renders the merge on a scrape (`engine::metrics`).

use hdrhistogram::Histogram;

use crate::owner::{Direction, PeerRef};
use crate::wire::{Kind, NackReason};

/// The directions' label values, by [`Direction`] index.
pub const DIRECTIONS: [&str; 2] = ["northbound", "southbound"];
/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Taken in by its owner (in memory or on disk).
    Taken = 0,
    /// Acknowledged by its receiver.
    Delivered = 1,
    /// Counted by Alert Storm Protection instead of delivered.
    Throttled = 2,
    /// Expired after `retention_h`.
    Expired = 3,
}
/// The `outcome` label of each [`Outcome`], by its number.
pub const OUTCOMES: [&str; 4] = ["taken", "delivered", "throttled", "expired"];
/// Frame kinds counted: 11 on the wire, and index 0 for none.
pub const KINDS: usize = 12;
/// Priority levels counted: 1 to 16, and index 0 for none.
pub const LEVELS: usize = 17;
/// Latency is recorded in microseconds, up to an hour, to 3 significant digits.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// The upper bounds of the latency histogram's buckets, in microseconds: 100 µs to 60 s.
pub const LATENCY_BUCKETS_US: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
/// What happened to a frame for one SU, as `dsplane_su_messages_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuOutcome {
    /// Acknowledged by the SU.
    Delivered = 0,
    /// Counted by Alert Storm Protection instead of delivered.
    Throttled = 1,
    /// Expired after `retention_h`.
    Expired = 2,
}
/// The `outcome` label of each [`SuOutcome`], by its number.
pub const SU_OUTCOMES: [&str; 3] = ["delivered", "throttled", "expired"];

/// One peer as its owner saw it at publication: for `/status` and the per-SU gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// The peer.
    pub peer: PeerRef,
    /// Whether it has a connection.
    pub connected: bool,
    /// Frames waiting in memory (the NMS), every level.
    pub nms: u64,
    /// Frames waiting on disk (the SURB), every level.
    pub surb: u64,
}

/// One worker's counters.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    /// Frames by direction, kind, level and [`Outcome`] (index order as the metrics endpoint
    /// reads it).
    pub messages: Vec<u64>,
    /// NACKs sent, by reason (index = aux).
    pub nacks: [u64; 7],
    /// Per direction and level (index `direction * LEVELS + level`): latency from `created_ns`
    /// to the frame being handed to its receiver's connection.
    pub latency: Vec<Option<Histogram<u64>>>,
    /// Per SU (its directory index), level and [`SuOutcome`]: index
    /// `(su * LEVELS + level) * 3 + outcome`, grown on first use.
    pub su_outcomes: Vec<u64>,
    /// (peer, tier, level, frames): filled at publication.
    pub queue_depth: Vec<(String, &'static str, u8, u64)>,
    /// Each peer this worker owns: filled at publication.
    pub peers: Vec<PeerSnapshot>,
    /// (device, code) keys Alert Storm Protection tracks now.
    pub storm_keys_tracked: u64,
    /// Throttled alerts whose summary is still to be sent.
    pub storm_alerts_owed: u64,
    /// STORM_SUMMARY frames sent.
    pub storm_summaries: u64,
    /// Storms started.
    pub storms_started: u64,
    /// Bytes of the log on disk.
    pub surb_bytes: u64,
    /// In-flight requests evicted from a full table.
    pub inflight_requests_evicted: u64,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            messages: vec![0; DIRECTIONS.len() * KINDS * LEVELS * OUTCOMES.len()],
            nacks: [0; 7],
            latency: (0..DIRECTIONS.len() * LEVELS).map(|_| None).collect(),
            su_outcomes: Vec::new(),
            queue_depth: Vec::new(),
            peers: Vec::new(),
            storm_keys_tracked: 0,
            storm_alerts_owed: 0,
            storm_summaries: 0,
            storms_started: 0,
            surb_bytes: 0,
            inflight_requests_evicted: 0,
        }
    }
}

fn index(direction: Direction, kind: Kind, level: u8, outcome: Outcome) -> usize {
    ((direction.index() * KINDS + kind as usize % KINDS) * LEVELS + usize::from(level) % LEVELS)
        * OUTCOMES.len()
        + outcome as usize
}

impl WorkerMetrics {
    /// Counts `n` messages.
    #[inline]
    pub fn count(&mut self, direction: Direction, kind: Kind, level: u8, outcome: Outcome, n: u64) {
        if let Some(c) = self
            .messages
            .get_mut(index(direction, kind, level, outcome))
        {
            *c += n;
        }
    }

    /// Counts a NACK sent.
    #[inline]
    pub fn nack(&mut self, reason: NackReason) {
        if let Some(c) = self.nacks.get_mut(reason as usize) {
            *c += 1;
        }
    }

    /// Counts one frame for Service User `su` (its directory index).
    #[inline]
    pub fn count_su(&mut self, su: u32, level: u8, outcome: SuOutcome) {
        let i = (su as usize * LEVELS + usize::from(level) % LEVELS) * SU_OUTCOMES.len()
            + outcome as usize;
        if i >= self.su_outcomes.len() {
            // Once per SU at most: the directory is fixed at start-up.
            self.su_outcomes.resize(i + 1, 0);
        }
        if let Some(c) = self.su_outcomes.get_mut(i) {
            *c += 1;
        }
    }

    /// Records one message's latency in its direction at its level.
    #[inline]
    pub fn latency(&mut self, direction: Direction, level: u8, latency_ns: u64) {
        let i = direction.index() * LEVELS + usize::from(level) % LEVELS;
        let Some(slot) = self.latency.get_mut(i) else {
            return;
        };
        let h = slot.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("fixed, valid bounds")
        });
        let _ = h.record((latency_ns / 1_000).clamp(1, LATENCY_US_MAX));
    }

    /// Adds another worker's counters to these.
    pub fn merge(&mut self, other: &WorkerMetrics) {
        for (a, b) in self.messages.iter_mut().zip(&other.messages) {
            *a += b;
        }
        for (a, b) in self.nacks.iter_mut().zip(&other.nacks) {
            *a += b;
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            if let Some(b) = b {
                match a {
                    Some(a) => {
                        let _ = a.add(b);
                    }
                    None => *a = Some(b.clone()),
                }
            }
        }
        if self.su_outcomes.len() < other.su_outcomes.len() {
            self.su_outcomes.resize(other.su_outcomes.len(), 0);
        }
        for (a, b) in self.su_outcomes.iter_mut().zip(&other.su_outcomes) {
            *a += b;
        }
        self.queue_depth.extend(other.queue_depth.iter().cloned());
        self.peers.extend(other.peers.iter().copied());
        self.storm_keys_tracked += other.storm_keys_tracked;
        self.storm_alerts_owed += other.storm_alerts_owed;
        self.storm_summaries += other.storm_summaries;
        self.storms_started += other.storms_started;
        self.surb_bytes += other.surb_bytes;
        self.inflight_requests_evicted += other.inflight_requests_evicted;
    }
}

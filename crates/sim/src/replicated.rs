//! The `replicated` store model: 2 or 3 nodes' worth of owners over one simulated PostgreSQL
//! ([`SimDb`]), one node active at a time by the real lease state machine
//! ([`dsplane_cluster::lease::Lease`]) on each node's own clock, and the real worker-side store
//! ([`ReplicatedLog`]) under every owner, talking to the database through [`SimRemote`].
//!
//! # What a seed does to the cluster
//!
//! - The active crashes: its memory is gone, its connections close; a standby's request for the
//!   lease succeeds only once the lease row has expired by the database's clock. The node comes
//!   back later as a standby.
//! - The active pauses (SIGSTOP): it does nothing at all, for a quarter of a lease up to three
//!   leases, then goes on. Woken past its lease, it must find that it may not act, and, if
//!   another node took over meanwhile, be fenced by its next renewal or write. Its owners stay
//!   in its memory, frames and all: nothing of them may reach a peer.
//! - The database is unreachable for a while: requests and commits fail (or end with an
//!   unknown outcome: applied, the answer lost), batches wait and are retried, loads fail.
//! - Requests and commits take time; answers are sometimes lost, and some requests are slow
//!   enough to be given up.
//!
//! # What is checked
//!
//! - At every step, by the database's lease row: a node whose lease says it may act holds the
//!   row's epoch and the row has not expired. So at most one node may act at any instant.
//! - Every ACK (or NACK) and every frame that goes to a peer comes from a node that may act at
//!   that instant and whose epoch is still the newest.
//! - At every takeover, every frame ACKed to its sender and not yet delivered is in the new
//!   active's backlog (the durability check of a recovery).
//! - At the end, every frame ACKed is delivered (the checks of every run), and the table holds
//!   nothing once everything is delivered: deliveries delete their rows.
//! - A retried commit appends nothing twice (an id the table holds is the same row again).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use dsplane_cluster::lease::{Lease, LeaseMs, Request, Role, Ticket as LeaseTicket, LEASE_MS_MIN};
use dsplane_cluster::replicated::{Batch, IdBlocks, LaneBacklog, Remote, ReplicatedLog, Row};
use dsplane_core::log::{Loaded, Log, LogPos, PeerKey, WalError};
use dsplane_engine::config::Durability;
use dsplane_engine::disk::SimRng;
use dsplane_engine::owner::Owner;

use super::{frame_id, Failure, Nanos, Params, StoreModel, World, MS};

/// Lease lengths a seed draws from: `LEASE_MS_MIN` and up to 200 ms more, so that a run of a
/// few simulated seconds sees several takeovers.
const LEASE_MS_SPREAD: u64 = 201;
/// A node's clock runs at 95-105 % of the simulated one (millionths): within the lease's
/// assumption that the node's and the database's clocks differ in rate by less than 10 %.
const CLOCK_PPM_MIN: u64 = 950_000;
const CLOCK_PPM_SPREAD: u64 = 100_001;
/// One answer in this many is lost on the way back (the node gives the request up).
const ANSWER_LOST_ONE_IN: u64 = 30;
/// One commit in this many is applied and its answer lost while the database is reachable (a
/// connection that breaks at `COMMIT`): the committer retries it.
const UNKNOWN_ONE_IN: u64 = 40;
/// Simulated milliseconds of the end's wait for the last deletions to commit (four
/// housekeeping intervals, which write the last deliveries out).
const TABLE_DRAIN_TICKS: u64 = 1_000;

/// The lease row (`dsplane_lease`): who holds it, its epoch, and when it expires by the
/// database's clock (the simulated one).
#[derive(Debug, Clone, Copy)]
struct LeaseRow {
    node: Option<usize>,
    epoch: u64,
    expires_at: Nanos,
}

/// A transaction of a committer: in flight until `ends_at`, or waiting to be tried again.
#[derive(Debug)]
enum CommitState {
    InFlight { ends_at: Nanos },
    Retry { at: Nanos },
}

#[derive(Debug)]
struct Commit {
    batch: Batch,
    state: CommitState,
}

/// One worker's committer (the engine's is a thread with a connection), as the database sees
/// it: the batches its [`SimRemote`] handed over, in order, with the epoch they carry.
#[derive(Debug)]
struct Committer {
    epoch: u64,
    queue: VecDeque<Batch>,
    commit: Option<Commit>,
    committed: LogPos,
    fenced: bool,
    /// Its node's process runs (false while it is paused: the thread starts nothing).
    running: bool,
    /// Its node's process is gone: a transaction in flight still ends at the database.
    gone: bool,
}

/// The simulated PostgreSQL: the frames table, the lease row and the fence epoch, on the
/// simulated clock.
#[derive(Debug)]
pub(crate) struct SimDb {
    now: Nanos,
    unreachable_until: Nanos,
    /// `dsplane_frames`, by (peer, lane) and id.
    lanes: BTreeMap<(PeerKey, u8), BTreeMap<u64, Row>>,
    /// Every id in the table and its lane: ids are unique in the table.
    ids: BTreeMap<u64, (PeerKey, u8)>,
    lease: LeaseRow,
    /// `dsplane_fence`: a write whose epoch is not this one is refused.
    fence_epoch: u64,
    lease_ns: Nanos,
    committers: Vec<Committer>,
    /// What the database found wrong (a row appended twice, different), for the world to
    /// report.
    violations: Vec<String>,
    unknown_commits: u64,
    refused_commits: u64,
    reapplied_rows: u64,
}

impl SimDb {
    fn new(lease_ns: Nanos) -> SimDb {
        SimDb {
            now: 0,
            unreachable_until: 0,
            lanes: BTreeMap::new(),
            ids: BTreeMap::new(),
            lease: LeaseRow {
                node: None,
                epoch: 0,
                expires_at: 0,
            },
            fence_epoch: 0,
            lease_ns,
            committers: Vec::new(),
            violations: Vec::new(),
            unknown_commits: 0,
            refused_commits: 0,
            reapplied_rows: 0,
        }
    }

    fn reachable(&self) -> bool {
        self.now >= self.unreachable_until
    }

    /// `Db::try_acquire`: the lease, with a new epoch, if it has expired (a node cannot take
    /// its own unexpired lease back either); the fence row takes the epoch in the same
    /// transaction.
    fn try_acquire(&mut self, node: usize) -> Option<u64> {
        if self.lease.expires_at > self.now {
            return None;
        }
        let epoch = self.lease.epoch.max(self.fence_epoch) + 1;
        self.lease = LeaseRow {
            node: Some(node),
            epoch,
            expires_at: self.now + self.lease_ns,
        };
        self.fence_epoch = epoch;
        Some(epoch)
    }

    /// `Db::renew`: the row's expiry moved on if it still names this node and epoch (expired
    /// or not: nobody else took it).
    fn renew(&mut self, node: usize, epoch: u64) -> bool {
        if self.lease.node != Some(node) || self.lease.epoch != epoch {
            return false;
        }
        self.lease.expires_at = self.now + self.lease_ns;
        true
    }

    fn add_committer(&mut self, epoch: u64) -> usize {
        self.committers.push(Committer {
            epoch,
            queue: VecDeque::new(),
            commit: None,
            committed: 0,
            fenced: false,
            running: true,
            gone: false,
        });
        self.committers.len() - 1
    }

    /// The rows in the table.
    fn rows(&self) -> usize {
        self.ids.len()
    }

    /// What a new active reads when it takes the lease: the id after the highest in the table,
    /// and every lane with rows (`log::pending`).
    fn backlog(&self) -> (u64, Vec<LaneBacklog>) {
        let next = self.ids.keys().next_back().map_or(1, |id| id + 1);
        let lanes = self
            .lanes
            .iter()
            .filter_map(|(&(peer, lane), rows)| {
                let (&first_id, _) = rows.iter().next()?;
                Some(LaneBacklog {
                    peer,
                    lane,
                    count: rows.len() as u64,
                    first_id,
                })
            })
            .collect();
        (next, lanes)
    }

    /// Whether none of `committers` has a batch waiting or a transaction open.
    fn idle(&self, committers: &[usize]) -> bool {
        committers.iter().all(|&c| {
            self.committers
                .get(c)
                .is_none_or(|c| c.queue.is_empty() && c.commit.is_none())
        })
    }

    /// One transaction of committer `c`: refused if its epoch is not the fence's; else its
    /// appends, then its deletions. `false`: refused.
    fn apply(&mut self, c: usize, batch: &Batch) -> bool {
        if self.committers[c].epoch != self.fence_epoch {
            self.refused_commits += 1;
            return false;
        }
        for row in &batch.rows {
            let lane = (row.peer, row.lane);
            match self.ids.get(&row.id) {
                Some(&held) => {
                    // Only a retried transaction (its first try applied, its answer lost)
                    // appends an id the table holds, and then it is the same row, kept once.
                    let same = held == lane
                        && self
                            .lanes
                            .get(&lane)
                            .and_then(|rows| rows.get(&row.id))
                            .is_some_and(|old| old == row);
                    if !same {
                        self.violations.push(format!(
                            "id {} appended twice with different rows (held in {:?} lane {}, appended for {} lane {})",
                            row.id, held.0, held.1, row.peer, row.lane
                        ));
                    }
                    self.reapplied_rows += 1;
                }
                None => {
                    self.ids.insert(row.id, lane);
                    self.lanes
                        .entry(lane)
                        .or_default()
                        .insert(row.id, row.clone());
                }
            }
        }
        for &(peer, lane, through) in &batch.done {
            let Some(rows) = self.lanes.get_mut(&(peer, lane)) else {
                continue;
            };
            let kept = match through.checked_add(1) {
                Some(after) => rows.split_off(&after),
                None => BTreeMap::new(),
            };
            for id in rows.keys() {
                self.ids.remove(id);
            }
            *rows = kept;
            if rows.is_empty() {
                self.lanes.remove(&(peer, lane));
            }
        }
        true
    }

    /// The committers' transactions that end now, and those that begin.
    fn step(&mut self, rng: &mut SimRng) {
        for c in 0..self.committers.len() {
            if let Some(mut commit) = self.committers[c].commit.take() {
                match commit.state {
                    CommitState::InFlight { ends_at } if ends_at <= self.now => {
                        let reachable = self.reachable();
                        // Unreachable as it ends: the transaction may have committed just
                        // before the connection broke.
                        let applied =
                            (reachable || rng.one_in(2)).then(|| self.apply(c, &commit.batch));
                        let answered = reachable && !rng.one_in(UNKNOWN_ONE_IN);
                        let committer = &mut self.committers[c];
                        match (applied, answered) {
                            (Some(true), true) => {
                                committer.committed = committer.committed.max(commit.batch.upto);
                            }
                            (Some(false), true) => {
                                committer.fenced = true;
                                committer.queue.clear();
                            }
                            _ => {
                                if applied == Some(true) {
                                    self.unknown_commits += 1;
                                }
                                if !committer.gone {
                                    // The outcome is unknown: the same batch again, later.
                                    commit.state = CommitState::Retry {
                                        at: self.now + MS + rng.below(10 * MS),
                                    };
                                    committer.commit = Some(commit);
                                }
                            }
                        }
                    }
                    CommitState::Retry { at } if at <= self.now => {
                        let committer = &self.committers[c];
                        if committer.running && !committer.gone && self.reachable() {
                            commit.state = CommitState::InFlight {
                                ends_at: self.now + commit_latency(rng),
                            };
                        }
                        self.committers[c].commit = Some(commit);
                    }
                    _ => self.committers[c].commit = Some(commit),
                }
            }
            let reachable = self.reachable();
            let committer = &mut self.committers[c];
            if committer.gone {
                committer.queue.clear();
                continue;
            }
            // A new transaction: every batch waiting, merged (the group commit), once the
            // database answers; until then they wait.
            if committer.commit.is_none() && committer.running && !committer.fenced && reachable {
                if let Some(mut batch) = committer.queue.pop_front() {
                    while let Some(later) = committer.queue.pop_front() {
                        batch.merge(later);
                    }
                    committer.commit = Some(Commit {
                        batch,
                        state: CommitState::InFlight {
                            ends_at: self.now + commit_latency(rng),
                        },
                    });
                }
            }
        }
    }

    fn load(
        &self,
        peer: PeerKey,
        lane: u8,
        from: u64,
        below: u64,
        max: usize,
    ) -> Result<Vec<Loaded>, WalError> {
        if !self.reachable() {
            return Err(WalError::Io {
                path: PathBuf::from("postgresql:dsplane_frames"),
                source: io::Error::other("PostgreSQL unreachable (simulated)"),
            });
        }
        let Some(rows) = self.lanes.get(&(peer, lane)) else {
            return Ok(Vec::new());
        };
        if from >= below {
            return Ok(Vec::new());
        }
        Ok(rows
            .range(from..below)
            .take(max)
            .map(|(_, r)| r.clone().into())
            .collect())
    }
}

/// A commit takes 0.2-3.2 ms, and one in 20 up to 20 ms more (a standby slow to confirm).
fn commit_latency(rng: &mut SimRng) -> Nanos {
    let slow = if rng.one_in(20) {
        rng.below(20 * MS)
    } else {
        0
    };
    MS / 5 + rng.below(3 * MS) + slow
}

/// One worker's handle to the [`SimDb`]: what `PgRemote` is to the engine.
pub(crate) struct SimRemote {
    db: Rc<RefCell<SimDb>>,
    committer: usize,
}

impl std::fmt::Debug for SimRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimRemote")
            .field("committer", &self.committer)
            .finish_non_exhaustive()
    }
}

impl Remote for SimRemote {
    fn submit(&mut self, batch: Batch) {
        self.db.borrow_mut().committers[self.committer]
            .queue
            .push_back(batch);
    }

    fn committed(&self) -> LogPos {
        self.db.borrow().committers[self.committer].committed
    }

    fn fenced(&self) -> bool {
        self.db.borrow().committers[self.committer].fenced
    }

    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        from: u64,
        below: u64,
        max: usize,
    ) -> Result<Vec<Loaded>, WalError> {
        self.db.borrow().load(peer, lane, from, below, max)
    }
}

/// What a node's process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    Up,
    /// Stopped (SIGSTOP) until then: it does nothing, reads nothing, sends nothing.
    Paused {
        until: Nanos,
    },
    /// Crashed or stopped (fenced), restarted as a standby then.
    Down {
        until: Nanos,
    },
}

/// A lease request on its way, and its answer.
#[derive(Debug)]
struct Rpc {
    ticket: LeaseTicket,
    request: Request,
    reaches_db_at: Nanos,
    /// On the node's clock: when the node gives it up (a third of the lease, the lease
    /// connection's statement timeout).
    give_up_at: Nanos,
    reached: bool,
    answer: Option<(Nanos, Answer)>,
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Acquired(Option<u64>),
    Renewed(bool),
}

/// One node: its lease, its own clock, and what it holds.
struct Node {
    lease: Lease,
    /// Its clock's rate against the simulated one, in millionths.
    clock_ppm: u64,
    state: NodeState,
    rpc: Option<Rpc>,
    /// Requests given up whose answers may still come: the lease must ignore them.
    late: Vec<Rpc>,
    /// The epoch its owners write with, once it took the lease.
    epoch: Option<u64>,
    /// Its owners after another node took over: memory it must never act on.
    superseded: Vec<Owner<ReplicatedLog<SimRemote>>>,
    committers: Vec<usize>,
}

impl Node {
    fn new(lease: LeaseMs, clock_ppm: u64) -> Node {
        Node {
            lease: Lease::new(lease),
            clock_ppm,
            state: NodeState::Up,
            rpc: None,
            late: Vec::new(),
            epoch: None,
            superseded: Vec::new(),
            committers: Vec::new(),
        }
    }

    /// The node's clock at simulated time `now` (it counts time stopped, as `CLOCK_BOOTTIME`).
    fn local(&self, now: Nanos) -> Nanos {
        (u128::from(now) * u128::from(self.clock_ppm) / 1_000_000) as Nanos
    }

    fn may_act(&self, now: Nanos) -> bool {
        self.lease.may_act(self.local(now))
    }
}

/// The cluster: its nodes, the database, and which node the peers are connected to.
pub(crate) struct Cluster {
    db: Rc<RefCell<SimDb>>,
    nodes: Vec<Node>,
    /// The node whose owners are the world's (the peers' connections are to it).
    serving: Option<usize>,
    lease_ms: LeaseMs,
    uncommitted_max: usize,
}

/// Whether node `n` acts now: deals with peers, ACKs, delivers. The gate the engine is to
/// apply before each send and ACK (`docs/ha.md`).
fn acts(c: &Cluster, n: usize, now: Nanos) -> bool {
    let node = &c.nodes[n];
    if cfg!(dsplane_mutation = "act_without_lease") {
        // The simulator's deliberate bug (docs/simulation.md): a node acts on what it holds
        // whatever its lease says.
        return node.epoch.is_some();
    }
    node.may_act(now)
}

impl Cluster {
    /// The lease, in simulated ns.
    fn lease_ns(&self) -> Nanos {
        self.lease_ms.get() * MS
    }
}

impl StoreModel for Cluster {
    type Log = ReplicatedLog<SimRemote>;

    fn new() -> Self {
        let lease_ms = LeaseMs::new(LEASE_MS_MIN).expect("LEASE_MS_MIN is within the bounds");
        Cluster {
            db: Rc::new(RefCell::new(SimDb::new(lease_ms.get() * MS))),
            nodes: Vec::new(),
            serving: None,
            lease_ms,
            uncommitted_max: 0,
        }
    }

    fn adjust(params: &mut Params) {
        // The owner writes every frame (it is durable); the table is the only log.
        params.durability = Durability::Batch;
        params.disk_faults = false;
    }

    fn start(w: &mut World<Self>) -> Result<(), Failure> {
        let nodes = 2 + w.rng.below(2) as usize;
        let ms = LEASE_MS_MIN + w.rng.below(LEASE_MS_SPREAD);
        let lease_ms = LeaseMs::new(ms).map_err(|e| w.fail(e.to_string()))?;
        // Small enough that an outage fills it: the owners then refuse frames (NACK 5).
        let uncommitted_max = 64 + w.rng.below(4_000) as usize;
        let mut clocks = Vec::new();
        for _ in 0..nodes {
            clocks.push(if cfg!(dsplane_mutation = "clock_beyond_margin") {
                // The simulator's deliberate bug (docs/simulation.md): clocks 20 % slow, twice
                // what the lease's margin allows for.
                800_000
            } else {
                CLOCK_PPM_MIN + w.rng.below(CLOCK_PPM_SPREAD)
            });
        }
        let c = &mut w.store;
        c.lease_ms = lease_ms;
        c.uncommitted_max = uncommitted_max;
        c.db = Rc::new(RefCell::new(SimDb::new(ms * MS)));
        c.nodes = clocks.iter().map(|&ppm| Node::new(lease_ms, ppm)).collect();
        w.note(format!(
            "cluster: {nodes} nodes, lease {ms} ms, clocks {clocks:?} ppm, at most {uncommitted_max} frames uncommitted a worker"
        ));
        Ok(())
    }

    fn fault(w: &mut World<Self>, r: u64) -> Result<(), Failure> {
        let lease = w.store.lease_ns();
        match r {
            40 if w.params.crashes => {
                if let Some(n) = w.store.serving {
                    crash_node(w, n, "the active crashes");
                }
            }
            41 => {
                let Some(n) = w.store.serving else {
                    return Ok(());
                };
                if w.store.nodes[n].state != NodeState::Up {
                    return Ok(());
                }
                let until = w.now + lease / 4 + w.rng.below(3 * lease);
                w.store.nodes[n].state = NodeState::Paused { until };
                set_running(w, n, false);
                w.summary.pauses += 1;
                w.note(format!(
                    "node {n} (the active) pauses until {:.3} s",
                    until as f64 / 1e9
                ));
            }
            42 => {
                let until = w.now + lease / 4 + w.rng.below(3 * lease);
                let mut db = w.store.db.borrow_mut();
                if db.unreachable_until <= w.now {
                    db.unreachable_until = until;
                    drop(db);
                    w.summary.outages += 1;
                    w.note(format!(
                        "PostgreSQL unreachable until {:.3} s",
                        until as f64 / 1e9
                    ));
                }
            }
            43 if w.params.crashes => {
                // A node that is not the active: a standby, or one that was superseded.
                let n = w.rng.below(w.store.nodes.len() as u64) as usize;
                if w.store.serving != Some(n)
                    && !matches!(w.store.nodes[n].state, NodeState::Down { .. })
                {
                    crash_node(w, n, "a node that is not the active crashes");
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn after_faults(_w: &mut World<Self>) -> Result<(), Failure> {
        Ok(())
    }

    fn turn_start(w: &mut World<Self>) -> Result<bool, Failure> {
        cluster_step(w)?;
        Ok(false)
    }

    fn owner_turn(_w: &mut World<Self>, _worker: usize, _flush_due: bool) -> Result<(), Failure> {
        Ok(())
    }

    fn served(w: &World<Self>) -> bool {
        w.store
            .serving
            .is_some_and(|n| w.store.nodes[n].state == NodeState::Up && acts(&w.store, n, w.now))
    }

    fn reaches_peer(w: &World<Self>, what: &dyn Fn() -> String) -> Result<(), Failure> {
        let Some(n) = w.store.serving else {
            return Err(w.fail(format!("{} went to a peer with no node serving", what())));
        };
        check_reach(w, n, what)
    }

    fn drain_start(w: &mut World<Self>) -> Result<(), Failure> {
        w.store.db.borrow_mut().unreachable_until = 0;
        for node in &mut w.store.nodes {
            if let NodeState::Paused { until } = &mut node.state {
                *until = w.now;
            }
        }
        Ok(())
    }

    fn settled(w: &World<Self>) -> bool {
        let Some(n) = w.store.serving else {
            return false;
        };
        Self::served(w)
            && w.peers.iter().all(|p| p.conn.is_some())
            && w.store.db.borrow().idle(&w.store.nodes[n].committers)
            && w.owners.iter().all(|o| o.surb().log().uncommitted() == 0)
    }

    fn check_end(w: &mut World<Self>) -> Result<(), Failure> {
        let settled = w.settled();
        // The last deliveries are written out by the housekeeping, and deleted when that batch
        // commits.
        for _ in 0..TABLE_DRAIN_TICKS {
            if w.store.db.borrow().rows() == 0 {
                break;
            }
            w.now += MS;
            w.tick()?;
        }
        let db = Rc::clone(&w.store.db);
        let db = db.borrow();
        w.summary.unknown_commits = db.unknown_commits;
        w.summary.refused_commits = db.refused_commits;
        let rows: Vec<&Row> = db.lanes.values().flat_map(BTreeMap::values).collect();
        let delivered: Vec<u64> = rows
            .iter()
            .filter_map(|r| frame_id(&r.frame))
            .filter(|id| w.delivered.contains(id))
            .collect();
        if !delivered.is_empty() || (settled && !rows.is_empty()) {
            let first = rows
                .first()
                .map(|r| (r.id, r.peer, r.lane, frame_id(&r.frame)));
            return Err(w.fail(format!(
                "at the end the table holds {} rows, {} of them of frames delivered (first row: {first:?}); settled: {settled}; {} rows re-appended by retries",
                rows.len(),
                delivered.len(),
                db.reapplied_rows
            )));
        }
        w.note(format!(
            "end: {} rows left in the table, {} rows re-appended by retries",
            rows.len(),
            db.reapplied_rows
        ));
        Ok(())
    }
}

/// One way to or from the database: 0.1-2.1 ms, and one time in 25 up to half a lease more.
fn one_way(rng: &mut SimRng, lease: Nanos) -> Nanos {
    let slow = if rng.one_in(25) {
        rng.below(lease / 2)
    } else {
        0
    };
    MS / 10 + rng.below(2 * MS) + slow
}

fn set_running(w: &mut World<Cluster>, n: usize, running: bool) {
    let mut db = w.store.db.borrow_mut();
    for &c in &w.store.nodes[n].committers {
        db.committers[c].running = running;
    }
}

/// Node `n`'s process is gone (a crash, or it stopped once fenced): its memory, its
/// connections and its committers with it; it comes back as a standby later. A request it
/// sent may still reach the database.
fn crash_node(w: &mut World<Cluster>, n: usize, why: &str) {
    w.summary.crashes += 1;
    stop_node(w, n);
    w.note(format!(
        "node {n}: {why}; its memory and connections are gone"
    ));
}

/// The serving node's memory is about to be lost to the cluster (it crashed, stopped, or
/// another node took over). Throttled alerts are counted in memory, and the STORM_SUMMARY that
/// stands for them is a frame without a sender to send it again: in a batch not yet committed,
/// or refused, it is lost with the node. Storms are then not judged at the end.
fn storm_memory_lost(w: &mut World<Cluster>) {
    if w.owners.iter().any(|o| {
        let log = o.surb().log();
        o.storm_stats().owed > 0 || log.uncommitted() > 0 || log.flush_failed()
    }) {
        w.storm_counts_lost = true;
    }
}

fn stop_node(w: &mut World<Cluster>, n: usize) {
    if w.store.serving == Some(n) {
        storm_memory_lost(w);
        w.store.serving = None;
        w.owners_lost();
        w.disconnect_all();
    }
    {
        let mut db = w.store.db.borrow_mut();
        for &c in &w.store.nodes[n].committers {
            db.committers[c].gone = true;
        }
    }
    let restart = w.now + w.store.lease_ns() / 2 + w.rng.below(2 * w.store.lease_ns());
    let node = &mut w.store.nodes[n];
    node.superseded.clear();
    node.committers.clear();
    node.epoch = None;
    node.state = NodeState::Down { until: restart };
}

/// A node that found itself fenced stops: it closes its connections and exits, to be
/// restarted as a standby.
fn node_fenced(w: &mut World<Cluster>, n: usize, why: &str) {
    w.summary.fenced += 1;
    let epoch = w.store.nodes[n].epoch;
    w.note(format!(
        "node {n} (epoch {epoch:?}) is fenced: {why}; it stops"
    ));
    stop_node(w, n);
}

/// The cluster's part of a step: the database's transactions and requests, node restarts and
/// wake-ups, each running node's lease, and the check that at most one node may act.
fn cluster_step(w: &mut World<Cluster>) -> Result<(), Failure> {
    let now = w.now;
    let lease = w.store.lease_ns();
    {
        let db = Rc::clone(&w.store.db);
        let mut db = db.borrow_mut();
        db.now = now;
        db.step(&mut w.rng);
        if let Some(v) = db.violations.first() {
            return Err(w.fail(v.clone()));
        }
        // Requests reach the database whatever became of the node that sent them.
        for (n, node) in w.store.nodes.iter_mut().enumerate() {
            for rpc in node.rpc.iter_mut().chain(node.late.iter_mut()) {
                if rpc.reached || now < rpc.reaches_db_at {
                    continue;
                }
                rpc.reached = true;
                if !db.reachable() {
                    continue;
                }
                let answer = match rpc.request {
                    Request::Acquire => Answer::Acquired(db.try_acquire(n)),
                    Request::Renew { epoch } => Answer::Renewed(db.renew(n, epoch)),
                };
                if !w.rng.one_in(ANSWER_LOST_ONE_IN) {
                    rpc.answer = Some((now + one_way(&mut w.rng, lease), answer));
                }
            }
        }
    }
    for n in 0..w.store.nodes.len() {
        match w.store.nodes[n].state {
            NodeState::Down { until } if now >= until => {
                let node = &mut w.store.nodes[n];
                *node = Node::new(w.store.lease_ms, node.clock_ppm);
                w.note(format!("node {n} starts as a standby"));
            }
            NodeState::Paused { until } if now >= until => {
                w.store.nodes[n].state = NodeState::Up;
                set_running(w, n, true);
                let may = w.store.nodes[n].may_act(now);
                if !may {
                    w.summary.woke_unable += 1;
                }
                w.note(format!(
                    "node {n} wakes (epoch {:?}), may act: {may}",
                    w.store.nodes[n].epoch
                ));
            }
            _ => {}
        }
        if w.store.nodes[n].state == NodeState::Up {
            lease_step(w, n)?;
        }
        if w.store.nodes[n].state == NodeState::Up {
            superseded_turn(w, n)?;
        }
    }
    check_acting(w)
}

/// Node `n`'s lease: the answer to its request (or giving it up), late answers, the next
/// request, and a refused write.
fn lease_step(w: &mut World<Cluster>, n: usize) -> Result<(), Failure> {
    let now = w.now;
    let local = w.store.nodes[n].local(now);
    if let Some(rpc) = w.store.nodes[n].rpc.take() {
        match rpc.answer {
            Some((at, answer)) if at <= now => answered(w, n, rpc.ticket, answer)?,
            _ if local >= rpc.give_up_at => {
                let node = &mut w.store.nodes[n];
                node.lease.on_failed(rpc.ticket, local);
                node.late.push(rpc);
            }
            _ => w.store.nodes[n].rpc = Some(rpc),
        }
    }
    if w.store.nodes[n].state != NodeState::Up {
        return Ok(());
    }
    // Answers to requests given up: the lease must ignore them (they are fed to it all the
    // same, as a connection would hand them over).
    let late = std::mem::take(&mut w.store.nodes[n].late);
    for rpc in late {
        match rpc.answer {
            Some((at, answer)) if at <= now => answered(w, n, rpc.ticket, answer)?,
            None if rpc.reached => {}
            _ => w.store.nodes[n].late.push(rpc),
        }
        if w.store.nodes[n].state != NodeState::Up {
            return Ok(());
        }
    }
    let lease_ns = w.store.lease_ns();
    let node = &mut w.store.nodes[n];
    if node.rpc.is_none() {
        if let Some((ticket, request)) = node.lease.poll(local) {
            node.rpc = Some(Rpc {
                ticket,
                request,
                reaches_db_at: now + one_way(&mut w.rng, lease_ns),
                give_up_at: local + lease_ns / 3,
                reached: false,
                answer: None,
            });
        }
    }
    // A write refused for its epoch: the worker tells the lease, and the node is fenced.
    let refused = {
        let db = w.store.db.borrow();
        w.store.nodes[n]
            .committers
            .iter()
            .any(|&c| db.committers[c].fenced)
    };
    if refused {
        let node = &mut w.store.nodes[n];
        let before = node.lease.role();
        node.lease.on_fenced();
        if node.lease.role() != before {
            node_fenced(w, n, "a write was refused for its epoch");
        }
    }
    Ok(())
}

/// An answer reaches node `n`: the lease decides what it means; a role that changed is acted
/// on (the lease taken: the node becomes the active; fenced: it stops).
fn answered(
    w: &mut World<Cluster>,
    n: usize,
    ticket: LeaseTicket,
    answer: Answer,
) -> Result<(), Failure> {
    let local = w.store.nodes[n].local(w.now);
    let lease = &mut w.store.nodes[n].lease;
    let before = lease.role();
    match answer {
        Answer::Acquired(epoch) => lease.on_acquired(ticket, epoch, local),
        Answer::Renewed(ok) => lease.on_renewed(ticket, ok),
    }
    let after = lease.role();
    if after == before {
        return Ok(());
    }
    match after {
        Role::Active { epoch } => take_over(w, n, epoch),
        Role::Fenced { .. } => {
            node_fenced(w, n, "its renewal found a newer epoch");
            Ok(())
        }
        Role::Standby => Ok(()),
    }
}

/// Node `n` took the lease with `epoch`: it reads the table (the id after the highest, every
/// lane left) and builds its owners with every lane spilled; the peers, whose connections to
/// the node before it are gone, connect to it. The node before keeps its owners in memory.
fn take_over(w: &mut World<Cluster>, n: usize, epoch: u64) -> Result<(), Failure> {
    w.summary.acquisitions += 1;
    if w.summary.acquisitions > 1 {
        w.summary.takeovers += 1;
    }
    if let Some(before) = w.store.serving.take() {
        w.summary.superseded += 1;
        storm_memory_lost(w);
        w.store.nodes[before].superseded = std::mem::take(&mut w.owners);
    }
    w.owners_lost();
    let (next_id, backlog) = w.store.db.borrow().backlog();
    let rows: u64 = backlog.iter().map(|b| b.count).sum();
    let backlog = if cfg!(dsplane_mutation = "resume_without_backlog") {
        // The simulator's deliberate bug (docs/simulation.md): the new active does not read
        // what the table holds.
        Vec::new()
    } else {
        backlog
    };
    let workers = w.params.workers;
    let ids = IdBlocks::new(next_id);
    let mut logs = Vec::with_capacity(workers);
    {
        let owner_of_key = dsplane_engine::owner_in(&w.config, workers);
        let mut db = w.store.db.borrow_mut();
        for worker in 0..workers {
            let committer = db.add_committer(epoch);
            w.store.nodes[n].committers.push(committer);
            let lanes = backlog
                .iter()
                .filter(|b| owner_of_key(b.peer) == Some(worker))
                .copied();
            let remote = SimRemote {
                db: Rc::clone(&w.store.db),
                committer,
            };
            logs.push(
                ReplicatedLog::resume(remote, Arc::clone(&ids), lanes)
                    .with_uncommitted_max(w.store.uncommitted_max),
            );
        }
    }
    w.install_owners(logs)?;
    w.store.serving = Some(n);
    w.store.nodes[n].epoch = Some(epoch);
    w.note(format!(
        "node {n} takes the lease (epoch {epoch}): {rows} rows in the table, ids from {next_id}"
    ));
    w.check_recovered("a takeover")
}

/// A node whose owners were superseded acts on them only if its gate lets it (never, unless
/// the gate is broken): what would come out of them is checked as reaching a peer.
fn superseded_turn(w: &mut World<Cluster>, n: usize) -> Result<(), Failure> {
    if w.store.nodes[n].superseded.is_empty() || !acts(&w.store, n, w.now) {
        return Ok(());
    }
    let (now, unix) = (w.now, w.unix());
    let mut owners = std::mem::take(&mut w.store.nodes[n].superseded);
    let mut result = Ok(());
    'owners: for o in &mut owners {
        let _ = o.handle_timeout(now, unix);
        o.resolve_durable();
        let acks = o.acks().count();
        if acks > 0 {
            result = check_reach(w, n, &|| format!("{acks} ACK runs from its memory"));
            if result.is_err() {
                break;
            }
        }
        let peers: Vec<_> = o.peers().collect();
        for peer in peers {
            // Its connections are open as far as it knows: a write goes out of its socket.
            if let Some(frame) = o.poll_transmit(peer, now, unix) {
                result = check_reach(w, n, &|| {
                    format!(
                        "a {} (frame {:?}) to {peer:?} from its memory",
                        frame.header.kind,
                        frame_id(&frame)
                    )
                });
                if result.is_err() {
                    break 'owners;
                }
            }
        }
    }
    w.store.nodes[n].superseded = owners;
    result
}

/// Something of node `n` reaches a peer now: it must be allowed to act, and its epoch must be
/// the newest taken.
fn check_reach(w: &World<Cluster>, n: usize, what: &dyn Fn() -> String) -> Result<(), Failure> {
    let node = &w.store.nodes[n];
    let row = w.store.db.borrow().lease;
    if !node.may_act(w.now) {
        return Err(w.fail(format!(
            "node {n} sent {} at a time its lease did not let it act (its epoch {:?}; the database's lease: node {:?}, epoch {}, expires at {:.3} s)",
            what(),
            node.epoch,
            row.node,
            row.epoch,
            row.expires_at as f64 / 1e9
        )));
    }
    if node.epoch.is_none_or(|e| row.epoch > e) {
        return Err(w.fail(format!(
            "node {n} sent {} after epoch {} was taken (its own: {:?})",
            what(),
            row.epoch,
            node.epoch
        )));
    }
    Ok(())
}

/// At most one node may act at any instant, judged by the database's lease row: a node whose
/// lease says it may act holds the row's epoch, and the row has not expired.
fn check_acting(w: &World<Cluster>) -> Result<(), Failure> {
    let row = w.store.db.borrow().lease;
    for (n, node) in w.store.nodes.iter().enumerate() {
        if matches!(node.state, NodeState::Down { .. }) || !node.may_act(w.now) {
            continue;
        }
        let epoch = node.lease.epoch();
        if row.node != Some(n) || epoch != Some(row.epoch) || row.expires_at <= w.now {
            return Err(w.fail(format!(
                "at {:.3} s node {n} may act (epoch {epoch:?}, its clock at {:.3} s) while the database's lease row says node {:?}, epoch {}, expires at {:.3} s",
                w.now as f64 / 1e9,
                node.local(w.now) as f64 / 1e9,
                row.node,
                row.epoch,
                row.expires_at as f64 / 1e9
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use dsplane_core::ids::Eui64;
    use dsplane_core::wire::{Frame, Header, Kind};

    const SU: PeerKey = PeerKey::Su(Eui64(7));
    const LEASE: Nanos = 100 * MS;

    fn row(id: u64, byte: u8) -> Row {
        Row {
            id,
            peer: SU,
            lane: 0,
            level: 1,
            enqueued_ns: 5,
            frame: Frame {
                header: Header::new(Kind::Response),
                payload: Bytes::from(vec![byte]),
            },
        }
    }

    fn batch(rows: Vec<Row>, done: Vec<(PeerKey, u8, u64)>) -> Batch {
        let upto = rows.last().map_or(0, |r| r.id);
        Batch { rows, done, upto }
    }

    #[test]
    fn the_lease_is_taken_only_once_expired_and_a_stale_epochs_write_is_refused() {
        let mut db = SimDb::new(LEASE);
        assert_eq!(db.try_acquire(0), Some(1));
        db.now = 50 * MS;
        assert_eq!(db.try_acquire(0), None, "not even its own, unexpired");
        assert!(db.renew(0, 1));
        db.now = 149 * MS;
        assert_eq!(db.try_acquire(1), None, "renewed at 50 ms: until 150 ms");
        db.now = 150 * MS;
        assert_eq!(db.try_acquire(1), Some(2));
        assert!(!db.renew(0, 1), "the epoch moved on");
        let old = db.add_committer(1);
        let new = db.add_committer(2);
        assert!(!db.apply(old, &batch(vec![row(1, 1)], Vec::new())));
        assert_eq!((db.rows(), db.refused_commits), (0, 1));
        assert!(db.apply(new, &batch(vec![row(1, 1)], Vec::new())));
        assert_eq!(db.rows(), 1);
    }

    #[test]
    fn a_commit_applied_twice_keeps_one_row_per_id_and_a_different_row_is_caught() {
        let mut db = SimDb::new(LEASE);
        db.try_acquire(0);
        let c = db.add_committer(1);
        let b = batch(vec![row(1, 1), row(2, 2)], Vec::new());
        assert!(db.apply(c, &b));
        assert!(db.apply(c, &b), "the retry of an unknown outcome");
        assert_eq!((db.rows(), db.reapplied_rows), (2, 2));
        assert!(db.violations.is_empty());
        assert!(db.apply(c, &batch(vec![row(2, 9)], Vec::new())));
        assert_eq!(db.rows(), 2);
        assert!(
            db.violations[0].contains("id 2 appended twice"),
            "{:?}",
            db.violations
        );
    }

    #[test]
    fn deliveries_delete_their_lane_through_an_id_and_a_new_active_reads_what_is_left() {
        let mut db = SimDb::new(LEASE);
        db.try_acquire(0);
        let c = db.add_committer(1);
        let mut other = row(3, 3);
        other.lane = 1;
        assert!(db.apply(c, &batch(vec![row(1, 1), row(2, 2), other], Vec::new())));
        assert!(db.apply(c, &batch(Vec::new(), vec![(SU, 0, 1)])));
        let (next, lanes) = db.backlog();
        assert_eq!(next, 4);
        assert_eq!(
            lanes,
            vec![
                LaneBacklog {
                    peer: SU,
                    lane: 0,
                    count: 1,
                    first_id: 2
                },
                LaneBacklog {
                    peer: SU,
                    lane: 1,
                    count: 1,
                    first_id: 3
                },
            ]
        );
        assert!(db.apply(c, &batch(Vec::new(), vec![(SU, 0, u64::MAX), (SU, 1, 3)])));
        assert_eq!(db.rows(), 0);
        assert_eq!(db.backlog(), (1, Vec::new()));
    }

    /// The real store over the model: committed once its transaction ends, and fenced for good
    /// once a takeover made its epoch stale.
    #[test]
    fn the_store_commits_through_the_model_and_is_fenced_after_a_takeover() {
        let db = Rc::new(RefCell::new(SimDb::new(LEASE)));
        let epoch = db.borrow_mut().try_acquire(0).unwrap();
        let committer = db.borrow_mut().add_committer(epoch);
        let remote = SimRemote {
            db: Rc::clone(&db),
            committer,
        };
        let mut log = ReplicatedLog::new(remote, IdBlocks::new(1));
        let mut rng = SimRng::new(1);
        let f = row(0, 1).frame;
        let stored = log.append(SU, 0, 1, &f, 5, false);
        let pos = log.write_out().unwrap();
        let mut now = 0;
        while log.durable_pos() < pos && now < 1_000 * MS {
            now += MS;
            db.borrow_mut().now = now;
            db.borrow_mut().step(&mut rng);
        }
        assert_eq!(log.durable_pos(), pos);
        assert_eq!(db.borrow().rows(), 1);
        // Another node takes over once the lease expired; the next write is refused.
        now += LEASE;
        db.borrow_mut().now = now;
        assert_eq!(db.borrow_mut().try_acquire(1), Some(epoch + 1));
        log.done(SU, 0, stored);
        log.write_out().unwrap();
        while !log.flush_failed() && now < 2_000 * MS {
            now += MS;
            db.borrow_mut().now = now;
            db.borrow_mut().step(&mut rng);
        }
        assert!(log.flush_failed());
        assert!(log.write_out().is_err());
        assert_eq!(db.borrow().rows(), 1, "the stale deletion changed nothing");
    }

    #[test]
    fn a_node_clock_runs_at_its_rate() {
        let n = Node::new(LeaseMs::new(100).unwrap(), 950_000);
        assert_eq!(n.local(1_000 * MS), 950 * MS);
    }
}

//! [`PgRemote`]: the `replicated` store's database side in PostgreSQL, for one worker.
//!
//! A committer thread takes the batches the worker hands over, waits out the flush interval
//! since its last commit (so one transaction carries everything that arrived meanwhile: a group
//! commit, as the local WAL's `fdatasync` is), and writes them with [`crate::log::commit`] in
//! one transaction fenced by the node's epoch. On success it publishes the position committed
//! and wakes the worker, which ACKs what that covers.
//!
//! - PostgreSQL unreachable, a statement timeout, a lost connection: the batch is kept, the
//!   connection made again after [`RETRY_MS`], and the batch (with whatever arrived since)
//!   written again as a possible repeat: a `COMMIT` that got no answer may have committed, and
//!   its rows are then skipped by id rather than refused ([`crate::log::commit`]'s `again`).
//!   Nothing is ACKed meanwhile; the worker refuses new frames once its bound is reached.
//! - Fenced: another node holds the lease. Final: nothing more is written, and the worker
//!   refuses every write and ACK ([`crate::replicated::Remote::fenced`]).
//!
//! Loads of spilled lanes run on the worker's thread, on a connection of their own (made when
//! first needed, and again after a failure), bounded by the same statement timeout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dsplane_core::log::{Loaded, LogPos, PeerKey, Stored, WalError};
use dsplane_core::wire::{Frame, Header, HEADER_LEN, PAYLOAD_BYTES_MAX_CEILING};

use crate::log::{FrameRow, LoadedRow};
use crate::pg::{ClusterError, Db, WriteError};
use crate::replicated::{Batch, Remote, Row};

/// Milliseconds between attempts to reach PostgreSQL again after a failure.
pub const RETRY_MS: u64 = 100;
/// Most rows one transaction appends. What waited through an outage (up to a worker's bound
/// on uncommitted frames, 262,144) is written in transactions of this many, each committed and
/// ACKed as it goes: one transaction of it all would outlast the committer's statement timeout
/// (half a lease) and be retried for ever. At the 150,000 rows/s or more of `COPY`, some 55 ms.
pub const COMMIT_ROWS_MAX: usize = 8_192;

/// Something to call when more is committed (the worker's waker).
pub type Notify = Box<dyn Fn() + Send>;

/// How a worker's remote reaches PostgreSQL.
#[derive(Clone)]
pub struct RemoteOptions {
    /// The libpq connection string.
    pub conninfo: String,
    /// The node's epoch: every write carries it.
    pub epoch: u64,
    /// Group-commit interval.
    pub flush_interval: Duration,
    /// Bound on each statement and lock wait, ms.
    pub statement_timeout_ms: u64,
    /// For log lines.
    pub worker: usize,
    /// Raised when this committer finds itself fenced: the node's, which stops its engine.
    pub fenced: Option<FenceSignal>,
}

/// A node's flag that one of its writes was fenced, and what wakes the node to it.
#[derive(Clone)]
pub struct FenceSignal {
    /// Set once fenced.
    pub flag: Arc<AtomicBool>,
    /// Called after the flag is set.
    pub notify: Arc<dyn Fn() + Send + Sync>,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<VecDeque<Batch>>,
    wake: Condvar,
    committed: AtomicU64,
    fenced: AtomicBool,
    stop: AtomicBool,
}

/// One worker's PostgreSQL side. See the module documentation.
pub struct PgRemote {
    shared: Arc<Shared>,
    options: RemoteOptions,
    loads: Option<Db>,
    committer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRemote")
            .field("worker", &self.options.worker)
            .field("epoch", &self.options.epoch)
            .finish_non_exhaustive()
    }
}

impl PgRemote {
    /// Starts the committer thread, which calls `notify` after each commit (and once fenced).
    ///
    /// # Errors
    ///
    /// The thread cannot be started.
    pub fn start(options: RemoteOptions, notify: Notify) -> std::io::Result<PgRemote> {
        let shared = Arc::new(Shared::default());
        let committer = {
            let shared = Arc::clone(&shared);
            let options = options.clone();
            std::thread::Builder::new()
                .name(format!("dsplane-commit-{}", options.worker))
                .spawn(move || commit_loop(&shared, &options, &notify))?
        };
        Ok(PgRemote {
            shared,
            options,
            loads: None,
            committer: Some(committer),
        })
    }

    fn load_db(&mut self) -> Result<&mut Db, ClusterError> {
        let db = match self.loads.take() {
            Some(db) => db,
            None => open(&self.options)?,
        };
        Ok(self.loads.insert(db))
    }
}

impl Drop for PgRemote {
    /// Stops the committer after one last attempt at what is queued.
    fn drop(&mut self) {
        // Under the queue's lock, so that the committer cannot check `stop` and then sleep
        // past this wake-up.
        let queue = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.shared.stop.store(true, Ordering::Release);
        drop(queue);
        self.shared.wake.notify_all();
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
    }
}

impl Remote for PgRemote {
    fn submit(&mut self, batch: Batch) {
        let mut queue = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        queue.push_back(batch);
        drop(queue);
        self.shared.wake.notify_one();
    }

    fn committed(&self) -> LogPos {
        self.shared.committed.load(Ordering::Acquire)
    }

    fn fenced(&self) -> bool {
        self.shared.fenced.load(Ordering::Acquire)
    }

    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        from: u64,
        below: u64,
        max: usize,
    ) -> Result<Vec<Loaded>, WalError> {
        let (kind, id) = peer.parts();
        let rows = self
            .load_db()
            .and_then(|db| crate::log::lane(db, (kind, id, lane), from, below, max));
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // Made again on the next load.
                self.loads = None;
                return Err(WalError::Database {
                    why: format!("cannot read spilled frames from PostgreSQL: {e}"),
                });
            }
        };
        rows.into_iter().map(loaded).collect()
    }
}

/// A row as the owner takes it, its bytes checked as a frame.
fn loaded(r: LoadedRow) -> Result<Loaded, WalError> {
    let bad = |why: &str| {
        WalError::Database {
        why: format!(
            "dsplane_frames row id {}: {why}; dsplane will not deliver it. Delete the row by hand once it is accounted for",
            r.id
        ),
    }
    };
    let header: &[u8; HEADER_LEN] = r
        .frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| bad("shorter than a frame header"))?;
    let header = Header::decode(header, PAYLOAD_BYTES_MAX_CEILING)
        .map_err(|e| bad(&format!("bad header: {e}")))?;
    let payload = r.frame.get(HEADER_LEN..).unwrap_or_default();
    if payload.len() != header.payload_len as usize {
        return Err(bad("payload length differs from its header's"));
    }
    let payload = bytes::Bytes::copy_from_slice(payload);
    Ok(Loaded {
        stored: Stored {
            seq: r.id,
            segment: 0,
        },
        level: r.level,
        enqueued_unix_ns: r.enqueued_ns,
        frame: Frame { header, payload },
    })
}

/// Waits for work, then takes everything queued as one batch; `None` once stopped with nothing
/// left.
fn next_batch(shared: &Shared, mut pending: Option<Batch>, due: Instant) -> Option<Batch> {
    let mut queue = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    while queue.is_empty() && pending.is_none() {
        if shared.stop.load(Ordering::Acquire) {
            return None;
        }
        queue = shared
            .wake
            .wait(queue)
            .unwrap_or_else(PoisonError::into_inner);
    }
    // Group commit: what arrives until `due` goes in the same transaction.
    loop {
        let now = Instant::now();
        if now >= due || shared.stop.load(Ordering::Acquire) {
            break;
        }
        queue = shared
            .wake
            .wait_timeout(queue, due - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    let mut batch = pending.take().unwrap_or_default();
    for b in queue.drain(..) {
        batch.merge(b);
    }
    Some(batch)
}

fn commit_loop(shared: &Shared, options: &RemoteOptions, notify: &Notify) {
    let mut db: Option<Db> = None;
    let mut pending: Option<Batch> = None;
    // A batch that failed may have committed.
    let mut again = false;
    let mut last_commit = Instant::now();
    let mut failures = 0u64;
    let retry = Duration::from_millis(RETRY_MS);
    loop {
        let stopping = shared.stop.load(Ordering::Acquire);
        let Some(mut batch) =
            next_batch(shared, pending.take(), last_commit + options.flush_interval)
        else {
            return;
        };
        last_commit = Instant::now();
        let result = connected(&mut db, options)
            .and_then(|db| write_chunks(db, options, &mut batch, &mut again, shared, notify));
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(
                        worker = options.worker,
                        failures,
                        "PostgreSQL commits again"
                    );
                }
                failures = 0;
            }
            Err(WriteError::Fenced(f)) => {
                tracing::error!(worker = options.worker, %f, "write refused: another node holds the lease; this node writes nothing more");
                shared.fenced.store(true, Ordering::Release);
                if let Some(signal) = &options.fenced {
                    signal.flag.store(true, Ordering::Release);
                    (signal.notify)();
                }
                notify();
                return;
            }
            Err(WriteError::Db(e)) => {
                if failures == 0 {
                    tracing::error!(worker = options.worker, error = %e, "cannot commit to PostgreSQL; nothing is ACKed until it can, retrying");
                }
                failures += 1;
                db = None;
                again = true;
                pending = Some(batch);
                if stopping {
                    // One last attempt was made; what is not committed was not ACKed.
                    return;
                }
                std::thread::sleep(retry);
            }
        }
    }
}

fn connected<'a>(
    db: &'a mut Option<Db>,
    options: &RemoteOptions,
) -> Result<&'a mut Db, WriteError> {
    let fresh = match db.take() {
        Some(d) => d,
        None => open(options)?,
    };
    Ok(db.insert(fresh))
}

fn open(options: &RemoteOptions) -> Result<Db, ClusterError> {
    let mut db = Db::connect(&options.conninfo)?;
    db.set_timeouts(options.statement_timeout_ms)?;
    Ok(db)
}

/// Writes `batch` in transactions of at most [`COMMIT_ROWS_MAX`] rows, its deliveries in the
/// last (a delivery may be of a row earlier in the same batch), publishing each commit. On an
/// error, `batch` keeps what is not known to be committed; `again` says whether the first of
/// it may have been (an unanswered `COMMIT`).
fn write_chunks(
    db: &mut Db,
    options: &RemoteOptions,
    batch: &mut Batch,
    again: &mut bool,
    shared: &Shared,
    notify: &Notify,
) -> Result<(), WriteError> {
    loop {
        let n = batch.rows.len().min(COMMIT_ROWS_MAX);
        let last = n == batch.rows.len();
        let (upto, done) = match batch.rows.get(n.wrapping_sub(1)) {
            Some(r) if !last => (r.id, &[][..]),
            _ => (batch.upto, &batch.done[..]),
        };
        write(
            db,
            options.epoch,
            batch.rows.get(..n).unwrap_or_default(),
            done,
            *again,
        )?;
        *again = false;
        batch.rows.drain(..n);
        shared.committed.fetch_max(upto, Ordering::AcqRel);
        notify();
        if last {
            batch.done.clear();
            return Ok(());
        }
    }
}

fn write(
    db: &mut Db,
    epoch: u64,
    rows: &[Row],
    done: &[(PeerKey, u8, u64)],
    again: bool,
) -> Result<(), WriteError> {
    let mut bytes = Vec::with_capacity(rows.iter().map(|r| r.frame.wire_len()).sum());
    for r in rows {
        bytes.extend_from_slice(&r.frame.header_bytes());
        bytes.extend_from_slice(&r.frame.payload);
    }
    let mut at = 0;
    let frame_rows: Vec<FrameRow<'_>> = rows
        .iter()
        .map(|r| {
            let len = r.frame.wire_len();
            let (peer_kind, peer_id) = r.peer.parts();
            let frame = bytes.get(at..at + len).unwrap_or_default();
            at += len;
            FrameRow {
                id: r.id,
                peer_kind,
                peer_id,
                lane: r.lane,
                level: r.level,
                enqueued_ns: r.enqueued_ns,
                frame,
            }
        })
        .collect();
    let done: Vec<(u8, u64, u8, u64)> = done
        .iter()
        .map(|&(peer, lane, through)| {
            let (k, p) = peer.parts();
            (k, p, lane, through)
        })
        .collect();
    crate::log::commit(db, epoch, &frame_rows, &done, again)
}

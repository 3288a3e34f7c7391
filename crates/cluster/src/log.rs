//! The replicated log's frames in PostgreSQL (`dsplane_frames`, [`crate::pg`]).
//!
//! - A batch of frames is appended in one transaction fenced by the writer's epoch
//!   ([`Db::fenced`]), with `COPY … FROM STDIN BINARY`: one round trip for the rows and one
//!   commit, whose durability (and, with `synchronous_standby_names`, replication) is
//!   PostgreSQL's. A frame may be ACKed to its sender once its batch has committed.
//! - Frames delivered are deleted by lane, through the highest id delivered
//!   ([`delete_through`]): the table holds what is not yet delivered, and does not grow without
//!   bound.
//! - A new active loads what is left ([`pending`]), by peer and lane in id order, and goes on
//!   from [`next_id`].
//!
//! [`append_by_insert`] does the same append with one multi-row `INSERT … SELECT unnest(…)`,
//! the alternative `benches/append.rs` measures `COPY` against.

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;

use crate::pg::{col, ClusterError, Db, WriteError};

/// One frame to append: its id (the active's own sequence), its peer, lane and level, when
/// dsplane took it, and its bytes as on the wire.
#[derive(Debug, Clone, Copy)]
pub struct FrameRow<'a> {
    /// Unique and rising among the frames in the table: an active numbers from [`next_id`],
    /// read when it takes the lease, so its frames come after every frame left by the ones
    /// before it (ids of frames deleted may be used again; nothing refers to them).
    pub id: u64,
    /// 1: an SU, 2: a CSP link (as in the local log).
    pub peer_kind: u8,
    /// The SU's EUI-64 or the link's key.
    pub peer_id: u64,
    /// The lane.
    pub lane: u8,
    /// The priority level.
    pub level: u8,
    /// When dsplane took it, ns since the Unix epoch.
    pub enqueued_ns: u64,
    /// Header and payload.
    pub frame: &'a [u8],
}

/// A frame loaded back ([`pending`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedRow {
    /// Its id.
    pub id: u64,
    /// The epoch that wrote it.
    pub epoch: u64,
    /// 1: an SU, 2: a CSP link.
    pub peer_kind: u8,
    /// The peer.
    pub peer_id: u64,
    /// The lane.
    pub lane: u8,
    /// The level.
    pub level: u8,
    /// When dsplane took it.
    pub enqueued_ns: u64,
    /// Header and payload.
    pub frame: Vec<u8>,
}

/// Bigint columns of peers and instants hold u64s bit for bit (EUI-64s use the whole range).
fn bits(v: u64) -> i64 {
    v as i64
}

fn unbits(v: i64) -> u64 {
    v as u64
}

/// A frame id as the column holds it: positive, below 2^63 (`CHECK (id > 0)`).
fn id_col(id: u64) -> Result<i64, ClusterError> {
    i64::try_from(id)
        .ok()
        .filter(|&v| v > 0)
        .ok_or(ClusterError::IdOutOfRange(id))
}

/// The rows' ids as the column holds them; `None` for no rows (nothing to write).
fn ids_of(rows: &[FrameRow<'_>]) -> Result<Option<Vec<i64>>, ClusterError> {
    if rows.is_empty() {
        return Ok(None);
    }
    rows.iter()
        .map(|r| id_col(r.id))
        .collect::<Result<_, _>>()
        .map(Some)
}

fn id_of(v: i64) -> Result<u64, ClusterError> {
    u64::try_from(v).map_err(|_| ClusterError::BadRow {
        table: "dsplane_frames",
        why: format!("id {v} is negative"),
    })
}

fn small(v: i16, what: &str) -> Result<u8, ClusterError> {
    u8::try_from(v).map_err(|_| ClusterError::BadRow {
        table: "dsplane_frames",
        why: format!("{what} {v} is out of range"),
    })
}

/// Appends `rows` in one transaction fenced by `epoch`, by `COPY … BINARY`.
///
/// # Errors
///
/// [`WriteError::Fenced`]: another node holds the lease, nothing was written. A failed query:
/// nothing may be taken as written (the transaction rolled back).
pub fn append(db: &mut Db, epoch: u64, rows: &[FrameRow<'_>]) -> Result<(), WriteError> {
    commit(db, epoch, rows, &[], false)
}

/// One group commit: `rows` appended and the lanes of `done` (kind, peer, lane, through id)
/// deleted through their ids, in one transaction fenced by `epoch`. `again`: this batch may
/// have committed already (its first `COMMIT` had no answer), so rows whose ids are there are
/// skipped (`INSERT … ON CONFLICT DO NOTHING`) rather than refused by the primary key. They
/// can only be this batch's own: ids from the active's range are written by nobody else, and
/// a takeover would have fenced the write.
///
/// # Errors
///
/// As [`append`].
pub fn commit(
    db: &mut Db,
    epoch: u64,
    rows: &[FrameRow<'_>],
    done: &[(u8, u64, u8, u64)],
    again: bool,
) -> Result<(), WriteError> {
    let ids = ids_of(rows)?;
    if ids.is_none() && done.is_empty() {
        return Ok(());
    }
    db.fenced(epoch, |tx| {
        if let Some(ids) = &ids {
            if again {
                insert_rows(tx, epoch, rows, ids, " ON CONFLICT (id) DO NOTHING")?;
            } else {
                copy_rows(tx, epoch, rows, ids)?;
            }
        }
        if !done.is_empty() {
            let kinds: Vec<i16> = done.iter().map(|d| i16::from(d.0)).collect();
            let peers: Vec<i64> = done.iter().map(|d| bits(d.1)).collect();
            let lanes: Vec<i16> = done.iter().map(|d| i16::from(d.2)).collect();
            let through: Vec<i64> = done
                .iter()
                .map(|d| i64::try_from(d.3).unwrap_or(i64::MAX))
                .collect();
            tx.execute(
                "DELETE FROM dsplane_frames f \
                  USING unnest($1::smallint[], $2::bigint[], $3::smallint[], $4::bigint[]) \
                        AS d(k, p, l, t) \
                  WHERE f.peer_kind = d.k AND f.peer_id = d.p AND f.lane = d.l AND f.id <= d.t",
                &[&kinds, &peers, &lanes, &through],
            )?;
        }
        Ok(())
    })
}

fn copy_rows(
    tx: &mut postgres::Transaction<'_>,
    epoch: u64,
    rows: &[FrameRow<'_>],
    ids: &[i64],
) -> Result<(), postgres::Error> {
    let sink = tx.copy_in(
        "COPY dsplane_frames (id, epoch, peer_kind, peer_id, lane, level, enqueued_ns, frame) \
         FROM STDIN BINARY",
    )?;
    let types = [
        Type::INT8,
        Type::INT8,
        Type::INT2,
        Type::INT8,
        Type::INT2,
        Type::INT2,
        Type::INT8,
        Type::BYTEA,
    ];
    let mut writer = BinaryCopyInWriter::new(sink, &types);
    let epoch = bits(epoch);
    for (r, id) in rows.iter().zip(ids) {
        writer.write(&[
            id,
            &epoch,
            &i16::from(r.peer_kind),
            &bits(r.peer_id),
            &i16::from(r.lane),
            &i16::from(r.level),
            &bits(r.enqueued_ns),
            &r.frame,
        ])?;
    }
    writer.finish()?;
    Ok(())
}

fn insert_rows(
    tx: &mut postgres::Transaction<'_>,
    epoch: u64,
    rows: &[FrameRow<'_>],
    ids: &[i64],
    conflict: &str,
) -> Result<(), postgres::Error> {
    let kinds: Vec<i16> = rows.iter().map(|r| i16::from(r.peer_kind)).collect();
    let peers: Vec<i64> = rows.iter().map(|r| bits(r.peer_id)).collect();
    let lanes: Vec<i16> = rows.iter().map(|r| i16::from(r.lane)).collect();
    let levels: Vec<i16> = rows.iter().map(|r| i16::from(r.level)).collect();
    let at: Vec<i64> = rows.iter().map(|r| bits(r.enqueued_ns)).collect();
    let frames: Vec<&[u8]> = rows.iter().map(|r| r.frame).collect();
    tx.execute(
        &format!(
            "INSERT INTO dsplane_frames (id, epoch, peer_kind, peer_id, lane, level, enqueued_ns, frame) \
             SELECT id, $2, k, p, l, v, t, f \
               FROM unnest($1::bigint[], $3::smallint[], $4::bigint[], $5::smallint[], \
                           $6::smallint[], $7::bigint[], $8::bytea[]) AS u(id, k, p, l, v, t, f){conflict}"
        ),
        &[&ids, &bits(epoch), &kinds, &peers, &lanes, &levels, &at, &frames],
    )?;
    Ok(())
}

/// [`append`] by one multi-row `INSERT … SELECT unnest(…)` (the alternative the bench measures).
///
/// # Errors
///
/// As [`append`].
pub fn append_by_insert(db: &mut Db, epoch: u64, rows: &[FrameRow<'_>]) -> Result<(), WriteError> {
    let Some(ids) = ids_of(rows)? else {
        return Ok(());
    };
    db.fenced(epoch, |tx| insert_rows(tx, epoch, rows, &ids, ""))
}

/// Deletes the frames of (peer, lane) through id `through`, delivered; fenced by `epoch`.
/// Returns how many went.
///
/// # Errors
///
/// As [`append`].
pub fn delete_through(
    db: &mut Db,
    epoch: u64,
    peer_kind: u8,
    peer_id: u64,
    lane: u8,
    through: u64,
) -> Result<u64, WriteError> {
    db.fenced(epoch, |tx| {
        tx.execute(
            "DELETE FROM dsplane_frames \
              WHERE peer_kind = $1 AND peer_id = $2 AND lane = $3 AND id <= $4",
            &[
                &i16::from(peer_kind),
                &bits(peer_id),
                &i16::from(lane),
                &i64::try_from(through).unwrap_or(i64::MAX),
            ],
        )
    })
}

/// Every frame not yet delivered, by peer and lane, each lane in id order (a new active's
/// load).
///
/// # Errors
///
/// A failed query.
pub fn pending(db: &mut Db) -> Result<Vec<LoadedRow>, ClusterError> {
    let rows = db.client().query(
        "SELECT id, epoch, peer_kind, peer_id, lane, level, enqueued_ns, frame \
           FROM dsplane_frames ORDER BY peer_kind, peer_id, lane, id",
        &[],
    )?;
    rows.iter().map(loaded_row).collect()
}

/// The id after the highest in the log (1 for an empty one): where a new active's sequence
/// goes on. Ids are positive and below 2^63 (the column's `CHECK`); an id beyond is refused
/// ([`ClusterError::IdOutOfRange`]), not wrapped.
///
/// # Errors
///
/// A failed query.
pub fn next_id(db: &mut Db) -> Result<u64, ClusterError> {
    let row = db
        .client()
        .query_one("SELECT max(id) FROM dsplane_frames", &[])?;
    let max: Option<i64> = col(&row, "dsplane_frames", 0)?;
    match max {
        None => Ok(1),
        Some(m) => id_of(m)?
            .checked_add(1)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or(ClusterError::IdOutOfRange(u64::MAX)),
    }
}

/// One lane's frames left in the table ([`backlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneCount {
    /// 1: an SU, 2: a CSP link.
    pub peer_kind: u8,
    /// The peer.
    pub peer_id: u64,
    /// The lane.
    pub lane: u8,
    /// How many frames.
    pub count: u64,
    /// The lowest id among them.
    pub first_id: u64,
}

/// What is left in the table, per lane: a new active's backlog (how many frames, and the lowest
/// id), by peer and lane.
///
/// # Errors
///
/// A failed query.
pub fn backlog(db: &mut Db) -> Result<Vec<LaneCount>, ClusterError> {
    let rows = db.client().query(
        "SELECT peer_kind, peer_id, lane, count(*), min(id) FROM dsplane_frames \
          GROUP BY peer_kind, peer_id, lane ORDER BY peer_kind, peer_id, lane",
        &[],
    )?;
    const T: &str = "dsplane_frames";
    rows.iter()
        .map(|r| {
            let count: i64 = col(r, T, 3)?;
            Ok(LaneCount {
                peer_kind: small(col(r, T, 0)?, "peer_kind")?,
                peer_id: unbits(col(r, T, 1)?),
                lane: small(col(r, T, 2)?, "lane")?,
                count: u64::try_from(count).unwrap_or(0),
                first_id: id_of(col(r, T, 4)?)?,
            })
        })
        .collect()
}

/// Up to `max` frames of (kind, peer, lane) with ids from `from` and below `below`, in id order
/// (a spilled lane's next frames).
///
/// # Errors
///
/// A failed query, or a damaged row.
pub fn lane(
    db: &mut Db,
    (peer_kind, peer_id, lane): (u8, u64, u8),
    from: u64,
    below: u64,
    max: usize,
) -> Result<Vec<LoadedRow>, ClusterError> {
    let rows = db.client().query(
        "SELECT id, epoch, peer_kind, peer_id, lane, level, enqueued_ns, frame \
           FROM dsplane_frames \
          WHERE peer_kind = $1 AND peer_id = $2 AND lane = $3 AND id >= $4 AND id < $5 \
          ORDER BY id LIMIT $6",
        &[
            &i16::from(peer_kind),
            &bits(peer_id),
            &i16::from(lane),
            &i64::try_from(from).unwrap_or(i64::MAX),
            &i64::try_from(below).unwrap_or(i64::MAX),
            &i64::try_from(max).unwrap_or(i64::MAX),
        ],
    )?;
    rows.iter().map(loaded_row).collect()
}

fn loaded_row(r: &postgres::Row) -> Result<LoadedRow, ClusterError> {
    const T: &str = "dsplane_frames";
    Ok(LoadedRow {
        id: id_of(col(r, T, 0)?)?,
        epoch: unbits(col(r, T, 1)?),
        peer_kind: small(col(r, T, 2)?, "peer_kind")?,
        peer_id: unbits(col(r, T, 3)?),
        lane: small(col(r, T, 4)?, "lane")?,
        level: small(col(r, T, 5)?, "level")?,
        enqueued_ns: unbits(col(r, T, 6)?),
        frame: col(r, T, 7)?,
    })
}

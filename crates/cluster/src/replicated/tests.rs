use std::collections::BTreeMap;

use bytes::Bytes;
use dsplane_core::ids::Eui64;
use dsplane_core::wire::{Header, Kind};

use super::*;

/// A database as a map: batches wait until `commit` applies them in order.
#[derive(Debug, Default)]
struct MemRemote {
    table: BTreeMap<u64, Row>,
    queue: VecDeque<Batch>,
    committed: LogPos,
    fenced: bool,
    loads: usize,
}

impl MemRemote {
    fn commit(&mut self) {
        while let Some(b) = self.queue.pop_front() {
            for r in b.rows {
                self.table.insert(r.id, r);
            }
            for (p, l, through) in b.done {
                self.table
                    .retain(|&id, r| !(r.peer == p && r.lane == l && id <= through));
            }
            self.committed = self.committed.max(b.upto);
        }
    }
}

impl Remote for MemRemote {
    fn submit(&mut self, batch: Batch) {
        self.queue.push_back(batch);
    }
    fn committed(&self) -> LogPos {
        self.committed
    }
    fn fenced(&self) -> bool {
        self.fenced
    }
    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        from: u64,
        below: u64,
        max: usize,
    ) -> Result<Vec<Loaded>, WalError> {
        self.loads += 1;
        Ok(self
            .table
            .range(from..below)
            .filter(|(_, r)| r.peer == peer && r.lane == lane)
            .take(max)
            .map(|(_, r)| r.clone().into())
            .collect())
    }
}

const SU: PeerKey = PeerKey::Su(Eui64(7));

fn frame(n: u8) -> Frame {
    Frame::new(Header::new(Kind::Response), Bytes::from(vec![n; 3])).unwrap()
}

fn log() -> ReplicatedLog<MemRemote> {
    ReplicatedLog::new(MemRemote::default(), IdBlocks::new(1))
}

fn ids(loaded: &[Loaded]) -> Vec<u64> {
    loaded.iter().map(|l| l.stored.seq).collect()
}

#[test]
fn a_frame_is_durable_only_once_its_batch_has_committed() {
    let mut log = log();
    let a = log.append(SU, 0, 1, &frame(1), 10, false);
    let b = log.append(SU, 0, 1, &frame(2), 11, false);
    assert!(b.seq > a.seq);
    let pos = log.write_out().unwrap();
    assert_eq!(pos, b.seq);
    assert!(log.durable_pos() < pos, "nothing is committed yet");
    assert_eq!(log.uncommitted(), 2);
    log.remote_mut().commit();
    assert!(log.durable_pos() >= pos);
    assert_eq!(log.remote().table.len(), 2);
    // Counted off once the log sees the commit.
    log.write_out().unwrap();
    assert_eq!(log.uncommitted(), 0);
}

#[test]
fn deliveries_delete_through_the_highest_id_per_lane_in_the_next_batch() {
    let mut log = log();
    let s: Vec<Stored> = (0..3)
        .map(|n| log.append(SU, 2, 3, &frame(n), 0, false))
        .collect();
    log.write_out().unwrap();
    log.remote_mut().commit();
    log.done(SU, 2, s[1]);
    log.done(SU, 2, s[0]);
    log.write_out().unwrap();
    let batch = log.remote().queue.back().unwrap().clone();
    assert_eq!(batch.done, vec![(SU, 2, s[1].seq)]);
    log.remote_mut().commit();
    assert_eq!(
        log.remote().table.keys().copied().collect::<Vec<_>>(),
        vec![s[2].seq]
    );
}

#[test]
fn a_spilled_lane_loads_committed_frames_then_the_ones_not_yet_committed_in_order() {
    let mut log = log();
    let first: Vec<Stored> = (0..3)
        .map(|n| log.append(SU, 0, 1, &frame(n), 0, true))
        .collect();
    log.write_out().unwrap();
    log.remote_mut().commit();
    let later: Vec<Stored> = (3..5)
        .map(|n| log.append(SU, 0, 1, &frame(n), 0, true))
        .collect();
    log.write_out().unwrap();
    assert!(log.is_spilled(SU, 0));
    assert_eq!(log.spills(), vec![(SU, 0, 5)]);
    let got = log.load(SU, 0, 4, false).unwrap();
    assert_eq!(
        ids(&got),
        vec![first[0].seq, first[1].seq, first[2].seq, later[0].seq]
    );
    // The last one commits before the next load: it is found once, in the table.
    log.remote_mut().commit();
    let got = log.load(SU, 0, 4, false).unwrap();
    assert_eq!(ids(&got), vec![later[1].seq]);
    assert!(!log.is_spilled(SU, 0));
}

#[test]
fn a_write_past_the_uncommitted_bound_is_refused_and_undone() {
    let mut log = log().with_uncommitted_max(3);
    for n in 0..3 {
        log.append(SU, 0, 1, &frame(n), 0, true);
    }
    log.write_out().unwrap();
    log.append(SU, 0, 1, &frame(9), 0, true);
    let e = log.write_out().unwrap_err();
    assert!(
        e.to_string().contains("PostgreSQL has not committed 3"),
        "{e}"
    );
    assert_eq!(
        log.spills(),
        vec![(SU, 0, 3)],
        "the refused frame is off its lane"
    );
    // PostgreSQL back: writes go on.
    log.remote_mut().commit();
    log.append(SU, 0, 1, &frame(10), 0, true);
    log.write_out().unwrap();
    assert_eq!(log.spills(), vec![(SU, 0, 4)]);
}

#[test]
fn a_fenced_log_refuses_every_write_and_says_it_failed() {
    let mut log = log();
    log.append(SU, 0, 1, &frame(1), 0, false);
    log.remote_mut().fenced = true;
    assert!(log.write_out().is_err());
    assert!(log.flush_failed());
    assert!(log.remote().queue.is_empty());
}

#[test]
fn a_new_active_resumes_every_lane_of_the_table_spilled_and_numbers_after_it() {
    let mut old = log();
    let kept: Vec<Stored> = (0..4)
        .map(|n| old.append(SU, 1, 2, &frame(n), 0, false))
        .collect();
    old.write_out().unwrap();
    old.remote_mut().commit();
    let table = std::mem::take(&mut old.remote_mut().table);
    let next = table.keys().max().unwrap() + 1;
    let remote = MemRemote {
        table,
        ..MemRemote::default()
    };
    let mut log = ReplicatedLog::resume(
        remote,
        IdBlocks::new(next),
        [LaneBacklog {
            peer: SU,
            lane: 1,
            count: 4,
            first_id: kept[0].seq,
        }],
    );
    assert_eq!(log.spills(), vec![(SU, 1, 4)]);
    let new = log.append(SU, 1, 2, &frame(9), 0, true);
    assert!(new.seq > kept[3].seq);
    log.write_out().unwrap();
    let got = log.load(SU, 1, 10, false).unwrap();
    let mut want: Vec<u64> = kept.iter().map(|s| s.seq).collect();
    want.push(new.seq);
    assert_eq!(ids(&got), want);
}

#[test]
fn workers_take_disjoint_rising_ids() {
    let blocks = IdBlocks::new(5);
    let mut a = ReplicatedLog::new(MemRemote::default(), Arc::clone(&blocks));
    let mut b = ReplicatedLog::new(MemRemote::default(), blocks);
    let mut seen = std::collections::HashSet::new();
    let mut last_a = 0;
    for n in 0..(2 * ID_BLOCK + 3) {
        let x = a.append(SU, 0, 1, &frame(0), 0, false).seq;
        assert!(x > last_a);
        last_a = x;
        assert!(seen.insert(x));
        if n % 3 == 0 {
            assert!(seen.insert(b.append(SU, 0, 1, &frame(0), 0, false).seq));
        }
    }
    assert!(seen.iter().all(|&id| id >= 5));
}

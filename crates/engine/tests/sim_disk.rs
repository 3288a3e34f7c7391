//! The real store and recovery on the simulated disk: crashes from many seeds never lose a
//! frame whose position was durable, a torn tail is cut, a flipped bit in synced data is refused
//! naming the file and offset, a full disk fails writes with `ENOSPC` and still recovers, and a
//! failed sync stops durability for good. Every store here flushes by hand
//! ([`Flusher::Manual`]), so each run is one deterministic sequence from its seed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use dsplane_engine::config::Durability;
use dsplane_engine::disk::{SimDisk, SimRng};
use dsplane_engine::ids::Eui64;
use dsplane_engine::recovery::{self, LogSettings, RecoveryReport};
use dsplane_engine::store::{self, Flusher, LogOptions, LogPos, Store};
use dsplane_engine::wal::{self, PeerKey, Record, SegmentReader, WalError};
use dsplane_engine::wire::{Frame, Header, Kind};

const SU: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const PEER: PeerKey = PeerKey::Su(SU);
const LEVEL: u8 = 2;
const LANE: u8 = 1;

fn data_dir() -> PathBuf {
    PathBuf::from("/sim/data")
}

fn settings(durability: Durability) -> LogSettings {
    LogSettings {
        workers: 1,
        fifo: false,
        log: LogOptions {
            durability,
            flush_interval: Duration::ZERO,
            reserve_bytes: 0,
        },
    }
}

fn frame(counter: u64) -> Frame {
    let mut h = Header::new(Kind::Response);
    h.su_id = SU;
    h.counter = counter;
    Frame::new(h, Bytes::from(vec![counter as u8; 40])).unwrap()
}

fn try_start(
    disk: &SimDisk,
    durability: Durability,
) -> Result<(Store<SimDisk>, RecoveryReport), WalError> {
    let (mut stores, report) = recovery::recover_on(
        disk,
        &data_dir(),
        settings(durability),
        |_| Some(0),
        |_| Flusher::Manual,
        |_| {},
    )?;
    Ok((stores.remove(0), report))
}

fn start(disk: &SimDisk, durability: Durability) -> (Store<SimDisk>, RecoveryReport) {
    try_start(disk, durability).unwrap()
}

/// The counters of every frame waiting in the store, in order.
fn waiting(store: &mut Store<SimDisk>) -> Vec<u64> {
    store
        .load(PEER, LANE, usize::MAX, store::lane_of(false))
        .unwrap()
        .iter()
        .map(|l| l.frame.header.counter)
        .collect()
}

fn segment_of(store: &Store<SimDisk>, n: u64) -> PathBuf {
    wal::segment_path(store.dir(), n)
}

/// Where the ENQUEUE records of a segment start.
fn enqueue_offsets(disk: &SimDisk, path: &Path) -> Vec<u64> {
    let mut reader = SegmentReader::open_on(disk, path, 0).unwrap();
    let mut out = Vec::new();
    while let Some((at, record)) = reader.next_record().unwrap() {
        if matches!(record, Record::Enqueue { .. }) {
            out.push(at);
        }
    }
    out
}

#[test]
fn every_durable_frame_survives_crashes_from_many_seeds() {
    for durability in [Durability::Sync, Durability::Batch] {
        for seed in 0..40 {
            let mut rng = SimRng::new(seed);
            let mut disk = SimDisk::new();
            // Frames in the log, in order, and how many of them must come back.
            let mut written: Vec<u64> = Vec::new();
            let mut must = 0;
            let mut next = 1;
            for cycle in 0..3 {
                let (mut store, _) = start(&disk, durability);
                let back = waiting(&mut store);
                assert!(
                    back.len() >= must && written.starts_with(&back),
                    "{durability:?} seed {seed} cycle {cycle}: {must} durable of {written:?}, back {back:?}"
                );
                written = back;
                // What came back is on disk: it must come back again.
                must = written.len();
                let mut ends: Vec<LogPos> = Vec::new();
                for _ in 0..1 + rng.below(6) {
                    for _ in 0..1 + rng.below(20) {
                        let (_, end) = store.append(PEER, LANE, LEVEL, &frame(next), 0, true);
                        written.push(next);
                        ends.push(end);
                        next += 1;
                    }
                    store.write_out().unwrap();
                    if rng.one_in(2) {
                        let durable = store.flush().unwrap();
                        assert_eq!(durable, store.durable_pos());
                        let new = ends.iter().filter(|&&e| e <= durable).count();
                        must = must.max(written.len() - ends.len() + new);
                    }
                }
                disk.crash(&mut rng);
                // The crashed process's store can do nothing more on the disk.
                drop(store);
            }
        }
    }
}

#[test]
fn a_torn_tail_is_cut_and_the_synced_frames_recovered() {
    let mut torn = 0;
    for seed in 0..40 {
        let mut rng = SimRng::new(seed);
        let mut disk = SimDisk::new();
        let (mut store, _) = start(&disk, Durability::Batch);
        for c in 1..=10 {
            store.append(PEER, LANE, LEVEL, &frame(c), 0, true);
        }
        store.write_out().unwrap();
        store.flush().unwrap();
        for c in 11..=30 {
            store.append(PEER, LANE, LEVEL, &frame(c), 0, true);
            store.write_out().unwrap();
        }
        let path = segment_of(&store, 1);
        let synced = disk.synced_len(&path).unwrap();
        disk.crash(&mut rng);
        drop(store);
        let check = recovery::check_on(&disk, &data_dir()).unwrap();
        let (mut store, report) = start(&disk, Durability::Batch);
        assert_eq!(check.torn_tails, report.torn_tails, "seed {seed}");
        if let Some((file, offset)) = report.torn_tails.first() {
            torn += 1;
            assert_eq!(file, &path);
            assert!(
                *offset >= synced,
                "seed {seed}: cut at {offset} below {synced}"
            );
            assert_eq!(disk.contents(&path).unwrap().len() as u64, *offset);
        }
        let back = waiting(&mut store);
        assert!(back.len() >= 10, "seed {seed}: {back:?}");
        assert_eq!(back, (1..=back.len() as u64).collect::<Vec<_>>());
    }
    assert!(torn > 5, "only {torn} crashes tore a record");
}

#[test]
fn a_flipped_bit_in_an_old_synced_record_is_refused_and_salvage_lists_it() {
    let mut disk = SimDisk::new();
    let (mut store, _) = start(&disk, Durability::Sync);
    for c in 1..=5 {
        store.append(PEER, LANE, LEVEL, &frame(c), 0, true);
    }
    store.write_out().unwrap();
    store.flush().unwrap();
    // The idle COMMIT that records the batch as durable, and its sync.
    store.write_out().unwrap();
    store.flush().unwrap();
    let path = segment_of(&store, 1);
    let at = enqueue_offsets(&disk, &path)[1];
    disk.flip_bit(&path, at + 30, 3).unwrap();
    disk.crash(&mut SimRng::new(7));
    drop(store);

    let e = try_start(&disk, Durability::Sync).unwrap_err();
    match &e {
        WalError::Corrupt {
            path: p, offset, ..
        } => {
            assert_eq!((p, *offset), (&path, at));
        }
        other => panic!("{other}"),
    }
    let text = e.to_string();
    assert!(text.contains(&path.display().to_string()) && text.contains(&format!("byte {at}")));
    assert!(recovery::check_on(&disk, &data_dir()).is_err());

    let out = recovery::salvage_on(
        &disk,
        &data_dir(),
        settings(Durability::Sync),
        |_| Some(0),
        |_| Flusher::Manual,
        |_| {},
    )
    .unwrap();
    assert_eq!(out.frames_kept, 4);
    let lost = out.losses.join("\n");
    assert!(
        lost.contains(&path.display().to_string()) && lost.contains(&format!("bytes {at} to")),
        "{lost}"
    );
    assert!(lost.contains("seq 2"), "{lost}");
    assert_eq!(out.frames_lost, Some(1), "{lost}");
    let (mut store, report) = start(&disk, Durability::Sync);
    assert_eq!(report.generation, out.generation);
    assert_eq!(waiting(&mut store), vec![1, 3, 4, 5]);
}

#[test]
fn a_random_flip_in_synced_segment_bytes_is_never_recovered_silently() {
    for seed in 0..30 {
        let mut rng = SimRng::new(seed);
        let mut disk = SimDisk::new();
        let (mut store, _) = start(&disk, Durability::Sync);
        for c in 1..=8 {
            store.append(PEER, LANE, LEVEL, &frame(c), 0, true);
        }
        store.write_out().unwrap();
        store.flush().unwrap();
        store.close();
        drop(store);
        let (path, offset) = disk
            .flip_random_bit(&mut rng, 0, |p| p.extension().is_some_and(|e| e == "wal"))
            .unwrap();
        disk.crash(&mut rng);
        // Either refused, naming the file, or every frame back intact.
        match try_start(&disk, Durability::Sync) {
            Err(e) => assert!(
                e.to_string().contains(&path.display().to_string()),
                "seed {seed}: flip at {offset}: {e}"
            ),
            Ok((mut store, _)) => {
                assert_eq!(
                    waiting(&mut store),
                    (1..=8).collect::<Vec<_>>(),
                    "seed {seed}: flip at {offset}"
                );
            }
        }
    }
}

#[test]
fn a_full_disk_fails_write_out_with_enospc_and_recovery_still_works() {
    let mut disk = SimDisk::new();
    let (mut store, _) = start(&disk, Durability::Sync);
    for c in 1..=5 {
        store.append(PEER, LANE, LEVEL, &frame(c), 0, true);
    }
    store.write_out().unwrap();
    store.flush().unwrap();
    disk.fill();
    store.append(PEER, LANE, LEVEL, &frame(6), 0, true);
    let e = store.write_out().unwrap_err();
    assert!(wal::is_no_space(&e), "{e:?}");
    assert_eq!(store.stats.write_errors, 1);
    disk.crash(&mut SimRng::new(1));
    drop(store);
    // Still full: recovery in place needs no room.
    let (mut store, report) = start(&disk, Durability::Sync);
    assert!(report.in_place);
    assert_eq!(waiting(&mut store), vec![1, 2, 3, 4, 5]);
    // And once there is room again, frames are taken.
    disk.set_capacity(None);
    store.append(PEER, LANE, LEVEL, &frame(6), 0, true);
    store.write_out().unwrap();
    store.flush().unwrap();
}

#[test]
fn a_failed_sync_sets_flush_failed_for_good_with_or_without_a_thread() {
    // By hand.
    let disk = SimDisk::new();
    let (mut store, _) = start(&disk, Durability::Batch);
    store.append(PEER, LANE, LEVEL, &frame(1), 0, true);
    store.write_out().unwrap();
    let before = store.durable_pos();
    disk.fail_syncs(1);
    assert!(store.flush().is_err());
    assert!(store.flush_failed());
    assert_eq!(store.durable_pos(), before);
    // The disk would sync again, but a log whose sync failed never claims durability again.
    store.append(PEER, LANE, LEVEL, &frame(2), 0, true);
    store.write_out().unwrap();
    assert!(store.flush().is_err());
    assert_eq!(store.durable_pos(), before);

    // The same with the flusher thread, on the same kind of disk.
    let disk = SimDisk::new();
    let dir = Path::new("/sim/threaded/w0");
    let mut store = Store::create_on(
        disk.clone(),
        dir,
        settings(Durability::Batch).log,
        Flusher::Thread(Box::new(|| {})),
    )
    .unwrap();
    let (_, end) = store.append(PEER, LANE, LEVEL, &frame(1), 0, true);
    store.write_out().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.durable_pos() < end {
        assert!(std::time::Instant::now() < deadline, "never durable");
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = store.durable_pos();
    disk.fail_syncs(1);
    store.append(PEER, LANE, LEVEL, &frame(2), 0, true);
    store.write_out().unwrap();
    while !store.flush_failed() {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure was not seen"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(store.durable_pos(), before);
}

/// Found by the simulator: a load writes what is buffered first, and on a full disk that write
/// failed, the load returned the error, and the owner forgot the lane's frames. The load now
/// goes on with what is on disk (the failed write undid only what it had buffered), from the
/// spill as the undo left it (the first fix loaded from a copy taken before the write, and put
/// the undone frame's count back).
#[test]
fn spilled_frames_load_on_a_full_disk() {
    let disk = SimDisk::new();
    let (mut store, _) = start(&disk, Durability::Batch);
    for c in 1..=4 {
        store.append(PEER, LANE, LEVEL, &frame(c), 0, true);
    }
    store.write_out().unwrap();
    store.flush().unwrap();
    disk.fill();
    // Something buffered that cannot be written: a new spilled frame (refused, undone) and the
    // acknowledgement of nothing yet.
    store.append(PEER, LANE, LEVEL, &frame(5), 0, true);
    let loaded = store
        .load(PEER, LANE, 2, store::lane_of(false))
        .expect("a full disk does not stop a load of what is on it");
    let counters: Vec<u64> = loaded.iter().map(|l| l.frame.header.counter).collect();
    assert_eq!(counters, vec![1, 2]);
    assert_eq!(
        store.spilled(PEER, LANE),
        2,
        "frame 5 was undone with the failed write"
    );
    assert_eq!(waiting(&mut store), vec![3, 4]);
}

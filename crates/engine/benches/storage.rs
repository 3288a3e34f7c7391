//! Durable intake, for the durability design: our write-ahead log (`dsplane_engine::store::Store`)
//! beside `redb` and beside a plain file, in the same run, on the same disk.
//!
//! One iteration makes 1,000 frames of 200 bytes (64-byte header + 136-byte payload) durable and
//! then takes the acknowledgement path for them:
//!
//! * `dsplane_wal`: `append` × 1,000, `write_out`, wait until `durable_pos` reaches the returned
//!   position (durability `batch`, flush interval 0: the flusher syncs as soon as asked, which
//!   is also what `sync` does); then `done` for each, as the engine does when the SU ACKs. The
//!   DONE record is written with the next batch and needs no sync of its own: losing it only
//!   re-delivers (at least once).
//! * `redb`: insert the 1,000 frames in one write transaction with `Durability::Immediate`,
//!   commit; then remove them in another immediate transaction (the ACK path).
//! * `redb_lazy_delete`: the same, but the removal commits with `Durability::None`, redb's
//!   equivalent of the WAL's unsynced DONE record.
//! * `plain_file`: append the 1,000 records (4-byte length + 200 bytes) in one `write` and
//!   `sync_data`: the floor for any log on this disk. Truncated every 64 MiB.
//!
//! `record_checksum`: the checksum of 1,000 log record bodies of 224 bytes (an ENQUEUE of a
//! 128-byte payload), by `dsplane_engine::checksum::crc32c` (three lanes per 192-byte block)
//! and by the `crc32c` crate (one chain at this length), the same function.
//!
//! Run: `cargo bench --bench storage`. The files live in the system temporary directory; put it
//! on the disk you care about (`TMPDIR=...`).

#[path = "../../../benches/common/mod.rs"]
mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Ratios;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dsplane_engine::config::Durability;
use dsplane_engine::ids::Eui64;
use dsplane_engine::store::{LogOptions, Store, Stored};
use dsplane_engine::wal::PeerKey;
use dsplane_engine::wire::{Frame, Header, Kind, HEADER_LEN};
use redb::{Database, ReadableTableMetadata, TableDefinition};

const RECORDS: u64 = 1_000;
const RECORD_BYTES: usize = 200;
const SAMPLES: usize = 10;
const SU: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("frames");

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dsplane-bench-storage-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn frames() -> Vec<Frame> {
    let payload = Bytes::from(vec![0x5A; RECORD_BYTES - HEADER_LEN]);
    (0..RECORDS)
        .map(|i| {
            let mut h = Header::new(Kind::DeviceAlert);
            h.su_id = SU;
            h.device_id = Eui64(i);
            h.alert_code = 0x8F75;
            h.msg_id = i + 1;
            Frame::new(h, payload.clone()).unwrap()
        })
        .collect()
}

fn wire_bytes(frame: &Frame) -> Vec<u8> {
    let mut v = frame.header_bytes().to_vec();
    v.extend_from_slice(&frame.payload);
    v
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group.throughput(Throughput::Elements(RECORDS));
    group.sample_size(SAMPLES);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
}

fn storage(c: &mut Criterion) {
    let frames = frames();
    let records: Vec<Vec<u8>> = frames.iter().map(wire_bytes).collect();
    assert!(records.iter().all(|r| r.len() == RECORD_BYTES));

    let mut ratios = Ratios::new("durable_1000x200B", RECORDS, SAMPLES);
    let mut group = c.benchmark_group("durable_1000x200B");
    configure(&mut group);

    // Our WAL.
    {
        let wal_dir = dir("wal");
        let main = std::thread::current();
        let mut store = Store::create(
            &wal_dir,
            LogOptions {
                durability: Durability::Batch,
                flush_interval: Duration::ZERO,
                reserve_bytes: 0,
            },
            Box::new(move || main.unpark()),
        )
        .unwrap();
        let peer = PeerKey::Su(SU);
        let (lane, level) = (2u8, 3u8);
        let mut stored: Vec<Stored> = Vec::with_capacity(RECORDS as usize);
        group.bench_function("dsplane_wal", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    stored.clear();
                    let mut pos = 0;
                    for frame in &frames {
                        let (s, p) = store.append(peer, lane, level, frame, 0, false);
                        stored.push(s);
                        pos = p;
                    }
                    let written = store.write_out().unwrap();
                    assert!(written >= pos);
                    while store.durable_pos() < pos {
                        std::thread::park_timeout(Duration::from_millis(5));
                    }
                    for s in &stored {
                        store.done(peer, lane, *s);
                    }
                }
                ratios.record("dsplane_wal", iters, t.elapsed())
            })
        });
        drop(store);
        let _ = std::fs::remove_dir_all(&wal_dir);
    }

    // redb, with the ACK path durable or not.
    for (name, lazy_delete) in [("redb", false), ("redb_lazy_delete", true)] {
        let redb_dir = dir(name);
        let db = Database::create(redb_dir.join("frames.redb")).unwrap();
        let mut next_key = 0u64;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    let first = next_key;
                    let mut txn = db.begin_write().unwrap();
                    txn.set_durability(redb::Durability::Immediate);
                    {
                        let mut table = txn.open_table(TABLE).unwrap();
                        for r in &records {
                            table.insert(next_key, r.as_slice()).unwrap();
                            next_key += 1;
                        }
                    }
                    txn.commit().unwrap();
                    let mut txn = db.begin_write().unwrap();
                    if lazy_delete {
                        txn.set_durability(redb::Durability::None);
                    }
                    {
                        let mut table = txn.open_table(TABLE).unwrap();
                        for key in first..next_key {
                            table.remove(key).unwrap();
                        }
                    }
                    txn.commit().unwrap();
                }
                ratios.record(name, iters, t.elapsed())
            })
        });
        // Every frame inserted was removed (no table at all if a filter skipped this one).
        let txn = db.begin_read().unwrap();
        match txn.open_table(TABLE) {
            Ok(table) => assert_eq!(table.len().unwrap(), 0),
            Err(redb::TableError::TableDoesNotExist(_)) => assert_eq!(next_key, 0),
            Err(e) => panic!("{e}"),
        }
        drop(txn);
        drop(db);
        let _ = std::fs::remove_dir_all(&redb_dir);
    }

    // A plain file: one write and one sync_data per batch.
    {
        let file_dir = dir("file");
        let path = file_dir.join("log");
        let mut file: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut buf = Vec::with_capacity(RECORDS as usize * (4 + RECORD_BYTES));
        let mut len = 0u64;
        group.bench_function("plain_file", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    buf.clear();
                    for r in &records {
                        buf.extend_from_slice(&(r.len() as u32).to_le_bytes());
                        buf.extend_from_slice(r);
                    }
                    file.write_all(&buf).unwrap();
                    file.sync_data().unwrap();
                    len += buf.len() as u64;
                    if len >= 64 << 20 {
                        file.set_len(0).unwrap();
                        len = 0;
                    }
                }
                ratios.record("plain_file", iters, t.elapsed())
            })
        });
        drop(file);
        let _ = std::fs::remove_dir_all(&file_dir);
    }
    group.finish();
    ratios.print(&[
        ("dsplane_wal", "redb"),
        ("dsplane_wal", "redb_lazy_delete"),
        ("dsplane_wal", "plain_file"),
    ]);
}

/// Bytes of an ENQUEUE record's body with a 128-byte payload.
const CHECKSUM_BODY_BYTES: usize = 224;

fn record_checksum(c: &mut Criterion) {
    let bodies: Vec<Vec<u8>> = (0..RECORDS as usize)
        .map(|i| {
            (0..CHECKSUM_BODY_BYTES)
                .map(|j| (i * 31 + j * 7) as u8)
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("record_checksum");
    group.throughput(Throughput::Elements(RECORDS));
    group.bench_function("lanes", |b| {
        b.iter(|| {
            bodies.iter().fold(0u32, |acc, body| {
                acc ^ dsplane_engine::checksum::crc32c(std::hint::black_box(body))
            })
        })
    });
    group.bench_function("crc32c_crate", |b| {
        b.iter(|| {
            bodies.iter().fold(0u32, |acc, body| {
                acc ^ crc32c::crc32c(std::hint::black_box(body))
            })
        })
    });
    // Each record picked by the last checksum: one after another, as the owner writes them
    // (nothing overlaps a checksum with the next one).
    let chained = |sum: fn(&[u8]) -> u32| {
        let mut acc = 0u32;
        for i in 0..bodies.len() {
            let body = &bodies[(i + (acc & 1) as usize) % bodies.len()];
            acc = sum(std::hint::black_box(body));
        }
        acc
    };
    group.bench_function("lanes_chained", |b| {
        b.iter(|| chained(dsplane_engine::checksum::crc32c))
    });
    group.bench_function("crc32c_crate_chained", |b| {
        b.iter(|| chained(crc32c::crc32c))
    });
    group.finish();
}

criterion_group!(benches, record_checksum, storage);
criterion_main!(benches);

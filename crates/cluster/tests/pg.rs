//! The lease, its fencing and the schema against a real PostgreSQL (a throwaway cluster per
//! test, `dsplane_cluster::testing`).

use std::time::Duration;

use dsplane_cluster::lease::LeaseMs;
use dsplane_cluster::pg::{ClusterError, Db, WriteError, SCHEMA_VERSION};
use dsplane_cluster::testing::TempPostgres;

fn db(pg: &TempPostgres) -> Db {
    Db::connect(&pg.conninfo()).expect("connect")
}

fn ms(ms: u64) -> LeaseMs {
    LeaseMs::new(ms).unwrap()
}

/// Long enough that nothing in a test expires by accident on a slow machine.
const LONG: u64 = 10_000;

#[test]
fn init_creates_the_tables_once_and_refuses_a_newer_schema() {
    let Some(pg) = TempPostgres::start("init") else {
        return;
    };
    let mut a = db(&pg);
    assert!(matches!(a.check(), Err(ClusterError::NoSchema)));
    assert_eq!(a.init().unwrap(), SCHEMA_VERSION);
    // Again, and from another connection: nothing changes.
    assert_eq!(db(&pg).init().unwrap(), SCHEMA_VERSION);
    assert_eq!(a.check().unwrap(), SCHEMA_VERSION);
    assert_eq!(a.holder().unwrap(), None, "nobody has held the lease");
    a.client()
        .execute(
            "UPDATE dsplane_meta SET value = $1 WHERE key = 'schema_version'",
            &[&(SCHEMA_VERSION + 1).to_string()],
        )
        .unwrap();
    for e in [a.check().unwrap_err(), a.init().unwrap_err()] {
        let text = e.to_string();
        assert!(matches!(e, ClusterError::SchemaTooNew { found } if found == SCHEMA_VERSION + 1));
        assert!(
            text.contains("schema version 2, newer than this dsplane's 1"),
            "{text}"
        );
    }
    a.client()
        .execute(
            "UPDATE dsplane_meta SET value = 'x' WHERE key = 'schema_version'",
            &[],
        )
        .unwrap();
    assert!(matches!(a.check(), Err(ClusterError::BadSchemaVersion(v)) if v == "x"));
}

#[test]
fn one_node_holds_the_lease_until_it_expires_then_a_takeover_fences_it() {
    let Some(pg) = TempPostgres::start("lease") else {
        return;
    };
    let (mut a, mut b) = (db(&pg), db(&pg));
    a.init().unwrap();
    let ea = a
        .try_acquire("node-a", ms(LONG))
        .unwrap()
        .expect("a free lease");
    assert_eq!(ea, 1);
    assert_eq!(b.try_acquire("node-b", ms(LONG)).unwrap(), None, "a's runs");
    assert_eq!(
        a.try_acquire("node-a", ms(LONG)).unwrap(),
        None,
        "not even a's own: an earlier run of it may be alive"
    );
    assert!(a.renew("node-a", ea, ms(LONG)).unwrap());
    let holder = b.holder().unwrap().unwrap();
    assert_eq!(
        (holder.node.as_str(), holder.epoch, holder.expired),
        ("node-a", 1, false)
    );
    // a's fenced writes commit.
    a.client()
        .batch_execute("CREATE TABLE t (epoch bigint, v text)")
        .unwrap();
    a.fenced(ea, |tx| {
        tx.execute("INSERT INTO t VALUES ($1, 'a1')", &[&(ea as i64)])
    })
    .unwrap();
    // a's last renewal is short, and a stops renewing (killed, stopped, cut off): its lease
    // runs out by the server's clock.
    assert!(a.renew("node-a", ea, ms(100)).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(b.holder().unwrap().unwrap().expired);
    let eb = b.try_acquire("node-b", ms(LONG)).unwrap().expect("expired");
    assert_eq!(eb, 2);
    // a wakes: its renewal fails, and so does every write it tries.
    assert!(!a.renew("node-a", ea, ms(LONG)).unwrap());
    let e = a
        .fenced(ea, |tx| tx.execute("INSERT INTO t VALUES (1, 'a2')", &[]))
        .unwrap_err();
    match e {
        WriteError::Fenced(f) => assert_eq!((f.held, f.current), (1, 2)),
        other => panic!("{other}"),
    }
    b.fenced(eb, |tx| tx.execute("INSERT INTO t VALUES (2, 'b1')", &[]))
        .unwrap();
    let rows: Vec<String> = b
        .client()
        .query("SELECT v FROM t ORDER BY v", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["a1", "b1"], "nothing of a's after the takeover");
}

#[test]
fn a_new_run_of_the_same_node_fences_the_old_run() {
    let Some(pg) = TempPostgres::start("same-name") else {
        return;
    };
    let (mut old, mut new) = (db(&pg), db(&pg));
    old.init().unwrap();
    let e1 = old.try_acquire("node-a", ms(100)).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // node-a restarted (the old process only stopped): same name, a new epoch.
    let e2 = new
        .try_acquire("node-a", ms(LONG))
        .unwrap()
        .expect("expired");
    assert_eq!(e2, e1 + 1);
    assert!(
        !old.renew("node-a", e1, ms(LONG)).unwrap(),
        "the old run's epoch is gone"
    );
    assert!(matches!(
        old.fenced(e1, |_| Ok(())).unwrap_err(),
        WriteError::Fenced(_)
    ));
    assert!(new.renew("node-a", e2, ms(LONG)).unwrap());
}

#[test]
fn renewals_never_wait_behind_the_actives_own_writes_and_timeouts_end_a_hung_wait() {
    let Some(pg) = TempPostgres::start("renew-vs-write") else {
        return;
    };
    let (mut a, mut lease) = (db(&pg), db(&pg));
    a.init().unwrap();
    let ea = a.try_acquire("node-a", ms(LONG)).unwrap().unwrap();
    lease.set_timeouts(200).unwrap();
    // A write that stays open (a slow commit waiting for a standby) while the lease is renewed
    // on the node's other connection: the renewal goes through.
    a.fenced(ea, |_| {
        assert!(lease.renew("node-a", ea, ms(LONG)).unwrap());
        Ok(())
    })
    .unwrap();
    // A lock held on the lease row itself: the renewal ends in an error at the timeout, which
    // the lease counts as a failure, instead of waiting for ever.
    let mut other = db(&pg);
    let mut tx = other.client().transaction().unwrap();
    tx.execute("SELECT 1 FROM dsplane_lease WHERE id = 1 FOR UPDATE", &[])
        .unwrap();
    let e = lease.renew("node-a", ea, ms(LONG)).unwrap_err();
    assert!(e.to_string().contains("timeout"), "{e}");
    tx.rollback().unwrap();
    assert!(lease.renew("node-a", ea, ms(LONG)).unwrap());
}

#[test]
fn a_takeover_waits_for_the_old_nodes_write_in_flight() {
    let Some(pg) = TempPostgres::start("fence-race") else {
        return;
    };
    let (mut a, mut b) = (db(&pg), db(&pg));
    a.init().unwrap();
    a.client().batch_execute("CREATE TABLE t (v text)").unwrap();
    let ea = a.try_acquire("node-a", ms(100)).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The lease has expired; a's write began before anyone took over, and holds the row.
    b.client()
        .batch_execute("SET lock_timeout = '200ms'")
        .unwrap();
    let r = a.fenced(ea, |tx| {
        tx.execute("INSERT INTO t VALUES ('in flight')", &[])?;
        // While it is open, a takeover cannot commit: it waits on the lease row.
        let blocked = b.try_acquire("node-b", ms(LONG));
        Ok(blocked)
    });
    let blocked = r.unwrap();
    let e = blocked.expect_err("the takeover waited for the lock");
    assert!(e.to_string().contains("lock timeout"), "{e}");
    // Once the write has committed, the takeover goes through, and the new active sees it.
    let eb = b.try_acquire("node-b", ms(LONG)).unwrap().expect("expired");
    assert_eq!(eb, ea + 1);
    let n: i64 = b
        .client()
        .query_one("SELECT count(*) FROM t", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[test]
fn wrong_credentials_a_missing_database_and_a_dead_server_are_told_apart() {
    let Some(pg) = TempPostgres::start("errors") else {
        return;
    };
    let conn = |s: &str| Db::connect(s).unwrap_err();
    let e = conn(&format!(
        "host=127.0.0.1 port={} dbname=dsplane user=nobody",
        pg.port()
    ));
    assert!(matches!(e, ClusterError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("\"nobody\""), "{e}");
    assert!(e.to_string().contains("check [cluster] postgres"), "{e}");
    let e = conn(&pg.conninfo_db("nosuchdb"));
    assert!(matches!(e, ClusterError::Refused { .. }), "{e}");
    let e = conn("host=127.0.0.1 port=not-a-port");
    assert!(matches!(e, ClusterError::BadConnectionString(_)), "{e}");
    // The server stops: a connection fails as unreachable; it comes back, and one succeeds.
    let mut a = db(&pg);
    a.init().unwrap();
    pg.stop();
    assert!(a.holder().is_err(), "the old connection is gone");
    let e = conn(&pg.conninfo());
    assert!(matches!(e, ClusterError::Unreachable { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{}", pg.port())),
        "{e}"
    );
    pg.restart();
    assert_eq!(db(&pg).check().unwrap(), SCHEMA_VERSION);
}

mod frames {
    use super::*;
    use dsplane_cluster::log::{self, FrameRow};

    fn row(id: u64, lane: u8, frame: &[u8]) -> FrameRow<'_> {
        FrameRow {
            id,
            peer_kind: 1,
            peer_id: u64::MAX - 5, // an EUI-64 above i64::MAX survives the bigint column
            lane,
            level: lane + 1,
            enqueued_ns: 1_700_000_000_000_000_000 + id,
            frame,
        }
    }

    #[test]
    fn frames_appended_by_either_path_load_back_in_lane_order_and_go_once_delivered() {
        let Some(pg) = TempPostgres::start("frames") else {
            return;
        };
        let mut a = db(&pg);
        a.init().unwrap();
        let epoch = a.try_acquire("node-a", ms(LONG)).unwrap().unwrap();
        assert_eq!(log::next_id(&mut a).unwrap(), 1);
        let payload: Vec<u8> = (0..=255).collect();
        log::append(
            &mut a,
            epoch,
            &[row(1, 1, &payload), row(2, 0, b"x"), row(3, 1, b"")],
        )
        .unwrap();
        log::append_by_insert(&mut a, epoch, &[row(4, 0, b"y"), row(5, 1, &payload)]).unwrap();
        log::append(&mut a, epoch, &[]).unwrap();
        let all = log::pending(&mut a).unwrap();
        let order: Vec<(u8, u64)> = all.iter().map(|r| (r.lane, r.id)).collect();
        assert_eq!(order, [(0, 2), (0, 4), (1, 1), (1, 3), (1, 5)]);
        let first = all.iter().find(|r| r.id == 1).unwrap();
        assert_eq!(first.frame, payload);
        assert_eq!(
            (first.epoch, first.peer_kind, first.peer_id, first.level),
            (epoch, 1, u64::MAX - 5, 2)
        );
        assert_eq!(first.enqueued_ns, 1_700_000_000_000_000_001);
        assert_eq!(log::next_id(&mut a).unwrap(), 6);
        // Lane 1 delivered through id 3: ids 1 and 3 go, 5 stays; lane 0 is untouched.
        assert_eq!(
            log::delete_through(&mut a, epoch, 1, u64::MAX - 5, 1, 3).unwrap(),
            2
        );
        let ids: Vec<u64> = log::pending(&mut a).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(ids, [2, 4, 5]);
    }

    #[test]
    fn a_fenced_node_appends_and_deletes_nothing() {
        let Some(pg) = TempPostgres::start("frames-fenced") else {
            return;
        };
        let (mut a, mut b) = (db(&pg), db(&pg));
        a.init().unwrap();
        let ea = a.try_acquire("node-a", ms(100)).unwrap().unwrap();
        log::append(&mut a, ea, &[row(1, 0, b"kept")]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let eb = b.try_acquire("node-b", ms(LONG)).unwrap().unwrap();
        // The new active goes on after what a left.
        assert_eq!(log::next_id(&mut b).unwrap(), 2);
        for e in [
            log::append(&mut a, ea, &[row(2, 0, b"late")]).unwrap_err(),
            log::append_by_insert(&mut a, ea, &[row(2, 0, b"late")]).unwrap_err(),
            log::delete_through(&mut a, ea, 1, u64::MAX - 5, 0, 1).unwrap_err(),
        ] {
            assert!(matches!(e, WriteError::Fenced(_)), "{e}");
        }
        let left = log::pending(&mut b).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].frame.as_slice(), left[0].epoch),
            (&b"kept"[..], ea)
        );
        assert!(eb > ea);
    }
}

#[test]
fn the_lane_layout_is_recorded_and_a_different_one_refused_while_frames_remain() {
    let Some(pg) = TempPostgres::start("layout") else {
        return;
    };
    let mut a = db(&pg);
    a.init().unwrap();
    let priority = "scheduling priority, 4 levels";
    assert_eq!(
        a.claim_layout(priority).unwrap(),
        None,
        "the first takes it"
    );
    assert_eq!(a.claim_layout(priority).unwrap(), None, "the same again");
    // An empty log takes a new layout.
    assert_eq!(a.claim_layout("scheduling fifo").unwrap(), None);
    assert_eq!(a.claim_layout(priority).unwrap(), None);
    let epoch = a.try_acquire("a", ms(LONG)).unwrap().unwrap();
    let frame = [0u8; 4];
    let row = dsplane_cluster::log::FrameRow {
        id: 1,
        peer_kind: 1,
        peer_id: 7,
        lane: 2,
        level: 3,
        enqueued_ns: 0,
        frame: &frame,
    };
    dsplane_cluster::log::append(&mut a, epoch, &[row]).unwrap();
    // Frames laid out by priority are left: fifo is refused, naming what the log has.
    assert_eq!(
        a.claim_layout("scheduling fifo").unwrap().as_deref(),
        Some(priority)
    );
    assert_eq!(a.claim_layout(priority).unwrap(), None);
}

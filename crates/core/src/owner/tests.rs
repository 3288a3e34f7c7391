//! The owner, deterministically: time is an argument and the log is an in-memory double whose
//! durability, write failures and read failures the test decides. What the engine's tests once
//! waited for with sleeps (housekeeping, storm windows, retention) happens here at a chosen
//! `now`.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::config::Config;
use crate::ids::Srv;
use crate::log::{LaneMap, Loaded, WalError};

const S: Nanos = NANOS_PER_SEC;
const UNIX: u64 = 1_767_225_600 * S;
const SU: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const MAGNETIC: u16 = 0x8F75;

/// A log in memory: every append gets the next seq; `durable` is what the test says it is.
#[derive(Debug, Default)]
struct MemLog {
    next: u64,
    /// Frames on disk only, by (peer, lane), oldest first.
    spilled: LaneMap<VecDeque<Loaded>>,
    /// Appends since the last write.
    buffered: Vec<((PeerKey, u8), Option<Loaded>)>,
    written: u64,
    durable: u64,
    done: Vec<(PeerKey, u8, u64)>,
    fail_writes: bool,
    fail_loads: bool,
    sync_failed: bool,
}

impl Log for MemLog {
    fn append(
        &mut self,
        peer: PeerKey,
        lane: u8,
        level: u8,
        frame: &Frame,
        enqueued_unix_ns: u64,
        spill: bool,
    ) -> Stored {
        self.next += 1;
        let stored = Stored {
            seq: self.next,
            segment: 1,
        };
        let loaded = spill.then(|| Loaded {
            stored,
            level,
            enqueued_unix_ns,
            frame: frame.clone(),
        });
        if let Some(l) = &loaded {
            self.spilled
                .entry((peer, lane))
                .or_default()
                .push_back(l.clone());
        }
        self.buffered.push(((peer, lane), loaded));
        stored
    }

    fn write_out(&mut self) -> io::Result<LogPos> {
        if self.fail_writes && !self.buffered.is_empty() {
            // Undone, as the store undoes a failed batch.
            for (key, loaded) in self.buffered.drain(..) {
                if loaded.is_some() {
                    if let Some(q) = self.spilled.get_mut(&key) {
                        q.pop_back();
                    }
                }
            }
            self.next = self.written;
            return Err(io::Error::from_raw_os_error(28));
        }
        self.buffered.clear();
        self.written = self.next;
        Ok(self.written)
    }

    fn done(&mut self, peer: PeerKey, lane: u8, stored: Stored) {
        self.done.push((peer, lane, stored.seq));
    }

    fn is_spilled(&self, peer: PeerKey, lane: u8) -> bool {
        self.spilled
            .get(&(peer, lane))
            .is_some_and(|q| !q.is_empty())
    }

    fn spills(&self) -> Vec<(PeerKey, u8, u64)> {
        (self.spilled.iter())
            .filter(|(_, q)| !q.is_empty())
            .map(|((p, l), q)| (*p, *l, q.len() as u64))
            .collect()
    }

    fn load(
        &mut self,
        peer: PeerKey,
        lane: u8,
        max: usize,
        _fifo: bool,
    ) -> Result<Vec<Loaded>, WalError> {
        if self.fail_loads {
            return Err(WalError::Io {
                path: PathBuf::from("/mem/w0"),
                source: io::Error::from_raw_os_error(5),
            });
        }
        let q = self.spilled.entry((peer, lane)).or_default();
        let n = max.min(q.len());
        Ok(q.drain(..n).collect())
    }

    fn durable_pos(&self) -> LogPos {
        self.durable
    }

    fn flush_failed(&self) -> bool {
        self.sync_failed
    }

    fn disk_bytes(&self) -> u64 {
        0
    }
}

fn config(extra: &str) -> Config {
    config_with("rate = 1000\nburst = 1000", extra)
}

/// The test configuration with `rate` and `burst` given (`rate_burst`) as well as `extra`.
fn config_with(rate_burst: &str, extra: &str) -> Config {
    let text = format!(
        "[engine]\nlevels = 4\ndurability = \"batch\"\n\
         [delivery]\n{rate_burst}\nwindow = 8\nwindow_reserved_top = 1\nrelease_start = 1.0\n{extra}\n\
         [[service_user]]\nid = \"{SU}\"\ntoken = \"owner-test-su\"\n\
         [[csp]]\nname = \"csp-a\"\ntoken = \"owner-test-csp\"\ndevice_ranges = []\n\
         [priority]\nrules = [{{ srv = \"2.2\", level = 1 }}]\n\
         [alert_storm]\nthreshold = 2\nwindow_s = 10\nexclusions = [0x8F57]\n"
    );
    Config::from_toml_with_env(&text, |_| None).unwrap()
}

fn owner_with(extra: &str) -> Owner<MemLog> {
    owner_of(config(extra))
}

fn owner_of(config: Config) -> Owner<MemLog> {
    let setup = OwnerSetup::from_config(&config, 0, 1).unwrap();
    let nms = Nms::new(Arc::new(AtomicU64::new(0)), config.delivery.nms_total);
    Owner::new(setup, MemLog::default(), nms, 0).unwrap()
}

fn owner() -> Owner<MemLog> {
    owner_with("")
}

fn alert(code: u16, counter: u64) -> Frame {
    let mut h = Header::new(Kind::DeviceAlert);
    h.su_id = SU;
    h.device_id = Eui64(7);
    h.alert_code = code;
    h.counter = counter;
    Frame::new(h, Bytes::from_static(b"alert")).unwrap()
}

fn to_su(frame: Frame, level: u8, ticket: Option<Ticket>) -> Envelope {
    Envelope {
        to: Destination::Northbound {
            su: 0,
            level: Level::new(level).unwrap(),
        },
        frame,
        ticket,
        enqueued_unix_ns: UNIX,
    }
}

fn ticket(msg_id: u64) -> Ticket {
    Ticket {
        origin: 0,
        slot: 3,
        conn_id: 1,
        msg_id,
        ring: 0,
    }
}

/// Everything the SU may be sent now: (counter, level).
fn sent(o: &mut Owner<MemLog>, now: Nanos) -> Vec<(u64, u8)> {
    o.start_pump();
    std::iter::from_fn(|| {
        o.poll_transmit(PeerRef::Su(0), now, UNIX + now)
            .or_else(|| {
                // It stops before a load so that what it gave is written first.
                if o.take_load_due() {
                    o.poll_transmit(PeerRef::Su(0), now, UNIX + now)
                } else {
                    None
                }
            })
    })
    .map(|f| (f.header.counter, f.header.priority))
    .collect()
}

fn events(o: &mut Owner<MemLog>) -> Vec<Event> {
    std::iter::from_fn(|| o.poll_event()).collect()
}

/// The acknowledgements decided: (msg_id, durable), each run as the frames it covers (the
/// tests' msg_ids of one connection are consecutive).
fn acks(o: &mut Owner<MemLog>) -> Vec<(u64, bool)> {
    o.acks()
        .flat_map(|(run, durable)| (run.first.msg_id..=run.last_msg_id).map(move |m| (m, durable)))
        .collect()
}

/// The acknowledgements decided, as runs: (first msg_id, last msg_id, durable).
fn runs(o: &mut Owner<MemLog>) -> Vec<(u64, u64, bool)> {
    o.acks()
        .map(|(run, durable)| (run.first.msg_id, run.last_msg_id, durable))
        .collect()
}

#[test]
fn strict_priority_then_fifo_within_a_level() {
    let mut o = owner();
    for (counter, level) in [(1, 3), (2, 1), (3, 2), (4, 1), (5, 3)] {
        assert_eq!(
            o.take(
                to_su(alert(0x8001 + counter as u16, counter), level, None),
                0
            ),
            Taken::Staged(Level::new(level).unwrap())
        );
    }
    assert!(o.commit());
    assert_eq!(sent(&mut o, 0), vec![], "not connected");
    o.on_connect(PeerRef::Su(0), 0);
    assert_eq!(
        sent(&mut o, 0),
        vec![(2, 1), (4, 1), (3, 2), (1, 3), (5, 3)]
    );
}

#[test]
fn an_ack_goes_out_only_once_the_log_is_durable_through_the_frame() {
    let mut o = owner();
    // Two batches: the log ends at 1, then at 2.
    let _ = o.take(to_su(alert(0x8001, 1), 2, Some(ticket(10))), 0);
    assert!(o.commit());
    let _ = o.take(to_su(alert(0x8002, 2), 2, Some(ticket(11))), 0);
    assert!(o.commit());
    o.resolve_durable();
    assert!(acks(&mut o).is_empty(), "written is not durable");
    o.surb_mut().log_mut().durable = 1;
    o.resolve_durable();
    assert_eq!(acks(&mut o), vec![(10, true)], "only the first is durable");
    // A failed sync: nothing it covered can be trusted, every waiting frame is refused.
    o.surb_mut().log_mut().sync_failed = true;
    o.resolve_durable();
    assert_eq!(acks(&mut o), vec![(11, false)]);
}

#[test]
fn the_tickets_of_a_batch_come_back_as_runs_of_one_connection_and_ring() {
    let mut o = owner();
    let on = |msg_id: u64, ring: u16, conn_id: u64| Ticket {
        ring,
        conn_id,
        ..ticket(msg_id)
    };
    // One batch: 1-3 through ring 0, 4 through ring 1, 5 through ring 0 again, 6 on another
    // connection, 7 back on the first.
    for (counter, t) in [
        (1, on(1, 0, 1)),
        (2, on(2, 0, 1)),
        (3, on(3, 0, 1)),
        (4, on(4, 1, 1)),
        (5, on(5, 0, 1)),
        (6, on(1, 0, 2)),
        (7, on(6, 0, 1)),
    ] {
        // A code of its own each, so that no storm throttles them.
        let _ = o.take(
            to_su(alert(0x8001 + counter as u16, counter), 2, Some(t)),
            0,
        );
    }
    assert!(o.commit());
    // The next batch is a run of its own, even on the same connection and ring.
    let _ = o.take(to_su(alert(0x8011, 8), 2, Some(on(7, 0, 1))), 0);
    let _ = o.take(to_su(alert(0x8012, 9), 2, Some(on(8, 0, 1))), 0);
    assert!(o.commit());
    // The log's position counts appends: 9 is the end of both batches.
    o.surb_mut().log_mut().durable = 9;
    o.resolve_durable();
    let runs: Vec<(TicketRun, bool)> = o.acks().collect();
    let shape: Vec<(u64, u64, u16, u64)> = runs
        .iter()
        .map(|(r, durable)| {
            assert!(durable);
            (r.first.msg_id, r.last_msg_id, r.first.ring, r.first.conn_id)
        })
        .collect();
    assert_eq!(
        shape,
        [
            (1, 3, 0, 1),
            (4, 4, 1, 1),
            (5, 5, 0, 1),
            (1, 1, 0, 2),
            (6, 6, 0, 1),
            (7, 8, 0, 1)
        ]
    );
}

#[test]
fn a_throttled_alert_inside_a_run_is_acked_before_the_run() {
    let mut o = owner();
    o.on_connect(PeerRef::Su(0), 0);
    // Magnetic alerts of one device: the first two pass, the rest are throttled (ACKed at
    // once); a different code passes and joins the run.
    for counter in 1..=4 {
        let _ = o.take(to_su(alert(MAGNETIC, counter), 3, Some(ticket(counter))), S);
    }
    let _ = o.take(to_su(alert(0x8001, 5), 3, Some(ticket(5))), S);
    assert!(o.commit());
    // Three appends (1, 2 and 5): the batch ends at 3.
    o.surb_mut().log_mut().durable = 3;
    o.resolve_durable();
    // 3 and 4 first, alone; then one run over 1-5 whose 3 and 4 are already decided.
    assert_eq!(runs(&mut o), vec![(3, 3, true), (4, 4, true), (1, 5, true)]);
}

#[test]
fn a_failed_write_refuses_the_frames_that_waited_for_it() {
    let mut o = owner();
    o.surb_mut().log_mut().fail_writes = true;
    let _ = o.take(to_su(alert(0x8001, 1), 2, Some(ticket(10))), 0);
    assert!(!o.commit());
    assert_eq!(acks(&mut o), vec![(10, false)]);
    o.on_connect(PeerRef::Su(0), 0);
    assert_eq!(sent(&mut o, 0), vec![], "a refused frame is not delivered");
}

#[test]
fn a_storm_is_throttled_and_its_summary_counts_every_throttled_alert() {
    let mut o = owner();
    o.on_connect(PeerRef::Su(0), 0);
    let mut taken = Vec::new();
    for counter in 1..=5 {
        taken.push(o.take(to_su(alert(MAGNETIC, counter), 3, Some(ticket(counter))), S));
    }
    let level = Level::new(3).unwrap();
    assert_eq!(
        taken,
        [
            Taken::Staged(level),
            Taken::Staged(level),
            Taken::Throttled,
            Taken::Throttled,
            Taken::Throttled
        ]
    );
    // The throttled alerts are ACKed at once: nothing of theirs is written.
    assert_eq!(acks(&mut o), vec![(3, true), (4, true), (5, true)]);
    // An excluded code always passes.
    assert!(matches!(
        o.take(to_su(alert(0x8F57, 9), 1, None), S),
        Taken::Staged(_)
    ));
    assert!(o.commit());
    assert_eq!(o.storm_stats().owed, 3);
    // The window (10 s) closes: one STORM_SUMMARY for the three.
    let _ = o.handle_timeout(12 * S, UNIX + 12 * S);
    o.start_pump();
    let frames: Vec<Frame> =
        std::iter::from_fn(|| o.poll_transmit(PeerRef::Su(0), 12 * S, UNIX + 12 * S)).collect();
    let summaries: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.header.kind == Kind::StormSummary)
        .collect();
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].header.counter, 3);
    assert_eq!(summaries[0].header.alert_code, MAGNETIC);
    assert_eq!(summaries[0].header.priority, 4, "the lowest level");
    assert_eq!(o.storm_stats().owed, 0);
}

#[test]
fn a_response_inherits_its_requests_level_and_the_intake_level_travels_through_a_reload() {
    let mut o = owner();
    let mut req = Header::new(Kind::Request);
    req.su_id = SU;
    req.device_id = Eui64(42);
    req.counter = 77;
    req.srv = Srv::new(2, 2, 0); // Top Up Device: level 1 under the default rules
    let intake = GlobalIntake::new(100_000, 0.8, 0).unwrap();
    assert_eq!(o.admit_request(0, &req, &intake, 0), Ok(Level::URGENT));
    // Its response comes back with the intake's fallback level (its own SRV's, say 4).
    let mut resp = Header::new(Kind::Response);
    resp.su_id = SU;
    resp.device_id = Eui64(42);
    resp.counter = 77;
    resp.srv = Srv::new(2, 2, 0);
    let frame = Frame::new(resp, Bytes::new()).unwrap();
    assert_eq!(
        o.take(to_su(frame, 4, None), S),
        Taken::Staged(Level::URGENT)
    );
    // An alert's level was decided at intake; a reload in between does not change it.
    let mut reloaded = config("");
    reloaded.priority.alert_level = Level::new(4).unwrap();
    o.reload(
        &Reload {
            rules: Arc::new(Rules::new(&reloaded.priority)),
            storm: StormSettings::from_config(&reloaded.alert_storm, 1).unwrap(),
            sus: Vec::new(),
            csps: Vec::new(),
        },
        S,
    );
    assert_eq!(o.intake_level(&alert(0x8001, 1).header).get(), 4);
    assert_eq!(
        o.take(to_su(alert(0x8001, 1), 3, None), S),
        Taken::Staged(Level::new(3).unwrap())
    );
}

#[test]
fn frames_past_retention_expire_at_housekeeping_with_a_record() {
    let mut o = owner();
    let _ = o.take(to_su(alert(0x8001, 1), 2, None), 0);
    assert!(o.commit());
    assert!(o.handle_timeout(0, UNIX));
    assert!(events(&mut o).is_empty());
    // Two days later (retention_h = 48 by default), at the next housekeeping.
    let later = UNIX + 49 * 3600 * S;
    assert!(
        !o.handle_timeout(limits::HOUSEKEEPING_INTERVAL / 2, later),
        "not due yet"
    );
    assert!(o.handle_timeout(limits::HOUSEKEEPING_INTERVAL, later));
    match events(&mut o).as_slice() {
        [Event::Expired(r)] => {
            assert_eq!(
                (r.counter, r.level, r.kind.as_str()),
                (1, 2, "DEVICE_ALERT")
            );
            assert_eq!(r.expired_unix_ns, later);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(o.held(), 0);
}

#[test]
fn a_full_share_spills_to_the_surb_and_the_lane_stays_in_order() {
    let mut o = owner_with("nms_per_su = 2");
    for counter in 1..=5 {
        let _ = o.take(to_su(alert(0x8000 + counter as u16, counter), 2, None), 0);
    }
    assert!(o.commit());
    assert_eq!(o.held(), 2);
    assert_eq!(
        o.depth(PeerRef::Su(0))[1],
        (2, 3),
        "two in the NMS, three in the SURB"
    );
    // While the lane has frames in the SURB, a newer frame goes there too, behind them.
    o.on_peer_ack(PeerRef::Su(0), 0);
    let _ = o.take(to_su(alert(0x8006, 6), 2, None), 0);
    assert!(o.commit());
    assert_eq!(o.depth(PeerRef::Su(0))[1], (2, 4));
    // The lane comes out in order across the tiers: memory first, then loads from the SURB.
    o.on_connect(PeerRef::Su(0), 0);
    let order: Vec<u64> = sent(&mut o, 0).into_iter().map(|(c, _)| c).collect();
    assert_eq!(order, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_load_that_fails_keeps_the_frames_and_is_tried_again() {
    let mut o = owner_with("nms_per_su = 1");
    for counter in 1..=3 {
        let _ = o.take(to_su(alert(0x8000 + counter as u16, counter), 2, None), 0);
    }
    // A lower level behind them: strict priority keeps it waiting while the lane cannot load.
    let _ = o.take(to_su(alert(0x8F00, 9), 3, None), 0);
    assert!(o.commit());
    o.on_connect(PeerRef::Su(0), 0);
    o.surb_mut().log_mut().fail_loads = true;
    assert_eq!(
        sent(&mut o, 0),
        vec![(1, 2)],
        "the one in memory, then the lane waits"
    );
    assert_eq!(
        o.depth(PeerRef::Su(0))[1].1,
        2,
        "the SURB's frames are still counted"
    );
    o.surb_mut().log_mut().fail_loads = false;
    o.on_peer_ack(PeerRef::Su(0), 1);
    assert_eq!(sent(&mut o, 0), vec![(2, 2), (3, 2), (9, 3)]);
}

#[test]
fn a_poll_that_ran_out_of_tokens_says_when_they_are_due_and_only_then() {
    // 1,000/s with a burst of 2: two frames go at once, the third when a token is due.
    let mut o = owner_of(config_with("rate = 1000\nburst = 2", ""));
    for counter in 1..=4 {
        let taken = o.take(to_su(alert(0x8001 + counter as u16, counter), 2, None), 0);
        assert_eq!(taken, Taken::Staged(Level::new(2).unwrap()));
    }
    assert!(o.commit());
    o.on_connect(PeerRef::Su(0), 0);
    o.start_pump();
    let su = PeerRef::Su(0);
    assert!(o.poll_transmit_ref(su, 0, UNIX).is_some());
    assert_eq!(o.rate_blocked_until(), None, "a frame was given");
    assert!(o.poll_transmit_ref(su, 0, UNIX).is_some());
    assert!(o.poll_transmit_ref(su, 0, UNIX).is_none());
    let due = o.rate_blocked_until().expect("out of tokens");
    assert_eq!(due, 1_000_000, "one token at 1,000/s");
    assert_eq!(o.rate_wake(), Some(due));
    // Asked again before then: still nothing, and still the same instant.
    assert!(o.poll_transmit_ref(su, due - 1, UNIX).is_none());
    assert_eq!(o.rate_blocked_until(), Some(due));
    // At that instant (a later clock within the same pump round), the next frame goes.
    let t = o.poll_transmit_ref(su, due, UNIX).expect("a token is due");
    assert_eq!(t.header.counter, 3);
    assert_eq!(o.rate_blocked_until(), None);
    // Nothing for another reason (disconnected) is not a rate block.
    o.on_disconnect(su);
    assert!(o.poll_transmit_ref(su, 10 * due, UNIX).is_none());
    assert_eq!(o.rate_blocked_until(), None);
}

#[test]
fn a_paused_su_gets_nothing_and_a_restore_releases_it() {
    let mut o = owner();
    o.on_connect(PeerRef::Su(0), 0);
    o.set_paused(0, true, 0);
    let _ = o.take(to_su(alert(0x8001, 1), 2, None), 0);
    assert!(o.commit());
    assert_eq!(sent(&mut o, 0), vec![]);
    o.set_restricted(true, 0);
    o.set_paused(0, false, 0);
    assert_eq!(sent(&mut o, 0), vec![], "still restricted");
    o.set_restricted(false, 0);
    assert_eq!(sent(&mut o, 0), vec![(1, 2)]);
}

#[test]
fn a_peer_ack_marks_the_log_done_and_a_disconnect_resends() {
    let mut o = owner();
    o.on_connect(PeerRef::Su(0), 0);
    for counter in 1..=3 {
        let _ = o.take(
            to_su(
                alert(0x8000 + counter as u16, counter),
                2,
                Some(ticket(counter)),
            ),
            0,
        );
    }
    assert!(o.commit());
    assert_eq!(sent(&mut o, 0).len(), 3);
    o.on_peer_ack(PeerRef::Su(0), 1);
    assert_eq!(o.surb().log().done.len(), 1);
    o.on_disconnect(PeerRef::Su(0));
    o.on_connect(PeerRef::Su(0), S);
    assert_eq!(
        sent(&mut o, S),
        vec![(2, 2), (3, 2)],
        "the unacknowledged, in order"
    );
}

#[test]
fn a_pump_stops_before_a_load_so_that_what_it_gave_is_written_first() {
    let mut o = owner_with("nms_per_su = 2");
    for counter in 1..=4 {
        let _ = o.take(to_su(alert(0x8000 + counter as u16, counter), 2, None), 0);
    }
    assert!(o.commit());
    o.on_connect(PeerRef::Su(0), 0);
    o.start_pump();
    let su = PeerRef::Su(0);
    let first: Vec<u64> = std::iter::from_fn(|| o.poll_transmit(su, 0, UNIX))
        .map(|f| f.header.counter)
        .collect();
    assert_eq!(first, vec![1, 2], "the two in memory, then a stop");
    assert!(
        o.take_load_due(),
        "the SURB is read only once they are written"
    );
    assert!(!o.take_load_due(), "asked once");
    let rest: Vec<u64> = std::iter::from_fn(|| o.poll_transmit(su, 0, UNIX))
        .map(|f| f.header.counter)
        .collect();
    assert_eq!(rest, vec![3, 4]);
    assert!(!o.take_load_due());
}

/// An owner of one CSP link with a window of 4 (and its SU), as one worker.
fn link_owner() -> Owner<MemLog> {
    let text = format!(
        "[engine]\nlevels = 4\ndurability = \"batch\"\n\
         [[service_user]]\nid = \"{SU}\"\ntoken = \"owner-test-su\"\n\
         [delivery]\nwindow_reserved_top = 0\n\
         [[csp]]\nname = \"csp-a\"\ntoken = \"owner-test-csp\"\nwindow = 4\nconnections_max = 2\nburst = 1000\n\
         [priority]\nrules = [{{ srv = \"2.2\", level = 1 }}]\n"
    );
    let config = Config::from_toml_with_env(&text, |_| None).unwrap();
    let setup = OwnerSetup::from_config(&config, 0, 1).unwrap();
    let nms = Nms::new(Arc::new(AtomicU64::new(0)), config.delivery.nms_total);
    Owner::new(setup, MemLog::default(), nms, 0).unwrap()
}

/// A REQUEST for the link at `level`, by its counter.
fn to_link(counter: u64, level: u8) -> Envelope {
    let mut h = Header::new(Kind::Request);
    h.su_id = SU;
    h.device_id = Eui64(9);
    h.counter = counter;
    Envelope {
        to: Destination::Southbound {
            csp: 0,
            level: Level::new(level).unwrap(),
        },
        frame: Frame::new(h, Bytes::from_static(b"request")).unwrap(),
        ticket: None,
        enqueued_unix_ns: UNIX,
    }
}

/// Everything the link may be sent now on the connections in `conns`:
/// (connection, msg_id, counter, level).
fn link_sent(o: &mut Owner<MemLog>, conns: u64) -> Vec<(usize, u64, u64, u8)> {
    o.start_pump();
    std::iter::from_fn(|| o.poll_transmit_to(PeerRef::Csp(0), conns, 0, UNIX))
        .map(|(c, f)| (c, f.header.msg_id, f.header.counter, f.header.priority))
        .collect()
}

#[test]
fn a_link_spreads_its_requests_over_its_connections_each_with_its_own_msg_ids() {
    let mut o = link_owner();
    let csp = PeerRef::Csp(0);
    o.on_connect_conn(csp, 0, 0);
    o.on_connect_conn(csp, 1, 0);
    for counter in 1..=6 {
        let _ = o.take(to_link(counter, 3), 0);
    }
    assert!(o.commit());
    // Window 4 over two connections: two each, in turn, each counting from 1.
    assert_eq!(
        link_sent(&mut o, u64::MAX),
        vec![(0, 1, 1, 3), (1, 1, 2, 3), (0, 2, 3, 3), (1, 2, 4, 3)]
    );
    // Connection 1 acknowledges both: 2 and 4 wait for 1 and 3 (older, in flight on 0)
    // before their records are marked done, so the lane's watermark never passes a frame
    // still held.
    o.on_peer_ack_conn(csp, 1, 2);
    assert!(o.surb().log().done.is_empty());
    assert_eq!(o.held(), 6);
    // Connection 0 has no room now (its socket is full): the rest go on connection 1.
    assert_eq!(link_sent(&mut o, 0b10), vec![(1, 3, 5, 3), (1, 4, 6, 3)]);
    o.on_peer_ack_conn(csp, 0, 2);
    let done: Vec<u64> = o.surb().log().done.iter().map(|d| d.2).collect();
    assert_eq!(done, vec![1, 2, 3, 4], "in order: a watermark per lane");
    o.on_peer_ack_conn(csp, 1, 4);
    assert_eq!(o.held(), 0);
}

#[test]
fn a_closed_link_connection_gives_back_only_its_frames_to_go_on_another() {
    let mut o = link_owner();
    let csp = PeerRef::Csp(0);
    o.on_connect_conn(csp, 0, 0);
    o.on_connect_conn(csp, 1, 0);
    for (counter, level) in [(1, 4), (2, 4), (3, 3), (4, 3)] {
        let _ = o.take(to_link(counter, level), 0);
    }
    assert!(o.commit());
    assert_eq!(
        link_sent(&mut o, u64::MAX),
        vec![(0, 1, 3, 3), (1, 1, 4, 3), (0, 2, 1, 4), (1, 2, 2, 4)]
    );
    let _ = o.take(to_link(5, 1), 0);
    assert!(o.commit());
    // Connection 0 goes with 3 and 1 unacknowledged; connection 1's stay in flight there.
    o.on_disconnect_conn(csp, 0);
    o.on_peer_ack_conn(csp, 1, 2);
    // What came back goes on connection 1, in priority order, its msg_ids going on.
    assert_eq!(
        link_sent(&mut o, u64::MAX),
        vec![(1, 3, 5, 1), (1, 4, 3, 3), (1, 5, 1, 4)]
    );
    o.on_peer_ack_conn(csp, 1, 5);
    assert_eq!(o.held(), 0);
    let mut done: Vec<u64> = o.surb().log().done.iter().map(|d| d.2).collect();
    done.sort_unstable();
    assert_eq!(done, vec![1, 2, 3, 4, 5]);
    // Every connection gone: nothing goes, nothing is lost.
    o.on_disconnect_conn(csp, 1);
    let _ = o.take(to_link(6, 2), 0);
    assert!(o.commit());
    assert_eq!(link_sent(&mut o, u64::MAX), vec![]);
    o.on_connect_conn(csp, 1, 0);
    assert_eq!(link_sent(&mut o, u64::MAX), vec![(1, 1, 6, 2)]);
}

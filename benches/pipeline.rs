//! A fixed, deterministic workload through the sans-IO pipeline of one worker, for instruction
//! counts under callgrind (`perf/instructions.sh`): not a criterion bench, and its timings mean
//! little; its instruction counts are exact and comparable across commits.
//!
//! The pipeline, per northbound message, as the engine's worker does it:
//!
//! 1. **decode**: bytes are read into a [`FrameDecoder`] 64 KiB at a time (`fill_with`) and
//!    taken out as frames (`decode_each`, as the engine's intake: header decode and validation,
//!    zero-copy payload);
//! 2. **classify**: a RESPONSE inherits its request's level from the in-flight table (or falls
//!    back to the REQUEST rules), an alert gets its code's level (the demo configuration's
//!    rules);
//! 3. **enqueue** into the Service User's [`DeliveryScheduler`];
//! 4. **schedule**: `send_each`, which hands out runs of frames from the most urgent lane,
//!    checking the window and taking **limiter** tokens once per run (as the engine's
//!    `Owner::transmit_each` does);
//! 5. **encode**: the header, stamped with its `msg_id` and level as it is written, and the
//!    payload, copied into the connection's contiguous output buffer (what
//!    `Conn::queue_transmit` does);
//! 6. the SU's cumulative ACK releases the batch.
//!
//! The message mix is fixed by a seed: 70 % RESPONSEs (80 % of them to a request recorded
//! beforehand, over SRVs of every level), 30 % DEVICE_ALERTs (3 % high-priority codes), 128-byte
//! payloads. Only `measured_*` functions are counted (callgrind `--toggle-collect`); a warm-up
//! pass first grows every buffer and table to its steady size.
//!
//! Usage: `pipeline MODE [MESSAGES]`, MODE one of `pipeline` (the whole path), `owner` (the same
//! path through the engine's real owner, `dsplane::owner::Owner`), `frames` (step 1
//! alone), `header` (`Header::decode` alone on 1,024 varied headers), `header-naive` (the
//! field-by-field decoder of `benches/common`). Any other argument (`cargo bench` passes
//! `--bench`) runs every mode once, briefly, as a smoke test.

mod common;

use std::hint::black_box;
use std::ops::ControlFlow;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::{naive, sample_headers, Rng};
use dsplane::classify::{Classifier, RequestId, Rules};
use dsplane::config::Config;
use dsplane::config::Durability;
use dsplane::delivery::{Blocked, DeliveryScheduler, DeliverySettings};
use dsplane::ids::{Eui64, Level, Mode, Srv};
use dsplane::limiter::{ReleaseStart, TokenBucket, BURST_MAX, RATE_PER_S_MAX};
use dsplane::owner::{Destination, Envelope, Nms, Owner, OwnerSetup, PeerRef, Taken};
use dsplane::store::{LogOptions, Store};
use dsplane::throttle::GlobalIntake;
use dsplane::wire::{Frame, FrameDecoder, Header, Kind, HEADER_LEN, PAYLOAD_BYTES_MAX_DEFAULT};
use dsplane::Nanos;

const SU: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const PAYLOAD_LEN: usize = 128;
const WARM_UP: usize = 20_000;
const DEFAULT_MESSAGES: usize = 200_000;
/// The wall clock of the owner mode's turns (2026-01-01).
const UNIX_START: u64 = 1_767_225_600 * 1_000_000_000;

/// The wire bytes of `n` northbound frames and the requests their responses answer.
fn workload(n: usize, seed: u64) -> (Vec<u8>, Vec<(RequestId, Srv, Mode)>) {
    // (SRV, mode): levels 1, 1, 2, 3 and the default 4 under the demo rules.
    const SRVS: [(Srv, Mode); 6] = [
        (Srv::new(2, 2, 0), Mode::OnDemand),
        (Srv::new(7, 1, 0), Mode::OnDemand),
        (Srv::new(8, 1, 1), Mode::OnDemand),
        (Srv::new(4, 1, 1), Mode::OnDemand),
        (Srv::new(4, 4, 2), Mode::OnDemand),
        (Srv::new(6, 2, 1), Mode::FutureDated),
    ];
    let mut rng = Rng(seed);
    let payload = Bytes::from(vec![0x5A; PAYLOAD_LEN]);
    let mut bytes = Vec::with_capacity(n * (HEADER_LEN + PAYLOAD_LEN));
    let mut requests = Vec::new();
    for i in 0..n as u64 {
        let mut h;
        if rng.below(100) < 70 {
            h = Header::new(Kind::Response);
            let (srv, mode) = SRVS[rng.below(SRVS.len() as u64) as usize];
            h.srv = srv;
            h.mode = mode as u8;
            h.device_id = Eui64(rng.next());
            h.counter = rng.next() >> 16;
            if rng.below(100) < 80 {
                let id = RequestId {
                    su: SU,
                    device: h.device_id,
                    counter: h.counter,
                };
                requests.push((id, srv, mode));
            }
        } else {
            h = Header::new(Kind::DeviceAlert);
            h.alert_code = if rng.below(100) < 3 {
                0x8F1C
            } else {
                0x8F00 | rng.below(0x70) as u16
            };
            h.device_id = Eui64(rng.next());
        }
        h.su_id = SU;
        h.msg_id = i + 1;
        h.created_ns = 1_700_000_000_000_000_000 + i * 1_000;
        let frame = Frame::new(h, payload.clone()).unwrap();
        bytes.extend_from_slice(&frame.header_bytes());
        bytes.extend_from_slice(&frame.payload);
    }
    (bytes, requests)
}

/// Stands for the socket: `read` copies the next bytes of the workload into the decoder's spare
/// space, as the engine's `read(2)` does (`Conn::read`, through `FrameDecoder::fill_with`). In
/// the engine that copy is the kernel's, so `perf/instructions.sh` leaves this function out of
/// the count (it subtracts the function's inclusive cost from the total).
struct Socket<'a>(&'a [u8]);

impl Socket<'_> {
    #[inline(always)]
    fn fill(&mut self, decoder: &mut FrameDecoder) -> std::io::Result<usize> {
        // SAFETY: the closure writes `n` bytes at the start of the space and reads none of it.
        unsafe {
            decoder.fill_with(usize::MAX, |spare| {
                simulated_socket_read(&mut self.0, spare)
            })
        }
    }
}

#[inline(never)]
fn simulated_socket_read(
    from: &mut &[u8],
    spare: &mut bytes::buf::UninitSlice,
) -> std::io::Result<usize> {
    let n = from.len().min(spare.len());
    spare[..n].copy_from_slice(&from[..n]);
    *from = &from[n..];
    Ok(n)
}

/// One worker's state for one Service User.
struct Worker {
    classifier: Classifier,
    sched: DeliveryScheduler<Frame>,
    decoder: FrameDecoder,
    /// The connection's output buffer, "written" after each pump.
    out: Vec<u8>,
    now: Nanos,
    delivered: u64,
}

impl Worker {
    fn new(requests: &[(RequestId, Srv, Mode)]) -> Worker {
        let config = Config::embedded_default().unwrap();
        let rules = Arc::new(Rules::new(&config.priority));
        let mut classifier = Classifier::new(rules, 1 << 20, 7 * 24 * 3600 * 1_000_000_000);
        for &(id, srv, mode) in requests {
            let _ = classifier.request(id, srv, mode, 0);
        }
        let settings = DeliverySettings {
            levels: config.engine.levels,
            window: 4096,
            window_reserved_top: 8,
            frames_max: 1 << 20,
            prioritised: true,
            release_start: ReleaseStart::FULL,
            release_ramp: 0,
        };
        let limiter = TokenBucket::new(RATE_PER_S_MAX, BURST_MAX, 0).unwrap();
        let mut sched = DeliveryScheduler::new(settings, limiter);
        sched.on_connect(0);
        Worker {
            classifier,
            sched,
            decoder: FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT),
            out: Vec::with_capacity(1 << 20),
            now: 0,
            delivered: 0,
        }
    }

    /// Steps 2 and 3: classify a frame and queue it for its SU (a function of the fields it
    /// needs, so that the decoder, another field, can hand it frames).
    #[inline(always)]
    fn take(
        classifier: &mut Classifier,
        sched: &mut DeliveryScheduler<Frame>,
        now: Nanos,
        frame: Frame,
    ) {
        let h = &frame.header;
        let level = match h.kind {
            Kind::Response => {
                let id = RequestId {
                    su: h.su_id,
                    device: h.device_id,
                    counter: h.counter,
                };
                let mode = Mode::from_wire(h.mode).unwrap_or(Mode::OnDemand);
                classifier.response(id, h.srv, mode, now).0
            }
            Kind::DeviceAlert | Kind::DccAlert => classifier.alert(h.alert_code),
            _ => classifier.storm_summary(),
        };
        if sched.enqueue(level, frame).is_err() {
            panic!("scheduler full: the workload is sized so that it never is");
        }
    }

    /// Steps 4 to 6: send everything the scheduler allows, encode it, and take the ACK.
    #[inline(always)]
    fn pump(&mut self) {
        let mut last = None;
        let out = &mut self.out;
        let (_, blocked) = self.sched.send_each(self.now, usize::MAX, |o| {
            let (h, p) = (&o.item.header, &o.item.payload);
            encode(out, h, o.msg_id, o.level.get(), p);
            last = Some(o.msg_id);
            true
        });
        match blocked {
            None | Some(Blocked::Empty) => {}
            Some(other) => {
                panic!("blocked by {other:?}: the workload is sized so that it never is")
            }
        }
        self.out.clear();
        if let Some(msg_id) = last {
            self.delivered += self.sched.on_ack(msg_id, |_: Level, frame| drop(frame)) as u64;
        }
    }

    /// The whole pipeline over `bytes`.
    #[inline(always)]
    fn run(&mut self, bytes: &[u8]) {
        let mut socket = Socket(bytes);
        loop {
            let read = socket.fill(&mut self.decoder).unwrap();
            // One millisecond per read: the limiter earns 10,000 tokens, more than a read holds.
            self.now += 1_000_000;
            let (classifier, sched, now) = (&mut self.classifier, &mut self.sched, self.now);
            // Inlined into the decoder's loop, as the engine's intake does with its own: the
            // frame goes from the decoder to its slot without a call in between.
            let taken = self.decoder.decode_each(
                #[inline(always)]
                |frame| {
                    Self::take(classifier, sched, now, frame);
                    ControlFlow::<()>::Continue(())
                },
            );
            assert_eq!(taken, Ok(ControlFlow::Continue(())));
            self.pump();
            if read == 0 {
                break;
            }
        }
    }

    /// Step 1 alone: decode and drop.
    #[inline(always)]
    fn run_frames(&mut self, bytes: &[u8]) {
        let mut socket = Socket(bytes);
        loop {
            let read = socket.fill(&mut self.decoder).unwrap();
            let delivered = &mut self.delivered;
            let taken = self.decoder.decode_each(
                #[inline(always)]
                |frame| {
                    *delivered += u64::from(frame.header.payload_len > 0);
                    ControlFlow::<()>::Continue(())
                },
            );
            assert_eq!(taken, Ok(ControlFlow::Continue(())));
            if read == 0 {
                break;
            }
        }
    }
}

/// The same path through the engine's real owner (`dsplane::owner::Owner` over the real
/// `Store`, durability `none`): the level decided at intake (`intake_level`), `take` (response
/// inheritance, Alert Storm Protection, the alert report, the NMS/SURB tier), one `commit` per
/// read, the turn's `handle_timeout`, then `transmit_each`, the encode and the peer's ACK. It
/// does what the engine's worker does per message, where the `pipeline` mode above is a copy of
/// its scheduling core.
struct OwnerWorker {
    owner: Owner<Store>,
    decoder: FrameDecoder,
    out: Vec<u8>,
    now: Nanos,
    delivered: u64,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl OwnerWorker {
    fn new(requests: &[(RequestId, Srv, Mode)]) -> OwnerWorker {
        let mut config = Config::embedded_default().unwrap();
        config.engine.durability = Durability::None;
        for su in &mut config.service_users {
            su.id = SU;
            su.delivery.rate = RATE_PER_S_MAX;
            su.delivery.burst = BURST_MAX;
            su.delivery.window = 4096;
            su.delivery.release_start = ReleaseStart::FULL;
            su.delivery.nms_per_su = 1 << 20;
        }
        config.delivery.nms_total = 1 << 20;
        let dir = std::env::temp_dir().join(format!("dsplane-pipeline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = LogOptions {
            durability: Durability::None,
            flush_interval: std::time::Duration::from_millis(2),
            reserve_bytes: 0,
        };
        let store = Store::create(&dir, options, Box::new(|| {})).unwrap();
        let setup = OwnerSetup::from_config(&config, 0, 1).unwrap();
        let nms = Nms::new(Arc::new(AtomicU64::new(0)), config.delivery.nms_total);
        let mut owner = Owner::new(setup, store, nms, 0).unwrap();
        let intake = GlobalIntake::new(1_000_000, 0.99, 0).unwrap();
        for &(id, srv, mode) in requests {
            let mut h = Header::new(Kind::Request);
            h.su_id = id.su;
            h.device_id = id.device;
            h.counter = id.counter;
            h.srv = srv;
            h.mode = mode as u8;
            let _ = owner.admit_request(0, &h, &intake, 0);
        }
        owner.on_connect(PeerRef::Su(0), 0);
        OwnerWorker {
            owner,
            decoder: FrameDecoder::new(PAYLOAD_BYTES_MAX_DEFAULT),
            out: Vec::with_capacity(1 << 20),
            now: 0,
            delivered: 0,
            _dir: TempDir(dir),
        }
    }

    #[inline(always)]
    fn run(&mut self, bytes: &[u8]) {
        let mut socket = Socket(bytes);
        loop {
            let read = socket.fill(&mut self.decoder).unwrap();
            self.now += 1_000_000;
            let unix = UNIX_START + self.now;
            let (owner, now) = (&mut self.owner, self.now);
            let decoded = self.decoder.decode_each(
                #[inline(always)]
                |frame| {
                    let level = owner.intake_level(&frame.header);
                    let taken = owner.take(
                        Envelope {
                            to: Destination::Northbound { su: 0, level },
                            frame,
                            ticket: None,
                            enqueued_unix_ns: unix,
                        },
                        now,
                    );
                    assert!(matches!(taken, Taken::Staged(_)), "{taken:?}");
                    ControlFlow::<()>::Continue(())
                },
            );
            assert_eq!(decoded, Ok(ControlFlow::Continue(())));
            assert!(self.owner.commit());
            let _ = self.owner.handle_timeout(self.now, unix);
            self.owner.start_pump();
            let mut last = None;
            loop {
                let (out, delivered) = (&mut self.out, &mut self.delivered);
                self.owner
                    .transmit_each(PeerRef::Su(0), self.now, unix, |t| {
                        encode(out, t.header, t.msg_id, t.priority, t.payload);
                        last = Some(t.msg_id);
                        *delivered += 1;
                        true
                    });
                // (Never here: nothing spills in this workload.)
                if !self.owner.take_load_due() {
                    break;
                }
            }
            self.out.clear();
            if let Some(msg_id) = last {
                self.owner.on_peer_ack(PeerRef::Su(0), msg_id);
            }
            while self.owner.poll_event().is_some() {}
            self.owner.acks().for_each(drop);
            if read == 0 {
                break;
            }
        }
    }
}

/// What `Conn::queue_transmit` does: the held header written stamped with its `msg_id`, level
/// and `payload_len` (no copy of the header first), then the payload, into the connection's
/// contiguous output buffer (`Header::encode_stamped_into`).
#[inline(always)]
fn encode(out: &mut Vec<u8>, header: &Header, msg_id: u64, priority: u8, payload: &Bytes) {
    header.encode_stamped_into(out, msg_id, priority, payload);
}

#[inline(never)]
fn measured_owner(worker: &mut OwnerWorker, bytes: &[u8]) {
    worker.run(bytes);
}

#[inline(never)]
fn measured_pipeline(worker: &mut Worker, bytes: &[u8]) {
    worker.run(bytes);
}

#[inline(never)]
fn measured_frames(worker: &mut Worker, bytes: &[u8]) {
    worker.run_frames(bytes);
}

#[inline(always)]
fn decode_headers(
    headers: &[[u8; HEADER_LEN]],
    n: usize,
    decode: impl Fn(&[u8; HEADER_LEN], u32) -> Result<Header, dsplane::wire::DecodeError>,
) -> u64 {
    let mut sum = 0u64;
    for bytes in headers.iter().cycle().take(n) {
        match decode(black_box(bytes), PAYLOAD_BYTES_MAX_DEFAULT) {
            // The whole header goes through black_box: every field must be produced, as
            // FrameDecoder keeps the whole header, so no decoder can skip unused fields.
            Ok(h) => sum = sum.wrapping_add(black_box(h).counter),
            Err(e) => sum = sum.wrapping_add(e.msg_id),
        }
    }
    sum
}

#[inline(never)]
fn measured_header(headers: &[[u8; HEADER_LEN]], n: usize) -> u64 {
    decode_headers(headers, n, Header::decode)
}

#[inline(never)]
fn measured_header_naive(headers: &[[u8; HEADER_LEN]], n: usize) -> u64 {
    decode_headers(headers, n, naive::decode)
}

fn run_mode(mode: &str, messages: usize) {
    let t = Instant::now();
    match mode {
        "pipeline" | "frames" => {
            let (warm, warm_requests) = workload(WARM_UP, 1);
            let (bytes, requests) = workload(messages, 2);
            let mut all = warm_requests;
            all.extend(requests);
            let mut worker = Worker::new(&all);
            if mode == "pipeline" {
                worker.run(&warm);
                worker.delivered = 0;
                measured_pipeline(&mut worker, &bytes);
                assert_eq!(
                    worker.delivered, messages as u64,
                    "not every message delivered"
                );
            } else {
                worker.run_frames(&warm);
                worker.delivered = 0;
                measured_frames(&mut worker, &bytes);
                assert_eq!(worker.delivered, messages as u64, "not every frame decoded");
            }
            let stats = worker.classifier.inflight_stats();
            println!(
                "{mode}: {messages} messages in {:?} (inherited {}, unknown {})",
                t.elapsed(),
                stats.inherited,
                stats.unknown
            );
        }
        "owner" => {
            let (warm, warm_requests) = workload(WARM_UP, 1);
            let (bytes, requests) = workload(messages, 2);
            let mut all = warm_requests;
            all.extend(requests);
            let mut worker = OwnerWorker::new(&all);
            worker.run(&warm);
            worker.delivered = 0;
            measured_owner(&mut worker, &bytes);
            assert_eq!(
                worker.delivered, messages as u64,
                "not every message delivered"
            );
            println!("{mode}: {messages} messages in {:?}", t.elapsed());
        }
        "header" | "header-naive" => {
            let headers = sample_headers(1024, 7);
            let warm = decode_headers(&headers, 4096, Header::decode);
            let sum = if mode == "header" {
                measured_header(&headers, messages)
            } else {
                measured_header_naive(&headers, messages)
            };
            println!(
                "{mode}: {messages} headers in {:?} (checksum {:x})",
                t.elapsed(),
                sum ^ warm
            );
        }
        other => {
            eprintln!(
                "unknown mode {other:?}: use pipeline, owner, frames, header or header-naive"
            );
            std::process::exit(2);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(mode @ ("pipeline" | "owner" | "frames" | "header" | "header-naive")) => {
            let messages = args
                .get(1)
                .map(|n| n.parse().expect("MESSAGES must be a number"))
                .unwrap_or(DEFAULT_MESSAGES);
            run_mode(mode, messages);
        }
        _ => {
            // `cargo bench` (all benches) lands here: a quick check that every mode still runs.
            for mode in ["pipeline", "owner", "frames", "header", "header-naive"] {
                run_mode(mode, 10_000);
            }
        }
    }
}

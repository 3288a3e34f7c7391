//! The end-to-end checks: nothing lost, nothing corrupted, nothing delivered to the wrong peer.
//!
//! Sans-IO: the peer threads tell the checker what they sent, what dsplane acknowledged or
//! refused, and what arrived where; it keeps one small entry per message that is still somewhere
//! in between, and forgets a message once it has been both acknowledged by dsplane and received
//! by its destination. Memory is therefore bounded by what is in flight (which dsplane itself
//! bounds), not by the length of the run.
//!
//! * **Lost**: acknowledged by dsplane (PROTOCOL.md: it has taken responsibility) and never
//!   received by its destination by the end of the drain. A frame dsplane NACKed was refused,
//!   not lost; one never acknowledged nor refused is *unconfirmed* (the sender gave up first).
//!   An alert that a STORM_SUMMARY stands for is *throttled*, not lost (ENGINE.md §4).
//! * **Corrupted**: the payload's trailer is missing or its checksum (payload and header
//!   fields) does not match ([`crate::payload`]).
//! * **Misdelivered**: intact, but arrived at another SU than the one it was for, at an SU when
//!   it was a request (or at a CSP when it was not), or at a CSP whose device range does not
//!   hold its device. A misdelivered frame also counts as lost, since its destination never got it.
//! * **Duplicates** (at-least-once delivery) are allowed and counted.

use std::collections::HashMap;

use crate::ids::Eui64;
use crate::wire::{Header, Kind, NackReason};
use serde::Serialize;

use crate::payload::{Corruption, Trailer};

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// CSP → dsplane → SU: responses and alerts.
    Northbound,
    /// SU → dsplane → CSP: requests.
    Southbound,
}

impl Direction {
    /// The direction of a data frame kind.
    pub fn of(kind: Kind) -> Direction {
        if kind == Kind::Request {
            Direction::Southbound
        } else {
            Direction::Northbound
        }
    }

    /// Its name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Northbound => "northbound",
            Direction::Southbound => "southbound",
        }
    }
}

/// Where a frame arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// At the Service User with this id.
    Su(Eui64),
    /// At the CSP link with this index.
    Csp(u32),
}

/// What the checker remembers of a message in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Its trailer's seq.
    pub seq: u64,
    /// Its kind.
    pub kind: Kind,
    /// Its trailer's destination.
    pub dest: u64,
    /// Header su_id.
    pub su: Eui64,
    /// Header device_id.
    pub device: Eui64,
    /// Header alert code.
    pub alert_code: u16,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    sent: Sent,
    acked: bool,
    nacked: bool,
    received: bool,
    /// Its connection closed before dsplane acknowledged or refused it.
    abandoned: bool,
}

/// What became of a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// First delivery, intact, at the right place.
    First,
    /// Delivered before (or delivered although dsplane refused it).
    Duplicate,
    /// The trailer or its checksum is wrong.
    Corrupted,
    /// Intact, at the wrong place.
    Misdelivered,
    /// Intact, but no such message was sent.
    Unknown,
}

/// The outcome of the checks, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Messages registered as sent.
    pub sent: u64,
    /// Acknowledged by dsplane.
    pub acked: u64,
    /// Refused by dsplane, by NACK reason code (`"5"`: overloaded, …).
    pub nacked: HashMap<String, u64>,
    /// Received for the first time, intact, at the right place.
    pub delivered: u64,
    /// Acknowledged by dsplane, never received.
    pub lost: u64,
    /// Alerts that a STORM_SUMMARY stands for.
    pub throttled: u64,
    /// STORM_SUMMARY frames received.
    pub storm_summaries: u64,
    /// Payloads that failed the checksum or had no trailer.
    pub corrupted: u64,
    /// Intact frames received at the wrong peer.
    pub misdelivered: u64,
    /// Frames received more than once (allowed: at-least-once).
    pub duplicates: u64,
    /// Intact frames no stream ever sent.
    pub unknown: u64,
    /// Sent, but neither acknowledged nor refused by the end.
    pub unconfirmed: u64,
    /// The first few problems, described.
    pub examples: Vec<String>,
}

impl Verdict {
    /// Whether every check passed: nothing lost, corrupted, misdelivered or invented.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.corrupted == 0 && self.misdelivered == 0 && self.unknown == 0
    }
}

/// Problems described in the verdict at most.
const EXAMPLES_MAX: usize = 10;

/// The checker.
#[derive(Debug, Default)]
pub struct Checker {
    inflight: HashMap<u64, Entry>,
    /// Highest seq issued per stream (seq >> 40), to tell a duplicate of a completed message from
    /// one never sent.
    issued: HashMap<u64, u64>,
    /// (su, device, alert code) → alerts its STORM_SUMMARY frames stand for.
    summaries: HashMap<(Eui64, Eui64, u16), u64>,
    /// Messages acknowledged and not yet received.
    awaiting_delivery: u64,
    /// Messages neither acknowledged nor refused.
    awaiting_ack: u64,
    /// Of `awaiting_delivery`, the DEVICE_ALERTs: storm protection may be counting them.
    awaiting_alerts: u64,
    /// DEVICE_ALERTs acknowledged so far, for the drain to see when the last one entered.
    alerts_acked: u64,
    /// Alerts the STORM_SUMMARY frames received so far stand for, in all.
    summarised: u64,
    verdict: Verdict,
    /// How many CSP links split the device space between them (0 = unknown: any CSP may
    /// receive any request).
    csp_ranges: u32,
}

/// Stream number of a seq.
pub fn stream_of(seq: u64) -> u64 {
    seq >> 40
}

/// The CSP index whose device range holds `device`, when `links` CSPs split the EUI-64 space in
/// equal consecutive ranges (as the load generator's own configuration does).
pub fn csp_for_device(device: Eui64, links: u32) -> u32 {
    if links <= 1 {
        return 0;
    }
    ((u128::from(device.0) * u128::from(links)) >> 64) as u32
}

impl Checker {
    /// A checker; `csp_ranges` > 0 when the CSP links split the device space in that many equal
    /// ranges (requests must then arrive at the CSP serving their device).
    pub fn new(csp_ranges: u32) -> Checker {
        Checker {
            csp_ranges,
            ..Checker::default()
        }
    }

    fn problem(&mut self, text: impl FnOnce() -> String) {
        if self.verdict.examples.len() < EXAMPLES_MAX {
            self.verdict.examples.push(text());
        }
    }

    /// A message is about to be sent (call before sending, so that its receipt can never be seen
    /// first).
    pub fn sent(&mut self, sent: Sent) {
        self.verdict.sent += 1;
        self.awaiting_ack += 1;
        let top = self.issued.entry(stream_of(sent.seq)).or_insert(0);
        *top = (*top).max(sent.seq);
        self.inflight.insert(
            sent.seq,
            Entry {
                sent,
                acked: false,
                nacked: false,
                received: false,
                abandoned: false,
            },
        );
    }

    /// dsplane acknowledged message `seq`.
    pub fn acked(&mut self, seq: u64) {
        let Some(e) = self.inflight.get_mut(&seq) else {
            return;
        };
        if e.acked || e.nacked || e.abandoned {
            return;
        }
        e.acked = true;
        self.awaiting_ack -= 1;
        self.verdict.acked += 1;
        let alert = e.sent.kind == Kind::DeviceAlert;
        if alert {
            self.alerts_acked += 1;
        }
        if e.received {
            self.inflight.remove(&seq);
        } else {
            self.awaiting_delivery += 1;
            if alert {
                self.awaiting_alerts += 1;
            }
        }
    }

    /// dsplane refused message `seq`.
    pub fn nacked(&mut self, seq: u64, reason: Option<NackReason>) {
        let Some(e) = self.inflight.get_mut(&seq) else {
            return;
        };
        if e.acked || e.nacked || e.abandoned {
            return;
        }
        e.nacked = true;
        self.awaiting_ack -= 1;
        // Forgotten at once, so that a flood of refusals cannot grow the table; should it
        // still arrive, it counts as a duplicate.
        self.inflight.remove(&seq);
        let key = reason.map_or_else(|| "?".to_owned(), |r| (r as u16).to_string());
        *self.verdict.nacked.entry(key).or_insert(0) += 1;
    }

    /// The connection message `seq` was sent on closed before dsplane acknowledged or refused
    /// it: it may still arrive (dsplane may have taken it), but nobody waits for its ACK.
    pub fn abandon(&mut self, seq: u64) {
        let Some(e) = self.inflight.get_mut(&seq) else {
            return;
        };
        if e.acked || e.nacked || e.abandoned {
            return;
        }
        e.abandoned = true;
        self.awaiting_ack -= 1;
        if e.received {
            self.inflight.remove(&seq);
        }
    }

    /// A data frame arrived at `at`; `check` is [`crate::payload::verify`] of it (done by the
    /// receiving thread, outside any lock).
    pub fn received(
        &mut self,
        at: Endpoint,
        header: &Header,
        check: Result<Trailer, Corruption>,
    ) -> Delivery {
        let trailer = match check {
            Ok(t) => t,
            Err(e) => {
                self.verdict.corrupted += 1;
                self.problem(|| {
                    format!(
                        "corrupted: {e} in {} msg_id {} at {at:?}",
                        header.kind, header.msg_id
                    )
                });
                return Delivery::Corrupted;
            }
        };
        if let Some(why) = self.wrong_place(at, header, &trailer) {
            self.verdict.misdelivered += 1;
            self.problem(|| format!("misdelivered: seq {:#x} at {at:?}: {why}", trailer.seq));
            return Delivery::Misdelivered;
        }
        let seq = trailer.seq;
        let Some(e) = self.inflight.get_mut(&seq) else {
            if self
                .issued
                .get(&stream_of(seq))
                .is_some_and(|&top| seq <= top)
            {
                self.verdict.duplicates += 1;
                return Delivery::Duplicate;
            }
            self.verdict.unknown += 1;
            self.problem(|| format!("unknown: seq {seq:#x} at {at:?} was never sent"));
            return Delivery::Unknown;
        };
        if e.sent.kind != header.kind || e.sent.dest != trailer.dest {
            // The checksum passed, so the sender built it this way: a seq reused by the
            // generator, not something dsplane did.
            self.verdict.unknown += 1;
            self.problem(|| format!("seq {seq:#x} reused for another message"));
            return Delivery::Unknown;
        }
        if e.received {
            self.verdict.duplicates += 1;
            return Delivery::Duplicate;
        }
        e.received = true;
        self.verdict.delivered += 1;
        if e.acked {
            self.awaiting_delivery -= 1;
            if e.sent.kind == Kind::DeviceAlert {
                self.awaiting_alerts -= 1;
            }
            self.inflight.remove(&seq);
        } else if e.abandoned {
            self.inflight.remove(&seq);
        }
        Delivery::First
    }

    fn wrong_place(&self, at: Endpoint, header: &Header, trailer: &Trailer) -> Option<String> {
        match at {
            Endpoint::Su(id) => {
                if header.kind == Kind::Request {
                    return Some("a REQUEST delivered to a Service User".into());
                }
                if trailer.dest != id.0 || header.su_id != id {
                    return Some(format!(
                        "for SU {}, delivered to SU {id}",
                        Eui64(trailer.dest)
                    ));
                }
                None
            }
            Endpoint::Csp(index) => {
                if header.kind != Kind::Request {
                    return Some(format!("a {} delivered to a CSP", header.kind));
                }
                if trailer.dest != 0 && trailer.dest != u64::from(index) + 1 {
                    return Some(format!(
                        "for CSP {}, delivered to CSP {index}",
                        trailer.dest - 1
                    ));
                }
                if self.csp_ranges > 1 && csp_for_device(header.device_id, self.csp_ranges) != index
                {
                    return Some(format!(
                        "device {} is not in CSP {index}'s range",
                        header.device_id
                    ));
                }
                None
            }
        }
    }

    /// A STORM_SUMMARY arrived at SU `at`: it stands for `counter` alerts of its device and code.
    pub fn storm_summary(&mut self, at: Eui64, header: &Header) {
        self.verdict.storm_summaries += 1;
        self.summarised += header.counter;
        *self
            .summaries
            .entry((at, header.device_id, header.alert_code))
            .or_insert(0) += header.counter;
    }

    /// (acknowledged and not yet received, neither acknowledged nor refused). Alerts that the
    /// STORM_SUMMARY frames received so far stand for are not waited for: they will never
    /// arrive one by one.
    pub fn pending(&self) -> (u64, u64) {
        let throttled = self.summarised.min(self.awaiting_alerts);
        (self.awaiting_delivery - throttled, self.awaiting_ack)
    }

    /// Alerts acknowledged, not received, and not (yet) stood for by a STORM_SUMMARY: storm
    /// protection may be counting them in a window still open, whose summary comes when it
    /// closes. The drain waits for those windows before it calls anything lost.
    pub fn awaiting_summary(&self) -> u64 {
        self.awaiting_alerts.saturating_sub(self.summarised)
    }

    /// DEVICE_ALERTs acknowledged so far (grows while alerts still enter dsplane).
    pub fn alerts_acked(&self) -> u64 {
        self.alerts_acked
    }

    /// Messages acknowledged and not yet delivered, per SU (northbound) and per stream: for the
    /// progress line.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// The verdict, counting what is still in flight as lost (acknowledged) or unconfirmed.
    pub fn finish(&self) -> Verdict {
        let mut v = self.verdict.clone();
        let mut unsummarised = self.summaries.clone();
        let mut lost: Vec<&Entry> = Vec::new();
        for e in self.inflight.values() {
            if e.acked && !e.received {
                let s = &e.sent;
                let key = (s.su, s.device, s.alert_code);
                match unsummarised.get_mut(&key) {
                    Some(n) if *n > 0 && s.kind == Kind::DeviceAlert => {
                        *n -= 1;
                        v.throttled += 1;
                    }
                    _ => lost.push(e),
                }
            } else if !e.acked && !e.nacked && !e.received {
                v.unconfirmed += 1;
            }
        }
        v.lost = lost.len() as u64;
        lost.sort_by_key(|e| e.sent.seq);
        for e in lost
            .iter()
            .take(EXAMPLES_MAX.saturating_sub(v.examples.len()))
        {
            v.examples.push(format!(
                "lost: seq {:#x} {} for {} (device {}), acknowledged by dsplane, never received",
                e.sent.seq, e.sent.kind, e.sent.su, e.sent.device
            ));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Srv;
    use crate::payload::{self, Trailer};
    use bytes::Bytes;

    const SU_A: Eui64 = Eui64(0x90B3_D51F_3001_0000);
    const SU_B: Eui64 = Eui64(0x90B3_D51F_3001_0001);

    /// A northbound response for `su`, as a CSP thread would build and register it.
    fn response(checker: &mut Checker, seq: u64, su: Eui64) -> (Header, Bytes) {
        let mut h = Header::new(Kind::Response);
        h.srv = Srv::new(4, 1, 1);
        h.su_id = su;
        h.device_id = Eui64(0x00DB_1234_5678_9000 + seq);
        h.counter = seq;
        h.created_ns = 1_700_000_000_000_000_000 + seq;
        let t = Trailer {
            flags: 0,
            seq,
            dest: su.0,
        };
        let p = payload::build_raw(&[b"<sr:Response/>"], &h, t);
        checker.sent(Sent {
            seq,
            kind: h.kind,
            dest: su.0,
            su,
            device: h.device_id,
            alert_code: 0,
        });
        (h, p)
    }

    fn deliver(checker: &mut Checker, at: Endpoint, h: &Header, p: &[u8]) -> Delivery {
        let mut forwarded = *h;
        forwarded.msg_id = 77;
        forwarded.priority = 3;
        checker.received(at, &forwarded, payload::verify(&forwarded, p))
    }

    #[test]
    fn a_clean_run_passes_in_any_order_of_ack_and_receipt() {
        let mut c = Checker::new(0);
        let (h1, p1) = response(&mut c, 1, SU_A);
        let (h2, p2) = response(&mut c, 2, SU_A);
        c.acked(1);
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_A), &h1, &p1),
            Delivery::First
        );
        // Received before dsplane's ACK reached the sender.
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_A), &h2, &p2),
            Delivery::First
        );
        c.acked(2);
        assert_eq!(c.pending(), (0, 0));
        assert_eq!(c.inflight_len(), 0, "completed messages are forgotten");
        let v = c.finish();
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.sent, v.acked, v.delivered), (2, 2, 2));
    }

    #[test]
    fn detects_a_lost_frame() {
        let mut c = Checker::new(0);
        let (h1, p1) = response(&mut c, 1, SU_A);
        let _never_delivered = response(&mut c, 2, SU_A);
        c.acked(1);
        c.acked(2);
        deliver(&mut c, Endpoint::Su(SU_A), &h1, &p1);
        assert_eq!(c.pending(), (1, 0));
        let v = c.finish();
        assert!(!v.passed());
        assert_eq!(v.lost, 1);
        assert!(
            v.examples[0].starts_with("lost: seq 0x2"),
            "{:?}",
            v.examples
        );
    }

    #[test]
    fn refused_and_unconfirmed_frames_are_not_lost() {
        let mut c = Checker::new(0);
        let _refused = response(&mut c, 1, SU_A);
        let _unconfirmed = response(&mut c, 2, SU_A);
        c.nacked(1, Some(NackReason::Overloaded));
        c.acked(1); // A later cumulative ACK does not cover a NACKed frame.
        let v = c.finish();
        assert!(v.passed(), "{v:?}");
        assert_eq!(v.nacked.get("5"), Some(&1));
        assert_eq!(v.unconfirmed, 1);
        assert_eq!(v.lost, 0);
    }

    #[test]
    fn detects_a_corrupted_payload() {
        let mut c = Checker::new(0);
        let (h, p) = response(&mut c, 1, SU_A);
        c.acked(1);
        let mut bad = p.to_vec();
        bad[3] ^= 0x20;
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_A), &h, &bad),
            Delivery::Corrupted
        );
        // A header field changed on the way is corruption too.
        let mut rewritten = h;
        rewritten.counter += 1;
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_A), &rewritten, &p),
            Delivery::Corrupted
        );
        // A payload cut short loses its trailer.
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_A), &h, &p[..p.len() - 1]),
            Delivery::Corrupted
        );
        let v = c.finish();
        assert!(!v.passed());
        assert_eq!(v.corrupted, 3);
        assert_eq!(v.lost, 1, "the intact copy never arrived");
    }

    #[test]
    fn detects_a_misdelivery() {
        let mut c = Checker::new(0);
        let (h, p) = response(&mut c, 1, SU_A);
        c.acked(1);
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_B), &h, &p),
            Delivery::Misdelivered
        );
        // A response at a CSP is misdelivered too.
        assert_eq!(
            deliver(&mut c, Endpoint::Csp(0), &h, &p),
            Delivery::Misdelivered
        );
        let v = c.finish();
        assert!(!v.passed());
        assert_eq!(v.misdelivered, 2);
        assert_eq!(v.lost, 1);
        assert!(v.examples[0].contains("delivered to SU 90-B3-D5-1F-30-01-00-01"));
    }

    #[test]
    fn detects_a_request_at_the_wrong_csp() {
        let mut c = Checker::new(2);
        let mut h = Header::new(Kind::Request);
        h.su_id = SU_A;
        h.device_id = Eui64(0x10 << 56); // first half of the space: CSP 0
        let t = Trailer {
            flags: 0,
            seq: 5,
            dest: 1,
        };
        let p = payload::build_raw(&[b"req"], &h, t);
        c.sent(Sent {
            seq: 5,
            kind: Kind::Request,
            dest: 1,
            su: SU_A,
            device: h.device_id,
            alert_code: 0,
        });
        assert_eq!(
            deliver(&mut c, Endpoint::Csp(1), &h, &p),
            Delivery::Misdelivered
        );
        assert_eq!(deliver(&mut c, Endpoint::Csp(0), &h, &p), Delivery::First);
        assert_eq!(csp_for_device(Eui64(u64::MAX), 2), 1);
        assert_eq!(csp_for_device(Eui64(0), 3), 0);
    }

    #[test]
    fn duplicates_are_counted_not_failed() {
        let mut c = Checker::new(0);
        let (h, p) = response(&mut c, 1, SU_A);
        deliver(&mut c, Endpoint::Su(SU_A), &h, &p);
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_A), &h, &p),
            Delivery::Duplicate
        );
        c.acked(1);
        // After it is forgotten, a re-send is still known as a duplicate.
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_A), &h, &p),
            Delivery::Duplicate
        );
        let v = c.finish();
        assert!(v.passed());
        assert_eq!(v.duplicates, 2);
    }

    #[test]
    fn a_frame_never_sent_is_unknown() {
        let mut c = Checker::new(0);
        let mut other = Checker::new(0);
        let (h, p) = response(&mut other, 1 << 40, SU_A);
        assert_eq!(
            deliver(&mut c, Endpoint::Su(SU_A), &h, &p),
            Delivery::Unknown
        );
        assert!(!c.finish().passed());
    }

    #[test]
    fn alerts_a_storm_summary_stands_for_are_throttled_not_lost() {
        let mut c = Checker::new(0);
        let device = Eui64(0x00DB_0000_0000_0001);
        for seq in 1..=5 {
            c.sent(Sent {
                seq,
                kind: Kind::DeviceAlert,
                dest: SU_A.0,
                su: SU_A,
                device,
                alert_code: 0x8F75,
            });
            c.acked(seq);
        }
        let mut summary = Header::new(Kind::StormSummary);
        summary.su_id = SU_A;
        summary.device_id = device;
        summary.alert_code = 0x8F75;
        summary.counter = 4;
        // Until the summary comes, the five alerts may be in an open window.
        assert_eq!(
            (c.pending(), c.awaiting_summary(), c.alerts_acked()),
            ((5, 0), 5, 5)
        );
        c.storm_summary(SU_A, &summary);
        // The four it stands for are no longer waited for; the fifth still is.
        assert_eq!((c.pending(), c.awaiting_summary()), ((1, 0), 1));
        let v = c.finish();
        assert_eq!((v.throttled, v.lost, v.storm_summaries), (4, 1, 1));
    }
}

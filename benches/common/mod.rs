//! What every comparison bench shares: a recorder of criterion's samples that prints, at the end
//! of a group, each contender's median and range per element and the ratio of the medians, all
//! from the same run (STYLE.md rule 9: on a shared machine only ratios are stable).
//!
//! Criterion calls an `iter_custom` routine first for its warm-up and then once per sample, so
//! the last `sample_size` calls of each contender are its samples.

#![allow(dead_code)] // each bench uses a different part

use std::time::Duration;

/// The samples of one contender: (iterations, elapsed) per call.
#[derive(Default)]
pub struct Contender {
    pub name: String,
    calls: Vec<(u64, Duration)>,
}

/// Records per-call timings of several contenders and prints their ratios.
pub struct Ratios {
    group: String,
    /// Elements moved per iteration (messages, decodes, checks), for ns/element.
    elements: u64,
    samples: usize,
    contenders: Vec<Contender>,
}

/// Median, minimum and maximum of the last samples of one contender, ns per element.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Ratios {
    pub fn new(group: &str, elements: u64, samples: usize) -> Ratios {
        Ratios {
            group: group.to_owned(),
            elements,
            samples,
            contenders: Vec::new(),
        }
    }

    /// Notes one call of `name`'s routine and hands its time back for criterion.
    pub fn record(&mut self, name: &str, iters: u64, elapsed: Duration) -> Duration {
        match self.contenders.iter_mut().find(|c| c.name == name) {
            Some(c) => c.calls.push((iters, elapsed)),
            None => self.contenders.push(Contender {
                name: name.to_owned(),
                calls: vec![(iters, elapsed)],
            }),
        }
        elapsed
    }

    pub fn summary(&self, name: &str) -> Option<Summary> {
        let c = self.contenders.iter().find(|c| c.name == name)?;
        let skip = c.calls.len().saturating_sub(self.samples);
        let mut per: Vec<f64> = c.calls[skip..]
            .iter()
            .map(|(iters, d)| d.as_nanos() as f64 / (*iters as f64 * self.elements as f64))
            .collect();
        if per.is_empty() {
            return None;
        }
        per.sort_by(f64::total_cmp);
        let n = per.len();
        let median = if n % 2 == 1 {
            per[n / 2]
        } else {
            (per[n / 2 - 1] + per[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: per[0],
            max: per[n - 1],
        })
    }

    /// Prints one line per contender and one `RATIO` line per pair (`ours`, `other`): how many
    /// times faster `ours` is (other's median time / ours), so > 1 means ours wins.
    pub fn print(&self, pairs: &[(&str, &str)]) {
        println!();
        for c in &self.contenders {
            if let Some(s) = self.summary(&c.name) {
                println!(
                    "TIME  {}/{}: median {:.2} ns/element, range {:.2}-{:.2}",
                    self.group, c.name, s.median, s.min, s.max
                );
            }
        }
        for (ours, other) in pairs {
            if let (Some(a), Some(b)) = (self.summary(ours), self.summary(other)) {
                println!(
                    "RATIO {}: {} is {:.2}x {} (medians {:.2} vs {:.2} ns/element; {:.2}-{:.2}x from the sample ranges)",
                    self.group,
                    ours,
                    b.median / a.median,
                    other,
                    a.median,
                    b.median,
                    b.min / a.max,
                    b.max / a.min,
                );
            }
        }
        println!();
    }
}

/// The straightforward decoder issue 7 compares `Header::decode` with: each field read from its
/// own slice and each rule checked in turn with an early return, the way one would first write
/// it. It accepts and refuses exactly what `Header::decode` does, with the same errors.
pub mod naive {
    use dsplane_proto::ids::{Eui64, Srv};
    use dsplane_proto::wire::{
        DecodeError, Header, Kind, WireError, HEADER_LEN, MAGIC, PAYLOAD_BYTES_MAX_CEILING, VERSION,
    };

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    pub fn decode(b: &[u8; HEADER_LEN], payload_bytes_max: u32) -> Result<Header, DecodeError> {
        let max = payload_bytes_max.min(PAYLOAD_BYTES_MAX_CEILING);
        let msg_id = u64_at(b, 40);
        let fail = |error| Err(DecodeError { msg_id, error });
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return fail(WireError::BadMagic { found: magic });
        }
        if b[4] != VERSION {
            return fail(WireError::BadVersion { found: b[4] });
        }
        let Some(kind) = Kind::from_u8(b[5]) else {
            return fail(WireError::UnknownKind { found: b[5] });
        };
        let reserved = u32_at(b, 60);
        if reserved != 0 {
            return fail(WireError::ReservedNotZero { found: reserved });
        }
        let payload_len = u32_at(b, 56);
        if payload_len > max {
            return fail(WireError::PayloadTooLong {
                len: payload_len,
                max,
            });
        }
        let mode = b[6];
        if mode > 2 {
            return fail(WireError::BadMode { found: mode });
        }
        Ok(Header {
            kind,
            mode,
            priority: b[7],
            srv: Srv(u32_at(b, 8)),
            alert_code: u16_at(b, 12),
            aux: u16_at(b, 14),
            su_id: Eui64(u64_at(b, 16)),
            device_id: Eui64(u64_at(b, 24)),
            counter: u64_at(b, 32),
            msg_id,
            created_ns: u64_at(b, 48),
            payload_len,
        })
    }
}

/// A small deterministic generator (splitmix64), so that workloads are the same on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` valid, varied data-frame headers (responses, alerts, requests), encoded.
pub fn sample_headers(n: usize, seed: u64) -> Vec<[u8; dsplane_proto::wire::HEADER_LEN]> {
    use dsplane_proto::ids::{Eui64, Srv};
    use dsplane_proto::wire::{Header, Kind};
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let kind = [Kind::Response, Kind::DeviceAlert, Kind::Request, Kind::Ack]
                [rng.below(4) as usize];
            let mut h = Header::new(kind);
            h.mode = rng.below(3) as u8;
            h.srv = Srv::new(
                rng.below(12) as u8 + 1,
                rng.below(4) as u8,
                rng.below(3) as u8,
            );
            h.alert_code = 0x8F00 | rng.below(256) as u16;
            h.su_id = Eui64(0x90B3_D51F_3001_0000 | rng.below(16));
            h.device_id = Eui64(rng.next());
            h.counter = rng.next();
            h.msg_id = i as u64 + 1;
            h.created_ns = 1_700_000_000_000_000_000 + i as u64 * 1000;
            h.payload_len = rng.below(4096) as u32;
            h.to_bytes()
        })
        .collect()
}

/// The bench's own arguments (`cargo bench` adds `--bench`, which is dropped).
pub fn bench_args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect()
}

/// The median of `v` (sorted in place; the upper one of an even count).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Appends the wire bytes of RESPONSEs numbered `msg_ids`, to `sus` in turn, each to its own
/// device (`counter_base + msg_id`, also its counter), over SRVs of every level, with payloads
/// of `payload_len` bytes.
pub fn responses(
    sus: &[dsplane_proto::ids::Eui64],
    msg_ids: std::ops::RangeInclusive<u64>,
    counter_base: u64,
    payload_len: usize,
    out: &mut Vec<u8>,
) {
    use dsplane_proto::ids::{Eui64, Srv};
    use dsplane_proto::wire::{Frame, Header, Kind};
    const SRVS: [Srv; 4] = [
        Srv::new(2, 2, 0),
        Srv::new(8, 1, 1),
        Srv::new(4, 1, 1),
        Srv::new(6, 2, 1),
    ];
    let payload = bytes::Bytes::from(vec![0x5A; payload_len]);
    for msg_id in msg_ids {
        let i = msg_id.saturating_sub(1) as usize;
        let mut h = Header::new(Kind::Response);
        h.su_id = sus[i % sus.len()];
        h.device_id = Eui64(counter_base + msg_id);
        h.counter = counter_base + msg_id;
        h.msg_id = msg_id;
        h.srv = SRVS[i % SRVS.len()];
        let frame = Frame::new(h, payload.clone()).unwrap();
        out.extend_from_slice(&frame.header_bytes());
        out.extend_from_slice(&frame.payload);
    }
}

/// An SU's own parse of what it reads: whole frames are counted (data frames only) and the last
/// data `msg_id` is kept for the cumulative ACK; a partial frame waits for the next read.
#[derive(Default)]
pub struct SuParse {
    pending: Vec<u8>,
    /// Data frames seen so far.
    pub count: u64,
}

impl SuParse {
    /// Takes one read's bytes; returns the last data `msg_id` among the whole frames, if any.
    pub fn take(&mut self, bytes: &[u8]) -> Option<u64> {
        use dsplane_proto::wire::{Header, HEADER_LEN, PAYLOAD_BYTES_MAX_DEFAULT};
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        let mut last = None;
        while let Some(head) = self.pending.get(at..at + HEADER_LEN) {
            let head: &[u8; HEADER_LEN] = head.try_into().unwrap();
            let h = Header::decode(head, PAYLOAD_BYTES_MAX_DEFAULT).unwrap();
            let len = HEADER_LEN + h.payload_len as usize;
            if self.pending.len() < at + len {
                break;
            }
            if h.kind.is_data() {
                self.count += 1;
                last = Some(h.msg_id);
            }
            at += len;
        }
        self.pending.drain(..at);
        last
    }
}

/// Reads and drops whatever comes in on `stream` until it closes (a peer's ACKs, the engine's).
pub fn drain(stream: &std::net::TcpStream) -> std::thread::JoinHandle<()> {
    use std::io::Read;
    let mut stream = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    })
}

/// The null forwarder, the machine's limit for a forwarding dataplane: accepts the CSP, then the
/// SU, and copies bytes from one to the other, `read_bytes` at most a read, until the CSP
/// closes (no parsing, no HELLO, no queues). What the SU sends back is read and dropped.
pub fn null_forwarder(
    read_bytes: usize,
) -> (
    std::net::SocketAddr,
    std::net::SocketAddr,
    std::thread::JoinHandle<()>,
) {
    use std::io::{Read, Write};
    let csp_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let su_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = (
        csp_listener.local_addr().unwrap(),
        su_listener.local_addr().unwrap(),
    );
    let handle = std::thread::spawn(move || {
        let (mut from, _) = csp_listener.accept().unwrap();
        let (mut to, _) = su_listener.accept().unwrap();
        from.set_nodelay(true).unwrap();
        to.set_nodelay(true).unwrap();
        let back = drain(&to);
        let mut buf = vec![0u8; read_bytes];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    (addrs.0, addrs.1, handle)
}

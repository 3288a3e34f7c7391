//! The alert monitoring report (ENGINE.md §4): per UTC day and alert code, alerts received,
//! delivered and throttled, distinct devices, and the devices that sent the most. The DCC
//! deployed such a daily report to follow 0x8F75 volumes (storms of over 100,000 alerts a day
//! from under 60 devices); this is its core, without I/O.
//!
//! # Counting devices in bounded memory
//!
//! * **Distinct devices** are kept exactly, in a sorted list, up to [`DISTINCT_EXACT_MAX`] (256)
//!   devices, which covers the storms the report exists for; beyond that the list becomes a
//!   HyperLogLog sketch of 2¹² one-byte registers (4 KiB), whose standard error is
//!   1.04 / √4096 ≈ 1.6 %. The estimate is Ertl's improved raw estimator ("New cardinality
//!   estimation algorithms for HyperLogLog sketches", 2017), which needs neither the empirical
//!   bias tables of HyperLogLog++ nor a switch to linear counting, and is unbiased from a few
//!   devices up. The device hash is a fixed bijective mixer (not a keyed one): sketches are
//!   saved and merged, so the hash must be the same in every process and after every restart.
//! * **Top devices** are a Space-Saving summary with [`TOP_DEVICES`] (16) counters: every device
//!   that sent more than N/16 of a code's N alerts that day is in it, and each reported count
//!   over-estimates the device's true count by at most its `error` field, itself at most N/16.
//!   Exact per-device counts would need a table of every device (millions).
//!
//! # Bounds
//!
//! At most [`REPORT_DAYS_MAX`] days are kept (recording a newer day drops the oldest; a record
//! for a day older than all kept ones is counted in [`AlertReport::stale`] and otherwise
//! ignored), and at most [`REPORT_CODES_PER_DAY_MAX`] codes per day; alerts of further codes are
//! counted in the day's `other_codes` row. So a report never holds more than
//! 31 × 1,024 × ~4.5 KiB, and in practice (a few dozen codes a day, most of them with few
//! devices) a few MiB.
//!
//! # Persistence
//!
//! [`AlertReport::save_to`] writes a 16-byte header (magic `DSAR`, format version, payload
//! length, CRC-32C of the payload) and a little-endian payload. [`AlertReport::load_from`]
//! checks the length against the largest payload the bounds allow before reading it, the
//! checksum before parsing, and every count, bound and ordering while parsing, so a corrupt or
//! truncated file is an error, never a panic or an unbounded allocation. Writing to a temporary
//! file and renaming it over the old one is the caller's part. The CRC is the `crc32c` crate's,
//! as in the write-ahead log ([`crate::wal`]): one CRC-32C implementation in the crate (the
//! Castagnoli polynomial; reports written by the table-driven version this module used to carry
//! load unchanged, which the tests check with the standard check value and a report's bytes
//! written by that version).
//!
//! # Merging
//!
//! Each worker may keep its own report; [`AlertReport::merge`] folds one into another: counts
//! add, device sets unite (sketches take the larger register), and Space-Saving summaries merge
//! as Agarwal et al. show ("Mergeable summaries", 2012), keeping the N/16 error bound for the
//! combined N.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};

use serde::Serialize;

use crate::ids::Eui64;
use crate::storm::Verdict;
use crate::NANOS_PER_SEC;

/// Most days kept.
pub const REPORT_DAYS_MAX: usize = 31;
/// Most alert codes with their own row per day.
pub const REPORT_CODES_PER_DAY_MAX: usize = 1_024;
/// Distinct devices counted exactly before switching to the sketch.
pub const DISTINCT_EXACT_MAX: usize = 256;
/// Counters of the top-devices summary.
pub const TOP_DEVICES: usize = 16;
/// HyperLogLog precision: 2¹² registers.
const HLL_P: u32 = 12;
const HLL_REGISTERS: usize = 1 << HLL_P;
/// Largest register value: leading zeros of the 52 remaining bits, plus one.
const HLL_RANK_MAX: u8 = (64 - HLL_P + 1) as u8;
/// Standard error of a sketch's estimate, 1.04 / √m.
pub const DISTINCT_STD_ERROR: f64 = 0.01625;
/// Nanoseconds in a day.
const NANOS_PER_DAY: u64 = 86_400 * NANOS_PER_SEC;

/// File magic: `DSAR`, dsplane alert report.
const MAGIC: [u8; 4] = *b"DSAR";
/// Format version written; the only one read.
pub const REPORT_FORMAT_VERSION: u16 = 1;
const HEADER_BYTES: usize = 16;
/// Largest payload of one code's row: code, three counts, the device set at its largest (the
/// sketch), the top devices.
const CODE_ROW_BYTES_MAX: usize = 2 + 24 + 1 + HLL_REGISTERS + 1 + TOP_DEVICES * 24;
const DAY_BYTES_MAX: usize = 4 + 24 + 2 + REPORT_CODES_PER_DAY_MAX * CODE_ROW_BYTES_MAX;
/// Largest payload a report can have: `load_from` refuses a header claiming more.
pub const REPORT_PAYLOAD_BYTES_MAX: usize = 2 + REPORT_DAYS_MAX * DAY_BYTES_MAX;
const _: () = assert!(REPORT_PAYLOAD_BYTES_MAX < u32::MAX as usize);
const _: () = assert!(DISTINCT_EXACT_MAX * 8 < HLL_REGISTERS * 2);
const _: () = assert!(REPORT_CODES_PER_DAY_MAX <= u16::MAX as usize);

/// The UTC day (days since 1970-01-01) of a wall-clock instant in ns since the Unix epoch, such
/// as a frame's `created_ns`. Not for the monotonic [`crate::Nanos`] of the message path.
pub fn utc_day(unix_ns: u64) -> u32 {
    // u64 ns span 584 years, so the day fits a u32.
    (unix_ns / NANOS_PER_DAY) as u32
}

/// `YYYY-MM-DD` for a day since the epoch (Hinnant's civil-from-days algorithm).
pub fn date_of(day: u32) -> String {
    let z = i64::from(day) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The day number (days since 1970-01-01) of a `YYYY-MM-DD` date, if it is one.
pub fn day_of_date(date: &str) -> Option<u32> {
    let mut parts = date.trim().split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), the inverse of `date_of`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let day = u32::try_from(days).ok()?;
    // Refuse dates that do not exist (e.g. 2026-02-31) by the round trip.
    (date_of(day) == date.trim()).then_some(day)
}

/// What happened to one alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Delivered (excluded codes included).
    Delivered,
    /// Throttled by the storm detector.
    Throttled,
}

impl From<Verdict> for Outcome {
    fn from(v: Verdict) -> Outcome {
        match v {
            Verdict::Deliver => Outcome::Delivered,
            Verdict::Throttled => Outcome::Throttled,
        }
    }
}

/// Why a saved report could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Reading or writing failed.
    #[error("report file I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Not a report file at all.
    #[error("not an alert report file (bad magic)")]
    Magic,
    /// A report written by a format this build does not read.
    #[error("alert report format version {0} is not supported (this build reads version {REPORT_FORMAT_VERSION})")]
    Version(u16),
    /// The file ends early.
    #[error("alert report file is truncated")]
    Truncated,
    /// The header claims a payload larger than any report can be.
    #[error("alert report payload of {0} bytes is larger than the {REPORT_PAYLOAD_BYTES_MAX}-byte maximum")]
    TooLarge(u64),
    /// The payload does not match its checksum.
    #[error("alert report checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// CRC-32C in the header.
        stored: u32,
        /// CRC-32C of the payload read.
        computed: u32,
    },
    /// The checksum matched but the content breaks a rule (a bug in the writer, or a crafted
    /// file); the text says which.
    #[error("alert report content is invalid: {0}")]
    Corrupt(&'static str),
}

/// Received, delivered and throttled alerts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Alerts seen.
    pub received: u64,
    /// Alerts delivered.
    pub delivered: u64,
    /// Alerts throttled.
    pub throttled: u64,
}

impl Counts {
    fn add(&mut self, outcome: Outcome) {
        self.received += 1;
        match outcome {
            Outcome::Delivered => self.delivered += 1,
            Outcome::Throttled => self.throttled += 1,
        }
    }

    fn merge(&mut self, other: &Counts) {
        self.received += other.received;
        self.delivered += other.delivered;
        self.throttled += other.throttled;
    }

    fn consistent(&self) -> bool {
        self.delivered.checked_add(self.throttled) == Some(self.received)
    }
}

/// The devices seen: exactly, then as a sketch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Distinct {
    /// Sorted, at most [`DISTINCT_EXACT_MAX`].
    Exact(Vec<u64>),
    Sketch(Box<[u8; HLL_REGISTERS]>),
}

impl Default for Distinct {
    fn default() -> Self {
        Distinct::Exact(Vec::new())
    }
}

impl Distinct {
    fn insert(&mut self, device: u64) {
        match self {
            Distinct::Exact(list) => {
                if let Err(at) = list.binary_search(&device) {
                    if list.len() < DISTINCT_EXACT_MAX {
                        list.insert(at, device);
                    } else {
                        let mut registers = Box::new([0u8; HLL_REGISTERS]);
                        for &d in list.iter() {
                            hll_add(&mut registers, d);
                        }
                        hll_add(&mut registers, device);
                        *self = Distinct::Sketch(registers);
                    }
                }
            }
            Distinct::Sketch(registers) => hll_add(registers, device),
        }
    }

    fn merge(&mut self, other: &Distinct) {
        match other {
            Distinct::Exact(list) => {
                for &d in list {
                    self.insert(d);
                }
            }
            Distinct::Sketch(theirs) => {
                if let Distinct::Exact(list) = self {
                    let mut registers = Box::new([0u8; HLL_REGISTERS]);
                    for &d in list.iter() {
                        hll_add(&mut registers, d);
                    }
                    *self = Distinct::Sketch(registers);
                }
                if let Distinct::Sketch(mine) = self {
                    for (m, t) in mine.iter_mut().zip(theirs.iter()) {
                        *m = (*m).max(*t);
                    }
                }
            }
        }
    }

    fn count(&self) -> u64 {
        match self {
            Distinct::Exact(list) => list.len() as u64,
            Distinct::Sketch(registers) => hll_estimate(registers).round() as u64,
        }
    }
}

/// A fixed 64-bit mixer (splitmix64's finaliser): a bijection, so distinct devices never share a
/// hash, with every output bit depending on every input bit.
fn mix(device: u64) -> u64 {
    let mut z = device.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hll_add(registers: &mut [u8; HLL_REGISTERS], device: u64) {
    let h = mix(device);
    // The top HLL_P bits pick the register, so `at` < HLL_REGISTERS and `get_mut` always finds it.
    let at = (h >> (64 - HLL_P)) as usize;
    let rest = h << HLL_P;
    // The 52 remaining bits; all zero gives the largest rank.
    let rank = (rest.leading_zeros() + 1).min(u32::from(HLL_RANK_MAX)) as u8;
    if let Some(register) = registers.get_mut(at) {
        *register = (*register).max(rank);
    }
}

/// Ertl's improved raw estimator over the register histogram.
fn hll_estimate(registers: &[u8; HLL_REGISTERS]) -> f64 {
    // histogram[k]: registers holding rank k, for k in 0..=q+1 where q + 1 = HLL_RANK_MAX.
    let mut histogram = [0u32; HLL_RANK_MAX as usize + 1];
    for &r in registers.iter() {
        if let Some(count) = histogram.get_mut(usize::from(r.min(HLL_RANK_MAX))) {
            *count += 1;
        }
    }
    let [empty, middle @ .., full] = histogram;
    let m = HLL_REGISTERS as f64;
    if empty as usize == HLL_REGISTERS {
        return 0.0;
    }
    let mut z = m * hll_tau(1.0 - f64::from(full) / m);
    // Ranks q down to 1.
    for &count in middle.iter().rev() {
        z = 0.5 * (z + f64::from(count));
    }
    z += m * hll_sigma(f64::from(empty) / m);
    let alpha_inf = 1.0 / (2.0 * std::f64::consts::LN_2);
    alpha_inf * m * m / z
}

fn hll_sigma(mut x: f64) -> f64 {
    if x >= 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let before = z;
        z += x * y;
        y += y;
        if z == before {
            return z;
        }
    }
}

fn hll_tau(mut x: f64) -> f64 {
    if x <= 0.0 || x >= 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let before = z;
        y *= 0.5;
        z -= (1.0 - x) * (1.0 - x) * y;
        if z == before {
            return z / 3.0;
        }
    }
}

/// One Space-Saving counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counter {
    device: u64,
    /// Over-estimate of the device's alerts.
    count: u64,
    /// How much of `count` may belong to devices it replaced.
    error: u64,
}

/// Space-Saving with [`TOP_DEVICES`] counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TopDevices(Vec<Counter>);

impl TopDevices {
    fn add(&mut self, device: u64) {
        if let Some(c) = self.0.iter_mut().find(|c| c.device == device) {
            c.count += 1;
            return;
        }
        if self.0.len() < TOP_DEVICES {
            self.0.push(Counter {
                device,
                count: 1,
                error: 0,
            });
            return;
        }
        // Replace the smallest counter: the newcomer inherits its count as possible error.
        if let Some(min) = self.0.iter_mut().min_by_key(|c| c.count) {
            *min = Counter {
                device,
                count: min.count + 1,
                error: min.count,
            };
        }
    }

    /// The smallest count if all counters are in use (a device absent may have had up to that).
    fn floor(&self) -> u64 {
        if self.0.len() < TOP_DEVICES {
            0
        } else {
            self.0.iter().map(|c| c.count).min().unwrap_or(0)
        }
    }

    fn merge(&mut self, other: &TopDevices) {
        let (mine, theirs) = (self.floor(), other.floor());
        let mut all: Vec<Counter> = Vec::with_capacity(2 * TOP_DEVICES);
        for c in &self.0 {
            let o = other.0.iter().find(|o| o.device == c.device);
            all.push(match o {
                Some(o) => Counter {
                    device: c.device,
                    count: c.count + o.count,
                    error: c.error + o.error,
                },
                None => Counter {
                    device: c.device,
                    count: c.count + theirs,
                    error: c.error + theirs,
                },
            });
        }
        for o in &other.0 {
            if !self.0.iter().any(|c| c.device == o.device) {
                all.push(Counter {
                    device: o.device,
                    count: o.count + mine,
                    error: o.error + mine,
                });
            }
        }
        all.sort_by(|a, b| b.count.cmp(&a.count).then(a.device.cmp(&b.device)));
        all.truncate(TOP_DEVICES);
        self.0 = all;
    }

    fn sorted(&self) -> Vec<Counter> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.device.cmp(&b.device)));
        v
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CodeDay {
    counts: Counts,
    distinct: Distinct,
    top: TopDevices,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Day {
    codes: BTreeMap<u16, CodeDay>,
    /// Alerts of codes beyond [`REPORT_CODES_PER_DAY_MAX`].
    other: Counts,
}

/// One device in a day's top list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopDevice {
    /// The device, written `00-DB-12-34-56-78-90-A0`.
    #[serde(serialize_with = "serialize_eui64")]
    pub device: Eui64,
    /// Its alerts of this code that day: an over-estimate by at most `error`.
    pub count: u64,
    /// The most by which `count` may over-estimate.
    pub error: u64,
}

fn serialize_eui64<S: serde::Serializer>(id: &Eui64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// One alert code's row of a day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CodeSummary {
    /// The alert code.
    pub code: u16,
    /// The alert code written `0x8F75`.
    pub code_hex: String,
    /// Received, delivered, throttled.
    #[serde(flatten)]
    pub counts: Counts,
    /// Distinct devices that sent it.
    pub distinct_devices: u64,
    /// Whether `distinct_devices` is exact; otherwise it is an estimate with a standard error of
    /// `distinct_std_error` (relative).
    pub distinct_exact: bool,
    /// Relative standard error of `distinct_devices`: 0 when exact.
    pub distinct_std_error: f64,
    /// The devices that sent it most, most first.
    pub top_devices: Vec<TopDevice>,
}

/// A day of the report: what `/report/alerts` shows, as JSON (serde) or a table (`Display`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DaySummary {
    /// Days since 1970-01-01 (UTC).
    pub day: u32,
    /// The day written `YYYY-MM-DD`.
    pub date: String,
    /// One row per alert code, by code.
    pub codes: Vec<CodeSummary>,
    /// Alerts of codes that had no row left (more than [`REPORT_CODES_PER_DAY_MAX`] codes).
    pub other_codes: Counts,
    /// All alerts of the day.
    pub total: Counts,
}

impl fmt::Display for DaySummary {
    /// A fixed-width table, the three top devices of each code on its line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Alert report for {} (UTC)", self.date)?;
        writeln!(
            f,
            "{:<8} {:>12} {:>12} {:>12} {:>10}  top devices (alerts)",
            "code", "received", "delivered", "throttled", "devices"
        )?;
        for c in &self.codes {
            let devices = if c.distinct_exact {
                c.distinct_devices.to_string()
            } else {
                format!("~{}", c.distinct_devices)
            };
            write!(
                f,
                "{:<8} {:>12} {:>12} {:>12} {:>10} ",
                c.code_hex, c.counts.received, c.counts.delivered, c.counts.throttled, devices
            )?;
            for t in c.top_devices.iter().take(3) {
                write!(f, " {} ({})", t.device, t.count)?;
            }
            writeln!(f)?;
        }
        if self.other_codes.received > 0 {
            writeln!(
                f,
                "{:<8} {:>12} {:>12} {:>12}",
                "other",
                self.other_codes.received,
                self.other_codes.delivered,
                self.other_codes.throttled
            )?;
        }
        writeln!(
            f,
            "{:<8} {:>12} {:>12} {:>12}",
            "total", self.total.received, self.total.delivered, self.total.throttled
        )
    }
}

/// The alert monitoring report. See the module documentation.
///
/// ```
/// use dsplane_core::ids::Eui64;
/// use dsplane_core::report::{AlertReport, Outcome};
/// let mut report = AlertReport::new();
/// let day = 19_779; // 2024-02-26
/// for _ in 0..3 {
///     report.record(day, 0x8F75, Eui64(42), Outcome::Throttled);
/// }
/// report.record(day, 0x8F75, Eui64(43), Outcome::Delivered);
/// let summary = report.day_summary(day);
/// assert_eq!(summary.date, "2024-02-26");
/// assert_eq!(summary.codes[0].counts.received, 4);
/// assert_eq!(summary.codes[0].distinct_devices, 2);
/// assert_eq!(summary.codes[0].top_devices[0].device, Eui64(42));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertReport {
    days: BTreeMap<u32, Day>,
    stale: u64,
}

impl AlertReport {
    /// An empty report.
    pub fn new() -> AlertReport {
        AlertReport::default()
    }

    /// Counts one alert of `code` from `device` on `day` (see [`utc_day`]) with its outcome.
    pub fn record(&mut self, day: u32, code: u16, device: Eui64, outcome: Outcome) {
        let Some(d) = self.day_mut(day) else {
            self.stale += 1;
            return;
        };
        let full = d.codes.len() >= REPORT_CODES_PER_DAY_MAX;
        match d.codes.get_mut(&code) {
            Some(row) => row.add(device.0, outcome),
            None if full => d.other.add(outcome),
            None => d.codes.entry(code).or_default().add(device.0, outcome),
        }
    }

    /// The day's entry, made if needed; `None` if the day is older than every kept day and
    /// there is no room for it.
    fn day_mut(&mut self, day: u32) -> Option<&mut Day> {
        if !self.days.contains_key(&day) {
            if self.days.len() >= REPORT_DAYS_MAX {
                let oldest = *self.days.keys().next()?;
                if day < oldest {
                    return None;
                }
                self.days.remove(&oldest);
            }
            self.days.insert(day, Day::default());
        }
        self.days.get_mut(&day)
    }

    /// Records for days older than every kept day, ignored.
    pub fn stale(&self) -> u64 {
        self.stale
    }

    /// The days kept, oldest first.
    pub fn days(&self) -> impl Iterator<Item = u32> + '_ {
        self.days.keys().copied()
    }

    /// The summary of `day`; empty (no rows, zero totals) for a day not kept.
    pub fn day_summary(&self, day: u32) -> DaySummary {
        let mut summary = DaySummary {
            day,
            date: date_of(day),
            codes: Vec::new(),
            other_codes: Counts::default(),
            total: Counts::default(),
        };
        let Some(d) = self.days.get(&day) else {
            return summary;
        };
        for (&code, row) in &d.codes {
            let exact = matches!(row.distinct, Distinct::Exact(_));
            summary.total.merge(&row.counts);
            summary.codes.push(CodeSummary {
                code,
                code_hex: format!("{code:#06X}").replacen("0X", "0x", 1),
                counts: row.counts,
                distinct_devices: row.distinct.count(),
                distinct_exact: exact,
                distinct_std_error: if exact { 0.0 } else { DISTINCT_STD_ERROR },
                top_devices: row
                    .top
                    .sorted()
                    .into_iter()
                    .map(|c| TopDevice {
                        device: Eui64(c.device),
                        count: c.count,
                        error: c.error,
                    })
                    .collect(),
            });
        }
        summary.other_codes = d.other;
        summary.total.merge(&d.other);
        summary
    }

    /// Folds `other` (another worker's report) into this one.
    pub fn merge(&mut self, other: &AlertReport) {
        self.stale += other.stale;
        for (&day, theirs) in &other.days {
            let Some(d) = self.day_mut(day) else {
                self.stale += theirs.other.received
                    + theirs
                        .codes
                        .values()
                        .map(|r| r.counts.received)
                        .sum::<u64>();
                continue;
            };
            d.other.merge(&theirs.other);
            for (&code, row) in &theirs.codes {
                let full = d.codes.len() >= REPORT_CODES_PER_DAY_MAX;
                match d.codes.get_mut(&code) {
                    Some(mine) => mine.merge(row),
                    None if full => d.other.merge(&row.counts),
                    None => {
                        d.codes.insert(code, row.clone());
                    }
                }
            }
        }
    }

    /// Writes the report in the format of the module documentation.
    pub fn save_to(&self, out: &mut impl Write) -> Result<(), ReportError> {
        let mut p = Vec::new();
        p.extend_from_slice(&(self.days.len() as u16).to_le_bytes());
        for (&day, d) in &self.days {
            p.extend_from_slice(&day.to_le_bytes());
            put_counts(&mut p, &d.other);
            p.extend_from_slice(&(d.codes.len() as u16).to_le_bytes());
            for (&code, row) in &d.codes {
                p.extend_from_slice(&code.to_le_bytes());
                put_counts(&mut p, &row.counts);
                match &row.distinct {
                    Distinct::Exact(list) => {
                        p.push(0);
                        p.extend_from_slice(&(list.len() as u16).to_le_bytes());
                        for d in list {
                            p.extend_from_slice(&d.to_le_bytes());
                        }
                    }
                    Distinct::Sketch(registers) => {
                        p.push(1);
                        p.extend_from_slice(&registers[..]);
                    }
                }
                p.push(row.top.0.len() as u8);
                for c in &row.top.0 {
                    for v in [c.device, c.count, c.error] {
                        p.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&REPORT_FORMAT_VERSION.to_le_bytes());
        // Bounded by REPORT_PAYLOAD_BYTES_MAX < u32::MAX.
        header[8..12].copy_from_slice(&(p.len() as u32).to_le_bytes());
        header[12..16].copy_from_slice(&crc32c::crc32c(&p).to_le_bytes());
        out.write_all(&header)?;
        out.write_all(&p)?;
        out.flush()?;
        Ok(())
    }

    /// Reads a report written by [`save_to`](Self::save_to). Never panics; see the module
    /// documentation for what is checked.
    pub fn load_from(input: &mut impl Read) -> Result<AlertReport, ReportError> {
        let mut header = [0u8; HEADER_BYTES];
        read_exact(input, &mut header)?;
        if header[0..4] != MAGIC {
            return Err(ReportError::Magic);
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != REPORT_FORMAT_VERSION {
            return Err(ReportError::Version(version));
        }
        if header[6..8] != [0, 0] {
            return Err(ReportError::Corrupt("reserved header bytes are not zero"));
        }
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let stored = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        if len as usize > REPORT_PAYLOAD_BYTES_MAX {
            return Err(ReportError::TooLarge(u64::from(len)));
        }
        // Read through `take` so that a header claiming much and a file holding little costs
        // only what is there, not an allocation of the claimed size.
        let mut payload = Vec::new();
        input.take(u64::from(len)).read_to_end(&mut payload)?;
        if payload.len() != len as usize {
            return Err(ReportError::Truncated);
        }
        let computed = crc32c::crc32c(&payload);
        if computed != stored {
            return Err(ReportError::Checksum { stored, computed });
        }
        parse_payload(&payload)
    }
}

impl CodeDay {
    fn add(&mut self, device: u64, outcome: Outcome) {
        self.counts.add(outcome);
        self.distinct.insert(device);
        self.top.add(device);
    }

    fn merge(&mut self, other: &CodeDay) {
        self.counts.merge(&other.counts);
        self.distinct.merge(&other.distinct);
        self.top.merge(&other.top);
    }
}

fn put_counts(p: &mut Vec<u8>, c: &Counts) {
    for v in [c.received, c.delivered, c.throttled] {
        p.extend_from_slice(&v.to_le_bytes());
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<(), ReportError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ReportError::Truncated,
        _ => ReportError::Io(e),
    })
}

/// A bounds-checked little-endian reader over the payload.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReportError> {
        if self.rest.len() < n {
            return Err(ReportError::Corrupt(
                "a record runs past the end of the payload",
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// The next `N` bytes, as an array.
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReportError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, ReportError> {
        let [b] = self.array()?;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, ReportError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, ReportError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, ReportError> {
        self.array().map(u64::from_le_bytes)
    }

    fn counts(&mut self) -> Result<Counts, ReportError> {
        let c = Counts {
            received: self.u64()?,
            delivered: self.u64()?,
            throttled: self.u64()?,
        };
        if !c.consistent() {
            return Err(ReportError::Corrupt(
                "received is not delivered plus throttled",
            ));
        }
        Ok(c)
    }
}

fn parse_payload(payload: &[u8]) -> Result<AlertReport, ReportError> {
    let corrupt = ReportError::Corrupt;
    let mut c = Cursor { rest: payload };
    let days = usize::from(c.u16()?);
    if days > REPORT_DAYS_MAX {
        return Err(corrupt("more days than a report keeps"));
    }
    let mut report = AlertReport::new();
    for _ in 0..days {
        let day = c.u32()?;
        if report
            .days
            .keys()
            .next_back()
            .is_some_and(|&last| last >= day)
        {
            return Err(corrupt("days are not in increasing order"));
        }
        let other = c.counts()?;
        let codes = usize::from(c.u16()?);
        if codes > REPORT_CODES_PER_DAY_MAX {
            return Err(corrupt("more codes in a day than a report keeps"));
        }
        let mut d = Day {
            codes: BTreeMap::new(),
            other,
        };
        for _ in 0..codes {
            let code = c.u16()?;
            if d.codes.keys().next_back().is_some_and(|&last| last >= code) {
                return Err(corrupt("codes are not in increasing order"));
            }
            let counts = c.counts()?;
            let distinct = match c.u8()? {
                0 => {
                    let n = usize::from(c.u16()?);
                    if n > DISTINCT_EXACT_MAX {
                        return Err(corrupt("exact device list longer than its bound"));
                    }
                    let mut list = Vec::with_capacity(n);
                    for _ in 0..n {
                        let device = c.u64()?;
                        if list.last().is_some_and(|&last| last >= device) {
                            return Err(corrupt("device list is not sorted"));
                        }
                        list.push(device);
                    }
                    Distinct::Exact(list)
                }
                1 => {
                    let mut registers = Box::new([0u8; HLL_REGISTERS]);
                    registers.copy_from_slice(c.take(HLL_REGISTERS)?);
                    if registers.iter().any(|&r| r > HLL_RANK_MAX) {
                        return Err(corrupt("sketch register out of range"));
                    }
                    Distinct::Sketch(registers)
                }
                _ => return Err(corrupt("unknown device-set kind")),
            };
            let n = usize::from(c.u8()?);
            if n > TOP_DEVICES {
                return Err(corrupt("more top devices than counters"));
            }
            let mut top = TopDevices(Vec::with_capacity(n));
            for _ in 0..n {
                let counter = Counter {
                    device: c.u64()?,
                    count: c.u64()?,
                    error: c.u64()?,
                };
                if counter.error > counter.count || counter.count > counts.received {
                    return Err(corrupt("top-device counter exceeds its totals"));
                }
                if top.0.iter().any(|t| t.device == counter.device) {
                    return Err(corrupt("a device appears twice in the top list"));
                }
                top.0.push(counter);
            }
            d.codes.insert(
                code,
                CodeDay {
                    counts,
                    distinct,
                    top,
                },
            );
        }
        report.days.insert(day, d);
    }
    if !c.rest.is_empty() {
        return Err(corrupt("bytes after the last day"));
    }
    Ok(report)
}

#[cfg(test)]
mod date_tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(day_of_date("1970-01-01"), Some(0));
        assert_eq!(day_of_date("2026-11-23"), Some(20_780));
        assert_eq!(date_of(20_780), "2026-11-23");
        for day in (0..30_000).step_by(97) {
            assert_eq!(day_of_date(&date_of(day)), Some(day));
        }
        for bad in [
            "2026-02-31",
            "2026-13-01",
            "26-11-23",
            "2026-11",
            "x",
            "2026-11-23-1",
            "",
        ] {
            assert_eq!(day_of_date(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u32 = 19_779; // 2024-02-26, when the DCC deployed its daily alert report.

    /// The checksum in the header is CRC-32C (Castagnoli): the standard check value, which the
    /// table-driven version once in this module met too.
    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c::crc32c(b""), 0);
    }

    /// A report file written before the checksum came from the `crc32c` crate (by the
    /// table-driven CRC this module used to have): the same report writes the same bytes, and
    /// those bytes load back to it.
    #[test]
    fn report_written_by_the_earlier_crc_loads_and_is_written_the_same() {
        // Header (magic, version, length 186, CRC 0xE26BD230), then the payload.
        const GOLDEN: &str = concat!(
            "4453415201000000ba00000030d26be2",
            "0200434d00000000000000000000000000000000000000000000000000000100",
            "758f020000000000000001000000000000000100000000000000000100a09078",
            "563412db0001a09078563412db0002000000000000000000000000000000444d",
            "000000000000000000000000000000000000000000000000000001001c8f0100",
            "0000000000000100000000000000000000000000000000010007000000000000",
            "0001070000000000000001000000000000000000000000000000",
        );
        let golden: Vec<u8> = (0..GOLDEN.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&GOLDEN[i..i + 2], 16).unwrap())
            .collect();
        let mut r = AlertReport::new();
        r.record(
            DAY,
            0x8F75,
            Eui64(0x00DB_1234_5678_90A0),
            Outcome::Throttled,
        );
        r.record(
            DAY,
            0x8F75,
            Eui64(0x00DB_1234_5678_90A0),
            Outcome::Delivered,
        );
        r.record(DAY + 1, 0x8F1C, Eui64(7), Outcome::Delivered);
        let mut bytes = Vec::new();
        r.save_to(&mut bytes).unwrap();
        assert_eq!(bytes, golden);
        assert_eq!(AlertReport::load_from(&mut golden.as_slice()).unwrap(), r);
    }

    #[test]
    fn dates() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(DAY), "2024-02-26");
        assert_eq!(date_of(19_782), "2024-02-29");
        assert!(date_of(u32::MAX).len() > 10);
        assert_eq!(utc_day(1_708_905_600 * NANOS_PER_SEC), DAY);
        assert_eq!(utc_day(1_708_905_600 * NANOS_PER_SEC - 1), DAY - 1);
    }

    #[test]
    fn counts_per_day_and_code() {
        let mut r = AlertReport::new();
        r.record(DAY, 0x8F75, Eui64(1), Outcome::Delivered);
        r.record(DAY, 0x8F75, Eui64(1), Outcome::Throttled);
        r.record(DAY, 0x8F1C, Eui64(2), Outcome::Delivered);
        r.record(DAY + 1, 0x8F75, Eui64(1), Outcome::Delivered);
        let s = r.day_summary(DAY);
        assert_eq!(s.codes.len(), 2);
        assert_eq!(s.codes[0].code_hex, "0x8F1C");
        let m = &s.codes[1];
        assert_eq!(
            (m.counts.received, m.counts.delivered, m.counts.throttled),
            (2, 1, 1)
        );
        assert_eq!((m.distinct_devices, m.distinct_exact), (1, true));
        assert_eq!(s.total.received, 3);
        assert_eq!(r.day_summary(DAY + 1).total.received, 1);
        assert_eq!(r.day_summary(DAY + 5).codes.len(), 0);
    }

    #[test]
    fn keeps_at_most_31_days() {
        let mut r = AlertReport::new();
        for day in 0..40 {
            r.record(DAY + day, 1, Eui64(1), Outcome::Delivered);
        }
        assert_eq!(r.days().count(), REPORT_DAYS_MAX);
        assert_eq!(r.days().next(), Some(DAY + 9));
        r.record(DAY, 1, Eui64(1), Outcome::Delivered);
        assert_eq!(r.stale(), 1);
        assert_eq!(r.days().next(), Some(DAY + 9));
    }

    #[test]
    fn codes_beyond_the_bound_go_to_other() {
        let mut r = AlertReport::new();
        for code in 0..=REPORT_CODES_PER_DAY_MAX as u16 {
            r.record(DAY, code, Eui64(1), Outcome::Throttled);
        }
        let s = r.day_summary(DAY);
        assert_eq!(s.codes.len(), REPORT_CODES_PER_DAY_MAX);
        assert_eq!(s.other_codes.throttled, 1);
        assert_eq!(s.total.received, REPORT_CODES_PER_DAY_MAX as u64 + 1);
    }

    #[test]
    fn distinct_is_exact_then_estimated() {
        let mut d = Distinct::default();
        for i in 0..DISTINCT_EXACT_MAX as u64 {
            d.insert(i * 7919);
            d.insert(i * 7919);
        }
        assert_eq!(d.count(), DISTINCT_EXACT_MAX as u64);
        assert!(matches!(d, Distinct::Exact(_)));
        d.insert(u64::MAX);
        assert!(matches!(d, Distinct::Sketch(_)));
        let n = d.count() as f64;
        assert!((n - 257.0).abs() / 257.0 < 0.05, "{n}");
        let mut empty = Distinct::Sketch(Box::new([0; HLL_REGISTERS]));
        assert_eq!(empty.count(), 0);
        empty.insert(5);
        assert_eq!(empty.count(), 1);
    }

    #[test]
    fn hll_error_within_three_standard_errors() {
        // One deterministic stream each; the estimator's standard error is 1.6 %.
        for (n, seed) in [(1_000u64, 1u64), (20_000, 2), (200_000, 3)] {
            let mut d = Distinct::default();
            for i in 0..n {
                d.insert(mix(i ^ (seed << 40)));
            }
            let err = (d.count() as f64 - n as f64) / n as f64;
            assert!(err.abs() < 3.0 * DISTINCT_STD_ERROR, "n {n}: error {err}");
        }
    }

    #[test]
    fn space_saving_finds_heavy_devices_with_bounded_error() {
        let mut r = AlertReport::new();
        // 5 devices storm (1,000 alerts each) among 10,000 devices sending one each: N = 15,000,
        // N/k = 937, so each stormer is over N/k and must be listed.
        let mut n = 0u64;
        for round in 0..100u64 {
            for heavy in 0..5u64 {
                for _ in 0..10 {
                    r.record(DAY, 0x8F75, Eui64(1_000_000 + heavy), Outcome::Throttled);
                    n += 1;
                }
            }
            for light in 0..100u64 {
                r.record(DAY, 0x8F75, Eui64(round * 100 + light), Outcome::Delivered);
                n += 1;
            }
        }
        let s = r.day_summary(DAY);
        let row = &s.codes[0];
        assert_eq!(row.counts.received, n);
        let bound = n / TOP_DEVICES as u64;
        for heavy in 0..5u64 {
            let t = row
                .top_devices
                .iter()
                .find(|t| t.device == Eui64(1_000_000 + heavy))
                .expect("a device over N/k is listed");
            assert!(t.count >= 1_000 && t.count - t.error <= 1_000, "{t:?}");
            assert!(t.error <= bound);
        }
        assert!(row.top_devices.iter().all(|t| t.error <= bound));
    }

    #[test]
    fn save_load_round_trip() {
        let mut r = AlertReport::new();
        for i in 0..2_000u64 {
            let outcome = if i % 3 == 0 {
                Outcome::Throttled
            } else {
                Outcome::Delivered
            };
            r.record(DAY, 0x8F75, Eui64(i % 700), outcome);
            r.record(DAY + 1, 0x8F1C, Eui64(i % 9), outcome);
        }
        let mut bytes = Vec::new();
        r.save_to(&mut bytes).unwrap();
        let back = AlertReport::load_from(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.day_summary(DAY), r.day_summary(DAY));
    }

    #[test]
    fn corrupt_and_truncated_files_are_errors() {
        let mut r = AlertReport::new();
        for i in 0..500u64 {
            r.record(DAY, 0x8F75, Eui64(i), Outcome::Delivered);
        }
        let mut bytes = Vec::new();
        r.save_to(&mut bytes).unwrap();
        for cut in [0, 3, 15, 16, 100, bytes.len() - 1] {
            let err = AlertReport::load_from(&mut &bytes[..cut]).unwrap_err();
            assert!(matches!(err, ReportError::Truncated), "cut {cut}: {err}");
        }
        // Every single flipped bit is caught.
        for at in (0..bytes.len()).step_by(37) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                AlertReport::load_from(&mut bad.as_slice()).is_err(),
                "flip at {at}"
            );
        }
        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            AlertReport::load_from(&mut bad.as_slice()),
            Err(ReportError::TooLarge(_))
        ));
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert!(matches!(
            AlertReport::load_from(&mut bad.as_slice()),
            Err(ReportError::Version(9))
        ));
    }

    #[test]
    fn merge_adds_and_unites() {
        let (mut a, mut b) = (AlertReport::new(), AlertReport::new());
        for i in 0..300u64 {
            a.record(DAY, 1, Eui64(i), Outcome::Delivered);
            b.record(DAY, 1, Eui64(i + 150), Outcome::Throttled);
        }
        b.record(DAY, 2, Eui64(9), Outcome::Delivered);
        a.merge(&b);
        let s = a.day_summary(DAY);
        assert_eq!(s.codes[0].counts.received, 600);
        assert_eq!(s.codes[0].counts.throttled, 300);
        let n = s.codes[0].distinct_devices as f64;
        assert!((n - 450.0).abs() / 450.0 < 0.05, "{n}");
        assert_eq!(s.codes[1].distinct_devices, 1);
    }

    #[test]
    fn table_and_serde_field_names() {
        let mut r = AlertReport::new();
        for _ in 0..5 {
            r.record(
                DAY,
                0x8F75,
                Eui64(0x00DB_1234_5678_90A0),
                Outcome::Throttled,
            );
        }
        let s = r.day_summary(DAY);
        let table = s.to_string();
        assert!(table.contains("2024-02-26"), "{table}");
        assert!(table.contains("0x8F75"), "{table}");
        assert!(table.contains("00-DB-12-34-56-78-90-A0 (5)"), "{table}");
        // Any serde format will do to check the shape; TOML is a dependency already.
        let text = toml::to_string(&s).unwrap();
        for field in [
            "date = \"2024-02-26\"",
            "code_hex = \"0x8F75\"",
            "received = 5",
            "throttled = 5",
            "distinct_devices = 1",
            "device = \"00-DB-12-34-56-78-90-A0\"",
        ] {
            assert!(text.contains(field), "{field} in\n{text}");
        }
    }
}

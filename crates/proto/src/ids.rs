//! Domain identifiers shared by the wire codec, the config file and the classifier.
//!
//! * [`Eui64`]: a device's or Service User's EUI-64, written `90-B3-D5-1F-30-01-00-00`.
//! * [`Srv`]: a Service Reference Variant (`2.2`, `4.1.1`), packed as on the wire.
//! * [`Mode`]: a request's mode of operation.
//! * [`Level`]: a priority level, 1 the most urgent.
//!
//! Every parser here returns a typed error; none panics on any input.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::fmt;
use std::str::FromStr;

/// Why a textual identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Not eight two-digit hex octets separated by `-`.
    #[error("malformed EUI-64 {0:?}: expected eight hex octets like 90-B3-D5-1F-30-01-00-00")]
    Eui64(String),
    /// Not `major.minor` or `major.minor.patch` with each part 0–255.
    #[error("malformed SRV {0:?}: expected major.minor[.patch] with parts 0-255, like 4.1.1")]
    Srv(String),
    /// Not one of the three modes.
    #[error("unknown mode {0:?}: expected on-demand, future-dated or dcc-scheduled")]
    Mode(String),
}

/// An EUI-64, held as the u64 whose big-endian bytes are its octets in written order.
///
/// ```
/// use dsplane_proto::ids::Eui64;
/// let id: Eui64 = "90-B3-D5-1F-30-01-00-00".parse().unwrap();
/// assert_eq!(id.0, 0x90B3_D51F_3001_0000);
/// assert_eq!(id.to_string(), "90-B3-D5-1F-30-01-00-00");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Eui64(pub u64);

impl FromStr for Eui64 {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdError::Eui64(s.to_owned());
        let bytes = s.as_bytes();
        // 8 octets of 2 digits and 7 separators.
        if bytes.len() != 23 {
            return Err(bad());
        }
        let mut value: u64 = 0;
        for (i, chunk) in bytes.chunks(3).enumerate() {
            if i < 7 && chunk.get(2) != Some(&b'-') {
                return Err(bad());
            }
            let hi = chunk.first().copied().and_then(hex_digit).ok_or_else(bad)?;
            let lo = chunk.get(1).copied().and_then(hex_digit).ok_or_else(bad)?;
            value = (value << 8) | u64::from(hi << 4 | lo);
        }
        Ok(Eui64(value))
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Eui64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0.to_be_bytes();
        write!(
            f,
            "{:02X}-{:02X}-{:02X}-{:02X}-{:02X}-{:02X}-{:02X}-{:02X}",
            o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]
        )
    }
}

impl fmt::Debug for Eui64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Eui64({self})")
    }
}

/// A Service Reference Variant packed as `major<<16 | minor<<8 | patch` (PROTOCOL.md).
///
/// ```
/// use dsplane_proto::ids::Srv;
/// assert_eq!("2.2".parse::<Srv>().unwrap(), Srv(0x0002_0200));
/// assert_eq!("4.1.1".parse::<Srv>().unwrap().to_string(), "4.1.1");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Srv(pub u32);

impl Srv {
    /// Packs the three parts.
    pub const fn new(major: u8, minor: u8, patch: u8) -> Self {
        Srv((major as u32) << 16 | (minor as u32) << 8 | patch as u32)
    }

    /// The major part: `7` for `7.1`.
    pub const fn major(self) -> u8 {
        (self.0 >> 16) as u8
    }

    /// The minor part.
    pub const fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// The patch part (0 when written with two parts).
    pub const fn patch(self) -> u8 {
        self.0 as u8
    }
}

impl FromStr for Srv {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdError::Srv(s.to_owned());
        let mut parts = [0u8; 3];
        let mut count = 0;
        for part in s.split('.') {
            if count == 3 || part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            *parts.get_mut(count).ok_or_else(bad)? = part.parse::<u8>().map_err(|_| bad())?;
            count += 1;
        }
        if count < 2 {
            return Err(bad());
        }
        Ok(Srv::new(parts[0], parts[1], parts[2]))
    }
}

impl fmt::Display for Srv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.patch() == 0 {
            write!(f, "{}.{}", self.major(), self.minor())
        } else {
            write!(f, "{}.{}.{}", self.major(), self.minor(), self.patch())
        }
    }
}

impl fmt::Debug for Srv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Srv({self})")
    }
}

/// A request's mode of operation (the header's `mode` byte).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum Mode {
    /// Sent now, answered now.
    OnDemand = 0,
    /// Executed at a future date on the device.
    FutureDated = 1,
    /// Scheduled by the DCC; its responses are routine by default.
    DccScheduled = 2,
}

impl Mode {
    /// The mode for a header byte, or `None` for values PROTOCOL.md does not define.
    pub const fn from_wire(byte: u8) -> Option<Mode> {
        match byte {
            0 => Some(Mode::OnDemand),
            1 => Some(Mode::FutureDated),
            2 => Some(Mode::DccScheduled),
            _ => None,
        }
    }

    /// The name used in the config file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::OnDemand => "on-demand",
            Mode::FutureDated => "future-dated",
            Mode::DccScheduled => "dcc-scheduled",
        }
    }
}

impl FromStr for Mode {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on-demand" => Ok(Mode::OnDemand),
            "future-dated" => Ok(Mode::FutureDated),
            "dcc-scheduled" => Ok(Mode::DccScheduled),
            _ => Err(IdError::Mode(s.to_owned())),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Most priority levels a configuration may have (ENGINE.md §1).
pub const LEVELS_MAX: u8 = 16;
/// Fewest priority levels a configuration may have.
pub const LEVELS_MIN: u8 = 2;

/// A priority level: 1 is the most urgent, up to the configured `levels` (at most [`LEVELS_MAX`]).
///
/// The level is given by dsplane when a message enters and never changes afterwards.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Level(u8);

impl Level {
    /// The most urgent level.
    pub const URGENT: Level = Level(1);

    /// A level in `1..=LEVELS_MAX`, or `None`.
    pub const fn new(level: u8) -> Option<Level> {
        if level >= 1 && level <= LEVELS_MAX {
            Some(Level(level))
        } else {
            None
        }
    }

    /// The level as written in config and on the wire (1-based).
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The 0-based index used for per-level arrays (level 1 is index 0).
    pub const fn index(self) -> usize {
        (self.0 - 1) as usize
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A GBCS alert code, for display: always `0x` and four upper-case hex digits, as the GBCS
/// tables write them (`0x8F75`), in logs, reports and tools alike.
///
/// ```
/// assert_eq!(dsplane_proto::ids::AlertCode(0x8F75).to_string(), "0x8F75");
/// assert_eq!(dsplane_proto::ids::AlertCode(0x1A).to_string(), "0x001A");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct AlertCode(pub u16);

impl fmt::Display for AlertCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:04X}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eui64_parses_protocol_example() {
        let id: Eui64 = "00-DB-12-34-56-78-90-A0".parse().unwrap();
        assert_eq!(id, Eui64(0x00DB_1234_5678_90A0));
        assert_eq!(id.to_string(), "00-DB-12-34-56-78-90-A0");
        let lower: Eui64 = "90-b3-d5-1f-30-01-00-00".parse().unwrap();
        assert_eq!(lower, Eui64(0x90B3_D51F_3001_0000));
    }

    #[test]
    fn eui64_rejects_malformed() {
        for bad in [
            "",
            "90-B3-D5-1F-30-01-00",
            "90-B3-D5-1F-30-01-00-00-00",
            "90:B3:D5:1F:30:01:00:00",
            "90-B3-D5-1F-30-01-00-0G",
            "90-B3-D5-1F-30-01-00-+0",
            "9-0B3-D5-1F-30-01-00-00",
            "90-B3-D5-1F-30-01-00-€",
        ] {
            assert!(
                matches!(bad.parse::<Eui64>(), Err(IdError::Eui64(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn srv_packs_like_protocol() {
        assert_eq!("2.2".parse::<Srv>().unwrap().0, 0x0002_0200);
        assert_eq!("4.1.1".parse::<Srv>().unwrap().0, 0x0004_0101);
        assert_eq!("8.7.1".parse::<Srv>().unwrap().0, 0x0008_0701);
        assert_eq!(Srv(0x0008_0701).to_string(), "8.7.1");
        assert_eq!(Srv(0x0002_0200).to_string(), "2.2");
    }

    #[test]
    fn srv_rejects_malformed() {
        for bad in [
            "", "2", "2.", ".2", "2.2.2.2", "256.1", "a.b", "2.-1", "2.+1", "2 .2",
        ] {
            assert!(
                matches!(bad.parse::<Srv>(), Err(IdError::Srv(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mode_round_trips() {
        for m in [Mode::OnDemand, Mode::FutureDated, Mode::DccScheduled] {
            assert_eq!(m.as_str().parse::<Mode>().unwrap(), m);
            assert_eq!(Mode::from_wire(m as u8), Some(m));
        }
        assert_eq!(Mode::from_wire(3), None);
        assert!("scheduled".parse::<Mode>().is_err());
    }

    #[test]
    fn level_bounds() {
        assert_eq!(Level::new(0), None);
        assert_eq!(Level::new(1), Some(Level::URGENT));
        assert_eq!(Level::new(16).map(Level::index), Some(15));
        assert_eq!(Level::new(17), None);
    }
}

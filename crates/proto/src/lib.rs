//! dsplane-proto: what a Service User or a CSP needs to talk to dsplane, and nothing else.
//!
//! * [`ids`]: the domain identifiers that go on the wire (EUI-64, SRV, mode, level);
//! * [`wire`]: the 64-byte frame header, frames, and the streaming decoder (PROTOCOL.md);
//! * [`client`]: a small blocking client (connect, HELLO, send, receive).
//!
//! Its dependencies are `bytes` and `thiserror` alone, as quinn-proto's are free of any
//! networking crate: a client depends on this crate, not on the dataplane.

#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

pub mod chunk;
pub mod client;
pub mod ids;
pub mod wire;

/// Nanoseconds since the Unix epoch, now: how `created_ns` is stamped. The one wall-clock read
/// of dsplane: the engine's workers read it once per turn and pass it to the core (which reads
/// no clock), and the client, the load generator and the commands use it too.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

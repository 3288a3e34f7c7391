//! The checksum of log records: CRC-32C (Castagnoli), the same function as the `crc32c` crate,
//! faster on the records the log mostly holds.
//!
//! A record of a frame with a 128-byte payload is 232 bytes. The `crc32c` crate runs its
//! three-way parallel loop only on blocks of 768 bytes or more, so such a record is one chain
//! of 29 dependent `crc32` instructions, each waiting for the last (3 cycles of latency, one
//! issued per cycle). Here a record of [`BLOCK`] bytes or more is taken in blocks of three
//! [`LANE`]-byte lanes, checksummed side by side and joined with a table: the CRC register
//! after a lane is a linear function of the register before it, so "then 64 zero bytes" is
//! four table lookups ([`shift`]). That is the crate's own technique at a smaller block, for
//! lengths it leaves to one chain; inputs of [`CRATE_PARALLEL_FROM`] bytes and up, where its
//! loop runs, and short ones go to the crate. The result is the same number either way (tested
//! against the crate on every length up to 2,100 bytes), so the log's format is unchanged.

#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

/// Bytes of one lane: each of the three streams of a block takes this many.
pub const LANE: usize = 64;
/// Bytes of one block of three lanes.
pub const BLOCK: usize = 3 * LANE;
/// From this length on the `crc32c` crate runs its own three-way loop (blocks of 3 × 256 bytes).
pub const CRATE_PARALLEL_FROM: usize = 768;

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// The CRC register after `bytes` zero bytes, from register `x` (one bit at a time).
const fn zeros(mut x: u32, bytes: usize) -> u32 {
    let mut i = 0;
    while i < bytes * 8 {
        x = if x & 1 == 1 { (x >> 1) ^ POLY } else { x >> 1 };
        i += 1;
    }
    x
}

/// `SHIFT[k][b]`: the register after [`LANE`] zero bytes from register `b << 8k`. The map is
/// linear, so it is built from the 32 single-bit registers. Evaluated at compile time, where an
/// index out of range is a build error, not a panic.
#[allow(clippy::indexing_slicing)]
static SHIFT: [[u32; 256]; 4] = {
    let mut bits = [0u32; 32];
    let mut i = 0;
    while i < 32 {
        bits[i] = zeros(1 << i, LANE);
        i += 1;
    }
    let mut table = [[0u32; 256]; 4];
    let mut k = 0;
    while k < 4 {
        let mut b = 0;
        while b < 256 {
            let mut v = 0;
            let mut j = 0;
            while j < 8 {
                if b & (1 << j) != 0 {
                    v ^= bits[8 * k + j];
                }
                j += 1;
            }
            table[k][b] = v;
            b += 1;
        }
        k += 1;
    }
    table
};

/// The CRC register after [`LANE`] zero bytes, from register `x`.
#[inline(always)]
#[allow(clippy::indexing_slicing)] // a u8 indexes a table of 256: never out of range
fn shift(x: u32) -> u32 {
    let [b0, b1, b2, b3] = x.to_le_bytes();
    let [t0, t1, t2, t3] = &SHIFT;
    t0[usize::from(b0)] ^ t1[usize::from(b1)] ^ t2[usize::from(b2)] ^ t3[usize::from(b3)]
}

/// CRC-32C of `data`: exactly `crc32c::crc32c(data)`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if (BLOCK..CRATE_PARALLEL_FROM).contains(&data.len())
        && std::arch::is_x86_feature_detected!("sse4.2")
    {
        // SAFETY: the CPU has SSE 4.2, checked just above.
        return unsafe { crc32c_lanes(data) };
    }
    crc32c::crc32c(data)
}

/// Three lanes at a time, then the rest in one chain.
///
/// # Safety
///
/// The CPU must have SSE 4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_lanes(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
    let mut crc = u64::from(u32::MAX);
    let mut blocks = data.chunks_exact(BLOCK);
    for block in &mut blocks {
        let (a, rest) = block.split_at(LANE);
        let (b, c) = rest.split_at(LANE);
        let (mut ca, mut cb, mut cc) = (crc, 0u64, 0u64);
        for ((wa, wb), wc) in a
            .chunks_exact(8)
            .zip(b.chunks_exact(8))
            .zip(c.chunks_exact(8))
        {
            ca = _mm_crc32_u64(ca, word(wa));
            cb = _mm_crc32_u64(cb, word(wb));
            cc = _mm_crc32_u64(cc, word(wc));
        }
        // The registers are 32 bits in 64-bit lanes (`crc32` zero-extends).
        crc = u64::from(shift(shift(ca as u32) ^ cb as u32) ^ cc as u32);
    }
    let mut words = blocks.remainder().chunks_exact(8);
    for w in &mut words {
        crc = _mm_crc32_u64(crc, word(w));
    }
    let mut crc = crc as u32;
    for &byte in words.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_value_of_crc32c() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn the_same_as_the_crate_at_every_length_and_alignment() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..2_200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for start in 0..8 {
            for len in 0..2_100 {
                let s = &data[start..start + len];
                assert_eq!(crc32c(s), crc32c::crc32c(s), "start {start}, len {len}");
            }
        }
        // Every bit matters, in each lane of a block and in the tail.
        let base = &data[..BLOCK + 40];
        let sum = crc32c(base);
        for at in [
            0,
            LANE - 1,
            LANE,
            2 * LANE + 7,
            BLOCK - 1,
            BLOCK,
            BLOCK + 39,
        ] {
            let mut flipped = base.to_vec();
            flipped[at] ^= 0x10;
            assert_ne!(crc32c(&flipped), sum, "a flipped bit at {at}");
        }
    }

    #[test]
    fn the_shift_table_is_the_register_after_a_lane_of_zeros() {
        for x in [1u32, 0x8000_0000, 0xDEAD_BEEF, u32::MAX] {
            assert_eq!(shift(x), zeros(x, LANE));
        }
    }
}

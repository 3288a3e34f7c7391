//! Soak mode: run a scenario for a long, bounded time while sampling this process's resident
//! memory (the engine runs in-process with `--spawn-engine`), and fail if memory keeps growing.
//!
//! Memory is judged after a warm-up (the first quarter of the run, at least 10 s), when buffers,
//! histograms and the NMS have reached their working size: the median of the last tenth of the
//! samples against the median of the first tenth after the warm-up. Medians, not single samples,
//! so the allocator's occasional arena growth does not decide the verdict. A fitted slope (bytes
//! per minute over the same span) is reported beside it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Growth allowed between the start and the end of the measured span.
pub const SOAK_GROWTH_BYTES_MAX: u64 = 32 << 20;

/// Resident memory of this process, bytes (`VmRSS` from `/proc/self/status`), if readable.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs `f` while a thread samples resident memory every `every`; returns `f`'s result and the
/// samples as (seconds since the start, bytes).
pub fn sample_while<T>(every: Duration, f: impl FnOnce() -> T) -> (T, Vec<(f64, u64)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let start = Instant::now();
    let sampler = std::thread::spawn(move || {
        let mut samples = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            if let Some(rss) = resident_bytes() {
                samples.push((start.elapsed().as_secs_f64(), rss));
            }
            std::thread::sleep(every);
        }
        samples
    });
    let out = f();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap_or_default();
    (out, samples)
}

/// The verdict on a soak's memory.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SoakVerdict {
    /// Samples taken.
    pub samples: usize,
    /// Median resident bytes just after the warm-up.
    pub start_bytes: u64,
    /// Median resident bytes at the end.
    pub end_bytes: u64,
    /// Peak resident bytes over the whole run.
    pub peak_bytes: u64,
    /// Least-squares slope over the measured span, bytes per minute.
    pub slope_bytes_per_min: f64,
    /// Whether the growth stayed within [`SOAK_GROWTH_BYTES_MAX`].
    pub passed: bool,
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Judges the samples of a run: see the module documentation.
pub fn judge(samples: &[(f64, u64)], growth_max: u64) -> SoakVerdict {
    let peak_bytes = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let total = samples.last().map_or(0.0, |s| s.0);
    let warm = (total / 4.0).max(10.0);
    let span: Vec<(f64, u64)> = samples.iter().copied().filter(|s| s.0 >= warm).collect();
    if span.len() < 10 {
        return SoakVerdict {
            samples: samples.len(),
            start_bytes: 0,
            end_bytes: 0,
            peak_bytes,
            slope_bytes_per_min: 0.0,
            passed: false,
        };
    }
    let tenth = (span.len() / 10).max(1);
    let mut head: Vec<u64> = span.iter().take(tenth).map(|s| s.1).collect();
    let mut tail: Vec<u64> = span.iter().rev().take(tenth).map(|s| s.1).collect();
    let start_bytes = median(&mut head);
    let end_bytes = median(&mut tail);
    let n = span.len() as f64;
    let mean_t = span.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_b = span.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let cov: f64 = span
        .iter()
        .map(|s| (s.0 - mean_t) * (s.1 as f64 - mean_b))
        .sum();
    let var: f64 = span.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
    let slope_bytes_per_min = if var > 0.0 { cov / var * 60.0 } else { 0.0 };
    SoakVerdict {
        samples: samples.len(),
        start_bytes,
        end_bytes,
        peak_bytes,
        slope_bytes_per_min,
        passed: end_bytes.saturating_sub(start_bytes) <= growth_max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(f: impl Fn(f64) -> u64) -> Vec<(f64, u64)> {
        (0..600).map(|i| (i as f64, f(i as f64))).collect()
    }

    #[test]
    fn flat_memory_passes_and_a_leak_fails() {
        // Warm-up growth, then flat with noise: passes.
        let flat = judge(
            &series(|t| {
                if t < 60.0 {
                    (t as u64) << 20
                } else {
                    (60 << 20) + (((t as u64 * 7919) % 5) << 20)
                }
            }),
            SOAK_GROWTH_BYTES_MAX,
        );
        assert!(flat.passed, "{flat:?}");
        assert!(flat.slope_bytes_per_min.abs() < 1e6);
        // A leak of 100 KiB/s: 45 MiB over the measured span.
        let leak = judge(
            &series(|t| (100 << 20) + (t * 102_400.0) as u64),
            SOAK_GROWTH_BYTES_MAX,
        );
        assert!(!leak.passed, "{leak:?}");
        assert!((leak.slope_bytes_per_min - 6_144_000.0).abs() < 1e3);
        // Too short to judge: fails rather than passing by default.
        assert!(!judge(&[(0.0, 1), (1.0, 1)], SOAK_GROWTH_BYTES_MAX).passed);
    }

    #[test]
    fn resident_memory_is_readable_here() {
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}

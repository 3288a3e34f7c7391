//! The alert report's distinct-device estimate, measured: relative error (bias and RMS) of the
//! HyperLogLog sketch over many runs at several cardinalities, and the exact range below 256.
//!
//! `cargo test --release --test report -- --nocapture` prints the table quoted in
//! docs/storm.md; debug builds run fewer and smaller cases.

use dsplane_core::ids::Eui64;
use dsplane_core::report::{AlertReport, Outcome, DISTINCT_STD_ERROR};

#[test]
fn distinct_device_error_is_as_stated() {
    let (sizes, runs): (&[u64], u64) = if cfg!(debug_assertions) {
        (&[300, 2_000, 20_000], 8)
    } else {
        (&[300, 1_000, 5_000, 20_000, 100_000, 1_000_000], 32)
    };
    for &n in sizes {
        let mut errors = Vec::new();
        for run in 0..runs {
            // A fresh report per run; device ids sequential from a per-run base, like a batch
            // of meters from one manufacturer.
            let mut report = AlertReport::new();
            for i in 0..n {
                report.record(1, 0x8F75, Eui64((run << 40) + i), Outcome::Delivered);
            }
            let row = &report.day_summary(1).codes[0];
            assert!(!row.distinct_exact);
            errors.push((row.distinct_devices as f64 - n as f64) / n as f64);
        }
        let bias = errors.iter().sum::<f64>() / errors.len() as f64;
        let rms = (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64).sqrt();
        let worst = errors.iter().fold(0.0f64, |w, e| w.max(e.abs()));
        eprintln!(
            "n = {n:>9}: bias {:+.2} %, RMS error {:.2} %, worst {:.2} % over {runs} runs",
            bias * 100.0,
            rms * 100.0,
            worst * 100.0
        );
        // The stated standard error is 1.6 %; allow for the sampling noise of the RMS itself.
        assert!(rms < 1.6 * DISTINCT_STD_ERROR, "n {n}: RMS {rms}");
        assert!(bias.abs() < DISTINCT_STD_ERROR, "n {n}: bias {bias}");
        assert!(worst < 4.0 * DISTINCT_STD_ERROR, "n {n}: worst {worst}");
    }
}

#[test]
fn distinct_is_exact_up_to_256_devices() {
    let mut report = AlertReport::new();
    for n in 1..=256u64 {
        report.record(1, 0x8F75, Eui64(n * 1_000_003), Outcome::Throttled);
        report.record(1, 0x8F75, Eui64(n * 1_000_003), Outcome::Throttled);
        let row = &report.day_summary(1).codes[0];
        assert_eq!((row.distinct_devices, row.distinct_exact), (n, true));
        assert_eq!(row.distinct_std_error, 0.0);
    }
}

/// A file written, damaged at every byte in turn, and read back: each damage is an error, none
/// a panic; a clean copy reads back equal.
#[test]
fn every_damaged_byte_is_refused() {
    let mut report = AlertReport::new();
    for i in 0..400u64 {
        let outcome = if i % 5 == 0 {
            Outcome::Delivered
        } else {
            Outcome::Throttled
        };
        report.record(19_779, 0x8F75, Eui64(i % 300), outcome);
        report.record(19_780, 0x8F1C, Eui64(i % 3), outcome);
    }
    let mut bytes = Vec::new();
    report.save_to(&mut bytes).unwrap();
    assert_eq!(
        AlertReport::load_from(&mut bytes.as_slice()).unwrap(),
        report
    );
    for at in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] = bad[at].wrapping_add(1);
        assert!(
            AlertReport::load_from(&mut bad.as_slice()).is_err(),
            "byte {at}"
        );
    }
    for cut in 0..bytes.len() {
        assert!(
            AlertReport::load_from(&mut &bytes[..cut]).is_err(),
            "cut {cut}"
        );
    }
}

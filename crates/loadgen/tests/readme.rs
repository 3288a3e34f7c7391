//! The README's load-generator commands, run as written through the built `dsplane-loadgen`.
//!
//! The arguments are read from the README itself (the text after `--` on the line that runs the
//! scenario, up to its comment), so the test and the documentation cannot drift apart.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dsplane-loadgen");

/// The arguments the README gives `dsplane-loadgen` for `scenario`, from its line
/// `cargo run --release -p dsplane-loadgen -- <scenario> …  # comment`.
fn readme_args(scenario: &str) -> Vec<String> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let prefix = "cargo run --release -p dsplane-loadgen -- ";
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| {
            l.strip_prefix(prefix).is_some_and(|rest| {
                rest.split_whitespace().next() == Some(scenario)
                    && rest.split_whitespace().nth(1) == Some("--spawn-engine")
            })
        })
        .unwrap_or_else(|| panic!("README.md has no `{prefix}{scenario} --spawn-engine` line"));
    let rest = &line[prefix.len()..];
    let command = rest.split('#').next().unwrap_or(rest);
    command.split_whitespace().map(str::to_owned).collect()
}

/// A figure of the checks line: `lost 0, … throttled 8940` → `figure(out, "throttled") == 8940`.
fn figure(stdout: &str, name: &str) -> u64 {
    let checks = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("checks: "))
        .unwrap_or_else(|| panic!("no checks line in\n{stdout}"));
    let at = checks
        .find(&format!("{name} "))
        .unwrap_or_else(|| panic!("no {name} in {checks}"));
    checks[at + name.len() + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// ENGINE.md §4 and issue 14 item 2: the storm scenario as the README gives it passes, the
/// alerts its STORM_SUMMARY frames stand for are reported as throttled, and none is lost.
#[test]
fn the_readme_storm_command_passes_with_throttled_alerts_not_lost() {
    let args = readme_args("storm");
    assert_eq!(
        args,
        ["storm", "--spawn-engine"],
        "the README's storm command"
    );
    // The report is written where the command runs, as it would be for a user.
    let dir = std::env::temp_dir().join(format!("dsplane-loadgen-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(BIN)
        .args(&args)
        .current_dir(&dir)
        .env("DSPLANE_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status.code()
    );
    assert!(stdout.contains("checks PASSED"), "{stdout}");
    assert_eq!(figure(&stdout, "lost"), 0, "{stdout}");
    // 3 devices flood 0x8F75 for 6 s at hundreds of alerts/s each: thousands are throttled,
    // and every one of them is accounted for by a summary.
    assert!(figure(&stdout, "throttled") > 1_000, "{stdout}");
    assert!(!stdout.contains("undelivered"), "{stdout}");
    assert!(dir.join("dsplane-loadgen-report.html").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

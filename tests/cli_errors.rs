//! What the `dsplane` command says when something is wrong: `client` errors that name the
//! address and what to check, `client csp` failing when every frame is refused, and
//! `check-config` checking that `data_dir` can be created and written.

use std::process::Command;

use dsplane::engine::Engine;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_dsplane");

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dsplane-clierr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Text no message for a person should carry: Rust's debug output.
fn assert_no_debug_text(text: &str) {
    for debug in ["Some(", "None", "Os {", "kind:", "code:", "Err(", "Ok("] {
        assert!(!text.contains(debug), "debug text {debug:?} in: {text}");
    }
}

#[test]
fn client_names_the_address_and_what_to_check_when_nothing_listens() {
    let addr = common::closed_port().to_string();
    for role in ["su", "csp"] {
        let out = Command::new(BIN)
            .args(["client", role, "--addr", &addr])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{role}: {err}");
        assert!(err.contains(&addr), "{role}: {err}");
        assert!(err.contains("Is dsplane running?"), "{role}: {err}");
        assert!(err.contains("Is the port right"), "{role}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert_no_debug_text(&err);
    }
}

fn engine(name: &str) -> Engine {
    common::small_engine(&temp_dir(name).join("data"))
}

#[test]
fn a_refused_hello_says_what_to_check_without_debug_text() {
    let engine = engine("hello");
    let su = engine.su_addr().to_string();
    let out = Command::new(BIN)
        .args(["client", "su", "--addr", &su, "--token", "wrong"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&su), "{err}");
    assert!(err.contains("unauthorised"), "{err}");
    assert!(err.contains("token"), "{err}");
    assert_no_debug_text(&err);
    engine.shutdown();
    engine.join();
}

#[test]
fn client_csp_fails_when_every_frame_is_refused() {
    let engine = engine("refused");
    let csp = engine.csp_addr().to_string();
    // No such Service User: every frame gets NACK 4.
    let out = Command::new(BIN)
        .args(["client", "csp", "--addr", &csp, "--token", "csp-token"])
        .args(["--su", "00-00-00-00-00-00-00-09", "--count", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("0 accepted, 5 refused"), "{err}");
    assert!(err.contains("4 (unknown_destination)"), "{err}");
    assert_no_debug_text(&err);
    // Frames that are taken: success.
    let out = Command::new(BIN)
        .args(["client", "csp", "--addr", &csp, "--token", "csp-token"])
        .args(["--count", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("5 accepted, 0 refused"), "{err}");
    engine.shutdown();
    engine.join();
}

#[test]
fn check_config_checks_that_data_dir_can_be_created_and_written() {
    let dir = temp_dir("datadir");
    // A data_dir under a regular file cannot be created, whoever runs the test (root too).
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let bad_dir = blocker.join("data");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        format!("[engine]\ndata_dir = \"{}\"\n", bad_dir.display()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("data_dir"), "{err}");
    assert!(err.contains(&bad_dir.display().to_string()), "{err}");
    assert!(
        out.stdout.is_empty(),
        "no effective config for a config that cannot run"
    );
    assert_no_debug_text(&err);

    // A data_dir that does not exist yet is created, as `run` would, and left empty.
    let new_dir = dir.join("new").join("data");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!("[engine]\ndata_dir = \"{}\"\n", new_dir.display()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(new_dir.is_dir());
    assert_eq!(
        std::fs::read_dir(&new_dir).unwrap().count(),
        0,
        "probe removed"
    );
}

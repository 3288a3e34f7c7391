//! What `dsplane check-config` prints: the effective configuration with alert codes in hex, as
//! the GBCS documents and the config file write them, that parses back to the same
//! configuration; and warnings on stderr for an admin interface without a token and for the
//! demo tokens of `crates/core/src/default.toml`.

use std::path::PathBuf;
use std::process::{Command, Output};

use dsplane::config::{Config, DEFAULT_TOML};

const BIN: &str = env!("CARGO_BIN_EXE_dsplane");

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsplane-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(name: &str, text: &str) -> Output {
    let file = temp_file(name, text);
    Command::new(BIN)
        .arg("check-config")
        .arg(&file)
        .env_remove("DSPLANE_LOG")
        .output()
        .unwrap()
}

/// A configuration with its own tokens and an admin token: nothing to warn about.
const OWN_TOKENS: &str = r#"
[admin]
token = "admin-secret-0123456789"

[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su-secret-0123456789"

[[csp]]
name = "csp-a"
token = "csp-secret-0123456789"

[priority]
high_priority_alerts = [ { code = 0x8F1C, level = 1 }, { code = 0x81C0, level = 2 } ]

[alert_storm]
exclusions = [ 0x8F57, 0x0001 ]
"#;

#[test]
fn alert_codes_are_printed_in_hex_and_the_output_parses_back() {
    let out = check_config("codes.toml", OWN_TOKENS);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    for code in ["0x8F1C", "0x81C0", "0x8F57", "0x0001"] {
        assert!(printed.contains(code), "{code} not in\n{printed}");
    }
    // 0x8F1C, 0x81C0, 0x8F57 in decimal: nowhere.
    for decimal in ["36636", "33216", "36695"] {
        assert!(!printed.contains(decimal), "{decimal} in\n{printed}");
    }
    // The effective file is a configuration too (its tokens are redacted, so give them back).
    let again = printed.replace("\"<redacted>\"", "\"x\"");
    let again = again.replacen("\"x\"", "\"a-1\"", 1);
    let again = again.replacen("\"x\"", "\"a-2\"", 1);
    let again = again.replacen("\"x\"", "\"a-3\"", 1);
    let parsed = Config::from_toml(&again).unwrap_or_else(|e| panic!("{e}\n{again}"));
    let original = Config::from_toml(OWN_TOKENS).unwrap();
    assert_eq!(
        parsed.priority.high_priority_alerts,
        original.priority.high_priority_alerts
    );
    assert_eq!(
        parsed.alert_storm.exclusions,
        original.alert_storm.exclusions
    );
}

#[test]
fn the_embedded_default_prints_its_codes_in_hex() {
    let config = Config::embedded_default().unwrap();
    let printed = config.effective_toml();
    assert!(printed.contains("code = 0x8F1C"), "{printed}");
    assert!(printed.contains("0x8F3F"), "{printed}");
    let back = Config::from_toml_with_env(
        &printed
            .replacen("\"<redacted>\"", "\"s\"", 1)
            .replacen("\"<redacted>\"", "\"c\"", 1),
        |_| None,
    )
    .unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(back.alert_storm.exclusions, config.alert_storm.exclusions);
}

#[test]
fn an_empty_admin_token_and_the_demo_tokens_are_warned_about() {
    let out = check_config("demo.toml", DEFAULT_TOML);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("admin.token") && l.contains("without authentication")),
        "{err}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("service_user[0]") && l.contains("demo token")),
        "{err}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("csp[0]") && l.contains("demo token")),
        "{err}"
    );
    // The warnings never show a token.
    assert!(
        !err.contains("demo-su-token") && !err.contains("demo-csp-token"),
        "{err}"
    );
    // Warnings are not errors.
    assert!(err.contains(": ok"), "{err}");

    let out = check_config("own.toml", OWN_TOKENS);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("warning"), "{err}");
}

//! The configuration reference (`docs/configuration.md`) and the embedded default configuration
//! (`crates/core/src/default.toml`) against the parser: every key the parser accepts is documented, and
//! shown in the default file.
//!
//! The keys are not listed by hand. They are asked of the parser itself: every table refuses
//! unknown keys (`deny_unknown_fields`), and serde's refusal names every key the table accepts
//! ("unknown field `zzz`, expected one of `cores`, `levels`, …"). Probing each table with an
//! unknown key, and each of its keys for a table of its own, finds every key, so a key added to
//! the parser without documentation fails here.

use std::collections::BTreeSet;

use dsplane_core::config::{Config, ConfigError, DEFAULT_TOML};

/// A key that no table accepts.
const PROBE: &str = "zz_not_a_key";

/// The keys a table accepts, if `text` (which sets [`PROBE`] in it) reaches that table: the list
/// of serde's "unknown field" error.
fn accepted_by(text: &str) -> Option<Vec<String>> {
    let message = match Config::from_toml_with_env(text, |_| Some("t".into())) {
        Err(ConfigError::Toml(e)) => e.message().to_owned(),
        _ => return None,
    };
    let marker = format!("unknown field `{PROBE}`");
    let rest = &message[message.find(&marker)? + marker.len()..];
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

/// How to reach the table at `path` (`[]` the top, `["priority", "rules"]` one entry of the
/// rules) with the probe in it, in each form a table can take.
fn probes(path: &[String]) -> Vec<String> {
    match path {
        [] => vec![format!("{PROBE} = 1\n")],
        [section] => vec![
            format!("[{section}]\n{PROBE} = 1\n"),
            format!("[[{section}]]\n{PROBE} = 1\n"),
        ],
        [section, rest @ ..] => {
            let inner = rest.join(".");
            vec![
                format!("[{section}]\n{inner} = [{{ {PROBE} = 1 }}]\n"),
                format!("[[{section}]]\n{inner} = [{{ {PROBE} = 1 }}]\n"),
                format!("[{section}.{inner}]\n{PROBE} = 1\n"),
            ]
        }
    }
}

/// Every key path the parser accepts, leaves only: `engine.cores`, `service_user.rate`,
/// `priority.rules.srv`.
fn accepted_keys() -> BTreeSet<String> {
    fn walk(path: Vec<String>, out: &mut BTreeSet<String>) {
        let fields = probes(&path).iter().find_map(|text| accepted_by(text));
        match fields {
            Some(fields) => {
                for field in fields {
                    let mut inner = path.clone();
                    inner.push(field);
                    walk(inner, out);
                }
            }
            None => {
                out.insert(path.join("."));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(Vec::new(), &mut out);
    out
}

#[test]
fn every_key_the_parser_accepts_is_in_the_configuration_reference() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    let keys = accepted_keys();

    // The probe itself must work, or every check below would pass on an empty list.
    for key in [
        "engine.cores",
        "listen.handshakes_per_address_max",
        "admin.token_env",
        "service_user.sr_burst",
        "csp.device_ranges",
        "priority.rules.mode",
        "priority.high_priority_alerts.code",
        "alert_storm.max_tracked_keys",
    ] {
        assert!(keys.contains(key), "{key} not found in {keys:?}");
    }
    assert!(keys.len() > 50, "{keys:?}");
    assert!(!keys.contains("engine"), "tables are not leaves: {keys:?}");
    let reference = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}: the configuration reference is missing"));
    let missing: Vec<String> = keys
        .into_iter()
        .filter(|key| !reference.contains(&format!("`{key}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document (as `section.key`) {missing:?}"
    );
}

#[test]
fn the_configuration_reference_stands_on_its_own() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    let reference = std::fs::read_to_string(path).unwrap();
    assert!(
        !reference.contains("../shared"),
        "points outside the repository"
    );
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    assert!(
        !readme.contains("../shared"),
        "README points outside the repository"
    );
    assert!(
        readme.contains("docs/configuration.md"),
        "README does not link the reference"
    );
}

/// The lines of `crates/core/src/default.toml` under the table header `header` (`[engine]`,
/// `[[service_user]]`), up to the next header, comments included. A section the demo must not
/// set (`[cluster]`) is shown commented out, header and all (`# [cluster]`).
fn default_section(header: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in DEFAULT_TOML.lines() {
        let trimmed = line.trim();
        let trimmed = trimmed
            .strip_prefix("# [")
            .map_or(trimmed, |_| trimmed.trim_start_matches("# "));
        if trimmed.starts_with('[') {
            inside = trimmed == header;
            continue;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn the_default_configuration_shows_every_key() {
    // `crates/core/src/default.toml` is the complete example: every key is set or, where setting it would
    // change the demo (token_env, per-SU overrides), shown in a comment.
    let mut missing = Vec::new();
    for key in accepted_keys() {
        let mut parts = key.split('.');
        let section = parts.next().unwrap();
        let leaf = key.rsplit('.').next().unwrap();
        let text = format!(
            "{}{}",
            default_section(&format!("[{section}]")),
            default_section(&format!("[[{section}]]"))
        );
        let shown = text
            .lines()
            .any(|l| l.contains(&format!("{leaf} =")) || l.contains(&format!("{leaf}=")));
        if !shown {
            missing.push(key);
        }
    }
    assert!(
        missing.is_empty(),
        "crates/core/src/default.toml neither sets nor shows {missing:?}"
    );
    // And it is still the demo configuration `dsplane run` starts with.
    let config = Config::embedded_default().unwrap();
    assert_eq!(config.service_users.len(), 1);
    assert_eq!(config.csps.len(), 1);
    assert_eq!(config.service_users[0].token.expose_str(), "demo-su-token");
    assert_eq!(config.csps[0].token.expose_str(), "demo-csp-token");
    assert!(config.listen.su.ip().is_loopback() && config.listen.admin.ip().is_loopback());
    assert!(config.admin_token.is_none());
}

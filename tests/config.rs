//! The config file of ENGINE.md §10: defaults, the embedded config, and every validation error
//! naming its key and value; tokens kept out of every error; and what a reload refuses.

use std::time::Duration;

use bytes::Bytes;
use dsplane::client::{Client, ClientError};
use dsplane::config::{
    Config, ConfigError, Durability, Scheduling, SrvPattern, PAYLOAD_BYTES_CEILING,
};
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Level, Mode, Srv};
use dsplane::wire::{Frame, Header, Kind, NackReason};

mod common;

const SU: &str = "[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"t\"\n";

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_with_env(text, no_env)
}

/// The (key, value) of the validation error `text` must produce.
fn invalid(text: &str) -> (String, String) {
    match parse(text) {
        Err(ConfigError::Invalid { key, value, .. }) => (key, value),
        Err(other) => panic!("expected a validation error, got {other}"),
        Ok(_) => panic!("expected a validation error for:\n{text}"),
    }
}

fn assert_invalid(text: &str, key: &str, value: &str) {
    let (k, v) = invalid(text);
    assert_eq!((k.as_str(), v.as_str()), (key, value), "for:\n{text}");
}

#[test]
fn empty_file_gives_every_documented_default() {
    let c = parse("").unwrap();
    assert_eq!(c.engine.cores, 0);
    assert_eq!(c.engine.levels, 4);
    assert_eq!(c.engine.data_dir.to_str(), Some("./dsplane-data"));
    assert_eq!(c.engine.durability, Durability::Batch);
    assert_eq!(c.engine.flush_interval, Duration::from_millis(2));
    assert_eq!(c.engine.payload_bytes_max, 65_536);
    assert_eq!(c.engine.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.engine.scheduling, Scheduling::Priority);
    assert_eq!(c.listen.su.to_string(), "127.0.0.1:7100");
    assert_eq!(c.listen.csp.to_string(), "127.0.0.1:7200");
    assert_eq!(c.listen.admin.to_string(), "127.0.0.1:7300");
    assert!(c.admin_token.is_none());
    let d = c.delivery;
    assert_eq!(
        (d.rate, d.burst, d.window, d.window_reserved_top),
        (1000, 100, 64, 8)
    );
    assert_eq!((d.nms_per_su, d.nms_total), (10_000, 1_000_000));
    assert_eq!(d.release_start, dsplane::limiter::ReleaseStart::DEFAULT);
    assert_eq!(d.release_ramp, Duration::from_secs(30));
    assert_eq!(d.retention, Duration::from_secs(48 * 3600));
    let s = c.service_requests;
    assert_eq!(
        (s.capacity, s.operating_threshold, s.sr_rate, s.sr_burst),
        (100_000, 0.8, 500, 100)
    );
    assert_eq!(c.priority.default_level.get(), 4);
    assert_eq!(c.priority.scheduled_response_level.get(), 4);
    assert_eq!(c.priority.alert_level.get(), 3);
    assert_eq!(c.alert_storm.threshold, 10);
    assert_eq!(c.alert_storm.window, Duration::from_secs(60));
    assert_eq!(c.alert_storm.max_tracked_keys, 4_000_000);
    assert!(c.service_users.is_empty() && c.csps.is_empty());
}

#[test]
fn scheduled_response_level_defaults_to_the_lowest_level() {
    let c = parse("[engine]\nlevels = 6\n[priority]\ndefault_level = 6\n").unwrap();
    assert_eq!(c.priority.scheduled_response_level.get(), 6);
}

#[test]
fn embedded_default_is_valid_and_has_the_demo_peers() {
    let c = Config::embedded_default().unwrap();
    assert_eq!(c.service_users.len(), 1);
    assert_eq!(c.service_users[0].id, Eui64(0x90B3_D51F_3001_0000));
    assert_eq!(c.service_users[0].token.expose_str(), "demo-su-token");
    assert_eq!(c.csps.len(), 1);
    assert!(c.csps[0].device_ranges.is_empty());
    assert!(
        c.listen.su.ip().is_loopback()
            && c.listen.csp.ip().is_loopback()
            && c.listen.admin.ip().is_loopback()
    );
    // The shipped exclusion list must not hold 0x8F75 (strong magnetic field): it was removed
    // from the industry's list in 2024.
    assert!(!c.alert_storm.exclusions.is_empty());
    assert!(!c.alert_storm.exclusions.contains(&0x8F75));
    assert!(c
        .priority
        .rules
        .iter()
        .any(|r| r.srv == SrvPattern::Major(7) && r.level == Level::URGENT));
}

#[test]
fn engine_md_example_is_valid() {
    let text = r#"
[engine]
cores = 0
levels = 4
data_dir = "./dsplane-data"
durability = "batch"
flush_interval_ms = 2
max_payload = 65536
idle_timeout_s = 60
scheduling = "priority"

[listen]
su = "127.0.0.1:7100"
csp = "127.0.0.1:7200"
admin = "127.0.0.1:7300"

[admin]
token = ""

[delivery]
rate = 1000
burst = 100
window = 64
window_reserved_top = 8
nms_per_su = 10000
nms_total = 1000000
release_start = 0.1
release_ramp_s = 30
retention_h = 48

[service_requests]
capacity = 100000
operating_threshold = 0.8
sr_rate = 500
sr_burst = 100

[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "change-me"
rate = 200

[[csp]]
name = "csp-north"
token = "change-me-too"
rate = 5000
device_ranges = []

[priority]
default_level = 4
scheduled_response_level = 4
alert_level = 3
rules = [ { srv = "2.2", level = 1 }, { srv = "7.*", level = 1 }, { srv = "4.1.1", mode = "on-demand", level = 3 } ]
high_priority_alerts = [ { code = 0x8F1C, level = 1 } ]

[alert_storm]
threshold = 10
window_s = 60
exclusions = [ ]
max_tracked_keys = 4000000
"#;
    let c = parse(text).unwrap();
    let su = &c.service_users[0];
    assert_eq!(su.delivery.rate, 200, "the SU's override");
    assert_eq!(su.delivery.burst, 100, "the [delivery] default");
    assert_eq!(su.sr_rate, 500);
    assert_eq!(c.priority.rules.len(), 3);
    assert_eq!(
        c.priority.rules[0].srv,
        SrvPattern::Exact(Srv::new(2, 2, 0))
    );
    assert_eq!(c.priority.rules[2].mode, Some(Mode::OnDemand));
    assert_eq!(
        c.priority.high_priority_alerts,
        vec![(0x8F1C, Level::URGENT)]
    );
    assert_eq!(c.csps[0].rate, 5000);
}

#[test]
fn levels_outside_two_to_sixteen_are_refused() {
    assert_invalid("[engine]\nlevels = 0\n", "engine.levels", "0");
    assert_invalid("[engine]\nlevels = 1\n", "engine.levels", "1");
    assert_invalid("[engine]\nlevels = 17\n", "engine.levels", "17");
    let c = parse("[engine]\nlevels = 16\n").unwrap();
    assert_eq!(c.engine.levels, 16);
}

#[test]
fn unknown_modes_are_refused() {
    assert_invalid(
        "[engine]\ndurability = \"fast\"\n",
        "engine.durability",
        "\"fast\"",
    );
    assert_invalid(
        "[engine]\nscheduling = \"lifo\"\n",
        "engine.scheduling",
        "\"lifo\"",
    );
    assert_invalid(
        "[priority]\nrules = [{ srv = \"4.1.1\", mode = \"scheduled\", level = 2 }]\n",
        "priority.rules[0].mode",
        "\"scheduled\"",
    );
}

#[test]
fn levels_above_engine_levels_are_refused() {
    assert_invalid(
        "[priority]\nrules = [{ srv = \"2.2\", level = 5 }]\n",
        "priority.rules[0].level",
        "5",
    );
    assert_invalid(
        "[priority]\nrules = [{ srv = \"2.2\", level = 0 }]\n",
        "priority.rules[0].level",
        "0",
    );
    assert_invalid(
        "[priority]\ndefault_level = 5\n",
        "priority.default_level",
        "5",
    );
    assert_invalid("[priority]\nalert_level = 9\n", "priority.alert_level", "9");
    assert_invalid(
        "[priority]\nscheduled_response_level = 5\n",
        "priority.scheduled_response_level",
        "5",
    );
    assert_invalid(
        "[priority]\nhigh_priority_alerts = [{ code = 0x8F1C, level = 7 }]\n",
        "priority.high_priority_alerts[0].level",
        "7",
    );
    // With more levels the same rule is fine.
    parse("[engine]\nlevels = 5\n[priority]\nrules = [{ srv = \"2.2\", level = 5 }]\n").unwrap();
}

#[test]
fn rule_patterns_parse_and_bad_ones_are_refused() {
    let c = parse("[priority]\nrules = [{ srv = \"8.1.*\", level = 2 }, { srv = \"4.1.1\", mode = \"dcc-scheduled\", level = 4 }]\n").unwrap();
    assert_eq!(c.priority.rules[0].srv, SrvPattern::MajorMinor(8, 1));
    assert_eq!(c.priority.rules[1].mode, Some(Mode::DccScheduled));
    for bad in ["7", "*", "7.*.*", "x.1", "300.1", "7.", ""] {
        let text = format!("[priority]\nrules = [{{ srv = \"{bad}\", level = 2 }}]\n");
        assert_invalid(&text, "priority.rules[0].srv", &format!("{bad:?}"));
    }
    assert_invalid(
        "[priority]\nrules = [{ srv = \"7.*\", level = 1 }, { srv = \"7.*\", level = 2 }]\n",
        "priority.rules[1].srv",
        "\"7.*\"",
    );
    // Same SRV with a different mode is a different rule.
    parse("[priority]\nrules = [{ srv = \"4.1.1\", level = 4 }, { srv = \"4.1.1\", mode = \"on-demand\", level = 3 }]\n").unwrap();
    assert_invalid(
        "[priority]\nhigh_priority_alerts = [{ code = 0x8F1C, level = 1 }, { code = 0x8F1C, level = 2 }]\n",
        "priority.high_priority_alerts[1].code",
        "0x8F1C",
    );
}

#[test]
fn service_user_ids_must_be_eui64_and_unique() {
    assert_invalid(
        "[[service_user]]\nid = \"90-B3-D5-1F-30-01-00\"\ntoken = \"t\"\n",
        "service_user[0].id",
        "\"90-B3-D5-1F-30-01-00\"",
    );
    assert_invalid(
        "[[service_user]]\nid = \"90:B3:D5:1F:30:01:00:00\"\ntoken = \"t\"\n",
        "service_user[0].id",
        "\"90:B3:D5:1F:30:01:00:00\"",
    );
    let dup = format!("{SU}[[service_user]]\nid = \"90-b3-d5-1f-30-01-00-00\"\ntoken = \"u\"\n");
    assert_invalid(&dup, "service_user[1].id", "90-B3-D5-1F-30-01-00-00");
}

#[test]
fn tokens_come_from_the_file_or_the_environment() {
    let text = "[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken_env = \"DSPLANE_TEST_SU_TOKEN\"\n";
    assert_invalid(
        text,
        "service_user[0].token_env",
        "\"DSPLANE_TEST_SU_TOKEN\"",
    );
    let c = Config::from_toml_with_env(text, |name| {
        (name == "DSPLANE_TEST_SU_TOKEN").then(|| "from-env".to_owned())
    })
    .unwrap();
    assert_eq!(c.service_users[0].token.expose_str(), "from-env");
    assert_invalid(
        "[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\n",
        "service_user[0].token",
        "(missing)",
    );
    assert_invalid(
        "[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"a\"\ntoken_env = \"B\"\n",
        "service_user[0].token_env",
        "(set)",
    );
    assert_invalid(
        "[[csp]]\nname = \"c\"\ntoken = \"\"\n",
        "csp[0].token",
        "(0 bytes)",
    );
    let long = "x".repeat(257);
    assert_invalid(
        &format!("[[csp]]\nname = \"c\"\ntoken = \"{long}\"\n"),
        "csp[0].token",
        "(257 bytes)",
    );
    let max = "x".repeat(256);
    parse(&format!("[[csp]]\nname = \"c\"\ntoken = \"{max}\"\n")).unwrap();
}

#[test]
fn tokens_never_show_in_debug_or_effective_config() {
    let text = format!("{SU}[[csp]]\nname = \"c\"\ntoken = \"csp-secret-xyz\"\n[admin]\ntoken = \"admin-secret-xyz\"\n");
    let text = text.replace("token = \"t\"", "token = \"su-secret-xyz\"");
    let c = parse(&text).unwrap();
    let shown = format!("{c:?}\n{}", c.effective_toml());
    assert!(!shown.contains("secret-xyz"), "{shown}");
    assert!(shown.contains("<redacted>"));
}

#[test]
fn effective_config_round_trips_with_overrides_filled_in() {
    let text = format!("{SU}rate = 7\n[delivery]\nburst = 9\n");
    let c = parse(&text).unwrap();
    let printed = c.effective_toml();
    let again = parse(&printed).unwrap();
    assert_eq!(again.service_users[0].delivery, c.service_users[0].delivery);
    assert_eq!(again.service_users[0].delivery.rate, 7);
    assert_eq!(again.service_users[0].delivery.burst, 9);
    assert_eq!(
        again.priority.scheduled_response_level,
        c.priority.scheduled_response_level
    );
}

#[test]
fn unknown_keys_and_wrong_types_are_refused_with_their_name() {
    let e = parse("[engine]\nlevles = 4\n").unwrap_err().to_string();
    assert!(e.contains("levles"), "{e}");
    let e = parse("[engine]\nlevels = \"four\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("levels"), "{e}");
    let e = parse("[engine]\nlevels = 300\n").unwrap_err().to_string();
    assert!(e.contains("levels"), "{e}");
    let e = parse("[delivery]\nrate = -1\n").unwrap_err().to_string();
    assert!(e.contains("rate"), "{e}");
}

#[test]
fn payload_limit_is_checked_at_its_edges() {
    assert_invalid("[engine]\nmax_payload = 0\n", "engine.max_payload", "0");
    let at = parse(&format!(
        "[engine]\nmax_payload = {PAYLOAD_BYTES_CEILING}\n"
    ))
    .unwrap();
    assert_eq!(at.engine.payload_bytes_max, PAYLOAD_BYTES_CEILING);
    let over = PAYLOAD_BYTES_CEILING + 1;
    assert_invalid(
        &format!("[engine]\nmax_payload = {over}\n"),
        "engine.max_payload",
        &over.to_string(),
    );
}

#[test]
fn delivery_relations_are_checked() {
    assert_invalid(
        "[delivery]\nwindow = 8\nwindow_reserved_top = 8\n",
        "delivery.window",
        "8",
    );
    parse("[delivery]\nwindow = 9\nwindow_reserved_top = 8\n").unwrap();
    assert_invalid(&format!("{SU}window = 4\n"), "service_user[0].window", "4");
    assert_invalid(
        "[delivery]\nnms_per_su = 11\nnms_total = 10\n",
        "delivery.nms_per_su",
        "11",
    );
    assert_invalid("[delivery]\nrate = 0\n", "delivery.rate", "0");
    assert_invalid("[delivery]\nburst = 0\n", "delivery.burst", "0");
    assert_invalid(
        "[delivery]\nrelease_start = 0.0\n",
        "delivery.release_start",
        "0",
    );
    assert_invalid(
        "[delivery]\nrelease_start = 1.5\n",
        "delivery.release_start",
        "1.5",
    );
    assert_invalid(
        "[delivery]\nrelease_start = nan\n",
        "delivery.release_start",
        "NaN",
    );
    parse("[delivery]\nrelease_start = 1.0\nrelease_ramp_s = 0\n").unwrap();
    assert_invalid("[delivery]\nretention_h = 0\n", "delivery.retention_h", "0");
    assert_invalid(
        "[service_requests]\noperating_threshold = 0\n",
        "service_requests.operating_threshold",
        "0",
    );
    assert_invalid(
        "[service_requests]\ncapacity = 0\n",
        "service_requests.capacity",
        "0",
    );
    assert_invalid(
        &format!("{SU}sr_rate = 0\n"),
        "service_user[0].sr_rate",
        "0",
    );
    assert_invalid(
        "[engine]\nidle_timeout_s = 0\n",
        "engine.idle_timeout_s",
        "0",
    );
    assert_invalid(
        "[engine]\nflush_interval_ms = 0\n",
        "engine.flush_interval_ms",
        "0",
    );
    assert_invalid(
        "[alert_storm]\nthreshold = 0\n",
        "alert_storm.threshold",
        "0",
    );
    assert_invalid("[alert_storm]\nwindow_s = 0\n", "alert_storm.window_s", "0");
    assert_invalid(
        "[alert_storm]\nmax_tracked_keys = 0\n",
        "alert_storm.max_tracked_keys",
        "0",
    );
}

#[test]
fn listen_addresses_are_checked() {
    assert_invalid(
        "[listen]\nsu = \"localhost\"\n",
        "listen.su",
        "\"localhost\"",
    );
    assert_invalid(
        "[listen]\ncsp = \"127.0.0.1:7100\"\n",
        "listen.csp",
        "127.0.0.1:7100",
    );
    // Port 0 asks the OS for a free port; two of them are fine.
    parse("[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\n").unwrap();
    assert_invalid(
        "[listen]\nadmin = \"0.0.0.0:7300\"\n",
        "admin.token",
        "\"\"",
    );
    parse("[listen]\nadmin = \"0.0.0.0:7300\"\n[admin]\ntoken = \"x\"\n").unwrap();
}

#[test]
fn csp_device_ranges_are_parsed_and_may_not_overlap() {
    let text = r#"
[[csp]]
name = "north"
token = "a"
device_ranges = ["00-00-00-00-00-00-00-00..7F-FF-FF-FF-FF-FF-FF-FF"]
[[csp]]
name = "south"
token = "b"
device_ranges = ["80-00-00-00-00-00-00-00..FF-FF-FF-FF-FF-FF-FF-FF"]
"#;
    let c = parse(text).unwrap();
    assert!(c.csps[0].device_ranges[0].contains(Eui64(0x7FFF_FFFF_FFFF_FFFF)));
    assert!(!c.csps[0].device_ranges[0].contains(Eui64(0x8000_0000_0000_0000)));
    assert!(c.csps[1].device_ranges[0].contains(Eui64(u64::MAX)));
    let overlap = text.replace("80-00-00-00-00-00-00-00..", "7F-FF-FF-FF-FF-FF-FF-FF..");
    assert_invalid(
        &overlap,
        "csp[1].device_ranges[0]",
        "\"7F-FF-FF-FF-FF-FF-FF-FF..FF-FF-FF-FF-FF-FF-FF-FF\"",
    );
    assert_invalid(
        "[[csp]]\nname = \"c\"\ntoken = \"a\"\ndevice_ranges = [\"10-00-00-00-00-00-00-00..01-00-00-00-00-00-00-00\"]\n",
        "csp[0].device_ranges[0]",
        "\"10-00-00-00-00-00-00-00..01-00-00-00-00-00-00-00\"",
    );
    assert_invalid(
        "[[csp]]\nname = \"c\"\ntoken = \"a\"\ndevice_ranges = [\"10-00\"]\n",
        "csp[0].device_ranges[0]",
        "\"10-00\"",
    );
    assert_invalid(
        "[[csp]]\nname = \"a\"\ntoken = \"a\"\n[[csp]]\nname = \"b\"\ntoken = \"b\"\n",
        "csp[1].device_ranges",
        "[]",
    );
    assert_invalid(
        "[[csp]]\nname = \"a\"\ntoken = \"a\"\ndevice_ranges = [\"00-00-00-00-00-00-00-00..00-00-00-00-00-00-00-01\"]\n[[csp]]\nname = \"a\"\ntoken = \"b\"\n",
        "csp[1].name",
        "\"a\"",
    );
}

#[test]
fn errors_read_well() {
    let e = parse("[engine]\nlevels = 0\n").unwrap_err().to_string();
    assert_eq!(e, "config key `engine.levels` = 0: expected 2 to 16");
}

#[test]
fn connections_max_is_checked_at_its_edges() {
    let parse = |text: &str| dsplane::config::Config::from_toml(text);
    assert_eq!(
        parse("[listen]\nconnections_max = 1\n")
            .unwrap()
            .listen
            .connections_max,
        1
    );
    let err = parse("[listen]\nconnections_max = 0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen.connections_max"), "{err}");
    let max = dsplane::config::CONNECTIONS_MAX;
    assert!(parse(&format!("[listen]\nconnections_max = {max}\n")).is_ok());
    assert!(parse(&format!("[listen]\nconnections_max = {}\n", max + 1)).is_err());
}

// ---------------------------------------------------------------------------------------------
// Issue 13, items 10–13: tokens never in an error, no two peers with one token, and what a
// reload refuses.

/// A token no message may ever show.
const SECRET: &str = "SeCrEt-d41d8cd9";

/// Every way a parse or validation error renders: what a log line, `check-config` or a
/// careless `{:?}` would print.
fn rendered(e: &ConfigError) -> String {
    format!("{e}\n{e:?}")
}

#[test]
fn a_syntax_error_on_a_token_line_never_shows_the_token() {
    let cases = [
        // An unterminated string: the line, as the parser shows it, holds the token.
        format!("[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"{SECRET}\n"),
        // Junk after the value.
        format!("[[csp]]\nname = \"c\"\ntoken = \"{SECRET}\" x\n"),
        format!("[engine]\nlevels = 4\n\n[admin]\ntoken = '{SECRET}\n"),
        // The token in an inline table, with a typo after it.
        format!("service_user = [ {{ id = \"90-B3-D5-1F-30-01-00-00\", token = \"{SECRET}\", rate = }} ]\n"),
        // A type error whose message quotes the value.
        "[[csp]]\nname = \"c\"\ntoken = 4141592653\n".to_owned(),
        format!("[[csp]]\nname = \"c\"\ntoken = [\"{SECRET}\", 1]\n"),
    ];
    for text in &cases {
        let e = parse(text).expect_err(text);
        let shown = rendered(&e);
        assert!(
            !shown.contains(SECRET) && !shown.contains("4141592653"),
            "for:\n{text}\nshown:\n{shown}"
        );
        // What the operator needs to fix it stays: where, and what is wrong.
        assert!(shown.contains("line "), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
    // A line that sets no token keeps its excerpt.
    let e = parse("[engine]\nlevels = \"four\n").unwrap_err();
    assert!(e.to_string().contains("levels = \"four"), "{e}");
}

#[test]
fn a_token_pasted_into_token_env_is_not_echoed() {
    let text = format!("[[csp]]\nname = \"c\"\ntoken_env = \"{SECRET}/+=\"\n");
    let e = parse(&text).unwrap_err();
    let shown = rendered(&e);
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(shown.contains("csp[0].token_env"), "{shown}");
    // A variable name is still shown, so the operator can see which one is unset.
    let e = parse("[[csp]]\nname = \"c\"\ntoken_env = \"DSPLANE_CSP_TOKEN\"\n").unwrap_err();
    assert!(e.to_string().contains("DSPLANE_CSP_TOKEN"), "{e}");
}

#[test]
fn two_peers_with_one_token_are_refused_naming_both() {
    let su = |i: u8, token: &str| {
        format!("[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-0{i}\"\ntoken = \"{token}\"\n")
    };
    let csp = |name: &str, token: &str, range: &str| {
        format!("[[csp]]\nname = \"{name}\"\ntoken = \"{token}\"\ndevice_ranges = [{range}]\n")
    };
    let lo = "\"00-00-00-00-00-00-00-00..7F-FF-FF-FF-FF-FF-FF-FF\"";
    let cases = [
        (
            format!("{}{}", su(0, SECRET), su(1, SECRET)),
            "service_user[1].token",
            ["service_user[0]", "90-B3-D5-1F-30-01-00-00"],
        ),
        (
            format!("{}{}", su(0, SECRET), csp("csp-a", SECRET, "")),
            "csp[0].token",
            ["service_user[0]", "csp-a"],
        ),
        (
            format!("{}{}", csp("csp-a", SECRET, lo), csp("csp-b", SECRET, "")),
            "csp[1].token",
            ["csp[0]", "csp-b"],
        ),
        (
            format!("[admin]\ntoken = \"{SECRET}\"\n{}", su(0, SECRET)),
            "service_user[0].token",
            ["admin", "90-B3-D5-1F-30-01-00-00"],
        ),
    ];
    for (text, key, names) in &cases {
        let e = parse(text).expect_err(text);
        let shown = rendered(&e);
        assert!(!shown.contains(SECRET), "{shown}");
        match &e {
            ConfigError::Invalid { key: k, .. } => assert_eq!(k, key, "{shown}"),
            other => panic!("{other}"),
        }
        for name in names {
            assert!(shown.contains(name), "{name} not named in: {shown}");
        }
    }
    // Tokens from the environment count as what they resolve to.
    let text = format!(
        "{}[[csp]]\nname = \"csp-a\"\ntoken_env = \"DSPLANE_TEST_CSP\"\n",
        su(0, SECRET)
    );
    let e = Config::from_toml_with_env(&text, |_| Some(SECRET.to_owned())).unwrap_err();
    let shown = rendered(&e);
    assert!(
        shown.contains("csp[0].token_env") && shown.contains("service_user[0]"),
        "{shown}"
    );
    assert!(!shown.contains(SECRET), "{shown}");
    // Distinct tokens are fine.
    parse(&format!(
        "{}{}{}",
        su(0, "a"),
        su(1, "b"),
        csp("c", "c", "")
    ))
    .unwrap();
}

// ---- Reloads against a running engine (POST /reload).

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const T: Duration = Duration::from_secs(10);

/// A file a running engine starts from: two SUs, one CSP, rules and exclusions.
fn running_config(dir: &std::path::Path) -> String {
    format!(
        r#"[engine]
cores = 1
durability = "none"
data_dir = "{}"

[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"

[delivery]
release_start = 1.0

[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "su1-token"

[[service_user]]
id = "90-B3-D5-1F-30-01-00-01"
token = "su2-token"

[[csp]]
name = "csp-a"
token = "csp-token"

[priority]
rules = [ {{ srv = "2.2", level = 1 }}, {{ srv = "7.*", level = 1 }} ]

[alert_storm]
exclusions = [ 0x8F57 ]
"#,
        dir.join("data").display()
    )
}

/// Starts an engine on `running_config`; returns it, its file and the file's text.
fn start_engine(name: &str) -> (Engine, std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("dsplane-config-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dsplane.toml");
    let text = running_config(&dir);
    std::fs::write(&path, &text).unwrap();
    let engine = Engine::start(Config::load(&path).unwrap()).unwrap();
    engine.set_config_path(path.clone());
    (engine, path, text)
}

fn reload(engine: &Engine, path: &std::path::Path, text: &str) -> (u16, String) {
    std::fs::write(path, text).unwrap();
    common::http(engine.admin_addr(), "POST", "/reload", None)
}

/// The level SU1 receives a RESPONSE for `srv` at.
fn level_of(csp: &mut Client, su: &mut Client, srv: &str, counter: u64) -> u8 {
    let mut h = Header::new(Kind::Response);
    h.su_id = SU1;
    h.srv = srv.parse::<Srv>().unwrap();
    h.counter = counter;
    let id = csp.send(Frame::new(h, Bytes::new()).unwrap()).unwrap();
    csp.wait_ack(id, T).unwrap();
    let f = su.recv(T).unwrap().unwrap();
    su.ack(f.header.msg_id).unwrap();
    assert_eq!(f.header.counter, counter);
    f.header.priority
}

#[test]
fn a_reload_of_an_empty_or_truncated_file_is_refused_naming_what_is_missing() {
    let (engine, path, text) = start_engine("truncated");
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    assert_eq!(level_of(&mut csp, &mut su, "2.2", 1), 1);

    // An empty file parses (every key has a default) but has none of the running peers.
    let (status, body) = reload(&engine, &path, "");
    assert_eq!(status, 400, "{body}");
    for name in [
        "service_user 90-B3-D5-1F-30-01-00-00",
        "service_user 90-B3-D5-1F-30-01-00-01",
        "csp csp-a",
        &path.display().to_string(),
    ] {
        assert!(body.contains(name), "{name} not in: {body}");
    }
    // 2.2 is still urgent: nothing of the empty file was applied.
    assert_eq!(level_of(&mut csp, &mut su, "2.2", 2), 1);

    // Cut after the first SU: the second SU, the CSP and the last sections are gone.
    let cut = text
        .find("[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-01\"")
        .unwrap();
    let (status, body) = reload(&engine, &path, &text[..cut]);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("service_user 90-B3-D5-1F-30-01-00-01"),
        "{body}"
    );
    assert!(
        !body.contains("service_user 90-B3-D5-1F-30-01-00-00"),
        "{body}"
    );
    assert!(body.contains("csp csp-a"), "{body}");
    assert!(
        body.contains("[priority]") && body.contains("[alert_storm]"),
        "{body}"
    );

    // Cut after the CSP: every peer is there, but the rules and exclusions are not. The
    // file still parses; the keys it lacks are named.
    let cut = text.find("[priority]").unwrap();
    let (status, body) = reload(&engine, &path, &text[..cut]);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("[priority]") && body.contains("[alert_storm]"),
        "{body}"
    );
    assert!(!body.contains("csp csp-a"), "{body}");
    assert_eq!(level_of(&mut csp, &mut su, "7.1", 3), 1);

    // One key gone from a section that is still there.
    let (status, body) = reload(&engine, &path, &text.replace("release_start = 1.0\n", ""));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("delivery.release_start"), "{body}");

    // The whole file again is applied.
    let (status, body) = reload(&engine, &path, &text);
    assert_eq!(status, 200, "{body}");
    engine.shutdown();
    engine.join();
}

#[test]
fn a_reload_that_adds_a_peer_is_refused_as_needing_a_restart() {
    let (engine, path, text) = start_engine("adds");
    let more = format!(
        "{text}\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-02\"\ntoken = \"su3-token\"\n"
    );
    let (status, body) = reload(&engine, &path, &more);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("90-B3-D5-1F-30-01-00-02") && body.contains("restart"),
        "{body}"
    );
    assert!(!body.contains("su3-token"), "{body}");
    engine.shutdown();
    engine.join();
}

#[test]
fn a_reload_that_adds_a_cluster_section_is_refused() {
    let (engine, path, text) = start_engine("cluster");
    let more = format!(
        "{text}\n[cluster]\nnode = \"node-a\"\npostgres = \"host=127.0.0.1 password=hunter2\"\n"
    );
    let (status, body) = reload(&engine, &path, &more);
    assert_eq!(status, 400, "{body}");
    // A single node's durability cannot be kept with [cluster]: the file is refused as it
    // stands, before a reload could weigh it.
    assert!(
        body.contains("[cluster] node keeps its log in PostgreSQL"),
        "{body}"
    );
    assert!(!body.contains("hunter2"), "{body}");
    // Without it, the same file reloads.
    let (status, body) = reload(&engine, &path, &text);
    assert_eq!(status, 200, "{body}");
    engine.shutdown();
    engine.join();
}

fn refused(result: Result<Client, ClientError>) -> Option<NackReason> {
    match result {
        Err(ClientError::Refused { reason, .. }) => reason,
        Ok(_) => panic!("HELLO accepted"),
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn a_reload_that_changes_tokens_applies_them_to_new_hellos() {
    let (engine, path, text) = start_engine("tokens");
    // Opened with the old tokens, before the reload.
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    let new = text
        .replace("\"su1-token\"", "\"su1-token-rotated\"")
        .replace("\"csp-token\"", "\"csp-token-rotated\"");
    let (status, body) = reload(&engine, &path, &new);
    assert_eq!(status, 200, "{body}");
    // The response says which tokens changed, and never shows one.
    assert!(
        body.contains("service_user 90-B3-D5-1F-30-01-00-00"),
        "{body}"
    );
    assert!(body.contains("csp csp-a"), "{body}");
    assert!(
        !body.contains("90-B3-D5-1F-30-01-00-01"),
        "unchanged SU named: {body}"
    );
    assert!(!body.contains("-token"), "{body}");
    // Connections opened before the reload keep going.
    assert_eq!(level_of(&mut csp, &mut su, "2.2", 1), 1);
    // New HELLOs: the new tokens are accepted, the old ones refused with NACK 3. (The CSP link
    // holds one connection, `csp.connections_max` = 1: the old one is closed first, since a
    // second HELLO does not take a CSP link's connection over.)
    Client::connect_su(engine.su_addr(), SU1, "su1-token-rotated").unwrap();
    drop(csp);
    let _csp2 = Client::connect_csp(engine.csp_addr(), "csp-token-rotated").unwrap();
    assert_eq!(
        refused(Client::connect_su(engine.su_addr(), SU1, "su1-token")),
        Some(NackReason::Unauthorised)
    );
    assert_eq!(
        refused(Client::connect_csp(engine.csp_addr(), "csp-token")),
        Some(NackReason::Unauthorised)
    );
    // The unchanged SU keeps its token.
    Client::connect_su(engine.su_addr(), Eui64(0x90B3_D51F_3001_0001), "su2-token").unwrap();
    engine.shutdown();
    engine.join();
}

#[test]
fn a_refused_reload_never_shows_a_token() {
    let (engine, path, text) = start_engine("secret");
    let bad = text.replace("\"csp-token\"", &format!("\"{SECRET}"));
    let (status, body) = reload(&engine, &path, &bad);
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains(SECRET), "{body}");
    assert!(
        body.contains("line ") && body.contains(&path.display().to_string()),
        "{body}"
    );
    // A duplicate token is refused on reload as at start-up, without showing it.
    let dup = text.replace("\"su2-token\"", "\"su1-token\"");
    let (status, body) = reload(&engine, &path, &dup);
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains("su1-token"), "{body}");
    assert!(
        body.contains("service_user[0]") && body.contains("service_user[1]"),
        "{body}"
    );
    engine.shutdown();
    engine.join();
}

#[test]
fn csp_connections_max_is_checked_at_its_edges() {
    let csp = |n: &str| format!("[[csp]]\nname = \"csp-east\"\ntoken = \"c\"\n{n}");
    assert_eq!(parse(&csp("")).unwrap().csps[0].connections_max, 1);
    let max = dsplane::limits::CSP_CONNECTIONS_MAX;
    assert_eq!(max, 64);
    let at = parse(&csp(&format!("connections_max = {max}\n"))).unwrap();
    assert_eq!(at.csps[0].connections_max, max);
    for bad in [0, max + 1] {
        let text = csp(&format!("connections_max = {bad}\n"));
        assert_invalid(&text, "csp[0].connections_max", &bad.to_string());
        let e = parse(&text).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "config key `csp[0].connections_max` = {bad}: expected 1 to {max} connections for CSP link \"csp-east\""
            )
        );
    }
}

#[test]
fn a_reload_changes_a_csp_links_connections_max_for_new_hellos_and_keeps_open_ones() {
    let (engine, path, text) = start_engine("connections-max");
    let mut first = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    assert_eq!(
        refused(Client::connect_csp(engine.csp_addr(), "csp-token")),
        Some(NackReason::Overloaded),
        "connections_max = 1 by default"
    );
    let two = text.replace(
        "token = \"csp-token\"\n",
        "token = \"csp-token\"\nconnections_max = 2\n",
    );
    let (status, body) = reload(&engine, &path, &two);
    assert_eq!(status, 200, "{body}");
    let mut second = Client::connect_csp(engine.csp_addr(), "csp-token").unwrap();
    assert_eq!(
        refused(Client::connect_csp(engine.csp_addr(), "csp-token")),
        Some(NackReason::Overloaded)
    );
    // Lowered again: the two open connections stay, and carry traffic; new HELLOs are refused.
    let one = two.replace("connections_max = 2", "connections_max = 1");
    let (status, body) = reload(&engine, &path, &one);
    assert_eq!(status, 200, "{body}");
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su1-token").unwrap();
    assert_eq!(level_of(&mut first, &mut su, "2.2", 1), 1);
    assert_eq!(level_of(&mut second, &mut su, "2.2", 2), 1);
    drop(second);
    assert_eq!(
        refused(Client::connect_csp(engine.csp_addr(), "csp-token")),
        Some(NackReason::Overloaded),
        "one is still open"
    );
    engine.shutdown();
    engine.join();
}

//! `/metrics` parses as the Prometheus text format and its counts match the traffic sent.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::config::Config;
use dsplane::engine::Engine;
use dsplane::ids::{Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind, NackReason};

mod common;

const SU1: Eui64 = Eui64(0x90B3_D51F_3001_0000);
const T: Duration = Duration::from_secs(10);

fn get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = common::http(addr, "GET", path, None);
    assert_eq!(status, 200, "{body}");
    body
}

/// A scrape, parsed: every sample by its series as written, and every family's type.
struct Scrape {
    samples: HashMap<String, f64>,
    types: HashMap<String, String>,
}

/// Splits `name{a="x",b="y"}` into its name and labels, checking the label syntax.
fn split_series(series: &str, line: &str) -> (String, Vec<(String, String)>) {
    let (name, rest) = match series.find('{') {
        Some(i) => (&series[..i], &series[i..]),
        None => (series, ""),
    };
    assert!(
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad name in {line:?}"
    );
    let mut labels = Vec::new();
    if !rest.is_empty() {
        let mut inner = rest
            .strip_prefix('{')
            .and_then(|l| l.strip_suffix('}'))
            .unwrap_or_else(|| panic!("bad labels in {line:?}"));
        while !inner.is_empty() {
            let (k, after) = inner
                .split_once("=\"")
                .unwrap_or_else(|| panic!("bad label in {line:?}"));
            assert!(
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad label name {k:?} in {line:?}"
            );
            // The value runs to the first unescaped quote.
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        Some((_, 'n')) => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value in {line:?}"),
                }
            };
            assert!(
                labels.iter().all(|(n, _): &(String, String)| n != k),
                "label {k} twice in {line:?}"
            );
            labels.push((k.to_owned(), value));
            inner = &after[end + 1..];
            if let Some(r) = inner.strip_prefix(',') {
                inner = r;
            } else {
                assert!(inner.is_empty(), "bad label separator in {line:?}");
            }
        }
    }
    (name.to_owned(), labels)
}

/// Parses the text format strictly: each family has `# HELP` and `# TYPE` (once, before its
/// samples, its samples together), counters end in `_total`, sample names belong to their
/// family (`_bucket`, `_sum`, `_count` for histograms), label syntax, no series twice, and every
/// histogram's buckets are cumulative with `+Inf` equal to `_count` and a `_sum`.
fn parse(text: &str) -> Scrape {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut samples = HashMap::new();
    let mut canonical = HashSet::new();
    let mut current: Option<(String, String)> = None;
    let mut closed: HashSet<String> = HashSet::new();
    // Histogram series by (family, labels without le): buckets (le, count), sum, count.
    type Buckets = (Vec<(f64, f64)>, Option<f64>, Option<f64>);
    let mut histograms: HashMap<(String, Vec<(String, String)>), Buckets> = HashMap::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        assert!(!line.is_empty(), "empty line");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(!help.trim().is_empty(), "empty HELP: {line:?}");
            assert!(helped.insert(name.to_owned()), "HELP twice: {line:?}");
            if let Some((family, _)) = current.take() {
                closed.insert(family);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(it.next().is_none(), "{line:?}");
            assert!(
                ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind),
                "{line:?}"
            );
            assert!(helped.contains(name), "TYPE before HELP: {line:?}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "TYPE twice: {line:?}"
            );
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "a counter not ending in _total: {line:?}"
                );
            }
            current = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line:?}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = split_series(series, line);
        let (family, kind) = current
            .clone()
            .unwrap_or_else(|| panic!("sample outside a family: {line:?}"));
        assert!(!closed.contains(&family), "family split: {line:?}");
        let suffix = name
            .strip_prefix(family.as_str())
            .unwrap_or_else(|| panic!("{line:?} is not in family {family}"));
        match kind.as_str() {
            "histogram" => assert!(
                ["_bucket", "_sum", "_count"].contains(&suffix),
                "{line:?} in histogram {family}"
            ),
            "summary" => assert!(["", "_sum", "_count"].contains(&suffix), "{line:?}"),
            _ => assert_eq!(suffix, "", "{line:?} in {kind} {family}"),
        }
        if kind == "counter" || suffix == "_count" || suffix == "_bucket" {
            assert!(
                value >= 0.0 && value.is_finite(),
                "negative count: {line:?}"
            );
        }
        let mut sorted = labels.clone();
        sorted.sort();
        assert!(
            canonical.insert((name.clone(), sorted.clone())),
            "series twice: {line:?}"
        );
        if kind == "histogram" {
            let le = sorted.iter().position(|(k, _)| k == "le");
            let mut key_labels = sorted.clone();
            let le = le.map(|i| key_labels.remove(i).1);
            let entry =
                histograms
                    .entry((family.clone(), key_labels))
                    .or_insert((Vec::new(), None, None));
            match suffix {
                "_bucket" => {
                    let le = le.unwrap_or_else(|| panic!("bucket without le: {line:?}"));
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or_else(|_| panic!("bad le in {line:?}"))
                    };
                    entry.0.push((bound, value));
                }
                "_sum" => entry.1 = Some(value),
                _ => entry.2 = Some(value),
            }
        }
        samples.insert(series.to_owned(), value);
    }
    for ((family, labels), (buckets, sum, count)) in &histograms {
        let what = format!("{family}{labels:?}");
        assert!(!buckets.is_empty(), "{what}: no buckets");
        for pair in buckets.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{what}: le not increasing");
            assert!(pair[0].1 <= pair[1].1, "{what}: buckets not cumulative");
        }
        let last = buckets.last().unwrap();
        assert_eq!(last.0, f64::INFINITY, "{what}: no +Inf bucket");
        assert_eq!(Some(last.1), *count, "{what}: +Inf is not _count");
        assert!(sum.is_some_and(|s| s >= 0.0), "{what}: no _sum");
    }
    Scrape { samples, types }
}

#[test]
fn metrics_parse_and_count_the_traffic() {
    let dir = std::env::temp_dir().join(format!("dsplane-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "[engine]\ncores = 2\ndurability = \"none\"\ndata_dir = \"{}\"\n[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[delivery]\nrelease_start = 1.0\nrate = 100000\nburst = 10000\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"su\"\n[[csp]]\nname = \"c\"\ntoken = \"csp\"\n[priority]\nrules = [ {{ srv = \"2.2\", level = 1 }} ]\n",
        dir.display()
    );
    let engine = Engine::start(Config::from_toml(&text).unwrap()).unwrap();
    let mut su = Client::connect_su(engine.su_addr(), SU1, "su").unwrap();
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp").unwrap();
    let frame = |srv: &str, i: u64| {
        let mut h = Header::new(Kind::Response);
        h.su_id = SU1;
        h.srv = srv.parse::<Srv>().unwrap();
        h.counter = i;
        h.created_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Frame::new(h, Bytes::from_static(b"x")).unwrap()
    };
    let last = csp
        .send_batch(
            (0..10)
                .map(|i| frame("1.1.1", i))
                .chain((10..13).map(|i| frame("2.2", i))),
        )
        .unwrap();
    csp.wait_ack(last, T).unwrap();
    for _ in 0..13 {
        let f = su.recv(T).unwrap().unwrap();
        su.ack(f.header.msg_id).unwrap();
    }
    // One refusal: a response for an SU nobody configured.
    let mut stranger = frame("1.1.1", 99);
    stranger.header.su_id = Eui64(7);
    let id = csp.send(stranger).unwrap();
    let others = csp.wait_ack(id, T).unwrap();
    assert_eq!(
        others[0].header.nack_reason(),
        Some(NackReason::UnknownDestination)
    );
    // One request southbound, received and acknowledged by the CSP.
    let mut request = frame("4.1.1", 50);
    request.header.kind = Kind::Request;
    let id = su.send(request).unwrap();
    su.wait_ack(id, T).unwrap();
    let f = csp.recv(T).unwrap().unwrap();
    assert_eq!(f.header.kind, Kind::Request);
    csp.ack(f.header.msg_id).unwrap();
    // One refused HELLO, counted by the acceptor.
    assert!(Client::connect_su(engine.su_addr(), SU1, "wrong").is_err());
    std::thread::sleep(Duration::from_millis(600)); // two publications

    let scrape = parse(&get(engine.admin_addr(), "/metrics"));
    let m = &scrape.samples;
    let v = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("missing {k}"));
    assert_eq!(
        v(
            r#"dsplane_messages_total{direction="northbound",kind="RESPONSE",level="4",outcome="taken"}"#
        ),
        10.0
    );
    assert_eq!(
        v(
            r#"dsplane_messages_total{direction="northbound",kind="RESPONSE",level="4",outcome="delivered"}"#
        ),
        10.0
    );
    assert_eq!(
        v(
            r#"dsplane_messages_total{direction="northbound",kind="RESPONSE",level="1",outcome="delivered"}"#
        ),
        3.0
    );
    assert_eq!(
        v(r#"dsplane_nacks_total{reason="unknown_destination"}"#),
        1.0
    );
    assert_eq!(v(r#"dsplane_nacks_total{reason="unauthorised"}"#), 1.0);
    // Latency: a histogram by direction and level, 100 µs to 60 s.
    assert_eq!(scrape.types["dsplane_latency_seconds"], "histogram");
    let nb1 = r#"direction="northbound",level="1""#;
    assert_eq!(v(&format!("dsplane_latency_seconds_count{{{nb1}}}")), 3.0);
    assert_eq!(
        v(&format!(
            r#"dsplane_latency_seconds_bucket{{{nb1},le="+Inf"}}"#
        )),
        3.0
    );
    assert!(m.contains_key(&format!(
        r#"dsplane_latency_seconds_bucket{{{nb1},le="0.0001"}}"#
    )));
    let nb4 = r#"direction="northbound",level="4""#;
    assert_eq!(
        v(&format!(
            r#"dsplane_latency_seconds_bucket{{{nb4},le="60"}}"#
        )),
        10.0,
        "every frame under a minute"
    );
    assert!(v(&format!("dsplane_latency_seconds_sum{{{nb4}}}")) < 100.0);
    let southbound: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("dsplane_latency_seconds_count{")
                && k.contains(r#"direction="southbound""#)
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(southbound, 1.0, "the request's latency, southbound");
    assert!(!m.keys().any(|k| k.contains("quantile")), "no summary left");
    // Per SU, by level and outcome.
    assert_eq!(
        v(
            r#"dsplane_su_messages_total{su="90-B3-D5-1F-30-01-00-00",level="4",outcome="delivered"}"#
        ),
        10.0
    );
    assert_eq!(
        v(
            r#"dsplane_su_messages_total{su="90-B3-D5-1F-30-01-00-00",level="1",outcome="delivered"}"#
        ),
        3.0
    );
    assert_eq!(v(r#"dsplane_su_paused{su="90-B3-D5-1F-30-01-00-00"}"#), 0.0);
    assert_eq!(
        v(r#"dsplane_su_connected{su="90-B3-D5-1F-30-01-00-00"}"#),
        1.0
    );
    assert_eq!(v("dsplane_northbound_restricted"), 0.0);
    assert_eq!(v(r#"dsplane_config_reloads_total{result="success"}"#), 0.0);
    assert_eq!(v(r#"dsplane_config_reloads_total{result="failure"}"#), 0.0);
    assert!(v("dsplane_config_loaded_timestamp_seconds") > 1.7e9);
    let build = format!(
        r#"dsplane_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(v(&build), 1.0);
    // Process metrics, named as the official client libraries name them.
    for (name, kind) in [
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(
            scrape.types.get(name).map(String::as_str),
            Some(kind),
            "{name}"
        );
    }
    assert!(v("process_resident_memory_bytes") > 1e6);
    assert!(v("process_open_fds") >= 5.0, "listeners, connections, logs");
    assert!(v("process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = v("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "{started} vs {now}"
    );
    // Bounded cardinality: no label is a device.
    assert!(!m.keys().any(|k| k.contains("device")));
    assert_eq!(
        v(r#"dsplane_queue_depth{peer="90-B3-D5-1F-30-01-00-00",tier="nms",level="4"}"#),
        0.0
    );
    assert_eq!(v(r#"dsplane_connections{port="su"}"#), 1.0);
    assert_eq!(v(r#"dsplane_connections{port="csp"}"#), 1.0);
    engine.shutdown();
    engine.join();
}

/// Operator actions, reloads and alert storms show in their own families, labelled by SU.
#[test]
fn metrics_show_pauses_restriction_reloads_storms_and_expiry() {
    let dir = std::env::temp_dir().join(format!("dsplane-metrics-ops-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "[engine]\ncores = 2\ndurability = \"none\"\ndata_dir = \"{}\"\n[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[delivery]\nrelease_start = 1.0\nrate = 100000\nburst = 10000\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"su\"\n[[csp]]\nname = \"c\"\ntoken = \"csp\"\n[alert_storm]\nthreshold = 1\nwindow_s = 60\nexclusions = [ 1 ]\n",
        dir.display()
    );
    let file = dir.join("dsplane.toml");
    std::fs::write(&file, &text).unwrap();
    let mut config = Config::from_toml(&text).unwrap();
    config.service_users[0].delivery.retention = Duration::from_millis(300);
    let engine = Engine::start(config).unwrap();
    engine.set_config_path(file.clone());
    let admin = engine.admin_addr();
    let mut csp = Client::connect_csp(engine.csp_addr(), "csp").unwrap();
    // Five 0x8F75 alerts from one meter while the SU is away: one delivered, four throttled.
    let alert = |i: u64| {
        let mut h = Header::new(Kind::DeviceAlert);
        h.su_id = SU1;
        h.device_id = Eui64(0x00DB_1234_5678_0001);
        h.alert_code = 0x8F75;
        h.counter = i;
        Frame::new(h, Bytes::from_static(b"alert")).unwrap()
    };
    let last = csp.send_batch((0..5).map(alert)).unwrap();
    csp.wait_ack(last, T).unwrap();
    assert_eq!(
        common::http(admin, "POST", "/su/90-B3-D5-1F-30-01-00-00/pause", None).0,
        200
    );
    assert_eq!(common::http(admin, "POST", "/restrict", None).0, 200);
    // One reload taken (the file unchanged), one refused (a syntax error).
    assert_eq!(common::http(admin, "POST", "/reload", None).0, 200);
    std::fs::write(&file, "[engine\n").unwrap();
    assert_eq!(common::http(admin, "POST", "/reload", None).0, 400);
    // The delivered alert waits, unread, past its 300 ms retention.
    std::thread::sleep(Duration::from_millis(1_000));

    let scrape = parse(&get(admin, "/metrics"));
    let m = &scrape.samples;
    let v = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("missing {k}"));
    let su = r#"su="90-B3-D5-1F-30-01-00-00""#;
    assert_eq!(
        v(&format!(
            r#"dsplane_su_messages_total{{{su},level="3",outcome="throttled"}}"#
        )),
        4.0
    );
    assert_eq!(
        v(&format!(
            r#"dsplane_su_messages_total{{{su},level="3",outcome="expired"}}"#
        )),
        1.0
    );
    assert_eq!(v(&format!("dsplane_su_paused{{{su}}}")), 1.0);
    assert_eq!(v(&format!("dsplane_su_connected{{{su}}}")), 0.0);
    assert_eq!(v("dsplane_northbound_restricted"), 1.0);
    assert_eq!(v(r#"dsplane_config_reloads_total{result="success"}"#), 1.0);
    assert_eq!(v(r#"dsplane_config_reloads_total{result="failure"}"#), 1.0);
    assert_eq!(v("dsplane_storms_started_total"), 1.0);
    assert_eq!(scrape.types["dsplane_su_paused"], "gauge");
    assert_eq!(scrape.types["dsplane_su_messages_total"], "counter");
    assert_eq!(scrape.types["dsplane_config_reloads_total"], "counter");

    assert_eq!(common::http(admin, "POST", "/restore", None).0, 200);
    assert_eq!(
        common::http(admin, "POST", "/su/90-B3-D5-1F-30-01-00-00/resume", None).0,
        200
    );
    let m = parse(&get(admin, "/metrics")).samples;
    assert_eq!(m[&format!("dsplane_su_paused{{{su}}}")], 0.0);
    assert_eq!(m["dsplane_northbound_restricted"], 0.0);
    engine.shutdown();
    engine.join();
}

/// The strict parser refuses what Prometheus would, so the tests above mean something.
#[test]
fn the_strict_parser_refuses_broken_expositions() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n";
    parse(ok);
    for bad in [
        "# HELP a A.\n# TYPE a counter\na 1\n",
        "a_total 1\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total 1\na_total 2\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP g G.\n# TYPE g gauge\ng{a=\"1\",a=\"2\"} 1\n",
        "# HELP g G.\n# TYPE g gauge\ng{a=1} 1\n",
        "# HELP g G.\n# TYPE g gauge\ng 1\n# HELP f F.\n# TYPE f gauge\nf 1\ng 2\n",
    ] {
        let refused = std::panic::catch_unwind(|| parse(bad)).is_err();
        assert!(refused, "accepted:\n{bad}");
    }
}

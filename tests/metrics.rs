//! `/metrics` parses as the Prometheus text format and its counts match the traffic sent.

use std::collections::HashMap;
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

/// Parses the text format strictly: `# HELP`/`# TYPE` lines, and samples
/// `name{label="value",…} number` whose family was declared by a TYPE line.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(
                ["counter", "gauge", "summary", "histogram"].contains(&kind),
                "{line}"
            );
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line:?}"
        );
        let family = name.trim_end_matches("_sum").trim_end_matches("_count");
        assert!(
            types.contains_key(name) || types.contains_key(family),
            "no TYPE for {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap();
                for pair in inner.split(',') {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                    assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line:?}");
                }
            }
        }
        samples.insert(series.to_owned(), value);
    }
    samples
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
    // One refused HELLO, counted by the acceptor.
    assert!(Client::connect_su(engine.su_addr(), SU1, "wrong").is_err());
    std::thread::sleep(Duration::from_millis(600)); // two publications

    let m = parse(&get(engine.admin_addr(), "/metrics"));
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
    assert_eq!(v(r#"dsplane_latency_seconds_count{level="1"}"#), 3.0);
    assert!(v(r#"dsplane_latency_seconds{level="4",quantile="0.99"}"#) < 10.0);
    assert_eq!(
        v(r#"dsplane_queue_depth{peer="90-B3-D5-1F-30-01-00-00",tier="nms",level="4"}"#),
        0.0
    );
    assert_eq!(v(r#"dsplane_connections{port="su"}"#), 1.0);
    assert_eq!(v(r#"dsplane_connections{port="csp"}"#), 1.0);
    engine.shutdown();
    engine.join();
}

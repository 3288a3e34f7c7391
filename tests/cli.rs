//! The `dsplane` binary: `check-config`, and `run` serving traffic until SIGTERM, then exiting
//! cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use dsplane::client::Client;
use dsplane::ids::Eui64;
use dsplane::wire::{Frame, Header, Kind};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_dsplane");

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dsplane-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_names_the_bad_key_and_exits_2() {
    let bad = temp_file("bad.toml", "[engine]\nlevels = 0\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("engine.levels"), "{err}");

    let good = temp_file("good.toml", "[engine]\nlevels = 6\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("levels = 6"));
}

#[test]
fn run_serves_traffic_and_stops_on_sigterm() {
    let config = temp_file(
        "run.toml",
        r#"
[engine]
cores = 1
durability = "none"
data_dir = "DATA_DIR"
[listen]
su = "127.0.0.1:0"
csp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[[service_user]]
id = "90-B3-D5-1F-30-01-00-00"
token = "t-su"
[[csp]]
name = "c"
token = "t-csp"
"#,
    );
    let config = {
        let text = std::fs::read_to_string(&config).unwrap();
        let data = config.parent().unwrap().join("run-data");
        let _ = std::fs::remove_dir_all(&data);
        temp_file(
            "run.toml",
            &text.replace("DATA_DIR", &data.display().to_string()),
        )
    };
    let common::Dsplane {
        mut child,
        lines: rx,
        su: su_addr,
        csp: csp_addr,
    } = common::spawn_dsplane(&config);
    let su_id: Eui64 = "90-B3-D5-1F-30-01-00-00".parse().unwrap();
    let mut csp = Client::connect_csp(csp_addr, "t-csp").unwrap();
    let mut h = Header::new(Kind::DeviceAlert);
    h.su_id = su_id;
    h.alert_code = 0x8F1C;
    let id = csp
        .send(Frame::new(h, Bytes::from_static(b"alert")).unwrap())
        .unwrap();
    csp.wait_ack(id, Duration::from_secs(10)).unwrap();
    let mut su = Client::connect_su(su_addr, su_id, "t-su").unwrap();
    let f = su.recv(Duration::from_secs(10)).unwrap().unwrap();
    // No [priority] section: alerts get the default `alert_level`, 3.
    assert_eq!((f.header.kind, f.header.priority), (Kind::DeviceAlert, 3));
    assert_eq!(&f.payload[..], b"alert");

    // SIGHUP reloads the file (here unchanged) and the engine carries on.
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut reloaded = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        if line.contains("configuration reloaded") {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "no reload after SIGHUP");
    let id = csp
        .send(Frame::new(h, Bytes::from_static(b"again")).unwrap())
        .unwrap();
    csp.wait_ack(id, Duration::from_secs(10)).unwrap();
    let f = su.recv(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(&f.payload[..], b"again");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut saw_shutdown = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        saw_shutdown |= line.contains("shutting down");
    }
    assert!(saw_shutdown);
}

#[test]
fn json_logs_parse_and_never_carry_a_token() {
    let data = std::env::temp_dir().join(format!("dsplane-cli-json-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let config = temp_file(
        "json.toml",
        &format!(
            "[engine]\ncores = 1\ndurability = \"none\"\ndata_dir = \"{}\"\n[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"SU-SECRET-7f3a\"\n[[csp]]\nname = \"c\"\ntoken = \"CSP-SECRET-91bc\"\n",
            data.display()
        ),
    );
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("DSPLANE_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let (su_addr, csp_addr) = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no start-up line");
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        lines.push(line.clone());
        if json["message"] == "dsplane running" {
            break (
                json["su"]
                    .as_str()
                    .unwrap()
                    .parse::<std::net::SocketAddr>()
                    .unwrap(),
                json["csp"]
                    .as_str()
                    .unwrap()
                    .parse::<std::net::SocketAddr>()
                    .unwrap(),
            );
        }
    };
    let su_id: Eui64 = "90-B3-D5-1F-30-01-00-00".parse().unwrap();
    assert!(Client::connect_su(su_addr, su_id, "SU-SECRET-wrong").is_err());
    let _su = Client::connect_su(su_addr, su_id, "SU-SECRET-7f3a").unwrap();
    let _csp = Client::connect_csp(csp_addr, "CSP-SECRET-91bc").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        lines.push(line);
    }
    assert!(lines.len() > 5);
    for line in &lines {
        let _: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(!line.contains("SECRET"), "a token in the log: {line}");
    }
    assert!(lines.iter().any(|l| l.contains("SU HELLO refused")));
}

/// A token no output of the binary may ever show.
const SECRET: &str = "CLI-SeCrEt-0c4f9e";

#[test]
fn a_syntax_error_on_a_token_line_is_shown_without_the_token() {
    let text = format!(
        "[engine]\ncores = 1\n\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"{SECRET}\n"
    );
    let bad = temp_file("secret-syntax.toml", &text);
    for args in [&["check-config"][..], &["run", "--config"][..]] {
        let out = Command::new(BIN).args(args).arg(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let shown = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !shown.contains(SECRET),
            "{args:?} printed the token:\n{shown}"
        );
        // Where and what stay: the file, the line and the parser's message.
        assert!(shown.contains("secret-syntax.toml"), "{shown}");
        assert!(shown.contains("line 6"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}

#[test]
fn two_peers_with_one_token_are_refused_at_start_up() {
    let text = format!(
        "[engine]\ncores = 1\n[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"{SECRET}\"\n[[csp]]\nname = \"csp-a\"\ntoken = \"{SECRET}\"\n"
    );
    let bad = temp_file("same-token.toml", &text);
    for args in [&["check-config"][..], &["run", "--config"][..]] {
        let out = Command::new(BIN).args(args).arg(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains(SECRET), "{err}");
        assert!(
            err.contains("csp[0].token") && err.contains("service_user[0]"),
            "{err}"
        );
    }
}

#[test]
fn a_refused_sighup_reload_names_the_problem_and_logs_no_token() {
    let data = std::env::temp_dir().join(format!("dsplane-cli-hup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let good = format!(
        "[engine]\ncores = 1\ndurability = \"none\"\ndata_dir = \"{}\"\n[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"t-su\"\n[[csp]]\nname = \"csp-a\"\ntoken = \"t-csp\"\n",
        data.display()
    );
    let path = temp_file("hup.toml", &good);
    let common::Dsplane {
        mut child, lines, ..
    } = common::spawn_dsplane(&path);
    // Everything the engine logs from a SIGHUP on, until the refusal and a little after.
    let hup = |text: &str| -> String {
        std::fs::write(&path, text).unwrap();
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut seen = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match lines.recv_timeout(Duration::from_millis(300)) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) if seen.contains("reload refused") => break,
                Err(_) => {}
            }
        }
        seen
    };
    let logged = hup(&good.replace("\"t-csp\"", &format!("\"{SECRET}")));
    assert!(logged.contains("reload refused"), "{logged}");
    assert!(
        !logged.contains(SECRET),
        "the log shows the token:\n{logged}"
    );
    assert!(
        logged.contains("hup.toml") && logged.contains("line "),
        "{logged}"
    );
    // An empty file is refused too, naming the peers it lacks.
    let logged = hup("");
    assert!(logged.contains("reload refused"), "{logged}");
    assert!(
        logged.contains("service_user 90-B3-D5-1F-30-01-00-00") && logged.contains("csp csp-a"),
        "{logged}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

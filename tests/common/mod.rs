//! Helpers shared by the integration tests: the admin interface over plain HTTP, the real
//! `dsplane` binary started with its log read back, a closed port and a small engine.

#![allow(dead_code)] // Each test file uses some of these.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// One HTTP/1.1 request to the admin interface: (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// The `dsplane` binary running `run --config FILE`, its stderr lines on `lines`.
pub struct Dsplane {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub su: SocketAddr,
    pub csp: SocketAddr,
}

/// Starts `dsplane [extra args] run --config FILE` (human logs at `info`) and waits for its
/// "dsplane running" line, which names the ports it bound.
pub fn spawn_dsplane(config: &Path) -> Dsplane {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsplane"))
        .args(["run", "--config"])
        .arg(config)
        .env("DSPLANE_LOG", "info")
        .env_remove("DSPLANE_LOG_FORMAT")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let Ok(line) = lines.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no 'dsplane running' line");
        };
        if line.contains("dsplane running") {
            let field = |name: &str| -> SocketAddr {
                let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
                line[start..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            let (su, csp) = (field("su"), field("csp"));
            return Dsplane {
                child,
                lines,
                su,
                csp,
            };
        }
    }
}

/// A loopback address nothing listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An engine of one worker with durability `none` in `data_dir`, on ports of its own, for one
/// SU (`90-B3-D5-1F-30-01-00-00`, token `su-token`) and one CSP link (`c`, `csp-token`).
pub fn small_engine(data_dir: &Path) -> dsplane::engine::Engine {
    let text = format!(
        "[engine]\ncores = 1\ndurability = \"none\"\ndata_dir = \"{}\"\n[listen]\nsu = \"127.0.0.1:0\"\ncsp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-00\"\ntoken = \"su-token\"\n[[csp]]\nname = \"c\"\ntoken = \"csp-token\"\n",
        data_dir.display()
    );
    dsplane::engine::Engine::start(dsplane::config::Config::from_toml(&text).unwrap()).unwrap()
}

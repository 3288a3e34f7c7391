//! `dsplane client su|csp`: the protocol client on the command line, so that a newcomer can see
//! traffic flow by priority against `dsplane run` with the demo configuration.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Subcommand;
use dsplane::client::{Client, ClientError};
use dsplane::ids::{AlertCode, Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind};

const DEMO_SU: &str = "90-B3-D5-1F-30-01-00-00";

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Connect as a Service User, print every frame received (with its level) and ACK it.
    Su {
        /// The SU port.
        #[arg(long, default_value = "127.0.0.1:7100")]
        addr: SocketAddr,
        /// The SU's EUI-64.
        #[arg(long, default_value = DEMO_SU)]
        id: Eui64,
        /// Its token.
        #[arg(long, default_value = "demo-su-token")]
        token: String,
        /// Exit after this many seconds without a frame.
        #[arg(long, default_value_t = 3)]
        idle_exit_s: u64,
    },
    /// Connect as a CSP and send a backlog of responses and alerts for an SU, in a mix of
    /// levels: routine reads, alerts, an engineer's commissioning, and top-ups.
    Csp {
        /// The CSP port.
        #[arg(long, default_value = "127.0.0.1:7200")]
        addr: SocketAddr,
        /// The CSP's token.
        #[arg(long, default_value = "demo-csp-token")]
        token: String,
        /// The Service User to send to.
        #[arg(long, default_value = DEMO_SU)]
        su: Eui64,
        /// How many frames.
        #[arg(long, default_value_t = 40)]
        count: u64,
    },
}

/// (kind, SRV, alert code, what it is) in the order the CSP sends them.
const MIX: [(Kind, &str, u16, &str); 5] = [
    (
        Kind::Response,
        "4.1.1",
        0,
        "read instantaneous import registers",
    ),
    (
        Kind::DeviceAlert,
        "0.0",
        0x8F75,
        "strong magnetic field alert",
    ),
    (Kind::Response, "1.1.1", 0, "update import tariff"),
    (
        Kind::Response,
        "8.1.1",
        0,
        "commission device (engineer on site)",
    ),
    (Kind::Response, "2.2", 0, "top up device (prepayment)"),
];

/// Exit code when dsplane could not be reached or refused the HELLO: the run could not start.
const EXIT_NO_CONNECTION: u8 = 2;

/// Why a connection could not be made, in words an operator can act on: the address, what
/// failed, and what to check.
fn connect_error(addr: SocketAddr, port: &str, e: &ClientError) -> String {
    match e {
        ClientError::Io(io) => format!(
            "cannot connect to {addr} (dsplane's {port} port): {io}. Is dsplane running? Is the port right (--addr)?"
        ),
        ClientError::Refused { .. } => {
            let check = if port == "SU" {
                "Are the SU id and token right (--id, --token)?"
            } else {
                "Is the CSP token right (--token)?"
            };
            format!("{addr} refused the connection: {e}. {check}")
        }
        ClientError::Timeout => format!(
            "{addr} accepted the connection but did not answer the HELLO in time. Is it dsplane's {port} port?"
        ),
        other => format!("cannot open a session with {addr} ({port} port): {other}"),
    }
}

pub fn run(command: ClientCommand) -> ExitCode {
    match command {
        ClientCommand::Su {
            addr,
            id,
            token,
            idle_exit_s,
        } => su(addr, id, &token, Duration::from_secs(idle_exit_s)),
        ClientCommand::Csp {
            addr,
            token,
            su,
            count,
        } => csp(addr, &token, su, count),
    }
}

fn su(addr: SocketAddr, id: Eui64, token: &str, idle: Duration) -> ExitCode {
    let mut client = match Client::connect_su(addr, id, token) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsplane client: {}", connect_error(addr, "SU", &e));
            return ExitCode::from(EXIT_NO_CONNECTION);
        }
    };
    eprintln!("connected as Service User {id}; printing frames, ACKing each");
    println!(
        "{:>6}  {:>5}  {:<13} {:>7} {:>6} {:>8}  payload",
        "msg_id", "level", "kind", "srv", "alert", "counter"
    );
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        match client.recv(idle) {
            Ok(Some(f)) if f.header.kind.is_data() => {
                let h = f.header;
                println!(
                    "{:>6}  {:>5}  {:<13} {:>7} {:>6} {:>8}  {}",
                    h.msg_id,
                    h.priority,
                    h.kind.as_str(),
                    h.srv.to_string(),
                    AlertCode(h.alert_code).to_string(),
                    h.counter,
                    String::from_utf8_lossy(&f.payload)
                );
                n += 1;
                if let Err(e) = client.ack(h.msg_id) {
                    eprintln!("dsplane client: connection to {addr} lost: {e}");
                    return ExitCode::FAILURE;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                eprintln!("dsplane client: connection to {addr} lost: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!(
        "{n} frames in {:.1} s; no frame for {} s, exiting",
        start.elapsed().as_secs_f64(),
        idle.as_secs()
    );
    ExitCode::SUCCESS
}

fn csp(addr: SocketAddr, token: &str, su: Eui64, count: u64) -> ExitCode {
    let mut client = match Client::connect_csp(addr, token) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsplane client: {}", connect_error(addr, "CSP", &e));
            return ExitCode::from(EXIT_NO_CONNECTION);
        }
    };
    let now_ns = dsplane::unix_now();
    let frames = (0..count).map(|i| {
        let (kind, srv, alert, what) = MIX[(i % MIX.len() as u64) as usize];
        let mut h = Header::new(kind);
        h.su_id = su;
        h.device_id = Eui64(0x00DB_1234_5678_0000 + i);
        h.srv = srv.parse::<Srv>().unwrap_or(Srv(0));
        h.alert_code = alert;
        h.counter = i;
        h.created_ns = now_ns;
        Frame::new(h, Bytes::from(what)).unwrap_or_else(|_| Frame::empty(kind))
    });
    let last = match client.send_batch(frames) {
        Ok(last) => last,
        Err(e) => {
            eprintln!("dsplane client: connection to {addr} lost while sending: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.wait_ack(last, Duration::from_secs(10)) {
        Ok(others) => {
            let nacks: Vec<_> = others
                .iter()
                .filter(|f| f.header.kind == Kind::Nack)
                .collect();
            for f in &nacks {
                let reason = f
                    .header
                    .nack_reason()
                    .map_or_else(|| "reason unknown".to_owned(), |r| r.to_string());
                eprintln!(
                    "NACK msg_id {} reason {reason}: {}",
                    f.header.msg_id,
                    String::from_utf8_lossy(&f.payload)
                );
            }
            let refused = nacks.len() as u64;
            eprintln!(
                "sent {count} frames for Service User {su}: {} accepted, {refused} refused",
                count - refused
            );
            if count > 0 && refused >= count {
                eprintln!("dsplane client: every frame was refused; see the NACK reasons above");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dsplane client: no ACK from {addr} for the frames sent: {e}");
            ExitCode::FAILURE
        }
    }
}

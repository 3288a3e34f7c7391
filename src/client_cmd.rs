//! `dsplane client su|csp`: the protocol client on the command line, so that a newcomer can see
//! traffic flow by priority against `dsplane run` with the demo configuration.
//!
//! Both take every node's address (`--addr A,B,C`) and connect to the active one
//! ([`Client::connect_any`]); when the connection is lost they look for the active node again
//! (a takeover) and go on: `client su` reads on, `client csp` sends again every frame dsplane had
//! neither acknowledged nor refused, so nothing is dropped (the SU may receive some twice).

use std::net::{Shutdown, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Subcommand;
use dsplane::client::{is_standby_refusal, Client, ClientError};
use dsplane::ids::{AlertCode, Eui64, Srv};
use dsplane::wire::{Frame, Header, Kind};

const DEMO_SU: &str = "90-B3-D5-1F-30-01-00-00";

/// How long the first connection looks for the active node: long enough for a takeover under
/// way (a lease, 1 s by default), short enough that a wrong address is reported soon.
const CONNECT_DEADLINE: Duration = Duration::from_secs(3);
/// How long a lost connection looks for the active node: the old active's lease must run out,
/// then a standby must take over and load what was pending.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Reconnects in a row with nothing received (`su`) or answered (`csp`) in between, at most, so
/// that a node that takes the HELLO and then drops every connection cannot keep the client
/// looping.
const RECONNECTS_IN_A_ROW_MAX: u32 = 5;
/// How long `csp` waits on one connection for the ACKs (or NACKs) of what it sent on it.
const ACK_WAIT: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Connect as a Service User, print every frame received (with its level) and ACK it.
    ///
    /// With several nodes, give every node's address: it connects to the active one and, if the
    /// connection is lost, looks for the active node again (up to 10 s) and goes on.
    Su {
        /// The SU port: one address, or every node's, comma-separated (A,B,C); the active node's
        /// is found (a standby refuses with NACK 5, `standby; active node is <name>`).
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "ADDR[,ADDR...]",
            default_value = "127.0.0.1:7100"
        )]
        addr: Vec<SocketAddr>,
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
    ///
    /// With several nodes, give every node's address: it connects to the active one and, if the
    /// connection is lost, looks for the active node again (up to 10 s) and sends again every
    /// frame not yet acknowledged or refused (at least once: the SU may receive some twice).
    Csp {
        /// The CSP port: one address, or every node's, comma-separated (A,B,C); the active
        /// node's is found (a standby refuses with NACK 5, `standby; active node is <name>`).
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "ADDR[,ADDR...]",
            default_value = "127.0.0.1:7200"
        )]
        addr: Vec<SocketAddr>,
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

/// `127.0.0.1:7100` or `10.0.0.1:7100, 10.0.0.2:7100`.
fn addr_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a connection could not be made, in words an operator can act on: the addresses, what
/// each answered, and what to check.
fn connect_error(addrs: &[SocketAddr], port: &str, e: &ClientError) -> String {
    match e {
        ClientError::Refused { .. } => {
            let check = if port == "SU" {
                "Are the SU id and token right (--id, --token)?"
            } else {
                "Is the CSP token right (--token)?"
            };
            format!("{e}. {check}")
        }
        ClientError::NoActiveNode { waited, answers } => {
            let what = answers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let mut checks = Vec::new();
            if answers.iter().any(|a| matches!(a.last, ClientError::Io(_))) {
                checks.push("Is dsplane running? Is the port right (--addr)?".to_owned());
            }
            if answers.iter().any(|a| is_standby_refusal(&a.last)) {
                checks.push(
                    "A standby names the active node: is a node active, and is its address in --addr?"
                        .to_owned(),
                );
            }
            if answers
                .iter()
                .any(|a| !matches!(a.last, ClientError::Io(_)) && !is_standby_refusal(&a.last))
            {
                checks.push(format!("Is every address dsplane's {port} port?"));
            }
            format!(
                "cannot connect to an active dsplane node on the {port} port at {} (tried for {:.1} s): {what}. {}",
                addr_list(addrs),
                waited.as_secs_f64(),
                checks.join(" ")
            )
        }
        ClientError::Token => "a token must be 1 to 256 bytes (--token)".to_owned(),
        other => format!(
            "cannot open a session with {} ({port} port): {other}",
            addr_list(addrs)
        ),
    }
}

/// Whether `e` means the connection is gone (look for the active node again), rather than
/// dsplane misbehaving on it.
fn is_lost_connection(e: &ClientError) -> bool {
    matches!(e, ClientError::Closed | ClientError::Io(_))
}

pub fn run(command: ClientCommand) -> ExitCode {
    match command {
        ClientCommand::Su {
            addr,
            id,
            token,
            idle_exit_s,
        } => su(&addr, id, &token, Duration::from_secs(idle_exit_s)),
        ClientCommand::Csp {
            addr,
            token,
            su,
            count,
        } => csp(&addr, &token, su, count),
    }
}

fn su(addrs: &[SocketAddr], id: Eui64, token: &str, idle: Duration) -> ExitCode {
    let mut client = match Client::connect_any_su(addrs, id, token, CONNECT_DEADLINE) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsplane client: {}", connect_error(addrs, "SU", &e));
            return ExitCode::from(EXIT_NO_CONNECTION);
        }
    };
    eprintln!(
        "connected to {} as Service User {id}; printing frames, ACKing each",
        client.peer_addr()
    );
    println!(
        "{:>6}  {:>5}  {:<13} {:>7} {:>6} {:>8}  payload",
        "msg_id", "level", "kind", "srv", "alert", "counter"
    );
    let start = Instant::now();
    let mut n = 0u64;
    let mut reconnects_in_a_row = 0u32;
    loop {
        let lost = match client.recv(idle) {
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
                reconnects_in_a_row = 0;
                match client.ack(h.msg_id) {
                    Ok(()) => continue,
                    Err(e) => ClientError::Io(e),
                }
            }
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) if is_lost_connection(&e) => e,
            Err(e) => {
                eprintln!("dsplane client: {}: {e}", client.peer_addr());
                return ExitCode::FAILURE;
            }
        };
        if reconnects_in_a_row >= RECONNECTS_IN_A_ROW_MAX {
            eprintln!(
                "dsplane client: connection to {} lost ({lost}) again, after {reconnects_in_a_row} reconnects in a row with no frame in between; giving up",
                client.peer_addr()
            );
            return ExitCode::FAILURE;
        }
        eprintln!(
            "dsplane client: connection to {} lost ({lost}); looking for the active node",
            client.peer_addr()
        );
        // Closed first: the old node (if it is alive) must not wait for this one.
        let _ = client.stream().shutdown(Shutdown::Both);
        client = match Client::connect_any_su(addrs, id, token, RECONNECT_DEADLINE) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("dsplane client: {}", connect_error(addrs, "SU", &e));
                return ExitCode::FAILURE;
            }
        };
        reconnects_in_a_row += 1;
        eprintln!("reconnected to {}", client.peer_addr());
    }
    eprintln!(
        "{n} frames in {:.1} s; no frame for {} s, exiting",
        start.elapsed().as_secs_f64(),
        idle.as_secs()
    );
    ExitCode::SUCCESS
}

/// What became of a frame `csp` sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Neither acknowledged nor refused yet: sent again on the next connection.
    Waiting,
    Accepted,
    Refused,
}

fn csp(addrs: &[SocketAddr], token: &str, su: Eui64, count: u64) -> ExitCode {
    let mut client = match Client::connect_any_csp(addrs, token, CONNECT_DEADLINE) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsplane client: {}", connect_error(addrs, "CSP", &e));
            return ExitCode::from(EXIT_NO_CONNECTION);
        }
    };
    let now_ns = dsplane::unix_now();
    let frames: Vec<Frame> = (0..count)
        .map(|i| {
            let (kind, srv, alert, what) = MIX[(i % MIX.len() as u64) as usize];
            let mut h = Header::new(kind);
            h.su_id = su;
            h.device_id = Eui64(0x00DB_1234_5678_0000 + i);
            h.srv = srv.parse::<Srv>().unwrap_or(Srv(0));
            h.alert_code = alert;
            h.counter = i;
            h.created_ns = now_ns;
            Frame::new(h, Bytes::from(what)).unwrap_or_else(|_| Frame::empty(kind))
        })
        .collect();
    let mut fates = vec![Fate::Waiting; frames.len()];
    let mut reconnects = 0u32;
    let mut reconnects_in_a_row = 0u32;
    loop {
        // Every frame still waiting goes out on this connection, in order: numbered from its
        // first msg_id, as dsplane numbers them.
        let on_conn: Vec<usize> = (0..frames.len())
            .filter(|&i| fates[i] == Fate::Waiting)
            .collect();
        if on_conn.is_empty() {
            break;
        }
        let first = client.next_msg_id();
        let sent = client
            .send_batch(on_conn.iter().filter_map(|&i| frames.get(i).cloned()))
            .map_err(ClientError::Io);
        let before = on_conn.len();
        let result = sent.and_then(|_| wait_answers(&mut client, first, &on_conn, &mut fates));
        let waiting = on_conn
            .iter()
            .filter(|&&i| fates[i] == Fate::Waiting)
            .count();
        let lost = match result {
            Ok(()) => continue,
            Err(e) if is_lost_connection(&e) => e,
            Err(ClientError::Timeout) => {
                eprintln!(
                    "dsplane client: no ACK from {} within {} s for {waiting} of the {before} frames sent on this connection; they may not have been taken",
                    client.peer_addr(),
                    ACK_WAIT.as_secs()
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("dsplane client: {}: {e}", client.peer_addr());
                return ExitCode::FAILURE;
            }
        };
        reconnects_in_a_row = if waiting < before {
            0
        } else {
            reconnects_in_a_row + 1
        };
        if reconnects_in_a_row > RECONNECTS_IN_A_ROW_MAX {
            eprintln!(
                "dsplane client: connection to {} lost ({lost}) {reconnects_in_a_row} times in a row with nothing acknowledged; giving up with {waiting} frames not acknowledged",
                client.peer_addr()
            );
            return ExitCode::FAILURE;
        }
        eprintln!(
            "dsplane client: connection to {} lost ({lost}) with {waiting} frames not acknowledged; looking for the active node to send them again",
            client.peer_addr()
        );
        let _ = client.stream().shutdown(Shutdown::Both);
        client = match Client::connect_any_csp(addrs, token, RECONNECT_DEADLINE) {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "dsplane client: {}; {waiting} frames were not acknowledged",
                    connect_error(addrs, "CSP", &e)
                );
                return ExitCode::FAILURE;
            }
        };
        reconnects += 1;
        eprintln!(
            "reconnected to {}; sending the {waiting} frames not acknowledged again",
            client.peer_addr()
        );
    }
    let refused = fates.iter().filter(|&&f| f == Fate::Refused).count() as u64;
    let again = if reconnects > 0 {
        format!(" ({reconnects} reconnects: frames sent again may reach the SU twice)")
    } else {
        String::new()
    };
    eprintln!(
        "sent {count} frames for Service User {su}: {} accepted, {refused} refused{again}",
        count - refused
    );
    if count > 0 && refused >= count {
        eprintln!("dsplane client: every frame was refused; see the NACK reasons above");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Reads until every frame of `on_conn` (sent on this connection from msg_id `first`, in that
/// order) is acknowledged or refused, printing the NACKs.
fn wait_answers(
    client: &mut Client,
    first: u64,
    on_conn: &[usize],
    fates: &mut [Fate],
) -> Result<(), ClientError> {
    let deadline = Instant::now() + ACK_WAIT;
    let mut answered = 0;
    // The frame of this connection's `msg_id`, if it is one of `on_conn`.
    let frame_of = |msg_id: u64| {
        msg_id
            .checked_sub(first)
            .and_then(|k| usize::try_from(k).ok())
            .and_then(|k| on_conn.get(k).copied())
    };
    while answered < on_conn.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = client.recv(left)? else {
            return Err(ClientError::Timeout);
        };
        match f.header.kind {
            // ACKs are cumulative: everything up to msg_id not refused was taken.
            Kind::Ack => {
                let through = f
                    .header
                    .msg_id
                    .checked_sub(first)
                    .map_or(0, |k| k.saturating_add(1));
                for &i in on_conn
                    .iter()
                    .take(usize::try_from(through).unwrap_or(usize::MAX))
                {
                    if let Some(fate @ Fate::Waiting) = fates.get_mut(i) {
                        *fate = Fate::Accepted;
                        answered += 1;
                    }
                }
            }
            Kind::Nack => {
                let reason = f
                    .header
                    .nack_reason()
                    .map_or_else(|| "reason unknown".to_owned(), |r| r.to_string());
                eprintln!(
                    "NACK msg_id {} reason {reason}: {}",
                    f.header.msg_id,
                    String::from_utf8_lossy(&f.payload)
                );
                if let Some(fate @ Fate::Waiting) =
                    frame_of(f.header.msg_id).and_then(|i| fates.get_mut(i))
                {
                    *fate = Fate::Refused;
                    answered += 1;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

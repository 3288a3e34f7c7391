//! The configuration file (ENGINE.md §10): parsing, defaults and validation.
//!
//! # Two stages
//!
//! The TOML text is first read into *raw* structs ([`RawConfig`]) that mirror the file: every key
//! has a default (`#[serde(default)]`) and unknown keys are refused (`deny_unknown_fields`), so a
//! typo is an error with its line and column, not a silently ignored setting. The raw form is then
//! *validated* into a [`Config`] whose fields are typed ([`Eui64`], [`Srv`], [`Level`],
//! [`SocketAddr`], [`Duration`]) and whose relations hold (`window_reserved_top < window`,
//! `nms_per_su <= nms_total`, every level at most `levels`, …). Code that holds a `Config` never
//! re-checks anything ("parse, don't validate").
//!
//! # Errors
//!
//! A validation error is a [`ConfigError::Invalid`] naming the key (`service_user[2].id`,
//! `priority.rules[0].level`), the bad value as written and what was expected. Nothing in a config
//! file can make dsplane panic.
//!
//! # Limits
//!
//! Every numeric setting has a ceiling named `*_MAX` below; they keep derived arithmetic (rates in
//! nanoseconds, ring sizes, memory budgets) far from overflow and catch a misplaced zero.
//!
//! # Secrets
//!
//! Tokens are held in [`Secret`], whose `Debug` never shows the value, and
//! [`Config::effective_toml`] prints them redacted, so neither a log line nor `check-config` leaks
//! one. A token may come from the environment (`token_env`) instead of the file. Errors never show
//! one either: a TOML error on a line that may set a secret shows `key = <redacted>` instead of
//! the line ([`TomlError`]), and a value error on a token gives only its length. No two peers may
//! share a token, nor use the admin token; the error names both peers.
//!
//! # Reloads
//!
//! [`reload_refusal`] says why a running engine must not take a new file: it drops or adds a
//! peer, drops a key the running file sets, or empties the rules. Every key has a default, so
//! without it an empty or truncated file would be valid and would drop every rule.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{Eui64, Level, Mode, Srv, LEVELS_MAX, LEVELS_MIN};
use crate::limiter::ReleaseStart;
use crate::limits;

/// The embedded default configuration, used by `dsplane run` with no `--config`.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Largest payload a configuration may allow: PROTOCOL.md's hard ceiling of 16 MiB.
pub const PAYLOAD_BYTES_CEILING: u32 = crate::wire::PAYLOAD_BYTES_MAX_CEILING;
/// Most connections per listening port: far above any real DSP's peers, below the file
/// descriptors a hardened unit allows (`LimitNOFILE`).
pub const CONNECTIONS_MAX: u32 = 1 << 20;
/// Most connections waiting for their HELLO at once (`listen.handshakes_pending_max`).
pub const HANDSHAKES_PENDING_MAX: u32 = 65_536;
/// Shortest and longest HELLO deadline (`listen.hello_deadline_ms`): long enough for a peer on
/// a slow WAN link, short enough that idle connections cannot pile up.
pub const HELLO_DEADLINE_MS_MIN: u32 = 100;
/// See [`HELLO_DEADLINE_MS_MIN`].
pub const HELLO_DEADLINE_MS_MAX: u32 = 60_000;
/// Most admin connections open at once (`listen.admin_connections_max`).
pub const ADMIN_CONNECTIONS_MAX: u32 = 4_096;
/// Most admin worker threads (`listen.admin_workers`).
pub const ADMIN_WORKERS_MAX: u32 = 64;
/// Shortest and longest deadline on reading an admin request (`listen.admin_request_deadline_ms`).
pub const ADMIN_REQUEST_DEADLINE_MS_MIN: u32 = 100;
/// See [`ADMIN_REQUEST_DEADLINE_MS_MIN`].
pub const ADMIN_REQUEST_DEADLINE_MS_MAX: u32 = 60_000;
/// Largest admin request body (`listen.admin_body_bytes_max`).
pub const ADMIN_BODY_BYTES_MAX: u32 = 16 * 1024 * 1024;
/// Most worker cores a configuration may ask for.
pub const CORES_MAX: u32 = 1024;
/// Longest group-commit interval: beyond a second, `batch` would hold ACKs longer than any
/// adapter's timeout.
pub const FLUSH_INTERVAL_MS_MAX: u32 = 1000;
/// Longest idle timeout: one day.
pub const IDLE_TIMEOUT_S_MAX: u32 = 86_400;
/// Highest delivery or intake rate, messages per second, for one SU, one CSP link or the engine:
/// the limiter's own limit, so that whatever validates here builds a limiter.
pub const RATE_PER_S_MAX: u32 = crate::limiter::RATE_PER_S_MAX;
/// Largest burst, messages (the limiter's limit).
pub const BURST_MAX: u32 = crate::limiter::BURST_MAX;
/// Largest in-flight window, frames.
pub const WINDOW_FRAMES_MAX: u32 = 65_536;
/// Largest Northbound Message Store, frames, in all.
pub const NMS_FRAMES_MAX: u64 = 100_000_000;
/// Longest release ramp, seconds: one hour (the limiter's limit).
pub const RELEASE_RAMP_S_MAX: u32 = 3_600;
const _: () = assert!(
    RELEASE_RAMP_S_MAX as u64 * crate::NANOS_PER_SEC == crate::limiter::RELEASE_RAMP_NS_MAX
);
/// Longest retention, hours: thirty days.
pub const RETENTION_H_MAX: u32 = 720;
/// Longest alert-storm window, seconds: one day.
pub const STORM_WINDOW_S_MAX: u32 = 86_400;
/// Most (device, alert code) keys the storm detector may track.
pub const STORM_TRACKED_KEYS_MAX: u64 = 100_000_000;
/// Most priority rules.
pub const RULES_MAX: usize = 4_096;
/// Most Service Users in one configuration.
pub const SERVICE_USERS_MAX: usize = 65_536;
/// Most CSP links.
pub const CSPS_MAX: usize = 64;
/// Longest token, bytes (PROTOCOL.md: a HELLO token is 1–256 bytes).
pub const TOKEN_BYTES_MAX: usize = 256;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The text is not TOML, or has an unknown key or a value of the wrong type.
    #[error("config is not valid: {0}")]
    Toml(TomlError),
    /// A key has a value outside what it allows.
    #[error("config key `{key}` = {value}: {expected}")]
    Invalid {
        /// The key's path, e.g. `service_user[1].id`.
        key: String,
        /// The value as written (tokens are never shown).
        value: String,
        /// What would have been accepted.
        expected: String,
    },
}

impl ConfigError {
    /// The error as one message naming the file it came from (once: a read error names it
    /// already), for the start-up error and a refused reload.
    pub fn in_file(&self, file: &Path) -> String {
        match self {
            ConfigError::Io { .. } => self.to_string(),
            _ => format!("{}: {self}", file.display()),
        }
    }
}

/// A TOML syntax or type error: its line and column and the parser's message, with the line
/// itself shown unless it may hold a secret.
///
/// The parser's own error renders the offending line with a caret under the fault, and keeps
/// the whole file for that (its `Debug` prints it). A line that sets a token would show the
/// token, in `check-config`, the start-up error, a refused reload's log line and the
/// `POST /reload` answer. So the parser's error is rendered here once, and dropped: on a line
/// that may hold a secret (one that mentions a token, a secret, a password or a credential) the
/// excerpt becomes `key = <redacted>`, and any value of such a line is cut out of the message
/// too (a type error quotes the value).
#[derive(Debug, Clone)]
pub struct TomlError {
    /// What `Display` prints: the parser's rendering, its excerpt redacted where needed.
    rendered: String,
    /// 1-based line of the fault, when the parser knows it.
    line: Option<usize>,
    /// The parser's message, secrets cut out.
    message: String,
}

impl TomlError {
    /// The 1-based line of the fault, when known.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// What is wrong, without the excerpt.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn new(error: &toml::de::Error, text: &str) -> TomlError {
        let lines: Vec<&str> = text.split('\n').collect();
        // Values of every line that may hold a secret, to cut out of the message.
        let secrets: Vec<String> = lines
            .iter()
            .filter(|l| may_hold_secret(l))
            .flat_map(|l| secret_values(l))
            .collect();
        let message = scrub(error.message(), &secrets);
        let line = error.span().map(|span| {
            let end = span.start.min(text.len());
            text.as_bytes()
                .get(..end)
                .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
        });
        let rendered = match line {
            Some(index) if excerpt_may_hold_secret(&lines, index) => {
                let original = error.to_string();
                let header = original.lines().next().unwrap_or("TOML parse error");
                let number = index + 1;
                let gutter = " ".repeat(number.to_string().len());
                let shown = lines
                    .get(index)
                    .map_or_else(String::new, |l| redacted_line(l));
                format!("{header}\n{gutter} |\n{number} | {shown}\n{gutter} |\n{message}\n")
            }
            _ => scrub(&error.to_string(), &secrets),
        };
        TomlError {
            rendered,
            line: line.map(|i| i + 1),
            message,
        }
    }
}

impl fmt::Display for TomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rendered)
    }
}

/// Whether a line of a config file may set a secret: it names a token (`token`, `token_env`,
/// `[admin] token`, a token in an inline table), or looks like any other secret. Deliberately
/// broad: a comment that mentions a token only loses its excerpt.
fn may_hold_secret(line: &str) -> bool {
    const SECRET_WORDS: [&str; 4] = ["token", "secret", "passw", "credential"];
    let lower = line.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| lower.contains(w))
}

/// Whether the excerpt of line `index` may show a secret: the line may hold one, or a line
/// before it that may hold one opens a multi-line string, which could run on to this line.
fn excerpt_may_hold_secret(lines: &[&str], index: usize) -> bool {
    lines.get(index).is_some_and(|l| may_hold_secret(l))
        || lines
            .iter()
            .take(index)
            .any(|l| may_hold_secret(l) && (l.contains("\"\"\"") || l.contains("'''")))
}

/// A secret line as an excerpt: its key, if it starts with a plain one, and nothing else.
fn redacted_line(line: &str) -> String {
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
    });
    match key {
        Some(key) => format!("{key} = <redacted>"),
        None => "<redacted>".to_owned(),
    }
}

/// The values a secret line may carry: every quoted string on it (an unterminated one runs to
/// the end of the line) and whatever follows its first `=`.
fn secret_values(line: &str) -> Vec<String> {
    let mut values = Vec::new();
    if let Some((_, rest)) = line.split_once('=') {
        values.push(rest.trim().to_owned());
    }
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '"' || c == '\'' {
            values.push(chars.by_ref().take_while(|&d| d != c).collect());
        }
    }
    values.retain(|v| !v.is_empty());
    values
}

/// `text` with every secret value cut out: long ones wherever they appear, short ones (which
/// could match ordinary words) where quoted.
fn scrub(text: &str, secrets: &[String]) -> String {
    /// Below this many bytes a value is cut out only where it is quoted.
    const BARE_BYTES_MIN: usize = 4;
    let mut out = text.to_owned();
    for secret in secrets {
        for quote in ['"', '`', '\''] {
            out = out.replace(&format!("{quote}{secret}{quote}"), "<redacted>");
        }
        if secret.len() >= BARE_BYTES_MIN {
            out = out.replace(secret.as_str(), "<redacted>");
        }
    }
    out
}

fn invalid(
    key: impl Into<String>,
    value: impl fmt::Display,
    expected: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// A token whose value never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Secret(token.into())
    }

    /// The token's bytes, for a constant-time comparison.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The token as text, for printing the demo tokens at start-up.
    pub fn expose_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

// ---------------------------------------------------------------------------------------------
// Raw form: mirrors the file.

/// The file as written, with defaults filled in. See [`Config`] for the validated form.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawConfig {
    pub engine: RawEngine,
    pub listen: RawListen,
    pub admin: RawAdmin,
    pub delivery: RawDelivery,
    pub service_requests: RawServiceRequests,
    pub service_user: Vec<RawServiceUser>,
    pub csp: Vec<RawCsp>,
    pub priority: RawPriority,
    pub alert_storm: RawAlertStorm,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<RawCluster>,
}

/// `[cluster]` (high availability on PostgreSQL, `docs/ha.md`): absent for a single node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawCluster {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_env: Option<String>,
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_lease_ms() -> u64 {
    1_000
}

/// `[engine]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawEngine {
    pub cores: u32,
    pub levels: u8,
    pub data_dir: PathBuf,
    pub durability: String,
    pub flush_interval_ms: u32,
    pub max_payload: u32,
    pub idle_timeout_s: u32,
    pub scheduling: String,
}

impl Default for RawEngine {
    fn default() -> Self {
        RawEngine {
            cores: 0,
            levels: 4,
            data_dir: PathBuf::from("./dsplane-data"),
            durability: "batch".into(),
            flush_interval_ms: 2,
            max_payload: 65_536,
            idle_timeout_s: 60,
            scheduling: "priority".into(),
        }
    }
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawListen {
    pub su: String,
    pub csp: String,
    pub admin: String,
    /// Most authenticated connections open at once on each of the SU and CSP ports.
    pub connections_max: u32,
    /// Most connections waiting for their HELLO at once, both ports together.
    pub handshakes_pending_max: u32,
    /// Of those, most from one source address.
    pub handshakes_per_address_max: u32,
    /// How long a new connection has to send its HELLO, ms.
    pub hello_deadline_ms: u32,
    /// Most admin connections open at once.
    pub admin_connections_max: u32,
    /// Admin worker threads (fixed).
    pub admin_workers: u32,
    /// How long an admin client has to send its whole request (headers and body), ms.
    pub admin_request_deadline_ms: u32,
    /// Largest admin request body; a larger one is answered 413.
    pub admin_body_bytes_max: u32,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            su: "127.0.0.1:7100".into(),
            csp: "127.0.0.1:7200".into(),
            admin: "127.0.0.1:7300".into(),
            connections_max: 4096,
            handshakes_pending_max: 1024,
            handshakes_per_address_max: 16,
            hello_deadline_ms: 3_000,
            admin_connections_max: 64,
            admin_workers: 2,
            admin_request_deadline_ms: 5_000,
            admin_body_bytes_max: 65_536,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawAdmin {
    pub token: String,
    pub token_env: Option<String>,
}

/// `[delivery]`: northbound defaults for every SU.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawDelivery {
    pub rate: u32,
    pub burst: u32,
    pub window: u32,
    pub window_reserved_top: u32,
    pub nms_per_su: u64,
    pub nms_total: u64,
    pub release_start: f64,
    pub release_ramp_s: u32,
    pub retention_h: u32,
}

impl Default for RawDelivery {
    fn default() -> Self {
        RawDelivery {
            rate: 1000,
            burst: 100,
            window: 64,
            window_reserved_top: 8,
            nms_per_su: 10_000,
            nms_total: 1_000_000,
            release_start: 0.1,
            release_ramp_s: 30,
            retention_h: 48,
        }
    }
}

/// `[service_requests]`: southbound intake (SECMP0067).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawServiceRequests {
    pub capacity: u32,
    pub operating_threshold: f64,
    pub sr_rate: u32,
    pub sr_burst: u32,
}

impl Default for RawServiceRequests {
    fn default() -> Self {
        RawServiceRequests {
            capacity: 100_000,
            operating_threshold: 0.8,
            sr_rate: 500,
            sr_burst: 100,
        }
    }
}

/// One `[[service_user]]`. Absent overrides take the `[delivery]` / `[service_requests]` value.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawServiceUser {
    pub id: String,
    pub name: Option<String>,
    pub token: Option<String>,
    pub token_env: Option<String>,
    pub rate: Option<u32>,
    pub burst: Option<u32>,
    pub window: Option<u32>,
    pub sr_rate: Option<u32>,
    pub sr_burst: Option<u32>,
}

/// One `[[csp]]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawCsp {
    pub name: String,
    pub token: Option<String>,
    pub token_env: Option<String>,
    pub rate: Option<u32>,
    pub burst: Option<u32>,
    pub window: Option<u32>,
    pub connections_max: Option<u32>,
    pub device_ranges: Vec<String>,
}

/// `[priority]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawPriority {
    pub default_level: u8,
    pub scheduled_response_level: Option<u8>,
    pub alert_level: u8,
    pub rules: Vec<RawRule>,
    pub high_priority_alerts: Vec<RawAlertLevel>,
}

impl Default for RawPriority {
    fn default() -> Self {
        RawPriority {
            default_level: 4,
            // Absent means "the lowest level", whatever `levels` is.
            scheduled_response_level: None,
            alert_level: 3,
            rules: Vec::new(),
            high_priority_alerts: Vec::new(),
        }
    }
}

/// One entry of `priority.rules`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawRule {
    pub srv: String,
    #[serde(default)]
    pub mode: Option<String>,
    pub level: u8,
}

/// One entry of `priority.high_priority_alerts`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawAlertLevel {
    pub code: u16,
    pub level: u8,
}

/// `[alert_storm]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawAlertStorm {
    pub threshold: u32,
    pub window_s: u32,
    pub exclusions: Vec<u16>,
    pub max_tracked_keys: u64,
}

impl Default for RawAlertStorm {
    fn default() -> Self {
        RawAlertStorm {
            threshold: 10,
            window_s: 60,
            exclusions: Vec::new(),
            max_tracked_keys: 4_000_000,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validated form.

/// How durable a frame must be before dsplane ACKs it (ENGINE.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In memory only.
    None,
    /// Written and flushed in groups every `flush_interval`.
    Batch,
    /// Flushed before each ACK.
    Sync,
    /// Committed in PostgreSQL before each ACK, in groups every `flush_interval`; needs
    /// `[cluster]` (`docs/ha.md`).
    Replicated,
}

/// Delivery order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// Strict priority by level, FIFO within a level.
    Priority,
    /// First come, first served with no levels: how DSPs deliver today, for comparison.
    Fifo,
}

/// A validated configuration. Build it with [`Config::from_toml`], [`Config::load`] or
/// [`Config::embedded_default`].
#[derive(Debug, Clone)]
pub struct Config {
    /// `[engine]`.
    pub engine: Engine,
    /// `[listen]`.
    pub listen: Listen,
    /// Bearer token for the admin interface; `None` = no token asked (loopback only).
    pub admin_token: Option<Secret>,
    /// `[delivery]` defaults (each SU has its resolved copy in [`ServiceUser::delivery`]).
    pub delivery: Delivery,
    /// `[service_requests]`.
    pub service_requests: ServiceRequests,
    /// Every configured SU, in file order.
    pub service_users: Vec<ServiceUser>,
    /// Every CSP link, in file order.
    pub csps: Vec<Csp>,
    /// `[priority]`.
    pub priority: Priority,
    /// `[alert_storm]`.
    pub alert_storm: AlertStorm,
    /// `[cluster]`, if the file has one.
    pub cluster: Option<Cluster>,
    raw: RawConfig,
    /// Every key the file sets (`true` for a table), for [`reload_refusal`].
    keys: BTreeMap<KeyPath, bool>,
}

/// `[engine]`, validated.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct Engine {
    /// Worker cores; 0 = all.
    pub cores: u32,
    pub levels: u8,
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub flush_interval: Duration,
    /// `max_payload`: the largest payload a frame may carry.
    pub payload_bytes_max: u32,
    pub idle_timeout: Duration,
    pub scheduling: Scheduling,
}

/// `[listen]`, validated.
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct Listen {
    pub su: SocketAddr,
    pub csp: SocketAddr,
    pub admin: SocketAddr,
    /// `connections_max`: most authenticated connections open at once per port. Connections
    /// still in their handshake are not counted: they have their own limits below.
    pub connections_max: u32,
    /// `handshakes_pending_max`: connections waiting for their HELLO, both ports together.
    pub handshakes_pending_max: u32,
    /// `handshakes_per_address_max`: of those, from one source address.
    pub handshakes_per_address_max: u32,
    /// `hello_deadline_ms` (never longer than `engine.idle_timeout_s`).
    pub hello_deadline: Duration,
    /// `admin_connections_max`: admin connections open at once.
    pub admin_connections_max: u32,
    /// `admin_workers`: the admin interface's fixed worker threads.
    pub admin_workers: u32,
    /// `admin_request_deadline_ms`: time to send a whole admin request.
    pub admin_request_deadline: Duration,
    /// `admin_body_bytes_max`: largest admin request body (else 413).
    pub admin_body_bytes_max: u32,
}

/// Northbound delivery settings for one SU.
#[derive(Debug, Clone, Copy, PartialEq)]
#[allow(missing_docs)]
pub struct Delivery {
    pub rate: u32,
    pub burst: u32,
    pub window: u32,
    pub window_reserved_top: u32,
    pub nms_per_su: u64,
    pub nms_total: u64,
    /// Fraction of `rate` a release starts at, in (0, 1].
    pub release_start: ReleaseStart,
    pub release_ramp: Duration,
    pub retention: Duration,
}

/// `[service_requests]`, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
#[allow(missing_docs)]
pub struct ServiceRequests {
    pub capacity: u32,
    pub operating_threshold: f64,
    pub sr_rate: u32,
    pub sr_burst: u32,
}

/// One Service User.
#[derive(Debug, Clone)]
pub struct ServiceUser {
    /// Its EUI-64.
    pub id: Eui64,
    /// A label for logs; defaults to the id.
    pub name: String,
    /// The token it must present in HELLO.
    pub token: Secret,
    /// Its northbound settings, overrides applied.
    pub delivery: Delivery,
    /// Its Service Request allocation, requests/s.
    pub sr_rate: u32,
    /// Its Service Request burst.
    pub sr_burst: u32,
}

/// An inclusive range of device EUI-64s routed to one CSP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRange {
    /// First device in the range.
    pub first: Eui64,
    /// Last device in the range (inclusive).
    pub last: Eui64,
}

impl DeviceRange {
    /// Whether `device` is in the range.
    pub fn contains(&self, device: Eui64) -> bool {
        self.first <= device && device <= self.last
    }
}

/// One CSP link.
#[derive(Debug, Clone)]
pub struct Csp {
    /// Its name, as it appears in logs and metrics.
    pub name: String,
    /// The token it must present in HELLO.
    pub token: Secret,
    /// Southbound rate to it, requests/s.
    pub rate: u32,
    /// Southbound burst.
    pub burst: u32,
    /// Southbound in-flight window, shared by its connections.
    pub window: u32,
    /// Most connections it may hold at once; a HELLO beyond them is refused (NACK 5).
    pub connections_max: u32,
    /// The devices it serves; empty = every device no other CSP claims.
    pub device_ranges: Vec<DeviceRange>,
}

/// How a rule matches an SRV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SrvPattern {
    /// Exactly this SRV (`"2.2"`, `"4.1.1"`).
    Exact(Srv),
    /// Every SRV with this major (`"7.*"`).
    Major(u8),
    /// Every SRV with this major and minor (`"8.1.*"`).
    MajorMinor(u8, u8),
}

impl SrvPattern {
    /// Parses `"2.2"`, `"4.1.1"`, `"7.*"` or `"8.1.*"`.
    pub fn parse(text: &str) -> Option<SrvPattern> {
        if let Some(prefix) = text.strip_suffix(".*") {
            let parts: Vec<&str> = prefix.split('.').collect();
            let num = |s: &str| -> Option<u8> {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                s.parse().ok()
            };
            return match parts.as_slice() {
                [major] => Some(SrvPattern::Major(num(major)?)),
                [major, minor] => Some(SrvPattern::MajorMinor(num(major)?, num(minor)?)),
                _ => None,
            };
        }
        text.parse::<Srv>().ok().map(SrvPattern::Exact)
    }

    /// Whether the pattern matches `srv`.
    pub fn matches(self, srv: Srv) -> bool {
        match self {
            SrvPattern::Exact(s) => s == srv,
            SrvPattern::Major(major) => srv.major() == major,
            SrvPattern::MajorMinor(major, minor) => srv.major() == major && srv.minor() == minor,
        }
    }
}

impl fmt::Display for SrvPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SrvPattern::Exact(s) => s.fmt(f),
            SrvPattern::Major(major) => write!(f, "{major}.*"),
            SrvPattern::MajorMinor(major, minor) => write!(f, "{major}.{minor}.*"),
        }
    }
}

/// One REQUEST classification rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Which SRVs it matches.
    pub srv: SrvPattern,
    /// Which mode it matches; `None` = any.
    pub mode: Option<Mode>,
    /// The level it gives.
    pub level: Level,
}

/// `[priority]`, validated.
#[derive(Debug, Clone)]
pub struct Priority {
    /// The number of levels (copied from `[engine]`).
    pub levels: u8,
    /// Level of a REQUEST no rule matches.
    pub default_level: Level,
    /// Level of a RESPONSE to a DCC-scheduled request.
    pub scheduled_response_level: Level,
    /// Level of an alert not in `high_priority_alerts`.
    pub alert_level: Level,
    /// REQUEST rules.
    pub rules: Vec<Rule>,
    /// Alert codes with their own level.
    pub high_priority_alerts: Vec<(u16, Level)>,
}

/// `[cluster]`, validated.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// This node's name, unique in the cluster.
    pub node: String,
    /// The libpq connection string (it may hold a password).
    pub postgres: Secret,
    /// How long a lease lasts without renewal, ms.
    pub lease_ms: u64,
}

/// `[alert_storm]`, validated.
#[derive(Debug, Clone)]
pub struct AlertStorm {
    /// A key storms after more than this many alerts within `window`.
    pub threshold: u32,
    /// The counting window.
    pub window: Duration,
    /// Alert codes never throttled.
    pub exclusions: Vec<u16>,
    /// Most keys tracked at once.
    pub max_tracked_keys: u64,
}

impl Config {
    /// The embedded default ([`DEFAULT_TOML`]), validated.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::from_toml(DEFAULT_TOML)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates TOML text, taking `token_env` values from the process environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, |name| std::env::var(name).ok())
    }

    /// Parses and validates TOML text, looking `token_env` names up with `env`.
    pub fn from_toml_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Toml(TomlError::new(&e, text)))?;
        let mut config = Config::validate(raw, &env)?;
        // The text parsed as `RawConfig`, so it parses as a table too.
        if let Ok(table) = toml::from_str::<toml::Table>(text) {
            config.keys = keys_of(&table);
        }
        Ok(config)
    }

    /// The configuration as a TOML file, with defaults and per-SU overrides filled in and every
    /// token redacted: what `dsplane check-config` prints.
    pub fn effective_toml(&self) -> String {
        // `self.raw` had its tokens redacted when it was validated.
        let mut raw = self.raw.clone();
        for (su, resolved) in raw.service_user.iter_mut().zip(&self.service_users) {
            su.name = Some(resolved.name.clone());
            su.rate = Some(resolved.delivery.rate);
            su.burst = Some(resolved.delivery.burst);
            su.window = Some(resolved.delivery.window);
            su.sr_rate = Some(resolved.sr_rate);
            su.sr_burst = Some(resolved.sr_burst);
        }
        for (csp, resolved) in raw.csp.iter_mut().zip(&self.csps) {
            csp.rate = Some(resolved.rate);
            csp.burst = Some(resolved.burst);
            csp.window = Some(resolved.window);
            csp.connections_max = Some(resolved.connections_max);
        }
        raw.priority.scheduled_response_level = Some(self.priority.scheduled_response_level.get());
        toml::to_string_pretty(&raw)
            .map(|text| hex_alert_codes(&text))
            .unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    /// What is legal but unwise in this configuration, one sentence each, for `check-config`
    /// to print as warnings: an admin interface without a token, and a peer using a token of
    /// the embedded demo configuration (published with dsplane, so anyone could connect as it).
    /// Tokens are never shown, only the key that sets them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.admin_token.is_none() {
            out.push(format!(
                "admin.token is empty: the admin interface on {} runs without authentication, so \
                 any local user or process can pause Service Users, restrict traffic and reload; \
                 set admin.token or admin.token_env",
                self.listen.admin
            ));
        }
        let demo = demo_tokens();
        let source = |token_env: &Option<String>| {
            if token_env.is_some() {
                "token_env"
            } else {
                "token"
            }
        };
        let peers = self
            .service_users
            .iter()
            .zip(&self.raw.service_user)
            .enumerate()
            .map(|(i, (su, raw))| {
                (
                    format!("service_user[{i}].{}", source(&raw.token_env)),
                    format!("Service User {}", su.id),
                    &su.token,
                )
            })
            .chain(
                self.csps
                    .iter()
                    .zip(&self.raw.csp)
                    .enumerate()
                    .map(|(i, (csp, raw))| {
                        (
                            format!("csp[{i}].{}", source(&raw.token_env)),
                            format!("CSP link {}", csp.name),
                            &csp.token,
                        )
                    }),
            );
        for (key, name, token) in peers {
            if demo.iter().any(|d| d.as_bytes() == token.expose()) {
                out.push(format!(
                    "{key} is a demo token of the embedded default configuration \
                     (crates/core/src/default.toml), published with dsplane: anyone can connect as {name}; \
                     give it a secret of its own"
                ));
            }
        }
        out
    }

    /// The SU with this id.
    pub fn service_user(&self, id: Eui64) -> Option<&ServiceUser> {
        self.service_users.iter().find(|su| su.id == id)
    }

    fn validate(
        raw: RawConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let engine = validate_engine(&raw.engine)?;
        let listen = validate_listen(&raw.listen)?;
        let admin_token =
            resolve_optional_token("admin", &raw.admin.token, &raw.admin.token_env, env)?;
        if admin_token.is_none() && !listen.admin.ip().is_loopback() {
            return Err(invalid(
                "admin.token",
                "\"\"",
                format!(
                    "a token is required when the admin interface listens beyond loopback ({})",
                    listen.admin
                ),
            ));
        }
        let delivery = validate_delivery(&raw.delivery)?;
        let service_requests = validate_service_requests(&raw.service_requests)?;
        let service_users =
            validate_service_users(&raw.service_user, &delivery, &service_requests, env)?;
        let csps = validate_csps(&raw.csp, env)?;
        let priority = validate_priority(&raw.priority, engine.levels)?;
        let alert_storm = validate_alert_storm(&raw.alert_storm)?;
        check_tokens_distinct(&raw, admin_token.as_ref(), &service_users, &csps)?;
        let cluster = raw
            .cluster
            .as_ref()
            .map(|c| validate_cluster(c, env))
            .transpose()?;
        match (engine.durability, &cluster) {
            (Durability::Replicated, None) => {
                return Err(invalid(
                    "engine.durability",
                    "\"replicated\"",
                    "needs a [cluster] section: node, and postgres or postgres_env",
                ))
            }
            (d, Some(_)) if d != Durability::Replicated => {
                return Err(invalid(
                    "engine.durability",
                    format!("{:?}", raw.engine.durability),
                    "a [cluster] node keeps its log in PostgreSQL: set durability = \"replicated\"",
                ))
            }
            _ => {}
        }
        // Keep the file's form for `effective_toml`, but never a token in it: the validated
        // tokens live in `Secret`s.
        let mut raw = raw;
        const REDACTED: &str = "<redacted>";
        if !raw.admin.token.is_empty() {
            raw.admin.token = REDACTED.into();
        }
        for token in raw
            .service_user
            .iter_mut()
            .map(|su| &mut su.token)
            .chain(raw.csp.iter_mut().map(|csp| &mut csp.token))
        {
            if token.is_some() {
                *token = Some(REDACTED.into());
            }
        }
        if let Some(c) = raw.cluster.as_mut() {
            // A connection string may hold a password.
            if c.postgres.is_some() {
                c.postgres = Some(REDACTED.into());
            }
        }
        Ok(Config {
            engine,
            listen,
            admin_token,
            delivery,
            service_requests,
            service_users,
            csps,
            priority,
            alert_storm,
            cluster,
            raw,
            keys: BTreeMap::new(),
        })
    }
}

/// The tokens of the embedded demo configuration ([`DEFAULT_TOML`]).
fn demo_tokens() -> Vec<String> {
    let Ok(raw) = toml::from_str::<RawConfig>(DEFAULT_TOML) else {
        return Vec::new();
    };
    let mut tokens: Vec<String> = raw
        .service_user
        .into_iter()
        .filter_map(|su| su.token)
        .chain(raw.csp.into_iter().filter_map(|csp| csp.token))
        .collect();
    if !raw.admin.token.is_empty() {
        tokens.push(raw.admin.token);
    }
    tokens
}

/// `text`, a configuration as the TOML serializer prints it, with its alert codes in hex
/// (`code = 0x8F1C`, `exclusions = [0x8F57, …]`) as the GBCS alert tables and the shipped file
/// write them, instead of the decimal the serializer knows (36636). Only the values of
/// `priority.high_priority_alerts[].code` and `alert_storm.exclusions` change; TOML reads both
/// forms as the same integer, so the text still parses to the same configuration.
fn hex_alert_codes(text: &str) -> String {
    fn hex_numbers(line: &str) -> String {
        let mut out = String::with_capacity(line.len() + 8);
        let mut digits = String::new();
        let flush = |digits: &mut String, out: &mut String| {
            if !digits.is_empty() {
                match digits.parse::<u16>() {
                    Ok(code) => {
                        let _ = fmt::Write::write_fmt(out, format_args!("{code:#06X}"));
                    }
                    Err(_) => out.push_str(digits),
                }
                digits.clear();
            }
        };
        for c in line.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
            } else {
                flush(&mut digits, &mut out);
                out.push(c);
            }
        }
        flush(&mut digits, &mut out);
        // `{:#06X}` writes the prefix as `0X`; TOML wants `0x`.
        out.replace("0X", "0x")
    }
    let mut out = String::with_capacity(text.len() + 64);
    let mut table = "";
    let mut in_exclusions = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if !in_exclusions && trimmed.starts_with('[') {
            table = trimmed;
            out.push_str(line);
            continue;
        }
        let value_line = if in_exclusions {
            true
        } else if table == "[alert_storm]" && trimmed.starts_with("exclusions") {
            in_exclusions = true;
            true
        } else {
            table == "[[priority.high_priority_alerts]]" && trimmed.starts_with("code")
        };
        if value_line {
            match line.split_once('=') {
                Some((key, value)) if !key.contains(']') => {
                    out.push_str(key);
                    out.push('=');
                    out.push_str(&hex_numbers(value));
                }
                _ => out.push_str(&hex_numbers(line)),
            }
            if in_exclusions && trimmed.ends_with(']') {
                in_exclusions = false;
            }
        } else {
            out.push_str(line);
        }
    }
    out
}

fn check_range<T: PartialOrd + fmt::Display + Copy>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(invalid(key, value, format!("expected {min} to {max}")));
    }
    Ok(value)
}

fn check_release_start(key: &str, value: f64) -> Result<ReleaseStart, ConfigError> {
    let share = check_fraction(key, value)?;
    ReleaseStart::from_fraction(share).ok_or_else(|| {
        invalid(
            key,
            value,
            "expected a fraction greater than 0 and at most 1",
        )
    })
}

fn check_fraction(key: &str, value: f64) -> Result<f64, ConfigError> {
    // Written as a negated range test so that NaN is refused too.
    if !(value > 0.0 && value <= 1.0) {
        return Err(invalid(
            key,
            value,
            "expected a fraction greater than 0 and at most 1",
        ));
    }
    Ok(value)
}

fn validate_engine(raw: &RawEngine) -> Result<Engine, ConfigError> {
    let durability = match raw.durability.as_str() {
        "none" => Durability::None,
        "batch" => Durability::Batch,
        "sync" => Durability::Sync,
        "replicated" => Durability::Replicated,
        other => {
            return Err(invalid(
                "engine.durability",
                format!("{other:?}"),
                "expected none, batch, sync or replicated",
            ))
        }
    };
    let scheduling = match raw.scheduling.as_str() {
        "priority" => Scheduling::Priority,
        "fifo" => Scheduling::Fifo,
        other => {
            return Err(invalid(
                "engine.scheduling",
                format!("{other:?}"),
                "expected priority or fifo",
            ))
        }
    };
    if raw.data_dir.as_os_str().is_empty() {
        return Err(invalid(
            "engine.data_dir",
            "\"\"",
            "expected a directory path",
        ));
    }
    Ok(Engine {
        cores: check_range("engine.cores", raw.cores, 0, CORES_MAX)?,
        levels: check_range("engine.levels", raw.levels, LEVELS_MIN, LEVELS_MAX)?,
        data_dir: raw.data_dir.clone(),
        durability,
        flush_interval: Duration::from_millis(u64::from(check_range(
            "engine.flush_interval_ms",
            raw.flush_interval_ms,
            1,
            FLUSH_INTERVAL_MS_MAX,
        )?)),
        payload_bytes_max: check_range(
            "engine.max_payload",
            raw.max_payload,
            1,
            PAYLOAD_BYTES_CEILING,
        )?,
        idle_timeout: Duration::from_secs(u64::from(check_range(
            "engine.idle_timeout_s",
            raw.idle_timeout_s,
            1,
            IDLE_TIMEOUT_S_MAX,
        )?)),
        scheduling,
    })
}

fn validate_listen(raw: &RawListen) -> Result<Listen, ConfigError> {
    let addr = |key: &str, text: &str| -> Result<SocketAddr, ConfigError> {
        text.parse().map_err(|_| {
            invalid(
                key,
                format!("{text:?}"),
                "expected IP:port, like 127.0.0.1:7100",
            )
        })
    };
    let listen = Listen {
        su: addr("listen.su", &raw.su)?,
        csp: addr("listen.csp", &raw.csp)?,
        admin: addr("listen.admin", &raw.admin)?,
        connections_max: check_range(
            "listen.connections_max",
            raw.connections_max,
            1,
            CONNECTIONS_MAX,
        )?,
        handshakes_pending_max: check_range(
            "listen.handshakes_pending_max",
            raw.handshakes_pending_max,
            1,
            HANDSHAKES_PENDING_MAX,
        )?,
        handshakes_per_address_max: check_range(
            "listen.handshakes_per_address_max",
            raw.handshakes_per_address_max,
            1,
            raw.handshakes_pending_max,
        )?,
        hello_deadline: Duration::from_millis(u64::from(check_range(
            "listen.hello_deadline_ms",
            raw.hello_deadline_ms,
            HELLO_DEADLINE_MS_MIN,
            HELLO_DEADLINE_MS_MAX,
        )?)),
        admin_connections_max: check_range(
            "listen.admin_connections_max",
            raw.admin_connections_max,
            1,
            ADMIN_CONNECTIONS_MAX,
        )?,
        admin_workers: check_range(
            "listen.admin_workers",
            raw.admin_workers,
            1,
            ADMIN_WORKERS_MAX,
        )?,
        admin_request_deadline: Duration::from_millis(u64::from(check_range(
            "listen.admin_request_deadline_ms",
            raw.admin_request_deadline_ms,
            ADMIN_REQUEST_DEADLINE_MS_MIN,
            ADMIN_REQUEST_DEADLINE_MS_MAX,
        )?)),
        admin_body_bytes_max: check_range(
            "listen.admin_body_bytes_max",
            raw.admin_body_bytes_max,
            0,
            ADMIN_BODY_BYTES_MAX,
        )?,
    };
    let ports = [
        ("listen.su", listen.su),
        ("listen.csp", listen.csp),
        ("listen.admin", listen.admin),
    ];
    for (i, (key, a)) in ports.iter().enumerate() {
        for (other_key, b) in ports.iter().take(i) {
            // Port 0 asks the OS for a free port, so two zeros do not collide.
            if a == b && a.port() != 0 {
                return Err(invalid(*key, a, format!("already used by {other_key}")));
            }
        }
    }
    Ok(listen)
}

fn validate_rate(key: &str, rate: u32) -> Result<u32, ConfigError> {
    check_range(key, rate, 1, RATE_PER_S_MAX)
}

fn validate_burst(key: &str, burst: u32) -> Result<u32, ConfigError> {
    check_range(key, burst, 1, BURST_MAX)
}

fn validate_window(key: &str, window: u32, reserved_top: u32) -> Result<u32, ConfigError> {
    let window = check_range(key, window, 1, WINDOW_FRAMES_MAX)?;
    if reserved_top >= window {
        return Err(invalid(
            key,
            window,
            format!("expected more than delivery.window_reserved_top ({reserved_top}), so routine frames have room"),
        ));
    }
    Ok(window)
}

fn validate_delivery(raw: &RawDelivery) -> Result<Delivery, ConfigError> {
    let window_reserved_top = check_range(
        "delivery.window_reserved_top",
        raw.window_reserved_top,
        0,
        WINDOW_FRAMES_MAX - 1,
    )?;
    let nms_total = check_range("delivery.nms_total", raw.nms_total, 1, NMS_FRAMES_MAX)?;
    let nms_per_su = check_range("delivery.nms_per_su", raw.nms_per_su, 1, NMS_FRAMES_MAX)?;
    if nms_per_su > nms_total {
        return Err(invalid(
            "delivery.nms_per_su",
            nms_per_su,
            format!("expected at most delivery.nms_total ({nms_total})"),
        ));
    }
    Ok(Delivery {
        rate: validate_rate("delivery.rate", raw.rate)?,
        burst: validate_burst("delivery.burst", raw.burst)?,
        window: validate_window("delivery.window", raw.window, window_reserved_top)?,
        window_reserved_top,
        nms_per_su,
        nms_total,
        release_start: check_release_start("delivery.release_start", raw.release_start)?,
        release_ramp: Duration::from_secs(u64::from(check_range(
            "delivery.release_ramp_s",
            raw.release_ramp_s,
            0,
            RELEASE_RAMP_S_MAX,
        )?)),
        retention: Duration::from_secs(
            3600 * u64::from(check_range(
                "delivery.retention_h",
                raw.retention_h,
                1,
                RETENTION_H_MAX,
            )?),
        ),
    })
}

fn validate_service_requests(raw: &RawServiceRequests) -> Result<ServiceRequests, ConfigError> {
    let capacity = validate_rate("service_requests.capacity", raw.capacity)?;
    let sr_rate = validate_rate("service_requests.sr_rate", raw.sr_rate)?;
    Ok(ServiceRequests {
        capacity,
        operating_threshold: check_fraction(
            "service_requests.operating_threshold",
            raw.operating_threshold,
        )?,
        sr_rate,
        sr_burst: validate_burst("service_requests.sr_burst", raw.sr_burst)?,
    })
}

/// `[cluster]`: a node name of letters, digits, `.`, `_` and `-` (at most
/// [`limits::NODE_NAME_BYTES_MAX`]); exactly one of `postgres` and `postgres_env`; `lease_ms`
/// from [`limits::LEASE_MS_MIN`] to [`limits::LEASE_MS_MAX`].
fn validate_cluster(
    raw: &RawCluster,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Cluster, ConfigError> {
    let name_ok = !raw.node.is_empty()
        && raw.node.len() <= limits::NODE_NAME_BYTES_MAX
        && raw
            .node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !name_ok {
        return Err(invalid(
            "cluster.node",
            format!("{:?}", raw.node),
            format!(
                "1 to {} letters, digits, '.', '_' or '-', unique in the cluster",
                limits::NODE_NAME_BYTES_MAX
            ),
        ));
    }
    let postgres = match (&raw.postgres, &raw.postgres_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "cluster.postgres_env",
                "(set)",
                "give either postgres or postgres_env, not both",
            ))
        }
        (None, None) => {
            return Err(invalid(
                "cluster.postgres",
                "(missing)",
                "a libpq connection string (postgres) or the environment variable holding one (postgres_env)",
            ))
        }
        (Some(s), None) => s.clone(),
        (None, Some(name)) => env(name).ok_or_else(|| {
            invalid(
                "cluster.postgres_env",
                shown_env_name(name),
                "expected the name of a set environment variable",
            )
        })?,
    };
    if postgres.trim().is_empty() {
        let key = if raw.postgres_env.is_some() {
            "cluster.postgres_env"
        } else {
            "cluster.postgres"
        };
        return Err(invalid(
            key,
            "\"\"",
            "a libpq connection string, such as \"host=127.0.0.1 port=5432 dbname=dsplane user=dsplane\"",
        ));
    }
    if !(limits::LEASE_MS_MIN..=limits::LEASE_MS_MAX).contains(&raw.lease_ms) {
        return Err(invalid(
            "cluster.lease_ms",
            raw.lease_ms,
            format!(
                "from {} to {} (ms)",
                limits::LEASE_MS_MIN,
                limits::LEASE_MS_MAX
            ),
        ));
    }
    Ok(Cluster {
        node: raw.node.clone(),
        postgres: Secret(postgres),
        lease_ms: raw.lease_ms,
    })
}

/// A token from the file or the environment; exactly one of the two must be given.
fn resolve_token(
    key: &str,
    token: &Option<String>,
    token_env: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    let value = match (token, token_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{key}.token_env"),
                "(set)",
                "give either token or token_env, not both",
            ))
        }
        (None, None) => {
            return Err(invalid(
                format!("{key}.token"),
                "(missing)",
                "a token or token_env is required",
            ))
        }
        (Some(token), None) => token.clone(),
        (None, Some(name)) => env(name).ok_or_else(|| {
            invalid(
                format!("{key}.token_env"),
                shown_env_name(name),
                "expected the name of a set environment variable",
            )
        })?,
    };
    check_token(key, &value)?;
    Ok(Secret(value))
}

/// A `token_env` value as an error may show it: quoted if it looks like a variable name, else
/// not at all, since what was pasted there may be the token itself.
fn shown_env_name(name: &str) -> String {
    let looks_like_a_name = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if looks_like_a_name {
        format!("{name:?}")
    } else {
        "(not a variable name; not shown in case it is a token)".to_owned()
    }
}

/// Refuses two peers with one token (an SU could pass for another, or for a CSP), or a peer
/// whose token opens the admin interface. Tokens from `token_env` count as what they resolve
/// to. The error names both peers, never the token.
fn check_tokens_distinct(
    raw: &RawConfig,
    admin: Option<&Secret>,
    users: &[ServiceUser],
    csps: &[Csp],
) -> Result<(), ConfigError> {
    let source = |token_env: &Option<String>| {
        if token_env.is_some() {
            "token_env"
        } else {
            "token"
        }
    };
    // (token, key of its setting, the peer's name for the error)
    let mut all: Vec<(&Secret, String, String)> = Vec::with_capacity(1 + users.len() + csps.len());
    if let Some(token) = admin {
        all.push((
            token,
            format!("admin.{}", source(&raw.admin.token_env)),
            "admin".to_owned(),
        ));
    }
    for (i, (su, raw_su)) in users.iter().zip(&raw.service_user).enumerate() {
        all.push((
            &su.token,
            format!("service_user[{i}].{}", source(&raw_su.token_env)),
            format!("service_user[{i}] ({})", su.id),
        ));
    }
    for (i, (csp, raw_csp)) in csps.iter().zip(&raw.csp).enumerate() {
        all.push((
            &csp.token,
            format!("csp[{i}].{}", source(&raw_csp.token_env)),
            format!("csp[{i}] ({})", csp.name),
        ));
    }
    let mut seen: HashMap<&[u8], usize> = HashMap::with_capacity(all.len());
    for (i, (token, key, name)) in all.iter().enumerate() {
        if let Some(first) = seen.insert(token.expose(), i) {
            let first_name = all
                .get(first)
                .map_or("another peer", |(_, _, n)| n.as_str());
            return Err(invalid(
                key.clone(),
                "(not shown)",
                format!(
                    "expected a token of its own, but {first_name} and {name} have the same token"
                ),
            ));
        }
    }
    Ok(())
}

fn check_token(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > TOKEN_BYTES_MAX {
        return Err(invalid(
            format!("{key}.token"),
            format!("({} bytes)", value.len()),
            format!("expected 1 to {TOKEN_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}

fn resolve_optional_token(
    key: &str,
    token: &str,
    token_env: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    if token.is_empty() && token_env.is_none() {
        return Ok(None);
    }
    let token = (!token.is_empty()).then(|| token.to_owned());
    resolve_token(key, &token, token_env, env).map(Some)
}

fn validate_service_users(
    raw: &[RawServiceUser],
    delivery: &Delivery,
    requests: &ServiceRequests,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<ServiceUser>, ConfigError> {
    if raw.len() > SERVICE_USERS_MAX {
        return Err(invalid(
            "service_user",
            raw.len(),
            format!("expected at most {SERVICE_USERS_MAX} entries"),
        ));
    }
    let mut seen = HashMap::new();
    let mut users = Vec::with_capacity(raw.len());
    for (i, su) in raw.iter().enumerate() {
        let key = format!("service_user[{i}]");
        let id: Eui64 = su.id.parse().map_err(|_| {
            invalid(
                format!("{key}.id"),
                format!("{:?}", su.id),
                "expected an EUI-64 like 90-B3-D5-1F-30-01-00-00",
            )
        })?;
        if let Some(first) = seen.insert(id, i) {
            return Err(invalid(
                format!("{key}.id"),
                id,
                format!("duplicate of service_user[{first}].id"),
            ));
        }
        let token = resolve_token(&key, &su.token, &su.token_env, env)?;
        let mut mine = *delivery;
        if let Some(rate) = su.rate {
            mine.rate = validate_rate(&format!("{key}.rate"), rate)?;
        }
        if let Some(burst) = su.burst {
            mine.burst = validate_burst(&format!("{key}.burst"), burst)?;
        }
        if let Some(window) = su.window {
            mine.window = validate_window(
                &format!("{key}.window"),
                window,
                delivery.window_reserved_top,
            )?;
        }
        let sr_rate = match su.sr_rate {
            Some(rate) => validate_rate(&format!("{key}.sr_rate"), rate)?,
            None => requests.sr_rate,
        };
        let sr_burst = match su.sr_burst {
            Some(burst) => validate_burst(&format!("{key}.sr_burst"), burst)?,
            None => requests.sr_burst,
        };
        users.push(ServiceUser {
            id,
            name: su.name.clone().unwrap_or_else(|| id.to_string()),
            token,
            delivery: mine,
            sr_rate,
            sr_burst,
        });
    }
    Ok(users)
}

fn parse_device_range(key: &str, text: &str) -> Result<DeviceRange, ConfigError> {
    let expected =
        "expected FIRST..LAST EUI-64s, like 00-00-00-00-00-00-00-00..7F-FF-FF-FF-FF-FF-FF-FF";
    let (first, last) = text
        .split_once("..")
        .ok_or_else(|| invalid(key, format!("{text:?}"), expected))?;
    let first: Eui64 = first
        .trim()
        .parse()
        .map_err(|_| invalid(key, format!("{text:?}"), expected))?;
    let last: Eui64 = last
        .trim()
        .parse()
        .map_err(|_| invalid(key, format!("{text:?}"), expected))?;
    if first > last {
        return Err(invalid(
            key,
            format!("{text:?}"),
            "expected the first device not above the last",
        ));
    }
    Ok(DeviceRange { first, last })
}

fn validate_csps(
    raw: &[RawCsp],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Csp>, ConfigError> {
    if raw.len() > CSPS_MAX {
        return Err(invalid(
            "csp",
            raw.len(),
            format!("expected at most {CSPS_MAX} entries"),
        ));
    }
    let mut names = HashSet::new();
    let mut csps: Vec<Csp> = Vec::with_capacity(raw.len());
    let mut default_route: Option<usize> = None;
    for (i, csp) in raw.iter().enumerate() {
        let key = format!("csp[{i}]");
        if csp.name.is_empty() {
            return Err(invalid(format!("{key}.name"), "\"\"", "expected a name"));
        }
        if !names.insert(csp.name.clone()) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?}", csp.name),
                "duplicate CSP name",
            ));
        }
        let token = resolve_token(&key, &csp.token, &csp.token_env, env)?;
        let mut ranges = Vec::with_capacity(csp.device_ranges.len());
        for (j, text) in csp.device_ranges.iter().enumerate() {
            let range_key = format!("{key}.device_ranges[{j}]");
            let range = parse_device_range(&range_key, text)?;
            for (other_index, other) in csps.iter().enumerate() {
                if other
                    .device_ranges
                    .iter()
                    .any(|o| o.first <= range.last && range.first <= o.last)
                {
                    return Err(invalid(
                        range_key,
                        format!("{text:?}"),
                        format!("overlaps a device range of csp[{other_index}]"),
                    ));
                }
            }
            ranges.push(range);
        }
        if ranges.is_empty() {
            if let Some(first) = default_route {
                return Err(invalid(
                    format!("{key}.device_ranges"),
                    "[]",
                    format!("csp[{first}] already takes every unclaimed device; give this CSP its ranges"),
                ));
            }
            default_route = Some(i);
        }
        csps.push(Csp {
            name: csp.name.clone(),
            token,
            rate: validate_rate(&format!("{key}.rate"), csp.rate.unwrap_or(5000))?,
            burst: validate_burst(&format!("{key}.burst"), csp.burst.unwrap_or(100))?,
            window: check_range(
                &format!("{key}.window"),
                csp.window.unwrap_or(256),
                1,
                WINDOW_FRAMES_MAX,
            )?,
            connections_max: validate_connections_max(&key, csp)?,
            device_ranges: ranges,
        });
    }
    Ok(csps)
}

/// `csp[i].connections_max`: 1 to [`crate::limits::CSP_CONNECTIONS_MAX`]; the error names the
/// link too, since `csp[3]` alone is hard to find in a long file.
fn validate_connections_max(key: &str, csp: &RawCsp) -> Result<u32, ConfigError> {
    let max = crate::limits::CSP_CONNECTIONS_MAX;
    let value = csp.connections_max.unwrap_or(1);
    if !(1..=max).contains(&value) {
        return Err(invalid(
            format!("{key}.connections_max"),
            value,
            format!(
                "expected 1 to {max} connections for CSP link {:?}",
                csp.name
            ),
        ));
    }
    Ok(value)
}

fn validate_level(key: &str, level: u8, levels: u8) -> Result<Level, ConfigError> {
    match Level::new(level) {
        Some(l) if level <= levels => Ok(l),
        _ => Err(invalid(
            key,
            level,
            format!("expected a level from 1 to engine.levels ({levels})"),
        )),
    }
}

fn validate_priority(raw: &RawPriority, levels: u8) -> Result<Priority, ConfigError> {
    if raw.rules.len() > RULES_MAX {
        return Err(invalid(
            "priority.rules",
            raw.rules.len(),
            format!("expected at most {RULES_MAX} rules"),
        ));
    }
    let mut rules = Vec::with_capacity(raw.rules.len());
    let mut seen = HashMap::new();
    for (i, rule) in raw.rules.iter().enumerate() {
        let key = format!("priority.rules[{i}]");
        let srv = SrvPattern::parse(&rule.srv).ok_or_else(|| {
            invalid(
                format!("{key}.srv"),
                format!("{:?}", rule.srv),
                "expected an SRV like \"2.2\" or \"4.1.1\", or a prefix like \"7.*\"",
            )
        })?;
        let mode = match &rule.mode {
            None => None,
            Some(text) => Some(text.parse::<Mode>().map_err(|_| {
                invalid(
                    format!("{key}.mode"),
                    format!("{text:?}"),
                    "expected on-demand, future-dated or dcc-scheduled",
                )
            })?),
        };
        let level = validate_level(&format!("{key}.level"), rule.level, levels)?;
        if let Some(first) = seen.insert((srv, mode), i) {
            return Err(invalid(
                format!("{key}.srv"),
                format!("{:?}", rule.srv),
                format!("same SRV and mode as priority.rules[{first}]"),
            ));
        }
        rules.push(Rule { srv, mode, level });
    }
    let mut alerts = Vec::with_capacity(raw.high_priority_alerts.len());
    let mut seen_codes = HashMap::new();
    for (i, alert) in raw.high_priority_alerts.iter().enumerate() {
        let key = format!("priority.high_priority_alerts[{i}]");
        let level = validate_level(&format!("{key}.level"), alert.level, levels)?;
        if let Some(first) = seen_codes.insert(alert.code, i) {
            return Err(invalid(
                format!("{key}.code"),
                format!("{:#06X}", alert.code),
                format!("duplicate of priority.high_priority_alerts[{first}]"),
            ));
        }
        alerts.push((alert.code, level));
    }
    Ok(Priority {
        levels,
        default_level: validate_level("priority.default_level", raw.default_level, levels)?,
        scheduled_response_level: validate_level(
            "priority.scheduled_response_level",
            raw.scheduled_response_level.unwrap_or(levels),
            levels,
        )?,
        alert_level: validate_level("priority.alert_level", raw.alert_level, levels)?,
        rules,
        high_priority_alerts: alerts,
    })
}

fn validate_alert_storm(raw: &RawAlertStorm) -> Result<AlertStorm, ConfigError> {
    let mut exclusions = raw.exclusions.clone();
    exclusions.sort_unstable();
    exclusions.dedup();
    Ok(AlertStorm {
        threshold: check_range("alert_storm.threshold", raw.threshold, 1, BURST_MAX)?,
        window: Duration::from_secs(u64::from(check_range(
            "alert_storm.window_s",
            raw.window_s,
            1,
            STORM_WINDOW_S_MAX,
        )?)),
        exclusions,
        max_tracked_keys: check_range(
            "alert_storm.max_tracked_keys",
            raw.max_tracked_keys,
            1,
            STORM_TRACKED_KEYS_MAX,
        )?,
    })
}

// ---------------------------------------------------------------------------------------------
// Reloads.

/// A key's path from the top of the file: `["engine", "cores"]`, `["priority", "rules"]`,
/// `["service_user", "[90-B3-D5-1F-30-01-00-00]", "rate"]`. A peer's entries are named by its id
/// or name, not by their place, so moving a peer in the file changes no path.
type KeyPath = Vec<String>;

/// The peers' arrays of tables, whose entries are named by `id` and `name`.
const PEER_ARRAYS: [(&str, &str); 2] = [("service_user", "id"), ("csp", "name")];

/// Every key `table` sets, `true` for the tables. Arrays are leaves, except the peers'.
fn keys_of(table: &toml::Table) -> BTreeMap<KeyPath, bool> {
    fn walk(prefix: &[String], table: &toml::Table, out: &mut BTreeMap<KeyPath, bool>) {
        for (key, value) in table {
            let mut path = prefix.to_vec();
            path.push(key.clone());
            let peer_name = PEER_ARRAYS
                .iter()
                .find(|(array, _)| prefix.is_empty() && array == key)
                .map(|(_, name)| *name);
            match (value, peer_name) {
                (toml::Value::Table(inner), _) => {
                    walk(&path, inner, out);
                    out.insert(path, true);
                }
                (toml::Value::Array(items), Some(name_key)) => {
                    for (i, item) in items.iter().enumerate() {
                        if let toml::Value::Table(peer) = item {
                            let mut entry = path.clone();
                            entry.push(format!("[{}]", peer_label(key, name_key, peer, i)));
                            walk(&entry, peer, out);
                            out.insert(entry, true);
                        }
                    }
                    out.insert(path, false);
                }
                _ => {
                    out.insert(path, false);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&[], table, &mut out);
    out
}

/// A peer's name in a key path: an SU's id as [`Eui64`] prints it, a CSP's name.
fn peer_label(array: &str, name_key: &str, peer: &toml::Table, index: usize) -> String {
    let name = peer.get(name_key).and_then(toml::Value::as_str);
    match (array, name) {
        ("service_user", Some(id)) => id
            .parse::<Eui64>()
            .map_or_else(|_| id.to_owned(), |id| id.to_string()),
        (_, Some(name)) => name.to_owned(),
        (_, None) => index.to_string(),
    }
}

/// A key path as an operator writes it: `[priority]` for a table, `delivery.rate`,
/// `service_user[90-B3-D5-1F-30-01-00-00].rate`.
fn show_key(path: &[String], table: bool) -> String {
    let mut out = String::new();
    for segment in path {
        if !out.is_empty() && !segment.starts_with('[') {
            out.push('.');
        }
        out.push_str(segment);
    }
    if table {
        format!("[{out}]")
    } else {
        out
    }
}

/// "a", "a and b", "a, b and c".
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Why a running engine must not take `new`, read from `file`, as a reload; `None` when it
/// may. `running` is the configuration the engine runs now (its start-up one, or the last
/// reload applied).
///
/// Every key has a default, so an empty or truncated file parses and validates; applied, it
/// would drop every rule and exclusion and every SU's overrides (2.2 and 7.x falling from level
/// 1 to level 4). A reload is therefore refused when the file:
///
/// * lacks a Service User or CSP link the running engine has (removing one needs a restart), or
///   has one the engine lacks (adding one needs a restart too);
/// * lacks a key the running file sets: going back to a default is written out (`rate = 1000`).
///   A `token` given as `token_env` instead, or the reverse, is not a key lost;
/// * empties `priority.rules`, `priority.high_priority_alerts` or `alert_storm.exclusions` while
///   the running engine has some.
///
/// Everything wrong is named at once, so one edit can fix it.
pub fn reload_refusal(running: &Config, new: &Config, file: &str) -> Option<String> {
    let mut problems = Vec::new();
    let mut missing: Vec<String> = running
        .service_users
        .iter()
        .filter(|su| new.service_user(su.id).is_none())
        .map(|su| format!("service_user {}", su.id))
        .collect();
    missing.extend(
        running
            .csps
            .iter()
            .filter(|c| !new.csps.iter().any(|n| n.name == c.name))
            .map(|c| format!("csp {}", c.name)),
    );
    if !missing.is_empty() {
        problems.push(format!(
            "{} {} configured in the running engine but missing from {file} (removing a peer needs a restart)",
            and_list(&missing),
            if missing.len() == 1 { "is" } else { "are" },
        ));
    }
    let mut added: Vec<String> = new
        .service_users
        .iter()
        .filter(|su| running.service_user(su.id).is_none())
        .map(|su| format!("service_user {}", su.id))
        .collect();
    added.extend(
        new.csps
            .iter()
            .filter(|c| !running.csps.iter().any(|r| r.name == c.name))
            .map(|c| format!("csp {}", c.name)),
    );
    if !added.is_empty() {
        problems.push(format!(
            "{} {} in {file} but not in the running engine (adding a peer needs a restart)",
            and_list(&added),
            if added.len() == 1 { "is" } else { "are" },
        ));
    }
    let lost: Vec<String> = running
        .keys
        .iter()
        .filter(|(path, _)| !new.keys.contains_key(*path))
        // Peers are named above; within a lost table, only the table is named.
        .filter(|(path, _)| {
            let is_peer = path.len() <= 2
                && path
                    .first()
                    .is_some_and(|top| PEER_ARRAYS.iter().any(|(array, _)| array == top));
            let parent_lost = path.len() > 1
                && path
                    .get(..path.len() - 1)
                    .is_some_and(|parent| !new.keys.contains_key(parent));
            !is_peer && !parent_lost
        })
        // A token moved to the environment, or back, is not lost.
        .filter(|(path, _)| {
            let swapped = match path.last().map(String::as_str) {
                Some("token") => "token_env",
                Some("token_env") => "token",
                _ => return true,
            };
            let mut other = path.to_vec();
            if let Some(last) = other.last_mut() {
                *last = swapped.to_owned();
            }
            !new.keys.contains_key(&other)
        })
        .map(|(path, table)| show_key(path, *table))
        .collect();
    if !lost.is_empty() {
        problems.push(format!(
            "{file} lacks {}, which the running configuration sets (is the file truncated?): write each out, with its default value if that is what is meant",
            and_list(&lost)
        ));
    }
    for (key, before, after) in [
        (
            "priority.rules",
            running.priority.rules.len(),
            new.priority.rules.len(),
        ),
        (
            "priority.high_priority_alerts",
            running.priority.high_priority_alerts.len(),
            new.priority.high_priority_alerts.len(),
        ),
        (
            "alert_storm.exclusions",
            running.alert_storm.exclusions.len(),
            new.alert_storm.exclusions.len(),
        ),
    ] {
        let present = new
            .keys
            .contains_key(&key.split('.').map(str::to_owned).collect::<KeyPath>());
        if present && before > 0 && after == 0 {
            problems.push(format!(
                "{key} is empty in {file} but the running engine has {before}: restart to run without them"
            ));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: &str = r#"
[delivery]
rate = 500

[[service_user]]
id = "90-b3-d5-1f-30-01-00-00"
token = "a"
rate = 200

[[service_user]]
id = "90-B3-D5-1F-30-01-00-01"
token_env = "SU2"

[[csp]]
name = "csp.north"
token = "c"

[priority]
rules = [ { srv = "2.2", level = 1 } ]
high_priority_alerts = [ { code = 0x8F1C, level = 1 } ]

[alert_storm]
exclusions = [ 0x8F57 ]
"#;

    fn config(text: &str) -> Config {
        Config::from_toml_with_env(text, |_| Some("from-env".to_owned())).unwrap()
    }

    fn refusal(new: &str) -> Option<String> {
        reload_refusal(&config(RUNNING), &config(new), "F")
    }

    fn with_cluster(cluster: &str) -> Result<Config, ConfigError> {
        let text =
            format!("[engine]\ndurability = \"replicated\"\n{RUNNING}\n[cluster]\n{cluster}\n");
        Config::from_toml_with_env(&text, |name| match name {
            "PG" => Some("host=db password=hunter2".to_owned()),
            "UNSET" => None,
            _ => Some("from-env".to_owned()),
        })
    }

    fn cluster_error(cluster: &str) -> String {
        with_cluster(cluster).unwrap_err().to_string()
    }

    #[test]
    fn cluster_is_optional_and_validated_at_each_edge() {
        assert!(config(RUNNING).cluster.is_none());
        let c = with_cluster("node = \"node-a\"\npostgres = \"host=127.0.0.1 dbname=dsplane\"")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!((c.node.as_str(), c.lease_ms), ("node-a", 1_000));
        assert_eq!(c.postgres.expose_str(), "host=127.0.0.1 dbname=dsplane");
        let c = with_cluster("node = \"b\"\npostgres_env = \"PG\"\nlease_ms = 100")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.postgres.expose_str(), "host=db password=hunter2");
        let name_max = "n".repeat(limits::NODE_NAME_BYTES_MAX);
        assert!(with_cluster(&format!("node = \"{name_max}\"\npostgres = \"x\"")).is_ok());
        assert!(with_cluster("node = \"a\"\npostgres = \"x\"\nlease_ms = 60000").is_ok());
        for (cluster, says) in [
            ("node = \"\"\npostgres = \"x\"", "cluster.node"),
            ("node = \"a b\"\npostgres = \"x\"", "cluster.node"),
            (
                &*format!("node = \"{name_max}n\"\npostgres = \"x\""),
                "cluster.node",
            ),
            ("node = \"a\"", "cluster.postgres"),
            ("node = \"a\"\npostgres = \" \"", "cluster.postgres"),
            (
                "node = \"a\"\npostgres = \"x\"\npostgres_env = \"PG\"",
                "either postgres or postgres_env",
            ),
            (
                "node = \"a\"\npostgres_env = \"UNSET\"",
                "cluster.postgres_env",
            ),
            (
                "node = \"a\"\npostgres = \"x\"\nlease_ms = 99",
                "cluster.lease_ms",
            ),
            (
                "node = \"a\"\npostgres = \"x\"\nlease_ms = 60001",
                "from 100 to 60000",
            ),
            ("postgres = \"x\"", "node"),
            ("node = \"a\"\npostgres = \"x\"\nlease = 5", "lease"),
        ] {
            let e = cluster_error(cluster);
            assert!(e.contains(says), "{cluster:?}: {e}");
        }
    }

    #[test]
    fn the_effective_configuration_never_shows_the_connection_string() {
        let c = with_cluster(
            "node = \"node-a\"\npostgres = \"host=h password=hunter2\"\nlease_ms = 2000",
        )
        .unwrap();
        let shown = c.effective_toml();
        assert!(shown.contains("[cluster]"), "{shown}");
        assert!(shown.contains("node = \"node-a\""), "{shown}");
        assert!(shown.contains("lease_ms = 2000"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn keys_name_peers_by_id_and_name() {
        let keys: Vec<String> = config(RUNNING)
            .keys
            .iter()
            .map(|(path, table)| show_key(path, *table))
            .collect();
        for key in [
            "[delivery]",
            "delivery.rate",
            "service_user",
            "[service_user[90-B3-D5-1F-30-01-00-00]]",
            "service_user[90-B3-D5-1F-30-01-00-00].rate",
            "service_user[90-B3-D5-1F-30-01-00-01].token_env",
            "csp[csp.north].token",
            "priority.rules",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
        }
    }

    #[test]
    fn the_same_file_reloads() {
        assert_eq!(refusal(RUNNING), None);
        // Moving a peer in the file, or a token to the environment and back, loses nothing.
        let moved = RUNNING
            .replace("token = \"a\"", "token_env = \"SU1\"")
            .replace("token_env = \"SU2\"", "token = \"b\"");
        assert_eq!(refusal(&moved), None);
    }

    #[test]
    fn an_empty_file_is_refused_naming_everything_it_lacks() {
        assert_eq!(
            refusal("").as_deref(),
            Some(
                "service_user 90-B3-D5-1F-30-01-00-00, service_user 90-B3-D5-1F-30-01-00-01 and \
                 csp csp.north are configured in the running engine but missing from F (removing \
                 a peer needs a restart); F lacks [alert_storm], [delivery] and [priority], which \
                 the running configuration sets (is the file truncated?): write each out, with \
                 its default value if that is what is meant"
            )
        );
    }

    #[test]
    fn a_lost_override_or_an_added_peer_is_refused() {
        let why = refusal(&RUNNING.replace("rate = 200\n", "")).unwrap();
        assert!(
            why.contains("F lacks service_user[90-B3-D5-1F-30-01-00-00].rate,"),
            "{why}"
        );
        let more = format!("{RUNNING}\n[[csp]]\nname = \"csp-b\"\ntoken = \"d\"\ndevice_ranges = [\"00-00-00-00-00-00-00-00..00-00-00-00-00-00-00-FF\"]\n");
        assert_eq!(
            refusal(&more).as_deref(),
            Some("csp csp-b is in F but not in the running engine (adding a peer needs a restart)")
        );
    }

    #[test]
    fn emptied_rules_alerts_or_exclusions_are_refused() {
        let emptied = RUNNING
            .replace("rules = [ { srv = \"2.2\", level = 1 } ]", "rules = []")
            .replace("exclusions = [ 0x8F57 ]", "exclusions = []");
        assert_eq!(
            refusal(&emptied).as_deref(),
            Some(
                "priority.rules is empty in F but the running engine has 1: restart to run \
                 without them; alert_storm.exclusions is empty in F but the running engine has \
                 1: restart to run without them"
            )
        );
        // Fewer rules, not none, apply.
        let fewer = RUNNING.replace(
            "rules = [ { srv = \"2.2\", level = 1 } ]",
            "rules = [ { srv = \"7.*\", level = 1 } ]",
        );
        assert_eq!(refusal(&fewer), None);
    }

    #[test]
    fn secret_lines_are_recognised_and_their_values_cut_out() {
        assert!(may_hold_secret("token = \"x\""));
        assert!(may_hold_secret("  Admin_Password = 'x'"));
        assert!(may_hold_secret("csp = [{ name = \"a\", token = \"x\" }]"));
        assert!(!may_hold_secret("levels = \"four"));
        assert_eq!(redacted_line("token = \"abc"), "token = <redacted>");
        assert_eq!(redacted_line("{ token = \"abc\" }"), "<redacted>");
        let values = secret_values("token = \"abc\" # 'q'");
        assert!(values.contains(&"abc".to_owned()) && values.contains(&"q".to_owned()));
        assert_eq!(
            scrub(
                "string \"ab\", not abcdef or ab",
                &["ab".into(), "abcdef".into()]
            ),
            "string <redacted>, not <redacted> or ab"
        );
        // A multi-line string opened on a token line hides the lines after it.
        let lines = ["[admin]", "token = \"\"\"abc", "def\"\"\" x"];
        assert!(excerpt_may_hold_secret(&lines, 2));
        assert!(!excerpt_may_hold_secret(&lines, 0));
    }

    #[test]
    fn alert_codes_print_in_hex_in_every_form_the_serializer_writes() {
        let text = "[priority]\nalert_level = 3\n\n[[priority.high_priority_alerts]]\ncode = 36636\nlevel = 1\n\n[alert_storm]\nthreshold = 10\nexclusions = [\n    36695,\n    1,\n]\nmax_tracked_keys = 4000000\n";
        assert_eq!(
            hex_alert_codes(text),
            "[priority]\nalert_level = 3\n\n[[priority.high_priority_alerts]]\ncode = 0x8F1C\nlevel = 1\n\n[alert_storm]\nthreshold = 10\nexclusions = [\n    0x8F57,\n    0x0001,\n]\nmax_tracked_keys = 4000000\n"
        );
        assert_eq!(
            hex_alert_codes("[alert_storm]\nexclusions = [36695, 2]\nwindow_s = 60\n"),
            "[alert_storm]\nexclusions = [0x8F57, 0x0002]\nwindow_s = 60\n"
        );
        assert_eq!(
            hex_alert_codes("[alert_storm]\nexclusions = []\nwindow_s = 60\n"),
            "[alert_storm]\nexclusions = []\nwindow_s = 60\n"
        );
        // Every code round-trips, whatever the configuration.
        let config = config(
            "[priority]\nhigh_priority_alerts = [{ code = 0, level = 1 }, { code = 0xFFFF, level = 2 }]\n[alert_storm]\nexclusions = [0x8F75, 65535, 0]\n",
        );
        let printed = config.effective_toml();
        assert!(
            printed.contains("code = 0xFFFF") && printed.contains("0x0000"),
            "{printed}"
        );
        let back = Config::from_toml(&printed).unwrap();
        assert_eq!(
            back.priority.high_priority_alerts,
            config.priority.high_priority_alerts
        );
        assert_eq!(back.alert_storm.exclusions, config.alert_storm.exclusions);
        assert!(!printed.contains("65535"), "{printed}");
    }

    #[test]
    fn warnings_name_the_missing_admin_token_and_demo_tokens_by_key() {
        let demo = Config::embedded_default().unwrap().warnings();
        assert_eq!(demo.len(), 3, "{demo:?}");
        assert!(demo[0].starts_with("admin.token is empty"), "{demo:?}");
        assert!(
            demo[1].starts_with("service_user[0].token is a demo token"),
            "{demo:?}"
        );
        assert!(
            demo[2].starts_with("csp[0].token is a demo token"),
            "{demo:?}"
        );
        // A demo token through the environment is still a demo token; the warning never
        // shows it.
        let via_env = Config::from_toml_with_env(
            "[admin]\ntoken = \"a-long-admin-token\"\n[[service_user]]\nid = \"90-B3-D5-1F-30-01-00-07\"\ntoken_env = \"SU\"\n",
            |_| Some("demo-su-token".into()),
        )
        .unwrap()
        .warnings();
        assert_eq!(via_env.len(), 1, "{via_env:?}");
        assert!(via_env[0].starts_with("service_user[0].token_env is a demo token"));
        assert!(!via_env[0].contains("demo-su-token"));
        // Tokens of its own and an admin token: nothing to say.
        assert!(config(
            RUNNING
                .replace("[delivery]", "[admin]\ntoken = \"adm\"\n[delivery]")
                .as_str()
        )
        .warnings()
        .is_empty());
    }

    #[test]
    fn the_parse_error_keeps_line_and_message_but_not_the_file() {
        let e = Config::from_toml("[admin]\ntoken = \"hunter2-xyz\" 7\n").unwrap_err();
        let ConfigError::Toml(toml) = &e else {
            panic!("{e}")
        };
        assert_eq!(toml.line(), Some(2));
        assert!(!toml.message().is_empty());
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}

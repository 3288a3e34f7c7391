//! What `dsplane run` says before and around its engine's own log lines: the demo banner and
//! the start-up errors. In JSON mode they are log lines like any other (one JSON object each),
//! so that a log shipper never meets a line it cannot parse; in human mode they are plain text.
//! Either way an error is one line.

use dsplane::config::Config;

/// A start-up error: `dsplane: …` on one line, or an ERROR log line in JSON mode.
pub fn error(json: bool, message: &str) {
    let message = dsplane::one_line(message);
    if json {
        tracing::error!("{message}");
    } else {
        eprintln!("dsplane: {message}");
    }
}

/// The embedded demo configuration's ids, tokens and ports, so that a newcomer can connect at
/// once. The tokens are shown on purpose: they are the demo's, and only the no-config run
/// prints them.
pub fn banner(config: &Config, json: bool) {
    let intro = "no --config given; running the embedded demo configuration";
    if json {
        tracing::info!("{intro}");
    } else {
        eprintln!("dsplane: {intro}");
    }
    for su in &config.service_users {
        let token = su.token.expose_str();
        if json {
            tracing::info!(peer = %su.id, token, addr = %config.listen.su, "demo Service User");
        } else {
            eprintln!(
                "  demo Service User {} token {token:?} on {}",
                su.id, config.listen.su
            );
        }
    }
    for csp in &config.csps {
        let token = csp.token.expose_str();
        if json {
            tracing::info!(peer = %csp.name, token, addr = %config.listen.csp, "demo CSP");
        } else {
            eprintln!(
                "  demo CSP {:?} token {token:?} on {}",
                csp.name, config.listen.csp
            );
        }
    }
}

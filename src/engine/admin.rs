//! The admin interface: HTTP on a control thread (ENGINE.md §3, §8). The message path never
//! waits on it: an operator action becomes a control message to the workers, like a new
//! connection does.
//!
//! | method and path              | what |
//! |------------------------------|------|
//! | `GET /healthz`               | `ok` while the engine runs |
//! | `GET /metrics`               | Prometheus text format (see `docs/operations.md`) |
//! | `POST /su/{EUI-64}/pause`    | the SU is unavailable: its traffic is kept (NMS, then SURB) |
//! | `POST /su/{EUI-64}/resume`   | available again: its backlog is released with the ramp |
//! | `POST /restrict`             | the whole northbound side is unavailable |
//! | `POST /restore`              | lifts the restriction: every backlog released with the ramp |
//! | `POST /reload`               | re-reads the config file: rules, alert levels, exclusions, thresholds, rates |
//! | `GET /report/alerts?day=D`   | the alert monitoring report of day `D` (YYYY-MM-DD, default today, UTC), JSON |
//!
//! When `[admin] token` is set, every request needs `Authorization: Bearer <token>`, else 401.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::sync::Arc;
use std::time::Duration;

use super::shared::{token_eq, Control, Shared};
use crate::ids::Eui64;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// How often the alert report is written to `data_dir`.
const REPORT_SAVE_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) struct Admin {
    server: tiny_http::Server,
    shared: Arc<Shared>,
}

fn respond(request: tiny_http::Request, status: u16, body: &str) {
    let response = tiny_http::Response::from_string(body).with_status_code(status);
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "admin response not sent");
    }
}

impl Admin {
    pub(crate) fn bind(
        addr: std::net::SocketAddr,
        shared: Arc<Shared>,
    ) -> std::io::Result<(Admin, std::net::SocketAddr)> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| std::io::Error::other(format!("cannot bind admin {addr}: {e}")))?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("admin listener has no IP address"))?;
        Ok((Admin { server, shared }, bound))
    }

    pub(crate) fn run(self) {
        let mut last_save = std::time::Instant::now();
        while !self.shared.is_shutting_down() {
            // The alert report survives restarts: saved every few seconds, and at the end.
            if last_save.elapsed() >= REPORT_SAVE_INTERVAL {
                super::save_report(&self.shared);
                last_save = std::time::Instant::now();
            }
            match self.server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(request)) => self.handle(request),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener failed");
                    return;
                }
            }
        }
        super::save_report(&self.shared);
    }

    fn authorised(&self, request: &tiny_http::Request) -> bool {
        let Some(token) = &self.shared.config.admin_token else {
            return true;
        };
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
            .is_some_and(|given| token_eq(token.expose(), given.as_bytes()))
    }

    // Indexing here is safe: SU and worker indices come from the directory, which is fixed at start-up.
    #[allow(clippy::indexing_slicing, clippy::expect_used, clippy::unwrap_used)]
    fn handle(&self, request: tiny_http::Request) {
        if !self.authorised(&request) {
            return respond(
                request,
                401,
                "unauthorised: give Authorization: Bearer <admin token>\n",
            );
        }
        let method = request.method().clone();
        let url = request.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (tiny_http::Method::Get, ["healthz"]) => respond(request, 200, "ok\n"),
            (tiny_http::Method::Get, ["metrics"]) => {
                let body = self.shared.render_metrics();
                let mut response = tiny_http::Response::from_string(body);
                if let Ok(h) = tiny_http::Header::from_bytes(
                    &b"Content-Type"[..],
                    &b"text/plain; version=0.0.4"[..],
                ) {
                    response = response.with_header(h);
                }
                if let Err(e) = request.respond(response) {
                    tracing::debug!(error = %e, "admin response not sent");
                }
            }
            (tiny_http::Method::Get, ["report", "alerts"]) => {
                let day = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("day="))
                    .map(crate::report::day_of_date)
                    .unwrap_or_else(|| Some(crate::report::utc_day(unix_now())));
                let Some(day) = day else {
                    return respond(request, 400, "day must be YYYY-MM-DD\n");
                };
                let summary = match self.shared.report.lock() {
                    Ok(r) => r.day_summary(day),
                    Err(_) => return respond(request, 500, "report unavailable\n"),
                };
                match serde_json::to_string_pretty(&summary) {
                    Ok(json) => {
                        let header = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"application/json"[..],
                        );
                        let mut response = tiny_http::Response::from_string(json + "\n");
                        if let Ok(h) = header {
                            response = response.with_header(h);
                        }
                        if let Err(e) = request.respond(response) {
                            tracing::debug!(error = %e, "admin response not sent");
                        }
                    }
                    Err(e) => respond(request, 500, &format!("{e}\n")),
                }
            }
            (tiny_http::Method::Post, ["reload"]) => match super::reload(&self.shared) {
                Ok(warnings) => {
                    let mut body = String::from("reloaded\n");
                    for w in warnings {
                        body.push_str(&format!("warning: {w}\n"));
                    }
                    respond(request, 200, &body)
                }
                Err(e) => respond(request, 400, &format!("reload refused: {e}\n")),
            },
            (tiny_http::Method::Post, ["su", id, action @ ("pause" | "resume")]) => {
                let Ok(id) = id.parse::<Eui64>() else {
                    return respond(
                        request,
                        400,
                        "not an EUI-64, e.g. 90-B3-D5-1F-30-01-00-00\n",
                    );
                };
                let Some(su) = self.shared.su(id) else {
                    return respond(request, 404, "no such Service User\n");
                };
                let paused = *action == "pause";
                let owner = self.shared.sus[su as usize].owner;
                self.send(owner, Control::Pause { su, paused });
                tracing::info!(su = %id, paused, "operator action");
                let done = if paused { "paused" } else { "resumed" };
                respond(request, 200, &format!("{id} {done}\n"));
            }
            (tiny_http::Method::Post, [action @ ("restrict" | "restore")]) => {
                let restricted = *action == "restrict";
                for w in 0..self.shared.workers.len() {
                    self.send(w, Control::Restrict(restricted));
                }
                tracing::info!(restricted, "operator action: northbound {action}");
                let done = if restricted { "restricted" } else { "restored" };
                respond(request, 200, &format!("northbound {done}\n"));
            }
            _ => respond(
                request,
                404,
                "unknown path; see the engine's admin documentation\n",
            ),
        }
    }

    // Indexing here is safe: SU and worker indices come from the directory, which is fixed at start-up.
    #[allow(clippy::indexing_slicing, clippy::expect_used, clippy::unwrap_used)]
    fn send(&self, worker: usize, control: Control) {
        let link = &self.shared.workers[worker];
        if link.control.send(control).is_ok() {
            let _ = link.waker.wake();
        }
    }
}

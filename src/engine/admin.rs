//! The admin interface: HTTP on a control thread (ENGINE.md §3, §8). The message path never
//! waits on it: an operator action becomes a control message to the workers, like a new
//! connection does.
//!
//! | method and path              | what |
//! |------------------------------|------|
//! | `GET /healthz`               | `ok` while the engine runs |
//! | `POST /su/{EUI-64}/pause`    | the SU is unavailable: its traffic is kept (NMS, then SURB) |
//! | `POST /su/{EUI-64}/resume`   | available again: its backlog is released with the ramp |
//! | `POST /restrict`             | the whole northbound side is unavailable |
//! | `POST /restore`              | lifts the restriction: every backlog released with the ramp |
//!
//! When `[admin] token` is set, every request needs `Authorization: Bearer <token>`, else 401.

use std::sync::Arc;
use std::time::Duration;

use super::shared::{token_eq, Control, Shared};
use crate::ids::Eui64;

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
        while !self.shared.is_shutting_down() {
            match self.server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(request)) => self.handle(request),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener failed");
                    return;
                }
            }
        }
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
        let parts: Vec<&str> = url.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (tiny_http::Method::Get, ["healthz"]) => respond(request, 200, "ok\n"),
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

    fn send(&self, worker: usize, control: Control) {
        let link = &self.shared.workers[worker];
        if link.control.send(control).is_ok() {
            let _ = link.waker.wake();
        }
    }
}

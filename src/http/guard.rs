//! Who may talk to the control plane over TCP.
//!
//! A web page in the user's browser can reach a loopback port by DNS rebinding (its own name
//! resolving to 127.0.0.1): the browser then sends the page's name in `Host` and its origin in
//! `Origin`. So, unless the operator opened the daemon to the network
//! (`http.allow_non_loopback`), a request is served only if its `Host` names loopback
//! (`localhost`, 127.0.0.0/8, `::1`) and its `Origin`, when there is one, does too.
//!
//! With `http.admin_token` set (or `KVDEX_HTTP__ADMIN_TOKEN`), creating a session over TCP also
//! needs `Authorization: Bearer <admin token>` (the Rust and Python clients send
//! `KVDEX_ADMIN_TOKEN` from their environment). The Unix-socket control plane takes neither
//! check: its file permissions (0600) are the credential.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// The TCP control plane's checks.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    /// Refuse a `Host` or `Origin` that is not loopback.
    pub loopback_only: bool,
    /// Needed to create a session, when set.
    pub admin_token: Option<String>,
}

fn refuse(status: StatusCode, why: String) -> Response {
    (status, Json(serde_json::json!({ "error": why }))).into_response()
}

/// The middleware: refuses with 403 (`Host`, `Origin`) or 401 (admin token) before any route.
pub async fn check(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    if g.loopback_only {
        let h = req.headers();
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
        if !host.is_some_and(host_is_loopback) {
            let why = format!(
                "Host {host:?} is not a loopback name: the control plane answers only \
                 localhost, 127.0.0.0/8 and ::1 (http.allow_non_loopback is false)"
            );
            return refuse(StatusCode::FORBIDDEN, why);
        }
        if let Some(origin) = h.get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or("");
            if !origin_is_loopback(o) {
                let why = format!("Origin {o:?} is not loopback: cross-site requests are refused");
                return refuse(StatusCode::FORBIDDEN, why);
            }
        }
    }
    if let Some(admin) = &g.admin_token {
        if req.method() == Method::POST && req.uri().path() == "/v1/sessions" {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let ok = presented.is_some_and(|p| bytes_equal(p.as_bytes(), admin.as_bytes()));
            if !ok {
                let why = "creating a session needs `Authorization: Bearer <admin token>` \
                           (http.admin_token; clients read KVDEX_ADMIN_TOKEN)";
                let mut r = refuse(StatusCode::UNAUTHORIZED, why.into());
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
    }
    next.run(req).await
}

/// Equal bytes, compared in time independent of where they differ (the lengths are not
/// secret).
fn bytes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `host` (`name`, `name:port`, `[v6]:port`) names loopback.
fn host_is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                n
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `origin` (`scheme://host[:port]`) is a loopback origin.
fn origin_is_loopback(origin: &str) -> bool {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|h| !h.contains('/') && host_is_loopback(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_origins() {
        for h in [
            "localhost",
            "LOCALHOST:7070",
            "127.0.0.1",
            "127.0.0.1:7070",
            "127.5.6.7:1",
            "[::1]:7070",
            "[::1]",
        ] {
            assert!(host_is_loopback(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:7070",
            "localhost.evil.example",
            "10.0.0.1:7070",
            "[::2]:1",
            "",
            "127.0.0.1.evil:80",
        ] {
            assert!(!host_is_loopback(h), "{h}");
        }
        assert!(origin_is_loopback("http://localhost:7070"));
        assert!(origin_is_loopback("http://127.0.0.1"));
        assert!(!origin_is_loopback("http://evil.example"));
        assert!(!origin_is_loopback("null"));
        assert!(!origin_is_loopback("http://localhost/../x"));
    }
}

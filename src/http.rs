//! The axum control plane: sessions, health, stats and `/metrics`.
//!
//! Routes (the contract the Rust and Python clients call):
//! - `POST /v1/sessions` creates a session and returns its id, token and shm path;
//! - `GET`/`DELETE /v1/sessions/{id}` need `Authorization: Bearer <token>`;
//! - `/healthz` (the process answers), `/readyz` (it accepts sessions), `/stats` (JSON),
//!   `/metrics` (Prometheus text).
//!
//! Errors are `{"error": "..."}` with a status that says whose fault it was.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::daemon::registry::{CreateRequest, Registry, SessionInfo, SessionState};
use crate::error::KvdexError;
use crate::metrics::Metrics;

pub mod guard;

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    /// The sessions.
    pub registry: Arc<Registry>,
    /// The Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// When the daemon started.
    pub started: Instant,
}

/// A handler error, rendered as `{"error": ...}` with a fitting status.
pub struct ApiError(pub KvdexError);

impl From<KvdexError> for ApiError {
    fn from(e: KvdexError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.status().http_code();
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %self.0, "request failed");
        }
        let mut resp = (
            status,
            Json(serde_json::json!({ "error": self.0.to_string() })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// The control plane's routes over `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/sessions", axum::routing::post(create_session))
        .route("/v1/sessions/{id}", get(get_session).delete(delete_session))
        .route("/v1/sessions/{id}/fork", axum::routing::post(fork_session))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn(refuse_long_uris))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// [`router`] with the TCP listener's checks ([`guard`]): loopback `Host`/`Origin`, and the
/// admin token for session creation when one is configured.
pub fn tcp_router(state: AppState, g: guard::Guard) -> Router {
    router(state).layer(middleware::from_fn_with_state(Arc::new(g), guard::check))
}

/// Counts every control-plane request by route template and status code.
async fn count_requests(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let resp = next.run(req).await;
    st.metrics
        .http_requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// Longest request target (path and query) the control plane reads. Its longest real one is
/// `/v1/sessions/{16 hex}`; 8 KiB is the limit common HTTP servers use.
pub const MAX_URI_BYTES: usize = 8 << 10;

/// Refuses a request target over [`MAX_URI_BYTES`] with a JSON 414 like every other error.
///
/// Targets of 64 KiB and more never get here: hyper's HTTP/1 parser refuses them itself
/// (`MAX_URI_LEN`, `u16::MAX - 1`) with a 414 whose body is empty, before any service runs,
/// and neither hyper 1.x nor axum 0.8 offers a hook for that response. This limit makes the
/// JSON answer cover every target from 8 KiB up to hyper's.
async fn refuse_long_uris(req: Request, next: Next) -> Response {
    let len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        let why = format!(
            "request target of {len} bytes is longer than the {MAX_URI_BYTES} the control plane \
             accepts"
        );
        return (
            StatusCode::URI_TOO_LONG,
            Json(serde_json::json!({ "error": why })),
        )
            .into_response();
    }
    next.run(req).await
}

/// The token of `Authorization: Bearer <token>`, if present.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::trim)
}

async fn create_session(
    State(st): State<AppState>,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = match body {
        Ok(b) => b,
        // A body over axum's limit: 413, as JSON like every other error (not a 400).
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let why = format!("request body too large: {}", e.body_text());
            return Ok((e.status(), Json(serde_json::json!({ "error": why }))).into_response());
        }
        Err(e) => return Err(KvdexError::BadRequest(e.body_text()).into()),
    };
    let registry = st.registry.clone();
    // Creating the region touches the file system: keep it off the async workers.
    let created = tokio::task::spawn_blocking(move || registry.create(req))
        .await
        .map_err(|e| KvdexError::Protocol(format!("session creation task failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// The `{id}` of a session route; a malformed one (not UTF-8) is a JSON 400 like any bad input.
fn session_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|e| {
        ApiError(KvdexError::BadRequest(format!(
            "session id: {}",
            e.body_text()
        )))
    })
}

/// `POST /v1/sessions/{id}/fork` (the source's token): 201 with the new session, as create.
async fn fork_session(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_id(path)?;
    let token = bearer(&headers).map(str::to_owned);
    let registry = st.registry.clone();
    // The copy and the new region stay off the async workers.
    let created = tokio::task::spawn_blocking(move || registry.fork(&id, token.as_deref()))
        .await
        .map_err(|e| KvdexError::Protocol(format!("session fork task failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn get_session(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<SessionInfo>, ApiError> {
    let id = session_id(path)?;
    Ok(Json(st.registry.info(&id, bearer(&headers))?))
}

async fn delete_session(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let id = session_id(path)?;
    let token = bearer(&headers).map(str::to_string);
    let registry = st.registry.clone();
    // Stopping the worker joins its thread.
    tokio::task::spawn_blocking(move || registry.delete(&id, token.as_deref()))
        .await
        .map_err(|e| KvdexError::Protocol(format!("session deletion task failed: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}

/// Any path the control plane does not serve: a JSON error like every other, listing the
/// routes (axum's default is an empty 404 body).
async fn unknown_route(uri: axum::http::Uri) -> Response {
    let why = format!(
        "no route {}; the control plane serves /v1/sessions, /v1/sessions/{{id}}, /healthz, \
         /readyz, /stats and /metrics",
        uri.path()
    );
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": why })),
    )
        .into_response()
}

/// A known path with a method it does not take: 405 with a JSON error naming the method
/// (axum keeps its `Allow` header).
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let why = format!("{} does not accept {method}", uri.path());
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(serde_json::json!({ "error": why })),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.registry.is_closing() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

/// `/stats`: memory, budget and every session (no tokens).
#[derive(Serialize)]
pub struct Stats {
    /// Seconds since start.
    pub uptime_secs: f64,
    /// Sessions open.
    pub sessions: usize,
    /// Sessions ended whose memory is not released yet (listed with `"state": "closing"`; their
    /// bytes are still in `budget_used_bytes` and `resident_bytes`).
    pub sessions_closing: usize,
    /// The configured budget.
    pub budget_bytes: u64,
    /// Bytes reserved from it (arena capacity).
    pub budget_used_bytes: u64,
    /// Bytes still free.
    pub budget_left_bytes: u64,
    /// `budget_used_bytes` by what it holds: `store` (K/V rows, staged training queries),
    /// `regions` (shared-memory files), `socket_arenas` (data-socket connections).
    pub budget_parts: std::collections::BTreeMap<&'static str, u64>,
    /// K/V bytes stored across sessions (closing ones included).
    pub resident_bytes: u64,
    /// The arena backend ("host" or "cuda").
    pub link: &'static str,
    /// Arenas alive in the backend.
    pub link_arenas: u64,
    /// Bytes those arenas hold.
    pub link_bytes: u64,
    /// Bytes Slim sessions save: V not stored, less their W_KV matrices (0 without any).
    pub slim_saved_bytes: i64,
    /// Per session (open or closing): state, shape, memory, per-layer tokens and index state.
    pub per_session: Vec<SessionInfo>,
}

async fn stats(State(st): State<AppState>) -> Result<Json<Stats>, ApiError> {
    let registry = st.registry.clone();
    // Describing the sessions takes locks a busy session holds: off the async workers.
    let per_session = tokio::task::spawn_blocking(move || registry.all())
        .await
        .map_err(|e| KvdexError::Internal(format!("stats task failed: {e}")))?;
    let store = st.registry.store();
    let budget = store.budget();
    let link = store.link().stats();
    Ok(Json(Stats {
        uptime_secs: st.started.elapsed().as_secs_f64(),
        sessions: per_session
            .iter()
            .filter(|s| s.state == SessionState::Open)
            .count(),
        sessions_closing: per_session
            .iter()
            .filter(|s| s.state == SessionState::Closing)
            .count(),
        budget_bytes: budget.total(),
        budget_used_bytes: budget.used(),
        budget_left_bytes: budget.left(),
        budget_parts: budget.parts().iter().map(|(p, n)| (p.name(), *n)).collect(),
        resident_bytes: per_session.iter().map(|s| s.resident_bytes).sum(),
        link: store.link().name(),
        link_arenas: link.arenas,
        link_bytes: link.bytes,
        slim_saved_bytes: per_session
            .iter()
            .filter_map(|s| s.slim.map(|m| m.net_saved_bytes))
            .sum(),
        per_session,
    }))
}

async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    st.registry.refresh_gauges();
    let text = st.metrics.encode()?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[cfg(test)]
mod tests;

//! The client's side of the HTTP control plane (the contract in SEAMS.md), with ureq.

use kvdex_wire::Shape;
use kvdex_wire::{Error, Result};

/// What `POST /v1/sessions` answers.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CreatedSession {
    /// Session id (hex).
    pub id: String,
    /// 32 hex characters: the token for the region and for `/v1/sessions/{id}`.
    pub token: String,
    /// Path of the region to attach.
    pub shm_path: String,
    /// Bytes of the region's payload arena.
    pub payload_bytes: u64,
    /// The daemon's Unix data socket, when it has one.
    #[serde(default)]
    pub data_socket: Option<String>,
}

/// The HTTP identity of a session, kept by its handle for `drop_session`.
#[derive(Debug, Clone)]
pub struct HttpSession {
    pub(super) agent: ureq::Agent,
    pub(super) base_url: String,
    pub(super) id: String,
    pub(super) token: String,
    pub(super) data_socket: Option<String>,
}

/// The daemon's own message in a refusal: the `error` field of its JSON body, or the body as
/// is when it is not such JSON.
pub fn daemon_message(resp: ureq::Response) -> String {
    let body = resp.into_string().unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or(body)
}

/// Turns a ureq failure into an error that names the route and the daemon's message.
pub(super) fn http_error(route: &str, e: ureq::Error) -> Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let msg = daemon_message(resp);
            let status = kvdex_wire::proto::Status::from_http(code);
            let budget = kvdex_wire::proto::budget_numbers(&msg).unwrap_or_default();
            // The daemon's message starts with the category the error type already shows.
            let msg = msg.strip_prefix(status.message_prefix()).unwrap_or(&msg);
            status.error_with(&format!("{route}: HTTP {code}: {msg}"), budget)
        }
        ureq::Error::Transport(t) => Error::Disconnected(format!("{route}: {t}")),
    }
}

/// `POST /v1/sessions`.
pub(super) fn create(
    agent: &ureq::Agent,
    base_url: &str,
    shape: &Shape,
    opts: &super::SessionOptions,
) -> Result<CreatedSession> {
    let route = format!("{base_url}/v1/sessions");
    let mut body = serde_json::json!({
        "layers": shape.layers,
        "q_heads": shape.q_heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "dtype": kvdex_wire::dtype_serde::name(shape.dtype),
    });
    for (key, value) in [
        ("payload_bytes", opts.payload_bytes),
        ("sinks", opts.sinks),
        ("window", opts.window),
    ] {
        if let Some(v) = value {
            body[key] = v.into();
        }
    }
    if let Some(format) = opts.kv_format {
        body["kv_format"] = format.name(shape.dtype).into();
    }
    if let Some(slim) = &opts.slim {
        body["slim"] = true.into();
        if let Some(r) = slim.rope {
            body["slim_rope"] = serde_json::json!({ "theta": r.theta, "rope_dim": r.rope_dim });
        }
    }
    let mut req = agent.post(&route).set("Content-Type", "application/json");
    // A daemon with `http.admin_token` wants it to create a session.
    if let Ok(admin) = std::env::var("KVDEX_ADMIN_TOKEN") {
        req = req.set("Authorization", &format!("Bearer {admin}"));
    }
    let resp = req
        .send_string(&body.to_string())
        .map_err(|e| http_error("POST /v1/sessions", e))?;
    let text = resp.into_string()?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Protocol(format!("POST /v1/sessions answered {text:?}: {e}")))
}

impl HttpSession {
    /// `POST /v1/sessions/{id}/fork`: a new session holding a copy of this one's rows.
    pub(super) fn fork(&self) -> Result<CreatedSession> {
        let resp = self
            .agent
            .post(&format!("{}/v1/sessions/{}/fork", self.base_url, self.id))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call()
            .map_err(|e| http_error("POST /v1/sessions/{id}/fork", e))?;
        let text = resp.into_string()?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Protocol(format!(
                "POST /v1/sessions/{{id}}/fork answered {text:?}: {e}"
            ))
        })
    }

    /// `DELETE /v1/sessions/{id}`.
    pub(super) fn delete(&self) -> Result<()> {
        self.agent
            .delete(&format!("{}/v1/sessions/{}", self.base_url, self.id))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call()
            .map_err(|e| http_error("DELETE /v1/sessions/{id}", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_errors_name_the_route_once_per_category() {
        let status = |code: u16, body: &str| {
            let resp = ureq::Response::new(code, "x", body).unwrap();
            http_error("DELETE /v1/sessions/{id}", ureq::Error::Status(code, resp)).to_string()
        };
        assert_eq!(
            status(404, r#"{"error":"not found: session \"ab\""}"#),
            "not found: DELETE /v1/sessions/{id}: HTTP 404: session \"ab\""
        );
        assert_eq!(
            status(401, r#"{"error":"unauthorized: wrong token"}"#),
            "unauthorized: DELETE /v1/sessions/{id}: HTTP 401: wrong token"
        );
        assert_eq!(
            status(400, "plain text"),
            "bad request: DELETE /v1/sessions/{id}: HTTP 400: plain text"
        );
        assert!(status(503, r#"{"error":"shutting down"}"#).starts_with("disconnected: "));
    }
}

//! The daemon the bench drives: `kvdex serve` started as a child process, and the HTTP calls
//! the bench makes to it (create a session and attach, read per-layer state), plus its VmRSS.

use std::process::{Child, Command, Stdio};

use crate::bench::child::{stop_child, STOP_GRACE};
use std::time::{Duration, Instant};

use super::DecodeArgs;
use kvdex::error::{KvdexError, Result};
use kvdex_client::{Client, SessionHandle, SessionToken};

/// The daemon child; stopped (SIGTERM, so that it removes its region files) and reaped on
/// drop.
pub(super) struct Daemon {
    pub(super) child: Child,
    pub(super) url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, STOP_GRACE);
    }
}

/// Starts `kvdex serve` on a free port with a budget for `kv_bytes` and the bench's decode
/// settings, and waits until it answers.
pub(super) fn start_daemon(exe: &std::path::Path, kv_bytes: u64, a: &DecodeArgs) -> Result<Daemon> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let child = Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env(
            "KVDEX_MEMORY__BUDGET_BYTES",
            (kv_bytes * 3 + (1 << 30)).to_string(),
        )
        .env("KVDEX_DECODE__GRAPH_SEARCH_LIST", a.search_list.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut d = Daemon { child, url };
    let t = Instant::now();
    while ureq::get(&format!("{}/healthz", d.url)).call().is_err() {
        // A daemon that exits (a bad --daemon binary, a refused configuration) is reported
        // at once, not after the whole wait.
        if let Ok(Some(status)) = d.child.try_wait() {
            return Err(KvdexError::Disconnected(format!(
                "{} serve exited with {status} before answering on {} (run it by hand to see \
                 its log)",
                exe.display(),
                d.url
            )));
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err(KvdexError::Disconnected(format!(
                "kvdex serve did not answer on {}",
                d.url
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(d)
}

/// Parses a JSON answer.
pub(super) fn json(s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| KvdexError::Protocol(format!("daemon sent bad JSON: {e}")))
}

/// An HTTP failure as the error the bench reports: a refusal carries the daemon's own
/// message (`{"error": ...}`), a transport failure is a disconnect.
pub(super) fn http(e: ureq::Error) -> KvdexError {
    match e {
        ureq::Error::Status(code, resp) => {
            let url = resp.get_url().to_string();
            let msg = kvdex_client::http::daemon_message(resp);
            KvdexError::Protocol(format!("the daemon refused {url} (HTTP {code}): {msg}"))
        }
        other => KvdexError::Disconnected(format!("HTTP: {other}")),
    }
}

/// Creates the session over HTTP and attaches; returns the handle, id and token.
pub(super) fn create(
    d: &Daemon,
    a: &DecodeArgs,
    payload: u64,
) -> Result<(SessionHandle, String, String)> {
    create_sampled(d, a, payload, a.sample_rate)
}

/// [`create`] with the session's own online-recall `sample_rate` (the daemon's when `None`).
pub(super) fn create_sampled(
    d: &Daemon,
    a: &DecodeArgs,
    payload: u64,
    sample_rate: Option<f64>,
) -> Result<(SessionHandle, String, String)> {
    let body = serde_json::json!({
        "layers": a.layers, "q_heads": a.q_heads, "kv_heads": a.kv_heads,
        "head_dim": a.head_dim, "dtype": "f16", "payload_bytes": payload,
        // The static tokens the bench's engine side keeps, as an engine sets its own.
        "sinks": a.sinks, "window": a.window,
        // Online recall sampling (`--sample-rate`): the session's own rate.
        "sample_rate": sample_rate,
        "kv_format": a.kv_format,
    });
    let v: serde_json::Value = ureq::post(&format!("{}/v1/sessions", d.url))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .map_err(http)?
        .into_string()
        .map_err(KvdexError::Io)
        .and_then(|s| json(&s))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .ok_or_else(|| KvdexError::Protocol(format!("POST /v1/sessions answered without {k}")))
    };
    let (id, token, path): (String, String, String) =
        (field("id")?, field("token")?, field("shm_path")?);
    let h = Client::attach(&path, SessionToken::parse(&token)?.as_bytes())?;
    Ok((h, id, token))
}

/// Per-layer state from `GET /v1/sessions/{id}`.
pub(super) fn layers_info(d: &Daemon, id: &str, token: &str) -> Result<Vec<serde_json::Value>> {
    let v: serde_json::Value = ureq::get(&format!("{}/v1/sessions/{id}", d.url))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(http)?
        .into_string()
        .map_err(KvdexError::Io)
        .and_then(|s| json(&s))?;
    Ok(v.get("layers")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default())
}

/// The resident set of process `pid`, in KiB, from `/proc`.
pub(super) fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A daemon binary that exits at once is reported at once, with its exit status.
    #[test]
    fn a_daemon_that_exits_is_reported_without_waiting() {
        let a = match crate::cli::Cli::try_parse_from(["kvdex", "bench", "decode"]) {
            Ok(crate::cli::Cli {
                command: crate::cli::Command::Bench(crate::cli::BenchCommand::Decode(a)),
            }) => a,
            other => panic!("{other:?}"),
        };
        let t = Instant::now();
        let e = match start_daemon(std::path::Path::new("false"), 1 << 20, &a) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("`false` answered"),
        };
        assert!(e.contains("false serve exited with"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "waited {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn an_http_refusal_carries_the_daemon_message() {
        let resp = ureq::Response::new(400, "Bad Request", r#"{"error":"bad request: q_heads 0"}"#)
            .unwrap();
        let e = http(ureq::Error::Status(400, resp)).to_string();
        assert!(
            e.contains("HTTP 400") && e.contains("bad request: q_heads 0"),
            "{e}"
        );
        assert!(!e.starts_with("disconnected"), "{e}");
    }
}

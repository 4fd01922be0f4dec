//! Findings 3 and 7: the control plane refuses what a web page or another user's process
//! could send, and a second daemon leaves the first one's sockets alone.

use std::io::{Read, Write};

use crate::common::{http, kvdex, Daemon};

const CREATE: &str =
    r#"{"layers":1,"q_heads":2,"kv_heads":1,"head_dim":16,"dtype":"f32","payload_bytes":65536}"#;

/// One raw HTTP/1.0 request over TCP (so that `Host` and `Origin` are exactly what a browser
/// would send); returns the status code and the whole reply.
fn raw(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

/// DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name in `Host` and
/// its origin in `Origin`. Both are refused (403) before any route; loopback names pass.
#[test]
fn a_host_or_origin_that_is_not_loopback_is_refused() {
    let d = Daemon::start(&[]);
    let port = d.base.rsplit(':').next().unwrap().to_owned();
    let evil = format!("evil.example:{port}");
    let (st, text) = raw(&d.base, "POST", "/v1/sessions", &[("Host", &evil)], CREATE);
    assert_eq!(st, 403, "{text}");
    assert!(text.contains("not a loopback name"), "{text}");
    assert_eq!(raw(&d.base, "GET", "/stats", &[("Host", &evil)], "").0, 403);
    let local = format!("localhost:{port}");
    let (st, text) = raw(
        &d.base,
        "POST",
        "/v1/sessions",
        &[("Host", &local), ("Origin", "http://evil.example")],
        CREATE,
    );
    assert_eq!(st, 403, "{text}");
    let origin = format!("http://127.0.0.1:{port}");
    let (st, text) = raw(
        &d.base,
        "POST",
        "/v1/sessions",
        &[("Host", &local), ("Origin", &origin)],
        CREATE,
    );
    assert_eq!(st, 201, "{text}");
    assert_eq!(
        raw(&d.base, "GET", "/healthz", &[("Host", "[::1]")], "").0,
        200
    );
}

/// With `http.admin_token`, creating a session over TCP needs it (the Rust client sends
/// `KVDEX_ADMIN_TOKEN`); over the Unix control socket the file permissions stand for it.
#[test]
fn an_admin_token_guards_session_creation_over_tcp() {
    let sock = std::env::temp_dir().join(format!("kvdex-rel-ctl-{}.sock", std::process::id()));
    let d = Daemon::start(&[
        ("KVDEX_HTTP__ADMIN_TOKEN", "s3cret-admin"),
        ("KVDEX_HTTP__UNIX_SOCKET", sock.to_str().unwrap()),
    ]);
    let host = d.base.trim_start_matches("http://").to_owned();
    let post = |auth: Option<&str>| {
        let mut h = vec![("Host", host.as_str())];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        raw(&d.base, "POST", "/v1/sessions", &h, CREATE)
    };
    let (st, text) = post(None);
    assert_eq!(st, 401, "{text}");
    assert!(text.contains("admin token"), "{text}");
    assert_eq!(post(Some("Bearer wrong")).0, 401);
    assert_eq!(post(Some("Bearer s3cret-admin")).0, 201);
    // The other routes are unchanged (a session's own token guards it).
    assert_eq!(http::get(&d.base, "/healthz").0, 200);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    write!(
        s,
        "POST /v1/sessions HTTP/1.0\r\nHost: kvdex\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{CREATE}",
        CREATE.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.0 201"), "{out}");
}

/// A second `kvdex serve` on the same sockets failed to start but deleted the first daemon's
/// socket on its way out. Now it refuses to start, naming the live socket, and the first
/// daemon's sockets still answer.
#[test]
fn a_second_daemon_leaves_a_live_daemons_sockets_alone() {
    let dir = std::env::temp_dir();
    let data = dir.join(format!("kvdex-rel-2nd-data-{}.sock", std::process::id()));
    let ctl = dir.join(format!("kvdex-rel-2nd-ctl-{}.sock", std::process::id()));
    let env = [
        ("KVDEX_SESSIONS__DATA_SOCKET", data.to_str().unwrap()),
        ("KVDEX_HTTP__UNIX_SOCKET", ctl.to_str().unwrap()),
    ];
    let first = Daemon::start(&env);
    let out = kvdex()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("served by another live process"), "{err}");
    assert!(
        std::os::unix::net::UnixStream::connect(&data).is_ok(),
        "data socket kept"
    );
    assert!(
        http::unix_get(&ctl, "/healthz").contains("ok"),
        "control socket kept"
    );
    assert_eq!(http::get(&first.base, "/healthz").0, 200);
}

/// `/stats` needs no credential, so it lists no paths (it listed every region file); the
/// session's token holder still gets its path from `GET /v1/sessions/{id}`.
#[test]
fn stats_lists_no_paths() {
    let d = Daemon::start(&[]);
    let (st, text) = http::send(
        ureq::post(&format!("{}/v1/sessions", d.base)),
        Some(&serde_json::from_str(CREATE).unwrap()),
    );
    assert_eq!(st, 201, "{text}");
    let created: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (_, stats) = http::get(&d.base, "/stats");
    let path = created["shm_path"].as_str().unwrap();
    assert!(
        !stats.contains(path) && !stats.contains("shm_path"),
        "{stats}"
    );
    let url = format!("{}/v1/sessions/{}", d.base, created["id"].as_str().unwrap());
    let bearer = format!("Bearer {}", created["token"].as_str().unwrap());
    let (st, info) = http::send(ureq::get(&url).set("Authorization", &bearer), None);
    assert_eq!(st, 200);
    assert!(info.contains(path), "{info}");
}

//! The control plane over real HTTP, with an in-process stand-in for the data plane.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{router, AppState};
use crate::config::Config;
use crate::daemon::dataplane::{DataPlane, DataPlaneSpec, Serving};
use crate::daemon::registry::Registry;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::{Budget, Store};

/// Counts live "workers": +1 on start, -1 when the guard drops. A guard's drop (the worker
/// stopping) waits while a test holds the gate's write lock. The sessions started are kept
/// (weakly: the registry alone decides when they are freed) for tests to fill.
struct FakePlane(Arc<AtomicUsize>, Arc<RwLock<()>>, Started);
type Started = Arc<Mutex<Vec<Weak<crate::store::Session>>>>;
struct Guard(
    Arc<AtomicUsize>,
    #[allow(dead_code)] Arc<crate::store::Session>,
    Arc<RwLock<()>>,
);
impl Drop for Guard {
    fn drop(&mut self) {
        let _stopping = self.2.read();
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
impl DataPlane for FakePlane {
    fn start(&self, spec: DataPlaneSpec) -> Result<Box<dyn Serving>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut v) = self.2.lock() {
            v.push(Arc::downgrade(&spec.session));
        }
        Ok(Box::new(Guard(
            self.0.clone(),
            spec.session,
            self.1.clone(),
        )))
    }
}

struct Server {
    base: String,
    live: Arc<AtomicUsize>,
    /// Held for writing, it keeps workers from stopping.
    gate: Arc<RwLock<()>>,
    started: Started,
    registry: Arc<Registry>,
    rt: tokio::runtime::Runtime,
}

fn server(max_sessions: u64) -> Server {
    let env = vec![(
        "KVDEX_SESSIONS__MAX_SESSIONS".to_string(),
        max_sessions.to_string(),
    )];
    let config = Config::load(None, env, None).unwrap();
    let live = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(RwLock::new(()));
    let started = Started::default();
    let metrics = Arc::new(Metrics::new().unwrap());
    let store = Store::new(
        crate::store::default_link(),
        Arc::new(Budget::new(1 << 20)),
        16,
    );
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let registry = Arc::new(Registry::new(
        config,
        store,
        metrics.clone(),
        Box::new(FakePlane(live.clone(), gate.clone(), started.clone())),
        tx,
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app = router(AppState {
        registry: registry.clone(),
        metrics,
        started: Instant::now(),
    });
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await });
    Server {
        base,
        live,
        gate,
        started,
        registry,
        rt,
    }
}

/// (status, JSON body or the text as a JSON string).
/// Creates a session of [`shape`]: the 201 body, its id and its token.
fn create(s: &Server) -> (Value, String, String) {
    let (st, created) = call(
        ureq::post(&format!("{}/v1/sessions", s.base)),
        Some(shape()),
    );
    assert_eq!(st, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let token = created["token"].as_str().unwrap().to_string();
    (created, id, token)
}

fn call(req: ureq::Request, body: Option<Value>) -> (u16, Value) {
    let r = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn shape() -> Value {
    json!({"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 8, "dtype": "f16"})
}

#[test]
fn session_lifecycle_with_tokens() {
    let s = server(8);
    let (created, id, token) = create(&s);
    assert_eq!(token.len(), 32);
    assert!(created["shm_path"].as_str().unwrap().ends_with(&id));
    assert_eq!(created["payload_bytes"], json!(16777216));
    assert_eq!(s.live.load(Ordering::SeqCst), 1);

    let url = format!("{}/v1/sessions/{id}", s.base);
    let (st, info) = call(
        ureq::get(&url).set("Authorization", &format!("Bearer {token}")),
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(info["shape"], shape());
    assert_eq!(info["layers"].as_array().unwrap().len(), 2);
    assert_eq!(info["resident_bytes"], json!(0));

    let (st, e) = call(ureq::get(&url), None);
    assert_eq!(st, 401);
    assert!(e["error"].as_str().unwrap().contains("missing"), "{e}");
    let wrong = if token.starts_with('0') { "1" } else { "0" }.repeat(32);
    for bad in [wrong.as_str(), "not-hex", ""] {
        let (st, e) = call(
            ureq::delete(&url).set("Authorization", &format!("Bearer {bad}")),
            None,
        );
        assert_eq!(st, 401, "token {bad:?}: {e}");
    }
    let (st, _) = call(
        ureq::get(&format!("{}/v1/sessions/ffff", s.base))
            .set("Authorization", &format!("Bearer {token}")),
        None,
    );
    assert_eq!(st, 404);
    assert_eq!(
        s.live.load(Ordering::SeqCst),
        1,
        "refused requests touched nothing"
    );

    let (st, stats) = call(ureq::get(&format!("{}/stats", s.base)), None);
    assert_eq!(st, 200);
    assert_eq!(stats["sessions"], json!(1));
    assert_eq!(stats["budget_bytes"], json!(1 << 20));
    assert_eq!(stats["per_session"][0]["id"], json!(id));
    assert!(
        !stats.to_string().contains(&token),
        "stats must not leak tokens"
    );

    let (st, _) = call(
        ureq::delete(&url).set("Authorization", &format!("Bearer {token}")),
        None,
    );
    assert_eq!(st, 204);
    assert_eq!(
        s.live.load(Ordering::SeqCst),
        0,
        "deleting stops the worker"
    );
    let (st, _) = call(
        ureq::get(&url).set("Authorization", &format!("Bearer {token}")),
        None,
    );
    assert_eq!(st, 404);
    assert!(s.registry.is_empty());
}

#[test]
fn bad_create_requests_name_what_is_wrong() {
    let s = server(1);
    let url = format!("{}/v1/sessions", s.base);
    let with = |k: &str, v: Value| {
        let mut b = shape();
        b[k] = v;
        call(ureq::post(&url), Some(b))
    };
    let cases = [
        with("dtype", json!("f8")),
        with("q_heads", json!(3)),
        with("layers", json!(0)),
        with("layers", json!(4_000_000)),
        with("payload_bytes", json!(10)),
        with("extra", json!(1)),
        call(ureq::post(&url), Some(json!({"layers": 1}))),
    ];
    let wants = [
        "dtype \"f8\"",
        "not a multiple of kv_heads",
        "zero dimension",
        "layers = 4000000",
        "payload_bytes 10",
        "unknown field `extra`",
        "missing field",
    ];
    for ((st, e), want) in cases.into_iter().zip(wants) {
        assert_eq!(st, 400, "{want}: {e}");
        assert!(e["error"].as_str().unwrap().contains(want), "{want}: {e}");
    }
    assert_eq!(s.live.load(Ordering::SeqCst), 0);
    let (st, _) = call(ureq::post(&url), Some(shape()));
    assert_eq!(st, 201);
    let (st, e) = call(ureq::post(&url), Some(shape()));
    assert_eq!(st, 429, "{e}");
    assert!(e["error"]
        .as_str()
        .unwrap()
        .contains("sessions.max_sessions"));
}

#[test]
fn health_readiness_and_metrics() {
    let s = server(4);
    assert_eq!(call(ureq::get(&format!("{}/healthz", s.base)), None).0, 200);
    assert_eq!(call(ureq::get(&format!("{}/readyz", s.base)), None).0, 200);
    call(
        ureq::post(&format!("{}/v1/sessions", s.base)),
        Some(shape()),
    );
    let (st, text) = call(ureq::get(&format!("{}/metrics", s.base)), None);
    assert_eq!(st, 200);
    let text = text.as_str().unwrap().to_string();
    assert!(text.contains("kvdex_sessions 1"), "{text}");
    assert!(text.contains("kvdex_budget_bytes 1048576"));
    assert!(
        text.contains("kvdex_http_requests_total{code=\"201\",route=\"/v1/sessions\"} 1"),
        "{text}"
    );
    s.registry.close();
    assert_eq!(s.live.load(Ordering::SeqCst), 0, "close ends every session");
    assert_eq!(call(ureq::get(&format!("{}/readyz", s.base)), None).0, 503);
    assert_eq!(
        call(
            ureq::post(&format!("{}/v1/sessions", s.base)),
            Some(shape())
        )
        .0,
        503
    );
    drop(s.rt);
}

#[test]
fn slim_sessions_are_mha_only_and_report_their_savings() {
    let s = server(4);
    let url = format!("{}/v1/sessions", s.base);
    // GQA shape (4 query heads, 2 KV heads): refused, by name.
    let mut gqa = shape();
    gqa["slim"] = json!(true);
    let (st, e) = call(ureq::post(&url), Some(gqa));
    assert_eq!(st, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("MHA"), "{e}");
    // slim_rope without slim, and a bad rope.
    let mut mha = json!({"layers": 1, "q_heads": 2, "kv_heads": 2, "head_dim": 8, "dtype": "f16"});
    mha["slim_rope"] = json!({"theta": 10000.0, "rope_dim": 8});
    let (st, e) = call(ureq::post(&url), Some(mha.clone()));
    assert_eq!(st, 400);
    assert!(
        e["error"].as_str().unwrap().contains("slim is not true"),
        "{e}"
    );
    mha["slim"] = json!(true);
    mha["slim_rope"] = json!({"theta": 10000.0, "rope_dim": 7});
    let (st, e) = call(ureq::post(&url), Some(mha.clone()));
    assert_eq!(st, 400);
    assert!(e["error"].as_str().unwrap().contains("rope_dim 7"), "{e}");
    // MHA: created; GET and /stats carry the Slim account.
    mha["slim_rope"] = json!({"theta": 10000.0, "rope_dim": 8});
    let (st, created) = call(ureq::post(&url), Some(mha));
    assert_eq!(st, 201, "{created}");
    let (id, token) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let (st, info) = call(
        ureq::get(&format!("{url}/{id}")).set("Authorization", &format!("Bearer {token}")),
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(info["slim"]["v_bytes_saved"], json!(0));
    assert_eq!(info["slim"]["layers_ready"], json!(0));
    let (_, stats) = call(ureq::get(&format!("{}/stats", s.base)), None);
    assert_eq!(stats["slim_saved_bytes"], json!(0));
    assert!(stats["per_session"][0]["slim"].is_object());
}

#[test]
fn unknown_routes_and_wrong_methods_get_json_errors() {
    let s = server(1);
    let (st, e) = call(ureq::get(&format!("{}/health", s.base)), None);
    assert_eq!(st, 404, "{e}");
    let why = e["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("no route /health") && why.contains("/healthz"),
        "{e}"
    );
    let resp = match ureq::put(&format!("{}/v1/sessions", s.base)).call() {
        Err(ureq::Error::Status(_, r)) => r,
        other => panic!("PUT /v1/sessions answered {other:?}"),
    };
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.header("allow"), Some("POST"));
    let e: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("/v1/sessions does not accept PUT"),
        "{e}"
    );
    let (st, e) = call(
        ureq::get(&format!("{}/v1/sessions/%ff%fe", s.base)).set("Authorization", "Bearer x"),
        None,
    );
    assert_eq!(st, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("session id"), "{e}");
    // A body one byte over the 2 MiB limit: read whole by the server (sending more races its
    // early answer and close, and the client may see a broken pipe), then refused.
    let reply = {
        use std::io::{Read, Write};
        let addr = s.base.trim_start_matches("http://");
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let body = format!("{{\"pad\": \"{}\"}}", "x".repeat((2 << 20) - 10));
        assert_eq!(body.len(), (2 << 20) + 1);
        let head = format!(
            "POST /v1/sessions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = tcp
            .write_all(head.as_bytes())
            .and_then(|()| tcp.write_all(body.as_bytes()));
        let mut reply = String::new();
        let _ = tcp.read_to_string(&mut reply);
        reply
    };
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(
        reply.contains("\"error\":\"request body too large"),
        "{reply}"
    );
    let (st, e) = call(ureq::post(&format!("{}/stats", s.base)), None);
    assert_eq!(st, 405, "{e}");
    assert!(e["error"].as_str().unwrap().contains("POST"), "{e}");
}

#[test]
fn a_closing_session_stays_listed_until_its_memory_is_released() {
    let s = server(8);
    let (_, id, token) = create(&s);
    let auth = format!("Bearer {token}");
    let stats = || call(ureq::get(&format!("{}/stats", s.base)), None).1;
    // One token in layer 0 (2 KV heads x 8 f16): the layer reserves its first arena.
    let session = s.started.lock().unwrap()[0].upgrade().unwrap();
    session.append(0, 1, &[0u8; 32], &[0u8; 32]).unwrap();
    drop(session);
    let used = stats()["budget_used_bytes"].as_u64().unwrap();
    assert!(used > 0, "a session reserves memory");
    // The worker cannot stop while the gate is held: the DELETE stays in flight.
    let held = s.gate.write().unwrap();
    let url = format!("{}/v1/sessions/{id}", s.base);
    let deleting = {
        let (url, auth) = (url.clone(), auth.clone());
        std::thread::spawn(move || call(ureq::delete(&url).set("Authorization", &auth), None).0)
    };
    let t = Instant::now();
    while call(ureq::get(&url).set("Authorization", &auth), None).0 != 404 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the DELETE never began"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Gone for its token holder, but its memory is still reserved: /stats lists it as closing.
    let st = stats();
    assert_eq!(st["sessions"], json!(0), "{st}");
    assert_eq!(st["sessions_closing"], json!(1), "{st}");
    let listed = &st["per_session"][0];
    assert_eq!(
        (&listed["id"], &listed["state"]),
        (&json!(id), &json!("closing"))
    );
    assert_eq!(listed["reserved_bytes"], json!(used));
    assert_eq!(st["budget_used_bytes"], json!(used));
    drop(held);
    assert_eq!(deleting.join().unwrap(), 204);
    // Released and unlisted together.
    let st = stats();
    assert_eq!(st["per_session"], json!([]), "{st}");
    assert_eq!(
        (&st["sessions_closing"], &st["budget_used_bytes"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(s.live.load(Ordering::SeqCst), 0);
}

#[test]
fn long_request_targets_get_a_json_414() {
    let s = server(1);
    let (st, _) = call(
        ureq::get(&format!("{}/healthz?{}", s.base, "a".repeat(7000))),
        None,
    );
    assert_eq!(st, 200, "under the limit, served");
    for path in [
        format!("/{}", "a".repeat(super::MAX_URI_BYTES)),
        format!("/v1/sessions/{}", "f".repeat(60_000)),
        format!("/stats?{}", "q".repeat(20_000)),
    ] {
        let (st, e) = call(ureq::get(&format!("{}{path}", s.base)), None);
        assert_eq!(st, 414, "{e}");
        let why = e["error"].as_str().unwrap_or_default();
        assert!(
            why.contains(&format!(
                "request target of {} bytes is longer than the 8192",
                path.len()
            )),
            "{e}"
        );
    }
    // 64 KiB and more: hyper's parser answers before any handler, with an empty 414 (no hook
    // for its body in hyper 1.x); still a 414, and the server keeps serving.
    let (st, e) = call(
        ureq::get(&format!("{}/{}", s.base, "a".repeat(100_000))),
        None,
    );
    assert_eq!((st, e), (414, Value::String(String::new())));
    assert_eq!(call(ureq::get(&format!("{}/healthz", s.base)), None).0, 200);
}

mod statics;

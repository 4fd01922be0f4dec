//! Finding 5 (liveness no client can fake) and the token half of finding 7.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvdex_wire::shm::layout::attach_state;
use kvdex_wire::shm::Region;
use serde_json::Value;

use crate::common::{http, Daemon};

/// Creates a session over HTTP only; returns (id, token hex, region path).
fn create(base: &str) -> (String, String, String) {
    let body = serde_json::json!({"layers": 1, "q_heads": 2, "kv_heads": 1, "head_dim": 16,
        "dtype": "f32", "payload_bytes": 65536});
    let (st, text) = http::send(ureq::post(&format!("{base}/v1/sessions")), Some(&body));
    assert_eq!(st, 201, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let s = |k: &str| v[k].as_str().unwrap().to_owned();
    (s("id"), s("token"), s("shm_path"))
}

/// Presents `token` with `pid` in the attach slot of `region`; returns the verdict.
fn attach_as(region: &Region, token: &[u8; 16], pid: u64) -> u64 {
    let a = &region.header().attach.0;
    for (i, w) in a.token.iter().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&token[i * 8..i * 8 + 8]);
        w.store(u64::from_le_bytes(b), Ordering::Relaxed);
    }
    a.client_pid.store(pid, Ordering::Relaxed);
    a.state.store(attach_state::REQUESTED, Ordering::Release);
    kvdex_wire::shm::wait::force_wake(&region.header().daemon_sleeping.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match a.state.load(Ordering::Acquire) {
            attach_state::REQUESTED => {}
            v => return v,
        }
        assert!(Instant::now() < deadline, "no verdict");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client that named pid 1 in its region was watched through pid 1 and never reaped. Now a
/// pid is accepted only if that process maps the region: pid 1 is refused, this process (which
/// maps it) is accepted; and the token is wiped from the header once judged.
#[test]
fn an_attach_naming_a_pid_that_does_not_map_the_region_is_refused() {
    let d = Daemon::start(&[]);
    let (_, token, path) = create(&d.base);
    let token = *kvdex_client::SessionToken::parse(&token)
        .unwrap()
        .as_bytes();
    let region = Region::open(&path).unwrap();
    assert_eq!(attach_as(&region, &token, 1), attach_state::REJECTED);
    let me = u64::from(std::process::id());
    assert_eq!(attach_as(&region, &token, me), attach_state::ACCEPTED);
    let words = &region.header().attach.0.token;
    assert_eq!(
        [
            words[0].load(Ordering::Relaxed),
            words[1].load(Ordering::Relaxed)
        ],
        [0, 0],
        "the token is erased once the attach is judged"
    );
}

/// Polls `/stats` until session `id` is gone (for up to 20 s).
fn wait_gone(base: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, st) = http::get_json(base, "/stats");
        let listed = st["per_session"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["id"] == id));
        if !listed {
            return;
        }
        assert!(Instant::now() < deadline, "session {id} never ended: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sessions that were created and never attached were never reaped (256 POSTs locked every
/// client out for good). Now one nobody attaches within `sessions.attach_timeout_ms` ends,
/// and an attached one stays.
#[test]
fn a_session_never_attached_is_ended_at_the_attach_deadline() {
    let d = Daemon::start(&[("KVDEX_SESSIONS__ATTACH_TIMEOUT_MS", "300")]);
    let (orphan, _, _) = create(&d.base);
    let client = kvdex_client::Client::connect(&d.base).unwrap();
    let mut kept = crate::session(&client, crate::shape(kvdex_index::KeyDtype::F32));
    wait_gone(&d.base, &orphan);
    let (_, m) = http::get(&d.base, "/metrics");
    assert!(
        m.contains("kvdex_sessions_ended_total{reason=\"attach_timeout\"} 1"),
        "{m}"
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(kept.ping(b"kept").unwrap(), b"kept");
}

/// A client on the data socket that was SIGKILLed kept its session (and its budget) for
/// good. Now a session reached only over the data socket ends when its last connection
/// closes, however the peer went.
#[test]
fn a_data_socket_session_ends_when_its_last_connection_closes() {
    let sock = std::env::temp_dir().join(format!("kvdex-rel-data-{}.sock", std::process::id()));
    let d = Daemon::start(&[("KVDEX_SESSIONS__DATA_SOCKET", sock.to_str().unwrap())]);
    let (id, token, _) = create(&d.base);
    let token = *kvdex_client::SessionToken::parse(&token)
        .unwrap()
        .as_bytes();
    let mut conn = kvdex_client::socket::SocketSession::connect(&sock, &id, &token).unwrap();
    assert_eq!(conn.ping(b"over the socket").unwrap(), b"over the socket");
    // Past a park or two: an open connection keeps the session.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(conn.ping(b"still").unwrap(), b"still");
    drop(conn);
    wait_gone(&d.base, &id);
}

//! Sessions kept apart: tokens guard the HTTP routes and the region, a refused append past
//! the budget leaves every session intact, and a client killed mid-request is reaped while
//! the others keep being served.

use kvdex_client::{Client, SessionOptions};
use serde_json::{json, Value};

use crate::common::{http, Daemon};
use crate::{shape, stats, values, wait_stats};

#[test]
fn tokens_guard_the_routes_and_the_region() {
    let d = Daemon::start(&[]);
    let body = json!({"layers": 1, "q_heads": 2, "kv_heads": 1, "head_dim": 8, "dtype": "bf16", "payload_bytes": 65536});
    let (st, text) = http::send(ureq::post(&format!("{}/v1/sessions", d.base)), Some(&body));
    assert_eq!(st, 201, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let (id, token) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let url = format!("{}/v1/sessions/{id}", d.base);
    let bearer = |t: &str| format!("Bearer {t}");
    let wrong: String = token.chars().rev().collect();
    assert_eq!(http::send(ureq::get(&url), None).0, 401, "missing token");
    assert_eq!(
        http::send(ureq::get(&url).set("Authorization", &bearer(&wrong)), None).0,
        401
    );
    assert_eq!(
        http::send(
            ureq::delete(&url).set("Authorization", &bearer(&wrong)),
            None
        )
        .0,
        401
    );
    let (st, info) = http::send(ureq::get(&url).set("Authorization", &bearer(token)), None);
    assert_eq!(st, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["shape"]["dtype"], "bf16");
    assert_eq!(info["layers"][0]["index"], "flat");

    let shm = created["shm_path"].as_str().unwrap();
    let mut wrong_bytes = *kvdex_client::SessionToken::parse(token).unwrap().as_bytes();
    wrong_bytes[5] ^= 1;
    let Err(e) = Client::attach(shm, &wrong_bytes) else {
        panic!("a wrong token must not attach");
    };
    assert!(e.to_string().contains("refused the token"), "{e}");
    let mut s = Client::attach(
        shm,
        kvdex_client::SessionToken::parse(token).unwrap().as_bytes(),
    )
    .unwrap();
    assert_eq!(s.ping(&[7u8; 64]).unwrap(), &[7u8; 64]);
    assert_eq!(
        http::send(
            ureq::delete(&url).set("Authorization", &bearer(token)),
            None
        )
        .0,
        204
    );
    assert_eq!(
        http::send(ureq::get(&url).set("Authorization", &bearer(token)), None).0,
        404
    );
    assert!(
        s.ping(b"x").is_err(),
        "the region is closed once the session is deleted"
    );
}

#[test]
fn append_past_the_budget_fails_and_other_sessions_stay_intact() {
    // Budget 64 KiB of rows, plus the two sessions' regions (the budget covers them too); a
    // layer's first allocation holds 16 tokens: 2 heads x (K+V) x 16 x 64 B = 4 KiB.
    let regions =
        2 * kvdex_wire::shm::Geometry::new(kvdex_wire::shm::layout::DEFAULT_RING_SLOTS, 131072)
            .unwrap()
            .total_bytes;
    let d = Daemon::start(&[
        ("KVDEX_MEMORY__BUDGET_BYTES", &(65536 + regions).to_string()),
        ("KVDEX_SESSIONS__DEFAULT_PAYLOAD_BYTES", "131072"),
        ("KVDEX_MEMORY__INITIAL_TOKENS", "16"),
    ]);
    let client = Client::connect(&d.base).unwrap();
    let mut a = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let mut b = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let ka = values(2 * 100 * 16, 1);
    a.append(0, 100, bytemuck::cast_slice(&ka), bytemuck::cast_slice(&ka))
        .unwrap();
    let used = stats(&d.base)["budget_used_bytes"].as_u64().unwrap();
    assert!(used > regions && used < 65536 + regions);
    let big = values(2 * 400 * 16, 2);
    let e = b
        .append(
            0,
            400,
            bytemuck::cast_slice(&big),
            bytemuck::cast_slice(&big),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("memory budget exceeded") && e.contains("asked for") && e.contains("left"),
        "{e}"
    );
    let st = stats(&d.base);
    assert_eq!(
        st["budget_used_bytes"].as_u64(),
        Some(used),
        "the refused append reserved nothing"
    );
    // Both sessions still work: A's rows are intact, B can take what fits.
    let rows = a.gather(0, 1, &[99]).unwrap();
    assert_eq!(
        bytemuck::cast_slice::<u8, f32>(rows.k),
        &ka[(100 + 99) * 16..(100 + 100) * 16]
    );
    let small = values(2 * 10 * 16, 3);
    assert_eq!(
        b.append(
            0,
            10,
            bytemuck::cast_slice(&small),
            bytemuck::cast_slice(&small)
        )
        .unwrap(),
        10
    );
    let (mut ids, mut sc) = (vec![0u32; 4], vec![0f32; 4]);
    assert_eq!(
        a.search(0, &values(4 * 16, 4), 1, &mut ids, &mut sc)
            .unwrap(),
        1
    );
    a.drop_session().unwrap();
    b.drop_session().unwrap();
    wait_stats(&d.base, "all memory back", |s| {
        s["budget_used_bytes"] == 0 && s["sessions"] == 0
    });
}

/// Not a test on its own: the body of the client process that
/// `a_client_killed_mid_request_is_reaped_and_others_keep_being_served` spawns and SIGKILLs
/// (this test binary re-executed with `KVDEX_TEST_CHILD_BASE` set). Without the variable it
/// does nothing.
#[test]
fn child_client_process() {
    let Ok(base) = std::env::var("KVDEX_TEST_CHILD_BASE") else {
        return;
    };
    let client = Client::connect(&base).unwrap();
    let mut s = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let k = values(2 * 256 * 16, 5);
    s.append(0, 256, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
        .unwrap();
    println!("child-ready {}", s.id().unwrap());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    let (mut ids, mut sc) = (vec![0u32; 4 * 64], vec![0f32; 4 * 64]);
    let q = values(4 * 16, 6);
    loop {
        s.append(1, 256, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
            .unwrap();
        s.search(1, &q, 64, &mut ids, &mut sc).unwrap();
    }
}

#[test]
fn a_client_killed_mid_request_is_reaped_and_others_keep_being_served() {
    use std::io::BufRead;
    let d = Daemon::start(&[]);
    let client = Client::connect(&d.base).unwrap();
    let mut mine = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let k = values(2 * 32 * 16, 8);
    mine.append(0, 32, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
        .unwrap();
    let before = stats(&d.base);

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sessions::child_client_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KVDEX_TEST_CHILD_BASE", &d.base)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let child_id = loop {
        let line = lines
            .next()
            .expect("the child exited before it was ready")
            .unwrap();
        // libtest prints "test sessions::child_client_process ... " without a newline before it.
        if let Some((_, id)) = line.split_once("child-ready ") {
            break id.trim().to_string();
        }
    };
    // Let it get well into its append/search loop, then kill it mid-request.
    wait_stats(&d.base, "the child's appends", |s| {
        s["per_session"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == child_id.as_str() && p["layers"][1]["tokens"].as_u64() > Some(1024))
    });
    child.kill().unwrap();
    child.wait().unwrap();

    // The reaped session stays listed (as closing) until its worker has stopped and its memory
    // is released: once it is unlisted, its memory is back.
    let after = wait_stats(&d.base, "the dead client's session to be reaped", |s| {
        s["per_session"].as_array().is_some_and(|v| v.len() == 1)
    });
    assert_eq!(
        (&after["sessions"], &after["sessions_closing"]),
        (&json!(1), &json!(0))
    );
    assert_eq!(after["budget_used_bytes"], before["budget_used_bytes"]);
    assert_eq!(
        after["per_session"][0]["id"],
        before["per_session"][0]["id"]
    );
    assert_eq!(after["resident_bytes"], before["resident_bytes"]);
    let counted = "kvdex_sessions_ended_total{reason=\"client_gone\"} 1";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let (_, text) = http::get(&d.base, "/metrics");
        if text.contains(counted) || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(text.contains(counted), "{text}");
    // The surviving client is still served.
    assert_eq!(mine.ping(b"still here").unwrap(), b"still here");
    let rows = mine.gather(0, 0, &[31]).unwrap();
    assert_eq!(
        bytemuck::cast_slice::<u8, f32>(rows.k),
        &k[31 * 16..32 * 16]
    );
    // A new client can still come and go.
    let other = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    other.drop_session().unwrap();
}

/// A request waiting on a hung daemon (SIGSTOPped here) ends when the interrupt hook says so,
/// and the session is retired: the abandoned reply could still land in its arena.
#[test]
fn an_interrupted_wait_on_a_hung_daemon_retires_the_session() {
    let d = Daemon::start(&[]);
    let client = Client::connect(&d.base).unwrap();
    let mut s = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    assert_eq!(s.ping(b"up").unwrap(), b"up");
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = asked.clone();
    s.set_interrupt(move || count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 2);
    /// Stops the daemon while alive; resumes it on drop, even when an assertion fails (a
    /// stopped child would hang the `Daemon`'s own drop, which waits for it).
    struct Stopped(libc::pid_t);
    impl Drop for Stopped {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the test's own child, which `d` has not reaped.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let pid = d.child.id() as libc::pid_t;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Stopped(pid);
    // kill(2) only queues the signal: wait until the process is really stopped.
    let stat = format!("/proc/{pid}/stat");
    while !std::fs::read_to_string(&stat)
        .unwrap_or_default()
        .rsplit(") ")
        .next()
        .is_some_and(|rest| rest.starts_with('T'))
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let e = s.ping(b"hung").unwrap_err().to_string();
    drop(stopped);
    assert!(e.contains("interrupted while waiting"), "{e}");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 3);
    let again = s.ping(b"again").unwrap_err().to_string();
    assert!(again.contains("cannot be used any more"), "{again}");
    // The daemon itself is fine: a new session is served.
    let mut other = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    assert_eq!(other.ping(b"ok").unwrap(), b"ok");
}

//! Bad input over shared memory, one test each: wrong or missing token, unknown opcode,
//! out-of-range offsets and lengths, an append larger than the arena, a corrupted ring index,
//! replayed request ids, client death and detach.

mod shm_common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use kvdex::worker::ExitReason;
use kvdex_client::Error as KvdexError;
use kvdex_client::{Client, SessionToken};
use kvdex_wire::shm::layout::{attach_state, Descriptor};
use kvdex_wire::shm::wait;
use kvdex_wire::shm::{ConsumerState, ProducerState, Region};
use shm_common::*;

fn recv_exit(s: &Served) -> ExitReason {
    s.exits
        .recv_timeout(Duration::from_secs(10))
        .expect("worker exit within 10 s")
}

#[test]
fn missing_token_gets_unauthorized_and_nothing_is_served() {
    let s = serve(f32_shape(1, 1, 1, 4), 1 << 14, "notoken");
    // A raw client that maps the region but never attaches.
    let mut r = Region::open(&s.path).unwrap();
    r.arena_mut()[..4].copy_from_slice(b"ping");
    let (sq, cq) = (r.sq(), r.cq());
    let (mut p, mut c) = (ProducerState::new(&sq), ConsumerState::new(&cq));
    let d = Descriptor {
        request_id: 1,
        code: 1,
        in_offset: 0,
        in_len: 4,
        out_offset: 8,
        out_len: 64,
        ..Default::default()
    };
    assert!(p.try_push(&sq, &d).unwrap());
    wait::notify(&r.header().daemon_sleeping.0);
    let (index, done) = loop {
        if let Some(x) = c.try_pop(&cq).unwrap() {
            break x;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(done.code, kvdex_wire::proto::Status::Unauthorized as u32);
    assert_eq!(done.out_len, 0);
    let mut buf = [0u8; 256];
    let n = r.read_error(index, done.aux, &mut buf);
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("attach"),
        "message names what to do"
    );
    assert_eq!(&r.arena_mut()[8..12], &[0; 4], "the ping was not echoed");
}

#[test]
fn wrong_token_is_refused_then_the_right_one_works() {
    let s = serve(f32_shape(1, 1, 1, 4), 1 << 14, "badtoken");
    let mut wrong = s.token;
    wrong[15] ^= 1;
    match Client::attach_with(&s.path, &wrong, test_wait()) {
        Err(KvdexError::Unauthorized(m)) => assert!(m.contains("refused the token"), "{m}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    assert_eq!(h.ping(b"ok").unwrap(), b"ok");
    assert_eq!(SessionToken::from_bytes(s.token).to_string().len(), 32);
}

#[test]
fn unknown_opcode_and_replayed_ids_are_bad_requests() {
    let s = serve(f32_shape(1, 1, 1, 4), 1 << 14, "opcode");
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    let d = Descriptor {
        request_id: 100,
        code: 99,
        out_len: 64,
        ..Default::default()
    };
    match h.submit(d) {
        Err(KvdexError::BadRequest(m)) => assert!(m.contains("unknown opcode 99"), "{m}"),
        other => panic!("expected BadRequest, got {other:?}"),
    }
    let e = h
        .submit(Descriptor {
            request_id: 100,
            code: 1,
            out_len: 64,
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("request id 100 is not after"), "{e}");
    assert_eq!(h.ping(b"still fine").unwrap(), b"still fine");
}

#[test]
fn out_of_range_offsets_and_lengths_are_rejected() {
    let s = serve(f32_shape(1, 1, 1, 4), 1 << 14, "range");
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    let arena = h.arena_len();
    let mut id = 1000;
    let mut check = |d: Descriptor, needle: &str| {
        id += 1;
        let e = h
            .submit(Descriptor {
                request_id: id,
                ..d
            })
            .unwrap_err();
        assert!(matches!(e, KvdexError::BadRequest(_)), "{e:?}");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
    };
    let ping = Descriptor {
        code: 1,
        ..Default::default()
    };
    check(
        Descriptor {
            in_offset: arena,
            in_len: 8,
            ..ping
        },
        "outside the",
    );
    check(
        Descriptor {
            in_offset: 0,
            in_len: arena + 1,
            ..ping
        },
        "outside the",
    );
    check(
        Descriptor {
            in_offset: u64::MAX - 7,
            in_len: 16,
            ..ping
        },
        "outside the",
    );
    check(
        Descriptor {
            out_offset: 8,
            out_len: arena,
            ..ping
        },
        "outside the",
    );
    check(
        Descriptor {
            in_offset: 3,
            in_len: 1,
            ..ping
        },
        "not a multiple of 8",
    );
    check(
        Descriptor {
            in_len: 64,
            out_offset: 32,
            out_len: 64,
            ..ping
        },
        "overlap",
    );
    check(
        Descriptor {
            in_len: 64,
            out_offset: 64,
            out_len: 8,
            ..ping
        },
        "needs 64 bytes",
    );
    assert_eq!(h.ping(b"alive").unwrap(), b"alive");
}

#[test]
fn append_larger_than_the_arena_is_refused() {
    let s = serve(f32_shape(1, 1, 1, 64), 8192, "big");
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    let tokens = 64u32; // 64 tokens * 64 dims * 4 B = 16 KiB each of K and V: over the 8 KiB arena
    let kv = vec![0u8; tokens as usize * 64 * 4];
    let e = h.append(0, tokens, &kv, &kv).unwrap_err();
    assert!(
        e.to_string().contains("does not fit the 8192-byte arena"),
        "{e}"
    );
    // The daemon refuses the same thing when a client claims it anyway.
    let e = h
        .submit(Descriptor {
            request_id: 50,
            code: 2,
            in_len: 2 * kv.len() as u64 + 16,
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("outside the 8192-byte arena"), "{e}");
    assert_eq!(s.session.len(0).unwrap(), 0, "nothing was appended");
    let small = vec![0u8; 4 * 64 * 4];
    assert_eq!(h.append(0, 4, &small, &small).unwrap(), 4);
}

#[test]
fn corrupted_ring_index_closes_only_that_region() {
    let bad = serve(f32_shape(1, 1, 1, 4), 1 << 14, "corrupt");
    let good = serve(f32_shape(1, 1, 1, 4), 1 << 14, "neighbour");
    let mut hb = Client::attach_with(&bad.path, &bad.token, test_wait()).unwrap();
    let mut hg = Client::attach_with(&good.path, &good.token, test_wait()).unwrap();
    assert_eq!(hb.ping(b"x").unwrap(), b"x");
    // The client (or a stray write) moves the submission head far beyond tail + capacity.
    let h = hb.region().header();
    h.sq_head.0.fetch_add(1000, Ordering::AcqRel);
    wait::force_wake(&h.daemon_sleeping.0);
    match recv_exit(&bad) {
        ExitReason::Protocol(m) => assert!(m.contains("submission ring index corrupted"), "{m}"),
        other => panic!("expected a protocol exit, got {other:?}"),
    }
    assert!(
        hb.region().closed().is_some(),
        "the region is marked closed"
    );
    assert!(
        hb.ping(b"y").is_err(),
        "the corrupted client is no longer served"
    );
    assert_eq!(hg.ping(b"neighbour ok").unwrap(), b"neighbour ok");
    assert!(
        good.exits.try_recv().is_err(),
        "the other worker keeps running"
    );
}

#[test]
fn corrupted_completion_tail_is_detected() {
    let s = serve(f32_shape(1, 1, 1, 4), 1 << 14, "cqcorrupt");
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    h.region()
        .header()
        .cq_tail
        .0
        .store(12345, Ordering::Release);
    assert!(h.ping(b"z").is_err());
    match recv_exit(&s) {
        ExitReason::Protocol(m) => assert!(m.contains("completion ring index corrupted"), "{m}"),
        other => panic!("expected a protocol exit, got {other:?}"),
    }
}

#[test]
fn detach_and_stop_end_the_worker() {
    let s = serve(f32_shape(1, 1, 1, 4), 1 << 14, "detach");
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    assert_eq!(h.ping(b"a").unwrap(), b"a");
    drop(h);
    assert_eq!(recv_exit(&s), ExitReason::ClientGone);

    let mut s = serve(f32_shape(1, 1, 1, 4), 1 << 14, "stop");
    let path = s.path.clone();
    s.worker.stop();
    assert_eq!(recv_exit(&s), ExitReason::Stopped);
    drop(s);
    assert!(
        !path.exists(),
        "dropping the worker removes the region file"
    );
}

/// Run as a child process by `killed_client_is_detected`: attaches and pings until killed.
#[test]
#[ignore = "helper run as a child process by killed_client_is_detected"]
fn child_attaches_and_hangs() {
    let (Ok(path), Ok(token)) = (
        std::env::var("KVDEX_TEST_REGION"),
        std::env::var("KVDEX_TEST_TOKEN"),
    ) else {
        return;
    };
    let token = *kvdex_client::SessionToken::parse(&token)
        .unwrap()
        .as_bytes();
    let mut h = Client::attach_with(&path, &token, test_wait()).unwrap();
    // Requests back to back until killed, so the kill most likely lands mid-request.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        h.ping(b"child").unwrap();
    }
}

#[test]
fn killed_client_is_detected() {
    let s = serve(f32_shape(1, 1, 1, 4), 1 << 14, "kill");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_attaches_and_hangs",
            "--nocapture",
        ])
        .env("KVDEX_TEST_REGION", &s.path)
        .env(
            "KVDEX_TEST_TOKEN",
            SessionToken::from_bytes(s.token).to_string(),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the child is attached (its pid is in the header and the daemon accepted it).
    let r = Region::open(&s.path).unwrap();
    let a = &r.header().attach.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(a.state.load(Ordering::Acquire) == attach_state::ACCEPTED
        && a.client_pid.load(Ordering::Acquire) == child.id() as u64)
    {
        assert!(std::time::Instant::now() < deadline, "child never attached");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(s.exits.try_recv().is_err());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(recv_exit(&s), ExitReason::ClientGone);
}

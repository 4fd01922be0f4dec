//! The Unix data socket of the real `kvdex serve` (`sessions.data_socket`): the same answers
//! as shared memory for the same session, a token check first, typed budget errors on both
//! transports, and connections closed when their session ends.

mod common;

use common::Daemon;
use kvdex::store::Shape;
use kvdex_client::Error as KvdexError;
use kvdex_client::{Client, SessionOptions, SocketSession};

/// Bytes for K/V rows; the budget also holds the session's region and one socket arena.
const ROWS: u64 = 65536;
/// The payload arena of the tests' sessions (the smallest allowed).
const PAYLOAD: u64 = 131072;

/// The whole budget: [`ROWS`], plus the region and the data-socket arena, which it covers too.
fn budget() -> u64 {
    let region =
        kvdex_wire::shm::Geometry::new(kvdex_wire::shm::layout::DEFAULT_RING_SLOTS, PAYLOAD)
            .unwrap()
            .total_bytes;
    ROWS + region + PAYLOAD
}

fn shape() -> Shape {
    Shape {
        layers: 1,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 16,
        dtype: kvdex_index::KeyDtype::F32,
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A daemon with a data socket in a directory of its own (`name`: tests run in parallel).
fn start(name: &str) -> (Daemon, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("kvdex-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("data.sock");
    let d = Daemon::start(&[
        ("KVDEX_SESSIONS__DATA_SOCKET", sock.to_str().unwrap()),
        ("KVDEX_MEMORY__BUDGET_BYTES", &budget().to_string()),
        (
            "KVDEX_SESSIONS__DEFAULT_PAYLOAD_BYTES",
            &PAYLOAD.to_string(),
        ),
        ("KVDEX_MEMORY__INITIAL_TOKENS", "16"),
    ]);
    (d, sock)
}

#[test]
fn data_socket_answers_like_shared_memory_and_checks_the_token() {
    let (d, sock_path) = start("datasock");
    let client = Client::connect(&d.base).unwrap();
    let mut shm = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let mut sock = shm.open_socket().unwrap();
    assert_eq!(sock.arena_len(), shm.arena_len());

    // Ping: the same echo, 64 B and 8 KiB.
    for n in [64usize, 8192] {
        let data: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
        assert_eq!(shm.ping(&data).unwrap(), &data[..]);
        assert_eq!(sock.ping(&data).unwrap(), &data[..]);
    }

    // Appends over either transport land in the same session.
    let (t1, t2) = (40usize, 24usize);
    let kv1 = values(2 * t1 * 16, 1);
    let kv2 = values(2 * t2 * 16, 2);
    assert_eq!(
        shm.append(
            0,
            t1 as u32,
            bytemuck::cast_slice(&kv1),
            bytemuck::cast_slice(&kv1)
        )
        .unwrap(),
        t1 as u64
    );
    assert_eq!(
        sock.append(
            0,
            t2 as u32,
            bytemuck::cast_slice(&kv2),
            bytemuck::cast_slice(&kv2)
        )
        .unwrap(),
        (t1 + t2) as u64
    );

    // Search: identical ids and scores.
    let q = values(4 * 16, 3);
    let k = 10u32;
    let (mut ids_a, mut sc_a) = (vec![0u32; 40], vec![0f32; 40]);
    let (mut ids_b, mut sc_b) = (vec![u32::MAX; 40], vec![f32::NAN; 40]);
    assert_eq!(shm.search(0, &q, k, &mut ids_a, &mut sc_a).unwrap(), 10);
    assert_eq!(sock.search(0, &q, k, &mut ids_b, &mut sc_b).unwrap(), 10);
    assert_eq!(ids_a, ids_b);
    assert_eq!(sc_a, sc_b);
    // And they are right: query head 0 reads KV head 0; row t of KV head 0 holds K.
    let key = |t: usize| -> &[f32] {
        if t < t1 {
            &kv1[t * 16..(t + 1) * 16]
        } else {
            &kv2[(t - t1) * 16..(t - t1 + 1) * 16]
        }
    };
    let dot = |t: usize| key(t).iter().zip(&q[..16]).map(|(a, b)| a * b).sum::<f32>();
    let mut all: Vec<usize> = (0..t1 + t2).collect();
    all.sort_by(|&a, &b| dot(b).total_cmp(&dot(a)));
    let mut got: Vec<usize> = ids_a[..10].iter().map(|&i| i as usize).collect();
    let mut want = all[..10].to_vec();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);

    // Gather: the same rows.
    let ids = [0u32, 39, 40, 63];
    let a = shm.gather(0, 1, &ids).unwrap();
    let (ka, va) = (a.k.to_vec(), a.v.to_vec());
    let b = sock.gather(0, 1, &ids).unwrap();
    assert_eq!((b.k, b.v), (&ka[..], &va[..]));

    // The token is checked: wrong token, unknown session.
    let id = shm.id().unwrap().to_owned();
    match SocketSession::connect(&sock_path, &id, &[0u8; 16]) {
        Err(KvdexError::Unauthorized(msg)) => {
            assert!(msg.contains("wrong token for session"), "{msg}")
        }
        other => panic!("wrong token accepted or misreported: {other:?}"),
    }
    match SocketSession::connect(&sock_path, "0123456789abcdef", &[0u8; 16]) {
        Err(KvdexError::NotFound(msg)) => assert!(msg.contains("0123456789abcdef"), "{msg}"),
        other => panic!("unknown session accepted or misreported: {other:?}"),
    }

    // Ending the session closes its socket connections.
    shm.drop_session().unwrap();
    assert!(sock.ping(b"x").is_err(), "the socket outlived its session");
    d.terminate();
    assert!(!sock_path.exists(), "the daemon removes its data socket");
    let _ = std::fs::remove_dir_all(sock_path.parent().unwrap());
}

#[test]
fn over_budget_appends_are_typed_budget_errors_on_both_transports() {
    let (d, sock_path) = start("datasock-budget");
    let client = Client::connect(&d.base).unwrap();
    let mut shm = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let mut sock = shm.open_socket().unwrap();
    let kv = values(2 * 100 * 16, 4);
    shm.append(0, 100, bytemuck::cast_slice(&kv), bytemuck::cast_slice(&kv))
        .unwrap();
    let big = values(2 * 400 * 16, 5);
    let shm_err = shm
        .append(
            0,
            400,
            bytemuck::cast_slice(&big),
            bytemuck::cast_slice(&big),
        )
        .unwrap_err();
    let sock_err = sock
        .append(
            0,
            400,
            bytemuck::cast_slice(&big),
            bytemuck::cast_slice(&big),
        )
        .unwrap_err();
    for e in [&shm_err, &sock_err] {
        match *e {
            KvdexError::Budget {
                asked,
                left,
                budget,
            } => {
                assert_eq!(budget, self::budget());
                assert!(asked > left && left < ROWS, "asked {asked}, left {left}");
            }
            ref other => panic!("not a typed budget error: {other:?}"),
        }
        assert!(e
            .to_string()
            .starts_with("memory budget exceeded: asked for"));
    }
    assert_eq!(shm_err.to_string(), sock_err.to_string());
    // The refused append left the session intact on both transports.
    assert_eq!(sock.gather(0, 0, &[99]).unwrap().k.len(), 64);
    drop(sock);
    d.terminate();
    let _ = std::fs::remove_dir_all(sock_path.parent().unwrap());
}

#[test]
fn a_client_of_another_protocol_version_is_refused_naming_both() {
    use kvdex_wire::hello::{Hello, FRAME_HEADER, HELLO_VERSION};
    use std::io::{Read, Write};
    let (d, sock_path) = start("datasock-version");
    // Version 1 sent the retrieve scale 0 for "default"; version 2 has a SCALE flag. A
    // version-1 client must be told so at the hello, not have its retrieves misread.
    assert_eq!(u64::from(HELLO_VERSION), kvdex_wire::shm::layout::VERSION);
    let mut old = Hello::new("0123456789abcdef", &[0u8; 16]).unwrap();
    old.version = 1;
    let mut s = std::os::unix::net::UnixStream::connect(&sock_path).unwrap();
    s.write_all(bytemuck::bytes_of(&old)).unwrap();
    let mut head = [0u8; FRAME_HEADER];
    s.read_exact(&mut head).unwrap();
    let c: kvdex_wire::shm::Descriptor = bytemuck::pod_read_unaligned(&head);
    assert_ne!(c.code, 0, "an old hello was accepted");
    let mut msg = vec![0u8; c.aux as usize];
    s.read_exact(&mut msg).unwrap();
    let msg = String::from_utf8_lossy(&msg);
    assert!(
        msg.contains("version 1;") && msg.contains(&format!(", {HELLO_VERSION})")),
        "{msg}"
    );
    d.terminate();
    let _ = std::fs::remove_dir_all(sock_path.parent().unwrap());
}

//! Socket framing, the hub's token check, and session release.

use super::*;
use crate::store::Shape;
use crate::worker::NoopObserver;
use kvdex_wire::proto::Status;

fn call(s: &mut UnixStream, d: Descriptor, body: &[u8]) -> (Descriptor, Vec<u8>) {
    s.write_all(bytemuck::bytes_of(&d)).unwrap();
    s.write_all(body).unwrap();
    let mut h = [0u8; FRAME_HEADER];
    s.read_exact(&mut h).unwrap();
    let c: Descriptor = bytemuck::pod_read_unaligned(&h);
    let n = if c.code == 0 { c.out_len } else { c.aux as u64 };
    let mut out = vec![0u8; n as usize];
    s.read_exact(&mut out).unwrap();
    (c, out)
}

fn session() -> Arc<Session> {
    let shape = Shape {
        layers: 1,
        q_heads: 1,
        kv_heads: 1,
        head_dim: 2,
        dtype: kvdex_index::KeyDtype::F32,
    };
    Arc::new(Session::new(shape).unwrap())
}

#[test]
fn socket_frames_use_the_same_request_path() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        serve_frames(b, Dispatcher::new(session()), 4096, &NoopObserver)
    });
    let ping = Descriptor {
        request_id: 1,
        code: 1,
        in_len: 5,
        out_len: 100,
        ..Default::default()
    };
    let (c, out) = call(&mut a, ping, b"hello");
    assert_eq!((c.code, c.request_id, &out[..]), (0, 1, &b"hello"[..]));
    let (c, out) = call(
        &mut a,
        Descriptor {
            request_id: 2,
            code: 42,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(c.code, Status::BadRequest as u32);
    assert!(String::from_utf8_lossy(&out).contains("unknown opcode 42"));
    // A frame claiming more body than the arena is answered, then the connection ends.
    let (c, out) = call(
        &mut a,
        Descriptor {
            request_id: 3,
            code: 1,
            in_len: 1 << 40,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(c.code, Status::BadRequest as u32);
    assert!(String::from_utf8_lossy(&out).contains("exceeds the 4096-byte arena"));
    drop(a);
    assert!(server.join().unwrap().is_err());
}

#[test]
fn hub_checks_the_token_and_ending_the_session_closes_its_connections() {
    let hub = SocketHub::new();
    let token = [9u8; 16];
    let s = session();
    let presence = Arc::new(crate::worker::liveness::Presence::default());
    let reg = hub.register(
        "abc",
        token,
        s.clone(),
        4096,
        Arc::new(NoopObserver),
        presence,
        Arc::new(crate::store::Budget::unlimited()),
    );
    let connect = |hello: Hello| {
        let (mut a, b) = UnixStream::pair().unwrap();
        let h = hub.clone();
        let t = std::thread::spawn(move || h.serve_connection(b));
        a.write_all(bytemuck::bytes_of(&hello)).unwrap();
        let mut head = [0u8; FRAME_HEADER];
        a.read_exact(&mut head).unwrap();
        let c: Descriptor = bytemuck::pod_read_unaligned(&head);
        let mut msg = vec![0u8; c.aux as usize];
        a.read_exact(&mut msg).unwrap();
        (a, c, String::from_utf8(msg).unwrap(), t)
    };
    let (_, c, msg, t) = connect(Hello::new("abc", &[8; 16]).unwrap());
    assert_eq!(c.code, Status::Unauthorized as u32);
    assert!(msg.contains("wrong token for session abc"), "{msg}");
    assert!(t.join().unwrap().is_err());
    let (_, c, msg, _) = connect(Hello::new("nope", &token).unwrap());
    assert_eq!(
        (c.code, msg.contains("\"nope\"")),
        (Status::NotFound as u32, true)
    );
    let (mut a, c, _, t) = connect(Hello::new("abc", &token).unwrap());
    assert_eq!((c.code, c.out_len), (0, 4096));
    let ping = Descriptor {
        request_id: 1,
        code: 1,
        in_len: 2,
        out_len: 64,
        ..Default::default()
    };
    assert_eq!(call(&mut a, ping, b"hi").1, b"hi");
    assert_eq!(
        Arc::strong_count(&s),
        3,
        "the test, the hub, the connection"
    );
    drop(reg);
    assert_eq!(Arc::strong_count(&s), 1, "ending the session released it");
    assert_eq!(
        a.read(&mut [0u8; 1]).unwrap(),
        0,
        "the connection was closed"
    );
    assert!(t.join().unwrap().is_ok());
}

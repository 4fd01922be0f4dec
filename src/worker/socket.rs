//! The Unix-socket baseline: the same framing and the same request path as shared memory.
//!
//! A frame is a 64-byte [`Descriptor`] followed by `in_len` body bytes (the descriptor's
//! `in_offset` is ignored). The reply is a completion descriptor followed by `out_len` response
//! bytes on success, or `aux` error-message bytes on failure. The server keeps a private arena
//! per connection and calls the same [`Dispatcher`] as the shared-memory worker, so
//! `kvdex bench rtt` compares only the transports. It exists for that benchmark; the daemon
//! may also offer it behind a config flag.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use crate::error::{KvdexError, Result};
use crate::proto::Status;
use crate::shm::layout::PAYLOAD_ALIGN;
use crate::shm::Descriptor;
use crate::store::Session;
use crate::worker::dispatch::Dispatcher;

/// Bytes of a frame header (one descriptor).
pub const FRAME_HEADER: usize = std::mem::size_of::<Descriptor>();

/// Accepts connections on `listener` forever, one thread per connection, each with an arena of
/// `arena_bytes`, all serving `session`.
pub fn serve_unix(listener: UnixListener, session: Arc<Session>, arena_bytes: usize) -> Result<()> {
    for stream in listener.incoming() {
        let stream = stream?;
        let session = session.clone();
        std::thread::Builder::new()
            .name("kvdex-socket".into())
            .spawn(move || {
                if let Err(e) = serve_connection(stream, session, arena_bytes) {
                    tracing::debug!(error = %e, "socket connection ended");
                }
            })?;
    }
    Ok(())
}

/// Serves one connection until the peer closes it.
pub fn serve_connection(
    mut stream: UnixStream,
    session: Arc<Session>,
    arena_bytes: usize,
) -> Result<()> {
    let mut dispatcher = Dispatcher::new(session);
    let mut arena = vec![0u8; arena_bytes];
    let mut reply = vec![0u8; FRAME_HEADER + arena_bytes];
    let mut header = [0u8; FRAME_HEADER];
    loop {
        match stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let mut d: Descriptor = bytemuck::pod_read_unaligned(&header);
        let in_len = usize::try_from(d.in_len)
            .ok()
            .filter(|&n| n <= arena_bytes / 2)
            .ok_or_else(|| {
                KvdexError::BadRequest(format!(
                    "frame body of {} bytes exceeds {}",
                    d.in_len,
                    arena_bytes / 2
                ))
            })?;
        stream.read_exact(&mut arena[..in_len])?;
        let out_offset = (in_len as u64).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN;
        d.in_offset = 0;
        d.out_offset = out_offset;
        d.out_len = d.out_len.min(arena_bytes as u64 - out_offset);
        let (c, body): (Descriptor, &[u8]) = match dispatcher.serve(&d, &mut arena) {
            Ok(n) => (
                Descriptor {
                    request_id: d.request_id,
                    out_offset,
                    out_len: n,
                    ..Default::default()
                },
                &arena[out_offset as usize..(out_offset + n) as usize],
            ),
            Err(e) => {
                let msg = e.to_string();
                let n = msg.len().min(arena_bytes);
                arena[..n].copy_from_slice(&msg.as_bytes()[..n]);
                let c = Descriptor {
                    request_id: d.request_id,
                    code: Status::of(&e) as u32,
                    aux: n as u32,
                    ..Default::default()
                };
                (c, &arena[..n])
            }
        };
        // One write per reply, as the client sends one write per request.
        reply[..FRAME_HEADER].copy_from_slice(bytemuck::bytes_of(&c));
        reply[FRAME_HEADER..FRAME_HEADER + body.len()].copy_from_slice(body);
        stream.write_all(&reply[..FRAME_HEADER + body.len()])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Shape;

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

    #[test]
    fn socket_frames_use_the_same_request_path() {
        let shape = Shape {
            layers: 1,
            q_heads: 1,
            kv_heads: 1,
            head_dim: 2,
            dtype: kvdex_index::KeyDtype::F32,
        };
        let session = Arc::new(Session::new(shape).unwrap());
        let (mut a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_connection(b, session, 4096));
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
        // A frame claiming more body than the server's arena ends the connection with an error.
        a.write_all(bytemuck::bytes_of(&Descriptor {
            request_id: 3,
            code: 1,
            in_len: 1 << 40,
            ..Default::default()
        }))
        .unwrap();
        drop(a);
        assert!(server.join().unwrap().is_err());
    }
}

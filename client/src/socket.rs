//! A session over the daemon's Unix data socket (`sessions.data_socket`): the same requests as
//! [`super::SessionHandle`], the same codec, carried by a stream socket instead of the rings.
//!
//! It exists for clients that cannot map the region, and as the baseline `kvdex bench rtt`
//! measures shared memory against. One request at a time; requests are encoded into, and
//! responses read from, one buffer allocated at connect, so a request allocates nothing.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use kvdex_wire::hello::{Hello, FRAME_HEADER};
use kvdex_wire::proto::{Request, Response, Status};
use kvdex_wire::shm::layout::PAYLOAD_ALIGN;
use kvdex_wire::shm::Descriptor;
use kvdex_wire::{Error, Result};

/// A connection to one session over the data socket.
#[derive(Debug)]
pub struct SocketSession {
    stream: UnixStream,
    /// Frame header, then the body (request out, response in).
    buf: Vec<u8>,
    arena_bytes: u64,
    next_id: u64,
}

impl SocketSession {
    /// Connects to the data socket at `path` and presents session `id`'s `token`. A wrong
    /// token fails with [`Error::Unauthorized`], an unknown id with
    /// [`Error::NotFound`], each with the daemon's message.
    pub fn connect(path: impl AsRef<Path>, id: &str, token: &[u8; 16]) -> Result<Self> {
        let path = path.as_ref();
        let mut stream = UnixStream::connect(path)
            .map_err(|e| Error::Disconnected(format!("data socket {}: {e}", path.display())))?;
        stream.write_all(bytemuck::bytes_of(&Hello::new(id, token)?))?;
        let mut head = [0u8; FRAME_HEADER];
        stream.read_exact(&mut head)?;
        let c: Descriptor = bytemuck::pod_read_unaligned(&head);
        if c.code != Status::Ok as u32 {
            let mut msg = vec![0u8; (c.aux as usize).min(4096)];
            stream.read_exact(&mut msg)?;
            let msg = String::from_utf8_lossy(&msg).into_owned();
            return Err(Status::from_code(c.code).into_error(&c, msg));
        }
        let arena_bytes = c.out_len;
        let len = usize::try_from(arena_bytes)
            .ok()
            .and_then(|n| n.checked_add(FRAME_HEADER))
            .ok_or_else(|| Error::Protocol(format!("arena of {arena_bytes} bytes")))?;
        Ok(Self {
            stream,
            buf: vec![0u8; len],
            arena_bytes,
            next_id: 1,
        })
    }

    /// Bytes of the connection's arena: the largest request plus response one call carries.
    pub fn arena_len(&self) -> u64 {
        self.arena_bytes
    }

    /// Sends `req` and returns the response body (a slice of the buffer).
    fn call(&mut self, req: &Request<'_>) -> Result<Response<'_>> {
        let op = req.opcode();
        let in_len = req.encode(&mut self.buf[FRAME_HEADER..]).map_err(|_| {
            Error::BadRequest(format!(
                "{} request of {} bytes does not fit the {}-byte arena",
                op.name(),
                req.encoded_len(),
                self.arena_bytes
            ))
        })?;
        let out_offset = (in_len as u64).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN;
        let d = Descriptor {
            request_id: self.next_id,
            code: op as u32,
            in_len: in_len as u64,
            out_len: self.arena_bytes.saturating_sub(out_offset),
            ..Default::default()
        };
        self.next_id += 1;
        self.buf[..FRAME_HEADER].copy_from_slice(bytemuck::bytes_of(&d));
        self.stream.write_all(&self.buf[..FRAME_HEADER + in_len])?;
        self.stream.read_exact(&mut self.buf[..FRAME_HEADER])?;
        let c: Descriptor = bytemuck::pod_read_unaligned(&self.buf[..FRAME_HEADER]);
        let ok = c.code == Status::Ok as u32;
        let body = if ok { c.out_len } else { c.aux as u64 };
        let body = usize::try_from(body)
            .ok()
            .filter(|&b| b <= self.buf.len())
            .ok_or_else(|| Error::Protocol(format!("socket reply of {body} bytes")))?;
        self.stream.read_exact(&mut self.buf[..body])?;
        if !ok {
            let msg = String::from_utf8_lossy(&self.buf[..body]).into_owned();
            return Err(Status::from_code(c.code).into_error(&c, msg));
        }
        if c.request_id != d.request_id {
            return Err(Error::Protocol(format!(
                "reply for request {} while waiting for {}",
                c.request_id, d.request_id
            )));
        }
        Response::decode(op, &self.buf[..body])
    }

    /// Echoes `data` through the daemon.
    pub fn ping(&mut self, data: &[u8]) -> Result<&[u8]> {
        match self.call(&Request::Ping { data })? {
            Response::Ping { data } => Ok(data),
            other => Err(super::unexpected(other.opcode())),
        }
    }

    /// Appends `tokens` tokens to `layer` (as [`super::SessionHandle::append`]).
    pub fn append(&mut self, layer: u32, tokens: u32, k: &[u8], v: &[u8]) -> Result<u64> {
        match self.call(&Request::Append {
            layer,
            tokens,
            k,
            v,
        })? {
            Response::Append { tokens } => Ok(tokens),
            other => Err(super::unexpected(other.opcode())),
        }
    }

    /// Top-`k` keys of `layer` for every query head (as [`super::SessionHandle::search`]).
    pub fn search(
        &mut self,
        layer: u32,
        q: &[f32],
        k: u32,
        ids: &mut [u32],
        scores: &mut [f32],
    ) -> Result<usize> {
        let query = bytemuck::cast_slice(q);
        match self.call(&Request::Search { layer, k, query })? {
            Response::Search {
                k,
                q_heads,
                ids: id_bytes,
                scores: score_bytes,
            } => super::copy_search_hits(k, q_heads, id_bytes, score_bytes, ids, scores),
            other => Err(super::unexpected(other.opcode())),
        }
    }

    /// K and V rows of `ids` for `kv_head` of `layer` (as [`super::SessionHandle::gather`]),
    /// valid until the next request.
    pub fn gather(
        &mut self,
        layer: u32,
        kv_head: u32,
        ids: &[u32],
    ) -> Result<super::GatheredRows<'_>> {
        let ids = bytemuck::cast_slice(ids);
        match self.call(&Request::Gather {
            layer,
            kv_head,
            ids,
        })? {
            Response::Gather {
                row_bytes, k, v, ..
            } => Ok(super::GatheredRows {
                k,
                v,
                row_bytes: row_bytes as usize,
            }),
            other => Err(super::unexpected(other.opcode())),
        }
    }
}

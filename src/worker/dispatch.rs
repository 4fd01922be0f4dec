//! Validating and executing one request against a session, independent of the transport.
//!
//! The shared-memory worker and the Unix-socket baseline both call [`Dispatcher::serve`] with
//! a descriptor and the bytes of an arena, so the benchmark compares transports over the same
//! request path.

use std::sync::Arc;

use kvdex_index::{Hits, SearchScratch};

use std::time::Instant;

use crate::error::{KvdexError, Result};
use crate::store::Session;
use crate::worker::Observer;
use kvdex_wire::proto::{self, Opcode, Request, SearchLayout};
use kvdex_wire::shm::layout::PAYLOAD_ALIGN;
use kvdex_wire::shm::Descriptor;

/// Per-connection state and scratch: everything a request needs, reused across requests so
/// that serving one does not allocate.
pub struct Dispatcher {
    session: Arc<Session>,
    last_request_id: Option<u64>,
    scratch: SearchScratch,
    hits: Hits,
    query: Vec<f32>,
    ids: Vec<u32>,
    /// An append's K and V, copied out of the arena once (see [`Dispatcher::execute`]).
    append_k: Vec<u8>,
    append_v: Vec<u8>,
    decode: super::decode_ops::DecodeOps,
}

fn check_range(what: &str, offset: u64, len: u64, arena: usize) -> Result<std::ops::Range<usize>> {
    if !offset.is_multiple_of(PAYLOAD_ALIGN) {
        return Err(KvdexError::BadRequest(format!(
            "{what}_offset {offset} is not a multiple of {PAYLOAD_ALIGN}"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= arena as u64 => Ok(offset as usize..end as usize),
        _ => Err(KvdexError::BadRequest(format!(
            "{what} range offset {offset} + length {len} is outside the {arena}-byte arena"
        ))),
    }
}

/// Splits the arena into the request body (read) and the response space (written); they must
/// not overlap.
fn split(
    arena: &mut [u8],
    input: std::ops::Range<usize>,
    output: std::ops::Range<usize>,
) -> Result<(&[u8], &mut [u8])> {
    if input.is_empty() {
        return Ok((&[], &mut arena[output]));
    }
    if output.is_empty() {
        return Ok((&arena[input], &mut []));
    }
    if input.end <= output.start {
        let (a, b) = arena.split_at_mut(output.start);
        Ok((&a[input], &mut b[..output.len()]))
    } else if output.end <= input.start {
        let (a, b) = arena.split_at_mut(input.start);
        Ok((&b[..input.len()], &mut a[output]))
    } else {
        Err(KvdexError::BadRequest(format!(
            "request body {input:?} and response space {output:?} overlap"
        )))
    }
}

/// The completion reporting `e` for `request_id`, where the transport put `aux` bytes of the
/// error message. A budget failure carries its numbers (`reserved[0]` asked, `reserved[1]`
/// left, `out_len` the whole budget), so that every transport's client rebuilds the same
/// [`KvdexError::Budget`] (see [`Status::into_error`]).
pub fn error_completion(request_id: u64, e: &KvdexError, aux: u32) -> Descriptor {
    let mut c = Descriptor {
        request_id,
        code: e.status() as u32,
        aux,
        ..Default::default()
    };
    if let KvdexError::Budget {
        asked,
        left,
        budget,
    } = *e
    {
        c.reserved = [asked, left];
        c.out_len = budget;
    }
    c
}

fn too_small(op: Opcode, need: usize, have: usize) -> KvdexError {
    KvdexError::BadRequest(format!(
        "{} response needs {need} bytes, the response space has {have}",
        op.name()
    ))
}

impl Dispatcher {
    /// A dispatcher serving `session`.
    pub fn new(session: Arc<Session>) -> Self {
        Self {
            session,
            last_request_id: None,
            scratch: SearchScratch::new(),
            hits: Hits::default(),
            query: Vec::new(),
            ids: Vec::new(),
            append_k: Vec::new(),
            append_v: Vec::new(),
            decode: Default::default(),
        }
    }

    /// The session served.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// [`Dispatcher::serve`], timed and reported to `observer`: the request path every
    /// transport (shared memory, the Unix data socket) goes through.
    pub fn serve_observed(
        &mut self,
        d: &Descriptor,
        arena: &mut [u8],
        observer: &dyn Observer,
    ) -> Result<u64> {
        let started = Instant::now();
        self.decode.ensure_recorder(observer);
        let result = self.serve(d, arena);
        let op = Opcode::from_code(d.code).map_or("invalid", Opcode::name);
        let micros = started.elapsed().as_secs_f64() * 1e6;
        let out = *result.as_ref().unwrap_or(&0);
        observer.on_request(op, result.is_ok(), micros, d.in_len, out);
        result
    }

    /// Validates `d` against the arena and this connection's state, executes it, and returns
    /// the bytes of response written at `d.out_offset`. `d` must already be a private copy.
    pub fn serve(&mut self, d: &Descriptor, arena: &mut [u8]) -> Result<u64> {
        if let Some(last) = self.last_request_id {
            if d.request_id <= last {
                return Err(KvdexError::BadRequest(format!(
                    "request id {} is not after the previous one ({last})",
                    d.request_id
                )));
            }
        }
        self.last_request_id = Some(d.request_id);
        let op = Opcode::from_code(d.code)
            .ok_or_else(|| KvdexError::BadRequest(format!("unknown opcode {}", d.code)))?;
        let input = check_range("in", d.in_offset, d.in_len, arena.len())?;
        let output = check_range("out", d.out_offset, d.out_len, arena.len())?;
        if op == Opcode::Retrieve {
            self.decode.bind_arena(&self.session, arena);
        }
        let (body, out) = split(arena, input, output)?;
        if matches!(
            op,
            Opcode::Seal
                | Opcode::Retrieve
                | Opcode::SetWkv
                | Opcode::RegisterDest
                | Opcode::UnregisterDest
                | Opcode::Truncate
        ) {
            return self
                .decode
                .serve(&self.session, op, body, out)
                .map(|n| n as u64);
        }
        let req = Request::decode(op, body)?;
        self.execute(req, out).map(|n| n as u64)
    }

    fn execute(&mut self, req: Request<'_>, out: &mut [u8]) -> Result<usize> {
        let op = req.opcode();
        match req {
            Request::Ping { data } => {
                let dst = out
                    .get_mut(..data.len())
                    .ok_or_else(|| too_small(op, data.len(), 0))?;
                dst.copy_from_slice(data);
                Ok(data.len())
            }
            Request::Append {
                layer,
                tokens,
                k,
                v,
            } => {
                let dst = out.get_mut(..8).ok_or_else(|| too_small(op, 8, 0))?;
                // Copied out of shared memory once: the store checks the bytes (NaN, norms)
                // and then stores them, and a client writing the arena in between must not
                // get unchecked bytes stored.
                self.append_k.clear();
                self.append_k.extend_from_slice(k);
                self.append_v.clear();
                self.append_v.extend_from_slice(v);
                let (k, v) = (&self.append_k, &self.append_v);
                let len = self.session.append(layer, tokens as usize, k, v)?;
                // Tokens that left the window go into the index in the background.
                self.session.schedule_insert(layer);
                dst.copy_from_slice(&(len as u64).to_le_bytes());
                Ok(8)
            }
            Request::Search { layer, k, query } => self.search(layer, k, query, out),
            Request::Gather {
                layer,
                kv_head,
                ids,
            } => {
                // Copy the ids out of shared memory first: the store validates each id and then
                // indexes with it, which must see the same value both times.
                self.ids.clear();
                self.ids.resize(ids.len() / 4, 0);
                proto::read_u32s(ids, &mut self.ids);
                let rb = self.session.shape().row_bytes();
                let need = self
                    .ids
                    .len()
                    .checked_mul(2 * rb)
                    .and_then(|n| n.checked_add(8));
                let have = out.len();
                let need = need
                    .filter(|&n| n <= have)
                    .ok_or_else(|| too_small(op, need.unwrap_or(usize::MAX), have))?;
                let rows = u32::try_from(self.ids.len()).map_err(|_| too_small(op, need, have))?;
                proto::put_gather_header(out, rows, rb as u32)?;
                let written = self
                    .session
                    .gather(layer, kv_head, &self.ids, &mut out[8..need])?;
                Ok(8 + written)
            }
        }
    }

    fn search(&mut self, layer: u32, k: u32, query: &[u8], out: &mut [u8]) -> Result<usize> {
        let shape = *self.session.shape();
        self.query.clear();
        self.query.resize(query.len() / 4, 0.0);
        proto::read_f32s(query, &mut self.query);
        let k = (k as usize).min(self.session.len(layer)?) as u32;
        let layout = SearchLayout::new(shape.q_heads, k)
            .ok_or_else(|| KvdexError::BadRequest(format!("search of k={k} overflows")))?;
        if out.len() < layout.len() {
            return Err(too_small(Opcode::Search, layout.len(), out.len()));
        }
        proto::put_search_header(out, k, shape.q_heads)?;
        let (ids, scores) = out[..layout.len()].split_at_mut(layout.scores.start);
        let ids: &mut [u32] =
            bytemuck::try_cast_slice_mut(&mut ids[layout.ids.start..]).map_err(|e| {
                KvdexError::BadRequest(format!("search response space is misaligned: {e}"))
            })?;
        let scores: &mut [f32] = bytemuck::try_cast_slice_mut(scores).map_err(|e| {
            KvdexError::BadRequest(format!("search response space is misaligned: {e}"))
        })?;
        let used = self.session.search(
            layer,
            &self.query,
            k as usize,
            &mut self.scratch,
            &mut self.hits,
            ids,
            scores,
        )?;
        if used != k as usize {
            return Err(KvdexError::Protocol(format!(
                "layer {layer} changed length during a search ({used} != {k})"
            )));
        }
        Ok(layout.len())
    }
}

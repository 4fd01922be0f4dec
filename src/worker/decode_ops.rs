//! Serving the decode-path ops (`seal`, `retrieve`) for one connection.

use std::sync::Arc;

use crate::error::{KvdexError, Result};
use crate::store::retrieve::{Budget, RetrieveOut, RetrieveScratch, RowsDest, NO_LIMIT};
use crate::store::{SealNeighbours, SealTraining, Session};
use crate::worker::{Observer, RetrieveRecorder};
use kvdex_transfer::{DestId, DeviceLink, IpcEventHandle, IpcMemHandle};
use kvdex_wire::decode::dest::decode_unregister;
use kvdex_wire::decode::{
    split_limits, QueriesPart, RegisterDest, ResponseHeader, RetrieveHeader, RetrieveLayout,
    SealBody, SealRequest, SetWkvHeader, ATTEND, ENGINE_ROWS, GATHER,
};
use kvdex_wire::proto::{self, Opcode};

/// Per-connection buffers of the decode ops, reused across requests.
#[derive(Default)]
pub struct DecodeOps {
    query: Vec<f32>,
    /// Each position's visibility limit of the request being served.
    limits: Vec<u32>,
    scratch: RetrieveScratch,
    dest: Option<ArenaDest>,
    /// Records each retrieve's internals (the daemon's metrics); made by the first observed
    /// request ([`DecodeOps::ensure_recorder`]), none for unobserved use.
    recorder: Option<Box<dyn RetrieveRecorder>>,
}

/// The connection's payload arena, registered with the session's link as a host gather
/// destination: a retrieve's gathered rows are copied there by [`DeviceLink::gather`].
struct ArenaDest {
    link: Arc<dyn DeviceLink>,
    id: DestId,
    /// Address and length of the registered bytes (an address, not a pointer: never
    /// dereferenced here, only compared).
    base: usize,
    len: usize,
}

impl Drop for ArenaDest {
    fn drop(&mut self) {
        // Waits out any gather still writing the arena (none: every retrieve waits for its
        // own), then forgets it.
        if let Err(e) = self.link.unregister(self.id) {
            tracing::debug!(error = %e, "unregistering the payload arena");
        }
    }
}

fn cast_mut<'a, T: bytemuck::Pod>(what: &str, b: &'a mut [u8]) -> Result<&'a mut [T]> {
    bytemuck::try_cast_slice_mut(b)
        .map_err(|e| KvdexError::BadRequest(format!("retrieve response {what} is misaligned: {e}")))
}

impl DecodeOps {
    /// Makes this connection's retrieve recorder from `observer`, once: the first request
    /// allocates it, later ones find it.
    pub fn ensure_recorder(&mut self, observer: &dyn Observer) {
        if self.recorder.is_none() {
            self.recorder = Some(observer.retrieve_recorder());
        }
    }

    /// Registers `arena` (the region's whole payload arena) with `session`'s link as the
    /// destination of retrieve gathers, once; again only if the arena moved. A link that
    /// refuses leaves gathers on the CPU copy.
    pub fn bind_arena(&mut self, session: &Session, arena: &mut [u8]) {
        let (base, len) = (arena.as_mut_ptr() as usize, arena.len());
        if self
            .dest
            .as_ref()
            .is_some_and(|d| d.base == base && d.len == len)
        {
            return;
        }
        self.dest = None;
        let link = session.link().clone();
        // The arena is the region's payload mapping, which stays mapped until the worker
        // thread that owns this DecodeOps (through its Dispatcher) has exited: the registration
        // is dropped, and unregistered, before the mapping goes. It is shared memory, never one
        // of the link's arenas, so no gather source overlaps it. Gathers into it run only
        // inside `retrieve`, which waits for each before returning, and the worker neither
        // reads nor writes the response rows meanwhile.
        // SAFETY: valid for the registration's life, no overlap, no concurrent access (above).
        let registered = unsafe { link.register_host(arena.as_mut_ptr(), len) };
        match registered {
            Ok(id) => {
                self.dest = Some(ArenaDest {
                    link,
                    id,
                    base,
                    len,
                })
            }
            Err(e) => tracing::debug!(error = %e, "payload arena not registered: CPU gathers"),
        }
    }

    /// Executes a `seal` or `retrieve` body; returns the response bytes written into `out`.
    pub fn serve(
        &mut self,
        session: &Arc<Session>,
        op: Opcode,
        body: &[u8],
        out: &mut [u8],
    ) -> Result<usize> {
        match op {
            Opcode::Seal => Self::seal(session, body, out),
            Opcode::Retrieve => self.retrieve(session, body, out),
            Opcode::SetWkv => self.set_wkv(session, body, out),
            Opcode::RegisterDest => Self::register_dest(session, body, out),
            Opcode::UnregisterDest => Self::unregister_dest(session, body, out),
            Opcode::Truncate => Self::truncate(session, body, out),
            other => Err(KvdexError::BadRequest(format!(
                "{} is not a decode-path op",
                other.name()
            ))),
        }
    }

    fn seal(session: &Arc<Session>, body: &[u8], out: &mut [u8]) -> Result<usize> {
        let req = SealRequest::decode(body)?;
        let dst = out.get_mut(..8).ok_or_else(|| {
            KvdexError::BadRequest("seal response needs 8 bytes of response space".into())
        })?;
        // Copied out of shared memory: the build runs long after this request completes.
        let words = |b: &[u8]| {
            let mut w = vec![0u32; b.len() / 4];
            proto::read_u32s(b, &mut w);
            w
        };
        let floats = |b: &[u8]| {
            let mut v = vec![0f32; b.len() / 4];
            proto::read_f32s(b, &mut v);
            v
        };
        let (h, parts) = match req {
            SealRequest::Seal(h, parts) => (h, parts),
            SealRequest::Part(QueriesPart {
                layer,
                start,
                positions,
                queries,
                ..
            }) => {
                let pos = words(positions);
                let staged =
                    session.stage_training(layer, start as usize, floats(queries), &pos)?;
                dst.copy_from_slice(&(staged as u64).to_le_bytes());
                return Ok(8);
            }
        };
        match parts {
            SealBody::Queries { positions, queries } => {
                let (pos, vectors) = (words(positions), floats(queries));
                let training = (h.n > 0).then_some(SealTraining {
                    vectors: &vectors,
                    positions: &pos,
                });
                session.seal(h.layer, h.kind, training)?;
            }
            SealBody::Neighbours { heads, lens, ids } => {
                let (heads, lens, ids) = (words(heads), words(lens), words(ids));
                let lists = SealNeighbours {
                    heads: &heads,
                    lens: &lens,
                    ids: &ids,
                };
                session.seal_with_neighbours(h.layer, h.kind, lists)?;
            }
        }
        let st = session.build_status(h.layer)?;
        dst.copy_from_slice(&(st.sealed_tokens as u64).to_le_bytes());
        Ok(8)
    }

    fn register_dest(session: &Arc<Session>, body: &[u8], out: &mut [u8]) -> Result<usize> {
        let r = RegisterDest::decode(body)?;
        let dst = out
            .get_mut(..8)
            .ok_or_else(|| KvdexError::BadRequest("register_dest response needs 8 bytes".into()))?;
        let event = r.event.map(IpcEventHandle);
        let handle =
            session.register_cuda_dest(&IpcMemHandle(r.mem), r.offset, r.len, event.as_ref())?;
        // handle u32, 0 u32: the u64 the client reads.
        dst.copy_from_slice(&u64::from(handle).to_le_bytes());
        Ok(8)
    }

    fn unregister_dest(session: &Arc<Session>, body: &[u8], out: &mut [u8]) -> Result<usize> {
        let handle = decode_unregister(body)?;
        let dst = out.get_mut(..8).ok_or_else(|| {
            KvdexError::BadRequest("unregister_dest response needs 8 bytes".into())
        })?;
        let left = session.unregister_dest(handle)?;
        dst.copy_from_slice(&(left as u64).to_le_bytes());
        Ok(8)
    }

    fn truncate(session: &Arc<Session>, body: &[u8], out: &mut [u8]) -> Result<usize> {
        let tokens: [u8; 8] = body.try_into().map_err(|_| {
            KvdexError::BadRequest(format!(
                "truncate body is {} bytes, expected 8 (tokens u64)",
                body.len()
            ))
        })?;
        let dst = out
            .get_mut(..8)
            .ok_or_else(|| KvdexError::BadRequest("truncate response needs 8 bytes".into()))?;
        let tokens = u64::from_le_bytes(tokens);
        let tokens = usize::try_from(tokens).map_err(|_| {
            KvdexError::BadRequest(format!("truncate tokens = {tokens} does not fit usize"))
        })?;
        let freed = session.truncate(tokens)?;
        dst.copy_from_slice(&freed.to_le_bytes());
        Ok(8)
    }

    fn set_wkv(&mut self, session: &Arc<Session>, body: &[u8], out: &mut [u8]) -> Result<usize> {
        let s = session.shape();
        let dim = s.kv_heads as usize * s.head_dim as usize;
        let (h, data) = SetWkvHeader::decode(body, dim)?;
        let dst = out.get_mut(..8).ok_or_else(|| {
            KvdexError::BadRequest("set_wkv response needs 8 bytes of response space".into())
        })?;
        // Copied out of shared memory before the store checks and keeps it.
        self.query.clear();
        self.query.resize(data.len() / 4, 0.0);
        proto::read_f32s(data, &mut self.query);
        let got = session.set_wkv(h.layer, h.row_start as usize, &self.query)?;
        dst.copy_from_slice(&(got as u64).to_le_bytes());
        Ok(8)
    }

    fn retrieve(&mut self, session: &Arc<Session>, body: &[u8], out: &mut [u8]) -> Result<usize> {
        let (h, rest) = RetrieveHeader::decode(body)?;
        let (limits, query) = split_limits(h.positions, rest)?;
        let shape = *session.shape();
        let (hq, d) = (shape.q_heads as usize, shape.head_dim as usize);
        let np = h.positions.max(1) as usize;
        // The limits and the query are copied out of shared memory before they are validated
        // and used.
        self.limits.clear();
        if h.positions == 0 {
            self.limits.push(NO_LIMIT);
        } else {
            self.limits.resize(np, 0);
            proto::read_u32s(limits, &mut self.limits);
        }
        self.query.clear();
        self.query.resize(query.len() / 4, 0.0);
        proto::read_f32s(query, &mut self.query);
        let p = h.params;
        if let Budget::Adaptive(b) = p.budget {
            if b.max_k == 0 {
                return Err(KvdexError::BadRequest("adaptive max_k = 0".into()));
            }
        }
        let stride = session.retrieve_stride(h.layer, &p.budget)?;
        let rb = shape.row_bytes();
        // Rows into an engine destination leave the response without a rows section.
        let engine = match h.engine_rows {
            Some(e) => Some(RowsDest {
                id: session.engine_dest(e.dest)?,
                offset: e.offset,
                engine: true,
            }),
            None => None,
        };
        let rows_here = p.gather && engine.is_none();
        let layout =
            RetrieveLayout::new(np * hq, stride, d, rb, p.attend, rows_here).ok_or_else(|| {
                KvdexError::BadRequest(format!("retrieve of {stride} per head overflows"))
            })?;
        if out.len() < layout.len() {
            return Err(KvdexError::BadRequest(format!(
                "retrieve response needs {} bytes, the response space has {}",
                layout.len(),
                out.len()
            )));
        }
        let out = &mut out[..layout.len()];
        let (head, rest) = out.split_at_mut(layout.k.start);
        let (k, rest) = rest.split_at_mut(layout.k.len());
        let (cov, rest) = rest.split_at_mut(layout.coverage.len());
        let (ids, rest) = rest.split_at_mut(layout.ids.len());
        let (scores, rest) = rest.split_at_mut(layout.scores.len());
        let (o, rest) = rest.split_at_mut(layout.out.len());
        let (lse, rest) = rest.split_at_mut(layout.lse.len());
        // The rows section starts on a cache line: skip the padding before it.
        let rows = &mut rest[layout.rows.start - layout.lse.end..];
        let stats = session.retrieve_at(
            h.layer,
            &self.query,
            &self.limits,
            &p,
            &mut self.scratch,
            RetrieveOut {
                k: cast_mut("k", k)?,
                coverage: cast_mut("coverage", cov)?,
                ids: cast_mut("ids", ids)?,
                scores: cast_mut("scores", scores)?,
                out: cast_mut("out", o)?,
                lse: cast_mut("lse", lse)?,
                rows_dest: engine.or_else(|| {
                    let dst = self.dest.as_ref()?;
                    let at = (rows.as_ptr() as usize).checked_sub(dst.base)?;
                    (at + rows.len() <= dst.len).then_some(RowsDest {
                        id: dst.id,
                        offset: at as u64,
                        engine: false,
                    })
                }),
                rows,
            },
        )?;
        if let Some(r) = &mut self.recorder {
            // The k section as just written (read back from the response space: only the
            // metrics see it, so a client scribbling over it can only skew its own numbers).
            if let Ok(k) = bytemuck::try_cast_slice::<u8, u32>(k) {
                r.on_retrieve(&stats, k);
            }
        }
        // Online recall sampling (store::sampler): one atomic add unless this request is
        // sampled; then its inputs and result are copied for an exact re-scoring off this path.
        if session.sample_due(h.layer) {
            let result = crate::store::sampler::Retrieved {
                k,
                coverage: cov,
                ids,
                stride,
            };
            session.offer_sample(h.layer, &self.query, &p, &stats, result);
        }
        ResponseHeader {
            q_heads: hq as u32,
            stride: stride as u32,
            head_dim: d as u32,
            row_bytes: rb as u32,
            flags: ((p.attend as u32) * ATTEND)
                | ((rows_here as u32) * GATHER)
                | ((engine.is_some() as u32) * ENGINE_ROWS),
            positions: h.positions,
            scored: stats.scored,
            search_us: stats.search_us as f32,
            attend_us: stats.attend_us as f32,
            copy_us: stats.copy_us as f32,
            slowest_head_us: stats.slowest_head_us as f32,
        }
        .encode(head)?;
        Ok(layout.len())
    }
}

#[cfg(test)]
mod tests;

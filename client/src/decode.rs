//! The client side of the decode path: `seal` a layer's prefill (then `retrieve` once per
//! layer and decode step, in [`super::retrieve`]), Slim mode's `W_KV`, engine destinations,
//! and `truncate`.

use kvdex_index::IndexKind;

use super::SessionHandle;
use kvdex_wire::decode::dest::encode_unregister;
use kvdex_wire::decode::{
    RegisterDest, SealHeader, SetWkvHeader, TrainingSlice, SEAL_HEADER, SET_WKV_HEADER,
    SIGNAL_NEIGHBOURS, SIGNAL_QUERIES,
};
use kvdex_wire::proto::Opcode;
use kvdex_wire::{Error, Result};

impl SessionHandle {
    /// Seals `layer`'s prefill and asks for a background build of a `kind` index per KV head.
    /// `training` is `(queries [q_heads][n][head_dim], positions [n])`, a sample of the prefill
    /// queries (causal); `None` builds from the keys alone. Returns the tokens indexed per KV
    /// head; progress shows in `/stats`.
    ///
    /// A training set that fits the arena goes in one request; a larger one is sent as parts
    /// of whole positions (each with its positions' rows of every head), staged by the daemon
    /// until the last part, which is the seal (see [`kvdex_wire::decode`]). The daemon bounds
    /// what a layer may stage (`decode.seal_max_staged_queries` positions).
    pub fn seal(
        &mut self,
        layer: u32,
        kind: IndexKind,
        training: Option<(&[f32], &[u32])>,
    ) -> Result<u64> {
        let (q, p) = training.unwrap_or((&[], &[]));
        // Whole positions per request, leaving room for the 8-byte response after it.
        let room = (self.arena_len() as usize).saturating_sub(SEAL_HEADER + 256);
        if p.is_empty() || 4 * (p.len() + q.len()) <= room {
            // One request, as before parts existed (the daemon checks the shapes).
            let h = SealHeader {
                layer,
                kind,
                n: p.len() as u32,
                signal: SIGNAL_QUERIES,
            };
            let n = h.encode(&[p], q, self.arena_mut())?;
            return self.call_u64(Opcode::Seal, n);
        }
        let all = TrainingSlice {
            queries: q,
            positions: p,
            q_heads: self.shape().q_heads as usize,
            range: 0..p.len(),
        };
        let per_position = all.bytes()? / p.len();
        let per = (room / per_position).max(1);
        let mut at = 0;
        while p.len() - at > per {
            let part = TrainingSlice {
                range: at..at + per,
                ..all.clone()
            };
            let n = part.encode_part(layer, self.arena_mut())?;
            let staged = self.call_u64(Opcode::Seal, n)?;
            at += per;
            if staged != at as u64 {
                return Err(Error::Protocol(format!(
                    "seal part of layer {layer}: the daemon has {staged} training positions \
                     staged, {at} were sent"
                )));
            }
        }
        let last = TrainingSlice {
            range: at..p.len(),
            ..all
        };
        let n = last.encode_seal(layer, kind, self.arena_mut())?;
        self.call_u64(Opcode::Seal, n)
    }

    /// Seals `layer`'s prefill with neighbour lists the engine computed itself (the exact top
    /// keys of its prefill queries, which its attention already scored): list `i` belongs to
    /// query head `heads[i]`, holds `lens[i]` absolute token ids, best first, taken in order
    /// from `ids`. Static ids are ignored. Returns the tokens indexed per KV head.
    pub fn seal_neighbours(
        &mut self,
        layer: u32,
        kind: IndexKind,
        heads: &[u32],
        lens: &[u32],
        ids: &[u32],
    ) -> Result<u64> {
        if heads.len() != lens.len() {
            return Err(Error::BadRequest(format!(
                "seal_neighbours: {} query heads but {} lengths",
                heads.len(),
                lens.len()
            )));
        }
        let h = SealHeader {
            layer,
            kind,
            n: heads.len() as u32,
            signal: SIGNAL_NEIGHBOURS,
        };
        let n = h.encode(&[heads, lens, ids], &[], self.arena_mut())?;
        self.call_u64(Opcode::Seal, n)
    }

    /// Uploads `layer`'s `W_KV` to a Slim session: `w` is the row-major `D × D` f32 matrix
    /// (`D = kv_heads · head_dim`) with `V = K · W_KV` (Slim mode, see the daemon's `store::slim`). Sent over
    /// the shared-memory region in as many row chunks as the arena needs. Must be done before
    /// the layer's first append.
    pub fn set_wkv(&mut self, layer: u32, w: &[f32]) -> Result<()> {
        let s = *self.shape();
        let dim = s.kv_heads as usize * s.head_dim as usize;
        if w.len() != dim * dim {
            return Err(Error::BadRequest(format!(
                "set_wkv: W_KV holds {} floats; D = kv_heads x head_dim = {dim} needs {}",
                w.len(),
                dim * dim
            )));
        }
        // Whole rows per chunk, leaving room for the 8-byte response after the request.
        let room = (self.arena_len() as usize).saturating_sub(SET_WKV_HEADER + 256);
        let per = (room / (4 * dim)).clamp(1, dim);
        for (c, rows) in w.chunks(per * dim).enumerate() {
            let h = SetWkvHeader {
                layer,
                row_start: (c * per) as u32,
                rows: (rows.len() / dim) as u32,
            };
            let n = h.encode(rows, self.arena_mut())?;
            self.call_u64(Opcode::SetWkv, n)?;
        }
        Ok(())
    }

    /// Offers an engine GPU buffer to this session as a gather destination: the `len` bytes at
    /// `offset` of the allocation whose CUDA IPC memory handle is `mem`
    /// (`cudaIpcGetMemHandle`). With `event` (`cudaIpcGetEventHandle` of an event made with
    /// `cudaEventInterprocess`), the daemon records it after each gather into the buffer, so
    /// the engine's stream can wait for the rows without a round trip. Returns the handle for
    /// [`SessionHandle::retrieve_into`]. Needs a daemon on the cuda transfer backend.
    pub fn register_cuda_dest(
        &mut self,
        mem: [u8; 64],
        offset: u64,
        len: u64,
        event: Option<[u8; 64]>,
    ) -> Result<u32> {
        let body = RegisterDest {
            offset,
            len,
            mem,
            event,
        };
        let n = body.encode(self.arena_mut())?;
        let v = self.call_u64(Opcode::RegisterDest, n)?;
        Ok(v as u32)
    }

    /// Releases a destination from [`SessionHandle::register_cuda_dest`], after any gather
    /// still writing it; returns how many the session still holds. Ending the session
    /// releases them all.
    pub fn unregister_dest(&mut self, handle: u32) -> Result<u64> {
        let n = encode_unregister(handle, self.arena_mut())?;
        self.call_u64(Opcode::UnregisterDest, n)
    }

    /// Drops every layer's rows from token `tokens` on (speculative decoding's rollback, beam
    /// pruning); returns the bytes the daemon gave back to its budget. Indices stop returning
    /// the dropped ids (see the daemon's `Session::truncate`). Errors:
    /// `tokens` beyond the session's longest layer.
    pub fn truncate(&mut self, tokens: u64) -> Result<u64> {
        let arena = self.arena_mut();
        let body = arena
            .get_mut(..8)
            .ok_or_else(|| Error::BadRequest("truncate needs 8 bytes of free arena".into()))?;
        body.copy_from_slice(&tokens.to_le_bytes());
        self.call_u64(Opcode::Truncate, 8)
    }

    /// Sends the `n`-byte request in the arena and reads its 8-byte response (seal, set_wkv,
    /// register_dest, unregister_dest).
    fn call_u64(&mut self, op: Opcode, n: usize) -> Result<u64> {
        let r = self.call_raw(op, n as u64)?;
        let b = &self.arena_mut_all()[r];
        let v: [u8; 8] = b.try_into().map_err(|_| {
            Error::Protocol(format!(
                "{} response is {} bytes, not 8",
                op.name(),
                b.len()
            ))
        })?;
        Ok(u64::from_le_bytes(v))
    }
}

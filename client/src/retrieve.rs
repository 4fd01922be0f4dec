//! The client side of the decode step: `retrieve` for one or several query positions, waiting
//! for it or submitting it to wait later. Results are read in place from the region's arena
//! (no allocation).

use super::SessionHandle;
use kvdex_wire::decode::{
    EngineRows, ResponseHeader, RetrieveHeader, RetrieveLayout, ATTEND, GATHER,
};
use kvdex_wire::proto::Opcode;
use kvdex_wire::shm::layout::PAYLOAD_ALIGN;
use kvdex_wire::shm::Descriptor;
use kvdex_wire::{Budget, RetrieveParams};
use kvdex_wire::{Error, Result};

/// A retrieve's results, borrowed from the arena until the next request. Every per-head
/// section has `rows = P * q_heads` rows, position-major (`P` is 1 for a single-position
/// request): row `p * q_heads + h` is position `p`'s query head `h`.
#[derive(Clone, Copy, Debug)]
pub struct Retrieved<'a> {
    /// Header: stride, shape and the daemon's own timings.
    pub header: ResponseHeader,
    /// `[q_heads]` tokens chosen per head.
    pub k: &'a [u32],
    /// `[q_heads]` estimated mass covered (adaptive budgets; 0 otherwise).
    pub coverage: &'a [f32],
    /// `[q_heads][stride]` candidate ids, best first; head h uses the first `k[h]`.
    pub ids: &'a [u32],
    /// `[q_heads][stride]` candidate inner products.
    pub scores: &'a [f32],
    /// `[q_heads][head_dim]` partial attention over the chosen tokens (empty unless asked).
    pub out: &'a [f32],
    /// `[q_heads]` its log-sum-exp (empty unless asked).
    pub lse: &'a [f32],
    /// `[q_heads][2][stride][row_bytes]` K then V rows of the chosen tokens (empty unless asked).
    pub rows: &'a [u8],
}

impl Retrieved<'_> {
    /// Query positions `P` (1 for a single-position request).
    pub fn positions(&self) -> usize {
        self.header.positions.max(1) as usize
    }

    /// The chosen ids of row `h` (query head `h % q_heads` of position `h / q_heads`).
    pub fn head_ids(&self, h: usize) -> &[u32] {
        let s = self.header.stride as usize;
        let k = self.k.get(h).map_or(0, |&k| k as usize);
        self.ids.get(h * s..h * s + k).unwrap_or(&[])
    }

    /// The gathered K and V rows of row `h` (`k[h]` rows each).
    pub fn head_rows(&self, h: usize) -> (&[u8], &[u8]) {
        let (s, rb) = (self.header.stride as usize, self.header.row_bytes as usize);
        let k = self.k.get(h).map_or(0, |&k| k as usize);
        let base = h * 2 * s * rb;
        (
            self.rows.get(base..base + k * rb).unwrap_or(&[]),
            self.rows
                .get(base + s * rb..base + (s + k) * rb)
                .unwrap_or(&[]),
        )
    }
}

fn cast<T: bytemuck::Pod>(b: &[u8]) -> Result<&[T]> {
    bytemuck::try_cast_slice(b)
        .map_err(|e| Error::Protocol(format!("retrieve response section misaligned: {e}")))
}

impl SessionHandle {
    /// The decode-step request for `layer`: `q` is `[q_heads][head_dim]`.
    pub fn retrieve(
        &mut self,
        layer: u32,
        q: &[f32],
        params: &RetrieveParams,
    ) -> Result<Retrieved<'_>> {
        self.retrieve_request(&RetrieveRequest::new(layer, q, params))
    }

    /// The decode-step request for `P = limits.len()` query positions of the sequence at once
    /// (chunked prefill, speculative decoding): `q` is `[P][q_heads][head_dim]`, position `p`
    /// sees tokens `< limits[p]` ([`NO_LIMIT`](kvdex_wire::NO_LIMIT): all), and
    /// every result section has a leading `P` axis (see
    /// the daemon's `Session::retrieve_at`).
    pub fn retrieve_positions(
        &mut self,
        layer: u32,
        q: &[f32],
        limits: &[u32],
        params: &RetrieveParams,
    ) -> Result<Retrieved<'_>> {
        self.retrieve_request(&RetrieveRequest {
            limits: Some(limits),
            ..RetrieveRequest::new(layer, q, params)
        })
    }

    /// [`SessionHandle::retrieve`] with the gathered rows written straight into engine
    /// destination `rows.dest` at `rows.offset`, laid out `[q_heads][2][stride][row_bytes]`
    /// (`stride` is in the response header), instead of into the response. `params.gather`
    /// must be set. When this returns, the rows have landed.
    pub fn retrieve_into(
        &mut self,
        layer: u32,
        q: &[f32],
        params: &RetrieveParams,
        rows: EngineRows,
    ) -> Result<Retrieved<'_>> {
        self.retrieve_request(&RetrieveRequest {
            engine_rows: Some(rows),
            ..RetrieveRequest::new(layer, q, params)
        })
    }

    /// A retrieve as `r` describes it (one or several positions, rows into the response or an
    /// engine destination), waiting for its results.
    pub fn retrieve_request(&mut self, r: &RetrieveRequest<'_>) -> Result<Retrieved<'_>> {
        let n = encode_retrieve(r, self.arena_mut())?;
        let range = self.call_raw(Opcode::Retrieve, n as u64)?;
        parse_retrieved(&self.arena_mut_all()[range])
    }

    /// Submits a retrieve without waiting for it, so that the engine computes meanwhile;
    /// [`SessionHandle::wait_retrieve`] reads its results. Several may be in flight (one per
    /// layer, say): each owns a part of the arena sized for its largest response until it is
    /// waited on, and other requests may be made meanwhile. Every pending retrieve must be
    /// waited on, or its part of the arena stays taken.
    pub fn submit_retrieve(&mut self, r: &RetrieveRequest<'_>) -> Result<PendingRetrieve> {
        let s = *self.shape();
        let rows = match r.limits {
            Some(l) => l.len(),
            None => 1,
        } * s.q_heads as usize;
        let want = match r.params.budget {
            Budget::Fixed(k) => k,
            Budget::Adaptive(b) => b.max_k,
        };
        let rows_here = r.params.gather && r.engine_rows.is_none();
        let base = self.slots.free_start();
        let arena_len = self.arena_len();
        let layout = RetrieveLayout::new(
            rows,
            want,
            s.head_dim as usize,
            s.row_bytes(),
            r.params.attend,
            rows_here,
        );
        let n = encode_retrieve(r, self.arena_mut())?;
        let out_offset = (base + n).next_multiple_of(PAYLOAD_ALIGN as usize);
        let end = layout.and_then(|l| out_offset.checked_add(l.len()));
        let Some(end) = end.filter(|&e| e as u64 <= arena_len) else {
            return Err(Error::BadRequest(format!(
                "an asynchronous retrieve of {rows} rows of {want} candidates needs {} bytes of \
                 the arena, {} are free ({} requests in flight): wait for one, or create the \
                 session with a larger payload_bytes",
                end.map_or(usize::MAX, |e| e - base),
                arena_len as usize - base,
                self.slots.len()
            )));
        };
        let d = Descriptor {
            request_id: self.next_id,
            code: Opcode::Retrieve as u32,
            in_offset: base as u64,
            in_len: n as u64,
            out_offset: out_offset as u64,
            out_len: (end - out_offset) as u64,
            ..Default::default()
        };
        self.push(&d)?;
        self.slots.hold(d.request_id, end);
        Ok(PendingRetrieve { desc: d })
    }

    /// True once `p`'s results are ready ([`SessionHandle::wait_retrieve`] then returns at
    /// once). Never blocks.
    pub fn is_ready(&mut self, p: &PendingRetrieve) -> Result<bool> {
        self.drain_ready(p.desc.request_id)
    }

    /// Waits for a retrieve from [`SessionHandle::submit_retrieve`] and reads its results
    /// (borrowed from its part of the arena, which is released: they are valid until the
    /// next request, as a waiting retrieve's).
    pub fn wait_retrieve(&mut self, p: PendingRetrieve) -> Result<Retrieved<'_>> {
        let id = p.desc.request_id;
        let range = self.wait_for(&p.desc, false);
        self.slots.release(id);
        parse_retrieved(&self.arena_mut_all()[range?])
    }
}

/// One retrieve, as [`SessionHandle::retrieve_request`] and
/// [`SessionHandle::submit_retrieve`] take it.
#[derive(Clone, Copy, Debug)]
pub struct RetrieveRequest<'a> {
    /// Layer.
    pub layer: u32,
    /// Queries: `[q_heads][head_dim]`, or `[P][q_heads][head_dim]` with `limits`.
    pub q: &'a [f32],
    /// `None`: one position. `Some(limits)`: `P = limits.len()` positions, position `p`
    /// seeing tokens `< limits[p]` ([`NO_LIMIT`](kvdex_wire::NO_LIMIT): all).
    pub limits: Option<&'a [u32]>,
    /// Budget and outputs.
    pub params: RetrieveParams,
    /// Gathered rows into an engine destination instead of the response.
    pub engine_rows: Option<EngineRows>,
}

impl<'a> RetrieveRequest<'a> {
    /// One position, rows (if gathered) into the response.
    pub fn new(layer: u32, q: &'a [f32], params: &RetrieveParams) -> Self {
        Self {
            layer,
            q,
            limits: None,
            params: *params,
            engine_rows: None,
        }
    }
}

/// A retrieve in flight ([`SessionHandle::submit_retrieve`]); wait on it with
/// [`SessionHandle::wait_retrieve`] on the same handle.
#[derive(Debug)]
#[must_use = "a pending retrieve holds part of the arena until it is waited on"]
pub struct PendingRetrieve {
    desc: Descriptor,
}

impl PendingRetrieve {
    /// The request's id on the ring.
    pub fn request_id(&self) -> u64 {
        self.desc.request_id
    }
}

/// Writes `r`'s body at the start of `arena`; returns its length. Refuses zero positions by
/// name (the encoder refuses a bad scale or budget).
fn encode_retrieve(r: &RetrieveRequest<'_>, arena: &mut [u8]) -> Result<usize> {
    let positions = match r.limits {
        Some([]) => {
            return Err(Error::BadRequest(
                "retrieve positions P = 0: send at least one query position".into(),
            ))
        }
        Some(l) => u32::try_from(l.len()).map_err(|_| {
            Error::BadRequest(format!("retrieve of {} positions is too many", l.len()))
        })?,
        None => 0,
    };
    let h = RetrieveHeader {
        layer: r.layer,
        params: r.params,
        engine_rows: r.engine_rows,
        positions,
    };
    h.encode_with(r.limits.unwrap_or(&[]), r.q, arena)
}

/// A retrieve response's sections, checked against its header.
fn parse_retrieved(body: &[u8]) -> Result<Retrieved<'_>> {
    let header = ResponseHeader::decode(body)?;
    let layout = RetrieveLayout::new(
        header.rows(),
        header.stride as usize,
        header.head_dim as usize,
        header.row_bytes as usize,
        header.flags & ATTEND != 0,
        header.flags & GATHER != 0,
    )
    .filter(|l| l.len() == body.len())
    .ok_or_else(|| {
        Error::Protocol(format!(
            "retrieve response of {} bytes does not match its header {header:?}",
            body.len()
        ))
    })?;
    Ok(Retrieved {
        header,
        k: cast(&body[layout.k])?,
        coverage: cast(&body[layout.coverage])?,
        ids: cast(&body[layout.ids])?,
        scores: cast(&body[layout.scores])?,
        out: cast(&body[layout.out])?,
        lse: cast(&body[layout.lse])?,
        rows: &body[layout.rows],
    })
}

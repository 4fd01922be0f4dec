//! Response bodies: what the daemon answers, laid out so the store can write results in place.

use super::{decoded_elsewhere, put, short, u32_at, u64_at, Opcode};
use crate::error::{Error, Result};

/// A decoded response body, borrowing its arrays from the completion's payload so the client
/// reads results in place (one variant per request opcode that answers with data).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Response<'a> {
    /// The echoed bytes.
    Ping {
        /// Echoed bytes.
        data: &'a [u8],
    },
    /// The layer's length after the append.
    Append {
        /// Tokens now in the layer.
        tokens: u64,
    },
    /// Per query head, `k` ids then `k` scores, best first.
    Search {
        /// Results per head (the request's k, clamped to the layer's length).
        k: u32,
        /// Query heads.
        q_heads: u32,
        /// u32 little-endian `[q_heads][k]`.
        ids: &'a [u8],
        /// f32 little-endian `[q_heads][k]`.
        scores: &'a [u8],
    },
    /// Gathered rows.
    Gather {
        /// Rows gathered.
        rows: u32,
        /// Bytes per row.
        row_bytes: u32,
        /// K rows, `rows * row_bytes`.
        k: &'a [u8],
        /// V rows, `rows * row_bytes`.
        v: &'a [u8],
    },
}

/// Where the parts of a search response go, so the worker can let the store write ids and
/// scores straight into the arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchLayout {
    /// Byte range of the ids.
    pub ids: std::ops::Range<usize>,
    /// Byte range of the scores.
    pub scores: std::ops::Range<usize>,
}

impl SearchLayout {
    /// Layout for `q_heads` heads of `k` results each; `None` on overflow.
    pub fn new(q_heads: u32, k: u32) -> Option<Self> {
        let n = (q_heads as usize).checked_mul(k as usize)?.checked_mul(4)?;
        let ids = 8..8usize.checked_add(n)?;
        let scores = ids.end..ids.end.checked_add(n)?;
        Some(Self { ids, scores })
    }
    /// Bytes of the whole response.
    pub fn len(&self) -> usize {
        self.scores.end
    }
    /// Never empty (the 8-byte header); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Writes the search response header (`k`, `q_heads`) into the first 8 bytes of `out`.
pub fn put_search_header(out: &mut [u8], k: u32, q_heads: u32) -> Result<()> {
    put(
        Opcode::Search,
        out,
        &[&k.to_le_bytes(), &q_heads.to_le_bytes()],
    )
    .map(|_| ())
}

/// Writes the gather response header (`rows`, `row_bytes`) into the first 8 bytes of `out`.
pub fn put_gather_header(out: &mut [u8], rows: u32, row_bytes: u32) -> Result<()> {
    put(
        Opcode::Gather,
        out,
        &[&rows.to_le_bytes(), &row_bytes.to_le_bytes()],
    )
    .map(|_| ())
}

impl<'a> Response<'a> {
    /// The opcode this responds to.
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::Ping { .. } => Opcode::Ping,
            Response::Append { .. } => Opcode::Append,
            Response::Search { .. } => Opcode::Search,
            Response::Gather { .. } => Opcode::Gather,
        }
    }

    /// Writes the body into `out`; returns its length. (The worker writes search and gather
    /// bodies in place; this is the reference encoder used by the socket path and tests.)
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        let op = self.opcode();
        match *self {
            Response::Ping { data } => put(op, out, &[data]),
            Response::Append { tokens } => put(op, out, &[&tokens.to_le_bytes()]),
            Response::Search {
                k,
                q_heads,
                ids,
                scores,
            } => put(
                op,
                out,
                &[&k.to_le_bytes(), &q_heads.to_le_bytes(), ids, scores],
            ),
            Response::Gather {
                rows,
                row_bytes,
                k,
                v,
            } => put(
                op,
                out,
                &[&rows.to_le_bytes(), &row_bytes.to_le_bytes(), k, v],
            ),
        }
    }

    /// Decodes the body of a successful `op` completion.
    pub fn decode(op: Opcode, body: &'a [u8]) -> Result<Self> {
        match op {
            Opcode::Ping => Ok(Response::Ping { data: body }),
            Opcode::Append => {
                let tokens = u64_at(body, 0)
                    .filter(|_| body.len() == 8)
                    .ok_or_else(|| short(op, "response", body.len(), 8))?;
                Ok(Response::Append { tokens })
            }
            Opcode::Search => {
                let (Some(k), Some(q_heads)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(short(op, "response", body.len(), 8));
                };
                let layout = SearchLayout::new(q_heads, k)
                    .filter(|l| l.len() == body.len())
                    .ok_or_else(|| Error::Protocol(format!("search response of {} bytes does not hold {q_heads} heads x {k} results", body.len())))?;
                Ok(Response::Search {
                    k,
                    q_heads,
                    ids: &body[layout.ids],
                    scores: &body[layout.scores],
                })
            }
            Opcode::Gather => {
                let (Some(rows), Some(row_bytes)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(short(op, "response", body.len(), 8));
                };
                let n = (rows as usize)
                    .checked_mul(row_bytes as usize)
                    .filter(|&n| n.checked_mul(2).and_then(|m| m.checked_add(8)) == Some(body.len()))
                    .ok_or_else(|| Error::Protocol(format!("gather response of {} bytes does not hold 2 x {rows} rows of {row_bytes} bytes", body.len())))?;
                Ok(Response::Gather {
                    rows,
                    row_bytes,
                    k: &body[8..8 + n],
                    v: &body[8 + n..],
                })
            }
            Opcode::Seal
            | Opcode::Retrieve
            | Opcode::SetWkv
            | Opcode::RegisterDest
            | Opcode::UnregisterDest
            | Opcode::Truncate => Err(decoded_elsewhere(op)),
        }
    }
}

//! Request bodies: what a client asks for, decoded from (and encoded into) the payload arena.

use super::{decoded_elsewhere, multiple_of_4, put, short, u32_at, u64_at, Opcode};
use crate::error::{Error, Result};

/// A decoded request body; the byte slices borrow the buffer it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Request<'a> {
    /// Echo `data`.
    Ping {
        /// Bytes to echo.
        data: &'a [u8],
    },
    /// Append `tokens` tokens to `layer`: K and V each `[kv_heads][tokens][head_dim]`.
    Append {
        /// Layer.
        layer: u32,
        /// Tokens in the block.
        tokens: u32,
        /// K rows in the session dtype.
        k: &'a [u8],
        /// V rows in the session dtype.
        v: &'a [u8],
    },
    /// Top-`k` for every query head of `layer`.
    Search {
        /// Layer.
        layer: u32,
        /// Results per query head.
        k: u32,
        /// f32 little-endian `[q_heads][head_dim]`.
        query: &'a [u8],
    },
    /// K then V rows of `ids` of `kv_head` in `layer`.
    Gather {
        /// Layer.
        layer: u32,
        /// KV head.
        kv_head: u32,
        /// u32 little-endian token ids.
        ids: &'a [u8],
    },
}

impl<'a> Request<'a> {
    /// The request's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Ping { .. } => Opcode::Ping,
            Request::Append { .. } => Opcode::Append,
            Request::Search { .. } => Opcode::Search,
            Request::Gather { .. } => Opcode::Gather,
        }
    }

    /// Bytes [`Request::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Request::Ping { data } => data.len(),
            Request::Append { k, v, .. } => 16 + k.len() + v.len(),
            Request::Search { query, .. } => 8 + query.len(),
            Request::Gather { ids, .. } => 8 + ids.len(),
        }
    }

    /// Writes the body into `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        let op = self.opcode();
        match *self {
            Request::Ping { data } => put(op, out, &[data]),
            Request::Append {
                layer,
                tokens,
                k,
                v,
            } => put(
                op,
                out,
                &[
                    &layer.to_le_bytes(),
                    &tokens.to_le_bytes(),
                    &(k.len() as u64).to_le_bytes(),
                    k,
                    v,
                ],
            ),
            Request::Search { layer, k, query } => {
                put(op, out, &[&layer.to_le_bytes(), &k.to_le_bytes(), query])
            }
            Request::Gather {
                layer,
                kv_head,
                ids,
            } => put(
                op,
                out,
                &[&layer.to_le_bytes(), &kv_head.to_le_bytes(), ids],
            ),
        }
    }

    /// Decodes the body of an `op` request.
    pub fn decode(op: Opcode, body: &'a [u8]) -> Result<Self> {
        match op {
            Opcode::Ping => Ok(Request::Ping { data: body }),
            Opcode::Append => {
                let (Some(layer), Some(tokens), Some(k_len)) =
                    (u32_at(body, 0), u32_at(body, 4), u64_at(body, 8))
                else {
                    return Err(short(op, "body", body.len(), 16));
                };
                let rest = &body[16..];
                let k_len = usize::try_from(k_len)
                    .ok()
                    .filter(|&n| n <= rest.len())
                    .ok_or_else(|| {
                        Error::BadRequest(format!(
                            "append says K is {k_len} bytes, but only {} follow",
                            rest.len()
                        ))
                    })?;
                let (k, v) = rest.split_at(k_len);
                Ok(Request::Append {
                    layer,
                    tokens,
                    k,
                    v,
                })
            }
            Opcode::Search => {
                let (Some(layer), Some(k)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(short(op, "body", body.len(), 8));
                };
                let query = &body[8..];
                multiple_of_4(op, "query", query)?;
                Ok(Request::Search { layer, k, query })
            }
            Opcode::Gather => {
                let (Some(layer), Some(kv_head)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(short(op, "body", body.len(), 8));
                };
                let ids = &body[8..];
                multiple_of_4(op, "ids", ids)?;
                Ok(Request::Gather {
                    layer,
                    kv_head,
                    ids,
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

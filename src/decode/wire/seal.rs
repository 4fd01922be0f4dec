//! Seal (the training signal that starts a layer's index build) and set_wkv (Slim mode's
//! per-layer W_KV) bodies.

use kvdex_index::IndexKind;

use super::{kind_code, u32_at, SEAL_HEADER, SET_WKV_HEADER, SIGNAL_NEIGHBOURS, SIGNAL_QUERIES};
use crate::error::{KvdexError, Result};

/// A decoded seal header; the training signal is the bytes after it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SealHeader {
    /// Layer to seal.
    pub layer: u32,
    /// Index kind.
    pub kind: IndexKind,
    /// Training positions (queries) or lists (neighbours) that follow (0: key-only build).
    pub n: u32,
    /// [`SIGNAL_QUERIES`] or [`SIGNAL_NEIGHBOURS`].
    pub signal: u32,
}

/// The training signal of a seal body, still as little-endian bytes of shared memory (the
/// worker copies them out before use).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SealBody<'a> {
    /// `positions` u32 `[n]`, `queries` f32 `[q_heads][n][head_dim]`.
    Queries {
        /// Positions bytes.
        positions: &'a [u8],
        /// Query bytes.
        queries: &'a [u8],
    },
    /// `heads` u32 `[n]`, `lens` u32 `[n]`, `ids` u32 `[sum lens]`.
    Neighbours {
        /// Query head of each list.
        heads: &'a [u8],
        /// Length of each list.
        lens: &'a [u8],
        /// Every list's token ids.
        ids: &'a [u8],
    },
}

/// Splits `n` u32 words off the front of `rest`, or says how short it is.
fn take_words<'a>(rest: &'a [u8], n: u32, what: &str) -> Result<(&'a [u8], &'a [u8])> {
    let bytes = (n as usize)
        .checked_mul(4)
        .filter(|&b| b <= rest.len())
        .ok_or_else(|| {
            KvdexError::BadRequest(format!(
                "seal says {n} {what}, but only {} bytes follow",
                rest.len()
            ))
        })?;
    Ok(rest.split_at(bytes))
}

fn whole_words<'a>(b: &'a [u8], what: &str) -> Result<&'a [u8]> {
    if !b.len().is_multiple_of(4) {
        return Err(KvdexError::BadRequest(format!(
            "seal {what} are {} bytes, not a multiple of 4",
            b.len()
        )));
    }
    Ok(b)
}

impl SealHeader {
    /// Decodes the header and splits the body into its training signal's parts.
    pub fn decode(body: &[u8]) -> Result<(Self, SealBody<'_>)> {
        let (Some(layer), Some(kind), Some(n), Some(signal)) = (
            u32_at(body, 0),
            u32_at(body, 4),
            u32_at(body, 8),
            u32_at(body, 12),
        ) else {
            return Err(KvdexError::BadRequest(format!(
                "seal body is {} bytes, needs at least {SEAL_HEADER}",
                body.len()
            )));
        };
        let kind = match kind {
            0 => IndexKind::Flat,
            1 => IndexKind::Hnsw,
            2 => IndexKind::Graph,
            other => {
                return Err(KvdexError::BadRequest(format!(
                    "seal index kind {other} is unknown (0 flat, 1 hnsw, 2 graph)"
                )))
            }
        };
        let rest = body.get(SEAL_HEADER..).unwrap_or(&[]);
        let parts = match signal {
            SIGNAL_QUERIES => {
                let (positions, queries) = take_words(rest, n, "training positions")?;
                SealBody::Queries {
                    positions,
                    queries: whole_words(queries, "queries")?,
                }
            }
            SIGNAL_NEIGHBOURS => {
                let (heads, rest) = take_words(rest, n, "neighbour lists")?;
                let (lens, ids) = take_words(rest, n, "neighbour list lengths")?;
                SealBody::Neighbours {
                    heads,
                    lens,
                    ids: whole_words(ids, "neighbour ids")?,
                }
            }
            other => {
                return Err(KvdexError::BadRequest(format!(
                    "seal training signal {other} is unknown (0 queries, 1 neighbour lists)"
                )))
            }
        };
        Ok((
            Self {
                layer,
                kind,
                n,
                signal,
            },
            parts,
        ))
    }

    /// Writes the header (with `n` and `signal` taken from the arguments) followed by the
    /// u32 sections and the f32 section into `out`; returns the length. Queries:
    /// `words = [positions]`, `floats = queries`; neighbours: `words = [heads, lens, ids]`.
    pub fn encode(&self, words: &[&[u32]], floats: &[f32], out: &mut [u8]) -> Result<usize> {
        let wlen: usize = words.iter().map(|w| w.len()).sum();
        let need = SEAL_HEADER + 4 * wlen + 4 * floats.len();
        let out = out.get_mut(..need).ok_or_else(|| {
            KvdexError::BadRequest(format!(
                "seal request of {need} bytes does not fit the arena"
            ))
        })?;
        let n = words.first().map_or(0, |w| w.len()) as u32;
        let head = [self.layer, kind_code(self.kind), n, self.signal];
        for (i, w) in head.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        let mut at = SEAL_HEADER;
        for w in words {
            out[at..at + 4 * w.len()].copy_from_slice(bytemuck::cast_slice(w));
            at += 4 * w.len();
        }
        out[at..].copy_from_slice(bytemuck::cast_slice(floats));
        Ok(need)
    }
}

/// A decoded set_wkv header; the f32 rows are the bytes after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetWkvHeader {
    /// Layer whose `W_KV` is uploaded.
    pub layer: u32,
    /// First row of this chunk.
    pub row_start: u32,
    /// Rows in this chunk.
    pub rows: u32,
}

impl SetWkvHeader {
    /// Decodes the header and returns the rows' bytes (exactly `rows` rows of `dim` f32).
    pub fn decode(body: &[u8], dim: usize) -> Result<(Self, &[u8])> {
        let (Some(layer), Some(row_start), Some(rows)) =
            (u32_at(body, 0), u32_at(body, 4), u32_at(body, 8))
        else {
            return Err(KvdexError::BadRequest(format!(
                "set_wkv body is {} bytes, needs at least {SET_WKV_HEADER}",
                body.len()
            )));
        };
        let data = body.get(SET_WKV_HEADER..).unwrap_or(&[]);
        let want = (rows as usize)
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(4));
        if want != Some(data.len()) {
            return Err(KvdexError::BadRequest(format!(
                "set_wkv says {rows} rows of D = {dim} floats, but {} bytes follow",
                data.len()
            )));
        }
        Ok((
            Self {
                layer,
                row_start,
                rows,
            },
            data,
        ))
    }

    /// Writes the header (with `rows` = `data.len() / dim`) and `data` into `out`; returns the
    /// length.
    pub fn encode(&self, data: &[f32], out: &mut [u8]) -> Result<usize> {
        let need = SET_WKV_HEADER + 4 * data.len();
        let out = out.get_mut(..need).ok_or_else(|| {
            KvdexError::BadRequest(format!(
                "set_wkv request of {need} bytes does not fit the arena"
            ))
        })?;
        for (i, w) in [self.layer, self.row_start, self.rows, 0]
            .iter()
            .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        out[SET_WKV_HEADER..].copy_from_slice(bytemuck::cast_slice(data));
        Ok(need)
    }
}

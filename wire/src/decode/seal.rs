//! Seal (the training signal that starts a layer's index build), its training-query parts, and
//! set_wkv (Slim mode's per-layer W_KV) bodies.

use std::ops::Range;

use kvdex_index::IndexKind;

use super::{
    kind_code, u32_at, SEAL_HEADER, SET_WKV_HEADER, SIGNAL_NEIGHBOURS, SIGNAL_QUERIES,
    SIGNAL_QUERIES_PART,
};
use crate::error::{Error, Result};

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

/// A decoded training-query part ([`SIGNAL_QUERIES_PART`]): queries staged for `layer`'s
/// next seal, which no build starts. The bytes are still shared memory's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueriesPart<'a> {
    /// Layer the queries train.
    pub layer: u32,
    /// Positions staged by earlier parts (0 begins a new training set): lets the daemon refuse
    /// a lost, repeated or stale part instead of training on it.
    pub start: u32,
    /// Positions in this part.
    pub n: u32,
    /// `positions` u32 `[n]`.
    pub positions: &'a [u8],
    /// `queries` f32 `[q_heads][n][head_dim]` (head-major for this part's own positions).
    pub queries: &'a [u8],
}

/// A decoded seal-op request: a seal, or a part of a seal's training queries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SealRequest<'a> {
    /// A seal: starts the build (queries staged by parts come first in its training set).
    Seal(SealHeader, SealBody<'a>),
    /// Training queries to stage for the next seal.
    Part(QueriesPart<'a>),
}

impl<'a> SealRequest<'a> {
    /// Decodes a seal-op body: word 3 (the signal) tells a part, whose word 1 is `start`, from
    /// a seal, whose word 1 is the index kind.
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        if u32_at(body, 12) != Some(SIGNAL_QUERIES_PART) {
            return SealHeader::decode(body).map(|(h, b)| Self::Seal(h, b));
        }
        let (Some(layer), Some(start), Some(n)) =
            (u32_at(body, 0), u32_at(body, 4), u32_at(body, 8))
        else {
            return Err(Error::BadRequest(format!(
                "seal part body is {} bytes, needs at least {SEAL_HEADER}",
                body.len()
            )));
        };
        let rest = body.get(SEAL_HEADER..).unwrap_or(&[]);
        let (positions, queries) = take_words(rest, n, "training positions")?;
        Ok(Self::Part(QueriesPart {
            layer,
            start,
            n,
            positions,
            queries: whole_words(queries, "queries")?,
        }))
    }
}

/// Training queries `[q_heads][n][head_dim]` with their `n` positions, of which one request
/// carries the positions `range`: per query head `h`, the rows `queries[h][range]`. The
/// clients split a training set that does not fit the arena into such requests without
/// copying it first.
#[derive(Clone, Debug)]
pub struct TrainingSlice<'a> {
    /// `[q_heads][n][head_dim]` f32, the whole training set.
    pub queries: &'a [f32],
    /// `n` positions.
    pub positions: &'a [u32],
    /// Query heads in `queries`.
    pub q_heads: usize,
    /// The positions this request carries.
    pub range: Range<usize>,
}

impl TrainingSlice<'_> {
    /// f32 values per position and query head, or an error naming the shapes that disagree.
    fn row(&self) -> Result<usize> {
        let n = self.positions.len();
        let per = n.checked_mul(self.q_heads);
        let ok = match per {
            Some(0) => self.queries.is_empty(),
            Some(p) => self.queries.len().is_multiple_of(p),
            None => false,
        } && self.range.start <= self.range.end
            && self.range.end <= n
            && u32::try_from(n).is_ok();
        if !ok {
            return Err(Error::BadRequest(format!(
                "seal training: {} floats do not split into {} query heads x {n} positions, or \
                 positions {:?} are not among them",
                self.queries.len(),
                self.q_heads,
                self.range
            )));
        }
        Ok(self
            .queries
            .len()
            .checked_div(n * self.q_heads)
            .unwrap_or(0))
    }

    /// Bytes this slice takes in a request body after the header.
    pub fn bytes(&self) -> Result<usize> {
        let (d, m) = (self.row()?, self.range.len());
        Ok(4 * m + 4 * self.q_heads * m * d)
    }

    /// Writes positions then the head-major query rows of `range` into `out` (exactly
    /// [`TrainingSlice::bytes`] long).
    fn write(&self, out: &mut [u8]) -> Result<()> {
        let (d, n, r) = (self.row()?, self.positions.len(), self.range.clone());
        let (pos, mut rest) = out.split_at_mut(4 * r.len());
        pos.copy_from_slice(bytemuck::cast_slice(&self.positions[r.clone()]));
        for h in 0..self.q_heads {
            let rows = &self.queries[(h * n + r.start) * d..(h * n + r.end) * d];
            let (dst, tail) = rest.split_at_mut(4 * rows.len());
            dst.copy_from_slice(bytemuck::cast_slice(rows));
            rest = tail;
        }
        Ok(())
    }

    /// Writes a request: the header words, then this slice.
    fn request(&self, head: [u32; 4], what: &str, out: &mut [u8]) -> Result<usize> {
        let need = SEAL_HEADER + self.bytes()?;
        let out = out.get_mut(..need).ok_or_else(|| {
            Error::BadRequest(format!(
                "{what} request of {need} bytes does not fit the arena"
            ))
        })?;
        for (i, w) in head.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        self.write(&mut out[SEAL_HEADER..])?;
        Ok(need)
    }

    /// Encodes this slice as a training part of `layer` whose `start` is `range.start` (parts
    /// are sent in order from position 0); returns the length.
    pub fn encode_part(&self, layer: u32, out: &mut [u8]) -> Result<usize> {
        let head = [
            layer,
            self.range.start as u32,
            self.range.len() as u32,
            SIGNAL_QUERIES_PART,
        ];
        self.request(head, "seal part", out)
    }

    /// Encodes this slice as the queries of a seal of `layer` with `kind` (the training set's
    /// last positions when parts came before); returns the length.
    pub fn encode_seal(&self, layer: u32, kind: IndexKind, out: &mut [u8]) -> Result<usize> {
        let head = [
            layer,
            kind_code(kind),
            self.range.len() as u32,
            SIGNAL_QUERIES,
        ];
        self.request(head, "seal", out)
    }
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
            Error::BadRequest(format!(
                "seal says {n} {what}, but only {} bytes follow",
                rest.len()
            ))
        })?;
    Ok(rest.split_at(bytes))
}

fn whole_words<'a>(b: &'a [u8], what: &str) -> Result<&'a [u8]> {
    if !b.len().is_multiple_of(4) {
        return Err(Error::BadRequest(format!(
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
            return Err(Error::BadRequest(format!(
                "seal body is {} bytes, needs at least {SEAL_HEADER}",
                body.len()
            )));
        };
        let kind = match kind {
            0 => IndexKind::Flat,
            1 => IndexKind::Hnsw,
            2 => IndexKind::Graph,
            3 => IndexKind::Cluster,
            other => {
                return Err(Error::BadRequest(format!(
                    "seal index kind {other} is unknown (0 flat, 1 hnsw, 2 graph, 3 cluster)"
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
            SIGNAL_QUERIES_PART => {
                return Err(Error::BadRequest(
                    "a seal part (signal 2) has no seal header; decode it with SealRequest".into(),
                ))
            }
            other => {
                return Err(Error::BadRequest(format!(
                    "seal training signal {other} is unknown (0 queries, 1 neighbour lists, 2 a \
                     part of the queries)"
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
            Error::BadRequest(format!(
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
            return Err(Error::BadRequest(format!(
                "set_wkv body is {} bytes, needs at least {SET_WKV_HEADER}",
                body.len()
            )));
        };
        let data = body.get(SET_WKV_HEADER..).unwrap_or(&[]);
        let want = (rows as usize)
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(4));
        if want != Some(data.len()) {
            return Err(Error::BadRequest(format!(
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
            Error::BadRequest(format!(
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

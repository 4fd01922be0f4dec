//! Bodies of the decode-path requests (little-endian, like [`crate::proto`]).
//!
//! | op       | request body | response body |
//! |----------|--------------|---------------|
//! | seal     | layer u32, kind u32 (0 flat, 1 hnsw, 2 graph), n u32, signal u32, then by signal: 0 (queries): positions u32 `[n]`, queries f32 `[q_heads][n][head_dim]`; 1 (neighbour lists): query head u32 `[n]`, length u32 `[n]`, token ids u32 `[sum of lengths]` | tokens indexed per KV head, u64 |
//! | retrieve | layer u32, flags u32, k u32, min_k u32, max_k u32, coverage f32, scale f32, 0 u32, query f32 `[q_heads][head_dim]` | see [`RetrieveLayout`] |
//!
//! | set_wkv  | layer u32, row_start u32, rows u32, 0 u32, `W_KV` rows f32 `[rows][D]` (`D = kv_heads x head_dim`) | rows received so far, u64 |
//!
//! Retrieve flags: [`ATTEND`], [`GATHER`], [`ADAPTIVE`] (budget `coverage` within
//! `min_k..=max_k`; otherwise exactly `k`). A scale of 0 means `1/sqrt(head_dim)`.

use kvdex_index::attend::BudgetParams;
use kvdex_index::IndexKind;

use crate::error::{KvdexError, Result};
use crate::store::retrieve::{Budget, RetrieveParams};

/// Retrieve flag: compute the partial attention `(out, lse)`.
pub const ATTEND: u32 = 1;
/// Retrieve flag: copy the chosen K/V rows into the response.
pub const GATHER: u32 = 2;
/// Retrieve flag: adaptive budget.
pub const ADAPTIVE: u32 = 4;

/// Bytes of the seal request header.
pub const SEAL_HEADER: usize = 16;
/// Bytes of the retrieve request header.
pub const RETRIEVE_HEADER: usize = 32;
/// Bytes of the retrieve response header.
pub const RESPONSE_HEADER: usize = 48;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn f32_at(b: &[u8], at: usize) -> Option<f32> {
    u32_at(b, at).map(f32::from_bits)
}

/// The wire code of an index kind.
pub fn kind_code(kind: IndexKind) -> u32 {
    match kind {
        IndexKind::Flat => 0,
        IndexKind::Hnsw => 1,
        IndexKind::Graph => 2,
    }
}

/// Seal signal code: sampled prefill queries with their positions.
pub const SIGNAL_QUERIES: u32 = 0;
/// Seal signal code: neighbour lists the engine computed.
pub const SIGNAL_NEIGHBOURS: u32 = 1;

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
    if b.len() % 4 != 0 {
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

/// Bytes of the set_wkv request header.
pub const SET_WKV_HEADER: usize = 16;

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

/// A decoded retrieve header; the query is the bytes after it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetrieveHeader {
    /// Layer.
    pub layer: u32,
    /// What to compute.
    pub params: RetrieveParams,
}

impl RetrieveHeader {
    /// Decodes the header (validating the budget) and returns the query bytes.
    pub fn decode(body: &[u8]) -> Result<(Self, &[u8])> {
        let field = |at| u32_at(body, at);
        let (Some(layer), Some(flags), Some(k), Some(min_k), Some(max_k)) =
            (field(0), field(4), field(8), field(12), field(16))
        else {
            return Err(KvdexError::BadRequest(format!(
                "retrieve body is {} bytes, needs at least {RETRIEVE_HEADER}",
                body.len()
            )));
        };
        let (Some(coverage), Some(scale)) = (f32_at(body, 20), f32_at(body, 24)) else {
            return Err(KvdexError::BadRequest("retrieve body too short".into()));
        };
        if flags & !(ATTEND | GATHER | ADAPTIVE) != 0 {
            return Err(KvdexError::BadRequest(format!(
                "retrieve flags {flags:#x} are unknown"
            )));
        }
        let budget = if flags & ADAPTIVE != 0 {
            Budget::Adaptive(BudgetParams::new(coverage, min_k as usize, max_k as usize)?)
        } else if k == 0 {
            return Err(KvdexError::BadRequest(
                "budget k = 0: ask for at least one token".into(),
            ));
        } else {
            Budget::Fixed(k as usize)
        };
        let query = body.get(RETRIEVE_HEADER..).unwrap_or(&[]);
        if query.len() % 4 != 0 {
            return Err(KvdexError::BadRequest(format!(
                "retrieve query is {} bytes, not a multiple of 4",
                query.len()
            )));
        }
        let params = RetrieveParams {
            budget,
            attend: flags & ATTEND != 0,
            gather: flags & GATHER != 0,
            scale: (scale != 0.0).then_some(scale),
        };
        Ok((Self { layer, params }, query))
    }

    /// Writes the header and `query` into `out`; returns the length.
    pub fn encode(&self, query: &[f32], out: &mut [u8]) -> Result<usize> {
        let p = &self.params;
        let need = RETRIEVE_HEADER + 4 * query.len();
        let out = out.get_mut(..need).ok_or_else(|| {
            KvdexError::BadRequest(format!(
                "retrieve request of {need} bytes does not fit the arena"
            ))
        })?;
        let mut flags = ((p.attend as u32) * ATTEND) | ((p.gather as u32) * GATHER);
        let (k, min_k, max_k, coverage) = match p.budget {
            Budget::Fixed(k) => (k as u32, 0, 0, 0.0f32),
            Budget::Adaptive(b) => {
                flags |= ADAPTIVE;
                (0, b.min_k as u32, b.max_k as u32, b.coverage)
            }
        };
        let scale = p.scale.unwrap_or(0.0);
        let head = [
            self.layer,
            flags,
            k,
            min_k,
            max_k,
            coverage.to_bits(),
            scale.to_bits(),
            0,
        ];
        for (i, w) in head.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        out[RETRIEVE_HEADER..].copy_from_slice(bytemuck::cast_slice(query));
        Ok(need)
    }
}

/// Byte ranges of a retrieve response, computed identically by the worker (to write) and the
/// client (to read). Every section is a whole number of 4-byte words, so with the arena's
/// 8-byte alignment each casts in place to `u32`/`f32`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrieveLayout {
    /// `[q_heads]` u32 chosen k.
    pub k: std::ops::Range<usize>,
    /// `[q_heads]` f32 estimated coverage.
    pub coverage: std::ops::Range<usize>,
    /// `[q_heads][stride]` u32 ids.
    pub ids: std::ops::Range<usize>,
    /// `[q_heads][stride]` f32 scores.
    pub scores: std::ops::Range<usize>,
    /// `[q_heads][head_dim]` f32 partial attention (empty unless attend).
    pub out: std::ops::Range<usize>,
    /// `[q_heads]` f32 log-sum-exp (empty unless attend).
    pub lse: std::ops::Range<usize>,
    /// `[q_heads][2][stride][row_bytes]` K then V rows (empty unless gather), starting at a
    /// multiple of 64 bytes.
    pub rows: std::ops::Range<usize>,
}

impl RetrieveLayout {
    /// The layout for a shape and stride; `None` on overflow.
    pub fn new(
        q_heads: usize,
        stride: usize,
        head_dim: usize,
        row_bytes: usize,
        attend: bool,
        gather: bool,
    ) -> Option<Self> {
        let mut at = RESPONSE_HEADER;
        let mut take_aligned = |align: usize, n: usize| -> Option<std::ops::Range<usize>> {
            let start = at.checked_next_multiple_of(align)?;
            let r = start..start.checked_add(n)?;
            at = r.end;
            Some(r)
        };
        let mut take = |n: usize| take_aligned(1, n);
        let hs = q_heads.checked_mul(stride)?;
        Some(Self {
            k: take(4 * q_heads)?,
            coverage: take(4 * q_heads)?,
            ids: take(hs.checked_mul(4)?)?,
            scores: take(hs.checked_mul(4)?)?,
            out: take(if attend {
                q_heads.checked_mul(head_dim)?.checked_mul(4)?
            } else {
                0
            })?,
            lse: take(if attend { 4 * q_heads } else { 0 })?,
            // Rows start on a cache line (the response space starts on one), so that each row
            // copy meets the transfer crate's run alignment whatever the head count.
            rows: take_aligned(
                64,
                if gather {
                    hs.checked_mul(2)?.checked_mul(row_bytes)?
                } else {
                    0
                },
            )?,
        })
    }

    /// Total response bytes.
    pub fn len(&self) -> usize {
        self.rows.end
    }

    /// Never empty (the header is always there).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The retrieve response header.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ResponseHeader {
    /// Query heads.
    pub q_heads: u32,
    /// Candidates per head.
    pub stride: u32,
    /// Head dim.
    pub head_dim: u32,
    /// Bytes per gathered row.
    pub row_bytes: u32,
    /// The request's flags.
    pub flags: u32,
    /// Keys scored by the searches.
    pub scored: u64,
    /// Daemon microseconds searching.
    pub search_us: f32,
    /// Daemon microseconds on budgets and attention.
    pub attend_us: f32,
    /// Daemon microseconds copying out.
    pub copy_us: f32,
}

impl ResponseHeader {
    /// Writes the header into the first [`RESPONSE_HEADER`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<()> {
        let out = out.get_mut(..RESPONSE_HEADER).ok_or_else(|| {
            KvdexError::BadRequest("retrieve response space is smaller than its header".into())
        })?;
        let words = [
            self.q_heads,
            self.stride,
            self.head_dim,
            self.row_bytes,
            self.flags,
            0,
        ];
        for (i, w) in words.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        out[24..32].copy_from_slice(&self.scored.to_le_bytes());
        for (i, f) in [self.search_us, self.attend_us, self.copy_us, 0.0]
            .iter()
            .enumerate()
        {
            out[32 + i * 4..36 + i * 4].copy_from_slice(&f.to_le_bytes());
        }
        Ok(())
    }

    /// Reads the header.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = || {
            KvdexError::Protocol(format!(
                "retrieve response of {} bytes has no header",
                b.len()
            ))
        };
        let w = |i: usize| u32_at(b, i * 4).ok_or_else(bad);
        Ok(Self {
            q_heads: w(0)?,
            stride: w(1)?,
            head_dim: w(2)?,
            row_bytes: w(3)?,
            flags: w(4)?,
            scored: u64::from_le_bytes(
                b.get(24..32)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            ),
            search_us: f32_at(b, 32).ok_or_else(bad)?,
            attend_us: f32_at(b, 36).ok_or_else(bad)?,
            copy_us: f32_at(b, 40).ok_or_else(bad)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrieve_header_round_trips_and_refuses_bad_budgets() {
        let h = RetrieveHeader {
            layer: 3,
            params: RetrieveParams {
                budget: Budget::Adaptive(BudgetParams::new(0.9, 4, 64).unwrap()),
                attend: true,
                gather: false,
                scale: Some(0.125),
            },
        };
        let q = [1.0f32, -2.0, 3.5];
        let mut buf = vec![0u8; 64];
        let n = h.encode(&q, &mut buf).unwrap();
        let (back, query) = RetrieveHeader::decode(&buf[..n]).unwrap();
        assert_eq!(back, h);
        assert_eq!(bytemuck::cast_slice::<u8, f32>(query), &q);
        // k = 0 with a fixed budget, and min_k = 0 with an adaptive one, are refused.
        let mut fixed = h;
        fixed.params.budget = Budget::Fixed(0);
        let n = fixed.encode(&q, &mut buf).unwrap();
        let e = RetrieveHeader::decode(&buf[..n]).unwrap_err().to_string();
        assert!(e.contains("k = 0"), "{e}");
        buf[12..16].copy_from_slice(&0u32.to_le_bytes());
        buf[20..24].copy_from_slice(&0.9f32.to_le_bytes());
        buf[4..8].copy_from_slice(&ADAPTIVE.to_le_bytes());
        let e = RetrieveHeader::decode(&buf[..n]).unwrap_err().to_string();
        assert!(e.contains("min_k 0"), "{e}");
        assert!(RetrieveHeader::decode(&buf[..20]).is_err());
        buf[4..8].copy_from_slice(&0x80u32.to_le_bytes());
        assert!(RetrieveHeader::decode(&buf[..n])
            .unwrap_err()
            .to_string()
            .contains("flags"));
    }

    #[test]
    fn seal_header_round_trips_and_checks_lengths() {
        let h = SealHeader {
            layer: 1,
            kind: IndexKind::Graph,
            n: 2,
            signal: SIGNAL_QUERIES,
        };
        let mut buf = vec![0u8; 64];
        let n = h.encode(&[&[5, 9]], &[0.5; 4], &mut buf).unwrap();
        let (back, body) = SealHeader::decode(&buf[..n]).unwrap();
        assert_eq!(back, h);
        let SealBody::Queries { positions, queries } = body else {
            panic!("queries expected: {body:?}")
        };
        assert_eq!((positions.len(), queries.len()), (8, 16));
        buf[8..12].copy_from_slice(&100u32.to_le_bytes());
        assert!(SealHeader::decode(&buf[..n])
            .unwrap_err()
            .to_string()
            .contains("100 training"));
        buf[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(SealHeader::decode(&buf[..n])
            .unwrap_err()
            .to_string()
            .contains("kind 7"));
    }

    #[test]
    fn set_wkv_header_round_trips_and_checks_the_row_count() {
        let h = SetWkvHeader {
            layer: 2,
            row_start: 4,
            rows: 2,
        };
        let mut buf = vec![0u8; 64];
        let n = h.encode(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut buf).unwrap();
        let (back, data) = SetWkvHeader::decode(&buf[..n], 3).unwrap();
        assert_eq!(back, h);
        assert_eq!(bytemuck::cast_slice::<u8, f32>(data)[5], 6.0);
        let e = SetWkvHeader::decode(&buf[..n], 4).unwrap_err().to_string();
        assert!(e.contains("2 rows of D = 4 floats, but 24 bytes"), "{e}");
        assert!(SetWkvHeader::decode(&buf[..8], 3).is_err());
        assert!(h.encode(&[0.0; 20], &mut buf).is_err());
    }

    #[test]
    fn seal_neighbour_lists_round_trip_and_check_lengths() {
        let h = SealHeader {
            layer: 0,
            kind: IndexKind::Graph,
            n: 2,
            signal: SIGNAL_NEIGHBOURS,
        };
        let mut buf = vec![0u8; 64];
        let n = h
            .encode(&[&[0, 3], &[2, 1], &[10, 11, 12]], &[], &mut buf)
            .unwrap();
        let (back, body) = SealHeader::decode(&buf[..n]).unwrap();
        assert_eq!(back, h);
        let SealBody::Neighbours { heads, lens, ids } = body else {
            panic!("neighbours expected: {body:?}")
        };
        assert_eq!(bytemuck::cast_slice::<u8, u32>(heads), &[0, 3]);
        assert_eq!(bytemuck::cast_slice::<u8, u32>(lens), &[2, 1]);
        assert_eq!(bytemuck::cast_slice::<u8, u32>(ids), &[10, 11, 12]);
        // The lengths section cut short, an unknown signal, a ragged id section.
        let e = SealHeader::decode(&buf[..SEAL_HEADER + 12]).unwrap_err();
        assert!(e.to_string().contains("neighbour list lengths"), "{e}");
        assert!(SealHeader::decode(&buf[..n - 2])
            .unwrap_err()
            .to_string()
            .contains("multiple of 4"));
        buf[12..16].copy_from_slice(&9u32.to_le_bytes());
        assert!(SealHeader::decode(&buf[..n])
            .unwrap_err()
            .to_string()
            .contains("signal 9"));
    }

    #[test]
    fn layout_sections_follow_each_other_and_overflow_is_none() {
        let l = RetrieveLayout::new(8, 10, 128, 256, true, true).unwrap();
        assert_eq!(l.k.start, RESPONSE_HEADER);
        assert_eq!(l.rows.len(), 8 * 2 * 10 * 256);
        assert_eq!(l.out.len(), 8 * 128 * 4);
        assert!(RetrieveLayout::new(usize::MAX / 2, 4, 1, 1, false, false).is_none());
        let h = ResponseHeader {
            q_heads: 8,
            stride: 10,
            scored: 1 << 40,
            search_us: 1.5,
            ..Default::default()
        };
        let mut b = [0u8; RESPONSE_HEADER];
        h.encode(&mut b).unwrap();
        assert_eq!(ResponseHeader::decode(&b).unwrap(), h);
    }
}

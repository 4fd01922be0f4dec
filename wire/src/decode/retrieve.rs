//! Retrieve bodies: the per-layer decode request and its response layout.

use kvdex_index::attend::BudgetParams;

use super::dest::{EngineRows, ENGINE_ROWS_EXT};
use super::{
    f32_at, u32_at, ADAPTIVE, ATTEND, ENGINE_ROWS, GATHER, POSITIONS, RESPONSE_HEADER,
    RETRIEVE_HEADER, SCALE,
};
use crate::error::{Error, Result};
use crate::params::{Budget, RetrieveParams};
use crate::proto::read_u32s;

/// A decoded retrieve header; the query is the bytes after it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetrieveHeader {
    /// Layer.
    pub layer: u32,
    /// What to compute.
    pub params: RetrieveParams,
    /// Rows into an engine destination instead of the response ([`ENGINE_ROWS`]).
    pub engine_rows: Option<EngineRows>,
    /// Query positions `P` of a multi-position request ([`POSITIONS`]); 0 for the
    /// single-position layout.
    pub positions: u32,
}

/// Most query positions one retrieve may carry.
pub const MAX_POSITIONS: u32 = 1 << 16;

/// Splits the body after a [`POSITIONS`] header into the limits (`[P]` u32) and the query
/// bytes; for a single-position header, no limits.
pub fn split_limits(positions: u32, rest: &[u8]) -> Result<(&[u8], &[u8])> {
    let n = 4 * positions as usize;
    rest.split_at_checked(n).ok_or_else(|| {
        Error::BadRequest(format!(
            "retrieve body holds {} bytes after its header, fewer than the {positions} \
             positions' limits ({n} bytes)",
            rest.len()
        ))
    })
}

impl RetrieveHeader {
    /// Decodes the header (validating the budget and the scale) and returns the query bytes.
    pub fn decode(body: &[u8]) -> Result<(Self, &[u8])> {
        let Some((head, query)) = body.split_at_checked(RETRIEVE_HEADER) else {
            return Err(Error::BadRequest(format!(
                "retrieve body is {} bytes, needs at least {RETRIEVE_HEADER}",
                body.len()
            )));
        };
        let mut words = [0u32; RETRIEVE_HEADER / 4];
        read_u32s(head, &mut words);
        let [layer, flags, k, min_k, max_k, coverage, scale, positions] = words;
        let (coverage, scale) = (f32::from_bits(coverage), f32::from_bits(scale));
        if flags & !(ATTEND | GATHER | ADAPTIVE | SCALE | ENGINE_ROWS | POSITIONS) != 0 {
            return Err(Error::BadRequest(format!(
                "retrieve flags {flags:#x} are unknown"
            )));
        }
        if flags & POSITIONS == 0 && positions != 0 {
            return Err(Error::BadRequest(format!(
                "retrieve header word 7 is reserved and must be 0, got {positions:#x} (it holds \
                 the positions P only with the POSITIONS flag {POSITIONS:#x})"
            )));
        }
        if flags & POSITIONS != 0 && !(1..=MAX_POSITIONS).contains(&positions) {
            return Err(Error::BadRequest(format!(
                "retrieve positions P = {positions}: send 1 ..= {MAX_POSITIONS} query positions"
            )));
        }
        let budget = if flags & ADAPTIVE != 0 {
            Budget::Adaptive(BudgetParams::new(coverage, min_k as usize, max_k as usize)?)
        } else if k == 0 {
            return Err(Error::BadRequest(
                "budget k = 0: ask for at least one token".into(),
            ));
        } else {
            Budget::Fixed(k as usize)
        };
        let scale = if flags & SCALE != 0 {
            Some(checked_scale(scale)?)
        } else if scale.to_bits() != 0 {
            // A version-1 client sent its scale without the flag: refuse rather than ignore it.
            return Err(Error::BadRequest(format!(
                "retrieve scale field is {scale} but the SCALE flag ({SCALE:#x}) is not set: set \
                 it to use this scale, or send 0 for 1/sqrt(head_dim)"
            )));
        } else {
            None
        };
        let (engine_rows, query) = EngineRows::split(flags, query)?;
        let positions = if flags & POSITIONS != 0 { positions } else { 0 };
        if !query.len().is_multiple_of(4) {
            return Err(Error::BadRequest(format!(
                "retrieve query is {} bytes, not a multiple of 4",
                query.len()
            )));
        }
        let params = RetrieveParams {
            budget,
            attend: flags & ATTEND != 0,
            gather: flags & GATHER != 0,
            scale,
        };
        Ok((
            Self {
                layer,
                params,
                engine_rows,
                positions,
            },
            query,
        ))
    }

    /// Writes the header and `query` into `out`; returns the length. Refuses (naming the value)
    /// a scale that is not finite and positive and a budget that does not fit the wire's u32,
    /// rather than sending something the daemon would read differently.
    pub fn encode(&self, query: &[f32], out: &mut [u8]) -> Result<usize> {
        self.encode_with(&[], query, out)
    }

    /// [`RetrieveHeader::encode`] of a multi-position request (`positions > 0`): `limits`
    /// (one per position) before `query` (`[P][q_heads][head_dim]`).
    pub fn encode_with(&self, limits: &[u32], query: &[f32], out: &mut [u8]) -> Result<usize> {
        let p = &self.params;
        let mut flags = ((p.attend as u32) * ATTEND) | ((p.gather as u32) * GATHER);
        if self.positions > 0 {
            if limits.len() != self.positions as usize {
                return Err(Error::BadRequest(format!(
                    "retrieve of {} positions has {} limits",
                    self.positions,
                    limits.len()
                )));
            }
            flags |= POSITIONS;
        } else if !limits.is_empty() {
            return Err(Error::BadRequest(
                "retrieve limits need positions > 0 (the multi-position layout)".into(),
            ));
        }
        let (k, min_k, max_k, coverage) = match p.budget {
            Budget::Fixed(k) => (wire_count("k", k)?, 0, 0, 0.0f32),
            Budget::Adaptive(b) => {
                flags |= ADAPTIVE;
                let min_k = wire_count("min_k", b.min_k)?;
                (0, min_k, wire_count("max_k", b.max_k)?, b.coverage)
            }
        };
        let scale = match p.scale {
            Some(s) => {
                flags |= SCALE;
                checked_scale(s)?
            }
            None => 0.0,
        };
        let ext = match self.engine_rows {
            Some(_) if !p.gather => {
                return Err(Error::BadRequest(
                    "rows into an engine destination need gather".into(),
                ))
            }
            Some(_) => {
                flags |= ENGINE_ROWS;
                ENGINE_ROWS_EXT
            }
            None => 0,
        };
        let need = RETRIEVE_HEADER + ext + 4 * (limits.len() + query.len());
        let out = out.get_mut(..need).ok_or_else(|| {
            Error::BadRequest(format!(
                "retrieve request of {need} bytes does not fit the arena"
            ))
        })?;
        let head = [
            self.layer,
            flags,
            k,
            min_k,
            max_k,
            coverage.to_bits(),
            scale.to_bits(),
            self.positions,
        ];
        for (i, w) in head.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        if let Some(e) = &self.engine_rows {
            e.write(&mut out[RETRIEVE_HEADER..RETRIEVE_HEADER + ext]);
        }
        let (lim, q) = out[RETRIEVE_HEADER + ext..].split_at_mut(4 * limits.len());
        lim.copy_from_slice(bytemuck::cast_slice(limits));
        q.copy_from_slice(bytemuck::cast_slice(query));
        Ok(need)
    }
}

/// An explicit softmax scale: finite and positive (0 or NaN never mean "default").
fn checked_scale(scale: f32) -> Result<f32> {
    if scale.is_finite() && scale > 0.0 {
        Ok(scale)
    } else {
        Err(Error::BadRequest(format!(
            "attention scale {scale} must be finite and positive (leave it out for \
             1/sqrt(head_dim))"
        )))
    }
}

/// A budget count as the wire's u32, or an error naming it (never truncated: a `Fixed(1 << 32)`
/// would otherwise travel as k 0).
fn wire_count(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::BadRequest(format!(
            "budget {what} = {n} does not fit the retrieve wire (at most {})",
            u32::MAX
        ))
    })
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

/// The retrieve response header: words q_heads, stride, head_dim, row_bytes, flags and
/// positions (0 for the single-position layout; bytes 0..24), `scored` u64 (24..32), then f32 microseconds search, attend, copy
/// and slowest head (32..48).
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
    /// Query positions `P` of a multi-position response (its sections are `P * q_heads` rows);
    /// 0 for the single-position layout.
    pub positions: u32,
    /// Keys scored by the searches.
    pub scored: u64,
    /// Daemon microseconds searching.
    pub search_us: f32,
    /// Daemon microseconds on budgets and attention.
    pub attend_us: f32,
    /// Daemon microseconds copying out.
    pub copy_us: f32,
    /// Daemon microseconds of the slowest query head's search, budget and attention (see
    /// the daemon's `RetrieveStats::slowest_head_us`); 0 from a daemon older than it.
    pub slowest_head_us: f32,
}

impl ResponseHeader {
    /// Rows of every per-head section: `max(positions, 1) * q_heads`.
    pub fn rows(&self) -> usize {
        self.positions.max(1) as usize * self.q_heads as usize
    }

    /// Writes the header into the first [`RESPONSE_HEADER`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<()> {
        let out = out.get_mut(..RESPONSE_HEADER).ok_or_else(|| {
            Error::BadRequest("retrieve response space is smaller than its header".into())
        })?;
        let words = [
            self.q_heads,
            self.stride,
            self.head_dim,
            self.row_bytes,
            self.flags,
            self.positions,
        ];
        for (i, w) in words.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        out[24..32].copy_from_slice(&self.scored.to_le_bytes());
        for (i, f) in [
            self.search_us,
            self.attend_us,
            self.copy_us,
            self.slowest_head_us,
        ]
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
            Error::Protocol(format!(
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
            positions: w(5)?,
            scored: u64::from_le_bytes(
                b.get(24..32)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            ),
            search_us: f32_at(b, 32).ok_or_else(bad)?,
            attend_us: f32_at(b, 36).ok_or_else(bad)?,
            copy_us: f32_at(b, 40).ok_or_else(bad)?,
            slowest_head_us: f32_at(b, 44).ok_or_else(bad)?,
        })
    }
}

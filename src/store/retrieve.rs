//! The decode-step request: one call per layer and step, for all query heads of the layer.
//!
//! For each query head `h` (reading KV head `h / group`):
//! 1. **search**: the top candidates among the non-static tokens `sinks .. len - window`, through
//!    the KV head's index plus an exact scan of the tokens not inserted yet, or, before the
//!    index is built, one GQA-batched exact scan per KV head;
//! 2. **budget**: a fixed k, or the adaptive k covering a fraction p of the estimated mass
//!    (static tokens exact, candidates exact, tail sampled: [`kvdex_index::attend::budget`]);
//! 3. **attend**: partial attention over the chosen ids, `(out, lse)`, for the engine's exact
//!    LSE merge ([`crate::client::merge`]);
//! 4. **gather**: the chosen K/V rows copied into the response.
//!
//! Steps 1 (graph searches) and 2-3 run in one pass, one query head per rayon task, when
//! [`DecodeConfig::parallel_heads`](super::DecodeConfig) is set. Every buffer lives in the
//! caller's [`RetrieveScratch`], so a steady-state request allocates nothing
//! (`tests/retrieve_allocs.rs` counts every allocation in the process: none with the heads in
//! sequence; with them on the pool, only rayon's injector takes a new ~1.5 KiB block once per
//! 63 requests).

use std::time::Instant;

use kvdex_index::attend::{
    attend_head, attend_head_dense_values, choose_k, default_scale, estimate_tail_lse,
    reconstruct_values_from, systematic_sample, RopeSpec, WKv,
};
use kvdex_index::keys::KeyRows;
use kvdex_index::{FlatIndex, Hits, KeyDtype, KeySlice, KeyStore, SearchScratch};
use kvdex_transfer::{DeviceLink, Run, Ticket, RUN_ALIGN};
use rayon::prelude::*;

use super::indexing::{view, HeadIndex};
use super::layer::LayerKv;
use super::slim::{encode_rows, LayerKeys};
use super::{poisoned, Session};
use crate::error::{KvdexError, Result};

mod head;
mod output;
mod types;

use head::{budget_and_attend, search_indexed, ExactScan, Slim};
pub use kvdex_wire::{Budget, RetrieveParams, NO_LIMIT};
use output::{check_out, copy_rows, RowsOut};
use types::HeadScratch;
pub use types::{RetrieveOut, RetrieveScratch, RetrieveStats, RowsDest};

fn lse_of(xs: &[f32]) -> f32 {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return m;
    }
    m + xs.iter().map(|&x| (x - m).exp()).sum::<f32>().ln()
}

impl Session {
    /// Candidates per head a retrieve of `layer` with `budget` returns now: the response's
    /// row stride. Errors on an unknown layer or a zero budget.
    pub fn retrieve_stride(&self, layer: u32, budget: &Budget) -> Result<usize> {
        let want = match budget {
            Budget::Fixed(0) => {
                return Err(KvdexError::BadRequest(
                    "budget k = 0: ask for at least one token".into(),
                ))
            }
            Budget::Fixed(k) => *k,
            Budget::Adaptive(p) => p.max_k,
        };
        let cfg = &self.decode;
        let len = self.len(layer)?;
        Ok(want.min(cfg.retrievable_end(len) - cfg.sinks))
    }

    /// The decode-step request for `layer` (see the module docs). `q` is `[q_heads][head_dim]`
    /// f32; `out` is sized for `stride` candidates per head. One query position with no limit:
    /// [`Session::retrieve_at`] with `[NO_LIMIT]`.
    pub fn retrieve(
        &self,
        layer: u32,
        q: &[f32],
        params: &RetrieveParams,
        scratch: &mut RetrieveScratch,
        out: RetrieveOut<'_>,
    ) -> Result<RetrieveStats> {
        self.retrieve_at(layer, q, &[NO_LIMIT], params, scratch, out)
    }

    /// The decode-step request for `P = limits.len()` query positions of one sequence at once
    /// (chunked prefill, speculative decoding). `q` is `[P][q_heads][head_dim]` f32; every
    /// output section gains a leading `P` axis (`out` rows are `P * q_heads`, position-major).
    ///
    /// Position `p` sees only tokens with id `< limits[p]` ([`NO_LIMIT`]: every token): its
    /// retrievable range is `[sinks, min(limits[p], len - window))`, where `len` is the
    /// layer's length now. The window stays relative to the sequence's length, since it is
    /// what the engine holds; a limit inside the window only narrows what the engine itself
    /// attends to (its causal mask). A limit beyond `len` is refused by name.
    pub fn retrieve_at(
        &self,
        layer: u32,
        q: &[f32],
        limits: &[u32],
        params: &RetrieveParams,
        scratch: &mut RetrieveScratch,
        out: RetrieveOut<'_>,
    ) -> Result<RetrieveStats> {
        let s = self.shape;
        let (hq, d, group) = (s.q_heads as usize, s.head_dim as usize, s.group() as usize);
        let np = limits.len();
        if np == 0 {
            return Err(KvdexError::BadRequest(
                "retrieve positions P = 0: send at least one query position".into(),
            ));
        }
        // Single-position messages as before positions existed; `position p, ` otherwise.
        let at = |p: usize| {
            if np == 1 {
                String::new()
            } else {
                format!("position {p}, ")
            }
        };
        if q.len() != np * hq * d {
            let positions = if np == 1 {
                String::new()
            } else {
                format!("positions {np} x ")
            };
            return Err(KvdexError::BadRequest(format!(
                "query has {} values, expected {positions}q_heads {hq} x head_dim {d} = {}",
                q.len(),
                np * hq * d
            )));
        }
        if let Some(pos) = q.iter().position(|x| !x.is_finite()) {
            return Err(KvdexError::BadRequest(format!(
                "query value {pos} ({}head {}) is {}",
                at(pos / (hq * d)),
                pos / d % hq,
                q[pos]
            )));
        }
        let scale = params.scale.unwrap_or_else(|| default_scale(d));
        if !(scale.is_finite() && scale > 0.0) {
            return Err(KvdexError::BadRequest(format!(
                "attention scale {scale} must be finite and positive"
            )));
        }
        let stride = self.retrieve_stride(layer, &params.budget)?;
        let rb = s.row_bytes();
        let items = np * hq;
        check_out(&out, items, d, stride, rb, params)?;
        let cfg = &self.decode;
        let li = self.index_of(layer)?;
        let wkv = self.wkv(layer)?;
        let rope = self.slim.as_ref().and_then(|sl| sl.rope);
        let l = self.layer(layer)?.read().map_err(poisoned)?;
        if let Some((p, &lim)) = limits
            .iter()
            .enumerate()
            .find(|(_, &lim)| lim != NO_LIMIT && lim as usize > l.len)
        {
            return Err(KvdexError::BadRequest(format!(
                "retrieve limits[{p}] = {lim} is beyond layer {layer}'s length {}",
                l.len
            )));
        }
        let (start, end) = (cfg.sinks, cfg.retrievable_end(l.len));
        if end - start < stride {
            return Err(KvdexError::Protocol(format!(
                "layer {layer} changed length during a retrieve"
            )));
        }
        if end <= start {
            // Only static tokens: an empty part (weight exp(-inf) = 0 in the merge).
            out.k[..items].fill(0);
            out.coverage[..items].fill(1.0);
            if params.attend {
                out.out[..items * d].fill(0.0);
                out.lse[..items].fill(f32::NEG_INFINITY);
            }
            return Ok(RetrieveStats::default());
        }
        // Position p's own view: retrievable `start..ends[p]`, visible `0..lens[p]`.
        let view_of = |p: usize| -> (usize, usize) {
            let lim = match limits[p] {
                NO_LIMIT => l.len,
                lim => lim as usize,
            };
            (end.min(lim).max(start), l.len.min(lim))
        };
        if scratch.heads.len() < items {
            scratch.heads.resize_with(items, HeadScratch::default);
        }
        let heads = &mut scratch.heads[..items];
        let t0 = Instant::now();
        let mut exact_heads = 0;
        // 1a. KV heads without an index: one exact scan of the keys per KV head for the
        // group's queries of every run of positions that see the same tokens (all of them, for
        // a speculative chunk inside the window), so the keys are read once, not once per
        // position.
        for g in 0..s.kv_heads as usize {
            let exact = matches!(*li.heads[g].read().map_err(poisoned)?, HeadIndex::Exact);
            exact_heads += u32::from(exact);
            let mut p = 0;
            while p < np {
                let end_p = view_of(p).0;
                let run_end = (p + 1..np).find(|&r| view_of(r).0 != end_p).unwrap_or(np);
                let scan = exact && stride > 0 && end_p > start;
                for r in p..run_end {
                    let first = r * hq + g * group;
                    for h in &mut heads[first..first + group] {
                        h.searched = exact;
                        if !scan {
                            h.hits.clear();
                            h.scored = 0;
                        }
                    }
                }
                if scan {
                    let runs = (p..run_end).map(|r| (r * hq + g * group) * d);
                    scratch.queries.clear();
                    for at in runs {
                        scratch.queries.extend_from_slice(&q[at..at + group * d]);
                    }
                    let exact_scan = ExactScan {
                        keys: &l.keys(g, s.dtype, d)?,
                        range: (start, end_p),
                        stride,
                    };
                    let mut outs = (p..run_end).flat_map(|r| {
                        let first = r * hq + g * group;
                        first..first + group
                    });
                    exact_scan.run(
                        &scratch.queries,
                        &mut scratch.flat,
                        &mut scratch.group,
                        heads,
                        &mut outs,
                    )?;
                }
                p = run_end;
            }
        }
        let t1 = Instant::now();
        // 1b-3. One parallel pass over the (position, query head) pairs: the head's search (KV
        // heads with an index: the graph plus the pending tokens), then its budget and
        // attention. One pass instead of two halves the hand-offs to the thread pool (each a
        // wake-up and a wait, tens of microseconds on a busy machine), and keeps a head's rows
        // warm between steps.
        let layer_keys = LayerKeys {
            layer: &l,
            dtype: s.dtype,
            head_dim: d,
            kv_heads: s.kv_heads as usize,
        };
        let slim = wkv.as_deref().map(|w| Slim {
            wkv: w,
            rope: rope.as_ref(),
            keys: &layer_keys,
        });
        let work = |(i, hs): (usize, &mut HeadScratch)| -> Result<()> {
            let (p, g) = (i / hq, i % hq / group);
            let qh = &q[i * d..(i + 1) * d];
            let (end_p, len_p) = view_of(p);
            let ts = Instant::now();
            if end_p == start {
                // This position sees no retrievable token: an empty part.
                hs.empty(d);
                hs.search_s = 0.0;
                hs.attend_s = 0.0;
                return Ok(());
            }
            if !hs.searched && stride > 0 {
                let guard = li.heads[g].read().map_err(poisoned)?;
                let HeadIndex::Ready(index) = &*guard else {
                    return Err(KvdexError::Protocol("index disappeared".into()));
                };
                search_indexed(&l, index.as_ref(), g, qh, stride, hs, self, (start, end_p))?;
            }
            let tm = Instant::now();
            let keys = l.keys(g, s.dtype, d)?;
            let values = l.values(g, s.dtype, d)?;
            budget_and_attend(
                &keys,
                &values,
                slim.as_ref().map(|sl| (sl, g)),
                qh,
                scale,
                params,
                (start, end_p, len_p),
                cfg.tail_sample,
                hs,
            )?;
            hs.search_s = (tm - ts).as_secs_f64();
            hs.attend_s = tm.elapsed().as_secs_f64();
            Ok(())
        };
        if cfg.parallel_heads {
            heads.par_iter_mut().enumerate().try_for_each(work)?;
        } else {
            heads.iter_mut().enumerate().try_for_each(work)?;
        }
        let t2 = Instant::now();
        // A sample of the queries that went through an index guides the next insert batch
        // (never waits, never allocates: see `indexing::Guides`); the last position's, the
        // newest.
        if cfg.insert_guide_queries > 0 && heads.iter().any(|h| !h.searched) {
            li.guides.capture(&q[(np - 1) * hq * d..], group, d);
        }
        // 4. Copy out.
        let mut scored = 0u64;
        for (h, hs) in heads.iter().enumerate() {
            let n = hs.hits.len().min(stride);
            let (ids, scores) = (
                &mut out.ids[h * stride..(h + 1) * stride],
                &mut out.scores[h * stride..(h + 1) * stride],
            );
            ids[..n].copy_from_slice(&hs.hits.ids[..n]);
            scores[..n].copy_from_slice(&hs.hits.scores[..n]);
            ids[n..].fill(u32::MAX);
            scores[n..].fill(f32::NEG_INFINITY);
            out.k[h] = hs.k as u32;
            out.coverage[h] = hs.coverage;
            scored += hs.scored as u64;
            if params.attend {
                out.out[h * d..(h + 1) * d].copy_from_slice(&hs.out[..d]);
                out.lse[h] = hs.lse;
            }
        }
        if params.gather {
            // One position at a time: its heads' rows are `[q_heads][2][stride][row_bytes]`.
            let per = hq * 2 * stride * rb;
            let link = self.store.link.as_ref();
            for (p, hs) in heads.chunks(hq).enumerate() {
                let rows = RowsOut {
                    rows: out.rows.get_mut(p * per..(p + 1) * per).unwrap_or_default(),
                    dest: out.rows_dest.map(|dst| RowsDest {
                        offset: dst.offset + (p * per) as u64,
                        ..dst
                    }),
                    stride,
                    rb,
                    d,
                    dtype: s.dtype,
                    slim: slim.is_some(),
                    int8: self.format == super::KvFormat::Int8,
                };
                let (runs, tickets) = (&mut scratch.runs, &mut scratch.tickets);
                copy_rows(&l, link, hs, group, rows, runs, tickets)?;
            }
        }
        let t3 = Instant::now();
        let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
        // The pass's wall time, split in proportion to the heads' time in each step.
        let (sum_search, sum_attend, slowest) =
            heads.iter().fold((0.0, 0.0, 0.0f64), |(a, b, m), h| {
                (
                    a + h.search_s,
                    b + h.attend_s,
                    m.max(h.search_s + h.attend_s),
                )
            });
        let search_share = if sum_search + sum_attend > 0.0 {
            sum_search / (sum_search + sum_attend)
        } else {
            0.0
        };
        let pass = us(t1, t2);
        Ok(RetrieveStats {
            stride,
            scored,
            search_us: us(t0, t1) + pass * search_share,
            attend_us: pass * (1.0 - search_share),
            copy_us: us(t2, t3),
            slowest_head_us: slowest * 1e6,
            exact_heads,
        })
    }
}

#[cfg(test)]
mod tests;

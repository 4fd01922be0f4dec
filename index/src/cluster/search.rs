//! The group search: score every centroid for the group's query heads, order the clusters by
//! their best head's centroid score (relative to that head's best centroid), scan the codes of
//! whole clusters in that order until the row budget, keep `rerank * k` candidates per head,
//! and re-rank those exactly on the keys' own rows.

use super::ClusterIndex;
use crate::keys::KeyRows;
use crate::simd::Kernels;
use crate::{Hits, KeyStore, SearchStats, TopK};

/// Code rows decoded and scored per kernel call.
const BLOCK: usize = 64;

/// Bytes of one element of the keys' own rows, as the cost unit counts them (f16 rows).
const ROW_ELEM_BYTES: usize = 2;

/// Per-thread buffers of a cluster search, grown on first use.
#[derive(Debug, Default)]
pub struct ClusterScratch {
    /// `heads * clusters` centroid scores of the last search.
    pub(crate) cscores: Vec<f32>,
    /// Clusters of the last search in the order they were read, then the unread ones.
    pub(crate) order: Vec<(f32, u32)>,
    /// How many of `order` the last search read.
    pub(crate) read: usize,
    qsq: Vec<f32>,
    spread: Vec<f32>,
    block: Vec<f32>,
    bscores: Vec<f32>,
    cands: Vec<TopK>,
    hits: Hits,
    exact: Vec<f32>,
}

impl ClusterScratch {
    /// The clusters the last search read, best first.
    pub fn read_clusters(&self) -> impl Iterator<Item = u32> + '_ {
        self.order[..self.read].iter().map(|o| o.1)
    }

    /// Query head `h`'s score against every centroid, from the last search.
    pub fn centroid_scores(&self, h: usize, clusters: usize) -> &[f32] {
        self.cscores
            .get(h * clusters..(h + 1) * clusters)
            .unwrap_or(&[])
    }
}

/// Runs the search for the `outs.len()` queries in `queries` (shape checked by the caller).
pub(super) fn search_group(
    idx: &ClusterIndex,
    keys: &dyn KeyStore,
    queries: &[f32],
    k: usize,
    s: &mut ClusterScratch,
    outs: &mut [Hits],
) -> SearchStats {
    search_group_with(Kernels::best(), idx, keys, queries, k, s, outs)
}

/// As [`search_group`] on a given kernel path (the conformance test runs every path).
pub(super) fn search_group_with(
    kern: Kernels,
    idx: &ClusterIndex,
    keys: &dyn KeyStore,
    queries: &[f32],
    k: usize,
    s: &mut ClusterScratch,
    outs: &mut [Hits],
) -> SearchStats {
    let (d, g, c, n) = (idx.dim, outs.len(), idx.members.len(), idx.len);
    let kk = k.min(n);
    outs.iter_mut().for_each(Hits::clear);
    s.read = 0;
    if kk == 0 || g == 0 {
        return SearchStats {
            scored: 0,
            k_clamped: k > n,
            bytes_read: 0,
        };
    }
    // Centroid scores for the whole group, and the cluster order.
    s.cscores.resize(g * c, 0.0);
    kern.group(queries, KeyRows::F16(&idx.cents_f16), d, 0, &mut s.cscores);
    let z = idx.params.spread;
    s.spread.clear();
    s.spread.resize(g * c, 0.0);
    if z > 0.0 {
        s.qsq.clear();
        s.qsq.extend(queries.iter().map(|x| x * x));
        kern.group(&s.qsq, KeyRows::F32(&idx.var), d, 0, &mut s.spread);
        s.spread.iter_mut().for_each(|v| *v = z * v.max(0.0).sqrt());
    }
    s.order.clear();
    s.order.resize(c, (f32::NEG_INFINITY, 0));
    for h in 0..g {
        let row = &s.cscores[h * c..(h + 1) * c];
        let sp = &s.spread[h * c..(h + 1) * c];
        let best = row
            .iter()
            .zip(sp)
            .fold(f32::NEG_INFINITY, |a, (&b, &e)| a.max(b + e));
        for (j, (o, (&v, &e))) in s.order.iter_mut().zip(row.iter().zip(sp)).enumerate() {
            o.1 = j as u32;
            o.0 = o.0.max(v + e - best);
        }
    }
    s.order.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    // Scan whole clusters in order until the budget.
    let budget = ((idx.params.probe_fraction as f64 * n as f64).ceil() as usize).max(kk);
    let r = ((idx.params.rerank as f64 * kk as f64).ceil() as usize).min(n);
    s.cands.resize_with(g, TopK::default);
    s.cands.iter_mut().for_each(|t| t.reset(r));
    s.block.resize(BLOCK * d, 0.0);
    s.bscores.resize(BLOCK * g, 0.0);
    let bits = idx.params.bits;
    let rb = bits.row_bytes(d);
    let mut rows = 0usize;
    for &(_, cl) in &s.order {
        if rows >= budget {
            break;
        }
        s.read += 1;
        let m = &idx.members[cl as usize];
        for (b, ids) in m.ids.chunks(BLOCK).enumerate() {
            let len = ids.len();
            let codes = &m.codes[b * BLOCK * rb..(b * BLOCK + len) * rb];
            let scales = &m.scales[b * BLOCK..b * BLOCK + len];
            let blk = &mut s.block[..len * d];
            bits.decode(codes, scales, d, blk);
            let sc = &mut s.bscores[..len * g];
            kern.group(queries, KeyRows::F32(blk), d, 0, sc);
            for (h, cand) in s.cands.iter_mut().enumerate() {
                let base = s.cscores[h * c + cl as usize];
                let mut t = cand.threshold();
                for (&id, &v) in ids.iter().zip(&sc[h * len..(h + 1) * len]) {
                    let v = v + base;
                    if v > t {
                        cand.push(id, v);
                        t = cand.threshold();
                    }
                }
            }
        }
        rows += m.ids.len();
    }
    // Exact re-rank of each head's candidates on the keys' own rows.
    let mut reranked = 0usize;
    let mut top = TopK::default();
    for (h, (cand, out)) in s.cands.iter_mut().zip(outs.iter_mut()).enumerate() {
        cand.drain_into(&mut s.hits);
        s.exact.resize(s.hits.ids.len(), 0.0);
        keys.score_ids(&queries[h * d..(h + 1) * d], &s.hits.ids, &mut s.exact);
        reranked += s.hits.ids.len();
        top.reset(kk);
        for (&id, &v) in s.hits.ids.iter().zip(&s.exact) {
            top.push(id, v);
        }
        top.drain_into(out);
    }
    SearchStats {
        scored: rows + reranked,
        k_clamped: k > n,
        bytes_read: c * d * if z > 0.0 { 2 + 4 } else { 2 }
            + rows * (rb + 8)
            + reranked * d * ROW_ELEM_BYTES,
    }
}

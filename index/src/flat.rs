//! The exact scan: scores every key. The baseline every other index is measured against.
//!
//! Keys are scored in blocks of `BLOCK` (512) rows through the SIMD kernels; a block's scores are
//! filtered against the running top-k threshold before they touch the heap. Above
//! [`PARALLEL_MIN`] keys the range is split across rayon workers, each with its own top-k kept
//! in the caller's [`SearchScratch`], and the partial results are merged. A GQA group of query
//! heads is searched in one pass, so each key is read from memory once for the whole group.

use crate::error::check_finite;
use crate::{
    Hits, IndexError, KeyStore, MipsIndex, MipsIndexMut, SearchScratch, SearchStats, TopK,
};
use rayon::prelude::*;

/// Keys scored per block; a block's scores (times the group size) fit in L1.
const BLOCK: usize = 512;

/// Below this many keys a search runs on the calling thread: fork/join costs more than it saves.
pub const PARALLEL_MIN: usize = 32 * 1024;

/// One worker's share of a parallel scan: its top-k per query and its block of scores.
#[derive(Debug, Default)]
pub struct FlatPart {
    topks: Vec<TopK>,
    scores: Vec<f32>,
}

/// Exact MIPS by a full scan of the key store.
#[derive(Clone, Debug, Default)]
pub struct FlatIndex {
    len: usize,
}

/// Scores rows `range` for the `g` queries in `queries`, offering each to its `topks[j]`.
fn scan(
    keys: &dyn KeyStore,
    queries: &[f32],
    range: std::ops::Range<usize>,
    topks: &mut [TopK],
    scores: &mut Vec<f32>,
) {
    let g = topks.len();
    scores.resize(BLOCK * g, 0.0);
    let mut start = range.start;
    while start < range.end {
        let m = BLOCK.min(range.end - start);
        let s = &mut scores[..m * g];
        if g == 1 {
            keys.score_range(queries, start, s);
        } else {
            keys.score_range_group(queries, start, s);
        }
        for (j, topk) in topks.iter_mut().enumerate() {
            let mut t = topk.threshold();
            for (i, &v) in s[j * m..(j + 1) * m].iter().enumerate() {
                if v > t {
                    topk.push((start + i) as u32, v);
                    t = topk.threshold();
                }
            }
        }
        start += m;
    }
}

impl FlatIndex {
    /// An index over the first `len` keys of its store.
    pub fn new(len: usize) -> Self {
        Self { len }
    }

    /// Exact top-`k` among keys `0..n` (clamped to the index) for a group of `g` queries laid
    /// out back to back in `queries` (`g * dim` floats): the query heads of one GQA group, which
    /// share their KV head's keys. `outs[j]` receives query j's hits, best first.
    pub fn search_group(
        &self,
        keys: &dyn KeyStore,
        queries: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        outs: &mut [Hits],
    ) -> Result<SearchStats, IndexError> {
        let n = self.len.min(keys.len());
        self.search_prefix(keys, queries, k, n, scratch, outs)
    }

    /// As [`FlatIndex::search_group`] but over keys `0..n` only: the causal view of a prefill
    /// query at position `n - 1`, which is how the graph build finds its exact neighbour lists.
    pub fn search_prefix(
        &self,
        keys: &dyn KeyStore,
        queries: &[f32],
        k: usize,
        n: usize,
        scratch: &mut SearchScratch,
        outs: &mut [Hits],
    ) -> Result<SearchStats, IndexError> {
        let d = keys.dim();
        if d == 0 || !queries.len().is_multiple_of(d) || queries.is_empty() {
            return Err(IndexError::DimMismatch {
                expected: d,
                got: queries.len(),
            });
        }
        let g = queries.len() / d;
        if outs.len() != g {
            return Err(IndexError::InvalidArgument(format!(
                "{g} queries but {} result buffers",
                outs.len()
            )));
        }
        check_finite("query", queries)?;
        let n = n.min(self.len).min(keys.len());
        let kk = k.min(n);
        let ws = &mut scratch.flat;
        let parts = if n >= PARALLEL_MIN {
            rayon::current_num_threads().max(1) * 2
        } else {
            1
        };
        if ws.len() < parts {
            ws.resize_with(parts, FlatPart::default);
        }
        for p in ws[..parts].iter_mut() {
            p.topks.resize_with(g, TopK::default);
            p.topks.iter_mut().for_each(|t| t.reset(kk));
        }
        if parts == 1 {
            let p = &mut ws[0];
            scan(keys, queries, 0..n, &mut p.topks, &mut p.scores);
        } else {
            let chunk = n.div_ceil(parts);
            ws[..parts].par_iter_mut().enumerate().for_each(|(i, p)| {
                let r = (i * chunk).min(n)..((i + 1) * chunk).min(n);
                scan(keys, queries, r, &mut p.topks, &mut p.scores);
            });
            let (first, rest) = ws[..parts].split_at_mut(1);
            for p in rest {
                for (dst, src) in first[0].topks.iter_mut().zip(p.topks.iter_mut()) {
                    dst.absorb(src);
                }
            }
        }
        for (t, out) in ws[0].topks.iter_mut().zip(outs.iter_mut()) {
            t.drain_into(out);
        }
        Ok(SearchStats {
            scored: n,
            k_clamped: k > n,
            bytes_read: n * d * 2,
        })
    }
}

impl MipsIndex for FlatIndex {
    fn name(&self) -> &'static str {
        "flat"
    }

    fn search(
        &self,
        keys: &dyn KeyStore,
        query: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        out: &mut Hits,
    ) -> Result<SearchStats, IndexError> {
        crate::keys::check_query_dim(keys, query)?;
        self.search_group(keys, query, k, scratch, std::slice::from_mut(out))
    }

    /// The GQA-batched scan ([`FlatIndex::search_group`]): keys read once for the group.
    fn search_group(
        &self,
        keys: &dyn KeyStore,
        queries: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        outs: &mut [Hits],
    ) -> Result<SearchStats, IndexError> {
        crate::check_group_shape(keys, queries, outs.len())?;
        FlatIndex::search_group(self, keys, queries, k, scratch, outs)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn memory_bytes(&self) -> usize {
        0
    }
}

impl MipsIndexMut for FlatIndex {
    fn insert(&mut self, keys: &dyn KeyStore) -> Result<(), IndexError> {
        self.len = keys.len();
        Ok(())
    }

    fn try_clone_box(&self) -> Option<Box<dyn MipsIndexMut>> {
        Some(Box::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyRows, KeySlice};
    use rand::{Rng, SeedableRng};

    #[test]
    fn finds_the_largest_inner_products() {
        let rows: Vec<f32> = (0..100).flat_map(|i| [i as f32, -(i as f32)]).collect();
        let keys = KeySlice::new(KeyRows::F32(&rows), 2).unwrap();
        let idx = FlatIndex::new(100);
        let mut scratch = SearchScratch::new();
        let mut hits = Hits::default();
        let st = idx
            .search(&keys, &[1.0, 0.0], 3, &mut scratch, &mut hits)
            .unwrap();
        assert_eq!(hits.ids, vec![99, 98, 97]);
        assert_eq!(st.scored, 100);
        assert!(!st.k_clamped);
        let st = idx
            .search(&keys, &[1.0, 0.0], 500, &mut scratch, &mut hits)
            .unwrap();
        assert!(st.k_clamped);
        assert_eq!(hits.len(), 100);
    }

    /// The parallel path and the group path give exactly the single-query answer.
    #[test]
    fn parallel_and_group_agree_with_single() {
        let (n, d, g) = (PARALLEL_MIN + 777, 16, 3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let rows: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let keys = KeySlice::new(KeyRows::F32(&rows), d).unwrap();
        let qs: Vec<f32> = (0..g * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let idx = FlatIndex::new(n);
        let mut scratch = SearchScratch::new();
        let mut outs = vec![Hits::default(); g];
        idx.search_group(&keys, &qs, 10, &mut scratch, &mut outs)
            .unwrap();
        for (j, q) in qs.chunks(d).enumerate() {
            let mut all: Vec<(f32, u32)> = (0..n)
                .map(|i| {
                    (
                        crate::simd::scalar::dot_f32(q, &rows[i * d..][..d]),
                        i as u32,
                    )
                })
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0));
            let want: Vec<u32> = all[..10].iter().map(|x| x.1).collect();
            assert_eq!(outs[j].ids, want);
        }
    }

    #[test]
    fn bad_queries_are_errors_and_empty_is_empty() {
        let rows = vec![1.0f32; 8];
        let keys = KeySlice::new(KeyRows::F32(&rows), 4).unwrap();
        let idx = FlatIndex::new(2);
        let mut s = SearchScratch::new();
        let mut h = Hits::default();
        assert!(matches!(
            idx.search(&keys, &[1.0; 3], 1, &mut s, &mut h),
            Err(IndexError::DimMismatch { .. })
        ));
        let nan = [1.0, f32::NAN, 0.0, 0.0];
        assert!(matches!(
            idx.search(&keys, &nan, 1, &mut s, &mut h),
            Err(IndexError::NonFinite { .. })
        ));
        FlatIndex::new(0)
            .search(&keys, &[1.0; 4], 5, &mut s, &mut h)
            .unwrap();
        assert!(h.is_empty());
    }
}

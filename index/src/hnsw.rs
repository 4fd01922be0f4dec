//! The HNSW baseline: an adapter over hnsw_rs with the standard MIPS → L2 reduction
//! (Bachrach et al. 2014): each key gets an extra coordinate sqrt(R² − ‖k‖²), where R is the
//! largest key norm at build time, and each query gets 0. Then ‖q − k'‖² = ‖q‖² + R² − 2⟨q,k⟩,
//! so the L2 nearest neighbours are the largest inner products.
//!
//! hnsw_rs keeps its own copy of the (augmented) vectors and allocates its result vector per
//! search; both are the library's, and are why it is the baseline rather than the product.
//! Keys inserted later with a norm above R get a 0 extra coordinate (the reduction is then
//! approximate for them); a rebuild restores it.

use crate::error::check_finite;
use crate::{
    Hits, HnswParams, IndexError, KeyStore, MipsIndex, MipsIndexMut, SearchScratch, SearchStats,
};
use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;
use std::cell::Cell;

thread_local! {
    /// Distance evaluations on this thread: how `scored` is measured for hnsw_rs searches.
    static EVALS: Cell<usize> = const { Cell::new(0) };
}

/// Squared L2 distance that counts its evaluations.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountingL2;

impl Distance<f32> for CountingL2 {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        EVALS.with(|c| c.set(c.get() + 1));
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
    }
}

/// hnsw_rs over keys augmented for MIPS.
pub struct HnswIndex {
    inner: Hnsw<'static, f32, CountingL2>,
    params: HnswParams,
    dim: usize,
    max_norm2: f32,
    len: usize,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("params", &self.params)
            .field("len", &self.len)
            .finish()
    }
}

impl HnswIndex {
    /// Builds over all keys of `keys` (inserted in parallel by hnsw_rs).
    pub fn build(keys: &dyn KeyStore, params: &HnswParams) -> Result<Self, IndexError> {
        if params.m == 0 || params.m > 256 {
            return Err(IndexError::InvalidArgument(format!(
                "hnsw M must be in 1..=256, got {}",
                params.m
            )));
        }
        let (n, d) = (keys.len(), keys.dim());
        let mut rows = vec![0.0f32; n * (d + 1)];
        let mut max_norm2 = 0.0f32;
        for (i, r) in rows.chunks_exact_mut(d + 1).enumerate() {
            keys.row_f32(i as u32, &mut r[..d]);
            check_finite("key", &r[..d])?;
            max_norm2 = max_norm2.max(r[..d].iter().map(|x| x * x).sum());
        }
        for r in rows.chunks_exact_mut(d + 1) {
            let n2: f32 = r[..d].iter().map(|x| x * x).sum();
            r[d] = (max_norm2 - n2).max(0.0).sqrt();
        }
        let layers = 16;
        let inner = Hnsw::new(
            params.m,
            n.max(1),
            layers,
            params.ef_construction,
            CountingL2,
        );
        let data: Vec<(&[f32], usize)> = rows.chunks_exact(d + 1).zip(0..).collect();
        inner.parallel_insert_slice(&data);
        Ok(Self {
            inner,
            params: params.clone(),
            dim: d,
            max_norm2,
            len: n,
        })
    }

    /// Changes ef_search for later searches (the effort knob of `bench recall --sweep`).
    pub fn set_ef_search(&mut self, ef: usize) {
        self.params.ef_search = ef.max(1);
    }
}

impl MipsIndex for HnswIndex {
    fn name(&self) -> &'static str {
        "hnsw"
    }

    fn search(
        &self,
        keys: &dyn KeyStore,
        query: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        out: &mut Hits,
    ) -> Result<SearchStats, IndexError> {
        if query.len() != self.dim || keys.dim() != self.dim {
            return Err(IndexError::DimMismatch {
                expected: self.dim,
                got: query.len(),
            });
        }
        check_finite("query", query)?;
        out.clear();
        let n = self.len.min(keys.len());
        if n == 0 || k == 0 {
            return Ok(SearchStats {
                scored: 0,
                k_clamped: k > n,
                bytes_read: 0,
            });
        }
        let q = &mut scratch.scores;
        q.clear();
        q.extend_from_slice(query);
        q.push(0.0);
        let before = EVALS.with(|c| c.get());
        let found = self.inner.search(q, k.min(n), self.params.ef_search.max(k));
        let scored = EVALS.with(|c| c.get()) - before;
        // Report exact inner products (the L2 distances only rank them).
        out.ids.extend(found.iter().map(|nb| nb.d_id as u32));
        out.scores.resize(out.ids.len(), 0.0);
        keys.score_ids(query, &out.ids, &mut out.scores);
        // hnsw_rs ranks on its own f32 copy of the keys; the exact scores from the store can
        // reorder near-ties, and the trait promises best first, so re-rank through the
        // scratch's top-k (no allocation once warm).
        scratch.topk.reset(out.ids.len());
        for (&id, &sc) in out.ids.iter().zip(&out.scores) {
            scratch.topk.push(id, sc);
        }
        scratch.topk.drain_into(out);
        Ok(SearchStats {
            scored,
            k_clamped: k > n,
            bytes_read: scored * keys.dim() * 2,
        })
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Estimate: hnsw_rs's copy of the augmented vectors plus about 2M links of 16 bytes per
    /// node on layer 0 (hnsw_rs does not report its own size).
    fn memory_bytes(&self) -> usize {
        self.len * ((self.dim + 1) * 4 + 2 * self.params.m * 16)
    }
}

impl MipsIndexMut for HnswIndex {
    fn insert(&mut self, keys: &dyn KeyStore) -> Result<(), IndexError> {
        let d = self.dim;
        let mut r = vec![0.0f32; d + 1];
        for i in self.len..keys.len() {
            keys.row_f32(i as u32, &mut r[..d]);
            check_finite("key", &r[..d])?;
            let n2: f32 = r[..d].iter().map(|x| x * x).sum();
            r[d] = (self.max_norm2 - n2).max(0.0).sqrt();
            self.inner.insert_slice((&r, i));
        }
        self.len = keys.len();
        Ok(())
    }
}

//! Attention over a selected subset of the context: the compute kvdex does for the decode path.
//!
//! # Layout
//! - [`partial`]: softmax attention of one query head over selected key ids, returning the
//!   output (f32, normalised over the selection) and its log-sum-exp, plus the GQA layer-level
//!   driver. The `(out, lse)` pair is what the exact LSE merge (`kvdex::client::merge`) combines
//!   with the engine's own part over the static tokens (sinks + recent window).
//! - [`budget`]: the adaptive budget, the smallest k covering a fraction p of the estimated
//!   attention mass, and the sampled tail-mass estimator it relies on.
//! - [`slim`]: Slim mode (arXiv 2503.05840), values recomputed from keys as `v = k · W_KV`.
//! - [`accum`]: the value-accumulation kernel (`acc += w * row`), scalar and AVX2.
//!
//! Values are read through [`ValueStore`], which hands out whole rows in their stored dtype so
//! that the accumulation kernel can widen them in registers; keys are scored through the
//! [`crate::KeyStore`] seam, so the index crate's scoring kernels are reused.

pub mod accum;
pub mod budget;
pub mod partial;
pub mod slim;

pub use budget::{choose_k, estimate_tail_lse, systematic_sample, BudgetChoice, BudgetParams};
pub use partial::{
    attend_head, attend_head_dense_values, attend_layer, AttendScratch, LayerShape, Selection,
};
pub use slim::{reconstruct_values, reconstruct_values_from, HeadKeys, RopeSpec, SlimScratch, WKv};

use crate::keys::{KeyRows, KeySlice};
use crate::KeyStore;

/// Read access to value rows, stored elsewhere, in their stored dtype.
///
/// Values have the same layout as keys (rows of `head_dim` in f16, bf16 or f32), so a
/// [`KeySlice`] over V rows is a `ValueStore`. Unlike [`KeyStore::row_f32`], rows are borrowed,
/// not copied: the accumulation kernel widens them on the fly.
pub trait ValueStore: Sync {
    /// Number of value rows.
    fn len(&self) -> usize;
    /// True when the store holds no row.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements per row.
    fn dim(&self) -> usize;
    /// Row `id`. Callers keep `id < len()`; an out-of-range id yields an empty row (never a
    /// panic), which the kernels treat as zeros.
    fn row(&self, id: u32) -> KeyRows<'_>;
}

impl ValueStore for KeySlice<'_> {
    fn len(&self) -> usize {
        KeyStore::len(self)
    }
    fn dim(&self) -> usize {
        KeyStore::dim(self)
    }
    fn row(&self, id: u32) -> KeyRows<'_> {
        let d = KeyStore::dim(self);
        let r = id as usize * d..(id as usize + 1) * d;
        match self.rows() {
            KeyRows::F32(s) => KeyRows::F32(s.get(r).unwrap_or(&[])),
            KeyRows::F16(s) => KeyRows::F16(s.get(r).unwrap_or(&[])),
            KeyRows::Bf16(s) => KeyRows::Bf16(s.get(r).unwrap_or(&[])),
            KeyRows::I8(q) => KeyRows::I8(q.rows(d, id as usize..id as usize + 1)),
        }
    }
}

/// The default softmax scale, `1 / sqrt(head_dim)` (scaled dot-product attention).
pub fn default_scale(head_dim: usize) -> f32 {
    1.0 / (head_dim.max(1) as f32).sqrt()
}

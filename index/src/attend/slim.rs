//! Slim mode (arXiv 2503.05840): store K only and recompute V for the selected tokens.
//!
//! # Shape contract
//! For MHA models without biases, `K = X·W_K` and `V = X·W_V` with `W_K` square
//! (`d_model = kv_heads · head_dim`) and, in practice, invertible; so `V = K·W_KV` with
//! `W_KV = W_K⁻¹·W_V`. Because `W_K⁻¹` mixes heads, V of one head depends on K of *all* heads:
//! - [`WKv`] holds one layer's `W_KV` as a row-major `D × D` f32 matrix, `D = kv_heads ·
//!   head_dim`, and a token's full value row is `v[j] = Σ_i k[i] · W_KV[i][j]`, where `k` is the
//!   token's K row concatenated across heads in head order (head `g` at `g·head_dim..`).
//! - V of KV head `g` uses columns `g·head_dim..(g+1)·head_dim`; [`reconstruct_values`] computes
//!   only those.
//!
//! # RoPE
//! The identity holds for *pre-RoPE* keys only: RoPE rotates each token's key by a
//! position-dependent angle. kvdex stores post-RoPE keys (retrieval scores them against
//! post-RoPE queries), so reconstruction first undoes RoPE when given a [`RopeSpec`]: the
//! inverse rotation at position = token id (ids are absolute positions in the session). Without a
//! `RopeSpec` the stored keys are taken to be pre-RoPE.
//!
//! GQA models (`q_heads != kv_heads`) do not have a square `W_K`; the daemon rejects Slim mode
//! for them before reaching this module.

use crate::{IndexError, KeyStore};

use super::accum::{add_scaled_at, Level};
use crate::keys::KeyRows;

/// One layer's `W_KV` (see the module docs for the shape contract).
#[derive(Clone, Debug, PartialEq)]
pub struct WKv {
    kv_heads: usize,
    head_dim: usize,
    /// Row-major `D × D`, `D = kv_heads · head_dim`.
    w: Vec<f32>,
}

impl WKv {
    /// Wraps a row-major `D × D` matrix. Errors when the size does not match the head counts or a
    /// value is not finite.
    pub fn new(w: Vec<f32>, kv_heads: usize, head_dim: usize) -> Result<Self, IndexError> {
        let d = kv_heads * head_dim;
        if d == 0 || w.len() != d * d {
            return Err(IndexError::BadShape(format!(
                "W_KV holds {} values; kv_heads {kv_heads} x head_dim {head_dim} needs {d}x{d}",
                w.len()
            )));
        }
        crate::error::check_finite("W_KV", &w)?;
        Ok(Self {
            kv_heads,
            head_dim,
            w,
        })
    }

    /// `(kv_heads, head_dim)` this matrix was made for.
    pub fn heads_and_dim(&self) -> (usize, usize) {
        (self.kv_heads, self.head_dim)
    }

    /// Bytes held (what Slim mode spends per layer to save the V cache).
    pub fn memory_bytes(&self) -> usize {
        self.w.len() * 4
    }
}

/// HF "rotate_half" RoPE parameters: dimensions `j` and `j + rope_dim/2` (`j < rope_dim/2`) form
/// a pair rotated by `pos · theta^(-2j/rope_dim)`; dimensions from `rope_dim` on are not rotated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeSpec {
    /// The RoPE base (10000 in LLaMA, 100000 in SmolLM2).
    pub theta: f64,
    /// Rotated dimensions per head (even, at most head_dim).
    pub rope_dim: usize,
}

/// Caller-owned buffers for [`reconstruct_values`].
#[derive(Debug, Default)]
pub struct SlimScratch {
    k_full: Vec<f32>,
    inv_freq: Vec<f64>,
}

impl SlimScratch {
    /// An empty scratch, grown by the first call.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Rotates `row` back by RoPE at `pos` (the inverse of the forward rotate_half rotation).
fn undo_rope(row: &mut [f32], pos: u32, inv_freq: &[f64]) {
    let half = inv_freq.len();
    for (j, &f) in inv_freq.iter().enumerate() {
        let (sin, cos) = (pos as f64 * f).sin_cos();
        let (y1, y2) = (row[j] as f64, row[j + half] as f64);
        row[j] = (y1 * cos + y2 * sin) as f32;
        row[j + half] = (y2 * cos - y1 * sin) as f32;
    }
}

/// The keys of every KV head of one layer, as Slim mode reads them: a token's value row
/// depends on its key rows across all heads. A session implements this over its own storage
/// (no per-request list of stores to build); a slice of key stores implements it too.
pub trait HeadKeys: Sync {
    /// KV heads.
    fn heads(&self) -> usize;
    /// Elements per head row.
    fn dim(&self) -> usize;
    /// Tokens stored (least over the heads).
    fn rows(&self) -> usize;
    /// Writes key row `id` of KV head `head` as f32 into `out` (`dim()` values). Callers keep
    /// `head < heads()` and `id < rows()`.
    fn row_f32(&self, head: usize, id: u32, out: &mut [f32]);
}

/// One key store per KV head, as [`HeadKeys`].
struct Stores<'a, 'b>(&'a [&'b dyn KeyStore]);

impl HeadKeys for Stores<'_, '_> {
    fn heads(&self) -> usize {
        self.0.len()
    }
    fn dim(&self) -> usize {
        self.0.first().map_or(0, |k| k.dim())
    }
    fn rows(&self) -> usize {
        self.0.iter().map(|k| k.len()).min().unwrap_or(0)
    }
    fn row_f32(&self, head: usize, id: u32, out: &mut [f32]) {
        self.0[head].row_f32(id, out);
    }
}

/// Recomputes V of KV head `head` for the tokens `ids`: `out` receives `ids.len()` rows of
/// `head_dim` f32 (selection order), ready for
/// [`attend_head_dense_values`](super::partial::attend_head_dense_values).
///
/// `keys[g]` is KV head `g`'s key store. Cost: `ids.len() · D · head_dim` multiply-adds.
pub fn reconstruct_values(
    keys: &[&dyn KeyStore],
    w_kv: &WKv,
    rope: Option<&RopeSpec>,
    ids: &[u32],
    head: usize,
    scratch: &mut SlimScratch,
    out: &mut [f32],
) -> Result<(), IndexError> {
    if let Some(bad) = keys.iter().find(|k| k.dim() != w_kv.head_dim) {
        return Err(IndexError::DimMismatch {
            expected: w_kv.head_dim,
            got: bad.dim(),
        });
    }
    reconstruct_values_from(&Stores(keys), w_kv, rope, ids, head, scratch, out)
}

/// [`reconstruct_values`] over any [`HeadKeys`].
pub fn reconstruct_values_from(
    keys: &dyn HeadKeys,
    w_kv: &WKv,
    rope: Option<&RopeSpec>,
    ids: &[u32],
    head: usize,
    scratch: &mut SlimScratch,
    out: &mut [f32],
) -> Result<(), IndexError> {
    let (hk, hd) = (w_kv.kv_heads, w_kv.head_dim);
    let d = hk * hd;
    if keys.heads() != hk || head >= hk {
        return Err(IndexError::BadShape(format!(
            "{} key stores and head {head} for a W_KV of {hk} KV heads",
            keys.heads()
        )));
    }
    if keys.dim() != hd {
        return Err(IndexError::DimMismatch {
            expected: hd,
            got: keys.dim(),
        });
    }
    if out.len() != ids.len() * hd {
        return Err(IndexError::BadShape(format!(
            "out holds {} values, {} rows of {hd} need {}",
            out.len(),
            ids.len(),
            ids.len() * hd
        )));
    }
    let rows = keys.rows();
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
        return Err(IndexError::InvalidArgument(format!(
            "token id {bad} is outside the {rows} stored keys"
        )));
    }
    scratch.inv_freq.clear();
    if let Some(r) = rope {
        if r.rope_dim % 2 != 0 || r.rope_dim > hd || r.theta.is_nan() || r.theta <= 0.0 {
            return Err(IndexError::InvalidArgument(format!(
                "RoPE rope_dim {} (must be even and <= {hd}) / theta {}",
                r.rope_dim, r.theta
            )));
        }
        let n = r.rope_dim / 2;
        scratch
            .inv_freq
            .extend((0..n).map(|j| r.theta.powf(-2.0 * j as f64 / r.rope_dim as f64)));
    }
    scratch.k_full.resize(d, 0.0);
    let level = Level::detect();
    let cols = head * hd..(head + 1) * hd;
    for (&id, v) in ids.iter().zip(out.chunks_exact_mut(hd)) {
        for g in 0..hk {
            let part = &mut scratch.k_full[g * hd..(g + 1) * hd];
            keys.row_f32(g, id, part);
            if !scratch.inv_freq.is_empty() {
                undo_rope(part, id, &scratch.inv_freq);
            }
        }
        v.fill(0.0);
        for (i, &ki) in scratch.k_full.iter().enumerate() {
            let w_row = &w_kv.w[i * d + cols.start..i * d + cols.end];
            add_scaled_at(level, v, ki, KeyRows::F32(w_row));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attend::partial::{attend_head_dense_values, tests::reference, AttendScratch};
    use crate::keys::KeySlice;
    use rand::{Rng, SeedableRng};

    /// Forward rotate_half RoPE, the engine's side.
    fn apply_rope(row: &mut [f32], pos: u32, r: &RopeSpec) {
        let half = r.rope_dim / 2;
        for j in 0..half {
            let f = r.theta.powf(-2.0 * j as f64 / r.rope_dim as f64);
            let (sin, cos) = (pos as f64 * f).sin_cos();
            let (x1, x2) = (row[j] as f64, row[j + half] as f64);
            row[j] = (x1 * cos - x2 * sin) as f32;
            row[j + half] = (x2 * cos + x1 * sin) as f32;
        }
    }

    #[test]
    fn reconstructs_v_from_pre_and_post_rope_keys() {
        let (hk, hd, n) = (3, 16, 200);
        let d = hk * hd;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let w: Vec<f32> = (0..d * d).map(|_| rng.gen_range(-0.3..0.3)).collect();
        // Pre-RoPE keys per head [hk][n][hd], and their f64 reference values for head 1.
        let pre: Vec<Vec<f32>> = (0..hk)
            .map(|_| (0..n * hd).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let head = 1;
        let v_ref = |t: usize, j: usize| -> f64 {
            (0..d)
                .map(|i| pre[i / hd][t * hd + i % hd] as f64 * w[i * d + head * hd + j] as f64)
                .sum()
        };
        let rope = RopeSpec {
            theta: 100000.0,
            rope_dim: hd,
        };
        let mut post = pre.clone();
        for p in post.iter_mut() {
            for t in 0..n {
                apply_rope(&mut p[t * hd..(t + 1) * hd], t as u32, &rope);
            }
        }
        let wkv = WKv::new(w.clone(), hk, hd).unwrap();
        let ids: Vec<u32> = vec![0, 5, 77, 199, 3];
        let mut scratch = SlimScratch::new();
        for (stored, spec) in [(&pre, None), (&post, Some(&rope))] {
            let slices: Vec<KeySlice> = stored
                .iter()
                .map(|p| KeySlice::new(KeyRows::F32(p), hd).unwrap())
                .collect();
            let keys: Vec<&dyn KeyStore> = slices.iter().map(|s| s as &dyn KeyStore).collect();
            let mut out = vec![0.0; ids.len() * hd];
            reconstruct_values(&keys, &wkv, spec, &ids, head, &mut scratch, &mut out).unwrap();
            for (r, &t) in ids.iter().enumerate() {
                for j in 0..hd {
                    let want = v_ref(t as usize, j);
                    assert!((out[r * hd + j] as f64 - want).abs() < 1e-4, "t={t} j={j}");
                }
            }
        }
    }

    #[test]
    fn attention_over_reconstructed_values_matches_stored_values() {
        let (hk, hd, n) = (2, 8, 64);
        let d = hk * hd;
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let w: Vec<f32> = (0..d * d).map(|_| rng.gen_range(-0.5..0.5)).collect();
        let k: Vec<Vec<f32>> = (0..hk)
            .map(|_| (0..n * hd).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        // Stored V of head 0 computed directly.
        let v0: Vec<f32> = (0..n * hd)
            .map(|x| {
                (0..d)
                    .map(|i| k[i / hd][(x / hd) * hd + i % hd] * w[i * d + x % hd])
                    .sum()
            })
            .collect();
        let slices: Vec<KeySlice> = k
            .iter()
            .map(|p| KeySlice::new(KeyRows::F32(p), hd).unwrap())
            .collect();
        let keys: Vec<&dyn KeyStore> = slices.iter().map(|s| s as &dyn KeyStore).collect();
        let ids: Vec<u32> = (0..n as u32).step_by(3).collect();
        let mut dense = vec![0.0; ids.len() * hd];
        let wkv = WKv::new(w, hk, hd).unwrap();
        reconstruct_values(
            &keys,
            &wkv,
            None,
            &ids,
            0,
            &mut SlimScratch::new(),
            &mut dense,
        )
        .unwrap();
        let q: Vec<f32> = (0..hd).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let mut out = vec![0.0; hd];
        let lse = attend_head_dense_values(
            keys[0],
            KeyRows::F32(&dense),
            &q,
            &ids,
            0.5,
            &mut AttendScratch::new(),
            &mut out,
        )
        .unwrap();
        let (want, want_lse) = reference(&k[0], &v0, hd, &q, &ids, 0.5);
        assert!((lse as f64 - want_lse).abs() < 1e-4);
        for (o, w) in out.iter().zip(&want) {
            assert!((*o as f64 - w).abs() < 1e-4, "{o} vs {w}");
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(WKv::new(vec![0.0; 10], 2, 2).is_err());
        assert!(WKv::new(vec![f32::NAN; 16], 2, 2).is_err());
        let wkv = WKv::new(vec![0.0; 16], 2, 2).unwrap();
        let k = [0.0f32; 8];
        let s = KeySlice::new(KeyRows::F32(&k), 2).unwrap();
        let keys: [&dyn KeyStore; 2] = [&s, &s];
        let mut sc = SlimScratch::new();
        let mut out = [0.0; 2];
        assert!(reconstruct_values(&keys, &wkv, None, &[4], 0, &mut sc, &mut out).is_err());
        assert!(reconstruct_values(&keys, &wkv, None, &[0], 2, &mut sc, &mut out).is_err());
        assert!(reconstruct_values(&keys[..1], &wkv, None, &[0], 0, &mut sc, &mut out).is_err());
        assert!(reconstruct_values(&keys, &wkv, None, &[0, 1], 0, &mut sc, &mut out).is_err());
        let bad = RopeSpec {
            theta: 1e4,
            rope_dim: 3,
        };
        assert!(reconstruct_values(&keys, &wkv, Some(&bad), &[0], 0, &mut sc, &mut out).is_err());
        reconstruct_values(&keys, &wkv, None, &[0], 1, &mut sc, &mut out).unwrap();
    }
}

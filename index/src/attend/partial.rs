//! Partial attention: softmax attention of a query head over a selected set of key ids.
//!
//! For selected ids `i`, with logits `s_i = scale · <q, k_i>`:
//! - `out = Σ_i softmax(s)_i · v_i` (f32, normalised over the selection only), and
//! - `lse = log Σ_i exp(s_i)`, computed as `m + log Σ_i exp(s_i - m)` with `m = max_i s_i`, so no
//!   exponential overflows.
//!
//! An empty selection gives `out = 0` and `lse = -inf`: a part of weight `exp(-inf) = 0`, which
//! the LSE merge then ignores, so "nothing retrieved" merges correctly.

use crate::error::check_finite;
use crate::keys::KeyRows;
use crate::{IndexError, KeyStore};

use super::accum::{add_scaled_at, Level};
use super::{default_scale, ValueStore};

/// Caller-owned buffers for [`attend_head`] / [`attend_layer`]: one per worker thread. They grow
/// to the largest selection seen and are then reused, so steady-state calls do not allocate.
#[derive(Debug, Default)]
pub struct AttendScratch {
    logits: Vec<f32>,
}

impl AttendScratch {
    /// An empty scratch; buffers are sized by the first call.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first `n` logits, grown (once) when too short.
    pub(crate) fn logits_for(&mut self, n: usize) -> &mut [f32] {
        if self.logits.len() < n {
            self.logits.resize(n, 0.0);
        }
        &mut self.logits[..n]
    }
}

/// Attention of one query head over the key/value rows `ids`.
///
/// Writes the normalised output into `out` (`values.dim()` long) and returns the log-sum-exp of
/// the scaled logits (`-inf` for an empty selection, with `out` zeroed).
///
/// Errors: a query of the wrong length or with NaN/Inf, an `out` of the wrong length, a
/// non-finite `scale`, an id outside either store, or a non-finite logit (a corrupt key).
pub fn attend_head(
    keys: &dyn KeyStore,
    values: &dyn ValueStore,
    query: &[f32],
    ids: &[u32],
    scale: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) -> Result<f32, IndexError> {
    let rows = keys.len().min(values.len());
    check_head_inputs(keys, query, ids, scale, rows, values.dim(), out.len())?;
    softmax_accumulate(keys, query, ids, scale, scratch, out, |_, id| {
        values.row(id)
    })
}

/// [`attend_head`] with value rows given in selection order (`values` holds `ids.len()` rows of
/// `out.len()` elements): for values that were computed rather than stored, as in Slim mode.
pub fn attend_head_dense_values(
    keys: &dyn KeyStore,
    values: KeyRows<'_>,
    query: &[f32],
    ids: &[u32],
    scale: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) -> Result<f32, IndexError> {
    let d = out.len();
    let n = match values {
        KeyRows::F32(s) => s.len(),
        KeyRows::F16(s) => s.len(),
        KeyRows::Bf16(s) => s.len(),
        KeyRows::I8(q) => q.codes.len(),
    };
    if n != ids.len() * d {
        return Err(IndexError::BadShape(format!(
            "dense values hold {n} elements, {} rows of {d} need {}",
            ids.len(),
            ids.len() * d
        )));
    }
    check_head_inputs(keys, query, ids, scale, keys.len(), d, d)?;
    let row = |i: usize| i * d..(i + 1) * d;
    softmax_accumulate(keys, query, ids, scale, scratch, out, |i, _| match values {
        KeyRows::F32(s) => KeyRows::F32(&s[row(i)]),
        KeyRows::F16(s) => KeyRows::F16(&s[row(i)]),
        KeyRows::Bf16(s) => KeyRows::Bf16(&s[row(i)]),
        KeyRows::I8(q) => KeyRows::I8(q.rows(d, i..i + 1)),
    })
}

/// Shared argument checks of the per-head entry points.
fn check_head_inputs(
    keys: &dyn KeyStore,
    query: &[f32],
    ids: &[u32],
    scale: f32,
    rows: usize,
    value_dim: usize,
    out_len: usize,
) -> Result<(), IndexError> {
    crate::keys::check_query_dim(keys, query)?;
    if out_len != value_dim {
        return Err(IndexError::DimMismatch {
            expected: value_dim,
            got: out_len,
        });
    }
    check_finite("query", query)?;
    if !scale.is_finite() {
        return Err(IndexError::InvalidArgument(format!(
            "attention scale {scale} is not finite"
        )));
    }
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
        return Err(IndexError::InvalidArgument(format!(
            "selected id {bad} is outside the {rows} stored key/value rows"
        )));
    }
    Ok(())
}

/// The kernel after validation: score, max-subtract, exponentiate, accumulate, normalise.
/// `value_row(i, id)` gives the value row of the `i`-th selected id.
fn softmax_accumulate<'v>(
    keys: &dyn KeyStore,
    query: &[f32],
    ids: &[u32],
    scale: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
    value_row: impl Fn(usize, u32) -> KeyRows<'v>,
) -> Result<f32, IndexError> {
    out.fill(0.0);
    if ids.is_empty() {
        return Ok(f32::NEG_INFINITY);
    }
    let logits = scratch.logits_for(ids.len());
    keys.score_ids(query, ids, logits);
    let mut max = f32::NEG_INFINITY;
    for s in logits.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    if let Some(pos) = logits.iter().position(|s| !s.is_finite()) {
        return Err(IndexError::NonFinite {
            what: "attention logit (stored key)",
            pos,
        });
    }
    let level = Level::detect();
    let mut sum = 0.0f32;
    for (i, (&s, &id)) in logits.iter().zip(ids).enumerate() {
        let w = (s - max).exp();
        sum += w;
        add_scaled_at(level, out, w, value_row(i, id));
    }
    // sum >= 1: the maximal logit contributes exp(0).
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
    Ok(max + sum.ln())
}

/// A layer's head counts. Query head `h` reads KV head `h / (q_heads / kv_heads)` (GQA; MHA is
/// `q_heads == kv_heads`, MQA is `kv_heads == 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads; divides `q_heads`.
    pub kv_heads: usize,
    /// Elements per head row (keys, values and queries alike).
    pub head_dim: usize,
}

impl LayerShape {
    /// Validates the counts: all non-zero, `kv_heads` dividing `q_heads`.
    pub fn new(q_heads: usize, kv_heads: usize, head_dim: usize) -> Result<Self, IndexError> {
        if q_heads == 0 || kv_heads == 0 || head_dim == 0 || !q_heads.is_multiple_of(kv_heads) {
            return Err(IndexError::BadShape(format!(
                "q_heads {q_heads}, kv_heads {kv_heads}, head_dim {head_dim}: all must be \
                 non-zero and kv_heads must divide q_heads"
            )));
        }
        Ok(Self {
            q_heads,
            kv_heads,
            head_dim,
        })
    }

    /// The KV head that query head `h` attends to.
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / (self.q_heads / self.kv_heads)
    }
}

/// Per-query-head selections in compressed form: head `h` selected
/// `ids[bounds[h]..bounds[h + 1]]`. Flat buffers, so the caller reuses them across requests.
#[derive(Clone, Copy, Debug)]
pub struct Selection<'a> {
    /// All heads' ids, concatenated.
    pub ids: &'a [u32],
    /// `q_heads + 1` non-decreasing offsets into `ids`, starting at 0 and ending at `ids.len()`.
    pub bounds: &'a [usize],
}

impl<'a> Selection<'a> {
    /// The ids selected for query head `h`, or an error when the bounds are malformed.
    pub fn head(&self, h: usize) -> Result<&'a [u32], IndexError> {
        let (lo, hi) = match (self.bounds.get(h), self.bounds.get(h + 1)) {
            (Some(&lo), Some(&hi)) => (lo, hi),
            _ => {
                return Err(IndexError::BadShape(format!(
                    "selection bounds hold {} entries, head {h} needs {}",
                    self.bounds.len(),
                    h + 2
                )))
            }
        };
        self.ids.get(lo..hi).ok_or_else(|| {
            IndexError::BadShape(format!(
                "selection bounds {lo}..{hi} of head {h} are outside the {} ids",
                self.ids.len()
            ))
        })
    }
}

/// Partial attention for every query head of a layer.
///
/// `keys[g]` / `values[g]` are KV head `g`'s rows; `queries` is `[q_heads][head_dim]`; `out` is
/// `[q_heads][head_dim]` and `lse` is `[q_heads]`. `scale` defaults to `1/sqrt(head_dim)`.
/// Heads run one after another on this thread: a caller spreading heads over cores calls
/// [`attend_head`] per head with one [`AttendScratch`] per thread.
#[allow(clippy::too_many_arguments)]
pub fn attend_layer(
    shape: LayerShape,
    keys: &[&dyn KeyStore],
    values: &[&dyn ValueStore],
    queries: &[f32],
    selection: Selection<'_>,
    scale: Option<f32>,
    scratch: &mut AttendScratch,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), IndexError> {
    let (hq, d) = (shape.q_heads, shape.head_dim);
    let check = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(IndexError::BadShape(format!(
                "{what}: expected {want}, got {got}"
            )))
        }
    };
    check("key stores (one per KV head)", keys.len(), shape.kv_heads)?;
    check(
        "value stores (one per KV head)",
        values.len(),
        shape.kv_heads,
    )?;
    check("queries length (q_heads * head_dim)", queries.len(), hq * d)?;
    check("out length (q_heads * head_dim)", out.len(), hq * d)?;
    check("lse length (q_heads)", lse.len(), hq)?;
    check(
        "selection bounds (q_heads + 1)",
        selection.bounds.len(),
        hq + 1,
    )?;
    let scale = scale.unwrap_or_else(|| default_scale(d));
    for h in 0..hq {
        let g = shape.kv_head_of(h);
        let ids = selection.head(h)?;
        let q = &queries[h * d..(h + 1) * d];
        lse[h] = attend_head(
            keys[g],
            values[g],
            q,
            ids,
            scale,
            scratch,
            &mut out[h * d..(h + 1) * d],
        )?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::KeySlice;
    use half::f16;
    use rand::{Rng, SeedableRng};

    /// f64 reference: (out, lse) of softmax attention over `ids`.
    pub(crate) fn reference(
        k: &[f32],
        v: &[f32],
        d: usize,
        q: &[f32],
        ids: &[u32],
        scale: f64,
    ) -> (Vec<f64>, f64) {
        let logits: Vec<f64> = ids
            .iter()
            .map(|&i| {
                scale
                    * (0..d)
                        .map(|j| q[j] as f64 * k[i as usize * d + j] as f64)
                        .sum::<f64>()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut out = vec![0.0; d];
        let mut sum = 0.0;
        for (&s, &i) in logits.iter().zip(ids) {
            let w = (s - m).exp();
            sum += w;
            for j in 0..d {
                out[j] += w * v[i as usize * d + j] as f64;
            }
        }
        out.iter_mut().for_each(|o| *o /= sum);
        (out, m + sum.ln())
    }

    fn random(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-amp..amp)).collect()
    }

    #[test]
    fn matches_f64_reference_for_f32_and_f16_rows() {
        let (n, d) = (300, 64);
        let k = random(n * d, 1, 1.0);
        let v = random(n * d, 2, 1.0);
        let q = random(d, 3, 4.0);
        // Round through f16 so both stores hold the same values.
        let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
        let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let kr: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
        let vr: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
        let ids: Vec<u32> = (0..n as u32).filter(|i| i % 3 != 1).collect();
        let (want, want_lse) = reference(&kr, &vr, d, &q, &ids, 0.125);
        let mut scratch = AttendScratch::new();
        for (ks, vs) in [
            (
                KeySlice::new(KeyRows::F32(&kr), d).unwrap(),
                KeySlice::new(KeyRows::F32(&vr), d).unwrap(),
            ),
            (
                KeySlice::new(KeyRows::F16(&k16), d).unwrap(),
                KeySlice::new(KeyRows::F16(&v16), d).unwrap(),
            ),
        ] {
            let mut out = vec![0.0; d];
            let lse = attend_head(&ks, &vs, &q, &ids, 0.125, &mut scratch, &mut out).unwrap();
            assert!((lse as f64 - want_lse).abs() < 1e-4 * want_lse.abs().max(1.0));
            for (o, w) in out.iter().zip(&want) {
                assert!((*o as f64 - w).abs() < 1e-5, "{o} vs {w}");
            }
        }
    }

    #[test]
    fn empty_selection_is_zero_with_minus_infinity_lse() {
        let k = random(64, 1, 1.0);
        let ks = KeySlice::new(KeyRows::F32(&k), 8).unwrap();
        let mut out = vec![7.0; 8];
        let lse = attend_head(
            &ks,
            &ks,
            &[1.0; 8],
            &[],
            1.0,
            &mut AttendScratch::new(),
            &mut out,
        )
        .unwrap();
        assert_eq!(lse, f32::NEG_INFINITY);
        assert!(out.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let k = random(64, 1, 1.0);
        let ks = KeySlice::new(KeyRows::F32(&k), 8).unwrap();
        let mut s = AttendScratch::new();
        let mut out = vec![0.0; 8];
        assert!(attend_head(&ks, &ks, &[1.0; 7], &[0], 1.0, &mut s, &mut out).is_err());
        assert!(attend_head(&ks, &ks, &[f32::NAN; 8], &[0], 1.0, &mut s, &mut out).is_err());
        assert!(attend_head(&ks, &ks, &[1.0; 8], &[8], 1.0, &mut s, &mut out).is_err());
        assert!(attend_head(&ks, &ks, &[1.0; 8], &[0], f32::INFINITY, &mut s, &mut out).is_err());
        assert!(attend_head(&ks, &ks, &[1.0; 8], &[0], 1.0, &mut s, &mut out[..4]).is_err());
        assert!(LayerShape::new(6, 4, 8).is_err());
        let sel = Selection {
            ids: &[0, 1],
            bounds: &[0, 3],
        };
        assert!(sel.head(0).is_err());
        assert!(sel.head(1).is_err());
    }

    #[test]
    fn layer_routes_query_heads_to_their_kv_head() {
        // 4 query heads over 2 KV heads: heads 0,1 read KV 0 and heads 2,3 read KV 1.
        let d = 16;
        let (k0, k1) = (random(50 * d, 4, 1.0), random(50 * d, 5, 1.0));
        let (v0, v1) = (random(50 * d, 6, 1.0), random(50 * d, 7, 1.0));
        let stores = [&k0, &k1, &v0, &v1].map(|x| KeySlice::new(KeyRows::F32(x), d).unwrap());
        let q = random(4 * d, 8, 2.0);
        let ids: Vec<u32> = (0..40).collect();
        let bounds = [0, 10, 20, 30, 40];
        let shape = LayerShape::new(4, 2, d).unwrap();
        let (mut out, mut lse) = (vec![0.0; 4 * d], vec![0.0; 4]);
        let keys: [&dyn KeyStore; 2] = [&stores[0], &stores[1]];
        let values: [&dyn ValueStore; 2] = [&stores[2], &stores[3]];
        let sel = Selection {
            ids: &ids,
            bounds: &bounds,
        };
        attend_layer(
            shape,
            &keys,
            &values,
            &q,
            sel,
            None,
            &mut AttendScratch::new(),
            &mut out,
            &mut lse,
        )
        .unwrap();
        for h in 0..4 {
            let (k, v) = if h < 2 { (&k0, &v0) } else { (&k1, &v1) };
            let (want, want_lse) = reference(
                k,
                v,
                d,
                &q[h * d..(h + 1) * d],
                &ids[h * 10..h * 10 + 10],
                0.25,
            );
            assert!((lse[h] as f64 - want_lse).abs() < 1e-4);
            for j in 0..d {
                assert!((out[h * d + j] as f64 - want[j]).abs() < 1e-5);
            }
        }
    }
}

//! The exact merge of two attention parts by their log-sum-exps (Star Attention, arXiv
//! 2411.17116, and flash-decoding's split-KV reduction).
//!
//! kvdex returns, per query head, attention over the retrieved tokens as `(out_b, lse_b)`; the
//! engine computes its own part over the static tokens (sinks + recent window) as
//! `(out_a, lse_a)`. Each `out` is softmax-normalised over its own part and each
//! `lse = log Σ exp(s_i)` over its own logits. Because the parts are disjoint, attention over
//! their union is, exactly:
//!
//! ```text
//! m   = max(lse_a, lse_b)
//! lse = m + log(exp(lse_a - m) + exp(lse_b - m))
//! out = exp(lse_a - lse) · out_a + exp(lse_b - lse) · out_b
//! ```
//!
//! The max subtraction keeps every exponential in [0, 1]. A part with `lse = -inf` (an empty
//! selection) gets weight 0, and two empty parts merge into `out = 0, lse = -inf`; so the merge
//! is associative and any number of parts can be folded in one at a time.

use kvdex_wire::{Error, Result};

/// Merges one head: writes the union's output into `out` and returns its log-sum-exp.
///
/// All three slices have the head dimension; the caller checks lengths (see [`merge`]).
pub fn merge_head(out_a: &[f32], lse_a: f32, out_b: &[f32], lse_b: f32, out: &mut [f32]) -> f32 {
    let m = lse_a.max(lse_b);
    if m == f32::NEG_INFINITY {
        out.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let lse = m + ((lse_a - m).exp() + (lse_b - m).exp()).ln();
    let (wa, wb) = ((lse_a - lse).exp(), (lse_b - lse).exp());
    for ((o, &a), &b) in out.iter_mut().zip(out_a).zip(out_b) {
        *o = wa * a + wb * b;
    }
    lse
}

/// Merges two parts for every head of a layer into caller-owned `out` / `lse`.
///
/// `out_*` are `[heads][head_dim]` and `lse_*` are `[heads]`; `head_dim = out.len() / lse.len()`.
/// Errors on mismatched lengths or a NaN / `+inf` log-sum-exp (a `-inf` part is empty, not an
/// error).
pub fn merge(
    out_a: &[f32],
    lse_a: &[f32],
    out_b: &[f32],
    lse_b: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let heads = lse.len();
    let lens = [lse_a.len(), lse_b.len()];
    let outs = [out_a.len(), out_b.len(), out.len()];
    if heads == 0
        || lens.iter().any(|&l| l != heads)
        || outs.iter().any(|&l| l != out.len())
        || !out.len().is_multiple_of(heads)
    {
        return Err(Error::BadRequest(format!(
            "merge shapes: lse {heads}, lse_a {}, lse_b {}, out {}, out_a {}, out_b {}: all lse \
             must have one value per head and all out the same whole number of rows",
            lens[0], lens[1], outs[2], outs[0], outs[1]
        )));
    }
    check_lse("lse_a", lse_a)?;
    check_lse("lse_b", lse_b)?;
    let d = out.len() / heads;
    for h in 0..heads {
        let r = h * d..(h + 1) * d;
        lse[h] = merge_head(
            &out_a[r.clone()],
            lse_a[h],
            &out_b[r.clone()],
            lse_b[h],
            &mut out[r],
        );
    }
    Ok(())
}

/// Folds part b into part a in place (`out_a`, `lse_a` become the union), per head.
pub fn merge_into(
    out_a: &mut [f32],
    lse_a: &mut [f32],
    out_b: &[f32],
    lse_b: &[f32],
) -> Result<()> {
    let heads = lse_a.len();
    if heads == 0
        || lse_b.len() != heads
        || out_b.len() != out_a.len()
        || !out_a.len().is_multiple_of(heads)
    {
        return Err(Error::BadRequest(format!(
            "merge shapes: lse_a {heads}, lse_b {}, out_a {}, out_b {}",
            lse_b.len(),
            out_a.len(),
            out_b.len()
        )));
    }
    check_lse("lse_a", lse_a)?;
    check_lse("lse_b", lse_b)?;
    let d = out_a.len() / heads;
    for h in 0..heads {
        let (la, lb) = (lse_a[h], lse_b[h]);
        let m = la.max(lb);
        let row = &mut out_a[h * d..(h + 1) * d];
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let l = m + ((la - m).exp() + (lb - m).exp()).ln();
        let (wa, wb) = ((la - l).exp(), (lb - l).exp());
        for (a, &b) in row.iter_mut().zip(&out_b[h * d..(h + 1) * d]) {
            *a = wa * *a + wb * b;
        }
        lse_a[h] = l;
    }
    Ok(())
}

fn check_lse(what: &str, lse: &[f32]) -> Result<()> {
    match lse.iter().position(|&x| x.is_nan() || x == f32::INFINITY) {
        Some(h) => Err(Error::BadRequest(format!(
            "{what}[{h}] = {} is not a log-sum-exp",
            lse[h]
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use kvdex_index::attend::{
        attend_head, attend_layer, AttendScratch, LayerShape, Selection, ValueStore,
    };
    use kvdex_index::keys::{KeyRows, KeySlice};
    use kvdex_index::KeyStore;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    /// f64 reference: attention of `q` over all `n` rows.
    fn full_attention(k: &[f32], v: &[f32], d: usize, q: &[f32], scale: f64) -> Vec<f64> {
        let n = k.len() / d;
        let s: Vec<f64> = (0..n)
            .map(|i| {
                scale
                    * (0..d)
                        .map(|j| q[j] as f64 * k[i * d + j] as f64)
                        .sum::<f64>()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = w.iter().sum();
        (0..d)
            .map(|j| (0..n).map(|i| w[i] * v[i * d + j] as f64).sum::<f64>() / z)
            .collect()
    }

    /// max |got - want| / max |want|: relative error of the whole output vector.
    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let diff = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        diff / want.iter().map(|w| w.abs()).fold(1e-30, f64::max)
    }

    /// Rows rounded through f16, returned as (f16 storage, the f32 values it holds).
    fn f16_rows(rng: &mut impl Rng, n: usize, amp: f32) -> (Vec<f16>, Vec<f32>) {
        let h: Vec<f16> = (0..n)
            .map(|_| f16::from_f32(rng.gen_range(-amp..amp)))
            .collect();
        let f = h.iter().map(|x| x.to_f32()).collect();
        (h, f)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Splitting a key set in two, attending to each part and merging equals full attention.
        #[test]
        fn split_attend_merge_equals_full(
            n in 1usize..300, d in prop::sample::select(vec![8usize, 64]), seed in any::<u64>(), amp in 0.1f32..3.0,
        ) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let k: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-amp..amp) * (d as f32).sqrt()).collect();
            let ks = KeySlice::new(KeyRows::F32(&k), d).unwrap();
            let vs = KeySlice::new(KeyRows::F32(&v), d).unwrap();
            let (a, b): (Vec<u32>, Vec<u32>) = (0..n as u32).partition(|_| rng.gen_bool(0.5));
            let scale = 1.0 / (d as f32).sqrt();
            let mut s = AttendScratch::new();
            let (mut out_a, mut out_b, mut out) = (vec![0.0; d], vec![0.0; d], vec![0.0; d]);
            let lse_a = attend_head(&ks, &vs, &q, &a, scale, &mut s, &mut out_a).unwrap();
            let lse_b = attend_head(&ks, &vs, &q, &b, scale, &mut s, &mut out_b).unwrap();
            let mut lse = [0.0];
            merge(&out_a, &[lse_a], &out_b, &[lse_b], &mut out, &mut lse).unwrap();
            let want = full_attention(&k, &v, d, &q, scale as f64);
            prop_assert!(rel_err(&out, &want) < 1e-5, "rel err {}", rel_err(&out, &want));
            // merge_into agrees with merge.
            let mut lse_into = [lse_a];
            merge_into(&mut out_a, &mut lse_into, &out_b, &[lse_b]).unwrap();
            prop_assert_eq!(lse_into[0], lse[0]);
            prop_assert!(out_a.iter().zip(&out).all(|(x, y)| (x - y).abs() <= 1e-7 * (1.0 + y.abs())));
        }
    }

    /// Retrieval returns every non-static token; the engine attends to the sinks and the window;
    /// the merge reproduces full attention (GQA layer, f16 storage, RetrievalAttention's S and W).
    #[test]
    fn sinks_window_plus_all_retrieved_equals_full_attention() {
        let (n, sinks, window, d) = (2048usize, 128usize, 512usize, 64usize);
        let shape = LayerShape::new(4, 2, d).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let kv: Vec<_> = (0..4).map(|_| f16_rows(&mut rng, n * d, 1.0)).collect();
        let stores: Vec<KeySlice> = kv
            .iter()
            .map(|(h, _)| KeySlice::new(KeyRows::F16(h), d).unwrap())
            .collect();
        let keys: Vec<&dyn KeyStore> = vec![&stores[0], &stores[1]];
        let values: Vec<&dyn ValueStore> = vec![&stores[2], &stores[3]];
        let q: Vec<f32> = (0..4 * d).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let statics: Vec<u32> = (0..sinks as u32)
            .chain((n - window) as u32..n as u32)
            .collect();
        let retrieved: Vec<u32> = (sinks as u32..(n - window) as u32).collect();
        let (mut ids_a, mut ids_b, mut bounds_a, mut bounds_b) = (vec![], vec![], vec![0], vec![0]);
        for _ in 0..4 {
            ids_a.extend(&statics);
            bounds_a.push(ids_a.len());
            ids_b.extend(&retrieved);
            bounds_b.push(ids_b.len());
        }
        let mut s = AttendScratch::new();
        let (mut out_a, mut lse_a, mut out_b, mut lse_b) = (
            vec![0.0; 4 * d],
            vec![0.0; 4],
            vec![0.0; 4 * d],
            vec![0.0; 4],
        );
        let sel_a = Selection {
            ids: &ids_a,
            bounds: &bounds_a,
        };
        let sel_b = Selection {
            ids: &ids_b,
            bounds: &bounds_b,
        };
        attend_layer(
            shape, &keys, &values, &q, sel_a, None, &mut s, &mut out_a, &mut lse_a,
        )
        .unwrap();
        attend_layer(
            shape, &keys, &values, &q, sel_b, None, &mut s, &mut out_b, &mut lse_b,
        )
        .unwrap();
        let (mut out, mut lse) = (vec![0.0; 4 * d], vec![0.0; 4]);
        merge(&out_a, &lse_a, &out_b, &lse_b, &mut out, &mut lse).unwrap();
        for h in 0..4 {
            let g = shape.kv_head_of(h);
            let want = full_attention(&kv[g].1, &kv[g + 2].1, d, &q[h * d..(h + 1) * d], 0.125);
            let err = rel_err(&out[h * d..(h + 1) * d], &want);
            assert!(err < 1e-5, "head {h}: rel err {err}");
        }
    }

    #[test]
    fn empty_parts_merge_to_the_other_part_or_to_nothing() {
        let a = [1.0f32, 2.0];
        let mut out = [9.0f32; 2];
        assert_eq!(
            merge_head(&a, 0.7, &[5.0, 5.0], f32::NEG_INFINITY, &mut out),
            0.7
        );
        assert_eq!(out, a);
        assert_eq!(
            merge_head(&[5.0, 5.0], f32::NEG_INFINITY, &a, 0.7, &mut out),
            0.7
        );
        assert_eq!(out, a);
        assert_eq!(
            merge_head(&a, f32::NEG_INFINITY, &a, f32::NEG_INFINITY, &mut out),
            f32::NEG_INFINITY
        );
        assert_eq!(out, [0.0, 0.0]);
        // Very different magnitudes do not overflow.
        let l = merge_head(&a, 1000.0, &[0.0, 0.0], -1000.0, &mut out);
        assert_eq!(l, 1000.0);
        assert_eq!(out, a);
    }

    #[test]
    fn bad_shapes_and_nan_are_errors() {
        let mut out = [0.0; 4];
        let mut lse = [0.0; 2];
        assert!(merge(&[0.0; 4], &[0.0; 2], &[0.0; 3], &[0.0; 2], &mut out, &mut lse).is_err());
        assert!(merge(&[0.0; 4], &[0.0; 1], &[0.0; 4], &[0.0; 2], &mut out, &mut lse).is_err());
        assert!(merge(
            &[0.0; 4],
            &[f32::NAN, 0.0],
            &[0.0; 4],
            &[0.0; 2],
            &mut out,
            &mut lse
        )
        .is_err());
        assert!(merge(
            &[0.0; 4],
            &[0.0; 2],
            &[0.0; 4],
            &[f32::INFINITY, 0.0],
            &mut out,
            &mut lse
        )
        .is_err());
        assert!(merge(&[], &[], &[], &[], &mut [], &mut []).is_err());
        assert!(merge_into(&mut [0.0; 3], &mut [0.0; 2], &[0.0; 3], &[0.0; 2]).is_err());
        merge(
            &[0.0; 4], &[0.0; 2], &[0.0; 4], &[0.0; 2], &mut out, &mut lse,
        )
        .unwrap();
        assert!(lse.iter().all(|&l| (l - 2f32.ln()).abs() < 1e-6));
    }
}

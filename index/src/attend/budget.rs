//! Adaptive budget: per query head, the smallest k whose top-k keys, together with the static
//! tokens, cover a fraction p of the estimated attention mass, clamped to `[min_k, max_k]`.
//!
//! A fixed k wastes budget on sharp heads and starves diffuse ones (on real data the exact
//! top-100 covers 0.58 to 0.96 of the mass depending on the head).
//!
//! # The mass estimate
//! The softmax mass of a query over the context splits into three parts (all in units of
//! `exp(logit)`, logits already scaled):
//! 1. the static tokens (sinks + recent window), which the engine attends to anyway and whose
//!    log-sum-exp kvdex computes exactly (it stores those keys too);
//! 2. the `max_k` candidates the index returned, whose logits are known;
//! 3. the unretrieved tail, estimated by [`estimate_tail_lse`] from a systematic sample of `m`
//!    non-static keys scored exactly: `tail ≈ (N / m) · Σ_{j in sample, s_j < s_min} exp(s_j)`,
//!    where `N` is the number of non-static keys and `s_min` the lowest candidate logit. Sample
//!    keys scoring at or above `s_min` are taken to be among the candidates and are dropped, so
//!    nothing is counted twice. With an exact candidate list (flat) this is an unbiased
//!    estimate of the tail for a uniform sample; with an approximate index the tail also holds
//!    the high-scoring keys the index missed, which the sample drops, so the estimate is low by
//!    the index's own miss mass. The cost is `m` extra key scores per head (m = 256 costs less
//!    than a tenth of a max_k = 2048 candidate attention).
//!
//! The covered fraction is `(static + Σ_{i<k} exp(s_i)) / (static + candidates + tail)`: the
//! static part counts as covered because the engine attends to it exactly.

use crate::{IndexError, KeyStore};

use super::partial::AttendScratch;

/// Parameters of the adaptive budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetParams {
    /// The fraction p of the estimated mass to cover, in (0, 1].
    pub coverage: f32,
    /// Smallest k returned (at least 1).
    pub min_k: usize,
    /// Largest k returned; also how many candidates the index should be asked for.
    pub max_k: usize,
}

impl BudgetParams {
    /// Validates `0 < coverage <= 1` and `1 <= min_k <= max_k`.
    pub fn new(coverage: f32, min_k: usize, max_k: usize) -> Result<Self, IndexError> {
        if coverage <= 0.0 || !(0.0..=1.0).contains(&coverage) {
            return Err(IndexError::InvalidArgument(format!(
                "coverage {coverage} is not in (0, 1]"
            )));
        }
        if min_k == 0 || min_k > max_k {
            return Err(IndexError::InvalidArgument(format!(
                "budget bounds min_k {min_k}, max_k {max_k}: need 1 <= min_k <= max_k"
            )));
        }
        Ok(Self {
            coverage,
            min_k,
            max_k,
        })
    }
}

/// The k chosen for one query head, and the fraction of the estimated mass it covers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetChoice {
    /// How many of the candidates to attend to (a prefix of the sorted list).
    pub k: usize,
    /// Estimated fraction of the total mass covered by the static tokens plus the top k.
    pub estimated_coverage: f32,
}

/// Chooses k for one query head.
///
/// `sorted_logits` are the candidates' scaled logits, best first (at most `max_k` are used;
/// fewer when the context is short). `static_lse` is the static tokens' log-sum-exp and
/// `tail_lse` the estimated tail's (`-inf` for an empty part). Errors on NaN or an unsorted list.
pub fn choose_k(
    sorted_logits: &[f32],
    static_lse: f32,
    tail_lse: f32,
    params: &BudgetParams,
) -> Result<BudgetChoice, IndexError> {
    let cand = &sorted_logits[..sorted_logits.len().min(params.max_k)];
    if let Some(pos) = cand.iter().position(|s| s.is_nan()) {
        return Err(IndexError::NonFinite {
            what: "candidate logit",
            pos,
        });
    }
    if let Some(pos) = cand.windows(2).position(|w| w[0] < w[1]) {
        return Err(IndexError::InvalidArgument(format!(
            "candidate logits are not sorted best first at position {}",
            pos + 1
        )));
    }
    if static_lse.is_nan()
        || tail_lse.is_nan()
        || static_lse == f32::INFINITY
        || tail_lse == f32::INFINITY
    {
        return Err(IndexError::InvalidArgument(format!(
            "static_lse {static_lse} / tail_lse {tail_lse} must be finite or -inf"
        )));
    }
    let first = cand.first().copied().unwrap_or(f32::NEG_INFINITY);
    let m = first.max(static_lse).max(tail_lse) as f64;
    if m == f64::NEG_INFINITY {
        return Ok(BudgetChoice {
            k: 0,
            estimated_coverage: 1.0,
        });
    }
    let rel = |x: f32| (x as f64 - m).exp();
    let cand_mass: f64 = cand.iter().map(|&s| rel(s)).sum();
    let total = rel(static_lse) + cand_mass + rel(tail_lse);
    let target = params.coverage as f64 * total;
    let mut covered = rel(static_lse);
    let mut k = 0;
    while k < cand.len() && (k < params.min_k || covered < target) {
        covered += rel(cand[k]);
        k += 1;
    }
    Ok(BudgetChoice {
        k,
        estimated_coverage: (covered / total) as f32,
    })
}

/// Writes up to `out.len()` ids spread evenly over `lo..hi` (systematic sampling at interval
/// midpoints; deterministic, so repeated requests see the same sample) and returns how many.
pub fn systematic_sample(lo: u32, hi: u32, out: &mut [u32]) -> usize {
    let span = hi.saturating_sub(lo) as usize;
    let m = out.len().min(span);
    let step = span as f64 / m.max(1) as f64;
    for (j, o) in out[..m].iter_mut().enumerate() {
        *o = lo + (((j as f64 + 0.5) * step) as u32).min(span as u32 - 1);
    }
    m
}

/// Estimates the log of the unretrieved tail mass from exactly scored sample keys.
///
/// `sample_ids` is a uniform (e.g. [`systematic_sample`]) sample of the `population`
/// non-static keys; `threshold` is the lowest candidate logit (sample keys at or above it are
/// assumed retrieved and dropped). Returns `log((population / m) · Σ_{s_j < threshold} exp(s_j))`
/// with `s_j = scale · <q, k_j>`, or `-inf` when no sample key is below the threshold.
pub fn estimate_tail_lse(
    keys: &dyn KeyStore,
    query: &[f32],
    scale: f32,
    sample_ids: &[u32],
    population: usize,
    threshold: f32,
    scratch: &mut AttendScratch,
) -> Result<f32, IndexError> {
    crate::keys::check_query_dim(keys, query)?;
    if let Some(&bad) = sample_ids.iter().find(|&&id| id as usize >= keys.len()) {
        return Err(IndexError::InvalidArgument(format!(
            "sample id {bad} is outside the {} stored keys",
            keys.len()
        )));
    }
    if sample_ids.is_empty() {
        return Ok(f32::NEG_INFINITY);
    }
    let logits = scratch.logits_for(sample_ids.len());
    keys.score_ids(query, sample_ids, logits);
    logits.iter_mut().for_each(|s| *s *= scale);
    let below = |s: &&f32| **s < threshold;
    let m = logits
        .iter()
        .filter(below)
        .fold(f32::NEG_INFINITY, |a, &s| a.max(s));
    if m == f32::NEG_INFINITY {
        return Ok(f32::NEG_INFINITY);
    }
    let sum: f64 = logits
        .iter()
        .filter(below)
        .map(|&s| ((s - m) as f64).exp())
        .sum();
    let factor = population as f64 / sample_ids.len() as f64;
    Ok((m as f64 + sum.ln() + factor.ln()) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyRows, KeySlice};

    fn lse(xs: &[f32]) -> f32 {
        let m = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        m + xs.iter().map(|&x| (x - m).exp()).sum::<f32>().ln()
    }

    #[test]
    fn sharp_head_needs_few_diffuse_head_needs_many() {
        let p = BudgetParams::new(0.9, 1, 100).unwrap();
        // One dominant key: k = 1 covers > 0.9.
        let mut sharp = vec![10.0f32];
        sharp.extend(std::iter::repeat_n(0.0, 99));
        assert_eq!(
            choose_k(&sharp, f32::NEG_INFINITY, f32::NEG_INFINITY, &p)
                .unwrap()
                .k,
            1
        );
        // Flat logits: k = 90 covers exactly 0.9 of 100 equal candidates.
        let flat = vec![0.0f32; 100];
        let c = choose_k(&flat, f32::NEG_INFINITY, f32::NEG_INFINITY, &p).unwrap();
        assert_eq!(c.k, 90);
        assert!((c.estimated_coverage - 0.9).abs() < 1e-5);
    }

    #[test]
    fn static_mass_counts_as_covered_and_bounds_apply() {
        let flat = vec![0.0f32; 100];
        // Static part holds 9x the candidates' mass: already > 0.9 covered, min_k applies.
        let stat = lse(&[0.0; 900]);
        let p = BudgetParams::new(0.9, 5, 100).unwrap();
        assert_eq!(choose_k(&flat, stat, f32::NEG_INFINITY, &p).unwrap().k, 5);
        // A huge tail: even max_k cannot cover p; k = max_k.
        let p = BudgetParams::new(0.95, 1, 50).unwrap();
        let c = choose_k(&flat, f32::NEG_INFINITY, lse(&[0.0; 10_000]), &p).unwrap();
        assert_eq!(c.k, 50);
        assert!(c.estimated_coverage < 0.01);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(BudgetParams::new(0.0, 1, 2).is_err());
        assert!(BudgetParams::new(1.5, 1, 2).is_err());
        assert!(BudgetParams::new(0.9, 0, 2).is_err());
        assert!(BudgetParams::new(0.9, 3, 2).is_err());
        let p = BudgetParams::new(0.9, 1, 10).unwrap();
        assert!(choose_k(&[1.0, 2.0], 0.0, 0.0, &p).is_err());
        assert!(choose_k(&[f32::NAN], 0.0, 0.0, &p).is_err());
        assert!(choose_k(&[1.0], f32::NAN, 0.0, &p).is_err());
        assert_eq!(
            choose_k(&[], f32::NEG_INFINITY, f32::NEG_INFINITY, &p)
                .unwrap()
                .k,
            0
        );
    }

    #[test]
    fn tail_estimate_is_exact_for_a_full_sample_and_close_for_a_sparse_one() {
        // Keys e_0 * x_i, query e_0: logits x_i; top 10 are the candidates.
        let n = 4000;
        let d = 4;
        let logit = |i: usize| ((i * 7919) % 1000) as f32 / 250.0; // spread over [0, 4)
        let mut k = vec![0.0f32; n * d];
        (0..n).for_each(|i| k[i * d] = logit(i));
        let ks = KeySlice::new(KeyRows::F32(&k), d).unwrap();
        let q = [1.0, 0.0, 0.0, 0.0];
        let threshold = 3.0;
        let exact = lse(&(0..n)
            .map(logit)
            .filter(|&s| s < threshold)
            .collect::<Vec<_>>());
        let all: Vec<u32> = (0..n as u32).collect();
        let mut scratch = AttendScratch::new();
        let est = estimate_tail_lse(&ks, &q, 1.0, &all, n, threshold, &mut scratch).unwrap();
        assert!((est - exact).abs() < 1e-4, "{est} vs {exact}");
        let mut sample = vec![0u32; 256];
        let m = systematic_sample(0, n as u32, &mut sample);
        assert_eq!(m, 256);
        let est = estimate_tail_lse(&ks, &q, 1.0, &sample, n, threshold, &mut scratch).unwrap();
        // Within 10% of the mass.
        assert!((est - exact).abs() < 0.1, "{est} vs {exact}");
    }

    #[test]
    fn systematic_sample_stays_in_range() {
        let mut out = [0u32; 8];
        assert_eq!(systematic_sample(10, 13, &mut out), 3);
        assert_eq!(&out[..3], &[10, 11, 12]);
        assert_eq!(systematic_sample(5, 5, &mut out), 0);
        assert_eq!(systematic_sample(0, 800, &mut out), 8);
        assert!(out.windows(2).all(|w| w[0] < w[1]) && out[7] < 800);
    }
}

//! Lloyd k-means on an even sample of the keys, then the assignment of every key to its nearest
//! centroid (L2, computed as the largest `x·c - |c|²/2`, so that the SIMD group kernel scores a
//! block of keys against every centroid with each key read once).

use crate::keys::{KeyRows, KeySlice};
use crate::KeyStore;
use rayon::prelude::*;

/// Keys assigned per kernel call: their scores against every centroid stay in L2.
const BLOCK: usize = 64;

/// The clustering of keys `0..n`, segment by segment: each run of `segment` keys gets its own
/// `len / rows_per_cluster` centroids, fitted on its own sample and assigned its own keys. Work
/// is linear in `n` (every key meets only its segment's centroids), segments run in parallel,
/// and clusters follow the context's locality, as RetroInfer's segmented clustering does.
pub(super) struct Segmented {
    /// All centroids, segment after segment.
    pub(super) cents: Vec<f32>,
    /// Cluster of every key.
    pub(super) assign: Vec<u32>,
    /// Squared distance of every key to its centroid.
    pub(super) dist: Vec<f32>,
    /// The first cluster of the last segment.
    pub(super) last_first: usize,
}

/// Clusters keys `0..n` of `keys` by segments (see [`Segmented`]).
pub(super) fn segmented(
    keys: &dyn KeyStore,
    n: usize,
    segment: usize,
    rows_per_cluster: usize,
    sample_per_cluster: usize,
    iters: usize,
) -> Segmented {
    let d = keys.dim();
    let segs = n.div_ceil(segment.max(1)).max(1);
    let parts: Vec<(Vec<f32>, Vec<u32>, Vec<f32>)> = (0..segs)
        .into_par_iter()
        .map(|sg| {
            let r = (sg * n / segs)..((sg + 1) * n / segs);
            let c = (r.len() / rows_per_cluster.max(1)).max(1);
            let cents = train(keys, r.clone(), c, c * sample_per_cluster, iters);
            let mut a = vec![0u32; r.len()];
            let mut dd = vec![0.0f32; r.len()];
            assign_range(keys, &cents, c, r.start, &mut a, Some(&mut dd));
            (cents, a, dd)
        })
        .collect();
    let mut out = Segmented {
        cents: Vec::new(),
        assign: Vec::with_capacity(n),
        dist: Vec::with_capacity(n),
        last_first: 0,
    };
    for (cents, a, dd) in parts {
        let first = out.cents.len() / d.max(1);
        out.last_first = first;
        out.cents.extend_from_slice(&cents);
        out.assign.extend(a.iter().map(|&x| x + first as u32));
        out.dist.extend_from_slice(&dd);
    }
    out
}

/// Centroids (`c * dim` f32, row-major) fitted on an even sample of `sample` keys of `range`.
pub(super) fn train(
    keys: &dyn KeyStore,
    range: std::ops::Range<usize>,
    c: usize,
    sample: usize,
    iters: usize,
) -> Vec<f32> {
    let (n, d) = (range.len(), keys.dim());
    if n == 0 {
        return vec![0.0; c * d];
    }
    let s = sample.clamp(c.min(n), n);
    let mut rows = vec![0.0f32; s * d];
    for (i, r) in rows.chunks_exact_mut(d).enumerate() {
        keys.row_f32((range.start + i * n / s) as u32, r);
    }
    // Seeds: evenly spaced sample rows (the sample is itself in token order, so the seeds
    // cover the whole context).
    let mut cents: Vec<f32> = (0..c)
        .flat_map(|j| rows[(j * s / c) * d..(j * s / c + 1) * d].to_vec())
        .collect();
    let Ok(view) = KeySlice::new(KeyRows::F32(&rows), d) else {
        return cents;
    };
    let mut assign = vec![0u32; s];
    for _ in 0..iters {
        assign_all(&view, &cents, c, &mut assign, None);
        let mut sums = vec![0.0f64; c * d];
        let mut counts = vec![0usize; c];
        for (i, &a) in assign.iter().enumerate() {
            counts[a as usize] += 1;
            let dst = &mut sums[a as usize * d..(a as usize + 1) * d];
            dst.iter_mut()
                .zip(&rows[i * d..(i + 1) * d])
                .for_each(|(x, &y)| *x += y as f64);
        }
        for j in 0..c {
            if counts[j] == 0 {
                // An empty cluster takes a row of the largest cluster, splitting it.
                let big = (0..c).max_by_key(|&t| counts[t]).unwrap_or(0);
                if let Some(i) = assign.iter().rposition(|&a| a as usize == big) {
                    cents[j * d..(j + 1) * d].copy_from_slice(&rows[i * d..(i + 1) * d]);
                    assign[i] = j as u32;
                }
                continue;
            }
            let inv = 1.0 / counts[j] as f64;
            for (x, &y) in cents[j * d..(j + 1) * d]
                .iter_mut()
                .zip(&sums[j * d..(j + 1) * d])
            {
                *x = (y * inv) as f32;
            }
        }
    }
    cents
}

/// Half the squared norm of each centroid, the bias of the L2 assignment score.
pub(super) fn half_norms(cents: &[f32], d: usize) -> Vec<f32> {
    cents
        .chunks_exact(d.max(1))
        .map(|c| 0.5 * c.iter().map(|x| x * x).sum::<f32>())
        .collect()
}

/// Nearest centroid of keys `0..assign.len()` of `keys`; with `dist`, also each key's squared
/// distance to it. Parallel over blocks of keys.
pub(super) fn assign_all(
    keys: &dyn KeyStore,
    cents: &[f32],
    c: usize,
    assign: &mut [u32],
    dist: Option<&mut [f32]>,
) {
    assign_range(keys, cents, c, 0, assign, dist)
}

/// As [`assign_all`] for keys `start..start + assign.len()`.
pub(super) fn assign_range(
    keys: &dyn KeyStore,
    cents: &[f32],
    c: usize,
    start: usize,
    assign: &mut [u32],
    dist: Option<&mut [f32]>,
) {
    let d = keys.dim();
    let bias = half_norms(cents, d);
    let mut scratch = vec![0.0f32; 0];
    let body = |b: usize, a: &mut [u32], dd: Option<&mut [f32]>, out: &mut Vec<f32>| {
        let m = a.len();
        out.resize(c * m, 0.0);
        keys.score_range_group(cents, start + b * BLOCK, &mut out[..c * m]);
        let mut best = vec![(f32::NEG_INFINITY, 0u32); m];
        for (j, &bj) in bias.iter().enumerate() {
            for (i, bi) in best.iter_mut().enumerate() {
                let v = out[j * m + i] - bj;
                if v > bi.0 {
                    *bi = (v, j as u32);
                }
            }
        }
        for (ai, &(_, j)) in a.iter_mut().zip(&best) {
            *ai = j;
        }
        if let Some(dd) = dd {
            let mut row = vec![0.0f32; d];
            for (i, &(_, j)) in best.iter().enumerate() {
                keys.row_f32((start + b * BLOCK + i) as u32, &mut row);
                let cj = &cents[j as usize * d..(j as usize + 1) * d];
                dd[i] = row.iter().zip(cj).map(|(x, y)| (x - y) * (x - y)).sum();
            }
        }
    };
    match dist {
        Some(dist) if assign.len() >= 4 * BLOCK => assign
            .par_chunks_mut(BLOCK)
            .zip(dist.par_chunks_mut(BLOCK))
            .enumerate()
            .for_each_init(Vec::new, |out, (b, (a, dd))| body(b, a, Some(dd), out)),
        Some(dist) => {
            for (b, (a, dd)) in assign
                .chunks_mut(BLOCK)
                .zip(dist.chunks_mut(BLOCK))
                .enumerate()
            {
                body(b, a, Some(dd), &mut scratch);
            }
        }
        None if assign.len() >= 4 * BLOCK => assign
            .par_chunks_mut(BLOCK)
            .enumerate()
            .for_each_init(Vec::new, |out, (b, a)| body(b, a, None, out)),
        None => {
            for (b, a) in assign.chunks_mut(BLOCK).enumerate() {
                body(b, a, None, &mut scratch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Well separated blobs are recovered: every key lands with its blob's other keys.
    #[test]
    fn separated_blobs_are_recovered() {
        let (d, c, per) = (16, 4, 300);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut rows = Vec::new();
        for i in 0..c * per {
            let blob = i % c;
            for j in 0..d {
                let centre = if j == blob { 10.0 } else { 0.0 };
                rows.push(centre + rng.gen_range(-0.5..0.5));
            }
        }
        let keys = KeySlice::new(KeyRows::F32(&rows), d).unwrap();
        let cents = train(&keys, 0..c * per, c, 400, 6);
        let mut a = vec![0u32; c * per];
        let mut dist = vec![0.0f32; c * per];
        assign_all(&keys, &cents, c, &mut a, Some(&mut dist));
        for i in 0..c * per {
            assert_eq!(a[i], a[i % c], "key {i}");
        }
        let used: std::collections::HashSet<u32> = a.iter().copied().collect();
        assert_eq!(used.len(), c);
        // Uniform noise of half-width 0.5 has variance 1/12 per dimension.
        let mean = dist.iter().sum::<f32>() / dist.len() as f32;
        assert!(mean < 1.2 * d as f32 / 12.0, "mean squared distance {mean}");
    }
}

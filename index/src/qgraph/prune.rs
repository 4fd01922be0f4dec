//! Step 3 of the build (and of insert): occlusion pruning of a node's candidates to at most M
//! out-edges, and the squared key norms it needs.

use crate::KeyStore;
use rayon::prelude::*;

/// Key `id`'s squared norm, read through `row` (a caller's `dim()` buffer). The one place
/// the build's table, the insert's on-demand norms and the guided merge's norms come from.
pub(super) fn key_norm(keys: &dyn KeyStore, id: u32, row: &mut [f32]) -> f32 {
    keys.row_f32(id, row);
    row.iter().map(|x| x * x).sum()
}

/// The squared norms of `ids` (in order), in parallel.
pub(super) fn key_norms_of(keys: &dyn KeyStore, ids: &[u32]) -> Vec<f32> {
    let d = keys.dim();
    ids.par_iter()
        .map_init(|| vec![0.0f32; d], |row, &id| key_norm(keys, id, row))
        .collect()
}

/// Every key's squared norm (the build's table for [`prune`]'s L2 distances), in parallel.
pub(super) fn key_norms(keys: &dyn KeyStore) -> Vec<f32> {
    let d = keys.dim();
    (0..keys.len() as u32)
        .into_par_iter()
        .map_init(|| vec![0.0f32; d], |row, i| key_norm(keys, i, row))
        .collect()
}

/// A key's squared norm computed on demand (insert: no table), as [`prune`]'s `norm`.
pub(super) fn norm_on_demand(keys: &dyn KeyStore) -> impl Fn(u32) -> f32 + '_ {
    let d = keys.dim();
    move |id| key_norm(keys, id, &mut vec![0.0f32; d])
}

/// Step 3, occlusion pruning (RoarGraph Alg. 2 / DiskANN RobustPrune): candidates in order of
/// L2 distance to the pivot p; c is kept unless a kept s is closer to c than p is (scaled by α).
/// `norm(id)` gives a key's squared norm (a table at build time, computed on demand at insert).
/// When fewer than `fill` (of `(alpha, fill)`) survive, the nearest occluded ones are added back
/// up to `fill` (see [`super::GraphParams::fill_degree`]).
pub(crate) fn prune(
    keys: &dyn KeyStore,
    norm: &dyn Fn(u32) -> f32,
    p: u32,
    cands: &[u32],
    m: usize,
    (alpha, fill): (f32, usize),
) -> Vec<u32> {
    if cands.is_empty() {
        return Vec::new();
    }
    let d = keys.dim();
    let mut row = vec![0.0f32; d];
    keys.row_f32(p, &mut row);
    let mut ip = vec![0.0f32; cands.len()];
    keys.score_ids(&row, cands, &mut ip);
    let np = norm(p);
    let mut by_dist: Vec<(f32, u32, f32)> = cands
        .iter()
        .zip(&ip)
        .map(|(&c, &s)| {
            let nc = norm(c);
            (np + nc - 2.0 * s, c, nc)
        })
        .collect();
    by_dist.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut kept: Vec<u32> = Vec::with_capacity(m);
    let mut kept_norm: Vec<f32> = Vec::with_capacity(m);
    let mut kept_ip = vec![0.0f32; m];
    let mut occluded_ids: Vec<u32> = Vec::new();
    for &(dist_pc, c, nc) in &by_dist {
        if kept.len() >= m {
            break;
        }
        keys.row_f32(c, &mut row);
        let ks = kept.len();
        keys.score_ids(&row, &kept, &mut kept_ip[..ks]);
        let occluded = kept_norm
            .iter()
            .zip(&kept_ip[..ks])
            .any(|(&ns, &sc)| alpha * (ns + nc - 2.0 * sc) < dist_pc);
        if !occluded {
            kept.push(c);
            kept_norm.push(nc);
        } else {
            occluded_ids.push(c);
        }
    }
    let fill = fill.min(m);
    if kept.len() < fill {
        // Nearest first: `occluded_ids` is in distance order.
        let room = fill - kept.len();
        kept.extend(occluded_ids.into_iter().take(room));
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::prune;
    use crate::keys::KeyRows;
    use crate::KeySlice;

    /// Keys on a line: every farther candidate is occluded by the nearest one, so strict pruning
    /// keeps one edge and the fill gives back the nearest occluded ones, in distance order.
    #[test]
    fn prune_fills_with_nearest_occluded_candidates() {
        let v: Vec<f32> = (0..6).flat_map(|i| [i as f32, 0.0]).collect();
        let keys = KeySlice::new(KeyRows::F32(&v), 2).unwrap();
        let norm = |i: u32| (i * i) as f32;
        let cands = [5u32, 3, 1, 4, 2];
        assert_eq!(prune(&keys, &norm, 0, &cands, 4, (1.0, 0)), vec![1]);
        assert_eq!(prune(&keys, &norm, 0, &cands, 4, (1.0, 3)), vec![1, 2, 3]);
        // The fill never exceeds the degree cap.
        assert_eq!(prune(&keys, &norm, 0, &cands, 2, (1.0, 5)), vec![1, 2]);
    }
}

//! Step 3 of the build (and of insert): occlusion pruning of a node's candidates to at most M
//! out-edges, and the squared key norms it needs.

use crate::KeyStore;
use rayon::prelude::*;

/// A row's squared norm: the one expression every norm comes from (the build's table, the
/// norms of inserted keys, a guided plan's fresh keys), so they are the same values bit for bit.
pub(super) fn sq_norm(row: &[f32]) -> f32 {
    row.iter().map(|x| x * x).sum()
}

/// Key `id`'s squared norm, read through `row` (a caller's `dim()` buffer).
pub(super) fn key_norm(keys: &dyn KeyStore, id: u32, row: &mut [f32]) -> f32 {
    keys.row_f32(id, row);
    sq_norm(row)
}

/// The squared norms of keys `start..keys.len()` (in order), in parallel.
pub(super) fn key_norms_from(keys: &dyn KeyStore, start: usize) -> Vec<f32> {
    let d = keys.dim();
    (start as u32..keys.len() as u32)
        .into_par_iter()
        .map_init(|| vec![0.0f32; d], |row, i| key_norm(keys, i, row))
        .collect()
}

/// Squared key norms by id, as [`prune`] reads them for its L2 distances: the graph's table
/// (the keys it indexes, computed once at build and extended as keys are inserted), then the
/// norms of keys `indexed.len()..` that it does not index yet (a guided insert plans its merge
/// before they are).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Norms<'a> {
    /// Keys `0..indexed.len()`.
    pub(crate) indexed: &'a [f32],
    /// Keys from `indexed.len()` on.
    pub(crate) fresh: &'a [f32],
}

impl<'a> Norms<'a> {
    /// Norms of the indexed keys only.
    pub(crate) fn of_table(indexed: &'a [f32]) -> Self {
        Self {
            indexed,
            fresh: &[],
        }
    }

    /// Key `id`'s squared norm. Ids past both tables read 0: callers pass ids of keys in the
    /// store, whose norms the tables hold.
    #[inline]
    pub(crate) fn get(&self, id: u32) -> f32 {
        let i = id as usize;
        match self.indexed.get(i) {
            Some(&x) => x,
            None => self
                .fresh
                .get(i - self.indexed.len())
                .copied()
                .unwrap_or(0.0),
        }
    }
}

/// Step 3, occlusion pruning (RoarGraph Alg. 2 / DiskANN RobustPrune): candidates in order of
/// L2 distance to the pivot p; c is kept unless a kept s is closer to c than p is (scaled by α).
/// `norms` gives each key's squared norm (see [`Norms`]).
/// When fewer than `fill` (of `(alpha, fill)`) survive, the nearest occluded ones are added back
/// up to `fill` (see [`super::GraphParams::fill_degree`]).
pub(crate) fn prune(
    keys: &dyn KeyStore,
    norms: Norms<'_>,
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
    let np = norms.get(p);
    let mut by_dist: Vec<(f32, u32, f32)> = cands
        .iter()
        .zip(&ip)
        .map(|(&c, &s)| {
            let nc = norms.get(c);
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
    use super::{prune, Norms};
    use crate::keys::KeyRows;
    use crate::KeySlice;

    /// Keys on a line: every farther candidate is occluded by the nearest one, so strict pruning
    /// keeps one edge and the fill gives back the nearest occluded ones, in distance order.
    #[test]
    fn prune_fills_with_nearest_occluded_candidates() {
        let v: Vec<f32> = (0..6).flat_map(|i| [i as f32, 0.0]).collect();
        let keys = KeySlice::new(KeyRows::F32(&v), 2).unwrap();
        let table: Vec<f32> = (0..6u32).map(|i| (i * i) as f32).collect();
        let norm = Norms::of_table(&table);
        let cands = [5u32, 3, 1, 4, 2];
        assert_eq!(prune(&keys, norm, 0, &cands, 4, (1.0, 0)), vec![1]);
        assert_eq!(prune(&keys, norm, 0, &cands, 4, (1.0, 3)), vec![1, 2, 3]);
        // The fill never exceeds the degree cap.
        assert_eq!(prune(&keys, norm, 0, &cands, 2, (1.0, 5)), vec![1, 2]);
    }
}

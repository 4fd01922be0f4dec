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

/// Reusable buffers of [`prune`]: one per build thread or per insert, so that a prune
/// allocates nothing once they have grown (an insert batch ran hundreds of prunes, each with
/// seven small vectors of its own).
#[derive(Clone, Debug, Default)]
pub(crate) struct PruneScratch {
    /// The pivot's row, then each candidate's, as f32.
    row: Vec<f32>,
    /// Inner products of the pivot with the candidates, then of a candidate with the kept.
    ip: Vec<f32>,
    /// (L2 distance to the pivot, index into the candidates), sorted a slice at a time.
    order: Vec<(f32, u32)>,
    kept_norm: Vec<f32>,
    occluded: Vec<u32>,
    /// The result of the last prune.
    kept: Vec<u32>,
}

/// Candidates are put in distance order this many times M at a time (the nearest first, then
/// twice as many, ...): a prune stops once M are kept, usually long before the end of a hub's
/// list of thousands, so sorting all of them was wasted work.
const FIRST_SLICE: usize = 4;

/// Step 3, occlusion pruning (RoarGraph Alg. 2 / DiskANN RobustPrune): candidates in order of
/// L2 distance to the pivot p; c is kept unless a kept s is closer to c than p is (scaled by α).
/// `norms` gives each key's squared norm (see [`Norms`]).
/// When fewer than `fill` (of `(alpha, fill)`) survive, the nearest occluded ones are added back
/// up to `fill` (see [`super::GraphParams::fill_degree`]). Candidates at equal distance are
/// taken in their order in `cands` (as a stable sort would). The result lives in `scratch`.
pub(crate) fn prune<'s>(
    keys: &dyn KeyStore,
    norms: Norms<'_>,
    p: u32,
    cands: &[u32],
    m: usize,
    alpha_fill: (f32, usize),
    scratch: &'s mut PruneScratch,
) -> &'s [u32] {
    prune_watching(keys, norms, (p, None), cands, m, alpha_fill, scratch);
    &scratch.kept
}

/// [`prune`] of pivot `p`'s candidates when only a result that keeps `u` (one of them) is
/// wanted: insert offers a new key u to a full node p, which keeps its edges unless u
/// survives. Returns `None` as soon as u is known to be dropped, skipping the rest of the
/// prune: at once when p's nearest candidate (always kept) occludes u, else when u's own turn
/// finds it occluded. Otherwise the same edges as [`prune`], u among them or not.
pub(crate) fn prune_admits<'s>(
    keys: &dyn KeyStore,
    norms: Norms<'_>,
    (p, u): (u32, u32),
    cands: &[u32],
    m: usize,
    alpha_fill: (f32, usize),
    scratch: &'s mut PruneScratch,
) -> Option<&'s [u32]> {
    prune_watching(keys, norms, (p, Some(u)), cands, m, alpha_fill, scratch)
        .then_some(&scratch.kept)
}

/// The prune itself; with a watched candidate u, returns false (result incomplete) once u is
/// known not to be in the result.
fn prune_watching(
    keys: &dyn KeyStore,
    norms: Norms<'_>,
    (p, watch): (u32, Option<u32>),
    cands: &[u32],
    m: usize,
    (alpha, fill): (f32, usize),
    scratch: &mut PruneScratch,
) -> bool {
    let PruneScratch {
        row,
        ip,
        order,
        kept_norm,
        occluded,
        kept,
    } = scratch;
    kept.clear();
    if cands.is_empty() {
        return true;
    }
    let d = keys.dim();
    row.resize(d, 0.0);
    keys.row_f32(p, row);
    ip.resize(cands.len().max(m), 0.0);
    keys.score_ids(row, cands, &mut ip[..cands.len()]);
    let np = norms.get(p);
    order.clear();
    order.extend(
        cands
            .iter()
            .zip(ip.iter())
            .enumerate()
            .map(|(i, (&c, &s))| (np + norms.get(c) - 2.0 * s, i as u32)),
    );
    let nearer = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    let fill = fill.min(m);
    // A watched u is dropped for sure, with no fill to bring it back, when the nearest
    // candidate (the first kept, whatever else happens) occludes it: the same test, on the
    // same inner product, that u's own turn would make.
    let watched = watch
        .filter(|_| fill == 0)
        .and_then(|u| order.iter().find(|e| cands[e.1 as usize] == u));
    if let Some(&(dist_pu, iu)) = watched {
        let first = order.iter().min_by(|a, b| nearer(a, b)).map_or(iu, |e| e.1);
        if first != iu {
            let (c0, cu) = (cands[first as usize], cands[iu as usize]);
            keys.row_f32(cu, row);
            keys.score_ids(row, &[c0], &mut ip[..1]);
            if alpha * (norms.get(c0) + norms.get(cu) - 2.0 * ip[0]) < dist_pu {
                return false;
            }
        }
    }
    kept_norm.clear();
    occluded.clear();
    let (mut done, mut slice) = (0, (FIRST_SLICE * m).max(1));
    while kept.len() < m && done < order.len() {
        let rest = &mut order[done..];
        let take = slice.min(rest.len());
        if take < rest.len() {
            rest.select_nth_unstable_by(take - 1, nearer);
        }
        rest[..take].sort_unstable_by(nearer);
        for &(dist_pc, i) in &rest[..take] {
            if kept.len() >= m {
                break;
            }
            let c = cands[i as usize];
            let nc = norms.get(c);
            keys.row_f32(c, row);
            let ks = kept.len();
            keys.score_ids(row, kept, &mut ip[..ks]);
            let is_occluded = kept_norm
                .iter()
                .zip(&ip[..ks])
                .any(|(&ns, &sc)| alpha * (ns + nc - 2.0 * sc) < dist_pc);
            if !is_occluded {
                kept.push(c);
                kept_norm.push(nc);
            } else if Some(c) == watch && kept.len() >= fill {
                // Occluded, and the fill will not bring it back: kept only grows.
                return false;
            } else {
                occluded.push(c);
            }
        }
        done += take;
        slice *= 2;
    }
    if kept.len() < fill {
        // Nearest first: `occluded` is in distance order.
        let room = fill - kept.len();
        kept.extend(occluded.iter().take(room));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{prune, prune_admits, Norms, PruneScratch};
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
        let s = &mut PruneScratch::default();
        assert_eq!(prune(&keys, norm, 0, &cands, 4, (1.0, 0), s), [1]);
        assert_eq!(prune(&keys, norm, 0, &cands, 4, (1.0, 3), s), [1, 2, 3]);
        // The fill never exceeds the degree cap.
        assert_eq!(prune(&keys, norm, 0, &cands, 2, (1.0, 5), s), [1, 2]);
    }

    /// The reference: every candidate sorted by distance (stable), norms recomputed from the
    /// rows, scratch-free (the prune before the norm table and the sliced sort).
    fn reference(
        keys: &KeySlice<'_>,
        p: u32,
        cands: &[u32],
        m: usize,
        af: (f32, usize),
    ) -> Vec<u32> {
        use crate::KeyStore;
        let d = keys.dim();
        let norm = |id: u32| super::key_norm(keys, id, &mut vec![0.0; d]);
        let mut row = vec![0.0; d];
        keys.row_f32(p, &mut row);
        let mut ip = vec![0.0; cands.len()];
        keys.score_ids(&row, cands, &mut ip);
        let mut by: Vec<(f32, u32)> = cands
            .iter()
            .zip(&ip)
            .map(|(&c, &s)| (norm(p) + norm(c) - 2.0 * s, c))
            .collect();
        by.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (mut kept, mut occ): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
        for &(dpc, c) in &by {
            if kept.len() >= m {
                break;
            }
            keys.row_f32(c, &mut row);
            let mut sc = vec![0.0; kept.len()];
            keys.score_ids(&row, &kept, &mut sc);
            let occluded = kept
                .iter()
                .zip(&sc)
                .any(|(&s, &x)| af.0 * (norm(s) + norm(c) - 2.0 * x) < dpc);
            if occluded {
                occ.push(c)
            } else {
                kept.push(c)
            }
        }
        let fill = af.1.min(m);
        if kept.len() < fill {
            let room = fill - kept.len();
            kept.extend(occ.into_iter().take(room));
        }
        kept
    }

    /// The table's norms, the sliced sort and the reused scratch give the reference's edges
    /// exactly: f16 keys with repeated rows (ties in distance, broken by candidate order),
    /// candidate lists shorter and far longer than the first sorted slice, in any order, with
    /// the norms split between the table and fresh keys as a guided plan reads them.
    #[test]
    fn prune_matches_the_full_sort_reference() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        let (n, d) = (600usize, 16usize);
        let mut v: Vec<half::f16> = (0..n * d)
            .map(|_| half::f16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect();
        for i in (0..n).step_by(7).skip(1) {
            let (a, b) = v.split_at_mut(i * d);
            b[..d].copy_from_slice(&a[(i - 7) * d..(i - 6) * d]);
        }
        let keys = KeySlice::new(KeyRows::F16(&v), d).unwrap();
        let table = super::key_norms_from(&keys, 0);
        let norms = Norms {
            indexed: &table[..500],
            fresh: &table[500..],
        };
        let s = &mut PruneScratch::default();
        let mut admitted = 0;
        for round in 0..60 {
            let p = rng.gen_range(0..n as u32);
            let len = [3usize, 40, 300, 599][round % 4];
            let mut cands: Vec<u32> = (0..n as u32).filter(|&c| c != p).collect();
            for i in 0..cands.len() {
                cands.swap(i, rng.gen_range(i..n - 1));
            }
            cands.truncate(len);
            let m = [4usize, 12][round % 2];
            let af = ([1.0f32, 1.2][round / 2 % 2], [0usize, 8][round / 4 % 2]);
            let want = reference(&keys, p, &cands, m, af);
            assert_eq!(prune(&keys, norms, p, &cands, m, af, s), want.as_slice());
            // Watching a candidate: the same edges, or None only when they leave it out.
            let u = cands[rng.gen_range(0..cands.len())];
            match prune_admits(&keys, norms, (p, u), &cands, m, af, s) {
                Some(got) => assert_eq!(got, want.as_slice()),
                None => assert!(!want.contains(&u), "round {round}: u {u} dropped but kept"),
            }
            admitted += usize::from(want.contains(&u));
        }
        // Both outcomes were exercised.
        assert!(admitted > 0 && admitted < 60, "admitted {admitted} of 60");
    }
}

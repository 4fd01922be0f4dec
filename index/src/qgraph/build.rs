//! Building the query-guided graph (RoarGraph §4.2, as RetrievalAttention §3.2 applies it):
//!
//! 1. For each training query q (sampled evenly when there are more than `max_train_queries`),
//!    its exact top-Nq keys by inner product among the keys it could see (causal), found with
//!    the flat kernels; or the neighbour lists the engine supplies.
//! 2. Projection: q's nearest key is the pivot p; the rest of q's list are p's candidates.
//! 3. Occlusion pruning of each pivot's candidates to at most M out-edges.
//! 4. Reverse edges c → p while c has room.
//! 5. Connectivity: every key not reachable from the entry points (the hub keys, those most
//!    frequent in the top lists) is searched for with its own vector and linked in.
//!
//! 6. An even sample of the training queries is remembered to guide incremental insert
//!    ([`super::insert`]).
//!
//! Steps 1, 3 and the searches of 5 run in parallel with rayon. Step 1 lives in
//! [`super::train`], step 3 in [`super::prune`].

use super::connect::{connect, link_sequence};
use super::prune::{key_norms_from, prune, Norms, PruneScratch};
use super::train::{density_alpha, sparse_lerp, training_lists};
use super::{GraphParams, QueryGuidedGraph};
use crate::{IndexError, KeyStore, TrainingSignal};
use rayon::prelude::*;

/// Builds the graph over all keys of `keys`.
pub fn build(
    keys: &dyn KeyStore,
    training: &TrainingSignal<'_>,
    params: &GraphParams,
) -> Result<QueryGuidedGraph, IndexError> {
    if params.degree == 0 || params.degree > 255 {
        return Err(IndexError::InvalidArgument(format!(
            "graph degree M must be in 1..=255, got {}",
            params.degree
        )));
    }
    let n = keys.len();
    let (lists, entries_per_key) = training_lists(keys, training, params)?;
    // Sparse training lists (long contexts): laxer settings, decided once from the density
    // at the base Nq and kept in the graph's params for insert.
    let params = &GraphParams {
        alpha: density_alpha(params, entries_per_key),
        rank_window: sparse_lerp(
            params.rank_window,
            params.sparse_rank_window,
            entries_per_key,
        ),
        train_topk: sparse_lerp(params.train_topk, params.sparse_train_topk, entries_per_key),
        sequence_edges: sparse_lerp(
            params.sequence_edges,
            params.sparse_sequence_edges,
            entries_per_key,
        ),
        ..params.clone()
    };
    let norms = key_norms_from(keys, 0);
    // Hub keys: most frequent in the training top lists (DESIGN.md, "hub entry points").
    let mut freq = vec![0u32; n];
    lists
        .iter()
        .flatten()
        .for_each(|&id| freq[id as usize] += 1);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(freq[i as usize]));
    let mut entries: Vec<u32> = order
        .iter()
        .take(params.entry_points.max(1))
        .copied()
        .collect();
    if lists.is_empty() {
        entries.truncate(1);
    }
    let cands = candidates(&lists, n, params.rank_window);
    let m = params.degree;
    // Pruned edges go straight into the fixed slots: no vector per key (at 1M keys those were
    // hundreds of MB of small allocations that the allocator kept after the build).
    let mut g = QueryGuidedGraph {
        params: params.clone(),
        edges: vec![0; n * m],
        deg: vec![0; n],
        norms,
        entries,
        memory: Default::default(),
    };
    let norms = &g.norms;
    g.edges
        .par_chunks_mut(m)
        .zip(g.deg.par_iter_mut())
        .enumerate()
        .for_each_init(
            || {
                (
                    Vec::new(),
                    vec![0u64; n.div_ceil(64)],
                    PruneScratch::default(),
                )
            },
            |(c, seen, s), (p, (slot, deg))| {
                // Distinct candidates, sorted: a hub's list repeats the same keys hundreds of
                // times (it is the pivot of most queries), so they are made distinct with a
                // bitset first and only the distinct ones sorted (sorting the whole list was a
                // fifth of the build).
                c.clear();
                for &x in cands.of(p) {
                    let (w, bit) = (x as usize / 64, 1u64 << (x % 64));
                    if seen[w] & bit == 0 {
                        seen[w] |= bit;
                        c.push(x);
                    }
                }
                for &x in c.iter() {
                    seen[x as usize / 64] = 0;
                }
                c.sort_unstable();
                c.retain(|&x| x as usize != p);
                let kept = prune(
                    keys,
                    Norms::of_table(norms),
                    p as u32,
                    c,
                    m,
                    (params.alpha, params.fill_degree),
                    s,
                );
                let d = kept.len().min(m);
                slot[..d].copy_from_slice(&kept[..d]);
                *deg = d as u8;
            },
        );
    drop(cands);
    // Reverse edges while the target has room (each node's own edges as they stand when it
    // is reached, reverse ones from earlier nodes included).
    for p in 0..n {
        for i in 0..g.deg[p] as usize {
            let c = g.edges[p * m + i];
            g.link(c, p as u32);
        }
    }
    connect(&mut g, keys);
    link_sequence(&mut g, params.sequence_edges, 0);
    if let TrainingSignal::Queries { vectors, .. } = *training {
        // An even sample of the training queries guides later inserts (see `insert`).
        let d = keys.dim();
        let total = vectors.len() / d.max(1);
        let take = total.min(params.kept_queries);
        let mut sample = Vec::with_capacity(take * d);
        for i in 0..take {
            let qi = i * total / take;
            sample.extend_from_slice(&vectors[qi * d..(qi + 1) * d]);
        }
        g.remember_queries(keys, &sample)?;
    }
    Ok(g)
}

/// Every node's candidates in one flat array: node p's are `ids[start[p]..start[p + 1]]`.
/// One allocation instead of a vector per key, which the allocator returns to the system when
/// it is dropped.
pub(super) struct Candidates {
    start: Vec<usize>,
    ids: Vec<u32>,
}

impl Candidates {
    /// Node `p`'s candidates, in the order the lists gave them (with repeats).
    pub(super) fn of(&self, p: usize) -> &[u32] {
        &self.ids[self.start[p]..self.start[p + 1]]
    }
}

/// Projection (steps 2-3's input): each list's pivot (its best key) takes the rest of the list
/// as candidates, and each member also takes its rank neighbours within `w`: when one hub (a
/// sink) is the pivot of most queries, pivot edges alone leave the rest of the graph bare.
pub(super) fn candidates(lists: &[Vec<u32>], n: usize, w: usize) -> Candidates {
    // Two passes over the lists: count, then place (the same order as pushing per node).
    let each = |f: &mut dyn FnMut(u32, &[u32])| for_each_candidate(lists, w, f);
    let mut start = vec![0usize; n + 1];
    each(&mut |p, c| start[p as usize + 1] += c.len());
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut ids = vec![0u32; start[n]];
    let mut at = start.clone();
    each(&mut |p, c| {
        let a = &mut at[p as usize];
        ids[*a..*a + c.len()].copy_from_slice(c);
        *a += c.len();
    });
    Candidates { start, ids }
}

/// The projection's pairs, list by list: `f(p, cands)` for each list's pivot p (its first
/// key) with the rest of the list, and for each other member with its rank neighbours within
/// `w` (itself included; callers drop self-edges). Shared by the build's per-key table and
/// the guided insert's merge of a few lists.
pub(super) fn for_each_candidate(lists: &[Vec<u32>], w: usize, f: &mut dyn FnMut(u32, &[u32])) {
    for l in lists {
        if let Some((&p, rest)) = l.split_first() {
            f(p, rest);
        }
        for (i, &x) in l.iter().enumerate().skip(1) {
            let lo = i.saturating_sub(w).max(1);
            let hi = (i + w + 1).min(l.len());
            f(x, &l[lo..hi]);
        }
    }
}

impl QueryGuidedGraph {
    pub(super) fn set_neighbours(&mut self, i: usize, a: &[u32]) {
        let m = self.params.degree;
        let d = a.len().min(m);
        self.edges[i * m..i * m + d].copy_from_slice(&a[..d]);
        self.deg[i] = d as u8;
    }

    /// Adds the edge `from → to` while `from` has room. Returns true when the edge is present
    /// afterwards.
    pub(super) fn link(&mut self, from: u32, to: u32) -> bool {
        let m = self.params.degree;
        let (f, d) = (from as usize, self.deg[from as usize] as usize);
        if self.edges[f * m..f * m + d].contains(&to) {
            return true;
        }
        if d < m {
            self.edges[f * m + d] = to;
            self.deg[f] += 1;
            true
        } else {
            false
        }
    }

    /// Adds the edge `from → to`, replacing from's last (weakest) edge when it is full. Returns
    /// the target of the replaced edge, which may have lost its only way in.
    pub(super) fn link_displacing(&mut self, from: u32, to: u32) -> Option<u32> {
        if self.link(from, to) {
            return None;
        }
        let slot = from as usize * self.params.degree + self.params.degree - 1;
        Some(std::mem::replace(&mut self.edges[slot], to))
    }
}

#[cfg(test)]
mod tests {
    use crate::keys::KeyRows;
    use crate::KeySlice;

    /// Sequence edges follow the list density: none on dense lists (the real 8K set's
    /// regime), `sparse_sequence_edges` on sparse ones, where every node not yet full links to
    /// its next key in token order.
    #[test]
    fn sequence_edges_only_on_sparse_training_lists() {
        let (n, d) = (64usize, 4usize);
        let v: Vec<f32> = (0..n * d).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let keys = KeySlice::new(KeyRows::F32(&v), d).unwrap();
        let p = crate::GraphParams::default();
        // 40 entries per key: dense.
        let dense: Vec<Vec<u32>> = (0..40u32)
            .map(|s| (0..n as u32).map(|i| (i + s) % n as u32).collect())
            .collect();
        let g = super::build(&keys, &crate::TrainingSignal::Neighbours(&dense), &p).unwrap();
        assert_eq!(g.params().sequence_edges, p.sequence_edges);
        let sparse = vec![(0..8u32).collect::<Vec<u32>>()];
        let g = super::build(&keys, &crate::TrainingSignal::Neighbours(&sparse), &p).unwrap();
        assert_eq!(g.params().sequence_edges, p.sparse_sequence_edges);
        for i in 0..n as u32 - 1 {
            let nb = g.neighbours_of(i);
            assert!(nb.contains(&(i + 1)) || nb.len() == p.degree, "{i}: {nb:?}");
        }
    }
}

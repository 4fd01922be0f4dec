//! Best-first beam search over the query-guided graph (RoarGraph §4.3, "search with list size
//! L"): keep the L best nodes seen, expand the best unexpanded one, stop when all L are expanded.
//! The visited set is a bitset (16 KiB for 128K keys, so it stays in L1/L2 while key rows stream
//! through the caches; a 4-byte stamp per node missed cache on most checks) that a search clears
//! by unsetting only the bits it set, so it starts in O(visited) and never allocates once its
//! scratch has grown. Row and edge-list reads are prefetched (see [`crate::prefetch`]).

use crate::KeyStore;

/// One entry of the beam: a scored node and whether its neighbours were expanded.
#[derive(Clone, Copy, Debug)]
pub struct Cand {
    /// Inner product with the query.
    pub score: f32,
    /// Key id.
    pub id: u32,
    /// True once the node's neighbours were scored.
    pub expanded: bool,
}

/// Caller-owned graph search state (one per worker thread, inside [`crate::SearchScratch`]).
#[derive(Debug, Default, Clone)]
pub struct GraphScratch {
    /// Bit `id` set: node `id` was visited in this search.
    visited: Vec<u64>,
    /// The ids whose bits are set, so that the next search clears only those.
    marked: Vec<u32>,
    /// The beam, best first, at most L long.
    pub pool: Vec<Cand>,
    pub(super) ids: Vec<u32>,
    pub(super) scores: Vec<f32>,
    /// The k best of every node scored, not only those left in the beam: the result set.
    pub best: crate::TopK,
    /// Per-query-head beams of a joint GQA-group search (see [`super::group`]).
    pub(super) heads: Vec<super::group::HeadBeam>,
    /// Nodes some head of a joint search expanded (see [`super::group`]).
    pub(super) expanded: super::group::NodeSet,
}

impl GraphScratch {
    /// Starts a new search over `n` nodes: O(nodes visited by the last search), except when the
    /// set must grow.
    pub(super) fn begin(&mut self, n: usize) {
        let words = n.div_ceil(64);
        if self.marked.len() > self.visited.len() / 8 {
            self.visited.fill(0);
        } else {
            for &id in &self.marked {
                if let Some(w) = self.visited.get_mut(id as usize / 64) {
                    *w &= !(1u64 << (id % 64));
                }
            }
        }
        self.marked.clear();
        if self.visited.len() < words {
            self.visited.resize(words, 0);
        }
        self.pool.clear();
    }

    /// Marks `id` visited; returns true when it was not visited before in this search.
    #[inline]
    pub(super) fn visit(&mut self, id: u32) -> bool {
        let bit = 1u64 << (id % 64);
        match self.visited.get_mut(id as usize / 64) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                self.marked.push(id);
                true
            }
            _ => false,
        }
    }

    /// Offers a scored node to a beam of width `l`.
    #[inline]
    fn offer(&mut self, l: usize, id: u32, score: f32) -> Option<usize> {
        offer(&mut self.pool, l, id, score)
    }
}

/// Offers a scored node to `pool`, a beam of width `l` kept best first; returns where it went.
#[inline]
pub(super) fn offer(pool: &mut Vec<Cand>, l: usize, id: u32, score: f32) -> Option<usize> {
    if pool.len() >= l && pool.last().is_some_and(|c| c.score >= score) {
        return None;
    }
    let at = pool.partition_point(|c| c.score >= score);
    if pool.len() >= l {
        pool.pop();
    }
    pool.insert(
        at,
        Cand {
            score,
            id,
            expanded: false,
        },
    );
    Some(at)
}

/// The adjacency a search walks: `neighbours(id)` lists id's out-edges.
pub trait Adjacency {
    /// Number of nodes.
    fn nodes(&self) -> usize;
    /// Out-edges of `id`.
    fn neighbours(&self, id: u32) -> &[u32];
    /// Hints that `neighbours(id)` will be read soon (see [`crate::prefetch`]).
    fn prefetch_neighbours(&self, id: u32) {
        crate::prefetch::prefetch_slice(self.neighbours(id));
    }
}

/// Beam search for `query` from `entries` with list size `l`. Leaves the beam (best first) in
/// `scratch.pool`, the `k` best of every key scored in `scratch.best` (so the beam may be
/// narrower than k), and returns the number of keys scored.
///
/// A beam at least k wide already holds them: it keeps the best `l` of every key scored (a
/// key leaves it only for a better one), so its first k are the k best. The result heap is
/// then filled from the beam once at the end instead of taking every scored key, which takes
/// 6-10% off a 128K search (docs/design/0019-search-micro-structure.md).
#[allow(clippy::too_many_arguments)]
pub fn beam_search_k(
    graph: &dyn Adjacency,
    keys: &dyn KeyStore,
    query: &[f32],
    entries: &[u32],
    l: usize,
    k: usize,
    scratch: &mut GraphScratch,
) -> usize {
    if l.max(1) < k {
        scratch.best.reset(k);
        return search_inner(graph, keys, query, entries, l, scratch);
    }
    scratch.best.reset(0);
    let scored = search_inner(graph, keys, query, entries, l, scratch);
    scratch.best.reset(k);
    for c in scratch.pool.iter().take(k) {
        scratch.best.push(c.id, c.score);
    }
    scored
}

/// Beam search without a result heap (build-time searches read `scratch.pool`).
pub fn beam_search(
    graph: &dyn Adjacency,
    keys: &dyn KeyStore,
    query: &[f32],
    entries: &[u32],
    l: usize,
    scratch: &mut GraphScratch,
) -> usize {
    scratch.best.reset(0);
    search_inner(graph, keys, query, entries, l, scratch)
}

fn search_inner(
    graph: &dyn Adjacency,
    keys: &dyn KeyStore,
    query: &[f32],
    entries: &[u32],
    l: usize,
    scratch: &mut GraphScratch,
) -> usize {
    let n = graph.nodes().min(keys.len());
    scratch.begin(n);
    let l = l.max(1);
    let mut scored = 0;
    scratch.ids.clear();
    for &e in entries {
        if (e as usize) < n && scratch.visit(e) {
            scratch.ids.push(e);
        }
    }
    let _ = score_and_offer(graph, keys, query, l, scratch, &mut scored);
    // The first unexpanded node is the best one; inserting better nodes can only move it left.
    let mut cursor = 0;
    while let Some(off) = scratch.pool[cursor..].iter().position(|c| !c.expanded) {
        let at = cursor + off;
        scratch.pool[at].expanded = true;
        let node = scratch.pool[at].id;
        scratch.ids.clear();
        for &nb in graph.neighbours(node) {
            if (nb as usize) < n && scratch.visit(nb) {
                scratch.ids.push(nb);
            }
        }
        // Start every row's cache misses at once before scoring the first (a hint only).
        keys.prefetch(&scratch.ids);
        let best_new = score_and_offer(graph, keys, query, l, scratch, &mut scored);
        cursor = best_new.map_or(at, |p| p.min(at));
    }
    scored
}

/// Scores `scratch.ids` and offers them to the beam; returns the best position that changed.
/// The edge list of every node that enters the beam is prefetched, since the beam's nodes are
/// the ones expanded later (a hint only).
fn score_and_offer(
    graph: &dyn Adjacency,
    keys: &dyn KeyStore,
    query: &[f32],
    l: usize,
    scratch: &mut GraphScratch,
    scored: &mut usize,
) -> Option<usize> {
    let m = scratch.ids.len();
    if m == 0 {
        return None;
    }
    scratch.scores.resize(m, 0.0);
    keys.score_ids(query, &scratch.ids, &mut scratch.scores[..m]);
    *scored += m;
    let mut first: Option<usize> = None;
    for i in 0..m {
        let (id, s) = (scratch.ids[i], scratch.scores[i]);
        scratch.best.push(id, s);
        if let Some(at) = scratch.offer(l, id, s) {
            graph.prefetch_neighbours(id);
            // Later inserts shift earlier positions right, never left of `at`.
            first = Some(first.map_or(at, |f| if at <= f { at } else { f }));
        }
    }
    first
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::keys::{KeyRows, KeySlice};
    use rand::{Rng, SeedableRng};

    /// Node i links to i±1, i±7 and i±31 (mod n): connected, with short and long edges.
    /// (The group search's tests use it too.)
    pub(in crate::qgraph) struct Ring(Vec<Vec<u32>>);

    impl Ring {
        pub(in crate::qgraph) fn new(n: usize) -> Self {
            let m = |i: usize, o: isize| ((i as isize + o).rem_euclid(n as isize)) as u32;
            Ring(
                (0..n)
                    .map(|i| [1, -1, 7, -7, 31, -31].iter().map(|&o| m(i, o)).collect())
                    .collect(),
            )
        }
    }

    impl Adjacency for Ring {
        fn nodes(&self) -> usize {
            self.0.len()
        }
        fn neighbours(&self, id: u32) -> &[u32] {
            &self.0[id as usize]
        }
    }

    fn run(g: &Ring, keys: &KeySlice<'_>, q: &[f32], l: usize, s: &mut GraphScratch) -> Vec<u32> {
        let scored = beam_search_k(g, keys, q, &[0, 5], l, 10, s);
        let mut hits = crate::Hits::default();
        s.best.drain_into(&mut hits);
        let mut out = hits.ids;
        out.push(scored as u32);
        out
    }

    /// A key store that records every key it scores, with its score.
    struct Recording<'a> {
        keys: &'a KeySlice<'a>,
        seen: std::sync::Mutex<Vec<(f32, u32)>>,
    }

    impl KeyStore for Recording<'_> {
        fn len(&self) -> usize {
            self.keys.len()
        }
        fn dim(&self) -> usize {
            self.keys.dim()
        }
        fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut [f32]) {
            self.keys.score_ids(query, ids, out);
            let mut seen = self.seen.lock().unwrap();
            seen.extend(out.iter().zip(ids).map(|(&s, &i)| (s, i)));
        }
        fn score_range(&self, query: &[f32], start: usize, out: &mut [f32]) {
            self.keys.score_range(query, start, out)
        }
        fn row_f32(&self, id: u32, out: &mut [f32]) {
            self.keys.row_f32(id, out)
        }
    }

    /// The result is the k best of every key the search scored, whether the beam is narrower
    /// than k (the result heap takes every key) or at least as wide (the beam's first k), and
    /// each key is scored once.
    #[test]
    fn results_are_the_k_best_of_every_key_scored() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (n, d) = (600, 8);
        let g = Ring::new(n);
        let f: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let keys = KeySlice::new(KeyRows::F32(&f), d).unwrap();
        let mut s = GraphScratch::default();
        for trial in 0..40 {
            let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let (l, k) = [(4, 10), (10, 10), (32, 10), (16, 64), (64, 16), (1, 1)][trial % 6];
            let store = Recording {
                keys: &keys,
                seen: Default::default(),
            };
            let scored = beam_search_k(&g, &store, &q, &[0, 5], l, k, &mut s);
            let mut hits = crate::Hits::default();
            s.best.drain_into(&mut hits);
            let mut seen = store.seen.into_inner().unwrap();
            assert_eq!(seen.len(), scored, "trial {trial}");
            let mut ids: Vec<u32> = seen.iter().map(|e| e.1).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), scored, "a key scored twice, trial {trial}");
            seen.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<f32> = seen.iter().take(k).map(|e| e.0).collect();
            assert_eq!(hits.scores, want, "trial {trial} (l {l}, k {k})");
            for (id, sc) in hits.ids.iter().zip(&hits.scores) {
                assert!(seen.contains(&(*sc, *id)), "trial {trial}: {id} not scored");
            }
        }
    }

    /// The visited set is cleared between searches: a reused scratch (also one grown from a
    /// smaller graph, or after a search that visited everything) answers exactly like a fresh
    /// one, and a beam as wide as the graph scores every node once and finds the exact top k.
    #[test]
    fn reused_scratch_answers_like_a_fresh_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let d = 8;
        let mut reused = GraphScratch::default();
        for n in [50usize, 700, 300] {
            let g = Ring::new(n);
            let f: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let keys = KeySlice::new(KeyRows::F32(&f), d).unwrap();
            for trial in 0..20 {
                let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let l = if trial % 5 == 0 { n } else { 4 + trial };
                let want = run(&g, &keys, &q, l, &mut GraphScratch::default());
                assert_eq!(
                    run(&g, &keys, &q, l, &mut reused),
                    want,
                    "n {n} trial {trial}"
                );
                if l == n {
                    assert_eq!(*want.last().unwrap() as usize, n, "every node scored once");
                    let mut exact: Vec<(f32, u32)> = (0..n as u32)
                        .map(|i| {
                            let s = f[i as usize * d..(i as usize + 1) * d]
                                .iter()
                                .zip(&q)
                                .map(|(a, b)| a * b)
                                .sum();
                            (s, i)
                        })
                        .collect();
                    exact.sort_by(|a, b| b.0.total_cmp(&a.0));
                    let top: Vec<u32> = exact[..10].iter().map(|e| e.1).collect();
                    assert_eq!(&want[..10], &top[..]);
                }
            }
        }
    }
}

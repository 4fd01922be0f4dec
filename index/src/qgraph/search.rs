//! Best-first beam search over the query-guided graph (RoarGraph §4.3, "search with list size
//! L"): keep the L best nodes seen, expand the best unexpanded one, stop when all L are expanded.
//! Visited nodes are stamped with a generation counter, so a search starts in O(1) and never
//! allocates once its scratch has grown.

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
    stamps: Vec<u32>,
    generation: u32,
    /// The beam, best first, at most L long.
    pub pool: Vec<Cand>,
    ids: Vec<u32>,
    scores: Vec<f32>,
    /// The k best of every node scored, not only those left in the beam: the result set.
    pub best: crate::TopK,
}

impl GraphScratch {
    /// Starts a new search over `n` nodes: O(1) except when the stamps wrap or must grow.
    fn begin(&mut self, n: usize) {
        if self.stamps.len() < n {
            self.stamps.resize(n, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamps.iter_mut().for_each(|s| *s = 0);
            self.generation = 1;
        }
        self.pool.clear();
    }

    /// Marks `id` visited; returns true when it was not visited before in this search.
    #[inline]
    fn visit(&mut self, id: u32) -> bool {
        match self.stamps.get_mut(id as usize) {
            Some(s) if *s != self.generation => {
                *s = self.generation;
                true
            }
            _ => false,
        }
    }

    /// Offers a scored node to a beam of width `l`.
    #[inline]
    fn offer(&mut self, l: usize, id: u32, score: f32) -> Option<usize> {
        if self.pool.len() >= l && self.pool.last().is_some_and(|c| c.score >= score) {
            return None;
        }
        let at = self.pool.partition_point(|c| c.score >= score);
        if self.pool.len() >= l {
            self.pool.pop();
        }
        self.pool.insert(
            at,
            Cand {
                score,
                id,
                expanded: false,
            },
        );
        Some(at)
    }
}

/// The adjacency a search walks: `neighbours(id)` lists id's out-edges.
pub trait Adjacency {
    /// Number of nodes.
    fn nodes(&self) -> usize;
    /// Out-edges of `id`.
    fn neighbours(&self, id: u32) -> &[u32];
}

/// Beam search for `query` from `entries` with list size `l`. Leaves the beam (best first) in
/// `scratch.pool`, the `k` best of every key scored in `scratch.best` (so the beam may be
/// narrower than k), and returns the number of keys scored.
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
    scratch.best.reset(k);
    search_inner(graph, keys, query, entries, l, scratch)
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
    let _ = score_and_offer(keys, query, l, scratch, &mut scored);
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
        let best_new = score_and_offer(keys, query, l, scratch, &mut scored);
        cursor = best_new.map_or(at, |p| p.min(at));
    }
    scored
}

fn score_and_offer(
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
            // Later inserts shift earlier positions right, never left of `at`.
            first = Some(first.map_or(at, |f| if at <= f { at } else { f }));
        }
    }
    first
}

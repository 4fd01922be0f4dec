//! Joint beam search for the query heads of one GQA group over their shared KV head's graph.
//!
//! The heads of a group search the same graph over the same keys, and at long contexts the
//! search is bound by scattered row reads. Here the group shares one visited
//! set: when any head expands a node, each unvisited neighbour's row is read once and scored
//! against every query of the group, and offered to every head's beam and top k. Rows read =
//! the union of what the heads visit instead of the sum (measured on the decode bench's 128K
//! synthetic data: union/sum 0.77 for 4 heads; on the real 8K data 0.53 for 3). The daemon's
//! request searches the heads separately: the joint search is slower per row offered, and
//! docs/design/0015-group-retrieve.md gives the measurements.
//! Each head still walks its own beam of width L; the heads take turns expanding one node
//! each, so no head's walk runs ahead of the rows the others already brought in.

use super::search::{offer, Adjacency, Cand, GraphScratch};
use crate::{KeyStore, TopK};

/// One query head's state in a joint search.
#[derive(Debug, Default, Clone)]
pub struct HeadBeam {
    /// The head's beam, best first, at most L long.
    pool: Vec<Cand>,
    /// The head's k best of every key scored by the group.
    pub(super) best: TopK,
    /// Position of the head's first unexpanded candidate (a lower bound).
    cursor: usize,
}

/// A bitset of node ids that a search clears by unsetting only the bits it set.
#[derive(Debug, Default, Clone)]
pub struct NodeSet {
    bits: Vec<u64>,
    set: Vec<u32>,
}

impl NodeSet {
    /// Empties the set and sizes it for `n` nodes.
    fn begin(&mut self, n: usize) {
        for &id in &self.set {
            if let Some(w) = self.bits.get_mut(id as usize / 64) {
                *w &= !(1u64 << (id % 64));
            }
        }
        self.set.clear();
        if self.bits.len() < n.div_ceil(64) {
            self.bits.resize(n.div_ceil(64), 0);
        }
    }

    /// Adds `id`; returns true when it was not in the set.
    #[inline]
    fn insert(&mut self, id: u32) -> bool {
        let bit = 1u64 << (id % 64);
        match self.bits.get_mut(id as usize / 64) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                self.set.push(id);
                true
            }
            _ => false,
        }
    }
}

/// Joint beam search of `queries` (`heads x dim`, row-major) from `entries` with list size `l`
/// per head. Leaves each head's k best in `scratch.heads[h].best` and returns the number of
/// keys scored (rows read; each is scored against every head). With one head it walks exactly
/// as [`super::search::beam_search_k`]. `queries.len()` must be a multiple of `keys.dim()`.
pub fn group_search_k(
    graph: &dyn Adjacency,
    keys: &dyn KeyStore,
    queries: &[f32],
    entries: &[u32],
    l: usize,
    k: usize,
    scratch: &mut GraphScratch,
) -> usize {
    let d = keys.dim().max(1);
    let heads = queries.len() / d;
    let n = graph.nodes().min(keys.len());
    scratch.begin(n);
    scratch.expanded.begin(n);
    let l = l.max(1);
    if scratch.heads.len() < heads {
        scratch.heads.resize_with(heads, HeadBeam::default);
    }
    for hb in &mut scratch.heads[..heads] {
        hb.pool.clear();
        hb.best.reset(k);
        hb.cursor = 0;
    }
    let mut scored = 0;
    scratch.ids.clear();
    for &e in entries {
        if (e as usize) < n && scratch.visit(e) {
            scratch.ids.push(e);
        }
    }
    score_and_offer_all(graph, keys, queries, l, heads, scratch, &mut scored);
    loop {
        let mut progressed = false;
        for h in 0..heads {
            let hb = &mut scratch.heads[h];
            let Some(off) = hb.pool[hb.cursor..].iter().position(|c| !c.expanded) else {
                hb.cursor = hb.pool.len();
                continue;
            };
            progressed = true;
            let at = hb.cursor + off;
            hb.pool[at].expanded = true;
            hb.cursor = at;
            let node = hb.pool[at].id;
            // A node another head expanded has only visited neighbours: skip its edge list.
            if !scratch.expanded.insert(node) {
                continue;
            }
            scratch.ids.clear();
            for &nb in graph.neighbours(node) {
                if (nb as usize) < n && scratch.visit(nb) {
                    scratch.ids.push(nb);
                }
            }
            keys.prefetch(&scratch.ids);
            score_and_offer_all(graph, keys, queries, l, heads, scratch, &mut scored);
        }
        if !progressed {
            break;
        }
    }
    scored
}

/// Scores `scratch.ids` against every head's query (the rows stay in L1 between the heads'
/// passes) and offers them to every head's beam and top k, moving each head's cursor back to
/// the best position that changed.
fn score_and_offer_all(
    graph: &dyn Adjacency,
    keys: &dyn KeyStore,
    queries: &[f32],
    l: usize,
    heads: usize,
    scratch: &mut GraphScratch,
    scored: &mut usize,
) {
    let m = scratch.ids.len();
    if m == 0 {
        return;
    }
    let d = keys.dim().max(1);
    *scored += m;
    scratch.scores.resize(m, 0.0);
    for h in 0..heads {
        let q = &queries[h * d..(h + 1) * d];
        keys.score_ids(q, &scratch.ids, &mut scratch.scores[..m]);
        let hb = &mut scratch.heads[h];
        for (&id, &s) in scratch.ids.iter().zip(&scratch.scores[..m]) {
            hb.best.push(id, s);
            if let Some(at) = offer(&mut hb.pool, l, id, s) {
                graph.prefetch_neighbours(id);
                // Later inserts shift earlier positions right, never left of `at`.
                hb.cursor = hb.cursor.min(at);
            }
        }
    }
}

/// [`crate::MipsIndex::search_group`] over `graph`: checks the input, runs
/// [`group_search_k`] and drains each head's k best into `outs`.
#[allow(clippy::too_many_arguments)]
pub fn search_group(
    graph: &dyn Adjacency,
    keys: &dyn KeyStore,
    queries: &[f32],
    k: usize,
    entries: &[u32],
    l: usize,
    scratch: &mut crate::SearchScratch,
    outs: &mut [crate::Hits],
) -> Result<crate::SearchStats, crate::IndexError> {
    crate::check_group_shape(keys, queries, outs.len())?;
    outs.iter_mut().for_each(|o| o.clear());
    let n = graph.nodes().min(keys.len());
    if n == 0 || k == 0 || outs.is_empty() {
        return Ok(crate::SearchStats {
            scored: 0,
            k_clamped: k > n,
            bytes_read: 0,
        });
    }
    let g = &mut scratch.graph;
    let scored = group_search_k(graph, keys, queries, entries, l, k.min(n), g);
    for (hb, out) in g.heads.iter_mut().zip(outs.iter_mut()) {
        hb.best.drain_into(out);
    }
    Ok(crate::SearchStats {
        scored,
        k_clamped: k > n,
        bytes_read: scored * keys.dim() * 2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyRows, KeySlice};
    use crate::qgraph::search::beam_search_k;
    use crate::qgraph::search::tests::Ring;
    use crate::{build_index, Hits, IndexKind, IndexParams, SearchScratch};
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut impl Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// With one query the joint search walks exactly as the plain one: same hits, same scores,
    /// same number of keys scored (also with a reused scratch).
    #[test]
    fn one_query_equals_the_plain_search() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (n, d) = (400, 8);
        let g = Ring::new(n);
        let f = random(&mut rng, n * d);
        let keys = KeySlice::new(KeyRows::F32(&f), d).unwrap();
        let (mut plain, mut joint) = (GraphScratch::default(), GraphScratch::default());
        for trial in 0..30 {
            let q = random(&mut rng, d);
            let l = 2 + trial;
            let s1 = beam_search_k(&g, &keys, &q, &[0, 9], l, 10, &mut plain);
            let s2 = group_search_k(&g, &keys, &q, &[0, 9], l, 10, &mut joint);
            assert_eq!(s1, s2, "trial {trial}");
            let (mut a, mut b) = (Hits::default(), Hits::default());
            plain.best.drain_into(&mut a);
            joint.heads[0].best.drain_into(&mut b);
            assert_eq!(a.ids, b.ids, "trial {trial}");
            assert_eq!(a.scores, b.scores, "trial {trial}");
        }
    }

    /// A beam as wide as the graph reads every row once for the whole group and finds the
    /// exact top k of every head.
    #[test]
    fn wide_beam_finds_every_heads_exact_top_k() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (n, d, heads, k) = (300, 8, 4, 12);
        let g = Ring::new(n);
        let f = random(&mut rng, n * d);
        let keys = KeySlice::new(KeyRows::F32(&f), d).unwrap();
        let qs = random(&mut rng, heads * d);
        let mut s = GraphScratch::default();
        let scored = group_search_k(&g, &keys, &qs, &[3], n, k, &mut s);
        assert_eq!(scored, n, "every row read once");
        for h in 0..heads {
            let q = &qs[h * d..(h + 1) * d];
            let mut exact: Vec<(f32, u32)> = (0..n)
                .map(|i| {
                    (
                        f[i * d..(i + 1) * d]
                            .iter()
                            .zip(q)
                            .map(|(a, b)| a * b)
                            .sum(),
                        i as u32,
                    )
                })
                .collect();
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut got = Hits::default();
            s.heads[h].best.drain_into(&mut got);
            let want: Vec<u32> = exact[..k].iter().map(|e| e.1).collect();
            assert_eq!(got.ids, want, "head {h}");
        }
    }

    /// The graph's override agrees with the trait's per-head default where both are exact
    /// (flat), and bad input is an error or an empty answer, never a panic.
    #[test]
    fn graph_group_search_checks_its_input() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (n, d) = (200, 8);
        let f = random(&mut rng, n * d);
        let keys = KeySlice::new(KeyRows::F32(&f), d).unwrap();
        let mut params = IndexParams::default();
        params.graph.search_list = n;
        let graph = build_index(
            IndexKind::Graph,
            &keys,
            &crate::TrainingSignal::None,
            &params,
        )
        .unwrap();
        let flat = crate::FlatIndex::new(n);
        let mut scratch = SearchScratch::new();
        let qs = random(&mut rng, 3 * d);
        let mut outs = vec![Hits::default(); 3];
        let mut want = vec![Hits::default(); 3];
        graph
            .search_group(&keys, &qs, 5, &mut scratch, &mut outs)
            .unwrap();
        flat.search_group(&keys, &qs, 5, &mut scratch, &mut want)
            .unwrap();
        for h in 0..3 {
            assert_eq!(outs[h].ids, want[h].ids, "head {h}");
        }
        let short = &qs[..3 * d - 1];
        assert!(graph
            .search_group(&keys, short, 5, &mut scratch, &mut outs)
            .is_err());
        assert!(flat
            .search_group(&keys, short, 5, &mut scratch, &mut outs)
            .is_err());
        let mut nan = qs.clone();
        nan[4] = f32::NAN;
        assert!(graph
            .search_group(&keys, &nan, 5, &mut scratch, &mut outs)
            .is_err());
        let st = graph
            .search_group(&keys, &qs, 0, &mut scratch, &mut outs)
            .unwrap();
        assert_eq!(st.scored, 0);
        assert!(outs.iter().all(|o| o.is_empty()));
        let none: &mut [Hits] = &mut [];
        assert_eq!(
            graph
                .search_group(&keys, &[], 5, &mut scratch, none)
                .unwrap()
                .scored,
            0
        );
        let empty = KeySlice::new(KeyRows::F32(&[]), d).unwrap();
        let st = graph
            .search_group(&empty, &qs, 5, &mut scratch, &mut outs)
            .unwrap();
        assert_eq!(st.scored, 0);
    }
}

//! Incremental insert guided by remembered queries.
//!
//! A key that arrives after the build has no training list of its own, and searching for it
//! with its own vector (what HNSW does) walks the graph with an out-of-distribution probe: the
//! graph was built for the queries, not for the keys. So the graph remembers a small sample of
//! its training queries (f16, with each one's Nq-th best score over all keys: the bar a key must
//! clear to enter that query's top list) and links a new key u as the build would have:
//!
//! 1. Score u against every remembered query (one block product through the SIMD kernels).
//! 2. The queries whose top-Nq u would enter (score above the bar), best margin first, up to
//!    `insert_queries` of them; when none qualifies, the single query u comes closest to.
//! 3. For each: a beam search with that query gives its current top list; u takes the place
//!    its score earns in it. As in the build, the list's pivot (its best key) and u's rank
//!    neighbours (within `rank_window`) become u's candidates and u becomes theirs.
//! 4. u's out-edges are its pruned candidates; each node that gains u as a candidate takes it
//!    (re-pruning its edges when full), and u's out-neighbours take a reverse edge while they
//!    have room. If no edge into u survived, the pivot is forced to point at u.
//!
//! New queries (decode queries whose positions slide out of the daemon's window) join the
//! memory through [`QueryGuidedGraph::remember_queries`], replacing the oldest once it is full.

use super::build::candidates;
use super::connect::{connect, link_sequence};
use super::prune::{prune, prune_admits, sq_norm, Norms, PruneScratch};
use super::search::{beam_search, Adjacency, GraphScratch};
use super::train::training_lists;
use super::QueryGuidedGraph;
use crate::error::check_finite;
use crate::keys::KeyRows;
use crate::{IndexError, KeySlice, KeyStore, TrainingSignal};
use rayon::prelude::*;

/// Incremental insert of keys `g.len()..keys.len()` (see the module comment).
pub fn insert(g: &mut QueryGuidedGraph, keys: &dyn KeyStore) -> Result<(), IndexError> {
    let old = grow(g, keys)?;
    link_unlinked(g, keys, old)?;
    link_sequence(g, g.params.sequence_edges, old);
    Ok(())
}

/// Insert with the new positions' queries: they are remembered, their exact top lists over all
/// keys are merged into the graph as the build would (pivot and rank-window candidates, pruned
/// together with each node's edges), keys no list reached are linked through the memory, and a
/// connectivity pass makes every key reachable.
pub fn insert_with_queries(
    g: &mut QueryGuidedGraph,
    keys: &dyn KeyStore,
    queries: &[f32],
) -> Result<(), IndexError> {
    g.remember_queries(keys, queries)?;
    let old = grow(g, keys)?;
    let d = keys.dim();
    let positions = vec![keys.len().saturating_sub(1) as u32; queries.len() / d.max(1)];
    let signal = TrainingSignal::Queries {
        vectors: queries,
        positions: &positions,
    };
    let mut params = g.params.clone();
    params.max_train_queries = positions.len().max(1);
    // The build's Nq (already density-adjusted), whatever this batch's own density.
    params.sparse_train_topk = params.train_topk;
    let (lists, _) = training_lists(keys, &signal, &params)?;
    merge_lists(g, keys, &lists);
    link_unlinked(g, keys, old)?;
    connect(g, keys);
    link_sequence(g, g.params.sequence_edges, old);
    Ok(())
}

/// Adds empty slots for keys `g.len()..keys.len()`, with their squared norms (each new row
/// is read once, to refuse non-finite keys and for its norm); returns the old length.
pub(super) fn grow(g: &mut QueryGuidedGraph, keys: &dyn KeyStore) -> Result<usize, IndexError> {
    let (old, n, m) = (g.deg.len(), keys.len(), g.params.degree);
    if n < old {
        return Err(IndexError::InvalidArgument(format!(
            "store holds {n} keys but the graph already indexes {old}"
        )));
    }
    let mut row = vec![0.0f32; keys.dim()];
    let mut norms = Vec::with_capacity(n - old);
    for u in old..n {
        keys.row_f32(u as u32, &mut row);
        check_finite("key", &row)?;
        norms.push(sq_norm(&row));
    }
    g.edges.reserve_exact((n - old) * m);
    g.deg.reserve_exact(n - old);
    g.norms.reserve_exact(n - old);
    g.edges.resize(n * m, 0);
    g.deg.resize(n, 0);
    g.norms.extend_from_slice(&norms);
    Ok(old)
}

/// Merges training lists into the graph: every node that gains candidates is re-pruned over its
/// edges and its candidates together, then takes reverse edges while it has room.
fn merge_lists(g: &mut QueryGuidedGraph, keys: &dyn KeyStore, lists: &[Vec<u32>]) {
    let n = g.deg.len();
    let cands = candidates(lists, n, g.params.rank_window);
    let (m, alpha, fill) = (g.params.degree, g.params.alpha, g.params.fill_degree);
    let snap: &QueryGuidedGraph = g;
    let norms = Norms::of_table(&snap.norms);
    let updates: Vec<(u32, Vec<u32>)> = (0..n)
        .into_par_iter()
        .filter(|&p| !cands.of(p).is_empty())
        .map_init(PruneScratch::default, |s, p| {
            let mut c = cands.of(p).to_vec();
            c.extend_from_slice(snap.neighbours(p as u32));
            c.sort_unstable();
            c.dedup();
            c.retain(|&x| x as usize != p);
            let kept = prune(keys, norms, p as u32, &c, m, (alpha, fill), s);
            (p as u32, kept.to_vec())
        })
        .collect();
    for (p, a) in &updates {
        g.set_neighbours(*p as usize, a);
    }
    for (p, a) in &updates {
        for &c in a {
            g.link(c, *p);
        }
    }
}

/// Links each key `old..` that has no out-edge yet through the query memory.
pub(super) fn link_unlinked(
    g: &mut QueryGuidedGraph,
    keys: &dyn KeyStore,
    old: usize,
) -> Result<(), IndexError> {
    let (n, d, m) = (g.deg.len(), keys.dim(), g.params.degree);
    let mut s = GraphScratch::default();
    let mut row = vec![0.0f32; d];
    let mut q = vec![0.0f32; d];
    let mut qscores = vec![0.0f32; g.memory.len()];
    let mut picks: Vec<(f32, usize)> = Vec::new();
    let w = g.params.rank_window.max(1);
    let mut ps = PruneScratch::default();
    let mut kept: Vec<u32> = Vec::new();
    // Nodes that lost an edge into them with no replacement path (see `take_candidate`).
    let mut orphans: Vec<u32> = Vec::new();
    for u in old..n {
        let uid = u as u32;
        if g.deg[u] > 0 {
            continue;
        }
        keys.row_f32(uid, &mut row);
        if g.entries.is_empty() {
            g.entries.push(uid);
            continue;
        }
        // Step 1-2: the remembered queries whose top lists u would enter.
        picks.clear();
        if !g.memory.is_empty() {
            let mem = KeySlice::new(KeyRows::F16(&g.memory.rows), d)?;
            mem.score_range(&row, 0, &mut qscores);
            picks.extend(
                qscores
                    .iter()
                    .zip(&g.memory.bars)
                    .enumerate()
                    .map(|(i, (&sc, &bar))| (sc - bar, i)),
            );
            // The best `take` margins in order (as a stable sort by margin, best first, would
            // give them), without sorting the whole memory for every key.
            let qualified = picks.iter().filter(|p| p.0 >= 0.0).count();
            let take = qualified.clamp(1, g.params.insert_queries.max(1));
            let better =
                |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            if take < picks.len() {
                picks.select_nth_unstable_by(take - 1, better);
                picks.truncate(take);
            }
            picks.sort_unstable_by(better);
        }
        // Step 3: candidates of u, and the nodes that take u as a candidate.
        let mut cands: Vec<u32> = Vec::new();
        let mut takers: Vec<u32> = Vec::new();
        if picks.is_empty() {
            // No query memory (built from neighbour lists): probe with the key itself.
            beam_search(g, keys, &row, &g.entries, g.params.build_list, &mut s);
            cands.extend(s.pool.iter().map(|c| c.id).filter(|&id| id != uid));
            takers.extend(cands.iter().take(w));
        }
        for &(_, qi) in &picks {
            for (dst, x) in q.iter_mut().zip(&g.memory.rows[qi * d..(qi + 1) * d]) {
                *dst = x.to_f32();
            }
            beam_search(g, keys, &q, &g.entries, g.params.build_list, &mut s);
            let su = qscores[qi];
            let list: Vec<u32> = s
                .pool
                .iter()
                .map(|c| c.id)
                .filter(|&id| id != uid)
                .collect();
            let r = s.pool.partition_point(|c| c.score >= su).min(list.len());
            if r == 0 {
                // u is this query's best key: its pivot, so the whole list is its candidates.
                cands.extend_from_slice(&list);
            } else {
                takers.push(list[0]);
                cands.push(list[0]);
            }
            let lo = r.saturating_sub(w);
            let hi = (r + w).min(list.len());
            cands.extend_from_slice(&list[lo..hi]);
            takers.extend_from_slice(&list[lo..hi]);
        }
        cands.sort_unstable();
        cands.dedup();
        takers.sort_unstable();
        takers.dedup();
        // Step 4: u's out-edges, edges into u, reverse edges.
        kept.clear();
        kept.extend_from_slice(prune(
            keys,
            Norms::of_table(&g.norms),
            uid,
            &cands,
            m,
            (g.params.alpha, g.params.fill_degree),
            &mut ps,
        ));
        g.set_neighbours(u, &kept);
        let mut into_u = false;
        for &c in &takers {
            into_u |= take_candidate(g, keys, (c, uid), &mut orphans, &mut ps);
        }
        for &t in &kept {
            into_u |= g.link(t, uid);
        }
        if !into_u {
            let best = takers.first().or(kept.first()).copied();
            // b's weakest edge gives way to u; its target x is relinked from u (b → u → x).
            if let Some(x) = best.and_then(|b| g.link_displacing(b, uid)) {
                if !g.link(uid, x) {
                    orphans.push(x);
                }
            }
        }
    }
    // Rare (u had no room for a target it displaced): a full connectivity pass only then.
    if !orphans.is_empty() {
        connect(g, keys);
    }
    Ok(())
}

/// Node `c` takes `u` as a new candidate: appended while c has room, otherwise c's edges and u
/// are pruned together. When u loses, c keeps its edges; when u wins, each target c dropped
/// is relinked from u (c → u → x keeps x reachable), or listed in `orphans` when u is full.
/// Returns true when c → u is present afterwards.
fn take_candidate(
    g: &mut QueryGuidedGraph,
    keys: &dyn KeyStore,
    (c, u): (u32, u32),
    orphans: &mut Vec<u32>,
    ps: &mut PruneScratch,
) -> bool {
    if g.link(c, u) {
        return true;
    }
    let mut pool: Vec<u32> = g.neighbours(c).to_vec();
    pool.push(u);
    let Some(kept) = prune_admits(
        keys,
        Norms::of_table(&g.norms),
        (c, u),
        &pool,
        g.params.degree,
        (g.params.alpha, g.params.fill_degree),
        ps,
    ) else {
        return false;
    };
    if !kept.contains(&u) {
        return false;
    }
    g.set_neighbours(c as usize, kept);
    pool.pop(); // c's old targets
    for x in pool.into_iter().filter(|x| !kept.contains(x)) {
        if !g.link(u, x) {
            orphans.push(x);
        }
    }
    true
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{FlatIndex, GraphParams, Hits, MipsIndex, MipsIndexMut, SearchScratch};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Keys and queries from two offset clouds (queries out of distribution for the keys).
    pub(in crate::qgraph) fn data(n: usize, nq: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(7);
        let keys = (0..n * d)
            .map(|i| rng.gen_range(-1.0..1.0) + (i % d) as f32 * 0.05)
            .collect();
        let qs = (0..nq * d)
            .map(|i| rng.gen_range(-1.0..1.0) - (i % d) as f32 * 0.05)
            .collect();
        (keys, qs)
    }

    pub(in crate::qgraph) fn recall(
        g: &QueryGuidedGraph,
        keys: &KeySlice<'_>,
        tests: &[f32],
        k: usize,
    ) -> f64 {
        let d = keys.dim();
        let flat = FlatIndex::new(keys.len());
        let (mut s, mut exact, mut got) = (SearchScratch::new(), Hits::default(), Hits::default());
        let mut hit = 0;
        for q in tests.chunks_exact(d) {
            flat.search(keys, q, k, &mut s, &mut exact).unwrap();
            g.search(keys, q, k, &mut s, &mut got).unwrap();
            hit += got.ids.iter().filter(|i| exact.ids.contains(i)).count();
        }
        hit as f64 / (k * tests.len() / d) as f64
    }

    #[test]
    fn inserted_keys_are_reachable_and_recall_stays_near_a_rebuild() {
        let (n, d, cut) = (1200, 16, 1080);
        let (kv, qs) = data(n, 1300, d);
        let (train, tests) = qs.split_at(1200 * d);
        let keys = KeySlice::new(KeyRows::F32(&kv), d).unwrap();
        let part = KeySlice::new(KeyRows::F32(&kv[..cut * d]), d).unwrap();
        let params = GraphParams {
            train_topk: 20,
            search_list: 32,
            kept_queries: 64,
            ..GraphParams::default()
        };
        let pos: Vec<u32> = (0..1200).collect();
        let full = TrainingSignal::Queries {
            vectors: train,
            positions: &pos,
        };
        let rebuilt = super::super::build::build(&keys, &full, &params).unwrap();
        let early = TrainingSignal::Queries {
            vectors: &train[..cut * d],
            positions: &pos[..cut],
        };
        let base = super::super::build::build(&part, &early, &params).unwrap();
        assert_eq!(base.query_memory().len(), 64);
        let mut keys_only = base.clone();
        keys_only.insert(&keys).unwrap();
        let mut with_q = base;
        with_q
            .insert_with_queries(&keys, &train[cut * d..])
            .unwrap();
        for g in [&keys_only, &with_q] {
            assert_eq!(g.len(), n);
            assert!(super::super::connect::unreached(g).is_empty());
        }
        let r_full = recall(&rebuilt, &keys, tests, 10);
        let r_keys = recall(&keys_only, &keys, tests, 10);
        let r_q = recall(&with_q, &keys, tests, 10);
        assert!(
            r_keys > r_full - 0.1,
            "keys-only insert {r_keys} vs rebuild {r_full}"
        );
        assert!(
            r_q > r_full - 0.05,
            "insert with queries {r_q} vs rebuild {r_full}"
        );
        // The memory stays bounded by kept_queries as queries keep arriving.
        assert_eq!(with_q.query_memory().len(), 64);
    }

    #[test]
    fn insert_rejects_a_shrunken_store_and_bad_queries() {
        let (kv, qs) = data(100, 10, 8);
        let keys = KeySlice::new(KeyRows::F32(&kv), 8).unwrap();
        let pos: Vec<u32> = (0..10).collect();
        let t = TrainingSignal::Queries {
            vectors: &qs,
            positions: &pos,
        };
        let mut g = super::super::build::build(&keys, &t, &GraphParams::default()).unwrap();
        let small = KeySlice::new(KeyRows::F32(&kv[..80]), 8).unwrap();
        assert!(g.insert(&small).is_err());
        assert!(g.insert_with_queries(&keys, &qs[..5]).is_err());
        let nan = vec![f32::NAN; 8];
        assert!(g.remember_queries(&keys, &nan).is_err());
    }
}

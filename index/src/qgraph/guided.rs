//! Approximate insert with queries: the cheap variant of
//! [`insert_with_queries`](super::insert::insert_with_queries) for the daemon's background
//! inserts, where the guiding queries are recent decode queries.
//!
//! The exact variant gives each query its exact top-Nq list (a flat scan over every key) and
//! its exact bar; at 128K keys, 32 layers and a few KV heads that is seconds of CPU per insert
//! batch. Here, in two halves so that the daemon holds a head's exclusive lock for the cheap
//! one only:
//!
//! [`guide_insert`] (read-only, `&self`):
//! 1. Each guide query's top-Nq comes from a beam search over the graph (width
//!    `max(Nq, build_list)`), merged with an exact score of the keys not indexed yet (a block
//!    product over the batch, which is small). Its bar is the Nq-th score found: a lower bound
//!    of the exact bar, so it admits slightly more keys to its list in later inserts.
//! 2. The lists' merge is planned as the build merges its lists (pivot and rank-window
//!    candidates; each touched node re-pruned over its edges and its candidates together), over
//!    the touched nodes only (no per-key table).
//!
//! [`insert_guided`] (`&mut self`):
//! 3. The new keys are linked as a keys-only [`insert`](super::insert::insert) links them
//!    (through the remembered queries whose bars they clear), so they are reachable.
//! 4. The planned re-prunes are applied (a node step 3 changed is re-pruned again); a target a
//!    node drops is relinked from one of its new out-neighbours (p → c → x), so every key
//!    stays reachable without a breadth-first pass (one runs only if a relink finds no room).
//!    With [`GraphParams::remember_guides`](super::GraphParams::remember_guides) the guides
//!    also join the query memory with their bars (off by default: see its doc).
//!
//! Step 3 alone (keys only) loses recall against a rebuild: the new keys are linked only for the
//! old training queries. Lists without step 3 were worse still with later queries as guides
//! (real code set, batches of 64: recall@100 0.834 vs 0.861 keys only at L 96); both together
//! reach 0.905 (rebuild 0.913). See docs/design/0006-guided-insert.md.
//!
//! Cost, with Q guides, B new keys: [`guide_insert`] runs Q beam searches of width
//! `max(Nq, build_list)` (about 8-15 x that many rows scored each, as scattered reads), Q x B
//! scores, and one prune (O(candidates x M x dim)) per touched node, at most about Q x Nq of
//! them; [`insert_guided`] costs a keys-only insert of B keys (about `insert_queries` beam
//! searches of width `build_list` per key) plus re-prunes of the few nodes it touched itself.
//! Nothing is O(n) in the graph's size except its growth by B slots.

use super::build::for_each_candidate;
use super::connect::{connect, link_sequence};
use super::insert::{grow, link_unlinked};
use super::prune::{key_norms_from, prune, Norms, PruneScratch};
use super::search::{beam_search, Adjacency, GraphScratch};
use super::QueryGuidedGraph;
use crate::error::check_finite;
use crate::{IndexError, KeyStore};
use rayon::prelude::*;

/// Guide queries with their approximate top lists: the read-only half of a guided insert,
/// prepared by [`crate::MipsIndexMut::guide_insert`] under a shared lock (searches go on
/// meanwhile) and applied by [`crate::MipsIndexMut::insert_guided`] under an exclusive one.
#[derive(Clone, Debug, Default)]
pub struct InsertGuide {
    /// The queries, row-major.
    queries: Vec<f32>,
    /// Each query's Nq-th score found.
    bars: Vec<f32>,
    /// The re-prunes the lists call for, planned on the graph as it stood.
    plan: Vec<NodeUpdate>,
    /// Keys indexed and keys in the store when it was prepared: it applies to that insert only.
    indexed: usize,
    keys: usize,
}

impl InsertGuide {
    /// Number of guide queries with a list.
    pub fn len(&self) -> usize {
        self.bars.len()
    }

    /// True when it guides nothing (the insert is then keys only).
    pub fn is_empty(&self) -> bool {
        self.bars.is_empty()
    }
}

/// Checks guide queries: whole rows of `keys.dim()` finite floats.
pub(crate) fn check_guides(keys: &dyn KeyStore, queries: &[f32]) -> Result<(), IndexError> {
    let d = keys.dim();
    if d == 0 || !queries.len().is_multiple_of(d) {
        return Err(IndexError::BadShape(format!(
            "{} guide query floats is not a multiple of dim {d}",
            queries.len()
        )));
    }
    check_finite("guide query", queries)
}

/// Step 2 ahead of time, read-only: each query's approximate top-Nq over the keys `g` indexes
/// (beam search) and the keys it does not index yet (`g.len()..keys.len()`, scored exactly),
/// and the Nq-th score found (its bar).
pub fn guide_insert(
    g: &QueryGuidedGraph,
    keys: &dyn KeyStore,
    queries: &[f32],
) -> Result<InsertGuide, IndexError> {
    check_guides(keys, queries)?;
    let (d, old, n) = (keys.dim(), g.deg.len(), keys.len());
    if n < old {
        return Err(IndexError::InvalidArgument(format!(
            "store holds {n} keys but the graph already indexes {old}"
        )));
    }
    if old == 0 || queries.is_empty() {
        return Ok(InsertGuide::default());
    }
    let nq = g.params.train_topk.clamp(1, n);
    let width = nq.max(g.params.build_list);
    let per: Vec<(Vec<u32>, f32)> = queries
        .par_chunks_exact(d)
        .map_init(
            || (GraphScratch::default(), vec![0.0f32; n - old]),
            |(s, fresh), q| {
                beam_search(g, keys, q, &g.entries, width, s);
                keys.score_range(q, old, fresh);
                let mut all: Vec<(f32, u32)> = s.pool.iter().map(|c| (c.score, c.id)).collect();
                all.extend(
                    fresh
                        .iter()
                        .enumerate()
                        .map(|(i, &sc)| (sc, (old + i) as u32)),
                );
                all.sort_by(|a, b| b.0.total_cmp(&a.0));
                all.truncate(nq);
                let bar = all.last().map_or(f32::NEG_INFINITY, |x| x.0);
                (all.into_iter().map(|x| x.1).collect(), bar)
            },
        )
        .collect();
    let (lists, bars): (Vec<Vec<u32>>, Vec<f32>) = per.into_iter().unzip();
    let plan = plan_merge(g, keys, &lists);
    Ok(InsertGuide {
        queries: queries.to_vec(),
        bars,
        plan,
        indexed: old,
        keys: n,
    })
}

/// Incremental insert of keys `g.len()..keys.len()` guided by `guide` (see the module
/// comment); with `remember_guides` its queries join the query memory with their approximate
/// bars. A guide
/// prepared for another state (other keys indexed, or another store length) is not applied:
/// the insert is then keys only, like one with an empty guide.
pub fn insert_guided(
    g: &mut QueryGuidedGraph,
    keys: &dyn KeyStore,
    guide: &InsertGuide,
) -> Result<(), IndexError> {
    let fits = guide.indexed == g.deg.len() && guide.keys == keys.len();
    let old = grow(g, keys)?;
    // Step 1: keys only, as `insert` links them (through the remembered queries).
    link_unlinked(g, keys, old)?;
    if fits && !guide.is_empty() {
        let d = keys.dim();
        if g.params.remember_guides {
            for (q, &bar) in guide.queries.chunks_exact(d).zip(&guide.bars) {
                g.memory.push(q, bar, g.params.kept_queries);
            }
        }
        if !apply_merge(g, keys, &guide.plan).is_empty() {
            connect(g, keys);
        }
    }
    link_sequence(g, g.params.sequence_edges, old);
    Ok(())
}

/// One touched node's planned re-prune: computed on the graph as it stood when the guide was
/// prepared, applied as is when the node's edges are still `before`.
#[derive(Clone, Debug)]
struct NodeUpdate {
    node: u32,
    /// Its candidates from the lists (without its edges).
    cands: Vec<u32>,
    /// Its edges when planned, and what the prune kept of those and the candidates.
    before: Vec<u32>,
    kept: Vec<u32>,
}

/// Step 3, planned read-only (the expensive half: one prune per touched node, in parallel):
/// each node the lists touch, re-pruned over its edges and its candidates together, as the
/// build merges its lists (pivot and rank-window candidates).
fn plan_merge(g: &QueryGuidedGraph, keys: &dyn KeyStore, lists: &[Vec<u32>]) -> Vec<NodeUpdate> {
    let w = g.params.rank_window;
    // (node, candidate) pairs, as `build::candidates` makes them, for the touched nodes only.
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    for_each_candidate(lists, w, &mut |p, cands| {
        pairs.extend(cands.iter().map(|&c| (p, c)))
    });
    pairs.retain(|&(p, c)| p != c);
    pairs.sort_unstable();
    pairs.dedup();
    let groups: Vec<&[(u32, u32)]> = pairs.chunk_by(|a, b| a.0 == b.0).collect();
    // The graph's norm table, and the norms of the keys it does not index yet (the batch).
    let fresh = key_norms_from(keys, g.norms.len());
    let norms = Norms {
        indexed: &g.norms,
        fresh: &fresh,
    };
    let (m, alpha, fill) = (g.params.degree, g.params.alpha, g.params.fill_degree);
    groups
        .par_iter()
        .map_init(PruneScratch::default, |s, grp| {
            let node = grp[0].0;
            let before = g.neighbours(node).to_vec();
            let cands: Vec<u32> = grp.iter().map(|x| x.1).collect();
            let mut c = cands.clone();
            c.extend_from_slice(&before);
            c.sort_unstable();
            c.dedup();
            let kept = prune(keys, norms, node, &c, m, (alpha, fill), s).to_vec();
            NodeUpdate {
                node,
                cands,
                before,
                kept,
            }
        })
        .collect()
}

/// Step 3, applied: each planned node whose edges are unchanged takes its planned edges; one
/// that changed since (the keys-only links of step 1 reached it) is re-pruned now. A target a
/// node drops is relinked from one of its new out-neighbours (p → c → x), and each kept
/// candidate takes a reverse edge while it has room. Returns the dropped targets that found
/// no node with room (then a connectivity pass is due).
fn apply_merge(g: &mut QueryGuidedGraph, keys: &dyn KeyStore, plan: &[NodeUpdate]) -> Vec<u32> {
    let norms = Norms::of_table(&g.norms);
    let mut s = PruneScratch::default();
    let (m, alpha, fill) = (g.params.degree, g.params.alpha, g.params.fill_degree);
    let mut updates: Vec<(u32, Vec<u32>, Vec<u32>)> = Vec::with_capacity(plan.len());
    for up in plan {
        let now = g.neighbours(up.node);
        let kept = if now == up.before.as_slice() {
            up.kept.clone()
        } else {
            let mut c = up.cands.clone();
            c.extend_from_slice(now);
            c.sort_unstable();
            c.dedup();
            prune(keys, norms, up.node, &c, m, (alpha, fill), &mut s).to_vec()
        };
        let dropped = now.iter().copied().filter(|x| !kept.contains(x)).collect();
        updates.push((up.node, kept, dropped));
    }
    for (p, kept, _) in &updates {
        g.set_neighbours(*p as usize, kept);
    }
    // Edges are only added from here on, so no relink is undone by a later update.
    let mut orphans = Vec::new();
    for (p, _, dropped) in &updates {
        for &x in dropped {
            let via = g.neighbours(*p).to_vec();
            if !via.iter().any(|&c| c != x && g.link(c, x)) {
                orphans.push(x);
            }
        }
    }
    for (p, kept, _) in &updates {
        for &c in kept {
            g.link(c, *p);
        }
    }
    orphans
}

#[cfg(test)]
mod tests {
    use super::super::connect::unreached;
    use super::super::insert::tests::{data, recall};
    use crate::keys::KeyRows;
    use crate::{GraphParams, KeySlice, MipsIndexMut, TrainingSignal};

    /// Built on the first 90% of the keys, then the rest inserted: keys only, guided by the
    /// new positions' queries (approximate lists), and guided by later queries (the daemon's
    /// case). Every key stays reachable, and both guided inserts reach at least the keys-only
    /// recall on this fixture (measured: keys only 0.827, own queries 0.850, later 0.853).
    #[test]
    fn guided_insert_keeps_keys_reachable_and_recall_at_least_keys_only() {
        let (n, d, cut) = (2000, 16, 1800);
        let (kv, qs) = data(n, 2100, d);
        let (train, tests) = qs.split_at(2000 * d);
        let keys = KeySlice::new(KeyRows::F32(&kv), d).unwrap();
        let part = KeySlice::new(KeyRows::F32(&kv[..cut * d]), d).unwrap();
        let params = GraphParams {
            train_topk: 20,
            search_list: 24,
            kept_queries: 64,
            ..GraphParams::default()
        };
        let pos: Vec<u32> = (0..2000).collect();
        let early = TrainingSignal::Queries {
            vectors: &train[..cut * d],
            positions: &pos[..cut],
        };
        let base = super::super::build::build(&part, &early, &params).unwrap();
        let mut keys_only = base.clone();
        keys_only.insert(&keys).unwrap();
        // Own queries: a sample of the new positions' training queries, in batches of 50 keys.
        let mut own = base.clone();
        for b in 0..4 {
            let to = cut + 50 * (b + 1);
            let batch = KeySlice::new(KeyRows::F32(&kv[..to * d]), d).unwrap();
            let q = &train[(to - 50) * d..(to - 34) * d];
            let guide = own.guide_insert(&batch, q).unwrap();
            own.insert_guided(&batch, &guide).unwrap();
        }
        // Later queries: the first 40 test queries guide, the other 60 measure.
        let (guides, measured) = tests.split_at(40 * d);
        let mut later = base;
        let guide = later.guide_insert(&keys, guides).unwrap();
        assert_eq!(guide.len(), 40);
        later.insert_guided(&keys, &guide).unwrap();
        for g in [&keys_only, &own, &later] {
            assert_eq!(crate::MipsIndex::len(g), n);
            assert!(unreached(g).is_empty());
        }
        assert_eq!(own.query_memory().len(), 64);
        let r_keys = recall(&keys_only, &keys, measured, 10);
        let r_own = recall(&own, &keys, measured, 10);
        let r_later = recall(&later, &keys, measured, 10);
        assert!(
            r_own >= r_keys,
            "own-query guided {r_own} vs keys only {r_keys}"
        );
        assert!(
            r_later >= r_keys,
            "later-query guided {r_later} vs keys only {r_keys}"
        );
    }

    /// Bad guides are refused before anything changes; no guide, or a stale one, is a
    /// keys-only insert.
    #[test]
    fn guided_insert_rejects_bad_queries_and_falls_back_without_them() {
        let (kv, qs) = data(300, 40, 8);
        let keys = KeySlice::new(KeyRows::F32(&kv), 8).unwrap();
        let part = KeySlice::new(KeyRows::F32(&kv[..250 * 8]), 8).unwrap();
        let pos: Vec<u32> = (0..30).map(|i| i * 8).collect();
        let t = TrainingSignal::Queries {
            vectors: &qs[..30 * 8],
            positions: &pos,
        };
        let mut g = super::super::build::build(&part, &t, &GraphParams::default()).unwrap();
        assert!(g.guide_insert(&keys, &qs[..5]).is_err());
        let mut nan = qs[..8].to_vec();
        nan[3] = f32::NAN;
        assert!(g.guide_insert(&keys, &nan).is_err());
        let small = KeySlice::new(KeyRows::F32(&kv[..100 * 8]), 8).unwrap();
        assert!(g.guide_insert(&small, &qs[..8]).is_err());
        let empty = g.guide_insert(&keys, &[]).unwrap();
        assert!(empty.is_empty());
        assert!(g.insert_guided(&small, &empty).is_err());
        assert_eq!(
            crate::MipsIndex::len(&g),
            250,
            "nothing inserted by a refused call"
        );
        // A guide prepared for another state (here: a shorter store) is not applied.
        let mid = KeySlice::new(KeyRows::F32(&kv[..280 * 8]), 8).unwrap();
        let stale = g.guide_insert(&mid, &qs[..16]).unwrap();
        assert_eq!(stale.len(), 2);
        let mut keys_only = g.clone();
        let mut stale_g = g.clone();
        g.insert_guided(&keys, &empty).unwrap();
        stale_g.insert_guided(&keys, &stale).unwrap();
        keys_only.insert(&keys).unwrap();
        for u in 0..300u32 {
            assert_eq!(stale_g.neighbours_of(u), keys_only.neighbours_of(u));
        }
        assert_eq!(crate::MipsIndex::len(&g), 300);
        for u in 0..300u32 {
            assert_eq!(g.neighbours_of(u), keys_only.neighbours_of(u));
        }
    }
}

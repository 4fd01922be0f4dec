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
//! Steps 1, 3 and the searches of 5 run in parallel with rayon.

use super::search::{beam_search, Adjacency, GraphScratch};
use super::{GraphParams, QueryGuidedGraph};
use crate::error::check_finite;
use crate::{FlatIndex, Hits, IndexError, KeyStore, SearchScratch, TrainingSignal};
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
    let lists = training_lists(keys, training, params)?;
    let norms = key_norms(keys);
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
    // Projection: pivot → the rest of its query's list.
    let mut cands: Vec<Vec<u32>> = vec![Vec::new(); n];
    // Each list member also takes its rank neighbours in the list as candidates: when one hub
    // (a sink) is the pivot of most queries, pivot edges alone leave the rest of the graph bare.
    let w = params.rank_window;
    for l in &lists {
        if let Some((&p, rest)) = l.split_first() {
            cands[p as usize].extend_from_slice(rest);
        }
        for (i, &x) in l.iter().enumerate().skip(1) {
            let lo = i.saturating_sub(w).max(1);
            let hi = (i + w + 1).min(l.len());
            cands[x as usize].extend(l[lo..hi].iter().copied());
        }
    }
    let m = params.degree;
    let mut adj: Vec<Vec<u32>> = cands
        .into_par_iter()
        .enumerate()
        .map(|(p, mut c)| {
            c.sort_unstable();
            c.dedup();
            c.retain(|&x| x as usize != p);
            prune(keys, &norms, p as u32, &c, m, params.alpha)
        })
        .collect();
    // Reverse edges while the target has room.
    for p in 0..n {
        for i in 0..adj[p].len() {
            let c = adj[p][i] as usize;
            if adj[c].len() < m && !adj[c].contains(&(p as u32)) {
                adj[c].push(p as u32);
            }
        }
    }
    let mut g = QueryGuidedGraph {
        params: params.clone(),
        edges: vec![0; n * m],
        deg: vec![0; n],
        entries,
    };
    for (i, a) in adj.iter().enumerate() {
        g.set_neighbours(i, a);
    }
    connect(&mut g, keys);
    Ok(g)
}

impl QueryGuidedGraph {
    fn set_neighbours(&mut self, i: usize, a: &[u32]) {
        let m = self.params.degree;
        let d = a.len().min(m);
        self.edges[i * m..i * m + d].copy_from_slice(&a[..d]);
        self.deg[i] = d as u8;
    }

    /// Adds the edge `from → to`; when `from` is full and `force` is set, the last (weakest)
    /// edge is replaced. Returns true when the edge is present afterwards.
    fn link(&mut self, from: u32, to: u32, force: bool) -> bool {
        let m = self.params.degree;
        let (f, d) = (from as usize, self.deg[from as usize] as usize);
        if self.edges[f * m..f * m + d].contains(&to) {
            return true;
        }
        if d < m {
            self.edges[f * m + d] = to;
            self.deg[f] += 1;
            true
        } else if force {
            self.edges[f * m + m - 1] = to;
            true
        } else {
            false
        }
    }
}

/// Step 1: the exact top lists of the (sampled) training queries, or the supplied lists.
fn training_lists(
    keys: &dyn KeyStore,
    training: &TrainingSignal<'_>,
    params: &GraphParams,
) -> Result<Vec<Vec<u32>>, IndexError> {
    let n = keys.len();
    let d = keys.dim();
    match *training {
        TrainingSignal::None => Ok(Vec::new()),
        TrainingSignal::Neighbours(lists) => {
            for l in lists {
                if let Some(&bad) = l.iter().find(|&&id| id as usize >= n) {
                    return Err(IndexError::InvalidArgument(format!(
                        "neighbour list names key {bad} but only {n} keys are indexed"
                    )));
                }
            }
            Ok(lists.to_vec())
        }
        TrainingSignal::Queries { vectors, positions } => {
            if d == 0 || vectors.len() != positions.len() * d {
                return Err(IndexError::BadShape(format!(
                    "{} training floats for {} positions of dim {d}",
                    vectors.len(),
                    positions.len()
                )));
            }
            check_finite("training query", vectors)?;
            let total = positions.len();
            let take = total.min(params.max_train_queries.max(1));
            let picks: Vec<usize> = (0..take).map(|i| i * total / take.max(1)).collect();
            let flat = FlatIndex::new(n);
            let lists = picks
                .par_iter()
                .map_init(
                    || (SearchScratch::new(), Hits::default()),
                    |(scratch, hits), &qi| {
                        let q = &vectors[qi * d..(qi + 1) * d];
                        let visible = (positions[qi] as usize + 1).min(n);
                        let outs = std::slice::from_mut(hits);
                        match flat.search_prefix(keys, q, params.train_topk, visible, scratch, outs)
                        {
                            Ok(_) => hits.ids.clone(),
                            Err(_) => Vec::new(),
                        }
                    },
                )
                .filter(|l: &Vec<u32>| !l.is_empty())
                .collect();
            Ok(lists)
        }
    }
}

fn key_norms(keys: &dyn KeyStore) -> Vec<f32> {
    let d = keys.dim();
    (0..keys.len() as u32)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; d],
            |row, i| {
                keys.row_f32(i, row);
                row.iter().map(|x| x * x).sum()
            },
        )
        .collect()
}

/// Step 3, occlusion pruning (RoarGraph Alg. 2 / DiskANN RobustPrune): candidates in order of
/// L2 distance to the pivot p; c is kept unless a kept s is closer to c than p is (scaled by α).
fn prune(
    keys: &dyn KeyStore,
    norms: &[f32],
    p: u32,
    cands: &[u32],
    m: usize,
    alpha: f32,
) -> Vec<u32> {
    if cands.is_empty() {
        return Vec::new();
    }
    let d = keys.dim();
    let mut row = vec![0.0f32; d];
    keys.row_f32(p, &mut row);
    let mut ip = vec![0.0f32; cands.len()];
    keys.score_ids(&row, cands, &mut ip);
    let np = norms[p as usize];
    let mut by_dist: Vec<(f32, u32)> = cands
        .iter()
        .zip(&ip)
        .map(|(&c, &s)| (np + norms[c as usize] - 2.0 * s, c))
        .collect();
    by_dist.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut kept: Vec<u32> = Vec::with_capacity(m);
    let mut kept_ip = vec![0.0f32; m];
    for &(dist_pc, c) in &by_dist {
        if kept.len() >= m {
            break;
        }
        keys.row_f32(c, &mut row);
        let ks = kept.len();
        keys.score_ids(&row, &kept, &mut kept_ip[..ks]);
        let nc = norms[c as usize];
        let occluded = kept
            .iter()
            .zip(&kept_ip[..ks])
            .any(|(&s, &sc)| alpha * (norms[s as usize] + nc - 2.0 * sc) < dist_pc);
        if !occluded {
            kept.push(c);
        }
    }
    kept
}

/// Step 5: links every key not reachable from the entry points. Each round searches for the
/// unreached keys in parallel on a snapshot, then links each from the best reached node with
/// room (forcing the best one when none has room) and to its nearest found nodes.
fn connect(g: &mut QueryGuidedGraph, keys: &dyn KeyStore) {
    let d = keys.dim();
    for _round in 0..8 {
        let unreached = unreached(g);
        if unreached.is_empty() {
            return;
        }
        let found: Vec<Vec<u32>> = {
            let snap: &QueryGuidedGraph = g;
            unreached
                .par_iter()
                .map_init(
                    || (GraphScratch::default(), vec![0.0f32; d]),
                    |(s, row), &u| {
                        keys.row_f32(u, row);
                        beam_search(snap, keys, row, &snap.entries, snap.params.build_list, s);
                        s.pool.iter().map(|c| c.id).filter(|&id| id != u).collect()
                    },
                )
                .collect()
        };
        let half = (g.params.degree / 2).max(1);
        for (&u, f) in unreached.iter().zip(&found) {
            let Some(&best) = f.first() else { continue };
            let linked = f.iter().any(|&r| g.link(r, u, false));
            if !linked {
                g.link(best, u, true);
            }
            for &r in f.iter().take(half) {
                g.link(u, r, false);
            }
        }
    }
}

/// Keys not reachable from the entry points (breadth-first).
fn unreached(g: &QueryGuidedGraph) -> Vec<u32> {
    let n = g.nodes();
    let mut seen = vec![false; n];
    let mut queue: Vec<u32> = Vec::new();
    for &e in &g.entries {
        if (e as usize) < n && !seen[e as usize] {
            seen[e as usize] = true;
            queue.push(e);
        }
    }
    while let Some(x) = queue.pop() {
        for &y in g.neighbours(x) {
            if !seen[y as usize] {
                seen[y as usize] = true;
                queue.push(y);
            }
        }
    }
    (0..n as u32).filter(|&i| !seen[i as usize]).collect()
}

/// Incremental insert of keys `g.len()..keys.len()`: each new key is searched for with its own
/// vector, linked to its pruned nearest nodes, and linked from them while they have room (the
/// best one is forced, so the new key is always reachable).
pub fn insert(g: &mut QueryGuidedGraph, keys: &dyn KeyStore) -> Result<(), IndexError> {
    let (old, n, d, m) = (g.deg.len(), keys.len(), keys.dim(), g.params.degree);
    if n < old {
        return Err(IndexError::InvalidArgument(format!(
            "store holds {n} keys but the graph already indexes {old}"
        )));
    }
    let norms = key_norms(keys);
    let mut s = GraphScratch::default();
    let mut row = vec![0.0f32; d];
    for u in old..n {
        keys.row_f32(u as u32, &mut row);
        check_finite("key", &row)?;
        if g.entries.is_empty() {
            g.entries.push(u as u32);
        }
        beam_search(g, keys, &row, &g.entries, g.params.build_list, &mut s);
        let found: Vec<u32> = s.pool.iter().map(|c| c.id).collect();
        let kept = prune(keys, &norms, u as u32, &found, m, g.params.alpha);
        g.edges.extend(std::iter::repeat_n(0, m));
        g.deg.push(0);
        g.set_neighbours(u, &kept);
        let linked = kept
            .iter()
            .fold(false, |acc, &c| g.link(c, u as u32, false) || acc);
        if !linked {
            if let Some(&best) = found.first() {
                g.link(best, u as u32, true);
            }
        }
    }
    Ok(())
}

//! A traced beam search for diagnostics (`KVDEX_RECALL_DEBUG`): the same walk as
//! [`super::search::beam_search`], recording which nodes it scored and which it expanded, so a
//! report can say why a true top key was missed (never scored: none of its in-neighbours was
//! expanded). Allocates freely; never on a request path.

use super::search::{offer, Adjacency, Cand};
use crate::KeyStore;

/// What one traced search did.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    /// Every node scored, in order.
    pub scored: Vec<u32>,
    /// Every node expanded, in order.
    pub expanded: Vec<u32>,
    /// The final beam, best first.
    pub beam: Vec<Cand>,
}

/// Beam search for `query` from `entries` with list size `l`, recording the walk.
pub fn traced_search(
    graph: &dyn Adjacency,
    keys: &dyn KeyStore,
    query: &[f32],
    entries: &[u32],
    l: usize,
) -> Trace {
    let n = graph.nodes().min(keys.len());
    let l = l.max(1);
    let mut seen = vec![false; n];
    let mut t = Trace::default();
    let mut pool: Vec<Cand> = Vec::new();
    let score = |ids: &[u32], pool: &mut Vec<Cand>, t: &mut Trace| {
        let mut s = vec![0.0f32; ids.len()];
        keys.score_ids(query, ids, &mut s);
        for (&id, &sc) in ids.iter().zip(&s) {
            t.scored.push(id);
            offer(pool, l, id, sc);
        }
    };
    let mut fresh: Vec<u32> = Vec::new();
    for &e in entries {
        if (e as usize) < n && !seen[e as usize] {
            seen[e as usize] = true;
            fresh.push(e);
        }
    }
    score(&fresh, &mut pool, &mut t);
    while let Some(at) = pool.iter().position(|c| !c.expanded) {
        pool[at].expanded = true;
        let node = pool[at].id;
        t.expanded.push(node);
        fresh.clear();
        for &nb in graph.neighbours(node) {
            if (nb as usize) < n && !seen[nb as usize] {
                seen[nb as usize] = true;
                fresh.push(nb);
            }
        }
        score(&fresh, &mut pool, &mut t);
    }
    t.beam = pool;
    t
}

/// Hop distance of every node from `sources` along out-edges (`u32::MAX`: unreachable),
/// breadth-first.
pub fn hops_from(graph: &dyn Adjacency, sources: &[u32]) -> Vec<u32> {
    let n = graph.nodes();
    let mut dist = vec![u32::MAX; n];
    let mut frontier: Vec<u32> = Vec::new();
    for &s in sources {
        if (s as usize) < n && dist[s as usize] == u32::MAX {
            dist[s as usize] = 0;
            frontier.push(s);
        }
    }
    let mut next = Vec::new();
    let mut h = 0;
    while !frontier.is_empty() {
        h += 1;
        next.clear();
        for &x in &frontier {
            for &y in graph.neighbours(x) {
                if (y as usize) < n && dist[y as usize] == u32::MAX {
                    dist[y as usize] = h;
                    next.push(y);
                }
            }
        }
        std::mem::swap(&mut frontier, &mut next);
    }
    dist
}

/// In-degree of every node.
pub fn in_degrees(graph: &dyn Adjacency) -> Vec<u32> {
    let mut d = vec![0u32; graph.nodes()];
    for i in 0..graph.nodes() as u32 {
        for &y in graph.neighbours(i) {
            if let Some(x) = d.get_mut(y as usize) {
                *x += 1;
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyRows, KeySlice};
    use crate::qgraph::search::{beam_search, tests::Ring, GraphScratch};
    use rand::{Rng, SeedableRng};

    /// The traced walk scores exactly what the real search scores and ends with the same beam;
    /// every expanded node was scored first.
    #[test]
    fn traced_search_walks_like_the_real_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (n, d) = (400usize, 8usize);
        let g = Ring::new(n);
        let f: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let keys = KeySlice::new(KeyRows::F32(&f), d).unwrap();
        let mut s = GraphScratch::default();
        for l in [1usize, 6, 20] {
            let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let scored = beam_search(&g, &keys, &q, &[0, 5], l, &mut s);
            let t = traced_search(&g, &keys, &q, &[0, 5], l);
            assert_eq!(t.scored.len(), scored, "L {l}");
            let want: Vec<u32> = s.pool.iter().map(|c| c.id).collect();
            let got: Vec<u32> = t.beam.iter().map(|c| c.id).collect();
            assert_eq!(got, want, "L {l}");
            assert!(t.expanded.iter().all(|e| t.scored.contains(e)));
        }
    }

    /// On the ring (edges ±1, ±7, ±31), node 31 is one hop from 0, node 2 two hops, and every
    /// node has in-degree 6.
    #[test]
    fn hops_and_in_degrees_on_the_ring() {
        let g = Ring::new(200);
        let h = hops_from(&g, &[0]);
        assert_eq!((h[0], h[1], h[31], h[2], h[38]), (0, 1, 1, 2, 2));
        assert!(h.iter().all(|&x| x != u32::MAX));
        assert!(in_degrees(&g).iter().all(|&x| x == 6));
    }
}

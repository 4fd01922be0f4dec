//! Step 5 of the build: the connectivity pass that makes every key reachable from the entry
//! points, and the optional sequence edges (token-order neighbours in free slots). Split from
//! [`super::build`] so each file reads in one sitting.

use super::search::{beam_search, Adjacency, GraphScratch};
use super::QueryGuidedGraph;
use crate::KeyStore;
use rayon::prelude::*;

/// Step 5: links every key not reachable from the entry points. Each round searches for the
/// unreached keys in parallel on a snapshot, then links each from the best reached node with
/// room (forcing the best one when none has room) and to its nearest found nodes.
pub(super) fn connect(g: &mut QueryGuidedGraph, keys: &dyn KeyStore) {
    let d = keys.dim();
    for _round in 0..8 {
        let unreached = unreached(g);
        if unreached.is_empty() {
            return;
        }
        // The found lists in one flat array (`width` slots per unreached key) rather than a
        // vector each: at 1M keys there are hundreds of thousands of them.
        let width = g.params.build_list.max(1);
        let mut found = vec![0u32; unreached.len() * width];
        let mut lens = vec![0usize; unreached.len()];
        {
            let snap: &QueryGuidedGraph = g;
            found
                .par_chunks_mut(width)
                .zip(lens.par_iter_mut())
                .zip(unreached.par_iter())
                .for_each_init(
                    || (GraphScratch::default(), vec![0.0f32; d]),
                    |(s, row), ((slot, len), &u)| {
                        keys.row_f32(u, row);
                        beam_search(snap, keys, row, &snap.entries, width, s);
                        let ids = s.pool.iter().map(|c| c.id).filter(|&id| id != u);
                        for (dst, id) in slot.iter_mut().zip(ids) {
                            *dst = id;
                            *len += 1;
                        }
                    },
                );
        }
        let half = (g.params.degree / 2).max(1);
        let ins = g.params.connect_in_links.max(1);
        for (i, &u) in unreached.iter().enumerate() {
            let f = &found[i * width..i * width + lens[i]];
            let Some(&best) = f.first() else { continue };
            let mut linked = 0;
            for &r in f {
                if linked >= ins {
                    break;
                }
                linked += usize::from(g.link(r, u));
            }
            if linked == 0 {
                g.link_displacing(best, u);
            }
            for &r in f.iter().take(half) {
                g.link(u, r);
            }
        }
    }
}

/// Links each node from `from - s` on to its neighbours in token order, nearest first,
/// `i ± 1 ..= i ± s`, while it has free slots (see [`super::GraphParams::sequence_edges`]).
/// The build passes `from` 0; insert passes the first new key, so the old tail links forward.
pub(super) fn link_sequence(g: &mut QueryGuidedGraph, s: usize, from: usize) {
    let n = g.nodes();
    for i in from.saturating_sub(s)..n {
        for o in 1..=s {
            if i + o < n {
                g.link(i as u32, (i + o) as u32);
            }
            if o <= i {
                g.link(i as u32, (i - o) as u32);
            }
        }
    }
}

/// Keys not reachable from the entry points (breadth-first).
pub(super) fn unreached(g: &QueryGuidedGraph) -> Vec<u32> {
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

#[cfg(test)]
mod tests {
    use crate::keys::KeyRows;
    use crate::KeySlice;

    /// A graph of `n` nodes (degree cap `m`, entry 0) whose first `ring` nodes form a ring and
    /// the rest have no edges.
    fn half_ring(
        n: usize,
        ring: usize,
        m: usize,
        params: crate::GraphParams,
    ) -> super::QueryGuidedGraph {
        let mut g = super::QueryGuidedGraph {
            params: crate::GraphParams {
                degree: m,
                ..params
            },
            edges: vec![0; n * m],
            deg: vec![0; n],
            norms: vec![0.0; n], // (connect reads no norms)
            entries: vec![0],
            memory: Default::default(),
        };
        for i in 0..ring {
            g.link(i as u32, ((i + 1) % ring) as u32);
        }
        g
    }

    /// Each key the entry points cannot reach gets in-edges from `connect_in_links` of the
    /// nodes its search found (all of which have room here), not from one only.
    #[test]
    fn connect_gives_unreached_keys_several_in_edges() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (n, d) = (100usize, 8usize);
        let v: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let keys = KeySlice::new(KeyRows::F32(&v), d).unwrap();
        for ins in [1usize, 3] {
            let p = crate::GraphParams {
                connect_in_links: ins,
                ..crate::GraphParams::default()
            };
            let mut g = half_ring(n, 50, 12, p);
            super::connect(&mut g, &keys);
            assert!(super::unreached(&g).is_empty());
            let in_deg = crate::qgraph::trace::in_degrees(&g);
            for (u, &d) in in_deg.iter().enumerate().skip(50) {
                assert_eq!(d as usize, ins, "in_links {ins}, key {u}");
            }
        }
    }

    /// Sequence edges go to the nearest positions first, alternating sides, only into free
    /// slots, and never past either end.
    #[test]
    fn sequence_edges_fill_free_slots_nearest_first() {
        let mut g = half_ring(10, 0, 4, crate::GraphParams::default());
        g.link(5, 9);
        super::link_sequence(&mut g, 2, 0);
        assert_eq!(g.neighbours_of(0), &[1, 2]);
        assert_eq!(g.neighbours_of(3), &[4, 2, 5, 1]);
        assert_eq!(g.neighbours_of(5), &[9, 6, 4, 7]);
        assert_eq!(g.neighbours_of(9), &[8, 7]);
        super::link_sequence(&mut g, 0, 0);
        assert_eq!(g.neighbours_of(0), &[1, 2]);
    }
}

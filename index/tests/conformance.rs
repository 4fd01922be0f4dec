//! One conformance test for every index kind against `flat` (in the way tantivy's codecs share
//! one test): results sorted best first, ids unique and below len, scores the true inner
//! products, flat exact, and the approximate kinds close to flat on easy inputs.

use kvdex_index::keys::KeyRows;
use kvdex_index::{
    build_index, FlatIndex, Hits, IndexKind, IndexParams, KeySlice, KeyStore, MipsIndex,
    SearchScratch, TrainingSignal,
};
use proptest::prelude::*;

fn check_invariants(hits: &Hits, keys: &KeySlice<'_>, q: &[f32], len: usize, k: usize) {
    assert_eq!(hits.ids.len(), hits.scores.len());
    assert!(hits.len() <= k.min(len));
    assert!(
        hits.scores.windows(2).all(|w| w[0] >= w[1]),
        "not sorted: {:?}",
        hits.scores
    );
    let mut ids = hits.ids.clone();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), hits.len(), "duplicate ids");
    assert!(hits.ids.iter().all(|&i| (i as usize) < len));
    let mut truth = vec![0.0; hits.len()];
    keys.score_ids(q, &hits.ids, &mut truth);
    for (a, b) in truth.iter().zip(&hits.scores) {
        assert!(
            (a - b).abs() <= 1e-3 * (1.0 + a.abs()),
            "score {b} but true {a}"
        );
    }
}

proptest! {
    // Fixed seed: the graph and hnsw are approximate, and CI must give the same answer on every
    // run. (A beam of 64 over 275 keys once missed the top-1 of a random draw; graphs that
    // small are now searched exactly, see `QueryGuidedGraph::search`.)
    #![proptest_config(ProptestConfig {
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x006b_7664_6578),
        ..ProptestConfig::with_cases(12)
    })]
    #[test]
    fn every_kind_against_flat(
        n in 1usize..1200,
        dim in prop::sample::select(vec![4usize, 8, 16, 24]),
        k in 1usize..40,
        seed in 0u64..1000,
    ) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let rows: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let keys = KeySlice::new(KeyRows::F32(&rows), dim).unwrap();
        let nq = 64;
        let train: Vec<f32> = (0..nq * dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let pos: Vec<u32> = (0..nq as u32).map(|i| i * n as u32 / nq as u32).collect();
        let signal = TrainingSignal::Queries { vectors: &train, positions: &pos };
        let q: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut scratch = SearchScratch::new();
        let mut exact = Hits::default();
        FlatIndex::new(n).search(&keys, &q, k, &mut scratch, &mut exact).unwrap();
        // Flat is exact: compare with a sort.
        let mut all: Vec<(f32, u32)> = (0..n as u32).map(|i| {
            let mut s = [0.0f32];
            keys.score_ids(&q, &[i], &mut s);
            (s[0], i)
        }).collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0));
        prop_assert_eq!(exact.len(), k.min(n));
        for (h, t) in exact.scores.iter().zip(&all) {
            prop_assert!((h - t.0).abs() < 1e-4);
        }
        let mut params = IndexParams::default();
        // A beam of 32: graphs over more than 8 x max(32, k) keys are searched as graphs, smaller
        // ones exactly (see `QueryGuidedGraph::search`); both paths are exercised.
        params.graph.search_list = 32;
        params.hnsw.ef_search = 64;
        for kind in [IndexKind::Flat, IndexKind::Hnsw, IndexKind::Graph] {
            let idx = build_index(kind, &keys, &signal, &params).unwrap();
            prop_assert_eq!(idx.len(), n);
            let mut hits = Hits::default();
            let st = idx.search(&keys, &q, k, &mut scratch, &mut hits).unwrap();
            check_invariants(&hits, &keys, &q, n, k);
            // The graph scores each key at most once per search; hnsw_rs may evaluate a node on
            // several layers, so its count (distance evaluations) can exceed n.
            if kind != IndexKind::Hnsw {
                prop_assert!(st.scored <= n, "{kind:?} scored {} of {n}", st.scored);
            }
            let found = hits.ids.iter().filter(|i| exact.ids.contains(i)).count();
            // Uniform random keys and queries, no structure for a graph to exploit, and a
            // narrow beam: an approximate kind must still find at least half of the true top-k,
            // and return nothing ranked below the exact top 4k + 10 (a near miss, never a
            // random key). The recall figures proper come from `kvdex bench recall`.
            prop_assert!(2 * found >= exact.len(), "{kind:?} found {found} of {}", exact.len());
            let near: Vec<u32> = all.iter().take(4 * k + 10).map(|t| t.1).collect();
            for id in &hits.ids {
                prop_assert!(near.contains(id), "{kind:?} returned {id}, outside the exact top {}", near.len());
            }
        }
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let rows = vec![0.5f32; 40];
    let keys = KeySlice::new(KeyRows::F32(&rows), 4).unwrap();
    let params = IndexParams::default();
    for kind in [IndexKind::Flat, IndexKind::Hnsw, IndexKind::Graph] {
        let idx = build_index(kind, &keys, &TrainingSignal::None, &params).unwrap();
        let mut s = SearchScratch::new();
        let mut h = Hits::default();
        assert!(
            idx.search(&keys, &[1.0; 3], 5, &mut s, &mut h).is_err(),
            "{kind:?} dim"
        );
        assert!(
            idx.search(&keys, &[f32::INFINITY; 4], 5, &mut s, &mut h)
                .is_err(),
            "{kind:?} inf"
        );
        let st = idx.search(&keys, &[1.0; 4], 50, &mut s, &mut h).unwrap();
        assert!(st.k_clamped && h.len() <= 10, "{kind:?} clamp");
    }
    let bad = [1.0f32, f32::NAN, 0.0, 0.0];
    let pos = [0u32];
    let sig = TrainingSignal::Queries {
        vectors: &bad,
        positions: &pos,
    };
    assert!(build_index(IndexKind::Graph, &keys, &sig, &params).is_err());
    let lists = vec![vec![0u32, 99]];
    assert!(build_index(
        IndexKind::Graph,
        &keys,
        &TrainingSignal::Neighbours(&lists),
        &params
    )
    .is_err());
    let empty = KeySlice::new(KeyRows::F32(&[]), 4).unwrap();
    for kind in [IndexKind::Flat, IndexKind::Hnsw, IndexKind::Graph] {
        let idx = build_index(kind, &empty, &TrainingSignal::None, &params).unwrap();
        let mut h = Hits::default();
        idx.search(&empty, &[1.0; 4], 5, &mut SearchScratch::new(), &mut h)
            .unwrap();
        assert!(h.is_empty(), "{kind:?} empty");
    }
}

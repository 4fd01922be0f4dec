use super::search::search_group_with;
use super::tail::TailScratch;
use super::*;
use crate::keys::{KeyRows, KeySlice};
use crate::simd::{Isa, Kernels};
use crate::{FlatIndex, SearchScratch};
use half::f16;
use rand::{Rng, SeedableRng};

fn data(n: usize, d: usize, seed: u64) -> Vec<f16> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A few directions plus noise, with an offset: clustered like real keys.
    let dirs: Vec<f32> = (0..8 * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    (0..n)
        .flat_map(|i| {
            let dir = &dirs[(i % 8) * d..(i % 8 + 1) * d];
            let noise: Vec<f32> = (0..d).map(|_| rng.gen_range(-0.6..0.6)).collect();
            (0..d)
                .map(move |j| f16::from_f32(0.5 + dir[j] + noise[j]))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn queries(g: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..g * d).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn exact(keys: &KeySlice<'_>, qs: &[f32], k: usize) -> Vec<Hits> {
    let g = qs.len() / keys.dim();
    let mut outs = vec![Hits::default(); g];
    FlatIndex::new(keys.len())
        .search_group(keys, qs, k, &mut SearchScratch::new(), &mut outs)
        .unwrap();
    outs
}

/// With the whole index read and every key re-ranked, the answer is the exact top-k.
#[test]
fn full_budget_is_exact() {
    let (n, d, g, k) = (3000, 32, 3, 20);
    let rows = data(n, d, 1);
    let keys = KeySlice::new(KeyRows::F16(&rows), d).unwrap();
    let p = ClusterParams {
        rows_per_cluster: 64,
        probe_fraction: 1.0,
        rerank: 1000.0,
        ..ClusterParams::default()
    };
    let idx = ClusterIndex::build(&keys, &p).unwrap();
    assert_eq!(idx.len(), n);
    assert_eq!(idx.sizes().sum::<usize>(), n);
    let qs = queries(g, d, 2);
    let mut outs = vec![Hits::default(); g];
    let st = idx
        .search_group(&keys, &qs, k, &mut SearchScratch::new(), &mut outs)
        .unwrap();
    assert!(st.bytes_read > 0 && st.scored >= n);
    for (a, b) in outs.iter().zip(exact(&keys, &qs, k)) {
        assert_eq!(a.ids, b.ids);
    }
}

/// A partial budget still finds most of the top-k, on either code width, reads fewer bytes
/// than the keys, for a group and for each head alone (whose budget is its own).
#[test]
fn partial_budget_recall_and_group_equals_single() {
    let (n, d, g, k) = (6000, 64, 4, 10);
    let rows = data(n, d, 3);
    let keys = KeySlice::new(KeyRows::F16(&rows), d).unwrap();
    let qs = queries(g, d, 4);
    let truth = exact(&keys, &qs, k);
    for bits in [CodeBits::Eight, CodeBits::Four] {
        let p = ClusterParams {
            bits,
            rows_per_cluster: 128,
            sample_per_cluster: 32,
            iters: 6,
            probe_fraction: 0.3,
            rerank: 4.0,
            ..ClusterParams::default()
        };
        let idx = ClusterIndex::build(&keys, &p).unwrap();
        let mut s = SearchScratch::new();
        let mut outs = vec![Hits::default(); g];
        let st = idx.search_group(&keys, &qs, k, &mut s, &mut outs).unwrap();
        assert!(st.bytes_read < n * d * 2, "{bits:?} read {}", st.bytes_read);
        let hit: usize = outs
            .iter()
            .zip(&truth)
            .map(|(a, b)| a.ids.iter().filter(|i| b.ids.contains(i)).count())
            .sum();
        assert!(hit * 10 >= 7 * g * k, "{bits:?}: {hit} of {}", g * k);
        for (h, q) in qs.chunks(d).enumerate() {
            let mut one = Hits::default();
            idx.search(&keys, q, k, &mut s, &mut one).unwrap();
            let hit = one.ids.iter().filter(|i| truth[h].ids.contains(i)).count();
            assert!(hit * 10 >= 7 * k, "{bits:?} head {h}: {hit} of {k}");
        }
    }
}

/// Every kernel path the CPU has gives the scalar path's answer.
#[test]
fn every_kernel_path_matches_scalar() {
    let (n, d, g, k) = (2000, 48, 3, 15);
    let rows = data(n, d, 5);
    let keys = KeySlice::new(KeyRows::F16(&rows), d).unwrap();
    let idx = ClusterIndex::build(&keys, &ClusterParams::default()).unwrap();
    let qs = queries(g, d, 6);
    let scalar = Kernels::with(Isa::Scalar).unwrap();
    let mut want = vec![Hits::default(); g];
    let mut s = ClusterScratch::default();
    search_group_with(scalar, &idx, &keys, &qs, k, &mut s, &mut want);
    for isa in Isa::ALL {
        let Some(kern) = Kernels::with(isa) else {
            continue;
        };
        let mut got = vec![Hits::default(); g];
        search_group_with(kern, &idx, &keys, &qs, k, &mut s, &mut got);
        for (a, b) in got.iter().zip(&want) {
            let same = a.ids.iter().filter(|i| b.ids.contains(i)).count();
            assert!(same + 1 >= k, "{isa:?}: {same} of {k} agree");
        }
    }
}

/// Inserted keys join clusters at once and are found; drift counts them.
#[test]
fn inserts_are_searchable_and_counted() {
    let (n, d) = (4000, 32);
    let rows = data(n, d, 7);
    let part = KeySlice::new(KeyRows::F16(&rows[..3000 * d]), d).unwrap();
    let all = KeySlice::new(KeyRows::F16(&rows), d).unwrap();
    let mut idx = ClusterIndex::build(&part, &ClusterParams::default()).unwrap();
    idx.insert(&all).unwrap();
    assert_eq!(idx.len(), n);
    assert_eq!(idx.sizes().sum::<usize>(), n);
    let dr = idx.drift();
    assert_eq!(dr.inserted, 1000);
    assert!(dr.distance_ratio > 0.5 && dr.distance_ratio < 2.0, "{dr:?}");
    // Each inserted key, as a query, finds the exact top-1 when every cluster is read: the
    // inserted keys are in the clusters' member lists and codes.
    idx.set_probe_fraction(1.0);
    let mut s = SearchScratch::new();
    let mut h = Hits::default();
    for id in [3000u32, 3500, 3999] {
        let mut q = vec![0.0f32; d];
        all.row_f32(id, &mut q);
        idx.search(&all, &q, 5, &mut s, &mut h).unwrap();
        let want = exact(&all, &q, 5);
        assert_eq!(h.ids[0], want[0].ids[0]);
    }
    // A store shorter than the index is refused.
    assert!(idx.insert(&part).is_err());
}

/// With one key per cluster the residuals are zero and the estimate is exact.
#[test]
fn tail_estimate_is_exact_with_singleton_clusters() {
    let (n, d) = (300, 16);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let kf: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let vf: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let keys = KeySlice::new(KeyRows::F32(&kf), d).unwrap();
    let vals = KeySlice::new(KeyRows::F32(&vf), d).unwrap();
    let p = ClusterParams {
        rows_per_cluster: 1,
        sample_per_cluster: 1,
        iters: 1,
        ..ClusterParams::default()
    };
    let mut idx = ClusterIndex::build(&keys, &p).unwrap();
    let q = queries(1, d, 10);
    let mut out = vec![0.0f32; d];
    let mut s = TailScratch::default();
    assert!(idx
        .estimate_unread(&q, 0.25, &[], &vals, true, &mut s, &mut out)
        .is_err());
    idx.absorb_values(&vals).unwrap();
    let read: Vec<u32> = (0..50).collect();
    let est = idx
        .estimate_unread(&q, 0.25, &read, &vals, true, &mut s, &mut out)
        .unwrap();
    assert_eq!(est.keys, n - 50);
    let sc: Vec<f32> = (50..n)
        .map(|i| 0.25 * crate::simd::scalar::dot_f32(&q, &kf[i * d..(i + 1) * d]))
        .collect();
    let mx = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let z: f32 = sc.iter().map(|x| (x - mx).exp()).sum();
    assert!(
        (est.lse - (mx + z.ln())).abs() < 1e-3,
        "{} vs {}",
        est.lse,
        mx + z.ln()
    );
    for j in 0..d {
        let want: f32 = (50..n)
            .map(|i| (sc[i - 50] - mx).exp() / z * vf[i * d + j])
            .sum();
        assert!(
            (out[j] - want).abs() < 1e-3,
            "dim {j}: {} vs {want}",
            out[j]
        );
    }
    let all: Vec<u32> = (0..n as u32).collect();
    let none = idx
        .estimate_unread(&q, 0.25, &all, &vals, true, &mut s, &mut out)
        .unwrap();
    assert_eq!(none.keys, 0);
    assert_eq!(none.lse, f32::NEG_INFINITY);
}

/// At head_dim 128 the index holds well under half of the f16 K+V it covers.
#[test]
fn memory_is_under_half_of_the_kv() {
    let (n, d) = (8192, 128);
    let rows = data(n, d, 11);
    let keys = KeySlice::new(KeyRows::F16(&rows), d).unwrap();
    let mut idx = ClusterIndex::build(&keys, &ClusterParams::default()).unwrap();
    let vals = KeySlice::new(KeyRows::F16(&rows), d).unwrap();
    idx.absorb_values(&vals).unwrap();
    let kv = n * d * 2 * 2;
    assert!(
        idx.memory_bytes() * 2 <= kv,
        "{} of {kv}",
        idx.memory_bytes()
    );
}

#[test]
fn bad_params_and_queries_are_errors() {
    let rows = data(100, 8, 12);
    let keys = KeySlice::new(KeyRows::F16(&rows), 8).unwrap();
    for p in [
        ClusterParams {
            rows_per_cluster: 0,
            ..ClusterParams::default()
        },
        ClusterParams {
            probe_fraction: 0.0,
            ..ClusterParams::default()
        },
        ClusterParams {
            rerank: 0.5,
            ..ClusterParams::default()
        },
    ] {
        assert!(ClusterIndex::build(&keys, &p).is_err(), "{p:?}");
    }
    let idx = ClusterIndex::build(&keys, &ClusterParams::default()).unwrap();
    let mut s = SearchScratch::new();
    let mut h = Hits::default();
    assert!(idx.search(&keys, &[1.0; 7], 3, &mut s, &mut h).is_err());
    assert!(idx
        .search(&keys, &[f32::NAN; 8], 3, &mut s, &mut h)
        .is_err());
    let empty = KeySlice::new(KeyRows::F16(&[]), 8);
    assert!(
        empty.is_err() || ClusterIndex::build(&empty.unwrap(), &ClusterParams::default()).is_ok()
    );
}

//! Drift on synthetic data: a graph trained on prefill queries of one kind serves decode
//! queries of another. The sampled mass recall falls below `decode.drift_floor`; with
//! `decode.drift_rebuild` the daemon re-seals the layer from the decode queries it sampled, and
//! the sampled mass recall comes back.

use std::time::{Duration, Instant};

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex::store::sampler::{QualityReport, SamplingConfig};
use kvdex::store::DecodeConfig;
use kvdex_index::IndexKind;

use crate::shm_common::*;
use crate::{sampled_retrieve, serve_with, wait_ready, Served};

const N: usize = 6000;
const D: usize = 32;
const HQ: usize = 2;
const FLOOR: f64 = 0.9;

/// A unit vector from `seed`, with its component along `away` removed.
fn direction(seed: u64, away: Option<&[f32]>) -> Vec<f32> {
    let mut u = values(D, seed);
    if let Some(a) = away {
        let dot: f32 = u.iter().zip(a).map(|(x, y)| x * y).sum();
        u.iter_mut().zip(a).for_each(|(x, y)| *x -= dot * y);
    }
    let n = u.iter().map(|x| x * x).sum::<f32>().sqrt();
    u.iter_mut().for_each(|x| *x /= n);
    u
}

/// `[HQ][D]` queries along `u` with noise from `seed`.
fn queries(u: &[f32], seed: u64) -> Vec<f32> {
    let mut q = values(HQ * D, seed);
    for h in 0..HQ {
        for j in 0..D {
            q[h * D + j] = 24.0 * u[j] + 3.0 * q[h * D + j];
        }
    }
    q
}

/// Sum of the mass recall over the heads measured so far.
fn mass_sum(r: &QualityReport) -> (f64, u64) {
    r.mass_recall
        .map_or((0.0, 0), |m| (m.mean * m.count as f64, m.count))
}

/// Samples `steps` retrieves of queries along `u`; returns their mean sampled mass recall and
/// the last report.
fn phase(s: &mut Served, u: &[f32], seed: u64, steps: usize) -> (f64, QualityReport) {
    let p = RetrieveParams {
        budget: Budget::Fixed(16),
        attend: true,
        gather: false,
        scale: None,
    };
    let before = mass_sum(&s.session.quality_report());
    let mut last = s.session.quality_report();
    for i in 0..steps {
        last = sampled_retrieve(s, &queries(u, seed + i as u64), &p);
    }
    let after = mass_sum(&last);
    (
        (after.0 - before.0) / (after.1 - before.1).max(1) as f64,
        last,
    )
}

#[test]
fn drifting_decode_queries_lower_the_sampled_recall_and_a_rebuild_restores_it() {
    let mut cfg = DecodeConfig {
        sinks: 4,
        window: 8,
        build_threads: 2,
        sampling: SamplingConfig {
            rate: 1.0,
            cpu_share: 1.0,
            queue: 4,
            drift_floor: FLOOR,
            drift_rebuild: true,
            drift_rebuild_queries: 64,
        },
        ..Default::default()
    };
    cfg.params.graph.search_list = 64;
    let mut s = serve_with(f32_shape(1, HQ as u32, 1, D as u32), cfg, "drift");
    let keys = values(N * D, 3);
    s.h.append(
        0,
        N as u32,
        bytemuck::cast_slice(&keys),
        bytemuck::cast_slice(&values(N * D, 4)),
    )
    .unwrap();
    let a = direction(11, None);
    let b = direction(12, Some(&a));
    // The prefill asked along `a`: 256 positions, each both heads.
    let positions: Vec<u32> = (0..256).map(|i| 8 + i * (N as u32 - 16) / 256).collect();
    let mut train = vec![0f32; HQ * positions.len() * D];
    for i in 0..positions.len() {
        let q = queries(&a, 1000 + i as u64);
        for h in 0..HQ {
            let at = (h * positions.len() + i) * D;
            train[at..at + D].copy_from_slice(&q[h * D..(h + 1) * D]);
        }
    }
    s.h.seal(0, IndexKind::Graph, Some((&train, &positions)))
        .unwrap();
    wait_ready(&s.session, 0);

    let (before, _) = phase(&mut s, &a, 5000, 12);
    // The first two drifted requests: the layer's last 8 still average above the floor, so
    // they are measured on the prefill's index whatever the drift response does next.
    let (drifted, _) = phase(&mut s, &b, 6000, 2);
    eprintln!("sampled mass recall: prefill-like {before:.3}, drifted {drifted:.3}");
    assert!(before >= FLOOR, "before the drift: {before}");
    assert!(
        drifted < FLOOR,
        "the drift must show: {drifted} (before {before})"
    );
    // More drifted requests pull the layer's recent mean below the floor: it is logged and,
    // with drift_rebuild, re-sealed from the sampled queries (once: samples taken while it
    // builds are not judged).
    let (_, r) = phase(&mut s, &b, 6002, 6);
    let layer = &r.layers[0];
    assert_eq!(layer.rebuilds, 1, "{r:?}");
    let t = Instant::now();
    while s.session.build_status(0).unwrap().state != "ready" {
        assert!(t.elapsed() < Duration::from_secs(60), "rebuild timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_ready(&s.session, 0);
    let (restored, r) = phase(&mut s, &b, 7000, 12);
    eprintln!("after the rebuild: {restored:.3}");
    assert!(restored >= FLOOR, "the rebuild must restore it: {restored}");
    assert!(!r.layers[0].drifting, "{r:?}");
    assert_eq!(r.layers[0].rebuilds, 1, "{r:?}");
    assert_eq!(r.sampled_requests, 32);
}

//! One background insert batch, the daemon's unit of incremental indexing: 64 keys that slid
//! out of the recent window, inserted into a query-guided graph of 8K f16 keys of dim 64 (the
//! real code set's shape), keys only (`insert`) and guided by 16 later queries (`guide_insert`
//! then `insert_guided`). The graph is cloned outside the timed part, so each iteration inserts
//! the same batch into the same graph.
//!
//! `cargo bench -p kvdex-index --bench insert`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use half::f16;
use kvdex_index::keys::{KeyRows, KeySlice};
use kvdex_index::qgraph::build::build;
use kvdex_index::{GraphParams, MipsIndexMut, TrainingSignal};
use rand::{Rng, SeedableRng};

const DIM: usize = 64;
const CONTEXT: usize = 8192;
const BATCH: usize = 64;
const TRAIN: usize = 1024;
const GUIDES: usize = 16;

/// `n` rows around random cluster centres (`shift` moves every coordinate: queries are out of
/// the keys' distribution, as decode queries are).
fn clustered(rng: &mut impl Rng, centres: &[f32], n: usize, shift: f32) -> Vec<f32> {
    let c = centres.len() / DIM;
    let mut out = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let k = rng.gen_range(0..c);
        out.extend(
            centres[k * DIM..(k + 1) * DIM]
                .iter()
                .map(|&x| x + shift + rng.gen_range(-0.5..0.5)),
        );
    }
    out
}

fn insert_batch(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let centres: Vec<f32> = (0..64 * DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let keys_f16: Vec<f16> = clustered(&mut rng, &centres, CONTEXT + BATCH, 0.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let train = clustered(&mut rng, &centres, TRAIN, 0.3);
    let guides = clustered(&mut rng, &centres, GUIDES, 0.3);
    let positions: Vec<u32> = (0..TRAIN as u32)
        .map(|i| i * CONTEXT as u32 / TRAIN as u32)
        .collect();
    let old = KeySlice::new(KeyRows::F16(&keys_f16[..CONTEXT * DIM]), DIM).unwrap();
    let all = KeySlice::new(KeyRows::F16(&keys_f16), DIM).unwrap();
    let signal = TrainingSignal::Queries {
        vectors: &train,
        positions: &positions,
    };
    let graph = build(&old, &signal, &GraphParams::default()).unwrap();
    let mut g = c.benchmark_group("insert_batch_8k_f16");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4))
        .sample_size(30);
    g.bench_function(BenchmarkId::new("keys", BATCH), |b| {
        b.iter_batched_ref(
            || graph.clone(),
            |gr| gr.insert(&all).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.bench_function(BenchmarkId::new("guided", BATCH), |b| {
        b.iter_batched_ref(
            || graph.clone(),
            |gr| {
                let guide = gr.guide_insert(&all, &guides).unwrap();
                gr.insert_guided(&all, &guide).unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, insert_batch);
criterion_main!(benches);

//! Partial attention per query head (f16 K/V, random selected ids out of a 64K-token context),
//! the value-accumulation kernel per level, and Slim-mode V reconstruction.
//!
//! `cargo bench -p kvdex-index --bench attend`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use kvdex_index::attend::accum::{add_scaled_at, Level};
use kvdex_index::attend::{attend_head, reconstruct_values, AttendScratch, SlimScratch, WKv};
use kvdex_index::keys::{KeyRows, KeySlice};
use kvdex_index::KeyStore;
use rand::{Rng, SeedableRng};

const CONTEXT: usize = 65_536;

fn rows_f16(rng: &mut impl Rng, n: usize) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
        .collect()
}

fn partial_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attend_head_f16");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for d in [64usize, 128] {
        let k = rows_f16(&mut rng, CONTEXT * d);
        let v = rows_f16(&mut rng, CONTEXT * d);
        let ks = KeySlice::new(KeyRows::F16(&k), d).unwrap();
        let vs = KeySlice::new(KeyRows::F16(&v), d).unwrap();
        let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut scratch = AttendScratch::new();
        let mut out = vec![0.0; d];
        for n in [100usize, 500, 1000, 2000] {
            let mut ids: Vec<u32> = (0..n).map(|_| rng.gen_range(0..CONTEXT as u32)).collect();
            ids.sort_unstable();
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new(format!("d{d}"), n), &ids, |b, ids| {
                b.iter(|| attend_head(&ks, &vs, &q, ids, 0.125, &mut scratch, &mut out).unwrap())
            });
        }
    }
    g.finish();
}

fn accumulate(c: &mut Criterion) {
    let mut g = c.benchmark_group("accum_f16_2000_rows");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for d in [64usize, 128] {
        let v = rows_f16(&mut rng, 2000 * d);
        let mut acc = vec![0.0f32; d];
        for level in Level::available() {
            g.bench_function(BenchmarkId::new(format!("{level:?}"), d), |b| {
                b.iter(|| {
                    for r in v.chunks_exact(d) {
                        add_scaled_at(level, &mut acc, 0.5, KeyRows::F16(r));
                    }
                })
            });
        }
    }
    g.finish();
}

fn slim(c: &mut Criterion) {
    let mut g = c.benchmark_group("slim_reconstruct");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // SmolLM2-like MHA would be 9x64; use 8 heads x 64 (D = 512) over a 16K context.
    let (hk, hd, n) = (8usize, 64usize, 16_384usize);
    let d = hk * hd;
    let k: Vec<Vec<f16>> = (0..hk).map(|_| rows_f16(&mut rng, n * hd)).collect();
    let slices: Vec<KeySlice> = k
        .iter()
        .map(|x| KeySlice::new(KeyRows::F16(x), hd).unwrap())
        .collect();
    let keys: Vec<&dyn KeyStore> = slices.iter().map(|s| s as &dyn KeyStore).collect();
    let w = WKv::new(
        (0..d * d).map(|_| rng.gen_range(-0.1..0.1)).collect(),
        hk,
        hd,
    )
    .unwrap();
    let mut scratch = SlimScratch::new();
    for t in [100usize, 1000] {
        let ids: Vec<u32> = (0..t).map(|_| rng.gen_range(0..n as u32)).collect();
        let mut out = vec![0.0; t * hd];
        g.throughput(Throughput::Elements(t as u64));
        g.bench_with_input(BenchmarkId::new("one_head_D512", t), &ids, |b, ids| {
            b.iter(|| reconstruct_values(&keys, &w, None, ids, 3, &mut scratch, &mut out).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, partial_attention, accumulate, slim);
criterion_main!(benches);

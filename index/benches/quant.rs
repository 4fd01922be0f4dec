//! Int8 rows against f16 rows on the two loops a retrieve spends its time in: partial attention
//! over selected ids out of a 64K-token context (score + accumulate), and the exact scan of a
//! block of keys (`score_range`, the flat search). Same values in both formats, same ids.
//!
//! `cargo bench -p kvdex-index --bench quant`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use kvdex_index::attend::{attend_head, AttendScratch};
use kvdex_index::keys::{KeyRows, KeySlice};
use kvdex_index::quant::{quantize_row, QuantRows};
use kvdex_index::KeyStore;
use rand::{Rng, SeedableRng};

const CONTEXT: usize = 65_536;

/// The same rows as f16 and as int8 codes with their scales.
struct Rows {
    f16: Vec<f16>,
    codes: Vec<i8>,
    scales: Vec<bf16>,
}

impl Rows {
    fn new(rng: &mut impl Rng, n: usize, d: usize) -> Self {
        let x: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut codes = vec![0i8; n * d];
        let scales = x
            .chunks_exact(d)
            .zip(codes.chunks_exact_mut(d))
            .map(|(r, c)| quantize_row(r, c))
            .collect();
        Self {
            f16: x.iter().map(|&v| f16::from_f32(v)).collect(),
            codes,
            scales,
        }
    }

    fn slices(&self, d: usize) -> [(&'static str, KeySlice<'_>); 2] {
        let q = QuantRows {
            codes: &self.codes,
            scales: &self.scales,
        };
        [
            ("f16", KeySlice::new(KeyRows::F16(&self.f16), d).unwrap()),
            ("int8", KeySlice::new(KeyRows::I8(q), d).unwrap()),
        ]
    }
}

fn partial_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attend_head_by_format");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for d in [64usize, 128] {
        let (k, v) = (
            Rows::new(&mut rng, CONTEXT, d),
            Rows::new(&mut rng, CONTEXT, d),
        );
        let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut scratch = AttendScratch::new();
        let mut out = vec![0.0; d];
        for n in [500usize, 2000] {
            let mut ids: Vec<u32> = (0..n).map(|_| rng.gen_range(0..CONTEXT as u32)).collect();
            ids.sort_unstable();
            g.throughput(Throughput::Elements(n as u64));
            for ((name, ks), (_, vs)) in k.slices(d).into_iter().zip(v.slices(d)) {
                g.bench_with_input(
                    BenchmarkId::new(format!("{name}/d{d}"), n),
                    &ids,
                    |b, ids| {
                        b.iter(|| {
                            attend_head(&ks, &vs, &q, ids, 0.125, &mut scratch, &mut out).unwrap()
                        })
                    },
                );
            }
        }
    }
    g.finish();
}

fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("score_range_16k_by_format");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let n = 16_384;
    for d in [64usize, 128] {
        let k = Rows::new(&mut rng, n, d);
        let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut out = vec![0.0f32; n];
        g.throughput(Throughput::Elements(n as u64));
        for (name, ks) in k.slices(d) {
            g.bench_function(BenchmarkId::new(name, d), |b| {
                b.iter(|| ks.score_range(&q, 0, &mut out))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, partial_attention, scan);
criterion_main!(benches);

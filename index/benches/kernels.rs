//! Criterion benches of the inner-product kernels, every path this CPU has, reported in GB/s of
//! key bytes read (compare with the machine's memory bandwidth: the block kernels are meant to
//! be bandwidth-bound once the keys leave cache), plus the flat scan and the GQA group scan.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use kvdex_index::keys::KeyRows;
use kvdex_index::simd::{Isa, Kernels};
use kvdex_index::{FlatIndex, Hits, KeySlice, MipsIndex, SearchScratch};

const DIM: usize = 128;

fn kernels(c: &mut Criterion) {
    // 64K keys x 128 dims: 16 MiB in f16, larger than L2, so the block kernel streams memory.
    let n = 64 * 1024;
    let f: Vec<f32> = (0..n * DIM)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let h: Vec<f16> = f.iter().map(|&x| f16::from_f32(x)).collect();
    let b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
    let q: Vec<f32> = (0..4 * DIM).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
    let mut out = vec![0.0f32; 4 * n];
    let mut g = c.benchmark_group("block");
    for isa in Isa::ALL {
        let Some(k) = Kernels::with(isa) else {
            continue;
        };
        for (name, rows, bytes) in [
            ("f32", KeyRows::F32(&f), 4),
            ("f16", KeyRows::F16(&h), 2),
            ("bf16", KeyRows::Bf16(&b), 2),
        ] {
            g.throughput(Throughput::Bytes((n * DIM * bytes) as u64));
            g.bench_function(BenchmarkId::new(isa.name(), name), |bn| {
                bn.iter(|| k.block(&q[..DIM], rows, DIM, 0, &mut out[..n]))
            });
            g.bench_function(
                BenchmarkId::new(format!("{}-group4", isa.name()), name),
                |bn| bn.iter(|| k.group(&q, rows, DIM, 0, &mut out)),
            );
        }
    }
    g.finish();
    let keys = KeySlice::new(KeyRows::F16(&h), DIM).unwrap_or_else(|e| panic!("{e}"));
    let flat = FlatIndex::new(n);
    let mut s = SearchScratch::new();
    let mut hits = Hits::default();
    let mut outs = vec![Hits::default(); 4];
    let mut g = c.benchmark_group("flat");
    g.throughput(Throughput::Bytes((n * DIM * 2) as u64));
    g.bench_function("search_f16_k100", |bn| {
        bn.iter(|| flat.search(&keys, &q[..DIM], 100, &mut s, &mut hits))
    });
    g.bench_function("search_group4_f16_k100", |bn| {
        bn.iter(|| flat.search_group(&keys, &q, 100, &mut s, &mut outs))
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);

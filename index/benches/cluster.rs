//! The cluster index's hot loops: decoding and scoring a block of residual codes for a GQA
//! group (8-bit and 4-bit, against the f16 block kernel on the same rows), and the whole group
//! search over 128K keys of dim 128 at the default probe fraction. The build time of the same
//! index is reported too, since seal-to-ready is one of its targets.
//!
//! `cargo bench -p kvdex-index --bench cluster`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use kvdex_index::cluster::CodeBits;
use kvdex_index::keys::{KeyRows, KeySlice};
use kvdex_index::simd::Kernels;
use kvdex_index::{ClusterIndex, ClusterParams, Hits, MipsIndex, SearchScratch};
use rand::{Rng, SeedableRng};

const DIM: usize = 128;
const CONTEXT: usize = 131_072;
const GROUP: usize = 4;
const ROWS: usize = 64;

fn clustered(n: usize, seed: u64) -> Vec<f16> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let centres: Vec<f32> = (0..256 * DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
    (0..n)
        .flat_map(|_| {
            let c = rng.gen_range(0..256);
            (0..DIM)
                .map(|j| f16::from_f32(centres[c * DIM + j] + rng.gen_range(-0.5..0.5)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One block of 64 code rows scored for a group of 4 query heads.
fn code_block(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let rows: Vec<f32> = (0..ROWS * DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let qs: Vec<f32> = (0..GROUP * DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let kern = Kernels::best();
    let mut g = c.benchmark_group("cluster_code_block");
    g.throughput(Throughput::Elements(ROWS as u64));
    for bits in [CodeBits::Eight, CodeBits::Four] {
        let rb = bits.row_bytes(DIM);
        let mut codes = vec![0u8; ROWS * rb];
        let mut scales = vec![0.0f32; ROWS];
        for (i, r) in rows.chunks_exact(DIM).enumerate() {
            scales[i] = bits.encode(r, &mut codes[i * rb..(i + 1) * rb]);
        }
        let mut block = vec![0.0f32; ROWS * DIM];
        let mut out = vec![0.0f32; ROWS * GROUP];
        g.bench_function(BenchmarkId::new("decode_score", format!("{bits:?}")), |b| {
            b.iter(|| {
                bits.decode(&codes, &scales, DIM, &mut block);
                kern.group(&qs, KeyRows::F32(&block), DIM, 0, &mut out);
                out[0]
            })
        });
    }
    let h: Vec<f16> = rows.iter().map(|&x| f16::from_f32(x)).collect();
    let mut out = vec![0.0f32; ROWS * GROUP];
    g.bench_function(BenchmarkId::new("f16_rows", "group"), |b| {
        b.iter(|| {
            kern.group(&qs, KeyRows::F16(&h), DIM, 0, &mut out);
            out[0]
        })
    });
    g.finish();
}

/// The group search over 128K keys, and the build.
fn group_search(c: &mut Criterion) {
    let rows = clustered(CONTEXT, 2);
    let keys = KeySlice::new(KeyRows::F16(&rows), DIM).expect("whole rows");
    let t = std::time::Instant::now();
    let idx = ClusterIndex::build(&keys, &ClusterParams::default()).expect("build");
    eprintln!(
        "cluster build of {CONTEXT} keys: {:.2} s, {} clusters, {} bytes",
        t.elapsed().as_secs_f64(),
        idx.clusters(),
        idx.memory_bytes()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let qs: Vec<f32> = (0..GROUP * DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut scratch = SearchScratch::new();
    let mut outs = vec![Hits::default(); GROUP];
    let mut g = c.benchmark_group("cluster_search");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("group4_k100_128k", |b| {
        b.iter(|| {
            idx.search_group(&keys, &qs, 100, &mut scratch, &mut outs)
                .expect("search")
                .scored
        })
    });
    g.finish();
}

criterion_group!(benches, code_block, group_search);
criterion_main!(benches);

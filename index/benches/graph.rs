//! The query-guided graph's beam search, the hot loop of a decode-step retrieve: one search
//! per query head over a context much larger than the caches (128K f16 keys of dim 128, 32 MiB),
//! with and without the row prefetch, in the same run. Reported per search; the scored-key
//! count is printed once so that ns per scored key can be derived.
//!
//! `cargo bench -p kvdex-index --bench graph`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use half::f16;
use kvdex_index::keys::{KeyRows, KeySlice};
use kvdex_index::qgraph::build::build;
use kvdex_index::{GraphParams, Hits, KeyStore, MipsIndex, SearchScratch, TrainingSignal};
use rand::{Rng, SeedableRng};
use rand_distr_lite::clustered;

const DIM: usize = 128;
const CONTEXT: usize = 131_072;
const TRAIN: usize = 1024;
const QUERIES: usize = 64;

/// Keys and queries drawn around shared cluster centres, so that the training queries' top
/// lists make a navigable graph (uniform noise would not), and searches stay local.
mod rand_distr_lite {
    use rand::Rng;

    /// `n` rows of `DIM`: centre `i % centres.len()` (of `centres`) plus uniform noise.
    pub fn clustered(rng: &mut impl Rng, centres: &[f32], n: usize, noise: f32) -> Vec<f32> {
        let d = super::DIM;
        let c = centres.len() / d;
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            let k = rng.gen_range(0..c);
            out.extend(
                centres[k * d..(k + 1) * d]
                    .iter()
                    .map(|&x| x + rng.gen_range(-noise..noise)),
            );
        }
        out
    }
}

/// Asks for transparent hugepages over `v`'s capacity, before its pages are touched: the
/// daemon's arenas get them (`kvdex-transfer`'s `mmap`), and with 4 KiB pages every scattered
/// row read would also miss the TLB, which is not what a retrieve pays.
fn advise_hugepages<T>(v: &Vec<T>) {
    const HUGE: usize = 2 << 20;
    let (p, len) = (v.as_ptr() as usize, v.capacity() * std::mem::size_of::<T>());
    let a = p.next_multiple_of(HUGE);
    let b = (p + len) / HUGE * HUGE;
    if b > a {
        // SAFETY: [a, b) lies inside `v`'s allocation; madvise only changes how the kernel
        // backs those pages and never their contents or validity.
        let rc = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            eprintln!("graph bench: madvise(MADV_HUGEPAGE) failed; keys on 4 KiB pages");
        }
    }
}

/// A key store that forwards everything to a [`KeySlice`] except the prefetch hint: the
/// baseline of the prefetch, measured in the same run.
struct NoPrefetch<'a>(KeySlice<'a>);

impl KeyStore for NoPrefetch<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn dim(&self) -> usize {
        self.0.dim()
    }
    fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut [f32]) {
        self.0.score_ids(query, ids, out)
    }
    fn score_range(&self, query: &[f32], start: usize, out: &mut [f32]) {
        self.0.score_range(query, start, out)
    }
    fn row_f32(&self, id: u32, out: &mut [f32]) {
        self.0.row_f32(id, out)
    }
}

fn graph_search(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let centres: Vec<f32> = (0..256 * DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let keys_f32 = clustered(&mut rng, &centres, CONTEXT, 1.0);
    let mut keys_f16: Vec<f16> = Vec::with_capacity(keys_f32.len());
    advise_hugepages(&keys_f16);
    keys_f16.extend(keys_f32.iter().map(|&x| f16::from_f32(x)));
    drop(keys_f32);
    let train = clustered(&mut rng, &centres, TRAIN, 1.0);
    let positions = vec![CONTEXT as u32 - 1; TRAIN];
    let queries = clustered(&mut rng, &centres, QUERIES, 1.0);
    let keys = KeySlice::new(KeyRows::F16(&keys_f16), DIM).unwrap();
    let params = GraphParams {
        max_train_queries: TRAIN,
        search_list: 128,
        ..GraphParams::default()
    };
    let signal = TrainingSignal::Queries {
        vectors: &train,
        positions: &positions,
    };
    let index = build(&keys, &signal, &params).unwrap();
    let mut scratch = SearchScratch::new();
    let mut hits = Hits::default();
    let scored: usize = queries
        .chunks_exact(DIM)
        .map(|q| {
            index
                .search(&keys, q, 64, &mut scratch, &mut hits)
                .unwrap()
                .scored
        })
        .sum();
    eprintln!(
        "graph bench: {CONTEXT} keys, L 128, k 64: {:.0} keys scored per search",
        scored as f64 / QUERIES as f64
    );
    let mut g = c.benchmark_group("graph_search_128k_f16");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    let plain = NoPrefetch(keys);
    let stores: [(&str, &dyn KeyStore); 2] = [("prefetch", &keys), ("no_prefetch", &plain)];
    for (name, store) in stores {
        g.bench_function(BenchmarkId::new(name, QUERIES), |b| {
            b.iter(|| {
                for q in queries.chunks_exact(DIM) {
                    index.search(store, q, 64, &mut scratch, &mut hits).unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, graph_search);
criterion_main!(benches);

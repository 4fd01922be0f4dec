//! Host gather micro-benchmarks: random 256-byte rows and 64 KiB blocks out of a 256 MiB
//! arena, against a naive memcpy loop and a contiguous copy of the same bytes.
//! (`kvdex bench transfer` is the end-to-end figure with its limit; this tracks the loops.)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvdex_transfer::copy::{copy_contiguous, copy_runs_prefetch};
use kvdex_transfer::{DeviceLink, HostLink, Run};
use rand::{Rng, SeedableRng};

const ARENA: usize = 256 << 20;
const BATCH: u64 = 8 << 20;

fn gathers(c: &mut Criterion) {
    let link = HostLink::new();
    let arena = link.alloc_arena(ARENA).expect("arena");
    // SAFETY: the arena is ours alone; no gather is in flight while it is filled.
    unsafe { std::ptr::write_bytes(arena.as_mut_ptr(), 3, ARENA) };
    let mut dst = vec![0u8; BATCH as usize];
    // SAFETY: `dst` outlives the registration (unregistered at the end) and is not read here.
    let id = unsafe { link.register_host(dst.as_mut_ptr(), dst.len()) }.expect("register");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut group = c.benchmark_group("gather");
    group.throughput(Throughput::Bytes(BATCH));
    group.sample_size(20);
    for block in [256u64, 64 << 10] {
        let runs: Vec<Run> = (0..BATCH / block)
            .map(|i| Run {
                src_offset: rng.gen_range(0..ARENA as u64 / block) * block,
                dst_offset: i * block,
                len: block,
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("link", block), &runs, |b, runs| {
            b.iter(|| {
                link.wait(link.gather(&arena, runs, id).expect("gather"))
                    .expect("wait")
            })
        });
        let mut scratch = vec![0u8; BATCH as usize];
        group.bench_with_input(BenchmarkId::new("prefetch_1t", block), &runs, |b, runs| {
            // SAFETY: runs lie inside the arena and the scratch buffer.
            b.iter(|| unsafe { copy_runs_prefetch(arena.as_ptr(), scratch.as_mut_ptr(), runs) })
        });
        group.bench_with_input(BenchmarkId::new("naive_1t", block), &runs, |b, runs| {
            b.iter(|| {
                // SAFETY: the arena's bytes, read while nothing writes them.
                let src = unsafe { std::slice::from_raw_parts(arena.as_ptr(), ARENA) };
                for r in runs {
                    let (s, d, l) = (r.src_offset as usize, r.dst_offset as usize, r.len as usize);
                    scratch[d..d + l].copy_from_slice(&src[s..s + l]);
                }
            })
        });
    }
    let mut scratch = vec![0u8; BATCH as usize];
    group.bench_function("contiguous_1t", |b| {
        // SAFETY: as above.
        let src = unsafe { std::slice::from_raw_parts(arena.as_ptr(), BATCH as usize) };
        b.iter(|| copy_contiguous(src, &mut scratch))
    });
    group.finish();
    link.unregister(id).expect("unregister");
}

criterion_group!(benches, gathers);
criterion_main!(benches);

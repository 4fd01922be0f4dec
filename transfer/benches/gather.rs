//! Host gather micro-benchmarks (`kvdex bench transfer` is the end-to-end figure with its
//! limit; this tracks the loops):
//! - `gather`: random 256-byte rows and 64 KiB blocks out of a 256 MiB arena, 8 MiB batches,
//!   the same runs every iteration (cache-warm), against a naive memcpy loop and a contiguous
//!   copy of the same bytes;
//! - `cold_rows`: 32 MiB batches of random 256-byte rows from a 1 GiB arena, the run set
//!   rotating among four (128 MiB of rows, four times the L3 here), so rows miss in cache and
//!   TLB as single-token gathers do: the link (streaming stores at this batch size), its
//!   streaming and ordinary loops alone, the naive loop, and the contiguous copies.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvdex_transfer::copy::{
    copy_contiguous, copy_contiguous_streaming, copy_runs_prefetch, copy_runs_streaming,
};
use kvdex_transfer::{DeviceLink, HostLink, Run};
use rand::{Rng, SeedableRng};

const ARENA: usize = 256 << 20;
const BATCH: u64 = 8 << 20;
const PAGE: usize = 4096;

/// `BATCH` bytes of `buf` starting on a page boundary. Every destination here starts on one,
/// so that no variant gains or loses from where the allocator put its buffer (glibc's `memcpy`
/// runs ~8x slower on AMD Zen when the destination is 16 bytes past the source in a page,
/// which is where a fresh 8 MiB `Vec` starts: see `copy_runs_avx2` in src/copy.rs).
fn page_aligned(buf: &mut [u8]) -> &mut [u8] {
    let skip = buf.as_ptr().align_offset(PAGE);
    &mut buf[skip..skip + BATCH as usize]
}

fn gathers(c: &mut Criterion) {
    let link = HostLink::new();
    let arena = link.alloc_arena(ARENA).expect("arena");
    // SAFETY: the arena is ours alone; no gather is in flight while it is filled.
    unsafe { std::ptr::write_bytes(arena.as_mut_ptr(), 3, ARENA) };
    let mut dst_buf = vec![1u8; BATCH as usize + PAGE];
    let dst = page_aligned(&mut dst_buf);
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
        let mut scratch_buf = vec![1u8; BATCH as usize + PAGE];
        let scratch = page_aligned(&mut scratch_buf);
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
    let mut scratch_buf = vec![1u8; BATCH as usize + PAGE];
    let scratch = page_aligned(&mut scratch_buf);
    group.bench_function("contiguous_1t", |b| {
        // SAFETY: as above.
        let src = unsafe { std::slice::from_raw_parts(arena.as_ptr(), BATCH as usize) };
        b.iter(|| copy_contiguous(src, scratch))
    });
    group.finish();
    link.unregister(id).expect("unregister");
}

const COLD_ARENA: usize = 1 << 30;
const COLD_BATCH: u64 = 32 << 20;
const ROW: u64 = 256;

fn naive(src: &[u8], dst: &mut [u8], runs: &[Run]) {
    for r in runs {
        let (s, d, l) = (r.src_offset as usize, r.dst_offset as usize, r.len as usize);
        dst[d..d + l].copy_from_slice(&src[s..s + l]);
    }
}

fn cold_rows(c: &mut Criterion) {
    let link = HostLink::new();
    let arena = link.alloc_arena(COLD_ARENA).expect("arena");
    // SAFETY: the arena is ours alone; no gather is in flight while it is filled.
    unsafe { std::ptr::write_bytes(arena.as_mut_ptr(), 3, COLD_ARENA) };
    // SAFETY: as above; read-only from here on.
    let src = unsafe { std::slice::from_raw_parts(arena.as_ptr(), COLD_ARENA) };
    let mut dst_buf = vec![1u8; COLD_BATCH as usize + PAGE];
    let skip = dst_buf.as_ptr().align_offset(PAGE);
    let dst = &mut dst_buf[skip..skip + COLD_BATCH as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let sets: Vec<Vec<Run>> = (0..4)
        .map(|_| {
            (0..COLD_BATCH / ROW)
                .map(|i| Run {
                    src_offset: rng.gen_range(0..COLD_ARENA as u64 / ROW) * ROW,
                    dst_offset: i * ROW,
                    len: ROW,
                })
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("cold_rows");
    group.throughput(Throughput::Bytes(COLD_BATCH));
    group.sample_size(10);
    let mut k = 0;
    let mut next = || {
        k = (k + 1) % sets.len();
        &sets[k]
    };
    {
        // SAFETY: `dst` outlives the registration (unregistered below) and is not read here.
        let id = unsafe { link.register_host(dst.as_mut_ptr(), dst.len()) }.expect("register");
        group.bench_function("link_256", |b| {
            b.iter(|| {
                link.wait(link.gather(&arena, next(), id).expect("gather"))
                    .expect("wait")
            })
        });
        link.unregister(id).expect("unregister");
    }
    group.bench_function("streaming_1t_256", |b| {
        // SAFETY: runs lie inside the arena and `dst`.
        b.iter(|| unsafe { copy_runs_streaming(src.as_ptr(), dst.as_mut_ptr(), next()) })
    });
    group.bench_function("prefetch_1t_256", |b| {
        // SAFETY: as above.
        b.iter(|| unsafe { copy_runs_prefetch(src.as_ptr(), dst.as_mut_ptr(), next()) })
    });
    group.bench_function("naive_1t_256", |b| b.iter(|| naive(src, dst, next())));
    let mut at = 0;
    let mut window = || {
        at = (at + COLD_BATCH as usize) % (COLD_ARENA - COLD_BATCH as usize);
        &src[at..at + COLD_BATCH as usize]
    };
    group.bench_function("contiguous_1t", |b| {
        b.iter(|| copy_contiguous(window(), dst))
    });
    group.bench_function("contiguous_streaming_1t", |b| {
        b.iter(|| copy_contiguous_streaming(window(), dst))
    });
    group.finish();
}

criterion_group!(benches, gathers, cold_rows);
criterion_main!(benches);

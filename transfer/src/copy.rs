//! The CPU copy loops behind every host gather, and the contiguous copies they are measured
//! against. Callers check bounds (see [`crate::check_runs`]); these loops trust them.

use rayon::prelude::*;

use crate::Run;

mod simd;
#[cfg(target_arch = "x86_64")]
use simd::{copy_avx2, copy_stream_avx2};

/// How many runs ahead the small-run loop prefetches: enough rows in flight to cover a DRAM
/// miss plus a page walk. Measured on random 256-byte rows from a 1 GiB arena
/// (a probe, last in the tree at 1588eef^: `transfer/examples/row_probe.rs`): 16 was best or
/// tied in paired rounds against
/// 4, 8 and 32 (the differences are near the noise of the loaded VM it was measured on).
const PREFETCH_AHEAD: usize = 16;
/// Bytes one parallel task copies: big enough to amortise a task, small enough to balance.
const PAR_TASK_BYTES: u64 = 512 << 10;
/// A run longer than this is itself split across threads.
const SPLIT_RUN_BYTES: u64 = 2 << 20;

/// A raw pointer that may cross threads: the copies it serves write disjoint bytes.
#[derive(Clone, Copy)]
struct SharedPtr(*mut u8);
// SAFETY: only used by the parallel copy, whose callers guarantee disjoint destination ranges
// and read-only sources for the copy's duration.
unsafe impl Send for SharedPtr {}
// SAFETY: as above.
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    /// A method (not field access) so closures capture the whole Send + Sync wrapper.
    fn get(self) -> *mut u8 {
        self.0
    }
}

#[inline(always)]
fn prefetch_read(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Copies `runs` one after the other on this thread, prefetching the source lines of the run
/// `PREFETCH_AHEAD` places ahead when runs are small (random single-token rows miss in cache
/// and TLB; issuing the next rows' loads early overlaps those misses).
///
/// Runs from 2 KiB to 1 MiB are copied by an AVX2 loop where the CPU has one, not by
/// `memcpy`: glibc's `memcpy` uses `rep movsb` for mid-sized copies, and on AMD Zen that runs
/// about 8x slower when the destination sits 16 bytes past the source within a 4 KiB page
/// (64 KiB runs into a `Vec` destination: 2.7 GB/s against 22 GB/s on an AMD EPYC).
/// Gathers from page-aligned arena blocks into a heap buffer hit exactly
/// that case, so the loop must not depend on where the caller's buffer happens to start.
///
/// # Safety
/// For every run, `src + src_offset .. + len` must be readable and `dst + dst_offset .. + len`
/// writable, the two ranges may not overlap, and nothing else may write the destination bytes
/// during the call.
pub unsafe fn copy_runs_prefetch(src: *const u8, dst: *mut u8, runs: &[Run]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above); the rest is the caller's contract.
        unsafe { copy_runs_avx2(src, dst, runs) };
        return;
    }
    // SAFETY: the caller's contract; `copy_libc` is a plain memcpy.
    unsafe { copy_runs_with(src, dst, runs, copy_libc) };
}

/// The run loop, generic over the per-run copy so that the AVX2 build inlines its kernel.
///
/// # Safety
/// As [`copy_runs_prefetch`]; `copy` must copy `len` bytes between non-overlapping ranges.
#[inline(always)]
unsafe fn copy_runs_with(
    src: *const u8,
    dst: *mut u8,
    runs: &[Run],
    copy: unsafe fn(*const u8, *mut u8, usize),
) {
    for (i, r) in runs.iter().enumerate() {
        if let Some(ahead) = runs.get(i + PREFETCH_AHEAD) {
            // Only the run's first line: the hardware's adjacent-line and stream prefetchers
            // bring the rest once that miss (and its page walk) is under way, and one prefetch
            // per row leaves the miss buffers to more rows (measured: 1 line per row at least
            // as fast as every line). Unconditional: for long runs one prefetch costs nothing,
            // and the row loop stays short.
            // wrapping_add: the address is only a hint and is never dereferenced here.
            prefetch_read(src.wrapping_add(ahead.src_offset as usize));
        }
        // SAFETY: bounds and disjointness are the caller's contract above.
        unsafe {
            copy(
                src.add(r.src_offset as usize),
                dst.add(r.dst_offset as usize),
                r.len as usize,
            )
        };
    }
}

/// A plain `memcpy`.
///
/// # Safety
/// `src .. + len` readable, `dst .. + len` writable, not overlapping.
unsafe fn copy_libc(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// [`copy_runs_with`] compiled with AVX2 enabled, so the vector kernel inlines into the loop.
///
/// # Safety
/// The CPU must support AVX2; otherwise as [`copy_runs_prefetch`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_runs_avx2(src: *const u8, dst: *mut u8, runs: &[Run]) {
    // SAFETY: the caller's contract, passed through.
    unsafe { copy_runs_with(src, dst, runs, copy_avx2) };
}

/// Batches of at least this many bytes are written with non-temporal (streaming) stores, as
/// glibc's `memcpy` does for the contiguous copy a gather is measured against: a batch this
/// large (half the 32 MiB L3 here) will not stay cached anyway, and streaming skips reading
/// every destination line before overwriting it, a third of the memory traffic.
pub const STREAM_MIN_BATCH_BYTES: u64 = 16 << 20;

/// As [`copy_runs_prefetch`], but the destination is written with non-temporal stores (AVX2;
/// without AVX2 this is [`copy_runs_prefetch`]). For batches of at least
/// [`STREAM_MIN_BATCH_BYTES`]; ends with a store fence, so the bytes are globally visible
/// before whoever signals completion does so.
///
/// # Safety
/// As [`copy_runs_prefetch`].
pub unsafe fn copy_runs_streaming(src: *const u8, dst: *mut u8, runs: &[Run]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above); the rest is the caller's contract.
        unsafe { copy_runs_streaming_avx2(src, dst, runs) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { copy_runs_prefetch(src, dst, runs) };
}

/// [`copy_runs_with`] over the streaming kernel, then a store fence.
///
/// # Safety
/// The CPU must support AVX2; otherwise as [`copy_runs_prefetch`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_runs_streaming_avx2(src: *const u8, dst: *mut u8, runs: &[Run]) {
    // SAFETY: the caller's contract, passed through.
    unsafe { copy_runs_with(src, dst, runs, copy_stream_avx2) };
    std::arch::x86_64::_mm_sfence();
}

/// Copies `runs` across `pool`'s threads, in tasks of about `PAR_TASK_BYTES`.
///
/// # Safety
/// As [`copy_runs_prefetch`], and in addition the destination ranges of different runs may not
/// overlap (two threads would write the same bytes).
pub unsafe fn copy_runs_parallel(
    pool: &rayon::ThreadPool,
    src: *const u8,
    dst: *mut u8,
    runs: &[Run],
    total_bytes: u64,
) {
    let avg = (total_bytes / runs.len().max(1) as u64).max(1);
    let per_task = (PAR_TASK_BYTES / avg).max(1) as usize;
    let (src, dst) = (SharedPtr(src.cast_mut()), SharedPtr(dst));
    pool.install(|| {
        runs.par_chunks(per_task).for_each(|chunk| {
            if chunk.len() == 1 && chunk[0].len > SPLIT_RUN_BYTES {
                let r = chunk[0];
                let pieces = r.len.div_ceil(PAR_TASK_BYTES * 2);
                (0..pieces).into_par_iter().for_each(|p| {
                    let off = p * PAR_TASK_BYTES * 2;
                    let len = (r.len - off).min(PAR_TASK_BYTES * 2);
                    let piece = Run {
                        src_offset: r.src_offset + off,
                        dst_offset: r.dst_offset + off,
                        len,
                    };
                    // SAFETY: a sub-range of a run the caller vouched for.
                    unsafe {
                        copy_runs_prefetch(src.get(), dst.get(), std::slice::from_ref(&piece))
                    };
                });
            } else {
                // SAFETY: the caller's contract; chunks hold distinct runs with disjoint
                // destinations, so no two tasks write the same bytes.
                unsafe { copy_runs_prefetch(src.get(), dst.get(), chunk) };
            }
        });
    });
}

/// One-thread contiguous copy with `memcpy`: part of the limit a gather is measured against.
pub fn copy_contiguous(src: &[u8], dst: &mut [u8]) {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
}

/// One-thread contiguous copy with the streaming loop that large gathers use: also part of the
/// limit, so that a gather is never measured against a weaker copy than its own.
pub fn copy_contiguous_streaming(src: &[u8], dst: &mut [u8]) {
    let n = src.len().min(dst.len());
    let run = Run {
        src_offset: 0,
        dst_offset: 0,
        len: n as u64,
    };
    // SAFETY: one run of `n` bytes inside both slices, which cannot overlap (`&` and `&mut`).
    unsafe { copy_runs_streaming(src.as_ptr(), dst.as_mut_ptr(), &[run]) };
}

/// All-threads contiguous copy: the other part of the limit (streaming stores from
/// [`STREAM_MIN_BATCH_BYTES`] on, as the gathers).
pub fn copy_contiguous_parallel(pool: &rayon::ThreadPool, src: &[u8], dst: &mut [u8]) {
    let n = src.len().min(dst.len());
    let task = PAR_TASK_BYTES as usize * 2;
    pool.install(|| {
        dst[..n]
            .par_chunks_mut(task)
            .zip(src[..n].par_chunks(task))
            .for_each(|(d, s)| {
                if n as u64 >= STREAM_MIN_BATCH_BYTES {
                    copy_contiguous_streaming(s, d);
                } else {
                    d.copy_from_slice(s);
                }
            });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(src: &[u8], dst: &mut [u8], runs: &[Run]) {
        for r in runs {
            let (s, d, l) = (r.src_offset as usize, r.dst_offset as usize, r.len as usize);
            dst[d..d + l].copy_from_slice(&src[s..s + l]);
        }
    }

    #[test]
    fn both_loops_match_the_reference_on_random_runs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let src: Vec<u8> = (0..(8 << 20)).map(|_| rng.gen()).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for &max_units in &[1u64, 16, 4096, 300_000] {
            let mut runs = Vec::new();
            let mut at = 0;
            while runs.len() < 64 {
                let len = rng.gen_range(1..=max_units) * 16;
                let src_offset = rng.gen_range(0..(src.len() as u64 - len) / 16) * 16;
                runs.push(Run {
                    src_offset,
                    dst_offset: at,
                    len,
                });
                at += len + 16 * rng.gen_range(0..3);
            }
            let total: u64 = runs.iter().map(|r| r.len).sum();
            let mut want = vec![0u8; at as usize];
            reference(&src, &mut want, &runs);
            let mut one = vec![0u8; at as usize];
            // SAFETY: runs were drawn inside both buffers, and `one` is a separate allocation.
            unsafe { copy_runs_prefetch(src.as_ptr(), one.as_mut_ptr(), &runs) };
            assert!(one == want, "serial loop, runs up to {max_units} x 16 B");
            let mut nt = vec![0u8; at as usize];
            // SAFETY: as above.
            unsafe { copy_runs_streaming(src.as_ptr(), nt.as_mut_ptr(), &runs) };
            assert!(nt == want, "streaming loop, runs up to {max_units} x 16 B");
            let mut par = vec![0u8; at as usize];
            // SAFETY: as above, and destinations are ascending and disjoint by construction.
            unsafe { copy_runs_parallel(&pool, src.as_ptr(), par.as_mut_ptr(), &runs, total) };
            assert!(par == want, "parallel loop, runs up to {max_units} x 16 B");
        }
    }

    #[test]
    fn contiguous_copies_copy() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let src: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
        let mut a = vec![0u8; src.len()];
        let mut b = vec![0u8; src.len()];
        copy_contiguous(&src, &mut a);
        copy_contiguous_parallel(&pool, &src, &mut b);
        assert!(a == src && b == src);
        let mut c = vec![0u8; src.len()];
        copy_contiguous_streaming(&src, &mut c);
        assert!(c == src);
    }
}

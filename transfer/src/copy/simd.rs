//! The AVX2 copy kernels behind [`super::copy_runs_prefetch`] and
//! [`super::copy_runs_streaming`], and the size rules that decide when `memcpy` is better.
#![cfg(target_arch = "x86_64")]

/// Runs at least this long go to the C library's `memcpy`, whose large-copy path (non-temporal
/// stores, page-interleaved loops) beats a cached vector loop once a run outgrows the caches.
const LIBC_MIN_BYTES: u64 = 1 << 20;
/// Runs shorter than this also go to `memcpy`: its small-copy path (a few overlapping vector
/// moves, no loop, no `rep movsb`) is faster than the AVX2 loop for single-token rows.
const VECTOR_LOOP_MIN_BYTES: u64 = 2048;
/// Runs shorter than this are streamed only when they cover whole cache lines (see
/// [`stream_lines_avx2`]); otherwise they take ordinary stores, since a partial line written by
/// non-temporal stores costs a partial write-combining flush.
const STREAM_MIN_RUN_BYTES: usize = 4096;
/// A cache line.
const LINE: usize = 64;

/// Rows up to this long whose length is a multiple of 32 are copied by a short loop inlined
/// into the run loop, not by a call: single-token rows (256 B) are latency-bound, and a tight
/// loop keeps more rows' loads in the out-of-order window than a call per row does.
const INLINE_ROW_MAX_BYTES: usize = 512;

/// Copies `len` bytes: short rows inline (see [`INLINE_ROW_MAX_BYTES`]), the rest through
/// [`copy_avx2_outlined`].
///
/// # Safety
/// The CPU must support AVX2; `src .. + len` readable, `dst .. + len` writable, not
/// overlapping.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn copy_avx2(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_storeu_si256};
    if len <= INLINE_ROW_MAX_BYTES && len.is_multiple_of(32) {
        let mut i = 0;
        // SAFETY: `i + 32 <= len` for every access, inside both ranges (the caller's
        // contract); unaligned loads and stores are allowed.
        unsafe {
            while i < len {
                let v = _mm256_loadu_si256(src.add(i).cast::<__m256i>());
                _mm256_storeu_si256(dst.add(i).cast::<__m256i>(), v);
                i += 32;
            }
        }
        return;
    }
    // SAFETY: the caller's contract, passed through.
    unsafe { copy_avx2_outlined(src, dst, len) }
}

/// Copies `len` bytes with 32-byte AVX2 loads and stores, four per step (small and large runs
/// go to `memcpy`, see [`VECTOR_LOOP_MIN_BYTES`] and [`LIBC_MIN_BYTES`]).
///
/// # Safety
/// The CPU must support AVX2; `src .. + len` readable, `dst .. + len` writable, not
/// overlapping.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline(never)]
unsafe fn copy_avx2_outlined(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_storeu_si256};
    if !(VECTOR_LOOP_MIN_BYTES..LIBC_MIN_BYTES).contains(&(len as u64)) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        return;
    }
    let mut i = 0;
    // SAFETY: every access is at `i .. i + 128 <= len` (or `i .. i + 32 <= len`) from either
    // base, inside the ranges the caller vouched for; unaligned loads and stores are allowed.
    unsafe {
        while i + 128 <= len {
            let (s, d) = (src.add(i).cast::<__m256i>(), dst.add(i).cast::<__m256i>());
            let a = _mm256_loadu_si256(s);
            let b = _mm256_loadu_si256(s.add(1));
            let c = _mm256_loadu_si256(s.add(2));
            let e = _mm256_loadu_si256(s.add(3));
            _mm256_storeu_si256(d, a);
            _mm256_storeu_si256(d.add(1), b);
            _mm256_storeu_si256(d.add(2), c);
            _mm256_storeu_si256(d.add(3), e);
            i += 128;
        }
        while i + 32 <= len {
            _mm256_storeu_si256(
                dst.add(i).cast::<__m256i>(),
                _mm256_loadu_si256(src.add(i).cast::<__m256i>()),
            );
            i += 32;
        }
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
    }
}

/// Copies `len` bytes with unaligned 32-byte loads and 32-byte-aligned non-temporal stores;
/// the unaligned head and the tail go through `memcpy`. The caller fences afterwards.
///
/// # Safety
/// The CPU must support AVX2; `src .. + len` readable, `dst .. + len` writable, not
/// overlapping.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn copy_stream_avx2(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract; AVX2 is present; the line-aligned case is exactly what
    // `stream_lines_avx2` requires.
    unsafe {
        if len < STREAM_MIN_RUN_BYTES
            && len.is_multiple_of(LINE)
            && (dst as usize).is_multiple_of(LINE)
        {
            stream_lines_avx2(src, dst, len)
        } else {
            stream_other_avx2(src, dst, len)
        }
    }
}

/// The streaming copy of every run [`stream_lines_avx2`] does not take: out of line, so that
/// the run loop over single-token rows stays as short as a loop written for rows alone
/// (measured with `transfer/examples/row_probe.rs`, last in the tree at 1588eef^: within
/// noise of a loop written for rows alone once this was outlined; ~10% behind before).
///
/// # Safety
/// As [`copy_stream_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline(never)]
unsafe fn stream_other_avx2(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract, passed through.
    unsafe {
        if len >= STREAM_MIN_RUN_BYTES {
            stream_long_avx2(src, dst, len)
        } else {
            copy_avx2(src, dst, len)
        }
    }
}

/// The streaming copy of runs of at least [`STREAM_MIN_RUN_BYTES`] (out of line: one call per
/// long run costs nothing).
///
/// # Safety
/// As [`copy_stream_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline(never)]
unsafe fn stream_long_avx2(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_stream_si256};
    let head = dst.align_offset(32).min(len);
    // SAFETY: every access below stays inside `0 .. len` of either range (the caller's
    // contract); stores at `dst + i` with `i >= head` are 32-byte aligned, as streaming
    // stores require.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        let mut i = head;
        while i + 128 <= len {
            let (s, d) = (src.add(i).cast::<__m256i>(), dst.add(i).cast::<__m256i>());
            let a = _mm256_loadu_si256(s);
            let b = _mm256_loadu_si256(s.add(1));
            let c = _mm256_loadu_si256(s.add(2));
            let e = _mm256_loadu_si256(s.add(3));
            _mm256_stream_si256(d, a);
            _mm256_stream_si256(d.add(1), b);
            _mm256_stream_si256(d.add(2), c);
            _mm256_stream_si256(d.add(3), e);
            i += 128;
        }
        while i + 32 <= len {
            let v = _mm256_loadu_si256(src.add(i).cast::<__m256i>());
            _mm256_stream_si256(dst.add(i).cast::<__m256i>(), v);
            i += 32;
        }
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
    }
}
/// Copies whole cache lines with non-temporal stores: the path of single-token rows (256 B)
/// in a large batch. Each line is written whole by two 32-byte streaming stores, so it leaves
/// the write-combining buffer as one full-line write and the destination line is never read
/// first. On a loaded 2-vCPU VM this takes 1 KiB rows in a 32 MiB batch from 27% to 46% of the
/// limit (paired median of 3 runs); for 256-byte rows the gain over ordinary stores is within
/// the noise there (docs/design/0012-host-gather.md).
/// The caller fences afterwards.
///
/// # Safety
/// The CPU must support AVX2; `dst` is 64-byte aligned and `len` a multiple of 64;
/// `src .. + len` readable, `dst .. + len` writable, not overlapping.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn stream_lines_avx2(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_stream_si256};
    let mut i = 0;
    // SAFETY: `i + 64 <= len` for every access, inside both ranges (the caller's contract);
    // `dst + i` is 64-byte aligned, so both streaming stores are 32-byte aligned.
    unsafe {
        while i < len {
            let s = src.add(i).cast::<__m256i>();
            let d = dst.add(i).cast::<__m256i>();
            let a = _mm256_loadu_si256(s);
            let b = _mm256_loadu_si256(s.add(1));
            _mm256_stream_si256(d, a);
            _mm256_stream_si256(d.add(1), b);
            i += LINE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel_copies_every_length_and_offset() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("SKIPPED: avx2_kernel_copies_every_length_and_offset: no AVX2 on this CPU");
            return;
        }
        let src: Vec<u8> = (0..(1 << 21) + 4096).map(|i| (i % 253) as u8).collect();
        let lens = (0..600).chain(2000..2300).chain([
            4096,
            4112,
            65536 + 48,
            (1 << 20) - 16,
            1 << 20,
            (1 << 20) + 16,
        ]);
        for len in lens {
            for (s_off, d_off) in [(0, 0), (0, 16), (48, 16), (4080, 7)] {
                let mut dst = vec![0u8; len + 64];
                // SAFETY: AVX2 checked above; both ranges lie inside their own buffers.
                unsafe { copy_avx2(src.as_ptr().add(s_off), dst.as_mut_ptr().add(d_off), len) };
                assert!(
                    dst[d_off..d_off + len] == src[s_off..s_off + len],
                    "len {len}"
                );
                assert!(
                    dst[..d_off].iter().all(|&b| b == 0),
                    "wrote before, len {len}"
                );
                assert!(
                    dst[d_off + len..].iter().all(|&b| b == 0),
                    "wrote past, len {len}"
                );
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn streaming_kernel_copies_every_length_and_offset() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("SKIPPED: streaming_kernel_copies_every_length_and_offset: no AVX2");
            return;
        }
        let src: Vec<u8> = (0..(1 << 20) + 4096).map(|i| (i % 241) as u8).collect();
        let lens = (0..400).chain([4096, 4112, 65536 + 48, 1 << 20]);
        for len in lens {
            for (s_off, d_off) in [(0, 0), (0, 16), (48, 16), (4080, 7), (3, 31)] {
                let mut dst = vec![0u8; len + 64];
                // SAFETY: AVX2 checked above; both ranges lie inside their own buffers.
                unsafe {
                    copy_stream_avx2(src.as_ptr().add(s_off), dst.as_mut_ptr().add(d_off), len);
                    std::arch::x86_64::_mm_sfence();
                }
                assert!(
                    dst[d_off..d_off + len] == src[s_off..s_off + len],
                    "len {len}"
                );
                assert!(
                    dst[..d_off].iter().all(|&b| b == 0),
                    "wrote before, len {len}"
                );
                assert!(
                    dst[d_off + len..].iter().all(|&b| b == 0),
                    "wrote past, len {len}"
                );
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn streaming_kernel_copies_whole_lines_to_line_aligned_destinations() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("SKIPPED: streaming_kernel_copies_whole_lines...: no AVX2");
            return;
        }
        let src: Vec<u8> = (0..16384).map(|i| (i % 239) as u8).collect();
        let mut buf = vec![0u8; 8192 + 3 * LINE];
        let base = buf.as_ptr().align_offset(LINE);
        for len in (LINE..STREAM_MIN_RUN_BYTES + 2 * LINE).step_by(LINE) {
            for s_off in [0, 16, 64, 4080] {
                buf.fill(0);
                let d_off = base + LINE;
                // SAFETY: AVX2 checked above; `d_off` is 64-byte aligned inside `buf` with
                // room for `len` bytes; the source range lies inside `src`.
                unsafe {
                    copy_stream_avx2(src.as_ptr().add(s_off), buf.as_mut_ptr().add(d_off), len);
                    std::arch::x86_64::_mm_sfence();
                }
                assert!(
                    buf[d_off..d_off + len] == src[s_off..s_off + len],
                    "len {len}"
                );
                assert!(
                    buf[..d_off].iter().all(|&b| b == 0),
                    "wrote before, len {len}"
                );
                assert!(
                    buf[d_off + len..].iter().all(|&b| b == 0),
                    "wrote past, len {len}"
                );
            }
        }
    }
}

//! AVX2 + FMA kernels for int8 rows: 16 codes per step (two groups of 8 widened to f32),
//! scalar tail.
//!
//! Every function is `unsafe` only because of its `target_feature`: callers must have checked
//! that the CPU has avx2 and fma. Bounds are checked here (the common length).

use std::arch::x86_64::*;

use half::bf16;

/// Eight codes at `p` widened to f32 lanes.
///
/// # Safety
/// avx2 is present and `p..p + 8` is readable.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen8(p: *const i8) -> __m256 {
    // SAFETY: the caller guarantees 8 readable bytes at p; loadl reads exactly 8, unaligned.
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `<q, codes>` over the common length.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot(q: &[f32], codes: &[i8]) -> f32 {
    let n = q.len().min(codes.len());
    let body = n - n % 16;
    let (qp, cp) = (q.as_ptr(), codes.as_ptr());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= body <= n, and n bounds both slices.
        unsafe {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), widen8(cp.add(i)), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), widen8(cp.add(i + 8)), a1);
        }
        i += 16;
    }
    let mut s = hsum(_mm256_add_ps(a0, a1));
    for j in body..n {
        s += q[j] * f32::from(codes[j]);
    }
    s
}

/// `acc += w · codes` over the common length.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn add_scaled(acc: &mut [f32], w: f32, codes: &[i8]) {
    let n = acc.len().min(codes.len());
    let body = n - n % 16;
    let wv = _mm256_set1_ps(w);
    let (ap, cp) = (acc.as_mut_ptr(), codes.as_ptr());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= body <= n, and n bounds both slices; acc is borrowed mutably.
        unsafe {
            let y0 = _mm256_fmadd_ps(wv, widen8(cp.add(i)), _mm256_loadu_ps(ap.add(i)));
            let y1 = _mm256_fmadd_ps(wv, widen8(cp.add(i + 8)), _mm256_loadu_ps(ap.add(i + 8)));
            _mm256_storeu_ps(ap.add(i), y0);
            _mm256_storeu_ps(ap.add(i + 8), y1);
        }
        i += 16;
    }
    for j in body..n {
        acc[j] += w * f32::from(codes[j]);
    }
}

/// Row `i`'s score `s_i · <q, c_i>`, `-inf` past the end.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn score(q: &[f32], codes: &[i8], scales: &[bf16], dim: usize, i: usize) -> f32 {
    match (codes.get(i * dim..(i + 1) * dim), scales.get(i)) {
        // SAFETY: this function's own target features are the kernel's.
        (Some(c), Some(s)) => s.to_f32() * unsafe { dot(q, c) },
        _ => f32::NEG_INFINITY,
    }
}

/// `out[i] = s_i · <q, c_i>` for rows `0..out.len()` of `codes`/`scales`; rows past the end
/// score `-inf`. The loop runs inside the target features, so `dot` inlines.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn block(q: &[f32], codes: &[i8], scales: &[bf16], dim: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = score(q, codes, scales, dim, i);
    }
}

/// `out[i] = s_id · <q, c_id>` for `id = ids[i]`; ids past the end score `-inf`.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gather(
    q: &[f32],
    codes: &[i8],
    scales: &[bf16],
    dim: usize,
    ids: &[u32],
    out: &mut [f32],
) {
    for (o, &id) in out.iter_mut().zip(ids) {
        *o = score(q, codes, scales, dim, id as usize);
    }
}

/// GQA group over rows `0..n` (`n = out.len() / g`): `out[j * n + i] = s_i · <qs[j], c_i>`.
/// Row-major, so each row's codes are read from memory once for the group.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn group(qs: &[f32], codes: &[i8], scales: &[bf16], dim: usize, out: &mut [f32]) {
    let g = qs.len() / dim.max(1);
    let n = out.len() / g.max(1);
    for i in 0..n {
        let row = (codes.get(i * dim..(i + 1) * dim), scales.get(i));
        for (j, q) in qs.chunks_exact(dim.max(1)).enumerate() {
            out[j * n + i] = match row {
                // SAFETY: this function's own target features are the kernel's.
                (Some(c), Some(s)) => s.to_f32() * unsafe { dot(q, c) },
                _ => f32::NEG_INFINITY,
            };
        }
    }
}

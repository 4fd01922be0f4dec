//! AVX2 + FMA + F16C kernels for `acc += w * row`: 8 lanes per step, scalar tail.
//!
//! Every function is `unsafe` only because of its `target_feature`: callers must have checked
//! that the CPU has avx2, fma and f16c. Bounds are checked here (the common length).

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::scalar;

/// `acc += w * row` over the common length, f32 rows.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn add_scaled_f32(acc: &mut [f32], w: f32, row: &[f32]) {
    let n = acc.len().min(row.len());
    let body = n - n % 8;
    let wv = _mm256_set1_ps(w);
    let (a, r) = (acc.as_mut_ptr(), row.as_ptr());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= body <= n, and n bounds both slices.
        unsafe {
            let x = _mm256_loadu_ps(r.add(i));
            let y = _mm256_loadu_ps(a.add(i));
            _mm256_storeu_ps(a.add(i), _mm256_fmadd_ps(wv, x, y));
        }
        i += 8;
    }
    scalar::add_scaled_f32(&mut acc[body..n], w, &row[body..n]);
}

/// `acc += w * row` over the common length, f16 rows widened with `vcvtph2ps`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn add_scaled_f16(acc: &mut [f32], w: f32, row: &[f16]) {
    let n = acc.len().min(row.len());
    let body = n - n % 8;
    let wv = _mm256_set1_ps(w);
    let (a, r) = (acc.as_mut_ptr(), row.as_ptr());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= body <= n bounds both slices; f16 is 2 bytes, so 8 of them are one
        // unaligned 128-bit load.
        unsafe {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(r.add(i) as *const __m128i));
            let y = _mm256_loadu_ps(a.add(i));
            _mm256_storeu_ps(a.add(i), _mm256_fmadd_ps(wv, x, y));
        }
        i += 8;
    }
    scalar::add_scaled_f16(&mut acc[body..n], w, &row[body..n]);
}

/// `acc += w * row` over the common length, bf16 rows widened by a 16-bit left shift (bf16 is
/// the top half of an f32).
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn add_scaled_bf16(acc: &mut [f32], w: f32, row: &[bf16]) {
    let n = acc.len().min(row.len());
    let body = n - n % 8;
    let wv = _mm256_set1_ps(w);
    let (a, r) = (acc.as_mut_ptr(), row.as_ptr());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= body <= n bounds both slices; bf16 is 2 bytes, so 8 of them are one
        // unaligned 128-bit load.
        unsafe {
            let h = _mm_loadu_si128(r.add(i) as *const __m128i);
            let x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            let y = _mm256_loadu_ps(a.add(i));
            _mm256_storeu_ps(a.add(i), _mm256_fmadd_ps(wv, x, y));
        }
        i += 8;
    }
    scalar::add_scaled_bf16(&mut acc[body..n], w, &row[body..n]);
}

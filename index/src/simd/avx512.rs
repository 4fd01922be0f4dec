//! AVX-512F kernels (16 f32 lanes). `_mm512_cvtph_ps` (f16 -> f32) is part of AVX-512F itself.
//!
//! Every function is `unsafe` only because of `#[target_feature]`: the caller must have checked
//! that the CPU has avx512f (see [`super::Isa::available`]). Lengths are checked inside.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::{bf16, f16};

/// Loads 16 key elements as f32.
trait Lanes: Copy {
    /// # Safety
    /// `p` must be valid for reading 16 elements, and the CPU must have avx512f.
    unsafe fn load16(p: *const Self) -> __m512;
    fn widen(self) -> f32;
}

impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable elements at `p`.
        unsafe { _mm512_loadu_ps(p) }
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Lanes for f16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable halfs (32 bytes) at `p`.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Lanes for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable bf16 (32 bytes) at `p`. A bf16 is the top
        // half of an f32, so widening is a zero-extend and a shift.
        unsafe {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
        }
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Lanes for i8 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable codes (16 bytes) at `p`.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
    }
    fn widen(self) -> f32 {
        f32::from(self)
    }
}

/// One inner product over `d = min(q.len(), k.len())` elements.
#[inline]
#[target_feature(enable = "avx512f")]
fn dot<T: Lanes>(q: &[f32], k: &[T]) -> f32 {
    let d = q.len().min(k.len());
    let body = d & !31;
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 32 <= d, which is within both slices.
        unsafe {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(i)), T::load16(kp.add(i)), a0);
            a1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(qp.add(i + 16)),
                T::load16(kp.add(i + 16)),
                a1,
            );
        }
        i += 32;
    }
    if i + 16 <= d {
        // SAFETY: i + 16 <= d, within both slices.
        unsafe {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(i)), T::load16(kp.add(i)), a0);
        }
        i += 16;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for j in i..d {
        s += q[j] * k[j].widen();
    }
    s
}

/// `out[i] = <q, keys[i]>` for `out.len()` rows of `dim` (clamped to whole rows present).
#[target_feature(enable = "avx512f")]
fn block<T: Lanes>(q: &[f32], keys: &[T], dim: usize, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(keys.chunks_exact(dim)) {
        *o = dot(q, row);
    }
}

/// `out[i] = <q, keys[ids[i]]>`; ids outside the rows score -inf.
#[target_feature(enable = "avx512f")]
fn gather<T: Lanes>(q: &[f32], keys: &[T], dim: usize, ids: &[u32], out: &mut [f32]) {
    for (o, &id) in out.iter_mut().zip(ids) {
        let s = id as usize * dim;
        *o = match keys.get(s..s + dim) {
            Some(row) => dot(q, row),
            None => f32::NEG_INFINITY,
        };
    }
}

/// A GQA group: `out[j * n + i] = <qs[j], keys[i]>` for `g = qs.len() / dim` queries and
/// `n = out.len() / g` rows; each key row is loaded once per four queries while it is in L1.
#[target_feature(enable = "avx512f")]
fn group<T: Lanes>(qs: &[f32], keys: &[T], dim: usize, out: &mut [f32]) {
    let g = qs.len() / dim;
    if g == 0 || !dim.is_multiple_of(16) {
        for (j, q) in qs.chunks_exact(dim).enumerate() {
            let n = out.len() / g.max(1);
            block(q, keys, dim, &mut out[j * n..(j + 1) * n]);
        }
        return;
    }
    let n = (out.len() / g).min(keys.len() / dim);
    let qp = qs.as_ptr();
    for i in 0..n {
        let kp = keys[i * dim..].as_ptr();
        let mut j = 0;
        while j + 4 <= g {
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut c = 0;
            while c < dim {
                // SAFETY: c + 16 <= dim; row i and queries j..j+4 lie within `keys` and `qs`.
                unsafe {
                    let kv = T::load16(kp.add(c));
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add((j + t) * dim + c)), kv, *a);
                    }
                }
                c += 16;
            }
            for (t, a) in acc.iter().enumerate() {
                out[(j + t) * n + i] = _mm512_reduce_add_ps(*a);
            }
            j += 4;
        }
        while j < g {
            out[j * n + i] = dot(&qs[j * dim..(j + 1) * dim], &keys[i * dim..(i + 1) * dim]);
            j += 1;
        }
    }
}

macro_rules! export {
    ($t:ty, $dot:ident, $block:ident, $gather:ident, $group:ident) => {
        /// Inner product.
        ///
        /// # Safety
        /// The CPU must support avx512f.
        pub unsafe fn $dot(q: &[f32], k: &[$t]) -> f32 {
            // SAFETY: forwarded contract: the CPU has the feature.
            unsafe { dot(q, k) }
        }
        /// One query against a block of rows.
        ///
        /// # Safety
        /// The CPU must support avx512f.
        pub unsafe fn $block(q: &[f32], keys: &[$t], dim: usize, out: &mut [f32]) {
            // SAFETY: forwarded contract: the CPU has the feature.
            unsafe { block(q, keys, dim, out) }
        }
        /// One query against the rows named by `ids`.
        ///
        /// # Safety
        /// The CPU must support avx512f.
        pub unsafe fn $gather(q: &[f32], keys: &[$t], dim: usize, ids: &[u32], out: &mut [f32]) {
            // SAFETY: forwarded contract: the CPU has the feature.
            unsafe { gather(q, keys, dim, ids, out) }
        }
        /// A GQA group of queries against a block of rows.
        ///
        /// # Safety
        /// The CPU must support avx512f.
        pub unsafe fn $group(qs: &[f32], keys: &[$t], dim: usize, out: &mut [f32]) {
            // SAFETY: forwarded contract: the CPU has the feature.
            unsafe { group(qs, keys, dim, out) }
        }
    };
}

export!(f32, dot_f32, block_f32, gather_f32, group_f32);
export!(f16, dot_f16, block_f16, gather_f16, group_f16);
export!(bf16, dot_bf16, block_bf16, gather_bf16, group_bf16);
export!(i8, dot_i8, block_i8, gather_i8, group_i8);

//! AVX2 + FMA + F16C kernels (8 f32 lanes).
//!
//! Every function is `unsafe` only because of `#[target_feature]`: the caller must have checked
//! that the CPU has avx2, fma and f16c (see [`super::Isa::available`]). Lengths are checked inside.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::{bf16, f16};

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// Loads 8 key elements as f32.
trait Lanes: Copy {
    /// # Safety
    /// `p` must be valid for reading 8 elements, and the CPU must have avx2, fma and f16c.
    unsafe fn load8(p: *const Self) -> __m256;
    fn widen(self) -> f32;
}

impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements at `p`.
        unsafe { _mm256_loadu_ps(p) }
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Lanes for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: the caller guarantees 8 readable halfs (16 bytes) at `p` and f16c support.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Lanes for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at `p` and avx2 support. A
        // bf16 is the top half of an f32, so widening is a zero-extend and a shift.
        unsafe {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
        }
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Lanes for i8 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: the caller guarantees 8 readable codes (8 bytes) at `p` and avx2 support.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
    }
    fn widen(self) -> f32 {
        f32::from(self)
    }
}

/// One inner product over `d = min(q.len(), k.len())` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot<T: Lanes>(q: &[f32], k: &[T]) -> f32 {
    let d = q.len().min(k.len());
    let body = d & !15;
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= d, which is within both slices.
        unsafe {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), T::load8(kp.add(i)), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), T::load8(kp.add(i + 8)), a1);
        }
        i += 16;
    }
    let mut s = hsum(_mm256_add_ps(a0, a1));
    for j in body..d {
        s += q[j] * k[j].widen();
    }
    s
}

/// `out[i] = <q, keys[i]>` for `out.len()` rows of `dim` (clamped to whole rows present).
#[target_feature(enable = "avx2,fma,f16c")]
fn block<T: Lanes>(q: &[f32], keys: &[T], dim: usize, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(keys.chunks_exact(dim)) {
        *o = dot(q, row);
    }
}

/// `out[i] = <q, keys[ids[i]]>`; ids outside the rows score -inf.
#[target_feature(enable = "avx2,fma,f16c")]
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
/// `n = out.len() / g` rows. Each key row is loaded once per group of four queries while it is
/// in L1, so memory traffic is that of a single query.
#[target_feature(enable = "avx2,fma,f16c")]
fn group<T: Lanes>(qs: &[f32], keys: &[T], dim: usize, out: &mut [f32]) {
    let g = qs.len() / dim;
    if g == 0 || !dim.is_multiple_of(8) {
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
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < dim {
                // SAFETY: c + 8 <= dim; row i and queries j..j+4 lie within `keys` and `qs`.
                unsafe {
                    let kv = T::load8(kp.add(c));
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add((j + t) * dim + c)), kv, *a);
                    }
                }
                c += 8;
            }
            for (t, a) in acc.iter().enumerate() {
                out[(j + t) * n + i] = hsum(*a);
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
        /// Inner product (see the module doc for the safety contract).
        ///
        /// # Safety
        /// The CPU must support avx2, fma and f16c.
        pub unsafe fn $dot(q: &[f32], k: &[$t]) -> f32 {
            // SAFETY: forwarded contract: the CPU has the features.
            unsafe { dot(q, k) }
        }
        /// One query against a block of rows.
        ///
        /// # Safety
        /// The CPU must support avx2, fma and f16c.
        pub unsafe fn $block(q: &[f32], keys: &[$t], dim: usize, out: &mut [f32]) {
            // SAFETY: forwarded contract: the CPU has the features.
            unsafe { block(q, keys, dim, out) }
        }
        /// One query against the rows named by `ids`.
        ///
        /// # Safety
        /// The CPU must support avx2, fma and f16c.
        pub unsafe fn $gather(q: &[f32], keys: &[$t], dim: usize, ids: &[u32], out: &mut [f32]) {
            // SAFETY: forwarded contract: the CPU has the features.
            unsafe { gather(q, keys, dim, ids, out) }
        }
        /// A GQA group of queries against a block of rows.
        ///
        /// # Safety
        /// The CPU must support avx2, fma and f16c.
        pub unsafe fn $group(qs: &[f32], keys: &[$t], dim: usize, out: &mut [f32]) {
            // SAFETY: forwarded contract: the CPU has the features.
            unsafe { group(qs, keys, dim, out) }
        }
    };
}

export!(f32, dot_f32, block_f32, gather_f32, group_f32);
export!(f16, dot_f16, block_f16, gather_f16, group_f16);
export!(bf16, dot_bf16, block_bf16, gather_bf16, group_bf16);
export!(i8, dot_i8, block_i8, gather_i8, group_i8);

//! Portable kernels: the reference every SIMD path is tested against, and the fallback on CPUs
//! without AVX2. Written with independent accumulators so that the compiler can vectorise them.

use half::{bf16, f16};

/// Inner product of `q` and `k` (the shorter length wins).
pub fn dot_f32(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = q.len().min(k.len());
    let (qc, kc) = (q[..n].chunks_exact(8), k[..n].chunks_exact(8));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let tail: f32 = qr.iter().zip(kr).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

/// Inner product of an f32 query and an f16 key.
pub fn dot_f16(q: &[f32], k: &[f16]) -> f32 {
    q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
}

/// Inner product of an f32 query and a bf16 key.
pub fn dot_bf16(q: &[f32], k: &[bf16]) -> f32 {
    q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
}

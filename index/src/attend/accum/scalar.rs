//! Portable reference kernels for `acc += w * row`.

use half::{bf16, f16};

/// `acc += w * row` over the common length, f32 rows.
pub fn add_scaled_f32(acc: &mut [f32], w: f32, row: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(row) {
        *a += w * x;
    }
}

/// `acc += w * row` over the common length, f16 rows (widened to f32).
pub fn add_scaled_f16(acc: &mut [f32], w: f32, row: &[f16]) {
    for (a, &x) in acc.iter_mut().zip(row) {
        *a += w * x.to_f32();
    }
}

/// `acc += w * row` over the common length, bf16 rows (widened to f32).
pub fn add_scaled_bf16(acc: &mut [f32], w: f32, row: &[bf16]) {
    for (a, &x) in acc.iter_mut().zip(row) {
        *a += w * x.to_f32();
    }
}

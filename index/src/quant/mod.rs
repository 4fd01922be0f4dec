//! Int8 key/value rows: one signed byte per element and one scale per row (symmetric absmax).
//!
//! A row `x` of `dim` elements is stored as codes `c_i = round(x_i / s)` in `-127..=127` and a
//! bf16 scale `s >= max_i |x_i| / 127` (rounded up to the next bf16, so no code clips). The
//! round trip is exact to half a step: `|x_i - s · c_i| <= s / 2`. A row of zeros has `s = 0`.
//!
//! bf16 keeps the scale at 2 bytes with f32's range (no row can overflow or underflow it); a
//! row then costs `dim + 2` bytes against f16's `2 · dim`.
//!
//! # Layout
//! - this file: [`QuantRows`] (borrowed codes and scales) and the codec;
//! - [`kernels`]: the fused scoring and accumulation loops (`s · <q, c>`, `acc += w · s · c`),
//!   scalar and AVX2, which the SIMD dispatch and the attention kernels call for int8 rows.

pub mod kernels;

#[cfg(target_arch = "x86_64")]
mod avx2;

use half::bf16;

/// Largest code magnitude.
pub const LEVELS: f32 = 127.0;

/// Bytes one int8 row of `dim` elements takes: its codes and its bf16 scale.
pub const fn row_bytes(dim: usize) -> usize {
    dim + SCALE_BYTES
}

/// Bytes of one row's scale.
pub const SCALE_BYTES: usize = std::mem::size_of::<bf16>();

/// Int8 rows stored elsewhere: `codes` holds `scales.len()` rows of `dim` codes back to back.
#[derive(Clone, Copy, Debug)]
pub struct QuantRows<'a> {
    /// Row-major codes.
    pub codes: &'a [i8],
    /// One scale per row.
    pub scales: &'a [bf16],
}

impl<'a> QuantRows<'a> {
    /// Rows `range` (clamped to the rows present), for a store of rows of `dim` codes.
    pub fn rows(&self, dim: usize, range: std::ops::Range<usize>) -> QuantRows<'a> {
        let n = self.scales.len().min(self.codes.len() / dim.max(1));
        let (a, b) = (range.start.min(n), range.end.min(n));
        let (a, b) = (a, b.max(a));
        QuantRows {
            codes: &self.codes[a * dim..b * dim],
            scales: &self.scales[a..b],
        }
    }

    /// Row `id`'s codes and scale, or `None` past the end.
    #[inline]
    pub fn row(&self, dim: usize, id: usize) -> Option<(&'a [i8], f32)> {
        let codes = self.codes.get(id * dim..(id + 1) * dim)?;
        Some((codes, self.scales.get(id)?.to_f32()))
    }
}

/// The smallest bf16 at or above `amax / 127`: codes of a row with that absmax never clip.
pub fn scale_for(amax: f32) -> bf16 {
    let want = amax / LEVELS;
    let s = bf16::from_f32(want);
    if s.to_f32() < want {
        // Positive and finite: the next bit pattern is the next larger bf16.
        bf16::from_bits(s.to_bits() + 1)
    } else {
        s
    }
}

/// Quantizes `x` into `codes` (the common length) and returns the row's scale.
pub fn quantize_row(x: &[f32], codes: &mut [i8]) -> bf16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = scale_for(amax);
    let s = scale.to_f32();
    if s == 0.0 {
        codes.fill(0);
        return scale;
    }
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (v / s).round().clamp(-LEVELS, LEVELS) as i8;
    }
    scale
}

/// Writes `scale · codes` into `out` (the common length).
pub fn dequantize_row(codes: &[i8], scale: bf16, out: &mut [f32]) {
    let s = scale.to_f32();
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = s * f32::from(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every element round-trips to within half a step of its row's scale, and the scale is
        /// no larger than the row's absmax / 127 by more than one bf16 step.
        #[test]
        fn round_trip_is_within_half_a_step(
            row in prop::collection::vec(
                prop_oneof![-1e6f32..1e6, -1.0f32..1.0, -1e-30f32..1e-30, Just(0.0f32)], 1..300),
        ) {
            let mut codes = vec![0i8; row.len()];
            let scale = quantize_row(&row, &mut codes);
            let mut back = vec![0.0f32; row.len()];
            dequantize_row(&codes, scale, &mut back);
            let s = scale.to_f32();
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            prop_assert!(s >= amax / LEVELS);
            prop_assert!(s <= amax / LEVELS * (1.0 + 1.0 / 128.0) + f32::MIN_POSITIVE);
            for (x, y) in row.iter().zip(&back) {
                // Half a step, plus the f32 rounding of the division and the product.
                let bound = s / 2.0 * (1.0 + 1e-6) + amax * 1e-6;
                prop_assert!((x - y).abs() <= bound, "{x} -> {y}, scale {s}");
            }
            prop_assert!(codes.iter().all(|&c| c != i8::MIN));
        }
    }

    #[test]
    fn a_zero_row_has_zero_scale_and_codes() {
        let mut codes = [5i8; 4];
        assert_eq!(quantize_row(&[0.0; 4], &mut codes), bf16::ZERO);
        assert_eq!(codes, [0; 4]);
    }

    #[test]
    fn the_largest_element_takes_the_largest_code() {
        let mut codes = [0i8; 3];
        quantize_row(&[-3.0, 1.5, 0.0], &mut codes);
        assert_eq!(codes[0], -127);
        assert!((codes[1] as i32 - 63).abs() <= 1);
    }

    #[test]
    fn rows_clamps_to_the_rows_present() {
        let codes = [1i8, 2, 3, 4, 5, 6];
        let scales = [bf16::ONE; 3];
        let q = QuantRows {
            codes: &codes,
            scales: &scales,
        };
        let r = q.rows(2, 1..9);
        assert_eq!((r.codes, r.scales.len()), (&codes[2..], 2));
        assert!(q.rows(2, 5..7).scales.is_empty());
        assert_eq!(q.row(2, 2), Some((&codes[4..], 1.0)));
        assert_eq!(q.row(2, 3), None);
    }
}

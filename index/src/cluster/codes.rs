//! Quantized key codes: each key's residual from its cluster's centroid, as 8-bit or 4-bit
//! signed integers with one f32 scale per row (symmetric, scale = max |residual| / levels).
//!
//! Scoring decodes a block of rows into f32 (a widening multiply the compiler vectorises) and
//! scores the block against the whole GQA group with the SIMD group kernel
//! ([`crate::simd::Kernels::group`]), so each code byte is read once per group. The score of a
//! key is then `q·centroid + q·decoded residual`.

/// Bits per code element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CodeBits {
    /// int8 in -127..=127: the residual error is ~0.4% of the row's largest residual.
    Eight,
    /// int4 in -7..=7, two per byte: half the bytes, ~7% error per element, which the exact
    /// re-rank of twice k candidates absorbs.
    #[default]
    Four,
}

impl CodeBits {
    /// Parses "8" or "4".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "8" => Some(Self::Eight),
            "4" => Some(Self::Four),
            _ => None,
        }
    }

    /// Bytes of one row's code of `dim` elements (the scale not counted).
    pub const fn row_bytes(self, dim: usize) -> usize {
        match self {
            Self::Eight => dim,
            Self::Four => dim.div_ceil(2),
        }
    }

    const fn levels(self) -> f32 {
        match self {
            Self::Eight => 127.0,
            Self::Four => 7.0,
        }
    }

    /// Encodes `residual` into `out` (`row_bytes(residual.len())` bytes); returns the scale.
    pub fn encode(self, residual: &[f32], out: &mut [u8]) -> f32 {
        let amax = residual.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
        if amax == 0.0 || !amax.is_finite() {
            out.fill(match self {
                Self::Eight => 0,
                Self::Four => 0x88,
            });
            return 0.0;
        }
        let scale = amax / self.levels();
        let inv = 1.0 / scale;
        let lv = self.levels();
        let q = |x: f32| (x * inv).round().clamp(-lv, lv) as i32;
        match self {
            Self::Eight => {
                for (o, &x) in out.iter_mut().zip(residual) {
                    *o = q(x) as i8 as u8;
                }
            }
            Self::Four => {
                for (o, pair) in out.iter_mut().zip(residual.chunks(2)) {
                    let lo = (q(pair[0]) + 8) as u8;
                    let hi = pair.get(1).map_or(8, |&x| (q(x) + 8) as u8);
                    *o = lo | (hi << 4);
                }
            }
        }
        scale
    }

    /// Decodes `scales.len()` rows of `dim` elements from `codes` into `out` (row-major f32).
    pub fn decode(self, codes: &[u8], scales: &[f32], dim: usize, out: &mut [f32]) {
        let rb = self.row_bytes(dim);
        for ((row, code), &s) in out
            .chunks_exact_mut(dim)
            .zip(codes.chunks_exact(rb))
            .zip(scales)
        {
            match self {
                Self::Eight => {
                    for (o, &c) in row.iter_mut().zip(code) {
                        *o = (c as i8) as f32 * s;
                    }
                }
                Self::Four => {
                    for (o, &c) in row.chunks_mut(2).zip(code) {
                        o[0] = ((c & 15) as i32 - 8) as f32 * s;
                        if let Some(h) = o.get_mut(1) {
                            *h = ((c >> 4) as i32 - 8) as f32 * s;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Decoding an encoded row is within half a quantization step of it, per element.
        #[test]
        fn roundtrip_is_within_half_a_step(
            row in proptest::collection::vec(-50.0f32..50.0, 1..70),
            four in any::<bool>(),
        ) {
            let bits = if four { CodeBits::Four } else { CodeBits::Eight };
            let mut code = vec![0u8; bits.row_bytes(row.len())];
            let s = bits.encode(&row, &mut code);
            let mut back = vec![0.0f32; row.len()];
            bits.decode(&code, &[s], row.len(), &mut back);
            for (a, b) in row.iter().zip(&back) {
                prop_assert!((a - b).abs() <= 0.5 * s + 1e-4 * a.abs().max(1.0), "{a} vs {b} (scale {s})");
            }
        }
    }

    #[test]
    fn zero_rows_decode_to_zero() {
        for bits in [CodeBits::Eight, CodeBits::Four] {
            let mut code = vec![1u8; bits.row_bytes(5)];
            let s = bits.encode(&[0.0; 5], &mut code);
            let mut back = [1.0f32; 5];
            bits.decode(&code, &[s], 5, &mut back);
            assert_eq!(back, [0.0; 5]);
        }
    }
}

//! The append-time checks that K and V hold no NaN or infinity, and that no key row's squared
//! norm overflows the f32 arithmetic of the indices.
//!
//! One non-finite key poisons everything that reads it later: a graph build's distances, the
//! budget's log-sum-exp (a retrieve then fails with "static_lse NaN", far from the cause), the
//! partial attention. So an append is refused up front, naming the value. The check reads the
//! exponent bits only (all ones = NaN or infinity in f16, bf16 and f32), in blocks that the
//! compiler vectorises, and looks for the position only in a block that failed: it costs a
//! fraction of the copy the append makes anyway.

use kvdex_index::KeyDtype;

/// The largest squared norm a key or query row may have. Every index distance between two
/// accepted rows stays finite in f32 (`‖a − b‖² ≤ 2‖a‖² + 2‖b‖²`, and hnsw's MIPS reduction
/// adds `R² − ‖k‖²`), so a finite value of about 1e19 or more, which each dtype but f16 can
/// hold, is refused at the door rather than turning into a NaN distance inside a build.
pub(crate) const MAX_ROW_NORM2: f32 = f32::MAX / 4.0;

/// The first row (of `dim` little-endian `dtype` elements) of `bytes` whose squared norm,
/// summed in f32, is above [`MAX_ROW_NORM2`] (or not finite), with that squared norm. `None`
/// for f16, whose largest value (65504) cannot get there in any practical head_dim, and when
/// every row is within the limit. `bytes` must hold whole rows of finite elements
/// ([`first_non_finite`] first).
pub(crate) fn first_oversized_row(
    bytes: &[u8],
    dtype: KeyDtype,
    dim: usize,
) -> Option<(usize, f32)> {
    let widen: fn(&[u8]) -> f32 = match dtype {
        KeyDtype::F16 => return None,
        KeyDtype::Bf16 => {
            |e: &[u8]| f32::from_bits(u32::from(u16::from_le_bytes([e[0], e[1]])) << 16)
        }
        KeyDtype::F32 => |e: &[u8]| f32::from_le_bytes([e[0], e[1], e[2], e[3]]),
    };
    let size = if dtype == KeyDtype::F32 { 4 } else { 2 };
    bytes
        .chunks_exact(dim.max(1) * size)
        .map(|row| squared_norm(row.chunks_exact(size).map(widen)))
        .enumerate()
        .find(|&(_, n2)| n2.is_nan() || n2 > MAX_ROW_NORM2)
}

/// [`first_oversized_row`] for f32 rows already decoded (queries).
pub(crate) fn first_oversized_f32_row(xs: &[f32], dim: usize) -> Option<(usize, f32)> {
    xs.chunks_exact(dim.max(1))
        .map(|row| squared_norm(row.iter().copied()))
        .enumerate()
        .find(|&(_, n2)| n2.is_nan() || n2 > MAX_ROW_NORM2)
}

/// Σ x², over eight partial sums so that the loop vectorises.
fn squared_norm(xs: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0f32; 8];
    for (i, x) in xs.enumerate() {
        acc[i % 8] += x * x;
    }
    acc.iter().sum()
}

/// Bytes per block: the branch-free test runs over a block, the search for the culprit only
/// inside a block that failed.
const BLOCK: usize = 512;

/// The index of the first NaN or infinite element of `bytes` (little-endian `dtype` elements),
/// or `None` when every element is finite.
pub(super) fn first_non_finite(bytes: &[u8], dtype: KeyDtype) -> Option<usize> {
    let lanes = match dtype {
        KeyDtype::F16 => Lanes::new(2, 0x7c00),
        KeyDtype::Bf16 => Lanes::new(2, 0x7f80),
        KeyDtype::F32 => Lanes::new(4, 0x7f80_0000),
    };
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        if lanes.maybe_bad(block) {
            let at = block.chunks_exact(lanes.size).position(|e| lanes.bad(e))?;
            return Some(i * BLOCK / lanes.size + at);
        }
    }
    None
}

/// An element's exponent mask, and the SWAR constants that find a lane whose exponent bits
/// are all ones (NaN or infinity) in a whole u64 at once.
struct Lanes {
    /// Bytes per element (2 or 4).
    size: usize,
    /// The exponent mask of one element.
    mask: u32,
    /// 1 in every lane of a u64.
    ones: u64,
}

impl Lanes {
    fn new(size: usize, mask: u32) -> Self {
        let ones = u64::MAX / ((1u64 << (8 * size)) - 1);
        Self { size, mask, ones }
    }

    /// The element in `e` (`size` bytes) is NaN or infinite.
    fn bad(&self, e: &[u8]) -> bool {
        let x = e.iter().rev().fold(0u32, |a, &b| (a << 8) | u32::from(b));
        x & self.mask == self.mask
    }

    /// Some element of `block` may be NaN or infinite (never false when one is). Whole words:
    /// a lane of `(w & masks) ^ masks` is zero exactly when that element's exponent is all
    /// ones, and `(v - ones) & !v & highs` is non-zero exactly when some lane of v is zero.
    /// Accumulated without branches, so the loop vectorises; the unaligned ends (and any
    /// element split across them) are checked one element at a time.
    fn maybe_bad(&self, block: &[u8]) -> bool {
        let (head, words, tail) = bytemuck::pod_align_to::<u8, u64>(block);
        if head.len() % self.size != 0 {
            // Elements straddle the word boundaries (an odd address): element by element.
            return block.chunks_exact(self.size).any(|e| self.bad(e));
        }
        // The mask in every lane, and every lane's top bit.
        let masks = u64::from(self.mask) * self.ones;
        let highs = self.ones << (8 * self.size - 1);
        let mut acc = 0u64;
        for &w in words {
            let v = (u64::from_le(w) & masks) ^ masks;
            acc |= v.wrapping_sub(self.ones) & !v & highs;
        }
        acc != 0
            || head.chunks_exact(self.size).any(|e| self.bad(e))
            || tail.chunks_exact(self.size).any(|e| self.bad(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// A finite 1e20 (which f32 and bf16 hold) makes its row's squared norm overflow: that row
    /// is named, in both dtypes; ordinary rows and f16's largest values pass.
    #[test]
    fn a_row_whose_squared_norm_overflows_is_found() {
        let d = 16;
        let mut xs: Vec<f32> = (0..4 * d).map(|i| i as f32 * 0.25 - 3.0).collect();
        let f32s = |ys: &[f32]| -> Vec<u8> { ys.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let bf16s = |ys: &[f32]| -> Vec<u8> {
            ys.iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect()
        };
        assert_eq!(first_oversized_row(&f32s(&xs), KeyDtype::F32, d), None);
        assert_eq!(first_oversized_row(&bf16s(&xs), KeyDtype::Bf16, d), None);
        assert_eq!(first_oversized_f32_row(&xs, d), None);
        // Large but safe: 1e18 squared is 1e36 per element.
        xs[d + 1] = 1e18;
        assert_eq!(first_oversized_row(&f32s(&xs), KeyDtype::F32, d), None);
        xs[2 * d + 5] = 1e20;
        for (bytes, dt) in [(f32s(&xs), KeyDtype::F32), (bf16s(&xs), KeyDtype::Bf16)] {
            let (row, n2) = first_oversized_row(&bytes, dt, d).expect("row 2 overflows");
            assert_eq!(row, 2, "{dt:?}");
            assert!(n2.is_infinite(), "{dt:?}: {n2}");
        }
        assert_eq!(first_oversized_f32_row(&xs, d).map(|r| r.0), Some(2));
        // Finite squared norms above the limit are refused too (a distance would overflow).
        let mut ys = vec![0f32; d];
        ys[..4].fill(1.2e19);
        assert!(first_oversized_f32_row(&ys, d).is_some());
        let h: Vec<u8> = (0..d).flat_map(|_| f16::MAX.to_le_bytes()).collect();
        assert_eq!(first_oversized_row(&h, KeyDtype::F16, d), None);
    }

    fn bytes_f16(xs: &[f32]) -> Vec<u8> {
        xs.iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect()
    }

    /// `bytes` copied to `offset` bytes into a fresh buffer: the unaligned starts the shared
    /// memory arena can hand over.
    fn at_offset(bytes: &[u8], offset: usize) -> Vec<u8> {
        let mut v = vec![0u8; offset];
        v.extend_from_slice(bytes);
        v
    }

    /// Every dtype and alignment: finite rows (also f16's largest finite value and a
    /// subnormal) pass, and the first NaN or infinity is found wherever it lies (each lane of
    /// a word, past the first block, the unaligned ends).
    #[test]
    fn finds_the_first_nan_or_infinity_in_every_dtype() {
        let n = 1000;
        let mut xs: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.37).collect();
        xs[3] = 65504.0;
        xs[4] = 1e-7;
        let encode = |ys: &[f32], dt: KeyDtype| -> Vec<u8> {
            match dt {
                KeyDtype::F16 => ys
                    .iter()
                    .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                    .collect(),
                KeyDtype::Bf16 => ys
                    .iter()
                    .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                    .collect(),
                KeyDtype::F32 => ys.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }
        };
        for dt in [KeyDtype::F16, KeyDtype::Bf16, KeyDtype::F32] {
            for offset in 0..8 {
                let ok = at_offset(&encode(&xs, dt), offset);
                assert_eq!(
                    first_non_finite(&ok[offset..], dt),
                    None,
                    "{dt:?} +{offset}"
                );
                for at in [0, 1, 2, 3, 5, 6, 7, 255, 256, 700, 998, 999] {
                    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        let mut ys = xs.clone();
                        ys[at] = bad;
                        let b = at_offset(&encode(&ys, dt), offset);
                        let got = first_non_finite(&b[offset..], dt);
                        assert_eq!(got, Some(at), "{dt:?} +{offset} at {at} {bad}");
                    }
                }
            }
        }
        // Two bad values: the first is named.
        let mut ys = xs.clone();
        (ys[600], ys[9]) = (f32::NAN, f32::INFINITY);
        assert_eq!(
            first_non_finite(&encode(&ys, KeyDtype::F32), KeyDtype::F32),
            Some(9)
        );
        // f32 values beyond f16's range are f16 infinities.
        assert_eq!(
            first_non_finite(&bytes_f16(&[1.0, 1e6]), KeyDtype::F16),
            Some(1)
        );
        assert_eq!(first_non_finite(&[], KeyDtype::F32), None);
    }
}

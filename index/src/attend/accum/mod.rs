//! The value-accumulation kernel: `acc += w * row`, with the row in f32, f16, bf16 or int8 (the
//! int8 loop is [`crate::quant::kernels`]; the row's scale is folded into `w`).
//!
//! Partial attention spends its time in two loops: scoring the selected keys (done by the
//! [`KeyStore`](crate::KeyStore) kernels) and summing the weighted value rows (done here).
//! Following tantivy's `filter_vec`, each instruction set has its own file ([`scalar`], `avx2`),
//! the choice is made once per process and cached, and one conformance test runs every path
//! against [`scalar`].

use std::sync::OnceLock;

use crate::keys::KeyRows;

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod scalar;

/// Which implementation of the kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Portable Rust, the reference every other level is tested against.
    Scalar,
    /// AVX2 + FMA + F16C (x86_64), chosen at run time when the CPU has all three.
    Avx2,
}

impl Level {
    /// The fastest level this CPU supports, detected once and cached.
    pub fn detect() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    return Level::Avx2;
                }
            }
            Level::Scalar
        })
    }

    /// Levels this CPU can run, scalar first (for conformance tests and benches).
    pub fn available() -> Vec<Level> {
        let mut v = vec![Level::Scalar];
        if Level::detect() == Level::Avx2 {
            v.push(Level::Avx2);
        }
        v
    }
}

/// `acc[i] += w * row[i]` for `i < min(acc.len(), row.len())`, at the detected [`Level`].
#[inline]
pub fn add_scaled(acc: &mut [f32], w: f32, row: KeyRows<'_>) {
    add_scaled_at(Level::detect(), acc, w, row)
}

/// [`add_scaled`] at an explicit level. A level the CPU lacks falls back to scalar, so this is
/// safe to call with any value.
#[inline]
pub fn add_scaled_at(level: Level, acc: &mut [f32], w: f32, row: KeyRows<'_>) {
    use crate::quant::kernels::{add_scaled_at as add_i8, Path};
    if let KeyRows::I8(q) = row {
        // One row: its codes and its scale (an empty row adds nothing).
        let s = q.scales.first().map_or(0.0, |s| s.to_f32());
        let path = if level == Level::Scalar {
            Path::Scalar
        } else {
            Path::detect()
        };
        return add_i8(path, acc, w * s, q.codes);
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if Level::detect() == Level::Avx2 => match row {
            // SAFETY: `Level::detect()` returned Avx2, so avx2, fma and f16c are present; the
            // kernels bound every access by min(acc.len(), row.len()).
            KeyRows::F32(r) => unsafe { avx2::add_scaled_f32(acc, w, r) },
            // SAFETY: as above.
            KeyRows::F16(r) => unsafe { avx2::add_scaled_f16(acc, w, r) },
            // SAFETY: as above.
            KeyRows::Bf16(r) => unsafe { avx2::add_scaled_bf16(acc, w, r) },
            KeyRows::I8(_) => {}
        },
        _ => match row {
            KeyRows::F32(r) => scalar::add_scaled_f32(acc, w, r),
            KeyRows::F16(r) => scalar::add_scaled_f16(acc, w, r),
            KeyRows::Bf16(r) => scalar::add_scaled_bf16(acc, w, r),
            KeyRows::I8(_) => {}
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};

    /// Every level against scalar, for every dtype and for lengths around the vector widths.
    #[test]
    fn every_level_matches_scalar() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 128, 257] {
            let row: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let row16: Vec<f16> = row.iter().map(|&x| f16::from_f32(x)).collect();
            let rowb: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x)).collect();
            let init: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let w = rng.gen_range(-3.0f32..3.0);
            for rows in [
                KeyRows::F32(&row),
                KeyRows::F16(&row16),
                KeyRows::Bf16(&rowb),
            ] {
                let mut want = init.clone();
                add_scaled_at(Level::Scalar, &mut want, w, rows);
                for level in Level::available() {
                    let mut got = init.clone();
                    add_scaled_at(level, &mut got, w, rows);
                    for (g, e) in got.iter().zip(&want) {
                        assert!(
                            (g - e).abs() <= 1e-6 * (1.0 + e.abs()),
                            "{level:?} n={n}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// A row shorter than the accumulator only touches its own length (no out-of-bounds read).
    #[test]
    fn mismatched_lengths_use_the_shorter() {
        for level in Level::available() {
            let row = vec![f16::from_f32(1.0); 19];
            let mut acc = vec![0.0f32; 40];
            add_scaled_at(level, &mut acc, 2.0, KeyRows::F16(&row));
            assert!(acc[..19].iter().all(|&x| x == 2.0));
            assert!(acc[19..].iter().all(|&x| x == 0.0));
        }
    }
}

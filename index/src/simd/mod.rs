//! Inner-product kernels for f32, f16 and bf16 key rows: one query against a block of keys, one
//! query against a list of ids, and a GQA group of queries against one key block (keys read once).
//! Int8 rows go to [`crate::quant::kernels`] (its AVX2 path on any ISA above scalar).
//!
//! One file per instruction set, in the way of tantivy's `bitpacker`: [`scalar`] (the reference
//! and the fallback), [`avx2`] (AVX2 + FMA + F16C) and [`avx512`] (AVX-512F). [`Kernels::best`]
//! picks the widest the CPU has once, caches it, and every [`crate::KeySlice`] scores through it.
//! The conformance test below runs every path the CPU supports against `scalar`.

pub mod avx2;
pub mod avx512;
mod int8;
pub mod scalar;

use crate::keys::KeyRows;
use crate::quant::kernels as quant;
use half::{bf16, f16};
use std::sync::OnceLock;

/// An instruction-set path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, auto-vectorised.
    Scalar,
    /// AVX2 + FMA + F16C, 8 lanes.
    Avx2,
    /// AVX-512F, 16 lanes.
    Avx512,
}

impl Isa {
    /// All paths, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// True when this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// A short name for benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// A validated choice of kernel path. Holding one proves the CPU supports its [`Isa`], which is
/// what makes the `unsafe` calls below sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
}

static BEST: OnceLock<Kernels> = OnceLock::new();

/// Calls the kernel `$f` of the chosen path for the dtype of `$rows`, binding the typed slice.
macro_rules! dispatch {
    ($self:ident, $rows:expr, |$s:ident| $scalar:expr, $f32:ident, $f16:ident, $bf16:ident ($($arg:expr),*), |$path:ident, $q:ident| $int8:expr) => {
        match ($self.isa, $rows) {
            (isa, KeyRows::I8($q)) => {
                let $path = isa;
                $int8
            }
            (Isa::Scalar, _) => $scalar,
            // SAFETY: a `Kernels` with this isa exists only if `available()` returned true.
            (Isa::Avx2, KeyRows::F32($s)) => unsafe { avx2::$f32($($arg),*) },
            // SAFETY: as above.
            (Isa::Avx2, KeyRows::F16($s)) => unsafe { avx2::$f16($($arg),*) },
            // SAFETY: as above.
            (Isa::Avx2, KeyRows::Bf16($s)) => unsafe { avx2::$bf16($($arg),*) },
            // SAFETY: as above.
            (Isa::Avx512, KeyRows::F32($s)) => unsafe { avx512::$f32($($arg),*) },
            // SAFETY: as above.
            (Isa::Avx512, KeyRows::F16($s)) => unsafe { avx512::$f16($($arg),*) },
            // SAFETY: as above.
            (Isa::Avx512, KeyRows::Bf16($s)) => unsafe { avx512::$bf16($($arg),*) },
        }
    };
}

/// The sub-slice of whole rows `start..start + n`, clamped to the rows present.
fn rows_from<T>(s: &[T], dim: usize, start: usize, n: usize) -> &[T] {
    let a = (start * dim).min(s.len());
    let b = ((start + n) * dim).min(s.len());
    &s[a..b]
}

impl Kernels {
    /// The widest path this CPU supports, detected once and cached.
    pub fn best() -> Kernels {
        *BEST.get_or_init(|| {
            let isa = [Isa::Avx512, Isa::Avx2]
                .into_iter()
                .find(|i| i.available())
                .unwrap_or(Isa::Scalar);
            Kernels { isa }
        })
    }

    /// A specific path, or `None` when this CPU cannot run it (tests and benches).
    pub fn with(isa: Isa) -> Option<Kernels> {
        isa.available().then_some(Kernels { isa })
    }

    /// The path in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `out[i] = <q, row start+i>`. Rows past the end of `rows` score -inf.
    pub fn block(&self, q: &[f32], rows: KeyRows<'_>, dim: usize, start: usize, out: &mut [f32]) {
        out.fill(f32::NEG_INFINITY);
        if dim == 0 || q.len() != dim {
            return;
        }
        let n = out.len();
        dispatch!(
            self,
            rows,
            |s| scalar_block(q, rows, dim, start, out),
            block_f32,
            block_f16,
            block_bf16(q, rows_from(s, dim, start, n), dim, out),
            |isa, r| int8::block(isa, q, r, dim, start, out)
        )
    }

    /// `out[i] = <q, row ids[i]>`. Ids past the end score -inf.
    pub fn gather(&self, q: &[f32], rows: KeyRows<'_>, dim: usize, ids: &[u32], out: &mut [f32]) {
        if dim == 0 || q.len() != dim {
            out.fill(f32::NEG_INFINITY);
            return;
        }
        dispatch!(
            self,
            rows,
            |s| scalar_gather(q, rows, dim, ids, out),
            gather_f32,
            gather_f16,
            gather_bf16(q, s, dim, ids, out),
            |isa, r| int8::gather(isa, q, r, dim, ids, out)
        )
    }

    /// GQA group: `qs` holds `g` queries of `dim` back to back; `out[j * n + i] = <qs[j], row
    /// start+i>` with `n = out.len() / g`. Each key row is read from memory once for the group.
    pub fn group(&self, qs: &[f32], rows: KeyRows<'_>, dim: usize, start: usize, out: &mut [f32]) {
        out.fill(f32::NEG_INFINITY);
        if dim == 0 || !qs.len().is_multiple_of(dim) || qs.is_empty() {
            return;
        }
        let n = out.len() / (qs.len() / dim);
        dispatch!(
            self,
            rows,
            |s| {
                for (j, q) in qs.chunks_exact(dim).enumerate() {
                    scalar_block(q, rows, dim, start, &mut out[j * n..(j + 1) * n]);
                }
            },
            group_f32,
            group_f16,
            group_bf16(qs, rows_from(s, dim, start, n), dim, out),
            |isa, r| int8::group(isa, qs, r, dim, start, out)
        )
    }
}

fn scalar_row(q: &[f32], rows: KeyRows<'_>, dim: usize, id: usize) -> f32 {
    let r = id * dim..(id + 1) * dim;
    let got = match rows {
        KeyRows::F32(s) => s.get(r).map(|k| scalar::dot_f32(q, k)),
        KeyRows::F16(s) => s.get(r).map(|k: &[f16]| scalar::dot_f16(q, k)),
        KeyRows::Bf16(s) => s.get(r).map(|k: &[bf16]| scalar::dot_bf16(q, k)),
        KeyRows::I8(rows) => rows.row(dim, id).map(|(c, s)| s * quant::dot_scalar(q, c)),
    };
    got.unwrap_or(f32::NEG_INFINITY)
}

fn scalar_block(q: &[f32], rows: KeyRows<'_>, dim: usize, start: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = scalar_row(q, rows, dim, start + i);
    }
}

fn scalar_gather(q: &[f32], rows: KeyRows<'_>, dim: usize, ids: &[u32], out: &mut [f32]) {
    for (o, &id) in out.iter_mut().zip(ids) {
        *o = scalar_row(q, rows, dim, id as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-3 * (1.0 + a.abs().max(b.abs()))
    }

    /// Every available path agrees with scalar, for every dtype, on awkward dims (tails) too.
    #[test]
    fn every_path_matches_scalar() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let scalar = Kernels { isa: Isa::Scalar };
        let mut tested = Vec::new();
        for isa in Isa::ALL {
            let Some(kern) = Kernels::with(isa) else {
                eprintln!(
                    "simd conformance: {} not available on this CPU, skipped",
                    isa.name()
                );
                continue;
            };
            tested.push(isa);
            for dim in [1usize, 7, 8, 16, 33, 64, 100, 128] {
                let n = 37;
                let g = 6;
                let f: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let h: Vec<f16> = f.iter().map(|&x| f16::from_f32(x)).collect();
                let b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
                let qs: Vec<f32> = (0..g * dim).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let ids: Vec<u32> = (0..20).map(|_| rng.gen_range(0..n as u32 + 2)).collect();
                let mut codes = vec![0i8; n * dim];
                let scales: Vec<bf16> = f
                    .chunks_exact(dim)
                    .zip(codes.chunks_exact_mut(dim))
                    .map(|(x, c)| crate::quant::quantize_row(x, c))
                    .collect();
                let i8rows = KeyRows::I8(crate::quant::QuantRows {
                    codes: &codes,
                    scales: &scales,
                });
                for rows in [
                    KeyRows::F32(&f),
                    KeyRows::F16(&h),
                    KeyRows::Bf16(&b),
                    i8rows,
                ] {
                    let q = &qs[..dim];
                    let (mut x, mut y) = (vec![0.0; n - 3], vec![0.0; n - 3]);
                    kern.block(q, rows, dim, 3, &mut x);
                    scalar.block(q, rows, dim, 3, &mut y);
                    assert!(
                        x.iter().zip(&y).all(|(a, b)| close(*a, *b)),
                        "{isa:?} block d={dim}"
                    );
                    let (mut x, mut y) = (vec![0.0; ids.len()], vec![0.0; ids.len()]);
                    kern.gather(q, rows, dim, &ids, &mut x);
                    scalar.gather(q, rows, dim, &ids, &mut y);
                    assert!(
                        x.iter().zip(&y).all(|(a, b)| a == b || close(*a, *b)),
                        "{isa:?} gather"
                    );
                    let (mut x, mut y) = (vec![0.0; g * 30], vec![0.0; g * 30]);
                    kern.group(&qs, rows, dim, 5, &mut x);
                    scalar.group(&qs, rows, dim, 5, &mut y);
                    assert!(
                        x.iter().zip(&y).all(|(a, b)| close(*a, *b)),
                        "{isa:?} group d={dim}"
                    );
                }
            }
        }
        assert!(tested.contains(&Isa::Scalar));
    }

    #[test]
    fn out_of_range_rows_score_minus_infinity() {
        let f = [1.0f32; 8];
        let mut out = [0.0; 4];
        Kernels::best().block(&[1.0, 1.0], KeyRows::F32(&f), 2, 2, &mut out);
        assert_eq!(out, [2.0, 2.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
        let mut out = [0.0; 2];
        Kernels::best().gather(&[1.0, 1.0], KeyRows::F32(&f), 2, &[3, 9], &mut out);
        assert_eq!(out, [2.0, f32::NEG_INFINITY]);
    }
}

//! The int8 hot loops: the score `s · <q, c>` of a row and the accumulation `acc += w · s · c`,
//! each fused (the codes are widened in registers; no f32 copy of a row is made).
//!
//! [`Path::detect`] picks AVX2 + FMA once when the CPU has it; the conformance test runs
//! every path against the scalar one.

use super::QuantRows;

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Portable Rust, the reference.
    Scalar,
    /// AVX2 + FMA, 16 codes per step.
    Avx2,
}

impl Path {
    /// The fastest path this CPU runs, detected once.
    pub fn detect() -> Path {
        static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *PATH.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Path::Avx2;
            }
            Path::Scalar
        })
    }

    /// Paths this CPU runs, scalar first.
    pub fn available() -> Vec<Path> {
        let mut v = vec![Path::Scalar];
        if Path::detect() == Path::Avx2 {
            v.push(Path::Avx2);
        }
        v
    }
}

/// `<q, c>` over the common length (the row's scale not applied).
#[inline]
pub fn dot_at(path: Path, q: &[f32], codes: &[i8]) -> f32 {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Path::detect()` returned Avx2, so the CPU has avx2 and fma; the kernel bounds
        // every access by the common length.
        Path::Avx2 if Path::detect() == Path::Avx2 => unsafe { super::avx2::dot(q, codes) },
        _ => dot_scalar(q, codes),
    }
}

/// `acc += w · c` over the common length (fold the row's scale into `w`).
#[inline]
pub fn add_scaled_at(path: Path, acc: &mut [f32], w: f32, codes: &[i8]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_at`.
        Path::Avx2 if Path::detect() == Path::Avx2 => unsafe {
            super::avx2::add_scaled(acc, w, codes)
        },
        _ => add_scaled_scalar(acc, w, codes),
    }
}

/// The scalar reference of [`dot_at`].
pub fn dot_scalar(q: &[f32], codes: &[i8]) -> f32 {
    q.iter().zip(codes).map(|(&x, &c)| x * f32::from(c)).sum()
}

/// The scalar reference of [`add_scaled_at`].
pub fn add_scaled_scalar(acc: &mut [f32], w: f32, codes: &[i8]) {
    for (a, &c) in acc.iter_mut().zip(codes) {
        *a += w * f32::from(c);
    }
}

/// The score of row `id`, `-inf` past the end.
#[inline]
fn score(path: Path, q: &[f32], rows: QuantRows<'_>, dim: usize, id: usize) -> f32 {
    match rows.row(dim, id) {
        Some((codes, s)) => s * dot_at(path, q, codes),
        None => f32::NEG_INFINITY,
    }
}

/// True when `path` is AVX2 and this CPU runs it.
#[cfg(target_arch = "x86_64")]
#[inline]
fn avx2(path: Path) -> bool {
    cfg!(target_arch = "x86_64") && path == Path::Avx2 && Path::detect() == Path::Avx2
}

/// `out[i] = <q, row start + i>`; rows past the end score `-inf`.
pub fn block(
    path: Path,
    q: &[f32],
    rows: QuantRows<'_>,
    dim: usize,
    start: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2(path) {
        let r = rows.rows(dim, start..start + out.len());
        // SAFETY: `avx2` checked that the CPU has avx2 and fma; the kernel bounds its reads.
        return unsafe { super::avx2::block(q, r.codes, r.scales, dim, out) };
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = score(path, q, rows, dim, start + i);
    }
}

/// `out[i] = <q, row ids[i]>`; ids past the end score `-inf`.
pub fn gather(
    path: Path,
    q: &[f32],
    rows: QuantRows<'_>,
    dim: usize,
    ids: &[u32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2(path) {
        // SAFETY: as in `block`.
        return unsafe { super::avx2::gather(q, rows.codes, rows.scales, dim, ids, out) };
    }
    for (o, &id) in out.iter_mut().zip(ids) {
        *o = score(path, q, rows, dim, id as usize);
    }
}

/// GQA group: `out[j * n + i] = <qs[j], row start + i>` with `n = out.len() / g`. Row-major
/// over the keys, so each row's codes are read from memory once for the whole group.
pub fn group(
    path: Path,
    qs: &[f32],
    rows: QuantRows<'_>,
    dim: usize,
    start: usize,
    out: &mut [f32],
) {
    if dim == 0 || qs.is_empty() {
        return;
    }
    let g = qs.len() / dim;
    let n = out.len() / g.max(1);
    #[cfg(target_arch = "x86_64")]
    if avx2(path) {
        let r = rows.rows(dim, start..start + n);
        // SAFETY: as in `block`.
        return unsafe { super::avx2::group(qs, r.codes, r.scales, dim, out) };
    }
    for i in 0..n {
        let row = rows.row(dim, start + i);
        for (j, q) in qs.chunks_exact(dim).enumerate() {
            out[j * n + i] = match row {
                Some((codes, s)) => s * dot_at(path, q, codes),
                None => f32::NEG_INFINITY,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use rand::{Rng, SeedableRng};

    /// Every path against scalar, on lengths around the vector width.
    #[test]
    fn every_path_matches_scalar() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for n in [0usize, 1, 7, 15, 16, 17, 31, 32, 33, 64, 100, 128, 257] {
            let codes: Vec<i8> = (0..n).map(|_| rng.gen_range(-127..=127)).collect();
            let q: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let init: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let want_dot = dot_scalar(&q, &codes);
            let mut want_acc = init.clone();
            add_scaled_scalar(&mut want_acc, 0.37, &codes);
            for path in Path::available() {
                let got = dot_at(path, &q, &codes);
                assert!(
                    (got - want_dot).abs() <= 1e-4 * (1.0 + want_dot.abs()),
                    "{path:?} n={n}: {got} vs {want_dot}"
                );
                let mut acc = init.clone();
                add_scaled_at(path, &mut acc, 0.37, &codes);
                for (a, b) in acc.iter().zip(&want_acc) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{path:?} n={n}");
                }
            }
        }
    }

    /// Block, gather and group agree with a scaled scalar dot, and ids past the end score -inf.
    #[test]
    fn block_gather_and_group_score_scaled_rows() {
        let (dim, n) = (24usize, 9usize);
        let codes: Vec<i8> = (0..dim * n).map(|i| (i % 255) as i8).collect();
        let scales: Vec<bf16> = (0..n).map(|i| bf16::from_f32(0.5 + i as f32)).collect();
        let rows = QuantRows {
            codes: &codes,
            scales: &scales,
        };
        let qs: Vec<f32> = (0..2 * dim).map(|i| (i as f32 * 0.1).sin()).collect();
        let want = |j: usize, id: usize| {
            scales[id].to_f32()
                * dot_scalar(
                    &qs[j * dim..(j + 1) * dim],
                    &codes[id * dim..(id + 1) * dim],
                )
        };
        for path in Path::available() {
            let mut out = [0.0; 4];
            block(path, &qs[..dim], rows, dim, 7, &mut out);
            assert!((out[0] - want(0, 7)).abs() < 1e-3 && (out[1] - want(0, 8)).abs() < 1e-3);
            assert_eq!(out[2..], [f32::NEG_INFINITY; 2]);
            let mut out = [0.0; 2];
            gather(path, &qs[..dim], rows, dim, &[3, 99], &mut out);
            assert!((out[0] - want(0, 3)).abs() < 1e-3 && out[1] == f32::NEG_INFINITY);
            let mut out = [0.0; 6];
            group(path, &qs, rows, dim, 6, &mut out);
            for j in 0..2 {
                for i in 0..3 {
                    assert!((out[j * 3 + i] - want(j, 6 + i)).abs() < 1e-3);
                }
            }
        }
    }
}

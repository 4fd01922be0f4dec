//! Int8 rows through the dtype kernels: each ISA's kernels widen the codes (`i8` lanes) like
//! f16 or bf16 elements, and every row's score is then multiplied by its scale. The scalar
//! path is [`crate::quant::kernels`].

use super::{avx2, avx512, Isa};
use crate::quant::kernels::{self as quant, Path};
use crate::quant::QuantRows;

/// Multiplies each row's score by its scale: `out[j * n + i] *= scales[i]` for every query `j`.
fn apply_scales(out: &mut [f32], n: usize, scales: &[half::bf16]) {
    for part in out.chunks_mut(n.max(1)) {
        for (o, s) in part.iter_mut().zip(scales) {
            *o *= s.to_f32();
        }
    }
}

/// `out[i] = <q, row start + i>`; rows past the end score `-inf`.
pub(super) fn block(
    isa: Isa,
    q: &[f32],
    rows: QuantRows<'_>,
    dim: usize,
    start: usize,
    out: &mut [f32],
) {
    let r = rows.rows(dim, start..start + out.len());
    let m = r.scales.len();
    match isa {
        Isa::Scalar => return quant::block(Path::Scalar, q, rows, dim, start, out),
        // SAFETY: a `Kernels` with this isa exists only if `available()` returned true; the
        // kernels bound their reads by the slices.
        Isa::Avx2 => unsafe { avx2::block_i8(q, r.codes, dim, &mut out[..m]) },
        // SAFETY: as above.
        Isa::Avx512 => unsafe { avx512::block_i8(q, r.codes, dim, &mut out[..m]) },
    }
    out[m..].fill(f32::NEG_INFINITY);
    apply_scales(&mut out[..m], m, r.scales);
}

/// `out[i] = <q, row ids[i]>`; ids past the end score `-inf`.
pub(super) fn gather(
    isa: Isa,
    q: &[f32],
    rows: QuantRows<'_>,
    dim: usize,
    ids: &[u32],
    out: &mut [f32],
) {
    let n = rows.scales.len().min(rows.codes.len() / dim.max(1));
    let codes = &rows.codes[..n * dim];
    match isa {
        Isa::Scalar => return quant::gather(Path::Scalar, q, rows, dim, ids, out),
        // SAFETY: as in `block`; ids past `codes` score -inf there.
        Isa::Avx2 => unsafe { avx2::gather_i8(q, codes, dim, ids, out) },
        // SAFETY: as above.
        Isa::Avx512 => unsafe { avx512::gather_i8(q, codes, dim, ids, out) },
    }
    for (o, &id) in out.iter_mut().zip(ids) {
        if let Some(s) = rows.scales.get(id as usize) {
            *o *= s.to_f32();
        }
    }
}

/// GQA group: `out[j * n + i] = <qs[j], row start + i>` with `n = out.len() / g`.
pub(super) fn group(
    isa: Isa,
    qs: &[f32],
    rows: QuantRows<'_>,
    dim: usize,
    start: usize,
    out: &mut [f32],
) {
    let g = qs.len() / dim.max(1);
    let n = out.len() / g.max(1);
    let r = rows.rows(dim, start..start + n);
    if isa == Isa::Scalar || r.scales.len() < n {
        // Rows run out before `n`: per query, so that each keeps its `n`-long stretch.
        for (j, q) in qs.chunks_exact(dim.max(1)).enumerate() {
            block(isa, q, rows, dim, start, &mut out[j * n..(j + 1) * n]);
        }
        return;
    }
    match isa {
        Isa::Scalar => {}
        // SAFETY: as in `block`; `r` holds `n` whole rows.
        Isa::Avx2 => unsafe { avx2::group_i8(qs, r.codes, dim, &mut out[..g * n]) },
        // SAFETY: as above.
        Isa::Avx512 => unsafe { avx512::group_i8(qs, r.codes, dim, &mut out[..g * n]) },
    }
    apply_scales(&mut out[..g * n], n, r.scales);
}

//! A session's storage format (`"kv_format"` of `POST /v1/sessions`): its rows in the session
//! dtype, or int8 with one bf16 scale per row ([`kvdex_index::quant`]).
//!
//! Int8 rows are quantized once, on append; search, attention and the budget read them as
//! they are (the kernels apply the row's scale to an int8 dot product), and a gather
//! dequantizes the chosen rows into the session dtype on the way out. A row of `head_dim`
//! elements costs `head_dim + 2` bytes against `2 · head_dim` in f16.

use half::{bf16, f16};
use kvdex_index::keys::KeyRows;
use kvdex_index::quant::quantize_row;
use kvdex_index::{KeyDtype, KeySlice, KeyStore};

pub use kvdex_wire::KvFormat;

/// Decodes one little-endian element of `dtype`.
fn element(bytes: &[u8], dtype: KeyDtype) -> f32 {
    match dtype {
        KeyDtype::F16 => f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
        KeyDtype::Bf16 => bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
        KeyDtype::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
    }
}

/// Quantizes rows of `dim` `dtype` elements in `src` into `codes` and `scales` (one per row;
/// the caller sized both for `src`'s rows). `row` is an f32 scratch of `dim`.
pub(super) fn quantize_rows(
    src: &[u8],
    dtype: KeyDtype,
    row: &mut [f32],
    codes: &mut [i8],
    scales: &mut [bf16],
) {
    let (dim, size) = (row.len(), dtype.size());
    let rows = src
        .chunks_exact(dim * size)
        .zip(codes.chunks_exact_mut(dim));
    for ((s, c), scale) in rows.zip(scales) {
        for (x, e) in row.iter_mut().zip(s.chunks_exact(size)) {
            *x = element(e, dtype);
        }
        *scale = quantize_row(row, c);
    }
}

/// Writes `scale · codes` as one row of `dtype` into `out` (`codes.len()` elements).
pub(super) fn dequantize_into(codes: &[i8], scale: bf16, dtype: KeyDtype, out: &mut [u8]) {
    let s = scale.to_f32();
    match dtype {
        KeyDtype::F32 => {
            for (o, &c) in out.chunks_exact_mut(4).zip(codes) {
                o.copy_from_slice(&(s * f32::from(c)).to_le_bytes());
            }
        }
        KeyDtype::F16 => {
            for (o, &c) in out.chunks_exact_mut(2).zip(codes) {
                o.copy_from_slice(&f16::from_f32(s * f32::from(c)).to_le_bytes());
            }
        }
        KeyDtype::Bf16 => {
            for (o, &c) in out.chunks_exact_mut(2).zip(codes) {
                o.copy_from_slice(&bf16::from_f32(s * f32::from(c)).to_le_bytes());
            }
        }
    }
}

/// Writes row `id` of `rows` into `out` as one row of `dtype` (`out` holds exactly one):
/// the stored bytes for rows kept in the session dtype, dequantized for int8 rows. An id
/// past the end leaves `out` as it is (callers check ids first).
pub(super) fn copy_row(rows: &KeySlice<'_>, id: u32, dtype: KeyDtype, out: &mut [u8]) {
    let d = KeyStore::dim(rows);
    let r = id as usize * d..(id as usize + 1) * d;
    let bytes: Option<&[u8]> = match rows.rows() {
        KeyRows::F16(s) => s.get(r).map(bytemuck::cast_slice),
        KeyRows::Bf16(s) => s.get(r).map(bytemuck::cast_slice),
        KeyRows::F32(s) => s.get(r).map(bytemuck::cast_slice),
        KeyRows::I8(q) => {
            if let Some((codes, _)) = q.row(d, id as usize) {
                dequantize_into(codes, q.scales[id as usize], dtype, out);
            }
            None
        }
    };
    if let Some(b) = bytes.filter(|b| b.len() == out.len()) {
        out.copy_from_slice(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvdex_index::quant::QuantRows;

    /// Rows of every dtype quantize and come back within half a step of their scale.
    #[test]
    fn rows_round_trip_through_every_dtype() {
        let dim = 8;
        let xs: Vec<f32> = (0..3 * dim).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        for dtype in [KeyDtype::F16, KeyDtype::Bf16, KeyDtype::F32] {
            let mut src = vec![0u8; xs.len() * dtype.size()];
            super::super::slim::encode_rows(&xs, dtype, &mut src);
            let (mut codes, mut scales) = (vec![0i8; xs.len()], vec![bf16::ZERO; 3]);
            quantize_rows(&src, dtype, &mut vec![0.0; dim], &mut codes, &mut scales);
            let mut out = vec![0u8; dim * dtype.size()];
            let rows = QuantRows {
                codes: &codes,
                scales: &scales,
            };
            let keys = KeySlice::new(KeyRows::I8(rows), dim).unwrap();
            for r in 0..3 {
                copy_row(&keys, r as u32, dtype, &mut out);
                let mut back = vec![0.0; dim];
                keys.row_f32(r as u32, &mut back);
                for (i, &b) in back.iter().enumerate() {
                    let x = xs[r * dim + i];
                    let tol = scales[r].to_f32() / 2.0 + 0.01 * x.abs();
                    assert!((x - b).abs() <= tol, "{dtype:?} {x} vs {b}");
                    let e = element(&out[i * dtype.size()..], dtype);
                    assert!((e - b).abs() <= 0.01 * b.abs() + 1e-6);
                }
            }
        }
    }
}

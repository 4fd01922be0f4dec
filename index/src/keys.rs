//! How an index reads keys it does not own.

use crate::prefetch::prefetch_slice;
use crate::quant::QuantRows;
use crate::simd::Kernels;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Storage dtype of key (and value) rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyDtype {
    /// IEEE half precision, what most engines keep their KV cache in.
    F16,
    /// bfloat16.
    Bf16,
    /// single precision.
    F32,
}

impl KeyDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            KeyDtype::F16 | KeyDtype::Bf16 => 2,
            KeyDtype::F32 => 4,
        }
    }
}

/// Refuses a query whose length is not the keys' dimension, before any kernel reads it: every
/// search and attention entry point checks this first.
pub(crate) fn check_query_dim(keys: &dyn KeyStore, query: &[f32]) -> Result<(), crate::IndexError> {
    if query.len() != keys.dim() {
        return Err(crate::IndexError::DimMismatch {
            expected: keys.dim(),
            got: query.len(),
        });
    }
    Ok(())
}

/// Read access to `len()` key rows of `dim()` elements, stored elsewhere.
///
/// The daemon's KV store implements it over its arenas; benchmarks over loaded arrays.
/// All scoring goes through it, so kernels (and their SIMD dispatch) live behind one seam.
pub trait KeyStore: Sync {
    /// Number of key rows.
    fn len(&self) -> usize;
    /// True when the store holds no key.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements per row.
    fn dim(&self) -> usize;
    /// `out[i] = <query, key[ids[i]]>`. Panics are never raised for valid ids; callers keep ids
    /// below `len()`.
    fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut [f32]);
    /// `out[i] = <query, key[start + i]>` for a contiguous block of rows.
    fn score_range(&self, query: &[f32], start: usize, out: &mut [f32]);
    /// Copies row `id`, widened to f32, into `out` (`dim()` long).
    fn row_f32(&self, id: u32, out: &mut [f32]);
    /// Hints that rows `ids` will be scored soon, so that their cache misses overlap instead of
    /// being paid one after another (graph search calls it on a node's unvisited neighbours
    /// before scoring them). A hint only: the default does nothing, and ids past `len()` are
    /// ignored.
    fn prefetch(&self, ids: &[u32]) {
        let _ = ids;
    }
    /// GQA group scoring: `queries` holds `g` queries of `dim()` back to back, and
    /// `out[j * n + i] = <query j, key[start + i]>` with `n = out.len() / g`. Stores whose rows
    /// are contiguous override it to read each key once for the whole group.
    fn score_range_group(&self, queries: &[f32], start: usize, out: &mut [f32]) {
        let d = self.dim();
        if d == 0 || queries.is_empty() {
            return;
        }
        let g = queries.len() / d;
        let n = out.len() / g.max(1);
        for (j, q) in queries.chunks_exact(d).enumerate() {
            self.score_range(q, start, &mut out[j * n..(j + 1) * n]);
        }
    }
}

/// Contiguous key rows in one of the supported dtypes.
#[derive(Clone, Copy, Debug)]
pub enum KeyRows<'a> {
    /// f32 rows.
    F32(&'a [f32]),
    /// f16 rows.
    F16(&'a [f16]),
    /// bf16 rows.
    Bf16(&'a [bf16]),
    /// int8 rows with one scale each ([`crate::quant`]).
    I8(QuantRows<'a>),
}

/// A [`KeyStore`] over contiguous, row-major key rows.
#[derive(Clone, Copy, Debug)]
pub struct KeySlice<'a> {
    rows: KeyRows<'a>,
    dim: usize,
    len: usize,
}

impl<'a> KeySlice<'a> {
    /// Wraps `rows` of `dim` elements each. Fails when the length is not a multiple of `dim`.
    pub fn new(rows: KeyRows<'a>, dim: usize) -> Result<Self, crate::IndexError> {
        let n = match rows {
            KeyRows::F32(s) => s.len(),
            KeyRows::F16(s) => s.len(),
            KeyRows::Bf16(s) => s.len(),
            KeyRows::I8(q) => {
                if dim != 0 && q.scales.len() * dim != q.codes.len() {
                    return Err(crate::IndexError::BadShape(format!(
                        "{} int8 codes is not {} rows of dim {dim}",
                        q.codes.len(),
                        q.scales.len()
                    )));
                }
                q.codes.len()
            }
        };
        if dim == 0 || n % dim != 0 {
            return Err(crate::IndexError::BadShape(format!(
                "{n} elements is not a whole number of rows of dim {dim}"
            )));
        }
        Ok(Self {
            rows,
            dim,
            len: n / dim,
        })
    }

    /// The underlying rows.
    pub fn rows(&self) -> KeyRows<'a> {
        self.rows
    }
}

impl KeyStore for KeySlice<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut [f32]) {
        Kernels::best().gather(query, self.rows, self.dim, ids, out);
    }
    fn score_range(&self, query: &[f32], start: usize, out: &mut [f32]) {
        Kernels::best().block(query, self.rows, self.dim, start, out);
    }
    fn score_range_group(&self, queries: &[f32], start: usize, out: &mut [f32]) {
        Kernels::best().group(queries, self.rows, self.dim, start, out);
    }
    fn prefetch(&self, ids: &[u32]) {
        let d = self.dim;
        for &id in ids {
            let r = id as usize * d..(id as usize + 1) * d;
            match self.rows {
                KeyRows::F32(s) => s.get(r).map(prefetch_slice),
                KeyRows::F16(s) => s.get(r).map(prefetch_slice),
                KeyRows::Bf16(s) => s.get(r).map(prefetch_slice),
                KeyRows::I8(q) => q.codes.get(r).map(prefetch_slice),
            };
        }
    }
    fn row_f32(&self, id: u32, out: &mut [f32]) {
        let d = self.dim;
        let r = id as usize * d..(id as usize + 1) * d;
        match self.rows {
            KeyRows::F32(s) => s
                .get(r)
                .into_iter()
                .flatten()
                .zip(out)
                .for_each(|(x, o)| *o = *x),
            // Whole slices: `half` converts them with F16C several lanes at a time, where a
            // per-element `to_f32` paid a feature check and a scalar convert each (row_f32
            // was a quarter of an insert's profile).
            KeyRows::F16(s) => {
                if let Some(src) = s.get(r) {
                    let n = src.len().min(out.len());
                    src[..n].convert_to_f32_slice(&mut out[..n]);
                }
            }
            KeyRows::Bf16(s) => {
                if let Some(src) = s.get(r) {
                    let n = src.len().min(out.len());
                    src[..n].convert_to_f32_slice(&mut out[..n]);
                }
            }
            KeyRows::I8(q) => {
                if let (Some(codes), Some(&scale)) = (q.codes.get(r), q.scales.get(id as usize)) {
                    crate::quant::dequantize_row(codes, scale, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefetch hint accepts any ids (past the end too) and changes no score.
    #[test]
    fn prefetch_is_a_hint_only() {
        let f: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let h: Vec<f16> = f.iter().map(|&x| f16::from_f32(x)).collect();
        for rows in [KeyRows::F32(&f), KeyRows::F16(&h)] {
            let keys = KeySlice::new(rows, 8).unwrap();
            let (mut before, mut after) = ([0.0; 3], [0.0; 3]);
            keys.score_ids(&[1.0; 8], &[0, 3, 7], &mut before);
            keys.prefetch(&[0, 3, 7, 8, u32::MAX]);
            keys.score_ids(&[1.0; 8], &[0, 3, 7], &mut after);
            assert_eq!(before, after);
            assert_eq!(before[1], (24..32).sum::<i32>() as f32);
        }
    }
}

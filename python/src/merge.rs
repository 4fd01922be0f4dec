//! The exact log-sum-exp merge of two partial attentions over disjoint token sets.
//!
//! With `o_a = softmax(s_A) V_A`, `lse_a = log Σ_A exp(s)` and likewise for B, attention over
//! A ∪ B is `(exp(lse_a - m) o_a + exp(lse_b - m) o_b) / (exp(lse_a - m) + exp(lse_b - m))`
//! with `m = max(lse_a, lse_b)`, and its LSE is `m + log(exp(lse_a - m) + exp(lse_b - m))`.
//! An empty part has `lse = -inf` and contributes nothing.

use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::errors::bad_request;

/// Merges one head's two partials in place into `out`; returns the merged LSE.
fn merge_head(out: &mut [f32], oa: &[f32], la: f32, ob: &[f32], lb: f32) -> f32 {
    let m = la.max(lb);
    if m == f32::NEG_INFINITY {
        out.iter_mut().for_each(|o| *o = 0.0);
        return m;
    }
    let (wa, wb) = ((la - m).exp(), (lb - m).exp());
    let inv = 1.0 / (wa + wb);
    for ((o, a), b) in out.iter_mut().zip(oa).zip(ob) {
        *o = (wa * a + wb * b) * inv;
    }
    m + (wa + wb).ln()
}

/// merge_partials(out_a, lse_a, out_b, lse_b) -> (out, lse)
///
/// `out_*` are float32 `[heads, head_dim]`, `lse_*` float32 `[heads]`; returns new arrays.
#[pyfunction]
pub fn merge_partials<'py>(
    py: Python<'py>,
    out_a: PyReadonlyArray2<'py, f32>,
    lse_a: PyReadonlyArray1<'py, f32>,
    out_b: PyReadonlyArray2<'py, f32>,
    lse_b: PyReadonlyArray1<'py, f32>,
) -> PyResult<(Bound<'py, PyArray2<f32>>, Bound<'py, PyArray1<f32>>)> {
    let (h, d) = (out_a.shape()[0], out_a.shape()[1]);
    if out_b.shape() != [h, d] || lse_a.len() != h || lse_b.len() != h {
        return Err(bad_request(
            py,
            format!(
                "merge_partials: shapes differ: out_a {:?}, lse_a {:?}, out_b {:?}, lse_b {:?}",
                out_a.shape(),
                lse_a.shape(),
                out_b.shape(),
                lse_b.shape()
            ),
        ));
    }
    let not_contiguous = |_| bad_request(py, "merge_partials: arrays must be C-contiguous");
    let (oa, ob) = (
        out_a.as_slice().map_err(not_contiguous)?,
        out_b.as_slice().map_err(not_contiguous)?,
    );
    let (la, lb) = (
        lse_a.as_slice().map_err(not_contiguous)?,
        lse_b.as_slice().map_err(not_contiguous)?,
    );
    let mut out = vec![0f32; h * d];
    let mut lse = vec![0f32; h];
    for i in 0..h {
        let r = i * d..(i + 1) * d;
        lse[i] = merge_head(&mut out[r.clone()], &oa[r.clone()], la[i], &ob[r], lb[i]);
    }
    let out = PyArray1::from_vec(py, out).reshape([h, d])?;
    Ok((out, PyArray1::from_vec(py, lse)))
}

#[cfg(test)]
mod tests {
    use super::merge_head;

    #[test]
    fn merge_equals_attention_over_the_union() {
        // Scores 0 and ln 3 over values 1 and 5: full softmax weights 1/4, 3/4 -> 4.
        let mut out = [0f32];
        let lse = merge_head(&mut out, &[1.0], 0.0, &[5.0], 3f32.ln());
        assert!((out[0] - 4.0).abs() < 1e-6);
        assert!((lse - 4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn empty_part_contributes_nothing() {
        let mut out = [0f32; 2];
        let lse = merge_head(&mut out, &[1.0, 2.0], 0.5, &[9.0, 9.0], f32::NEG_INFINITY);
        assert_eq!(out, [1.0, 2.0]);
        assert_eq!(lse, 0.5);
    }
}

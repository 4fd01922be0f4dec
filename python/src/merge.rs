//! Binds [`kvdex_client::merge`]: the exact log-sum-exp merge of two partial attentions over
//! disjoint token sets (the engine's static tokens and kvdex's retrieved ones).

use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::errors::{bad_request, to_py};

/// A merged `(out [heads, head_dim], lse [heads])` pair of new arrays.
type Merged<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray1<f32>>);

/// merge_partials(out_a, lse_a, out_b, lse_b) -> (out, lse)
///
/// `out_*` are float32 `[heads, head_dim]`, `lse_*` float32 `[heads]` (`-inf` = empty part);
/// returns new arrays.
#[pyfunction]
pub fn merge_partials<'py>(
    py: Python<'py>,
    out_a: PyReadonlyArray2<'py, f32>,
    lse_a: PyReadonlyArray1<'py, f32>,
    out_b: PyReadonlyArray2<'py, f32>,
    lse_b: PyReadonlyArray1<'py, f32>,
) -> PyResult<Merged<'py>> {
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
    kvdex_client::merge::merge(oa, la, ob, lb, &mut out, &mut lse).map_err(|e| to_py(py, e))?;
    let out = PyArray1::from_vec(py, out).reshape([h, d])?;
    Ok((out, PyArray1::from_vec(py, lse)))
}

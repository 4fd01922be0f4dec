//! The decode path on an attached session: `seal` (a layer's prefill, with the prefill queries
//! as the index's training signal) and `retrieve` (search, budget, partial attention, gather),
//! over [`kvdex_client::SessionHandle::seal`] / [`retrieve`](kvdex_client::SessionHandle::retrieve).
//!
//! The Rust client reads a retrieve's results in place from the arena, which the next request
//! overwrites, so every result here is a new numpy array (one copy out of the arena). A
//! retrieve submitted without waiting (`submit_retrieve`) owns its part of the arena until
//! `wait_retrieve` copies its results out.

use half::f16;
use kvdex_client::{RetrieveRequest, Retrieved, SessionHandle};
use kvdex_index::attend::BudgetParams;
use kvdex_index::{IndexKind, KeyDtype};
use kvdex_wire::decode::{ATTEND, GATHER};
use kvdex_wire::Shape;
use kvdex_wire::{Budget, NO_LIMIT};
use numpy::{
    PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray3, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::check_shape;
use crate::errors::{bad_request, to_py};

/// Parses an index kind name ("flat", "hnsw", "graph").
pub fn parse_kind(py: Python<'_>, kind: &str) -> PyResult<IndexKind> {
    IndexKind::parse(kind).map_err(|e| bad_request(py, format!("index kind {kind:?}: {e}")))
}

/// The budget of a retrieve: a fixed `k`, or (with `coverage`) the adaptive one covering that
/// fraction of the estimated mass within `min_k ..= max_k` (`max_k` defaults to `k`).
pub fn budget(
    py: Python<'_>,
    k: Option<usize>,
    coverage: Option<f32>,
    min_k: usize,
    max_k: Option<usize>,
) -> PyResult<Budget> {
    match (coverage, k, max_k) {
        (None, Some(k), _) => Ok(Budget::Fixed(k)),
        (None, None, _) => Err(bad_request(
            py,
            "retrieve needs a budget: k=N (fixed) or coverage=p with max_k=N (adaptive)",
        )),
        (Some(p), k, max_k) => {
            let max_k = max_k.or(k).ok_or_else(|| {
                bad_request(
                    py,
                    "an adaptive budget (coverage=p) needs max_k (or k) as its cap",
                )
            })?;
            BudgetParams::new(p, min_k, max_k)
                .map(Budget::Adaptive)
                .map_err(|e| bad_request(py, format!("adaptive budget: {e}")))
        }
    }
}

/// The training signal of a seal: `queries` float32 `[q_heads, n, head_dim]` with `positions`
/// uint32 `[n]` (both C-contiguous), or neither; anything else is a clear error.
pub fn training<'a>(
    py: Python<'_>,
    shape: &Shape,
    queries: &'a Option<PyReadonlyArray3<'_, f32>>,
    positions: &'a Option<PyReadonlyArray1<'_, u32>>,
) -> PyResult<Option<(&'a [f32], &'a [u32])>> {
    let (h, d) = (shape.q_heads as usize, shape.head_dim as usize);
    match (queries, positions) {
        (None, None) => Ok(None),
        (Some(q), Some(p)) => {
            let n = p.len();
            check_shape(py, "queries", q.shape(), &[h, n, d], "q_heads, n, head_dim")?;
            let qs = q
                .as_slice()
                .map_err(|_| bad_request(py, "queries must be C-contiguous"))?;
            let ps = p
                .as_slice()
                .map_err(|_| bad_request(py, "positions must be C-contiguous"))?;
            Ok(Some((qs, ps)))
        }
        _ => Err(bad_request(
            py,
            "seal: pass both queries and positions (the training signal), or neither",
        )),
    }
}

/// Seals `layer` and starts its index build; `training` is `(queries [q_heads][n][d], positions [n])`.
pub fn seal(
    py: Python<'_>,
    h: &mut SessionHandle,
    layer: u32,
    kind: IndexKind,
    training: Option<(&[f32], &[u32])>,
) -> PyResult<u64> {
    py.detach(|| h.seal(layer, kind, training))
        .map_err(|e| to_py(py, e))
}

/// Rows (`[n * d]` elements of `dtype` as bytes) as a float16 (f16 sessions), uint16
/// (bf16 sessions: the bf16 bits, unconverted) or float32 array.
fn rows_array<'py>(py: Python<'py>, dtype: KeyDtype, b: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let misaligned = |_| bad_request(py, "gathered rows are misaligned");
    Ok(match dtype {
        KeyDtype::F16 => {
            let v: &[f16] = bytemuck::try_cast_slice(b).map_err(misaligned)?;
            PyArray1::from_slice(py, v).into_any()
        }
        KeyDtype::Bf16 => {
            let v: &[u16] = bytemuck::try_cast_slice(b).map_err(misaligned)?;
            PyArray1::from_slice(py, v).into_any()
        }
        KeyDtype::F32 => {
            let v: &[f32] = bytemuck::try_cast_slice(b).map_err(misaligned)?;
            PyArray1::from_slice(py, v).into_any()
        }
    })
}

/// The queries of a retrieve and each position's limit: `q` float32 `[q_heads, head_dim]`
/// (one position; `limits` must be None), or `[P, q_heads, head_dim]` with `limits` (`P`
/// visibility limits; None: every token for each position).
pub fn positions<'a>(
    py: Python<'_>,
    shape: &Shape,
    q: &'a PyReadonlyArrayDyn<'_, f32>,
    limits: Option<Vec<u32>>,
) -> PyResult<(&'a [f32], Option<Vec<u32>>)> {
    let (h, d) = (shape.q_heads as usize, shape.head_dim as usize);
    let qs = q
        .as_slice()
        .map_err(|_| bad_request(py, "q must be C-contiguous"))?;
    match (q.shape(), limits) {
        ([_, _], None) => {
            check_shape(py, "q", q.shape(), &[h, d], "q_heads, head_dim")?;
            Ok((qs, None))
        }
        ([_, _], Some(_)) => Err(bad_request(
            py,
            "limits need q shaped [P, q_heads, head_dim] (one row of queries per position)",
        )),
        ([0, _, _], _) => Err(bad_request(
            py,
            "q has P = 0 positions: send at least one query position",
        )),
        (&[p, _, _], limits) => {
            check_shape(py, "q", q.shape(), &[p, h, d], "P, q_heads, head_dim")?;
            let limits = limits.unwrap_or_else(|| vec![NO_LIMIT; p]);
            if limits.len() != p {
                return Err(bad_request(
                    py,
                    format!(
                        "limits has {} entries, q has P = {p} positions",
                        limits.len()
                    ),
                ));
            }
            Ok((qs, Some(limits)))
        }
        (other, _) => Err(bad_request(
            py,
            format!(
                "q has shape {other:?}, expected [q_heads, head_dim] or [P, q_heads, head_dim]"
            ),
        )),
    }
}

/// Runs one retrieve and copies its sections out (see [`results`]).
pub fn retrieve<'py>(
    py: Python<'py>,
    h: &mut SessionHandle,
    r: &RetrieveRequest<'_>,
) -> PyResult<Bound<'py, PyDict>> {
    let dtype = h.shape().dtype;
    let got = py
        .detach(move || h.retrieve_request(r))
        .map_err(|e| to_py(py, e))?;
    results(py, dtype, r.limits.is_some(), &got)
}

/// A retrieve's sections as a dict of new numpy arrays: `k` uint32 `[H]`, `coverage` float32
/// `[H]`, `ids` uint32 `[H, stride]`, `scores` float32 `[H, stride]`, `out` float32 `[H, d]`
/// and `lse` float32 `[H]` (None unless `attend`), `rows` `[H, 2, stride, d]` (K then V; None
/// unless `gather`, and None when `into` sent them to an engine destination), `stride`, and
/// the daemon's `search_us`, `attend_us`, `copy_us`, `slowest_head_us`, `scored`. With
/// `multi` (a `[P, q_heads, head_dim]` query), every section gains a leading `P` axis.
pub fn results<'py>(
    py: Python<'py>,
    dtype: KeyDtype,
    multi: bool,
    r: &Retrieved<'_>,
) -> PyResult<Bound<'py, PyDict>> {
    let hd = &r.header;
    let (hq, stride, d) = (
        hd.q_heads as usize,
        hd.stride as usize,
        hd.head_dim as usize,
    );
    // The leading axes of every per-head section: [P, H] or [H].
    let lead: Vec<usize> = if multi {
        vec![r.positions(), hq]
    } else {
        vec![hq]
    };
    let shaped = |tail: &[usize]| -> Vec<usize> { lead.iter().chain(tail).copied().collect() };
    let dict = PyDict::new(py);
    dict.set_item("k", PyArray1::from_slice(py, r.k).reshape(shaped(&[]))?)?;
    dict.set_item(
        "coverage",
        PyArray1::from_slice(py, r.coverage).reshape(shaped(&[]))?,
    )?;
    dict.set_item(
        "ids",
        PyArray1::from_slice(py, r.ids).reshape(shaped(&[stride]))?,
    )?;
    dict.set_item(
        "scores",
        PyArray1::from_slice(py, r.scores).reshape(shaped(&[stride]))?,
    )?;
    if hd.flags & ATTEND != 0 {
        dict.set_item(
            "out",
            PyArray1::from_slice(py, r.out).reshape(shaped(&[d]))?,
        )?;
        dict.set_item("lse", PyArray1::from_slice(py, r.lse).reshape(shaped(&[]))?)?;
    } else {
        dict.set_item("out", py.None())?;
        dict.set_item("lse", py.None())?;
    }
    // Rows sent into an engine destination are not in the response.
    if hd.flags & GATHER != 0 {
        let rows = rows_array(py, dtype, r.rows)?;
        dict.set_item(
            "rows",
            rows.call_method1("reshape", (shaped(&[2, stride, d]),))?,
        )?;
    } else {
        dict.set_item("rows", py.None())?;
    }
    dict.set_item("stride", hd.stride)?;
    dict.set_item("search_us", hd.search_us)?;
    dict.set_item("attend_us", hd.attend_us)?;
    dict.set_item("copy_us", hd.copy_us)?;
    dict.set_item("slowest_head_us", hd.slowest_head_us)?;
    dict.set_item("scored", hd.scored)?;
    Ok(dict)
}

//! The bodies of the `Session` methods that move K/V rows: `append` and `set_wkv` in,
//! `search` and `gather` out, each checking its numpy arguments against the session's shape
//! before the request.

use half::f16;
use kvdex_index::KeyDtype;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::Session;
use crate::arrays::{check_shape, to_f32, FloatArray};
use crate::errors::{bad_request, to_py};

/// The body of `Session.append` (its signature and docstring are in `session.rs`).
pub(super) fn append(
    session: &Session,
    py: Python<'_>,
    layer: u32,
    k: &Bound<'_, PyAny>,
    v: Option<&Bound<'_, PyAny>>,
    bf16: bool,
) -> PyResult<u64> {
    let s = session.shape;
    let ka = FloatArray::extract(py, "k", k, bf16)?;
    let tokens = ka.shape().get(1).copied().unwrap_or(0);
    let want = [s.kv_heads as usize, tokens, s.head_dim as usize];
    check_shape(py, "k", ka.shape(), &want, "kv_heads, tokens, head_dim")?;
    let va = v
        .map(|v| FloatArray::extract(py, "v", v, bf16))
        .transpose()?;
    let vb = match &va {
        Some(va) => {
            check_shape(py, "v", va.shape(), &want, "kv_heads, tokens, head_dim")?;
            va.bytes_as(py, "v", s.dtype)?
        }
        None => std::borrow::Cow::Borrowed(&[][..]),
    };
    let tokens =
        u32::try_from(tokens).map_err(|_| bad_request(py, "too many tokens in one append"))?;
    let kb = ka.bytes_as(py, "k", s.dtype)?;
    session.with(py, |o| {
        let h = &mut o.handle;
        py.detach(|| h.append(layer, tokens, &kb, &vb))
            .map_err(|e| to_py(py, e))
    })
}

/// The body of `Session.set_wkv` (its signature and docstring are in `session.rs`).
pub(super) fn set_wkv(
    session: &Session,
    py: Python<'_>,
    layer: u32,
    w: numpy::PyReadonlyArray2<'_, f32>,
) -> PyResult<()> {
    let dim = session.shape.kv_heads as usize * session.shape.head_dim as usize;
    check_shape(
        py,
        "w_kv",
        w.shape(),
        &[dim, dim],
        "D, D (D = kv_heads * head_dim)",
    )?;
    let ws = w
        .as_slice()
        .map_err(|_| bad_request(py, "w_kv must be C-contiguous"))?;
    session.with(py, |o| {
        let h = &mut o.handle;
        py.detach(|| h.set_wkv(layer, ws)).map_err(|e| to_py(py, e))
    })
}

/// The body of `Session.search` (its signature and docstring are in `session.rs`).
pub(super) fn search<'py>(
    session: &Session,
    py: Python<'py>,
    layer: u32,
    q: PyReadonlyArray2<'py, f32>,
    k: u32,
) -> PyResult<crate::arrays::SearchResult<'py>> {
    let (h, d) = (
        session.shape.q_heads as usize,
        session.shape.head_dim as usize,
    );
    check_shape(py, "q", q.shape(), &[h, d], "q_heads, head_dim")?;
    let qs = q
        .as_slice()
        .map_err(|_| bad_request(py, "q must be C-contiguous"))?;
    session.with(py, |o| {
        // The response lives in the arena, so it holds at most arena/8 (id, score) pairs.
        let cap = (k as usize).min(o.handle.arena_len() as usize / 8);
        o.buf.ids.resize(h * cap, 0);
        o.buf.scores.resize(h * cap, 0.0);
        let (hd, b) = (&mut o.handle, &mut o.buf);
        let used = py
            .detach(|| hd.search(layer, qs, k, &mut b.ids, &mut b.scores))
            .map_err(|e| to_py(py, e))?;
        let ids = PyArray1::from_slice(py, &b.ids[..h * used]).reshape([h, used])?;
        let scores = PyArray1::from_slice(py, &b.scores[..h * used]).reshape([h, used])?;
        Ok((ids, scores))
    })
}

/// The body of `Session.gather` (its signature and docstring are in `session.rs`).
pub(super) fn gather<'py>(
    session: &Session,
    py: Python<'py>,
    layer: u32,
    kv_head: u32,
    ids: Vec<u32>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let (n, d, dtype) = (
        ids.len(),
        session.shape.head_dim as usize,
        session.shape.dtype,
    );
    session.with(py, |o| {
        let (hd, b) = (&mut o.handle, &mut o.buf);
        let rows = hd.gather(layer, kv_head, &ids).map_err(|e| to_py(py, e))?;
        let mut pair = [None, None];
        for (slot, part) in pair.iter_mut().zip([rows.k, rows.v]) {
            *slot = Some(match dtype {
                KeyDtype::F16 => {
                    let v: &[f16] = bytemuck::try_cast_slice(part)
                        .map_err(|_| bad_request(py, "gathered rows are misaligned"))?;
                    PyArray1::from_slice(py, v).reshape([n, d])?.into_any()
                }
                KeyDtype::Bf16 => {
                    let v: &[u16] = bytemuck::try_cast_slice(part)
                        .map_err(|_| bad_request(py, "gathered rows are misaligned"))?;
                    PyArray1::from_slice(py, v).reshape([n, d])?.into_any()
                }
                KeyDtype::F32 => {
                    to_f32(dtype, part, &mut b.f32s);
                    PyArray1::from_slice(py, &b.f32s)
                        .reshape([n, d])?
                        .into_any()
                }
            });
        }
        let [k, v] = pair;
        match (k, v) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(bad_request(py, "gather produced no rows")),
        }
    })
}

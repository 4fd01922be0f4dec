//! `LocalSession`: the daemon's storage seam ([`kvdex::store::Session`]) inside the Python
//! process.
//!
//! It serves append/search/gather with the same argument conventions as a daemon session, with
//! no shared memory and no daemon. Tests use it to check the numpy conversions and error mapping,
//! and `kvdex.bench` uses it to measure the binding's own per-call cost.

use half::f16;
use kvdex::store::{dtype_serde, Session, Shape};
use kvdex_index::{Hits, KeyDtype, SearchScratch};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{check_shape, to_f32, FloatArray};
use crate::errors::{bad_request, daemon_to_py};

/// Reusable buffers, so that repeated calls do not allocate on the Rust side.
#[derive(Default)]
struct Scratch {
    search: SearchScratch,
    hits: Hits,
    ids: Vec<u32>,
    scores: Vec<f32>,
    rows: Vec<u8>,
    f32s: Vec<f32>,
}

/// An in-process KV session (see the module docs).
#[pyclass(module = "kvdex._native")]
pub struct LocalSession {
    session: Session,
    scratch: std::sync::Mutex<Scratch>,
}

impl LocalSession {
    fn shape(&self) -> &Shape {
        self.session.shape()
    }
}

#[pymethods]
impl LocalSession {
    /// LocalSession(layers, q_heads, kv_heads, head_dim, dtype="f16")
    #[new]
    #[pyo3(signature = (layers, q_heads, kv_heads, head_dim, dtype = "f16"))]
    fn new(
        py: Python<'_>,
        layers: u32,
        q_heads: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: &str,
    ) -> PyResult<Self> {
        let shape = crate::arrays::shape_from_args(py, layers, q_heads, kv_heads, head_dim, dtype)?;
        let session = Session::new(shape).map_err(|e| daemon_to_py(py, e))?;
        Ok(Self {
            session,
            scratch: Default::default(),
        })
    }

    /// (layers, q_heads, kv_heads, head_dim, dtype name)
    #[getter]
    fn shape_tuple(&self) -> (u32, u32, u32, u32, &'static str) {
        let s = self.shape();
        (
            s.layers,
            s.q_heads,
            s.kv_heads,
            s.head_dim,
            dtype_serde::name(s.dtype),
        )
    }

    /// Tokens stored for `layer`.
    fn len(&self, py: Python<'_>, layer: u32) -> PyResult<usize> {
        self.session.len(layer).map_err(|e| daemon_to_py(py, e))
    }

    /// Appends K and V, each `[kv_heads, tokens, head_dim]` float16/float32; returns the new length.
    fn append(
        &self,
        py: Python<'_>,
        layer: u32,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let s = *self.shape();
        let (ka, va) = (
            FloatArray::extract(py, "k", k, false)?,
            FloatArray::extract(py, "v", v, false)?,
        );
        let tokens = ka.shape().get(1).copied().unwrap_or(0);
        let want = [s.kv_heads as usize, tokens, s.head_dim as usize];
        check_shape(py, "k", ka.shape(), &want, "kv_heads, tokens, head_dim")?;
        check_shape(py, "v", va.shape(), &want, "kv_heads, tokens, head_dim")?;
        let (kb, vb) = (
            ka.bytes_as(py, "k", s.dtype)?,
            va.bytes_as(py, "v", s.dtype)?,
        );
        let session = &self.session;
        py.detach(|| session.append(layer, tokens, &kb, &vb))
            .map_err(|e| daemon_to_py(py, e))
    }

    /// Exact top-`k` per query head: `q` float32 `[q_heads, head_dim]` -> (ids uint32
    /// `[q_heads, k']`, scores float32 `[q_heads, k']`), with `k' = min(k, len)`. New arrays.
    fn search<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        q: PyReadonlyArray2<'py, f32>,
        k: usize,
    ) -> PyResult<crate::arrays::SearchResult<'py>> {
        let s = *self.shape();
        let (h, d) = (s.q_heads as usize, s.head_dim as usize);
        check_shape(py, "q", q.shape(), &[h, d], "q_heads, head_dim")?;
        let qs = q
            .as_slice()
            .map_err(|_| bad_request(py, "q must be C-contiguous"))?;
        let mut guard = self
            .scratch
            .lock()
            .map_err(|_| bad_request(py, "session scratch poisoned"))?;
        let sc = &mut *guard;
        let cap = k.min(self.session.len(layer).map_err(|e| daemon_to_py(py, e))?);
        sc.ids.resize(h * cap, 0);
        sc.scores.resize(h * cap, 0.0);
        let session = &self.session;
        let used = py
            .detach(|| {
                session.search(
                    layer,
                    qs,
                    k,
                    &mut sc.search,
                    &mut sc.hits,
                    &mut sc.ids,
                    &mut sc.scores,
                )
            })
            .map_err(|e| daemon_to_py(py, e))?;
        let ids = PyArray1::from_slice(py, &sc.ids[..h * used]).reshape([h, used])?;
        let scores = PyArray1::from_slice(py, &sc.scores[..h * used]).reshape([h, used])?;
        Ok((ids, scores))
    }

    /// K and V rows of `ids` for one KV head -> (k, v), each `[len(ids), head_dim]`, new arrays
    /// in the session dtype (bf16 sessions return float32).
    fn gather<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        kv_head: u32,
        ids: Vec<u32>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let s = *self.shape();
        let (n, d, rb) = (ids.len(), s.head_dim as usize, s.row_bytes());
        let mut guard = self
            .scratch
            .lock()
            .map_err(|_| bad_request(py, "session scratch poisoned"))?;
        let sc = &mut *guard;
        sc.rows.resize(2 * n * rb, 0);
        let session = &self.session;
        py.detach(|| session.gather(layer, kv_head, &ids, &mut sc.rows))
            .map_err(|e| daemon_to_py(py, e))?;
        let (kb, vb) = sc.rows.split_at(n * rb);
        let mut out = Vec::with_capacity(2);
        for part in [kb, vb] {
            let arr: Bound<'py, PyAny> = match s.dtype {
                KeyDtype::F16 => {
                    let v: &[f16] = bytemuck::cast_slice(part);
                    PyArray1::from_slice(py, v).reshape([n, d])?.into_any()
                }
                KeyDtype::F32 | KeyDtype::Bf16 => {
                    to_f32(s.dtype, part, &mut sc.f32s);
                    PyArray1::from_slice(py, &sc.f32s)
                        .reshape([n, d])?
                        .into_any()
                }
            };
            out.push(arr);
        }
        let v = out
            .pop()
            .ok_or_else(|| bad_request(py, "gather produced no V"))?;
        let k = out
            .pop()
            .ok_or_else(|| bad_request(py, "gather produced no K"))?;
        Ok((k, v))
    }

    /// The same search as [`LocalSession::search`] run `iters` times in a Rust loop (no Python
    /// in between); returns each call's wall time in microseconds. `kvdex.bench` puts these
    /// next to the Python-side timings of the same call to isolate the binding's overhead.
    fn bench_search(
        &self,
        py: Python<'_>,
        layer: u32,
        q: PyReadonlyArray2<'_, f32>,
        k: usize,
        iters: usize,
    ) -> PyResult<Vec<f64>> {
        let s = *self.shape();
        let (h, d) = (s.q_heads as usize, s.head_dim as usize);
        check_shape(py, "q", q.shape(), &[h, d], "q_heads, head_dim")?;
        let qs = q
            .as_slice()
            .map_err(|_| bad_request(py, "q must be C-contiguous"))?;
        let mut guard = self
            .scratch
            .lock()
            .map_err(|_| bad_request(py, "session scratch poisoned"))?;
        let sc = &mut *guard;
        sc.ids.resize(h * k, 0);
        sc.scores.resize(h * k, 0.0);
        let session = &self.session;
        py.detach(|| {
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t0 = std::time::Instant::now();
                session.search(
                    layer,
                    qs,
                    k,
                    &mut sc.search,
                    &mut sc.hits,
                    &mut sc.ids,
                    &mut sc.scores,
                )?;
                times.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            Ok(times)
        })
        .map_err(|e| daemon_to_py(py, e))
    }

    /// Bytes of K and V held.
    fn resident_bytes(&self) -> u64 {
        self.session.resident_bytes()
    }
}

//! `Client` and `Session`: the Rust client ([`kvdex::client`]) exposed to Python.
//!
//! Results: the Rust client hands back slices of the shared-memory arena that the next request
//! overwrites, so a numpy view of them would change under the caller. The binding therefore
//! returns new arrays (one copy out of the arena) from `search`/`gather`, and offers
//! `search_into`/`gather_into`, which write into caller-owned arrays with no allocation: the
//! path for engines that reuse buffers every step.

use std::sync::Mutex;
use std::time::Instant;

use half::f16;
use kvdex::client::{parse_token, Client as RustClient, SessionHandle, SessionOptions};
use kvdex::store::{dtype_serde, Shape};
use kvdex_index::KeyDtype;
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::arrays::{check_shape, to_f32, FloatArray};
use crate::errors::{bad_request, py_error, to_py};

/// A connection to a daemon's HTTP control plane.
#[pyclass(module = "kvdex._native", frozen)]
pub struct Client {
    inner: RustClient,
    url: String,
}

#[pymethods]
impl Client {
    /// Client(url): connects and checks `/healthz`.
    #[new]
    fn new(py: Python<'_>, url: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| RustClient::connect(url))
            .map_err(|e| to_py(py, e))?;
        Ok(Self {
            inner,
            url: url.trim_end_matches('/').to_owned(),
        })
    }

    /// The daemon's base URL.
    #[getter]
    fn url(&self) -> &str {
        &self.url
    }

    /// Creates a session (HTTP POST) and attaches its shared-memory region.
    /// `slim`: store K alone (MHA only), with `slim_rope = (theta, rope_dim)` when the keys
    /// are stored post-RoPE.
    #[pyo3(signature = (layers, q_heads, kv_heads, head_dim, dtype = "f16", payload_bytes = None, slim = false, slim_rope = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn create_session(
        &self,
        py: Python<'_>,
        layers: u32,
        q_heads: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: &str,
        payload_bytes: Option<u64>,
        slim: bool,
        slim_rope: Option<(f64, usize)>,
    ) -> PyResult<Session> {
        let shape = crate::arrays::shape_from_args(py, layers, q_heads, kv_heads, head_dim, dtype)?;
        shape.validate().map_err(|e| to_py(py, e))?;
        if slim_rope.is_some() && !slim {
            return Err(bad_request(py, "slim_rope is given but slim is not True"));
        }
        let slim = slim.then(|| kvdex::store::SlimSpec {
            rope: slim_rope
                .map(|(theta, rope_dim)| kvdex_index::attend::RopeSpec { theta, rope_dim }),
        });
        let opts = SessionOptions {
            payload_bytes,
            slim,
            ..Default::default()
        };
        let handle = py
            .detach(|| self.inner.create_session(shape, opts))
            .map_err(|e| to_py(py, e))?;
        Ok(Session::new(handle))
    }
}

/// attach(shm_path, token_hex): attaches to a region directly, bypassing HTTP.
#[pyfunction]
pub fn attach(py: Python<'_>, shm_path: &str, token: &str) -> PyResult<Session> {
    let token = parse_token(token).map_err(|e| to_py(py, e))?;
    let handle = py
        .detach(|| RustClient::attach(shm_path, &token))
        .map_err(|e| to_py(py, e))?;
    Ok(Session::new(handle))
}

/// Per-session buffers reused by every call.
#[derive(Default)]
struct Buffers {
    ids: Vec<u32>,
    scores: Vec<f32>,
    f32s: Vec<f32>,
}

struct Open {
    handle: SessionHandle,
    buf: Buffers,
}

/// An attached session. Calls are serialised (one outstanding request per region).
#[pyclass(module = "kvdex._native", frozen)]
pub struct Session {
    open: Mutex<Option<Open>>,
    shape: Shape,
    id: Option<String>,
}

impl Session {
    fn new(handle: SessionHandle) -> Self {
        let shape = *handle.shape();
        let id = handle.id().map(str::to_owned);
        Self {
            open: Mutex::new(Some(Open {
                handle,
                buf: Buffers::default(),
            })),
            shape,
            id,
        }
    }

    /// Runs `f` on the open handle, or raises DisconnectedError once the session is closed.
    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut Open) -> PyResult<R>) -> PyResult<R> {
        let mut guard = self
            .open
            .lock()
            .map_err(|_| bad_request(py, "session lock poisoned by an earlier panic"))?;
        match guard.as_mut() {
            Some(open) => f(open),
            None => Err(py_error(
                py,
                "DisconnectedError",
                "the session is closed".into(),
            )),
        }
    }
}

#[pymethods]
impl Session {
    /// (layers, q_heads, kv_heads, head_dim, dtype name)
    #[getter]
    fn shape_tuple(&self) -> (u32, u32, u32, u32, &'static str) {
        let s = &self.shape;
        (
            s.layers,
            s.q_heads,
            s.kv_heads,
            s.head_dim,
            dtype_serde::name(s.dtype),
        )
    }

    /// The session id (None when attached directly).
    #[getter]
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// True once `close()` ran.
    #[getter]
    fn closed(&self) -> bool {
        self.open.lock().map(|g| g.is_none()).unwrap_or(true)
    }

    /// Echoes `data` through the daemon (a round trip with no work).
    fn ping<'py>(&self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        self.with(py, |o| {
            let h = &mut o.handle;
            let echo = py
                .detach(|| h.ping(data).map(<[u8]>::to_vec))
                .map_err(|e| to_py(py, e))?;
            Ok(PyBytes::new(py, &echo))
        })
    }

    /// Appends K and V, each `[kv_heads, tokens, head_dim]` float16/float32; returns the length.
    /// A Slim session stores K alone: `v` may be None.
    #[pyo3(signature = (layer, k, v = None))]
    fn append(
        &self,
        py: Python<'_>,
        layer: u32,
        k: &Bound<'_, PyAny>,
        v: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let s = self.shape;
        let ka = FloatArray::extract(py, "k", k)?;
        let tokens = ka.shape().get(1).copied().unwrap_or(0);
        let want = [s.kv_heads as usize, tokens, s.head_dim as usize];
        check_shape(py, "k", ka.shape(), &want, "kv_heads, tokens, head_dim")?;
        let va = v.map(|v| FloatArray::extract(py, "v", v)).transpose()?;
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
        self.with(py, |o| {
            let h = &mut o.handle;
            py.detach(|| h.append(layer, tokens, &kb, &vb))
                .map_err(|e| to_py(py, e))
        })
    }

    /// Uploads `layer`'s W_KV to a Slim session: float32 `[D, D]`, `D = kv_heads * head_dim`,
    /// with `V = K @ W_KV`. Required before the layer's first append.
    fn set_wkv(
        &self,
        py: Python<'_>,
        layer: u32,
        w: numpy::PyReadonlyArray2<'_, f32>,
    ) -> PyResult<()> {
        let dim = self.shape.kv_heads as usize * self.shape.head_dim as usize;
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
        self.with(py, |o| {
            let h = &mut o.handle;
            py.detach(|| h.set_wkv(layer, ws)).map_err(|e| to_py(py, e))
        })
    }

    /// Top-`k` per query head -> (ids uint32 `[q_heads, k']`, scores float32 `[q_heads, k']`),
    /// `k' = min(k, len)`; new arrays (copied out of the arena).
    fn search<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        q: PyReadonlyArray2<'py, f32>,
        k: u32,
    ) -> PyResult<crate::arrays::SearchResult<'py>> {
        let (h, d) = (self.shape.q_heads as usize, self.shape.head_dim as usize);
        check_shape(py, "q", q.shape(), &[h, d], "q_heads, head_dim")?;
        let qs = q
            .as_slice()
            .map_err(|_| bad_request(py, "q must be C-contiguous"))?;
        self.with(py, |o| {
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

    /// Like `search`, into caller arrays `ids` (uint32) and `scores` (float32), each
    /// `[q_heads, k]` C-contiguous; returns `k'` (rows use stride `k'`). No allocation.
    fn search_into(
        &self,
        py: Python<'_>,
        layer: u32,
        q: PyReadonlyArray2<'_, f32>,
        k: u32,
        ids: &Bound<'_, PyArray2<u32>>,
        scores: &Bound<'_, PyArray2<f32>>,
    ) -> PyResult<usize> {
        let (h, d) = (self.shape.q_heads as usize, self.shape.head_dim as usize);
        check_shape(py, "q", q.shape(), &[h, d], "q_heads, head_dim")?;
        check_shape(py, "ids", ids.shape(), &[h, k as usize], "q_heads, k")?;
        check_shape(py, "scores", scores.shape(), &[h, k as usize], "q_heads, k")?;
        let qs = q
            .as_slice()
            .map_err(|_| bad_request(py, "q must be C-contiguous"))?;
        let mut ids = ids
            .try_readwrite()
            .map_err(|_| bad_request(py, "ids is not writeable"))?;
        let mut scores = scores
            .try_readwrite()
            .map_err(|_| bad_request(py, "scores is not writeable"))?;
        let ids = ids
            .as_slice_mut()
            .map_err(|_| bad_request(py, "ids must be C-contiguous"))?;
        let scores = scores
            .as_slice_mut()
            .map_err(|_| bad_request(py, "scores must be C-contiguous"))?;
        self.with(py, |o| {
            let hd = &mut o.handle;
            py.detach(|| hd.search(layer, qs, k, ids, scores))
                .map_err(|e| to_py(py, e))
        })
    }

    /// K and V rows of `ids` for one KV head -> (k, v) `[len(ids), head_dim]`, new arrays in
    /// the session dtype (bf16 sessions return float32).
    fn gather<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        kv_head: u32,
        ids: Vec<u32>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (n, d, dtype) = (ids.len(), self.shape.head_dim as usize, self.shape.dtype);
        self.with(py, |o| {
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
                    KeyDtype::F32 | KeyDtype::Bf16 => {
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

    /// Seals `layer`'s prefill and starts a background build of a `kind` index ("flat",
    /// "hnsw" or "graph") per KV head; `queries` float32 `[q_heads, n, head_dim]` with
    /// `positions` uint32 `[n]` are the training signal (the graph's), or None. Returns the
    /// tokens indexed per KV head.
    #[pyo3(signature = (layer, kind, queries = None, positions = None))]
    fn seal(
        &self,
        py: Python<'_>,
        layer: u32,
        kind: &str,
        queries: Option<numpy::PyReadonlyArray3<'_, f32>>,
        positions: Option<numpy::PyReadonlyArray1<'_, u32>>,
    ) -> PyResult<u64> {
        let kind = crate::decode::parse_kind(py, kind)?;
        let (h, d) = (self.shape.q_heads as usize, self.shape.head_dim as usize);
        let training = match (&queries, &positions) {
            (None, None) => None,
            (Some(q), Some(p)) => {
                let n = p.len();
                check_shape(py, "queries", q.shape(), &[h, n, d], "q_heads, n, head_dim")?;
                let qs = q
                    .as_slice()
                    .map_err(|_| bad_request(py, "queries must be C-contiguous"))?;
                let ps = p
                    .as_slice()
                    .map_err(|_| bad_request(py, "positions must be C-contiguous"))?;
                Some((qs, ps))
            }
            _ => {
                return Err(bad_request(
                    py,
                    "seal: pass both queries and positions (the training signal), or neither",
                ))
            }
        };
        self.with(py, |o| {
            crate::decode::seal(py, &mut o.handle, layer, kind, training)
        })
    }

    /// Seals `layer` with the engine's own neighbour lists as the training signal: list `i`
    /// belongs to query head `heads[i]` and holds `lens[i]` absolute token ids (best first),
    /// taken in order from `ids` (all uint32, 1-D). Returns the tokens indexed per KV head.
    fn seal_neighbours(
        &self,
        py: Python<'_>,
        layer: u32,
        kind: &str,
        heads: numpy::PyReadonlyArray1<'_, u32>,
        lens: numpy::PyReadonlyArray1<'_, u32>,
        ids: numpy::PyReadonlyArray1<'_, u32>,
    ) -> PyResult<u64> {
        let kind = crate::decode::parse_kind(py, kind)?;
        let slice = |what: &str, a: &numpy::PyReadonlyArray1<'_, u32>| {
            a.as_slice()
                .map(<[u32]>::to_vec)
                .map_err(|_| bad_request(py, format!("{what} must be C-contiguous")))
        };
        let (heads, lens, ids) = (
            slice("heads", &heads)?,
            slice("lens", &lens)?,
            slice("ids", &ids)?,
        );
        self.with(py, |o| {
            let h = &mut o.handle;
            py.detach(|| h.seal_neighbours(layer, kind, &heads, &lens, &ids))
                .map_err(|e| to_py(py, e))
        })
    }

    /// The decode-step request for `layer`: `q` float32 `[q_heads, head_dim]`; budget `k`
    /// (fixed) or `coverage` + `max_k` (adaptive, at least `min_k`). Returns a dict of new
    /// arrays (see `kvdex.Session.retrieve`).
    #[pyo3(signature = (layer, q, k = None, coverage = None, min_k = 1, max_k = None, attend = true, gather = false, scale = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn retrieve<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        q: PyReadonlyArray2<'py, f32>,
        k: Option<usize>,
        coverage: Option<f32>,
        min_k: usize,
        max_k: Option<usize>,
        attend: bool,
        gather: bool,
        scale: Option<f32>,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let (h, d) = (self.shape.q_heads as usize, self.shape.head_dim as usize);
        check_shape(py, "q", q.shape(), &[h, d], "q_heads, head_dim")?;
        let qs = q
            .as_slice()
            .map_err(|_| bad_request(py, "q must be C-contiguous"))?;
        let params = kvdex::store::retrieve::RetrieveParams {
            budget: crate::decode::budget(py, k, coverage, min_k, max_k)?,
            attend,
            gather,
            scale,
        };
        self.with(py, |o| {
            crate::decode::retrieve(py, &mut o.handle, layer, qs, &params)
        })
    }

    /// Times `iters` pings of `payload` bytes in a Rust loop (no Python between calls); returns
    /// each round trip in microseconds. The Rust client's own cost, for `kvdex.bench rtt`.
    fn bench_ping(&self, py: Python<'_>, payload: usize, iters: usize) -> PyResult<Vec<f64>> {
        let data = vec![7u8; payload];
        self.with(py, |o| {
            let h = &mut o.handle;
            py.detach(|| {
                let mut t = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let t0 = Instant::now();
                    h.ping(&data)?;
                    t.push(t0.elapsed().as_secs_f64() * 1e6);
                }
                Ok(t)
            })
            .map_err(|e| to_py(py, e))
        })
    }

    /// Drops the session on the daemon (HTTP DELETE) and detaches; later calls raise
    /// DisconnectedError. Closing twice is a no-op.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self
            .open
            .lock()
            .map_err(|_| bad_request(py, "session lock poisoned"))?
            .take();
        match taken {
            Some(o) => py
                .detach(|| o.handle.drop_session())
                .map_err(|e| to_py(py, e)),
            None => Ok(()),
        }
    }
}

//! `Session`: an attached session exposed to Python, over [`kvdex_client::SessionHandle`].
//!
//! Results: the Rust client hands back slices of the shared-memory arena that the next request
//! overwrites, so a numpy view of them would change under the caller. The binding therefore
//! returns new arrays (one copy out of the arena) from `search`/`gather`, and offers
//! `search_into`, which writes into caller-owned arrays with no allocation: the path for
//! engines that reuse buffers every step.
//!
//! # Layout
//! PyO3 takes one `#[pymethods]` block per class, so every Python method is declared here,
//! with its signature and docstring. The bodies that move K/V rows (`append`, `set_wkv`,
//! `search`, `gather`) live in `rows`; the decode path's argument checks and calls in
//! [`crate::decode`].

pub mod pending;
mod rows;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvdex_client::{RetrieveRequest, SessionHandle};
use kvdex_wire::{dtype_serde, Shape};
use numpy::{
    PyArray2, PyArrayMethods, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::arrays::check_shape;
use crate::errors::{bad_request, py_error, to_py};

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
    /// The exception a signal handler raised while a request waited (Ctrl-C's
    /// KeyboardInterrupt), re-raised instead of the client's "interrupted" error.
    signalled: Arc<Mutex<Option<PyErr>>>,
}

impl Session {
    /// Wraps an attached handle. A request that waits on a slow or hung daemon runs Python's
    /// signal handlers every 50 ms, so that Ctrl-C interrupts it (the session is then retired:
    /// the abandoned reply may still arrive).
    pub(crate) fn new(mut handle: SessionHandle) -> Self {
        let shape = *handle.shape();
        let id = handle.id().map(str::to_owned);
        let signalled = Arc::new(Mutex::new(None));
        let slot = signalled.clone();
        handle.set_interrupt(move || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(e) => {
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(e);
                    }
                    true
                }
            })
        });
        Self {
            open: Mutex::new(Some(Open {
                handle,
                buf: Buffers::default(),
            })),
            shape,
            id,
            signalled,
        }
    }

    /// Runs `f` on the open handle, or raises DisconnectedError once the session is closed.
    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut Open) -> PyResult<R>) -> PyResult<R> {
        let mut guard = self
            .open
            .lock()
            .map_err(|_| bad_request(py, "session lock poisoned by an earlier panic"))?;
        match guard.as_mut() {
            Some(open) => {
                f(open).map_err(
                    |e| match self.signalled.lock().ok().and_then(|mut s| s.take()) {
                        Some(raised) => raised,
                        None => e,
                    },
                )
            }
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

    /// Appends K and V, each `[kv_heads, tokens, head_dim]` float16/float32, or with `bf16`
    /// uint16 arrays of bf16 bits; returns the length. A Slim session stores K alone: `v` may
    /// be None.
    #[pyo3(signature = (layer, k, v = None, bf16 = false))]
    fn append(
        &self,
        py: Python<'_>,
        layer: u32,
        k: &Bound<'_, PyAny>,
        v: Option<&Bound<'_, PyAny>>,
        bf16: bool,
    ) -> PyResult<u64> {
        rows::append(self, py, layer, k, v, bf16)
    }

    /// Uploads `layer`'s W_KV to a Slim session: float32 `[D, D]`, `D = kv_heads * head_dim`,
    /// with `V = K @ W_KV`. Required before the layer's first append.
    fn set_wkv(
        &self,
        py: Python<'_>,
        layer: u32,
        w: numpy::PyReadonlyArray2<'_, f32>,
    ) -> PyResult<()> {
        rows::set_wkv(self, py, layer, w)
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
        rows::search(self, py, layer, q, k)
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
    /// the session dtype (bf16 sessions: uint16 arrays of the bf16 bits).
    fn gather<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        kv_head: u32,
        ids: Vec<u32>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        rows::gather(self, py, layer, kv_head, ids)
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
        let training = crate::decode::training(py, &self.shape, &queries, &positions)?;
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

    /// The decode-step request for `layer`: `q` float32 `[q_heads, head_dim]`, or
    /// `[P, q_heads, head_dim]` for P positions with `limits` (each position sees tokens
    /// `< limits[p]`; None: all); budget `k` (fixed) or `coverage` + `max_k` (adaptive, at
    /// least `min_k`). Returns a dict of new arrays (see `kvdex.Session.retrieve`).
    #[pyo3(signature = (layer, q, k = None, coverage = None, min_k = 1, max_k = None, attend = true, gather = false, scale = None, into = None, limits = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn retrieve<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        q: PyReadonlyArrayDyn<'py, f32>,
        k: Option<usize>,
        coverage: Option<f32>,
        min_k: usize,
        max_k: Option<usize>,
        attend: bool,
        gather: bool,
        scale: Option<f32>,
        into: Option<(u32, u64)>,
        limits: Option<Vec<u32>>,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let (qs, limits) = crate::decode::positions(py, &self.shape, &q, limits)?;
        let params = kvdex_wire::RetrieveParams {
            budget: crate::decode::budget(py, k, coverage, min_k, max_k)?,
            attend,
            gather,
            scale,
        };
        let r = RetrieveRequest {
            layer,
            q: qs,
            limits: limits.as_deref(),
            params,
            engine_rows: into.map(|(dest, offset)| kvdex_wire::decode::EngineRows { dest, offset }),
        };
        self.with(py, |o| crate::decode::retrieve(py, &mut o.handle, &r))
    }

    /// `retrieve` without waiting: returns a `PendingRetrieve` for `wait_retrieve` (same
    /// arguments). Several may be in flight; each must be waited on.
    #[pyo3(signature = (layer, q, k = None, coverage = None, min_k = 1, max_k = None, attend = true, gather = false, scale = None, limits = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn submit_retrieve(
        &self,
        py: Python<'_>,
        layer: u32,
        q: PyReadonlyArrayDyn<'_, f32>,
        k: Option<usize>,
        coverage: Option<f32>,
        min_k: usize,
        max_k: Option<usize>,
        attend: bool,
        gather: bool,
        scale: Option<f32>,
        limits: Option<Vec<u32>>,
    ) -> PyResult<pending::PendingRetrieve> {
        let (qs, limits) = crate::decode::positions(py, &self.shape, &q, limits)?;
        let params = kvdex_wire::RetrieveParams {
            budget: crate::decode::budget(py, k, coverage, min_k, max_k)?,
            attend,
            gather,
            scale,
        };
        let r = RetrieveRequest {
            limits: limits.as_deref(),
            ..RetrieveRequest::new(layer, qs, &params)
        };
        self.with(py, |o| {
            let h = &mut o.handle;
            let p = py
                .detach(|| h.submit_retrieve(&r))
                .map_err(|e| to_py(py, e))?;
            Ok(pending::PendingRetrieve::new(p, r.limits.is_some()))
        })
    }

    /// True once `pending`'s results are ready (never blocks).
    fn retrieve_ready(&self, py: Python<'_>, pending: &pending::PendingRetrieve) -> PyResult<bool> {
        self.with(py, |o| pending.ready(py, &mut o.handle))
    }

    /// Waits (without the GIL) for a retrieve from `submit_retrieve` and returns its dict of
    /// new arrays, as `retrieve` does. A retrieve is waited on once.
    fn wait_retrieve<'py>(
        &self,
        py: Python<'py>,
        pending: &pending::PendingRetrieve,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let dtype = self.shape.dtype;
        self.with(py, |o| pending.wait(py, dtype, &mut o.handle))
    }

    /// Drops every layer's rows from token `tokens` on; returns the bytes the daemon gave back
    /// to its budget.
    fn truncate(&self, py: Python<'_>, tokens: u64) -> PyResult<u64> {
        self.with(py, |o| {
            let h = &mut o.handle;
            py.detach(|| h.truncate(tokens)).map_err(|e| to_py(py, e))
        })
    }

    /// A new session holding a copy of this one's rows (`POST /v1/sessions/{id}/fork`).
    fn fork(&self, py: Python<'_>) -> PyResult<Session> {
        self.with(py, |o| {
            let h = &o.handle;
            let forked = py.detach(|| h.fork()).map_err(|e| to_py(py, e))?;
            Ok(Session::new(forked))
        })
    }

    /// Offers an engine GPU buffer (CUDA IPC memory handle `mem`, 64 bytes; the `nbytes` at
    /// `offset` of its allocation; optional IPC event handle) as a gather destination of this
    /// session; returns its handle.
    #[pyo3(signature = (mem, offset, nbytes, event = None))]
    fn register_cuda_dest(
        &self,
        py: Python<'_>,
        mem: &[u8],
        offset: u64,
        nbytes: u64,
        event: Option<&[u8]>,
    ) -> PyResult<u32> {
        let handle = |what: &str, b: &[u8]| -> PyResult<[u8; 64]> {
            b.try_into().map_err(|_| {
                bad_request(
                    py,
                    format!(
                        "{what} handle is {} bytes; a CUDA IPC handle is 64",
                        b.len()
                    ),
                )
            })
        };
        let mem = handle("memory", mem)?;
        let event = event.map(|e| handle("event", e)).transpose()?;
        self.with(py, |o| {
            let h = &mut o.handle;
            py.detach(|| h.register_cuda_dest(mem, offset, nbytes, event))
                .map_err(|e| to_py(py, e))
        })
    }

    /// Releases an engine destination; returns how many the session still holds.
    fn unregister_dest(&self, py: Python<'_>, handle: u32) -> PyResult<u64> {
        self.with(py, |o| {
            let h = &mut o.handle;
            py.detach(|| h.unregister_dest(handle))
                .map_err(|e| to_py(py, e))
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

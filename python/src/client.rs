//! `Client` and `attach`: the Rust client's ([`kvdex_client`]) control plane exposed to
//! Python; both hand back a [`Session`] (in [`crate::session`]).

use kvdex_client::{Client as RustClient, SessionOptions, SessionToken};
use pyo3::prelude::*;

use crate::errors::{bad_request, to_py};
use crate::session::Session;

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
    /// are stored post-RoPE. `sinks` and `window`: the session's own static tokens (the
    /// daemon's `[decode]` values when `None`). `kv_format`: `"int8"` to store int8 rows with
    /// one scale each (the dtype when `None`).
    #[pyo3(signature = (layers, q_heads, kv_heads, head_dim, dtype = "f16", payload_bytes = None, slim = false, slim_rope = None, sinks = None, window = None, kv_format = None))]
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
        sinks: Option<u64>,
        window: Option<u64>,
        kv_format: Option<&str>,
    ) -> PyResult<Session> {
        let shape = crate::arrays::shape_from_args(py, layers, q_heads, kv_heads, head_dim, dtype)?;
        shape.validate().map_err(|e| to_py(py, e))?;
        if slim_rope.is_some() && !slim {
            return Err(bad_request(py, "slim_rope is given but slim is not True"));
        }
        let slim = slim.then(|| kvdex_wire::SlimSpec {
            rope: slim_rope
                .map(|(theta, rope_dim)| kvdex_index::attend::RopeSpec { theta, rope_dim }),
        });
        let kv_format = kv_format
            .map(|name| kvdex_wire::KvFormat::parse(name, shape.dtype))
            .transpose()
            .map_err(|e| to_py(py, e))?;
        let opts = SessionOptions {
            payload_bytes,
            slim,
            sinks,
            window,
            kv_format,
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
    let token = *SessionToken::parse(token)
        .map_err(|e| to_py(py, e))?
        .as_bytes();
    let handle = py
        .detach(|| RustClient::attach(shm_path, &token))
        .map_err(|e| to_py(py, e))?;
    Ok(Session::new(handle))
}

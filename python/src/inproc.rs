//! `InProcessServer`: a real shared-memory region served by a real [`kvdex::worker::Worker`]
//! thread inside the Python process.
//!
//! It is the daemon's data plane without the daemon: the Python client attaches to it with
//! `kvdex.attach(server.shm_path, server.token)` and talks the same protocol over the same rings.
//! Tests use it to exercise the client against the real worker on builds whose daemon does not
//! serve shared memory yet, and `kvdex.bench` can measure round trips without HTTP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvdex::store::Session;
use kvdex::worker::{NoopObserver, Worker};
use kvdex_wire::shm::Region;
use kvdex_wire::SessionToken;
use pyo3::prelude::*;

use crate::errors::{daemon_to_py, to_py};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A session served in-process (see the module docs).
#[pyclass(module = "kvdex._native", frozen)]
pub struct InProcessServer {
    worker: Mutex<Option<Worker>>,
    shm_path: String,
    token: String,
}

/// 16 bytes from the OS's random source, for the region's token.
fn random_token() -> std::io::Result<[u8; 16]> {
    use std::io::Read;
    let mut t = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut t)?;
    Ok(t)
}

#[pymethods]
impl InProcessServer {
    /// InProcessServer(layers, q_heads, kv_heads, head_dim, dtype="f16", payload_bytes=1<<22)
    #[new]
    #[pyo3(signature = (layers, q_heads, kv_heads, head_dim, dtype = "f16", payload_bytes = 1 << 22))]
    fn new(
        py: Python<'_>,
        layers: u32,
        q_heads: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: &str,
        payload_bytes: u64,
    ) -> PyResult<Self> {
        let shape = crate::arrays::shape_from_args(py, layers, q_heads, kv_heads, head_dim, dtype)?;
        let session = Arc::new(Session::new(shape).map_err(|e| daemon_to_py(py, e))?);
        let path = format!(
            "/dev/shm/kvdex-py-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let token = random_token().map_err(|e| to_py(py, e.into()))?;
        let region = Region::create(&path, payload_bytes).map_err(|e| to_py(py, e))?;
        let worker = Worker::spawn(
            region,
            session,
            token,
            Arc::new(NoopObserver),
            Box::new(|_| {}),
        )
        .map_err(|e| daemon_to_py(py, e))?;
        Ok(Self {
            worker: Mutex::new(Some(worker)),
            shm_path: path,
            token: SessionToken::from_bytes(token).to_string(),
        })
    }

    /// Path of the region to attach.
    #[getter]
    fn shm_path(&self) -> &str {
        &self.shm_path
    }

    /// The token (32 hex characters) the client must present.
    #[getter]
    fn token(&self) -> &str {
        &self.token
    }

    /// Stops the worker and removes the region; attached clients then get DisconnectedError.
    fn stop(&self, py: Python<'_>) {
        let taken = self.worker.lock().ok().and_then(|mut g| g.take());
        if let Some(mut w) = taken {
            py.detach(move || {
                w.stop();
                drop(w);
            });
        }
    }
}

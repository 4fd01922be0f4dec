//! The seam between the session registry and the shared-memory data plane.
//!
//! The registry asks a [`DataPlane`] to serve a new session; what comes back is a guard whose
//! `Drop` stops the worker and removes the region, mini-redis style. The daemon's own data plane
//! is [`ShmDataPlane`] (a region in /dev/shm and one worker thread); the control plane's unit
//! tests use an in-process stand-in so that HTTP behaviour is tested without shared memory.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::Session;

/// What a data plane needs to serve one session.
pub struct DataPlaneSpec {
    /// Session id, for logs and the exit notice.
    pub id: String,
    /// Where to create the shared-memory file.
    pub shm_path: PathBuf,
    /// Size of the region's payload arena.
    pub payload_bytes: u64,
    /// The token a client must present to attach.
    pub token: [u8; 16],
    /// The storage requests go to.
    pub session: Arc<Session>,
    /// Where requests are recorded.
    pub metrics: Arc<Metrics>,
    /// Where to report that the worker stopped on its own (client gone, fatal error).
    pub exits: tokio::sync::mpsc::UnboundedSender<ExitNotice>,
}

/// A worker's report that it stopped serving a session by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitNotice {
    /// The session.
    pub id: String,
    /// Why, as a metric label: "client_gone", "worker_error", ...
    pub reason: &'static str,
}

/// A session being served; dropping it stops the worker and removes the region.
pub trait Serving: Send {}

impl<T: Send> Serving for T {}

/// Starts serving sessions.
pub trait DataPlane: Send + Sync {
    /// Creates the region and starts serving `spec.session` on it.
    fn start(&self, spec: DataPlaneSpec) -> Result<Box<dyn Serving>>;
}

/// The daemon's data plane: a shared-memory region per session, served by one worker thread.
pub fn shm() -> Box<dyn DataPlane> {
    Box::new(ShmDataPlane)
}

/// Creates the region with `shm::Region::create` and serves it with `worker::Worker::spawn`.
pub struct ShmDataPlane;

impl DataPlane for ShmDataPlane {
    fn start(&self, _spec: DataPlaneSpec) -> Result<Box<dyn Serving>> {
        // Wired to shm::Region and worker::Worker once the data-plane branch is merged.
        Err(crate::KvdexError::Disconnected(
            "the shared-memory data plane is not built in this branch yet".into(),
        ))
    }
}

//! The seam between the session registry and the shared-memory data plane.
//!
//! The registry asks a [`DataPlane`] to serve a new session; what comes back is a guard whose
//! `Drop` stops the worker and removes the region, mini-redis style. The daemon's own data plane
//! is [`ShmDataPlane`] (a region in /dev/shm and one worker thread); the control plane's unit
//! tests use an in-process stand-in so that HTTP behaviour is tested without shared memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::budget::{Part, Reservation};
use crate::store::{Budget, Session};
use crate::worker::socket::{SocketHub, SocketRegistration};
use crate::worker::{ExitReason, Liveness, Observer, Worker, WorkerConfig};
use kvdex_wire::shm::layout::DEFAULT_RING_SLOTS;
use kvdex_wire::shm::{Geometry, Region};

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
    /// The budget a data-socket connection's arena is charged to.
    pub budget: Arc<Budget>,
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
/// `worker`: each worker thread's tuning (`sessions.worker_cpus`, `sessions.worker_spin_us`).
/// `attach_timeout`: sessions that nobody attached (or reached over the data socket) in this
/// time are ended.
pub fn shm(worker: WorkerConfig, attach_timeout: Option<Duration>) -> Box<dyn DataPlane> {
    Box::new(ShmDataPlane {
        socket: None,
        worker,
        attach_timeout,
    })
}

/// [`shm`], and every session also reachable over the Unix data socket `hub` listens on
/// (`sessions.data_socket`).
pub fn shm_and_socket(
    hub: Arc<SocketHub>,
    worker: WorkerConfig,
    attach_timeout: Option<Duration>,
) -> Box<dyn DataPlane> {
    Box::new(ShmDataPlane {
        socket: Some(hub),
        worker,
        attach_timeout,
    })
}

/// Creates the region with [`Region::create`] and serves it with [`Worker::spawn`]; the
/// returned guard holds the [`Worker`], whose drop stops the thread, and with it the region,
/// whose drop removes the /dev/shm file. With a data socket, the guard also holds the session's
/// [`SocketRegistration`], whose drop closes its socket connections.
pub struct ShmDataPlane {
    socket: Option<Arc<SocketHub>>,
    worker: WorkerConfig,
    /// Ends sessions nobody attached in this time (`sessions.attach_timeout_ms`).
    attach_timeout: Option<Duration>,
}

/// What [`ShmDataPlane`] hands the registry; fields drop in order (socket first, so that a
/// socket connection never outlives the shared-memory worker by much).
struct ShmServing {
    _socket: Option<SocketRegistration>,
    _worker: Worker,
    /// Released once the worker (and with it the region) is gone.
    _region_held: Reservation,
}

impl DataPlane for ShmDataPlane {
    fn start(&self, spec: DataPlaneSpec) -> Result<Box<dyn Serving>> {
        // The region file is memory held for the client: within the budget while it exists.
        let geometry = Geometry::new(DEFAULT_RING_SLOTS, spec.payload_bytes);
        let region_bytes = geometry.map_or(spec.payload_bytes, |g| g.total_bytes);
        let region_held = spec.budget.reserve_owned(Part::Regions, region_bytes)?;
        let region = Region::create(&spec.shm_path, spec.payload_bytes)?;
        let live = Liveness {
            attach_timeout: self.attach_timeout,
            ..Default::default()
        };
        let socket = self.socket.as_ref().map(|hub| {
            hub.register(
                &spec.id,
                spec.token,
                spec.session.clone(),
                spec.payload_bytes as usize,
                spec.metrics.clone(),
                live.presence.clone(),
                spec.budget.clone(),
            )
        });
        let (id, exits) = (spec.id, spec.exits);
        let on_exit = Box::new(move |reason: ExitReason| {
            let label = match reason {
                // Stopped by the registry itself (delete, shutdown): nothing to reap.
                ExitReason::Stopped => return,
                ExitReason::ClientGone => "client_gone",
                ExitReason::NeverAttached => "attach_timeout",
                ExitReason::Protocol(msg) => {
                    tracing::warn!(%id, "client broke the protocol: {msg}");
                    "protocol_error"
                }
                ExitReason::Internal(msg) => {
                    tracing::error!(%id, "worker failed: {msg}");
                    "worker_error"
                }
            };
            // The receiver is gone only during shutdown, which ends every session anyway.
            let _ = exits.send(ExitNotice { id, reason: label });
        });
        let observer: Arc<dyn Observer> = spec.metrics;
        let worker = Worker::spawn_watched(
            region,
            spec.session,
            spec.token,
            observer,
            on_exit,
            self.worker,
            live,
        )?;
        Ok(Box::new(ShmServing {
            _socket: socket,
            _worker: worker,
            _region_held: region_held,
        }))
    }
}

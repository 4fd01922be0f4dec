//! The plain-memory backend, and the CPU gather engine the CUDA backend also uses for host
//! destinations.

use std::sync::{Arc, Mutex};

use crate::arena::AllocTracker;
use crate::copy::{copy_runs_prefetch, copy_runs_streaming, STREAM_MIN_BATCH_BYTES};
use crate::dest::{DestStats, Registry};
use crate::inflight::Use;
use crate::tickets::Tickets;
use crate::{
    check_runs, AllocStats, Arena, DestId, DeviceLink, IpcEventHandle, IpcMemHandle, Run, Ticket,
    TransferError,
};
use job::Job;

/// Batches under this many bytes are always copied on the caller's thread before `gather`
/// returns: handing them to a pool costs more than the copy. (The floor of
/// [`HostConfig::parallel_min_bytes`].)
pub const INLINE_BYTES: u64 = 256 << 10;

/// Machines with at most this many CPUs share only batches of [`SMALL_MACHINE_PARALLEL_BYTES`]
/// and more with the pool. On a 2-vCPU VM (docs/design/0012-host-gather.md), when the box is
/// quiet, two threads take runs of 64 KiB and more from 80-90% to 93-119% of the
/// all-threads contiguous limit; when it is loaded, a helper preempted mid-chunk can hold a batch
/// back by a time slice. Two cores spent on a large gather is what an idle sidecar should do.
pub const SMALL_MACHINE_MAX_CPUS: usize = 2;

/// The sharing threshold on machines with at most [`SMALL_MACHINE_MAX_CPUS`] CPUs.
pub const SMALL_MACHINE_PARALLEL_BYTES: u64 = 1 << 20;

/// A host address that may cross threads; the registration contract makes writes through it
/// sound (see [`DeviceLink::register_host`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostPtr(pub(crate) *mut u8);

impl HostPtr {
    /// A method (not field access) so closures capture the whole Send + Sync wrapper.
    pub(crate) fn get(self) -> *mut u8 {
        self.0
    }
}
// SAFETY: the registrant promised the memory outlives the registration and is not touched by
// others while a gather writes it; in-flight counts enforce the rest.
unsafe impl Send for HostPtr {}
// SAFETY: as above.
unsafe impl Sync for HostPtr {}

/// Runs gathers into host memory: inline for small batches; larger ones are shared between
/// the caller and the pool (see [`job`]), and complete when the last chunk is copied.
pub(crate) struct HostEngine {
    pool: Option<Arc<rayon::ThreadPool>>,
    /// Batches of at least this many bytes are shared with the pool.
    parallel_min_bytes: u64,
    tickets: Arc<Tickets>,
    /// Run buffers of finished asynchronous gathers, reused so that steady-state submits do
    /// not allocate.
    spare: Arc<Mutex<Vec<Vec<Run>>>>,
}

impl HostEngine {
    pub(crate) fn new(threads: usize, parallel_min_bytes: u64, tickets: Arc<Tickets>) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("kvdex-gather-{i}"))
            .build();
        let pool = match pool {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::warn!("no gather thread pool ({e}); host gathers run on the caller");
                None
            }
        };
        Self {
            pool,
            parallel_min_bytes: parallel_min_bytes.max(INLINE_BYTES),
            tickets,
            spare: Default::default(),
        }
    }

    /// Checks `runs` against `src` and the destination, then copies them, inline or on the
    /// pool. `dest_use` is held until the copy ends.
    pub(crate) fn gather(
        &self,
        src: &Arena,
        runs: &[Run],
        dst: HostPtr,
        dst_len: u64,
        dest_use: Use,
    ) -> Result<Ticket, TransferError> {
        let summary = check_runs(runs, src.len() as u64, dst_len)?;
        let pool = match &self.pool {
            Some(p) if summary.total_bytes >= self.parallel_min_bytes => p.clone(),
            _ => {
                let stream =
                    summary.disjoint_ascending && summary.total_bytes >= STREAM_MIN_BATCH_BYTES;
                // SAFETY: check_runs bounded every run by both buffers; an arena never aliases
                // a registered destination (its memory is owned by the arena); the
                // registration contract keeps others off the destination bytes.
                unsafe {
                    if stream {
                        copy_runs_streaming(src.as_ptr(), dst.0, runs)
                    } else {
                        copy_runs_prefetch(src.as_ptr(), dst.0, runs)
                    }
                };
                drop(dest_use);
                return self.tickets.submit(true);
            }
        };
        if !summary.disjoint_ascending {
            // Overlapping or out-of-order destinations: one thread, in order, so that later
            // runs overwrite earlier ones as submitted.
            // SAFETY: as for the inline copy above.
            unsafe { copy_runs_prefetch(src.as_ptr(), dst.0, runs) };
            drop(dest_use);
            return self.tickets.submit(true);
        }
        let ticket = self.tickets.submit(false)?;
        let job = Job::new(
            runs,
            summary.total_bytes,
            HostPtr(src.as_mut_ptr()),
            dst,
            ticket,
            self.tickets.clone(),
            (src.begin_use(), dest_use),
            self.spare.clone(),
        );
        // The caller is one worker; wake up to one pool thread per remaining core.
        let helpers = (pool.current_num_threads().saturating_sub(1))
            .min(job_chunks_hint(summary.total_bytes).saturating_sub(1));
        for _ in 0..helpers {
            let job = job.clone();
            pool.spawn(move || {
                job.work();
            });
        }
        job.work();
        Ok(ticket)
    }
}

/// Pool threads worth waking for a batch of `bytes`: one per chunk at most.
fn job_chunks_hint(bytes: u64) -> usize {
    bytes.div_ceil(job::CHUNK_BYTES) as usize
}

/// Settings of a [`HostLink`].
#[derive(Clone, Copy, Debug)]
pub struct HostConfig {
    /// Gather threads (default: every CPU).
    pub threads: usize,
    /// Budget for live arenas, in bytes (default: unbounded).
    pub capacity_bytes: u64,
    /// Back arenas of 2 MiB and more with hugepages when the kernel allows (default: true).
    pub hugepages: bool,
    /// Batches of at least this many bytes are shared between the caller and the gather
    /// threads; smaller ones the caller copies alone (never less than [`INLINE_BYTES`]).
    /// Default: [`SMALL_MACHINE_PARALLEL_BYTES`] on machines with at most
    /// [`SMALL_MACHINE_MAX_CPUS`] CPUs; [`INLINE_BYTES`] otherwise.
    pub parallel_min_bytes: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            threads: cpus,
            capacity_bytes: u64::MAX,
            hugepages: true,
            parallel_min_bytes: if cpus <= SMALL_MACHINE_MAX_CPUS {
                SMALL_MACHINE_PARALLEL_BYTES
            } else {
                INLINE_BYTES
            },
        }
    }
}

/// Host-only [`DeviceLink`]: arenas in ordinary or hugepage memory, gathers by CPU copies into
/// registered host memory.
pub struct HostLink {
    tracker: Arc<AllocTracker>,
    hugepages: bool,
    dests: Registry<(HostPtr, u64)>,
    tickets: Arc<Tickets>,
    engine: HostEngine,
}

impl Default for HostLink {
    fn default() -> Self {
        Self::with_config(HostConfig::default())
    }
}

impl HostLink {
    /// A new host backend with its own allocation counters and the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// A host backend with explicit settings.
    pub fn with_config(cfg: HostConfig) -> Self {
        let tickets = Arc::new(Tickets::new());
        Self {
            tracker: Arc::new(AllocTracker::with_capacity(cfg.capacity_bytes)),
            hugepages: cfg.hugepages,
            dests: Registry::new(),
            engine: HostEngine::new(cfg.threads, cfg.parallel_min_bytes, tickets.clone()),
            tickets,
        }
    }

    /// Gathers submitted and not yet collected.
    pub fn outstanding(&self) -> usize {
        self.tickets.outstanding()
    }
}

impl std::fmt::Debug for HostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLink")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl DeviceLink for HostLink {
    fn name(&self) -> &'static str {
        "host"
    }

    fn alloc_arena(&self, bytes: usize) -> Result<Arena, TransferError> {
        if self.hugepages {
            Arena::hugepage(bytes, self.tracker.clone())
        } else {
            Arena::host(bytes, self.tracker.clone())
        }
    }

    fn stats(&self) -> AllocStats {
        self.tracker.snapshot()
    }

    fn dest_stats(&self) -> DestStats {
        self.dests.stats()
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<DestId, TransferError> {
        if ptr.is_null() {
            return Err(TransferError::InvalidArgument(
                "destination pointer is null".into(),
            ));
        }
        Ok(self.dests.insert((HostPtr(ptr), len as u64), len as u64))
    }

    fn register_ipc(
        &self,
        _mem: &IpcMemHandle,
        _offset: usize,
        _len: usize,
        _event: Option<&IpcEventHandle>,
    ) -> Result<DestId, TransferError> {
        Err(TransferError::Unsupported {
            backend: "host",
            what: "CUDA IPC destinations",
        })
    }

    fn unregister(&self, dest: DestId) -> Result<(), TransferError> {
        self.dests.remove(dest).map(|_| ())
    }

    fn gather(&self, src: &Arena, runs: &[Run], dst: DestId) -> Result<Ticket, TransferError> {
        let ((ptr, len), _, dest_use) = self.dests.begin_gather(dst)?;
        self.engine.gather(src, runs, ptr, len, dest_use)
    }

    fn poll(&self, ticket: Ticket) -> Result<bool, TransferError> {
        self.tickets.poll(ticket)
    }

    fn wait(&self, ticket: Ticket) -> Result<(), TransferError> {
        self.tickets.wait(ticket)
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        // Waits out gathers still writing registered memory before the registrant may free it.
        self.dests.drain();
    }
}

mod job;
#[cfg(test)]
mod tests;

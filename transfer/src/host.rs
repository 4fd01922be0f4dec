//! The plain-memory backend, and the CPU gather engine the CUDA backend also uses for host
//! destinations.

use std::sync::{Arc, Mutex, PoisonError};

use crate::arena::AllocTracker;
use crate::copy::{copy_runs_parallel, copy_runs_prefetch};
use crate::dest::{DestStats, Registry};
use crate::inflight::Use;
use crate::tickets::Tickets;
use crate::{
    check_runs, AllocStats, Arena, DestId, DeviceLink, IpcEventHandle, IpcMemHandle, Run, Ticket,
    TransferError,
};

/// Batches under this many bytes are copied on the caller's thread before `gather` returns:
/// handing them to a pool costs more than the copy.
pub const INLINE_BYTES: u64 = 256 << 10;

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

/// Runs gathers into host memory: inline for small batches, on a thread pool otherwise.
pub(crate) struct HostEngine {
    pool: Option<Arc<rayon::ThreadPool>>,
    tickets: Arc<Tickets>,
    /// Run buffers of finished asynchronous gathers, reused so that steady-state submits do
    /// not allocate.
    spare: Arc<Mutex<Vec<Vec<Run>>>>,
}

impl HostEngine {
    pub(crate) fn new(threads: usize, tickets: Arc<Tickets>) -> Self {
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
            Some(p) if summary.total_bytes >= INLINE_BYTES => p.clone(),
            _ => {
                // SAFETY: check_runs bounded every run by both buffers; an arena never aliases
                // a registered destination (its memory is owned by the arena); the
                // registration contract keeps others off the destination bytes.
                unsafe { copy_runs_prefetch(src.as_ptr(), dst.0, runs) };
                drop(dest_use);
                return self.tickets.submit(true);
            }
        };
        let ticket = self.tickets.submit(false)?;
        let mut owned = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        owned.clear();
        owned.extend_from_slice(runs);
        let src_use = src.begin_use();
        let src_ptr = HostPtr(src.as_mut_ptr());
        let (tickets, spare, task_pool) = (self.tickets.clone(), self.spare.clone(), pool.clone());
        pool.spawn(move || {
            if summary.disjoint_ascending {
                // SAFETY: as for the inline copy; destinations are disjoint (checked), so the
                // pool's threads write different bytes; `src_use` keeps the arena alive.
                unsafe {
                    copy_runs_parallel(
                        &task_pool,
                        src_ptr.get(),
                        dst.get(),
                        &owned,
                        summary.total_bytes,
                    )
                };
            } else {
                // SAFETY: as for the inline copy, on one thread: later runs overwrite earlier
                // ones, as in submission order.
                unsafe { copy_runs_prefetch(src_ptr.get(), dst.get(), &owned) };
            }
            drop(src_use);
            drop(dest_use);
            tickets.complete(ticket);
            spare
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(owned);
        });
        Ok(ticket)
    }
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
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            capacity_bytes: u64::MAX,
            hugepages: true,
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
            engine: HostEngine::new(cfg.threads, tickets.clone()),
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

#[cfg(test)]
mod tests;

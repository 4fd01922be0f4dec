//! kvdex-transfer: the memory kvdex keeps KV in, and the copies out of it.
//!
//! # Layout
//! - [`arena`]: [`Arena`], an owned, 64-byte-aligned block of host memory (pinned when CUDA is
//!   present, hugepages when the kernel gives them) whose `Drop` frees it, and the allocation
//!   tracker that proves nothing leaks. `mmap` holds the hugepage mapping.
//! - [`DeviceLink`]: the one trait the daemon sees: allocate arenas, register destinations
//!   (engine memory), submit asynchronous gathers of (offset, length) [`Run`]s, poll or wait.
//! - [`runs`]: the alignment and bounds rules every gather is checked against.
//! - [`copy`]: the CPU copy loops (prefetching serial, parallel) and the contiguous limits.
//! - [`host`]: the plain-memory backend, used when no GPU is present.
//! - [`cuda`]: the CUDA backend (cudarc, loaded at run time), and [`default_link`], which picks
//!   it when a driver loads and falls back to [`host`] with a log line otherwise.
//! - `dest`, `tickets`, `inflight`: the bookkeeping shared by both backends: destination
//!   handles, gather completions, and waiting out in-flight copies before memory is released.
//!
//! The crate knows nothing of indices or sessions: it moves bytes.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod arena;
pub mod copy;
pub mod cuda;
mod dest;
pub mod error;
pub mod host;
mod inflight;
mod mmap;
mod registration;
pub mod runs;
mod tickets;

use std::sync::Arc;

pub use arena::{AllocStats, Arena, Backing};
pub use dest::DestStats;
pub use error::TransferError;
pub use host::HostLink;
pub use registration::Registration;
pub use runs::{check_runs, Run, RUN_ALIGN};
pub use tickets::MAX_IN_FLIGHT;

/// Handle of a registered destination. Handles are never reused: an unregistered one is
/// refused as stale, never mistaken for a newer registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DestId(pub u64);

/// Handle of a submitted gather, for [`DeviceLink::poll`] and [`DeviceLink::wait`]. Collected
/// once: after `poll` returned true or `wait` returned, the ticket is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// A CUDA IPC memory handle (`cuIpcGetMemHandle` in the engine's process), as sent by the
/// engine when its session attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcMemHandle(pub [u8; 64]);

/// A CUDA IPC event handle (`cuIpcGetEventHandle` of an event made with
/// `CU_EVENT_INTERPROCESS`): recorded after each gather into its destination, so the engine
/// can make its stream wait for the data without a round trip through the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcEventHandle(pub [u8; 64]);

/// The backend seam between the daemon and the memory it copies into.
///
/// Memory rules: arenas free themselves on drop, after any gather still reading them has
/// finished; `unregister` likewise waits out gathers still writing the destination. Gathers
/// into one destination run one after another, in submission order.
pub trait DeviceLink: Send + Sync {
    /// "host" or "cuda".
    fn name(&self) -> &'static str;

    /// Allocates a zeroed arena of `bytes` bytes, 64-byte aligned, counted against the link's
    /// budget ([`TransferError::Exhausted`] when it is spent).
    fn alloc_arena(&self, bytes: usize) -> Result<Arena, TransferError>;

    /// Allocation counters: live arenas and their bytes.
    fn stats(&self) -> AllocStats;

    /// Registration counters: live destinations and the bytes they span.
    fn dest_stats(&self) -> DestStats;

    /// Registers `len` bytes of host memory at `ptr` (a shared-memory payload arena, a CPU
    /// engine's buffer) as a gather destination.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must stay valid for writes until `unregister(id)` returns (or the
    /// link is dropped), must not overlap an arena (gathers copy arena -> destination without
    /// an overlap check), and nothing else may read or write the bytes a gather writes while
    /// that gather is in flight (until `poll` says done or `wait` returns).
    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<DestId, TransferError>;

    /// Opens an engine's GPU buffer from its CUDA IPC handle (and, when the engine asks for
    /// one, its IPC event) as a gather destination: the `len` bytes at `offset` into the
    /// allocation the handle names. The offset is there because an engine's caching allocator
    /// (PyTorch's) hands out tensors inside larger allocations, and a handle always names the
    /// whole allocation. A range past the allocation's end is refused with
    /// [`TransferError::OutOfRange`]; the host link refuses with [`TransferError::Unsupported`].
    fn register_ipc(
        &self,
        mem: &IpcMemHandle,
        offset: usize,
        len: usize,
        event: Option<&IpcEventHandle>,
    ) -> Result<DestId, TransferError>;

    /// Waits for gathers into `dest` to finish, then releases it (closing an IPC mapping).
    /// An unknown handle, or one already unregistered, is an error.
    fn unregister(&self, dest: DestId) -> Result<(), TransferError>;

    /// Submits a copy of every run from `src` into `dst`. Runs are checked first (see
    /// [`RUN_ALIGN`]); nothing is copied if any run is bad. Returns at once for large batches;
    /// completion is observed with [`DeviceLink::poll`] or [`DeviceLink::wait`].
    fn gather(&self, src: &Arena, runs: &[Run], dst: DestId) -> Result<Ticket, TransferError>;

    /// True once the gather has completed (the ticket is then collected); false while in
    /// flight.
    fn poll(&self, ticket: Ticket) -> Result<bool, TransferError>;

    /// Blocks until the gather completes, and collects the ticket.
    fn wait(&self, ticket: Ticket) -> Result<(), TransferError>;
}

/// The backend for this machine: CUDA when the driver library loads and a device answers,
/// otherwise the host backend, with a log line saying why.
pub fn default_link() -> Arc<dyn DeviceLink> {
    match cuda::CudaLink::new(0) {
        Ok(link) => {
            tracing::info!(device = %link.device_name(), "transfer backend: cuda");
            Arc::new(link)
        }
        Err(e) => {
            tracing::info!("transfer backend: host (CUDA unavailable: {e})");
            Arc::new(HostLink::new())
        }
    }
}

//! kvdex-transfer: the memory kvdex keeps KV in, and the copies out of it.
//!
//! # Layout
//! - [`arena`]: [`Arena`], an owned, 64-byte-aligned block of host memory (pinned when CUDA is
//!   present) whose `Drop` frees it, and the allocation tracker that proves nothing leaks.
//! - [`DeviceLink`]: the one trait the daemon sees: allocate arenas, register destinations
//!   (engine memory), submit asynchronous gathers of (offset, length) runs, poll or wait.
//! - [`host`]: the plain-memory backend, used when no GPU is present.
//!
//! The crate knows nothing of indices or sessions: it moves bytes.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod arena;
pub mod error;
pub mod host;

pub use arena::{AllocStats, Arena};
pub use error::TransferError;

/// One contiguous copy: `len` bytes from `src_offset` in an arena to `dst_offset` in a
/// destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Byte offset in the source arena.
    pub src_offset: u64,
    /// Byte offset in the destination.
    pub dst_offset: u64,
    /// Bytes to copy.
    pub len: u64,
}

/// Handle of a registered destination. Stale handles (unregistered) are refused, not trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DestId(pub u64);

/// Handle of a submitted gather, for [`DeviceLink::poll`] and [`DeviceLink::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// The backend seam between the daemon and the memory it copies into.
pub trait DeviceLink: Send + Sync {
    /// "host" or "cuda".
    fn name(&self) -> &'static str;
    /// Allocates a zeroed arena of `bytes` bytes, 64-byte aligned.
    fn alloc_arena(&self, bytes: usize) -> Result<Arena, TransferError>;
    /// Allocation counters: live arenas and registered destinations, and their bytes.
    fn stats(&self) -> AllocStats;
}

//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in kvdex-transfer. Each variant names the offending value, so a
/// client's bad request can be answered with the message as is.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The allocator refused.
    #[error("cannot allocate {bytes} bytes: {reason}")]
    Alloc {
        /// Bytes asked for.
        bytes: usize,
        /// Why it failed.
        reason: String,
    },
    /// The link's byte budget for arenas is spent: freeing an arena makes room again.
    #[error("arena budget exhausted: asked for {requested} bytes, {live} of {capacity} in use")]
    Exhausted {
        /// Bytes asked for.
        requested: u64,
        /// Bytes held by live arenas.
        live: u64,
        /// The link's budget.
        capacity: u64,
    },
    /// A run fell outside its source arena or its destination.
    #[error("run out of range: {0}")]
    OutOfRange(String),
    /// A run whose offset or length is not a multiple of [`crate::RUN_ALIGN`], or is empty.
    #[error("misaligned run: {0}")]
    Misaligned(String),
    /// A destination handle this link never issued.
    #[error("unknown destination {0}")]
    UnknownDestination(u64),
    /// A destination handle that was unregistered (twice-unregistering lands here too).
    #[error("stale destination {0}: it was already unregistered")]
    StaleDestination(u64),
    /// A ticket this link never issued, or one whose completion was already collected.
    #[error("unknown or already collected ticket {0}")]
    UnknownTicket(u64),
    /// Too many gathers submitted and not yet collected with `poll`/`wait`.
    #[error("too many gathers in flight ({0}); collect tickets with poll or wait")]
    TooManyInFlight(usize),
    /// The operation needs a backend this link is not (e.g. CUDA IPC on the host link).
    #[error("unsupported on the {backend} backend: {what}")]
    Unsupported {
        /// The link's name.
        backend: &'static str,
        /// What was asked.
        what: &'static str,
    },
    /// The CUDA driver reported an error.
    #[error("CUDA {call} failed: {reason}")]
    Cuda {
        /// The driver call.
        call: &'static str,
        /// The driver's error name.
        reason: String,
    },
    /// An argument outside its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

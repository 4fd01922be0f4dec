//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in kvdex-transfer.
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
    /// A run fell outside its source or destination.
    #[error("run out of range: {0}")]
    OutOfRange(String),
    /// An argument outside its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

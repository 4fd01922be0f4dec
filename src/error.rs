//! The root crate's one error type; it wraps the index and transfer crates' errors.

use thiserror::Error;

/// Everything that can go wrong in the daemon, the client and the harness.
#[derive(Debug, Error)]
pub enum KvdexError {
    /// A configuration key had a bad value, or the file could not be read.
    #[error("config: {0}")]
    Config(String),
    /// A request was malformed: bad shape, dtype, offset, length, opcode, ...
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An unknown session, layer or other named thing.
    #[error("not found: {0}")]
    NotFound(String),
    /// A missing or wrong token.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The global memory budget would be exceeded.
    #[error("memory budget exceeded: asked for {asked} bytes, {left} bytes left of {budget}")]
    Budget {
        /// Bytes the request needed.
        asked: u64,
        /// Bytes still free in the budget.
        left: u64,
        /// The whole budget.
        budget: u64,
    },
    /// A limit other than memory was reached (e.g. the number of sessions).
    #[error("limit reached: {0}")]
    Exhausted(String),
    /// The shared-memory protocol was violated (bad magic, version, ring index, ...).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The daemon is gone or the connection closed.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// A data file was missing or malformed.
    #[error("data: {0}")]
    Data(String),
    /// From kvdex-index.
    #[error(transparent)]
    Index(#[from] kvdex_index::IndexError),
    /// From kvdex-transfer.
    #[error(transparent)]
    Transfer(#[from] kvdex_transfer::TransferError),
    /// Operating-system I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Shorthand used across the crate.
pub type Result<T, E = KvdexError> = std::result::Result<T, E>;

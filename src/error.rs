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
    /// A bug inside the daemon (a panic in a request or a background job), caught and reported
    /// to the one session it affected; the daemon keeps serving the others.
    #[error("internal error: {0}")]
    Internal(String),
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

impl KvdexError {
    /// The [`KvdexError::Internal`] that reports a caught panic of `what` (its message when the
    /// payload is a string).
    pub fn from_panic(what: &str, payload: &(dyn std::any::Any + Send)) -> Self {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Self::Internal(format!("{what} panicked: {msg}"))
    }
}

/// Runs `f`, turning a panic inside it into [`KvdexError::Internal`] naming `what`: a bug in
/// one request or background job fails that job, never the daemon. Whatever `f` held is
/// dropped by the unwind; locks it held are poisoned, so later requests on the same data fail
/// with an error rather than read a half-made update.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(KvdexError::from_panic(what, &*p)))
}

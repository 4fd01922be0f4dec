//! The wire's error type: every kind of failure a request can end in, as both sides see it.
//! Each kind has one status code ([`crate::proto::Status::of`]); the daemon maps its own,
//! richer errors onto these kinds, and the client returns them as they arrive.

use thiserror::Error;

/// A failed request, a malformed frame, or a lost connection.
#[derive(Debug, Error)]
pub enum Error {
    /// A request was malformed: bad shape, dtype, offset, length, opcode, ...
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An unknown session, layer or other named thing.
    #[error("not found: {0}")]
    NotFound(String),
    /// A missing or wrong token.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The daemon's memory budget would be exceeded.
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
    /// A bug inside the daemon, caught and reported to the one session it affected.
    #[error("internal error: {0}")]
    Internal(String),
    /// The daemon is gone or the connection closed.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// Operating-system I/O (mapping a region, a socket).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An index crate's refusal in a codec (a budget's bounds, an index kind's code) is a bad
/// request, in the index crate's own words.
impl From<kvdex_index::IndexError> for Error {
    fn from(e: kvdex_index::IndexError) -> Self {
        Error::BadRequest(e.to_string())
    }
}

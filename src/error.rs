//! The daemon's one error type: the wire's kinds of failure, plus the index and transfer
//! crates' errors and the daemon's own (configuration, data files).

use kvdex_wire::proto::Status;
use thiserror::Error;

/// Everything that can go wrong in the daemon and the harness.
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

impl From<kvdex_wire::Error> for KvdexError {
    #[warn(clippy::wildcard_enum_match_arm)]
    fn from(e: kvdex_wire::Error) -> Self {
        use kvdex_wire::Error as W;
        match e {
            W::BadRequest(m) => Self::BadRequest(m),
            W::NotFound(m) => Self::NotFound(m),
            W::Unauthorized(m) => Self::Unauthorized(m),
            W::Budget {
                asked,
                left,
                budget,
            } => Self::Budget {
                asked,
                left,
                budget,
            },
            W::Exhausted(m) => Self::Exhausted(m),
            W::Protocol(m) => Self::Protocol(m),
            W::Internal(m) => Self::Internal(m),
            W::Disconnected(m) => Self::Disconnected(m),
            W::Io(e) => Self::Io(e),
        }
    }
}

impl KvdexError {
    /// The status that reports this error to a client. The wire's kinds get what
    /// [`Status::of`] gives them (a test checks every one); the daemon's own kinds: a refused
    /// index parameter or data file is a bad request, a configuration or device fault is
    /// internal.
    #[warn(clippy::wildcard_enum_match_arm)]
    pub fn status(&self) -> Status {
        match self {
            Self::BadRequest(_) | Self::Index(_) | Self::Data(_) => Status::BadRequest,
            Self::NotFound(_) => Status::NotFound,
            Self::Unauthorized(_) => Status::Unauthorized,
            Self::Budget { .. } => Status::Budget,
            Self::Exhausted(_) => Status::Exhausted,
            Self::Protocol(_) => Status::Protocol,
            Self::Disconnected(_) => Status::Disconnected,
            Self::Internal(_) | Self::Config(_) | Self::Transfer(_) | Self::Io(_) => {
                Status::Internal
            }
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use kvdex_wire::Error as W;

    /// A wire error reports the same status whether the daemon converted it or not.
    #[test]
    fn wire_kinds_keep_their_status_through_the_daemon_error() {
        let all = || {
            [
                W::BadRequest("x".into()),
                W::NotFound("x".into()),
                W::Unauthorized("x".into()),
                W::Budget {
                    asked: 1,
                    left: 2,
                    budget: 3,
                },
                W::Exhausted("x".into()),
                W::Protocol("x".into()),
                W::Internal("x".into()),
                W::Disconnected("x".into()),
                W::Io(std::io::Error::other("x")),
            ]
        };
        for (wire, same) in all().into_iter().zip(all()) {
            let text = wire.to_string();
            let status = Status::of(&wire);
            let daemon = KvdexError::from(same);
            assert_eq!(daemon.status(), status, "{text}");
            assert_eq!(daemon.to_string(), text);
        }
        let index = KvdexError::Index(kvdex_index::IndexError::InvalidArgument("k 0".into()));
        assert_eq!(index.status(), Status::BadRequest);
    }
}

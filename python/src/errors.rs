//! Rust errors -> the typed exceptions defined in `kvdex/errors.py`.
//!
//! The classes live in Python so that they can inherit from both `kvdex.KvdexError` and the
//! matching builtin (`ValueError`, `KeyError`, `PermissionError`, `ConnectionError`), which a
//! PyO3 `create_exception!` cannot express.

use kvdex_wire::proto::Status;
use kvdex_wire::Error as KvdexError;
use pyo3::prelude::*;

/// Builds the `kvdex.errors.<class_name>` exception carrying `msg`.
pub fn py_error(py: Python<'_>, class_name: &str, msg: String) -> PyErr {
    let built = py
        .import("kvdex.errors")
        .and_then(|m| m.getattr(class_name))
        .and_then(|cls| cls.call1((msg.clone(),)));
    match built {
        Ok(exc) => PyErr::from_value(exc),
        // The Python half is missing (the extension imported on its own): still say what failed.
        Err(_) => pyo3::exceptions::PyRuntimeError::new_err(msg),
    }
}

/// The exception class for an error: from the one table of errors to statuses
/// ([`Status::of`]), so Python raises what the daemon's status says.
#[warn(clippy::wildcard_enum_match_arm)]
fn class_of(e: &KvdexError) -> &'static str {
    // In the client an I/O failure is the connection's (a dead daemon, a closed socket).
    if let KvdexError::Io(_) = e {
        return "DisconnectedError";
    }
    class_of_status(Status::of(e))
}

/// The exception class of a failure status.
#[warn(clippy::wildcard_enum_match_arm)]
fn class_of_status(status: Status) -> &'static str {
    match status {
        Status::BadRequest => "BadRequestError",
        Status::NotFound => "NotFoundError",
        Status::Unauthorized => "UnauthorizedError",
        Status::Budget | Status::Exhausted => "BudgetError",
        Status::Disconnected => "DisconnectedError",
        Status::Protocol => "ProtocolError",
        Status::Internal => "InternalError",
        Status::Ok => "KvdexError",
    }
}

/// Converts a crate error into the matching Python exception, keeping its message.
pub fn to_py(py: Python<'_>, e: KvdexError) -> PyErr {
    py_error(py, class_of(&e), e.to_string())
}

/// Converts an error of the in-process daemon parts (`LocalSession`, `InProcessServer`) into
/// the exception its status says.
#[cfg(feature = "inproc")]
pub fn daemon_to_py(py: Python<'_>, e: kvdex::KvdexError) -> PyErr {
    let class = match e {
        kvdex::KvdexError::Io(_) => "DisconnectedError",
        _ => class_of_status(e.status()),
    };
    py_error(py, class, e.to_string())
}

/// Shorthand for a `BadRequestError` raised by the binding's own argument checks.
pub fn bad_request(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    py_error(py, "BadRequestError", msg.into())
}

//! kvdex-py: the native half of the `kvdex` Python package (imported as `kvdex._native`).
//!
//! # Layout
//! - [`errors`]: maps [`kvdex_client::Error`] onto the exception classes of `kvdex.errors`, so a
//!   Python caller sees the daemon's message in a typed exception.
//! - [`arrays`]: numpy <-> byte conversions for K/V rows in the session dtype.
//! - [`client`]: `Client` and `attach`, over [`kvdex_client`].
//! - [`session`]: `Session`, an attached session (append, search, gather, seal, retrieve).
//! - [`decode`]: `seal` and `retrieve`/`attend` (the decode path) on an attached session.
//! - `inproc` (feature `inproc`, for tests): `InProcessServer`, a real region + worker thread
//!   in-process (no daemon).
//! - `local` (feature `inproc`): `LocalSession`, an in-process `kvdex::store::Session` (the daemon's storage
//!   seam) for tests and for measuring the binding's own overhead without a daemon.
//! - [`merge`]: the exact log-sum-exp merge of two partial attentions.
//!
//! The default build links the client alone (`kvdex-client`: no async runtime, no index
//! builder, no TLS); the `inproc` feature adds the daemon's library for the two in-process
//! classes the test suite uses.
//!
//! The Python-facing API (type hints, docstrings, the guide) lives in `kvdex/*.py`; this crate
//! stays thin so that the shared-memory protocol has one implementation, the Rust client's.

use pyo3::prelude::*;

mod arrays;
mod client;
mod decode;
mod errors;
#[cfg(feature = "inproc")]
mod inproc;
#[cfg(feature = "inproc")]
mod local;
mod merge;
mod session;

/// The `kvdex._native` module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    #[cfg(feature = "inproc")]
    m.add_class::<local::LocalSession>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<session::Session>()?;
    m.add_class::<session::pending::PendingRetrieve>()?;
    #[cfg(feature = "inproc")]
    m.add_class::<inproc::InProcessServer>()?;
    m.add_function(wrap_pyfunction!(client::attach, m)?)?;
    m.add_function(wrap_pyfunction!(merge::merge_partials, m)?)?;
    Ok(())
}

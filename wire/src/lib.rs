#![warn(missing_docs)]
//! kvdex-wire: what the daemon and its clients share, byte for byte.
//!
//! # Layout
//! - [`shm`]: the per-client shared-memory region: header, submission and completion rings,
//!   payload arena, and the spin-then-park wait.
//! - [`proto`]: the request/response codec the rings (and the data socket) carry, and the
//!   status codes.
//! - [`decode`]: the bodies of the decode path (`seal`, `retrieve`, engine destinations).
//! - [`hello`]: the first frame of a data-socket connection.
//! - [`Shape`], [`RetrieveParams`], [`SessionToken`]: the facts both sides name.
//! - [`Error`]: every way a request can fail, one status code each.

pub mod decode;
pub mod error;
pub mod hello;
pub mod kv_format;
pub mod params;
pub mod proto;
pub mod shape;
pub mod shm;
pub mod slim;
pub mod token;

pub use error::{Error, Result};
pub use kv_format::KvFormat;
pub use params::{Budget, RetrieveParams, NO_LIMIT};
pub use shape::{dtype_serde, Shape};
pub use slim::{SlimSpec, MAX_SLIM_MODEL_DIM};
pub use token::SessionToken;

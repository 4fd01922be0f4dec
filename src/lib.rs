#![warn(missing_docs)]
//! kvdex: a sidecar daemon that keeps an LLM's KV cache in host memory and serves
//! attention-aware retrieval from it.
//!
//! # Layout
//! - [`config`]: the configuration (embedded default, file, `KVDEX_*` environment, flags).
//! - [`store`]: sessions and their KV storage, per (layer, KV head), under a global budget.
//! - [`proto`]: the request/response codec carried by the shared-memory rings.
//! - [`shm`]: the per-client shared-memory region: header, submission and completion rings,
//!   payload arena, and the spin-then-park wait.
//! - [`worker`]: the daemon side of a region: validates and serves each request.
//! - [`decode`]: the wire format of the decode path (`seal`, `retrieve`).
//! - [`daemon`]: `kvdex serve`: the session registry, dead-client reaping, clean shutdown.
//! - [`http`]: the axum control plane (sessions, health, stats, `/metrics`).
//! - [`metrics`]: the Prometheus registry.
//! - [`client`]: the blocking Rust client.
//! - [`bench`](mod@bench), [`synth`], [`data`]: the benchmark harness, the synthetic generator, and the
//!   `.npy` data sets it reads.
//! - [`cli`]: the command line.

pub mod affinity;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod data;
pub mod decode;
pub mod error;
pub mod http;
pub mod metrics;
pub mod proto;
pub mod shm;
pub mod store;
pub mod synth;
pub mod worker;

pub use error::KvdexError;

#![warn(missing_docs)]
//! kvdex: a sidecar daemon that keeps an LLM's KV cache in host memory and serves
//! attention-aware retrieval from it.
//!
//! # Layout
//! - [`config`]: the configuration (embedded default, file, `KVDEX_*` environment, flags).
//! - [`store`]: sessions and their KV storage, per (layer, KV head), under a global budget.
//! - [`worker`]: the daemon side of a region: validates and serves each request.
//! - [`daemon`]: `kvdex serve`: the session registry, dead-client reaping, clean shutdown.
//! - [`http`]: the axum control plane (sessions, health, stats, `/metrics`).
//! - [`metrics`]: the Prometheus registry.
//! - [`cli`]: the command line (`kvdex serve`; `bench` and `gen-synth` run kvdex-tools).
//!
//! The wire format is the `kvdex-wire` crate, the client `kvdex-client`, the benchmark
//! harness `kvdex-tools`.

pub mod affinity;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod http;
pub mod metrics;
pub mod store;
pub mod worker;

pub use error::KvdexError;

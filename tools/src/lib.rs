#![warn(missing_docs)]
//! kvdex-tools: the benchmark harness (`kvdex bench …`), the synthetic generator
//! (`kvdex gen-synth`) and the `.npy` data sets they read. Built as the `kvdex-bench` binary,
//! which the `kvdex` binary runs for those commands, so the daemon does not carry them.
//!
//! # Layout
//! - [`bench`](mod@bench): every benchmark prints a table, or JSON lines with `--json`, and
//!   runs its baseline side by side in the same run.
//! - [`synth`]: the synthetic Q/K/V generator.
//! - [`data`]: the `.npy` data sets of ../shared/data, and the writer `gen-synth` uses.
//! - [`cli`]: the command line.

pub mod bench;
pub mod cli;
pub mod data;
pub mod synth;

//! The benchmark harness end to end, as a user runs it: the `kvdex` binary, which runs
//! `kvdex-bench`, which starts its own `kvdex serve`. Both binaries come from one workspace
//! build (`cargo test --workspace` builds them; `cargo test -p kvdex-tools` alone needs
//! `cargo build --bin kvdex` first).
//!
//! - `decode`: `kvdex bench decode`'s JSON lines, every field, for flat and graph.
//! - `sampled`: `--sample-rate`: the daemon's sampled figures beside the exact ones.
//! - `cli`: bad arguments are refused by name.

mod cli;
mod decode;
mod sampled;

use std::path::PathBuf;
use std::process::Command;

/// The `kvdex` binary beside `kvdex-bench`, with no `KVDEX_*` variable inherited from the
/// caller's environment.
pub fn kvdex() -> Command {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_kvdex-bench"));
    let daemon = bench.with_file_name("kvdex");
    assert!(
        daemon.is_file(),
        "{} is missing: build it first (cargo build --bin kvdex)",
        daemon.display()
    );
    let mut cmd = Command::new(daemon);
    for (k, _) in std::env::vars() {
        if k.starts_with("KVDEX_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("KVDEX_LOG", "warn");
    cmd
}

//! The `kvdex` command line: `kvdex serve` runs the daemon; `kvdex bench …` and
//! `kvdex gen-synth` run the `kvdex-bench` binary of kvdex-tools (found next to this binary,
//! else on the `PATH`), so the daemon does not link the harness.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::{KvdexError, Result};

/// kvdex: offloads an LLM's KV cache to host memory and serves attention-aware retrieval.
#[derive(Debug, Parser)]
#[command(name = "kvdex", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands. (Parsed once at start-up, so the variants' size difference costs
/// nothing worth a box.)
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the daemon.
    Serve(crate::daemon::ServeArgs),
    /// Run a benchmark: recall, transfer, rtt, decode (`kvdex bench --help`).
    #[command(disable_help_flag = true)]
    Bench {
        /// The benchmark and its options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Write a synthetic Q/K/V data set in the layout of ../shared/data.
    #[command(disable_help_flag = true)]
    GenSynth {
        /// The generator's options (`kvdex gen-synth --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// The binary that runs `kvdex bench …` and `kvdex gen-synth`.
pub const TOOLS_BINARY: &str = "kvdex-bench";

/// Runs the parsed command. `bench` and `gen-synth` replace this process with
/// [`TOOLS_BINARY`] (same arguments, same exit status, same signals).
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => crate::daemon::run(a),
        Command::Bench { args } => exec_tools("bench", args),
        Command::GenSynth { args } => exec_tools("gen-synth", args),
    }
}

/// Replaces this process with `kvdex-bench <command> <args…>`; returns only on failure.
fn exec_tools(command: &str, args: Vec<OsString>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let bin = find_binary(TOOLS_BINARY).ok_or_else(|| {
        KvdexError::Config(format!(
            "`kvdex {command}` runs the {TOOLS_BINARY} binary, which is neither next to this \
             one nor on the PATH: build it with `cargo build --release -p kvdex-tools`"
        ))
    })?;
    let e = std::process::Command::new(&bin)
        .arg(command)
        .args(args)
        .exec();
    Err(KvdexError::Config(format!(
        "cannot run {}: {e}",
        bin.display()
    )))
}

/// The binary `name` next to the running one (where cargo and `pip install` put kvdex's
/// binaries), else the first on the `PATH`.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.is_file());
    beside.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Logs to stderr, filtered by `KVDEX_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVDEX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The error for a person at a terminal: `Error: <message>`, then each cause on a line of its
/// own under `Caused by:`, and never a backtrace. (Returning the error from `main` prints
/// anyhow's `Debug`, which appends a stack trace of `main` whenever `RUST_BACKTRACE` is set:
/// noise under a message that already says what is wrong.) A cause whose text the line above
/// already holds (thiserror's `"io: {0}"` around its `io::Error`) is not repeated.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = format!("Error: {e}");
    let mut above = e.to_string();
    let mut causes = e
        .chain()
        .skip(1)
        .map(|c| c.to_string())
        .filter(|c| {
            let new = !above.contains(c.as_str());
            above.clone_from(c);
            new
        })
        .peekable();
    if causes.peek().is_some() {
        out.push_str("\n\nCaused by:");
        for c in causes {
            out.push_str("\n    ");
            out.push_str(&c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_listed_once_each_and_repeats_are_dropped() {
        let io = std::io::Error::other("disk on fire");
        // thiserror's "io: {0}": the cause's text is already in the message.
        let e = anyhow::Error::from(KvdexError::from(io));
        assert_eq!(report(&e), "Error: io: disk on fire");
        let e = anyhow::Error::from(std::io::Error::other("inner")).context("outer");
        assert_eq!(report(&e), "Error: outer\n\nCaused by:\n    inner");
    }

    #[test]
    fn bench_and_gen_synth_pass_every_argument_through() {
        let cli = Cli::try_parse_from(["kvdex", "bench", "decode", "--help", "-x"]).unwrap();
        match cli.command {
            Command::Bench { args } => assert_eq!(args, ["decode", "--help", "-x"]),
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["kvdex", "gen-synth", "--tokens", "8"]).unwrap();
        assert!(matches!(cli.command, Command::GenSynth { args } if args.len() == 2));
    }
}

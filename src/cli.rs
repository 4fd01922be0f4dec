//! The command line: `kvdex serve`, `kvdex bench …`, `kvdex gen-synth`.

use clap::{Parser, Subcommand};

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
    /// Run a benchmark.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a synthetic Q/K/V data set in the layout of ../shared/data.
    GenSynth(crate::synth::SynthArgs),
}

/// `kvdex bench …` (parsed once, like [`Command`]).
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)]
pub enum BenchCommand {
    /// Recall against cost of every index, on a data set.
    Recall(crate::bench::recall::RecallArgs),
    /// Gather bandwidth of a transfer backend against its limit.
    Transfer(crate::bench::transfer::TransferArgs),
    /// Round trips through the daemon: shared memory against a Unix socket.
    Rtt(crate::bench::rtt::RttArgs),
    /// The decode-step layer request through the real daemon.
    Decode(crate::bench::decode::DecodeArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> crate::error::Result<()> {
    match cli.command {
        Command::Serve(a) => crate::daemon::run(a),
        Command::GenSynth(a) => crate::synth::run(a),
        Command::Bench(BenchCommand::Recall(a)) => crate::bench::recall::run(a),
        Command::Bench(BenchCommand::Transfer(a)) => crate::bench::transfer::run(a),
        Command::Bench(BenchCommand::Rtt(a)) => crate::bench::rtt::run(a),
        Command::Bench(BenchCommand::Decode(a)) => crate::bench::decode::run(a),
    }
}

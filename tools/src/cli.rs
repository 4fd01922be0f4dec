//! The command line of `kvdex-bench`, which `kvdex bench …` and `kvdex gen-synth` run: the
//! benchmark harness and the synthetic generator.

use clap::{Parser, Subcommand};

/// The kvdex benchmark harness and synthetic-data generator (run as `kvdex bench …` and
/// `kvdex gen-synth`).
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
pub fn run(cli: Cli) -> kvdex::error::Result<()> {
    match cli.command {
        Command::GenSynth(a) => crate::synth::run(a),
        Command::Bench(BenchCommand::Recall(a)) => crate::bench::recall::run(a),
        Command::Bench(BenchCommand::Transfer(a)) => crate::bench::transfer::run(a),
        Command::Bench(BenchCommand::Rtt(a)) => crate::bench::rtt::run(a),
        Command::Bench(BenchCommand::Decode(a)) => crate::bench::decode::run(a),
    }
}

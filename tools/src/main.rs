//! The `kvdex-bench` binary: what `kvdex bench …` and `kvdex gen-synth` run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    kvdex::cli::init_logging();
    match kvdex_tools::cli::run(kvdex_tools::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", kvdex::cli::report(&anyhow::Error::from(e)));
            ExitCode::FAILURE
        }
    }
}

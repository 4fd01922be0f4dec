//! The `kvdex` binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    kvdex::cli::init_logging();
    match kvdex::cli::run(kvdex::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", kvdex::cli::report(&anyhow::Error::from(e)));
            ExitCode::FAILURE
        }
    }
}

//! `kvdex bench decode`.

/// Arguments of `kvdex bench decode`.
#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: DecodeArgs) -> crate::error::Result<()> {
    Err(crate::KvdexError::Config(
        "bench decode is not built yet".into(),
    ))
}

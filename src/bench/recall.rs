//! `kvdex bench recall`.

/// Arguments of `kvdex bench recall`.
#[derive(Debug, clap::Args)]
pub struct RecallArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: RecallArgs) -> crate::error::Result<()> {
    Err(crate::KvdexError::Config(
        "bench recall is not built yet".into(),
    ))
}

//! `kvdex bench transfer`.

/// Arguments of `kvdex bench transfer`.
#[derive(Debug, clap::Args)]
pub struct TransferArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: TransferArgs) -> crate::error::Result<()> {
    Err(crate::KvdexError::Config(
        "bench transfer is not built yet".into(),
    ))
}

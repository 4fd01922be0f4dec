//! `kvdex bench rtt`.

/// Arguments of `kvdex bench rtt`.
#[derive(Debug, clap::Args)]
pub struct RttArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: RttArgs) -> crate::error::Result<()> {
    Err(crate::KvdexError::Config(
        "bench rtt is not built yet".into(),
    ))
}

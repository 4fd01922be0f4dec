//! `kvdex gen-synth`: synthetic Q/K/V that are out of distribution the way real ones are.

/// Arguments of `kvdex gen-synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Output directory.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// Writes a synthetic data set.
pub fn run(_args: SynthArgs) -> crate::error::Result<()> {
    Err(crate::KvdexError::Config(
        "gen-synth is not built yet".into(),
    ))
}

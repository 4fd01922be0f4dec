//! `kvdex serve`: the session registry, dead-client reaping and clean shutdown.

/// Arguments of `kvdex serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML) layered over the embedded default.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Address of the HTTP control plane, overriding the config (e.g. 127.0.0.1:7070).
    #[arg(long)]
    pub listen: Option<String>,
}

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(_args: ServeArgs) -> crate::error::Result<()> {
    Err(crate::KvdexError::Config("serve is not built yet".into()))
}

//! The `kvdex` binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVDEX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match kvdex::cli::run(kvdex::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", report(&anyhow::Error::from(e)));
            ExitCode::FAILURE
        }
    }
}

/// The error for a person at a terminal: `Error: <message>`, then each cause on a line of its
/// own under `Caused by:`, and never a backtrace. (Returning the error from `main` prints
/// anyhow's `Debug`, which appends a stack trace of `main` whenever `RUST_BACKTRACE` is set:
/// noise under a message that already says what is wrong.) A cause whose text the line above
/// already holds (thiserror's `"io: {0}"` around its `io::Error`) is not repeated.
fn report(e: &anyhow::Error) -> String {
    let mut out = format!("Error: {e}");
    let mut above = e.to_string();
    let mut causes = e
        .chain()
        .skip(1)
        .map(|c| c.to_string())
        .filter(|c| {
            let new = !above.contains(c.as_str());
            above.clone_from(c);
            new
        })
        .peekable();
    if causes.peek().is_some() {
        out.push_str("\n\nCaused by:");
        for c in causes {
            out.push_str("\n    ");
            out.push_str(&c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::report;

    #[test]
    fn causes_are_listed_once_each_and_repeats_are_dropped() {
        let io = std::io::Error::other("disk on fire");
        // thiserror's "io: {0}": the cause's text is already in the message.
        let e = anyhow::Error::from(kvdex::KvdexError::from(io));
        assert_eq!(report(&e), "Error: io: disk on fire");
        let e = anyhow::Error::from(std::io::Error::other("inner")).context("outer");
        assert_eq!(report(&e), "Error: outer\n\nCaused by:\n    inner");
    }
}

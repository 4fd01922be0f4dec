//! Stopping a benchmark's `kvdex serve` child the way an operator would, so that it removes
//! its region files (`bench decode` once leaked them on every run by killing the daemon).

use std::process::Child;
use std::time::{Duration, Instant};

/// How long a stopped daemon may take to end its sessions before it is killed.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops `child` the way an operator would: SIGTERM, then SIGKILL if it has not exited
/// within `grace`; reaps it either way.
///
/// A SIGKILLed `kvdex serve` cannot remove its `/dev/shm` region files (one per session,
/// 16-64 MiB of memory each): the bench once leaked them on every run.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on our own child, not yet reaped (we still own `Child` and `try_wait`
    // just saw it running), so the pid cannot have been reused.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The `kvdex` daemon binary a benchmark starts: `KVDEX_BIN` when set, else the `kvdex` next
/// to this binary (where cargo and `pip install` put both), else the first on the `PATH`.
pub(crate) fn daemon_binary() -> kvdex::error::Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("KVDEX_BIN") {
        return Ok(p.into());
    }
    kvdex::cli::find_binary("kvdex").ok_or_else(|| {
        kvdex::KvdexError::Config(
            "the benchmark starts a `kvdex serve` daemon, but no `kvdex` binary is next to \
                 this one or on the PATH (set KVDEX_BIN, or build it: cargo build -p kvdex)"
                .into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// The child gets SIGTERM (its handler runs and cleans up), not an outright SIGKILL.
    #[test]
    fn stop_child_lets_the_child_clean_up() {
        let dir = std::env::temp_dir().join(format!("kvdex-stop-child-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("cleaned");
        let script = format!(
            "trap 'touch {}; exit 0' TERM; echo up; while true; do sleep 0.05; done",
            marker.display()
        );
        let mut child = sh_child(&script);
        stop_child(&mut child, Duration::from_secs(5));
        assert!(
            marker.exists(),
            "the child was killed without running its SIGTERM handler"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// `sh -c script`, returned once the script has printed "up" (its trap is installed).
    fn sh_child(script: &str) -> std::process::Child {
        let mut child = Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 3];
        std::io::Read::read_exact(&mut out, &mut buf).unwrap();
        child
    }

    /// A child that ignores SIGTERM is still killed and reaped after the grace period.
    #[test]
    fn stop_child_kills_a_child_that_ignores_sigterm() {
        let mut child = sh_child("trap '' TERM; echo up; while true; do sleep 0.05; done");
        stop_child(&mut child, Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_some());
    }
}

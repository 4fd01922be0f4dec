//! Region files left behind by a daemon that did not stop cleanly.
//!
//! A daemon removes its `kvdex-<pid>-<id>` files in `sessions.shm_dir` when a session ends
//! and when it shuts down. One that is SIGKILLed, OOM-killed or crashes cannot, and the
//! files (tmpfs: memory, 16 MiB to 1 GiB each) outlive it until reboot. Every daemon
//! therefore removes, at start-up, the region files whose daemon process no longer exists.

use std::path::Path;

/// The daemon pid in a region file name `kvdex-<pid>-<16 hex digits>`; `None` for any other
/// name, so that nothing but kvdex's own region files is ever touched.
pub fn region_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("kvdex-")?;
    let (pid, id) = rest.split_once('-')?;
    let hex_id = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    if !(hex_id && digits) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether process `pid` exists (on Linux, `/proc/<pid>` is there).
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether some process holds a `flock` on `path`: a live daemon keeps a shared lock on each
/// region it created ([`kvdex_wire::shm::Region`]), visible across pid namespaces.
fn locked(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return true;
    };
    // Released when `file` drops.
    file.try_lock().is_err()
}

/// Removes the region files in `dir` whose daemon is gone; returns how many were removed.
///
/// A file is kept when its pid belongs to a live process, even if the pid was reused by some
/// other program (keeping a stale file is harmless; removing a live daemon's is not), and
/// when any process holds a lock on it (a daemon in another pid namespace sharing the
/// directory). Only regular files are removed, never a link or a directory.
pub fn remove_stale_regions(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(region_owner) else {
            continue;
        };
        if pid == std::process::id() || process_exists(pid) {
            continue;
        }
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if regular && !locked(&entry.path()) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_region_names_have_an_owner() {
        assert_eq!(region_owner("kvdex-123-0123456789abcdef"), Some(123));
        for other in [
            "kvdex-123-0123456789abcde",
            "kvdex-123-0123456789abcdeg",
            "kvdex--0123456789abcdef",
            "kvdex-0-0123456789abcdef",
            "kvdex-12a-0123456789abcdef",
            "kvdex-test-1-x-0123456789abcdef",
            "other-123-0123456789abcdef",
        ] {
            assert_eq!(region_owner(other), None, "{other}");
        }
    }

    #[test]
    fn files_of_gone_daemons_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("kvdex-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A pid that existed and is gone: a child we ran and reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let stale = dir.join(format!("kvdex-{gone}-00000000000000aa"));
        // A live region of a daemon whose pid this process cannot see: it holds the lock.
        let held = dir.join(format!("kvdex-{gone}-00000000000000ee"));
        std::fs::write(&held, b"x").unwrap();
        let holder = std::fs::File::open(&held).unwrap();
        holder.lock_shared().unwrap();
        let mine = dir.join(format!("kvdex-{me}-00000000000000bb"));
        let unrelated = dir.join(format!("notes-{gone}-00000000000000cc"));
        let stale_dir = dir.join(format!("kvdex-{gone}-00000000000000dd"));
        for f in [&stale, &mine, &unrelated] {
            std::fs::write(f, b"x").unwrap();
        }
        std::fs::create_dir_all(&stale_dir).unwrap();
        if process_exists(gone) {
            // The pid was reused at once: nothing to assert about removal.
            std::fs::remove_dir_all(&dir).ok();
            return;
        }
        assert_eq!(remove_stale_regions(&dir), 1);
        assert!(!stale.exists());
        assert!(mine.exists() && unrelated.exists() && stale_dir.exists());
        assert!(held.exists(), "a locked region file is kept");
        drop(holder);
        assert_eq!(remove_stale_regions(&dir), 1);
        assert!(!held.exists());
        assert_eq!(remove_stale_regions(&dir.join("missing")), 0);
        std::fs::remove_dir_all(&dir).ok();
    }
}

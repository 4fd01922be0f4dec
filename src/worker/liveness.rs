//! Liveness that no client can fake.
//!
//! The attaching client writes its pid into the region, and the worker watches that pid with
//! a pidfd. Taken on trust, a client could name any long-lived process (pid 1) and its session
//! would never be reaped. So a pid is accepted only if that process has this very region file
//! mapped (same device and inode in `/proc/<pid>/maps`): whichever process it is, it holds the
//! session's memory, and the session lives exactly as long as it does.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use kvdex_wire::shm::FileId;

/// How a worker decides that nobody uses its session any more, beyond the attached client's
/// pidfd: a deadline for the first attach, and the session's data-socket connections.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    /// A session whose region is not attached and that no data-socket connection reached
    /// within this time is ended (`sessions.attach_timeout_ms`); None waits for ever.
    pub attach_timeout: Option<Duration>,
    /// The session's data-socket connections, counted by the socket hub.
    pub presence: Arc<Presence>,
}

/// Data-socket connections of one session, shared by the socket hub and the worker: a session
/// reached only over the socket ends when its last connection closes (the peer died or left).
#[derive(Debug, Default)]
pub struct Presence {
    open: AtomicU32,
    seen: AtomicBool,
}

impl Presence {
    /// Counts a connection in until the returned guard drops.
    pub fn connect(self: &Arc<Self>) -> Connected {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.seen.store(true, Ordering::Release);
        Connected(self.clone())
    }

    /// Some connection was made, and none is open now.
    pub fn all_left(&self) -> bool {
        self.seen.load(Ordering::Acquire) && self.open.load(Ordering::Acquire) == 0
    }

    /// Some connection was made.
    pub fn seen(&self) -> bool {
        self.seen.load(Ordering::Acquire)
    }
}

/// One open data-socket connection of a session (see [`Presence::connect`]).
#[derive(Debug)]
pub struct Connected(Arc<Presence>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether process `pid` has `file` mapped. Errors (no such process, no permission to read its
/// maps) read as "no": a pid the daemon cannot check is not trusted.
pub fn maps_file(pid: u64, file: FileId) -> bool {
    let Ok(f) = std::fs::File::open(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let (major, minor) = (libc::major(file.dev), libc::minor(file.dev));
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .any(|line| line_maps(&line, major, minor, file.ino))
}

/// One `/proc/<pid>/maps` line (`start-end perms offset maj:min inode path`) maps the file
/// with device `major:minor` (hexadecimal there) and inode `ino`.
fn line_maps(line: &str, major: u32, minor: u32, ino: u64) -> bool {
    let mut fields = line.split_ascii_whitespace().skip(3);
    let (Some(dev), Some(inode)) = (fields.next(), fields.next()) else {
        return false;
    };
    let Some((maj, min)) = dev.split_once(':') else {
        return false;
    };
    u32::from_str_radix(maj, 16) == Ok(major)
        && u32::from_str_radix(min, 16) == Ok(minor)
        && inode.parse::<u64>() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process maps a file it created, and pid 1 (or any other process) does not.
    #[test]
    fn a_pid_counts_only_if_it_maps_the_file() {
        let path = std::env::temp_dir().join(format!("kvdex-live-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(4096).unwrap();
        let id = FileId::of(&f).unwrap();
        let me = u64::from(std::process::id());
        assert!(!maps_file(me, id), "not mapped yet");
        // SAFETY: a private test file, mapped read-only and never truncated while mapped.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        assert!(maps_file(me, id));
        assert!(!maps_file(1, id));
        assert!(!maps_file(u64::MAX, id));
        drop(map);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn maps_lines_are_parsed_by_device_and_inode() {
        let line = "7f00-7f01 rw-s 00000000 00:1a 12345   /dev/shm/kvdex-1-ab";
        assert!(line_maps(line, 0, 0x1a, 12345));
        assert!(!line_maps(line, 0, 0x1a, 1234));
        assert!(!line_maps(line, 0, 0x1b, 12345));
        assert!(!line_maps(
            "7f00-7f01 r-xp 00000000 00:00 0",
            0,
            0x1a,
            12345
        ));
        assert!(!line_maps("garbage", 0, 0, 0));
    }
}

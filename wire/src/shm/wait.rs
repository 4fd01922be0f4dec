//! Spin-then-park waiting across processes, and watching the peer's pid.
//!
//! The waiting side spins for a short, configurable time (the hot path: no syscall at all),
//! then announces it is going to sleep by setting its futex word to 1 and parks in
//! `FUTEX_WAIT` with a timeout. The other side, after publishing, checks that word and only
//! makes the `FUTEX_WAKE` syscall when the waiter is (about to be) parked. Both sides put a
//! `SeqCst` fence between their store and their load (the waiter: sleeping flag, then ring
//! index; the notifier: ring index, then sleeping flag), so at least one of them sees the
//! other's store and a wake-up is never lost.
//!
//! The futex is the shared (not `FUTEX_PRIVATE`) kind, because the word lives in a file
//! mapping seen by two processes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long to spin and how long one park may last before the caller re-checks its
/// surroundings (stop flags, the peer's liveness).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Busy-wait this long before parking. Zero parks at once.
    pub spin: Duration,
    /// Longest single park.
    pub park_timeout: Duration,
    /// After waking a parked peer ([`wait_watching`]): how long to spin before the peer must
    /// show that it runs. A peer still not running by then is waiting for a core, likely the
    /// one this spin holds, so the waiter parks and hands it over.
    pub wake_grace: Duration,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self {
            spin: Duration::from_micros(50),
            park_timeout: Duration::from_millis(50),
            wake_grace: Duration::from_micros(20),
        }
    }
}

/// Parks on `word` while it still holds `expected`, for at most `timeout`.
/// Spurious returns are fine: callers re-check their condition.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, 4-byte aligned u32 for the duration of the call (AtomicU32 has
    // u32's layout); `ts` outlives the call; FUTEX_WAIT only reads both. Errors (EAGAIN when
    // the value changed, EINTR, ETIMEDOUT) all mean "return and re-check".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes one waiter parked on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE does not access memory beyond the
    // word's address, which it uses as the wait-queue key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1i32,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// The word a waiter announces itself on and parks on, with the futex calls: an `AtomicU32`
/// in the region (the real futex), or a model of one (`wire/tests/loom_wait.rs` checks the
/// protocol of [`park_until`] and [`notify`] under loom with every interleaving).
pub trait ParkWord {
    /// The word's value.
    fn load(&self, order: Ordering) -> u32;
    /// Sets the word.
    fn store(&self, value: u32, order: Ordering);
    /// Sets the word, returning what it held.
    fn swap(&self, value: u32, order: Ordering) -> u32;
    /// A `SeqCst` fence (the model's own, under loom).
    fn fence_seq_cst(&self);
    /// Parks while the word holds `expected`, for at most `timeout`; may return spuriously.
    fn park(&self, expected: u32, timeout: Duration);
    /// Wakes one waiter parked on the word.
    fn wake(&self);
}

impl ParkWord for AtomicU32 {
    fn load(&self, order: Ordering) -> u32 {
        AtomicU32::load(self, order)
    }
    fn store(&self, value: u32, order: Ordering) {
        AtomicU32::store(self, value, order)
    }
    fn swap(&self, value: u32, order: Ordering) -> u32 {
        AtomicU32::swap(self, value, order)
    }
    fn fence_seq_cst(&self) {
        fence(Ordering::SeqCst)
    }
    fn park(&self, expected: u32, timeout: Duration) {
        futex_wait(self, expected, timeout)
    }
    fn wake(&self) {
        futex_wake(self)
    }
}

/// Waits until `ready()` is true: spins for `policy.spin`, then parks once on `sleeping` for
/// at most `policy.park_timeout`. Returns whether `ready()` held at the end (false: timed out,
/// and the caller should check for stop requests or a dead peer before waiting again).
pub fn wait_until(sleeping: &AtomicU32, policy: WaitPolicy, ready: impl FnMut() -> bool) -> bool {
    wait_watching(sleeping, policy, || true, ready)
}

/// [`wait_until`] for a waiter that has just woken its peer ([`notify`] returned true): the
/// spin goes on past `policy.wake_grace` only if `peer_running()` says the peer has started
/// (it took the request, or the response). On an idle core the peer runs within a few
/// microseconds and the answer is caught by the spin, saving this side a futex wake-up of its
/// own; when every core is busy the peer needs the one this spin holds, so the waiter parks.
pub fn wait_watching(
    sleeping: &AtomicU32,
    policy: WaitPolicy,
    mut peer_running: impl FnMut() -> bool,
    mut ready: impl FnMut() -> bool,
) -> bool {
    if ready() {
        return true;
    }
    if !policy.spin.is_zero() {
        // A pure spin. (Yielding between checks was measured to be worse on the loaded 2-core
        // box: a yielded thread can lose its core for milliseconds while the peer answers.)
        let start = Instant::now();
        let mut spins: u32 = 0;
        let mut peer_seen = false;
        loop {
            std::hint::spin_loop();
            if ready() {
                return true;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                let spent = start.elapsed();
                if spent >= policy.spin {
                    break;
                }
                if !peer_seen && spent >= policy.wake_grace {
                    peer_seen = peer_running();
                    if !peer_seen {
                        break;
                    }
                }
            }
        }
    }
    park_until(sleeping, policy.park_timeout, ready)
}

/// The parking half of a wait: announces the sleep on `sleeping`, re-checks `ready()` after a
/// `SeqCst` fence (so a publish that [`notify`] did not see as a sleep is seen here), and
/// parks at most `timeout`. Returns whether `ready()` held at the end.
pub fn park_until<W: ParkWord + ?Sized>(
    sleeping: &W,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> bool {
    sleeping.store(1, Ordering::SeqCst);
    sleeping.fence_seq_cst();
    if ready() {
        sleeping.store(0, Ordering::Relaxed);
        return true;
    }
    sleeping.park(1, timeout);
    sleeping.store(0, Ordering::Relaxed);
    ready()
}

/// Called after publishing something the peer may be waiting for: wakes it only if it parked.
/// Returns true when it had to wake it (the peer was asleep, so an answer will take a
/// scheduler wake-up: the caller should wait with [`wait_watching`]).
pub fn notify<W: ParkWord + ?Sized>(sleeping: &W) -> bool {
    sleeping.fence_seq_cst();
    if sleeping.load(Ordering::Relaxed) != 0 && sleeping.swap(0, Ordering::AcqRel) != 0 {
        sleeping.wake();
        return true;
    }
    false
}

/// Wakes the peer whether or not it announced parking (used for stop requests, where the
/// condition the peer checks is not in the region).
pub fn force_wake(sleeping: &AtomicU32) {
    sleeping.store(0, Ordering::SeqCst);
    futex_wake(sleeping);
}

/// A pidfd on another process: tells, without blocking, whether it has exited.
///
/// A pidfd (Linux 5.3+) refers to one process, so a recycled pid cannot fool it.
#[derive(Debug)]
pub struct PidWatch {
    fd: OwnedFd,
}

impl PidWatch {
    /// Opens a pidfd for `pid`. Fails if the process does not exist (already gone).
    pub fn open(pid: u64) -> std::io::Result<Self> {
        let pid = libc::pid_t::try_from(pid)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad pid {pid}"))
            })?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
        // passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the syscall succeeded, so `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { fd })
    }

    /// True once the process has exited (the pidfd polls readable).
    pub fn exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd that outlives the call; timeout 0 never blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn parked_waiter_is_woken_by_notify() {
        let word = Arc::new(AtomicU32::new(0));
        let flag = Arc::new(AtomicBool::new(false));
        let policy = WaitPolicy {
            spin: Duration::ZERO,
            park_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let (w, f) = (word.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            while !wait_until(&w, policy, || f.load(Ordering::Acquire)) {}
            start.elapsed()
        });
        // Let the waiter park, then publish and notify.
        while word.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        flag.store(true, Ordering::Release);
        notify(&*word);
        let waited = t.join().unwrap();
        assert!(
            waited < Duration::from_secs(10),
            "woken by notify, not by the park timeout"
        );
        assert_eq!(word.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_waiter_whose_woken_peer_does_not_run_parks_before_its_spin_ends() {
        let word = Arc::new(AtomicU32::new(0));
        let flag = Arc::new(AtomicBool::new(false));
        // A spin far longer than the test: only the grace check can make it park.
        let policy = WaitPolicy {
            spin: Duration::from_secs(3600),
            park_timeout: Duration::from_secs(10),
            wake_grace: Duration::ZERO,
        };
        let (w, f) = (word.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            wait_watching(&w, policy, || false, || f.load(Ordering::Acquire))
        });
        while word.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        flag.store(true, Ordering::Release);
        assert!(notify(&*word), "the waiter had announced its park");
        assert!(t.join().unwrap());
    }

    #[test]
    fn wait_times_out_and_reports_not_ready() {
        let word = AtomicU32::new(0);
        let policy = WaitPolicy {
            spin: Duration::from_micros(10),
            park_timeout: Duration::from_millis(5),
            ..Default::default()
        };
        assert!(!wait_until(&word, policy, || false));
        assert!(wait_until(&word, policy, || true));
        force_wake(&word);
    }

    #[test]
    fn pid_watch_sees_a_child_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let watch = PidWatch::open(child.id() as u64).unwrap();
        assert!(!watch.exited());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(watch.exited());
        assert!(PidWatch::open(0).is_err());
    }
}

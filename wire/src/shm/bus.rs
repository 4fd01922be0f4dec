//! Keeping the daemon alive when a client truncates its region file.
//!
//! A region is a `MAP_SHARED` mapping of a tmpfs file the client can open too. If the client
//! shrinks the file (`ftruncate`), every later access of the daemon to the lost pages raises
//! SIGBUS, which by default kills the daemon and every session with it. Unlinking the file
//! does not help (the client keeps its descriptor), and tmpfs files cannot be sealed.
//!
//! So the daemon registers each region it maps here ([`BusGuard`]), and a process-wide SIGBUS
//! handler, when the faulting address lies inside a registered range, maps fresh anonymous
//! zero pages over the whole range (`MAP_FIXED`, an async-signal-safe system call) and marks
//! the range as faulted. The faulting instruction then re-runs against the zero pages; the
//! worker sees [`BusGuard::faulted`] and ends that one session. A SIGBUS at any other address
//! goes to the handler that was installed before (Rust's stack-overflow handler, or the
//! default action), as if this module did not exist. This is how Wayland compositors survive
//! clients that shrink their shared-memory pools.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

/// Ranges that can be registered at once (every live session's region).
const SLOTS: usize = 4096;

struct Slot {
    /// Start address; 0 while the slot is free. Claimed with a compare-exchange.
    start: AtomicUsize,
    /// Length in bytes; set before the slot is published, read by the handler.
    len: AtomicUsize,
    /// Set by the handler once it has replaced the range.
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static RANGES: [Slot; SLOTS] = [FREE; SLOTS];

/// The SIGBUS action that was installed before ours, written once before ours is installed.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A registered mapping: while it lives, a SIGBUS inside `[start, start + len)` replaces the
/// range with zero pages instead of killing the process. Drop it before unmapping the range.
#[derive(Debug)]
pub struct BusGuard {
    slot: usize,
}

impl BusGuard {
    /// Registers `[start, start + len)`, installing the handler on first use.
    pub fn register(start: *const u8, len: usize) -> Result<Self> {
        install()?;
        let start = start as usize;
        for (i, s) in RANGES.iter().enumerate() {
            if s.start.load(Ordering::Relaxed) != 0 {
                continue;
            }
            // Claim the slot with a sentinel so that no other registration takes it, then
            // publish the real range once its length is set.
            if s.start
                .compare_exchange(0, usize::MAX, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                s.len.store(len, Ordering::Relaxed);
                s.faulted.store(false, Ordering::Relaxed);
                s.start.store(start, Ordering::Release);
                return Ok(Self { slot: i });
            }
        }
        Err(Error::Exhausted(format!(
            "more than {SLOTS} shared-memory regions mapped at once"
        )))
    }

    /// True once a SIGBUS in this range (the file was truncated) replaced it with zero pages:
    /// the peer's data is gone and the session must end.
    pub fn faulted(&self) -> bool {
        RANGES[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for BusGuard {
    fn drop(&mut self) {
        let s = &RANGES[self.slot];
        s.start.store(0, Ordering::Release);
    }
}

fn install() -> Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a zeroed struct, our handler and SA_SIGINFO; `PREVIOUS` is
        // written by this call only, once, before any SIGBUS can reach our handler (which
        // reads it), and `Once` orders it before every later registration.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            let prev = &raw mut PREVIOUS;
            if libc::sigaction(libc::SIGBUS, &act, (*prev).as_mut_ptr()) == 0 {
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
    if INSTALLED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(Error::Io(std::io::Error::other(
            "cannot install the SIGBUS handler that guards shared-memory regions",
        )))
    }
}

/// The SIGBUS handler: async-signal-safe (atomics, `mmap`, `sigaction` only).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &RANGES {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || start == usize::MAX {
            continue;
        }
        let len = s.len.load(Ordering::Relaxed);
        if addr >= start && addr - start < len {
            // SAFETY: the range is a live mapping registered by its owner (the guard is
            // dropped before the unmap); replacing it with private zero pages of the same
            // size leaves every pointer into it valid.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                s.faulted.store(true, Ordering::Release);
                return;
            }
            break;
        }
    }
    // Not ours (or the remap failed): the previous action, as if we were not here.
    // SAFETY: PREVIOUS was written before this handler was installed.
    unsafe {
        let prev = &*(&raw const PREVIOUS).cast::<libc::sigaction>();
        let h = prev.sa_sigaction;
        if h == libc::SIG_DFL || h == libc::SIG_IGN {
            // Restore it and return: the access faults again and takes the default action.
            libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut());
        } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(h);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
            f(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A mapping of a file truncated under it: the access that would have raised SIGBUS
    /// reads zeros instead, and the guard reports the fault; a guard of another range does
    /// not.
    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_reported() {
        let path = std::env::temp_dir().join(format!("kvdex-bus-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(&[7u8; 3 * 4096]).unwrap();
        // SAFETY: a private test file; the truncation below is the point of the test.
        let map = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
        let other = [1u8; 64];
        let guard = BusGuard::register(map.as_ptr(), map.len()).unwrap();
        let bystander = BusGuard::register(other.as_ptr(), other.len()).unwrap();
        assert_eq!(map[4096 + 5], 7);
        f.set_len(0).unwrap();
        std::fs::remove_file(&path).unwrap();
        // SAFETY: reads a byte of a live mapping (volatile, so the read really happens).
        let got = unsafe { std::ptr::read_volatile(map.as_ptr().add(4096 + 5)) };
        assert_eq!(got, 0);
        assert!(guard.faulted());
        assert!(!bystander.faulted());
        drop(guard);
        drop(map);
    }
}

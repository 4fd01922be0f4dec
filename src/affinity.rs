//! CPU sets for the data-plane threads (`sessions.worker_cpus`).
//!
//! A shared-memory round trip is two threads handing a cache line back and forth, one in the
//! engine and one here. When the scheduler puts both on the same core, every request needs a
//! context switch (and, with spinning waiters, a spin that holds the core the peer needs): on
//! the 2-core test machine such a placement made whole runs of 20 000 pings cost 60-130 µs
//! each instead of 0.5 µs, and it lasted until the scheduler happened to move one thread.
//! Latency-critical sidecars are therefore deployed on their own cores; this module lets the
//! daemon pin its worker threads to a configured set, written as a Linux CPU list ("2",
//! "2-3", "0,4-7").

use crate::error::{KvdexError, Result};

/// Most CPUs a mask can name (the kernel's default `CONFIG_NR_CPUS` on x86-64 is 8192; 1024 is
/// what `cpu_set_t` holds, so it is the most `sched_setaffinity` takes through libc).
pub const MAX_CPUS: usize = 1024;

/// A set of CPU ids, `< MAX_CPUS`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CpuMask {
    bits: [u64; MAX_CPUS / 64],
}

impl std::fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.cpus()).finish()
    }
}

impl CpuMask {
    /// Parses a Linux CPU list: comma-separated ids and inclusive ranges, e.g. "1", "0,2-3".
    /// An empty or malformed list, a reversed range or an id `>= MAX_CPUS` is an error that
    /// quotes the list.
    pub fn parse(list: &str) -> Result<Self> {
        let bad = |why: String| KvdexError::Config(format!("CPU list {list:?}: {why}"));
        let mut bits = [0u64; MAX_CPUS / 64];
        let id = |s: &str| -> Result<usize> {
            let v: usize = s
                .trim()
                .parse()
                .map_err(|_| bad(format!("{:?} is not a CPU id", s.trim())))?;
            if v >= MAX_CPUS {
                return Err(bad(format!("CPU {v} is not below {MAX_CPUS}")));
            }
            Ok(v)
        };
        for part in list.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (id(a)?, id(b)?),
                None => {
                    let v = id(part)?;
                    (v, v)
                }
            };
            if lo > hi {
                return Err(bad(format!("range {lo}-{hi} is reversed")));
            }
            for c in lo..=hi {
                bits[c / 64] |= 1 << (c % 64);
            }
        }
        Ok(Self { bits })
    }

    /// The CPU ids in the set, ascending.
    pub fn cpus(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_CPUS).filter(|&c| self.bits[c / 64] >> (c % 64) & 1 == 1)
    }

    /// The CPUs this thread may run on now (its affinity), as a mask.
    pub fn of_current_thread() -> Result<Self> {
        // SAFETY: cpu_set_t is a plain bit array for which all-zero is a valid (empty) value.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live cpu_set_t and the size passed is its own; pid 0 is this
        // thread. The kernel writes at most that many bytes.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut bits = [0u64; MAX_CPUS / 64];
        for c in 0..MAX_CPUS {
            // SAFETY: `c` is below CPU_SETSIZE (1024), the capacity of `set`.
            if unsafe { libc::CPU_ISSET(c, &set) } {
                bits[c / 64] |= 1 << (c % 64);
            }
        }
        Ok(Self { bits })
    }

    /// Restricts the calling thread to this set. Fails (and changes nothing) when none of the
    /// set's CPUs is online or allowed to this process.
    pub fn pin_current_thread(&self) -> Result<()> {
        // SAFETY: all-zero is a valid, empty cpu_set_t.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for c in self.cpus() {
            // SAFETY: every id in a mask is below MAX_CPUS = CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        // SAFETY: `set` is a live cpu_set_t and the size passed is its own; pid 0 is this
        // thread. The kernel only reads it.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(KvdexError::Config(format!(
                "cannot pin a thread to CPUs {self:?}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_ranges_and_refuses_nonsense() {
        let m = CpuMask::parse("0, 2-4,9").unwrap();
        assert_eq!(m.cpus().collect::<Vec<_>>(), vec![0, 2, 3, 4, 9]);
        assert_eq!(CpuMask::parse("1023").unwrap().cpus().count(), 1);
        for bad in ["", "x", "1,", "3-1", "1024", "-1", "1-"] {
            let e = CpuMask::parse(bad).unwrap_err().to_string();
            assert!(e.contains("CPU list"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn pins_a_thread_to_one_allowed_cpu_and_refuses_an_impossible_set() {
        std::thread::spawn(|| {
            let allowed = CpuMask::of_current_thread().unwrap();
            let first = allowed.cpus().next().expect("a thread runs somewhere");
            let one = CpuMask::parse(&first.to_string()).unwrap();
            one.pin_current_thread().unwrap();
            assert_eq!(CpuMask::of_current_thread().unwrap(), one);
            // SAFETY: sched_getcpu takes no arguments and only returns a number.
            assert_eq!(unsafe { libc::sched_getcpu() }, first as i32);
            let none = CpuMask::parse("1023").unwrap();
            if !allowed.cpus().any(|c| c == 1023) {
                assert!(none.pin_current_thread().is_err());
                assert_eq!(CpuMask::of_current_thread().unwrap(), one, "unchanged");
            }
        })
        .join()
        .unwrap();
    }
}

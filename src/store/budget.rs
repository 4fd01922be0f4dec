//! The global memory budget: bytes of K/V storage all sessions may hold together.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{KvdexError, Result};

/// A byte budget shared by every session of a daemon.
///
/// Sessions reserve bytes before they allocate and release them when they free, so the daemon
/// refuses an append with an error instead of being killed for running out of memory. The
/// reservation is a compare-and-swap, so concurrent appends of different sessions never
/// overshoot it together.
#[derive(Debug)]
pub struct Budget {
    total: u64,
    used: AtomicU64,
}

impl Budget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Self {
        Self {
            total,
            used: AtomicU64::new(0),
        }
    }

    /// No limit (for stand-alone sessions in tests and tools).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// The whole budget.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Bytes still free.
    pub fn left(&self) -> u64 {
        self.total.saturating_sub(self.used())
    }

    /// Reserves `bytes`, or fails with [`KvdexError::Budget`] saying how much was asked and how
    /// much is left; nothing is reserved on failure.
    pub fn try_reserve(&self, bytes: u64) -> Result<()> {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let left = self.total.saturating_sub(used);
            if bytes > left {
                return Err(KvdexError::Budget {
                    asked: bytes,
                    left,
                    budget: self.total,
                });
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    /// Returns `bytes` reserved earlier.
    pub fn release(&self, bytes: u64) {
        let prev = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(
            prev >= bytes,
            "released {bytes} bytes but only {prev} were reserved"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_refuses_past_the_total_and_says_how_much() {
        let b = Budget::new(100);
        b.try_reserve(60).unwrap();
        match b.try_reserve(50) {
            Err(KvdexError::Budget {
                asked,
                left,
                budget,
            }) => assert_eq!((asked, left, budget), (50, 40, 100)),
            other => panic!("expected a budget error, got {other:?}"),
        }
        assert_eq!(b.used(), 60);
        b.try_reserve(40).unwrap();
        assert_eq!(b.left(), 0);
        b.release(100);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let b = std::sync::Arc::new(Budget::new(1000));
        let won: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..100).filter(|_| b.try_reserve(7).is_ok()).count() as u64))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(won, 1000 / 7);
        assert_eq!(b.used(), won * 7);
    }
}

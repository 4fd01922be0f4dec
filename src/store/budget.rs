//! The global memory budget: bytes of K/V storage all sessions may hold together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{KvdexError, Result};

/// What the bytes of the budget are held for, as `/stats` shows them (`budget_parts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// K/V rows (arena capacity) and training queries staged by seal parts.
    Store,
    /// Shared-memory region files, one per session.
    Regions,
    /// The per-connection arena of each data-socket connection.
    SocketArenas,
}

impl Part {
    /// Every part, in `/stats` order.
    pub const ALL: [Part; 3] = [Part::Store, Part::Regions, Part::SocketArenas];

    /// The part's name in `/stats`.
    pub fn name(self) -> &'static str {
        match self {
            Part::Store => "store",
            Part::Regions => "regions",
            Part::SocketArenas => "socket_arenas",
        }
    }
}

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
    /// Bytes held per [`Part`] (they add up to `used`).
    parts: [AtomicU64; 3],
    /// The most K/V bytes one session may hold (`memory.session_quota_bytes`).
    session_quota: u64,
}

impl Budget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Self {
        Self {
            total,
            used: AtomicU64::new(0),
            parts: Default::default(),
            session_quota: u64::MAX,
        }
    }

    /// This budget, with one session holding at most `quota` bytes of K/V rows (0: no quota
    /// beyond the budget).
    pub fn with_session_quota(mut self, quota: u64) -> Self {
        self.session_quota = if quota == 0 { u64::MAX } else { quota };
        self
    }

    /// The most K/V bytes one session may hold.
    pub fn session_quota(&self) -> u64 {
        self.session_quota
    }

    /// Bytes held for each part, in [`Part::ALL`] order.
    pub fn parts(&self) -> [(Part, u64); 3] {
        Part::ALL.map(|p| (p, self.parts[p as usize].load(Ordering::Acquire)))
    }

    /// Reserves `bytes` for `part` until the returned guard drops.
    pub fn reserve_owned(self: &Arc<Self>, part: Part, bytes: u64) -> Result<Reservation> {
        self.try_reserve_part(part, bytes)?;
        Ok(Reservation {
            budget: self.clone(),
            part,
            bytes,
        })
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
        self.try_reserve_part(Part::Store, bytes)
    }

    /// [`Budget::try_reserve`] for `part`.
    pub fn try_reserve_part(&self, part: Part, bytes: u64) -> Result<()> {
        self.reserve_total(bytes)?;
        self.parts[part as usize].fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    fn reserve_total(&self, bytes: u64) -> Result<()> {
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

    /// Returns `bytes` reserved earlier with [`Budget::try_reserve`].
    pub fn release(&self, bytes: u64) {
        self.release_part(Part::Store, bytes);
    }

    /// Returns `bytes` reserved earlier for `part`.
    pub fn release_part(&self, part: Part, bytes: u64) {
        self.parts[part as usize].fetch_sub(bytes, Ordering::AcqRel);
        let prev = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(
            prev >= bytes,
            "released {bytes} bytes but only {prev} were reserved"
        );
    }
}

/// Bytes reserved for one [`Part`] by one owner (a region, a socket connection), returned to
/// the budget when it drops.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    part: Part,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release_part(self.part, self.bytes);
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

#[cfg(test)]
mod part_tests {
    use super::*;

    /// Parts add up to `used`; a reservation returns its bytes when it drops; a part past the
    /// budget is refused like any other reservation.
    #[test]
    fn parts_add_up_and_reservations_return_their_bytes() {
        let b = Arc::new(Budget::new(1000));
        b.try_reserve(100).unwrap();
        let r = b.reserve_owned(Part::Regions, 300).unwrap();
        let s = b.reserve_owned(Part::SocketArenas, 200).unwrap();
        assert_eq!(b.used(), 600);
        assert_eq!(
            b.parts().map(|(_, n)| n),
            [100, 300, 200],
            "store, regions, socket arenas"
        );
        assert!(b.reserve_owned(Part::Regions, 401).is_err());
        drop(r);
        drop(s);
        b.release(100);
        assert_eq!((b.used(), b.parts().map(|(_, n)| n)), (0, [0, 0, 0]));
    }
}

//! Counting the gathers that still read an arena or write a destination, so that freeing either
//! waits for them instead of leaving a copy pointing into released memory.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// A count of in-flight uses with a wait-for-zero. Shared (`Arc`) between the owner of some
/// memory and the gathers that use it.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: Mutex<usize>,
    zero: Condvar,
}

/// One in-flight use; dropping it ends the use.
#[derive(Debug)]
pub(crate) struct Use(Arc<InFlight>);

impl InFlight {
    /// Starts a use that lasts until the returned guard drops.
    pub(crate) fn begin(this: &Arc<InFlight>) -> Use {
        *this.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Use(this.clone())
    }

    /// Waits until no use is in flight, then starts one: uses begun this way never overlap, so
    /// gathers into one destination land in submission order.
    pub(crate) fn begin_exclusive(this: &Arc<InFlight>) -> Use {
        let mut n = this.count.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            n = this.zero.wait(n).unwrap_or_else(PoisonError::into_inner);
        }
        *n += 1;
        Use(this.clone())
    }

    /// Blocks until no use is in flight.
    pub(crate) fn wait_idle(&self) {
        let mut n = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            n = self.zero.wait(n).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Uses in flight now.
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Use {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(PoisonError::into_inner);
        *n -= 1;
        if *n == 0 {
            self.0.zero.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_idle_returns_once_every_use_ends() {
        let f = Arc::new(InFlight::default());
        let u = InFlight::begin(&f);
        assert_eq!(f.live(), 1);
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(u);
        });
        f.wait_idle();
        assert_eq!(f.live(), 0);
        t.join().unwrap();
    }
}

//! The plain-memory backend.

use std::sync::Arc;

use crate::arena::AllocTracker;
use crate::{AllocStats, Arena, DeviceLink, TransferError};

/// Host-only [`DeviceLink`]: arenas in ordinary memory, gathers by CPU copies.
#[derive(Debug, Default)]
pub struct HostLink {
    tracker: Arc<AllocTracker>,
}

impl HostLink {
    /// A new host backend with its own allocation counters.
    pub fn new() -> Self {
        Self::default()
    }
}

impl DeviceLink for HostLink {
    fn name(&self) -> &'static str {
        "host"
    }
    fn alloc_arena(&self, bytes: usize) -> Result<Arena, TransferError> {
        Arena::host(bytes, self.tracker.clone())
    }
    fn stats(&self) -> AllocStats {
        self.tracker.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arenas_are_counted_and_released() {
        let link = HostLink::new();
        let a = link.alloc_arena(4096).unwrap();
        assert_eq!(a.as_ptr() as usize % 64, 0);
        assert_eq!(link.stats(), AllocStats { arenas: 1, bytes: 4096 });
        drop(a);
        assert_eq!(link.stats(), AllocStats::default());
    }
}

//! The table of registered destinations: handles, the stale-handle check, live counts, and
//! waiting out in-flight gathers before a destination is released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::inflight::{InFlight, Use};
use crate::{DestId, TransferError};

/// Live registrations: how many, and the bytes they span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestStats {
    /// Destinations registered and not yet unregistered.
    pub destinations: u64,
    /// Bytes those destinations span.
    pub bytes: u64,
}

struct Entry<K> {
    kind: K,
    len: u64,
    in_flight: Arc<InFlight>,
}

struct Inner<K> {
    /// The next handle to issue. Handles are never reused, so an old one is known to be stale.
    next: u64,
    live: HashMap<u64, Entry<K>>,
    bytes: u64,
}

/// Registered destinations of one backend; `K` is what the backend needs to write there.
pub(crate) struct Registry<K> {
    inner: Mutex<Inner<K>>,
}

impl<K: Copy> Registry<K> {
    pub(crate) fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                next: 1,
                live: HashMap::new(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn missing(inner: &Inner<K>, id: DestId) -> TransferError {
        if id.0 == 0 || id.0 >= inner.next {
            TransferError::UnknownDestination(id.0)
        } else {
            TransferError::StaleDestination(id.0)
        }
    }

    /// Records a destination of `len` bytes and issues its handle.
    pub(crate) fn insert(&self, kind: K, len: u64) -> DestId {
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        inner.bytes += len;
        inner.live.insert(
            id,
            Entry {
                kind,
                len,
                in_flight: Default::default(),
            },
        );
        DestId(id)
    }

    /// Looks a handle up and starts a use of it; the use excludes every other gather into the
    /// same destination until it ends (see [`InFlight::begin_exclusive`]).
    pub(crate) fn begin_gather(&self, id: DestId) -> Result<(K, u64, Use), TransferError> {
        let (kind, len, flight) = {
            let inner = self.lock();
            let e = inner
                .live
                .get(&id.0)
                .ok_or_else(|| Self::missing(&inner, id))?;
            (e.kind, e.len, e.in_flight.clone())
        };
        Ok((kind, len, InFlight::begin_exclusive(&flight)))
    }

    /// Forgets a handle, waits for gathers still writing there, and hands back what the
    /// backend must release. A second call with the same handle is a `StaleDestination`.
    pub(crate) fn remove(&self, id: DestId) -> Result<K, TransferError> {
        let entry = {
            let mut inner = self.lock();
            let e = inner
                .live
                .remove(&id.0)
                .ok_or_else(|| Self::missing(&inner, id))?;
            inner.bytes -= e.len;
            e
        };
        entry.in_flight.wait_idle();
        Ok(entry.kind)
    }

    /// Every live handle, for a backend that releases everything when it is dropped.
    pub(crate) fn drain(&self) -> Vec<K> {
        let entries: Vec<Entry<K>> = {
            let mut inner = self.lock();
            inner.bytes = 0;
            inner.live.drain().map(|(_, e)| e).collect()
        };
        entries
            .into_iter()
            .map(|e| {
                e.in_flight.wait_idle();
                e.kind
            })
            .collect()
    }

    pub(crate) fn stats(&self) -> DestStats {
        let inner = self.lock();
        DestStats {
            destinations: inner.live.len() as u64,
            bytes: inner.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_unknown_live_then_stale() {
        let r = Registry::<u32>::new();
        assert!(matches!(
            r.begin_gather(DestId(1)),
            Err(TransferError::UnknownDestination(1))
        ));
        let a = r.insert(10, 100);
        let b = r.insert(20, 200);
        assert_eq!(
            r.stats(),
            DestStats {
                destinations: 2,
                bytes: 300
            }
        );
        let (kind, len, guard) = r.begin_gather(a).unwrap();
        assert_eq!((kind, len), (10, 100));
        drop(guard);
        assert_eq!(r.remove(a).unwrap(), 10);
        let e = r.remove(a).unwrap_err();
        assert!(
            matches!(e, TransferError::StaleDestination(_)),
            "double unregister: {e}"
        );
        assert!(matches!(
            r.begin_gather(a),
            Err(TransferError::StaleDestination(_))
        ));
        assert!(matches!(
            r.remove(DestId(99)),
            Err(TransferError::UnknownDestination(99))
        ));
        assert_eq!(r.drain(), vec![20]);
        assert_eq!(r.stats(), DestStats::default());
        let _ = b;
    }
}

//! Completion of submitted gathers: a ticket per gather, completed by whoever finishes the copy
//! (a pool thread, or a CUDA host callback), collected once by `poll` or `wait`.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::{Ticket, TransferError};

/// Most tickets submitted and not yet collected. When the table is full, completed tickets
/// nobody collected (say, of a client that died) are dropped to make room; only if every
/// entry is still in flight does `submit` refuse. So the table never grows without bound and
/// a dead session's tickets cannot wedge it.
pub const MAX_IN_FLIGHT: usize = 4096;

struct Inner {
    next: u64,
    /// ticket -> done?
    pending: HashMap<u64, bool>,
}

/// The ticket table of one backend.
pub(crate) struct Tickets {
    inner: Mutex<Inner>,
    done: Condvar,
}

impl Tickets {
    pub(crate) fn new() -> Self {
        let pending = HashMap::with_capacity(MAX_IN_FLIGHT);
        Self {
            inner: Mutex::new(Inner { next: 1, pending }),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Issues a ticket, pending, or complete already when `done`.
    pub(crate) fn submit(&self, done: bool) -> Result<Ticket, TransferError> {
        let mut inner = self.lock();
        if inner.pending.len() >= MAX_IN_FLIGHT {
            inner.pending.retain(|_, done| !*done);
        }
        if inner.pending.len() >= MAX_IN_FLIGHT {
            return Err(TransferError::TooManyInFlight(MAX_IN_FLIGHT));
        }
        let id = inner.next;
        inner.next += 1;
        inner.pending.insert(id, done);
        Ok(Ticket(id))
    }

    /// Marks a ticket complete and wakes its waiters.
    pub(crate) fn complete(&self, t: Ticket) {
        if let Some(done) = self.lock().pending.get_mut(&t.0) {
            *done = true;
        }
        self.done.notify_all();
    }

    /// True (and the ticket is collected) when complete; false while in flight.
    pub(crate) fn poll(&self, t: Ticket) -> Result<bool, TransferError> {
        let mut inner = self.lock();
        match inner.pending.get(&t.0) {
            None => Err(TransferError::UnknownTicket(t.0)),
            Some(false) => Ok(false),
            Some(true) => {
                inner.pending.remove(&t.0);
                Ok(true)
            }
        }
    }

    /// Blocks until the ticket completes, then collects it.
    pub(crate) fn wait(&self, t: Ticket) -> Result<(), TransferError> {
        let mut inner = self.lock();
        loop {
            match inner.pending.get(&t.0) {
                None => return Err(TransferError::UnknownTicket(t.0)),
                Some(true) => {
                    inner.pending.remove(&t.0);
                    return Ok(());
                }
                Some(false) => {
                    inner = self
                        .done
                        .wait(inner)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Forgets a ticket whose gather failed before it was fully submitted.
    pub(crate) fn cancel(&self, t: Ticket) {
        self.lock().pending.remove(&t.0);
        self.done.notify_all();
    }

    /// Tickets submitted and not collected.
    pub(crate) fn outstanding(&self) -> usize {
        self.lock().pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_complete_once_and_are_collected_once() {
        let t = Tickets::new();
        let a = t.submit(false).unwrap();
        assert!(!t.poll(a).unwrap());
        t.complete(a);
        assert!(t.poll(a).unwrap());
        assert!(matches!(t.poll(a), Err(TransferError::UnknownTicket(_))));
        let b = t.submit(true).unwrap();
        t.wait(b).unwrap();
        assert!(matches!(t.wait(b), Err(TransferError::UnknownTicket(_))));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn uncollected_tickets_are_bounded() {
        let t = Tickets::new();
        let first = t.submit(true).unwrap();
        for _ in 1..MAX_IN_FLIGHT {
            t.submit(false).unwrap();
        }
        // Full: the one completed, uncollected ticket is dropped to make room.
        let last = t.submit(false).unwrap();
        assert!(matches!(
            t.poll(first),
            Err(TransferError::UnknownTicket(_))
        ));
        assert_eq!(t.outstanding(), MAX_IN_FLIGHT);
        // Full of gathers still in flight: refused.
        assert!(matches!(
            t.submit(true),
            Err(TransferError::TooManyInFlight(_))
        ));
        t.complete(last);
        assert!(t.submit(true).is_ok());
    }
}

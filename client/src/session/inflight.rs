//! Requests submitted without waiting (an asynchronous retrieve): which part of the payload
//! arena each one owns until its results are read, and the completions that arrived while the
//! client waited for another request.
//!
//! The worker serves a region's requests in order, one at a time, so several may be in flight
//! as long as none writes where another's request or response lies. Each request submitted
//! without waiting takes a slot of the arena, placed after the slots still held; a request
//! that waits at once (every other call) uses the free arena after them. A slot is released
//! when its request is waited on, and the arena is reused from its start once no slot is held,
//! which is the steady state of an engine that submits a layer's retrieve, computes, and waits
//! for it before the next layer's.

use kvdex_wire::shm::Descriptor;

/// The arena range a request in flight owns: its body, then its response space.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u64,
    end: usize,
}

/// A completion popped from the ring, with its error message (empty on success).
#[derive(Clone, Debug)]
pub(crate) struct Finished {
    pub(crate) desc: Descriptor,
    pub(crate) message: String,
}

/// The slots held and the completions set aside, per session handle.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    held: Vec<Slot>,
    finished: Vec<Finished>,
}

impl Slots {
    /// Where the free arena starts: after the last slot held, 0 when none is.
    pub(crate) fn free_start(&self) -> usize {
        self.held.iter().map(|s| s.end).max().unwrap_or(0)
    }

    /// Requests in flight (or finished, not yet waited on).
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    /// Records that request `id` owns the arena up to `end` until it is waited on.
    pub(crate) fn hold(&mut self, id: u64, end: usize) {
        self.held.push(Slot { id, end });
    }

    /// True when `id` holds a slot.
    pub(crate) fn holds(&self, id: u64) -> bool {
        self.held.iter().any(|s| s.id == id)
    }

    /// Releases `id`'s slot (its results were read, or it failed).
    pub(crate) fn release(&mut self, id: u64) {
        self.held.retain(|s| s.id != id);
        self.finished.retain(|f| f.desc.request_id != id);
    }

    /// Keeps a completion for its request's wait.
    pub(crate) fn set_aside(&mut self, done: Finished) {
        self.finished.push(done);
    }

    /// True when `id`'s completion was set aside.
    pub(crate) fn is_finished(&self, id: u64) -> bool {
        self.finished.iter().any(|f| f.desc.request_id == id)
    }

    /// Takes `id`'s completion if it was set aside.
    pub(crate) fn take_finished(&mut self, id: u64) -> Option<Finished> {
        let i = self.finished.iter().position(|f| f.desc.request_id == id)?;
        Some(self.finished.swap_remove(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_free_arena_starts_after_the_held_slots_and_comes_back_when_all_are_released() {
        let mut s = Slots::default();
        assert_eq!(s.free_start(), 0);
        s.hold(1, 4096);
        s.hold(2, 9000);
        assert_eq!((s.free_start(), s.len()), (9000, 2));
        s.release(2);
        assert_eq!(s.free_start(), 4096, "the later slot went first");
        s.set_aside(Finished {
            desc: Descriptor {
                request_id: 1,
                ..Default::default()
            },
            message: String::new(),
        });
        assert!(s.is_finished(1) && s.holds(1));
        assert!(s.take_finished(1).is_some());
        assert!(s.take_finished(1).is_none());
        s.release(1);
        assert_eq!((s.free_start(), s.len()), (0, 0));
    }
}

//! Single-producer single-consumer rings of [`Descriptor`]s.
//!
//! The ring lives in shared memory: a head (next index to write, owned by the producer), a tail
//! (next index to read, owned by the consumer) and `2^n` slots of atomically accessed words.
//! Indices are free-running `u64`s; the slot is `index & (slots - 1)`.
//!
//! Each side keeps its own index in a local [`ProducerState`]/[`ConsumerState`] and only ever
//! *stores* it to the shared ring; it reads only the other side's index. So a peer that
//! scribbles on the header cannot move our own position, and any impossible distance between
//! the two indices (the other side claiming more than a ring's worth, or going backwards) is
//! reported as a [`RingError`] instead of being trusted.
//!
//! Ordering: the producer writes the slot's words (relaxed), then publishes the head with
//! release; the consumer loads the head with acquire, then reads the words. The consumer
//! releases the tail after copying the slot out, and the producer acquires it before reusing
//! the slot. The code is entirely safe Rust over atomic words, generic over [`RingWord`]: in the
//! daemon and the client the words are `AtomicU64`s in the shared mapping; in
//! `tests/loom_ring.rs` they are loom's atomics, so the loom model checker explores every
//! interleaving and weak-memory outcome of this same code.

use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{Descriptor, SLOT_WORDS};

/// One atomic 64-bit word of a ring: its indices and its slots' words.
pub trait RingWord: Sync {
    /// Atomically loads the word.
    fn load(&self, order: Ordering) -> u64;
    /// Atomically stores `value`.
    fn store(&self, value: u64, order: Ordering);
}

impl RingWord for AtomicU64 {
    #[inline]
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    #[inline]
    fn store(&self, value: u64, order: Ordering) {
        AtomicU64::store(self, value, order)
    }
}

/// A ring index that cannot be right.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{ring} ring index corrupted: head {head}, tail {tail}, capacity {capacity}")]
pub struct RingError {
    /// "submission" or "completion".
    pub ring: &'static str,
    /// Head as seen.
    pub head: u64,
    /// Tail as seen.
    pub tail: u64,
    /// Slots in the ring.
    pub capacity: u64,
}

/// A view of one ring in (shared) memory.
pub struct RingRef<'a, W: RingWord = AtomicU64> {
    name: &'static str,
    head: &'a W,
    tail: &'a W,
    slots: &'a [[W; SLOT_WORDS]],
}

impl<W: RingWord> Clone for RingRef<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W: RingWord> Copy for RingRef<'_, W> {}

impl<'a, W: RingWord> RingRef<'a, W> {
    /// A ring over `slots` (whose length must be a power of two) with the given indices.
    /// Returns `None` if the slot count is not a power of two.
    pub fn new(
        name: &'static str,
        head: &'a W,
        tail: &'a W,
        slots: &'a [[W; SLOT_WORDS]],
    ) -> Option<Self> {
        slots.len().is_power_of_two().then_some(Self {
            name,
            head,
            tail,
            slots,
        })
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    fn slot(&self, index: u64) -> &[W; SLOT_WORDS] {
        &self.slots[(index & (self.capacity() - 1)) as usize]
    }

    fn check(&self, head: u64, tail: u64) -> Result<u64, RingError> {
        let used = head.wrapping_sub(tail);
        if used > self.capacity() {
            return Err(RingError {
                ring: self.name,
                head,
                tail,
                capacity: self.capacity(),
            });
        }
        Ok(used)
    }

    /// True when the ring holds at least one entry past `tail` (for wait conditions; a
    /// corrupted index also counts as "something to look at").
    pub fn has_entries_after(&self, tail: u64) -> bool {
        self.head.load(Ordering::Acquire) != tail
    }
}

/// The producer's private position.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProducerState {
    head: u64,
}

impl ProducerState {
    /// Starts at the ring's current head (zero for a fresh region).
    pub fn new<W: RingWord>(ring: &RingRef<'_, W>) -> Self {
        Self {
            head: ring.head.load(Ordering::Relaxed),
        }
    }

    /// Index the next push will use.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Writes `d` into the next slot and publishes it. `Ok(false)` when the ring is full.
    pub fn try_push<W: RingWord>(
        &mut self,
        ring: &RingRef<'_, W>,
        d: &Descriptor,
    ) -> Result<bool, RingError> {
        let tail = ring.tail.load(Ordering::Acquire);
        // A tail ahead of our head (entries read that were never written) wraps to a huge
        // distance and fails the check, as does one more than a ring behind.
        if ring.check(self.head, tail)? == ring.capacity() {
            return Ok(false);
        }
        let slot = ring.slot(self.head);
        for (w, v) in slot.iter().zip(d.to_words()) {
            w.store(v, Ordering::Relaxed);
        }
        self.head = self.head.wrapping_add(1);
        ring.head.store(self.head, Ordering::Release);
        Ok(true)
    }

    /// Entries pushed but not yet consumed, as the consumer's tail says.
    pub fn in_flight<W: RingWord>(&self, ring: &RingRef<'_, W>) -> Result<u64, RingError> {
        ring.check(self.head, ring.tail.load(Ordering::Acquire))
    }
}

/// The consumer's private position.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsumerState {
    tail: u64,
}

impl ConsumerState {
    /// Starts at the ring's current tail (zero for a fresh region).
    pub fn new<W: RingWord>(ring: &RingRef<'_, W>) -> Self {
        Self {
            tail: ring.tail.load(Ordering::Relaxed),
        }
    }

    /// Index the next pop will read.
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Copies the next entry out of the ring and frees its slot. `Ok(None)` when empty.
    pub fn try_pop<W: RingWord>(
        &mut self,
        ring: &RingRef<'_, W>,
    ) -> Result<Option<(u64, Descriptor)>, RingError> {
        let head = ring.head.load(Ordering::Acquire);
        if ring.check(head, self.tail)? == 0 {
            return Ok(None);
        }
        let index = self.tail;
        let slot = ring.slot(index);
        let mut words = [0u64; SLOT_WORDS];
        for (v, w) in words.iter_mut().zip(slot.iter()) {
            *v = w.load(Ordering::Relaxed);
        }
        self.tail = self.tail.wrapping_add(1);
        ring.tail.store(self.tail, Ordering::Release);
        Ok(Some((index, Descriptor::from_words(words))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::layout::SlotWords;

    fn slots(n: usize) -> Vec<SlotWords> {
        (0..n).map(|_| Default::default()).collect()
    }

    fn desc(id: u64) -> Descriptor {
        Descriptor {
            request_id: id,
            code: 1,
            in_len: id * 8,
            ..Default::default()
        }
    }

    #[test]
    fn fifo_order_wraps_and_reports_full() {
        let (head, tail, s) = (AtomicU64::new(0), AtomicU64::new(0), slots(4));
        let ring = RingRef::new("test", &head, &tail, &s).unwrap();
        let (mut p, mut c) = (ProducerState::new(&ring), ConsumerState::new(&ring));
        let mut next = 0;
        for round in 0..5u64 {
            for i in 0..4 {
                assert!(p.try_push(&ring, &desc(round * 4 + i)).unwrap());
            }
            assert!(
                !p.try_push(&ring, &desc(99)).unwrap(),
                "fifth push must see a full ring"
            );
            assert_eq!(p.in_flight(&ring).unwrap(), 4);
            while let Some((idx, d)) = c.try_pop(&ring).unwrap() {
                assert_eq!(idx, next);
                assert_eq!(d, desc(next));
                next += 1;
            }
        }
        assert_eq!(next, 20);
    }

    #[test]
    fn indices_wrap_around_u64() {
        let start = u64::MAX - 2;
        let (head, tail, s) = (AtomicU64::new(start), AtomicU64::new(start), slots(2));
        let ring = RingRef::new("test", &head, &tail, &s).unwrap();
        let (mut p, mut c) = (ProducerState::new(&ring), ConsumerState::new(&ring));
        for i in 0..6 {
            assert!(p.try_push(&ring, &desc(i)).unwrap());
            assert_eq!(c.try_pop(&ring).unwrap().unwrap().1, desc(i));
        }
    }

    #[test]
    fn consumer_detects_head_beyond_capacity() {
        let (head, tail, s) = (AtomicU64::new(0), AtomicU64::new(0), slots(4));
        let ring = RingRef::new("submission", &head, &tail, &s).unwrap();
        let mut c = ConsumerState::new(&ring);
        head.store(5, Ordering::Release);
        let e = c.try_pop(&ring).unwrap_err();
        assert_eq!((e.head, e.tail, e.capacity), (5, 0, 4));
        head.store(u64::MAX, Ordering::Release); // "behind" the tail
        assert!(c.try_pop(&ring).is_err());
    }

    #[test]
    fn producer_detects_tail_ahead_of_head() {
        let (head, tail, s) = (AtomicU64::new(0), AtomicU64::new(0), slots(4));
        let ring = RingRef::new("completion", &head, &tail, &s).unwrap();
        let mut p = ProducerState::new(&ring);
        assert!(p.try_push(&ring, &desc(1)).unwrap());
        tail.store(3, Ordering::Release);
        assert!(p.try_push(&ring, &desc(2)).is_err());
    }

    #[test]
    fn rejects_non_power_of_two() {
        let (head, tail, s) = (AtomicU64::new(0), AtomicU64::new(0), slots(3));
        assert!(RingRef::new("test", &head, &tail, &s).is_none());
    }

    #[test]
    fn two_threads_pass_every_entry_in_order() {
        let (head, tail, s) = (AtomicU64::new(0), AtomicU64::new(0), slots(8));
        let ring = RingRef::new("test", &head, &tail, &s).unwrap();
        let n: u64 = if cfg!(miri) { 200 } else { 20_000 };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut p = ProducerState::new(&ring);
                for i in 0..n {
                    while !p.try_push(&ring, &desc(i)).unwrap() {
                        std::hint::spin_loop();
                    }
                }
            });
            let mut c = ConsumerState::new(&ring);
            let mut next = 0;
            while next < n {
                match c.try_pop(&ring).unwrap() {
                    Some((_, d)) => {
                        assert_eq!(d, desc(next));
                        next += 1;
                    }
                    None => std::hint::spin_loop(),
                }
            }
        });
    }
}

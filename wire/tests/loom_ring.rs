//! Loom model checks of the shared-memory submission/completion ring (`kvdex::shm::ring`).
//!
//! The ring's code is generic over its atomic word, so these tests run the daemon's own
//! `ProducerState::try_push` / `ConsumerState::try_pop` over loom's atomics. loom explores every
//! interleaving of the two threads and the weak-memory outcomes that the orderings allow, so a
//! relaxed store where a release is needed shows up as a torn or stale descriptor here.

use std::sync::atomic::Ordering;

use kvdex_wire::shm::layout::{Descriptor, SLOT_WORDS};
use kvdex_wire::shm::{ConsumerState, ProducerState, RingRef, RingWord};
use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;

/// loom's atomic as a ring word.
struct Word(AtomicU64);

impl RingWord for Word {
    fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
    fn store(&self, value: u64, order: Ordering) {
        self.0.store(value, order)
    }
}

/// A ring's memory: head, tail and `slots` slots of zeroed words.
struct RingMem {
    head: Word,
    tail: Word,
    slots: Vec<[Word; SLOT_WORDS]>,
}

impl RingMem {
    fn new(slots: usize) -> Self {
        Self {
            head: Word(AtomicU64::new(0)),
            tail: Word(AtomicU64::new(0)),
            slots: (0..slots)
                .map(|_| std::array::from_fn(|_| Word(AtomicU64::new(0))))
                .collect(),
        }
    }

    fn ring(&self) -> RingRef<'_, Word> {
        RingRef::new("model", &self.head, &self.tail, &self.slots).expect("power-of-two slot count")
    }
}

/// A descriptor whose every word is derived from `id`, so a torn read shows.
fn desc(id: u64) -> Descriptor {
    Descriptor {
        request_id: id,
        code: id as u32 + 1,
        aux: id as u32 + 2,
        in_offset: id * 3,
        in_len: id * 5,
        out_offset: id * 7,
        out_len: id * 11,
        reserved: [id * 13, id * 17],
    }
}

/// Producer and consumer on two threads over a ring smaller than the entries sent: every entry
/// arrives once, in order, whole; the producer sees "full" instead of overwriting an unread slot.
#[test]
fn spsc_ring_delivers_every_entry_whole_and_in_order() {
    const ENTRIES: u64 = 3;
    loom::model(|| {
        let mem = Arc::new(RingMem::new(2));
        let producer = {
            let mem = mem.clone();
            loom::thread::spawn(move || {
                let ring = mem.ring();
                let mut p = ProducerState::new(&ring);
                for id in 1..=ENTRIES {
                    while !p.try_push(&ring, &desc(id)).expect("no corruption") {
                        loom::thread::yield_now();
                    }
                }
            })
        };
        let ring = mem.ring();
        let mut c = ConsumerState::new(&ring);
        let mut next = 1;
        while next <= ENTRIES {
            match c.try_pop(&ring).expect("no corruption") {
                Some((index, d)) => {
                    assert_eq!(index, next - 1);
                    assert_eq!(d, desc(next), "entry {next} read torn or stale");
                    next += 1;
                }
                None => loom::thread::yield_now(),
            }
        }
        producer.join().expect("producer thread");
    });
}

/// The producer's count of entries in flight never exceeds the ring and never goes backwards
/// while the consumer drains concurrently.
#[test]
fn in_flight_stays_within_capacity_while_draining() {
    loom::model(|| {
        let mem = Arc::new(RingMem::new(2));
        let ring = mem.ring();
        let mut p = ProducerState::new(&ring);
        assert!(p.try_push(&ring, &desc(1)).expect("push"));
        assert!(p.try_push(&ring, &desc(2)).expect("push"));
        let consumer = {
            let mem = mem.clone();
            loom::thread::spawn(move || {
                let ring = mem.ring();
                let mut c = ConsumerState::new(&ring);
                let mut got = 0;
                while got < 2 {
                    if c.try_pop(&ring).expect("pop").is_some() {
                        got += 1;
                    } else {
                        loom::thread::yield_now();
                    }
                }
            })
        };
        let mut last = u64::MAX;
        loop {
            let n = p.in_flight(&ring).expect("in flight");
            assert!(n <= 2 && n <= last, "in flight {n} after {last}");
            last = n;
            if n == 0 {
                break;
            }
            loom::thread::yield_now();
        }
        consumer.join().expect("consumer thread");
    });
}

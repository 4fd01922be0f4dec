//! The client's choice, after waking a parked worker, between spinning and parking: a small
//! policy with its own state and test, apart from the request loop that consults it.

use std::time::{Duration, Instant};

/// Whether the client spins or parks after waking a parked worker (a cold request).
///
/// Spinning saves the client a futex wake-up of its own, but only when the worker gets another
/// core: on a busy 2-core machine the woken worker is queued behind the spinner, and a spin
/// costs its whole length (measured: cold p50 19 us parking at once, 92-129 us spinning, under
/// load 10). So the client spins with [`wait::wait_watching`](kvdex_wire::shm::wait::wait_watching) (the worker must take the request
/// within `wake_grace`) and remembers whether the worker showed up: after a late worker it
/// parks at once, and probes again every [`AfterWake::REPROBE`] cold requests.
///
/// That memory applies to cold requests only. A worker found parked although this client's
/// previous request completed less than a spin ago did not go idle: it parked because the
/// client itself came back late once (a wake-up it had to wait for, or a lost core). Parking
/// at once then makes every next request pay two wake-ups in series, a chain that lasts as
/// long as the traffic does (seen as runs of hundreds of 50-150 us round trips in hot runs
/// after a cold phase). Mid-stream the client therefore always spins while the woken worker
/// runs ([`AfterWake::streaming`]).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct AfterWake {
    /// The worker came late last time: park at once.
    park: bool,
    /// Cold requests since the last probe while parking.
    since_probe: u32,
    /// When the previous request's completion arrived.
    last_done: Option<Instant>,
}

impl AfterWake {
    /// Cold requests between two probes while parking (a probe can cost a `wake_grace`).
    const REPROBE: u32 = 128;

    /// True to spin (with the worker watched) after this wake-up.
    pub(super) fn spin(&mut self) -> bool {
        if !self.park {
            return true;
        }
        self.since_probe += 1;
        if self.since_probe >= Self::REPROBE {
            self.since_probe = 0;
            return true;
        }
        false
    }

    /// The outcome of a spin: whether the worker was late.
    pub(super) fn record(&mut self, late: bool) {
        self.park = late;
    }

    /// Notes that a completion arrived now (every request, hot or cold).
    pub(super) fn completed(&mut self) {
        self.last_done = Some(Instant::now());
    }

    /// True when the previous completion arrived less than `spin` ago: the client is sending
    /// back to back, so a parked worker is a broken hot streak, not an idle one.
    pub(super) fn streaming(&self, spin: Duration) -> bool {
        self.last_done.is_some_and(|t| t.elapsed() < spin)
    }
}

#[cfg(test)]
mod tests {
    use super::AfterWake;
    use std::time::{Duration, Instant};

    #[test]
    fn after_a_late_worker_the_client_parks_and_probes_again_later() {
        let mut a = AfterWake::default();
        assert!(a.spin(), "spins until a worker is seen late");
        a.record(true);
        let spins = (0..AfterWake::REPROBE).filter(|_| a.spin()).count();
        assert_eq!(spins, 1, "one probe per REPROBE cold requests");
        a.record(false);
        assert!(
            a.spin() && a.spin(),
            "a punctual worker brings the spin back"
        );
    }

    #[test]
    fn a_client_sending_back_to_back_is_streaming_until_a_spin_has_passed() {
        let mut a = AfterWake::default();
        let spin = Duration::from_millis(50);
        assert!(
            !a.streaming(spin),
            "no completion yet: a cold first request"
        );
        a.record(true);
        a.last_done = Some(Instant::now());
        assert!(
            a.streaming(spin),
            "right after a completion, even after a late worker"
        );
        a.last_done = Instant::now().checked_sub(2 * spin);
        assert!(!a.streaming(spin), "a gap longer than the spin is cold");
    }
}

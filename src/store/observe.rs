//! How a store reports its background index work: builds started and ended, and keys inserted
//! incrementally. The daemon implements [`BuildObserver`] with prometheus
//! ([`crate::metrics::Metrics`]); tools and tests keep the default, which records nothing.
//!
//! Gauges of the store's state (layers building, index bytes, staged training positions,
//! engine destinations) are not reported here: the daemon reads them from its sessions at each
//! scrape ([`super::Session::decode_gauges`]), so they are never stale and cost nothing
//! between scrapes.

use std::sync::Arc;
use std::time::Instant;

/// How one layer's index build ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildOutcome {
    /// Every KV head's index is installed.
    Ready,
    /// A KV head's build failed (the layer keeps scanning exactly, or its previous index).
    Failed,
    /// The session ended before the build did; the work was dropped.
    Abandoned,
}

impl BuildOutcome {
    /// Every outcome, for labels created at startup.
    pub const ALL: [BuildOutcome; 3] = [Self::Ready, Self::Failed, Self::Abandoned];

    /// The stable name (the `outcome` label of `kvdex_index_builds_ended_total`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
        }
    }
}

/// Receives the store's background index events. Called from the build pool's threads, never
/// from a request, so an implementation may take its time (within reason).
pub trait BuildObserver: Send + Sync {
    /// A seal queued a layer's build.
    fn build_started(&self);
    /// A layer's build ended `secs` seconds after its seal (time queued included, like the
    /// `secs` of `/stats`).
    fn build_ended(&self, outcome: BuildOutcome, secs: f64);
    /// An incremental insert batch put `keys` keys (one KV head's) into an index.
    fn keys_inserted(&self, keys: u64);
    /// Online recall sampling scored one sampled retrieve ([`super::sampler`]).
    fn quality_sampled(&self, _sample: &super::sampler::QualitySample<'_>) {}
    /// A sampled retrieve was dropped unscored (`reason`: one of
    /// [`super::sampler::DROP_REASONS`]).
    fn sample_dropped(&self, _reason: &'static str) {}
}

/// A [`BuildObserver`] that records nothing (the store's default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopBuildObserver;

impl BuildObserver for NoopBuildObserver {
    fn build_started(&self) {}
    fn build_ended(&self, _: BuildOutcome, _: f64) {}
    fn keys_inserted(&self, _: u64) {}
}

/// Reports a build's end exactly once, however its job leaves: the job calls
/// [`BuildReport::end`] with the outcome it reached, and a job dropped without one (its
/// session ended, or it panicked) reports [`BuildOutcome::Abandoned`].
pub(super) struct BuildReport {
    observer: Arc<dyn BuildObserver>,
    sealed: Instant,
    ended: bool,
}

impl BuildReport {
    /// Reports the start of a build sealed at `sealed`.
    pub(super) fn start(observer: Arc<dyn BuildObserver>, sealed: Instant) -> Self {
        observer.build_started();
        Self {
            observer,
            sealed,
            ended: false,
        }
    }

    /// Reports the build's end now (later calls, and the drop, report nothing).
    pub(super) fn end(&mut self, outcome: BuildOutcome) {
        if !std::mem::replace(&mut self.ended, true) {
            self.observer
                .build_ended(outcome, self.sealed.elapsed().as_secs_f64());
        }
    }
}

impl Drop for BuildReport {
    fn drop(&mut self) {
        self.end(BuildOutcome::Abandoned);
    }
}

/// Scrape-time totals of a session's decode-path state (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeGauges {
    /// Layers whose index build is queued or running.
    pub layers_building: u64,
    /// Bytes held by the layers' indices, beyond the K/V rows.
    pub index_bytes: u64,
    /// Training positions staged by seal parts, waiting for their layers' seals.
    pub staged_positions: u64,
    /// Engine GPU buffers registered as gather destinations.
    pub engine_dests: u64,
}

impl std::ops::AddAssign for DecodeGauges {
    fn add_assign(&mut self, o: Self) {
        self.layers_building += o.layers_building;
        self.index_bytes += o.index_bytes;
        self.staged_positions += o.staged_positions;
        self.engine_dests += o.engine_dests;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl BuildObserver for Log {
        fn build_started(&self) {
            self.0.lock().unwrap().push("started".into());
        }
        fn build_ended(&self, outcome: BuildOutcome, secs: f64) {
            assert!(secs >= 0.0);
            self.0.lock().unwrap().push(outcome.name().into());
        }
        fn keys_inserted(&self, keys: u64) {
            self.0.lock().unwrap().push(format!("inserted {keys}"));
        }
    }

    #[test]
    fn a_report_ends_once_with_the_outcome_reached_or_abandoned() {
        let log = Arc::new(Log::default());
        let mut done = BuildReport::start(log.clone(), Instant::now());
        done.end(BuildOutcome::Failed);
        done.end(BuildOutcome::Ready);
        drop(done);
        drop(BuildReport::start(log.clone(), Instant::now()));
        assert_eq!(
            *log.0.lock().unwrap(),
            ["started", "failed", "started", "abandoned"]
        );
    }
}

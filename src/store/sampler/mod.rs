//! Online recall sampling: the daemon measures its own retrieval quality while it serves.
//!
//! A share of each layer's retrieves (`decode.sample_rate`, or a session's own `sample_rate`)
//! is re-scored exactly in the background: the request's queries, the k each query head got,
//! the adaptive budget's coverage estimates and the chosen ids are copied into a pooled
//! [`Slot`], and a job on the store's build pool scans every key of the layer for the same
//! queries and compares ([`quality::head_figures`], the definition `kvdex bench decode` uses):
//! recall@k, mass recall, and the coverage error (the budget's estimated covered mass minus the
//! exact one). The figures go to the store's observer (the daemon's Prometheus histograms per
//! index kind and layer group) and to the session ([`SessionSampler`], shown in
//! `GET /v1/sessions/{id}`); a layer whose recent mass recall falls below `decode.drift_floor`
//! is logged and, with `decode.drift_rebuild`, re-sealed from the decode queries sampled
//! ([`score`]).
//!
//! The request path pays one atomic add and a hash per retrieve ([`Session::sample_due`]); a
//! sampled one copies its inputs into a slot taken from a bounded pool (its buffers reused once
//! the slot has held a request of that shape; waking an idle scoring job queues one small task
//! on the pool), and is dropped, and counted, when every slot is
//! waiting or while the CPU cap holds: a sample that took `t` seconds to score admits no other
//! for `t / decode.sample_cpu_share` seconds. The scan holds the layer's read lock one chunk of
//! keys at a time, so an append never waits for more than a chunk.
//!
//! # Layout
//! - `config`: [`SamplingConfig`] (the `[decode]` keys).
//! - [`quality`]: the exact figures of one head's retrieved set.
//! - `session`: a session's sampling state and running figures ([`QualityReport`]).
//! - `running`: one figure's count, mean and quantiles ([`Summary`]).
//! - `score`: the background job: the exact scan, the figures, the drift response.

mod config;
pub mod quality;
mod running;
mod score;
mod session;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use crossbeam::queue::ArrayQueue;

pub use config::{Fraction, SamplingConfig};
pub use quality::HeadFigures;
pub use running::Summary;
pub use session::{QualityReport, SessionSampler};

use super::retrieve::{Budget, RetrieveParams, RetrieveStats};
use super::Session;

/// Why a sampled retrieve was not scored, the `reason` label of the dropped counter.
pub const DROP_REASONS: [&str; 2] = ["queue_full", "cpu_cap"];

/// What the observer is told of one scored sample.
#[derive(Clone, Copy, Debug)]
pub struct QualitySample<'a> {
    /// The layer's index kind ("graph", "hnsw", "flat").
    pub kind: &'static str,
    /// The layer sampled.
    pub layer: u32,
    /// Per query head.
    pub heads: &'a [HeadFigures],
    /// Per query head, the adaptive budget's estimated covered mass minus the exact one
    /// (empty for a fixed-k request).
    pub coverage_error: &'a [f64],
}

/// One sampled retrieve's inputs and result, copied off the request path.
#[derive(Default)]
struct Slot {
    session: Weak<Session>,
    layer: u32,
    /// The layer's tokens when the request was answered.
    len: usize,
    scale: f32,
    adaptive: bool,
    stride: usize,
    /// `[q_heads][head_dim]`.
    q: Vec<f32>,
    /// `[q_heads]`: tokens chosen per head.
    k: Vec<u32>,
    /// `[q_heads]`: the budget's estimated covered mass.
    coverage: Vec<f32>,
    /// `[q_heads][stride]`: the candidates, best first (the first `k[h]` are chosen).
    ids: Vec<u32>,
}

/// The pool of slots: free ones and those waiting to be scored (made on first use, so that a
/// store that never samples holds none).
struct Queues {
    free: ArrayQueue<Box<Slot>>,
    pending: ArrayQueue<Box<Slot>>,
}

/// The store-wide sampler: the slot pool, the scoring job's state and the CPU cap.
pub(in crate::store) struct Sampler {
    queues: OnceLock<Queues>,
    /// A scoring job is queued or running on the build pool.
    draining: AtomicBool,
    epoch: Instant,
    /// Nanoseconds after `epoch` before which no sample is admitted (the CPU cap).
    next_admit_ns: AtomicU64,
    /// The scoring job's buffers (one job runs at a time).
    scratch: Mutex<score::ScoreScratch>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            queues: OnceLock::new(),
            draining: AtomicBool::new(false),
            epoch: Instant::now(),
            next_admit_ns: AtomicU64::new(0),
            scratch: Mutex::default(),
        }
    }
}

impl Sampler {
    fn queues(&self, size: usize) -> &Queues {
        self.queues.get_or_init(|| {
            let size = size.max(1);
            let free = ArrayQueue::new(size);
            for _ in 0..size {
                let _ = free.push(Box::default());
            }
            Queues {
                free,
                pending: ArrayQueue::new(size),
            }
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64
    }
}

/// A retrieve's result as its response space holds it (little-endian u32 / f32 sections).
#[derive(Clone, Copy, Debug)]
pub struct Retrieved<'a> {
    /// `[q_heads]` u32: tokens chosen per head.
    pub k: &'a [u8],
    /// `[q_heads]` f32: estimated covered mass per head.
    pub coverage: &'a [u8],
    /// `[q_heads][stride]` u32: candidate ids.
    pub ids: &'a [u8],
    /// Candidates per head.
    pub stride: usize,
}

impl Session {
    /// The session's sampled retrieval quality so far (`quality` in `GET /v1/sessions/{id}`).
    pub fn quality_report(&self) -> QualityReport {
        self.sampling.report()
    }

    /// The request path's only cost when nothing is sampled: whether this retrieve of `layer`
    /// is to be sampled (one atomic add and a hash; false when sampling is off).
    pub fn sample_due(&self, layer: u32) -> bool {
        self.sampling.due(layer)
    }

    /// Hands a sampled retrieve (one [`Session::sample_due`] chose) to the background scorer:
    /// copies its queries `q`, parameters and result into a pooled slot and wakes the scoring
    /// job. Never waits; drops the sample (and counts it) when no slot is free or the CPU cap
    /// holds. A retrieve that scanned a KV head exactly (no index yet) has nothing to measure
    /// and is skipped.
    pub fn offer_sample(
        self: &Arc<Self>,
        layer: u32,
        q: &[f32],
        params: &RetrieveParams,
        stats: &RetrieveStats,
        result: Retrieved<'_>,
    ) {
        if stats.exact_heads > 0 || stats.stride == 0 {
            return;
        }
        let cfg = self.decode.sampling;
        let sampler = &self.store.sampler;
        let observer = &self.store.observer;
        if sampler.now_ns() < sampler.next_admit_ns.load(Ordering::Relaxed) {
            self.sampling.dropped(1);
            observer.sample_dropped(DROP_REASONS[1]);
            return;
        }
        let queues = sampler.queues(cfg.queue);
        let Some(mut slot) = queues.free.pop() else {
            self.sampling.dropped(0);
            observer.sample_dropped(DROP_REASONS[0]);
            return;
        };
        let hq = self.shape.q_heads as usize;
        let (k, cov, ids) = (
            bytemuck::try_cast_slice::<u8, u32>(result.k),
            bytemuck::try_cast_slice::<u8, f32>(result.coverage),
            bytemuck::try_cast_slice::<u8, u32>(result.ids),
        );
        let (Ok(k), Ok(cov), Ok(ids)) = (k, cov, ids) else {
            let _ = queues.free.push(slot);
            return;
        };
        let (Some(k), Some(cov), Some(ids)) =
            (k.get(..hq), cov.get(..hq), ids.get(..hq * result.stride))
        else {
            let _ = queues.free.push(slot);
            return;
        };
        let len = self.len(layer).unwrap_or(0);
        fill(&mut slot.q, q);
        fill(&mut slot.k, k);
        fill(&mut slot.coverage, cov);
        fill(&mut slot.ids, ids);
        slot.session = Arc::downgrade(self);
        slot.layer = layer;
        slot.len = len;
        slot.scale = params
            .scale
            .unwrap_or_else(|| kvdex_index::attend::default_scale(self.shape.head_dim as usize));
        slot.adaptive = matches!(params.budget, Budget::Adaptive(_));
        slot.stride = result.stride;
        if let Err(slot) = queues.pending.push(slot) {
            // Cannot happen (pending holds at most the pool's slots); keep the slot.
            let _ = queues.free.push(slot);
            return;
        }
        if !sampler.draining.swap(true, Ordering::AcqRel) {
            match self.store.pool.get(self.decode.build_threads) {
                Ok(pool) => {
                    let (sampler, observer) =
                        (self.store.sampler.clone(), self.store.observer.clone());
                    pool.spawn(move || score::drain(&sampler, observer.as_ref()));
                }
                Err(_) => sampler.draining.store(false, Ordering::Release),
            }
        }
    }
}

/// Copies `src` into `dst`, reusing its allocation.
fn fill<T: Copy>(dst: &mut Vec<T>, src: &[T]) {
    dst.clear();
    dst.extend_from_slice(src);
}

//! A session's sampling state: which retrieves to sample, and the running figures of those
//! scored, for `GET /v1/sessions/{id}` ([`QualityReport`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::running::{Running, Summary};
use super::HeadFigures;

/// Requests whose mean mass recall is averaged to judge a layer's drift.
pub(super) const RECENT: usize = 8;

/// One layer's sampling state.
pub(super) struct LayerSampling {
    /// Retrieves of the layer, the input of the sampling hash.
    calls: AtomicU64,
    pub(super) state: Mutex<LayerState>,
}

/// What the scoring job keeps of a layer: the recent figures that judge drift, and the
/// sampled decode queries a rebuild trains on.
#[derive(Default)]
pub(super) struct LayerState {
    pub(super) sampled: u64,
    /// The last [`RECENT`] requests' mean mass recall (a ring).
    pub(super) recent: Vec<f64>,
    pub(super) recent_at: usize,
    pub(super) drifting: bool,
    pub(super) rebuilds: u64,
    /// Sampled queries, `[n][q_heads][head_dim]`, a ring of `decode.drift_rebuild_queries`
    /// positions (kept only when `decode.drift_rebuild` is on).
    pub(super) bank: Vec<f32>,
    pub(super) bank_len: usize,
    pub(super) bank_at: usize,
}

impl LayerState {
    /// The mean of the recent requests' mass recall, once [`RECENT`] were seen.
    pub(super) fn recent_mean(&self) -> Option<f64> {
        (self.recent.len() == RECENT).then(|| self.recent.iter().sum::<f64>() / RECENT as f64)
    }

    pub(super) fn push_recent(&mut self, x: f64) {
        if self.recent.len() < RECENT {
            self.recent.push(x);
        } else {
            self.recent[self.recent_at % RECENT] = x;
        }
        self.recent_at = (self.recent_at + 1) % RECENT;
    }
}

/// The figures of every scored sample of a session.
struct Figures {
    requests: u64,
    /// Seconds the scoring job spent on this session's samples.
    score_secs: f64,
    recall_at_k: Running,
    mass_recall: Running,
    coverage_error: Running,
}

/// A session's sampling: its rate, per-layer state and running figures.
pub struct SessionSampler {
    /// Retrieves whose hash falls below this are sampled (0: none; `u64::MAX`: all).
    threshold: u64,
    rate: f64,
    seed: u64,
    pub(super) layers: Vec<LayerSampling>,
    figures: Mutex<Figures>,
    dropped: [AtomicU64; 2],
}

/// splitmix64: a cheap, well-mixed hash of a counter.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl SessionSampler {
    /// Sampling of `layers` layers at `rate` (checked: 0 to 1) with hash seed `seed`.
    pub(in crate::store) fn new(layers: usize, rate: f64, seed: u64) -> Self {
        let threshold = if rate >= 1.0 {
            u64::MAX
        } else {
            (rate.max(0.0) * u64::MAX as f64) as u64
        };
        Self {
            threshold,
            rate,
            seed,
            layers: (0..layers)
                .map(|_| LayerSampling {
                    calls: AtomicU64::new(0),
                    state: Mutex::default(),
                })
                .collect(),
            figures: Mutex::new(Figures {
                requests: 0,
                score_secs: 0.0,
                recall_at_k: Running::new(0.0, 1.0),
                mass_recall: Running::new(0.0, 1.0),
                coverage_error: Running::new(-1.0, 1.0),
            }),
            dropped: Default::default(),
        }
    }

    /// A new session's sampling: its spec's `sample_rate`, else the store's. Errors: a rate
    /// outside 0 to 1, naming the field.
    pub(in crate::store) fn for_spec(
        spec: &crate::store::SessionSpec,
        decode: &crate::store::DecodeConfig,
        layers: u32,
    ) -> crate::error::Result<Self> {
        let rate = spec.sample_rate.unwrap_or(decode.sampling.rate);
        if !(0.0..=1.0).contains(&rate) {
            return Err(crate::error::KvdexError::BadRequest(format!(
                "sample_rate {rate} is not between 0 and 1"
            )));
        }
        Ok(Self::new(layers as usize, rate, rand::random()))
    }

    /// Share of each layer's retrieves sampled (a fork keeps its source's).
    pub(in crate::store) fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether this retrieve of `layer` is sampled.
    pub(super) fn due(&self, layer: u32) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let Some(l) = self.layers.get(layer as usize) else {
            return false;
        };
        let call = l.calls.fetch_add(1, Ordering::Relaxed);
        self.threshold == u64::MAX
            || mix(call ^ self.seed ^ (u64::from(layer) << 40)) < self.threshold
    }

    /// Counts a sample dropped for `DROP_REASONS[reason]`.
    pub(super) fn dropped(&self, reason: usize) {
        self.dropped[reason].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one scored request's per-head figures and coverage errors, and the seconds its
    /// scoring took.
    pub(super) fn record(&self, heads: &[HeadFigures], coverage_error: &[f64], secs: f64) {
        if let Ok(mut f) = self.figures.lock() {
            f.requests += 1;
            f.score_secs += secs;
            for h in heads {
                f.recall_at_k.observe(h.recall_at_k);
                f.mass_recall.observe(h.mass_recall);
            }
            for &e in coverage_error {
                f.coverage_error.observe(e);
            }
        }
    }

    /// The session's figures so far.
    pub fn report(&self) -> QualityReport {
        let (requests, secs, recall_at_k, mass_recall, coverage_error) = match self.figures.lock() {
            Ok(f) => (
                f.requests,
                f.score_secs,
                f.recall_at_k.summary(),
                f.mass_recall.summary(),
                f.coverage_error.summary(),
            ),
            Err(_) => (0, 0.0, None, None, None),
        };
        let layers = self
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let s = l.state.lock().ok()?;
                (s.sampled > 0).then(|| LayerQuality {
                    layer: i as u32,
                    sampled_requests: s.sampled,
                    recent_mass_recall: s.recent_mean(),
                    drifting: s.drifting,
                    rebuilds: s.rebuilds,
                })
            })
            .collect();
        QualityReport {
            sample_rate: self.rate,
            sampled_requests: requests,
            score_ms_mean: (requests > 0).then(|| secs * 1e3 / requests as f64),
            dropped_queue_full: self.dropped[0].load(Ordering::Relaxed),
            dropped_cpu_cap: self.dropped[1].load(Ordering::Relaxed),
            recall_at_k,
            mass_recall,
            coverage_error,
            layers,
        }
    }
}

/// A session's sampled retrieval quality (`quality` in `GET /v1/sessions/{id}`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct QualityReport {
    /// Share of each layer's retrieves sampled.
    pub sample_rate: f64,
    /// Sampled retrieves scored.
    pub sampled_requests: u64,
    /// Mean milliseconds of one sample's scoring (the exact scan and its figures) on the
    /// build pool: the sampler's CPU cost per sample.
    pub score_ms_mean: Option<f64>,
    /// Sampled retrieves dropped because every slot was waiting to be scored.
    pub dropped_queue_full: u64,
    /// Sampled retrieves dropped by the CPU cap (`decode.sample_cpu_share`).
    pub dropped_cpu_cap: u64,
    /// Per query head: share of the exact top-k the index found (absent before a sample).
    pub recall_at_k: Option<Summary>,
    /// Per query head: the chosen set's attention mass over the exact top-k's.
    pub mass_recall: Option<Summary>,
    /// Per query head of adaptive requests: the budget's estimated covered mass minus the
    /// exact one.
    pub coverage_error: Option<Summary>,
    /// Layers sampled so far.
    pub layers: Vec<LayerQuality>,
}

/// One layer's sampling, in [`QualityReport`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerQuality {
    /// The layer.
    pub layer: u32,
    /// Its sampled retrieves scored.
    pub sampled_requests: u64,
    /// Mean mass recall of its last 8 scored requests since its last rebuild (absent before
    /// 8), what `decode.drift_floor` is compared with.
    pub recent_mass_recall: Option<f64>,
    /// Below `decode.drift_floor` now.
    pub drifting: bool,
    /// Background rebuilds the drift response queued (`decode.drift_rebuild`).
    pub rebuilds: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_sample_the_share_asked_per_layer() {
        let off = SessionSampler::new(2, 0.0, 1);
        assert!((0..1000).all(|_| !off.due(0)));
        let all = SessionSampler::new(2, 1.0, 1);
        assert!((0..1000).all(|_| all.due(1)));
        assert!(!all.due(2), "an unknown layer is never sampled");
        let tenth = SessionSampler::new(3, 0.1, 7);
        for layer in 0..3 {
            let n = (0..20_000).filter(|_| tenth.due(layer)).count();
            assert!((1_700..2_300).contains(&n), "layer {layer}: {n} of 20000");
        }
    }

    #[test]
    fn a_session_takes_its_own_rate_or_the_stores_and_refuses_a_bad_one() {
        let mut decode = crate::store::DecodeConfig::default();
        decode.sampling.rate = 0.25;
        let spec = |r| crate::store::SessionSpec {
            sample_rate: r,
            ..Default::default()
        };
        assert_eq!(
            SessionSampler::for_spec(&spec(None), &decode, 1)
                .unwrap()
                .rate,
            0.25
        );
        assert_eq!(
            SessionSampler::for_spec(&spec(Some(0.0)), &decode, 1)
                .unwrap()
                .rate,
            0.0
        );
        let e = SessionSampler::for_spec(&spec(Some(2.0)), &decode, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sample_rate 2"), "{e}");
    }

    #[test]
    fn a_session_report_sums_heads_and_lists_sampled_layers() {
        let s = SessionSampler::new(2, 0.5, 0);
        let h = |m: f64| HeadFigures {
            recall_at_k: 1.0,
            mass_recall: m,
            mass_covered: 0.9,
        };
        s.record(&[h(0.8), h(1.0)], &[0.05, -0.05], 0.002);
        s.dropped(1);
        s.layers[1].state.lock().unwrap().sampled = 1;
        let r = s.report();
        assert_eq!((r.sampled_requests, r.dropped_cpu_cap), (1, 1));
        assert!((r.score_ms_mean.unwrap() - 2.0).abs() < 1e-9);
        assert!((r.mass_recall.unwrap().mean - 0.9).abs() < 1e-12);
        assert_eq!(r.coverage_error.unwrap().count, 2);
        assert_eq!(r.layers.len(), 1);
        assert_eq!(r.layers[0].layer, 1);
    }
}

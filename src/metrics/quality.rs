//! Retrieval quality measured online ([`crate::store::sampler`]): per index kind and layer
//! group, histograms of the sampled query heads' recall@k, mass recall and coverage error, and
//! counters of the retrieves sampled and dropped.
//!
//! Labels stay few: `kind` is an index kind name and `layer_group` a range of
//! [`LAYER_GROUP`] layers ("0-7", "8-15", ...), so a 128-layer model adds 16 groups per kind.
//! Recorded by the scoring job on the build pool, never on a request.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::{prom, reg};
use crate::error::Result;
use crate::store::sampler::{QualitySample, DROP_REASONS};

/// Layers per `layer_group` label.
pub const LAYER_GROUP: u32 = 8;

/// Recall buckets: fine near 1, where a healthy index sits and an alert's threshold lies.
pub const RECALL_BUCKETS: &[f64] = &[
    0.5, 0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 1.0,
];

/// Coverage error buckets (estimated minus exact covered mass), symmetric about 0.
pub const COVERAGE_ERROR_BUCKETS: &[f64] = &[
    -0.5, -0.2, -0.1, -0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
];

/// The `layer_group` label of `layer`.
pub fn layer_group(layer: u32) -> String {
    let g = layer / LAYER_GROUP;
    format!("{}-{}", g * LAYER_GROUP, g * LAYER_GROUP + LAYER_GROUP - 1)
}

/// The sampler's metrics.
pub struct QualityMetrics {
    /// Sampled retrieves scored, by `kind` and `layer_group`.
    pub sampled: IntCounterVec,
    /// Sampled retrieves dropped unscored, by `reason` ([`DROP_REASONS`]).
    pub dropped: IntCounterVec,
    /// Per sampled query head: share of the exact top-k found.
    pub recall_at_k: HistogramVec,
    /// Per sampled query head: the chosen set's attention mass over the exact top-k's.
    pub mass_recall: HistogramVec,
    /// Per sampled query head of an adaptive request: estimated minus exact covered mass.
    pub coverage_error: HistogramVec,
}

impl QualityMetrics {
    /// Registers the sampler's metrics with `r` (the dropped reasons created at zero).
    pub(super) fn new(r: &Registry) -> Result<Self> {
        let labels = ["kind", "layer_group"];
        let hist = |n: &str, h: &str, b: &[f64]| {
            reg(
                r,
                HistogramVec::new(HistogramOpts::new(n, h).buckets(b.to_vec()), &labels)
                    .map_err(prom)?,
            )
        };
        let dropped = reg(
            r,
            IntCounterVec::new(
                Opts::new(
                    "kvdex_quality_dropped_requests_total",
                    "Retrieves sampled for online recall but dropped unscored, by reason.",
                ),
                &["reason"],
            )
            .map_err(prom)?,
        )?;
        for reason in DROP_REASONS {
            dropped.with_label_values(&[reason]);
        }
        let m = Self {
            sampled: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "kvdex_quality_sampled_requests_total",
                        "Retrieves re-scored exactly by online recall sampling.",
                    ),
                    &labels,
                )
                .map_err(prom)?,
            )?,
            dropped,
            recall_at_k: hist(
                "kvdex_quality_recall_at_k",
                "Sampled query heads: share of the exact top-k the index found.",
                RECALL_BUCKETS,
            )?,
            mass_recall: hist(
                "kvdex_quality_mass_recall",
                "Sampled query heads: attention mass of the chosen tokens over the exact top-k's.",
                RECALL_BUCKETS,
            )?,
            coverage_error: hist(
                "kvdex_quality_coverage_error",
                "Sampled query heads: the adaptive budget's estimated covered mass minus the exact.",
                COVERAGE_ERROR_BUCKETS,
            )?,
        };
        // Every index kind's first layer group at zero, so that a fresh daemon exports the
        // series its dashboard and alert query (other groups appear with their first sample).
        for kind in ["flat", "hnsw", "graph"] {
            let labels = [kind, "0-7"];
            m.sampled.with_label_values(&labels);
            m.recall_at_k.with_label_values(&labels);
            m.mass_recall.with_label_values(&labels);
            m.coverage_error.with_label_values(&labels);
        }
        Ok(m)
    }

    /// Records one scored sample.
    pub fn sampled(&self, s: &QualitySample<'_>) {
        let group = layer_group(s.layer);
        let labels = [s.kind, group.as_str()];
        self.sampled.with_label_values(&labels).inc();
        let (recall, mass, cov) = (
            self.recall_at_k.with_label_values(&labels),
            self.mass_recall.with_label_values(&labels),
            self.coverage_error.with_label_values(&labels),
        );
        for h in s.heads {
            recall.observe(h.recall_at_k);
            mass.observe(h.mass_recall);
        }
        for &e in s.coverage_error {
            cov.observe(e);
        }
    }

    /// Counts a dropped sample.
    pub fn dropped(&self, reason: &'static str) {
        self.dropped.with_label_values(&[reason]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sampler::HeadFigures;

    #[test]
    fn layer_groups_are_ranges_of_eight() {
        assert_eq!(layer_group(0), "0-7");
        assert_eq!(layer_group(7), "0-7");
        assert_eq!(layer_group(29), "24-31");
    }

    #[test]
    fn a_sample_lands_in_its_kind_and_layer_group() {
        let r = Registry::new();
        let m = QualityMetrics::new(&r).unwrap();
        let h = HeadFigures {
            recall_at_k: 0.9,
            mass_recall: 0.97,
            mass_covered: 0.95,
        };
        m.sampled(&QualitySample {
            kind: "graph",
            layer: 9,
            heads: &[h, h],
            coverage_error: &[0.01, -0.02],
        });
        m.dropped("cpu_cap");
        let labels = ["graph", "8-15"];
        assert_eq!(m.sampled.with_label_values(&labels).get(), 1);
        let mass = m.mass_recall.with_label_values(&labels);
        assert_eq!(mass.get_sample_count(), 2);
        assert!((mass.get_sample_sum() - 1.94).abs() < 1e-12);
        let cov = m.coverage_error.with_label_values(&labels);
        assert_eq!(cov.get_sample_count(), 2);
        assert_eq!(m.dropped.with_label_values(&["cpu_cap"]).get(), 1);
        assert_eq!(m.dropped.with_label_values(&["queue_full"]).get(), 0);
    }
}

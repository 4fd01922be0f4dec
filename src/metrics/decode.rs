//! The decode path's metrics: index builds (seal → background build → incremental inserts),
//! the internals of each retrieve (time per stage, keys scored, tokens chosen per head, exact
//! fallbacks), and the store's decode-path resources (gauges read at scrape time).
//!
//! Retrieves are recorded on the worker's thread without allocating: every label child is
//! resolved when the connection's [`RetrieveMetrics`] is made, and the k of every query head
//! goes into a thread-local histogram flushed once per request (a few atomic adds, however
//! many heads).

use prometheus::local::LocalHistogram;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use super::{prom, reg};
use crate::error::Result;
use crate::store::retrieve::RetrieveStats;
use crate::store::{BuildOutcome, DecodeGauges};
use crate::worker::RetrieveRecorder;

/// Build duration buckets in seconds: a small layer builds in well under a second, a long
/// context's graph in minutes.
pub const BUILD_BUCKETS_S: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
];

/// Tokens-chosen-per-head buckets: powers of two up to the largest budgets asked for.
pub const K_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];

/// Retrieve stage buckets in microseconds: finer than the request buckets in the
/// milliseconds, where a long context's retrieve spends them (a few ms at 128K tokens, tens at
/// 1M).
pub const STAGE_BUCKETS_US: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 3_000.0, 5_000.0,
    7_500.0, 10_000.0, 15_000.0, 20_000.0, 30_000.0, 50_000.0, 100_000.0, 250_000.0,
];

/// The retrieve stages, the `stage` label of `kvdex_retrieve_stage_duration_microseconds`
/// (the split [`RetrieveStats`] reports).
pub const STAGES: [&str; 3] = ["search", "attend", "copy"];

/// Every decode-path metric, registered once with the daemon's registry.
pub struct DecodeMetrics {
    /// Index builds queued by seals (one per layer sealed).
    pub builds_started: IntCounter,
    /// Index builds ended, by `outcome` (one of [`BuildOutcome::ALL`]'s names): started minus
    /// ended is what is queued or running.
    pub builds_ended: IntCounterVec,
    /// Seconds from a seal to its build's last KV head installed, for builds that ended ready
    /// (time queued behind other builds included, like `/stats`).
    pub build_duration_s: Histogram,
    /// Layers whose build is queued or running now (set at scrape time).
    pub layers_building: IntGauge,
    /// Keys put into built indices by background incremental inserts (tokens that left the
    /// window after the seal).
    pub inserted_keys: IntCounter,
    /// Retrieve time by `stage` (search, attend, copy), in microseconds, as each retrieve's
    /// own stats split it.
    pub stage_us: HistogramVec,
    /// Keys scored by retrieve searches (graph beams plus exact scans), all heads.
    pub scored_keys: IntCounter,
    /// Tokens chosen per query head by each retrieve's budget (the adaptive k, or the fixed
    /// k clamped to what is retrievable): one observation per head.
    pub chosen_tokens: Histogram,
    /// Retrieves answered by an exact scan for at least one KV head because it had no index
    /// (its layer not sealed, or the build not finished yet).
    pub exact_fallbacks: IntCounter,
    /// Engine GPU buffers registered as gather destinations (set at scrape time).
    pub engine_dests: IntGauge,
    /// Training positions staged by seal parts, waiting for their seal (set at scrape time).
    pub staged_positions: IntGauge,
    /// Bytes held by decode-path indices, beyond the K/V rows (set at scrape time).
    pub index_bytes: IntGauge,
}

impl DecodeMetrics {
    /// Registers every decode-path metric with `r`, each label child created at zero.
    pub(super) fn new(r: &Registry) -> Result<Self> {
        let gauge = |n: &str, h: &str| reg(r, IntGauge::new(n, h).map_err(prom)?);
        let counter = |n: &str, h: &str| reg(r, IntCounter::new(n, h).map_err(prom)?);
        let histogram = |n: &str, h: &str, b: &[f64]| {
            reg(
                r,
                Histogram::with_opts(HistogramOpts::new(n, h).buckets(b.to_vec())).map_err(prom)?,
            )
        };
        let builds_ended = reg(
            r,
            IntCounterVec::new(
                Opts::new(
                    "kvdex_index_builds_ended_total",
                    "Index builds ended, by outcome (ready, failed, abandoned).",
                ),
                &["outcome"],
            )
            .map_err(prom)?,
        )?;
        for o in BuildOutcome::ALL {
            builds_ended.with_label_values(&[o.name()]);
        }
        let stage_us = reg(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "kvdex_retrieve_stage_duration_microseconds",
                    "Retrieve time by stage (search, attend, copy).",
                )
                .buckets(STAGE_BUCKETS_US.to_vec()),
                &["stage"],
            )
            .map_err(prom)?,
        )?;
        for s in STAGES {
            stage_us.with_label_values(&[s]);
        }
        Ok(Self {
            builds_started: counter(
                "kvdex_index_builds_started_total",
                "Index builds queued by seals (one per layer sealed).",
            )?,
            builds_ended,
            build_duration_s: histogram(
                "kvdex_index_build_duration_seconds",
                "Seconds from a seal to its index build ending ready.",
                BUILD_BUCKETS_S,
            )?,
            layers_building: gauge(
                "kvdex_index_layers_building",
                "Layers whose index build is queued or running.",
            )?,
            inserted_keys: counter(
                "kvdex_index_inserted_keys_total",
                "Keys added to built indices by background incremental inserts.",
            )?,
            stage_us,
            scored_keys: counter(
                "kvdex_retrieve_scored_keys_total",
                "Keys scored by retrieve searches, all heads.",
            )?,
            chosen_tokens: histogram(
                "kvdex_retrieve_chosen_tokens",
                "Tokens chosen per query head by a retrieve's budget (k).",
                K_BUCKETS,
            )?,
            exact_fallbacks: counter(
                "kvdex_retrieve_exact_fallback_total",
                "Retrieves that scanned a KV head exactly because it had no index yet.",
            )?,
            engine_dests: gauge(
                "kvdex_engine_dests",
                "Engine GPU buffers registered as gather destinations.",
            )?,
            staged_positions: gauge(
                "kvdex_staged_training_positions",
                "Training positions staged by seal parts for their layers' next seals.",
            )?,
            index_bytes: gauge(
                "kvdex_index_bytes",
                "Bytes held by the decode-path indices, beyond the K/V rows.",
            )?,
        })
    }

    /// Sets the scrape-time gauges from the sessions' totals.
    pub fn set_gauges(&self, g: DecodeGauges) {
        let i = |v: u64| v.min(i64::MAX as u64) as i64;
        self.layers_building.set(i(g.layers_building));
        self.index_bytes.set(i(g.index_bytes));
        self.staged_positions.set(i(g.staged_positions));
        self.engine_dests.set(i(g.engine_dests));
    }

    /// One connection's retrieve recorder, its label children resolved now.
    pub fn recorder(&self) -> RetrieveMetrics {
        RetrieveMetrics {
            stages: STAGES.map(|s| self.stage_us.with_label_values(&[s])),
            chosen: self.chosen_tokens.local(),
            scored: self.scored_keys.clone(),
            exact: self.exact_fallbacks.clone(),
        }
    }

    /// Records a build's end.
    pub fn build_ended(&self, outcome: BuildOutcome, secs: f64) {
        self.builds_ended.with_label_values(&[outcome.name()]).inc();
        if outcome == BuildOutcome::Ready {
            self.build_duration_s.observe(secs);
        }
    }
}

/// One connection's handles on the retrieve metrics (see the module docs).
pub struct RetrieveMetrics {
    /// The `stage` children, in [`STAGES`] order.
    stages: [Histogram; 3],
    /// Per-head k, accumulated here and flushed once per request.
    chosen: LocalHistogram,
    scored: IntCounter,
    exact: IntCounter,
}

impl RetrieveRecorder for RetrieveMetrics {
    fn on_retrieve(&mut self, st: &RetrieveStats, k: &[u32]) {
        for (h, us) in self
            .stages
            .iter()
            .zip([st.search_us, st.attend_us, st.copy_us])
        {
            h.observe(us);
        }
        for &k in k {
            self.chosen.observe(f64::from(k));
        }
        self.chosen.flush();
        self.scored.inc_by(st.scored);
        if st.exact_heads > 0 {
            self.exact.inc();
        }
    }
}

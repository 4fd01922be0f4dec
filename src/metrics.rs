//! The Prometheus registry: request counts and latency per op, memory, sessions, bytes moved,
//! and the decode path ([`decode`]: index builds, retrieve internals, decode resources).
//!
//! The data-plane workers record each request through [`Metrics::record_request`] (the
//! worker's observer hook) and each retrieve's internals through a per-connection
//! [`decode::RetrieveMetrics`]; the store reports builds and inserts as its
//! [`BuildObserver`]. The memory, session and decode-resource gauges are set from the
//! daemon's own state just before each scrape, so they are never stale and cost nothing
//! between scrapes.
//! `config/grafana/kvdex-dashboard.json` queries these names; a test checks that it queries
//! nothing else.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::error::{KvdexError, Result};
use crate::store::{BuildObserver, BuildOutcome};
use crate::worker::RetrieveRecorder;

pub mod decode;
pub mod quality;

/// Latency buckets in microseconds: from the sub-microsecond shared-memory round trip to a
/// large append.
pub const LATENCY_BUCKETS_US: &[f64] = &[
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0,
    50_000.0, 100_000.0,
];

/// Why sessions end, the `reason` label of `kvdex_sessions_ended_total`.
pub const END_REASONS: &[&str] = &[
    "deleted",
    "client_gone",
    "attach_timeout",
    "protocol_error",
    "worker_error",
    "shutdown",
];

/// Every metric the daemon exports, registered once.
pub struct Metrics {
    registry: Registry,
    /// Data-plane requests by `op` and `status` ("ok" | "error").
    pub requests: IntCounterVec,
    /// Data-plane request latency by `op`, in microseconds.
    pub latency_us: HistogramVec,
    /// K/V bytes stored across sessions (tokens appended).
    pub resident_bytes: IntGauge,
    /// Bytes reserved from the budget (arena capacity).
    pub budget_used_bytes: IntGauge,
    /// The configured budget.
    pub budget_bytes: IntGauge,
    /// Sessions alive.
    pub sessions: IntGauge,
    /// Sessions ended, by `reason` (one of [`END_REASONS`]).
    pub sessions_ended: IntCounterVec,
    /// K+V bytes received by appends.
    pub appended_bytes: IntCounter,
    /// K+V bytes returned by gathers.
    pub gathered_bytes: IntCounter,
    /// Control-plane (HTTP) requests by `route` and `code`.
    pub http_requests: IntCounterVec,
    /// The decode path: index builds, retrieve internals, decode-path resources.
    pub decode: decode::DecodeMetrics,
    /// Retrieval quality measured online by the sampler ([`quality`]).
    pub quality: quality::QualityMetrics,
    /// Each known op's children of `requests` (ok, error) and `latency_us`, resolved once:
    /// `with_label_values` hashes the labels and takes the vector's shared lock, which every
    /// worker would contend on per request.
    per_op: Vec<OpChildren>,
}

/// One op's resolved metric children (see [`Metrics::per_op`]).
struct OpChildren {
    op: &'static str,
    ok: IntCounter,
    error: IntCounter,
    latency_us: prometheus::Histogram,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> Result<T> {
    r.register(Box::new(m.clone())).map_err(prom)?;
    Ok(m)
}

fn prom(e: prometheus::Error) -> KvdexError {
    KvdexError::Config(format!("metrics registry: {e}"))
}

impl Metrics {
    /// A fresh registry holding every kvdex metric.
    pub fn new() -> Result<Self> {
        let r = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "kvdex_requests_total",
                "Data-plane requests by op and status.",
            ),
            &["op", "status"],
        )
        .map_err(prom)?;
        let latency_us = HistogramVec::new(
            HistogramOpts::new(
                "kvdex_request_duration_microseconds",
                "Data-plane request latency by op.",
            )
            .buckets(LATENCY_BUCKETS_US.to_vec()),
            &["op"],
        )
        .map_err(prom)?;
        let sessions_ended = IntCounterVec::new(
            Opts::new("kvdex_sessions_ended_total", "Sessions ended, by reason."),
            &["reason"],
        )
        .map_err(prom)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "kvdex_http_requests_total",
                "Control-plane requests by route and status code.",
            ),
            &["route", "code"],
        )
        .map_err(prom)?;
        // Label vectors export nothing until a child exists: create every known one at zero,
        // so that a fresh daemon's dashboard shows 0 rather than "No data".
        for op in kvdex_wire::proto::Opcode::ALL {
            for status in ["ok", "error"] {
                requests.with_label_values(&[op.name(), status]);
            }
            latency_us.with_label_values(&[op.name()]);
        }
        for reason in END_REASONS {
            sessions_ended.with_label_values(&[reason]);
        }
        let per_op = kvdex_wire::proto::Opcode::ALL
            .iter()
            .map(|op| OpChildren {
                op: op.name(),
                ok: requests.with_label_values(&[op.name(), "ok"]),
                error: requests.with_label_values(&[op.name(), "error"]),
                latency_us: latency_us.with_label_values(&[op.name()]),
            })
            .collect();
        let gauge = |n: &str, h: &str| IntGauge::new(n, h).map_err(prom);
        let counter = |n: &str, h: &str| IntCounter::new(n, h).map_err(prom);
        Ok(Self {
            requests: reg(&r, requests)?,
            latency_us: reg(&r, latency_us)?,
            resident_bytes: reg(
                &r,
                gauge("kvdex_resident_bytes", "K/V bytes stored across sessions.")?,
            )?,
            budget_used_bytes: reg(
                &r,
                gauge(
                    "kvdex_budget_used_bytes",
                    "Bytes reserved from the memory budget (arena capacity).",
                )?,
            )?,
            budget_bytes: reg(
                &r,
                gauge("kvdex_budget_bytes", "The configured memory budget.")?,
            )?,
            sessions: reg(&r, gauge("kvdex_sessions", "Sessions alive.")?)?,
            sessions_ended: reg(&r, sessions_ended)?,
            appended_bytes: reg(
                &r,
                counter(
                    "kvdex_appended_bytes_total",
                    "K+V bytes received by appends.",
                )?,
            )?,
            gathered_bytes: reg(
                &r,
                counter(
                    "kvdex_gathered_bytes_total",
                    "K+V bytes returned by gathers.",
                )?,
            )?,
            http_requests: reg(&r, http_requests)?,
            decode: decode::DecodeMetrics::new(&r)?,
            quality: quality::QualityMetrics::new(&r)?,
            per_op,
            registry: r,
        })
    }

    /// Records one data-plane request: its op name, outcome, latency and payload bytes in and
    /// out. Appends count their input as appended bytes, gathers their output as gathered.
    pub fn record_request(
        &self,
        op: &'static str,
        ok: bool,
        micros: f64,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        match self.per_op.iter().find(|c| c.op == op) {
            Some(c) => {
                if ok { &c.ok } else { &c.error }.inc();
                c.latency_us.observe(micros);
            }
            None => {
                let status = if ok { "ok" } else { "error" };
                self.requests.with_label_values(&[op, status]).inc();
                self.latency_us.with_label_values(&[op]).observe(micros);
            }
        }
        if ok {
            match op {
                "append" => self.appended_bytes.inc_by(bytes_in),
                "gather" => self.gathered_bytes.inc_by(bytes_out),
                _ => {}
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(prom)?;
        String::from_utf8(buf)
            .map_err(|e| KvdexError::Protocol(format!("metrics text is not UTF-8: {e}")))
    }

    /// Names of every metric family the registry exports (histograms and counters as
    /// declared, without the `_bucket`/`_sum`/`_count` series suffixes).
    pub fn family_names(&self) -> Vec<String> {
        self.registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect()
    }
}

impl crate::worker::Observer for Metrics {
    fn on_request(&self, op: &'static str, ok: bool, micros: f64, bytes_in: u64, bytes_out: u64) {
        self.record_request(op, ok, micros, bytes_in, bytes_out);
    }

    fn retrieve_recorder(&self) -> Box<dyn RetrieveRecorder> {
        Box::new(self.decode.recorder())
    }
}

impl BuildObserver for Metrics {
    fn build_started(&self) {
        self.decode.builds_started.inc();
    }

    fn build_ended(&self, outcome: BuildOutcome, secs: f64) {
        self.decode.build_ended(outcome, secs);
    }

    fn keys_inserted(&self, keys: u64) {
        self.decode.inserted_keys.inc_by(keys);
    }

    fn quality_sampled(&self, sample: &crate::store::sampler::QualitySample<'_>) {
        self.quality.sampled(sample);
    }

    fn sample_dropped(&self, reason: &'static str) {
        self.quality.dropped(reason);
    }
}

#[cfg(test)]
mod tests;

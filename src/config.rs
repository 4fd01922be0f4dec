//! Configuration: the embedded default (config/kvdex.toml), then a file, then `KVDEX_*`
//! environment variables, then flags. Bad values are refused at start-up, naming the key.
//!
//! Layering works on TOML tables: every override is checked against the embedded default, so a
//! key the default does not have is refused (a typo never silently does nothing), and a value
//! must have the default's type. The merged table is then deserialized into [`Config`] and
//! [`Config::validate`] checks the values' meaning (addresses, ranges, loopback).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::affinity::CpuMask;
use crate::error::{KvdexError, Result};

/// The embedded default configuration, the bottom layer.
pub const DEFAULT_TOML: &str = include_str!("../config/kvdex.toml");

/// Prefix of the environment variables that override keys: `KVDEX_SECTION__KEY`.
pub const ENV_PREFIX: &str = "KVDEX_";

/// Smallest payload arena a session may have: room for one 8 KiB request and its reply.
pub const MIN_PAYLOAD_BYTES: u64 = 64 * 1024;

/// Most static tokens (`decode.sinks`, `decode.window`) at either end of a layer.
pub const MAX_STATIC_TOKENS: u64 = 1 << 24;

/// Longest `sessions.worker_spin_us`: a worker must still park when its client is idle.
pub const MAX_WORKER_SPIN_US: u64 = 1_000_000;

/// The daemon's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP control plane.
    pub http: HttpConfig,
    /// K/V storage.
    pub memory: MemoryConfig,
    /// Session limits and shared memory.
    pub sessions: SessionsConfig,
    /// The decode path: static tokens, index builds, retrieval.
    pub decode: DecodeSection,
}

/// `[decode]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSection {
    /// S: first tokens of a layer kept by the engine, never retrieved.
    pub sinks: u64,
    /// W: most recent tokens kept by the engine, never retrieved.
    pub window: u64,
    /// Threads of the background index-build pool (0: one per core).
    pub build_threads: u64,
    /// Tokens inserted into an index per lock hold, and the backlog that triggers an insert.
    pub insert_batch: u64,
    /// Decode queries per KV head captured between insert batches to guide them (0: keys
    /// only).
    pub insert_guide_queries: u64,
    /// Indices up to this many bytes (per KV head) are extended on a copy swapped in after
    /// the insert, so no search waits; larger ones in place under an exclusive lock.
    pub insert_copy_max_bytes: u64,
    /// Spread a layer's query heads over cores during a retrieve.
    pub parallel_heads: bool,
    /// Keys sampled per head to estimate the unretrieved mass (adaptive budget).
    pub tail_sample: u64,
    /// Graph: beam width L of a search (raised to the candidates asked for).
    pub graph_search_list: u64,
    /// Graph: out-degree cap M.
    pub graph_degree: u64,
    /// Graph: training queries used at most per KV head.
    pub graph_max_train_queries: u64,
    /// Training positions a layer may stage in seal parts before its seal (0: no parts).
    pub seal_max_staged_queries: u64,
    /// Online recall sampling (`crate::store::sampler`): share of each layer's retrieves
    /// re-scored exactly in the background (0: off).
    pub sample_rate: crate::store::sampler::Fraction,
    /// Most of one core the sampler's scoring may take, in (0, 1].
    pub sample_cpu_share: crate::store::sampler::Fraction,
    /// Sampled retrieves waiting to be scored, at most (more are dropped and counted).
    pub sample_queue: u64,
    /// A layer whose recent sampled mass recall is below this is logged (0: off).
    pub drift_floor: crate::store::sampler::Fraction,
    /// Rebuild a drifting layer's index in the background from its sampled decode queries.
    pub drift_rebuild: bool,
    /// Sampled decode queries kept per layer for that rebuild.
    pub drift_rebuild_queries: u64,
    /// The index kind every seal builds: "client" (the kind each seal names), or "flat",
    /// "hnsw", "graph" or "cluster" for every seal of this daemon.
    pub index_kind: String,
    /// Cluster index: mean keys per cluster.
    pub cluster_rows_per_cluster: u64,
    /// Cluster index: share of the keys whose codes a search scores, in thousandths.
    pub cluster_probe_permille: u64,
}

impl DecodeSection {
    /// The store's decode settings.
    pub fn to_decode_config(&self) -> crate::store::DecodeConfig {
        let mut c = crate::store::DecodeConfig {
            sinks: self.sinks as usize,
            window: self.window as usize,
            insert_batch: self.insert_batch.max(1) as usize,
            insert_guide_queries: self.insert_guide_queries as usize,
            insert_copy_max_bytes: usize::try_from(self.insert_copy_max_bytes)
                .unwrap_or(usize::MAX),
            parallel_heads: self.parallel_heads,
            tail_sample: self.tail_sample as usize,
            seal_max_staged_queries: self.seal_max_staged_queries as usize,
            sampling: crate::store::sampler::SamplingConfig {
                rate: self.sample_rate.0,
                cpu_share: self.sample_cpu_share.0,
                queue: self.sample_queue as usize,
                drift_floor: self.drift_floor.0,
                drift_rebuild: self.drift_rebuild,
                drift_rebuild_queries: self.drift_rebuild_queries as usize,
            },
            ..Default::default()
        };
        if self.build_threads > 0 {
            c.build_threads = self.build_threads as usize;
        }
        c.kind_override = kvdex_index::IndexKind::parse(&self.index_kind).ok();
        let cl = &mut c.params.cluster;
        cl.rows_per_cluster = self.cluster_rows_per_cluster.max(1) as usize;
        cl.probe_fraction = self.cluster_probe_permille.clamp(1, 1000) as f32 / 1000.0;
        let g = &mut c.params.graph;
        g.search_list = self.graph_search_list.max(1) as usize;
        g.degree = self.graph_degree.clamp(1, 255) as usize;
        g.max_train_queries = self.graph_max_train_queries.max(1) as usize;
        c
    }
}

impl DecodeSection {
    /// Refuses `[decode]` values outside what the daemon can honour, naming the key (the
    /// store would otherwise clamp them silently: a degree of 1000 would become 255).
    fn validate(&self) -> Result<()> {
        let ranges: [(&str, u64, u64, u64); 10] = [
            ("decode.sinks", self.sinks, 0, MAX_STATIC_TOKENS),
            ("decode.window", self.window, 0, MAX_STATIC_TOKENS),
            ("decode.build_threads", self.build_threads, 0, 1024),
            ("decode.insert_batch", self.insert_batch, 1, 1 << 20),
            // A ring of this many f32 queries per KV head and layer is allocated at seal.
            (
                "decode.insert_guide_queries",
                self.insert_guide_queries,
                0,
                4096,
            ),
            ("decode.tail_sample", self.tail_sample, 0, 1 << 16),
            (
                "decode.graph_search_list",
                self.graph_search_list,
                1,
                1 << 16,
            ),
            // Out-degrees are stored in a byte per node.
            ("decode.graph_degree", self.graph_degree, 1, 255),
            (
                "decode.graph_max_train_queries",
                self.graph_max_train_queries,
                1,
                1 << 24,
            ),
            (
                "decode.seal_max_staged_queries",
                self.seal_max_staged_queries,
                0,
                1 << 24,
            ),
        ];
        for (key, v, lo, hi) in ranges {
            if v < lo || v > hi {
                return Err(bad(key, format!("{v} is not in {lo}..={hi}")));
            }
        }
        if self.index_kind != "client" && kvdex_index::IndexKind::parse(&self.index_kind).is_err() {
            return Err(bad(
                "decode.index_kind",
                format!(
                    "{:?} is not client, flat, hnsw, graph or cluster",
                    self.index_kind
                ),
            ));
        }
        if !(1..=1 << 16).contains(&self.cluster_rows_per_cluster) {
            return Err(bad(
                "decode.cluster_rows_per_cluster",
                format!("{} is not in 1..=65536", self.cluster_rows_per_cluster),
            ));
        }
        if !(1..=1000).contains(&self.cluster_probe_permille) {
            return Err(bad(
                "decode.cluster_probe_permille",
                format!("{} is not in 1..=1000", self.cluster_probe_permille),
            ));
        }
        // The sampler's keys (the ranges live with the sampler).
        self.to_decode_config()
            .sampling
            .check()
            .map_err(|(key, why)| bad(key, why))
    }
}

/// `[http]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the control plane (`host:port`; port 0 picks a free one).
    pub listen: String,
    /// Must be true for a `listen` address that is not loopback.
    pub allow_non_loopback: bool,
    /// Optional Unix-domain socket for the control plane ("" for none).
    pub unix_socket: String,
    /// When not empty, creating a session over TCP needs `Authorization: Bearer <this>`
    /// (the Unix socket's file permissions stand for it there).
    pub admin_token: String,
}

/// `[memory]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Global budget for K/V storage in bytes.
    pub budget_bytes: u64,
    /// Capacity in tokens of a layer's first allocation.
    pub initial_tokens: u64,
    /// The most K/V bytes one session may hold (0: only the global budget bounds it).
    pub session_quota_bytes: u64,
}

/// `[sessions]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// Most sessions alive at once.
    pub max_sessions: u64,
    /// Payload arena size when a client does not ask for one.
    pub default_payload_bytes: u64,
    /// Largest payload arena a client may ask for.
    pub max_payload_bytes: u64,
    /// Directory of the shared-memory files.
    pub shm_dir: String,
    /// Unix socket of the optional socket data path ("" for none).
    pub data_socket: String,
    /// CPUs the data-plane threads are pinned to, as a Linux CPU list ("" for no pinning).
    pub worker_cpus: String,
    /// How long a session's worker spins for the next request before it parks, in µs.
    pub worker_spin_us: u64,
    /// A session whose region nobody attached (and that no data-socket connection reached) in
    /// this many ms is ended; 0 never ends one for that.
    pub attach_timeout_ms: u64,
}

impl SessionsConfig {
    /// `attach_timeout_ms` as a deadline (None for 0).
    pub fn attach_timeout(&self) -> Option<std::time::Duration> {
        (self.attach_timeout_ms > 0)
            .then(|| std::time::Duration::from_millis(self.attach_timeout_ms))
    }
}

fn bad(key: &str, what: impl std::fmt::Display) -> KvdexError {
    KvdexError::Config(format!("key `{key}`: {what}"))
}

impl Config {
    /// The embedded default alone.
    pub fn embedded() -> Result<Self> {
        Self::load(None, std::iter::empty(), None)
    }

    /// Builds the configuration from its layers: the embedded default, then `file`, then the
    /// `KVDEX_*` pairs of `env` (other variables are ignored), then the `--listen` flag.
    ///
    /// `env` is passed in (rather than read here) so that tests need not touch the process
    /// environment; the daemon passes `std::env::vars()`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        listen_flag: Option<&str>,
    ) -> Result<Self> {
        let default: Table = DEFAULT_TOML
            .parse()
            .map_err(|e| KvdexError::Config(format!("embedded default is invalid: {e}")))?;
        let mut merged = default.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| KvdexError::Config(format!("cannot read {}: {e}", path.display())))?;
            let table: Table = text.parse().map_err(|e| {
                KvdexError::Config(format!("{} is not valid TOML: {e}", path.display()))
            })?;
            merge(&mut merged, &default, table, "")
                .map_err(|e| KvdexError::Config(format!("{}: {e}", path.display())))?;
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| is_override_var(k))
            .collect();
        env.sort();
        for (var, raw) in env {
            let key = env_key(&var);
            let value = parse_env_value(&default, &key, &raw)
                .map_err(|e| KvdexError::Config(format!("{var}: {e}")))?;
            set_key(&mut merged, &key, value)?;
        }
        if let Some(listen) = listen_flag {
            set_key(
                &mut merged,
                "http.listen",
                Value::String(listen.to_string()),
            )?;
        }
        refuse_negative(&merged, "")?;
        let config: Config = Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| KvdexError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types cannot: addresses parse, loopback unless allowed, sizes in range.
    pub fn validate(&self) -> Result<()> {
        let addr = self.listen_addr()?;
        if !addr.ip().is_loopback() && !self.http.allow_non_loopback {
            return Err(bad(
                "http.listen",
                format!(
                    "{addr} is not a loopback address; set http.allow_non_loopback = true to \
                     expose the control plane (it hands out session tokens over plain HTTP)"
                ),
            ));
        }
        let m = &self.memory;
        if m.budget_bytes == 0 {
            return Err(bad("memory.budget_bytes", "must be greater than 0"));
        }
        if m.initial_tokens == 0 || m.initial_tokens > 1 << 24 {
            return Err(bad(
                "memory.initial_tokens",
                format!("{} is not in 1..=16777216", m.initial_tokens),
            ));
        }
        let s = &self.sessions;
        if s.max_sessions == 0 {
            return Err(bad("sessions.max_sessions", "must be greater than 0"));
        }
        if s.max_payload_bytes < MIN_PAYLOAD_BYTES {
            return Err(bad(
                "sessions.max_payload_bytes",
                format!(
                    "{} is below the minimum {MIN_PAYLOAD_BYTES}",
                    s.max_payload_bytes
                ),
            ));
        }
        if s.default_payload_bytes < MIN_PAYLOAD_BYTES
            || s.default_payload_bytes > s.max_payload_bytes
        {
            return Err(bad(
                "sessions.default_payload_bytes",
                format!(
                    "{} is not between {MIN_PAYLOAD_BYTES} and sessions.max_payload_bytes ({})",
                    s.default_payload_bytes, s.max_payload_bytes
                ),
            ));
        }
        self.worker_cpus()?;
        self.decode.validate()?;
        if s.worker_spin_us > MAX_WORKER_SPIN_US {
            return Err(bad(
                "sessions.worker_spin_us",
                format!(
                    "{} is above {MAX_WORKER_SPIN_US} (1 s): a worker must park when its \
                     client is idle",
                    s.worker_spin_us
                ),
            ));
        }
        if s.shm_dir.is_empty() || !Path::new(&s.shm_dir).is_dir() {
            return Err(bad(
                "sessions.shm_dir",
                format!("{:?} is not a directory", s.shm_dir),
            ));
        }
        Ok(())
    }

    /// `http.listen` parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.http.listen.parse().map_err(|e| {
            bad(
                "http.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:7070 ({e})",
                    self.http.listen
                ),
            )
        })
    }

    /// `sessions.worker_cpus` parsed, if set. Refused when it names no CPU this process may
    /// run on (a typo there would otherwise only show as a warning per session).
    pub fn worker_cpus(&self) -> Result<Option<CpuMask>> {
        let list = self.sessions.worker_cpus.trim();
        if list.is_empty() {
            return Ok(None);
        }
        let key = "sessions.worker_cpus";
        let mask = CpuMask::parse(list).map_err(|e| match e {
            KvdexError::Config(why) => bad(key, why),
            other => bad(key, other),
        })?;
        let allowed = CpuMask::of_current_thread().map_err(|e| bad(key, e))?;
        if !mask.cpus().any(|c| allowed.cpus().any(|a| a == c)) {
            return Err(bad(
                key,
                format!(
                    "none of CPUs {mask:?} is available to this process (it may use {allowed:?})"
                ),
            ));
        }
        Ok(Some(mask))
    }

    /// `sessions.data_socket`, if set.
    pub fn data_socket(&self) -> Option<PathBuf> {
        (!self.sessions.data_socket.is_empty()).then(|| PathBuf::from(&self.sessions.data_socket))
    }

    /// `http.unix_socket`, if set.
    pub fn unix_socket(&self) -> Option<PathBuf> {
        (!self.http.unix_socket.is_empty()).then(|| PathBuf::from(&self.http.unix_socket))
    }
}

mod layers;

use layers::{env_key, is_override_var, merge, parse_env_value, refuse_negative, set_key};

#[cfg(test)]
mod tests;

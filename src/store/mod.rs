//! Sessions and their KV storage.
//!
//! A [`Session`] is one sequence: its [`Shape`], and per layer, per KV head, the K and V rows
//! appended so far. Requests from the data plane ([`crate::worker`]) call the methods here; this
//! is the seam between the protocol and the storage.
//!
//! # Layout
//! - [`budget`]: the global byte budget every session reserves from.
//! - `layer`: one layer's arenas (contiguous, 64-byte aligned, per KV head) and its indices.
//! - `shape`: a session's [`Shape`] and its limits.
//! - `accounting`: arena growth under the budget, the bytes a session holds, [`LayerStats`].
//! - `spec`: what a session is created with beyond its shape ([`SessionSpec`]: Slim mode, its
//!   own static tokens, its storage format).
//! - [`quant`]: the storage format ([`KvFormat`]): rows in the session dtype, or int8 with
//!   scales (quantized on append, dequantized by a gather).
//! - `edit`: whole-session edits, `truncate` and `fork`.
//! - [`observe`]: how the store reports its background index work ([`BuildObserver`]).
//! - this file: [`Store`] (the arena source and budget sessions are made from) and
//!   [`Session`], whose methods lock one layer at a time: appends take the layer's write lock
//!   (growth copies into a larger arena under it), searches and gathers its read lock.

mod accounting;
pub mod budget;
mod edit;
pub mod engine_dest;
mod finite;
pub mod indexing;
mod layer;
pub mod observe;
pub mod quant;
pub mod retrieve;
pub mod sampler;
pub mod slim;
mod spec;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use kvdex_index::flat::FlatIndex;
use kvdex_index::{Hits, MipsIndexMut, SearchScratch};
use kvdex_transfer::host::HostLink;
use kvdex_transfer::DeviceLink;

pub use accounting::LayerStats;
pub use budget::Budget;
use indexing::{BuildPool, LayerIndex};
pub use indexing::{BuildStatus, DecodeConfig, SealNeighbours, SealTraining};
pub use kvdex_wire::KvFormat;
pub use kvdex_wire::{dtype_serde, Shape, SlimSpec};
use layer::LayerKv;
pub use observe::{BuildObserver, BuildOutcome, DecodeGauges};
pub use slim::SlimStats;
pub use spec::SessionSpec;

use crate::error::{KvdexError, Result};

/// The arena source the daemon uses: kvdex-transfer's `default_link()`, which gives pinned
/// memory when the CUDA driver loads and plain host memory (with a log line) otherwise.
pub fn default_link() -> Arc<dyn DeviceLink> {
    kvdex_transfer::default_link()
}

/// Where sessions get their memory: a [`DeviceLink`] for arenas (pinned when CUDA is present,
/// plain otherwise) and the daemon-wide [`Budget`]. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    link: Arc<dyn DeviceLink>,
    budget: Arc<Budget>,
    initial_tokens: usize,
    decode: Arc<DecodeConfig>,
    pool: Arc<BuildPool>,
    /// Told of builds and inserts (the daemon's metrics; nothing by default).
    observer: Arc<dyn BuildObserver>,
    /// Online recall sampling's slot pool and scoring job ([`sampler`]).
    sampler: Arc<sampler::Sampler>,
}

impl Store {
    /// A store allocating from `link` under `budget`; layers start with room for
    /// `initial_tokens` tokens and grow by doubling.
    pub fn new(link: Arc<dyn DeviceLink>, budget: Arc<Budget>, initial_tokens: usize) -> Self {
        Self {
            link,
            budget,
            initial_tokens: initial_tokens.max(1),
            decode: Arc::new(DecodeConfig::default()),
            pool: Arc::new(BuildPool::default()),
            observer: Arc::new(observe::NoopBuildObserver),
            sampler: Arc::default(),
        }
    }

    /// This store reporting its index builds and incremental inserts to `observer` (the
    /// daemon's metrics).
    pub fn with_observer(mut self, observer: Arc<dyn BuildObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// This store with decode-path settings `cfg` (static tokens, builds, retrieval).
    pub fn with_decode(mut self, cfg: DecodeConfig) -> Self {
        self.decode = Arc::new(cfg);
        self
    }

    /// The decode-path settings.
    pub fn decode(&self) -> &DecodeConfig {
        &self.decode
    }

    /// Host memory, no budget limit: for stand-alone sessions in tests and tools.
    pub fn unlimited() -> Self {
        Self::new(
            Arc::new(HostLink::new()),
            Arc::new(Budget::unlimited()),
            1024,
        )
    }

    /// A new empty session of `shape`.
    pub fn session(&self, shape: Shape) -> Result<Session> {
        self.session_with(shape, None)
    }

    /// A new empty session of `shape`, in Slim mode (K only, V recomputed from `W_KV`) when
    /// `slim` is given. Errors: a bad shape, or Slim mode asked for a GQA shape.
    pub fn session_with(&self, shape: Shape, slim: Option<SlimSpec>) -> Result<Session> {
        self.session_spec(
            shape,
            SessionSpec {
                slim,
                ..Default::default()
            },
        )
    }

    /// A new empty session of `shape` as `spec` asks: Slim mode, and static tokens of its own
    /// (the store's decode settings otherwise). Errors: a bad shape, Slim mode asked for a GQA
    /// shape, or static tokens over [`crate::config::MAX_STATIC_TOKENS`].
    pub fn session_spec(&self, shape: Shape, spec: SessionSpec) -> Result<Session> {
        shape.validate()?;
        let slim = spec.slim;
        if let Some(spec) = &slim {
            spec.validate(&shape)?;
        }
        let format = spec.kv_format;
        if slim.is_some() && format == KvFormat::Int8 {
            return Err(KvdexError::BadRequest(
                "kv_format \"int8\" with slim is not supported: choose one of them".into(),
            ));
        }
        let decode = spec.decode_config(&self.decode)?;
        let sampling = sampler::SessionSampler::for_spec(&spec, &decode, shape.layers)?;
        let layers = (0..shape.layers)
            .map(|_| {
                let indices = (0..shape.q_heads)
                    .map(|_| Box::new(FlatIndex::new(0)) as Box<dyn MipsIndexMut>)
                    .collect();
                RwLock::new(LayerKv::new(indices, slim.is_some(), format))
            })
            .collect();
        Ok(Session {
            shape,
            layers,
            index: (0..shape.layers)
                .map(|_| LayerIndex::new(shape.kv_heads as usize))
                .collect(),
            store: self.clone(),
            decode,
            held: AtomicU64::new(0),
            slim: slim.map(|spec| slim::SlimState::new(spec, shape.layers as usize)),
            engine_dests: Default::default(),
            sampling,
            format,
        })
    }

    /// The shared budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The arena source.
    pub fn link(&self) -> &Arc<dyn DeviceLink> {
        &self.link
    }
}

/// One sequence's KV cache.
pub struct Session {
    shape: Shape,
    layers: Vec<RwLock<LayerKv>>,
    /// Per layer: the decode-path indices (per KV head) and their build state.
    index: Vec<LayerIndex>,
    store: Store,
    /// The store's decode settings with this session's static tokens (shared with the store
    /// when the session keeps its defaults): every decode-path use reads these.
    decode: Arc<DecodeConfig>,
    /// Bytes reserved from the budget for this session's arenas; released on drop.
    held: AtomicU64,
    /// Slim mode: per-layer `W_KV` (None: K and V stored).
    slim: Option<slim::SlimState>,
    /// Engine GPU buffers registered as gather destinations (dropped, so unregistered, with
    /// the session).
    engine_dests: std::sync::Mutex<engine_dest::EngineDests>,
    /// Online recall sampling: which retrieves to sample, and the figures of those scored.
    sampling: sampler::SessionSampler,
    /// How the rows are stored (every layer alike).
    format: KvFormat,
}

impl Session {
    /// An empty session of the given shape in host memory, outside any budget.
    pub fn new(shape: Shape) -> Result<Self> {
        Store::unlimited().session(shape)
    }

    /// The session's shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// How the session stores its rows.
    pub fn kv_format(&self) -> KvFormat {
        self.format
    }

    /// Bytes of one stored row's elements (the scales of int8 rows apart).
    fn stored_row_bytes(&self) -> usize {
        self.format.row_bytes(&self.shape)
    }

    /// Bytes one token's rows take over every layer and KV head, scales included (K alone
    /// in Slim mode).
    pub fn bytes_per_token(&self) -> usize {
        let planes = if self.slim.is_some() { 1 } else { 2 };
        self.format.bytes_per_token(&self.shape, planes)
    }

    fn layer(&self, layer: u32) -> Result<&RwLock<LayerKv>> {
        self.layers.get(layer as usize).ok_or_else(|| {
            KvdexError::NotFound(format!("layer {layer} (session has {})", self.shape.layers))
        })
    }

    fn index_of(&self, layer: u32) -> Result<&LayerIndex> {
        self.index.get(layer as usize).ok_or_else(|| {
            KvdexError::NotFound(format!("layer {layer} (session has {})", self.shape.layers))
        })
    }

    /// The link this session's arenas come from: a retrieve's gather copies through it, so a
    /// destination must be registered with this link.
    pub fn link(&self) -> &Arc<dyn DeviceLink> {
        &self.store.link
    }

    /// This session's decode-path settings: the store's, with the session's own static tokens
    /// (sinks, window) when it was created with them.
    pub fn decode_config(&self) -> &DecodeConfig {
        &self.decode
    }

    /// Tokens stored for `layer`.
    pub fn len(&self, layer: u32) -> Result<usize> {
        Ok(self.layer(layer)?.read().map_err(poisoned)?.len)
    }

    /// Appends `tokens` tokens to `layer`. `k` and `v` are `[kv_heads][tokens][head_dim]` in the
    /// session dtype. Returns the layer's new token count. A Slim session stores K alone: `v`
    /// may be empty (or full-size, and is then ignored), and the layer's `W_KV` must be set.
    ///
    /// Fails with [`KvdexError::Budget`] when the growth the append needs does not fit in the
    /// global budget; the session keeps what it had.
    pub fn append(&self, layer: u32, tokens: usize, k: &[u8], v: &[u8]) -> Result<usize> {
        let s = &self.shape;
        let rb = s.row_bytes();
        let kvh = s.kv_heads as usize;
        let want = tokens.saturating_mul(rb * kvh);
        // A Slim layer without W_KV is refused here, before anything is stored.
        let slim = self.wkv(layer)?.is_some();
        let v_ok = v.len() == want || (slim && v.is_empty());
        if k.len() != want || !v_ok {
            return Err(KvdexError::BadRequest(format!(
                "append of {tokens} tokens needs {want} bytes each of K and V, got {} and {}",
                k.len(),
                v.len()
            )));
        }
        let d = s.head_dim as usize;
        for (name, bytes) in [("K", k), ("V", v)] {
            if let Some(i) = finite::first_non_finite(bytes, s.dtype) {
                let (head, token, dim) = (i / (tokens * d), i / d % tokens, i % d);
                return Err(KvdexError::BadRequest(format!(
                    "append to layer {layer}: {name} value {i} (kv head {head}, token {token} \
                     of {tokens}, dim {dim}) is NaN or infinite"
                )));
            }
        }
        if let Some((row, n2)) = finite::first_oversized_row(k, s.dtype, d) {
            return Err(KvdexError::BadRequest(format!(
                "append to layer {layer}: K row {row} (kv head {}, token {} of {tokens}) has \
                 squared norm {n2}, above the {:e} the indices can score",
                row / tokens,
                row % tokens,
                finite::MAX_ROW_NORM2
            )));
        }
        let mut guard = self.layer(layer)?.write().map_err(poisoned)?;
        let l = &mut *guard;
        let need = l.len + tokens;
        if need > u32::MAX as usize {
            return Err(KvdexError::BadRequest(format!(
                "layer {layer} would exceed 2^32 tokens"
            )));
        }
        if need > l.cap {
            self.grow(l, need)?;
        }
        match self.format {
            KvFormat::Dtype => l.write_rows(tokens, rb, k, v),
            KvFormat::Int8 => l.write_rows_int8(tokens, s.dtype, &mut vec![0.0; d], k, v),
        }
        l.update_indices(s.group() as usize, s.dtype, s.head_dim as usize)?;
        Ok(l.len)
    }

    /// Top-`k` keys by inner product for every query head of `layer`, through each head's index.
    ///
    /// `q` is `[q_heads][head_dim]`; `ids` and `scores` are `[q_heads][k]`. Returns the k used
    /// (clamped to the layer's length); only the first `q_heads * k_used` entries are written.
    #[allow(clippy::too_many_arguments)]
    pub fn search(
        &self,
        layer: u32,
        q: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        hits: &mut Hits,
        ids: &mut [u32],
        scores: &mut [f32],
    ) -> Result<usize> {
        let s = &self.shape;
        let d = s.head_dim as usize;
        if q.len() != s.q_heads as usize * d {
            return Err(KvdexError::BadRequest(format!(
                "query has {} values, expected q_heads*head_dim = {}",
                q.len(),
                s.q_heads as usize * d
            )));
        }
        let l = self.layer(layer)?.read().map_err(poisoned)?;
        let k = k.min(l.len);
        if ids.len() < s.q_heads as usize * k || scores.len() < s.q_heads as usize * k {
            return Err(KvdexError::BadRequest(format!(
                "output buffers hold {} ids and {} scores, need q_heads*k = {}",
                ids.len(),
                scores.len(),
                s.q_heads as usize * k
            )));
        }
        for (qh, index) in l.indices.iter().enumerate() {
            let keys = l.keys(qh / s.group() as usize, s.dtype, d)?;
            index.search(&keys, &q[qh * d..(qh + 1) * d], k, scratch, hits)?;
            if hits.len() != k {
                return Err(KvdexError::Protocol(format!(
                    "index {} returned {} hits for k = {k}",
                    index.name(),
                    hits.len()
                )));
            }
            ids[qh * k..(qh + 1) * k].copy_from_slice(&hits.ids);
            scores[qh * k..(qh + 1) * k].copy_from_slice(&hits.scores);
        }
        Ok(k)
    }

    /// Copies the K rows then the V rows of `ids` (for one KV head) into `out`. Returns bytes
    /// written: `2 * ids.len() * row_bytes`.
    pub fn gather(&self, layer: u32, kv_head: u32, ids: &[u32], out: &mut [u8]) -> Result<usize> {
        let s = &self.shape;
        if kv_head >= s.kv_heads {
            return Err(KvdexError::BadRequest(format!(
                "kv_head {kv_head} out of range (session has {})",
                s.kv_heads
            )));
        }
        let rb = s.row_bytes();
        let need = 2 * ids.len() * rb;
        if out.len() < need {
            return Err(KvdexError::BadRequest(format!(
                "gather of {} rows needs {need} bytes, buffer has {}",
                ids.len(),
                out.len()
            )));
        }
        let l = self.layer(layer)?.read().map_err(poisoned)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= l.len) {
            return Err(KvdexError::BadRequest(format!(
                "token id {bad} out of range (layer {layer} has {} tokens)",
                l.len
            )));
        }
        let (ko, vo) = out[..need].split_at_mut(ids.len() * rb);
        let (d, g) = (s.head_dim as usize, kv_head as usize);
        let keys = l.keys(g, s.dtype, d)?;
        let values = l.values(g, s.dtype, d)?;
        for (i, &id) in ids.iter().enumerate() {
            let o = i * rb..(i + 1) * rb;
            quant::copy_row(&keys, id, s.dtype, &mut ko[o.clone()]);
            if kvdex_index::KeyStore::len(&values) > 0 {
                quant::copy_row(&values, id, s.dtype, &mut vo[o]);
            }
        }
        if let Some(w) = self.wkv(layer)? {
            // Slim: V = K·W_KV for the selected rows.
            let d = s.head_dim as usize;
            let mut values = vec![0f32; ids.len() * d];
            let keys = slim::LayerKeys {
                layer: &l,
                dtype: s.dtype,
                head_dim: d,
                kv_heads: s.kv_heads as usize,
            };
            kvdex_index::attend::reconstruct_values_from(
                &keys,
                &w,
                self.slim.as_ref().and_then(|sl| sl.rope.as_ref()),
                ids,
                kv_head as usize,
                &mut Default::default(),
                &mut values,
            )?;
            slim::encode_rows(&values, s.dtype, vo);
        }
        Ok(need)
    }
}

fn poisoned<T>(_: T) -> KvdexError {
    KvdexError::Protocol("internal lock poisoned by an earlier panic".into())
}

#[cfg(test)]
mod tests;

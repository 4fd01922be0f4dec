//! Sessions and their KV storage.
//!
//! A [`Session`] is one sequence: its [`Shape`], and per layer, per KV head, the K and V rows
//! appended so far. Requests from the data plane ([`crate::worker`]) call the methods here; this
//! is the seam between the protocol and the storage.
//!
//! # Layout
//! - [`budget`]: the global byte budget every session reserves from.
//! - [`layer`]: one layer's arenas (contiguous, 64-byte aligned, per KV head) and its indices.
//! - this file: [`Shape`], [`Store`] (the arena source and budget sessions are made from) and
//!   [`Session`], whose methods lock one layer at a time: appends take the layer's write lock
//!   (growth copies into a larger arena under it), searches and gathers its read lock.

pub mod budget;
pub mod indexing;
mod layer;
pub mod retrieve;
pub mod slim;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use kvdex_index::flat::FlatIndex;
use kvdex_index::{Hits, KeyDtype, MipsIndexMut, SearchScratch};
use kvdex_transfer::host::HostLink;
use kvdex_transfer::DeviceLink;

pub use budget::Budget;
use indexing::{BuildPool, LayerIndex};
pub use indexing::{BuildStatus, DecodeConfig, SealNeighbours, SealTraining};
use layer::{arena_bytes, LayerKv};
pub use slim::{SlimSpec, SlimStats};

use crate::error::{KvdexError, Result};

/// The shape of a session's KV cache, fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// Transformer layers.
    pub layers: u32,
    /// Query heads per layer.
    pub q_heads: u32,
    /// KV heads per layer; query head `h` reads KV head `h / (q_heads / kv_heads)` (GQA).
    pub kv_heads: u32,
    /// Elements per head vector.
    pub head_dim: u32,
    /// Storage dtype of K and V.
    #[serde(with = "dtype_serde")]
    pub dtype: KeyDtype,
}

impl Shape {
    /// Most layers a session may have.
    pub const MAX_LAYERS: u32 = 1024;
    /// Most query (or KV) heads per layer.
    pub const MAX_HEADS: u32 = 1024;
    /// Longest head vector.
    pub const MAX_HEAD_DIM: u32 = 8192;

    /// Checks the shape is usable: all dimensions non-zero, within [`Shape::MAX_LAYERS`],
    /// [`Shape::MAX_HEADS`] and [`Shape::MAX_HEAD_DIM`] (a client cannot make the daemon allocate
    /// per-layer state for billions of layers), and GQA-divisible.
    pub fn validate(&self) -> Result<()> {
        for (name, v, max) in [
            ("layers", self.layers, Self::MAX_LAYERS),
            ("q_heads", self.q_heads, Self::MAX_HEADS),
            ("kv_heads", self.kv_heads, Self::MAX_HEADS),
            ("head_dim", self.head_dim, Self::MAX_HEAD_DIM),
        ] {
            if v > max {
                return Err(KvdexError::BadRequest(format!(
                    "{name} = {v} is above the limit {max}"
                )));
            }
        }
        if self.layers == 0 || self.q_heads == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(KvdexError::BadRequest(format!(
                "shape has a zero dimension: {self:?}"
            )));
        }
        if self.q_heads % self.kv_heads != 0 {
            return Err(KvdexError::BadRequest(format!(
                "q_heads ({}) is not a multiple of kv_heads ({})",
                self.q_heads, self.kv_heads
            )));
        }
        Ok(())
    }
    /// Query heads per KV head.
    pub fn group(&self) -> u32 {
        self.q_heads / self.kv_heads
    }
    /// Bytes of one token's row for one head.
    pub fn row_bytes(&self) -> usize {
        self.head_dim as usize * self.dtype.size()
    }
}

/// Serde for [`KeyDtype`] as "f16" | "bf16" | "f32".
pub mod dtype_serde {
    use kvdex_index::KeyDtype;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses "f16", "bf16" or "f32".
    pub fn parse(s: &str) -> Option<KeyDtype> {
        match s {
            "f16" | "float16" => Some(KeyDtype::F16),
            "bf16" | "bfloat16" => Some(KeyDtype::Bf16),
            "f32" | "float32" => Some(KeyDtype::F32),
            _ => None,
        }
    }
    /// The canonical name.
    pub fn name(d: KeyDtype) -> &'static str {
        match d {
            KeyDtype::F16 => "f16",
            KeyDtype::Bf16 => "bf16",
            KeyDtype::F32 => "f32",
        }
    }
    /// serde hook.
    pub fn serialize<S: Serializer>(d: &KeyDtype, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name(*d))
    }
    /// serde hook.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyDtype, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown dtype {s:?}: expected f16, bf16 or f32"))
        })
    }
}

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
        }
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
        shape.validate()?;
        if let Some(spec) = &slim {
            spec.validate(&shape)?;
        }
        let layers = (0..shape.layers)
            .map(|_| {
                let indices = (0..shape.q_heads)
                    .map(|_| Box::new(FlatIndex::new(0)) as Box<dyn MipsIndexMut>)
                    .collect();
                RwLock::new(LayerKv::new(indices, slim.is_some()))
            })
            .collect();
        Ok(Session {
            shape,
            layers,
            index: (0..shape.layers)
                .map(|_| LayerIndex::new(shape.kv_heads as usize))
                .collect(),
            store: self.clone(),
            held: AtomicU64::new(0),
            slim: slim.map(|spec| slim::SlimState::new(spec, shape.layers as usize)),
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

/// One layer's state as reported by `/stats` and `GET /v1/sessions/{id}`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerStats {
    /// Tokens stored.
    pub tokens: usize,
    /// Tokens the arenas hold room for.
    pub capacity: usize,
    /// Index kind searches use ("flat" until an index is built).
    pub index: &'static str,
    /// Tokens the index covers, least over the layer's query heads; `tokens - indexed` are
    /// waiting to be inserted (a build in progress reports its progress here).
    pub indexed: usize,
    /// Bytes the layer's indices hold, beyond the K/V rows.
    pub index_bytes: usize,
    /// The decode-path index build (seal) and its progress.
    pub build: BuildStatus,
}

/// One sequence's KV cache.
pub struct Session {
    shape: Shape,
    layers: Vec<RwLock<LayerKv>>,
    /// Per layer: the decode-path indices (per KV head) and their build state.
    index: Vec<LayerIndex>,
    store: Store,
    /// Bytes reserved from the budget for this session's arenas; released on drop.
    held: AtomicU64,
    /// Slim mode: per-layer `W_KV` (None: K and V stored).
    slim: Option<slim::SlimState>,
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

    /// The store's decode-path settings (static tokens, budgets).
    pub fn decode_config(&self) -> &DecodeConfig {
        &self.store.decode
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
        l.write_rows(tokens, rb, k, v);
        l.update_indices(s.group() as usize, s.dtype, s.head_dim as usize)?;
        Ok(l.len)
    }

    /// Grows `l` to hold `need` tokens: doubling when the budget allows, exactly `need`
    /// otherwise, or a budget error naming the exact growth asked for.
    fn grow(&self, l: &mut LayerKv, need: usize) -> Result<()> {
        let (kvh, rb) = (self.shape.kv_heads as usize, self.shape.row_bytes());
        let held = l.held_bytes(kvh, rb) as u64;
        let planes = l.planes();
        let bytes_at = |cap: usize| (planes * kvh * arena_bytes(cap, rb)) as u64;
        let roomy = need.max(2 * l.cap).max(self.store.initial_tokens);
        let budget = &self.store.budget;
        let cap = if budget.try_reserve(bytes_at(roomy) - held).is_ok() {
            roomy
        } else {
            budget.try_reserve(bytes_at(need) - held)?;
            need
        };
        let grown = bytes_at(cap) - held;
        if let Err(e) = l.grow(self.store.link.as_ref(), kvh, rb, cap) {
            budget.release(grown);
            return Err(e);
        }
        self.held.fetch_add(grown, Ordering::AcqRel);
        Ok(())
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
        let (kb, vb) = (
            l.k_bytes(kv_head as usize, rb),
            l.v_bytes(kv_head as usize, rb),
        );
        let (ko, vo) = out[..need].split_at_mut(ids.len() * rb);
        for (i, &id) in ids.iter().enumerate() {
            let r = id as usize * rb..(id as usize + 1) * rb;
            ko[i * rb..(i + 1) * rb].copy_from_slice(&kb[r.clone()]);
            if !vb.is_empty() {
                vo[i * rb..(i + 1) * rb].copy_from_slice(&vb[r]);
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

    /// Bytes of K and V stored (tokens appended, not capacity); K alone in Slim mode.
    pub fn resident_bytes(&self) -> u64 {
        self.layers
            .iter()
            .filter_map(|l| l.read().ok())
            .map(|l| {
                (l.planes() * l.len * self.shape.row_bytes() * self.shape.kv_heads as usize) as u64
            })
            .sum()
    }

    /// Bytes of arena this session holds, charged to the budget (capacity, not just rows).
    pub fn reserved_bytes(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// Per-layer tokens, capacity and index state.
    pub fn layer_stats(&self) -> Vec<LayerStats> {
        self.layers
            .iter()
            .zip(&self.index)
            .filter_map(|(l, li)| Some((l.read().ok()?, li)))
            .map(|(l, li)| {
                let build = li.status();
                let (indexed, bytes) = li.coverage();
                let built = build.state == "ready" || indexed > 0;
                LayerStats {
                    tokens: l.len,
                    capacity: l.cap,
                    index: match build.kind {
                        Some(k) if built => k,
                        _ => l.indices.first().map_or("flat", |i| i.name()),
                    },
                    indexed: if built {
                        indexed
                    } else {
                        l.indices.iter().map(|i| i.len()).min().unwrap_or(0)
                    },
                    index_bytes: bytes + l.indices.iter().map(|i| i.memory_bytes()).sum::<usize>(),
                    build,
                }
            })
            .collect()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The arenas free themselves as the layers drop; give their bytes back to the budget.
        self.store.budget.release(*self.held.get_mut());
    }
}

fn poisoned<T>(_: T) -> KvdexError {
    KvdexError::Protocol("internal lock poisoned by an earlier panic".into())
}

#[cfg(test)]
mod tests;

//! The index lifecycle of a session's layers: seal, background build, incremental insert.
//!
//! Each layer has one index per KV head, trained on the prefill queries of that head's whole
//! GQA group. One graph per KV head rather than per query head costs `group`× less memory and
//! build time (with 4 query heads per KV head, 129 bytes per token instead of 516), and the
//! group's queries together cover each head's distribution; the decode benchmark measures the
//! recall it gives.
//!
//! Index ids are *relative to the first non-static token*: an index over a KV head covers
//! tokens `sinks .. sinks + index.len()`, so the static tokens (the first `sinks` and the last
//! `window`, which the engine keeps) are never in an index and never returned.
//!
//! Lifecycle of a layer:
//! 1. Until sealed, searches scan the non-static tokens exactly (GQA-batched flat).
//! 2. [`Session::seal`] copies the layer's non-static keys out (under the read lock, so appends
//!    wait only for the copy) and queues one build per KV head on the store's build pool (never
//!    a request thread). Searches stay exact until a head's index is installed.
//! 3. Sealing again while a build runs is refused; sealing again later rebuilds, and the old
//!    index keeps serving until the new one replaces it.
//! 4. As decoding appends, tokens that leave the window are inserted by a background task, a
//!    batch at a time; a search scans the tokens not yet inserted exactly, so it never waits
//!    for an insert and never misses a token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Instant;

use half::{bf16, f16};
use kvdex_index::keys::KeyRows;
use kvdex_index::TrainingSignal;
use kvdex_index::{build_index, IndexKind, IndexParams, KeySlice, MipsIndexMut};

use super::{poisoned, Session};
use crate::error::{KvdexError, Result};

/// Static-token and build settings shared by every session of a store.
#[derive(Clone, Debug)]
pub struct DecodeConfig {
    /// S: the first tokens of every layer, kept by the engine and never retrieved.
    pub sinks: usize,
    /// W: the most recent tokens, kept by the engine and never retrieved.
    pub window: usize,
    /// Threads of the build pool (shared by every session of the store).
    pub build_threads: usize,
    /// Tokens inserted per lock hold by the background insert; also how many must be waiting
    /// before an insert is scheduled.
    pub insert_batch: usize,
    /// Index parameters (graph and hnsw).
    pub params: IndexParams,
    /// Spread one layer's query heads over cores (rayon) during a retrieve.
    pub parallel_heads: bool,
    /// Keys sampled per head to estimate the unretrieved mass (adaptive budget).
    pub tail_sample: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            sinks: 128,
            window: 512,
            build_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            insert_batch: 64,
            params: IndexParams::default(),
            parallel_heads: true,
            tail_sample: 256,
        }
    }
}

impl DecodeConfig {
    /// The end of the retrievable range `sinks .. end` of a layer of `len` tokens.
    pub fn retrievable_end(&self, len: usize) -> usize {
        len.saturating_sub(self.window).max(self.sinks)
    }
}

/// The build pool, created on first use so that stores which never seal start no threads.
#[derive(Default)]
pub(super) struct BuildPool(OnceLock<std::result::Result<rayon::ThreadPool, String>>);

impl BuildPool {
    pub(super) fn get(&self, threads: usize) -> Result<&rayon::ThreadPool> {
        self.0
            .get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads.max(1))
                    .thread_name(|i| format!("kvdex-build-{i}"))
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| KvdexError::Config(format!("cannot start the index build pool: {e}")))
    }
}

/// One KV head's index, if built.
pub(super) enum HeadIndex {
    /// No index: searches scan exactly.
    Exact,
    /// An index over tokens `sinks .. sinks + index.len()`.
    Ready(Box<dyn MipsIndexMut>),
}

/// Where a layer's build stands, as `/stats` and `GET /v1/sessions/{id}` report it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct BuildStatus {
    /// "none" (never sealed), "building", "ready" or "failed".
    pub state: &'static str,
    /// Index kind asked for at the last seal.
    pub kind: Option<&'static str>,
    /// KV heads whose index is built (of `heads`).
    pub heads_done: u32,
    /// KV heads being built.
    pub heads: u32,
    /// Seconds the last build has run (so far, or in all).
    pub secs: f64,
    /// Tokens the last seal indexed per KV head.
    pub sealed_tokens: usize,
    /// Why the last build failed.
    pub error: Option<String>,
}

/// Per-layer index state of a session.
pub(super) struct LayerIndex {
    /// Per KV head.
    pub(super) heads: Vec<RwLock<HeadIndex>>,
    status: Mutex<(BuildStatus, Option<Instant>)>,
    inserting: AtomicBool,
}

impl LayerIndex {
    pub(super) fn new(kv_heads: usize) -> Self {
        Self {
            heads: (0..kv_heads)
                .map(|_| RwLock::new(HeadIndex::Exact))
                .collect(),
            status: Mutex::new((
                BuildStatus {
                    state: "none",
                    heads: kv_heads as u32,
                    ..Default::default()
                },
                None,
            )),
            inserting: AtomicBool::new(false),
        }
    }

    /// The build status, with the running time brought up to date.
    pub(super) fn status(&self) -> BuildStatus {
        match self.status.lock() {
            Ok(g) => {
                let mut s = g.0.clone();
                if let Some(t) = g.1 {
                    s.secs = t.elapsed().as_secs_f64();
                }
                s
            }
            Err(_) => BuildStatus {
                state: "failed",
                error: Some("status lock poisoned".into()),
                ..Default::default()
            },
        }
    }

    /// Tokens indexed (least over KV heads) and bytes held by the indices.
    pub(super) fn coverage(&self) -> (usize, usize) {
        let mut least = usize::MAX;
        let mut bytes = 0;
        for h in &self.heads {
            match h.read().as_deref() {
                Ok(HeadIndex::Ready(i)) => {
                    least = least.min(i.len());
                    bytes += i.memory_bytes();
                }
                _ => least = 0,
            }
        }
        (if least == usize::MAX { 0 } else { least }, bytes)
    }

    fn update(&self, f: impl FnOnce(&mut BuildStatus, &mut Option<Instant>)) {
        if let Ok(mut g) = self.status.lock() {
            let (s, t) = &mut *g;
            f(s, t);
        }
    }
}

/// Keys copied out of a layer so that a long build reads them without holding its lock.
enum OwnedKeys {
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
}

impl OwnedKeys {
    fn copy_of(keys: &KeySlice<'_>, rows: std::ops::Range<usize>) -> Self {
        let d = kvdex_index::KeyStore::dim(keys);
        let r = rows.start * d..rows.end * d;
        match keys.rows() {
            KeyRows::F16(s) => Self::F16(s[r].to_vec()),
            KeyRows::Bf16(s) => Self::Bf16(s[r].to_vec()),
            KeyRows::F32(s) => Self::F32(s[r].to_vec()),
        }
    }

    fn slice(&self, dim: usize) -> Result<KeySlice<'_>> {
        let rows = match self {
            Self::F16(v) => KeyRows::F16(v),
            Self::Bf16(v) => KeyRows::Bf16(v),
            Self::F32(v) => KeyRows::F32(v),
        };
        Ok(KeySlice::new(rows, dim)?)
    }
}

/// Training queries for one layer: `vectors` is `[q_heads][n][head_dim]` and `positions[i]` the
/// token position of query `i` (the same for every head), so that the build stays causal.
#[derive(Clone, Copy, Debug)]
pub struct SealTraining<'a> {
    /// `[q_heads][n][head_dim]` f32.
    pub vectors: &'a [f32],
    /// `n` token positions.
    pub positions: &'a [u32],
}

/// Rows `sinks..end` of a KV head's keys as a key store whose id 0 is token `sinks`.
pub(super) fn view<'a>(keys: &KeySlice<'a>, start: usize, end: usize) -> Result<KeySlice<'a>> {
    let d = kvdex_index::KeyStore::dim(keys);
    let r = start * d..end * d;
    let rows = match keys.rows() {
        KeyRows::F16(s) => KeyRows::F16(&s[r]),
        KeyRows::Bf16(s) => KeyRows::Bf16(&s[r]),
        KeyRows::F32(s) => KeyRows::F32(&s[r]),
    };
    Ok(KeySlice::new(rows, d)?)
}

/// Neighbour lists the engine computed itself (on the GPU, from the prefill attention it
/// already has): list `i` belongs to query head `heads[i]` and holds `lens[i]` token ids, best
/// first, taken in order from `ids`. Ids are absolute token positions, like retrieve's; static
/// ones (sinks, window) are dropped, since the index never holds them.
#[derive(Clone, Copy, Debug)]
pub struct SealNeighbours<'a> {
    /// Query head of each list.
    pub heads: &'a [u32],
    /// Length of each list.
    pub lens: &'a [u32],
    /// All lists' ids, concatenated.
    pub ids: &'a [u32],
}

/// What one KV head's build is trained on.
enum HeadTraining {
    /// Sampled queries `[n][head_dim]` and their positions relative to the first non-static
    /// token (empty: a key-only build).
    Queries(Vec<f32>, Vec<u32>),
    /// Neighbour lists in index ids (token - sinks).
    Neighbours(Vec<Vec<u32>>),
}

impl HeadTraining {
    fn signal(&self) -> TrainingSignal<'_> {
        match self {
            Self::Queries(_, p) if p.is_empty() => TrainingSignal::None,
            Self::Queries(vectors, positions) => TrainingSignal::Queries { vectors, positions },
            Self::Neighbours(lists) if lists.is_empty() => TrainingSignal::None,
            Self::Neighbours(lists) => TrainingSignal::Neighbours(lists),
        }
    }
}

/// A queued build of one layer. It holds its session weakly: dropping the session mid-build
/// frees the session's memory at once, and the job stops at the next KV head (or before it
/// starts), dropping its private copy of the keys.
struct BuildJob {
    session: Weak<Session>,
    cfg: Arc<DecodeConfig>,
    head_dim: usize,
    layer: u32,
    kind: IndexKind,
}

impl BuildJob {
    fn run(self, copies: Vec<OwnedKeys>, training: Vec<HeadTraining>) {
        let layer = self.layer;
        // Each head's private key copy is dropped once its index is built, so a long build
        // holds one head's copy at a time after the first.
        for (g, (keys, train)) in copies.into_iter().zip(training).enumerate() {
            if self.session.strong_count() == 0 {
                tracing::debug!(layer, "session dropped: index build abandoned");
                return;
            }
            let built = keys.slice(self.head_dim).and_then(|k| {
                Ok(build_index(
                    self.kind,
                    &k,
                    &train.signal(),
                    &self.cfg.params,
                )?)
            });
            drop(keys);
            // Held only to install the result, never while building.
            let Some(session) = self.session.upgrade() else {
                return;
            };
            let Ok(li) = session.index_of(layer) else {
                return;
            };
            match built {
                Ok(index) => {
                    if let Ok(mut h) = li.heads[g].write() {
                        *h = HeadIndex::Ready(index);
                    }
                    li.update(|st, _| st.heads_done += 1);
                }
                Err(e) => {
                    tracing::warn!(layer, kv_head = g, error = %e, "index build failed");
                    li.update(|st, t| {
                        st.state = "failed";
                        st.error = Some(format!("kv head {g}: {e}"));
                        st.secs = t.map_or(0.0, |t| t.elapsed().as_secs_f64());
                        *t = None;
                    });
                    return;
                }
            }
        }
        let Some(session) = self.session.upgrade() else {
            return;
        };
        let Ok(li) = session.index_of(layer) else {
            return;
        };
        li.update(|st, t| {
            st.state = "ready";
            st.secs = t.map_or(0.0, |t| t.elapsed().as_secs_f64());
            *t = None;
        });
        session.insert_pending(layer);
    }
}

impl Session {
    /// Seals `layer`'s prefill: queues a background build of a `kind` index per KV head over
    /// the non-static tokens stored now, trained on `training` (None: a key-only build).
    ///
    /// Returns at once; [`Session::build_status`] reports progress. Errors: an unknown layer,
    /// a layer with no non-static token, malformed training queries, or a build of this layer
    /// already running (searches meanwhile use the previous index, or scan exactly).
    pub fn seal(
        self: &Arc<Self>,
        layer: u32,
        kind: IndexKind,
        training: Option<SealTraining<'_>>,
    ) -> Result<()> {
        let s = self.shape;
        let (d, hq) = (s.head_dim as usize, s.q_heads as usize);
        if let Some(t) = training {
            let n = t.positions.len();
            if t.vectors.len() != hq * n * d {
                return Err(KvdexError::BadRequest(format!(
                    "seal training holds {} floats; {n} positions x q_heads {hq} x head_dim {d} \
                     need {}",
                    t.vectors.len(),
                    hq * n * d
                )));
            }
            if let Some(pos) = t.vectors.iter().position(|x| !x.is_finite()) {
                return Err(KvdexError::BadRequest(format!(
                    "seal training query value {pos} is not finite"
                )));
            }
        }
        let (group, sinks) = (s.group() as usize, self.store.decode.sinks);
        self.seal_with(layer, kind, |_, _| {
            Ok((0..s.kv_heads as usize)
                .map(|g| {
                    let (v, p) = group_training(training, g, group, hq, d, sinks);
                    HeadTraining::Queries(v, p)
                })
                .collect())
        })
    }

    /// [`Session::seal`] with the engine's own neighbour lists as the training signal (the
    /// exact query-to-key top lists, which the engine's prefill attention already computed):
    /// kvdex skips its own exact search, the expensive step of a graph build. Lists of a GQA
    /// group train their KV head's index. Errors: a query head or list length out of range,
    /// lengths that do not add up to the ids given, or an id beyond the layer's tokens.
    pub fn seal_with_neighbours(
        self: &Arc<Self>,
        layer: u32,
        kind: IndexKind,
        lists: SealNeighbours<'_>,
    ) -> Result<()> {
        let s = self.shape;
        if lists.heads.len() != lists.lens.len() {
            return Err(KvdexError::BadRequest(format!(
                "seal neighbour lists: {} query heads but {} lengths",
                lists.heads.len(),
                lists.lens.len()
            )));
        }
        let total: u64 = lists.lens.iter().map(|&n| n as u64).sum();
        if total != lists.ids.len() as u64 {
            return Err(KvdexError::BadRequest(format!(
                "seal neighbour list lengths add up to {total} ids, {} were sent",
                lists.ids.len()
            )));
        }
        if let Some((i, &h)) = lists
            .heads
            .iter()
            .enumerate()
            .find(|(_, &h)| h >= s.q_heads)
        {
            return Err(KvdexError::BadRequest(format!(
                "seal neighbour list {i} names query head {h}; the session has {}",
                s.q_heads
            )));
        }
        let group = s.group() as usize;
        self.seal_with(layer, kind, |start, (end, len)| {
            let mut per_head: Vec<Vec<Vec<u32>>> = vec![Vec::new(); s.kv_heads as usize];
            let mut at = 0usize;
            for (i, (&h, &n)) in lists.heads.iter().zip(lists.lens).enumerate() {
                let ids = &lists.ids[at..at + n as usize];
                at += n as usize;
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= len) {
                    return Err(KvdexError::BadRequest(format!(
                        "seal neighbour list {i} names token {bad}; layer {layer} has {len} tokens"
                    )));
                }
                let kept: Vec<u32> = ids
                    .iter()
                    .filter(|&&id| (start..end).contains(&(id as usize)))
                    .map(|&id| id - start as u32)
                    .collect();
                if !kept.is_empty() {
                    per_head[h as usize / group].push(kept);
                }
            }
            Ok(per_head.into_iter().map(HeadTraining::Neighbours).collect())
        })
    }

    /// The common part of a seal: checks the layer, marks it building, copies its non-static
    /// keys out, and queues the job. `training(start, (end, len))` makes each KV head's
    /// training from the retrievable range `start..end` of a layer of `len` tokens.
    fn seal_with(
        self: &Arc<Self>,
        layer: u32,
        kind: IndexKind,
        training: impl FnOnce(usize, (usize, usize)) -> Result<Vec<HeadTraining>>,
    ) -> Result<()> {
        let s = self.shape;
        let d = s.head_dim as usize;
        let cfg = self.store.decode.clone();
        let li = self.index_of(layer)?;
        let pool = self.store.pool.get(cfg.build_threads)?;
        let (copies, training) = {
            let l = self.layer(layer)?.read().map_err(poisoned)?;
            let end = cfg.retrievable_end(l.len);
            if end <= cfg.sinks {
                return Err(KvdexError::BadRequest(format!(
                    "layer {layer} has {} tokens, all static (sinks {} + window {}): nothing \
                     to index",
                    l.len, cfg.sinks, cfg.window
                )));
            }
            let training = training(cfg.sinks, (end, l.len))?;
            let mut started = false;
            li.update(|st, t| {
                if st.state != "building" {
                    started = true;
                    *st = BuildStatus {
                        state: "building",
                        kind: Some(kind_name(kind)),
                        heads: s.kv_heads,
                        sealed_tokens: end - cfg.sinks,
                        ..Default::default()
                    };
                    *t = Some(Instant::now());
                }
            });
            if !started {
                return Err(KvdexError::BadRequest(format!(
                    "layer {layer}: an index build is already in progress (searches use the \
                     previous index or scan exactly until it is done)"
                )));
            }
            let copies = (0..s.kv_heads as usize)
                .map(|g| Ok(OwnedKeys::copy_of(&l.keys(g, s.dtype, d)?, cfg.sinks..end)))
                .collect::<Result<Vec<_>>>()?;
            (copies, training)
        };
        let job = BuildJob {
            session: Arc::downgrade(self),
            cfg,
            head_dim: d,
            layer,
            kind,
        };
        pool.spawn(move || job.run(copies, training));
        Ok(())
    }

    /// The build status of `layer`.
    pub fn build_status(&self, layer: u32) -> Result<BuildStatus> {
        Ok(self.index_of(layer)?.status())
    }

    /// Schedules a background insert of the tokens that left `layer`'s window since its index
    /// was built or last extended, when at least `insert_batch` are waiting. Never blocks.
    pub fn schedule_insert(self: &Arc<Self>, layer: u32) {
        let cfg = &self.store.decode;
        let (Ok(li), Ok(len)) = (self.index_of(layer), self.len(layer)) else {
            return;
        };
        let (indexed, _) = li.coverage();
        let ready = li.heads.iter().all(|h| {
            h.read()
                .map(|h| matches!(*h, HeadIndex::Ready(_)))
                .unwrap_or(false)
        });
        let pending = cfg.retrievable_end(len).saturating_sub(cfg.sinks + indexed);
        if !ready || pending < cfg.insert_batch.max(1) || li.inserting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        match self.store.pool.get(cfg.build_threads) {
            Ok(pool) => {
                // Weak, like a build: a queued insert does not keep a dropped session alive.
                let session = Arc::downgrade(self);
                pool.spawn(move || {
                    if let Some(session) = session.upgrade() {
                        session.insert_pending(layer);
                    }
                });
            }
            Err(_) => li.inserting.store(false, Ordering::Release),
        }
    }

    /// Inserts every waiting token, `insert_batch` at a time per KV head, releasing the locks
    /// between batches so that searches (which scan what is not inserted) wait at most one
    /// batch.
    fn insert_pending(&self, layer: u32) {
        let Ok(li) = self.index_of(layer) else { return };
        let cfg = &self.store.decode;
        let (s, d) = (self.shape, self.shape.head_dim as usize);
        li.inserting.store(true, Ordering::Release);
        loop {
            let mut more = false;
            let Ok(l) = self.layer(layer).and_then(|l| l.read().map_err(poisoned)) else {
                break;
            };
            let end = cfg.retrievable_end(l.len);
            for (g, head) in li.heads.iter().enumerate() {
                let Ok(mut h) = head.write() else { continue };
                let HeadIndex::Ready(index) = &mut *h else {
                    continue;
                };
                let from = cfg.sinks + index.len();
                if from >= end {
                    continue;
                }
                let to = end.min(from + cfg.insert_batch.max(1));
                let res = l
                    .keys(g, s.dtype, d)
                    .and_then(|k| view(&k, cfg.sinks, to))
                    .and_then(|v| Ok(index.insert(&v)?));
                if let Err(e) = res {
                    tracing::warn!(layer, kv_head = g, error = %e, "index insert failed");
                    continue;
                }
                more |= to < end;
            }
            if !more {
                break;
            }
        }
        li.inserting.store(false, Ordering::Release);
    }
}

/// The training queries of KV head `g`'s group, with positions made relative to the first
/// non-static token; queries that saw only sinks are dropped.
fn group_training(
    t: Option<SealTraining<'_>>,
    g: usize,
    group: usize,
    q_heads: usize,
    d: usize,
    sinks: usize,
) -> (Vec<f32>, Vec<u32>) {
    let Some(t) = t else {
        return (Vec::new(), Vec::new());
    };
    let n = t.positions.len();
    let (mut vectors, mut positions) = (Vec::new(), Vec::new());
    for h in g * group..((g + 1) * group).min(q_heads) {
        for (i, &p) in t.positions.iter().enumerate() {
            if (p as usize) < sinks {
                continue;
            }
            let at = (h * n + i) * d;
            vectors.extend_from_slice(&t.vectors[at..at + d]);
            positions.push(p - sinks as u32);
        }
    }
    (vectors, positions)
}

/// The stable name of an index kind.
pub fn kind_name(kind: IndexKind) -> &'static str {
    match kind {
        IndexKind::Flat => "flat",
        IndexKind::Hnsw => "hnsw",
        IndexKind::Graph => "graph",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrievable_range_excludes_sinks_and_window() {
        let c = DecodeConfig {
            sinks: 4,
            window: 8,
            ..Default::default()
        };
        assert_eq!(c.retrievable_end(0), 4);
        assert_eq!(c.retrievable_end(12), 4);
        assert_eq!(c.retrievable_end(13), 5);
        assert_eq!(c.retrievable_end(100), 92);
    }

    #[test]
    fn group_training_takes_the_groups_heads_and_shifts_positions() {
        // 4 query heads, 2 positions, d = 1: value = 10 * head + position index.
        let vectors: Vec<f32> = (0..4)
            .flat_map(|h| (0..2).map(move |i| (10 * h + i) as f32))
            .collect();
        let positions = [2u32, 7];
        let t = Some(SealTraining {
            vectors: &vectors,
            positions: &positions,
        });
        // KV head 1 of 2 reads query heads 2 and 3; position 2 saw only sinks (S = 3).
        let (v, p) = group_training(t, 1, 2, 4, 1, 3);
        assert_eq!(v, vec![21.0, 31.0]);
        assert_eq!(p, vec![4, 4]);
        assert_eq!(
            group_training(None, 0, 2, 4, 1, 3),
            (Vec::new(), Vec::new())
        );
    }
}

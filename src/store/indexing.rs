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

use super::observe::BuildReport;
use super::{poisoned, Session};
use crate::error::{KvdexError, Result};

mod build;
mod config;
mod guide;
mod insert;
mod stage;

use build::{group_training, BuildJob, HeadTraining, OwnedKeys};
pub(super) use config::BuildPool;
pub use config::DecodeConfig;
pub(super) use guide::Guides;
pub(super) use stage::Staged;

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
    /// Background insert calls since the last seal (one per KV head and batch).
    pub inserts: u64,
    /// Of those, the ones guided by captured decode queries (`decode.insert_guide_queries`).
    pub guided_inserts: u64,
    /// Decode queries handed to guided inserts.
    pub guide_queries: u64,
    /// Seconds spent under the KV head index's shared lock before an insert (searches go on
    /// meanwhile): the guide queries' approximate top lists and the copy of the index.
    pub guide_secs: f64,
    /// Seconds spent in insert calls: on the copy with no lock held, or, for an index over
    /// `decode.insert_copy_max_bytes` (or hnsw), in place under the exclusive lock (a search
    /// of that head then waits for at most one such call).
    pub insert_secs: f64,
}

/// Per-layer index state of a session.
pub(super) struct LayerIndex {
    /// Per KV head.
    pub(super) heads: Vec<RwLock<HeadIndex>>,
    status: Mutex<(BuildStatus, Option<Instant>)>,
    inserting: AtomicBool,
    /// Decode queries captured by retrieves to guide the next insert.
    pub(super) guides: Guides,
    /// Training queries staged by seal parts for the next seal.
    pub(super) staged: Mutex<Option<Staged>>,
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
            guides: Guides::new(kv_heads),
            staged: Mutex::new(None),
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

    /// True while a build of the layer is queued or running.
    pub(super) fn is_building(&self) -> bool {
        self.status.lock().is_ok_and(|g| g.0.state == "building")
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

/// Training queries for one layer: `vectors` is `[q_heads][n][head_dim]` and `positions[i]` the
/// token position of query `i` (the same for every head), so that the build stays causal.
#[derive(Clone, Copy, Debug)]
pub struct SealTraining<'a> {
    /// `[q_heads][n][head_dim]` f32.
    pub vectors: &'a [f32],
    /// `n` token positions.
    pub positions: &'a [u32],
}

impl SealTraining<'_> {
    /// Refuses a set whose floats are not `n x q_heads x head_dim`, or that holds a NaN or an
    /// infinity; `what` names it in the message ("seal training", "seal part").
    fn check(&self, what: &str, hq: usize, d: usize) -> Result<()> {
        let n = self.positions.len();
        let want = n.checked_mul(hq * d);
        if want != Some(self.vectors.len()) {
            return Err(KvdexError::BadRequest(format!(
                "{what} holds {} floats; {n} positions x q_heads {hq} x head_dim {d} need {}",
                self.vectors.len(),
                want.map_or_else(|| "more than fit".into(), |w| w.to_string())
            )));
        }
        if let Some(pos) = self.vectors.iter().position(|x| !x.is_finite()) {
            return Err(KvdexError::BadRequest(format!(
                "{what} query value {pos} is not finite"
            )));
        }
        Ok(())
    }
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

impl Session {
    /// Seals `layer`'s prefill: queues a background build of a `kind` index per KV head over
    /// the non-static tokens stored now, trained on the queries staged by
    /// [`Session::stage_training`] followed by `training` (neither: a key-only build).
    ///
    /// Returns at once; [`Session::build_status`] reports progress. Errors: an unknown layer,
    /// a layer with no non-static token, malformed training queries, or a build of this layer
    /// already running (searches meanwhile use the previous index, or scan exactly). The
    /// staged queries are released either way.
    pub fn seal(
        self: &Arc<Self>,
        layer: u32,
        kind: IndexKind,
        training: Option<SealTraining<'_>>,
    ) -> Result<()> {
        let staged = self.take_staged(layer)?;
        let s = self.shape;
        let (d, hq) = (s.head_dim as usize, s.q_heads as usize);
        if let Some(t) = &training {
            t.check("seal training", hq, d)?;
        }
        let mut parts = staged.as_ref().map_or_else(Vec::new, Staged::parts);
        parts.extend(training);
        let (group, sinks) = (s.group() as usize, self.decode.sinks);
        self.seal_with(layer, kind, |_, _| {
            Ok((0..s.kv_heads as usize)
                .map(|g| {
                    let (v, p) = group_training(&parts, g, group, hq, d, sinks);
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
        if let Some(st) = self.take_staged(layer)? {
            return Err(KvdexError::BadRequest(format!(
                "layer {layer} has {} training positions staged by seal parts, which a \
                 neighbour-list seal cannot use; they are discarded (seal with queries to use \
                 them)",
                st.len()
            )));
        }
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
        let cfg = self.decode.clone();
        let li = self.index_of(layer)?;
        let pool = self.store.pool.get(cfg.build_threads)?;
        let (copies, training, sealed) = {
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
            let mut before = None;
            let sealed = Instant::now();
            li.update(|st, t| {
                if st.state != "building" {
                    started = true;
                    before = Some((st.clone(), *t));
                    *st = BuildStatus {
                        state: "building",
                        kind: Some(kind_name(kind)),
                        heads: s.kv_heads,
                        sealed_tokens: end - cfg.sinks,
                        ..Default::default()
                    };
                    *t = Some(sealed);
                }
            });
            if !started {
                return Err(KvdexError::BadRequest(format!(
                    "layer {layer}: an index build is already in progress (searches use the \
                     previous index or scan exactly until it is done)"
                )));
            }
            li.guides
                .prepare(cfg.insert_guide_queries, d, cfg.insert_batch.max(1));
            let copies = (0..s.kv_heads as usize)
                .map(|g| Ok(OwnedKeys::copy_of(&l.keys(g, s.dtype, d)?, cfg.sinks..end)))
                .collect::<Result<Vec<_>>>();
            let copies = match copies {
                Ok(c) => c,
                Err(e) => {
                    // No build will run: the layer goes back to where it stood, rather than
                    // "building" for good (which would refuse every later seal).
                    li.update(|st, t| (*st, *t) = before.take().unwrap_or_default());
                    return Err(e);
                }
            };
            (copies, training, sealed)
        };
        let job = BuildJob {
            report: BuildReport::start(self.store.observer.clone(), sealed),
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
        let t = [SealTraining {
            vectors: &vectors,
            positions: &positions,
        }];
        // KV head 1 of 2 reads query heads 2 and 3; position 2 saw only sinks (S = 3).
        let (v, p) = group_training(&t, 1, 2, 4, 1, 3);
        assert_eq!(v, vec![21.0, 31.0]);
        assert_eq!(p, vec![4, 4]);
        assert_eq!(group_training(&[], 0, 2, 4, 1, 3), (Vec::new(), Vec::new()));
        // The same set in two parts (one position each) gives the same queries in the same
        // order.
        let (a, b): (Vec<f32>, Vec<f32>) = (
            (0..4).map(|h| (10 * h) as f32).collect(),
            (0..4).map(|h| (10 * h + 1) as f32).collect(),
        );
        let parts = [
            SealTraining {
                vectors: &a,
                positions: &positions[..1],
            },
            SealTraining {
                vectors: &b,
                positions: &positions[1..],
            },
        ];
        for g in 0..2 {
            assert_eq!(
                group_training(&parts, g, 2, 4, 1, 1),
                group_training(&t, g, 2, 4, 1, 1)
            );
        }
    }
}

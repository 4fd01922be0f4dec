//! Sealing a layer: the engine's training signal (prefill queries, staged parts, or its own
//! neighbour lists), checked and turned into one build job per KV head on the build pool.

use std::sync::Arc;
use std::time::Instant;

use kvdex_index::IndexKind;

use super::build::{group_training, BuildJob, HeadTraining, OwnedKeys};
use super::{kind_name, BuildStatus, Staged};
use crate::error::{KvdexError, Result};
use crate::store::observe::BuildReport;
use crate::store::{poisoned, Session};

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
    pub(super) fn check(&self, what: &str, hq: usize, d: usize) -> Result<()> {
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
        if let Some((row, n2)) = crate::store::finite::first_oversized_f32_row(self.vectors, d) {
            return Err(KvdexError::BadRequest(format!(
                "{what} query {row} has squared norm {n2}, above the {:e} the indices can score",
                crate::store::finite::MAX_ROW_NORM2
            )));
        }
        Ok(())
    }
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
        let kind = cfg.kind_override.unwrap_or(kind);
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

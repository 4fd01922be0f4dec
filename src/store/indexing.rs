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
mod seal;
mod stage;

pub(super) use config::BuildPool;
pub use config::DecodeConfig;
pub(super) use guide::Guides;
pub use seal::{SealNeighbours, SealTraining};
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

    /// True while a background insert of the layer is queued or running.
    pub(super) fn is_inserting(&self) -> bool {
        self.inserting.load(Ordering::Acquire)
    }

    /// Drops every KV head's index (searches scan exactly until the layer is sealed again),
    /// saying why in the build status.
    pub(super) fn drop_indices(&self, why: String) -> Result<()> {
        for h in &self.heads {
            *h.write().map_err(poisoned)? = HeadIndex::Exact;
        }
        let heads = self.heads.len() as u32;
        self.update(|s, t| {
            *s = BuildStatus {
                state: "none",
                heads,
                error: Some(why),
                ..Default::default()
            };
            *t = None;
        });
        Ok(())
    }

    /// A copy of this layer's indices (for a fork): each KV head's index cloned where the
    /// index kind can copy itself, exact otherwise, with the build status to match.
    pub(super) fn copy_of(&self) -> Result<LayerIndex> {
        let copy = LayerIndex::new(self.heads.len());
        let mut all = true;
        for (dst, src) in copy.heads.iter().zip(&self.heads) {
            if let HeadIndex::Ready(i) = &*src.read().map_err(poisoned)? {
                match i.try_clone_box() {
                    Some(c) => *dst.write().map_err(poisoned)? = HeadIndex::Ready(c),
                    None => all = false,
                }
            } else {
                all = false;
            }
        }
        let status = self.status();
        if all && status.state == "ready" {
            copy.update(|s, _| *s = status);
        }
        Ok(copy)
    }

    fn update(&self, f: impl FnOnce(&mut BuildStatus, &mut Option<Instant>)) {
        if let Ok(mut g) = self.status.lock() {
            let (s, t) = &mut *g;
            f(s, t);
        }
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
        KeyRows::I8(q) => KeyRows::I8(q.rows(d, start..end)),
    };
    Ok(KeySlice::new(rows, d)?)
}

/// The stable name of an index kind.
pub fn kind_name(kind: IndexKind) -> &'static str {
    kind.name()
}

#[cfg(test)]
mod tests {
    use super::build::group_training;
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

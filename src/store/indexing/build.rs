//! The background build of a sealed layer: the keys copied out of the layer, each KV head's
//! training signal, and the job the build pool runs (one index per KV head, installed as each
//! finishes).

use super::*;
use crate::store::observe::BuildOutcome;

/// Keys copied out of a layer so that a long build reads them without holding its lock.
pub(super) enum OwnedKeys {
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
    /// Int8 codes and their per-row scales.
    I8(Vec<i8>, Vec<half::bf16>),
}

impl OwnedKeys {
    pub(super) fn copy_of(keys: &KeySlice<'_>, rows: std::ops::Range<usize>) -> Self {
        let d = kvdex_index::KeyStore::dim(keys);
        let r = rows.start * d..rows.end * d;
        match keys.rows() {
            KeyRows::F16(s) => Self::F16(s[r].to_vec()),
            KeyRows::Bf16(s) => Self::Bf16(s[r].to_vec()),
            KeyRows::F32(s) => Self::F32(s[r].to_vec()),
            KeyRows::I8(q) => {
                let part = q.rows(d, rows);
                Self::I8(part.codes.to_vec(), part.scales.to_vec())
            }
        }
    }

    pub(super) fn slice(&self, dim: usize) -> Result<KeySlice<'_>> {
        let rows = match self {
            Self::F16(v) => KeyRows::F16(v),
            Self::Bf16(v) => KeyRows::Bf16(v),
            Self::F32(v) => KeyRows::F32(v),
            Self::I8(codes, scales) => KeyRows::I8(kvdex_index::quant::QuantRows { codes, scales }),
        };
        Ok(KeySlice::new(rows, dim)?)
    }
}

/// What one KV head's build is trained on.
pub(super) enum HeadTraining {
    /// Sampled queries `[n][head_dim]` and their positions relative to the first non-static
    /// token (empty: a key-only build).
    Queries(Vec<f32>, Vec<u32>),
    /// Neighbour lists in index ids (token - sinks).
    Neighbours(Vec<Vec<u32>>),
}

impl HeadTraining {
    pub(super) fn signal(&self) -> TrainingSignal<'_> {
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
pub(super) struct BuildJob {
    /// Reports the build's end to the store's observer (abandoned if the job drops first).
    pub(super) report: BuildReport,
    pub(super) session: Weak<Session>,
    pub(super) cfg: Arc<DecodeConfig>,
    pub(super) head_dim: usize,
    pub(super) layer: u32,
    pub(super) kind: IndexKind,
}

impl BuildJob {
    pub(super) fn run(mut self, copies: Vec<OwnedKeys>, training: Vec<HeadTraining>) {
        let layer = self.layer;
        // Each head's private key copy is dropped once its index is built, so a long build
        // holds one head's copy at a time after the first.
        for (g, (keys, train)) in copies.into_iter().zip(training).enumerate() {
            if self.session.strong_count() == 0 {
                tracing::debug!(layer, "session dropped: index build abandoned");
                return;
            }
            // A panic inside the index (hnsw_rs asserts on a NaN distance) fails this build
            // like any other error: the layer reads "failed", the daemon lives.
            let built = crate::error::catch_panic("index build", || {
                keys.slice(self.head_dim).and_then(|k| {
                    Ok(build_index(
                        self.kind,
                        &k,
                        &train.signal(),
                        &self.cfg.params,
                    )?)
                })
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
                    self.report.end(BuildOutcome::Failed);
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
        // Reported before the state turns: whoever sees "ready" in `/stats` finds the build
        // counted in `/metrics` too.
        self.report.end(BuildOutcome::Ready);
        li.update(|st, t| {
            st.state = "ready";
            st.secs = t.map_or(0.0, |t| t.elapsed().as_secs_f64());
            *t = None;
        });
        // Tokens appended during the build were left to this: an append's own insert may
        // already have started since the heads turned ready, and then it takes them.
        if !li.inserting.swap(true, Ordering::AcqRel) {
            session.insert_pending(layer);
        }
    }
}

/// The training queries of KV head `g`'s group from `parts` (each `[q_heads][n_i][head_dim]`,
/// taken in order, as if concatenated along the positions), with positions made relative to
/// the first non-static token; queries that saw only sinks are dropped.
pub(super) fn group_training(
    parts: &[SealTraining<'_>],
    g: usize,
    group: usize,
    q_heads: usize,
    d: usize,
    sinks: usize,
) -> (Vec<f32>, Vec<u32>) {
    let (mut vectors, mut positions) = (Vec::new(), Vec::new());
    for h in g * group..((g + 1) * group).min(q_heads) {
        for t in parts {
            let n = t.positions.len();
            for (i, &p) in t.positions.iter().enumerate() {
                if (p as usize) < sinks {
                    continue;
                }
                let at = (h * n + i) * d;
                vectors.extend_from_slice(&t.vectors[at..at + d]);
                positions.push(p - sinks as u32);
            }
        }
    }
    (vectors, positions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Budget, Shape, Store};
    use kvdex_index::KeyDtype;
    use kvdex_transfer::host::HostLink;

    /// A build whose index panics (hnsw_rs asserts on the NaN distance a key of norm² = ∞
    /// gives: the append check keeps such keys out, this test hands them to the job directly)
    /// fails that layer with an internal error naming the panic; the caller's thread, which
    /// is a build pool thread in the daemon, is not unwound.
    #[test]
    fn a_panic_inside_an_index_build_fails_the_layer_not_the_caller() {
        let store = Store::new(
            Arc::new(HostLink::new()),
            Arc::new(Budget::new(1 << 20)),
            64,
        );
        let shape = Shape {
            layers: 1,
            q_heads: 1,
            kv_heads: 1,
            head_dim: 4,
            dtype: KeyDtype::F32,
        };
        let session = Arc::new(store.session(shape).unwrap());
        let mut keys: Vec<f32> = (0..64 * 4).map(|i| (i % 7) as f32 - 3.0).collect();
        keys[17 * 4 + 1] = 1e20;
        let job = BuildJob {
            report: BuildReport::start(store.observer.clone(), Instant::now()),
            session: Arc::downgrade(&session),
            cfg: Arc::new(DecodeConfig::default()),
            head_dim: 4,
            layer: 0,
            kind: IndexKind::Hnsw,
        };
        job.run(
            vec![OwnedKeys::F32(keys)],
            vec![HeadTraining::Queries(Vec::new(), Vec::new())],
        );
        let st = session.build_status(0).unwrap();
        assert_eq!(st.state, "failed");
        let err = st.error.unwrap_or_default();
        assert!(
            err.contains("internal error: index build panicked"),
            "{err}"
        );
    }
}

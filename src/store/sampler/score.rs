//! The scoring job on the build pool: drains the waiting slots, scans each sampled layer
//! exactly for the sample's queries, compares with what the index chose, records the figures,
//! and answers drift (a log line; with `decode.drift_rebuild`, a background re-seal).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use kvdex_index::{IndexKind, KeyStore};

use super::quality::head_figures;
use super::session::LayerState;
use super::{HeadFigures, QualitySample, Sampler, Slot};
use crate::error::{KvdexError, Result};
use crate::store::observe::BuildObserver;
use crate::store::{poisoned, SealTraining, Session};

/// Keys scored per read-lock hold: an append waits at most this long for the scan.
const CHUNK: usize = 4096;

/// Sampled requests a drifting layer must have banked before a rebuild trains on them.
const MIN_REBUILD_QUERIES: usize = 8;

/// The scoring job's buffers.
#[derive(Default)]
pub(super) struct ScoreScratch {
    /// `[q_heads][len]` scaled logits.
    logits: Vec<f32>,
    sorted: Vec<f32>,
    heads: Vec<HeadFigures>,
    coverage_error: Vec<f64>,
}

/// Scores every waiting slot, then returns them to the pool. Runs on the build pool; one job
/// at a time (`Sampler::draining`).
pub(super) fn drain(sampler: &Sampler, observer: &dyn BuildObserver) {
    let Some(queues) = sampler.queues.get() else {
        sampler.draining.store(false, Ordering::Release);
        return;
    };
    loop {
        while let Some(mut slot) = queues.pending.pop() {
            let t = Instant::now();
            if let Some(session) = slot.session.upgrade() {
                let share = session.decode.sampling.cpu_share;
                if let Ok(mut scratch) = sampler.scratch.lock() {
                    if let Err(e) = session.score_sample(&slot, &mut scratch, observer) {
                        tracing::debug!(layer = slot.layer, error = %e, "sample not scored");
                    }
                }
                // The CPU cap: this sample's time, stretched by the share, admits no other.
                let rest = t.elapsed().as_secs_f64() / share.max(1e-3);
                let next = sampler.now_ns() + (rest * 1e9) as u64;
                sampler.next_admit_ns.fetch_max(next, Ordering::Relaxed);
            }
            slot.session = std::sync::Weak::new();
            let _ = queues.free.push(slot);
        }
        sampler.draining.store(false, Ordering::Release);
        // A slot queued after the last pop but before the flag fell found the job running:
        // take it up again unless another job already did.
        if queues.pending.is_empty() || sampler.draining.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}

impl Session {
    /// The exact scan of one sample and its figures, recorded with the session, the observer
    /// and the layer's drift state.
    fn score_sample(
        self: &Arc<Self>,
        slot: &Slot,
        scratch: &mut ScoreScratch,
        observer: &dyn BuildObserver,
    ) -> Result<()> {
        let started = Instant::now();
        let s = self.shape;
        let (hq, d, group) = (s.q_heads as usize, s.head_dim as usize, s.group() as usize);
        let (len, layer) = (slot.len, slot.layer);
        if slot.q.len() != hq * d || slot.k.len() != hq || slot.ids.len() != hq * slot.stride {
            return Err(KvdexError::Protocol("sample of another shape".into()));
        }
        scratch.logits.resize(hq * len, 0.0);
        let mut at = 0;
        while at < len {
            let to = (at + CHUNK).min(len);
            let l = self.layer(layer)?.read().map_err(poisoned)?;
            if l.len < to {
                return Err(KvdexError::Protocol(format!("layer {layer} shrank")));
            }
            for g in 0..s.kv_heads as usize {
                let keys = l.keys(g, s.dtype, d)?;
                for h in g * group..(g + 1) * group {
                    let row = &mut scratch.logits[h * len..(h + 1) * len];
                    keys.score_range(&slot.q[h * d..(h + 1) * d], at, &mut row[at..to]);
                }
            }
            at = to;
        }
        scratch.logits.iter_mut().for_each(|x| *x *= slot.scale);
        let cfg = &self.decode;
        let range = (cfg.sinks, cfg.retrievable_end(len));
        scratch.heads.clear();
        scratch.coverage_error.clear();
        for h in 0..hq {
            let k = (slot.k[h] as usize).min(slot.stride);
            let ids = &slot.ids[h * slot.stride..h * slot.stride + k];
            let logits = &scratch.logits[h * len..(h + 1) * len];
            let f = head_figures(logits, ids, range, &mut scratch.sorted);
            scratch.heads.push(f);
            if slot.adaptive {
                scratch
                    .coverage_error
                    .push(f64::from(slot.coverage[h]) - f.mass_covered);
            }
        }
        let kind = self.index_of(layer)?.status().kind.unwrap_or("none");
        let secs = started.elapsed().as_secs_f64();
        self.sampling
            .record(&scratch.heads, &scratch.coverage_error, secs);
        observer.quality_sampled(&QualitySample {
            kind,
            layer,
            heads: &scratch.heads,
            coverage_error: &scratch.coverage_error,
        });
        let mean = scratch.heads.iter().map(|h| h.mass_recall).sum::<f64>() / hq.max(1) as f64;
        self.judge_drift(slot, mean, kind)
    }

    /// Banks the sample's queries (for a rebuild), and compares the layer's recent mass recall
    /// with `decode.drift_floor`: logs a layer that falls below it, and with
    /// `decode.drift_rebuild` re-seals it from the banked queries.
    fn judge_drift(self: &Arc<Self>, slot: &Slot, mean: f64, kind: &'static str) -> Result<()> {
        let cfg = self.decode.sampling;
        let layer = slot.layer;
        let li = self.index_of(layer)?;
        let Some(ls) = self.sampling.layers.get(layer as usize) else {
            return Ok(());
        };
        let mut st = ls.state.lock().map_err(poisoned)?;
        st.sampled += 1;
        if cfg.drift_rebuild {
            bank(&mut st, &slot.q, cfg.drift_rebuild_queries);
        }
        if cfg.drift_floor <= 0.0 || li.is_building() {
            // No floor, or the samples measure an index about to be replaced.
            return Ok(());
        }
        st.push_recent(mean);
        let Some(recent) = st.recent_mean() else {
            return Ok(());
        };
        if recent >= cfg.drift_floor {
            st.drifting = false;
            return Ok(());
        }
        if !st.drifting {
            tracing::warn!(
                layer,
                kind,
                recent_mass_recall = recent,
                floor = cfg.drift_floor,
                "sampled mass recall below decode.drift_floor: the layer's index has drifted \
                 from its decode queries"
            );
            st.drifting = true;
        }
        let staged = li.staged.lock().map(|s| s.is_some()).unwrap_or(true);
        if !cfg.drift_rebuild || st.bank_len < MIN_REBUILD_QUERIES || staged {
            return Ok(());
        }
        let kind = IndexKind::parse(kind)?;
        let (hq, d) = (self.shape.q_heads as usize, self.shape.head_dim as usize);
        let (vectors, positions) = training_of(&st, hq, d, slot.len);
        self.seal(
            layer,
            kind,
            Some(SealTraining {
                vectors: &vectors,
                positions: &positions,
            }),
        )?;
        tracing::info!(
            layer,
            queries = positions.len(),
            "drift: rebuilding the layer's index from its sampled decode queries"
        );
        st.rebuilds += 1;
        st.drifting = false;
        st.recent.clear();
        st.recent_at = 0;
        Ok(())
    }
}

/// Keeps `q` (`[q_heads][head_dim]`) in the layer's ring of at most `cap` sampled positions.
fn bank(st: &mut LayerState, q: &[f32], cap: usize) {
    let row = q.len();
    if st.bank.len() != cap * row {
        st.bank = vec![0.0; cap * row];
        st.bank_len = 0;
        st.bank_at = 0;
    }
    let at = st.bank_at % cap.max(1);
    st.bank[at * row..(at + 1) * row].copy_from_slice(q);
    st.bank_at = at + 1;
    st.bank_len = (st.bank_len + 1).min(cap);
}

/// The banked queries as a seal's training set: `[q_heads][n][head_dim]`, each at the last
/// position of a layer of `len` tokens (a decode query sees the whole context).
fn training_of(st: &LayerState, hq: usize, d: usize, len: usize) -> (Vec<f32>, Vec<u32>) {
    let row = hq * d;
    let n = st.bank_len.min(st.bank.len() / row.max(1));
    let mut vectors = vec![0.0; hq * n * d];
    for (i, p) in st.bank.chunks_exact(row.max(1)).take(n).enumerate() {
        for h in 0..hq {
            vectors[(h * n + i) * d..(h * n + i + 1) * d].copy_from_slice(&p[h * d..(h + 1) * d]);
        }
    }
    let last = len.saturating_sub(1).min(u32::MAX as usize) as u32;
    (vectors, vec![last; n])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bank keeps the latest positions; the training set is laid out per query head.
    #[test]
    fn banked_queries_become_a_per_head_training_set() {
        let mut st = LayerState::default();
        // 2 query heads, d = 1: position i holds [i, 10 + i].
        for i in 0..5 {
            bank(&mut st, &[i as f32, 10.0 + i as f32], 3);
        }
        assert_eq!(st.bank_len, 3);
        let (v, p) = training_of(&st, 2, 1, 100);
        // Ring slots hold positions 3, 4, 2 (slot order); head 0 first, then head 1.
        assert_eq!(v, vec![3.0, 4.0, 2.0, 13.0, 14.0, 12.0]);
        assert_eq!(p, vec![99; 3]);
    }
}

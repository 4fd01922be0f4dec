//! Training queries staged in parts for a layer's next seal.
//!
//! A seal carries its training queries in one request body, which must fit the session's
//! payload arena; an engine with more (about `N/128` per query head: 128 MiB of f32 for 32
//! heads of 128 dimensions at 1M tokens) sends them first as parts
//! ([`kvdex_wire::decode::SIGNAL_QUERIES_PART`]), which the layer keeps here until its seal
//! trains on them, in order, followed by the seal's own. What a layer may stage is bounded by
//! `decode.seal_max_staged_queries` positions, and its bytes are reserved from the store's
//! budget (counted in the session's reserved bytes) until they are released: at the seal, at a
//! refused part, or when the session drops.

use super::*;
use crate::store::budget::Budget;

/// One layer's staged training queries: parts in arrival order, each `[q_heads][n_i][head_dim]`
/// f32 with its `n_i` positions, charged to the budget until it drops.
pub(in crate::store) struct Staged {
    /// Each part's queries and its number of positions.
    parts: Vec<(Vec<f32>, usize)>,
    /// Every part's positions, concatenated.
    positions: Vec<u32>,
    /// Bytes reserved from `budget`.
    bytes: u64,
    budget: Arc<Budget>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl Staged {
    fn new(budget: Arc<Budget>) -> Self {
        Self {
            parts: Vec::new(),
            positions: Vec::new(),
            bytes: 0,
            budget,
        }
    }

    /// Positions staged.
    pub(in crate::store) fn len(&self) -> usize {
        self.positions.len()
    }

    /// Bytes staged (charged to the budget).
    pub(in crate::store) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The parts as training sets, in arrival order.
    pub(super) fn parts(&self) -> Vec<SealTraining<'_>> {
        let mut at = 0;
        self.parts
            .iter()
            .map(|(vectors, n)| {
                let t = SealTraining {
                    vectors,
                    positions: &self.positions[at..at + n],
                };
                at += n;
                t
            })
            .collect()
    }
}

impl Session {
    /// Stages a part of `layer`'s training queries for its next seal (no build starts):
    /// `vectors` (`[q_heads][n][head_dim]`, kept as given) at `positions` cover the positions
    /// `start ..` of the training set, `start` being what earlier
    /// parts staged (0 begins a new set, discarding any staged before). Returns the positions
    /// staged so far.
    ///
    /// Errors: an unknown layer, a build of the layer in progress, a `start` that does not
    /// follow what is staged (a lost, repeated or stale part), malformed or non-finite
    /// queries, more than `decode.seal_max_staged_queries` positions, or a budget that cannot
    /// hold them. A refused part discards everything the layer had staged, so that a seal
    /// never trains on an incomplete set; the client starts again from `start = 0`.
    pub fn stage_training(
        &self,
        layer: u32,
        start: usize,
        vectors: Vec<f32>,
        positions: &[u32],
    ) -> Result<usize> {
        let li = self.index_of(layer)?;
        let mut slot = li.staged.lock().map_err(poisoned)?;
        if start == 0 {
            *slot = None;
        }
        match self.stage_into(li, layer, start, (vectors, positions), &mut slot) {
            Ok(n) => Ok(n),
            Err(e) => {
                let lost = slot.take().map_or(0, |s| s.len());
                Err(match e {
                    KvdexError::BadRequest(m) if lost > 0 => KvdexError::BadRequest(format!(
                        "{m}; the {lost} training positions layer {layer} had staged are \
                         discarded (send the parts again from start 0)"
                    )),
                    e => e,
                })
            }
        }
    }

    fn stage_into(
        &self,
        li: &LayerIndex,
        layer: u32,
        start: usize,
        (vectors, positions): (Vec<f32>, &[u32]),
        slot: &mut Option<Staged>,
    ) -> Result<usize> {
        let s = self.shape;
        let (d, hq) = (s.head_dim as usize, s.q_heads as usize);
        if li.is_building() {
            return Err(KvdexError::BadRequest(format!(
                "layer {layer}: an index build is in progress; seal parts are refused until it \
                 is done"
            )));
        }
        let have = slot.as_ref().map_or(0, Staged::len);
        if start != have {
            return Err(KvdexError::BadRequest(format!(
                "seal part of layer {layer} starts at position {start}, but {have} are staged"
            )));
        }
        SealTraining {
            vectors: &vectors,
            positions,
        }
        .check("seal part", hq, d)?;
        let n = positions.len();
        let cap = self.decode.seal_max_staged_queries;
        if have + n > cap {
            return Err(KvdexError::BadRequest(format!(
                "seal part would stage {} training positions for layer {layer}; \
                 decode.seal_max_staged_queries allows {cap}",
                have + n
            )));
        }
        let staged = slot.get_or_insert_with(|| Staged::new(self.store.budget.clone()));
        if n == 0 {
            return Ok(have);
        }
        let bytes = 4 * (vectors.len() + n) as u64;
        self.store.budget.try_reserve(bytes)?;
        staged.bytes += bytes;
        staged.parts.push((vectors, n));
        staged.positions.extend_from_slice(positions);
        Ok(staged.len())
    }

    /// Takes `layer`'s staged training queries (the caller releases them by dropping).
    pub(in crate::store) fn take_staged(&self, layer: u32) -> Result<Option<Staged>> {
        let li = self.index_of(layer)?;
        let staged = li.staged.lock().map_err(poisoned)?.take();
        Ok(staged.filter(|s| s.len() > 0))
    }
}

impl LayerIndex {
    /// Positions and bytes staged for the layer's next seal.
    pub(in crate::store) fn staged_stats(&self) -> (usize, u64) {
        self.staged
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|s| (s.len(), s.bytes())))
            .unwrap_or((0, 0))
    }
}

#[cfg(test)]
mod tests;

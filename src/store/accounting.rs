//! What a session holds and reports: its arenas grow under the daemon-wide budget, the bytes
//! it holds (reserved capacity) and stores (resident rows), per-layer statistics for `/stats`,
//! and the release of its reservation on drop. Kept apart from the data-plane methods in
//! [`super`] so that the budget bookkeeping reads in one place.

use std::sync::atomic::Ordering;

use super::indexing::BuildStatus;
use super::layer::LayerKv;
use super::observe::DecodeGauges;
use super::Session;
use crate::error::{KvdexError, Result};

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
    /// Training positions staged by seal parts for the layer's next seal.
    pub staged_queries: usize,
}

impl Session {
    /// Grows `l` to hold `need` tokens: doubling when the budget allows, exactly `need`
    /// otherwise, or a budget error naming the exact growth asked for.
    pub(super) fn grow(&self, l: &mut LayerKv, need: usize) -> Result<()> {
        let (kvh, rb) = (self.shape.kv_heads as usize, self.stored_row_bytes());
        let held = l.held_bytes(kvh, rb) as u64;
        let (planes, format) = (l.planes(), l.format());
        let bytes_at = |cap: usize| LayerKv::bytes_at(planes, format, kvh, rb, cap) as u64;
        let roomy = need.max(2 * l.cap).max(self.store.initial_tokens);
        let budget = &self.store.budget;
        // One session holds at most the quota, so that it cannot starve the others.
        let (mine, quota) = (self.held.load(Ordering::Acquire), budget.session_quota());
        let fits = |cap: usize| mine.saturating_add(bytes_at(cap) - held) <= quota;
        let cap = if fits(roomy) && budget.try_reserve(bytes_at(roomy) - held).is_ok() {
            roomy
        } else {
            if !fits(need) {
                return Err(KvdexError::Exhausted(format!(
                    "session quota (memory.session_quota_bytes): growing by {} bytes would \
                     hold {} of its {quota}",
                    bytes_at(need) - held,
                    mine + (bytes_at(need) - held)
                )));
            }
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

    /// Bytes of K and V stored (tokens appended, not capacity; int8 rows with their scales);
    /// K alone in Slim mode.
    pub fn resident_bytes(&self) -> u64 {
        let per_row = self.stored_row_bytes() + self.format.scale_bytes();
        self.layers
            .iter()
            .filter_map(|l| l.read().ok())
            .map(|l| (l.planes() * l.len * per_row * self.shape.kv_heads as usize) as u64)
            .sum()
    }

    /// Bytes this session holds, charged to the budget: arena capacity (not just rows), and
    /// training queries staged by seal parts.
    pub fn reserved_bytes(&self) -> u64 {
        let staged: u64 = self.index.iter().map(|li| li.staged_stats().1).sum();
        self.held.load(Ordering::Acquire) + staged
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
                    staged_queries: li.staged_stats().0,
                }
            })
            .collect()
    }
}

impl Session {
    /// Totals of the decode-path state for the daemon's gauges, read at scrape time: the
    /// [`Session::layer_stats`] summed (layers building, index bytes, staged training
    /// positions), and the engine destinations.
    pub fn decode_gauges(&self) -> DecodeGauges {
        let mut g = DecodeGauges {
            engine_dests: self.engine_dest_count() as u64,
            ..Default::default()
        };
        for l in self.layer_stats() {
            g.layers_building += u64::from(l.build.state == "building");
            g.index_bytes += l.index_bytes as u64;
            g.staged_positions += l.staged_queries as u64;
        }
        g
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The arenas free themselves as the layers drop; give their bytes back to the budget.
        self.store.budget.release(*self.held.get_mut());
    }
}

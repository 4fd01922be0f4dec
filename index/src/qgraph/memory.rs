//! The query memory: a small sample of training (and later) queries, each with the bar a key
//! must clear to enter its top list, that guides incremental inserts (see [`super::insert`]).

use super::QueryGuidedGraph;
use crate::error::check_finite;
use crate::{FlatIndex, Hits, IndexError, KeyStore, SearchScratch};
use half::f16;

/// Remembered training queries: f16 rows, each with its Nq-th best score over all keys.
#[derive(Clone, Debug, Default)]
pub struct QueryMemory {
    /// The queries, `dim` f16 values each.
    pub(super) rows: Vec<f16>,
    /// Each query's Nq-th best score over all keys when it was remembered.
    pub(super) bars: Vec<f32>,
    /// Ring cursor: the slot the next query replaces once the memory is full.
    next: usize,
}

impl QueryMemory {
    /// Number of remembered queries.
    pub fn len(&self) -> usize {
        self.bars.len()
    }

    /// True when no query is remembered.
    pub fn is_empty(&self) -> bool {
        self.bars.is_empty()
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.rows.capacity() * 2 + self.bars.capacity() * 4
    }

    /// Adds a query with its bar, replacing the oldest when `cap` are held.
    pub(super) fn push(&mut self, q: &[f32], bar: f32, cap: usize) {
        if cap == 0 {
            return;
        }
        let d = q.len();
        if self.bars.len() < cap {
            self.rows.extend(q.iter().map(|&x| f16::from_f32(x)));
            self.bars.push(bar);
        } else {
            let i = self.next % self.bars.len();
            for (dst, &x) in self.rows[i * d..(i + 1) * d].iter_mut().zip(q) {
                *dst = f16::from_f32(x);
            }
            self.bars[i] = bar;
            self.next = i + 1;
        }
    }
}

impl QueryGuidedGraph {
    /// The remembered queries that guide [`crate::MipsIndexMut::insert`].
    pub fn query_memory(&self) -> &QueryMemory {
        &self.memory
    }

    /// Remembers `queries` (row-major, `keys.dim()` floats each) as insert guides. Each one's
    /// bar is its exact Nq-th best score over all of `keys` (a flat scan per query, the price
    /// of a correct bar); the oldest remembered queries are replaced once
    /// `GraphParams::kept_queries` are held.
    pub fn remember_queries(
        &mut self,
        keys: &dyn KeyStore,
        queries: &[f32],
    ) -> Result<(), IndexError> {
        let d = keys.dim();
        if d == 0 || !queries.len().is_multiple_of(d) {
            return Err(IndexError::BadShape(format!(
                "{} query floats is not a multiple of dim {d}",
                queries.len()
            )));
        }
        check_finite("query", queries)?;
        let cap = self.params.kept_queries;
        let n = keys.len();
        if cap == 0 || n == 0 {
            return Ok(());
        }
        let room = cap.saturating_sub(self.memory.len()).min(queries.len() / d);
        self.memory.rows.reserve_exact(room * d);
        self.memory.bars.reserve_exact(room);
        let flat = FlatIndex::new(n);
        let mut scratch = SearchScratch::new();
        let mut hits = Hits::default();
        for q in queries.chunks_exact(d) {
            let k = self.params.train_topk.clamp(1, n);
            flat.search_prefix(keys, q, k, n, &mut scratch, std::slice::from_mut(&mut hits))?;
            let bar = hits.scores.last().copied().unwrap_or(f32::NEG_INFINITY);
            self.memory.push(q, bar, cap);
        }
        Ok(())
    }
}

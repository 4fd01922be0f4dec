//! Decode queries captured for the background insert.
//!
//! The retrieve path sees every decode query; a sample of them guides the next insert batch
//! (`MipsIndexMut::insert_guided`), so that tokens sliding out of the window are linked for the
//! queries decoding actually asks, not only through the build's remembered prefill queries.
//! Capture never waits and never allocates: each KV head has a preallocated ring of
//! `decode.insert_guide_queries` rows (allocated when the layer is sealed), written under
//! `try_lock` (a capture that finds the ring busy is skipped). One query per KV head is taken
//! every `stride` retrieves of the layer, rotating over the head's GQA group, with the stride
//! chosen so that a ring spans about one insert batch of decode steps.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// One KV head's captured queries: a ring of `cap` rows of `dim` f32.
#[derive(Default)]
struct GuideRing {
    rows: Vec<f32>,
    dim: usize,
    len: usize,
    next: usize,
}

impl GuideRing {
    /// Room for `cap` rows of `dim` (keeps what fits when the shape is unchanged).
    fn prepare(&mut self, cap: usize, dim: usize) {
        if self.dim != dim || self.rows.len() != cap * dim {
            *self = GuideRing {
                rows: vec![0.0; cap * dim],
                dim,
                len: 0,
                next: 0,
            };
        }
    }

    fn capacity(&self) -> usize {
        self.rows.len() / self.dim.max(1)
    }

    /// Writes `q` over the oldest row once full; a no-op before [`GuideRing::prepare`].
    fn push(&mut self, q: &[f32]) {
        let cap = self.capacity();
        if cap == 0 || q.len() != self.dim {
            return;
        }
        let i = self.next % cap;
        self.rows[i * self.dim..(i + 1) * self.dim].copy_from_slice(q);
        self.next = i + 1;
        self.len = (self.len + 1).min(cap);
    }

    /// Moves the captured rows (oldest first) into `out` and empties the ring.
    fn drain_into(&mut self, out: &mut Vec<f32>) {
        let (cap, d) = (self.capacity(), self.dim);
        let first = (self.next + cap - self.len) % cap.max(1);
        for j in 0..self.len {
            let i = (first + j) % cap;
            out.extend_from_slice(&self.rows[i * d..(i + 1) * d]);
        }
        self.len = 0;
    }
}

/// A layer's capture state: one ring per KV head and the retrieve counter that spaces the
/// captures.
pub(in crate::store) struct Guides {
    heads: Vec<Mutex<GuideRing>>,
    calls: AtomicU64,
    stride: AtomicUsize,
}

impl Guides {
    pub(in crate::store) fn new(kv_heads: usize) -> Self {
        Self {
            heads: (0..kv_heads).map(|_| Mutex::default()).collect(),
            calls: AtomicU64::new(0),
            stride: AtomicUsize::new(1),
        }
    }

    /// Allocates each KV head's ring (`cap` rows of `dim`; 0 turns capture off) and spaces the
    /// captures so that a ring spans about `insert_batch` retrieves. Called by a seal, never
    /// on the request path.
    pub(in crate::store) fn prepare(&self, cap: usize, dim: usize, insert_batch: usize) {
        for h in &self.heads {
            if let Ok(mut r) = h.lock() {
                r.prepare(cap, dim);
            }
        }
        let stride = insert_batch.checked_div(cap).unwrap_or(1).max(1);
        self.stride.store(stride, Ordering::Relaxed);
    }

    /// The request path: on every `stride`-th retrieve of the layer, copies one query head of
    /// each GQA group (`q` is `[kv_heads * group][dim]`, rotating over the group) into its KV
    /// head's ring. Never waits: a ring another thread holds is skipped.
    pub(in crate::store) fn capture(&self, q: &[f32], group: usize, dim: usize) {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let stride = self.stride.load(Ordering::Relaxed).max(1) as u64;
        if !call.is_multiple_of(stride) || group == 0 {
            return;
        }
        let pick = ((call / stride) % group as u64) as usize;
        for (g, ring) in self.heads.iter().enumerate() {
            let at = (g * group + pick) * dim;
            if let (Ok(mut r), Some(row)) = (ring.try_lock(), q.get(at..at + dim)) {
                r.push(row);
            }
        }
    }

    /// The background insert: each KV head's captured queries (`[n][dim]`, possibly empty),
    /// taken out of the rings.
    pub(in crate::store) fn take(&self) -> Vec<Vec<f32>> {
        self.heads
            .iter()
            .map(|h| {
                let mut out = Vec::new();
                if let Ok(mut r) = h.lock() {
                    r.drain_into(&mut out);
                }
                out
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring keeps the latest `cap` rows, oldest first, and empties when drained; an
    /// unprepared ring captures nothing.
    #[test]
    fn ring_keeps_the_latest_rows_in_order() {
        let mut r = GuideRing::default();
        r.push(&[1.0, 1.0]);
        let mut out = Vec::new();
        r.drain_into(&mut out);
        assert!(out.is_empty());
        r.prepare(3, 2);
        for i in 0..5 {
            r.push(&[i as f32, -(i as f32)]);
        }
        r.drain_into(&mut out);
        assert_eq!(out, vec![2.0, -2.0, 3.0, -3.0, 4.0, -4.0]);
        out.clear();
        r.drain_into(&mut out);
        assert!(out.is_empty());
        r.push(&[9.0, 9.0]);
        r.drain_into(&mut out);
        assert_eq!(out, vec![9.0, 9.0]);
    }

    /// Every `stride`-th retrieve is captured, rotating over the group's query heads; capture
    /// is off until prepared, and skips a ring that is held.
    #[test]
    fn capture_samples_every_stride_th_call_and_rotates_heads() {
        let g = Guides::new(2);
        // 2 KV heads x group 2, dim 1: value = query head.
        let q = [0.0, 1.0, 2.0, 3.0];
        g.capture(&q, 2, 1);
        assert_eq!(g.take(), vec![Vec::<f32>::new(), Vec::new()]);
        g.prepare(4, 1, 8); // stride 2
        for _ in 0..8 {
            g.capture(&q, 2, 1);
        }
        // Calls 1..=8 overall (call 0 above): captured at 2, 4, 6, 8 -> picks 1, 0, 1, 0.
        assert_eq!(
            g.take(),
            vec![vec![1.0, 0.0, 1.0, 0.0], vec![3.0, 2.0, 3.0, 2.0]]
        );
        let held = g.heads[0].lock().unwrap();
        g.capture(&q, 2, 1);
        g.capture(&q, 2, 1);
        drop(held);
        assert_eq!(g.take(), vec![Vec::<f32>::new(), vec![3.0]]);
    }
}

//! Top-k selection with caller-owned buffers.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Search results: ids and scores, best first. Reused across searches, so the vectors keep
/// their capacity and steady-state searches do not allocate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hits {
    /// Key ids, best first.
    pub ids: Vec<u32>,
    /// Inner products, parallel to `ids`.
    pub scores: Vec<f32>,
}

impl Hits {
    /// Empties the result, keeping capacity.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.scores.clear();
    }
    /// Number of hits.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when there is no hit.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    score: f32,
    id: u32,
}
impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    // Reversed so that BinaryHeap is a min-heap on score: the root is the weakest kept hit.
    fn cmp(&self, o: &Self) -> Ordering {
        o.score.total_cmp(&self.score).then(self.id.cmp(&o.id))
    }
}

/// Bounded min-heap that keeps the `k` best (score, id) pairs seen.
#[derive(Clone, Debug, Default)]
pub struct TopK {
    heap: BinaryHeap<Entry>,
    k: usize,
}

impl TopK {
    /// Resets the selection to keep `k` entries, keeping capacity.
    pub fn reset(&mut self, k: usize) {
        self.heap.clear();
        self.k = k;
        if self.heap.capacity() < k + 1 {
            self.heap.reserve(k + 1 - self.heap.capacity());
        }
    }
    /// The weakest score kept, or -inf while fewer than k are held.
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f32::NEG_INFINITY, |e| e.score)
        }
    }
    /// Offers one candidate.
    #[inline]
    pub fn push(&mut self, id: u32, score: f32) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Entry { score, id });
        } else if score > self.threshold() {
            if let Some(mut top) = self.heap.peek_mut() {
                *top = Entry { score, id };
            }
        }
    }
    /// Moves every entry of `other` into this selection (merging per-worker partial results).
    pub fn absorb(&mut self, other: &mut TopK) {
        for e in other.heap.drain() {
            self.push(e.id, e.score);
        }
    }
    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.heap.len()
    }
    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
    /// Writes the kept entries to `out`, best first, and empties the selection.
    pub fn drain_into(&mut self, out: &mut Hits) {
        out.clear();
        while let Some(e) = self.heap.pop() {
            out.ids.push(e.id);
            out.scores.push(e.score);
        }
        out.ids.reverse();
        out.scores.reverse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_k_in_order() {
        let mut t = TopK::default();
        t.reset(3);
        for (i, s) in [0.5, 3.0, -1.0, 2.0, 7.0, 1.0].iter().enumerate() {
            t.push(i as u32, *s);
        }
        let mut h = Hits::default();
        t.drain_into(&mut h);
        assert_eq!(h.ids, vec![4, 1, 3]);
        assert_eq!(h.scores, vec![7.0, 3.0, 2.0]);
    }
}

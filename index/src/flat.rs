//! The exact scan: scores every key. The baseline every other index is measured against.

use crate::{error::check_finite, Hits, IndexError, KeyStore, MipsIndex, MipsIndexMut, SearchScratch, SearchStats};

/// Keys scored per block; a block's scores fit in L1.
const BLOCK: usize = 1024;

/// Exact MIPS by a full scan of the key store.
#[derive(Clone, Debug, Default)]
pub struct FlatIndex {
    len: usize,
}

impl FlatIndex {
    /// An index over the first `len` keys of its store.
    pub fn new(len: usize) -> Self {
        Self { len }
    }
}

impl MipsIndex for FlatIndex {
    fn name(&self) -> &'static str {
        "flat"
    }

    fn search(
        &self,
        keys: &dyn KeyStore,
        query: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        out: &mut Hits,
    ) -> Result<SearchStats, IndexError> {
        if query.len() != keys.dim() {
            return Err(IndexError::DimMismatch { expected: keys.dim(), got: query.len() });
        }
        check_finite("query", query)?;
        let n = self.len.min(keys.len());
        let k = k.min(n);
        scratch.topk.reset(k);
        scratch.scores.resize(BLOCK, 0.0);
        let mut start = 0;
        while start < n {
            let m = BLOCK.min(n - start);
            let s = &mut scratch.scores[..m];
            keys.score_range(query, start, s);
            for (i, &v) in s.iter().enumerate() {
                scratch.topk.push((start + i) as u32, v);
            }
            start += m;
        }
        scratch.topk.drain_into(out);
        Ok(SearchStats { scored: n })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn memory_bytes(&self) -> usize {
        0
    }
}

impl MipsIndexMut for FlatIndex {
    fn insert(&mut self, keys: &dyn KeyStore) -> Result<(), IndexError> {
        self.len = keys.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyRows, KeySlice};

    #[test]
    fn finds_the_largest_inner_products() {
        let rows: Vec<f32> = (0..100).flat_map(|i| [i as f32, -(i as f32)]).collect();
        let keys = KeySlice::new(KeyRows::F32(&rows), 2).unwrap();
        let idx = FlatIndex::new(100);
        let mut scratch = SearchScratch::new();
        let mut hits = Hits::default();
        let st = idx.search(&keys, &[1.0, 0.0], 3, &mut scratch, &mut hits).unwrap();
        assert_eq!(hits.ids, vec![99, 98, 97]);
        assert_eq!(st.scored, 100);
    }
}

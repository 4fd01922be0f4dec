//! kvdex-index: maximum-inner-product search (MIPS) over KV-cache keys.
//!
//! # Layout
//! - [`keys`]: the [`KeyStore`] trait through which an index reads keys it does not own, and
//!   [`KeySlice`], a view over contiguous key rows (f32, f16, bf16, or int8 with scales).
//! - [`quant`]: int8 rows (one scale per row): the codec and the fused int8 kernels.
//! - [`topk`]: caller-owned top-k selection and result buffers.
//! - [`simd`]: inner-product kernels (scalar, AVX2, AVX-512) picked once at run time.
//! - [`prefetch`]: software prefetch hints for the scattered row reads of graph search.
//! - [`flat`]: the exact scan, the baseline every other index is measured against.
//! - [`hnsw`]: the hnsw_rs baseline with the MIPS → L2 reduction.
//! - [`qgraph`]: the query-guided graph (RoarGraph / RetrievalAttention).
//! - [`cluster`]: the cluster index (k-means clusters of quantized residual codes, exact re-rank,
//!   and the estimate of the unread clusters' attention).
//! - [`builder`]: [`build_index`], the one way the daemon builds any of them.
//!
//! The crate is pure compute: no I/O, no async, no daemon types. Storage belongs to the caller
//! (the daemon's KV store); indices hold `u32` key ids into a [`KeyStore`], never copies of
//! vectors, following qdrant's split of storage from index.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod attend;
pub mod builder;
pub mod cluster;
pub mod error;
pub mod flat;
#[cfg(feature = "hnsw")]
pub mod hnsw;
pub mod keys;
pub mod prefetch;
pub mod qgraph;
pub mod quant;
pub mod simd;
pub mod topk;

pub use builder::{build_index, HnswParams, IndexKind, IndexParams, TrainingSignal};
pub use cluster::{ClusterIndex, ClusterParams};
pub use error::IndexError;
pub use flat::FlatIndex;
#[cfg(feature = "hnsw")]
pub use hnsw::HnswIndex;
pub use keys::{KeyDtype, KeySlice, KeyStore};
pub use qgraph::{GraphParams, QueryGuidedGraph};
pub use topk::{Hits, TopK};

/// Per-search counters, returned by every [`MipsIndex::search`].
///
/// `scored` is the number of keys whose inner product with the query was computed: the cost
/// measure that recall is traded against (the "scored fraction" of the benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchStats {
    /// Keys whose score was computed during this search.
    pub scored: usize,
    /// True when `k` exceeded the number of indexed keys and was clamped to it.
    pub k_clamped: bool,
    /// Bytes of keys, codes and centroids read, counting the keys' own rows as f16 (2 bytes
    /// per element): the machine-independent cost of the search.
    pub bytes_read: usize,
}

/// Scratch space owned by the caller (one per worker thread), so that no search allocates.
///
/// Following instant-distance's `Search`, it holds a visited set stamped with a generation
/// counter (clearing costs O(1)) and the buffers a search needs. Indices grow it on first use.
#[derive(Default, Debug)]
pub struct SearchScratch {
    /// Scores of one block of keys (flat scan), or of one node's neighbours (graph search).
    pub scores: Vec<f32>,
    /// Top-k selection state.
    pub topk: TopK,
    /// Per-worker state of a parallel flat scan (see [`flat`]).
    pub flat: Vec<flat::FlatPart>,
    /// Graph search state: the visited set and the beam (see [`qgraph`]).
    pub graph: qgraph::GraphScratch,
    /// Cluster search state (see [`cluster`]).
    pub cluster: cluster::ClusterScratch,
}

impl SearchScratch {
    /// A new, empty scratch. Buffers are sized lazily by the first search.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The read side of every MIPS backend: what the daemon and the benchmarks see.
///
/// Indices refer to keys by id in a [`KeyStore`] owned by the caller; the same store must be
/// passed to every call (ids `0..len()` are the indexed keys).
pub trait MipsIndex: Send + Sync {
    /// A short stable name ("flat", "hnsw", "graph") for metrics and benchmark output.
    fn name(&self) -> &'static str;

    /// Finds the `k` keys with the largest inner product with `query` (f32, `keys.dim()` long).
    ///
    /// Results are written to `out`, best first. `k` larger than [`MipsIndex::len`] is clamped.
    fn search(
        &self,
        keys: &dyn KeyStore,
        query: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        out: &mut Hits,
    ) -> Result<SearchStats, IndexError>;

    /// Searches for several queries that share these keys at once (the query heads of one GQA
    /// group, `queries` holding `outs.len()` rows of `keys.dim()` floats); `outs[h]` gets query
    /// h's `k` best, best first. Indices that can share work between the queries override it
    /// (the graph reads each row once for the whole group); the default runs [`MipsIndex::search`]
    /// per query. The returned `scored` counts each key once per row read.
    fn search_group(
        &self,
        keys: &dyn KeyStore,
        queries: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        outs: &mut [Hits],
    ) -> Result<SearchStats, IndexError> {
        let d = check_group_shape(keys, queries, outs.len())?;
        let mut total = SearchStats::default();
        for (q, out) in queries.chunks_exact(d.max(1)).zip(outs.iter_mut()) {
            let st = self.search(keys, q, k, scratch, out)?;
            total.scored += st.scored;
            total.k_clamped |= st.k_clamped;
            total.bytes_read += st.bytes_read;
        }
        Ok(total)
    }

    /// Number of keys indexed.
    fn len(&self) -> usize;

    /// True when no key is indexed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory the index itself holds (not counting the keys).
    fn memory_bytes(&self) -> usize;
}

/// Checks that `queries` holds `heads` finite rows of `keys.dim()` floats; returns the dim.
pub(crate) fn check_group_shape(
    keys: &dyn KeyStore,
    queries: &[f32],
    heads: usize,
) -> Result<usize, IndexError> {
    let d = keys.dim();
    if queries.len() != heads * d {
        return Err(IndexError::BadShape(format!(
            "{} query floats for {heads} heads of dim {d}",
            queries.len()
        )));
    }
    error::check_finite("query", queries)?;
    Ok(d)
}

/// The write side: indices that accept keys appended after the build.
pub trait MipsIndexMut: MipsIndex {
    /// Indexes keys `self.len()..keys.len()` of `keys`, which must extend the store the index was
    /// built over.
    fn insert(&mut self, keys: &dyn KeyStore) -> Result<(), IndexError>;

    /// As [`MipsIndexMut::insert`], also handing over queries (row-major, `keys.dim()` floats
    /// each) that the engine computed for the new positions, e.g. prefill chunks or decode
    /// queries sliding out of the window. Query-guided indices remember them to link later
    /// keys; the others ignore them.
    fn insert_with_queries(
        &mut self,
        keys: &dyn KeyStore,
        queries: &[f32],
    ) -> Result<(), IndexError> {
        let _ = queries;
        self.insert(keys)
    }

    /// The read-only half of a guided insert: prepares `queries` (row-major, `keys.dim()`
    /// floats each; recent queries that need not belong to the new positions, e.g. the decode
    /// queries the daemon served since the last insert) to guide the insert of keys
    /// `self.len()..keys.len()` through [`MipsIndexMut::insert_guided`]. It takes `&self`, so
    /// the daemon runs it under a shared lock while searches go on. Unlike
    /// [`MipsIndexMut::insert_with_queries`], which pays an exact scan over all keys per
    /// query, query-guided indices approximate each query's top list with their own search
    /// (see [`qgraph::guided`] for the cost). Errors: malformed or non-finite queries, or a
    /// store shorter than the index. The default checks the queries and guides nothing.
    fn guide_insert(
        &self,
        keys: &dyn KeyStore,
        queries: &[f32],
    ) -> Result<qgraph::guided::InsertGuide, IndexError> {
        qgraph::guided::check_guides(keys, queries)?;
        Ok(Default::default())
    }

    /// As [`MipsIndexMut::insert`], guided by `guide` from [`MipsIndexMut::guide_insert`]
    /// with the same `keys` and no insert in between (otherwise the guide is ignored). The
    /// default ignores it: flat and hnsw insert keys only, as before.
    fn insert_guided(
        &mut self,
        keys: &dyn KeyStore,
        guide: &qgraph::guided::InsertGuide,
    ) -> Result<(), IndexError> {
        let _ = guide;
        self.insert(keys)
    }

    /// A copy of this index, for a copy-on-write insert: the daemon inserts into the copy
    /// while searches go on over the original, then swaps the copy in under a lock held for
    /// the swap alone, so that no search waits for an insert. The price is one copy of the
    /// index's memory per insert batch, off the request path. `None` when the index cannot be
    /// copied (hnsw_rs's graph): the caller then inserts in place under an exclusive lock.
    fn try_clone_box(&self) -> Option<Box<dyn MipsIndexMut>> {
        None
    }
}

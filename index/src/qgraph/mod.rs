//! The query-guided graph: RoarGraph (arXiv 2408.08933) as RetrievalAttention (arXiv 2409.10516)
//! uses it for KV caches.
//!
//! Decode queries are out of distribution for the keys, so a graph built over keys alone (HNSW)
//! links the wrong neighbours. This graph is built from the *queries' own* exact top lists:
//! - [`build`]: exact top-Nq per training query (flat kernels, causal), pivot edges with
//!   occlusion pruning and out-degree cap M, reverse edges, a connectivity pass so every key is
//!   reachable from the entry points.
//! - [`insert`]: incremental insert of later keys, guided by remembered queries.
//! - [`guided`]: the same guided by recent (decode) queries whose top lists come from the graph's
//!   own beam search: the daemon's background insert.
//! - [`search`]: best-first beam search with list size L from hub entry points.
//!
//! Storage is one fixed-width slot of M neighbour ids per key, a one-byte degree and the key's
//! squared norm (f32, for the occlusion pruning of build and insert), so a graph costs
//! `M * 4 + 5` bytes per key.

pub mod build;
pub mod connect;
pub mod group;
pub mod guided;
pub mod insert;
pub mod memory;
pub mod prune;
pub mod search;
pub mod trace;
pub mod train;

pub use search::GraphScratch;

use crate::error::check_finite;
use crate::{Hits, IndexError, KeyStore, MipsIndex, MipsIndexMut, SearchScratch, SearchStats};

/// Build and search parameters of the query-guided graph. Plain fields, so that configuration
/// layers (serde in the daemon, flags in the benchmarks) can mirror them.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphParams {
    /// M: out-degree cap (at most 255). The default, 12, reaches a given recall with fewer
    /// keys scored than 16, 20 or 30 on every set measured (real 8K code and prose, synthetic
    /// 128K and 256K; docs/design/0003-out-degree-and-small-graphs.md), at under half the edge memory; it needs a
    /// wider beam L for the same recall, and the decode request measured the same latency at
    /// equal attention mass (M 12 L 256 vs M 30 L 128 at 128K).
    pub degree: usize,
    /// Nq: length of each training query's exact top list.
    pub train_topk: usize,
    /// Training queries used at most; more are sampled (see `recent_train_queries`).
    pub max_train_queries: usize,
    /// Of those, the latest by position always taken (decode queries resemble the last
    /// prefill ones); the rest are an even sample of the older ones.
    pub recent_train_queries: usize,
    /// L: beam width of a search. It may be below k: the result is the k best of every key
    /// scored on the way, so L sets the effort and k only the size of the answer.
    pub search_list: usize,
    /// Beam width used by the connectivity pass and by insert.
    pub build_list: usize,
    /// Hub keys (most frequent in the training top lists) that every search starts from.
    pub entry_points: usize,
    /// Each training list member also gets the members within this many ranks of it as
    /// candidates (0: pivot edges only, as in RoarGraph).
    pub rank_window: usize,
    /// Occlusion slack α (DiskANN): candidate c is pruned when a kept s has α·d(s,c) < d(p,c).
    pub alpha: f32,
    /// α used instead of `alpha` when the training lists are sparse: with `e` list entries per
    /// key, α moves from `alpha` (e >= 32) to `sparse_alpha` (e <= 4) on a log scale. Long
    /// contexts with a bounded training sample have few entries per key, so strict pruning
    /// leaves nodes too few edges to navigate (128K synthetic: 0.912 -> 0.939 recall at ~2%
    /// scored); short ones (the real 8K set, ~50 entries per key) keep `alpha`. Default 1.0
    /// (off): with 1.5 the decode bench at 128K lost mass recall (0.96 -> 0.86 at k ~ 24), so it
    /// stays opt-in until that is understood (docs/design/0022-pruning-slack.md).
    pub sparse_alpha: f32,
    /// A node whose occlusion pruning kept fewer edges than this gets its nearest pruned
    /// candidates back up to this many (HNSW's "keep pruned connections"). When keys far
    /// outnumber the training lists (long contexts), most nodes have few candidates and strict
    /// pruning leaves them with too few edges to navigate. 0 (default) turns it off: on the real
    /// 8K data it costs 0.01 recall at 10% scored, on 128K synthetic it gains 0.01-0.02
    /// (docs/design/0022-pruning-slack.md).
    pub fill_degree: usize,
    /// Nq used instead of `train_topk` when the training lists are sparse: with `e =
    /// training queries x train_topk / keys` list entries per key, Nq moves from `train_topk`
    /// (e >= 32) to this (e <= 4) on a log scale, like `sparse_alpha`. Long contexts with a
    /// bounded training sample leave most keys in no list, so nodes have few candidates; a
    /// longer list per query costs the exact scan nothing extra (the scan dominates, the
    /// selection is a heap) and gives every listed key more co-relevant candidates. Measured
    /// on the decode bench's data at 256K (`bench recall --synth-context`): together with
    /// `sparse_rank_window` 16, mass recall@64 0.827 -> 0.870 at L 128. The
    /// real 8K set (e ~ 52) keeps `train_topk`.
    pub sparse_train_topk: usize,
    /// `rank_window` used when the training lists are sparse (same rule as
    /// `sparse_train_topk`).
    pub sparse_rank_window: usize,
    /// The connectivity pass links each key the entry points cannot reach from up to this many
    /// of the nodes its own search found (those with a free edge slot). With 1, such a key has
    /// a single way in; at long contexts most keys are in no training list and are reached only
    /// through this pass, and a query's true top keys among them were the ones the beam missed
    /// (at 1M, 75% of the missed top keys have in-degree <= 2, against 2% of the found ones;
    /// docs/design/0004-sequence-edges-and-in-links.md). Default 4: +0.005 mass recall at equal cost at 256K; no change on the
    /// real 8K set (few unreached keys there).
    pub connect_in_links: usize,
    /// Each key also links to its neighbours in token order (ids `i ± 1 ..= i ± s`, key ids
    /// being token positions, nearest first) in the edge slots left free after the
    /// connectivity pass. The slots are fixed width, so this costs no memory. Decode queries'
    /// top keys cluster by recency, and a key's nearest keys (L2) are almost all within a few
    /// hundred positions of it, so these are cheap key-key neighbour edges.
    /// Used as is on dense training lists (default 0: on the real 8K set they cost recall at
    /// equal scored fraction); see `sparse_sequence_edges`.
    pub sequence_edges: usize,
    /// `sequence_edges` used when the training lists are sparse (same rule as
    /// `sparse_train_topk`). Default 8: at 1M tokens of the decode bench's data, mass
    /// recall@64 0.878 -> 0.936 at 0.88% scored (docs/design/0004-sequence-edges-and-in-links.md).
    pub sparse_sequence_edges: usize,
    /// Training (and later decode) queries remembered, in f16, to guide incremental insert.
    pub kept_queries: usize,
    /// Insert links a new key through at most this many remembered queries whose top lists it
    /// enters.
    pub insert_queries: usize,
    /// A guided insert ([`guided`]) also remembers its guide queries (with their approximate
    /// bars) in the query memory, replacing the oldest. Off by default: their lower bars let
    /// more remembered queries qualify for each later new key, so the keys-only linking
    /// runs more beam searches; on the synthetic 64K set the time an insert batch holds the
    /// index exclusively went from ~41-58 to ~73-78 ms (keys only ~33-39) for +0.017
    /// recall@64 at L 128 (0.860 vs 0.843; keys only 0.633), and on the real code set +0.003
    /// recall@100 (docs/design/0006-guided-insert.md).
    pub remember_guides: bool,
}

impl Default for GraphParams {
    fn default() -> Self {
        Self {
            degree: 12,
            train_topk: 100,
            max_train_queries: 4096,
            recent_train_queries: 1024,
            search_list: 200,
            build_list: 64,
            entry_points: 4,
            alpha: 1.0,
            rank_window: 8,
            fill_degree: 0,
            sparse_alpha: 1.0,
            sparse_train_topk: 200,
            sparse_rank_window: 16,
            connect_in_links: 4,
            sequence_edges: 0,
            sparse_sequence_edges: 8,
            kept_queries: 256,
            insert_queries: 4,
            remember_guides: false,
        }
    }
}

/// A built query-guided graph over keys `0..len` of a [`KeyStore`].
#[derive(Clone, Debug)]
pub struct QueryGuidedGraph {
    params: GraphParams,
    /// `len * degree` neighbour ids; node i's are `edges[i*M .. i*M + deg[i]]`.
    edges: Vec<u32>,
    deg: Vec<u8>,
    /// Each indexed key's squared norm (`deg.len()` of them): every prune reads the norms of
    /// its pivot and candidates, and an insert recomputing them from the rows (a row read and
    /// a sum per candidate) cost a third of its time.
    norms: Vec<f32>,
    entries: Vec<u32>,
    /// Remembered queries that guide insert.
    memory: memory::QueryMemory,
}

impl search::Adjacency for QueryGuidedGraph {
    fn nodes(&self) -> usize {
        self.deg.len()
    }
    fn neighbours(&self, id: u32) -> &[u32] {
        let i = id as usize;
        let m = self.params.degree;
        match self.deg.get(i) {
            Some(&d) => &self.edges[i * m..i * m + d as usize],
            None => &[],
        }
    }
}

impl QueryGuidedGraph {
    /// The parameters it was built with (the search list may be changed with
    /// [`QueryGuidedGraph::set_search_list`]).
    pub fn params(&self) -> &GraphParams {
        &self.params
    }

    /// Changes L, the beam width of later searches (the effort knob of `bench recall --sweep`).
    pub fn set_search_list(&mut self, l: usize) {
        self.params.search_list = l.max(1);
    }

    /// The entry points every search starts from.
    pub fn entries(&self) -> &[u32] {
        &self.entries
    }

    /// Average out-degree (for reports).
    pub fn mean_degree(&self) -> f64 {
        if self.deg.is_empty() {
            return 0.0;
        }
        self.deg.iter().map(|&d| d as f64).sum::<f64>() / self.deg.len() as f64
    }

    /// Out-edges of a node (tests and reports).
    pub fn neighbours_of(&self, id: u32) -> &[u32] {
        search::Adjacency::neighbours(self, id)
    }

    /// The exact scan that replaces a search for `k` over `keys` when it is no dearer. A beam
    /// of width L scores about 8·L keys (measured: 7.9·L on the real 8K set at L 96, 15·L at
    /// 128K), as scattered rows, each dearer than a row of a sequential scan. When the graph
    /// holds no more than that (`n <= 8 * max(L, k)`), an exact scan costs no more and cannot
    /// miss: small graphs, whose late keys few causal training queries reach, otherwise could
    /// (a beam of 64 over 275 keys once scored 239 of them and still missed the top-1).
    fn exact_scan(&self, keys: &dyn KeyStore, k: usize) -> Option<crate::FlatIndex> {
        let n = self.len().min(keys.len());
        (k > 0 && n <= 8 * self.params.search_list.max(k)).then(|| crate::FlatIndex::new(n))
    }
}

impl MipsIndex for QueryGuidedGraph {
    fn name(&self) -> &'static str {
        "graph"
    }

    fn search(
        &self,
        keys: &dyn KeyStore,
        query: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        out: &mut Hits,
    ) -> Result<SearchStats, IndexError> {
        crate::keys::check_query_dim(keys, query)?;
        check_finite("query", query)?;
        out.clear();
        let n = self.len().min(keys.len());
        if n == 0 || k == 0 {
            return Ok(SearchStats {
                scored: 0,
                k_clamped: k > n,
                bytes_read: 0,
            });
        }
        if let Some(flat) = self.exact_scan(keys, k) {
            return flat.search(keys, query, k, scratch, out);
        }
        let (g, l) = (&mut scratch.graph, self.params.search_list);
        let scored = search::beam_search_k(self, keys, query, &self.entries, l, k.min(n), g);
        g.best.drain_into(out);
        Ok(SearchStats {
            scored,
            k_clamped: k > n,
            bytes_read: scored * keys.dim() * 2,
        })
    }

    fn search_group(
        &self,
        keys: &dyn KeyStore,
        queries: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        outs: &mut [Hits],
    ) -> Result<SearchStats, IndexError> {
        // (No heads: the joint search's own empty answer.)
        if let Some(flat) = self.exact_scan(keys, k).filter(|_| !outs.is_empty()) {
            return MipsIndex::search_group(&flat, keys, queries, k, scratch, outs);
        }
        group::search_group(
            self,
            keys,
            queries,
            k,
            &self.entries,
            self.params.search_list,
            scratch,
            outs,
        )
    }

    fn len(&self) -> usize {
        self.deg.len()
    }

    fn memory_bytes(&self) -> usize {
        self.edges.capacity() * 4
            + self.deg.capacity()
            + self.norms.capacity() * 4
            + self.entries.capacity() * 4
            + self.memory.memory_bytes()
    }
}

impl MipsIndexMut for QueryGuidedGraph {
    fn try_clone_box(&self) -> Option<Box<dyn MipsIndexMut>> {
        Some(Box::new(self.clone()))
    }

    fn insert(&mut self, keys: &dyn KeyStore) -> Result<(), IndexError> {
        insert::insert(self, keys)
    }

    fn insert_with_queries(
        &mut self,
        keys: &dyn KeyStore,
        queries: &[f32],
    ) -> Result<(), IndexError> {
        insert::insert_with_queries(self, keys, queries)
    }

    fn guide_insert(
        &self,
        keys: &dyn KeyStore,
        queries: &[f32],
    ) -> Result<guided::InsertGuide, IndexError> {
        guided::guide_insert(self, keys, queries)
    }

    fn insert_guided(
        &mut self,
        keys: &dyn KeyStore,
        guide: &guided::InsertGuide,
    ) -> Result<(), IndexError> {
        guided::insert_guided(self, keys, guide)
    }
}

#[cfg(test)]
mod tests {
    use crate::keys::{KeyRows, KeySlice};
    use crate::{build_index, FlatIndex, Hits, IndexKind, IndexParams, MipsIndex, SearchScratch};
    use crate::{TrainingSignal, TrainingSignal::Queries};
    use rand::{Rng, SeedableRng};

    /// Uniform keys, causal training queries at even positions, one random query.
    fn data(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<u32>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw =
            |m: usize| -> Vec<f32> { (0..m).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let keys = draw(n * d);
        let train = draw(64 * d);
        let q = draw(d);
        let pos = (0..64u32).map(|i| i * n as u32 / 64).collect();
        (keys, train, pos, q)
    }

    fn search(n: usize, l: usize, seed: u64) -> (Hits, Hits, usize) {
        let d = 24;
        let (rows, train, pos, q) = data(n, d, seed);
        let keys = KeySlice::new(KeyRows::F32(&rows), d).unwrap();
        let signal: TrainingSignal<'_> = Queries {
            vectors: &train,
            positions: &pos,
        };
        let mut params = IndexParams::default();
        params.graph.search_list = l;
        let graph = build_index(IndexKind::Graph, &keys, &signal, &params).unwrap();
        let mut scratch = SearchScratch::new();
        let (mut got, mut want) = (Hits::default(), Hits::default());
        let st = graph.search(&keys, &q, 10, &mut scratch, &mut got).unwrap();
        FlatIndex::new(n)
            .search(&keys, &q, 10, &mut scratch, &mut want)
            .unwrap();
        (got, want, st.scored)
    }

    /// A graph no larger than 8 x L is scanned exactly: the draw whose top-1 a beam of 64 once
    /// missed after scoring 239 of its 275 keys now gets the exact answer.
    #[test]
    fn small_graphs_are_searched_exactly() {
        let (got, want, scored) = search(275, 64, 709);
        assert_eq!(got.ids, want.ids);
        assert_eq!(scored, 275);
    }

    /// Larger ones are walked as graphs: fewer keys scored than indexed.
    #[test]
    fn large_graphs_are_walked() {
        let (got, want, scored) = search(3000, 64, 1);
        assert!(scored < 3000, "scored {scored}");
        let found = got.ids.iter().filter(|i| want.ids.contains(i)).count();
        assert!(found >= 5, "found {found} of 10");
    }
}

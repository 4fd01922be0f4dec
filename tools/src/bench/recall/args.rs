//! The arguments of `kvdex bench recall` and what they mean for each method: the graph
//! build parameters, the effort settings swept (L for the graph, ef for HNSW) and the
//! parameters each reported row names.

use kvdex_index::cluster::CodeBits;
use kvdex_index::{ClusterParams, GraphParams, HnswParams};

use kvdex::error::{KvdexError, Result};

/// Arguments of `kvdex bench recall`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecallArgs {
    /// Data set directory (../shared/data layout). Without it, `--synth-context` is required.
    #[arg(long, required_unless_present = "synth_context")]
    pub data: Option<std::path::PathBuf>,
    /// Instead of --data: the synthetic data of `kvdex bench decode` at this many tokens, with
    /// its training (`--synth-train` evenly spread prefill positions per query head) and its
    /// decode queries (`--synth-tests` per query head, each a fresh look back from the end),
    /// over the non-static tokens (sinks 128, window 512). Measures the graph the daemon
    /// builds, with many more test queries and no daemon.
    #[arg(long, conflicts_with = "data")]
    pub synth_context: Option<usize>,
    /// Synthetic shape "q_heads,kv_heads,head_dim" (the decode bench's default).
    #[arg(long, default_value = "8,2,128")]
    pub synth_shape: String,
    /// Synthetic: prefill positions sampled per query head for training (the decode bench's
    /// --train).
    #[arg(long, default_value_t = 2048)]
    pub synth_train: usize,
    /// Synthetic: decode queries per query head.
    #[arg(long, default_value_t = 64)]
    pub synth_tests: usize,
    /// Synthetic: seed (the decode bench's default).
    #[arg(long, default_value_t = 42)]
    pub synth_seed: u64,
    /// Methods, comma separated: flat, hnsw, graph, cluster.
    #[arg(long, default_value = "graph")]
    pub index: String,
    /// Neighbours per query.
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Sweep the effort knob (ef for hnsw, L for graph) from low to high.
    #[arg(long)]
    pub sweep: bool,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only these layers (comma separated); default all in meta.json.
    #[arg(long)]
    pub layers: Option<String>,
    /// Only the first N KV heads of each layer (and their query heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Graph: one graph per "kv" head trained on its group's queries, or per "q" head.
    #[arg(long, default_value = "kv")]
    pub graph_per: String,
    /// Graph: out-degree cap M.
    #[arg(long, default_value_t = GraphParams::default().degree)]
    pub degree: usize,
    /// Graph: Nq, the exact top list length per training query.
    #[arg(long, default_value_t = GraphParams::default().train_topk)]
    pub train_topk: usize,
    /// Graph: training queries used at most per graph (sampled evenly).
    #[arg(long, default_value_t = GraphParams::default().max_train_queries)]
    pub max_train: usize,
    /// Graph: of the training queries, the latest this many are always used.
    #[arg(long, default_value_t = GraphParams::default().recent_train_queries)]
    pub recent_train: usize,
    /// Graph: these beam widths L (comma separated) instead of --list or --sweep's.
    #[arg(long, value_delimiter = ',')]
    pub lists: Option<Vec<usize>>,
    /// Graph: beam width L when not sweeping.
    #[arg(long, default_value_t = GraphParams::default().search_list)]
    pub list: usize,
    /// Graph: hub entry points.
    #[arg(long, default_value_t = GraphParams::default().entry_points)]
    pub entries: usize,
    /// Graph: nodes left with fewer edges by pruning get their nearest pruned candidates back
    /// up to this many.
    #[arg(long, default_value_t = GraphParams::default().fill_degree)]
    pub fill_degree: usize,
    /// Graph: occlusion slack when the training lists are sparse (few entries per key).
    #[arg(long, default_value_t = GraphParams::default().sparse_alpha)]
    pub sparse_alpha: f32,
    /// Graph: Nq when the training lists are sparse (few entries per key).
    #[arg(long, default_value_t = GraphParams::default().sparse_train_topk)]
    pub sparse_train_topk: usize,
    /// Graph: rank window when the training lists are sparse.
    #[arg(long, default_value_t = GraphParams::default().sparse_rank_window)]
    pub sparse_window: usize,
    /// Graph: occlusion slack alpha.
    #[arg(long, default_value_t = GraphParams::default().alpha)]
    pub alpha: f32,
    /// Graph: rank window of co-occurrence candidates (0 = pivot edges only).
    #[arg(long, default_value_t = GraphParams::default().rank_window)]
    pub window: usize,
    /// Graph: also build on the first (1-f) of the context and insert the rest ("graph+insert").
    #[arg(long)]
    pub insert_frac: Option<f64>,
    /// Graph+insert: also hand the new positions' prefill queries (an even sample of at most
    /// this many per graph) to insert, as the daemon does with prefill chunks (0: keys only).
    #[arg(long, default_value_t = 0)]
    pub insert_queries: usize,
    /// Graph+insert: how the inserted keys are linked: "exact" (the guide queries' exact top
    /// lists over all keys, `insert_with_queries`), "approx" (their top lists from the graph's
    /// own beam search, `insert_guided`, the daemon's path) or "keys" (keys only, through the
    /// remembered training queries).
    #[arg(long, default_value = "exact", value_parser = ["exact", "approx", "keys"])]
    pub insert_guide: String,
    /// Graph+insert: guide with the first N test (decode) queries of each query head instead
    /// of the new positions' own prefill queries, as the daemon guides with later decode
    /// queries. Every method is then measured on the remaining test queries only.
    #[arg(long, default_value_t = 0)]
    pub guide_tests: usize,
    /// Graph+insert: insert this many keys per call (the daemon's `decode.insert_batch`), the
    /// guide queries split evenly over the calls in position order (0: all in one call).
    #[arg(long, default_value_t = 0)]
    pub insert_batch: usize,
    /// Graph+insert (approx): the guide queries also join the query memory.
    #[arg(long)]
    pub remember_guides: bool,
    /// Graph: remembered queries through which insert links each new key.
    #[arg(long, default_value_t = GraphParams::default().insert_queries)]
    pub insert_links: usize,
    /// Graph: training queries remembered to guide insert.
    #[arg(long, default_value_t = GraphParams::default().kept_queries)]
    pub kept_queries: usize,
    /// Graph: in-edges the connectivity pass gives each unreached key.
    #[arg(long, default_value_t = GraphParams::default().connect_in_links)]
    pub connect_in_links: usize,
    /// Graph: edges to neighbours in token order (each side) added into free slots, on dense
    /// training lists.
    #[arg(long, default_value_t = GraphParams::default().sequence_edges)]
    pub sequence_edges: usize,
    /// Graph: the same when the training lists are sparse (few entries per key).
    #[arg(long, default_value_t = GraphParams::default().sparse_sequence_edges)]
    pub sparse_sequence_edges: usize,
    /// HNSW: M.
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    /// HNSW: ef_construction.
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// HNSW: ef_search when not sweeping.
    #[arg(long, default_value_t = HnswParams::default().ef_search)]
    pub ef: usize,
    /// Cluster: mean keys per cluster.
    #[arg(long, default_value_t = ClusterParams::default().rows_per_cluster)]
    pub rows_per_cluster: usize,
    /// Cluster: these probe fractions (share of the keys whose codes are scored, comma
    /// separated) instead of the default or --sweep's.
    #[arg(long, value_delimiter = ',')]
    pub probes: Option<Vec<f32>>,
    /// Cluster: candidates re-ranked exactly, a multiple of k.
    #[arg(long, default_value_t = ClusterParams::default().rerank)]
    pub rerank: f32,
    /// Cluster: code width in bits, 8 or 4.
    #[arg(long, default_value = "4")]
    pub code_bits: String,
    /// Cluster: cluster-order spread z (rank by q·centroid + z·σ(q)).
    #[arg(long, default_value_t = ClusterParams::default().spread)]
    pub spread: f32,
    /// Cluster: keys per clustering segment.
    #[arg(long, default_value_t = ClusterParams::default().segment)]
    pub segment: usize,
    /// Cluster: Lloyd iterations.
    #[arg(long, default_value_t = ClusterParams::default().iters)]
    pub kmeans_iters: usize,
    /// Cluster: k-means sample per cluster.
    #[arg(long, default_value_t = ClusterParams::default().sample_per_cluster)]
    pub sample_per_cluster: usize,
}

/// The cluster build parameters the arguments ask for.
pub(super) fn cluster_params(a: &RecallArgs) -> Result<ClusterParams> {
    let bits = CodeBits::parse(&a.code_bits).ok_or_else(|| {
        KvdexError::Config(format!("--code-bits must be 8 or 4, got {:?}", a.code_bits))
    })?;
    Ok(ClusterParams {
        rows_per_cluster: a.rows_per_cluster,
        sample_per_cluster: a.sample_per_cluster,
        iters: a.kmeans_iters,
        bits,
        rerank: a.rerank,
        spread: a.spread,
        segment: a.segment,
        ..ClusterParams::default()
    })
}

/// The cluster probe fractions measured.
pub(super) fn probes(a: &RecallArgs) -> Vec<f32> {
    match (&a.probes, a.sweep) {
        (Some(p), _) => p.clone(),
        (None, true) => vec![0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2],
        (None, false) => vec![ClusterParams::default().probe_fraction],
    }
}

/// The graph build parameters the arguments ask for.
pub(super) fn graph_params(a: &RecallArgs) -> GraphParams {
    GraphParams {
        degree: a.degree,
        train_topk: a.train_topk,
        max_train_queries: a.max_train,
        search_list: a.list,
        entry_points: a.entries,
        alpha: a.alpha,
        fill_degree: a.fill_degree,
        sparse_alpha: a.sparse_alpha,
        sparse_train_topk: a.sparse_train_topk,
        sparse_rank_window: a.sparse_window,
        rank_window: a.window,
        kept_queries: a.kept_queries,
        recent_train_queries: a.recent_train,
        insert_queries: a.insert_links,
        connect_in_links: a.connect_in_links,
        sequence_edges: a.sequence_edges,
        sparse_sequence_edges: a.sparse_sequence_edges,
        remember_guides: a.remember_guides,
        ..GraphParams::default()
    }
}

/// Effort settings of a method: L for the graph, ef for hnsw, none for flat.
pub(super) fn settings(method: &str, a: &RecallArgs) -> Vec<usize> {
    match (method, a.sweep) {
        ("flat", _) => vec![0],
        ("cluster", _) => (0..probes(a).len()).collect(),
        ("hnsw", true) => [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
            .iter()
            .map(|f| (a.k as f64 * f) as usize)
            .collect(),
        ("hnsw", false) => vec![a.ef],
        (_, _) if a.lists.is_some() => a.lists.clone().unwrap_or_default(),
        (_, true) => vec![4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256],
        (_, false) => vec![a.list],
    }
}

/// The parameters one row of the report names, as JSON.
pub(super) fn params_json(
    m: &str,
    s: usize,
    a: &RecallArgs,
    gp: &GraphParams,
    hp: &HnswParams,
) -> serde_json::Value {
    match m {
        "flat" => serde_json::json!({"k": a.k}),
        "cluster" => serde_json::json!({
            "k": a.k, "probe": probes(a).get(s), "rows_per_cluster": a.rows_per_cluster,
            "rerank": a.rerank, "spread": a.spread, "bits": a.code_bits, "iters": a.kmeans_iters,
            "sample_per_cluster": a.sample_per_cluster, "segment": a.segment,
        }),
        "hnsw" => {
            serde_json::json!({"k": a.k, "M": hp.m, "ef_construction": hp.ef_construction, "ef": s})
        }
        _ => serde_json::json!({
            "k": a.k, "L": s, "M": gp.degree, "Nq": gp.train_topk, "max_train": gp.max_train_queries, "recent_train": gp.recent_train_queries,
            "entries": gp.entry_points, "alpha": gp.alpha, "fill": gp.fill_degree, "sparse_alpha": gp.sparse_alpha, "sparse_nq": gp.sparse_train_topk, "sparse_window": gp.sparse_rank_window, "window": gp.rank_window, "per": a.graph_per, "in_links": gp.connect_in_links, "seq": gp.sequence_edges, "sparse_seq": gp.sparse_sequence_edges,
            "insert_frac": if m == "graph+insert" { a.insert_frac } else { None },
            "insert_queries": if m == "graph+insert" { Some(a.insert_queries) } else { None },
            "insert_guide": if m == "graph+insert" { Some(a.insert_guide.as_str()) } else { None },
            "guide_tests": a.guide_tests,
            "insert_batch": if m == "graph+insert" { Some(a.insert_batch) } else { None },
            "remember_guides": a.remember_guides,
        }),
    }
}

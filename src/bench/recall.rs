//! `kvdex bench recall`: recall against cost of every index on a data set, with the benchmark
//! split of DESIGN.md (context `[0, T-256)`, causal prefill queries over the same positions as
//! training signal, the last 256 queries as decode/test queries), aggregated over every layer
//! and head.
//!
//! Per (method, setting) it reports recall@k (mean and 10th percentile over queries and heads),
//! attention-mass recall (softmax of q·k/sqrt(d) over the whole context: mass of the returned set
//! over that of the exact top-k) and mass covered (returned mass over the total), the fraction of
//! keys scored, single-thread queries per second, build seconds and index bytes.

use crate::data::{DataSet, Layer};
use crate::error::{KvdexError, Result};
use half::f16;
use kvdex_index::keys::KeyRows;
use kvdex_index::qgraph::build::build as build_graph;
use kvdex_index::{
    FlatIndex, GraphParams, Hits, HnswIndex, HnswParams, KeySlice, MipsIndex, MipsIndexMut,
    SearchScratch, TrainingSignal,
};
use std::io::IsTerminal;
use std::time::Instant;

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
    /// Methods, comma separated: flat, hnsw, graph.
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
    /// Graph: remembered queries through which insert links each new key.
    #[arg(long, default_value_t = GraphParams::default().insert_queries)]
    pub insert_links: usize,
    /// Graph: training queries remembered to guide insert.
    #[arg(long, default_value_t = GraphParams::default().kept_queries)]
    pub kept_queries: usize,
    /// HNSW: M.
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    /// HNSW: ef_construction.
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// HNSW: ef_search when not sweeping.
    #[arg(long, default_value_t = HnswParams::default().ef_search)]
    pub ef: usize,
}

/// Accumulated figures of one (method, setting).
#[derive(Debug, Default, Clone)]
struct Agg {
    method: String,
    params: serde_json::Value,
    recalls: Vec<f32>,
    mass_recall: f64,
    mass_covered: f64,
    scored_frac: f64,
    search_s: f64,
    build_s: f64,
    memory_bytes: usize,
    kv_bytes: usize,
}

impl Agg {
    fn json(&self) -> serde_json::Value {
        let n = self.recalls.len().max(1) as f64;
        let mut r = self.recalls.clone();
        r.sort_by(|a, b| a.total_cmp(b));
        let p10 = r.get(r.len() / 10).copied().unwrap_or(0.0);
        serde_json::json!({
            "method": self.method,
            "params": self.params,
            "recall_at_k": r.iter().map(|&x| x as f64).sum::<f64>() / n,
            "recall_p10": p10,
            "mass_recall": self.mass_recall / n,
            "mass_covered": self.mass_covered / n,
            "scored_fraction": self.scored_frac / n,
            "qps": n / self.search_s.max(1e-9),
            "build_s": self.build_s,
            "memory_bytes": self.memory_bytes,
        })
    }
}

/// Exact answers for one test query.
struct Truth {
    top: Vec<u32>,
    probs: Vec<f32>,
    top_mass: f64,
}

fn truth(keys: &KeySlice<'_>, q: &[f32], k: usize, scratch: &mut SearchScratch) -> Result<Truth> {
    use kvdex_index::KeyStore;
    let n = keys.len();
    let mut hits = Hits::default();
    FlatIndex::new(n).search(keys, q, k, scratch, &mut hits)?;
    let mut probs = vec![0.0f32; n];
    keys.score_range(q, 0, &mut probs);
    let scale = 1.0 / (keys.dim() as f32).sqrt();
    let mx = probs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
    let mut sum = 0.0f64;
    for p in probs.iter_mut() {
        *p = (*p * scale - mx).exp();
        sum += *p as f64;
    }
    probs.iter_mut().for_each(|p| *p = (*p as f64 / sum) as f32);
    let top_mass = hits.ids.iter().map(|&i| probs[i as usize] as f64).sum();
    Ok(Truth {
        top: hits.ids,
        probs,
        top_mass,
    })
}

/// Runs `index` on the test queries and adds the figures to `agg`.
fn evaluate(
    index: &dyn MipsIndex,
    keys: &KeySlice<'_>,
    tests: &[(Vec<f32>, Truth)],
    k: usize,
    agg: &mut Agg,
) -> Result<()> {
    let mut scratch = SearchScratch::new();
    let mut hits = Hits::default();
    let n = kvdex_index::KeyStore::len(keys) as f64;
    let t0 = Instant::now();
    let mut results = Vec::with_capacity(tests.len());
    for (q, _) in tests {
        let st = index.search(keys, q, k, &mut scratch, &mut hits)?;
        results.push((hits.ids.clone(), st.scored));
    }
    agg.search_s += t0.elapsed().as_secs_f64();
    for ((ids, scored), (_, t)) in results.iter().zip(tests) {
        let hit = ids.iter().filter(|i| t.top.contains(i)).count();
        agg.recalls.push(hit as f32 / t.top.len().max(1) as f32);
        let mass: f64 = ids.iter().map(|&i| t.probs[i as usize] as f64).sum();
        agg.mass_recall += if t.top_mass > 0.0 {
            (mass / t.top_mass).min(1.0)
        } else {
            1.0
        };
        agg.mass_covered += mass;
        agg.scored_frac += *scored as f64 / n;
    }
    Ok(())
}

fn to_f32(rows: &[f16]) -> Vec<f32> {
    rows.iter().map(|x| x.to_f32()).collect()
}

fn graph_params(a: &RecallArgs) -> GraphParams {
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
        ..GraphParams::default()
    }
}

/// Effort settings of a method: L for the graph, ef for hnsw, none for flat.
fn settings(method: &str, a: &RecallArgs) -> Vec<usize> {
    match (method, a.sweep) {
        ("flat", _) => vec![0],
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

/// One graph's worth of data: a KV head's keys, and per query head of its group the test
/// queries and the training queries with their (causal) positions.
pub struct Group<'a> {
    /// Progress label.
    pub label: String,
    /// `[n][dim]` keys.
    pub keys: &'a [f16],
    /// Per query head: `[tests][dim]` test queries.
    pub tests: Vec<Vec<f32>>,
    /// Per query head: `[n][dim]` training queries and their positions.
    pub train: Vec<(Vec<f32>, Vec<u32>)>,
}

/// Runs the benchmark.
pub fn run(a: RecallArgs) -> Result<()> {
    let methods: Vec<String> = a.index.split(',').map(|s| s.trim().to_string()).collect();
    for m in &methods {
        if !["flat", "hnsw", "graph"].contains(&m.as_str()) {
            return Err(KvdexError::Config(format!(
                "unknown --index {m:?} (flat, hnsw, graph)"
            )));
        }
    }
    if a.graph_per != "kv" && a.graph_per != "q" {
        return Err(KvdexError::Config(format!(
            "--graph-per must be kv or q, got {:?}",
            a.graph_per
        )));
    }
    let gp = graph_params(&a);
    let hp = HnswParams {
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: a.ef,
    };
    let mut variants: Vec<String> = methods.clone();
    if methods.iter().any(|m| m == "graph") && a.insert_frac.is_some() {
        variants.push("graph+insert".into());
    }
    let mut aggs: Vec<Vec<Agg>> = variants
        .iter()
        .map(|m| {
            let base = if m == "graph+insert" {
                "graph"
            } else {
                m.as_str()
            };
            settings(base, &a)
                .into_iter()
                .map(|s| Agg {
                    method: m.clone(),
                    params: params_json(m, s, &a, &gp, &hp),
                    ..Agg::default()
                })
                .collect()
        })
        .collect();
    let tty = std::io::stderr().is_terminal();
    let mut each = |g: Group<'_>, d: usize| -> Result<()> {
        if tty {
            eprint!("\r{} ...        ", g.label);
        }
        run_group(&a, &g, d, (&variants, &mut aggs), (&gp, &hp))
    };
    match (&a.data, a.synth_context) {
        (Some(dir), _) => data_groups(&a, dir, &mut each)?,
        (None, Some(n)) => synth_groups(&a, n, &mut each)?,
        (None, None) => {
            return Err(KvdexError::Config(
                "bench recall needs --data DIR or --synth-context N".into(),
            ))
        }
    }
    if tty {
        eprintln!();
    }
    print_results(&aggs, a.json);
    Ok(())
}

/// The groups of a data set directory: every (layer, KV head), with the benchmark split.
fn data_groups(
    a: &RecallArgs,
    dir: &std::path::Path,
    each: &mut dyn FnMut(Group<'_>, usize) -> Result<()>,
) -> Result<()> {
    let ds = DataSet::open(dir)?;
    let meta = ds.meta.clone();
    let layers: Vec<u32> = match &a.layers {
        Some(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|_| KvdexError::Config(format!("bad layer {x:?}")))
            })
            .collect::<Result<_>>()?,
        None => meta.layers.clone(),
    };
    let (ctx, d) = (meta.context(), meta.dim);
    for &l in &layers {
        let layer = ds.layer(l)?;
        let kv_heads = a.kv_heads.unwrap_or(meta.kv_heads()).min(meta.kv_heads());
        for g in 0..kv_heads {
            let heads: Vec<usize> = (0..meta.q_heads())
                .filter(|&h| meta.kv_head_of_q_head[h] == g)
                .collect();
            let group = Group {
                label: format!("layer {l} kv head {g}/{kv_heads}"),
                keys: Layer::rows(&layer.k, g, 0, ctx),
                tests: heads
                    .iter()
                    .map(|&h| to_f32(Layer::rows(&layer.q, h, ctx, meta.tokens)))
                    .collect(),
                train: heads
                    .iter()
                    .map(|&h| {
                        let v = to_f32(Layer::rows(&layer.q, h, 0, ctx));
                        (v, (0..ctx as u32).collect())
                    })
                    .collect(),
            };
            each(group, d)?;
        }
    }
    Ok(())
}

/// The groups of `kvdex bench decode`'s synthetic data at `n` tokens (one per KV head).
fn synth_groups(
    a: &RecallArgs,
    n: usize,
    each: &mut dyn FnMut(Group<'_>, usize) -> Result<()>,
) -> Result<()> {
    let shape: Vec<usize> = a
        .synth_shape
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| KvdexError::Config(format!("bad --synth-shape {:?}", a.synth_shape)))?;
    let [hq, kv, d] = shape[..] else {
        return Err(KvdexError::Config(format!(
            "--synth-shape needs q_heads,kv_heads,head_dim, got {:?}",
            a.synth_shape
        )));
    };
    let (sinks, window) = (128, 512);
    if kv == 0 || hq % kv != 0 || d < 4 || d % 2 != 0 || n <= sinks + window + 1 {
        return Err(KvdexError::Config(format!(
            "--synth-shape {hq},{kv},{d} / --synth-context {n}: kv heads must divide q heads, \
             an even dim >= 4, more than {} tokens",
            sinks + window + 1
        )));
    }
    let data = super::decode_data::Synth::generate(n, hq, kv, d, a.synth_seed);
    let sets = data.recall_sets(
        hq,
        (sinks, window),
        a.synth_train,
        a.synth_tests,
        a.synth_seed,
    );
    let end = n - window;
    let used = a.kv_heads.unwrap_or(kv).min(kv);
    for (g, (tests, train)) in sets.into_iter().enumerate().take(used) {
        let group = Group {
            label: format!("synthetic {n} kv head {g}/{kv}"),
            keys: &data.k[(g * n + sinks) * d..(g * n + end) * d],
            tests,
            train,
        };
        each(group, d)?;
    }
    Ok(())
}

/// Builds and evaluates every variant on one group.
fn run_group(
    a: &RecallArgs,
    group: &Group<'_>,
    d: usize,
    (variants, aggs): (&[String], &mut [Vec<Agg>]),
    (gp, hp): (&GraphParams, &HnswParams),
) -> Result<()> {
    let keys_f16 = group.keys;
    let keys = KeySlice::new(KeyRows::F16(keys_f16), d)?;
    let ctx = keys_f16.len() / d;
    let mut scratch = SearchScratch::new();
    let mut tests: Vec<Vec<(Vec<f32>, Truth)>> = Vec::new();
    for qs in &group.tests {
        let mut t = Vec::new();
        for q in qs.chunks_exact(d) {
            t.push((q.to_vec(), truth(&keys, q, a.k, &mut scratch)?));
        }
        tests.push(t);
    }
    let train = &group.train;
    for (vi, m) in variants.iter().enumerate() {
        let kv_bytes = ctx * d * 2 * 2;
        for agg in aggs[vi].iter_mut() {
            agg.kv_bytes += kv_bytes;
        }
        match m.as_str() {
            "flat" => {
                let idx = FlatIndex::new(ctx);
                for t in &tests {
                    evaluate(&idx, &keys, t, a.k, &mut aggs[vi][0])?;
                }
            }
            "hnsw" => {
                let t0 = Instant::now();
                let mut idx = HnswIndex::build(&keys, hp)?;
                let bs = t0.elapsed().as_secs_f64();
                for (si, ef) in settings("hnsw", a).into_iter().enumerate() {
                    idx.set_ef_search(ef);
                    let agg = &mut aggs[vi][si];
                    agg.build_s += bs;
                    agg.memory_bytes += idx.memory_bytes();
                    for t in &tests {
                        evaluate(&idx, &keys, t, a.k, agg)?;
                    }
                }
            }
            _ => {
                let cut = match m.as_str() {
                    "graph+insert" => ((1.0 - a.insert_frac.unwrap_or(0.0)) * ctx as f64) as usize,
                    _ => ctx,
                };
                let groups: Vec<Vec<usize>> = if a.graph_per == "kv" {
                    vec![(0..train.len()).collect()]
                } else {
                    (0..train.len()).map(|i| vec![i]).collect()
                };
                for grp in groups {
                    let mut vecs = Vec::new();
                    let mut pos = Vec::new();
                    for &i in &grp {
                        let (v, p) = &train[i];
                        for (j, &at) in p.iter().enumerate() {
                            if (at as usize) < cut {
                                vecs.extend_from_slice(&v[j * d..(j + 1) * d]);
                                pos.push(at);
                            }
                        }
                    }
                    let signal = TrainingSignal::Queries {
                        vectors: &vecs,
                        positions: &pos,
                    };
                    let t0 = Instant::now();
                    let part = KeySlice::new(KeyRows::F16(&keys_f16[..cut * d]), d)?;
                    let mut idx = build_graph(&part, &signal, gp)?;
                    if cut < ctx {
                        let mut fresh = Vec::new();
                        let per = a.insert_queries.div_ceil(grp.len().max(1));
                        for &i in &grp {
                            let (v, p) = &train[i];
                            let later: Vec<usize> =
                                (0..p.len()).filter(|&j| p[j] as usize >= cut).collect();
                            let take = per.min(later.len());
                            for j in 0..take {
                                let at = later[j * later.len() / take];
                                fresh.extend_from_slice(&v[at * d..(at + 1) * d]);
                            }
                        }
                        idx.insert_with_queries(&keys, &fresh)?;
                    }
                    let bs = t0.elapsed().as_secs_f64();
                    if std::env::var_os("KVDEX_RECALL_DEBUG").is_some() {
                        let (mut sum, mut cnt) = (0usize, 0usize);
                        for &i in &grp {
                            for (_, t) in &tests[i] {
                                for &id in &t.top {
                                    sum += idx.neighbours_of(id).len();
                                    cnt += 1;
                                }
                            }
                        }
                        eprintln!(
                            "# graph: mean out-degree {:.1}, of the test queries' true top keys {:.1}",
                            idx.mean_degree(),
                            sum as f64 / cnt.max(1) as f64
                        );
                    }
                    for (si, lst) in settings("graph", a).into_iter().enumerate() {
                        idx.set_search_list(lst);
                        let agg = &mut aggs[vi][si];
                        agg.build_s += bs;
                        agg.memory_bytes += idx.memory_bytes();
                        for &i in &grp {
                            evaluate(&idx, &keys, &tests[i], a.k, agg)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn params_json(
    m: &str,
    s: usize,
    a: &RecallArgs,
    gp: &GraphParams,
    hp: &HnswParams,
) -> serde_json::Value {
    match m {
        "flat" => serde_json::json!({"k": a.k}),
        "hnsw" => {
            serde_json::json!({"k": a.k, "M": hp.m, "ef_construction": hp.ef_construction, "ef": s})
        }
        _ => serde_json::json!({
            "k": a.k, "L": s, "M": gp.degree, "Nq": gp.train_topk, "max_train": gp.max_train_queries, "recent_train": gp.recent_train_queries,
            "entries": gp.entry_points, "alpha": gp.alpha, "fill": gp.fill_degree, "sparse_alpha": gp.sparse_alpha, "sparse_nq": gp.sparse_train_topk, "sparse_window": gp.sparse_rank_window, "window": gp.rank_window, "per": a.graph_per,
            "insert_frac": if m == "graph+insert" { a.insert_frac } else { None },
            "insert_queries": if m == "graph+insert" { Some(a.insert_queries) } else { None },
        }),
    }
}

fn print_results(aggs: &[Vec<Agg>], json: bool) {
    if json {
        for agg in aggs.iter().flatten() {
            println!("{}", agg.json());
        }
        return;
    }
    println!(
        "{:<13} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10} {:>7}",
        "method",
        "effort",
        "recall",
        "p10",
        "massrec",
        "masscov",
        "scored%",
        "qps",
        "build_s",
        "mem_bytes",
        "mem/KV"
    );
    for agg in aggs.iter().flatten() {
        let j = agg.json();
        let effort = j["params"]
            .get("L")
            .or(j["params"].get("ef"))
            .cloned()
            .unwrap_or_default();
        println!(
            "{:<13} {:>6} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.2} {:>9.0} {:>8.2} {:>10} {:>6.1}%",
            agg.method,
            effort.to_string(),
            j["recall_at_k"].as_f64().unwrap_or(0.0),
            j["recall_p10"].as_f64().unwrap_or(0.0),
            j["mass_recall"].as_f64().unwrap_or(0.0),
            j["mass_covered"].as_f64().unwrap_or(0.0),
            100.0 * j["scored_fraction"].as_f64().unwrap_or(0.0),
            j["qps"].as_f64().unwrap_or(0.0),
            agg.build_s,
            agg.memory_bytes,
            100.0 * agg.memory_bytes as f64 / agg.kv_bytes.max(1) as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real-data fixture (layer 17, 1024 tokens): the split, the ground truth and the graph
    /// end to end. The graph must beat a key-only graph's typical recall on these OOD queries.
    #[test]
    fn graph_on_real_fixture_finds_most_of_the_true_top_k() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2-l17-1k");
        let ds = DataSet::open(&dir).unwrap();
        let (ctx, d, k) = (ds.meta.context(), ds.meta.dim, 20);
        assert_eq!(ctx, 768);
        let layer = ds.layer(17).unwrap();
        let keys = KeySlice::new(KeyRows::F16(Layer::rows(&layer.k, 0, 0, ctx)), d).unwrap();
        let train = to_f32(Layer::rows(&layer.q, 0, 0, ctx));
        let pos: Vec<u32> = (0..ctx as u32).collect();
        let signal = TrainingSignal::Queries {
            vectors: &train,
            positions: &pos,
        };
        let g = build_graph(
            &keys,
            &signal,
            &GraphParams {
                search_list: 48,
                ..GraphParams::default()
            },
        )
        .unwrap();
        let mut scratch = SearchScratch::new();
        let tests: Vec<(Vec<f32>, Truth)> = to_f32(Layer::rows(&layer.q, 0, ctx, ds.meta.tokens))
            .chunks_exact(d)
            .map(|q| (q.to_vec(), truth(&keys, q, k, &mut scratch).unwrap()))
            .collect();
        let mut agg = Agg::default();
        evaluate(&g, &keys, &tests, k, &mut agg).unwrap();
        let j = agg.json();
        let recall = j["recall_at_k"].as_f64().unwrap();
        assert!(recall > 0.9, "recall@{k} {recall}");
        assert!(j["mass_recall"].as_f64().unwrap() > 0.95);
        assert!(j["scored_fraction"].as_f64().unwrap() < 1.0);
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let a = RecallArgs {
            data: Some("/nonexistent/kvdex".into()),
            synth_context: None,
            synth_shape: "8,2,128".into(),
            synth_train: 2048,
            synth_tests: 64,
            synth_seed: 42,
            index: "flat".into(),
            k: 10,
            sweep: false,
            json: true,
            layers: None,
            kv_heads: None,
            graph_per: "kv".into(),
            degree: 30,
            train_topk: 100,
            max_train: 100,
            recent_train: 1024,
            list: 10,
            lists: None,
            entries: 4,
            alpha: 1.0,
            fill_degree: 0,
            sparse_alpha: 1.0,
            sparse_train_topk: 200,
            sparse_window: 16,
            window: 8,
            insert_frac: None,
            insert_queries: 0,
            kept_queries: 16,
            insert_links: 4,
            m: 16,
            ef_construction: 50,
            ef: 50,
        };
        let e = run(a).unwrap_err().to_string();
        assert!(e.contains("meta.json"), "{e}");
    }
}

//! `kvdex bench recall`: recall against cost of every index on a data set, with the benchmark
//! split of DESIGN.md (context `[0, T-256)`, causal prefill queries over the same positions as
//! training signal, the last 256 queries as decode/test queries), aggregated over every layer
//! and head.
//!
//! Per (method, setting) it reports recall@k (mean and 10th percentile over queries and heads),
//! attention-mass recall (softmax of q·k/sqrt(d) over the whole context: mass of the returned set
//! over that of the exact top-k) and mass covered (returned mass over the total), the fraction of
//! keys scored, single-thread queries per second, build seconds and index bytes.

mod args;
mod attn;
mod diag;
mod groups;
mod measure;
mod report;

use std::io::IsTerminal;

use kvdex_index::HnswParams;

pub use args::RecallArgs;
use args::{graph_params, params_json, settings};
pub use groups::Group;
use groups::{data_groups, synth_groups};
use kvdex::error::{KvdexError, Result};
use measure::{run_group, Agg};
use report::print_results;

/// Runs the benchmark.
pub fn run(a: RecallArgs) -> Result<()> {
    let methods: Vec<String> = a.index.split(',').map(|s| s.trim().to_string()).collect();
    for m in &methods {
        if !["flat", "hnsw", "graph", "cluster"].contains(&m.as_str()) {
            return Err(KvdexError::Config(format!(
                "unknown --index {m:?} (flat, hnsw, graph, cluster)"
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

#[cfg(test)]
mod tests {
    use super::*;

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
            insert_guide: "exact".into(),
            guide_tests: 0,
            insert_batch: 0,
            remember_guides: false,
            kept_queries: 16,
            insert_links: 4,
            connect_in_links: 4,
            sequence_edges: 0,
            sparse_sequence_edges: 8,
            m: 16,
            ef_construction: 50,
            ef: 50,
            rows_per_cluster: 32,
            probes: None,
            rerank: 2.0,
            spread: 0.0,
            code_bits: "4".into(),
            segment: 8192,
            kmeans_iters: 4,
            sample_per_cluster: 16,
        };
        let e = run(a).unwrap_err().to_string();
        assert!(e.contains("meta.json"), "{e}");
    }
}

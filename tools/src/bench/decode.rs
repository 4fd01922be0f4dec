//! `kvdex bench decode`: the decode-step layer request as an engine sees it.
//!
//! The bench process is the client: it starts `kvdex serve` as a child process, creates a
//! session over HTTP, attaches its shared-memory region, appends the context, and then, per
//! method, times one `retrieve` per layer and decode step (adaptive budget, partial attention).
//! Methods: `flat` (no index: the GQA-batched, multithreaded exact scan of every non-static
//! key, then attention over its top-k) and `graph` / `hnsw` (sealed with sampled prefill
//! queries, built in the daemon's background pool; the build time is reported).
//!
//! Each decode result is checked against exact attention over the whole context: the merged
//! output (kvdex's part + the static tokens' part, [`kvdex_client::merge`]) gives
//! `out_rel_err`; the retrieved mass gives `mass_recall` and `mass_covered`
//! ([`super::decode_data`]). The daemon's VmRSS is read from `/proc` at the end.
//!
//! # Layout
//! - `daemon`: the `kvdex serve` child and the HTTP calls to it.
//! - `context`: one context length, every method, the concurrent sessions.
//! - `steps`: the timed, checked decode steps of one method.
//! - `report`: the table or JSON rows.

mod context;
mod daemon;
mod report;
mod sampling;
mod steps;

use std::path::PathBuf;
use std::time::Instant;

use kvdex_index::IndexKind;

use super::decode_data::Synth;
use context::run_context;
use kvdex::error::{KvdexError, Result};

/// Arguments of `kvdex bench decode`.
#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Context lengths in tokens (comma-separated runs one daemon each).
    #[arg(long, value_delimiter = ',', default_value = "131072")]
    pub context: Vec<usize>,
    /// Real Q/K/V directory (../shared/data layout): its shape and benchmark split replace the
    /// shape flags and --context.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Layer of the data set used with --data.
    #[arg(long, default_value_t = 17)]
    pub layer: u32,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Layers (each gets the same context; one request per layer and step is timed).
    #[arg(long, default_value_t = 1)]
    pub layers: u32,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    pub q_heads: u32,
    /// KV heads.
    #[arg(long, default_value_t = 2)]
    pub kv_heads: u32,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    pub head_dim: u32,
    /// A named model shape replacing --q-heads, --kv-heads and --head-dim: "llama3-8b" (32 q
    /// heads, 8 KV heads, head_dim 128), the shape engines run.
    #[arg(long, value_parser = ["llama3-8b"])]
    pub shape: Option<String>,
    /// Methods, comma-separated: flat, graph, hnsw, cluster.
    #[arg(long, value_delimiter = ',', default_value = "flat,graph")]
    pub methods: Vec<String>,
    /// Decode steps timed per method.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Adaptive budget: fraction p of the estimated mass to cover.
    #[arg(long, default_value_t = 0.95)]
    pub coverage: f32,
    /// Adaptive budget: least k per head.
    #[arg(long, default_value_t = 16)]
    pub min_k: usize,
    /// Adaptive budget: most k per head (also the candidates searched for).
    #[arg(long, default_value_t = 256)]
    pub max_k: usize,
    /// A fixed k per head instead of the adaptive budget.
    #[arg(long)]
    pub fixed_k: Option<usize>,
    /// Prefill query positions sampled for the graph build (per query head). Default: one per
    /// 128 tokens of the context, at least 1024 (docs/design/0005: at 1M tokens 8192
    /// reach mass recall 0.95 at L 512, where 2048 needed L 1536).
    #[arg(long)]
    pub train: Option<usize>,
    /// S: sinks the engine keeps (set on the session).
    #[arg(long, default_value_t = 128)]
    pub sinks: usize,
    /// W: recent window the engine keeps (set on the session).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Graph beam width L (passed to the daemon; the daemon's default).
    #[arg(long, default_value_t = 256)]
    pub search_list: usize,
    /// The kvdex binary to start (default: this one).
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// Seed of the synthetic data and queries.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also copy the chosen K/V rows into the response (gather), timed as copy_ms.
    #[arg(long)]
    pub gather: bool,
    /// Sessions served at once: the timed one plus N-1 others with the same context, each
    /// driven by its own client thread issuing retrieves back to back while the timed one runs.
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Append one token to every layer before each step, as an engine's decode loop does, so
    /// that the daemon's background inserts (a batch every `decode.insert_batch` tokens) run
    /// during the timed steps and show in their latency. The context then starts at
    /// `--context` and grows by one token per step (with --data: starts that many tokens
    /// before the data set's context).
    #[arg(long)]
    pub append: bool,
    /// Online recall sampling: the timed session samples this share of its retrieves (its
    /// own `sample_rate`), and a twin session with the same context and index, sampling
    /// nothing, is timed alternately with it (`unsampled_p50_ms`); the JSON gains the
    /// sampler's `sampled_mass_recall` and `sampled_requests` beside `mass_recall`.
    #[arg(long)]
    pub sample_rate: Option<f64>,
    /// How the daemon stores the rows (the session's `kv_format`): "f16" (the bench's dtype)
    /// or "int8" (one scale per row).
    #[arg(long, default_value = "f16", value_parser = ["f16", "int8"])]
    pub kv_format: String,
}

impl DecodeArgs {
    /// Training query positions per query head for a context of `n` tokens (`--train`, or one
    /// per 128 tokens, at least 1024).
    pub(crate) fn train_for(&self, n: usize) -> usize {
        self.train.unwrap_or((n / 128).max(1024))
    }

    /// Tokens appended during the run beyond the starting context: one per step (warm-up
    /// steps included) for each method, since every method runs on the same session.
    pub(crate) fn appended_tokens(&self) -> usize {
        if self.append {
            (self.steps + 2) * self.methods.len()
        } else {
            0
        }
    }
}

/// Refuses arguments that would panic or print NaN rows, before any data is generated (at
/// 1M tokens that takes minutes): a context with no token outside the static sinks and
/// window, no timed step, or budget bounds the daemon would refuse.
fn check_run(a: &DecodeArgs) -> Result<()> {
    let statics = a.sinks + a.window;
    if let Some(&n) = a.context.iter().find(|&&n| n <= statics) {
        return Err(KvdexError::Config(format!(
            "context {n} leaves no token to retrieve: it must be longer than --sinks {} + \
             --window {} = {statics}",
            a.sinks, a.window
        )));
    }
    if a.steps == 0 {
        return Err(KvdexError::Config("--steps must be at least 1".into()));
    }
    match a.fixed_k {
        Some(0) => Err(KvdexError::Config("--fixed-k must be at least 1".into())),
        Some(_) => Ok(()),
        None => kvdex_index::attend::BudgetParams::new(a.coverage, a.min_k, a.max_k)
            .map(|_| ())
            .map_err(KvdexError::from),
    }
}

/// Runs the benchmark.
pub fn run(a: DecodeArgs) -> Result<()> {
    let mut a = a;
    let real = match &a.data {
        Some(dir) => {
            let ds = crate::data::DataSet::open(dir)?;
            let data = Synth::from_data(&ds, a.layer)?;
            a.q_heads = ds.meta.q_heads() as u32;
            a.kv_heads = ds.meta.kv_heads() as u32;
            a.head_dim = ds.meta.dim as u32;
            a.layers = 1;
            a.context = vec![data.n.saturating_sub(a.appended_tokens())];
            Some(data)
        }
        None => None,
    };
    if a.shape.as_deref() == Some("llama3-8b") && real.is_none() {
        (a.q_heads, a.kv_heads, a.head_dim) = (32, 8, 128);
    }
    let a = a;
    if a.kv_heads == 0
        || a.q_heads == 0
        || !a.q_heads.is_multiple_of(a.kv_heads.max(1))
        || a.head_dim == 0
        || a.layers == 0
    {
        return Err(KvdexError::Config(format!(
            "shape {} q heads / {} kv heads / head_dim {} / {} layers: kv_heads must divide q_heads, all non-zero",
            a.q_heads, a.kv_heads, a.head_dim, a.layers
        )));
    }
    check_run(&a)?;
    let kinds: Vec<(String, Option<IndexKind>)> = a
        .methods
        .iter()
        .map(|m| match m.as_str() {
            "flat" => Ok((m.clone(), None)),
            other => Ok((m.clone(), Some(IndexKind::parse(other)?))),
        })
        .collect::<Result<_>>()?;
    let exe = match &a.daemon {
        Some(p) => p.clone(),
        None => super::child::daemon_binary()?,
    };
    if !a.json {
        report::print_header();
    }
    match real {
        Some(data) => run_context(&a, data, a.context[0], &kinds, &exe)?,
        None => {
            for &n in &a.context {
                let t = Instant::now();
                let data = Synth::generate(
                    n + a.appended_tokens(),
                    a.q_heads as usize,
                    a.kv_heads as usize,
                    a.head_dim as usize,
                    a.seed,
                );
                eprintln!(
                    "# context {n}: generated in {:.1}s",
                    t.elapsed().as_secs_f64()
                );
                run_context(&a, data, n, &kinds, &exe)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(flags: &[&str]) -> DecodeArgs {
        let argv = ["kvdex", "bench", "decode"].iter().chain(flags);
        match crate::cli::Cli::parse_from(argv).command {
            crate::cli::Command::Bench(crate::cli::BenchCommand::Decode(a)) => a,
            other => panic!("parsed {other:?}"),
        }
    }

    fn refusal(flags: &[&str]) -> String {
        match check_run(&args(flags)) {
            Err(e) => e.to_string(),
            Ok(()) => panic!("{flags:?} was accepted"),
        }
    }

    #[test]
    fn contexts_without_retrievable_tokens_are_refused() {
        let e = refusal(&["--context", "4096,100"]);
        assert!(e.contains("context 100") && e.contains("640"), "{e}");
        let e = refusal(&["--context", "1000", "--sinks", "500"]);
        assert!(e.contains("1012"), "{e}");
        assert!(check_run(&args(&["--context", "641"])).is_ok());
    }

    #[test]
    fn steps_and_budget_are_checked_before_any_data_is_made() {
        assert!(refusal(&["--steps", "0"]).contains("--steps"));
        assert!(refusal(&["--fixed-k", "0"]).contains("--fixed-k"));
        assert!(refusal(&["--coverage", "2"]).contains("coverage"));
        assert!(refusal(&["--min-k", "100", "--max-k", "10"]).contains("min_k"));
        assert!(check_run(&args(&["--fixed-k", "8", "--coverage", "2"])).is_ok());
        assert!(check_run(&args(&[])).is_ok());
    }

    #[test]
    fn shapes_are_named_or_refused() {
        assert_eq!(
            args(&["--shape", "llama3-8b"]).shape.as_deref(),
            Some("llama3-8b")
        );
        let argv = ["kvdex", "bench", "decode", "--shape", "llama9"];
        assert!(crate::cli::Cli::try_parse_from(argv).is_err());
        assert_eq!(
            args(&["--methods", "flat,cluster"]).methods,
            ["flat", "cluster"]
        );
    }
}

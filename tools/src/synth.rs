//! `kvdex gen-synth`: synthetic Q/K/V that are out of distribution the way real ones are.
//!
//! The generative model (RoPE, recency, anisotropic low-rank content, a query offset, sinks,
//! mild norm tails) is [`model`]; its difficulty was calibrated against real SmolLM2 vectors with
//! `benches/peers/calib.py` and the peer script (`benches/peers/peers.py`). Each layer is an
//! independent draw of the model, so a data set spans easy and hard heads as real layers do.
//!
//! Output per layer l: `K_L{l}.npy`, `V_L{l}.npy` (`[kv_heads, T, dim]`), `Q_L{l}.npy`
//! (`[q_heads, T, dim]`), f16, and a `meta.json` that [`crate::data::DataSet::open`] reads.

pub mod model;

use crate::data::write_npy_f16;
use half::f16;
use kvdex::error::{KvdexError, Result};

/// Arguments of `kvdex gen-synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Tokens per sequence (T).
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Query heads.
    #[arg(long, default_value_t = 9)]
    pub q_heads: usize,
    /// KV heads (must divide the query heads).
    #[arg(long, default_value_t = 3)]
    pub kv_heads: usize,
    /// Head dimension (even).
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    /// Layers, each an independent draw of the model.
    #[arg(long, default_value_t = 4)]
    pub layers: u32,
    /// RoPE base θ (SmolLM2 uses 1e5, Llama 3 5e5).
    #[arg(long, default_value_t = 100000.0)]
    pub rope_theta: f64,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// Writes a synthetic data set: one model per layer (each head draws its own strengths).
pub fn run(a: SynthArgs) -> Result<()> {
    let (t, h, g, d) = (a.tokens, a.q_heads, a.kv_heads, a.dim);
    if t <= crate::data::TEST_QUERIES
        || g == 0
        || h % g != 0
        || d < 4
        || d % 2 != 0
        || a.layers == 0
    {
        return Err(KvdexError::Config(format!(
            "need tokens > {}, kv-heads dividing q-heads, an even dim >= 4 and layers >= 1 (got T={t}, H={h}, G={g}, D={d}, layers={})",
            crate::data::TEST_QUERIES, a.layers
        )));
    }
    if a.rope_theta.is_nan() || a.rope_theta <= 1.0 {
        return Err(KvdexError::Config(format!(
            "--rope-theta must be above 1, got {}",
            a.rope_theta
        )));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| {
        KvdexError::Data(format!(
            "--out {}: cannot create the directory: {e}",
            a.out.display()
        ))
    })?;
    for layer in 0..a.layers {
        write_layer(&a, layer)?;
    }
    let meta = serde_json::json!({
        "model": "kvdex gen-synth",
        "cfg": {"n_head": h, "n_kv": g, "hd": d, "rope_dim": d, "theta": a.rope_theta},
        "T": t,
        "layers": (0..a.layers).collect::<Vec<_>>(),
        "kv_head_of_q_head": (0..h).map(|x| x / (h / g)).collect::<Vec<_>>(),
        "layout": "HF rotate_half RoPE layout, post-RoPE, unscaled; logit=q.k/sqrt(head_dim)",
        "dtype": "float16",
        "seed": a.seed,
        "files": {"K_L{l}.npy": "[n_kv, T, hd]", "V_L{l}.npy": "[n_kv, T, hd]", "Q_L{l}.npy": "[n_head, T, hd]"},
        "benchmark_split": "context = [0, T-256); prefill queries = [0, T-256); decode queries = [T-256, T)",
    });
    let txt = serde_json::to_string_pretty(&meta).map_err(|e| KvdexError::Data(e.to_string()))?;
    std::fs::write(a.out.join("meta.json"), txt)?;
    Ok(())
}

/// Generates and writes one layer: keys and values of every position, and each query head's
/// queries with its sticky look-back targets.
fn write_layer(a: &SynthArgs, layer: u32) -> Result<()> {
    let (t, h, g, d) = (a.tokens, a.q_heads, a.kv_heads, a.dim);
    let seed = a.seed.wrapping_mul(1_000_003).wrapping_add(layer as u64);
    let m = model::Model::new(t, g, h / g, d, a.rope_theta, seed);
    let mut rng = m.rng(1);
    let mut row = vec![0.0f32; d];
    let mut k_all = Vec::with_capacity(g * t * d);
    let mut v_all = Vec::with_capacity(g * t * d);
    for kv in 0..g {
        for p in 0..t {
            m.key(kv, p, &mut rng, &mut row);
            k_all.extend(row.iter().map(|&x| f16::from_f32(x)));
            m.value(&mut rng, &mut row);
            v_all.extend(row.iter().map(|&x| f16::from_f32(x)));
        }
    }
    let mut q_all = Vec::with_capacity(h * t * d);
    for head in 0..h {
        let mut target = None;
        for p in 0..t {
            let tg = m.target(head, p, target, &mut rng);
            target = Some(tg);
            m.query(head, p, tg, &mut rng, &mut row);
            q_all.extend(row.iter().map(|&x| f16::from_f32(x)));
        }
    }
    write_npy_f16(&a.out.join(format!("K_L{layer}.npy")), &[g, t, d], &k_all)?;
    write_npy_f16(&a.out.join(format!("V_L{layer}.npy")), &[g, t, d], &v_all)?;
    write_npy_f16(&a.out.join(format!("Q_L{layer}.npy")), &[h, t, d], &q_all)?;
    Ok(())
}

//! `kvdex gen-synth`: synthetic Q/K/V that are out of distribution the way real ones are.
//!
//! The model, per layer and KV head (dims split like partial RoPE: the first half rotates with
//! position, the second half does not):
//! - topics: `C` random centres; the text drifts between them (a sticky Markov chain), and each
//!   key is its topic's centre plus noise, scaled by a log-normal norm (heavy tails);
//! - a key mean `mu_k`, and a query mean `mu_q` at a negative cosine (about -0.5) to it, both in
//!   the unrotated half, as measured on real heads;
//! - each query looks for the topic of an earlier position (recent-biased) through a head-specific
//!   mixing, plus noise and a log-normal norm;
//! - position 0 is a sink: a large key along the queries' mean, so it takes a large share of the
//!   attention mass, as in real later layers;
//! - RoPE (θ = 10000) rotates the first half of q and k by position.
//!
//! Output: `K_L0.npy`, `V_L0.npy` (`[kv_heads, T, dim]`), `Q_L0.npy` (`[q_heads, T, dim]`), f16,
//! and a `meta.json` that [`crate::data::DataSet::open`] reads.

use crate::data::write_npy_f16;
use crate::error::{KvdexError, Result};
use half::f16;
use rand::{Rng, SeedableRng};

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
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// Standard normal sample (Box-Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn gauss_vec(rng: &mut impl Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| normal(rng) * s).collect()
}

/// Rotates the first half of `v` (pairs i, i + half/2) by position `pos` (RoPE, θ = 10000).
fn rope(v: &mut [f32], pos: usize) {
    let half = v.len() / 2;
    let pairs = half / 2;
    for i in 0..pairs {
        let theta = pos as f32 * 10000f32.powf(-(2.0 * i as f32) / half as f32);
        let (s, c) = theta.sin_cos();
        let (a, b) = (v[i], v[i + pairs]);
        v[i] = a * c - b * s;
        v[i + pairs] = a * s + b * c;
    }
}

/// Writes a synthetic data set.
pub fn run(a: SynthArgs) -> Result<()> {
    let (t, h, g, d) = (a.tokens, a.q_heads, a.kv_heads, a.dim);
    if t <= crate::data::TEST_QUERIES || g == 0 || h % g != 0 || d < 4 || d % 4 != 0 {
        return Err(KvdexError::Config(format!(
            "need tokens > {}, kv-heads dividing q-heads, dim a multiple of 4 (got T={t}, H={h}, G={g}, D={d})",
            crate::data::TEST_QUERIES
        )));
    }
    std::fs::create_dir_all(&a.out)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let topics = 64;
    let half = d / 2;
    let mut k_all = vec![f16::ZERO; g * t * d];
    let mut v_all = vec![f16::ZERO; g * t * d];
    let mut q_all = vec![f16::ZERO; h * t * d];
    // The text's topic at each position: sticky, shared by all heads.
    let mut topic = vec![0usize; t];
    for p in 1..t {
        topic[p] = if rng.gen::<f32>() < 0.97 {
            topic[p - 1]
        } else {
            rng.gen_range(0..topics)
        };
    }
    for kv in 0..g {
        let centres: Vec<Vec<f32>> = (0..topics).map(|_| gauss_vec(&mut rng, d, 1.0)).collect();
        let mut mu_k = vec![0.0f32; d];
        let mut mu_q = vec![0.0f32; d];
        let dir_k = gauss_vec(&mut rng, d - half, 1.0);
        let other = gauss_vec(&mut rng, d - half, 1.0);
        for i in 0..d - half {
            mu_k[half + i] = 1.5 * dir_k[i];
            mu_q[half + i] = 1.5 * (-0.6 * dir_k[i] + 0.8 * other[i]);
        }
        for p in 0..t {
            let norm = (0.35 * normal(&mut rng)).exp();
            let c = &centres[topic[p]];
            let mut k: Vec<f32> = (0..d)
                .map(|i| mu_k[i] + norm * (c[i] + 0.6 * normal(&mut rng)))
                .collect();
            if p == 0 {
                k = mu_q.iter().map(|x| 0.55 * x).collect();
            }
            rope(&mut k, p);
            let v = gauss_vec(&mut rng, d, 1.0);
            for i in 0..d {
                k_all[(kv * t + p) * d + i] = f16::from_f32(k[i]);
                v_all[(kv * t + p) * d + i] = f16::from_f32(v[i]);
            }
        }
        for head in (0..h).filter(|x| x / (h / g) == kv) {
            // Head-specific view: a random rotation-like mix of the topic centres.
            let mix = gauss_vec(&mut rng, d, 0.35);
            for p in 0..t {
                // Look back a heavy-tailed distance: mostly recent, sometimes far.
                let back = ((rng.gen::<f32>().powi(3)) * p as f32) as usize;
                let target = topic[p - back.min(p)];
                let norm = (0.5 * normal(&mut rng)).exp();
                let c = &centres[target];
                let mut q: Vec<f32> = (0..d)
                    .map(|i| {
                        mu_q[i]
                            + norm * (1.3 * c[i] + mix[i] * c[(i + 1) % d] + 0.7 * normal(&mut rng))
                    })
                    .collect();
                rope(&mut q, p);
                for i in 0..d {
                    q_all[(head * t + p) * d + i] = f16::from_f32(q[i]);
                }
            }
        }
    }
    write_npy_f16(&a.out.join("K_L0.npy"), &[g, t, d], &k_all)?;
    write_npy_f16(&a.out.join("V_L0.npy"), &[g, t, d], &v_all)?;
    write_npy_f16(&a.out.join("Q_L0.npy"), &[h, t, d], &q_all)?;
    let meta = serde_json::json!({
        "model": "kvdex gen-synth",
        "cfg": {"n_head": h, "n_kv": g, "hd": d, "rope_dim": half},
        "T": t,
        "layers": [0],
        "kv_head_of_q_head": (0..h).map(|x| x / (h / g)).collect::<Vec<_>>(),
        "layout": "first half RoPE-rotated (theta 1e4), second half unrotated; logit=q.k/sqrt(head_dim)",
        "dtype": "float16",
        "seed": a.seed,
        "files": {"K_L{l}.npy": "[n_kv, T, hd]", "V_L{l}.npy": "[n_kv, T, hd]", "Q_L{l}.npy": "[n_head, T, hd]"},
        "benchmark_split": "context = [0, T-256); prefill queries = [0, T-256); decode queries = [T-256, T)",
    });
    let txt = serde_json::to_string_pretty(&meta).map_err(|e| KvdexError::Data(e.to_string()))?;
    std::fs::write(a.out.join("meta.json"), txt)?;
    Ok(())
}

//! Data and ground truth of `kvdex bench decode`.
//!
//! # Synthetic out-of-distribution data
//! Per KV head: keys `k_i = mu_k + a·s_i·u_{t(i)} + noise`, where token i belongs to topic
//! `t(i)` (64 tokens per topic on average, unit direction `u_t`), `s_i ~ U(0.5, 1.5)` grades
//! the tokens of a topic, and `mu_k` is a large shared offset. A query of head h attends to one
//! topic: `q = mu_q + b·u_t + noise` with `mu_q` pointing away from `mu_k` (negative cosine, as
//! on the real SmolLM2 data), so queries and keys are out of distribution for each other while
//! the attention is peaked (most mass on a few tens of tokens). Prefill (training) queries at
//! position p pick a topic of a token before p (causal); decode queries pick any topic.
//!
//! # Ground truth
//! [`Truth`] computes, per query head, exact attention over the whole context with the index
//! crate's kernels, and from it the figures the benchmark reports.

use half::f16;
use kvdex_index::attend::{attend_head, AttendScratch};
use kvdex_index::keys::KeyRows;
use kvdex_index::{KeySlice, KeyStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{KvdexError, Result};

/// Tokens per topic, on average.
const TOPIC_TOKENS: usize = 64;
/// Topic component of a key.
const KEY_TOPIC: f32 = 6.0;
/// Per-dimension noise of a key.
const KEY_NOISE: f32 = 0.5;
/// Topic component of a query.
const QUERY_TOPIC: f32 = 24.0;
/// Per-dimension noise of a query.
const QUERY_NOISE: f32 = 0.3;

/// A synthetic context: `[kv_heads][n][head_dim]` K and V in f16, plus what queries need.
pub struct Synth {
    /// Tokens.
    pub n: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// `[kv][n][d]` keys.
    pub k: Vec<f16>,
    /// `[kv][n][d]` values.
    pub v: Vec<f16>,
    topics: Vec<Vec<f32>>,
    topic_of: Vec<u32>,
    mu_q: Vec<Vec<f32>>,
    /// Real queries `[q_heads][tokens][d]` and their token count, when loaded from a data set.
    real_q: Option<(Vec<f16>, usize)>,
}

fn gauss(rng: &mut StdRng) -> f32 {
    // Box-Muller; rand_distr is not a dependency.
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn unit(rng: &mut StdRng, d: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..d).map(|_| gauss(rng)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.into_iter().map(|x| x / n).collect()
}

impl Synth {
    /// Generates `n` tokens for `kv_heads` heads of `head_dim` (deterministic in `seed`).
    pub fn generate(n: usize, kv_heads: usize, head_dim: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = head_dim;
        let n_topics = (n / TOPIC_TOKENS).max(1);
        let topic_of: Vec<u32> = (0..n).map(|_| rng.gen_range(0..n_topics as u32)).collect();
        let mut topics = Vec::with_capacity(kv_heads);
        let mut mu_q = Vec::with_capacity(kv_heads);
        let (mut k, mut v) = (
            Vec::with_capacity(kv_heads * n * d),
            Vec::with_capacity(kv_heads * n * d),
        );
        for _ in 0..kv_heads {
            let mu_k: Vec<f32> = unit(&mut rng, d).into_iter().map(|x| 8.0 * x).collect();
            let side = unit(&mut rng, d);
            mu_q.push(
                mu_k.iter()
                    .zip(&side)
                    .map(|(m, s)| -0.5 * m + 3.0 * s)
                    .collect(),
            );
            let t: Vec<f32> = (0..n_topics).flat_map(|_| unit(&mut rng, d)).collect();
            for i in 0..n {
                let s = rng.gen_range(0.5f32..1.5);
                let u = &t[topic_of[i] as usize * d..(topic_of[i] as usize + 1) * d];
                for j in 0..d {
                    k.push(f16::from_f32(
                        mu_k[j] + KEY_TOPIC * s * u[j] + KEY_NOISE * gauss(&mut rng),
                    ));
                    v.push(f16::from_f32(gauss(&mut rng)));
                }
            }
            topics.push(t);
        }
        Self {
            n,
            kv_heads,
            head_dim,
            k,
            v,
            topics,
            topic_of,
            mu_q,
            real_q: None,
        }
    }

    /// A layer of a real data set (../shared/data layout): the context is the benchmark split's
    /// `[0, context)`, training queries come from the same positions (causal), decode queries
    /// from `[context, tokens)`.
    pub fn from_data(ds: &crate::data::DataSet, layer: u32) -> Result<Self> {
        let l = ds.layer(layer)?;
        let (n, kv, d) = (ds.meta.context(), ds.meta.kv_heads(), ds.meta.dim);
        let (mut k, mut v) = (
            Vec::with_capacity(kv * n * d),
            Vec::with_capacity(kv * n * d),
        );
        for g in 0..kv {
            k.extend_from_slice(crate::data::Layer::rows(&l.k, g, 0, n));
            v.extend_from_slice(crate::data::Layer::rows(&l.v, g, 0, n));
        }
        Ok(Self {
            n,
            kv_heads: kv,
            head_dim: d,
            k,
            v,
            topics: Vec::new(),
            topic_of: Vec::new(),
            mu_q: Vec::new(),
            real_q: Some((l.q.data, ds.meta.tokens)),
        })
    }

    fn real_query(&self, h: usize, pos: usize, out: &mut [f32]) -> bool {
        let Some((q, t)) = &self.real_q else {
            return false;
        };
        let d = self.head_dim;
        let at = (h * t + pos.min(t - 1)) * d;
        out.iter_mut()
            .zip(&q[at..at + d])
            .for_each(|(o, x)| *o = x.to_f32());
        true
    }

    /// A query of KV head `g`'s distribution attending to the topic of token `token`.
    pub fn query(&self, g: usize, token: usize, rng: &mut StdRng, out: &mut [f32]) {
        let d = self.head_dim;
        let t = self.topic_of[token.min(self.n - 1)] as usize;
        let u = &self.topics[g][t * d..(t + 1) * d];
        for j in 0..d {
            out[j] = self.mu_q[g][j] + QUERY_TOPIC * u[j] + QUERY_NOISE * gauss(rng);
        }
    }

    /// `[q_heads][head_dim]` decode queries: each head attends to the topic of a random
    /// non-static token.
    pub fn decode_queries(
        &self,
        q_heads: usize,
        lo: usize,
        hi: usize,
        rng: &mut StdRng,
        out: &mut [f32],
    ) {
        let (d, group) = (self.head_dim, q_heads / self.kv_heads);
        if let Some((_, t)) = &self.real_q {
            let pos = rng.gen_range(self.n..*t);
            for h in 0..q_heads {
                self.real_query(h, pos, &mut out[h * d..(h + 1) * d]);
            }
            return;
        }
        for h in 0..q_heads {
            let tok = rng.gen_range(lo..hi.max(lo + 1));
            self.query(h / group, tok, rng, &mut out[h * d..(h + 1) * d]);
        }
    }

    /// Training queries `[q_heads][positions.len()][d]`: the query at position p picks the
    /// topic of a token before p.
    pub fn training(&self, q_heads: usize, positions: &[u32], seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (d, group, n) = (self.head_dim, q_heads / self.kv_heads, positions.len());
        let mut out = vec![0f32; q_heads * n * d];
        for h in 0..q_heads {
            for (i, &p) in positions.iter().enumerate() {
                let at = (h * n + i) * d;
                if self.real_query(h, p as usize, &mut out[at..at + d]) {
                    continue;
                }
                let tok = rng.gen_range(0..=p as usize);
                self.query(h / group, tok, &mut rng, &mut out[at..at + d]);
            }
        }
        out
    }

    /// Keys or values of KV head `g` as a store.
    pub fn rows(&self, values: bool, g: usize) -> Result<KeySlice<'_>> {
        let len = self.n * self.head_dim;
        let src = if values { &self.v } else { &self.k };
        KeySlice::new(KeyRows::F16(&src[g * len..(g + 1) * len]), self.head_dim)
            .map_err(KvdexError::from)
    }
}

/// Per-head exact figures of one decode step.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeadTruth {
    /// Fraction of the retrieved set's mass over the mass of the exact top-k of the same k
    /// (non-static tokens only).
    pub mass_recall: f64,
    /// Fraction of the whole attention mass in the static tokens plus the retrieved ones.
    pub mass_covered: f64,
}

/// Reusable buffers of the exact evaluation.
#[derive(Default)]
pub struct Truth {
    logits: Vec<f32>,
    sorted: Vec<f32>,
    all: Vec<u32>,
    statics: Vec<u32>,
    scratch: AttendScratch,
}

impl Truth {
    /// Scores `q` against every key of `keys` (scaled) and returns the figures for a retrieved
    /// set `ids`; writes exact full attention into `full` and the static part into
    /// (`stat_out`, returned lse).
    #[allow(clippy::too_many_arguments)]
    pub fn head(
        &mut self,
        keys: &KeySlice<'_>,
        values: &KeySlice<'_>,
        q: &[f32],
        ids: &[u32],
        (sinks, window): (usize, usize),
        full: &mut [f32],
        stat_out: &mut [f32],
    ) -> Result<(HeadTruth, f32)> {
        let n = keys.len();
        let scale = 1.0 / (keys.dim() as f32).sqrt();
        self.logits.resize(n, 0.0);
        keys.score_range(q, 0, &mut self.logits);
        self.logits.iter_mut().for_each(|x| *x *= scale);
        let m = self
            .logits
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let p = |x: f32| ((x as f64) - m).exp();
        let total: f64 = self.logits.iter().map(|&x| p(x)).sum();
        let end = n.saturating_sub(window).max(sinks);
        let stat: f64 = self.logits[..sinks.min(n)]
            .iter()
            .chain(&self.logits[end..])
            .map(|&x| p(x))
            .sum();
        let got: f64 = ids.iter().map(|&i| p(self.logits[i as usize])).sum();
        // Exact top-|ids| among the non-static tokens.
        self.sorted.clear();
        self.sorted
            .extend_from_slice(&self.logits[sinks.min(end)..end]);
        let k = ids.len().min(self.sorted.len());
        let best: f64 = if k == 0 {
            0.0
        } else {
            self.sorted
                .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            self.sorted[..k].iter().map(|&x| p(x)).sum()
        };
        if self.all.len() != n {
            self.all = (0..n as u32).collect();
        }
        attend_head(keys, values, q, &self.all, scale, &mut self.scratch, full)?;
        self.statics.clear();
        self.statics
            .extend((0..sinks.min(n) as u32).chain(end as u32..n as u32));
        let lse = attend_head(
            keys,
            values,
            q,
            &self.statics,
            scale,
            &mut self.scratch,
            stat_out,
        )?;
        Ok((
            HeadTruth {
                mass_recall: if best > 0.0 {
                    (got / best).min(1.0)
                } else {
                    1.0
                },
                mass_covered: (stat + got) / total,
            },
            lse,
        ))
    }
}

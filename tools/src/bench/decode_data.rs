//! Data and ground truth of `kvdex bench decode`.
//!
//! # Synthetic out-of-distribution data
//! The model of `kvdex gen-synth` ([`crate::synth::model`]: RoPE with θ = 5e5 as in Llama 3,
//! recency, anisotropic low-rank content, query and key means at a negative cosine, a sink),
//! calibrated against real SmolLM2 vectors (`benches/peers/calib.py`). Keys and values are generated for
//! the context; a prefill (training) query at position p looks back at an earlier position
//! (causal); a decode query sits at position n and looks back anywhere in the context.
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

use kvdex::error::{KvdexError, Result};
use kvdex::store::sampler::quality::head_figures;

/// RoPE base of the synthetic data (Llama 3's).
const ROPE_THETA: f64 = 500_000.0;

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
    model: Option<crate::synth::model::Model>,
    /// Real queries `[q_heads][tokens][d]` and their token count, when loaded from a data set.
    real_q: Option<(Vec<f16>, usize)>,
}

impl Synth {
    /// Generates `n` tokens for `kv_heads` groups of `q_heads / kv_heads` query heads of
    /// `head_dim` (deterministic in `seed`).
    pub fn generate(n: usize, q_heads: usize, kv_heads: usize, head_dim: usize, seed: u64) -> Self {
        let d = head_dim;
        let group = (q_heads / kv_heads.max(1)).max(1);
        let model = crate::synth::model::Model::new(n + 1, kv_heads, group, d, ROPE_THETA, seed);
        let mut rng = model.rng(1);
        let (mut k, mut v) = (
            Vec::with_capacity(kv_heads * n * d),
            Vec::with_capacity(kv_heads * n * d),
        );
        let mut row = vec![0.0f32; d];
        for g in 0..kv_heads {
            for p in 0..n {
                model.key(g, p, &mut rng, &mut row);
                k.extend(row.iter().map(|&x| f16::from_f32(x)));
                model.value(&mut rng, &mut row);
                v.extend(row.iter().map(|&x| f16::from_f32(x)));
            }
        }
        Self {
            n,
            kv_heads,
            head_dim,
            k,
            v,
            model: Some(model),
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
            model: None,
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

    /// The synthetic query of head `h` at position `pos` (looking back at a drawn position).
    fn synth_query(&self, h: usize, pos: usize, rng: &mut StdRng, out: &mut [f32]) {
        if let Some(m) = &self.model {
            let target = m.target(h, pos, None, rng);
            m.query(h, pos, target, rng, out);
        }
    }

    /// `[q_heads][head_dim]` decode queries of the token after a context of `len` tokens.
    /// Synthetic: each head looks back at a drawn position before `len` (static tokens
    /// included). Real data: the recorded query of position `len` when the data set holds
    /// that token's keys (an `--append` run, which has not appended them all yet), else a
    /// drawn test position after the context (the benchmark split).
    pub fn decode_queries(&self, q_heads: usize, len: usize, rng: &mut StdRng, out: &mut [f32]) {
        let d = self.head_dim;
        if let Some((_, t)) = &self.real_q {
            let pos = if len < self.n {
                len
            } else {
                rng.gen_range(self.n..*t)
            };
            for h in 0..q_heads {
                self.real_query(h, pos, &mut out[h * d..(h + 1) * d]);
            }
            return;
        }
        for h in 0..q_heads {
            self.synth_query(h, len, rng, &mut out[h * d..(h + 1) * d]);
        }
    }

    /// Training queries `[q_heads][positions.len()][d]`: the query at position p looks back at
    /// a position before p.
    pub fn training(&self, q_heads: usize, positions: &[u32], seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (d, n) = (self.head_dim, positions.len());
        let mut out = vec![0f32; q_heads * n * d];
        for h in 0..q_heads {
            for (i, &p) in positions.iter().enumerate() {
                let at = (h * n + i) * d;
                if self.real_query(h, p as usize, &mut out[at..at + d]) {
                    continue;
                }
                self.synth_query(h, p as usize, &mut rng, &mut out[at..at + d]);
            }
        }
        out
    }

    /// The decode benchmark's training and test queries, split per KV head for `kvdex bench
    /// recall --synth-context`: `train` prefill positions per query head spread evenly over the
    /// context (as `kvdex bench decode --train` sends them; positions made relative to the
    /// first non-static token, those inside the sinks dropped, as the daemon does) and `tests`
    /// decode queries per query head (the decode bench's steps, same seeds). Returns per KV
    /// head: per query head of its group, `[tests][d]` test queries and (`[m][d]` training
    /// queries, positions).
    #[allow(clippy::type_complexity)]
    pub fn recall_sets(
        &self,
        q_heads: usize,
        sinks: usize,
        train: usize,
        tests: usize,
        seed: u64,
    ) -> Vec<(Vec<Vec<f32>>, Vec<(Vec<f32>, Vec<u32>)>)> {
        let (n, d) = (self.n, self.head_dim);
        let group = (q_heads / self.kv_heads.max(1)).max(1);
        let positions = train_positions(n, train);
        let vectors = self.training(q_heads, &positions, seed ^ 0x5eed);
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(7));
        let mut per_head: Vec<Vec<f32>> = vec![Vec::with_capacity(tests * d); q_heads];
        let mut q = vec![0f32; q_heads * d];
        for _ in 0..tests {
            self.decode_queries(q_heads, n, &mut rng, &mut q);
            for (h, t) in per_head.iter_mut().enumerate() {
                t.extend_from_slice(&q[h * d..(h + 1) * d]);
            }
        }
        let m = positions.len();
        (0..self.kv_heads)
            .map(|g| {
                let heads = g * group..(g + 1) * group;
                let tests = heads.clone().map(|h| per_head[h].clone()).collect();
                let train = heads
                    .map(|h| {
                        let (mut v, mut p) = (Vec::new(), Vec::new());
                        for (i, &at) in positions.iter().enumerate() {
                            if (at as usize) >= sinks {
                                v.extend_from_slice(&vectors[(h * m + i) * d..(h * m + i + 1) * d]);
                                p.push(at - sinks as u32);
                            }
                        }
                        (v, p)
                    })
                    .collect();
                (tests, train)
            })
            .collect()
    }

    /// Keys or values of KV head `g`, its first `tokens` rows, as a store (the context an
    /// `--append` run has appended so far).
    pub fn rows(&self, values: bool, g: usize, tokens: usize) -> Result<KeySlice<'_>> {
        let len = self.n * self.head_dim;
        let src = if values { &self.v } else { &self.k };
        let from = g * len;
        let to = from + tokens.min(self.n) * self.head_dim;
        KeySlice::new(KeyRows::F16(&src[from..to]), self.head_dim).map_err(KvdexError::from)
    }
}

/// The prefill positions `kvdex bench decode` sends for training: `train` of them, spread
/// evenly over a context of `n` tokens.
pub fn train_positions(n: usize, train: usize) -> Vec<u32> {
    (0..train)
        .map(|i| ((i as f64 + 0.5) * n as f64 / train as f64) as u32)
        .collect()
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
        let end = n.saturating_sub(window).max(sinks);
        // The one definition of the figures, shared with the daemon's online sampler.
        let f = head_figures(&self.logits, ids, (sinks, end), &mut self.sorted);
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
                mass_recall: f.mass_recall,
                mass_covered: f.mass_covered,
            },
            lse,
        ))
    }
}

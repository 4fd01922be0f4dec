//! The generative model behind `kvdex gen-synth` and the synthetic data of `kvdex bench decode`.
//!
//! It reproduces the structure that makes real attention retrieval hard or easy, measured on
//! SmolLM2 keys and queries with `benches/peers/calib.py`:
//! - **RoPE** in the HF rotate_half layout (pairs `i, i + d/2` rotated by `pos · θ^(-2i/d)`), so
//!   a score depends on the relative position `t - p`. Fast (high-frequency) pairs carry little
//!   energy, slow ones carry the means and most of the content, as in the real heads.
//! - **Recency**: a vector `r` in the fast and middle pairs, shared by keys and (scaled per head)
//!   queries: its share of a score is `a·Σ|r_i|² cos(θ_i (t - p))`, peaked at `t = p` with
//!   periodic revivals, which is the recency and periodic structure of real heads.
//! - **Anisotropic low-rank content**: a text process (Zipf tokens with local repetition, plus a
//!   slowly drifting topic) gives each position a latent `x_p` of rank `RANK`; keys carry
//!   `U·diag(σ)·x_p` with decaying σ. A query looks for the content of an earlier position
//!   (recent-biased, heavy-tailed look-back, kept for several positions), through a head-specific
//!   near-identity mixing.
//! - **Out of distribution**: large key and query means at a negative cosine (-0.4 .. -0.8), so
//!   the nearest keys in L2 are not the best by inner product. Real post-RoPE means are large in
//!   middle-frequency pairs too (they do not average out over positions), so the means are added
//!   after the rotation.
//! - **Sinks**: key 0 points along the group's query mean with a per-head strength, from no sink
//!   to one that takes almost all the mass, as across real layers.
//! - Mild log-normal norm tails (p99/p50 about 1.2-1.3 as measured, not heavier).
//!
//! Every head draws its own strengths, so one data set spans a range of difficulty as real layers
//! do; nothing is fitted to a single number.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Rank of the content latent.
pub const RANK: usize = 16;
/// Vocabulary of the token process.
const VOCAB: usize = 4096;
/// Seed offset of the heads' random stream (see [`Model::new`]).
const HEAD_STREAM: u64 = 0x6865_6164_735f_7632;

/// Standard normal sample (Box-Muller).
pub fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn scale_to(v: &mut [f32], norm: f32) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
    v.iter_mut().for_each(|x| *x *= norm / n);
}

/// A random vector whose rotate_half pair `i` (of `d/2`) has variance `w(i / (d/2))`, scaled to
/// `norm`: how energy is spread over RoPE frequencies (0 = fastest pair, 1 = slowest).
fn banded(rng: &mut StdRng, d: usize, norm: f32, w: impl Fn(f32) -> f32) -> Vec<f32> {
    let half = d / 2;
    let mut v = vec![0.0f32; d];
    for i in 0..half {
        let s = w(i as f32 / half as f32).sqrt();
        v[i] = s * normal(rng);
        v[i + half] = s * normal(rng);
    }
    scale_to(&mut v, norm);
    v
}

/// Applies RoPE (rotate_half layout) for position `pos` in place.
pub fn rope(v: &mut [f32], pos: usize, theta: f64) {
    let half = v.len() / 2;
    for i in 0..half {
        let ang = pos as f64 * theta.powf(-2.0 * i as f64 / v.len() as f64);
        let (s, c) = ang.sin_cos();
        let (s, c) = (s as f32, c as f32);
        let (a, b) = (v[i], v[i + half]);
        v[i] = a * c - b * s;
        v[i + half] = a * s + b * c;
    }
}

/// One query head's own strengths.
struct QHead {
    mu_q: Vec<f32>,
    recency: f32,
    content: f32,
    /// `RANK x RANK` near-identity mixing of the content it looks for.
    mix: Vec<f32>,
    /// Probability that the next position keeps the same look-back target.
    stick: f32,
}

/// One KV head: key mean, content basis, recency vector, sink, and its query heads.
struct KvHead {
    mu_k: Vec<f32>,
    /// `d x RANK` content basis, column-major.
    basis: Vec<f32>,
    r: Vec<f32>,
    sink: Vec<f32>,
    q: Vec<QHead>,
}

/// The text shared by all heads: a token and a topic per position, giving the content latent.
pub struct Model {
    d: usize,
    theta: f64,
    q_per_kv: usize,
    heads: Vec<KvHead>,
    /// `[positions][RANK]` content latent of each position.
    latent: Vec<f32>,
    positions: usize,
    key_noise: f32,
    seed: u64,
}

impl Model {
    /// A model for `positions` tokens (context plus any decode positions), `kv_heads` groups of
    /// `q_per_kv` query heads, head dimension `d` (even), RoPE base `theta`.
    pub fn new(
        positions: usize,
        kv_heads: usize,
        q_per_kv: usize,
        d: usize,
        theta: f64,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let scale = (d as f32 / 64.0).sqrt();
        // Token process: Zipf(1.1) draws, a third of them repeating a recent token.
        let zipf_cdf: Vec<f64> = {
            let w: Vec<f64> = (1..=VOCAB).map(|r| (r as f64).powf(-1.1)).collect();
            let tot: f64 = w.iter().sum();
            w.iter()
                .scan(0.0, |acc, x| {
                    *acc += x / tot;
                    Some(*acc)
                })
                .collect()
        };
        let emb: Vec<f32> = (0..VOCAB * RANK).map(|_| normal(&mut rng)).collect();
        let mut latent = vec![0.0f32; positions * RANK];
        let mut topic: Vec<f32> = (0..RANK).map(|_| normal(&mut rng)).collect();
        let mut tokens = vec![0usize; positions];
        for p in 0..positions {
            tokens[p] = if p > 0 && rng.gen::<f32>() < 0.33 {
                tokens[p - 1 - rng.gen_range(0..p.min(64))]
            } else {
                let u: f64 = rng.gen();
                zipf_cdf.partition_point(|&c| c < u).min(VOCAB - 1)
            };
            let jump = rng.gen::<f32>() < 0.002;
            for t in topic.iter_mut() {
                *t = if jump {
                    normal(&mut rng)
                } else {
                    0.995 * *t + 0.0999 * normal(&mut rng)
                };
            }
            let e = &emb[tokens[p] * RANK..(tokens[p] + 1) * RANK];
            let x = &mut latent[p * RANK..(p + 1) * RANK];
            for j in 0..RANK {
                x[j] = 0.8 * e[j] + 0.6 * topic[j];
            }
            // Normalised, as hidden states are after the layer norm.
            scale_to(x, (RANK as f32).sqrt());
        }
        // The heads draw from their own stream, so that a head's strengths depend on the seed
        // alone and not on how many positions the text loop above consumed: contexts of
        // different lengths (the 128K .. 1M scale runs) then share the same heads, and only
        // the length changes between them.
        let mut rng = StdRng::seed_from_u64(seed ^ HEAD_STREAM);
        let mut heads = Vec::with_capacity(kv_heads);
        for _ in 0..kv_heads {
            let jitter: Vec<f32> = (0..d / 2).map(|_| (0.6 * normal(&mut rng)).exp()).collect();
            let jit = |f: f32| jitter[((f * (d / 2) as f32) as usize).min(d / 2 - 1)];
            let lo_share = rng.gen_range(0.6f32..1.0);
            let mean_band = |f: f32| {
                jit(f)
                    * (lo_share * (3.0 * (f - 1.0)).exp()
                        + (1.0 - lo_share) * (-(f - 0.5f32).powi(2) * 20.0).exp())
            };
            let k_norm = 12.0 * scale * rng.gen_range(0.8f32..1.2);
            let mu_k = banded(&mut rng, d, k_norm, mean_band);
            let mut basis = Vec::with_capacity(d * RANK);
            for j in 0..RANK {
                let sigma = (-(j as f32) / 6.0).exp();
                basis.extend(banded(&mut rng, d, 3.0 * scale * sigma, |f| {
                    jit(f) * (0.15 + f)
                }));
            }
            let r = banded(&mut rng, d, 10.0 * scale, |f| {
                jit(f) * (0.05 + (-((f - 0.62) / 0.15).powi(2)).exp())
            });
            // The group's query mean: a negative cosine to the key mean.
            let cos = rng.gen_range(-0.95f32..-0.55);
            let other = banded(&mut rng, d, 1.0, mean_band);
            let unit_k: Vec<f32> = mu_k.iter().map(|x| x / k_norm).collect();
            let mut group_mq: Vec<f32> = unit_k
                .iter()
                .zip(&other)
                .map(|(k, o)| cos * k + (1.0 - cos * cos).sqrt() * o)
                .collect();
            scale_to(&mut group_mq, 11.0 * scale);
            let sink_strength = rng.gen_range(0.1f32..1.4);
            // Key 0: the key mean turned towards the queries by a per-head strength (negative:
            // no sink at all).
            let mut sink = group_mq.clone();
            scale_to(&mut sink, 12.0 * scale * sink_strength);
            sink.iter_mut().zip(&mu_k).for_each(|(s, m)| *s += m);
            let q = (0..q_per_kv)
                .map(|_| {
                    let mut mu_q: Vec<f32> = group_mq
                        .iter()
                        .map(|x| x + 3.0 * scale * normal(&mut rng) / (d as f32).sqrt())
                        .collect();
                    scale_to(&mut mu_q, 11.0 * scale * rng.gen_range(0.8f32..1.2));
                    let mix = (0..RANK * RANK)
                        .map(|i| {
                            f32::from(u8::from(i % (RANK + 1) == 0))
                                + 0.3 * normal(&mut rng) / (RANK as f32).sqrt()
                        })
                        .collect();
                    QHead {
                        mu_q,
                        recency: rng.gen_range(0.1f32..0.8),
                        content: rng.gen_range(1.2f32..3.5),
                        mix,
                        stick: rng.gen_range(0.85f32..0.99),
                    }
                })
                .collect();
            heads.push(KvHead {
                mu_k,
                basis,
                r,
                sink,
                q,
            });
        }
        Self {
            d,
            theta,
            q_per_kv,
            heads,
            latent,
            positions,
            key_noise: 0.5,
            seed,
        }
    }

    /// Positions the model has a text for.
    pub fn positions(&self) -> usize {
        self.positions
    }

    fn content(&self, g: usize, x: &[f32], out: &mut [f32], amp: f32) {
        let b = &self.heads[g].basis;
        for (j, &xj) in x.iter().enumerate() {
            let col = &b[j * self.d..(j + 1) * self.d];
            out.iter_mut()
                .zip(col)
                .for_each(|(o, c)| *o += amp * xj * c);
        }
    }

    /// The post-RoPE key of KV head `g` at position `p` (`p == 0` is the sink).
    pub fn key(&self, g: usize, p: usize, rng: &mut impl Rng, out: &mut [f32]) {
        let h = &self.heads[g];
        if p == 0 {
            out.copy_from_slice(&h.sink);
            return;
        }
        let s = (0.08 * normal(rng)).exp();
        for (o, r) in out.iter_mut().zip(&h.r) {
            *o = r + self.key_noise * normal(rng);
        }
        let x = &self.latent[p * RANK..(p + 1) * RANK];
        self.content(g, x, out, s);
        rope(out, p, self.theta);
        out.iter_mut().zip(&h.mu_k).for_each(|(o, m)| *o += s * m);
    }

    /// The look-back target of a query at position `t` (an earlier position, recent-biased with
    /// a heavy tail): a fresh draw, or `prev` kept with the head's stickiness.
    pub fn target(&self, h: usize, t: usize, prev: Option<usize>, rng: &mut impl Rng) -> usize {
        let qh = &self.heads[h / self.q_per_kv].q[h % self.q_per_kv];
        if let Some(p) = prev {
            if p < t && rng.gen::<f32>() < qh.stick {
                return p;
            }
        }
        let back = (rng.gen::<f32>().powi(4) * t as f32) as usize;
        t.saturating_sub(back.max(1)).max(1).min(t.max(1) - 1)
    }

    /// The post-RoPE query of query head `h` at position `t` looking for the content of position
    /// `target`.
    pub fn query(&self, h: usize, t: usize, target: usize, rng: &mut impl Rng, out: &mut [f32]) {
        let g = h / self.q_per_kv;
        let kv = &self.heads[g];
        let qh = &kv.q[h % self.q_per_kv];
        let s = (0.08 * normal(rng)).exp();
        for (o, r) in out.iter_mut().zip(&kv.r) {
            *o = qh.recency * r + self.key_noise * normal(rng);
        }
        let x = &self.latent[target.min(self.positions - 1) * RANK..][..RANK];
        let mut mixed = [0.0f32; RANK];
        for (i, m) in mixed.iter_mut().enumerate() {
            *m = (0..RANK).map(|j| qh.mix[i * RANK + j] * x[j]).sum();
        }
        self.content(g, &mixed, out, s * qh.content);
        rope(out, t, self.theta);
        out.iter_mut().zip(&qh.mu_q).for_each(|(o, m)| *o += s * m);
    }

    /// Values: a Gaussian row per position (independent of the keys).
    pub fn value(&self, rng: &mut impl Rng, out: &mut [f32]) {
        out.iter_mut().for_each(|x| *x = normal(rng));
    }

    /// A fresh RNG derived from the model's seed and a stream id (for reproducible streams).
    pub fn rng(&self, stream: u64) -> StdRng {
        StdRng::seed_from_u64(self.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// RoPE keeps norms, and a rotated pair's inner product depends only on t - p.
    #[test]
    fn rope_scores_depend_on_relative_position() {
        let mut rng = StdRng::seed_from_u64(7);
        let (q0, k0): (Vec<f32>, Vec<f32>) = (
            (0..64).map(|_| normal(&mut rng)).collect(),
            (0..64).map(|_| normal(&mut rng)).collect(),
        );
        let at = |v: &[f32], pos| {
            let mut w = v.to_vec();
            rope(&mut w, pos, 1e5);
            w
        };
        let (a, b) = (
            dot(&at(&q0, 900), &at(&k0, 100)),
            dot(&at(&q0, 1800), &at(&k0, 1000)),
        );
        assert!((a - b).abs() < 1e-3 * a.abs().max(1.0), "{a} vs {b}");
        let n0 = dot(&q0, &q0);
        assert!((dot(&at(&q0, 12345), &at(&q0, 12345)) - n0).abs() < 1e-3 * n0);
    }

    /// A context's length does not change its heads: the first positions of a longer model
    /// give the same keys and queries (the scale runs compare lengths, not head draws).
    #[test]
    fn heads_do_not_depend_on_the_context_length() {
        let d = 32;
        let (short, long) = (
            Model::new(200, 2, 2, d, 1e5, 9),
            Model::new(5000, 2, 2, d, 1e5, 9),
        );
        for g in 0..2 {
            for p in [0usize, 1, 150] {
                let (mut a, mut b) = (vec![0.0f32; d], vec![0.0f32; d]);
                short.key(g, p, &mut short.rng(3), &mut a);
                long.key(g, p, &mut long.rng(3), &mut b);
                assert_eq!(a, b, "kv head {g}, position {p}");
            }
        }
        for h in 0..4 {
            let (mut a, mut b) = (vec![0.0f32; d], vec![0.0f32; d]);
            short.query(h, 199, 120, &mut short.rng(4), &mut a);
            long.query(h, 199, 120, &mut long.rng(4), &mut b);
            assert_eq!(a, b, "query head {h}");
        }
    }

    /// Queries sit away from the keys (negative cosine of the means), as real ones do, and the
    /// model is deterministic in its seed.
    #[test]
    fn queries_are_out_of_distribution_and_seeded() {
        // As benches/peers/calib.py measures it: mean key of the context, mean of the last
        // queries; the median over several seeds' heads (one head's draw may be mild, as real
        // heads range from -0.80 to -0.39).
        let (n, d) = (1000, 64);
        let mean_cos = |seed: u64| {
            let m = Model::new(n, 1, 2, d, 1e5, seed);
            let mut rng = m.rng(1);
            let (mut mk, mut mq, mut row) = (vec![0.0f32; d], vec![0.0f32; d], vec![0.0f32; d]);
            for p in 1..n {
                m.key(0, p, &mut rng, &mut row);
                mk.iter_mut().zip(&row).for_each(|(a, x)| *a += x);
            }
            for p in n - 200..n {
                let t = m.target(0, p, None, &mut rng);
                assert!(t < p);
                m.query(0, p, t, &mut rng, &mut row);
                mq.iter_mut().zip(&row).for_each(|(a, x)| *a += x);
            }
            dot(&mq, &mk) / (dot(&mq, &mq) * dot(&mk, &mk)).sqrt()
        };
        let mut cos: Vec<f32> = (0..7).map(mean_cos).collect();
        cos.sort_by(f32::total_cmp);
        assert!(
            cos[3] < -0.2,
            "median cos(mean q, mean k) = {} ({cos:?})",
            cos[3]
        );
        assert!(
            cos[6] < 0.0,
            "every head's queries sit away from its keys: {cos:?}"
        );
        let m = Model::new(n, 1, 2, d, 1e5, 3);
        let (mut r1, mut r2) = (m.rng(5), Model::new(n, 1, 2, d, 1e5, 3).rng(5));
        let (mut a, mut b) = (vec![0.0f32; d], vec![0.0f32; d]);
        m.key(0, 17, &mut r1, &mut a);
        Model::new(n, 1, 2, d, 1e5, 3).key(0, 17, &mut r2, &mut b);
        assert_eq!(a, b);
    }
}

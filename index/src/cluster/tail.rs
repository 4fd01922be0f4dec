//! Estimating the attention of the keys a retrieve did not read, from per-cluster statistics.
//!
//! On diffuse attention the keys outside a top-k set hold a large share of the softmax mass, so
//! dropping them biases the output however well the top-k is found. Each cluster keeps its
//! size, its centroid, the per-dimension sum of squared residuals and the sum of its members'
//! values. For a query q at softmax scale s, the unread members of cluster c (size m_c, after
//! taking out the keys attended exactly) contribute an estimated
//!
//! `log mass_c = ln m_c + s·q·centroid_c + ½ s² Σ_j q_j² var_cj`
//!
//! (the second-order term is E[exp] of a Gaussian residual, without which the centroid alone
//! underestimates the mass by Jensen's inequality), with the mean value of those members. The
//! result is an `(out, lse)` pair that the caller merges into the exact part like any other.

use super::ClusterIndex;
use crate::attend::{accum, ValueStore};
use crate::keys::KeyRows;
use crate::simd::Kernels;
use crate::IndexError;

/// Sums of each cluster's members' values (`clusters * value_dim` f32).
#[derive(Clone, Debug)]
pub(crate) struct ValueSums {
    dim: usize,
    sums: Vec<f32>,
    /// Keys `0..covered` have their values summed.
    covered: usize,
}

impl ValueSums {
    pub(crate) fn memory_bytes(&self) -> usize {
        self.sums.capacity() * 4
    }
}

/// The estimate for one query head: the unread keys' log-sum-exp (scaled scores) and, in the
/// caller's `out`, their softmax-weighted mean value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TailEstimate {
    /// log Σ exp(s·q·k) over the unread keys, estimated; -inf when none is left.
    pub lse: f32,
    /// Keys the estimate stands for.
    pub keys: usize,
}

/// Buffers of [`ClusterIndex::estimate_unread`], grown on first use.
#[derive(Debug, Default)]
pub struct TailScratch {
    cscores: Vec<f32>,
    read_count: Vec<u32>,
    read_sums: Vec<f32>,
    touched: Vec<u32>,
    logw: Vec<f32>,
}

impl ClusterIndex {
    /// Adds the values of keys not yet summed (up to [`crate::MipsIndex::len`]) to their
    /// clusters' value sums. Call after the build and after each insert; `values` holds at least
    /// as many rows as the index has keys.
    pub fn absorb_values(&mut self, values: &dyn ValueStore) -> Result<(), IndexError> {
        if values.len() < self.len {
            return Err(IndexError::InvalidArgument(format!(
                "value store of {} rows for an index of {} keys",
                values.len(),
                self.len
            )));
        }
        let dv = values.dim();
        let c = self.members.len();
        let vs = self.values.get_or_insert_with(|| ValueSums {
            dim: dv,
            sums: vec![0.0; c * dv],
            covered: 0,
        });
        if vs.dim != dv {
            return Err(IndexError::DimMismatch {
                expected: vs.dim,
                got: dv,
            });
        }
        for id in vs.covered..self.len {
            let cl = self.assign[id] as usize;
            accum::add_scaled(
                &mut vs.sums[cl * dv..(cl + 1) * dv],
                1.0,
                values.row(id as u32),
            );
        }
        vs.covered = self.len;
        Ok(())
    }

    /// Estimates the attention of every key except `read` (the ids attended exactly, each at
    /// most once) for `query` at softmax `scale`. Writes their estimated mean value to `out`
    /// (value dim long) and returns their estimated log-sum-exp. `variance` adds the
    /// second-order term of the residuals (see the module documentation). Errors when no
    /// values were absorbed, or on a shape mismatch.
    #[allow(clippy::too_many_arguments)]
    pub fn estimate_unread(
        &self,
        query: &[f32],
        scale: f32,
        read: &[u32],
        values: &dyn ValueStore,
        variance: bool,
        s: &mut TailScratch,
        out: &mut [f32],
    ) -> Result<TailEstimate, IndexError> {
        let (d, c) = (self.dim, self.members.len());
        let Some(vs) = self.values.as_ref().filter(|v| v.covered == self.len) else {
            return Err(IndexError::InvalidArgument(
                "tail estimate needs the values of every key (absorb_values)".into(),
            ));
        };
        let dv = vs.dim;
        if query.len() != d || out.len() != dv {
            return Err(IndexError::BadShape(format!(
                "query {} (dim {d}), out {} (value dim {dv})",
                query.len(),
                out.len()
            )));
        }
        s.cscores.resize(c, 0.0);
        Kernels::best().block(query, KeyRows::F32(&self.cents), d, 0, &mut s.cscores);
        // Counts and value sums of the exactly attended keys, per cluster.
        s.read_count.clear();
        s.read_count.resize(c, 0);
        s.read_sums.resize(c * dv, 0.0);
        s.touched.clear();
        for &id in read {
            let Some(&cl) = self.assign.get(id as usize) else {
                continue;
            };
            let cl = cl as usize;
            if s.read_count[cl] == 0 {
                s.touched.push(cl as u32);
                s.read_sums[cl * dv..(cl + 1) * dv].fill(0.0);
            }
            s.read_count[cl] += 1;
            accum::add_scaled(
                &mut s.read_sums[cl * dv..(cl + 1) * dv],
                1.0,
                values.row(id),
            );
        }
        // Log-weights of each cluster's unread members.
        s.logw.clear();
        let mut mx = f32::NEG_INFINITY;
        let mut keys = 0usize;
        for (cl, m) in self.members.iter().enumerate() {
            let left = m.ids.len().saturating_sub(s.read_count[cl] as usize);
            let mut lw = f32::NEG_INFINITY;
            if left > 0 {
                keys += left;
                lw = (left as f32).ln() + scale * s.cscores[cl];
                if variance {
                    let sq = &self.sq_residual[cl * d..(cl + 1) * d];
                    let v: f32 = query.iter().zip(sq).map(|(q, x)| q * q * x).sum();
                    lw += 0.5 * scale * scale * v / m.ids.len() as f32;
                }
            }
            mx = mx.max(lw);
            s.logw.push(lw);
        }
        out.fill(0.0);
        if keys == 0 || !mx.is_finite() {
            return Ok(TailEstimate {
                lse: f32::NEG_INFINITY,
                keys: 0,
            });
        }
        let mut total = 0.0f64;
        for (cl, &lw) in s.logw.iter().enumerate() {
            if lw == f32::NEG_INFINITY {
                continue;
            }
            let w = (lw - mx).exp();
            total += w as f64;
            let left = self.members[cl].ids.len() - s.read_count[cl] as usize;
            let per = w / left as f32;
            let sum = &vs.sums[cl * dv..(cl + 1) * dv];
            if s.read_count[cl] == 0 {
                out.iter_mut().zip(sum).for_each(|(o, &x)| *o += per * x);
            } else {
                let sub = &s.read_sums[cl * dv..(cl + 1) * dv];
                for ((o, &x), &y) in out.iter_mut().zip(sum).zip(sub) {
                    *o += per * (x - y);
                }
            }
        }
        let inv = (1.0 / total) as f32;
        out.iter_mut().for_each(|o| *o *= inv);
        Ok(TailEstimate {
            lse: mx + (total as f32).ln(),
            keys,
        })
    }
}

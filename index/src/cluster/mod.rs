//! The cluster index: keys grouped by k-means, each cluster's members stored contiguously as
//! quantized residual codes, searched by scoring the centroids for the whole GQA group, reading
//! the best clusters' codes in order until a budget of rows, and re-ranking the best candidates
//! exactly on the keys' own rows (RetroInfer's wave index, IVF with residual codes).
//!
//! # Layout
//! - [`kmeans`]: Lloyd on an even sample, then the assignment of every key.
//! - [`codes`]: the 8-bit / 4-bit residual codes and their block decoder.
//! - [`search`]: the group search (centroids, cluster order, code scan, exact re-rank).
//! - [`tail`]: per-cluster statistics (size, residual variance, value sums) and the estimate of
//!   the attention mass and value contribution of the keys a search did not return.
//!
//! A build costs a few passes of every key against every centroid (no neighbour lists), which
//! is what makes it ready seconds after a seal. Inserts join their nearest cluster at once;
//! [`ClusterIndex::drift`] tells the daemon when a re-cluster (a fresh build) is worth it.

pub mod codes;
pub mod kmeans;
pub mod search;
pub mod tail;

pub use codes::CodeBits;
pub use search::ClusterScratch;
pub use tail::TailEstimate;

use crate::{check_group_shape, Hits, IndexError, KeyStore, MipsIndex, MipsIndexMut};
use crate::{SearchScratch, SearchStats};

/// Build and search parameters of the cluster index.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterParams {
    /// Mean keys per cluster: the cluster count is `len / rows_per_cluster` (at least 1).
    pub rows_per_cluster: usize,
    /// k-means sample: this many keys per cluster (evenly spread over the context).
    pub sample_per_cluster: usize,
    /// Lloyd iterations on the sample.
    pub iters: usize,
    /// Keys clustered together: each segment of the context gets its own clusters (build
    /// work linear in the context), and inserts join the last segment's clusters.
    pub segment: usize,
    /// Code width.
    pub bits: CodeBits,
    /// Search budget: the fraction of the keys whose codes a search scores (whole clusters, in
    /// centroid order, at least `k` keys).
    pub probe_fraction: f32,
    /// Candidates re-ranked exactly per query head, as a multiple of `k`.
    pub rerank: f32,
    /// Cluster order: a cluster ranks by `q·centroid + spread · σ(q)`, σ(q) the standard
    /// deviation of `q·residual` over its members (from the per-dimension residual variance),
    /// an optimistic estimate of its best member's score rather than of its average.
    pub spread: f32,
}

impl Default for ClusterParams {
    fn default() -> Self {
        Self {
            rows_per_cluster: 32,
            sample_per_cluster: 16,
            iters: 4,
            segment: 8192,
            bits: CodeBits::Four,
            probe_fraction: 0.05,
            rerank: 2.0,
            spread: 0.0,
        }
    }
}

/// One cluster's members, stored contiguously.
#[derive(Clone, Debug, Default)]
pub(crate) struct Members {
    /// Key ids, in insertion order.
    pub(crate) ids: Vec<u32>,
    /// Residual codes, `row_bytes` per member.
    pub(crate) codes: Vec<u8>,
    /// One scale per member.
    pub(crate) scales: Vec<f32>,
}

/// How far inserts have moved the index from its build (see [`ClusterIndex::drift`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Drift {
    /// Keys inserted since the build.
    pub inserted: usize,
    /// Mean squared distance of inserted keys to their centroid over that of the built keys
    /// (1.0 = the inserts fit the clusters as well as the build did).
    pub distance_ratio: f32,
    /// Largest cluster over the mean cluster size.
    pub imbalance: f32,
}

/// The cluster index. See the module documentation.
#[derive(Clone, Debug)]
pub struct ClusterIndex {
    params: ClusterParams,
    dim: usize,
    len: usize,
    /// `clusters * dim` f32 centroids, the origin of each member's residual code.
    cents: Vec<f32>,
    /// The same in f16, what a search scores (half the bytes; re-rank is exact anyway).
    pub(crate) cents_f16: Vec<half::f16>,
    members: Vec<Members>,
    /// Cluster of every key id.
    assign: Vec<u32>,
    /// Inserts join clusters `insert_from..`: the last segment's.
    insert_from: usize,
    /// Sums over each cluster's members of the squared residual, per dimension (`clusters * dim`).
    sq_residual: Vec<f32>,
    /// The same over the cluster's size: the per-dimension residual variance.
    pub(crate) var: Vec<f32>,
    built_len: usize,
    built_dist: f64,
    inserted_dist: f64,
    values: Option<tail::ValueSums>,
}

impl ClusterIndex {
    /// Builds over every key of `keys`.
    pub fn build(keys: &dyn KeyStore, params: &ClusterParams) -> Result<Self, IndexError> {
        let (n, d) = (keys.len(), keys.dim());
        if params.rows_per_cluster == 0 || params.segment == 0 || params.iters > 1000 {
            return Err(IndexError::InvalidArgument(format!(
                "cluster params: rows_per_cluster {} and segment {} must be > 0, iters {} <= 1000",
                params.rows_per_cluster, params.segment, params.iters
            )));
        }
        if !(params.probe_fraction > 0.0
            && params.probe_fraction <= 1.0
            && params.rerank >= 1.0
            && params.spread >= 0.0)
        {
            return Err(IndexError::InvalidArgument(format!(
                "cluster params: probe_fraction {} must be in (0, 1], rerank {} >= 1, spread {} >= 0",
                params.probe_fraction, params.rerank, params.spread
            )));
        }
        if keys.dim() == 0 {
            return Err(IndexError::BadShape("keys of dim 0".into()));
        }
        let seg = kmeans::segmented(
            keys,
            n,
            params.segment,
            params.rows_per_cluster,
            params.sample_per_cluster,
            params.iters,
        );
        let cents = seg.cents;
        let c = cents.len() / d;
        let mut idx = Self {
            params: params.clone(),
            dim: d,
            len: 0,
            members: vec![Members::default(); c],
            sq_residual: vec![0.0; c * d],
            var: vec![0.0; c * d],
            cents_f16: cents.iter().map(|&x| half::f16::from_f32(x)).collect(),
            cents,
            assign: Vec::with_capacity(n),
            insert_from: seg.last_first,
            built_len: 0,
            built_dist: 0.0,
            inserted_dist: 0.0,
            values: None,
        };
        idx.append(keys, n, Some((seg.assign, &seg.dist)))?;
        let dist = seg.dist.iter().map(|&x| x as f64).sum();
        for m in idx.members.iter_mut() {
            m.ids.shrink_to_fit();
            m.codes.shrink_to_fit();
            m.scales.shrink_to_fit();
        }
        idx.built_len = n;
        idx.built_dist = dist;
        Ok(idx)
    }

    /// The parameters in use.
    pub fn params(&self) -> &ClusterParams {
        &self.params
    }

    /// Sets the search budget (fraction of keys whose codes are scored).
    pub fn set_probe_fraction(&mut self, f: f32) {
        self.params.probe_fraction = f.clamp(1e-6, 1.0);
    }

    /// Sets the cluster-order spread (see [`ClusterParams::spread`]).
    pub fn set_spread(&mut self, z: f32) {
        self.params.spread = z.max(0.0);
    }

    /// Sets the exact re-rank width, a multiple of `k` (at least 1).
    pub fn set_rerank(&mut self, r: f32) {
        self.params.rerank = r.max(1.0);
    }

    /// Number of clusters.
    pub fn clusters(&self) -> usize {
        self.members.len()
    }

    /// Cluster sizes, in cluster order.
    pub fn sizes(&self) -> impl Iterator<Item = usize> + '_ {
        self.members.iter().map(|m| m.ids.len())
    }

    /// How far inserts have moved the clusters: the daemon re-clusters (builds afresh, off the
    /// request path) when the distance ratio or the imbalance grows.
    pub fn drift(&self) -> Drift {
        let c = self.members.len().max(1);
        let mean = self.len as f32 / c as f32;
        let big = self.sizes().max().unwrap_or(0) as f32;
        let ins = self.len - self.built_len;
        let per_built = self.built_dist / self.built_len.max(1) as f64;
        let per_ins = self.inserted_dist / ins.max(1) as f64;
        Drift {
            inserted: ins,
            distance_ratio: if ins == 0 || per_built == 0.0 {
                1.0
            } else {
                (per_ins / per_built) as f32
            },
            imbalance: if mean > 0.0 { big / mean } else { 0.0 },
        }
    }

    /// Assigns keys `self.len..n` (unless `given`, their clusters and squared distances),
    /// encodes their residuals and appends them to their clusters. Returns the sum of their
    /// squared distances to their centroids.
    fn append(
        &mut self,
        keys: &dyn KeyStore,
        n: usize,
        given: Option<(Vec<u32>, &[f32])>,
    ) -> Result<f64, IndexError> {
        let d = self.dim;
        if keys.dim() != d {
            return Err(IndexError::DimMismatch {
                expected: d,
                got: keys.dim(),
            });
        }
        if n < self.len || keys.len() < n {
            return Err(IndexError::InvalidArgument(format!(
                "insert: store of {} keys does not extend the index's {}",
                keys.len(),
                self.len
            )));
        }
        let start = self.len;
        let (a, dist) = match given {
            Some((a, dist)) => (a, dist.iter().map(|&x| x as f64).sum()),
            None => {
                let mut a = vec![0u32; n - start];
                let mut dist = vec![0.0f32; n - start];
                let first = self.insert_from;
                let c = self.members.len() - first;
                let cents = &self.cents[first * d..];
                kmeans::assign_range(keys, cents, c, start, &mut a, Some(&mut dist));
                a.iter_mut().for_each(|x| *x += first as u32);
                (a, dist.iter().map(|&x| x as f64).sum())
            }
        };
        let bits = self.params.bits;
        let rb = bits.row_bytes(d);
        let (mut row, mut res) = (vec![0.0f32; d], vec![0.0f32; d]);
        let mut code = vec![0u8; rb];
        for (i, &cl) in a.iter().enumerate() {
            let id = start + i;
            keys.row_f32(id as u32, &mut row);
            crate::error::check_finite("key", &row)?;
            let cl = cl as usize;
            let cent = &self.cents[cl * d..(cl + 1) * d];
            let sq = &mut self.sq_residual[cl * d..(cl + 1) * d];
            for j in 0..d {
                res[j] = row[j] - cent[j];
                sq[j] += res[j] * res[j];
            }
            let s = bits.encode(&res, &mut code);
            let m = &mut self.members[cl];
            m.ids.push(id as u32);
            m.codes.extend_from_slice(&code);
            m.scales.push(s);
        }
        self.assign.extend_from_slice(&a);
        let mut touched: Vec<u32> = a;
        touched.sort_unstable();
        touched.dedup();
        for cl in touched {
            let cl = cl as usize;
            let inv = 1.0 / self.members[cl].ids.len().max(1) as f32;
            for j in cl * d..(cl + 1) * d {
                self.var[j] = self.sq_residual[j] * inv;
            }
        }
        self.len = n;
        Ok(dist)
    }
}

impl MipsIndex for ClusterIndex {
    fn name(&self) -> &'static str {
        "cluster"
    }

    fn search(
        &self,
        keys: &dyn KeyStore,
        query: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        out: &mut Hits,
    ) -> Result<SearchStats, IndexError> {
        crate::keys::check_query_dim(keys, query)?;
        self.search_group(keys, query, k, scratch, std::slice::from_mut(out))
    }

    fn search_group(
        &self,
        keys: &dyn KeyStore,
        queries: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        outs: &mut [Hits],
    ) -> Result<SearchStats, IndexError> {
        check_group_shape(keys, queries, outs.len())?;
        if keys.dim() != self.dim {
            return Err(IndexError::DimMismatch {
                expected: self.dim,
                got: keys.dim(),
            });
        }
        Ok(search::search_group(
            self,
            keys,
            queries,
            k,
            &mut scratch.cluster,
            outs,
        ))
    }

    fn len(&self) -> usize {
        self.len
    }

    fn memory_bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let m: usize = self
            .members
            .iter()
            .map(|m| m.ids.capacity() * 4 + m.codes.capacity() + m.scales.capacity() * f)
            .sum();
        m + (self.cents.capacity() + self.sq_residual.capacity() + self.var.capacity()) * f
            + self.cents_f16.capacity() * 2
            + self.assign.capacity() * 4
            + self.values.as_ref().map_or(0, |v| v.memory_bytes())
    }
}

impl MipsIndexMut for ClusterIndex {
    fn insert(&mut self, keys: &dyn KeyStore) -> Result<(), IndexError> {
        let dist = self.append(keys, keys.len(), None)?;
        self.inserted_dist += dist;
        Ok(())
    }

    fn try_clone_box(&self) -> Option<Box<dyn MipsIndexMut>> {
        Some(Box::new(self.clone()))
    }
}

#[cfg(test)]
mod tests;

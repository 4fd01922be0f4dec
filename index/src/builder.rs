//! The one entry point the daemon and the benchmarks build indices through: pick an
//! [`IndexKind`], fill [`IndexParams`], supply the [`TrainingSignal`] the engine has, and get a
//! `Box<dyn MipsIndexMut>`.

use crate::cluster::{ClusterIndex, ClusterParams};
#[cfg(feature = "hnsw")]
use crate::hnsw::HnswIndex;
use crate::qgraph::{build::build as build_graph, GraphParams};
use crate::{FlatIndex, IndexError, KeyStore, MipsIndexMut};

/// Which backend to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexKind {
    /// Exact scan.
    Flat,
    /// hnsw_rs with the MIPS → L2 reduction.
    Hnsw,
    /// The query-guided graph (RoarGraph / RetrievalAttention).
    Graph,
    /// k-means clusters of quantized residual codes with exact re-rank ([`crate::cluster`]).
    Cluster,
}

impl IndexKind {
    /// Every kind, in the order of their wire codes.
    pub const ALL: [IndexKind; 4] = [Self::Flat, Self::Hnsw, Self::Graph, Self::Cluster];

    /// The stable name [`IndexKind::parse`] accepts.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Flat => "flat",
            Self::Hnsw => "hnsw",
            Self::Graph => "graph",
            Self::Cluster => "cluster",
        }
    }

    /// Parses "flat", "hnsw", "graph" or "cluster".
    pub fn parse(s: &str) -> Result<Self, IndexError> {
        match s {
            "flat" => Ok(Self::Flat),
            "hnsw" => Ok(Self::Hnsw),
            "graph" | "qgraph" => Ok(Self::Graph),
            "cluster" => Ok(Self::Cluster),
            other => Err(IndexError::InvalidArgument(format!(
                "unknown index kind {other:?} (expected flat, hnsw, graph or cluster)"
            ))),
        }
    }
}

/// Parameters of every backend; each kind reads its own part.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IndexParams {
    /// For [`IndexKind::Hnsw`].
    pub hnsw: HnswParams,
    /// For [`IndexKind::Graph`].
    pub graph: GraphParams,
    /// For [`IndexKind::Cluster`].
    pub cluster: ClusterParams,
}

/// What the engine knows about the queries that will search the index.
#[derive(Clone, Copy, Debug)]
pub enum TrainingSignal<'a> {
    /// Nothing: the graph falls back to a key-only graph.
    None,
    /// Prefill queries, `vectors` holding `positions.len()` rows of `dim` floats. They are
    /// causal: the query at position p saw keys `0..=p` only.
    Queries {
        /// Row-major query vectors.
        vectors: &'a [f32],
        /// Token position of each query.
        positions: &'a [u32],
    },
    /// Each training query's top key ids, best first, as the engine computed them on the GPU
    /// during prefill.
    Neighbours(&'a [Vec<u32>]),
}

/// Builds an index of `kind` over all keys of `keys`.
pub fn build_index(
    kind: IndexKind,
    keys: &dyn KeyStore,
    training: &TrainingSignal<'_>,
    params: &IndexParams,
) -> Result<Box<dyn MipsIndexMut>, IndexError> {
    Ok(match kind {
        IndexKind::Flat => Box::new(FlatIndex::new(keys.len())),
        #[cfg(feature = "hnsw")]
        IndexKind::Hnsw => Box::new(HnswIndex::build(keys, &params.hnsw)?),
        #[cfg(not(feature = "hnsw"))]
        IndexKind::Hnsw => {
            return Err(IndexError::InvalidArgument(
                "index kind hnsw: this build of kvdex-index has no `hnsw` feature".into(),
            ))
        }
        IndexKind::Graph => Box::new(build_graph(keys, training, &params.graph)?),
        IndexKind::Cluster => Box::new(ClusterIndex::build(keys, &params.cluster)?),
    })
}

/// Parameters of the HNSW baseline. Plain fields, so configuration layers can mirror them.
#[derive(Clone, Debug, PartialEq)]
pub struct HnswParams {
    /// M: links per node per layer (hnsw_rs caps it at 256).
    pub m: usize,
    /// ef_construction: beam width while inserting.
    pub ef_construction: usize,
    /// ef_search: beam width of a search (raised to k when smaller).
    pub ef_search: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 32,
            ef_construction: 200,
            ef_search: 200,
        }
    }
}

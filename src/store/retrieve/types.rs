//! The types of a retrieve: what it computes, where it writes, what it reports, and the
//! scratch it reuses.

use kvdex_index::attend::{AttendScratch, SlimScratch};
use kvdex_index::{Hits, SearchScratch, TopK};
use kvdex_transfer::{DestId, Run, Ticket};

/// Where a retrieve writes, all caller-owned (the response space of the shared-memory arena).
/// `stride` is the candidate count per head the caller sized them for.
pub struct RetrieveOut<'a> {
    /// `[q_heads]`: tokens chosen per head (a prefix of its candidates).
    pub k: &'a mut [u32],
    /// `[q_heads]`: estimated mass covered by static tokens + chosen ones (adaptive), else 0.
    pub coverage: &'a mut [f32],
    /// `[q_heads][stride]` token ids, best first.
    pub ids: &'a mut [u32],
    /// `[q_heads][stride]` raw inner products.
    pub scores: &'a mut [f32],
    /// `[q_heads][head_dim]` partial attention (when asked).
    pub out: &'a mut [f32],
    /// `[q_heads]` its log-sum-exp (when asked).
    pub lse: &'a mut [f32],
    /// `[q_heads][2][stride][row_bytes]`: K rows then V rows of the chosen ids (when asked).
    pub rows: &'a mut [u8],
    /// `rows` as a destination registered with the session's link ([`Session::link`]), so
    /// that the gather goes through [`DeviceLink::gather`] (the CUDA backend's path too);
    /// `None` copies with the CPU.
    pub rows_dest: Option<RowsDest>,
}

/// Where `rows` lies in a registered destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowsDest {
    /// The destination (registered with the session's link).
    pub id: DestId,
    /// Byte offset of `rows[0]` in it.
    pub offset: u64,
    /// The destination is the engine's own buffer ([`Session::register_cuda_dest`]), not
    /// `rows`: `rows` may then be empty, and a batch the link cannot gather is an error
    /// rather than a CPU copy into `rows`.
    pub engine: bool,
}

/// Server-side timings and counters of one retrieve.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RetrieveStats {
    /// Candidates per head (the response's row stride).
    pub stride: usize,
    /// Keys scored by the searches, all heads.
    pub scored: u64,
    /// Microseconds searching. Heads are searched and attended in one parallel pass, whose
    /// wall time is split between this and `attend_us` in proportion to the heads' own time
    /// in each step.
    pub search_us: f64,
    /// Microseconds choosing budgets and attending (see `search_us`).
    pub attend_us: f64,
    /// Microseconds copying results and rows out.
    pub copy_us: f64,
    /// Microseconds the slowest query head spent in the parallel pass (its search, budget and
    /// attention). The pass's wall time less this is what spreading the heads over cores
    /// costs (hand-offs to the pool, waiting for a busy core), which is how an operator tells
    /// a slow search from a slow pool.
    pub slowest_head_us: f64,
    /// KV heads answered by an exact scan because they had no index: the layer was never
    /// sealed, or its build has not installed that head's index yet (the daemon counts these
    /// retrieves as exact fallbacks).
    pub exact_heads: u32,
}

/// One query head's reusable buffers.
#[derive(Default)]
pub(super) struct HeadScratch {
    pub(super) search: SearchScratch,
    pub(super) hits: Hits,
    pub(super) pending: Hits,
    pub(super) merge: TopK,
    pub(super) attend: AttendScratch,
    pub(super) sample: Vec<u32>,
    pub(super) logits: Vec<f32>,
    pub(super) out: Vec<f32>,
    /// Slim mode: the chosen rows' recomputed values, `[k][head_dim]` f32.
    pub(super) values: Vec<f32>,
    pub(super) slim: SlimScratch,
    pub(super) lse: f32,
    pub(super) k: usize,
    pub(super) coverage: f32,
    pub(super) scored: usize,
    pub(super) searched: bool,
    /// Seconds this head spent in its search, then in its budget and attention.
    pub(super) search_s: f64,
    pub(super) attend_s: f64,
}

/// Per-connection scratch of [`Session::retrieve`]; grows on first use, then is reused.
#[derive(Default)]
pub struct RetrieveScratch {
    pub(super) heads: Vec<HeadScratch>,
    pub(super) group: Vec<Hits>,
    /// The queries of one exact scan (a GQA group's heads for a run of positions).
    pub(super) queries: Vec<f32>,
    pub(super) flat: SearchScratch,
    pub(super) runs: Vec<Run>,
    pub(super) tickets: Vec<Ticket>,
}

impl RetrieveScratch {
    /// An empty scratch.
    pub fn new() -> Self {
        Self::default()
    }
}

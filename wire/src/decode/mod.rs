//! Bodies of the decode-path requests (little-endian, like [`crate::proto`]).
//!
//! | op       | request body | response body |
//! |----------|--------------|---------------|
//! | seal     | layer u32, kind u32 (0 flat, 1 hnsw, 2 graph), n u32, signal u32, then by signal: 0 (queries): positions u32 `[n]`, queries f32 `[q_heads][n][head_dim]`, after any staged by parts; 1 (neighbour lists): query head u32 `[n]`, length u32 `[n]`, token ids u32 `[sum of lengths]` | tokens indexed per KV head, u64 |
//! | seal part (signal 2) | layer u32, start u32 (positions staged before it; 0 begins a new set), n u32, 2 u32, positions u32 `[n]`, queries f32 `[q_heads][n][head_dim]` | positions staged so far, u64 |
//! | retrieve | layer u32, flags u32, k u32, min_k u32, max_k u32, coverage f32, scale f32, positions u32 (0 without [`POSITIONS`]), query f32 `[q_heads][head_dim]`; with [`POSITIONS`]: limits u32 `[P]`, then query f32 `[P][q_heads][head_dim]` | see [`RetrieveLayout`] |
//!
//! | register_dest, unregister_dest | see [`dest`] | see [`dest`] |
//! | set_wkv  | layer u32, row_start u32, rows u32, 0 u32, `W_KV` rows f32 `[rows][D]` (`D = kv_heads x head_dim`) | rows received so far, u64 |
//!
//! A training set too large for the arena goes as parts ([`SIGNAL_QUERIES_PART`], op `seal`),
//! then a seal with signal 0 and the last positions (n may be 0): the daemon keeps the parts
//! for the layer (at most `decode.seal_max_staged_queries` positions, charged to the memory
//! budget) and the seal trains on the parts' queries, in order, followed by its own. Any seal
//! of the layer releases them; a refused part, a neighbour-list seal or the session's end
//! discards them.
//!
//! Retrieve flags: [`ATTEND`], [`GATHER`], [`ADAPTIVE`] (budget `coverage` within
//! `min_k..=max_k`; otherwise exactly `k`), [`SCALE`] (the `scale` field is the softmax scale,
//! finite and positive; without the flag the daemon uses `1/sqrt(head_dim)` and the field must be
//! 0). Every value has its own encoding, so none stands for "default": an explicit scale of 0 or
//! NaN is refused by name rather than read as "no scale", and a budget that does not fit a u32 is
//! refused by the encoder rather than truncated. (Protocol version 2, see
//! [`crate::shm::layout::VERSION`]; version 1 had no [`SCALE`] flag and sent 0 for "default".)

use kvdex_index::IndexKind;

/// Retrieve flag: compute the partial attention `(out, lse)`.
pub const ATTEND: u32 = 1;
/// Retrieve flag: copy the chosen K/V rows into the response.
pub const GATHER: u32 = 2;
/// Retrieve flag: adaptive budget.
pub const ADAPTIVE: u32 = 4;
/// Retrieve flag: the `scale` field holds the softmax scale (otherwise `1/sqrt(head_dim)`).
pub const SCALE: u32 = 8;
/// Retrieve flag (with [`GATHER`]): write the rows into a registered engine destination
/// instead of the response ([`dest`]); the response then has no rows section, and its
/// header's flags carry `ENGINE_ROWS` instead of `GATHER`.
pub const ENGINE_ROWS: u32 = 16;

/// Retrieve flag: several query positions of the sequence in one request (chunked prefill,
/// speculative decoding). Header word 7 is then `P` (at least 1), the body carries each
/// position's visibility limit (`limits u32 [P]`, [`crate::params::NO_LIMIT`] for
/// none: position `p` sees tokens `< limits[p]`) before the queries `[P][q_heads][head_dim]`,
/// and every response section gains a leading `P` axis (the response header's word 5 is `P`).
/// Without the flag word 7 must be 0 and the response is laid out for one position, as
/// before: a daemon without the flag refuses it as an unknown flag, so the protocol version
/// stays 2.
pub const POSITIONS: u32 = 32;

/// Bytes of the seal request header.
pub const SEAL_HEADER: usize = 16;
/// Bytes of the retrieve request header.
pub const RETRIEVE_HEADER: usize = 32;
/// Bytes of the retrieve response header.
pub const RESPONSE_HEADER: usize = 48;
/// Bytes of the set_wkv request header.
pub const SET_WKV_HEADER: usize = 16;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn f32_at(b: &[u8], at: usize) -> Option<f32> {
    u32_at(b, at).map(f32::from_bits)
}

/// The wire code of an index kind.
pub fn kind_code(kind: IndexKind) -> u32 {
    match kind {
        IndexKind::Flat => 0,
        IndexKind::Hnsw => 1,
        IndexKind::Graph => 2,
        IndexKind::Cluster => 3,
    }
}

/// Seal signal code: sampled prefill queries with their positions.
pub const SIGNAL_QUERIES: u32 = 0;
/// Seal signal code: neighbour lists the engine computed.
pub const SIGNAL_NEIGHBOURS: u32 = 1;
/// Seal-op signal code: a part of the training queries, staged for the layer's next seal
/// (no build starts); word 1 is `start`, the positions staged before it, not an index kind.
pub const SIGNAL_QUERIES_PART: u32 = 2;

pub mod dest;
mod retrieve;
mod seal;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_seal;

pub use dest::{EngineRows, RegisterDest};
pub use retrieve::{split_limits, ResponseHeader, RetrieveHeader, RetrieveLayout, MAX_POSITIONS};
pub use seal::{QueriesPart, SealBody, SealHeader, SealRequest, SetWkvHeader, TrainingSlice};

//! The report: a table row (or a JSON line) per (context, method).

use std::io::Write;

use kvdex::error::{KvdexError, Result};

/// One method's figures (the JSON fields, exactly).
#[derive(Debug, serde::Serialize)]
pub(super) struct Row {
    pub(super) context: usize,
    pub(super) method: String,
    /// The session's storage format (`--kv-format`; JSON only).
    pub(super) kv_format: String,
    pub(super) layers: u32,
    pub(super) q_heads: u32,
    pub(super) kv_heads: u32,
    pub(super) layer_p50_ms: f64,
    pub(super) layer_p99_ms: f64,
    pub(super) search_ms: f64,
    pub(super) attn_ms: f64,
    pub(super) copy_ms: f64,
    /// The slowest query head's search, budget and attention, the median over requests: with
    /// `search_ms + attn_ms`, the pass's wall time, it shows what spreading the heads over
    /// cores costs (JSON only).
    pub(super) slowest_head_ms: f64,
    pub(super) k_mean: f64,
    /// Key rows the daemon's searches read per query head per layer request (its `scored`
    /// over q_heads), the median over steps: the search's cost in a unit no machine changes.
    /// A GQA-batched flat scan reads each row once for its whole group, so flat shows the
    /// non-static tokens / (q_heads / kv_heads).
    pub(super) scored_per_head: f64,
    pub(super) mass_recall: f64,
    pub(super) mass_covered: f64,
    pub(super) out_rel_err: f64,
    /// `--sample-rate`: the daemon's sampled mass recall over this method's steps, and the
    /// sampled requests it scored (JSON only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) sampled_mass_recall: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) sampled_requests: Option<u64>,
    /// `--sample-rate`: the daemon's mean milliseconds scoring one sample (JSON only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) sample_score_ms: Option<f64>,
    /// `--sample-rate`: the p50 of the unsampled twin session, timed alternately with this
    /// one (JSON only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) unsampled_p50_ms: Option<f64>,
}

/// Prints the table header.
pub(super) fn print_header() {
    println!(
        "{:>8} {:>6} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9}",
        "context",
        "method",
        "layers",
        "p50 ms",
        "p99 ms",
        "search",
        "attn",
        "copy",
        "k_mean",
        "scored",
        "recall",
        "covered",
        "rel_err"
    );
}

/// Prints one row, as JSON or as a table line, and flushes it out at once.
pub(super) fn print_row(row: &Row, json: bool) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string(&row).map_err(|e| KvdexError::Protocol(e.to_string()))?
        );
    } else {
        println!(
            "{:>8} {:>6} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>8.3} {:>8.3} {:>7.1} {:>8.0} {:>8.4} {:>8.4} {:>9.2e}",
            row.context, row.method, row.layers, row.layer_p50_ms, row.layer_p99_ms, row.search_ms,
            row.attn_ms, row.copy_ms, row.k_mean, row.scored_per_head, row.mass_recall,
            row.mass_covered, row.out_rel_err
        );
    }
    std::io::stdout().flush()?;
    Ok(())
}

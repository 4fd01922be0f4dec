//! The report: one JSON object per (method, setting), or a table with recall, mass, scored
//! fraction, speed and memory.

use super::measure::Agg;

/// Prints every row, as JSON lines or as a table.
pub(super) fn print_results(aggs: &[Vec<Agg>], json: bool) {
    if json {
        for agg in aggs.iter().flatten() {
            println!("{}", agg.json());
        }
        return;
    }
    println!(
        "{:<13} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>8} {:>10} {:>7}",
        "method",
        "effort",
        "recall",
        "p10",
        "massrec",
        "masscov",
        "scored%",
        "bytes%",
        "qps",
        "build_s",
        "mem_bytes",
        "mem/KV"
    );
    for agg in aggs.iter().flatten() {
        let j = agg.json();
        let effort = j["params"]
            .get("L")
            .or(j["params"].get("ef"))
            .or(j["params"].get("probe"))
            .cloned()
            .unwrap_or_default();
        println!(
            "{:<13} {:>6} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.2} {:>7.2} {:>9.0} {:>8.2} {:>10} {:>6.1}%",
            agg.method,
            effort.to_string(),
            j["recall_at_k"].as_f64().unwrap_or(0.0),
            j["recall_p10"].as_f64().unwrap_or(0.0),
            j["mass_recall"].as_f64().unwrap_or(0.0),
            j["mass_covered"].as_f64().unwrap_or(0.0),
            100.0 * j["scored_fraction"].as_f64().unwrap_or(0.0),
            100.0 * j["bytes_fraction"].as_f64().unwrap_or(0.0),
            j["qps"].as_f64().unwrap_or(0.0),
            agg.build_s,
            agg.memory_bytes,
            100.0 * agg.memory_bytes as f64 / agg.kv_bytes.max(1) as f64,
        );
    }
}

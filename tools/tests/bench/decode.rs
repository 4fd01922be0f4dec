//! `kvdex bench decode` end to end: its own daemon, a client in another process, and one JSON
//! line per method with every field the issue lists (plus the rows read per head).

use serde_json::Value;

use crate::kvdex;

#[test]
fn bench_decode_prints_every_field_for_flat_and_graph() {
    // 8192 tokens, of which 128 sinks + 512 window are static; a beam of 32 is narrow enough
    // that the graph really searches (a graph of at most 8·L keys is scanned exactly).
    let out = kvdex()
        .args(["bench", "decode", "--context", "8192", "--steps", "3"])
        .args(["--search-list", "32", "--train", "256", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let methods: Vec<&str> = rows.iter().filter_map(|r| r["method"].as_str()).collect();
    assert_eq!(methods, ["flat", "graph"]);
    let num = |r: &Value, f: &str| {
        r[f].as_f64()
            .unwrap_or_else(|| panic!("{} has no number {f}: {r}", r["method"]))
    };
    for r in &rows {
        assert_eq!(num(r, "context"), 8192.0);
        assert_eq!((num(r, "q_heads"), num(r, "kv_heads")), (8.0, 2.0));
        for f in [
            "layers",
            "layer_p50_ms",
            "layer_p99_ms",
            "search_ms",
            "attn_ms",
            "copy_ms",
            "slowest_head_ms",
            "k_mean",
            "scored_per_head",
            "mass_recall",
            "mass_covered",
            "out_rel_err",
        ] {
            let v = num(r, f);
            assert!(v.is_finite() && v >= 0.0, "{f} = {v} in {r}");
        }
        assert!(num(r, "layer_p99_ms") >= num(r, "layer_p50_ms"), "{r}");
        assert!(num(r, "mass_recall") <= 1.0 + 1e-9, "{r}");
    }
    let (flat, graph) = (&rows[0], &rows[1]);
    // The exact scan finds the exact top set, and reads every non-static row once for the
    // 4 query heads of its group.
    assert!((num(flat, "mass_recall") - 1.0).abs() < 1e-9, "{flat}");
    assert_eq!(
        num(flat, "scored_per_head"),
        ((8192 - 128 - 512) / 4) as f64
    );
    let scored = num(graph, "scored_per_head");
    assert!(scored > 0.0 && scored < 8192.0 - 640.0, "{graph}");
    assert!(num(graph, "mass_recall") > 0.5, "{graph}");
}

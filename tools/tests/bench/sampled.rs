//! `kvdex bench decode --sample-rate`: the daemon's sampled mass recall and sampled requests
//! beside the bench's exact mass recall, and the unsampled twin's p50 beside the timed one's.

use serde_json::Value;

use crate::kvdex;

#[test]
fn bench_decode_reports_the_sampled_figures_beside_the_exact_ones() {
    // Every retrieve sampled, the scorer allowed a whole core: nearly every request scored.
    let out = kvdex()
        .env("KVDEX_DECODE__SAMPLE_CPU_SHARE", "1.0")
        .args(["bench", "decode", "--context", "8192", "--steps", "12"])
        .args([
            "--search-list",
            "32",
            "--train",
            "256",
            "--methods",
            "graph",
        ])
        .args(["--sample-rate", "1", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let num = |f: &str| row[f].as_f64().unwrap_or_else(|| panic!("no {f} in {row}"));
    let requests = num("sampled_requests");
    // 12 timed steps and 2 warm-up ones; some may meet the CPU cap.
    assert!((1.0..=14.0).contains(&requests), "{row}");
    let (sampled, exact) = (num("sampled_mass_recall"), num("mass_recall"));
    assert!((0.0..=1.0).contains(&sampled), "{row}");
    // The same definition over (nearly) the same requests.
    assert!((sampled - exact).abs() < 0.05, "{row}");
    assert!(num("unsampled_p50_ms") > 0.0, "{row}");
    assert!(num("sample_score_ms") > 0.0, "{row}");
}

//! The data plane through the real daemon: append, search and gather over shared memory
//! against brute force, `/stats` and the session's end, and every metric the Grafana
//! dashboard queries.

use kvdex_client::{Client, SessionOptions};
use serde_json::{json, Value};

use crate::common::{http, Daemon};
use crate::{shape, stats, values, wait_stats};

#[test]
fn append_search_gather_through_the_daemon_match_brute_force() {
    let d = Daemon::start(&[]);
    let client = Client::connect(&d.base).unwrap();
    let mut s = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let id = s.id().unwrap().to_string();
    let (kvh, dim) = (2usize, 16usize);
    let mut keys = vec![Vec::new(); kvh];
    let mut vals = vec![Vec::new(); kvh];
    let mut n = 0usize;
    for (i, tokens) in [7usize, 100, 1, 300, 64].into_iter().enumerate() {
        let k = values(kvh * tokens * dim, 10 + i as u64);
        let v = values(kvh * tokens * dim, 50 + i as u64);
        n = s
            .append(
                1,
                tokens as u32,
                bytemuck::cast_slice(&k),
                bytemuck::cast_slice(&v),
            )
            .unwrap() as usize;
        for h in 0..kvh {
            keys[h].extend_from_slice(&k[h * tokens * dim..(h + 1) * tokens * dim]);
            vals[h].extend_from_slice(&v[h * tokens * dim..(h + 1) * tokens * dim]);
        }
    }
    assert_eq!(n, 472);
    let q = values(4 * dim, 99);
    let (mut ids, mut scores) = (vec![0u32; 4 * 10], vec![0f32; 4 * 10]);
    assert_eq!(s.search(1, &q, 10, &mut ids, &mut scores).unwrap(), 10);
    for qh in 0..4 {
        let kv = &keys[qh / 2];
        let mut brute: Vec<(f32, u32)> = (0..n)
            .map(|t| {
                (
                    (0..dim).map(|j| q[qh * dim + j] * kv[t * dim + j]).sum(),
                    t as u32,
                )
            })
            .collect();
        brute.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (r, &(score, tid)) in brute[..10].iter().enumerate() {
            assert_eq!(ids[qh * 10 + r], tid, "query head {qh} rank {r}");
            assert!((scores[qh * 10 + r] - score).abs() < 1e-4);
        }
    }
    let want_ids = [471u32, 0, 200, 7];
    let rows = s.gather(1, 1, &want_ids).unwrap();
    let (gk, gv): (&[f32], &[f32]) = (bytemuck::cast_slice(rows.k), bytemuck::cast_slice(rows.v));
    for (i, &t) in want_ids.iter().enumerate() {
        let t = t as usize;
        assert_eq!(
            &gk[i * dim..(i + 1) * dim],
            &keys[1][t * dim..(t + 1) * dim]
        );
        assert_eq!(
            &gv[i * dim..(i + 1) * dim],
            &vals[1][t * dim..(t + 1) * dim]
        );
    }
    assert_eq!(s.ping(b"hello").unwrap(), b"hello");

    let st = stats(&d.base);
    assert_eq!(st["sessions"], 1);
    let resident = (2 * n * kvh * dim * 4) as u64;
    assert_eq!(st["resident_bytes"], resident);
    assert_eq!(st["per_session"][0]["id"], json!(id));
    assert_eq!(st["per_session"][0]["layers"][1]["tokens"], n);
    assert_eq!(st["per_session"][0]["layers"][1]["indexed"], n);
    assert!(st["budget_used_bytes"].as_u64().unwrap() >= resident);
    // `/stats` lists no paths (anyone may read it); the client knows its own.
    assert!(st["per_session"][0].get("shm_path").is_none());
    let shm_path = s.region().path().to_owned();
    assert!(shm_path.exists());

    s.drop_session().unwrap();
    let st = wait_stats(&d.base, "the session to end", |s| s["sessions"] == 0);
    assert_eq!(
        (st["budget_used_bytes"].as_u64(), st["link_bytes"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(
        !std::path::Path::new(&shm_path).exists(),
        "the region file is removed"
    );

    // Every metric the Grafana dashboard queries is exported by this daemon after this traffic.
    let (_, text) = http::get(&d.base, "/metrics");
    assert!(
        text.contains("kvdex_requests_total{op=\"search\",status=\"ok\"} 1"),
        "{text}"
    );
    // Appended bytes count the request payloads (rows plus a small header per append).
    let appended: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kvdex_appended_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("kvdex_appended_bytes_total");
    assert!(
        (resident..resident + 5 * 256).contains(&appended),
        "appended {appended}, resident {resident}"
    );
    for name in dashboard_metric_names() {
        let exported = text.lines().any(|l| {
            !l.starts_with('#')
                && l.strip_prefix(name.as_str()).is_some_and(|rest| {
                    rest.starts_with(['{', ' '])
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| rest.starts_with(s))
                })
        });
        assert!(
            exported,
            "the dashboard queries {name}, which /metrics does not export:\n{text}"
        );
    }
}

/// Every `kvdex_*` name in the dashboard's queries, histogram series suffixes removed.
fn dashboard_metric_names() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/grafana/kvdex-dashboard.json"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = Vec::new();
    for panel in json["panels"].as_array().unwrap() {
        // Rows group panels and query nothing.
        if panel["type"] == "row" {
            continue;
        }
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("kvdex_") {
                let tail = &expr[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                names.push(base.to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    names
}

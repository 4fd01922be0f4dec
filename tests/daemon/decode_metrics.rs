//! The decode path in `/metrics`, through the real daemon: a retrieve before the seal (an
//! exact fallback), a seal and its background build, retrieves through the index, an
//! incremental insert, and training positions staged by a seal part.

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex_client::{Client, SessionOptions};
use kvdex_index::attend::BudgetParams;
use kvdex_index::IndexKind;
use kvdex_wire::decode::{TrainingSlice, SEAL_HEADER};

use crate::common::{http, Daemon};
use crate::seal_parts::raw_seal;
use crate::{shape, values, wait_stats};

/// The value of the series `series` (name and labels, exactly as exported).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
}

/// Scrapes `/metrics` until `done` holds, for up to 20 s (inserts run in the background).
fn wait_metrics(base: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, text) = http::get(base, "/metrics");
        if done(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn seal_build_retrieve_and_insert_show_in_the_metrics() {
    let d = Daemon::start(&[
        ("KVDEX_DECODE__SINKS", "4"),
        ("KVDEX_DECODE__WINDOW", "8"),
        ("KVDEX_DECODE__BUILD_THREADS", "1"),
        ("KVDEX_DECODE__INSERT_BATCH", "16"),
    ]);
    // A fresh daemon exports every decode-path series at zero.
    let (_, text) = http::get(&d.base, "/metrics");
    for series in [
        "kvdex_index_builds_started_total",
        "kvdex_index_builds_ended_total{outcome=\"ready\"}",
        "kvdex_index_builds_ended_total{outcome=\"failed\"}",
        "kvdex_index_builds_ended_total{outcome=\"abandoned\"}",
        "kvdex_index_build_duration_seconds_count",
        "kvdex_index_layers_building",
        "kvdex_index_inserted_keys_total",
        "kvdex_index_bytes",
        "kvdex_retrieve_stage_duration_microseconds_count{stage=\"search\"}",
        "kvdex_retrieve_stage_duration_microseconds_count{stage=\"attend\"}",
        "kvdex_retrieve_stage_duration_microseconds_count{stage=\"copy\"}",
        "kvdex_retrieve_chosen_tokens_count",
        "kvdex_retrieve_scored_keys_total",
        "kvdex_retrieve_exact_fallback_total",
        "kvdex_engine_dests",
        "kvdex_staged_training_positions",
    ] {
        assert_eq!(sample(&text, series), 0.0, "{series}");
    }

    let client = Client::connect(&d.base).unwrap();
    let mut s = client
        .create_session(shape(), SessionOptions::default())
        .unwrap();
    let (kvh, dim, n, block) = (2usize, 16usize, 2000usize, 200usize);
    for b in 0..n / block {
        let k = values(kvh * block * dim, 300 + b as u64);
        let v = values(kvh * block * dim, 700 + b as u64);
        s.append(
            0,
            block as u32,
            bytemuck::cast_slice(&k),
            bytemuck::cast_slice(&v),
        )
        .unwrap();
    }
    let params = RetrieveParams {
        budget: Budget::Adaptive(BudgetParams::new(0.9, 2, 32).unwrap()),
        attend: true,
        gather: true,
        scale: None,
    };
    // Before the seal: answered by exact scans.
    let q = values(4 * dim, 900);
    s.retrieve(0, &q, &params).unwrap();

    let train = values(4 * 100 * dim, 5);
    let positions: Vec<u32> = (0..100u32).map(|i| 20 * i).collect();
    s.seal(0, IndexKind::Graph, Some((&train, &positions)))
        .unwrap();
    wait_stats(&d.base, "the build", |st| {
        st["per_session"][0]["layers"][0]["build"]["state"] == "ready"
    });
    let mut chosen = 0u64;
    for seed in 0..3 {
        let r = s
            .retrieve(0, &values(4 * dim, 901 + seed), &params)
            .unwrap();
        chosen += r.k.iter().map(|&k| u64::from(k)).sum::<u64>();
    }
    // Tokens that leave the window go into the index in the background.
    let k = values(kvh * 64 * dim, 11);
    s.append(0, 64, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
        .unwrap();
    // A seal part staged on layer 1, waiting for its seal.
    let part_q = values(4 * 50 * dim, 6);
    let part_pos: Vec<u32> = (0..50).collect();
    let part = TrainingSlice {
        queries: &part_q,
        positions: &part_pos,
        q_heads: 4,
        range: 0..50,
    };
    let mut body = vec![0u8; SEAL_HEADER + part.bytes().unwrap()];
    part.encode_part(1, &mut body).unwrap();
    raw_seal(&mut s, &mut (1 << 40), &body).unwrap();

    let text = wait_metrics(&d.base, "the insert", |t| {
        sample(t, "kvdex_index_inserted_keys_total") > 0.0
    });
    assert_eq!(sample(&text, "kvdex_index_builds_started_total"), 1.0);
    assert_eq!(
        sample(&text, "kvdex_index_builds_ended_total{outcome=\"ready\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "kvdex_index_builds_ended_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(
        sample(&text, "kvdex_index_build_duration_seconds_count"),
        1.0
    );
    assert!(sample(&text, "kvdex_index_build_duration_seconds_sum") > 0.0);
    assert_eq!(sample(&text, "kvdex_index_layers_building"), 0.0);
    assert!(sample(&text, "kvdex_index_bytes") > 0.0);
    // Four retrieves: one exact, three through the index; each observed once per stage, and
    // each query head's k once.
    for stage in ["search", "attend", "copy"] {
        let series =
            format!("kvdex_retrieve_stage_duration_microseconds_count{{stage=\"{stage}\"}}");
        assert_eq!(sample(&text, &series), 4.0, "{series}");
    }
    assert_eq!(sample(&text, "kvdex_retrieve_chosen_tokens_count"), 16.0);
    assert!(sample(&text, "kvdex_retrieve_chosen_tokens_sum") >= chosen as f64);
    assert_eq!(sample(&text, "kvdex_retrieve_exact_fallback_total"), 1.0);
    assert!(sample(&text, "kvdex_retrieve_scored_keys_total") > 0.0);
    assert_eq!(sample(&text, "kvdex_staged_training_positions"), 50.0);
    assert_eq!(sample(&text, "kvdex_engine_dests"), 0.0);
    assert!(
        text.contains("kvdex_requests_total{op=\"retrieve\",status=\"ok\"} 4"),
        "{text}"
    );

    // The session's end takes its indices and staged positions with it.
    s.drop_session().unwrap();
    wait_stats(&d.base, "the session's end", |st| {
        st["sessions"] == 0 && st["sessions_closing"] == 0
    });
    let (_, text) = http::get(&d.base, "/metrics");
    assert_eq!(sample(&text, "kvdex_index_bytes"), 0.0);
    assert_eq!(sample(&text, "kvdex_staged_training_positions"), 0.0);
}

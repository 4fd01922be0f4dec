//! Static tokens of a session's own through the real daemon: a session created with sinks 4
//! and window 16 on a daemon whose `[decode]` says 8 and 32 retrieves, seals, inserts and
//! merges with its own values, next to a session that keeps the daemon's; bad values are
//! refused by name.

use std::time::{Duration, Instant};

use kvdex::config::MAX_STATIC_TOKENS;
use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex_client::Error as KvdexError;
use kvdex_client::{Client, SessionHandle, SessionOptions};
use kvdex_index::IndexKind;
use serde_json::Value;

use crate::common::{http, Daemon};
use crate::shm_common::*;
use crate::{check_merge_exact_with, fill};

/// The daemon's `[decode]` static tokens.
const DAEMON: (usize, usize) = (8, 32);
/// The session's own (StreamingLLM-like).
const OWN: (usize, usize) = (4, 16);
/// `decode.insert_batch` of the test daemon.
const BATCH: usize = 8;

/// Session `id`'s entry in `/stats`.
fn listed(base: &str, id: &str) -> Value {
    let (st, stats) = http::get_json(base, "/stats");
    assert_eq!(st, 200);
    stats["per_session"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"].as_str() == Some(id)))
        .cloned()
        .unwrap_or_else(|| panic!("session {id} not in /stats: {stats}"))
}

/// Polls `/stats` (up to 60 s) until session `id`'s layer 0 satisfies `done`.
fn wait_layer(base: &str, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let layer = listed(base, id)["layers"][0].clone();
        assert_ne!(layer["build"]["state"], "failed", "{layer}");
        if done(&layer) {
            return layer;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: {layer}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Retrieves every candidate of layer 0 (ids only) and checks each head got exactly the
/// non-static tokens `sinks .. len - window`.
fn check_ids(
    h: &mut SessionHandle,
    (sinks, window): (usize, usize),
    len: usize,
    hq: usize,
    seed: u64,
) {
    let p = RetrieveParams {
        budget: Budget::Fixed(len),
        attend: false,
        gather: false,
        scale: None,
    };
    let r = h.retrieve(0, &values(hq * 8, seed), &p).unwrap();
    for head in 0..hq {
        let mut ids: Vec<usize> = r.head_ids(head).iter().map(|&i| i as usize).collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            (sinks..len - window).collect::<Vec<_>>(),
            "head {head}, {len} tokens, sinks {sinks}, window {window}"
        );
    }
}

/// Appends one token (the same row for every KV head) to layer 0, and to the `[kv][n][d]`
/// copies `k` and `v` the checks compare with.
fn append_token(h: &mut SessionHandle, k: &mut Vec<f32>, v: &mut Vec<f32>, kv: usize, row: &[f32]) {
    let rows: Vec<f32> = (0..kv).flat_map(|_| row.iter().copied()).collect();
    h.append(
        0,
        1,
        bytemuck::cast_slice(&rows),
        bytemuck::cast_slice(&rows),
    )
    .unwrap();
    let (d, n) = (row.len(), k.len() / kv / row.len());
    for copy in [k, v] {
        for g in (0..kv).rev() {
            let at = (g * n + n) * d;
            copy.splice(at..at, row.iter().copied());
        }
    }
}

#[test]
fn a_session_with_its_own_sinks_and_window_keeps_them_through_the_daemon() {
    let (s, w) = (DAEMON.0.to_string(), DAEMON.1.to_string());
    let batch = BATCH.to_string();
    let daemon = Daemon::start(&[
        ("KVDEX_DECODE__SINKS", &s),
        ("KVDEX_DECODE__WINDOW", &w),
        ("KVDEX_DECODE__INSERT_BATCH", &batch),
        ("KVDEX_DECODE__BUILD_THREADS", "2"),
    ]);
    let base = daemon.base.clone();
    let client = Client::connect(&base).unwrap();
    let (hq, kv, d, n) = (4usize, 2usize, 8usize, 300usize);
    let shape = f32_shape(1, hq as u32, kv as u32, d as u32);
    let own = SessionOptions {
        sinks: Some(OWN.0 as u64),
        window: Some(OWN.1 as u64),
        ..Default::default()
    };
    let mut h = client.create_session(shape, own).unwrap();
    let mut plain = client
        .create_session(shape, SessionOptions::default())
        .unwrap();
    let id = h.id().unwrap().to_string();
    let plain_id = plain.id().unwrap().to_string();
    for (sid, (sinks, window)) in [(&id, OWN), (&plain_id, DAEMON)] {
        let info = listed(&base, sid);
        assert_eq!(
            (info["sinks"].as_u64(), info["window"].as_u64()),
            (Some(sinks as u64), Some(window as u64)),
            "{info}"
        );
    }
    let (mut k, mut v) = fill(&mut h, kv, n, d, 11);
    let (pk, pv) = fill(&mut plain, kv, n, d, 12);
    let q: Vec<f32> = values(hq * d, 99).iter().map(|x| x * 3.0).collect();
    // Unsealed (exact scan): each session's own non-static range, merged exactly.
    check_merge_exact_with(true, &mut h, OWN, &q, &k, &v, n, hq, kv, d);
    check_merge_exact_with(true, &mut plain, DAEMON, &q, &pk, &pv, n, hq, kv, d);
    // A flat index over the session's range; decode appends slide tokens out of its window
    // into the index in the background, and every retrieve returns exactly its range.
    assert_eq!(
        h.seal(0, IndexKind::Flat, None).unwrap() as usize,
        n - OWN.0 - OWN.1
    );
    wait_layer(&base, &id, "flat build", |l| l["build"]["state"] == "ready");
    let mut len = n;
    for step in 0..3 * BATCH as u64 {
        append_token(&mut h, &mut k, &mut v, kv, &values(d, 1000 + step));
        len += 1;
        check_ids(&mut h, OWN, len, hq, 2000 + step);
    }
    let retrievable = len - OWN.0 - OWN.1;
    let layer = wait_layer(&base, &id, "inserts", |l| {
        l["indexed"].as_u64().unwrap_or(0) as usize + BATCH > retrievable
    });
    assert!(
        layer["indexed"].as_u64().unwrap() as usize <= retrievable,
        "{layer}"
    );
    assert!(layer["build"]["inserts"].as_u64().unwrap() > 0, "{layer}");
    check_merge_exact_with(true, &mut h, OWN, &q, &k, &v, len, hq, kv, d);
    // A graph trained on causal prefill queries: positions inside the session's 4 sinks are
    // dropped, the others shifted by 4. The merge stays exact over what it returns.
    let positions: Vec<u32> = (0..len as u32).step_by(3).collect();
    let train = values(hq * positions.len() * d, 5);
    let sealed = h
        .seal(0, IndexKind::Graph, Some((&train, &positions)))
        .unwrap();
    assert_eq!(sealed as usize, retrievable);
    wait_layer(&base, &id, "graph build", |l| {
        l["build"]["state"] == "ready"
    });
    check_merge_exact_with(false, &mut h, OWN, &q, &k, &v, len, hq, kv, d);
    // The neighbour session never saw any of this: still the daemon's range.
    check_ids(&mut plain, DAEMON, n, hq, 7);
    // Bad values: refused by the daemon, naming the field; nothing created.
    for (opts, field) in [
        (
            SessionOptions {
                sinks: Some(MAX_STATIC_TOKENS + 1),
                ..Default::default()
            },
            "sinks",
        ),
        (
            SessionOptions {
                window: Some(u64::MAX),
                ..Default::default()
            },
            "window",
        ),
    ] {
        match client.create_session(shape, opts) {
            Err(KvdexError::BadRequest(m)) => assert!(m.contains(field), "{m}"),
            Err(e) => panic!("{field}: {e}"),
            Ok(_) => panic!("{field}: accepted"),
        }
    }
    let (_, stats) = http::get_json(&base, "/stats");
    assert_eq!(stats["sessions"], 2, "{stats}");
}

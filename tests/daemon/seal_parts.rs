//! A seal whose training queries do not fit the session's payload arena, through the real
//! daemon: the client sends them in parts, the layer builds the index one seal of the whole
//! set would, and bad parts on the wire are refused by name without harming the session.

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex_client::{Client, SessionHandle, SessionOptions};
use kvdex_index::IndexKind;
use kvdex_wire::decode::{TrainingSlice, SEAL_HEADER};
use kvdex_wire::proto::Opcode;
use serde_json::Value;

use crate::common::Daemon;
use crate::{shape, stats, values, wait_stats};

/// Tokens per layer, and training positions (each 4 heads x 16 floats + its position: 260
/// bytes, so 1000 take 260 KB against a 64 KiB arena).
const N: usize = 2000;
const TRAIN: usize = 1000;
const SMALL: u64 = 64 * 1024;

/// Appends `N` tokens to layer 0 in blocks that fit the small arena.
fn fill(s: &mut SessionHandle) {
    let (kvh, d, block) = (2usize, 16usize, 200usize);
    for b in 0..N / block {
        let k = values(kvh * block * d, 300 + b as u64);
        let v = values(kvh * block * d, 700 + b as u64);
        s.append(
            0,
            block as u32,
            bytemuck::cast_slice(&k),
            bytemuck::cast_slice(&v),
        )
        .unwrap();
    }
}

/// The layer-0 entry of session `id` in `/stats`.
fn layer0<'a>(st: &'a Value, id: &str) -> &'a Value {
    let s = st["per_session"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap();
    &s["layers"][0]
}

/// Sends `body` as a raw seal-op request (a ping leaves it at the start of the arena), as a
/// client of the wire alone would.
pub(crate) fn raw_seal(
    s: &mut SessionHandle,
    id: &mut u64,
    body: &[u8],
) -> kvdex_client::Result<()> {
    s.ping(body)?;
    *id += 16;
    let out_offset = body.len().next_multiple_of(64) as u64;
    s.submit(kvdex_wire::shm::Descriptor {
        request_id: *id,
        code: Opcode::Seal as u32,
        in_offset: 0,
        in_len: body.len() as u64,
        out_offset,
        out_len: s.arena_len() - out_offset,
        ..Default::default()
    })
    .map(|_| ())
}

#[test]
fn training_larger_than_the_arena_is_sent_in_parts_and_builds_the_same_index() {
    let d = Daemon::start(&[
        ("KVDEX_DECODE__SINKS", "4"),
        ("KVDEX_DECODE__WINDOW", "8"),
        ("KVDEX_DECODE__BUILD_THREADS", "1"),
        // A beam of 16: layers over 8 L = 128 tokens are searched through the graph, not
        // scanned, so the answers depend on the training set.
        ("KVDEX_DECODE__GRAPH_SEARCH_LIST", "16"),
    ]);
    let client = Client::connect(&d.base).unwrap();
    let open = |payload| {
        client
            .create_session(
                shape(),
                SessionOptions {
                    payload_bytes: Some(payload),
                    ..Default::default()
                },
            )
            .unwrap()
    };
    let (mut big, mut small, mut other) = (open(16 << 20), open(SMALL), open(16 << 20));
    let (big_id, small_id, other_id) = (
        big.id().unwrap().to_string(),
        small.id().unwrap().to_string(),
        other.id().unwrap().to_string(),
    );
    fill(&mut big);
    fill(&mut small);
    fill(&mut other);
    let q = values(4 * TRAIN * 16, 5);
    let positions: Vec<u32> = (0..TRAIN as u32).map(|i| 2 * i).collect();
    assert!(
        4 * (q.len() + positions.len()) as u64 > SMALL,
        "the training set must not fit the small arena"
    );
    let sealed = N as u64 - 4 - 8;
    // One request into the big arena; parts, then the seal, into the small one.
    assert_eq!(
        big.seal(0, IndexKind::Graph, Some((&q, &positions)))
            .unwrap(),
        sealed
    );
    assert_eq!(
        small
            .seal(0, IndexKind::Graph, Some((&q, &positions)))
            .unwrap(),
        sealed
    );
    // Another training set, to show that the comparison below can tell training sets apart.
    let q2 = values(4 * TRAIN * 16, 55);
    other
        .seal(0, IndexKind::Graph, Some((&q2, &positions)))
        .unwrap();
    let st = wait_stats(&d.base, "the builds", |st| {
        [&big_id, &small_id, &other_id]
            .iter()
            .all(|id| layer0(st, id)["build"]["state"] == "ready")
    });
    assert_eq!(layer0(&st, &small_id)["staged_queries"], 0);
    // One request per big arena; 3 parts of 251 positions and the seal for the small one.
    let (_, metrics) = crate::common::http::get(&d.base, "/metrics");
    assert!(
        metrics.contains("kvdex_requests_total{op=\"seal\",status=\"ok\"} 6"),
        "{metrics}"
    );
    // The same training set gives the same index: the same answers to every query.
    let p = RetrieveParams {
        budget: Budget::Fixed(16),
        attend: true,
        gather: false,
        scale: None,
    };
    let mut differs = 0;
    for seed in 0..16 {
        let x = values(4 * 16, 900 + seed);
        let a = big.retrieve(0, &x, &p).unwrap().ids.to_vec();
        let b = small.retrieve(0, &x, &p).unwrap().ids.to_vec();
        assert_eq!(a, b, "query {seed}");
        differs += usize::from(other.retrieve(0, &x, &p).unwrap().ids != &a[..]);
    }
    assert!(
        differs > 0,
        "another training set gave the same answers: the test is vacuous"
    );

    // Bad parts on the wire, each refused by name; what a layer staged shows in /stats and
    // in the session's reserved bytes until it is discarded.
    let reserved = |st: &Value| {
        st["per_session"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == small_id)
            .unwrap()["reserved_bytes"]
            .as_u64()
            .unwrap()
    };
    let before = reserved(&stats(&d.base));
    let mut id = 1 << 40;
    let three_heads = values(3 * TRAIN * 16, 6);
    let part = |range: std::ops::Range<usize>, q_heads| {
        let t = TrainingSlice {
            queries: if q_heads == 4 { &q } else { &three_heads },
            positions: &positions,
            q_heads,
            range,
        };
        let mut body = vec![0u8; SEAL_HEADER + t.bytes().unwrap()];
        t.encode_part(0, &mut body).unwrap();
        body
    };
    raw_seal(&mut small, &mut id, &part(0..50, 4)).unwrap();
    let st = stats(&d.base);
    assert_eq!(layer0(&st, &small_id)["staged_queries"], 50);
    assert_eq!(reserved(&st), before + 50 * 65 * 4);
    // A part that skips positions.
    let e = raw_seal(&mut small, &mut id, &part(60..70, 4))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("starts at position 60, but 50 are staged")
            && e.contains("the 50 training positions layer 0 had staged are discarded"),
        "{e}"
    );
    assert_eq!(reserved(&stats(&d.base)), before);
    // A part of 3 query heads (the session has 4): its floats do not match.
    let e = raw_seal(&mut small, &mut id, &part(0..10, 3))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("seal part holds 480 floats; 10 positions x q_heads 4 x head_dim 16 need 640"),
        "{e}"
    );
    // Staged queries cannot train a neighbour-list seal.
    raw_seal(&mut small, &mut id, &part(0..10, 4)).unwrap();
    let e = small
        .seal_neighbours(0, IndexKind::Graph, &[0], &[1], &[100])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("10 training positions staged by seal parts"),
        "{e}"
    );
    // The session still serves, and ending it with parts staged returns their bytes.
    raw_seal(&mut small, &mut id, &part(0..10, 4)).unwrap();
    let x = values(4 * 16, 1);
    assert_eq!(small.retrieve(0, &x, &p).unwrap().header.stride, 16);
    small.drop_session().unwrap();
    let st = wait_stats(&d.base, "the small session's end", |st| {
        st["sessions"] == 2 && st["sessions_closing"] == 0
    });
    let held: u64 = st["per_session"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["reserved_bytes"].as_u64().unwrap())
        .sum();
    // The sessions' reserved bytes are the budget's store part (it also holds their regions).
    assert_eq!(st["budget_parts"]["store"], held);
}

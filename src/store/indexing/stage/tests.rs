//! Staging training queries in parts: the same training set as one seal, every bad part
//! refused by name (and the staged set discarded), and the bytes returned to the budget.

use super::*;
use crate::store::{Shape, Store};
use kvdex_index::KeyDtype;
use kvdex_transfer::host::HostLink;

const HQ: usize = 4;
const D: usize = 8;

/// A one-layer session (4 query heads over 2 KV heads, d 8, sinks 2, window 4) with `n`
/// tokens, from a store with `budget` bytes and a cap of `cap` staged positions.
fn session(n: usize, budget: u64, cap: usize) -> (Store, Arc<Session>) {
    let store = Store::new(Arc::new(HostLink::new()), Arc::new(Budget::new(budget)), 64)
        .with_decode(DecodeConfig {
            sinks: 2,
            window: 4,
            build_threads: 1,
            seal_max_staged_queries: cap,
            ..Default::default()
        });
    let shape = Shape {
        layers: 2,
        q_heads: HQ as u32,
        kv_heads: 2,
        head_dim: D as u32,
        dtype: KeyDtype::F32,
    };
    let s = Arc::new(store.session(shape).unwrap());
    if n > 0 {
        let k: Vec<f32> = (0..2 * n * D)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        s.append(0, n, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
            .unwrap();
    }
    (store, s)
}

/// `[HQ][n][D]` queries and `n` positions `3 i`, distinct per value.
fn training(n: usize) -> (Vec<f32>, Vec<u32>) {
    let q = (0..HQ * n * D).map(|x| x as f32 / 1000.0).collect();
    (q, (0..n as u32).map(|i| 3 * i).collect())
}

/// Positions `r` of `(q, p)` as one part (head-major for its own positions).
fn slice(q: &[f32], p: &[u32], r: std::ops::Range<usize>) -> (Vec<f32>, Vec<u32>) {
    let n = p.len();
    let v = (0..HQ)
        .flat_map(|h| q[(h * n + r.start) * D..(h * n + r.end) * D].to_vec())
        .collect();
    (v, p[r].to_vec())
}

fn stage(s: &Session, layer: u32, start: usize, part: &(Vec<f32>, Vec<u32>)) -> Result<usize> {
    s.stage_training(layer, start, part.0.clone(), &part.1)
}

#[test]
fn parts_give_the_training_set_of_one_seal_and_return_their_bytes() {
    let (store, s) = session(100, u64::MAX, 1000);
    let arenas = store.budget().used();
    let (q, p) = training(25);
    let cuts = [0..10, 10..11, 11..20];
    for c in &cuts {
        assert_eq!(
            stage(&s, 0, c.start, &slice(&q, &p, c.clone())).unwrap(),
            c.end
        );
    }
    let bytes = (4 * 20 * (HQ * D + 1)) as u64;
    assert_eq!(s.index[0].staged_stats(), (20, bytes));
    assert_eq!(s.layer_stats()[0].staged_queries, 20);
    assert_eq!(store.budget().used(), arenas + bytes);
    assert_eq!(s.reserved_bytes(), arenas + bytes);
    // The staged parts followed by the seal's own positions train every KV head on what the
    // whole set in one seal would: the same queries, in the same order.
    let last = slice(&q, &p, 20..25);
    let staged = s.take_staged(0).unwrap().unwrap();
    let mut parts = staged.parts();
    parts.push(SealTraining {
        vectors: &last.0,
        positions: &last.1,
    });
    let whole = [SealTraining {
        vectors: &q,
        positions: &p,
    }];
    for g in 0..2 {
        let want = build::group_training(&whole, g, 2, HQ, D, 2);
        assert_eq!(want.1.len(), 2 * 24, "position 0 saw only sinks");
        assert_eq!(build::group_training(&parts, g, 2, HQ, D, 2), want);
    }
    drop(parts);
    drop(staged);
    assert_eq!(store.budget().used(), arenas);
    // Through seal: the parts are taken and released, the build runs.
    stage(&s, 0, 0, &slice(&q, &p, 0..20)).unwrap();
    s.seal(
        0,
        IndexKind::Graph,
        Some(SealTraining {
            vectors: &last.0,
            positions: &last.1,
        }),
    )
    .unwrap();
    assert_eq!(s.index[0].staged_stats(), (0, 0));
    assert_eq!(store.budget().used(), arenas);
    // A part while the build runs is refused (the state is set here so the test does not
    // race the build).
    s.index[0].update(|st, _| st.state = "building");
    let e = stage(&s, 0, 0, &slice(&q, &p, 0..2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("index build is in progress"), "{e}");
}

#[test]
fn bad_parts_are_refused_by_name_and_discard_the_staged_set() {
    let (store, s) = session(100, u64::MAX, 12);
    let arenas = store.budget().used();
    let (q, p) = training(20);
    let restart = |s: &Session| {
        assert_eq!(stage(s, 0, 0, &slice(&q, &p, 0..4)).unwrap(), 4);
        assert_eq!(s.index[0].staged_stats().0, 4);
    };
    let refused = |s: &Session, e: KvdexError, what: &str| {
        let e = e.to_string();
        assert!(e.contains(what), "{e}");
        assert!(
            e.contains("the 4 training positions layer 0 had staged are discarded"),
            "{e}"
        );
        assert_eq!(s.index[0].staged_stats(), (0, 0));
        assert_eq!(store.budget().used(), arenas);
    };
    // A gap (a lost part), and a repeated part.
    restart(&s);
    let e = stage(&s, 0, 6, &slice(&q, &p, 6..8)).unwrap_err();
    refused(&s, e, "starts at position 6, but 4 are staged");
    restart(&s);
    let e = stage(&s, 0, 2, &slice(&q, &p, 2..4)).unwrap_err();
    refused(&s, e, "starts at position 2, but 4 are staged");
    // Floats that do not match the positions x heads x head_dim.
    restart(&s);
    let mut short = slice(&q, &p, 4..6);
    short.0.pop();
    let e = stage(&s, 0, 4, &short).unwrap_err();
    refused(
        &s,
        e,
        "seal part holds 63 floats; 2 positions x q_heads 4 x head_dim 8 need 64",
    );
    // A query that is not finite.
    restart(&s);
    let mut nan = slice(&q, &p, 4..6);
    nan.0[5] = f32::NAN;
    let e = stage(&s, 0, 4, &nan).unwrap_err();
    refused(&s, e, "seal part query value 5 is not finite");
    // Over the cap of 12 positions.
    restart(&s);
    assert_eq!(stage(&s, 0, 4, &slice(&q, &p, 4..10)).unwrap(), 10);
    let e = stage(&s, 0, 10, &slice(&q, &p, 10..13))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("would stage 13 training positions for layer 0; decode.seal_max_staged_queries allows 12")
            && e.contains("the 10 training positions"),
        "{e}"
    );
    assert_eq!(store.budget().used(), arenas);
    // A neighbour-list seal with queries staged: refused, and the queries discarded.
    restart(&s);
    let lists = SealNeighbours {
        heads: &[0],
        lens: &[1],
        ids: &[50],
    };
    let e = s
        .seal_with_neighbours(0, IndexKind::Graph, lists)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4 training positions staged by seal parts"),
        "{e}"
    );
    assert_eq!(s.index[0].staged_stats(), (0, 0));
    // Start 0 begins a new set; parts of different layers are kept apart; an unknown layer.
    restart(&s);
    restart(&s);
    assert_eq!(stage(&s, 1, 0, &slice(&q, &p, 0..3)).unwrap(), 3);
    assert_eq!(s.index[0].staged_stats().0, 4);
    let e = stage(&s, 2, 0, &slice(&q, &p, 0..1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 2 (session has 2)"), "{e}");
    // A seal that fails (layer 1 holds no tokens) still releases its layer's parts.
    assert!(s.seal(1, IndexKind::Graph, None).is_err());
    assert_eq!(s.index[1].staged_stats(), (0, 0));
    // Dropping the session returns what layer 0 still has staged.
    drop(s);
    assert_eq!(store.budget().used(), 0);
}

#[test]
fn a_part_over_the_budget_is_refused_and_a_zero_cap_refuses_parts() {
    let (store, s) = session(0, 4096, 100);
    let (q, p) = training(20);
    // 20 positions of 4 heads x 8 floats = 2640 bytes fit; 20 more do not.
    assert_eq!(stage(&s, 0, 0, &slice(&q, &p, 0..20)).unwrap(), 20);
    let e = stage(&s, 0, 20, &slice(&q, &p, 0..20)).unwrap_err();
    assert!(matches!(e, KvdexError::Budget { .. }), "{e}");
    assert_eq!(
        (s.index[0].staged_stats(), store.budget().used()),
        ((0, 0), 0)
    );
    let (_, none) = session(0, u64::MAX, 0);
    let e = stage(&none, 0, 0, &slice(&q, &p, 0..1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("allows 0"), "{e}");
}

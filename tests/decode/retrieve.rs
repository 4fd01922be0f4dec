//! Retrieval on the decode path: the merged output equals full attention before and after
//! the graph build, tokens leaving the window are inserted while static tokens are never
//! returned, the adaptive budget follows how sharp a head is, and bad input gets a clear error
//! or a defined answer.

use std::time::{Duration, Instant};

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex_client::Error as KvdexError;
use kvdex_index::attend::BudgetParams;
use kvdex_index::IndexKind;

use crate::shm_common::*;
use crate::{check_merge_is_exact, fill, serve_decode, wait_ready, S, W};

#[test]
fn merged_output_equals_full_attention_before_and_after_the_graph_build() {
    let (hq, kv, d, n) = (4usize, 2usize, 16usize, 400usize);
    let mut dc = serve_decode(f32_shape(1, hq as u32, kv as u32, d as u32), "merge");
    let (k, v) = fill(&mut dc.h, kv, n, d, 11);
    let q = values(hq * d, 99)
        .iter()
        .map(|x| x * 3.0)
        .collect::<Vec<_>>();
    // Unsealed: exact scan.
    check_merge_is_exact(true, &mut dc, &q, &k, &v, n, hq, kv, d);
    // Sealed as a flat index (index + pending scan): still every non-static token.
    dc.h.seal(0, IndexKind::Flat, None).unwrap();
    wait_ready(&dc.session, 0);
    check_merge_is_exact(true, &mut dc, &q, &k, &v, n, hq, kv, d);
    // Sealed: the query-guided graph trained on causal prefill queries. It may return fewer
    // than all tokens; the merge must still be exact over what it returned.
    let positions: Vec<u32> = (0..n as u32).step_by(4).collect();
    let train = values(hq * positions.len() * d, 5);
    let sealed =
        dc.h.seal(0, IndexKind::Graph, Some((&train, &positions)))
            .unwrap();
    assert_eq!(sealed as usize, n - S - W);
    wait_ready(&dc.session, 0);
    let st = &dc.session.layer_stats()[0];
    assert_eq!((st.index, st.indexed), ("graph", n - S - W));
    assert!(st.index_bytes > 0);
    check_merge_is_exact(false, &mut dc, &q, &k, &v, n, hq, kv, d);
}

#[test]
fn tokens_leaving_the_window_are_inserted_and_static_tokens_never_returned() {
    let (hq, kv, d, n) = (2usize, 1usize, 8usize, 200usize);
    let mut dc = serve_decode(f32_shape(1, hq as u32, kv as u32, d as u32), "insert");
    fill(&mut dc.h, kv, n, d, 3);
    // A flat-kind index (exact) so that the index + pending scan must return every token.
    dc.h.seal(0, IndexKind::Flat, None).unwrap();
    wait_ready(&dc.session, 0);
    // Decode appends one token at a time; each leaves one token out of the window.
    let mut len = n;
    for step in 0..40 {
        let row = values(d, 1000 + step);
        len =
            dc.h.append(0, 1, bytemuck::cast_slice(&row), bytemuck::cast_slice(&row))
                .unwrap() as usize;
        let q = values(hq * d, 2000 + step);
        let p = RetrieveParams {
            budget: Budget::Fixed(len),
            attend: false,
            gather: false,
            scale: None,
        };
        let r = dc.h.retrieve(0, &q, &p).unwrap();
        for h in 0..hq {
            let ids = r.head_ids(h);
            // Exact scan of pending tokens + index: all non-static tokens, never a static one.
            assert_eq!(ids.len(), len - S - W);
            assert!(
                ids.iter().all(|&i| (S..len - W).contains(&(i as usize))),
                "step {step}"
            );
        }
    }
    let t = Instant::now();
    while dc.session.layer_stats()[0].indexed + 8 < len - S - W {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "inserts did not catch up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn adaptive_budget_is_small_for_a_sharp_head_and_large_for_a_diffuse_one() {
    let (hq, kv, d, n) = (2usize, 1usize, 16usize, 600usize);
    let mut dc = serve_decode(f32_shape(1, hq as u32, kv as u32, d as u32), "budget");
    let (k, _) = fill(&mut dc.h, kv, n, d, 21);
    // Head 0: a scaled copy of key 300 (sharp); head 1: a near-zero query (diffuse).
    let mut q = vec![0f32; hq * d];
    for j in 0..d {
        q[j] = k[300 * d + j] * 12.0;
        q[d + j] = 0.001;
    }
    let bp = BudgetParams::new(0.9, 2, 256).unwrap();
    let p = RetrieveParams {
        budget: Budget::Adaptive(bp),
        attend: true,
        gather: false,
        scale: None,
    };
    let r = dc.h.retrieve(0, &q, &p).unwrap();
    assert_eq!(r.header.stride, 256);
    assert_eq!(r.head_ids(0)[0], 300);
    assert!(r.k[0] < 20, "sharp head chose k = {}", r.k[0]);
    assert_eq!(r.k[1], 256, "diffuse head hits max_k");
    assert!(r.coverage[0] >= 0.9, "{:?}", r.coverage);
    assert!(r.k.iter().all(|&k| (2..=256).contains(&(k as usize))));
}

#[test]
fn bad_input_gets_clear_errors_or_defined_answers() {
    let (hq, kv, d, n) = (4usize, 2usize, 8usize, 300usize);
    let mut dc = serve_decode(f32_shape(2, hq as u32, kv as u32, d as u32), "bad");
    fill(&mut dc.h, kv, n, d, 4);
    let q = values(hq * d, 1);
    let fixed = |k| RetrieveParams {
        budget: Budget::Fixed(k),
        attend: true,
        gather: false,
        scale: None,
    };
    fn msg(e: impl std::fmt::Display) -> String {
        e.to_string()
    }
    // Unknown layer.
    let e = dc.h.retrieve(9, &q, &fixed(4)).unwrap_err();
    assert!(matches!(e, KvdexError::NotFound(_)) && msg(e).contains("layer 9"));
    // Wrong number of heads / dimension.
    let e = msg(dc.h.retrieve(0, &q[..d * 3], &fixed(4)).unwrap_err());
    assert!(e.contains("expected q_heads 4 x head_dim 8"), "{e}");
    // NaN in the query.
    let mut nan = q.clone();
    nan[d + 2] = f32::NAN;
    let e = msg(dc.h.retrieve(0, &nan, &fixed(4)).unwrap_err());
    assert!(e.contains("query value 10 (head 1) is NaN"), "{e}");
    // Budget 0, and adaptive bounds out of order.
    let e = msg(dc.h.retrieve(0, &q, &fixed(0)).unwrap_err());
    assert!(e.contains("k = 0"), "{e}");
    let bad = RetrieveParams {
        budget: Budget::Adaptive(BudgetParams {
            coverage: 0.9,
            min_k: 8,
            max_k: 4,
        }),
        ..fixed(1)
    };
    assert!(msg(dc.h.retrieve(0, &q, &bad).unwrap_err()).contains("min_k 8, max_k 4"));
    // Budget above the context: clamped to the retrievable tokens, a defined answer.
    let r = dc.h.retrieve(0, &q, &fixed(1_000_000)).unwrap();
    assert_eq!(r.header.stride as usize, n - S - W);
    // A layer with nothing but static tokens: an empty part (lse = -inf), and no seal.
    let r = dc.h.retrieve(1, &q, &fixed(4)).unwrap();
    assert!(r.k.iter().all(|&k| k == 0) && r.lse.iter().all(|&l| l == f32::NEG_INFINITY));
    assert!(msg(dc.h.seal(1, IndexKind::Graph, None).unwrap_err()).contains("nothing to index"));
    // Training queries of the wrong size.
    let e = msg(dc
        .h
        .seal(0, IndexKind::Graph, Some((&q[..5], &[10, 20])))
        .unwrap_err());
    assert!(e.contains("seal training holds 5 floats"), "{e}");
    // The session still serves.
    assert_eq!(dc.h.retrieve(0, &q, &fixed(3)).unwrap().header.stride, 3);
}

/// Sends a raw retrieve body, as a client of the wire alone would: fixed k 4 with attention,
/// `flags` added, `scale` in its field. `id` is the request id (bumped past the ping's).
fn raw_retrieve(
    h: &mut kvdex_client::SessionHandle,
    id: &mut u64,
    q: &[f32],
    flags: u32,
    scale: f32,
) -> kvdex_client::Result<()> {
    use kvdex_wire::decode::{ATTEND, RETRIEVE_HEADER};
    let mut body = vec![0u8; RETRIEVE_HEADER + 4 * q.len()];
    let words = [0, ATTEND | flags, 4, 0, 0, 0, scale.to_bits(), 0];
    for (i, w) in words.iter().enumerate() {
        body[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    body[RETRIEVE_HEADER..].copy_from_slice(bytemuck::cast_slice(q));
    // A ping leaves its body at the start of the arena: send it there as a retrieve.
    h.ping(&body)?;
    *id += 16;
    let out_offset = body.len().next_multiple_of(64) as u64;
    h.submit(kvdex_wire::shm::Descriptor {
        request_id: *id,
        code: kvdex_wire::proto::Opcode::Retrieve as u32,
        in_offset: 0,
        in_len: body.len() as u64,
        out_offset,
        out_len: h.arena_len() - out_offset,
        ..Default::default()
    })
    .map(|_| ())
}

#[test]
fn scale_and_budget_have_explicit_encodings_on_the_wire() {
    use kvdex_wire::decode::SCALE;
    let (hq, kv, d, n) = (2usize, 1usize, 8usize, 100usize);
    let mut dc = serve_decode(f32_shape(1, hq as u32, kv as u32, d as u32), "wire");
    fill(&mut dc.h, kv, n, d, 6);
    let q = values(hq * d, 2);
    fn msg(e: impl std::fmt::Display) -> String {
        e.to_string()
    }
    let mut id = 1 << 40;
    // Protocol version 1 read scale 0 as "default": now the SCALE flag says a scale is there,
    // and 0 or NaN with it is refused by name.
    for bad in [0.0f32, f32::NAN] {
        let e = msg(raw_retrieve(&mut dc.h, &mut id, &q, SCALE, bad).unwrap_err());
        assert!(
            e.contains(&format!(
                "attention scale {bad} must be finite and positive"
            )),
            "{e}"
        );
    }
    // A scale without the flag (a version-1 client) is refused rather than ignored.
    let e = msg(raw_retrieve(&mut dc.h, &mut id, &q, 0, 0.5).unwrap_err());
    assert!(e.contains("scale field is 0.5 but the SCALE flag"), "{e}");
    raw_retrieve(&mut dc.h, &mut id, &q, SCALE, 0.5).unwrap();
    raw_retrieve(&mut dc.h, &mut id, &q, 0, 0.0).unwrap();
    // The Rust client: an explicit 0 is refused (not sent as "default"), and a k over u32
    // is refused naming it (it was sent as `k as u32`, i.e. 0).
    let p = |budget, scale| RetrieveParams {
        budget,
        attend: true,
        gather: false,
        scale,
    };
    let e = msg(dc
        .h
        .retrieve(0, &q, &p(Budget::Fixed(4), Some(0.0)))
        .unwrap_err());
    assert!(
        e.contains("attention scale 0 must be finite and positive"),
        "{e}"
    );
    let e = msg(dc
        .h
        .retrieve(0, &q, &p(Budget::Fixed(1 << 32), None))
        .unwrap_err());
    assert!(e.contains("budget k = 4294967296 does not fit"), "{e}");
    // An explicit scale reaches the daemon: scale 1/8 = the default for head_dim 64 differs
    // from this session's default 1/sqrt(8), and so does the partial attention.
    let mut with = |s| {
        dc.h.retrieve(0, &q, &p(Budget::Fixed(4), s))
            .map(|r| r.lse.to_vec())
    };
    let (default, explicit) = (with(None).unwrap(), with(Some(0.125)).unwrap());
    let same_as_default = with(Some(1.0 / (d as f32).sqrt())).unwrap();
    assert_eq!(default, same_as_default);
    assert_ne!(default, explicit);
}

//! Sealing a layer: searches stay exact while its background build runs, a second seal is
//! refused, and a seal with the engine's own neighbour lists builds a graph (bad lists are
//! refused).

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex_index::IndexKind;

use crate::shm_common::*;
use crate::{check_merge_is_exact, fill, serve_decode, wait_ready, S, W};

#[test]
fn search_during_a_build_is_exact_and_a_second_seal_is_refused() {
    let (hq, kv, d, n) = (2usize, 1usize, 32usize, 20_000usize);
    let mut dc = serve_decode(f32_shape(1, hq as u32, kv as u32, d as u32), "rebuild");
    let (k, _) = fill(&mut dc.h, kv, n, d, 8);
    let positions: Vec<u32> = (0..n as u32).step_by(16).collect();
    let train = values(hq * positions.len() * d, 9);
    dc.h.seal(0, IndexKind::Graph, Some((&train, &positions)))
        .unwrap();
    // The build takes far longer than a request: the second seal lands while it runs.
    let e =
        dc.h.seal(0, IndexKind::Graph, None)
            .unwrap_err()
            .to_string();
    assert!(e.contains("already in progress"), "{e}");
    assert_eq!(dc.session.build_status(0).unwrap().state, "building");
    // Meanwhile searches are exact: compare with brute force.
    let q = values(hq * d, 77);
    let p = RetrieveParams {
        budget: Budget::Fixed(10),
        attend: false,
        gather: false,
        scale: None,
    };
    let r = dc.h.retrieve(0, &q, &p).unwrap();
    for h in 0..hq {
        let mut brute: Vec<(f32, u32)> = (S..n - W)
            .map(|t| ((0..d).map(|j| q[h * d + j] * k[t * d + j]).sum(), t as u32))
            .collect();
        brute.sort_by(|a, b| b.0.total_cmp(&a.0));
        let want: Vec<u32> = brute[..10].iter().map(|x| x.1).collect();
        assert_eq!(r.head_ids(h), &want[..], "head {h}");
    }
    wait_ready(&dc.session, 0);
    // After the build, a rebuild may start again.
    dc.h.seal(0, IndexKind::Flat, None).unwrap();
    wait_ready(&dc.session, 0);
}

#[test]
fn seal_with_engine_neighbour_lists_builds_a_graph_and_refuses_bad_lists() {
    let (hq, kv, d, n) = (4usize, 2usize, 16usize, 400usize);
    let mut dc = serve_decode(f32_shape(1, hq as u32, kv as u32, d as u32), "nbrs");
    let (k, v) = fill(&mut dc.h, kv, n, d, 31);
    // The engine's side: for sampled prefill queries, the exact top-16 keys by inner product
    // (absolute token ids, sinks included: the daemon drops static ids itself).
    let group = hq / kv;
    let (mut heads, mut lens, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for (i, pos) in (S as u32..n as u32).step_by(8).enumerate() {
        for h in 0..hq {
            let q = values(d, 500 + (i * hq + h) as u64);
            let g = h / group;
            let mut scored: Vec<(f32, u32)> = (0..=pos)
                .map(|t| {
                    let kt = &k[(g * n + t as usize) * d..(g * n + t as usize + 1) * d];
                    (q.iter().zip(kt).map(|(a, b)| a * b).sum(), t)
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            let top: Vec<u32> = scored.iter().take(16).map(|x| x.1).collect();
            heads.push(h as u32);
            lens.push(top.len() as u32);
            ids.extend(top);
        }
    }
    let sealed =
        dc.h.seal_neighbours(0, IndexKind::Graph, &heads, &lens, &ids)
            .unwrap();
    assert_eq!(sealed as usize, n - S - W);
    wait_ready(&dc.session, 0);
    let st = &dc.session.layer_stats()[0];
    assert_eq!((st.index, st.indexed), ("graph", n - S - W));
    let q = values(hq * d, 4242)
        .iter()
        .map(|x| x * 3.0)
        .collect::<Vec<_>>();
    check_merge_is_exact(false, &mut dc, &q, &k, &v, n, hq, kv, d);
    // Bad lists: a query head out of range, an id beyond the tokens, lengths that do not add
    // up; each named, and the session still serves.
    fn msg(e: impl std::fmt::Display) -> String {
        e.to_string()
    }
    let e = msg(dc
        .h
        .seal_neighbours(0, IndexKind::Graph, &[9], &[1], &[20])
        .unwrap_err());
    assert!(e.contains("names query head 9"), "{e}");
    let e = msg(dc
        .h
        .seal_neighbours(0, IndexKind::Graph, &[1], &[2], &[20, 5000])
        .unwrap_err());
    assert!(e.contains("names token 5000"), "{e}");
    let e = msg(dc
        .h
        .seal_neighbours(0, IndexKind::Graph, &[1, 2], &[2, 2], &[20, 21, 22])
        .unwrap_err());
    assert!(e.contains("add up to 4 ids, 3 were sent"), "{e}");
    assert_eq!(dc.session.build_status(0).unwrap().state, "ready");
    let p = RetrieveParams {
        budget: Budget::Fixed(3),
        attend: true,
        gather: false,
        scale: None,
    };
    assert_eq!(dc.h.retrieve(0, &q, &p).unwrap().header.stride, 3);
}

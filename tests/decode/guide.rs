//! Decode-time inserts guided by captured decode queries: a sealed graph keeps serving while
//! decoding appends tokens, the tokens that slide out of the window are inserted in the
//! background with the retrieves' queries as guides (the build status counts them), and the
//! inserted tokens are found by later retrieves. With `insert_guide_queries = 0` the inserts
//! are keys only.

use std::time::{Duration, Instant};

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex::store::DecodeConfig;
use kvdex_index::IndexKind;

use crate::shm_common::*;
use crate::{fill, serve_decode_cfg, test_config, wait_ready, Decode, S, W};

/// Seals a graph over `n` tokens, then decodes `steps` steps (append one token, retrieve the
/// top 10 for a query near a recent key) and waits for the inserts to catch up. Returns the
/// keys `[kv][n + steps][d]` as appended.
fn decode_steps(
    dc: &mut Decode,
    (hq, kv, d): (usize, usize, usize),
    n: usize,
    steps: usize,
) -> Vec<Vec<f32>> {
    let (k, _) = fill(&mut dc.h, kv, n, d, 61);
    let mut keys: Vec<Vec<f32>> = (0..kv)
        .map(|g| k[g * n * d..(g + 1) * n * d].to_vec())
        .collect();
    let positions: Vec<u32> = (0..n as u32).step_by(2).collect();
    let train = values(hq * positions.len() * d, 62);
    dc.h.seal(0, IndexKind::Graph, Some((&train, &positions)))
        .unwrap();
    wait_ready(&dc.session, 0);
    let p = RetrieveParams {
        budget: Budget::Fixed(10),
        attend: true,
        gather: false,
        scale: None,
    };
    for step in 0..steps {
        let row = values(kv * d, 5000 + step as u64);
        for (g, kg) in keys.iter_mut().enumerate() {
            kg.extend_from_slice(&row[g * d..(g + 1) * d]);
        }
        let len =
            dc.h.append(0, 1, bytemuck::cast_slice(&row), bytemuck::cast_slice(&row))
                .unwrap();
        // Decode queries look back at recent tokens (as real ones do): a noisy copy of a key
        // a few dozen positions back, per query head.
        let mut q = values(hq * d, 7000 + step as u64);
        let back = len as usize - W - 1 - step % 32;
        for h in 0..hq {
            let kh = &keys[h / (hq / kv)][back * d..(back + 1) * d];
            q[h * d..(h + 1) * d]
                .iter_mut()
                .zip(kh)
                .for_each(|(x, &y)| *x = 0.3 * *x + 3.0 * y);
        }
        dc.h.retrieve(0, &q, &p).unwrap();
    }
    let total = n + steps;
    let t = Instant::now();
    while dc.session.layer_stats()[0].indexed + 8 < total - S - W {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "inserts did not catch up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    keys
}

/// For queries aimed at inserted tokens (a scaled copy of the token's key), the exact top-1
/// among the retrievable tokens, and how often the retrieved top-10 contains it.
fn found_inserted(
    dc: &mut Decode,
    keys: &[Vec<f32>],
    (hq, kv, d): (usize, usize, usize),
    from: usize,
) -> (usize, usize) {
    let len = keys[0].len() / d;
    let p = RetrieveParams {
        budget: Budget::Fixed(10),
        attend: false,
        gather: false,
        scale: None,
    };
    let (mut found, mut asked) = (0, 0);
    for t in (from..len - W).step_by(7) {
        let mut q = values(hq * d, 9000 + t as u64);
        for h in 0..hq {
            let kt = &keys[h / (hq / kv)][t * d..(t + 1) * d];
            q[h * d..(h + 1) * d]
                .iter_mut()
                .zip(kt)
                .for_each(|(x, &y)| *x = 0.3 * *x + 3.0 * y);
        }
        let r = dc.h.retrieve(0, &q, &p).unwrap();
        for h in 0..hq {
            let kh = &keys[h / (hq / kv)];
            let score = |i: usize| -> f32 { (0..d).map(|j| q[h * d + j] * kh[i * d + j]).sum() };
            let best = (S..len - W)
                .max_by(|&a, &b| score(a).total_cmp(&score(b)))
                .unwrap();
            asked += 1;
            found += usize::from(r.head_ids(h).contains(&(best as u32)));
        }
    }
    (found, asked)
}

#[test]
fn decode_queries_guide_the_background_inserts() {
    let shape3 = (4usize, 2usize, 16usize);
    let (n, steps) = (600usize, 160usize);
    let mut cfg = test_config();
    // A beam narrow enough that the graph is walked, not scanned (n > 8 L).
    cfg.params.graph.search_list = 16;
    cfg.insert_guide_queries = 8;
    let shape = f32_shape(1, shape3.0 as u32, shape3.1 as u32, shape3.2 as u32);
    let mut dc = serve_decode_cfg(shape, None, cfg.clone(), "guided");
    let keys = decode_steps(&mut dc, shape3, n, steps);
    let st = dc.session.build_status(0).unwrap();
    assert!(st.inserts >= (steps / 8) as u64, "{st:?}");
    assert!(
        st.guided_inserts > 0 && st.guide_queries >= st.guided_inserts,
        "{st:?}"
    );
    assert!(
        st.guide_queries <= st.guided_inserts * 8,
        "at most one ring per insert: {st:?}"
    );
    assert!(st.insert_secs > 0.0);
    // The tokens inserted during decoding are retrieved like the sealed ones. (Whether the
    // guides raise recall is measured offline, `bench recall --insert-guide`: on this toy,
    // where one guide's top-100 spans an eighth of the graph, both find 88-100% of the
    // inserted top-1s.)
    let (found, asked) = found_inserted(&mut dc, &keys, shape3, n - W);
    assert!(
        found * 100 >= asked * 85,
        "found {found} of {asked} inserted top-1s"
    );

    // Keys only: the same decode, no query captured, no guided insert.
    let cfg0 = DecodeConfig {
        insert_guide_queries: 0,
        ..cfg
    };
    let mut dc0 = serve_decode_cfg(shape, None, cfg0, "keysonly");
    let keys0 = decode_steps(&mut dc0, shape3, n, steps);
    let st0 = dc0.session.build_status(0).unwrap();
    assert!(st0.inserts > 0, "{st0:?}");
    assert_eq!((st0.guided_inserts, st0.guide_queries), (0, 0), "{st0:?}");
    let (found0, asked0) = found_inserted(&mut dc0, &keys0, shape3, n - W);
    assert!(
        found0 * 100 >= asked0 * 85,
        "keys only: found {found0} of {asked0}"
    );
}

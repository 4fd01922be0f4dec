//! The decode path through a real region and worker: seal, background build, retrieve with
//! partial attention merged against full attention, adaptive budgets, incremental inserts,
//! and bad input.

mod shm_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvdex::client::{merge, Client, SessionHandle};
use kvdex::error::KvdexError;
use kvdex::shm::Region;
use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex::store::{DecodeConfig, Session, Shape, SlimSpec, Store};
use kvdex::worker::{NoopObserver, Worker, WorkerConfig};
use kvdex_index::attend::BudgetParams;
use kvdex_index::IndexKind;
use shm_common::*;

const S: usize = 4;
const W: usize = 8;

struct Decode {
    _worker: Worker,
    session: Arc<Session>,
    h: SessionHandle,
}

fn serve_decode(shape: Shape, tag: &str) -> Decode {
    serve_decode_with(shape, None, tag)
}

fn serve_decode_with(shape: Shape, slim: Option<SlimSpec>, tag: &str) -> Decode {
    let cfg = DecodeConfig {
        sinks: S,
        window: W,
        build_threads: 2,
        insert_batch: 8,
        ..Default::default()
    };
    let session = Arc::new(
        Store::unlimited()
            .with_decode(cfg)
            .session_with(shape, slim)
            .unwrap(),
    );
    let path = temp_path(tag);
    let region = Region::create(&path, 8 << 20).unwrap();
    let token = [7u8; 16];
    let worker = Worker::spawn_with(
        region,
        session.clone(),
        token,
        Arc::new(NoopObserver),
        Box::new(|_| {}),
        WorkerConfig { wait: test_wait() },
    )
    .unwrap();
    let h = Client::attach_with(&path, &token, test_wait()).unwrap();
    Decode {
        _worker: worker,
        session,
        h,
    }
}

/// `[kv][n][d]` keys and values; appended in blocks through the region.
fn fill(h: &mut SessionHandle, kv: usize, n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let k = values(kv * n * d, seed);
    let v = values(kv * n * d, seed + 1);
    for (start, len) in [(0, n / 3), (n / 3, n - n / 3)] {
        let (mut kb, mut vb) = (Vec::new(), Vec::new());
        for g in 0..kv {
            let r = (g * n + start) * d..(g * n + start + len) * d;
            kb.extend_from_slice(&k[r.clone()]);
            vb.extend_from_slice(&v[r]);
        }
        h.append(
            0,
            len as u32,
            bytemuck::cast_slice(&kb),
            bytemuck::cast_slice(&vb),
        )
        .unwrap();
    }
    (k, v)
}

/// Attention of `q` over the given token ids of one KV head, in f64: (out, lse).
fn attention(q: &[f32], k: &[f32], v: &[f32], ids: &[usize], d: usize) -> (Vec<f64>, f64) {
    let scale = 1.0 / (d as f64).sqrt();
    let logits: Vec<f64> = ids
        .iter()
        .map(|&t| {
            (0..d)
                .map(|j| q[j] as f64 * k[t * d + j] as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let sum: f64 = w.iter().sum();
    let mut out = vec![0.0; d];
    for (wi, &t) in w.iter().zip(ids) {
        for j in 0..d {
            out[j] += wi / sum * v[t * d + j] as f64;
        }
    }
    (out, m + sum.ln())
}

fn wait_ready(session: &Session, layer: u32) {
    let t = Instant::now();
    loop {
        let st = session.build_status(layer).unwrap();
        match st.state {
            "ready" => return,
            "failed" => panic!("build failed: {:?}", st.error),
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "build did not finish"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[allow(clippy::too_many_arguments)]
/// Retrieves every non-static token, merges kvdex's part with the engine's exact part over the
/// static tokens, and compares with full attention over the context.
fn check_merge_is_exact(
    every: bool,
    dc: &mut Decode,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    hq: usize,
    kv: usize,
    d: usize,
) {
    let params = RetrieveParams {
        budget: Budget::Fixed(n),
        attend: true,
        gather: true,
        scale: None,
    };
    let r = dc.h.retrieve(0, q, &params).unwrap();
    // The rows were copied by the link's gather into the registered payload arena.
    assert_eq!(dc.session.link().dest_stats().destinations, 1);
    assert_eq!(
        r.header.stride as usize,
        n - S - W,
        "clamped to the retrievable tokens"
    );
    let (kv_out, kv_lse) = (r.out.to_vec(), r.lse.to_vec());
    let group = hq / kv;
    let statics: Vec<usize> = (0..S).chain(n - W..n).collect();
    let (mut eng_out, mut eng_lse) = (vec![0f32; hq * d], vec![0f32; hq]);
    let mut want = vec![0f64; hq * d];
    for h in 0..hq {
        let ids = r.head_ids(h);
        let mut sorted: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "head {h}: no token twice");
        assert!(
            sorted.iter().all(|t| (S..n - W).contains(t)),
            "head {h}: no static token"
        );
        if every {
            assert_eq!(
                sorted,
                (S..n - W).collect::<Vec<_>>(),
                "head {h}: every token"
            );
        }
        let g = h / group;
        let (kh, vh) = (
            &k[g * n * d..(g + 1) * n * d],
            &v[g * n * d..(g + 1) * n * d],
        );
        // Gathered rows are the stored rows of the chosen ids.
        let (gk, gv) = r.head_rows(h);
        let gk: &[f32] = bytemuck::cast_slice(gk);
        let gv: &[f32] = bytemuck::cast_slice(gv);
        for (i, &id) in ids.iter().enumerate().take(5) {
            assert_eq!(
                &gk[i * d..(i + 1) * d],
                &kh[id as usize * d..(id as usize + 1) * d]
            );
            assert_eq!(
                &gv[i * d..(i + 1) * d],
                &vh[id as usize * d..(id as usize + 1) * d]
            );
        }
        let qh = &q[h * d..(h + 1) * d];
        let (o, l) = attention(qh, kh, vh, &statics, d);
        eng_out[h * d..(h + 1) * d]
            .iter_mut()
            .zip(&o)
            .for_each(|(a, b)| *a = *b as f32);
        eng_lse[h] = l as f32;
        // Exact attention over the static tokens plus the retrieved ones (the whole context
        // when every non-static token was retrieved).
        let union: Vec<usize> = statics.iter().copied().chain(sorted).collect();
        let (full, _) = attention(qh, kh, vh, &union, d);
        want[h * d..(h + 1) * d].copy_from_slice(&full);
    }
    let (mut got, mut lse) = (vec![0f32; hq * d], vec![0f32; hq]);
    merge::merge(&eng_out, &eng_lse, &kv_out, &kv_lse, &mut got, &mut lse).unwrap();
    let err: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(
        err / norm < 1e-5,
        "merged output off by {} relative",
        err / norm
    );
}

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
    let msg = |e: KvdexError| e.to_string();
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
    let msg = |e: KvdexError| e.to_string();
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

/// An MHA layer whose V is exactly K·W_KV: `(k [kv][n][d], v [kv][n][d], w [D][D])`.
fn slim_data(kv: usize, n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dim = kv * d;
    let k = values(kv * n * d, seed);
    let w: Vec<f32> = values(dim * dim, seed + 1)
        .iter()
        .map(|x| x * 0.3)
        .collect();
    let mut v = vec![0f32; kv * n * d];
    for t in 0..n {
        for g in 0..kv {
            for j in 0..d {
                let col = g * d + j;
                let x: f64 = (0..dim)
                    .map(|i| k[((i / d) * n + t) * d + i % d] as f64 * w[i * dim + col] as f64)
                    .sum();
                v[(g * n + t) * d + j] = x as f32;
            }
        }
    }
    (k, v, w)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let e: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (e / n.max(f64::MIN_POSITIVE)).sqrt()
}

#[test]
fn slim_attend_and_gather_equal_the_stored_v_path() {
    let (h, d, n) = (3usize, 8usize, 300usize);
    let shape = f32_shape(1, h as u32, h as u32, d as u32);
    let (k, v, w) = slim_data(h, n, d, 61);
    let mut full = serve_decode(shape, "slim-full");
    let mut slim = serve_decode_with(shape, Some(SlimSpec::default()), "slim");
    full.h
        .append(
            0,
            n as u32,
            bytemuck::cast_slice(&k),
            bytemuck::cast_slice(&v),
        )
        .unwrap();
    slim.h.set_wkv(0, &w).unwrap();
    slim.h
        .append(0, n as u32, bytemuck::cast_slice(&k), &[])
        .unwrap();
    let q: Vec<f32> = values(h * d, 62).iter().map(|x| x * 3.0).collect();
    for budget in [
        Budget::Fixed(40),
        Budget::Adaptive(BudgetParams::new(0.9, 4, 64).unwrap()),
    ] {
        let p = RetrieveParams {
            budget,
            attend: true,
            gather: true,
            scale: None,
        };
        let a = full.h.retrieve(0, &q, &p).unwrap();
        let (a_ids, a_k, a_out, a_lse, a_rows) = (
            a.ids.to_vec(),
            a.k.to_vec(),
            a.out.to_vec(),
            a.lse.to_vec(),
            a.rows.to_vec(),
        );
        let b = slim.h.retrieve(0, &q, &p).unwrap();
        assert_eq!(
            (b.ids, b.k),
            (&a_ids[..], &a_k[..]),
            "same search, same budget"
        );
        assert!(
            rel_err(b.out, &a_out) < 1e-5,
            "out {}",
            rel_err(b.out, &a_out)
        );
        assert!(rel_err(b.lse, &a_lse) < 1e-5);
        let (got, want): (&[f32], &[f32]) =
            (bytemuck::cast_slice(b.rows), bytemuck::cast_slice(&a_rows));
        assert!(rel_err(got, want) < 1e-5, "rows {}", rel_err(got, want));
    }
    // The plain gather op recomputes V the same way.
    let ids = [4u32, 150, 299];
    let owned = |g: kvdex::client::GatheredRows<'_>| (g.k.to_vec(), g.v.to_vec());
    let (gk, gv) = owned(slim.h.gather(0, 2, &ids).unwrap());
    let (wk, wv) = owned(full.h.gather(0, 2, &ids).unwrap());
    assert_eq!(gk, wk);
    assert!(rel_err(bytemuck::cast_slice(&gv), bytemuck::cast_slice(&wv)) < 1e-5);
    // Memory: V is not stored; W_KV is.
    let st = slim.session.slim_stats().unwrap();
    assert_eq!(st.v_bytes_saved, (n * h * d * 4) as u64);
    assert_eq!(st.wkv_bytes, (h * d * h * d * 4) as u64);
    assert_eq!(st.layers_ready, 1);
    assert_eq!(slim.session.resident_bytes(), (n * h * d * 4) as u64);
    assert_eq!(
        full.session.reserved_bytes(),
        2 * slim.session.reserved_bytes(),
        "half the arena capacity"
    );
    assert!(full.session.slim_stats().is_none());
}

#[test]
fn slim_is_refused_for_gqa_and_needs_w_kv_before_appends() {
    let e = Store::unlimited()
        .session_with(f32_shape(1, 4, 2, 8), Some(SlimSpec::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("slim mode needs an MHA model") && e.contains("GQA"),
        "{e}"
    );
    let (h, d, n) = (2usize, 8usize, 40usize);
    let shape = f32_shape(2, h as u32, h as u32, d as u32);
    let mut dc = serve_decode_with(shape, Some(SlimSpec::default()), "slim-bad");
    let (k, _, w) = slim_data(h, n, d, 71);
    let msg = |e: KvdexError| e.to_string();
    // No W_KV yet: the append is refused and nothing is stored.
    let e = msg(dc
        .h
        .append(0, n as u32, bytemuck::cast_slice(&k), &[])
        .unwrap_err());
    assert!(e.contains("slim layer 0 has no W_KV yet"), "{e}");
    assert_eq!(dc.session.len(0).unwrap(), 0);
    // W_KV of the wrong size, out of order, not finite, for an unknown layer.
    let e = msg(dc.h.set_wkv(0, &w[..10]).unwrap_err());
    assert!(e.contains("W_KV holds 10 floats"), "{e}");
    let dim = h * d;
    let e = msg(dc.session.set_wkv(0, 3, &w[..dim]).unwrap_err());
    assert!(e.contains("no upload in progress"), "{e}");
    dc.session.set_wkv(0, 0, &w[..dim]).unwrap();
    let e = msg(dc.session.set_wkv(0, 5, &w[..dim]).unwrap_err());
    assert!(e.contains("does not follow the 1 rows received"), "{e}");
    let mut nan = w.clone();
    nan[7] = f32::NAN;
    assert!(msg(dc.h.set_wkv(0, &nan).unwrap_err()).contains("W_KV"));
    assert!(matches!(
        dc.h.set_wkv(5, &w).unwrap_err(),
        KvdexError::NotFound(_)
    ));
    // With W_KV: the append works; then W_KV is fixed.
    dc.h.set_wkv(0, &w).unwrap();
    dc.h.append(0, n as u32, bytemuck::cast_slice(&k), &[])
        .unwrap();
    assert!(msg(dc.h.set_wkv(0, &w).unwrap_err()).contains("already holds tokens"));
    // Layer 1 has none: its retrieve is a defined empty answer, its append a clear error.
    assert!(msg(dc
        .h
        .append(1, n as u32, bytemuck::cast_slice(&k), &[])
        .unwrap_err())
    .contains("slim layer 1 has no W_KV"));
    // A K+V session refuses set_wkv.
    let mut plain = serve_decode(shape, "slim-plain");
    assert!(msg(plain.h.set_wkv(0, &w).unwrap_err()).contains("not created in slim mode"));
}

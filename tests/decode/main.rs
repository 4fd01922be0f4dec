//! The decode path through a real region and worker: seal, background build, retrieve with
//! partial attention merged against full attention, adaptive budgets, incremental inserts,
//! bad input, and sessions with static tokens of their own through the real daemon.
//!
//! One test binary (each file under `tests/` links the whole crate): this file holds the
//! harness the groups share (a session served by a real worker, filling it, waiting for a
//! build, the merge-against-full-attention check); the groups are `retrieve`, `seal`,
//! `slim`, `guide` and `statics`.

#[path = "../common/mod.rs"]
mod common;
mod guide;
mod retrieve;
mod seal;
#[path = "../shm_common/mod.rs"]
mod shm_common;
mod slim;
mod statics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex::store::{DecodeConfig, Session, Shape, SlimSpec, Store};
use kvdex::worker::{NoopObserver, Worker, WorkerConfig};
use kvdex_client::{merge, Client, SessionHandle};
use kvdex_wire::shm::Region;
use shm_common::*;

/// Sinks the engine keeps (static tokens at the start).
const S: usize = 4;
/// Recent window the engine keeps (static tokens at the end).
const W: usize = 8;

/// A session served by a real worker over a real region, and the client's handle to it.
struct Decode {
    _worker: Worker,
    session: Arc<Session>,
    h: SessionHandle,
}

/// [`serve_decode_with`] with K and V both stored.
fn serve_decode(shape: Shape, tag: &str) -> Decode {
    serve_decode_with(shape, None, tag)
}

/// A session of `shape` (Slim when `slim` is given) with sinks [`S`] and window [`W`], served
/// by a worker on a fresh region named after `tag`, and attached.
fn serve_decode_with(shape: Shape, slim: Option<SlimSpec>, tag: &str) -> Decode {
    serve_decode_cfg(shape, slim, test_config(), tag)
}

/// The tests' decode settings: sinks [`S`], window [`W`], inserts of 8 tokens.
fn test_config() -> DecodeConfig {
    DecodeConfig {
        sinks: S,
        window: W,
        build_threads: 2,
        insert_batch: 8,
        ..Default::default()
    }
}

/// [`serve_decode_with`] with decode settings `cfg`.
fn serve_decode_cfg(shape: Shape, slim: Option<SlimSpec>, cfg: DecodeConfig, tag: &str) -> Decode {
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
        WorkerConfig {
            wait: test_wait(),
            cpus: None,
        },
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

/// Waits (up to 120 s) until `layer`'s background build is ready; panics if it failed.
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
    check_merge_exact_with(every, &mut dc.h, (S, W), q, k, v, n, hq, kv, d);
    // The rows were copied by the link's gather into the registered payload arena.
    assert_eq!(dc.session.link().dest_stats().destinations, 1);
}

#[allow(clippy::too_many_arguments)]
/// [`check_merge_is_exact`] for any session handle (one served by the daemon too) whose
/// static tokens are `(sinks, window)`: the retrieve never returns one of them, and (`every`)
/// returns every other token.
fn check_merge_exact_with(
    every: bool,
    h: &mut SessionHandle,
    (sinks, window): (usize, usize),
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
    let r = h.retrieve(0, q, &params).unwrap();
    assert_eq!(
        r.header.stride as usize,
        n - sinks - window,
        "clamped to the retrievable tokens"
    );
    let (kv_out, kv_lse) = (r.out.to_vec(), r.lse.to_vec());
    let group = hq / kv;
    let statics: Vec<usize> = (0..sinks).chain(n - window..n).collect();
    let (mut eng_out, mut eng_lse) = (vec![0f32; hq * d], vec![0f32; hq]);
    let mut want = vec![0f64; hq * d];
    for h in 0..hq {
        let ids = r.head_ids(h);
        let mut sorted: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "head {h}: no token twice");
        assert!(
            sorted.iter().all(|t| (sinks..n - window).contains(t)),
            "head {h}: no static token"
        );
        if every {
            assert_eq!(
                sorted,
                (sinks..n - window).collect::<Vec<_>>(),
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

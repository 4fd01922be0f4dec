//! Slim mode (K stored, V recomputed from `W_KV`): attention and gather equal the stored-V
//! path, and Slim is refused for GQA shapes and needs `W_KV` before appends.

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex::store::{SlimSpec, Store};
use kvdex_client::Error as KvdexError;
use kvdex_index::attend::BudgetParams;

use crate::shm_common::*;
use crate::{serve_decode, serve_decode_with};

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
    let owned = |g: kvdex_client::GatheredRows<'_>| (g.k.to_vec(), g.v.to_vec());
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
    fn msg(e: impl std::fmt::Display) -> String {
        e.to_string()
    }
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

//! Int8 storage (`"kv_format": "int8"`) through the real `kvdex serve` binary and shared memory:
//! a session that stores int8 rows with one scale each answers retrieves (attend and gather)
//! that equal exact f32 attention over its dequantized rows, stay close to an f16 session fed
//! the same rows, and holds about half the bytes; a bad `kv_format` is a 400 naming it.

#[path = "../common/mod.rs"]
mod common;

use half::f16;
use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex::store::{KvFormat, Shape};
use kvdex_client::{Client, SessionHandle, SessionOptions};
use kvdex_index::quant::quantize_row;
use kvdex_index::{IndexKind, KeyDtype};
use serde_json::{json, Value};

use common::{http, Daemon};

/// Sinks and window the daemon runs with.
const S: usize = 4;
const W: usize = 8;
/// Query heads, KV heads, head_dim, tokens.
const HQ: usize = 4;
const KV: usize = 2;
const D: usize = 64;
const N: usize = 400;

fn shape() -> Shape {
    Shape {
        layers: 1,
        q_heads: HQ as u32,
        kv_heads: KV as u32,
        head_dim: D as u32,
        dtype: KeyDtype::F16,
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Rows `[kv][n][d]` in f16, with uneven magnitudes per token (so scales differ per row).
fn f16_rows(seed: u64) -> Vec<f16> {
    values(KV * N * D, seed)
        .iter()
        .enumerate()
        .map(|(i, &x)| f16::from_f32(x * (0.5 + ((i / D) % 7) as f32)))
        .collect()
}

/// What the daemon stores for f16 rows: each row quantized, then dequantized to f32.
fn dequantized(rows: &[f16]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len());
    let (mut codes, mut x) = (vec![0i8; D], vec![0f32; D]);
    for row in rows.chunks_exact(D) {
        x.iter_mut().zip(row).for_each(|(o, h)| *o = h.to_f32());
        let s = quantize_row(&x, &mut codes).to_f32();
        out.extend(codes.iter().map(|&c| s * f32::from(c)));
    }
    out
}

/// Exact attention of `q` over rows `ids` of `k`, `v` (`[n][d]` of one KV head), in f64.
fn exact(k: &[f32], v: &[f32], q: &[f32], ids: &[u32], scale: f64) -> (Vec<f64>, f64) {
    let logits: Vec<f64> = ids
        .iter()
        .map(|&i| {
            let row = &k[i as usize * D..(i as usize + 1) * D];
            scale
                * row
                    .iter()
                    .zip(q)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let sum: f64 = w.iter().sum();
    let mut out = vec![0f64; D];
    for (&wi, &i) in w.iter().zip(ids) {
        for (o, x) in out.iter_mut().zip(&v[i as usize * D..(i as usize + 1) * D]) {
            *o += wi / sum * *x as f64;
        }
    }
    (out, m + sum.ln())
}

fn create(client: &Client, kv_format: Option<KvFormat>) -> SessionHandle {
    let opts = SessionOptions {
        kv_format,
        ..Default::default()
    };
    client.create_session(shape(), opts).unwrap()
}

fn params(budget: Budget) -> RetrieveParams {
    RetrieveParams {
        budget,
        attend: true,
        gather: true,
        scale: None,
    }
}

fn session_stats<'a>(st: &'a Value, id: &str) -> &'a Value {
    st["per_session"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("session {id} missing from /stats: {st}"))
}

#[test]
fn int8_sessions_attend_and_gather_on_their_dequantized_rows() {
    let d = Daemon::start(&[
        ("KVDEX_DECODE__SINKS", &S.to_string()),
        ("KVDEX_DECODE__WINDOW", &W.to_string()),
        ("KVDEX_DECODE__BUILD_THREADS", "1"),
    ]);
    let client = Client::connect(&d.base).unwrap();
    let mut int8 = create(&client, Some(KvFormat::Int8));
    let mut half = create(&client, None);
    let (k, v) = (f16_rows(1), f16_rows(2));
    for h in [&mut int8, &mut half] {
        h.append(
            0,
            N as u32,
            bytemuck::cast_slice(&k),
            bytemuck::cast_slice(&v),
        )
        .unwrap();
    }
    let (kq, vq) = (dequantized(&k), dequantized(&v));

    // The budget counts int8 rows and their scales: (64 + 2) / 128 of f16.
    let st = http::get_json(&d.base, "/stats").1;
    let (a, b) = (
        session_stats(&st, int8.id().unwrap()),
        session_stats(&st, half.id().unwrap()),
    );
    assert_eq!(a["kv_format"], "int8");
    assert_eq!(b["kv_format"], "f16");
    assert_eq!(a["bytes_per_token"], json!(2 * KV * (D + 2)));
    assert_eq!(b["bytes_per_token"], json!(2 * KV * 2 * D));
    let resident = |s: &Value| s["resident_bytes"].as_f64().unwrap();
    assert_eq!(resident(a), (N * 2 * KV * (D + 2)) as f64);
    let reserved = |s: &Value| s["reserved_bytes"].as_f64().unwrap();
    assert!(
        reserved(a) <= 0.53 * reserved(b),
        "int8 reserves {} of f16's {}",
        reserved(a),
        reserved(b)
    );

    // Every retrievable token (an exact scan), then a top-16 through a sealed graph index.
    let q: Vec<f32> = values(HQ * D, 3).iter().map(|x| x * 2.0).collect();
    let every = N - S - W;
    let scale = 1.0 / (D as f64).sqrt();
    for (round, budget) in [Budget::Fixed(every), Budget::Fixed(16)]
        .into_iter()
        .enumerate()
    {
        if round == 1 {
            for h in [&mut int8, &mut half] {
                h.seal(0, IndexKind::Graph, None).unwrap();
            }
            let ids = [int8.id().unwrap().to_owned(), half.id().unwrap().to_owned()];
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !ids.iter().all(|id| {
                let st = http::get_json(&d.base, "/stats").1;
                session_stats(&st, id)["layers"][0]["build"]["state"] == "ready"
            }) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the builds did not finish"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let p = params(budget);
        let r = int8.retrieve(0, &q, &p).unwrap();
        let (ids, kk, out, lse, rows) = (
            r.ids.to_vec(),
            r.k.to_vec(),
            r.out.to_vec(),
            r.lse.to_vec(),
            r.rows.to_vec(),
        );
        let stride = ids.len() / HQ;
        let f = half.retrieve(0, &q, &p).unwrap();
        let rb = D * 2;
        for h in 0..HQ {
            let g = h / (HQ / KV);
            let chosen = &ids[h * stride..h * stride + kk[h] as usize];
            let head = |x: &[f32]| x[g * N * D..(g + 1) * N * D].to_vec();
            let qh = &q[h * D..(h + 1) * D];
            // Attention over the rows the daemon holds: f32 exact to ~1e-5.
            let (want, want_lse) = exact(&head(&kq), &head(&vq), qh, chosen, scale);
            let got = &out[h * D..(h + 1) * D];
            for (x, y) in got.iter().zip(&want) {
                assert!(
                    (*x as f64 - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "head {h}: {x} vs {y}"
                );
            }
            assert!((lse[h] as f64 - want_lse).abs() <= 1e-5 * (1.0 + want_lse.abs()));
            // Gathered rows: the dequantized rows in the session dtype (f16), K then V.
            for (i, &id) in chosen.iter().enumerate() {
                for (plane, src) in [(0, &kq), (1, &vq)] {
                    let at = (h * 2 + plane) * stride * rb + i * rb;
                    let got: &[f16] = bytemuck::cast_slice(&rows[at..at + rb]);
                    let want = &src[(g * N + id as usize) * D..(g * N + id as usize + 1) * D];
                    assert!(got.iter().zip(want).all(|(a, b)| *a == f16::from_f32(*b)));
                }
            }
            // Against the f16 session: the same answer within int8's rounding. With every
            // token retrieved both attend over the same set; through the index the sets may
            // differ by a near tie, so only the exact round compares outputs.
            if round == 0 {
                let fo = &f.out[h * D..(h + 1) * D];
                let err: f64 = got
                    .iter()
                    .zip(fo)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let norm: f64 = fo.iter().map(|b| (*b as f64).powi(2)).sum();
                assert!(
                    (err / norm).sqrt() <= 0.02,
                    "head {h}: int8 out is {:.4} from f16's (relative)",
                    (err / norm).sqrt()
                );
                assert!(
                    (lse[h] - f.lse[h]).abs() <= 0.05,
                    "{} vs {}",
                    lse[h],
                    f.lse[h]
                );
            } else {
                let f_ids = &f.ids[h * stride..(h + 1) * stride];
                let shared = chosen.iter().filter(|i| f_ids.contains(i)).count();
                assert!(
                    shared * 10 >= chosen.len() * 7,
                    "head {h}: {shared} of {}",
                    chosen.len()
                );
            }
        }
    }
    // A plain gather dequantizes too.
    let g = int8.gather(0, 1, &[5, 6]).unwrap();
    let kb: &[f16] = bytemuck::cast_slice(&g.k[..D * 2]);
    assert!(kb
        .iter()
        .zip(&kq[(N + 5) * D..(N + 6) * D])
        .all(|(a, b)| *a == f16::from_f32(*b)));
}

#[test]
fn a_bad_kv_format_is_refused_by_name() {
    let d = Daemon::start(&[]);
    let body = |fmt: &str| {
        json!({"layers": 1, "q_heads": 2, "kv_heads": 1, "head_dim": 8, "dtype": "f16",
               "kv_format": fmt})
    };
    for bad in ["int4", "f32"] {
        let (st, text) = http::send(
            ureq::post(&format!("{}/v1/sessions", d.base)),
            Some(&body(bad)),
        );
        assert_eq!(st, 400, "{text}");
        assert!(text.contains("kv_format") && text.contains(bad), "{text}");
    }
    let slim = json!({"layers": 1, "q_heads": 2, "kv_heads": 2, "head_dim": 8, "dtype": "f16",
                      "kv_format": "int8", "slim": true});
    let (st, text) = http::send(ureq::post(&format!("{}/v1/sessions", d.base)), Some(&slim));
    assert_eq!(st, 400, "{text}");
    assert!(text.contains("int8") && text.contains("slim"), "{text}");
    for ok in ["int8", "f16"] {
        let (st, text) = http::send(
            ureq::post(&format!("{}/v1/sessions", d.base)),
            Some(&body(ok)),
        );
        assert_eq!(st, 201, "{text}");
    }
}

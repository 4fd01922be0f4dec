//! The findings of the adversarial review (issue 20), each against the real `kvdex serve`
//! binary: a request or a client that once took the daemon down now fails alone, and the
//! daemon keeps serving an honest session beside it.
//!
//! One test binary; the groups are `norms` (keys whose squared norm overflows, panics in
//! background jobs) and `region` (a client that races or truncates its shared memory).

mod budget;
#[path = "../common/mod.rs"]
mod common;
mod control;
mod liveness;
mod norms;
mod region;

use kvdex::store::Shape;
use kvdex_client::{Client, SessionHandle, SessionOptions};
use kvdex_index::KeyDtype;

use common::{http, Daemon};

/// 1 layer, 2 query heads over 1 KV head, head_dim 16, in `dtype`.
fn shape(dtype: KeyDtype) -> Shape {
    Shape {
        layers: 1,
        q_heads: 2,
        kv_heads: 1,
        head_dim: 16,
        dtype,
    }
}

/// Little-endian bytes of `xs` in `dtype` (f32 or bf16).
fn encode(xs: &[f32], dtype: KeyDtype) -> Vec<u8> {
    match dtype {
        KeyDtype::F32 => xs.iter().flat_map(|x| x.to_le_bytes()).collect(),
        KeyDtype::Bf16 => xs
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        KeyDtype::F16 => xs
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A session of `shape` with 2 sinks and a window of 4 (so a seal has tokens to index).
fn session(client: &Client, shape: Shape) -> SessionHandle {
    let opts = SessionOptions {
        payload_bytes: Some(1 << 20),
        sinks: Some(2),
        window: Some(4),
        ..Default::default()
    };
    client
        .create_session(shape, opts)
        .expect("create a session")
}

/// The daemon answers `/healthz`, and an honest session round-trips a ping.
fn assert_serving(d: &Daemon, honest: &mut SessionHandle) {
    assert_eq!(http::get(&d.base, "/healthz").0, 200, "daemon alive");
    assert_eq!(
        honest.ping(b"still here").expect("honest ping"),
        b"still here"
    );
}

/// Polls `/stats` until layer 0 of session `id` has a build state other than "building" (for
/// up to 60 s), and returns that state.
fn wait_build(base: &str, id: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (st, v) = http::get_json(base, "/stats");
        assert_eq!(st, 200);
        let state = v["per_session"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["id"] == id))
            .map(|s| {
                s["layers"][0]["build"]["state"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default();
        if state != "building" && !state.is_empty() {
            return state;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build never ended: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

//! End-to-end tests of the real `kvdex serve` binary: configuration, HTTP control plane, and
//! shutdown.
//!
//! One test binary (each file under `tests/` links the whole crate): this file holds the
//! data-plane helpers the groups share; the groups are `startup` (configuration, CLI,
//! shutdown), `data_plane` (the client through the daemon, stats, metrics) and `sessions`
//! (tokens, budget, dead clients), `seal_parts` (training queries larger than the arena),
//! `decode_metrics` (seal, build, retrieve and insert in `/metrics`). (`kvdex bench` is tested with kvdex-tools.).

#[path = "../common/mod.rs"]
mod common;
mod data_plane;
mod decode_metrics;
mod seal_parts;
mod sessions;
mod startup;

use kvdex::store::Shape;
use kvdex_index::KeyDtype;
use serde_json::Value;

use common::http;

/// The shape every data-plane test uses: 2 layers, 4 query heads over 2 KV heads, f32.
fn shape() -> Shape {
    Shape {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 16,
        dtype: KeyDtype::F32,
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn stats(base: &str) -> Value {
    let (st, v) = http::get_json(base, "/stats");
    assert_eq!(st, 200);
    v
}

/// Polls `/stats` until `done` holds (the reaper runs asynchronously), for up to 20 s.
fn wait_stats(base: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = stats(base);
        if done(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

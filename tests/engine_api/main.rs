//! The engine API through the real `kvdex serve` binary and the Rust client: multi-position
//! retrieves, asynchronous retrieves, truncate and fork of a session.
//!
//! # Layout
//! - `positions`: several query positions in one retrieve, each with its visibility limit.
//! - `pending`: retrieves submitted without waiting, overlapped with other requests.
//! - `edit`: truncate and fork.

#[path = "../common/mod.rs"]
mod common;
mod edit;
mod pending;
mod positions;

use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex::store::Shape;
use kvdex_client::{Client, SessionHandle, SessionOptions};
use kvdex_index::KeyDtype;

use common::Daemon;

/// Query heads, KV heads and head dim of every test session (2 layers, f32).
const HQ: usize = 4;
const KV: usize = 2;
const D: usize = 16;

fn shape() -> Shape {
    Shape {
        layers: 2,
        q_heads: HQ as u32,
        kv_heads: KV as u32,
        head_dim: D as u32,
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

/// A daemon and a session with 4 sinks and a window of 8.
fn open(d: &Daemon) -> SessionHandle {
    let client = Client::connect(&d.base).unwrap();
    let opts = SessionOptions {
        sinks: Some(4),
        window: Some(8),
        ..Default::default()
    };
    client.create_session(shape(), opts).unwrap()
}

/// Appends `n` tokens of seed `seed` to `layer`; returns the layer's length.
fn fill(s: &mut SessionHandle, layer: u32, n: usize, seed: u64) -> u64 {
    let (k, v) = (values(KV * n * D, seed), values(KV * n * D, seed + 1));
    s.append(
        layer,
        n as u32,
        bytemuck::cast_slice(&k),
        bytemuck::cast_slice(&v),
    )
    .unwrap()
}

fn attend(budget: Budget) -> RetrieveParams {
    RetrieveParams {
        budget,
        attend: true,
        gather: true,
        scale: None,
    }
}

/// A retrieve's results, owned.
#[derive(Debug, PartialEq)]
struct Owned {
    positions: usize,
    stride: u32,
    k: Vec<u32>,
    ids: Vec<u32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    rows: Vec<u8>,
}

impl From<kvdex_client::Retrieved<'_>> for Owned {
    fn from(r: kvdex_client::Retrieved<'_>) -> Self {
        Self {
            positions: r.positions(),
            stride: r.header.stride,
            k: r.k.to_vec(),
            ids: r.ids.to_vec(),
            out: r.out.to_vec(),
            lse: r.lse.to_vec(),
            rows: r.rows.to_vec(),
        }
    }
}

impl Owned {
    /// The K then V rows gathered for row `h`'s chosen tokens (the rest of its stride is
    /// not written).
    fn chosen_rows(&self, h: usize) -> (Vec<u8>, Vec<u8>) {
        let (s, k) = (self.stride as usize, self.k[h] as usize);
        let rb = D * 4;
        let base = h * 2 * s * rb;
        (
            self.rows[base..base + k * rb].to_vec(),
            self.rows[base + s * rb..base + (s + k) * rb].to_vec(),
        )
    }
}

//! Shared set-up of the in-process data-plane tests: a session, a region and a worker.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use kvdex::store::{Session, Shape};
use kvdex::worker::{ExitReason, NoopObserver, Worker, WorkerConfig};
use kvdex_wire::shm::wait::WaitPolicy;
use kvdex_wire::shm::Region;

/// A running worker and what a test needs to reach it.
pub struct Served {
    pub worker: Worker,
    pub path: PathBuf,
    pub token: [u8; 16],
    pub session: Arc<Session>,
    pub exits: Receiver<ExitReason>,
}

pub fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!(
        "kvdex-it-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Short spins and parks so that tests exercise parking and notice deaths quickly.
pub fn test_wait() -> WaitPolicy {
    WaitPolicy {
        spin: Duration::from_micros(20),
        park_timeout: Duration::from_millis(10),
        ..Default::default()
    }
}

pub fn serve(shape: Shape, payload_bytes: u64, tag: &str) -> Served {
    let path = temp_path(tag);
    let region = Region::create(&path, payload_bytes).unwrap();
    let session = Arc::new(Session::new(shape).unwrap());
    let token: [u8; 16] =
        std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(tag.len() as u8));
    let (tx, exits) = channel();
    let worker = Worker::spawn_with(
        region,
        session.clone(),
        token,
        Arc::new(NoopObserver),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
        WorkerConfig {
            wait: test_wait(),
            cpus: None,
        },
    )
    .unwrap();
    Served {
        worker,
        path,
        token,
        session,
        exits,
    }
}

pub fn f32_shape(layers: u32, q_heads: u32, kv_heads: u32, head_dim: u32) -> Shape {
    Shape {
        layers,
        q_heads,
        kv_heads,
        head_dim,
        dtype: kvdex_index::KeyDtype::F32,
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

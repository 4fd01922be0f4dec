//! Online recall sampling through a real worker and region (`drift`), through a real daemon
//! scraped by a real Prometheus (`prometheus`). (`kvdex bench decode --sample-rate` is tested with kvdex-tools.)
//!
//! One test binary: this file holds the harness the groups share (a session served by a real
//! worker with sampling settings of the test's own, a retrieve that waits for its sample to be
//! scored).

#[path = "../common/mod.rs"]
mod common;
mod drift;
mod prometheus;
#[path = "../shm_common/mod.rs"]
mod shm_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvdex::store::retrieve::RetrieveParams;
use kvdex::store::sampler::QualityReport;
use kvdex::store::{DecodeConfig, Session, Shape, Store};
use kvdex::worker::{NoopObserver, Worker, WorkerConfig};
use kvdex_client::{Client, SessionHandle};
use kvdex_wire::shm::Region;
use shm_common::*;

/// A session served by a real worker over a real region, and the client's handle to it.
struct Served {
    _worker: Worker,
    session: Arc<Session>,
    h: SessionHandle,
}

/// A session of `shape` with decode settings `cfg`, served by a worker on a fresh region.
fn serve_with(shape: Shape, cfg: DecodeConfig, tag: &str) -> Served {
    let session = Arc::new(Store::unlimited().with_decode(cfg).session(shape).unwrap());
    let path = temp_path(tag);
    let region = Region::create(&path, 8 << 20).unwrap();
    let token = [9u8; 16];
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
    Served {
        _worker: worker,
        session,
        h,
    }
}

/// Waits up to 60 s for `layer`'s index build to be ready.
fn wait_ready(s: &Session, layer: u32) {
    let t = Instant::now();
    loop {
        let st = s.build_status(layer).unwrap();
        match st.state {
            "ready" => return,
            "failed" => panic!("build failed: {:?}", st.error),
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(60), "build timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Retrieves `q` from layer 0 (every retrieve sampled: the session samples at rate 1) until
/// one is scored rather than dropped by the CPU cap, and returns the session's report then.
fn sampled_retrieve(s: &mut Served, q: &[f32], p: &RetrieveParams) -> QualityReport {
    let before = s.session.quality_report();
    let drops = |r: &QualityReport| r.dropped_cpu_cap + r.dropped_queue_full;
    let mut dropped = drops(&before);
    let t = Instant::now();
    loop {
        s.h.retrieve(0, q, p).unwrap();
        loop {
            let now = s.session.quality_report();
            if now.sampled_requests > before.sampled_requests {
                return now;
            }
            if drops(&now) > dropped {
                dropped = drops(&now);
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no sample scored");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

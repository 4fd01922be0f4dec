//! Every arena and registration a session makes is released when the session ends, whichever
//! way it ends: 1,000 sessions on the host link and on `default_link()` (CUDA when present).

use std::sync::Arc;

use kvdex_transfer::host::HostConfig;
use kvdex_transfer::{
    default_link, AllocStats, Arena, DestStats, DeviceLink, HostLink, Registration, Run,
};
use rand::{Rng, SeedableRng};

/// What one session holds: KV arenas, an output buffer registered as a destination.
struct Session {
    arenas: Vec<Arena>,
    // Field order matters: the registration unregisters before the buffer it names is freed.
    registration: Registration,
    _out: Vec<u8>,
}

fn open_session(link: &Arc<dyn DeviceLink>, rng: &mut impl Rng) -> Session {
    let arenas: Vec<Arena> = (0..rng.gen_range(1..=3))
        .map(|_| {
            // Mostly small; now and then past 2 MiB, where the host link maps hugepages.
            let bytes = if rng.gen_bool(0.1) {
                3 << 20
            } else {
                rng.gen_range(1..64) << 10
            };
            link.alloc_arena(bytes).expect("arena")
        })
        .collect();
    let mut out = vec![0u8; 64 << 10];
    // SAFETY: `out` lives in the session beside the registration and is dropped after it.
    let id = unsafe { link.register_host(out.as_mut_ptr(), out.len()) }.expect("register");
    Session {
        arenas,
        registration: Registration::new(link.clone(), id),
        _out: out,
    }
}

fn churn(link: Arc<dyn DeviceLink>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut live: Vec<Session> = Vec::new();
    let mut peak = AllocStats::default();
    for i in 0..1000 {
        live.push(open_session(&link, &mut rng));
        let s = &live[rng.gen_range(0..live.len())];
        let src = &s.arenas[0];
        let runs = [Run {
            src_offset: 0,
            dst_offset: 0,
            len: 1024,
        }];
        let t = link
            .gather(src, &runs, s.registration.id())
            .expect("gather");
        // Half the tickets are never collected, as when a client dies mid-request.
        if i % 2 == 0 {
            link.wait(t).expect("wait");
        }
        peak.arenas = peak.arenas.max(link.stats().arenas);
        peak.bytes = peak.bytes.max(link.stats().bytes);
        // Sessions end in random order, several at a time.
        while live.len() > 8 || (!live.is_empty() && rng.gen_bool(0.3)) {
            let k = rng.gen_range(0..live.len());
            live.swap_remove(k);
        }
    }
    assert!(peak.arenas > 0 && peak.bytes > 0);
    drop(live);
    assert_eq!(
        link.stats(),
        AllocStats::default(),
        "{} leaked arenas",
        link.name()
    );
    assert_eq!(
        link.dest_stats(),
        DestStats::default(),
        "{} leaked destinations",
        link.name()
    );
}

#[test]
fn a_thousand_sessions_on_the_host_link_leave_nothing_behind() {
    churn(Arc::new(HostLink::with_config(HostConfig {
        threads: 2,
        parallel_min_bytes: 0,
        ..Default::default()
    })));
}

#[test]
fn a_thousand_sessions_on_the_default_link_leave_nothing_behind() {
    let link = default_link();
    eprintln!("default link: {}", link.name());
    churn(link);
}

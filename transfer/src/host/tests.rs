use rand::{Rng, SeedableRng};

use super::*;
use crate::RUN_ALIGN;

fn filled_arena(link: &HostLink, len: usize, seed: u64) -> Arena {
    let a = link.alloc_arena(len).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // SAFETY: the arena owns len bytes and no gather is in flight yet.
    let bytes = unsafe { std::slice::from_raw_parts_mut(a.as_mut_ptr(), len) };
    rng.fill(bytes);
    a
}

fn arena_bytes(a: &Arena) -> &[u8] {
    // SAFETY: tests read arenas only while nothing writes them.
    unsafe { std::slice::from_raw_parts(a.as_ptr(), a.len()) }
}

fn random_runs(rng: &mut impl Rng, src_len: u64, n: usize, max_units: u64) -> (Vec<Run>, u64) {
    let mut runs = Vec::with_capacity(n);
    let mut at = 0;
    for _ in 0..n {
        let len = rng.gen_range(1..=max_units) * RUN_ALIGN;
        let src_offset = rng.gen_range(0..=(src_len - len) / RUN_ALIGN) * RUN_ALIGN;
        runs.push(Run {
            src_offset,
            dst_offset: at,
            len,
        });
        at += len;
    }
    (runs, at)
}

fn reference(src: &[u8], dst: &mut [u8], runs: &[Run]) {
    for r in runs {
        let (s, d, l) = (r.src_offset as usize, r.dst_offset as usize, r.len as usize);
        dst[d..d + l].copy_from_slice(&src[s..s + l]);
    }
}

#[test]
fn arenas_are_counted_and_released() {
    let link = HostLink::new();
    let a = link.alloc_arena(4096).unwrap();
    assert_eq!(a.as_ptr() as usize % 64, 0);
    assert_eq!(
        link.stats(),
        AllocStats {
            arenas: 1,
            bytes: 4096
        }
    );
    drop(a);
    assert_eq!(link.stats(), AllocStats::default());
}

#[test]
fn random_gathers_match_a_reference_copy() {
    // parallel_min_bytes at its floor so that the pool path is exercised on any machine.
    let link = HostLink::with_config(HostConfig {
        threads: 3,
        parallel_min_bytes: 0,
        ..Default::default()
    });
    let src = filled_arena(&link, 16 << 20, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    // Small rows inline, small rows on the pool, whole blocks, and runs split across threads.
    for &(n, max_units) in &[(50, 16), (4000, 16), (100, 4096), (6, 200_000)] {
        let (mut runs, dst_len) = random_runs(&mut rng, src.len() as u64, n, max_units);
        let mut dst = vec![0u8; dst_len as usize];
        let mut want = vec![0u8; dst_len as usize];
        reference(arena_bytes(&src), &mut want, &runs);
        // SAFETY: dst outlives the registration and is untouched until the ticket is waited.
        let id = unsafe { link.register_host(dst.as_mut_ptr(), dst.len()) }.unwrap();
        let t = link.gather(&src, &runs, id).unwrap();
        link.wait(t).unwrap();
        link.unregister(id).unwrap();
        assert!(dst == want, "{n} runs of up to {max_units} x 16 B");

        // The same runs in reverse destination order take the serial path; same bytes.
        runs.reverse();
        let mut back = vec![0u8; dst_len as usize];
        // SAFETY: as above.
        let id = unsafe { link.register_host(back.as_mut_ptr(), back.len()) }.unwrap();
        let t = link.gather(&src, &runs, id).unwrap();
        while !link.poll(t).unwrap() {
            std::thread::yield_now();
        }
        link.unregister(id).unwrap();
        assert!(
            back == want,
            "reversed, {n} runs of up to {max_units} x 16 B"
        );
    }
    assert_eq!(link.outstanding(), 0);
}

#[test]
fn bad_input_gets_a_clear_error_and_copies_nothing() {
    let link = HostLink::with_config(HostConfig {
        capacity_bytes: 1 << 20,
        ..Default::default()
    });
    let src = filled_arena(&link, 4096, 3);
    let mut dst = vec![0u8; 1024];
    // SAFETY: dst outlives the registration; every gather below is refused or waited.
    let id = unsafe { link.register_host(dst.as_mut_ptr(), dst.len()) }.unwrap();
    let run = |s, d, l| Run {
        src_offset: s,
        dst_offset: d,
        len: l,
    };
    let cases: [(&[Run], &str); 5] = [
        (&[run(4000, 0, 256)], "past the arena's 4096 bytes"),
        (
            &[run(0, 0, 256), run(0, 896, 256)],
            "run 1 writes [896, +256) past the destination",
        ),
        (&[run(0, 0, 250)], "run 0 has length 250"),
        (&[run(0, 4, 256)], "destination offset 4"),
        (&[run(0, 0, 0)], "non-zero multiple of 16"),
    ];
    for (runs, needle) in cases {
        let e = link.gather(&src, runs, id).unwrap_err();
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
    }
    assert!(
        dst.iter().all(|&b| b == 0),
        "nothing copied on a refused batch"
    );

    let e = link.alloc_arena(1 << 20).unwrap_err();
    assert!(matches!(e, TransferError::Exhausted { requested, .. } if requested == 1 << 20));

    link.unregister(id).unwrap();
    let e = link.unregister(id).unwrap_err();
    assert!(
        matches!(e, TransferError::StaleDestination(_)),
        "double unregister: {e}"
    );
    let e = link.gather(&src, &[run(0, 0, 16)], id).unwrap_err();
    assert!(
        matches!(e, TransferError::StaleDestination(_)),
        "stale handle: {e}"
    );
    let e = link
        .gather(&src, &[run(0, 0, 16)], DestId(12345))
        .unwrap_err();
    assert!(
        matches!(e, TransferError::UnknownDestination(12345)),
        "unknown handle: {e}"
    );
    let e = link
        .register_ipc(&IpcMemHandle([0; 64]), 0, 64, None)
        .unwrap_err();
    assert!(matches!(e, TransferError::Unsupported { .. }));
    assert!(matches!(
        link.wait(Ticket(777)),
        Err(TransferError::UnknownTicket(777))
    ));
    // SAFETY: null is refused before it is stored.
    assert!(unsafe { link.register_host(std::ptr::null_mut(), 16) }.is_err());
}

#[test]
fn freeing_waits_for_in_flight_gathers() {
    let link = HostLink::with_config(HostConfig {
        threads: 2,
        parallel_min_bytes: 0,
        ..Default::default()
    });
    let len = 64 << 20;
    let src = filled_arena(&link, len, 4);
    let want = arena_bytes(&src).to_vec();
    let mut dst = vec![0u8; len];
    // SAFETY: dst outlives the registration and is read only after unregister returns.
    let id = unsafe { link.register_host(dst.as_mut_ptr(), len) }.unwrap();
    let runs: Vec<Run> = (0..64u64)
        .map(|i| Run {
            src_offset: i << 20,
            dst_offset: i << 20,
            len: 1 << 20,
        })
        .collect();
    let t = link.gather(&src, &runs, id).unwrap();
    // Drop and unregister at once: both must wait for the copy, not cut it short.
    drop(src);
    link.unregister(id).unwrap();
    assert!(dst == want);
    assert_eq!(link.stats(), AllocStats::default());
    link.wait(t).unwrap();
}

#[test]
fn caller_alone_below_the_parallel_threshold_completes_before_returning() {
    let link = HostLink::with_config(HostConfig {
        threads: 2,
        parallel_min_bytes: u64::MAX,
        ..Default::default()
    });
    let src = filled_arena(&link, 8 << 20, 5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    // 4 MiB of 4 KiB..64 KiB runs: large enough that the pool would take part at its floor.
    let (runs, dst_len) = random_runs(&mut rng, src.len() as u64, 128, 4096);
    let mut want = vec![0u8; dst_len as usize];
    reference(arena_bytes(&src), &mut want, &runs);
    let mut dst = vec![0u8; dst_len as usize];
    // SAFETY: dst outlives the registration and is read only after unregister returns.
    let id = unsafe { link.register_host(dst.as_mut_ptr(), dst.len()) }.unwrap();
    let t = link.gather(&src, &runs, id).unwrap();
    assert!(
        link.poll(t).unwrap(),
        "copied on the caller before gather returned"
    );
    link.unregister(id).unwrap();
    assert!(dst == want);
}

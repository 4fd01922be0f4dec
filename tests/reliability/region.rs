//! Findings 6 and 2: what a client does to its own shared memory hurts only its session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvdex_index::KeyDtype;
use kvdex_wire::shm::Region;

use crate::common::Daemon;
use crate::{assert_serving, session, shape};

/// Finding 6: the NaN check read K from shared memory and the copy read it again, so a
/// client flipping the arena between a finite value and NaN got NaN stored (42 of 270 racing
/// appends). Now K is copied once and the copy is checked and stored: whatever the race,
/// every stored key is finite.
#[test]
fn a_key_rewritten_during_its_append_is_never_stored_unchecked() {
    let d = Daemon::start(&[]);
    let client = kvdex_client::Client::connect(&d.base).unwrap();
    let mut honest = session(&client, shape(KeyDtype::F32));
    let mut s = session(&client, shape(KeyDtype::F32));
    let (tokens, dim) = (4usize, 16usize);
    let k = vec![1.0f32; tokens * dim];
    let kb: Vec<u8> = k.iter().flat_map(|x| x.to_le_bytes()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let racer = {
        let mut region = Region::open(s.region().path()).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            // The append body is a 16-byte header, then K: flip K's words between NaN and 1.
            let words = region.arena_mut()[16..16 + kb_len(tokens, dim)].as_mut_ptr() as *mut u32;
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let bits = if flips.is_multiple_of(2) {
                    f32::NAN
                } else {
                    1.0
                }
                .to_bits();
                for i in 0..tokens * dim {
                    // SAFETY: `words` points at tokens*dim u32 inside this thread's own
                    // mapping of the arena (4-byte aligned: the arena is 64-byte aligned and
                    // the offset 16); another mapping writing it concurrently is the race
                    // under test, and plain u32 stores cannot tear.
                    unsafe { words.add(i).write_volatile(bits) };
                }
                flips += 1;
            }
        })
    };
    let (mut stored, mut refused) = (0u32, 0u32);
    for _ in 0..3000 {
        match s.append(0, tokens as u32, &kb, &kb) {
            Ok(_) => stored += tokens as u32,
            Err(e) => {
                assert!(e.to_string().contains("NaN or infinite"), "{e}");
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    assert!(
        stored > 0 && refused > 0,
        "the race ran: {stored} stored, {refused} refused"
    );
    let ids: Vec<u32> = (0..stored).collect();
    for chunk in ids.chunks(1024) {
        let rows = s.gather(0, 0, chunk).unwrap();
        let bad = rows
            .k
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .position(|x| !x.is_finite());
        assert_eq!(
            bad, None,
            "a NaN was stored ({stored} tokens, {refused} refused)"
        );
    }
    assert_serving(&d, &mut honest);
}

fn kb_len(tokens: usize, dim: usize) -> usize {
    tokens * dim * 4
}

/// Finding 2: a client that truncated its region file killed the daemon with SIGBUS at the
/// worker's next touch of the header. Now only that session ends; the daemon and a neighbour
/// go on, and a new session is served.
#[test]
fn a_client_truncating_its_region_ends_only_its_session() {
    let d = Daemon::start(&[]);
    let client = kvdex_client::Client::connect(&d.base).unwrap();
    let mut honest = session(&client, shape(KeyDtype::F32));
    let mut victim = session(&client, shape(KeyDtype::F32));
    assert_eq!(victim.ping(b"hi").unwrap(), b"hi");
    let id = victim.id().unwrap().to_owned();
    let path = victim.region().path().to_owned();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    // This process's own mapping is truncated too: touching it (even to detach) would raise
    // SIGBUS here. The handle is leaked instead.
    std::mem::forget(victim);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, st) = crate::common::http::get_json(&d.base, "/stats");
        let listed = st["per_session"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["id"] == id.as_str()));
        if !listed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "session never ended: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_serving(&d, &mut honest);
    let mut fresh = session(&client, shape(KeyDtype::F32));
    assert_eq!(fresh.ping(b"new").unwrap(), b"new");
}

/// Finding 2, its other half: region files were sparse, so on a full tmpfs (64 MiB in a
/// default container) a session was created and the daemon died of SIGBUS at the first page
/// it could not have. Now the region is allocated at creation, and a region that does not fit
/// is refused there. Runs the daemon in a user and mount namespace of its own over a 2 MiB
/// tmpfs; skipped, saying so, where such namespaces are not allowed.
#[test]
fn a_region_that_does_not_fit_the_tmpfs_is_refused_at_creation() {
    let dir = std::env::temp_dir().join(format!("kvdex-small-shm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let probe = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(format!("mount -t tmpfs -o size=2m kvdex {}", dir.display()))
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot mount a tmpfs in a user namespace here");
        let _ = std::fs::remove_dir(&dir);
        return;
    }
    let script = format!(
        "mount -t tmpfs -o size=2m kvdex {} && exec {} serve --listen 127.0.0.1:0",
        dir.display(),
        env!("CARGO_BIN_EXE_kvdex")
    );
    let d = Daemon::start_with(
        std::process::Command::new("unshare").args(["-rm", "sh", "-c", &script]),
        &[("KVDEX_SESSIONS__SHM_DIR", dir.to_str().unwrap())],
    );
    let post = |payload: u64| {
        let body = serde_json::json!({"layers": 1, "q_heads": 2, "kv_heads": 1, "head_dim": 16,
            "dtype": "f32", "payload_bytes": payload});
        crate::common::http::send(ureq::post(&format!("{}/v1/sessions", d.base)), Some(&body))
    };
    let (st, text) = post(8 << 20);
    assert_eq!(st, 429, "{text}");
    assert!(text.contains("no room for a region"), "{text}");
    let (st, text) = post(64 << 10);
    assert_eq!(st, 201, "{text}");
    assert_eq!(crate::common::http::get(&d.base, "/healthz").0, 200);
    drop(d);
    let _ = std::fs::remove_dir(&dir);
}

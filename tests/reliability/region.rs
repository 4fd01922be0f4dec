//! Findings 6 and 2: what a client does to its own shared memory hurts only its session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvdex::shm::Region;
use kvdex_index::KeyDtype;

use crate::common::Daemon;
use crate::{assert_serving, session, shape};

/// Finding 6: the NaN check read K from shared memory and the copy read it again, so a
/// client flipping the arena between a finite value and NaN got NaN stored (42 of 270 racing
/// appends). Now K is copied once and the copy is checked and stored: whatever the race,
/// every stored key is finite.
#[test]
fn a_key_rewritten_during_its_append_is_never_stored_unchecked() {
    let d = Daemon::start(&[]);
    let client = kvdex::client::Client::connect(&d.base).unwrap();
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
                let bits = if flips % 2 == 0 { f32::NAN } else { 1.0 }.to_bits();
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

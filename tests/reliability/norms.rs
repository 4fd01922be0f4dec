//! Finding 1: a finite key of about 1e20 made hnsw_rs assert inside a build job, and the
//! build pool, with no panic handler, aborted the daemon.

use kvdex_index::{IndexKind, KeyDtype};

use crate::common::Daemon;
use crate::{assert_serving, encode, session, shape, values};

/// An f32 or bf16 key row holding 1e20 is refused at append, by name; the same keys without
/// it seal into an hnsw index; the daemon and a neighbour session live throughout.
#[test]
fn a_key_whose_squared_norm_overflows_is_refused_and_the_daemon_lives() {
    let d = Daemon::start(&[]);
    let client = kvdex_client::Client::connect(&d.base).unwrap();
    let mut honest = session(&client, shape(KeyDtype::F16));
    for dtype in [KeyDtype::F32, KeyDtype::Bf16] {
        let mut s = session(&client, shape(dtype));
        let n = 64;
        let mut k = values(n * 16, 7);
        let v = values(n * 16, 8);
        k[40 * 16 + 3] = 1e20;
        let e = s
            .append(0, n as u32, &encode(&k, dtype), &encode(&v, dtype))
            .expect_err("a key of 1e20 must be refused");
        let msg = e.to_string();
        assert!(
            msg.contains("K row 40") && msg.contains("squared norm"),
            "{dtype:?}: {msg}"
        );
        assert_serving(&d, &mut honest);
        // Nothing of the refused append was stored; the layer still takes clean keys, and an
        // hnsw build over them finishes.
        k[40 * 16 + 3] = 0.5;
        let len = s
            .append(0, n as u32, &encode(&k, dtype), &encode(&v, dtype))
            .expect("clean append");
        assert_eq!(len, n as u64);
        s.seal(0, IndexKind::Hnsw, None).expect("seal");
        let st = crate::wait_build(&d.base, s.id().unwrap());
        assert_eq!(st, "ready", "{dtype:?}");
        assert_serving(&d, &mut honest);
    }
}

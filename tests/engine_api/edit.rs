//! Truncate and fork of a session through the daemon.

use kvdex::store::retrieve::Budget;
use kvdex_client::Client;
use kvdex_index::IndexKind;

use crate::common::{http, Daemon};
use crate::{attend, fill, open, values, Owned, D, HQ, KV};

/// Every K row of `layer` (KV head 0), as bytes.
fn keys(s: &mut kvdex_client::SessionHandle, layer: u32, n: u32) -> Vec<u8> {
    let ids: Vec<u32> = (0..n).collect();
    s.gather(layer, 0, &ids).unwrap().k.to_vec()
}

#[test]
fn truncate_then_append_equals_a_fresh_session_with_the_same_rows() {
    let d = Daemon::start(&[]);
    let mut s = open(&d);
    fill(&mut s, 0, 1000, 1);
    fill(&mut s, 0, 2000, 2);
    fill(&mut s, 1, 3000, 1);
    s.seal(0, IndexKind::Flat, None).unwrap();
    // A truncate into what a running build indexes is refused: wait for the build.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !http::get_json(&d.base, "/stats")
        .1
        .to_string()
        .contains("\"ready\"")
    {
        assert!(std::time::Instant::now() < deadline, "build not ready");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let freed = s.truncate(1000).unwrap();
    assert!(freed > 0, "shrinking arenas gives memory back");
    fill(&mut s, 0, 40, 77);
    let mut fresh = open(&d);
    fill(&mut fresh, 0, 1000, 1);
    fill(&mut fresh, 0, 40, 77);
    assert_eq!(keys(&mut s, 0, 1040), keys(&mut fresh, 0, 1040));
    let stats = crate::common::http::get_json(&d.base, "/stats")
        .1
        .to_string();
    assert!(stats.contains("index dropped by a truncate"), "{stats}");
    let q = values(HQ * D, 5);
    let p = attend(Budget::Fixed(2000));
    let a: Owned = s.retrieve(0, &q, &p).unwrap().into();
    let b: Owned = fresh.retrieve(0, &q, &p).unwrap().into();
    assert_eq!((&a.k, &a.lse, &a.out), (&b.k, &b.lse, &b.out));
    assert!(a.ids.iter().all(|&i| i == u32::MAX || i < 1040 - 8));
    let e = s.truncate(5000).unwrap_err().to_string();
    assert!(
        e.contains("tokens = 5000") && e.contains("length 1040"),
        "{e}"
    );
}

#[test]
fn a_fork_diverges_without_touching_its_source_and_unknown_sessions_are_refused() {
    let d = Daemon::start(&[]);
    let mut s = open(&d);
    fill(&mut s, 0, 500, 3);
    let before = keys(&mut s, 0, 500);
    let mut f = s.fork().unwrap();
    assert_ne!(f.id(), s.id());
    assert_eq!(keys(&mut f, 0, 500), before);
    let q = values(HQ * D, 9);
    let p = attend(Budget::Fixed(64));
    let a: Owned = s.retrieve(0, &q, &p).unwrap().into();
    let b: Owned = f.retrieve(0, &q, &p).unwrap().into();
    assert_eq!((&a.ids, &a.lse), (&b.ids, &b.lse));
    f.truncate(100).unwrap();
    fill(&mut f, 0, 20, 11);
    fill(&mut f, 1, 7, 11);
    assert_eq!(keys(&mut s, 0, 500), before, "the source is untouched");
    let e = s.gather(1, 0, &[0]).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
    assert_eq!(f.gather(1, 0, &[6]).unwrap().k.len(), D * 4);
    // Unknown session, wrong token.
    let (code, body) = http::send(
        ureq::post(&format!("{}/v1/sessions/0123456789abcdef/fork", d.base))
            .set("Authorization", &format!("Bearer {}", "00".repeat(16))),
        None,
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("0123456789abcdef"), "{body}");
    let (code, _) = http::send(
        ureq::post(&format!("{}/v1/sessions/{}/fork", d.base, s.id().unwrap())),
        None,
    );
    assert_eq!(code, 401);
    let _ = (Client::connect(&d.base).unwrap(), KV);
}

//! Retrieves submitted without waiting.

use kvdex::store::retrieve::Budget;
use kvdex_client::RetrieveRequest;

use crate::common::Daemon;
use crate::{attend, fill, open, values, Owned, D, HQ};

#[test]
fn pending_retrieves_equal_waiting_ones_and_survive_other_requests() {
    let d = Daemon::start(&[]);
    let mut s = open(&d);
    fill(&mut s, 0, 200, 1);
    fill(&mut s, 1, 200, 3);
    let p = attend(Budget::Fixed(16));
    let (q0, q1) = (values(HQ * D, 7), values(3 * HQ * D, 8));
    let want0: Owned = s.retrieve(0, &q0, &p).unwrap().into();
    let limits = [150, 190, 200];
    let want1: Owned = s.retrieve_positions(1, &q1, &limits, &p).unwrap().into();
    // Two in flight, one per layer; other requests meanwhile; waited in reverse order.
    let a = s
        .submit_retrieve(&RetrieveRequest::new(0, &q0, &p))
        .unwrap();
    let b = s
        .submit_retrieve(&RetrieveRequest {
            limits: Some(&limits),
            ..RetrieveRequest::new(1, &q1, &p)
        })
        .unwrap();
    assert_eq!(s.ping(b"between").unwrap(), b"between");
    let other: Owned = s.retrieve(0, &values(HQ * D, 99), &p).unwrap().into();
    assert!(!same(&other, &want0));
    let got1: Owned = s.wait_retrieve(b).unwrap().into();
    assert!(same(&got1, &want1), "layer 1 differs");
    while !s.is_ready(&a).unwrap() {
        std::thread::yield_now();
    }
    let got0: Owned = s.wait_retrieve(a).unwrap().into();
    assert!(same(&got0, &want0), "layer 0 differs");
    // A failing pending retrieve reports its own error and frees its slot.
    let bad = s
        .submit_retrieve(&RetrieveRequest::new(7, &q0, &p))
        .unwrap();
    let e = s.wait_retrieve(bad).unwrap_err().to_string();
    assert!(e.contains("layer 7"), "{e}");
    let again: Owned = s.retrieve(0, &q0, &p).unwrap().into();
    assert!(same(&again, &want0));
}

/// Equal results: ids, k, out, lse and the chosen rows.
fn same(a: &Owned, b: &Owned) -> bool {
    (a.positions, a.stride, &a.k, &a.ids, &a.out, &a.lse)
        == (b.positions, b.stride, &b.k, &b.ids, &b.out, &b.lse)
        && (0..a.k.len()).all(|h| a.chosen_rows(h) == b.chosen_rows(h))
}

#[test]
fn a_pending_retrieve_larger_than_the_free_arena_is_refused_before_it_is_sent() {
    let d = Daemon::start(&[]);
    let mut s = open(&d);
    fill(&mut s, 0, 100, 1);
    let q = values(HQ * D, 7);
    let huge = attend(Budget::Fixed(1 << 26));
    let e = s
        .submit_retrieve(&RetrieveRequest::new(0, &q, &huge))
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger payload_bytes"), "{e}");
    let p = attend(Budget::Fixed(8));
    let a = s.submit_retrieve(&RetrieveRequest::new(0, &q, &p)).unwrap();
    assert_eq!(s.wait_retrieve(a).unwrap().k.len(), HQ);
}

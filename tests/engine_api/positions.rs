//! Several query positions in one retrieve.

use kvdex::store::retrieve::{Budget, NO_LIMIT};
use kvdex_client::RetrieveRequest;
use kvdex_index::attend::BudgetParams;
use kvdex_index::IndexKind;

use crate::common::Daemon;
use crate::{attend, fill, open, values, Owned, D, HQ};

#[test]
fn a_multi_position_retrieve_equals_one_retrieve_per_position() {
    let d = Daemon::start(&[]);
    let mut s = open(&d);
    let n = fill(&mut s, 0, 300, 1) as u32;
    // Sealed as a flat index, then more rows that are not inserted yet: a limit can cut into
    // the index, into the pending rows, into the window, or before the sinks' end.
    s.seal(0, IndexKind::Flat, None).unwrap();
    let n = n + fill(&mut s, 0, 60, 9) as u32 - 300;
    let limits = [NO_LIMIT, 200, n - 30, n - 3, 2];
    let q = values(limits.len() * HQ * D, 5);
    for budget in [
        Budget::Fixed(24),
        Budget::Adaptive(BudgetParams::new(0.9, 2, 48).unwrap()),
    ] {
        let p = attend(budget);
        let all: Owned = s.retrieve_positions(0, &q, &limits, &p).unwrap().into();
        assert_eq!(all.positions, limits.len());
        let stride = all.stride as usize;
        for (i, &lim) in limits.iter().enumerate() {
            let qi = &q[i * HQ * D..(i + 1) * HQ * D];
            let one: Owned = s.retrieve_positions(0, qi, &[lim], &p).unwrap().into();
            let r = i * HQ..(i + 1) * HQ;
            assert_eq!(all.k[r.clone()], one.k[..], "position {i}");
            assert_eq!(all.lse[r], one.lse[..], "position {i}");
            assert_eq!(all.out[i * HQ * D..(i + 1) * HQ * D], one.out[..]);
            assert_eq!(all.ids[i * HQ * stride..(i + 1) * HQ * stride], one.ids[..]);
            for h in 0..HQ {
                assert!(
                    all.chosen_rows(i * HQ + h) == one.chosen_rows(h),
                    "position {i} head {h}: gathered rows differ"
                );
            }
            let end = (n as usize - 8).min(lim.min(n) as usize);
            for h in 0..HQ {
                let row = i * HQ + h;
                let ids = &all.ids[row * stride..row * stride + all.k[row] as usize];
                assert!(
                    ids.iter()
                        .all(|&id| (4..end.max(4)).contains(&(id as usize))),
                    "position {i} (limit {lim}) saw {ids:?}"
                );
            }
        }
        // The unlimited position is the plain single-position retrieve.
        let plain: Owned = s.retrieve(0, &q[..HQ * D], &p).unwrap().into();
        assert_eq!(
            (plain.k, plain.lse),
            (all.k[..HQ].to_vec(), all.lse[..HQ].to_vec())
        );
    }
}

#[test]
fn bad_positions_and_limits_are_refused_by_name() {
    let d = Daemon::start(&[]);
    let mut s = open(&d);
    fill(&mut s, 0, 50, 1);
    let p = attend(Budget::Fixed(4));
    let e = s
        .retrieve_positions(0, &[], &[], &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("positions P = 0"), "{e}");
    let q = values(2 * HQ * D, 3);
    let e = s
        .retrieve_positions(0, &q, &[10, 51], &p)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("limits[1] = 51") && e.contains("length 50"),
        "{e}"
    );
    let r = RetrieveRequest {
        limits: Some(&[1]),
        ..RetrieveRequest::new(0, &q, &p)
    };
    let e = s.retrieve_request(&r).unwrap_err().to_string();
    assert!(e.contains("expected q_heads 4 x head_dim 16"), "{e}");
    // The session still serves.
    assert_eq!(s.retrieve(0, &q[..HQ * D], &p).unwrap().positions(), 1);
}

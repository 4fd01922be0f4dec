//! Codec tests for seal parts ([`SIGNAL_QUERIES_PART`]) and the slices the clients cut a
//! training set into.

use super::*;
use proptest::prelude::*;

/// `[q_heads][n][d]` with value `1000 h + 10 i + j` (head, position index, dimension).
fn training(q_heads: usize, n: usize, d: usize) -> Vec<f32> {
    (0..q_heads * n * d)
        .map(|x| (1000 * (x / (n * d)) + 10 * (x / d % n) + x % d) as f32)
        .collect()
}

#[test]
fn a_part_carries_its_positions_rows_of_every_head() {
    let (hq, n, d) = (3usize, 5usize, 2usize);
    let q = training(hq, n, d);
    let positions: Vec<u32> = (0..n as u32).map(|i| 100 + i).collect();
    let t = TrainingSlice {
        queries: &q,
        positions: &positions,
        q_heads: hq,
        range: 1..4,
    };
    let mut buf = vec![0u8; 256];
    let len = t.encode_part(7, &mut buf).unwrap();
    assert_eq!(len, SEAL_HEADER + t.bytes().unwrap());
    let SealRequest::Part(p) = SealRequest::decode(&buf[..len]).unwrap() else {
        panic!("a part expected")
    };
    assert_eq!((p.layer, p.start, p.n), (7, 1, 3));
    assert_eq!(
        bytemuck::cast_slice::<u8, u32>(p.positions),
        &[101, 102, 103]
    );
    // Head-major for the part's own positions: head h, positions 1..4.
    let want: Vec<f32> = (0..hq)
        .flat_map(|h| (1..4).flat_map(move |i| (0..d).map(move |j| (1000 * h + 10 * i + j) as f32)))
        .collect();
    assert_eq!(bytemuck::cast_slice::<u8, f32>(p.queries), &want[..]);
    // The same slice as a seal: kind and signal 0, the same body.
    let len2 = t.encode_seal(7, IndexKind::Hnsw, &mut buf).unwrap();
    assert_eq!(len2, len);
    let SealRequest::Seal(h, SealBody::Queries { queries, .. }) =
        SealRequest::decode(&buf[..len]).unwrap()
    else {
        panic!("a seal expected")
    };
    assert_eq!(
        (h.kind, h.n, h.signal),
        (IndexKind::Hnsw, 3, SIGNAL_QUERIES)
    );
    assert_eq!(bytemuck::cast_slice::<u8, f32>(queries), &want[..]);
    // Too small a buffer, a range past the positions, floats that do not split into heads.
    assert!(t.encode_part(7, &mut buf[..len - 1]).is_err());
    let past = TrainingSlice {
        range: 3..6,
        ..t.clone()
    };
    assert!(past.encode_part(7, &mut buf).is_err());
    let ragged = TrainingSlice {
        queries: &q[1..],
        ..t.clone()
    };
    let e = ragged.encode_part(7, &mut buf).unwrap_err().to_string();
    assert!(e.contains("do not split into 3 query heads"), "{e}");
}

#[test]
fn the_seal_header_decoder_refuses_a_part_and_names_the_signals() {
    let mut buf = [0u8; SEAL_HEADER];
    buf[12..16].copy_from_slice(&SIGNAL_QUERIES_PART.to_le_bytes());
    let e = SealHeader::decode(&buf).unwrap_err().to_string();
    assert!(e.contains("seal part"), "{e}");
    // As a request it is an empty part of layer 0.
    assert!(matches!(
        SealRequest::decode(&buf).unwrap(),
        SealRequest::Part(QueriesPart { n: 0, .. })
    ));
    buf[12..16].copy_from_slice(&3u32.to_le_bytes());
    let e = SealRequest::decode(&buf).unwrap_err().to_string();
    assert!(e.contains("signal 3") && e.contains("2 a part"), "{e}");
    // A part header cut short, and a part whose positions run past the body.
    let e = SealRequest::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs at least 16"), "{e}");
    let mut part = [0u8; SEAL_HEADER + 4];
    part[8..12].copy_from_slice(&2u32.to_le_bytes());
    part[12..16].copy_from_slice(&SIGNAL_QUERIES_PART.to_le_bytes());
    let e = SealRequest::decode(&part).unwrap_err().to_string();
    assert!(e.contains("2 training positions, but only 4 bytes"), "{e}");
}

proptest! {
    /// Cutting a training set into parts and decoding them gives back every position's rows,
    /// in order, whatever the cut.
    #[test]
    fn parts_round_trip_and_cover_the_set(
        hq in 1usize..5,
        n in 1usize..20,
        d in 1usize..5,
        layer in any::<u32>(),
        per in 1usize..8,
    ) {
        let q = training(hq, n, d);
        let positions: Vec<u32> = (0..n as u32).map(|i| 3 * i).collect();
        let mut got = vec![Vec::new(); hq];
        let mut got_pos = Vec::new();
        let mut at = 0;
        while at < n {
            let t = TrainingSlice {
                queries: &q,
                positions: &positions,
                q_heads: hq,
                range: at..(at + per).min(n),
            };
            let mut buf = vec![0u8; SEAL_HEADER + t.bytes().unwrap()];
            let len = t.encode_part(layer, &mut buf).unwrap();
            prop_assert_eq!(len, buf.len());
            let SealRequest::Part(p) = SealRequest::decode(&buf).unwrap() else {
                return Err(TestCaseError::fail("not a part"));
            };
            prop_assert_eq!((p.layer, p.start as usize), (layer, at));
            let v = bytemuck::cast_slice::<u8, f32>(p.queries);
            let m = p.n as usize;
            prop_assert_eq!(v.len(), hq * m * d);
            for (h, g) in got.iter_mut().enumerate() {
                g.extend_from_slice(&v[h * m * d..(h + 1) * m * d]);
            }
            got_pos.extend_from_slice(bytemuck::cast_slice::<u8, u32>(p.positions));
            at += m;
        }
        prop_assert_eq!(got.concat(), q);
        prop_assert_eq!(got_pos, positions);
    }

    /// Any body is either a request that decodes consistently or refused with a message;
    /// it never panics.
    #[test]
    fn any_seal_body_decodes_or_is_refused(
        words in proptest::collection::vec(any::<u32>(), 0..16),
        n in 0u32..8,
        signal in 0u32..4,
        tail in 0usize..4,
    ) {
        let mut body: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        if body.len() >= 16 {
            body[8..12].copy_from_slice(&n.to_le_bytes());
            body[12..16].copy_from_slice(&signal.to_le_bytes());
        }
        body.extend(std::iter::repeat_n(0u8, tail));
        match SealRequest::decode(&body) {
            Ok(SealRequest::Part(p)) => {
                prop_assert_eq!(p.positions.len(), 4 * p.n as usize);
                prop_assert_eq!(p.queries.len() % 4, 0);
                prop_assert_eq!(SEAL_HEADER + p.positions.len() + p.queries.len(), body.len());
            }
            Ok(SealRequest::Seal(h, _)) => prop_assert!(h.signal <= SIGNAL_NEIGHBOURS),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

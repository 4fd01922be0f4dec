//! Codec tests for the decode-path bodies.

use super::*;
use crate::store::retrieve::{Budget, RetrieveParams};
use kvdex_index::attend::BudgetParams;

#[test]
fn retrieve_header_round_trips_and_refuses_bad_budgets() {
    let h = RetrieveHeader {
        layer: 3,
        params: RetrieveParams {
            budget: Budget::Adaptive(BudgetParams::new(0.9, 4, 64).unwrap()),
            attend: true,
            gather: false,
            scale: Some(0.125),
        },
    };
    let q = [1.0f32, -2.0, 3.5];
    let mut buf = vec![0u8; 64];
    let n = h.encode(&q, &mut buf).unwrap();
    let (back, query) = RetrieveHeader::decode(&buf[..n]).unwrap();
    assert_eq!(back, h);
    assert_eq!(bytemuck::cast_slice::<u8, f32>(query), &q);
    // k = 0 with a fixed budget, and min_k = 0 with an adaptive one, are refused.
    let mut fixed = h;
    fixed.params.budget = Budget::Fixed(0);
    let n = fixed.encode(&q, &mut buf).unwrap();
    let e = RetrieveHeader::decode(&buf[..n]).unwrap_err().to_string();
    assert!(e.contains("k = 0"), "{e}");
    buf[12..16].copy_from_slice(&0u32.to_le_bytes());
    buf[20..24].copy_from_slice(&0.9f32.to_le_bytes());
    buf[4..8].copy_from_slice(&ADAPTIVE.to_le_bytes());
    let e = RetrieveHeader::decode(&buf[..n]).unwrap_err().to_string();
    assert!(e.contains("min_k 0"), "{e}");
    assert!(RetrieveHeader::decode(&buf[..20]).is_err());
    buf[4..8].copy_from_slice(&0x80u32.to_le_bytes());
    assert!(RetrieveHeader::decode(&buf[..n])
        .unwrap_err()
        .to_string()
        .contains("flags"));
}

#[test]
fn seal_header_round_trips_and_checks_lengths() {
    let h = SealHeader {
        layer: 1,
        kind: IndexKind::Graph,
        n: 2,
        signal: SIGNAL_QUERIES,
    };
    let mut buf = vec![0u8; 64];
    let n = h.encode(&[&[5, 9]], &[0.5; 4], &mut buf).unwrap();
    let (back, body) = SealHeader::decode(&buf[..n]).unwrap();
    assert_eq!(back, h);
    let SealBody::Queries { positions, queries } = body else {
        panic!("queries expected: {body:?}")
    };
    assert_eq!((positions.len(), queries.len()), (8, 16));
    buf[8..12].copy_from_slice(&100u32.to_le_bytes());
    assert!(SealHeader::decode(&buf[..n])
        .unwrap_err()
        .to_string()
        .contains("100 training"));
    buf[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(SealHeader::decode(&buf[..n])
        .unwrap_err()
        .to_string()
        .contains("kind 7"));
}

#[test]
fn set_wkv_header_round_trips_and_checks_the_row_count() {
    let h = SetWkvHeader {
        layer: 2,
        row_start: 4,
        rows: 2,
    };
    let mut buf = vec![0u8; 64];
    let n = h.encode(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut buf).unwrap();
    let (back, data) = SetWkvHeader::decode(&buf[..n], 3).unwrap();
    assert_eq!(back, h);
    assert_eq!(bytemuck::cast_slice::<u8, f32>(data)[5], 6.0);
    let e = SetWkvHeader::decode(&buf[..n], 4).unwrap_err().to_string();
    assert!(e.contains("2 rows of D = 4 floats, but 24 bytes"), "{e}");
    assert!(SetWkvHeader::decode(&buf[..8], 3).is_err());
    assert!(h.encode(&[0.0; 20], &mut buf).is_err());
}

#[test]
fn seal_neighbour_lists_round_trip_and_check_lengths() {
    let h = SealHeader {
        layer: 0,
        kind: IndexKind::Graph,
        n: 2,
        signal: SIGNAL_NEIGHBOURS,
    };
    let mut buf = vec![0u8; 64];
    let n = h
        .encode(&[&[0, 3], &[2, 1], &[10, 11, 12]], &[], &mut buf)
        .unwrap();
    let (back, body) = SealHeader::decode(&buf[..n]).unwrap();
    assert_eq!(back, h);
    let SealBody::Neighbours { heads, lens, ids } = body else {
        panic!("neighbours expected: {body:?}")
    };
    assert_eq!(bytemuck::cast_slice::<u8, u32>(heads), &[0, 3]);
    assert_eq!(bytemuck::cast_slice::<u8, u32>(lens), &[2, 1]);
    assert_eq!(bytemuck::cast_slice::<u8, u32>(ids), &[10, 11, 12]);
    // The lengths section cut short, an unknown signal, a ragged id section.
    let e = SealHeader::decode(&buf[..SEAL_HEADER + 12]).unwrap_err();
    assert!(e.to_string().contains("neighbour list lengths"), "{e}");
    assert!(SealHeader::decode(&buf[..n - 2])
        .unwrap_err()
        .to_string()
        .contains("multiple of 4"));
    buf[12..16].copy_from_slice(&9u32.to_le_bytes());
    assert!(SealHeader::decode(&buf[..n])
        .unwrap_err()
        .to_string()
        .contains("signal 9"));
}

#[test]
fn layout_sections_follow_each_other_and_overflow_is_none() {
    let l = RetrieveLayout::new(8, 10, 128, 256, true, true).unwrap();
    assert_eq!(l.k.start, RESPONSE_HEADER);
    assert_eq!(l.rows.len(), 8 * 2 * 10 * 256);
    assert_eq!(l.out.len(), 8 * 128 * 4);
    assert!(RetrieveLayout::new(usize::MAX / 2, 4, 1, 1, false, false).is_none());
    let h = ResponseHeader {
        q_heads: 8,
        stride: 10,
        scored: 1 << 40,
        search_us: 1.5,
        ..Default::default()
    };
    let mut b = [0u8; RESPONSE_HEADER];
    h.encode(&mut b).unwrap();
    assert_eq!(ResponseHeader::decode(&b).unwrap(), h);
}

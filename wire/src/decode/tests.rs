//! Codec tests for the decode-path bodies.

use super::*;
use crate::params::{Budget, RetrieveParams};
use kvdex_index::attend::BudgetParams;
use proptest::prelude::*;

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
        engine_rows: None,
        positions: 0,
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

fn fixed(k: usize, scale: Option<f32>) -> RetrieveHeader {
    RetrieveHeader {
        layer: 0,
        params: RetrieveParams {
            budget: Budget::Fixed(k),
            attend: true,
            gather: false,
            scale,
        },
        engine_rows: None,
        positions: 0,
    }
}

fn put_word(buf: &mut [u8], word: usize, v: u32) {
    buf[word * 4..word * 4 + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn no_scale_and_an_explicit_scale_have_distinct_encodings() {
    let mut buf = vec![0u8; 64];
    // Version 1 sent scale 0 for "default", so an explicit 0 silently meant 1/sqrt(head_dim).
    for bad in [0.0f32, -0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = fixed(4, Some(bad)).encode(&[], &mut buf).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "attention scale {bad} must be finite and positive"
            )),
            "{e}"
        );
    }
    let n = fixed(4, None).encode(&[], &mut buf).unwrap();
    assert_eq!(
        u32_at(&buf, 4),
        Some(ATTEND),
        "no SCALE flag without a scale"
    );
    assert_eq!(u32_at(&buf, 24), Some(0));
    assert_eq!(
        RetrieveHeader::decode(&buf[..n]).unwrap().0.params.scale,
        None
    );
    let n = fixed(4, Some(0.25)).encode(&[], &mut buf).unwrap();
    assert_eq!(u32_at(&buf, 4), Some(ATTEND | SCALE));
    assert_eq!(
        RetrieveHeader::decode(&buf[..n]).unwrap().0.params.scale,
        Some(0.25)
    );
    // A raw-wire client: the SCALE flag with 0 or NaN is refused by name, never "default".
    for bad in [0.0f32, f32::NAN, -2.0] {
        put_word(&mut buf, 6, bad.to_bits());
        let e = RetrieveHeader::decode(&buf[..n]).unwrap_err().to_string();
        assert!(e.contains(&format!("scale {bad} must be finite")), "{e}");
    }
    // A scale without the flag (what a version-1 client sends) is refused, not ignored.
    put_word(&mut buf, 1, ATTEND);
    put_word(&mut buf, 6, 0.5f32.to_bits());
    let e = RetrieveHeader::decode(&buf[..n]).unwrap_err().to_string();
    assert!(e.contains("scale field is 0.5 but the SCALE flag"), "{e}");
    // The reserved word must stay 0 (room for later fields).
    put_word(&mut buf, 6, 0);
    put_word(&mut buf, 7, 3);
    let e = RetrieveHeader::decode(&buf[..n]).unwrap_err().to_string();
    assert!(e.contains("reserved and must be 0, got 0x3"), "{e}");
}

#[test]
fn budgets_over_u32_are_refused_not_truncated() {
    let mut buf = vec![0u8; 64];
    let big = 1usize << 32;
    // `k as u32` used to send Fixed(1 << 32) as k 0.
    let e = fixed(big, None).encode(&[], &mut buf).unwrap_err();
    assert!(
        e.to_string()
            .contains("budget k = 4294967296 does not fit the retrieve wire (at most 4294967295)"),
        "{e}"
    );
    let n = fixed(u32::MAX as usize, None)
        .encode(&[], &mut buf)
        .unwrap();
    let (back, _) = RetrieveHeader::decode(&buf[..n]).unwrap();
    assert_eq!(back.params.budget, Budget::Fixed(u32::MAX as usize));
    for (min_k, max_k, what) in [
        (1, big + 5, "max_k = 4294967301"),
        (big, big, "min_k = 4294967296"),
    ] {
        let mut h = fixed(1, None);
        h.params.budget = Budget::Adaptive(BudgetParams::new(0.9, min_k, max_k).unwrap());
        let e = h.encode(&[], &mut buf).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
}

fn any_header() -> impl Strategy<Value = RetrieveHeader> {
    let fixed = (1..=u32::MAX).prop_map(|k| Budget::Fixed(k as usize));
    let adaptive = (1e-6f32..=1.0, 1..=u32::MAX, any::<u32>()).prop_map(|(c, lo, extra)| {
        let hi = lo.saturating_add(extra);
        Budget::Adaptive(BudgetParams::new(c, lo as usize, hi as usize).unwrap())
    });
    let scale = prop_oneof![Just(None), (f32::MIN_POSITIVE..=f32::MAX).prop_map(Some)];
    (
        any::<u32>(),
        prop_oneof![fixed, adaptive],
        any::<bool>(),
        any::<bool>(),
        scale,
        proptest::option::of((any::<u32>(), any::<u64>())),
    )
        .prop_map(
            |(layer, budget, attend, gather, scale, into)| RetrieveHeader {
                layer,
                params: RetrieveParams {
                    budget,
                    attend,
                    gather,
                    scale,
                },
                // Rows into an engine destination only with gather (the encoder refuses it alone).
                engine_rows: into
                    .filter(|_| gather)
                    .map(|(dest, offset)| EngineRows { dest, offset }),
                positions: 0,
            },
        )
}

proptest! {
    #[test]
    fn retrieve_headers_round_trip(
        h in any_header(),
        q in proptest::collection::vec(any::<f32>(), 0..40),
    ) {
        let ext = if h.engine_rows.is_some() { dest::ENGINE_ROWS_EXT } else { 0 };
        let mut buf = vec![0u8; RETRIEVE_HEADER + ext + 4 * q.len()];
        let n = h.encode(&q, &mut buf).unwrap();
        prop_assert_eq!(n, buf.len());
        let (back, query) = RetrieveHeader::decode(&buf).unwrap();
        prop_assert_eq!(back, h);
        prop_assert_eq!(query, &buf[RETRIEVE_HEADER + ext..]);
        // Too small a buffer is an error, never a panic or a partial write past it.
        prop_assert!(h.encode(&q, &mut buf[..n - 1]).is_err());
    }

    /// Any body either decodes to a header that re-encodes and decodes to itself, or is refused
    /// with a message; it never panics.
    #[test]
    fn any_retrieve_body_decodes_consistently_or_is_refused(
        words in proptest::collection::vec(any::<u32>(), 0..12),
        flags in 0u32..32,
        tail in 0usize..4,
    ) {
        let mut body: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        if body.len() >= 8 {
            body[4..8].copy_from_slice(&flags.to_le_bytes());
        }
        body.extend(std::iter::repeat_n(0u8, tail));
        match RetrieveHeader::decode(&body) {
            Ok((h, query)) => {
                let q: Vec<f32> = query.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let mut again = vec![0u8; body.len()];
                let n = h.encode(&q, &mut again).unwrap();
                let (back, _) = RetrieveHeader::decode(&again[..n]).unwrap();
                prop_assert_eq!(back, h);
                prop_assert_eq!(&again[RETRIEVE_HEADER..n], query);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
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
        slowest_head_us: 0.75,
        ..Default::default()
    };
    let mut b = [0u8; RESPONSE_HEADER];
    h.encode(&mut b).unwrap();
    assert_eq!(ResponseHeader::decode(&b).unwrap(), h);
}

proptest! {
    #[test]
    fn register_dest_bodies_round_trip(
        offset in any::<u64>(),
        len in 1..u64::MAX,
        mem in proptest::array::uniform32(any::<u8>()),
        event in proptest::option::of(proptest::array::uniform32(any::<u8>())),
    ) {
        // 64-byte handles from two 32-byte halves (proptest's arrays stop at 32).
        let wide = |h: [u8; 32]| {
            let mut w = [0u8; 64];
            w[..32].copy_from_slice(&h);
            w[32..].copy_from_slice(&h);
            w
        };
        let r = RegisterDest { offset, len, mem: wide(mem), event: event.map(wide) };
        let mut buf = [0u8; dest::REGISTER_DEST_BODY];
        prop_assert_eq!(r.encode(&mut buf).unwrap(), dest::REGISTER_DEST_BODY);
        prop_assert_eq!(RegisterDest::decode(&buf).unwrap(), r);
        prop_assert!(RegisterDest::decode(&buf[..dest::REGISTER_DEST_BODY - 1]).is_err());
        prop_assert!(r.encode(&mut buf[..100]).is_err());
    }
}

#[test]
fn bad_destination_bodies_are_refused_by_name() {
    let r = RegisterDest {
        offset: 0,
        len: 64,
        mem: [1; 64],
        event: None,
    };
    let mut buf = [0u8; dest::REGISTER_DEST_BODY];
    r.encode(&mut buf).unwrap();
    let refused = |b: &[u8], what: &str| {
        let e = RegisterDest::decode(b).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    };
    let mut kind = buf;
    kind[0] = 9;
    refused(&kind, "kind 9");
    let mut flags = buf;
    flags[4] = 6;
    refused(&flags, "flags");
    let mut empty = buf;
    empty[16..24].fill(0);
    refused(&empty, "len is 0");
    let mut stray = buf;
    stray[100] = 1;
    refused(&stray, "has-event flag");
    assert_eq!(
        dest::decode_unregister(&[5, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
        5
    );
    assert!(dest::decode_unregister(&[5, 0, 0, 0, 1, 0, 0, 0]).is_err());
    // ENGINE_ROWS without GATHER, a short extension, and a non-zero reserved word.
    let mut h = fixed(4, None);
    h.params.gather = true;
    h.engine_rows = Some(EngineRows {
        dest: 2,
        offset: 4096,
    });
    let mut b = vec![0u8; 64];
    let n = h.encode(&[1.0; 4], &mut b).unwrap();
    let mut no_gather = b.clone();
    no_gather[4..8].copy_from_slice(&(ATTEND | ENGINE_ROWS).to_le_bytes());
    let e = RetrieveHeader::decode(&no_gather[..n])
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs GATHER"), "{e}");
    assert!(RetrieveHeader::decode(&b[..RETRIEVE_HEADER + 8]).is_err());
    let mut reserved = b.clone();
    reserved[RETRIEVE_HEADER + 4] = 1;
    let e = RetrieveHeader::decode(&reserved[..n])
        .unwrap_err()
        .to_string();
    assert!(e.contains("reserved"), "{e}");
    h.params.gather = false;
    assert!(h.encode(&[1.0; 4], &mut b).is_err());
}

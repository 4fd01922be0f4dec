//! Codec tests: proptest round trips for every op, and every malformed body refused.

use super::*;
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn words(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u32>(), 0..max)
        .prop_map(|w| w.iter().flat_map(|x| x.to_le_bytes()).collect())
}

#[derive(Debug, Clone)]
enum OwnedRequest {
    Ping(Vec<u8>),
    Append(u32, u32, Vec<u8>, Vec<u8>),
    Search(u32, u32, Vec<u8>),
    Gather(u32, u32, Vec<u8>),
}

impl OwnedRequest {
    fn view(&self) -> Request<'_> {
        match self {
            OwnedRequest::Ping(d) => Request::Ping { data: d },
            OwnedRequest::Append(layer, tokens, k, v) => Request::Append {
                layer: *layer,
                tokens: *tokens,
                k,
                v,
            },
            OwnedRequest::Search(layer, k, q) => Request::Search {
                layer: *layer,
                k: *k,
                query: q,
            },
            OwnedRequest::Gather(layer, kv_head, ids) => Request::Gather {
                layer: *layer,
                kv_head: *kv_head,
                ids,
            },
        }
    }
}

fn request() -> impl Strategy<Value = OwnedRequest> {
    prop_oneof![
        bytes(300).prop_map(OwnedRequest::Ping),
        (any::<u32>(), any::<u32>(), bytes(200), bytes(200))
            .prop_map(|(l, t, k, v)| OwnedRequest::Append(l, t, k, v)),
        (any::<u32>(), any::<u32>(), words(64)).prop_map(|(l, k, q)| OwnedRequest::Search(l, k, q)),
        (any::<u32>(), any::<u32>(), words(64))
            .prop_map(|(l, h, ids)| OwnedRequest::Gather(l, h, ids)),
    ]
}

proptest! {
    #[test]
    fn request_round_trips(req in request()) {
        let r = req.view();
        let mut buf = vec![0u8; r.encoded_len()];
        let n = r.encode(&mut buf).unwrap();
        prop_assert_eq!(n, r.encoded_len());
        prop_assert_eq!(Request::decode(r.opcode(), &buf[..n]).unwrap(), r);
        if n > 0 {
            prop_assert!(r.encode(&mut buf[..n - 1]).is_err(), "a short buffer is an error");
        }
    }

    #[test]
    fn search_and_gather_responses_round_trip(k in 0u32..20, q_heads in 1u32..8, rows in 0u32..10, row_bytes in 0u32..64, seed in any::<u8>()) {
        let n = (k * q_heads * 4) as usize;
        let ids: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_add(seed)).collect();
        let scores: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(3)).collect();
        let r = Response::Search { k, q_heads, ids: &ids, scores: &scores };
        let mut buf = vec![0u8; 8 + 2 * n];
        let len = r.encode(&mut buf).unwrap();
        prop_assert_eq!(Response::decode(Opcode::Search, &buf[..len]).unwrap(), r);
        prop_assert_eq!(SearchLayout::new(q_heads, k).unwrap().len(), len);

        let m = (rows * row_bytes) as usize;
        let (kb, vb) = (vec![seed; m], vec![seed ^ 0xff; m]);
        let g = Response::Gather { rows, row_bytes, k: &kb, v: &vb };
        let mut buf = vec![0u8; 8 + 2 * m];
        let len = g.encode(&mut buf).unwrap();
        prop_assert_eq!(Response::decode(Opcode::Gather, &buf[..len]).unwrap(), g);
    }

    #[test]
    fn arbitrary_bytes_never_panic(code in 0u32..8, body in bytes(200)) {
        if let Some(op) = Opcode::from_code(code) {
            // Either an error or a view within the body: never a panic.
            if let Ok(r) = Request::decode(op, &body) {
                prop_assert!(r.encoded_len() <= body.len());
            }
            let _ = Response::decode(op, &body);
        } else {
            prop_assert!(code == 0 || code > 4);
        }
    }
}

#[test]
fn short_and_ragged_bodies_name_the_problem() {
    let e = Request::decode(Opcode::Append, &[0; 10])
        .unwrap_err()
        .to_string();
    assert!(e.contains("append body is 10 bytes"), "{e}");
    let mut b = vec![0u8; 16];
    b[8] = 200;
    let e = Request::decode(Opcode::Append, &b).unwrap_err().to_string();
    assert!(e.contains("K is 200 bytes"), "{e}");
    let e = Request::decode(Opcode::Search, &[0; 11])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a multiple of 4"), "{e}");
    assert!(Response::decode(Opcode::Append, &[0; 9]).is_err());
    assert!(Opcode::from_code(0).is_none() && Opcode::from_code(11).is_none());
    for op in Opcode::ALL {
        assert_eq!(Opcode::from_code(op as u32), Some(op));
    }
}

#[test]
fn read_helpers_convert_little_endian() {
    let mut ids = [0u32; 2];
    assert_eq!(read_u32s(&[1, 0, 0, 0, 2, 0, 0, 0, 9], &mut ids), 2);
    assert_eq!(ids, [1, 2]);
    let mut f = [0f32; 1];
    assert_eq!(read_f32s(&1.5f32.to_le_bytes(), &mut f), 1);
    assert_eq!(f[0], 1.5);
}

/// A failed completion's message is the daemon error's display; the client's error of the
/// same category does not repeat the category.
#[test]
fn error_categories_are_not_repeated() {
    let c = crate::shm::Descriptor::default();
    let cases = [
        (
            Error::BadRequest("token id 9 out of range".into()),
            "bad request: token id 9 out of range",
        ),
        (
            Error::NotFound("layer 5 (session has 2)".into()),
            "not found: layer 5 (session has 2)",
        ),
        (Error::Protocol("bad magic".into()), "protocol: bad magic"),
    ];
    for (daemon_side, want) in cases {
        let status = Status::of(&daemon_side);
        let client_side = status.into_error(&c, daemon_side.to_string());
        assert_eq!(client_side.to_string(), want);
        assert_eq!(Status::of(&client_side), status);
    }
}

/// The one error table: every status survives its wire code; every failure status becomes a
/// client error that maps back to it, and its HTTP status reads back as the same outcome
/// (protocol faults answer 500 over HTTP, as internal ones do); budget numbers survive the
/// HTTP text.
#[test]
fn every_status_round_trips_through_its_code_error_and_http_status() {
    for s in Status::ALL {
        assert_eq!(Status::from_code(s as u32), s);
        if s == Status::Ok {
            continue;
        }
        let e = s.error_with(&format!("{}what failed", s.message_prefix()), [7, 8, 9]);
        assert_eq!(Status::of(&e), s, "{e}");
        let over_http = Status::from_http(s.http_code());
        let want = if s == Status::Protocol {
            Status::Internal
        } else {
            s
        };
        assert_eq!(over_http, want, "{s:?} -> HTTP {}", s.http_code());
        if s != Status::Budget {
            assert_eq!(e.to_string().matches(s.message_prefix()).count(), 1, "{e}");
        }
    }
    let e = Error::Budget {
        asked: 10,
        left: 3,
        budget: 100,
    };
    assert_eq!(
        crate::proto::budget_numbers(&e.to_string()),
        Some([10, 3, 100])
    );
    assert_eq!(crate::proto::budget_numbers("no numbers here"), None);
}

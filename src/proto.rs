//! The request/response codec carried by the shared-memory rings (and, with the same bytes,
//! by the Unix-socket baseline of `kvdex bench rtt`).
//!
//! A request is a ring [`crate::shm::Descriptor`] whose `code` is an [`Opcode`] and whose
//! `in_offset/in_len` locate a body in the payload arena. Bodies are little-endian:
//!
//! | op     | request body                                    | response body                              |
//! |--------|-------------------------------------------------|--------------------------------------------|
//! | ping   | any bytes                                       | the same bytes                             |
//! | append | layer u32, tokens u32, k_len u64, K, V          | layer length after the append, u64         |
//! | search | layer u32, k u32, query f32 `[q_heads][dim]`    | k u32, q_heads u32, ids u32 `[q_heads][k]`, scores f32 `[q_heads][k]` |
//! | gather | layer u32, kv_head u32, ids u32 `[n]`           | rows u32, row_bytes u32, K rows, V rows    |
//! | seal, retrieve, set_wkv | the decode path's own codec: [`crate::decode::wire`] |                   |
//!
//! Decoding never trusts a length: every field is read from a bounds-checked slice, and a body
//! that does not fit its op is an error naming what was wrong. Bodies borrow the buffer they
//! were decoded from; nothing here allocates.

use crate::error::{KvdexError, Result};

// The worker lets the store write ids and scores into the arena natively.
#[cfg(target_endian = "big")]
compile_error!("the kvdex wire format is little-endian");

/// What a request asks for. New operations (the decode path's `attend`) add a variant here;
/// the compiler then points at every `match` that must handle it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Echo the body (latency probe).
    Ping = 1,
    /// Append a K/V block to one layer.
    Append = 2,
    /// Top-k ids and scores for every query head of one layer.
    Search = 3,
    /// K/V rows of given ids of one KV head, copied into the arena.
    Gather = 4,
    /// Seal a layer's prefill and build its indices in the background
    /// (body: [`crate::decode::wire`]).
    Seal = 5,
    /// The decode-step request: ids, scores, partial attention and gathered rows for every
    /// query head of a layer (body: [`crate::decode::wire`]).
    Retrieve = 6,
    /// Upload rows of a Slim session's per-layer `W_KV` (body: [`crate::decode::wire`]).
    SetWkv = 7,
}

impl Opcode {
    /// Every opcode, for tests and metrics.
    pub const ALL: [Opcode; 7] = [
        Opcode::Ping,
        Opcode::Append,
        Opcode::Search,
        Opcode::Gather,
        Opcode::Seal,
        Opcode::Retrieve,
        Opcode::SetWkv,
    ];

    /// The opcode with wire value `code`, if any.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|op| *op as u32 == code)
    }

    /// A short stable name, used as the metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Ping => "ping",
            Opcode::Append => "append",
            Opcode::Search => "search",
            Opcode::Gather => "gather",
            Opcode::Seal => "seal",
            Opcode::Retrieve => "retrieve",
            Opcode::SetWkv => "set_wkv",
        }
    }
}

/// The outcome in a completion's `code`; non-zero codes carry a message in the error slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success; the response body is at `out_offset`, `out_len` bytes.
    Ok = 0,
    /// Malformed request (offset, length, opcode, body, shape).
    BadRequest = 1,
    /// Unknown layer or other named thing.
    NotFound = 2,
    /// Not attached, or a wrong token.
    Unauthorized = 3,
    /// The memory budget would be exceeded.
    Budget = 4,
    /// The client broke the ring protocol; the region is closed.
    Protocol = 5,
    /// The daemon failed internally.
    Internal = 6,
}

impl Status {
    /// The status with wire value `code`; unknown codes read as `Internal`.
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::NotFound,
            3 => Status::Unauthorized,
            4 => Status::Budget,
            5 => Status::Protocol,
            _ => Status::Internal,
        }
    }

    /// The status that reports `e` to a client.
    pub fn of(e: &KvdexError) -> Self {
        match e {
            KvdexError::BadRequest(_) | KvdexError::Index(_) => Status::BadRequest,
            KvdexError::NotFound(_) => Status::NotFound,
            KvdexError::Unauthorized(_) => Status::Unauthorized,
            KvdexError::Budget { .. } => Status::Budget,
            KvdexError::Protocol(_) => Status::Protocol,
            _ => Status::Internal,
        }
    }

    /// The client-side error for a failed completion `c` with message `msg`. A budget
    /// failure carries its numbers in the completion (`reserved[0]` asked, `reserved[1]`
    /// left, `out_len` the whole budget), so the client gets the same structured error.
    pub fn into_error(self, c: &crate::shm::Descriptor, msg: String) -> KvdexError {
        match self {
            Status::BadRequest => KvdexError::BadRequest(msg),
            Status::NotFound => KvdexError::NotFound(msg),
            Status::Unauthorized => KvdexError::Unauthorized(msg),
            Status::Budget => KvdexError::Budget {
                asked: c.reserved[0],
                left: c.reserved[1],
                budget: c.out_len,
            },
            Status::Protocol => KvdexError::Protocol(msg),
            Status::Ok | Status::Internal => KvdexError::Protocol(format!("daemon error: {msg}")),
        }
    }
}

/// The wire code of a dtype, as the worker writes the session shape into the region header.
pub fn dtype_code(d: kvdex_index::KeyDtype) -> u64 {
    match d {
        kvdex_index::KeyDtype::F16 => 1,
        kvdex_index::KeyDtype::Bf16 => 2,
        kvdex_index::KeyDtype::F32 => 3,
    }
}

/// The dtype with wire code `c`.
pub fn dtype_from_code(c: u64) -> Option<kvdex_index::KeyDtype> {
    match c {
        1 => Some(kvdex_index::KeyDtype::F16),
        2 => Some(kvdex_index::KeyDtype::Bf16),
        3 => Some(kvdex_index::KeyDtype::F32),
        _ => None,
    }
}

/// A decoded request body; the byte slices borrow the buffer it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Request<'a> {
    /// Echo `data`.
    Ping {
        /// Bytes to echo.
        data: &'a [u8],
    },
    /// Append `tokens` tokens to `layer`: K and V each `[kv_heads][tokens][head_dim]`.
    Append {
        /// Layer.
        layer: u32,
        /// Tokens in the block.
        tokens: u32,
        /// K rows in the session dtype.
        k: &'a [u8],
        /// V rows in the session dtype.
        v: &'a [u8],
    },
    /// Top-`k` for every query head of `layer`.
    Search {
        /// Layer.
        layer: u32,
        /// Results per query head.
        k: u32,
        /// f32 little-endian `[q_heads][head_dim]`.
        query: &'a [u8],
    },
    /// K then V rows of `ids` of `kv_head` in `layer`.
    Gather {
        /// Layer.
        layer: u32,
        /// KV head.
        kv_head: u32,
        /// u32 little-endian token ids.
        ids: &'a [u8],
    },
}

/// A decoded response body.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Response<'a> {
    /// The echoed bytes.
    Ping {
        /// Echoed bytes.
        data: &'a [u8],
    },
    /// The layer's length after the append.
    Append {
        /// Tokens now in the layer.
        tokens: u64,
    },
    /// Per query head, `k` ids then `k` scores, best first.
    Search {
        /// Results per head (the request's k, clamped to the layer's length).
        k: u32,
        /// Query heads.
        q_heads: u32,
        /// u32 little-endian `[q_heads][k]`.
        ids: &'a [u8],
        /// f32 little-endian `[q_heads][k]`.
        scores: &'a [u8],
    },
    /// Gathered rows.
    Gather {
        /// Rows gathered.
        rows: u32,
        /// Bytes per row.
        row_bytes: u32,
        /// K rows, `rows * row_bytes`.
        k: &'a [u8],
        /// V rows, `rows * row_bytes`.
        v: &'a [u8],
    },
}

/// The decode-path ops have their own codec ([`crate::decode::wire`]).
fn decoded_elsewhere(op: Opcode) -> KvdexError {
    KvdexError::BadRequest(format!(
        "{} bodies are decoded by crate::decode::wire, not proto",
        op.name()
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn short(op: Opcode, what: &str, len: usize, need: usize) -> KvdexError {
    KvdexError::BadRequest(format!(
        "{} {what} is {len} bytes, needs at least {need}",
        op.name()
    ))
}

/// Writes the pieces one after the other into `out`; fails if `out` is too small.
fn put(op: Opcode, out: &mut [u8], parts: &[&[u8]]) -> Result<usize> {
    let need: usize = parts.iter().map(|p| p.len()).sum();
    if out.len() < need {
        return Err(KvdexError::BadRequest(format!(
            "{} body needs {need} bytes, buffer has {}",
            op.name(),
            out.len()
        )));
    }
    let mut at = 0;
    for p in parts {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    Ok(need)
}

fn multiple_of_4(op: Opcode, what: &str, b: &[u8]) -> Result<()> {
    if b.len() % 4 != 0 {
        return Err(KvdexError::BadRequest(format!(
            "{} {what} is {} bytes, not a multiple of 4",
            op.name(),
            b.len()
        )));
    }
    Ok(())
}

impl<'a> Request<'a> {
    /// The request's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Ping { .. } => Opcode::Ping,
            Request::Append { .. } => Opcode::Append,
            Request::Search { .. } => Opcode::Search,
            Request::Gather { .. } => Opcode::Gather,
        }
    }

    /// Bytes [`Request::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Request::Ping { data } => data.len(),
            Request::Append { k, v, .. } => 16 + k.len() + v.len(),
            Request::Search { query, .. } => 8 + query.len(),
            Request::Gather { ids, .. } => 8 + ids.len(),
        }
    }

    /// Writes the body into `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        let op = self.opcode();
        match *self {
            Request::Ping { data } => put(op, out, &[data]),
            Request::Append {
                layer,
                tokens,
                k,
                v,
            } => put(
                op,
                out,
                &[
                    &layer.to_le_bytes(),
                    &tokens.to_le_bytes(),
                    &(k.len() as u64).to_le_bytes(),
                    k,
                    v,
                ],
            ),
            Request::Search { layer, k, query } => {
                put(op, out, &[&layer.to_le_bytes(), &k.to_le_bytes(), query])
            }
            Request::Gather {
                layer,
                kv_head,
                ids,
            } => put(
                op,
                out,
                &[&layer.to_le_bytes(), &kv_head.to_le_bytes(), ids],
            ),
        }
    }

    /// Decodes the body of an `op` request.
    pub fn decode(op: Opcode, body: &'a [u8]) -> Result<Self> {
        match op {
            Opcode::Ping => Ok(Request::Ping { data: body }),
            Opcode::Append => {
                let (Some(layer), Some(tokens), Some(k_len)) =
                    (u32_at(body, 0), u32_at(body, 4), u64_at(body, 8))
                else {
                    return Err(short(op, "body", body.len(), 16));
                };
                let rest = &body[16..];
                let k_len = usize::try_from(k_len)
                    .ok()
                    .filter(|&n| n <= rest.len())
                    .ok_or_else(|| {
                        KvdexError::BadRequest(format!(
                            "append says K is {k_len} bytes, but only {} follow",
                            rest.len()
                        ))
                    })?;
                let (k, v) = rest.split_at(k_len);
                Ok(Request::Append {
                    layer,
                    tokens,
                    k,
                    v,
                })
            }
            Opcode::Search => {
                let (Some(layer), Some(k)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(short(op, "body", body.len(), 8));
                };
                let query = &body[8..];
                multiple_of_4(op, "query", query)?;
                Ok(Request::Search { layer, k, query })
            }
            Opcode::Gather => {
                let (Some(layer), Some(kv_head)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(short(op, "body", body.len(), 8));
                };
                let ids = &body[8..];
                multiple_of_4(op, "ids", ids)?;
                Ok(Request::Gather {
                    layer,
                    kv_head,
                    ids,
                })
            }
            Opcode::Seal | Opcode::Retrieve | Opcode::SetWkv => Err(decoded_elsewhere(op)),
        }
    }
}

/// Where the parts of a search response go, so the worker can let the store write ids and
/// scores straight into the arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchLayout {
    /// Byte range of the ids.
    pub ids: std::ops::Range<usize>,
    /// Byte range of the scores.
    pub scores: std::ops::Range<usize>,
}

impl SearchLayout {
    /// Layout for `q_heads` heads of `k` results each; `None` on overflow.
    pub fn new(q_heads: u32, k: u32) -> Option<Self> {
        let n = (q_heads as usize).checked_mul(k as usize)?.checked_mul(4)?;
        let ids = 8..8usize.checked_add(n)?;
        let scores = ids.end..ids.end.checked_add(n)?;
        Some(Self { ids, scores })
    }
    /// Bytes of the whole response.
    pub fn len(&self) -> usize {
        self.scores.end
    }
    /// Never empty (the 8-byte header); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Writes the search response header (`k`, `q_heads`) into the first 8 bytes of `out`.
pub fn put_search_header(out: &mut [u8], k: u32, q_heads: u32) -> Result<()> {
    put(
        Opcode::Search,
        out,
        &[&k.to_le_bytes(), &q_heads.to_le_bytes()],
    )
    .map(|_| ())
}

/// Writes the gather response header (`rows`, `row_bytes`) into the first 8 bytes of `out`.
pub fn put_gather_header(out: &mut [u8], rows: u32, row_bytes: u32) -> Result<()> {
    put(
        Opcode::Gather,
        out,
        &[&rows.to_le_bytes(), &row_bytes.to_le_bytes()],
    )
    .map(|_| ())
}

impl<'a> Response<'a> {
    /// The opcode this responds to.
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::Ping { .. } => Opcode::Ping,
            Response::Append { .. } => Opcode::Append,
            Response::Search { .. } => Opcode::Search,
            Response::Gather { .. } => Opcode::Gather,
        }
    }

    /// Writes the body into `out`; returns its length. (The worker writes search and gather
    /// bodies in place; this is the reference encoder used by the socket path and tests.)
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        let op = self.opcode();
        match *self {
            Response::Ping { data } => put(op, out, &[data]),
            Response::Append { tokens } => put(op, out, &[&tokens.to_le_bytes()]),
            Response::Search {
                k,
                q_heads,
                ids,
                scores,
            } => put(
                op,
                out,
                &[&k.to_le_bytes(), &q_heads.to_le_bytes(), ids, scores],
            ),
            Response::Gather {
                rows,
                row_bytes,
                k,
                v,
            } => put(
                op,
                out,
                &[&rows.to_le_bytes(), &row_bytes.to_le_bytes(), k, v],
            ),
        }
    }

    /// Decodes the body of a successful `op` completion.
    pub fn decode(op: Opcode, body: &'a [u8]) -> Result<Self> {
        match op {
            Opcode::Ping => Ok(Response::Ping { data: body }),
            Opcode::Append => {
                let tokens = u64_at(body, 0)
                    .filter(|_| body.len() == 8)
                    .ok_or_else(|| short(op, "response", body.len(), 8))?;
                Ok(Response::Append { tokens })
            }
            Opcode::Search => {
                let (Some(k), Some(q_heads)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(short(op, "response", body.len(), 8));
                };
                let layout = SearchLayout::new(q_heads, k)
                    .filter(|l| l.len() == body.len())
                    .ok_or_else(|| KvdexError::Protocol(format!("search response of {} bytes does not hold {q_heads} heads x {k} results", body.len())))?;
                Ok(Response::Search {
                    k,
                    q_heads,
                    ids: &body[layout.ids],
                    scores: &body[layout.scores],
                })
            }
            Opcode::Gather => {
                let (Some(rows), Some(row_bytes)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(short(op, "response", body.len(), 8));
                };
                let n = (rows as usize)
                    .checked_mul(row_bytes as usize)
                    .filter(|&n| n.checked_mul(2).and_then(|m| m.checked_add(8)) == Some(body.len()))
                    .ok_or_else(|| KvdexError::Protocol(format!("gather response of {} bytes does not hold 2 x {rows} rows of {row_bytes} bytes", body.len())))?;
                Ok(Response::Gather {
                    rows,
                    row_bytes,
                    k: &body[8..8 + n],
                    v: &body[8 + n..],
                })
            }
            Opcode::Seal | Opcode::Retrieve | Opcode::SetWkv => Err(decoded_elsewhere(op)),
        }
    }
}

/// Copies little-endian u32s from `bytes` into `out` (as many as both hold); returns the count.
pub fn read_u32s(bytes: &[u8], out: &mut [u32]) -> usize {
    let mut n = 0;
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        n += 1;
    }
    n
}

/// Copies little-endian f32s from `bytes` into `out` (as many as both hold); returns the count.
pub fn read_f32s(bytes: &[u8], out: &mut [f32]) -> usize {
    let mut n = 0;
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
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
            (any::<u32>(), any::<u32>(), words(64))
                .prop_map(|(l, k, q)| OwnedRequest::Search(l, k, q)),
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
        assert!(Opcode::from_code(0).is_none() && Opcode::from_code(8).is_none());
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
}

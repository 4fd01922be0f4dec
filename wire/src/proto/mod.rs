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
//! | seal, retrieve, set_wkv | the decode path's own codec: [`crate::decode`] |                   |
//! | truncate | tokens u64 (every layer keeps its first `tokens` rows) | bytes given back to the budget, u64 |
//!
//! Decoding never trusts a length: every field is read from a bounds-checked slice, and a body
//! that does not fit its op is an error naming what was wrong. Bodies borrow the buffer they
//! were decoded from; nothing here allocates.

use crate::error::{Error, Result};

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
    /// Seal a layer's prefill and build its indices in the background, or stage a part of
    /// its training queries for that seal (body: [`crate::decode`]).
    Seal = 5,
    /// The decode-step request: ids, scores, partial attention and gathered rows for every
    /// query head of a layer (body: [`crate::decode`]).
    Retrieve = 6,
    /// Upload rows of a Slim session's per-layer `W_KV` (body: [`crate::decode`]).
    SetWkv = 7,
    /// Offer an engine GPU buffer (a CUDA IPC handle) as a destination of retrieve gathers
    /// (body: [`crate::decode::dest`]).
    RegisterDest = 8,
    /// Release a destination registered with `RegisterDest`.
    UnregisterDest = 9,
    /// Drop every layer's rows from a token on (body: tokens u64; response: bytes given back
    /// to the budget, u64).
    Truncate = 10,
}

impl Opcode {
    /// Every opcode, for tests and metrics.
    pub const ALL: [Opcode; 10] = [
        Opcode::Ping,
        Opcode::Append,
        Opcode::Search,
        Opcode::Gather,
        Opcode::Seal,
        Opcode::Retrieve,
        Opcode::SetWkv,
        Opcode::RegisterDest,
        Opcode::UnregisterDest,
        Opcode::Truncate,
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
            Opcode::RegisterDest => "register_dest",
            Opcode::UnregisterDest => "unregister_dest",
            Opcode::Truncate => "truncate",
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
    /// The daemon failed internally (a caught panic, an I/O or device fault).
    Internal = 6,
    /// A limit other than memory was reached (sessions, quotas).
    Exhausted = 7,
    /// The daemon is shutting down, or the session was ended.
    Disconnected = 8,
}

impl Status {
    /// Every status, for tests that walk the table.
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::BadRequest,
        Status::NotFound,
        Status::Unauthorized,
        Status::Budget,
        Status::Protocol,
        Status::Internal,
        Status::Exhausted,
        Status::Disconnected,
    ];

    /// The status with wire value `code`; unknown codes read as `Internal`.
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::NotFound,
            3 => Status::Unauthorized,
            4 => Status::Budget,
            5 => Status::Protocol,
            7 => Status::Exhausted,
            8 => Status::Disconnected,
            _ => Status::Internal,
        }
    }

    /// The status that reports `e` to a client: the one table from errors to what a client
    /// sees. The HTTP status ([`Status::http_code`]) and the Python exception class are derived
    /// from it, so the three cannot disagree, and a new error variant does not compile until
    /// it is placed here. (The daemon first maps its own errors onto these kinds.)
    #[warn(clippy::wildcard_enum_match_arm)]
    pub fn of(e: &Error) -> Self {
        match e {
            Error::BadRequest(_) => Status::BadRequest,
            Error::NotFound(_) => Status::NotFound,
            Error::Unauthorized(_) => Status::Unauthorized,
            Error::Budget { .. } => Status::Budget,
            Error::Exhausted(_) => Status::Exhausted,
            Error::Protocol(_) => Status::Protocol,
            Error::Disconnected(_) => Status::Disconnected,
            Error::Internal(_) | Error::Io(_) => Status::Internal,
        }
    }

    /// The HTTP status the control plane answers with for this outcome.
    #[warn(clippy::wildcard_enum_match_arm)]
    pub fn http_code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Unauthorized => 401,
            Status::NotFound => 404,
            Status::Exhausted => 429,
            Status::Internal | Status::Protocol => 500,
            Status::Budget => 507,
            Status::Disconnected => 503,
        }
    }

    /// The outcome an HTTP status reports (the client's side of [`Status::http_code`]).
    pub fn from_http(code: u16) -> Self {
        match code {
            200..=299 => Status::Ok,
            401 | 403 => Status::Unauthorized,
            404 => Status::NotFound,
            429 => Status::Exhausted,
            507 => Status::Budget,
            503 => Status::Disconnected,
            400..=499 => Status::BadRequest,
            _ => Status::Internal,
        }
    }

    /// The display prefix of the error this status becomes ("bad request: "), which a
    /// daemon's message already starts with.
    #[warn(clippy::wildcard_enum_match_arm)]
    pub fn message_prefix(self) -> &'static str {
        match self {
            Status::BadRequest => "bad request: ",
            Status::NotFound => "not found: ",
            Status::Unauthorized => "unauthorized: ",
            Status::Protocol => "protocol: ",
            Status::Exhausted => "limit reached: ",
            Status::Disconnected => "disconnected: ",
            Status::Internal => "internal error: ",
            Status::Ok | Status::Budget => "",
        }
    }

    /// The client-side error for status `self` with the daemon's message `msg` (its prefix,
    /// which repeats the category, dropped); `budget` gives a budget failure's numbers
    /// (asked, left, whole budget).
    #[warn(clippy::wildcard_enum_match_arm)]
    pub fn error_with(self, msg: &str, budget: [u64; 3]) -> Error {
        let prefix = self.message_prefix();
        let msg = match msg.strip_prefix(prefix) {
            Some(rest) if !prefix.is_empty() => rest.to_string(),
            _ => msg.to_string(),
        };
        match self {
            Status::BadRequest => Error::BadRequest(msg),
            Status::NotFound => Error::NotFound(msg),
            Status::Unauthorized => Error::Unauthorized(msg),
            Status::Budget => Error::Budget {
                asked: budget[0],
                left: budget[1],
                budget: budget[2],
            },
            Status::Exhausted => Error::Exhausted(msg),
            Status::Protocol => Error::Protocol(msg),
            Status::Disconnected => Error::Disconnected(msg),
            Status::Internal => Error::Internal(msg),
            Status::Ok => Error::Protocol(format!("a success status carried an error: {msg}")),
        }
    }

    /// The client-side error for a failed completion `c` with message `msg`. A budget
    /// failure carries its numbers in the completion (`reserved[0]` asked, `reserved[1]`
    /// left, `out_len` the whole budget), so the client gets the same structured error.
    pub fn into_error(self, c: &crate::shm::Descriptor, msg: String) -> Error {
        self.error_with(&msg, [c.reserved[0], c.reserved[1], c.out_len])
    }
}

/// The numbers (asked, left, whole budget) in a budget error's message, as
/// [`Error::Budget`] displays them: an HTTP refusal carries them only in its text.
pub fn budget_numbers(msg: &str) -> Option<[u64; 3]> {
    let rest = msg.split("asked for ").nth(1)?;
    let (asked, rest) = rest.split_once(" bytes, ")?;
    let (left, rest) = rest.split_once(" bytes left of ")?;
    let whole = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    Some([asked.parse().ok()?, left.parse().ok()?, whole.parse().ok()?])
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

/// The decode-path ops have their own codec ([`crate::decode`]).
fn decoded_elsewhere(op: Opcode) -> Error {
    Error::BadRequest(format!(
        "{} bodies are decoded by crate::decode, not proto",
        op.name()
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn short(op: Opcode, what: &str, len: usize, need: usize) -> Error {
    Error::BadRequest(format!(
        "{} {what} is {len} bytes, needs at least {need}",
        op.name()
    ))
}

/// Writes the pieces one after the other into `out`; fails if `out` is too small.
fn put(op: Opcode, out: &mut [u8], parts: &[&[u8]]) -> Result<usize> {
    let need: usize = parts.iter().map(|p| p.len()).sum();
    if out.len() < need {
        return Err(Error::BadRequest(format!(
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
    if !b.len().is_multiple_of(4) {
        return Err(Error::BadRequest(format!(
            "{} {what} is {} bytes, not a multiple of 4",
            op.name(),
            b.len()
        )));
    }
    Ok(())
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

mod request;
mod response;
#[cfg(test)]
mod tests;

pub use request::Request;
pub use response::{put_gather_header, put_search_header, Response, SearchLayout};

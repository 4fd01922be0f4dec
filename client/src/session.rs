//! A session's shared-memory connection: attach, then blocking requests over the rings.
//!
//! # Layout
//! - `attach`: presenting the token and reading the shape ([`SessionHandle::attach`]).
//! - `submit`: one request's round trip over the rings ([`SessionHandle::submit`]).
//! - `after_wake`: whether to spin or park after waking a parked worker.
//! - this file: the handle and its typed requests (ping, append, search, gather).

mod after_wake;
mod attach;
pub(crate) mod inflight;
mod submit;

use std::sync::atomic::Ordering;

use after_wake::AfterWake;
use kvdex_wire::proto::{Opcode, Request, Response};
use kvdex_wire::shm::layout::{attach_state, close_reason};
use kvdex_wire::shm::wait::{self, PidWatch, WaitPolicy};
use kvdex_wire::shm::Region;
use kvdex_wire::shm::{ConsumerState, ProducerState};
use kvdex_wire::Shape;
use kvdex_wire::{Error, Result};

/// An attached session: requests wait for their answer, except retrieves submitted with
/// [`SessionHandle::submit_retrieve`] (several may be in flight, each in its own part of the
/// arena); results are returned as slices into the region's arena or written to caller
/// buffers. Nothing is allocated per request.
pub struct SessionHandle {
    region: Region,
    sq: ProducerState,
    cq: ConsumerState,
    pub(crate) next_id: u64,
    wait: WaitPolicy,
    shape: Shape,
    daemon: Option<PidWatch>,
    after_wake: AfterWake,
    pub(super) http: Option<super::http::HttpSession>,
    /// Asked each time a wait parks without a completion (a daemon slower than the park
    /// timeout, 50 ms): `true` abandons the wait ([`SessionHandle::set_interrupt`]).
    interrupt: Option<Interrupt>,
    /// A wait was abandoned: its late reply may still land in the arena, so no further
    /// request may use it.
    abandoned: bool,
    /// Requests submitted without waiting: their arena slots and early completions.
    pub(crate) slots: inflight::Slots,
}

/// The hook of [`SessionHandle::set_interrupt`].
type Interrupt = Box<dyn Fn() -> bool + Send + Sync>;

/// The error of an abandoned wait, and of every request after it.
pub const INTERRUPTED: &str = "interrupted while waiting for the daemon; its late reply may \
    still arrive in this session's region, so the session cannot be used any more: close it";

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("region", &self.region.path())
            .field("shape", &self.shape)
            .finish()
    }
}

/// Rows returned by [`SessionHandle::gather`], borrowed from the arena.
#[derive(Clone, Copy, Debug)]
pub struct GatheredRows<'a> {
    /// K rows, `ids.len() * row_bytes`, in the order of the ids.
    pub k: &'a [u8],
    /// V rows, same layout.
    pub v: &'a [u8],
    /// Bytes per row (head_dim * dtype size).
    pub row_bytes: usize,
}

/// The error for a region the daemon closed, naming why.
fn closed_error(reason: u64) -> Error {
    let why = match reason {
        close_reason::STOPPED => "the daemon stopped serving this session",
        close_reason::PROTOCOL => "the daemon closed the region after a protocol violation",
        close_reason::CLIENT_GONE => "the daemon considers this client gone",
        _ => "the daemon's worker failed",
    };
    Error::Disconnected(why.into())
}

impl SessionHandle {
    /// Installs `interrupted`, asked whenever a request's wait parks without an answer (every
    /// 50 ms while the daemon is slow or hung): returning `true` ends the wait with
    /// [`INTERRUPTED`] and retires the session. The Python binding checks for signals here, so
    /// that Ctrl-C works even when the daemon hangs.
    pub fn set_interrupt(&mut self, interrupted: impl Fn() -> bool + Send + Sync + 'static) {
        self.interrupt = Some(Box::new(interrupted));
    }

    /// How this handle waits for completions.
    pub fn wait_policy(&self) -> WaitPolicy {
        self.wait
    }

    /// The session's shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Bytes of the payload arena: the largest request plus response one call can carry.
    pub fn arena_len(&self) -> u64 {
        self.region.arena_len()
    }

    /// The session id, when created over HTTP.
    pub fn id(&self) -> Option<&str> {
        self.http.as_ref().map(|h| h.id.as_str())
    }

    /// Echoes `data` through the daemon; returns the echo (a slice of the arena).
    pub fn ping(&mut self, data: &[u8]) -> Result<&[u8]> {
        let r = self.call(Opcode::Ping, &Request::Ping { data })?;
        match self.response(Opcode::Ping, r)? {
            Response::Ping { data } => Ok(data),
            other => Err(super::unexpected(other.opcode())),
        }
    }

    /// Appends `tokens` tokens to `layer`; `k` and `v` are `[kv_heads][tokens][head_dim]` in the
    /// session dtype. Returns the layer's length after the append.
    pub fn append(&mut self, layer: u32, tokens: u32, k: &[u8], v: &[u8]) -> Result<u64> {
        let r = self.call(
            Opcode::Append,
            &Request::Append {
                layer,
                tokens,
                k,
                v,
            },
        )?;
        match self.response(Opcode::Append, r)? {
            Response::Append { tokens } => Ok(tokens),
            other => Err(super::unexpected(other.opcode())),
        }
    }

    /// Top-`k` keys of `layer` for every query head. `q` is `[q_heads][head_dim]`; `ids` and
    /// `scores` receive `[q_heads][k_used]` (row stride `k_used`), where `k_used = min(k, len)`
    /// is returned.
    pub fn search(
        &mut self,
        layer: u32,
        q: &[f32],
        k: u32,
        ids: &mut [u32],
        scores: &mut [f32],
    ) -> Result<usize> {
        let r = self.call(
            Opcode::Search,
            &Request::Search {
                layer,
                k,
                query: bytemuck::cast_slice(q),
            },
        )?;
        match self.response(Opcode::Search, r)? {
            Response::Search {
                k,
                q_heads,
                ids: id_bytes,
                scores: score_bytes,
            } => super::copy_search_hits(k, q_heads, id_bytes, score_bytes, ids, scores),
            other => Err(super::unexpected(other.opcode())),
        }
    }

    /// K and V rows of `ids` for `kv_head` of `layer`, as slices of the arena (valid until the
    /// next request).
    pub fn gather(&mut self, layer: u32, kv_head: u32, ids: &[u32]) -> Result<GatheredRows<'_>> {
        let r = self.call(
            Opcode::Gather,
            &Request::Gather {
                layer,
                kv_head,
                ids: bytemuck::cast_slice(ids),
            },
        )?;
        match self.response(Opcode::Gather, r)? {
            Response::Gather {
                row_bytes, k, v, ..
            } => Ok(GatheredRows {
                k,
                v,
                row_bytes: row_bytes as usize,
            }),
            other => Err(super::unexpected(other.opcode())),
        }
    }

    /// The region, for protocol tests that poke at it directly.
    pub fn region(&self) -> &Region {
        &self.region
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        let h = self.region.header();
        h.attach
            .0
            .state
            .store(attach_state::DETACHED, Ordering::Release);
        wait::force_wake(&h.daemon_sleeping.0);
    }
}

//! A session's shared-memory connection: attach, then blocking requests over the rings.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::{KvdexError, Result};
use crate::proto::{self, Opcode, Request, Response, Status};
use crate::shm::layout::{attach_state, close_reason, ERR_BYTES, PAYLOAD_ALIGN};
use crate::shm::wait::{self, PidWatch, WaitPolicy};
use crate::shm::{ConsumerState, Descriptor, ProducerState, Region};
use crate::store::Shape;

/// How long [`SessionHandle`] waits for the daemon to judge its token.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// An attached session: one outstanding request at a time, results returned as slices into
/// the region's arena or written to caller buffers. Nothing is allocated per request.
pub struct SessionHandle {
    region: Region,
    sq: ProducerState,
    cq: ConsumerState,
    next_id: u64,
    wait: WaitPolicy,
    shape: Shape,
    daemon: Option<PidWatch>,
    after_wake: AfterWake,
    pub(super) http: Option<super::http::HttpSession>,
}

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

/// Whether the client spins or parks after waking a parked worker (a cold request).
///
/// Spinning saves the client a futex wake-up of its own, but only when the worker gets another
/// core: on a busy 2-core machine the woken worker is queued behind the spinner, and a spin
/// costs its whole length (measured: cold p50 19 us parking at once, 92-129 us spinning, under
/// load 10). So the client spins with [`wait::wait_watching`] (the worker must take the request
/// within `wake_grace`) and remembers whether the worker showed up: after a late worker it
/// parks at once, and probes again every [`AfterWake::REPROBE`] cold requests.
///
/// That memory applies to cold requests only. A worker found parked although this client's
/// previous request completed less than a spin ago did not go idle: it parked because the
/// client itself came back late once (a wake-up it had to wait for, or a lost core). Parking
/// at once then would make every next request pay two wake-ups in series, a chain that lasts
/// as long as the traffic does; a full spin catches the completion and ends it.
#[derive(Clone, Copy, Debug, Default)]
struct AfterWake {
    /// The worker came late last time: park at once.
    park: bool,
    /// Cold requests since the last probe while parking.
    since_probe: u32,
    /// When the previous request's completion arrived.
    last_done: Option<Instant>,
}

impl AfterWake {
    /// Cold requests between two probes while parking (a probe can cost a `wake_grace`).
    const REPROBE: u32 = 128;

    /// True to spin (with the worker watched) after this wake-up.
    fn spin(&mut self) -> bool {
        if !self.park {
            return true;
        }
        self.since_probe += 1;
        if self.since_probe >= Self::REPROBE {
            self.since_probe = 0;
            return true;
        }
        false
    }

    /// The outcome of a spin: whether the worker was late.
    fn record(&mut self, late: bool) {
        self.park = late;
    }

    /// True when the previous completion arrived less than `spin` ago: the client is sending
    /// back to back, so a parked worker is a broken hot streak, not an idle one.
    fn streaming(&self, spin: Duration) -> bool {
        self.last_done.is_some_and(|t| t.elapsed() < spin)
    }
}

fn closed_error(reason: u64) -> KvdexError {
    let why = match reason {
        close_reason::STOPPED => "the daemon stopped serving this session",
        close_reason::PROTOCOL => "the daemon closed the region after a protocol violation",
        close_reason::CLIENT_GONE => "the daemon considers this client gone",
        _ => "the daemon's worker failed",
    };
    KvdexError::Disconnected(why.into())
}

impl SessionHandle {
    /// Maps the region at `shm_path`, presents `token`, and waits for the daemon to accept it.
    pub fn attach(shm_path: &std::path::Path, token: &[u8; 16], wait: WaitPolicy) -> Result<Self> {
        let region = Region::open(shm_path)?;
        let h = region.header();
        let daemon = PidWatch::open(h.daemon_pid.load(Ordering::Relaxed)).ok();
        let a = &h.attach.0;
        for (i, w) in a.token.iter().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&token[i * 8..i * 8 + 8]);
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        a.client_pid
            .store(std::process::id() as u64, Ordering::Relaxed);
        a.state.store(attach_state::REQUESTED, Ordering::Release);
        wait::force_wake(&h.daemon_sleeping.0);
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let verdict = loop {
            let s = a.state.load(Ordering::Acquire);
            if s == attach_state::ACCEPTED || s == attach_state::REJECTED {
                break s;
            }
            if let Some(r) = region.closed() {
                return Err(closed_error(r));
            }
            if daemon.as_ref().is_some_and(|d| d.exited()) {
                return Err(KvdexError::Disconnected("the daemon exited".into()));
            }
            if Instant::now() > deadline {
                return Err(KvdexError::Disconnected(format!(
                    "no attach verdict from the daemon in {ATTACH_TIMEOUT:?}"
                )));
            }
            let policy = WaitPolicy {
                spin: Duration::ZERO,
                park_timeout: Duration::from_millis(20),
                ..Default::default()
            };
            wait::wait_until(&h.client_sleeping.0, policy, || {
                matches!(
                    a.state.load(Ordering::Acquire),
                    attach_state::ACCEPTED | attach_state::REJECTED
                )
            });
        };
        if verdict != attach_state::ACCEPTED {
            return Err(KvdexError::Unauthorized(format!(
                "the daemon refused the token for {}",
                shm_path.display()
            )));
        }
        let f: Vec<u64> = h.shape.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        let dtype = proto::dtype_from_code(f[4]).ok_or_else(|| {
            KvdexError::Protocol(format!("region has unknown dtype code {}", f[4]))
        })?;
        let narrow = |v: u64| {
            u32::try_from(v)
                .map_err(|_| KvdexError::Protocol(format!("region shape value {v} too large")))
        };
        let shape = Shape {
            layers: narrow(f[0])?,
            q_heads: narrow(f[1])?,
            kv_heads: narrow(f[2])?,
            head_dim: narrow(f[3])?,
            dtype,
        };
        shape.validate()?;
        let (sq, cq) = (
            ProducerState::new(&region.sq()),
            ConsumerState::new(&region.cq()),
        );
        Ok(Self {
            region,
            sq,
            cq,
            next_id: 1,
            wait,
            shape,
            daemon,
            after_wake: AfterWake::default(),
            http: None,
        })
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

    /// Sends one request whose body `encode` writes at the start of the arena, and waits for
    /// its completion. Returns the response's byte range in the arena.
    fn call(&mut self, op: Opcode, req: &Request<'_>) -> Result<std::ops::Range<usize>> {
        let arena = self.region.arena_mut();
        let in_len = req.encode(arena).map_err(|_| {
            KvdexError::BadRequest(format!(
                "{} request of {} bytes does not fit the {}-byte arena",
                op.name(),
                req.encoded_len(),
                arena.len()
            ))
        })? as u64;
        let out_offset = in_len.div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN;
        let out_len = (arena.len() as u64).saturating_sub(out_offset);
        self.submit(Descriptor {
            request_id: self.next_id,
            code: op as u32,
            in_offset: 0,
            in_len,
            out_offset,
            out_len,
            ..Default::default()
        })
    }

    /// Sends a request of `op` whose body the caller already wrote at the start of the arena
    /// ([`SessionHandle::arena_mut`]), `in_len` bytes, and waits for its completion. For ops
    /// with their own codec (the decode path's `seal` and `retrieve`).
    pub(crate) fn call_raw(&mut self, op: Opcode, in_len: u64) -> Result<std::ops::Range<usize>> {
        let arena_len = self.region.arena_len();
        let out_offset = in_len.div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN;
        self.submit(Descriptor {
            request_id: self.next_id,
            code: op as u32,
            in_offset: 0,
            in_len,
            out_offset,
            out_len: arena_len.saturating_sub(out_offset),
            ..Default::default()
        })
    }

    /// The payload arena, where [`SessionHandle::call_raw`] bodies are written and responses
    /// read.
    pub(crate) fn arena_mut(&mut self) -> &mut [u8] {
        self.region.arena_mut()
    }

    /// Pushes a raw descriptor and waits for its completion. Exposed for protocol tests that
    /// need to send what a well-behaved client never would.
    pub fn submit(&mut self, d: Descriptor) -> Result<std::ops::Range<usize>> {
        self.next_id = self.next_id.max(d.request_id).wrapping_add(1);
        let (sq, cq) = (self.region.sq(), self.region.cq());
        if !self
            .sq
            .try_push(&sq, &d)
            .map_err(|e| KvdexError::Protocol(e.to_string()))?
        {
            return Err(KvdexError::Protocol(
                "submission ring full with no request outstanding".into(),
            ));
        }
        let h = self.region.header();
        // If the worker was parked it needs a wake-up and a core (the cold case): see
        // `AfterWake` for whether to spin or park while it wakes.
        let mut woke = wait::notify(&h.daemon_sleeping.0);
        let c = loop {
            match self
                .cq
                .try_pop(&cq)
                .map_err(|e| KvdexError::Protocol(e.to_string()))?
            {
                Some((index, c)) => break (index, c),
                None => {
                    if let Some(r) = self.region.closed() {
                        // The daemon may have posted a final completion before closing.
                        if let Some((index, c)) = self
                            .cq
                            .try_pop(&cq)
                            .map_err(|e| KvdexError::Protocol(e.to_string()))?
                        {
                            break (index, c);
                        }
                        return Err(closed_error(r));
                    }
                    let tail = self.cq.tail();
                    let done = || {
                        cq.has_entries_after(tail) || h.attach.0.closed.load(Ordering::Relaxed) != 0
                    };
                    let producer = &self.sq;
                    // Records whether the worker showed up within the grace.
                    let late = std::cell::Cell::new(false);
                    let taken = || {
                        let t = producer.in_flight(&sq).map_or(true, |n| n == 0);
                        late.set(!t);
                        t
                    };
                    let ready = match std::mem::take(&mut woke) {
                        true if self.after_wake.streaming(self.wait.spin) => {
                            wait::wait_watching(&h.client_sleeping.0, self.wait, taken, done)
                        }
                        true if self.after_wake.spin() => {
                            let r =
                                wait::wait_watching(&h.client_sleeping.0, self.wait, taken, done);
                            self.after_wake.record(late.get());
                            r
                        }
                        true => {
                            let park_at_once = WaitPolicy {
                                spin: Duration::ZERO,
                                ..self.wait
                            };
                            wait::wait_until(&h.client_sleeping.0, park_at_once, done)
                        }
                        false => wait::wait_until(&h.client_sleeping.0, self.wait, done),
                    };
                    if !ready && self.daemon.as_ref().is_some_and(|w| w.exited()) {
                        return Err(KvdexError::Disconnected("the daemon exited".into()));
                    }
                }
            }
        };
        let (index, c) = c;
        self.after_wake.last_done = Some(Instant::now());
        if c.code != Status::Ok as u32 {
            let mut buf = [0u8; ERR_BYTES];
            let n = self.region.read_error(index, c.aux, &mut buf);
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            return Err(Status::from_code(c.code).into_error(&c, msg));
        }
        if c.request_id != d.request_id {
            return Err(KvdexError::Protocol(format!(
                "completion for request {} while waiting for {}",
                c.request_id, d.request_id
            )));
        }
        match c.out_offset.checked_add(c.out_len) {
            Some(end)
                if c.out_offset == d.out_offset
                    && c.out_len <= d.out_len
                    && end <= self.region.arena_len() =>
            {
                Ok(c.out_offset as usize..end as usize)
            }
            _ => Err(KvdexError::Protocol(format!(
                "completion range {}+{} outside the response space",
                c.out_offset, c.out_len
            ))),
        }
    }

    fn response(&mut self, op: Opcode, range: std::ops::Range<usize>) -> Result<Response<'_>> {
        Response::decode(op, &self.region.arena_mut()[range])
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

#[cfg(test)]
mod tests {
    use super::AfterWake;

    #[test]
    fn after_a_late_worker_the_client_parks_and_probes_again_later() {
        let mut a = AfterWake::default();
        assert!(a.spin(), "spins until a worker is seen late");
        a.record(true);
        let spins = (0..AfterWake::REPROBE).filter(|_| a.spin()).count();
        assert_eq!(spins, 1, "one probe per REPROBE cold requests");
        a.record(false);
        assert!(
            a.spin() && a.spin(),
            "a punctual worker brings the spin back"
        );
    }

    #[test]
    fn a_client_sending_back_to_back_is_streaming_until_a_spin_has_passed() {
        use std::time::{Duration, Instant};
        let mut a = AfterWake::default();
        let spin = Duration::from_millis(50);
        assert!(
            !a.streaming(spin),
            "no completion yet: a cold first request"
        );
        a.record(true);
        a.last_done = Some(Instant::now());
        assert!(
            a.streaming(spin),
            "right after a completion, even after a late worker"
        );
        a.last_done = Instant::now().checked_sub(2 * spin);
        assert!(!a.streaming(spin), "a gap longer than the spin is cold");
    }
}

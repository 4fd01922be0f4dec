//! One request's round trip over the rings: encode it into the arena, push its descriptor,
//! wake the worker, wait for the completion (spinning or parking, see `AfterWake`), and check
//! the completion before handing back the response's range.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::inflight::Finished;
use super::{closed_error, SessionHandle};
use kvdex_wire::proto::{Opcode, Request, Response, Status};
use kvdex_wire::shm::layout::{ERR_BYTES, PAYLOAD_ALIGN};
use kvdex_wire::shm::wait::{self, WaitPolicy};
use kvdex_wire::shm::Descriptor;
use kvdex_wire::{Error, Result};

impl SessionHandle {
    /// Sends one request whose body `encode` writes at the start of the free arena, and waits
    /// for its completion. Returns the response's byte range in the arena.
    pub(super) fn call(&mut self, op: Opcode, req: &Request<'_>) -> Result<std::ops::Range<usize>> {
        let arena = self.arena_mut();
        let in_len = req.encode(arena).map_err(|_| {
            Error::BadRequest(format!(
                "{} request of {} bytes does not fit the {}-byte arena",
                op.name(),
                req.encoded_len(),
                arena.len()
            ))
        })? as u64;
        self.call_raw(op, in_len)
    }

    /// Sends a request of `op` whose body the caller already wrote at the start of the free
    /// arena ([`SessionHandle::arena_mut`]), `in_len` bytes, and waits for its completion. For
    /// ops with their own codec (the decode path's `seal` and `retrieve`). The response space
    /// is the rest of the free arena.
    pub(crate) fn call_raw(&mut self, op: Opcode, in_len: u64) -> Result<std::ops::Range<usize>> {
        let base = self.slots.free_start() as u64;
        let arena_len = self.region.arena_len();
        let out_offset = (base + in_len).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN;
        self.submit(Descriptor {
            request_id: self.next_id,
            code: op as u32,
            in_offset: base,
            in_len,
            out_offset,
            out_len: arena_len.saturating_sub(out_offset),
            ..Default::default()
        })
    }

    /// The free part of the payload arena, where [`SessionHandle::call_raw`] bodies are
    /// written: everything after the slots of requests submitted without waiting
    /// ([`super::inflight`]), the whole arena when there are none.
    pub(crate) fn arena_mut(&mut self) -> &mut [u8] {
        let base = self.slots.free_start();
        &mut self.region.arena_mut()[base..]
    }

    /// The whole payload arena, where responses are read (their ranges are absolute).
    pub(crate) fn arena_mut_all(&mut self) -> &mut [u8] {
        self.region.arena_mut()
    }

    /// Pushes a raw descriptor and waits for its completion. Exposed for protocol tests that
    /// need to send what a well-behaved client never would.
    pub fn submit(&mut self, d: Descriptor) -> Result<std::ops::Range<usize>> {
        let woke = self.push(&d)?;
        self.wait_for(&d, woke)
    }

    /// Pushes `d` onto the submission ring and wakes the worker; returns whether it was
    /// parked (see `AfterWake`).
    pub(crate) fn push(&mut self, d: &Descriptor) -> Result<bool> {
        if self.abandoned {
            return Err(Error::Disconnected(super::INTERRUPTED.into()));
        }
        self.next_id = self.next_id.max(d.request_id).wrapping_add(1);
        let sq = self.region.sq();
        if !self
            .sq
            .try_push(&sq, d)
            .map_err(|e| Error::Protocol(e.to_string()))?
        {
            return Err(Error::Protocol(format!(
                "submission ring full with {} requests in flight",
                self.slots.len()
            )));
        }
        Ok(wait::notify(&self.region.header().daemon_sleeping.0))
    }

    /// Waits for the completion of `d` (pushed earlier), setting aside the completions of
    /// other requests in flight for their own waits, and checks it.
    pub(crate) fn wait_for(
        &mut self,
        d: &Descriptor,
        mut woke: bool,
    ) -> Result<std::ops::Range<usize>> {
        let c = loop {
            if let Some(done) = self.slots.take_finished(d.request_id) {
                break done;
            }
            let (index, c) = self.next_completion(&mut woke)?;
            let done = self.finished(index, c);
            if c.request_id != d.request_id && self.slots.holds(c.request_id) {
                self.slots.set_aside(done);
                continue;
            }
            break done;
        };
        if c.desc.code != Status::Ok as u32 {
            return Err(Status::from_code(c.desc.code).into_error(&c.desc, c.message));
        }
        let c = c.desc;
        if c.request_id != d.request_id {
            return Err(Error::Protocol(format!(
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
            _ => Err(Error::Protocol(format!(
                "completion range {}+{} outside the response space",
                c.out_offset, c.out_len
            ))),
        }
    }

    /// A completion popped from ring slot `index`, with its error message read out of the
    /// slot (before the ring reuses it).
    fn finished(&self, index: u64, c: Descriptor) -> Finished {
        let message = if c.code != Status::Ok as u32 {
            let mut buf = [0u8; ERR_BYTES];
            let n = self.region.read_error(index, c.aux, &mut buf);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        } else {
            String::new()
        };
        Finished { desc: c, message }
    }

    /// Pops every completion already posted, setting each aside for its request's wait;
    /// true when `id`'s is among those set aside. Never blocks.
    pub(crate) fn drain_ready(&mut self, id: u64) -> Result<bool> {
        let cq = self.region.cq();
        while let Some((index, c)) = self
            .cq
            .try_pop(&cq)
            .map_err(|e| Error::Protocol(e.to_string()))?
        {
            self.after_wake.completed();
            let done = self.finished(index, c);
            self.slots.set_aside(done);
        }
        if self.slots.is_finished(id) {
            return Ok(true);
        }
        match self.region.closed() {
            Some(r) => Err(closed_error(r)),
            None => Ok(false),
        }
    }

    /// Waits for the next completion on the ring (spinning or parking, see `AfterWake`).
    fn next_completion(&mut self, woke: &mut bool) -> Result<(u64, Descriptor)> {
        let (sq, cq) = (self.region.sq(), self.region.cq());
        let h = self.region.header();
        let c = loop {
            match self
                .cq
                .try_pop(&cq)
                .map_err(|e| Error::Protocol(e.to_string()))?
            {
                Some((index, c)) => break (index, c),
                None => {
                    if let Some(r) = self.region.closed() {
                        // The daemon may have posted a final completion before closing.
                        if let Some((index, c)) = self
                            .cq
                            .try_pop(&cq)
                            .map_err(|e| Error::Protocol(e.to_string()))?
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
                    let ready = match std::mem::take(woke) {
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
                        return Err(Error::Disconnected("the daemon exited".into()));
                    }
                    if !ready && self.interrupt.as_ref().is_some_and(|f| f()) {
                        self.abandoned = true;
                        return Err(Error::Disconnected(super::INTERRUPTED.into()));
                    }
                }
            }
        };
        self.after_wake.completed();
        Ok(c)
    }

    pub(super) fn response(
        &mut self,
        op: Opcode,
        range: std::ops::Range<usize>,
    ) -> Result<Response<'_>> {
        Response::decode(op, &self.arena_mut_all()[range])
    }
}

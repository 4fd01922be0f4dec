//! The daemon side of a shared-memory region: validates and serves each request.
//!
//! One [`Worker`] is one OS thread serving one region for one session. It:
//! - serves nothing until the client presents the session token in the attach slot
//!   (compared in constant time against the token the daemon holds, never one from the region);
//! - then watches the client's pid with a pidfd, checked whenever the worker's park times out,
//!   and exits with [`ExitReason::ClientGone`] when it dies (even mid-request: the request in
//!   hand is finished, its completion posted, then the death is noticed on the next park);
//! - copies every descriptor out of the ring before looking at it, validates opcode, request
//!   id, offsets and lengths against its own state ([`dispatch::Dispatcher`]), and answers a bad
//!   request with an error completion whose message lands in the error slot;
//! - ends the session with [`ExitReason::Protocol`] when the client truncated its region file
//!   (the daemon's mapping then reads zeros, see [`kvdex_wire::shm::bus`]);
//! - treats an impossible ring index as a protocol violation: it posts a `Protocol` error
//!   completion if it can, marks the region closed, and exits with [`ExitReason::Protocol`];
//!   other clients, which have their own regions and workers, are untouched.
//!
//! `on_exit` runs on the worker thread after it stops serving; the daemon uses it to drop the
//! session and the region.

pub mod decode_ops;
pub mod dispatch;
pub mod liveness;
pub mod socket;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::affinity::CpuMask;
use crate::error::{KvdexError, Result};
use crate::store::retrieve::RetrieveStats;
use crate::store::Session;
use dispatch::Dispatcher;
use kvdex_wire::proto::{self, Opcode, Status};
use kvdex_wire::shm::layout::{attach_state, close_reason};
use kvdex_wire::shm::wait::{self, PidWatch, WaitPolicy};
use kvdex_wire::shm::{ConsumerState, Descriptor, ProducerState, Region};
use kvdex_wire::SessionToken;
pub use liveness::Liveness;

/// How the daemon records per-request metrics (control implements it with prometheus).
pub trait Observer: Send + Sync {
    /// One request finished: its op name ("ping", "append", ..., or "invalid"), whether it
    /// succeeded, its service time, and the payload bytes read and written.
    fn on_request(&self, op: &'static str, ok: bool, micros: f64, bytes_in: u64, bytes_out: u64);

    /// A recorder of retrieve internals for one connection, made once when the connection
    /// serves its first request (so that it may hold per-thread state and resolve its label
    /// children up front: recording must not allocate). The default records nothing.
    fn retrieve_recorder(&self) -> Box<dyn RetrieveRecorder> {
        Box::new(NoopObserver)
    }
}

/// Records what a successful retrieve did, on the connection's thread, once per request: it
/// must neither allocate nor block.
pub trait RetrieveRecorder: Send {
    /// `stats` as the store computed them; `k` the tokens chosen per query head (the
    /// response's k section, just written).
    fn on_retrieve(&mut self, stats: &RetrieveStats, k: &[u32]);
}

/// An [`Observer`] (and [`RetrieveRecorder`]) that records nothing (tests, benchmarks).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl Observer for NoopObserver {
    fn on_request(&self, _: &'static str, _: bool, _: f64, _: u64, _: u64) {}
}

impl RetrieveRecorder for NoopObserver {
    fn on_retrieve(&mut self, _: &RetrieveStats, _: &[u32]) {}
}

/// Why a worker stopped serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// [`Worker::stop`] was called (or the worker was dropped).
    Stopped,
    /// The client process exited or detached.
    ClientGone,
    /// The client corrupted the region (the message says how); the region is closed.
    Protocol(String),
    /// The worker failed internally (a bug); the region is closed.
    Internal(String),
    /// Nobody attached the region nor reached the session over the data socket before the
    /// attach deadline.
    NeverAttached,
}

/// Tuning of a worker.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerConfig {
    /// Spin, then park. The park timeout is also how often the client's pid is checked.
    pub wait: WaitPolicy,
    /// Pin the worker thread to these CPUs (`sessions.worker_cpus`); `None` leaves it to the
    /// scheduler.
    pub cpus: Option<CpuMask>,
}

struct Shared {
    region: Region,
    stop: AtomicBool,
}

/// A running worker thread. Dropping it stops the thread and waits for it.
pub struct Worker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("region", &self.shared.region.path())
            .finish()
    }
}

impl Worker {
    /// Starts serving `region` for `session`, with the default [`WorkerConfig`].
    pub fn spawn(
        region: Region,
        session: Arc<Session>,
        token: [u8; 16],
        observer: Arc<dyn Observer>,
        on_exit: Box<dyn FnOnce(ExitReason) + Send>,
    ) -> Result<Worker> {
        Self::spawn_with(
            region,
            session,
            token,
            observer,
            on_exit,
            WorkerConfig::default(),
        )
    }

    /// [`Worker::spawn`] with explicit tuning.
    pub fn spawn_with(
        region: Region,
        session: Arc<Session>,
        token: [u8; 16],
        observer: Arc<dyn Observer>,
        on_exit: Box<dyn FnOnce(ExitReason) + Send>,
        config: WorkerConfig,
    ) -> Result<Worker> {
        let live = Liveness::default();
        Self::spawn_watched(region, session, token, observer, on_exit, config, live)
    }

    /// [`Worker::spawn_with`], also ending the session when it is never attached within
    /// `live.attach_timeout`, or when it was reached only over the data socket and its last
    /// connection closed.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_watched(
        region: Region,
        session: Arc<Session>,
        token: [u8; 16],
        observer: Arc<dyn Observer>,
        on_exit: Box<dyn FnOnce(ExitReason) + Send>,
        config: WorkerConfig,
        live: Liveness,
    ) -> Result<Worker> {
        let h = region.header();
        let s = *session.shape();
        for (field, v) in h.shape.iter().zip([
            s.layers as u64,
            s.q_heads as u64,
            s.kv_heads as u64,
            s.head_dim as u64,
            proto::dtype_code(s.dtype),
        ]) {
            field.store(v, Ordering::Relaxed);
        }
        let shared = Arc::new(Shared {
            region,
            stop: AtomicBool::new(false),
        });
        let inner = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kvdex-worker".into())
            .spawn(move || {
                if let Some(Err(e)) = config.cpus.map(|m| m.pin_current_thread()) {
                    tracing::warn!(error = %e, "worker runs unpinned");
                }
                let reason = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    serve(&inner, session, token, &*observer, config, &live)
                }))
                .unwrap_or_else(|p| {
                    ExitReason::Internal(KvdexError::from_panic("worker", &*p).to_string())
                });
                let code = match &reason {
                    ExitReason::Stopped => close_reason::STOPPED,
                    ExitReason::ClientGone | ExitReason::NeverAttached => close_reason::CLIENT_GONE,
                    ExitReason::Protocol(_) => close_reason::PROTOCOL,
                    ExitReason::Internal(_) => close_reason::INTERNAL,
                };
                inner.region.close(code);
                tracing::debug!(region = %inner.region.path().display(), ?reason, "worker exits");
                on_exit(reason);
            })?;
        Ok(Worker {
            shared,
            thread: Some(thread),
        })
    }

    /// The region's path.
    pub fn region_path(&self) -> &std::path::Path {
        self.shared.region.path()
    }

    /// True once the thread has stopped serving.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Asks the thread to stop and waits for it (unless called from the worker thread itself,
    /// e.g. from `on_exit`, where waiting would deadlock).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        wait::force_wake(&self.shared.region.header().daemon_sleeping.0);
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Attachment {
    attached: bool,
    watch: Option<PidWatch>,
}

fn judge_attach(region: &Region, token: &[u8; 16], att: &mut Attachment) {
    let a = &region.header().attach.0;
    let presented = [
        a.token[0].load(Ordering::Relaxed),
        a.token[1].load(Ordering::Relaxed),
    ];
    let pid = a.client_pid.load(Ordering::Relaxed);
    let verdict = if !SessionToken::from_bytes(*token).matches_words(presented) {
        tracing::warn!(region = %region.path().display(), "attach with a wrong token refused");
        att.attached = false;
        attach_state::REJECTED
    } else if region
        .file_id()
        .is_some_and(|f| !liveness::maps_file(pid, f))
    {
        tracing::warn!(
            pid,
            "attach naming a pid that does not map the region refused"
        );
        att.attached = false;
        attach_state::REJECTED
    } else {
        match PidWatch::open(pid) {
            Ok(w) => {
                att.watch = Some(w);
                att.attached = true;
                attach_state::ACCEPTED
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                tracing::warn!(
                    "pidfd_open unsupported; client death will go unnoticed until detach"
                );
                att.attached = true;
                attach_state::ACCEPTED
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "attach from a pid that cannot be watched refused");
                att.attached = false;
                attach_state::REJECTED
            }
        }
    };
    if verdict == attach_state::ACCEPTED {
        // Judged: the token need not stay where other processes of the uid could read it.
        a.token.iter().for_each(|w| w.store(0, Ordering::Relaxed));
    }
    a.state.store(verdict, Ordering::Release);
    wait::force_wake(&region.header().client_sleeping.0);
}

fn serve(
    shared: &Shared,
    session: Arc<Session>,
    token: [u8; 16],
    observer: &dyn Observer,
    config: WorkerConfig,
    live: &Liveness,
) -> ExitReason {
    let started = std::time::Instant::now();
    let region = &shared.region;
    let h = region.header();
    let (sq, cq) = (region.sq(), region.cq());
    let mut consumer = ConsumerState::new(&sq);
    let mut producer = ProducerState::new(&cq);
    let mut dispatcher = Dispatcher::new(session);
    let mut att = Attachment {
        attached: false,
        watch: None,
    };
    let state = &h.attach.0.state;
    // Whether the last completion had to wake the client from a park.
    let mut woke_client = false;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return ExitReason::Stopped;
        }
        if region.truncated() {
            return ExitReason::Protocol("the client truncated its region file".into());
        }
        match state.load(Ordering::Acquire) {
            attach_state::REQUESTED => judge_attach(region, &token, &mut att),
            attach_state::DETACHED if att.attached => return ExitReason::ClientGone,
            _ => {}
        }
        let (_, d) = match consumer.try_pop(&sq) {
            Ok(Some(entry)) => entry,
            Ok(None) => {
                let ready = || {
                    shared.stop.load(Ordering::Relaxed)
                        || region.truncated()
                        || sq.has_entries_after(consumer.tail())
                        || match state.load(Ordering::Relaxed) {
                            attach_state::REQUESTED => true,
                            attach_state::DETACHED => att.attached,
                            _ => false,
                        }
                };
                // After waking a parked client, spin for its next request only once it shows
                // it runs (it took the completion); else leave the core to it.
                let taken = || producer.in_flight(&cq).map_or(true, |n| n == 0);
                let woke = if std::mem::take(&mut woke_client) {
                    wait::wait_watching(&h.daemon_sleeping.0, config.wait, taken, ready)
                } else {
                    wait::wait_until(&h.daemon_sleeping.0, config.wait, ready)
                };
                if !woke {
                    if att.watch.as_ref().is_some_and(|w| w.exited()) {
                        return ExitReason::ClientGone;
                    }
                    if !att.attached && live.presence.all_left() {
                        return ExitReason::ClientGone;
                    }
                    let late = live.attach_timeout.is_some_and(|t| started.elapsed() > t);
                    if !att.attached && !live.presence.seen() && late {
                        return ExitReason::NeverAttached;
                    }
                }
                continue;
            }
            Err(e) => {
                let msg = e.to_string();
                let c = Descriptor {
                    request_id: 0,
                    code: Status::Protocol as u32,
                    ..Default::default()
                };
                // Best effort: the completion ring may be the corrupted one.
                if let Ok(true) = producer.try_push(
                    &cq,
                    &Descriptor {
                        aux: region.write_error(producer.head(), &msg),
                        ..c
                    },
                ) {
                    let _ = wait::notify(&h.client_sleeping.0);
                }
                return ExitReason::Protocol(msg);
            }
        };
        let result = if att.attached {
            // SAFETY: this thread is the only user of the arena in this process (the Worker
            // handle only touches header atomics); the bytes are untrusted and handled as such.
            let arena = unsafe { region.arena_unchecked() };
            // A panic in the request (its own code or a rayon task it ran) fails this request
            // with an internal error; the session and the daemon go on.
            crate::error::catch_panic("request", || dispatcher.serve_observed(&d, arena, observer))
        } else {
            let e = KvdexError::Unauthorized(
                "attach with the session token before sending requests".into(),
            );
            let op = Opcode::from_code(d.code).map_or("invalid", Opcode::name);
            observer.on_request(op, false, 0.0, d.in_len, 0);
            Err(e)
        };
        let completion = match &result {
            Ok(n) => Descriptor {
                request_id: d.request_id,
                out_offset: d.out_offset,
                out_len: *n,
                ..Default::default()
            },
            Err(e) => {
                let aux = region.write_error(producer.head(), &e.to_string());
                dispatch::error_completion(d.request_id, e, aux)
            }
        };
        loop {
            match producer.try_push(&cq, &completion) {
                Ok(true) => break,
                Ok(false) => {
                    // The client is not draining its completions: wait for room, but keep
                    // watching for stop and death.
                    if shared.stop.load(Ordering::Acquire) {
                        return ExitReason::Stopped;
                    }
                    if att.watch.as_ref().is_some_and(|w| w.exited())
                        || state.load(Ordering::Acquire) == attach_state::DETACHED
                    {
                        return ExitReason::ClientGone;
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => return ExitReason::Protocol(e.to_string()),
            }
        }
        woke_client = wait::notify(&h.client_sleeping.0);
    }
}

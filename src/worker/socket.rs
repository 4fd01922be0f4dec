//! The Unix-socket data path: the same request codec and the same request path as shared
//! memory, over a stream socket.
//!
//! `kvdex serve` offers it when `sessions.data_socket` names a path. A connection starts with a
//! [`Hello`] frame naming a session and presenting its token; the daemon answers with one
//! completion (success, or an error code with the message), and, once accepted, serves frames
//! until the peer closes the connection or the session ends.
//!
//! A request frame is a 64-byte [`Descriptor`] followed by `in_len` body bytes (its
//! `in_offset` is ignored). The reply is a completion descriptor followed by `out_len` response
//! bytes on success, or `aux` error-message bytes on failure. Each connection has a private
//! arena the size of the session's shared-memory arena, and calls the same
//! [`Dispatcher::serve_observed`] as the shared-memory worker, so the transports differ only in
//! how the bytes travel (which is what `kvdex bench rtt` compares).
//!
//! A session's connections are tied to its [`SocketRegistration`]: dropping it (the session
//! was deleted or its client died) shuts them down and waits until their threads have let go of
//! the session, so its memory is freed when the session ends.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::affinity::CpuMask;
use crate::error::{KvdexError, Result};
use crate::store::budget::{Budget, Part, Reservation};
use crate::store::Session;
use crate::worker::dispatch::{error_completion, Dispatcher};
use crate::worker::liveness::Presence;
use crate::worker::Observer;
use kvdex_wire::hello::{Hello, FRAME_HEADER};
use kvdex_wire::shm::layout::PAYLOAD_ALIGN;
use kvdex_wire::shm::Descriptor;
use kvdex_wire::SessionToken;

/// How long a new connection may take to send its [`Hello`].
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A session reachable over the data socket.
struct Reachable {
    token: [u8; 16],
    session: Arc<Session>,
    arena_bytes: usize,
    observer: Arc<dyn Observer>,
    /// Counts the open connections, for the worker's liveness check.
    presence: Arc<Presence>,
    /// Each connection's arena is charged here while it is open.
    budget: Arc<Budget>,
    /// Set when the session ends; no connection is accepted after.
    ended: AtomicBool,
    /// Open connections: a handle to shut each down, and a channel that closes when its
    /// thread has dropped the session.
    conns: Mutex<Vec<(UnixStream, mpsc::Receiver<()>)>>,
}

impl Reachable {
    fn conns(&self) -> MutexGuard<'_, Vec<(UnixStream, mpsc::Receiver<()>)>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The daemon's data socket: which sessions it serves, and the thread accepting connections.
#[derive(Default)]
pub struct SocketHub {
    sessions: Mutex<HashMap<String, Arc<Reachable>>>,
}

impl std::fmt::Debug for SocketHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketHub")
            .field("sessions", &self.lock().len())
            .finish()
    }
}

/// Keeps a session reachable over the data socket; dropping it closes the session's
/// connections and waits until their threads have released the session.
pub struct SocketRegistration {
    hub: Arc<SocketHub>,
    id: String,
}

impl SocketHub {
    /// An empty hub.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Reachable>>> {
        // Inserts and removes are single calls: a poisoned map is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes session `id` reachable for holders of `token`, with a per-connection arena of
    /// `arena_bytes` (the same limit as its shared-memory arena).
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        self: &Arc<Self>,
        id: &str,
        token: [u8; 16],
        session: Arc<Session>,
        arena_bytes: usize,
        observer: Arc<dyn Observer>,
        presence: Arc<Presence>,
        budget: Arc<Budget>,
    ) -> SocketRegistration {
        let r = Arc::new(Reachable {
            token,
            session,
            arena_bytes,
            observer,
            presence,
            budget,
            ended: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        self.lock().insert(id.to_owned(), r);
        SocketRegistration {
            hub: self.clone(),
            id: id.to_owned(),
        }
    }

    /// Accepts connections on `listener` on a thread of its own, one thread per connection.
    /// The thread lives as long as the process (the daemon removes the socket file at exit).
    /// With `cpus`, the accepting thread is pinned there, and so are the connection threads it
    /// starts (they inherit its affinity).
    pub fn listen(self: &Arc<Self>, listener: UnixListener, cpus: Option<CpuMask>) -> Result<()> {
        let hub = self.clone();
        std::thread::Builder::new()
            .name("kvdex-data-socket".into())
            .spawn(move || {
                if let Some(Err(e)) = cpus.map(|m| m.pin_current_thread()) {
                    tracing::warn!(error = %e, "data socket threads run unpinned");
                }
                for stream in listener.incoming() {
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "data socket accept failed");
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let hub = hub.clone();
                    let spawned = std::thread::Builder::new()
                        .name("kvdex-socket".into())
                        .spawn(move || {
                            if let Err(e) = hub.serve_connection(stream) {
                                tracing::debug!(error = %e, "data socket connection ended");
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start a data socket thread");
                    }
                }
            })?;
        Ok(())
    }

    /// Judges the connection's hello, then serves it until the peer closes or the session
    /// ends.
    fn serve_connection(&self, mut stream: UnixStream) -> Result<()> {
        stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
        let mut frame = [0u8; FRAME_HEADER];
        stream.read_exact(&mut frame)?;
        stream.set_read_timeout(None)?;
        let hello: Hello = bytemuck::pod_read_unaligned(&frame);
        let (reach, done, _arena_held) = match self.admit(&hello, &stream) {
            Ok(admitted) => admitted,
            Err(e) => {
                let msg = e.to_string();
                let c = error_completion(0, &e, msg.len() as u32);
                let mut reply = bytemuck::bytes_of(&c).to_vec();
                reply.extend_from_slice(msg.as_bytes());
                stream.write_all(&reply)?;
                return Err(e);
            }
        };
        let accepted = Descriptor {
            out_len: reach.arena_bytes as u64,
            ..Default::default()
        };
        stream.write_all(bytemuck::bytes_of(&accepted))?;
        let (session, arena, observer) = (
            reach.session.clone(),
            reach.arena_bytes,
            reach.observer.clone(),
        );
        // Counted until this connection ends, however it ends (the peer may be killed).
        let _connected = reach.presence.connect();
        drop(reach);
        let result = serve_frames(stream, Dispatcher::new(session), arena, &*observer);
        // The dispatcher (and with it the session) is gone: let a waiting end() go on.
        drop(done);
        result
    }

    /// Checks the token (in constant time) and records the connection with its session.
    fn admit(
        &self,
        hello: &Hello,
        stream: &UnixStream,
    ) -> Result<(Arc<Reachable>, mpsc::Sender<()>, Reservation)> {
        let id = hello.session_id()?;
        let reach = self
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| KvdexError::NotFound(format!("session {id:?}")))?;
        if !SessionToken::from_bytes(reach.token).matches(&hello.token) {
            tracing::warn!(%id, "data socket hello with a wrong token refused");
            return Err(KvdexError::Unauthorized(format!(
                "wrong token for session {id}"
            )));
        }
        // The connection's arena is memory held for the client: within the budget.
        let held = reach
            .budget
            .reserve_owned(Part::SocketArenas, reach.arena_bytes as u64)?;
        let (done_tx, done_rx) = mpsc::channel();
        let mut conns = reach.conns();
        if reach.ended.load(Ordering::Acquire) {
            return Err(KvdexError::NotFound(format!("session {id:?} has ended")));
        }
        conns.push((stream.try_clone()?, done_rx));
        drop(conns);
        Ok((reach, done_tx, held))
    }
}

impl Drop for SocketRegistration {
    fn drop(&mut self) {
        let Some(reach) = self.hub.lock().remove(&self.id) else {
            return;
        };
        let conns = {
            let mut conns = reach.conns();
            reach.ended.store(true, Ordering::Release);
            std::mem::take(&mut *conns)
        };
        for (stream, done) in conns {
            let _ = stream.shutdown(Shutdown::Both);
            // Returns once the connection's thread dropped its sender, after the session.
            let _ = done.recv();
        }
    }
}

/// Serves request frames on `stream` with `dispatcher` until the peer closes it.
pub fn serve_frames(
    mut stream: UnixStream,
    mut dispatcher: Dispatcher,
    arena_bytes: usize,
    observer: &dyn Observer,
) -> Result<()> {
    let mut arena = vec![0u8; arena_bytes];
    // Grows to the largest reply once; no allocation per request after that.
    let mut reply = vec![0u8; FRAME_HEADER + 4096];
    let mut header = [0u8; FRAME_HEADER];
    loop {
        match stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let mut d: Descriptor = bytemuck::pod_read_unaligned(&header);
        let Some(in_len) = usize::try_from(d.in_len).ok().filter(|&n| n <= arena_bytes) else {
            // The body cannot be skipped safely: answer, then end the connection.
            let e = KvdexError::BadRequest(format!(
                "frame body of {} bytes exceeds the {arena_bytes}-byte arena",
                d.in_len
            ));
            let msg = e.to_string();
            let c = error_completion(d.request_id, &e, msg.len() as u32);
            let _ = stream.write_all(bytemuck::bytes_of(&c));
            let _ = stream.write_all(msg.as_bytes());
            return Err(e);
        };
        stream.read_exact(&mut arena[..in_len])?;
        let out_offset = (in_len as u64).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN;
        d.in_offset = 0;
        d.out_offset = out_offset;
        d.out_len = d
            .out_len
            .min((arena_bytes as u64).saturating_sub(out_offset));
        let (c, body): (Descriptor, &[u8]) = match crate::error::catch_panic("request", || {
            dispatcher.serve_observed(&d, &mut arena, observer)
        }) {
            Ok(n) => (
                Descriptor {
                    request_id: d.request_id,
                    out_offset,
                    out_len: n,
                    ..Default::default()
                },
                &arena[out_offset as usize..(out_offset + n) as usize],
            ),
            Err(e) => {
                let msg = e.to_string();
                let n = msg.len().min(arena_bytes);
                arena[..n].copy_from_slice(&msg.as_bytes()[..n]);
                (error_completion(d.request_id, &e, n as u32), &arena[..n])
            }
        };
        // One write per reply, as the client sends one write per request.
        let total = FRAME_HEADER + body.len();
        if reply.len() < total {
            reply.resize(total, 0);
        }
        reply[..FRAME_HEADER].copy_from_slice(bytemuck::bytes_of(&c));
        reply[FRAME_HEADER..total].copy_from_slice(body);
        stream.write_all(&reply[..total])?;
    }
}

#[cfg(test)]
mod tests;

//! kvdex-client: the blocking Rust client. Connect, create and drop sessions, append, search,
//! gather. It links the wire format and a plain-HTTP client only (no async runtime, no TLS:
//! the control plane is loopback HTTP).
//!
//! ```no_run
//! # fn main() -> kvdex_client::Result<()> {
//! use kvdex_client::{Client, SessionOptions, Shape};
//! let client = Client::connect("http://127.0.0.1:7070")?;
//! let shape = Shape { layers: 2, q_heads: 4, kv_heads: 2, head_dim: 8, dtype: kvdex_index::KeyDtype::F32 };
//! let mut session = client.create_session(shape, SessionOptions::default())?;
//! let echo = session.ping(b"hello")?;
//! assert_eq!(echo, b"hello");
//! session.drop_session()?;
//! # Ok(()) }
//! ```
//!
//! The HTTP control plane is used only to create and drop a session; every request after that
//! goes over the session's shared-memory region, one outstanding request at a time, writing
//! the request into the region's arena and reading results from it, so a request allocates
//! nothing.

pub mod decode;
pub mod http;
pub mod merge;
pub mod retrieve;
pub mod session;
pub mod socket;

use std::time::Duration;

pub use retrieve::{PendingRetrieve, RetrieveRequest, Retrieved};
pub use session::{GatheredRows, SessionHandle, INTERRUPTED};
pub use socket::SocketSession;

pub use kvdex_wire::{Error, Result, SessionToken, Shape};

use kvdex_wire::shm::wait::WaitPolicy;

/// Options of [`Client::create_session`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionOptions {
    /// Payload arena size; the daemon's configured default when `None`.
    pub payload_bytes: Option<u64>,
    /// How the client waits for completions (spin, then park).
    pub wait: WaitPolicy,
    /// Slim mode (MHA only): the daemon stores K alone; upload each layer's W_KV with
    /// [`SessionHandle::set_wkv`] before appending to it.
    pub slim: Option<kvdex_wire::SlimSpec>,
    /// S: the first tokens of every layer the engine keeps and retrieval never returns; the
    /// daemon's `decode.sinks` when `None`. Must equal what the engine attends to itself.
    pub sinks: Option<u64>,
    /// W: the most recent tokens the engine keeps and retrieval never returns; the daemon's
    /// `decode.window` when `None`.
    pub window: Option<u64>,
    /// How the daemon stores the rows (`kv_format`); the session dtype when `None`.
    pub kv_format: Option<kvdex_wire::KvFormat>,
}

/// A connection to a daemon's control plane.
#[derive(Clone, Debug)]
pub struct Client {
    agent: ureq::Agent,
    base_url: String,
}

impl Client {
    /// Connects to the daemon at `base_url` (e.g. `http://127.0.0.1:7070`) and checks
    /// `/healthz`.
    pub fn connect(base_url: &str) -> Result<Client> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        let base_url = base_url.trim_end_matches('/').to_owned();
        agent
            .get(&format!("{base_url}/healthz"))
            .call()
            .map_err(|e| http::http_error("GET /healthz", e))?;
        Ok(Client { agent, base_url })
    }

    /// Creates a session of `shape` over HTTP, then maps and attaches its region.
    pub fn create_session(&self, shape: Shape, opts: SessionOptions) -> Result<SessionHandle> {
        let created = http::create(&self.agent, &self.base_url, &shape, &opts)?;
        attach_created(&self.agent, &self.base_url, created, opts.wait)
    }

    /// Attaches to a region directly, bypassing HTTP (tests, embedded daemons).
    pub fn attach(
        shm_path: impl AsRef<std::path::Path>,
        token: &[u8; 16],
    ) -> Result<SessionHandle> {
        SessionHandle::attach(shm_path.as_ref(), token, WaitPolicy::default())
    }

    /// [`Client::attach`] with an explicit wait policy.
    pub fn attach_with(
        shm_path: impl AsRef<std::path::Path>,
        token: &[u8; 16],
        wait: WaitPolicy,
    ) -> Result<SessionHandle> {
        SessionHandle::attach(shm_path.as_ref(), token, wait)
    }
}

/// Attaches the region of a session the daemon just created; on failure the session is
/// dropped again.
fn attach_created(
    agent: &ureq::Agent,
    base_url: &str,
    created: http::CreatedSession,
    wait: WaitPolicy,
) -> Result<SessionHandle> {
    let token = *SessionToken::parse(&created.token)?.as_bytes();
    let http = http::HttpSession {
        agent: agent.clone(),
        base_url: base_url.to_owned(),
        id: created.id,
        token: created.token,
        data_socket: created.data_socket,
    };
    let mut handle =
        match SessionHandle::attach(std::path::Path::new(&created.shm_path), &token, wait) {
            Ok(h) => h,
            Err(e) => {
                let _ = http.delete();
                return Err(e);
            }
        };
    handle.http = Some(http);
    Ok(handle)
}

impl SessionHandle {
    /// A new session holding a copy of this one's rows (and built indices where they can be
    /// copied), with its own id, token and region (`POST /v1/sessions/{id}/fork`): beam
    /// search, a shared prompt. The copy is charged to the daemon's budget. Its handle waits
    /// as this one does. Fails with [`kvdex_wire::Error::NotFound`] for a handle made without
    /// HTTP ([`Client::attach`]).
    pub fn fork(&self) -> Result<SessionHandle> {
        let h = self.http.as_ref().ok_or_else(|| {
            kvdex_wire::Error::NotFound("a session attached without HTTP cannot be forked".into())
        })?;
        let created = h.fork()?;
        attach_created(&h.agent, &h.base_url, created, self.wait_policy())
    }

    /// Drops the session on the daemon (`DELETE /v1/sessions/{id}`) and detaches. For a
    /// handle made with [`Client::attach`] it only detaches.
    pub fn drop_session(mut self) -> Result<()> {
        match self.http.take() {
            Some(h) => h.delete(),
            None => Ok(()),
        }
    }

    /// A second connection to this session over the daemon's Unix data socket
    /// (`sessions.data_socket`), presenting the same token. Fails with
    /// [`kvdex_wire::Error::NotFound`] when the daemon has no data socket or the handle was not
    /// made by [`Client::create_session`].
    pub fn open_socket(&self) -> Result<SocketSession> {
        let h = self.http.as_ref().ok_or_else(|| {
            kvdex_wire::Error::NotFound("a session attached without HTTP has no id".into())
        })?;
        let path = h.data_socket.as_deref().ok_or_else(|| {
            kvdex_wire::Error::NotFound(
                "the daemon has no data socket (config key `sessions.data_socket`)".into(),
            )
        })?;
        SocketSession::connect(path, &h.id, SessionToken::parse(&h.token)?.as_bytes())
    }
}

/// Copies a search response's `k × q_heads` ids and scores (little-endian bytes in the arena or
/// frame) into the caller's buffers; both transports decode search results with it. Returns `k`.
/// Buffers too small for the result are a clear error, not a partial copy.
pub(crate) fn copy_search_hits(
    k: u32,
    q_heads: u32,
    id_bytes: &[u8],
    score_bytes: &[u8],
    ids: &mut [u32],
    scores: &mut [f32],
) -> Result<usize> {
    let n = (k as usize) * (q_heads as usize);
    if ids.len() < n || scores.len() < n {
        return Err(kvdex_wire::Error::BadRequest(format!(
            "search result has {n} entries; output buffers hold {} ids and {} scores",
            ids.len(),
            scores.len()
        )));
    }
    kvdex_wire::proto::read_u32s(id_bytes, &mut ids[..n]);
    kvdex_wire::proto::read_f32s(score_bytes, &mut scores[..n]);
    Ok(k as usize)
}

/// The error for a response whose opcode does not answer the request sent: the peer speaks
/// another protocol revision or the ring was corrupted. Shared by both transports.
pub(crate) fn unexpected(op: kvdex_wire::proto::Opcode) -> kvdex_wire::Error {
    kvdex_wire::Error::Protocol(format!("unexpected response {op:?}"))
}

//! The session registry: who holds which session, with which token, served by which worker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::dataplane::{DataPlane, DataPlaneSpec, ExitNotice, Serving};
use crate::config::{Config, MIN_PAYLOAD_BYTES};
use crate::error::{KvdexError, Result};
use crate::metrics::Metrics;
use crate::store::{
    dtype_serde, KvFormat, LayerStats, Session, SessionSpec, Shape, SlimSpec, SlimStats, Store,
};
use kvdex_index::attend::RopeSpec;
use kvdex_wire::SessionToken;

/// Bytes of a session token: 128 bits from the OS RNG.
pub const TOKEN_BYTES: usize = 16;

/// Body of `POST /v1/sessions`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// Transformer layers.
    pub layers: u32,
    /// Query heads per layer.
    pub q_heads: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// Elements per head vector.
    pub head_dim: u32,
    /// "f16" | "bf16" | "f32".
    pub dtype: String,
    /// Payload arena of the shared-memory region; the config's default when absent.
    pub payload_bytes: Option<u64>,
    /// Slim mode (MHA only): store K alone, recompute V = K·W_KV; each layer's W_KV is then
    /// uploaded over the region (`set_wkv`) before its first append.
    #[serde(default)]
    pub slim: bool,
    /// RoPE of the keys a Slim session stores, undone before K·W_KV (absent: pre-RoPE keys).
    #[serde(default)]
    pub slim_rope: Option<SlimRope>,
    /// S: the first tokens of every layer the engine keeps, never retrieved; the daemon's
    /// `decode.sinks` when absent. At most [`crate::config::MAX_STATIC_TOKENS`].
    #[serde(default)]
    pub sinks: Option<u64>,
    /// W: the most recent tokens the engine keeps, never retrieved; the daemon's
    /// `decode.window` when absent. At most [`crate::config::MAX_STATIC_TOKENS`].
    #[serde(default)]
    pub window: Option<u64>,
    /// Share of this session's retrieves sampled for online recall (0 to 1); the daemon's
    /// `decode.sample_rate` when absent.
    #[serde(default)]
    pub sample_rate: Option<f64>,
    /// How the rows are stored: `"int8"` (one scale per row) or the dtype's own name (the
    /// default).
    #[serde(default)]
    pub kv_format: Option<String>,
}

/// `"slim_rope": {"theta": 100000.0, "rope_dim": 64}` of `POST /v1/sessions`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlimRope {
    /// RoPE base.
    pub theta: f64,
    /// Rotated dimensions per head.
    pub rope_dim: usize,
}

/// Reply to `POST /v1/sessions`: everything the client needs to attach.
#[derive(Clone, Debug, Serialize)]
pub struct Created {
    /// Session id (hex).
    pub id: String,
    /// The per-session token (32 hex chars): for attaching and for `/v1/sessions/{id}`.
    pub token: String,
    /// The shared-memory file to open.
    pub shm_path: PathBuf,
    /// Size of the region's payload arena.
    pub payload_bytes: u64,
    /// The Unix data socket that also serves the session (`sessions.data_socket`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_socket: Option<PathBuf>,
}

/// Where a session is in its life, as `/stats` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Serving its client.
    Open,
    /// Deleted or reaped: its id and token no longer answer, but its worker is still stopping
    /// and its memory is still reserved (listed until the memory is released, so that `/stats`
    /// never shows budget held by no session).
    Closing,
}

/// One session's public state, for `GET /v1/sessions/{id}` and `/stats`.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// Open, or closing (memory not released yet).
    pub state: SessionState,
    /// Its shape.
    pub shape: Shape,
    /// Its shared-memory file, for its token holder only (`/stats`, which anyone may read,
    /// lists no paths).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shm_path: Option<PathBuf>,
    /// Payload arena size.
    pub payload_bytes: u64,
    /// K/V bytes stored.
    pub resident_bytes: u64,
    /// Bytes of budget held (arena capacity, and training queries staged by seal parts).
    pub reserved_bytes: u64,
    /// Seconds since creation.
    pub age_secs: f64,
    /// S: the first tokens of every layer the engine keeps (the session's own, or the daemon's
    /// `decode.sinks`).
    pub sinks: usize,
    /// W: the most recent tokens the engine keeps (the session's own, or `decode.window`).
    pub window: usize,
    /// Per layer: tokens, capacity, index kind and index progress.
    pub layers: Vec<LayerStats>,
    /// Slim mode's memory account (absent for a K+V session).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slim: Option<SlimStats>,
    /// How the rows are stored: `"int8"`, or the dtype's name.
    pub kv_format: &'static str,
    /// Bytes one token's rows take over every layer and KV head (scales included).
    pub bytes_per_token: usize,
    /// Engine GPU buffers registered as retrieve destinations (open CUDA IPC mappings).
    pub engine_dests: usize,
    /// Retrieval quality measured by online recall sampling (`crate::store::sampler`).
    pub quality: crate::store::sampler::QualityReport,
}

/// What `/stats` shows of a session, open or closing; holds the session (and so its memory).
#[derive(Clone)]
struct Listing {
    shm_path: PathBuf,
    payload_bytes: u64,
    created: Instant,
    session: Arc<Session>,
}

/// A live session.
struct Entry {
    token: [u8; TOKEN_BYTES],
    listing: Listing,
    /// Dropped (stopping the worker and removing the region) when the session ends.
    serving: Box<dyn Serving>,
}

/// Every live session of the daemon.
pub struct Registry {
    config: Config,
    store: Store,
    metrics: Arc<Metrics>,
    data_plane: Box<dyn DataPlane>,
    sessions: Mutex<HashMap<String, Entry>>,
    /// Ended sessions whose worker is stopping: still listed by `/stats` (as closing) until
    /// their memory is released. Locked after `sessions` when both are held.
    closing: Mutex<HashMap<String, Listing>>,
    /// Where workers report their exit; the daemon's reaper ends those sessions.
    exits: tokio::sync::mpsc::UnboundedSender<ExitNotice>,
    shutting_down: AtomicBool,
}

/// Hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Registry {
    /// An empty registry; `exits` receives the notices of workers whose client went away.
    pub fn new(
        config: Config,
        store: Store,
        metrics: Arc<Metrics>,
        data_plane: Box<dyn DataPlane>,
        exits: tokio::sync::mpsc::UnboundedSender<ExitNotice>,
    ) -> Self {
        metrics
            .budget_bytes
            .set(store.budget().total().min(i64::MAX as u64) as i64);
        Self {
            config,
            store,
            metrics,
            data_plane,
            sessions: Mutex::new(HashMap::new()),
            closing: Mutex::new(HashMap::new()),
            exits,
            shutting_down: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the map cannot leave it half-updated (inserts and removes are
        // single calls), so a poisoned lock is still safe to use.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_closing(&self) -> MutexGuard<'_, HashMap<String, Listing>> {
        // As for `lock`: single inserts and removes.
        self.closing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a session: validates the request, allocates the store session, creates the
    /// shared-memory region and starts its worker.
    pub fn create(&self, req: CreateRequest) -> Result<Created> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(KvdexError::Disconnected(
                "the daemon is shutting down".into(),
            ));
        }
        let dtype = dtype_serde::parse(&req.dtype).ok_or_else(|| {
            KvdexError::BadRequest(format!(
                "dtype {:?} is not one of f16, bf16, f32",
                req.dtype
            ))
        })?;
        let shape = Shape {
            layers: req.layers,
            q_heads: req.q_heads,
            kv_heads: req.kv_heads,
            head_dim: req.head_dim,
            dtype,
        };
        let limits = &self.config.sessions;
        let payload_bytes = req.payload_bytes.unwrap_or(limits.default_payload_bytes);
        if !(MIN_PAYLOAD_BYTES..=limits.max_payload_bytes).contains(&payload_bytes) {
            return Err(KvdexError::BadRequest(format!(
                "payload_bytes {payload_bytes} is not between {MIN_PAYLOAD_BYTES} and {} \
                 (sessions.max_payload_bytes)",
                limits.max_payload_bytes
            )));
        }
        if req.slim_rope.is_some() && !req.slim {
            return Err(KvdexError::BadRequest(
                "slim_rope is given but slim is not true".into(),
            ));
        }
        let slim = req.slim.then(|| SlimSpec {
            rope: req.slim_rope.map(|r| RopeSpec {
                theta: r.theta,
                rope_dim: r.rope_dim,
            }),
        });
        // A value past usize (32-bit targets) is refused by the store's bound like any other.
        let statics = |v: Option<u64>| v.map(|v| usize::try_from(v).unwrap_or(usize::MAX));
        let spec = SessionSpec {
            slim,
            sinks: statics(req.sinks),
            window: statics(req.window),
            sample_rate: req.sample_rate,
            kv_format: match &req.kv_format {
                Some(name) => KvFormat::parse(name, dtype)?,
                None => KvFormat::Dtype,
            },
        };
        let session = Arc::new(self.store.session_spec(shape, spec)?);
        self.start(session, payload_bytes)
    }

    /// A new session holding a copy of session `id`'s rows (for its token holder), with the
    /// same payload arena size: `POST /v1/sessions/{id}/fork`.
    pub fn fork(&self, id: &str, token: Option<&str>) -> Result<Created> {
        let (source, payload_bytes) = {
            let map = self.lock();
            let e = Self::authorize(&map, id, token)?;
            (e.listing.session.clone(), e.listing.payload_bytes)
        };
        // The copy is made outside the map's lock.
        self.start(Arc::new(source.fork()?), payload_bytes)
    }

    /// Registers `session` with a new id and token, its region and its worker.
    fn start(&self, session: Arc<Session>, payload_bytes: u64) -> Result<Created> {
        let limits = &self.config.sessions;
        let shape = *session.shape();
        let (sinks, window) = (
            session.decode_config().sinks,
            session.decode_config().window,
        );
        let mut id_bytes = [0u8; 8];
        let mut token = [0u8; TOKEN_BYTES];
        OsRng
            .try_fill_bytes(&mut id_bytes)
            .and_then(|()| OsRng.try_fill_bytes(&mut token))
            .map_err(|e| {
                KvdexError::Io(std::io::Error::other(format!("OS random generator: {e}")))
            })?;
        let id = hex(&id_bytes);
        let shm_path =
            PathBuf::from(&limits.shm_dir).join(format!("kvdex-{}-{id}", std::process::id()));
        let mut map = self.lock();
        if map.len() as u64 >= limits.max_sessions {
            return Err(KvdexError::Exhausted(format!(
                "{} sessions are alive, the limit (sessions.max_sessions)",
                map.len()
            )));
        }
        let spec = DataPlaneSpec {
            id: id.clone(),
            shm_path: shm_path.clone(),
            payload_bytes,
            token,
            session: session.clone(),
            budget: self.store.budget().clone(),
            metrics: self.metrics.clone(),
            exits: self.exits.clone(),
        };
        let serving = self.data_plane.start(spec)?;
        map.insert(
            id.clone(),
            Entry {
                token,
                listing: Listing {
                    shm_path: shm_path.clone(),
                    payload_bytes,
                    created: Instant::now(),
                    session,
                },
                serving,
            },
        );
        self.metrics.sessions.set(map.len() as i64);
        tracing::info!(%id, ?shape, payload_bytes, sinks, window, "session created");
        Ok(Created {
            id,
            token: SessionToken::from_bytes(token).to_string(),
            shm_path,
            payload_bytes,
            data_socket: self.config.data_socket(),
        })
    }

    /// Checks `token` against session `id`: NotFound for an unknown id, Unauthorized for a
    /// missing or wrong token.
    fn authorize<'a>(
        map: &'a HashMap<String, Entry>,
        id: &str,
        token: Option<&str>,
    ) -> Result<&'a Entry> {
        let token = token.ok_or_else(|| {
            KvdexError::Unauthorized("missing `Authorization: Bearer <token>`".into())
        })?;
        let entry = map
            .get(id)
            .ok_or_else(|| KvdexError::NotFound(format!("session {id:?}")))?;
        match SessionToken::parse(token) {
            Ok(t) if t.matches(&entry.token) => Ok(entry),
            _ => Err(KvdexError::Unauthorized(format!(
                "wrong token for session {id}"
            ))),
        }
    }

    /// The state of session `id`, for its token holder.
    pub fn info(&self, id: &str, token: Option<&str>) -> Result<SessionInfo> {
        let map = self.lock();
        let entry = Self::authorize(&map, id, token)?;
        let listing = entry.listing.clone();
        drop(map);
        let mut info = Self::describe(id, SessionState::Open, &listing);
        info.shm_path = Some(listing.shm_path.clone());
        Ok(info)
    }

    /// What anyone may see of a session: no path. Takes the session's layer locks, so the
    /// callers hold no registry lock meanwhile.
    fn describe(id: &str, state: SessionState, e: &Listing) -> SessionInfo {
        SessionInfo {
            id: id.to_string(),
            state,
            shape: *e.session.shape(),
            shm_path: None,
            payload_bytes: e.payload_bytes,
            resident_bytes: e.session.resident_bytes(),
            reserved_bytes: e.session.reserved_bytes(),
            age_secs: e.created.elapsed().as_secs_f64(),
            sinks: e.session.decode_config().sinks,
            window: e.session.decode_config().window,
            layers: e.session.layer_stats(),
            slim: e.session.slim_stats(),
            kv_format: e.session.kv_format().name(e.session.shape().dtype),
            bytes_per_token: e.session.bytes_per_token(),
            engine_dests: e.session.engine_dest_count(),
            quality: e.session.quality_report(),
        }
    }

    /// Ends session `id` for its token holder: stops its worker, frees its memory.
    pub fn delete(&self, id: &str, token: Option<&str>) -> Result<()> {
        let serving = {
            let mut map = self.lock();
            Self::authorize(&map, id, token)?;
            self.start_closing(&mut map, id)
        };
        self.finish(id, serving, "deleted");
        Ok(())
    }

    /// Ends session `id` because its worker exited (`reason`: "client_gone", ...). Unknown ids
    /// (already deleted) are ignored.
    pub fn end(&self, id: &str, reason: &'static str) {
        let serving = self.start_closing(&mut self.lock(), id);
        self.finish(id, serving, reason);
    }

    /// Moves session `id` from the live map (held locked by the caller) to the closing one, in
    /// one step for `/stats`, and returns what serves it.
    fn start_closing(
        &self,
        map: &mut HashMap<String, Entry>,
        id: &str,
    ) -> Option<Box<dyn Serving>> {
        let entry = map.remove(id)?;
        self.lock_closing().insert(id.to_string(), entry.listing);
        Some(entry.serving)
    }

    /// Stops what serves a closing session outside the live map's lock (stopping a worker can
    /// take a moment), then releases its memory and unlists it together: the closing map stays
    /// locked while the session drops, so `/stats` lists it for as long as its memory is held.
    fn finish(&self, id: &str, serving: Option<Box<dyn Serving>>, reason: &'static str) {
        let Some(serving) = serving else { return };
        drop(serving);
        let freed = {
            let mut closing = self.lock_closing();
            let listing = closing.remove(id);
            let freed = listing.as_ref().map_or(0, |l| l.session.reserved_bytes());
            drop(listing);
            freed
        };
        self.metrics.sessions.set(self.len() as i64);
        self.metrics
            .sessions_ended
            .with_label_values(&[reason])
            .inc();
        tracing::info!(%id, reason, freed, "session ended");
    }

    /// Sessions alive.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no session is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every session's state, for `/stats`: the open ones and those still closing (whose
    /// memory is not released yet), by id.
    pub fn all(&self) -> Vec<SessionInfo> {
        // The listings are copied (a few words and an Arc each) under the locks; describing
        // them, which waits for each session's layer locks, happens after.
        let listed: Vec<(String, SessionState, Listing)> = {
            let map = self.lock();
            let closing = self.lock_closing();
            let open = map
                .iter()
                .map(|(id, e)| (id.clone(), SessionState::Open, e.listing.clone()));
            let ending = closing
                .iter()
                .map(|(id, l)| (id.clone(), SessionState::Closing, l.clone()));
            open.chain(ending).collect()
        };
        let mut v: Vec<SessionInfo> = listed
            .iter()
            .map(|(id, state, l)| Self::describe(id, *state, l))
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The store sessions are made from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Refuses new sessions and ends every live one (shutdown).
    pub fn close(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let all: Vec<(String, Box<dyn Serving>)> = {
            let mut map = self.lock();
            let mut closing = self.lock_closing();
            map.drain()
                .map(|(id, e)| {
                    closing.insert(id.clone(), e.listing);
                    (id, e.serving)
                })
                .collect()
        };
        for (id, serving) in all {
            self.finish(&id, Some(serving), "shutdown");
        }
    }

    /// True once [`Registry::close`] has begun.
    pub fn is_closing(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Updates the memory, session and decode-path gauges from the live state (before a
    /// scrape). Sessions still closing count: their memory and indices are still held.
    pub fn refresh_gauges(&self) {
        let map = self.lock();
        let closing = self.lock_closing();
        let mut resident = 0u64;
        let mut decode = crate::store::DecodeGauges::default();
        for l in map.values().map(|e| &e.listing).chain(closing.values()) {
            resident += l.session.resident_bytes();
            decode += l.session.decode_gauges();
        }
        drop(closing);
        self.metrics.decode.set_gauges(decode);
        self.metrics
            .resident_bytes
            .set(resident.min(i64::MAX as u64) as i64);
        self.metrics.sessions.set(map.len() as i64);
        self.metrics
            .budget_used_bytes
            .set(self.store.budget().used().min(i64::MAX as u64) as i64);
    }
}

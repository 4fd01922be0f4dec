//! `kvdex serve`: the session registry, dead-client reaping and clean shutdown.
//!
//! # Layout
//! - [`registry`]: live sessions, their tokens and workers.
//! - [`dataplane`]: the seam to the shared-memory data plane that serves each session.
//! - [`stale`]: region files of daemons that were killed, removed at start-up.
//! - this file: start-up (config, store, listeners), the reaper that ends sessions whose
//!   client died, and shutdown on SIGINT/SIGTERM in the mini-redis pattern: the signal flips a
//!   watch channel, every server drains, then the registry ends every session (stopping its
//!   worker, freeing its memory, removing its /dev/shm file).

pub mod dataplane;
pub mod registry;
pub mod stale;

use std::future::{Future, IntoFuture};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::error::{KvdexError, Result};
use crate::http::{router, AppState};
use crate::metrics::Metrics;
use crate::store::{Budget, Store};
use dataplane::{DataPlane, ExitNotice};
use registry::Registry;

/// Arguments of `kvdex serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML) layered over the embedded default.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Address of the HTTP control plane, overriding the config (e.g. 127.0.0.1:7070).
    #[arg(long)]
    pub listen: Option<String>,
}

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(args: ServeArgs) -> Result<()> {
    let config = Config::load(
        args.config.as_deref(),
        std::env::vars(),
        args.listen.as_deref(),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvdex-http")
        .enable_all()
        .build()?;
    let data_socket = config.data_socket();
    let cpus = config.worker_cpus()?;
    let worker = crate::worker::WorkerConfig {
        wait: kvdex_wire::shm::wait::WaitPolicy {
            spin: std::time::Duration::from_micros(config.sessions.worker_spin_us),
            ..Default::default()
        },
        cpus,
    };
    let attach_timeout = config.sessions.attach_timeout();
    let data_plane = match &data_socket {
        Some(path) => {
            let hub = crate::worker::socket::SocketHub::new();
            let listener = bind_std_unix(path, "sessions.data_socket")?;
            // It serves whoever can connect (a token is still needed): owner only.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            hub.listen(listener, cpus)?;
            tracing::info!(path = %path.display(), "data plane also on a Unix socket");
            dataplane::shm_and_socket(hub, worker, attach_timeout)
        }
        None => dataplane::shm(worker, attach_timeout),
    };
    // The signal handlers are registered before `serve` binds anything: a SIGTERM that arrives
    // once the daemon answers /readyz must mean a clean shutdown, never the default kill.
    let served = rt.block_on(async { serve(config, data_plane, shutdown_signal()).await });
    if let Some(path) = &data_socket {
        let _ = std::fs::remove_file(path);
    }
    served
}

/// Resolves on SIGINT or SIGTERM.
///
/// The handlers are installed when this is called (it must run inside the runtime), not when
/// the returned future is first polled: `serve` answers requests before it polls it, and a
/// signal in between would otherwise kill the process.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let wait = |s: std::io::Result<Signal>, name: &'static str| async move {
        match s {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch {name} ({e})");
                std::future::pending::<()>().await
            }
        }
    };
    async move {
        tokio::select! {
            _ = wait(int, "SIGINT") => tracing::info!("SIGINT: shutting down"),
            _ = wait(term, "SIGTERM") => tracing::info!("SIGTERM: shutting down"),
        }
    }
}

/// Serves `config` until `shutdown` resolves, then ends every session and returns.
///
/// Prints `kvdex listening on http://ADDR` on stdout once the listener is bound, so that a
/// caller that asked for port 0 learns the port.
pub async fn serve(
    config: Config,
    data_plane: Box<dyn DataPlane>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let metrics = Arc::new(Metrics::new()?);
    let stale = stale::remove_stale_regions(Path::new(&config.sessions.shm_dir));
    if stale > 0 {
        tracing::info!(
            files = stale,
            dir = %config.sessions.shm_dir,
            "removed region files of daemons that are gone"
        );
    }
    let store = Store::new(
        crate::store::default_link(),
        Arc::new(
            Budget::new(config.memory.budget_bytes)
                .with_session_quota(config.memory.session_quota_bytes),
        ),
        config.memory.initial_tokens as usize,
    )
    .with_decode(config.decode.to_decode_config())
    .with_observer(metrics.clone());
    let (exit_tx, exit_rx) = mpsc::unbounded_channel();
    let registry = Arc::new(Registry::new(
        config.clone(),
        store,
        metrics.clone(),
        data_plane,
        exit_tx,
    ));
    let state = AppState {
        registry: registry.clone(),
        metrics,
        started: Instant::now(),
    };
    let app = router(state.clone());

    let addr: SocketAddr = config.listen_addr()?;
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| KvdexError::Config(format!("key `http.listen`: cannot bind {addr}: {e}")))?;
    let local = tcp.local_addr()?;
    let unix_path = config.unix_socket();
    let reaper = tokio::spawn(reap(registry.clone(), exit_rx));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    let guard = crate::http::guard::Guard {
        loopback_only: !config.http.allow_non_loopback,
        admin_token: (!config.http.admin_token.is_empty()).then(|| config.http.admin_token.clone()),
    };
    let tcp_app = crate::http::tcp_router(state.clone(), guard);
    servers.spawn(
        axum::serve(tcp, tcp_app)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    if let Some(path) = &unix_path {
        let listener = bind_unix(path)?;
        tracing::info!(path = %path.display(), "control plane also on a Unix socket");
        servers.spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped(stop_rx))
                .into_future(),
        );
    }
    tracing::info!(%local, budget = config.memory.budget_bytes, "kvdex serving");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "kvdex listening on http://{local}");
        let _ = out.flush();
    }

    tokio::pin!(shutdown);
    let mut failed = None;
    tokio::select! {
        () = &mut shutdown => {}
        Some(res) = servers.join_next() => failed = Some(res),
    }
    let _ = stop_tx.send(true);
    while let Some(res) = servers.join_next().await {
        if let Ok(Err(e)) = res {
            tracing::warn!("server ended with {e}");
        }
    }
    reaper.abort();
    let closing = registry.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .map_err(|e| KvdexError::Protocol(format!("shutdown task failed: {e}")))?;
    if let Some(path) = &unix_path {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("kvdex stopped");
    match failed {
        Some(Ok(Err(e))) => Err(KvdexError::Io(e)),
        Some(Err(e)) => Err(KvdexError::Protocol(format!("server task failed: {e}"))),
        _ => Ok(()),
    }
}

/// Ends the sessions whose worker reported an exit (the client died or broke the protocol).
async fn reap(registry: Arc<Registry>, mut exits: mpsc::UnboundedReceiver<ExitNotice>) {
    while let Some(notice) = exits.recv().await {
        tracing::info!(id = %notice.id, reason = notice.reason, "reaping session");
        let r = registry.clone();
        // Dropping the entry joins the worker's thread; never on an async worker.
        let _ = tokio::task::spawn_blocking(move || r.end(&notice.id, notice.reason)).await;
    }
}

/// Binds the control plane's Unix socket, replacing a stale socket file (never another file).
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    let l = bind_std_unix(path, "http.unix_socket")?;
    l.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(l)?)
}

/// Binds the Unix socket of config key `key` at `path`, replacing a stale socket file (never
/// another file).
fn bind_std_unix(path: &Path, key: &str) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(KvdexError::Config(format!(
                "key `{key}`: {} exists and is not a socket",
                path.display()
            )));
        }
        // A socket someone still accepts on belongs to a live daemon: never take it over.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(KvdexError::Config(format!(
                "key `{key}`: {} is served by another live process (a second daemon?)",
                path.display()
            )));
        }
        std::fs::remove_file(path)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
        KvdexError::Config(format!("key `{key}`: cannot bind {}: {e}", path.display()))
    })?;
    Ok(l)
}

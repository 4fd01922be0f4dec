//! `kvdex bench rtt`: round trips through `kvdex serve` over shared memory and over its Unix
//! data socket (the same framing and request path), in the same run.
//!
//! The daemon runs as a separate process, as in real use: this binary starts itself as
//! `kvdex serve` on a free loopback port with `sessions.data_socket` in a private temporary
//! directory, waits for `/readyz`, creates one session over HTTP, attaches its shared-memory
//! region and connects to the data socket with the session's token, then SIGTERMs the daemon
//! at the end. Both transports reach the same session through the daemon's real request path
//! ([`kvdex::worker::dispatch::Dispatcher::serve_observed`], metrics included).
//!
//! Each request is measured hot (back to back) and cold (1 ms apart, so the waiting side of
//! either transport has gone to sleep, as between the layers of a decode step). Cold requests
//! alternate between the transports, so both tails come from the same seconds of machine time.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use kvdex::affinity::CpuMask;
use kvdex::error::{KvdexError, Result};
use kvdex::store::Shape;
use kvdex_client::{Client, SessionHandle, SessionOptions, SocketSession};
use kvdex_wire::proto::Opcode;

/// Arguments of `kvdex bench rtt`.
#[derive(Debug, clap::Args)]
pub struct RttArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measured round trips per case, hot (back to back).
    #[arg(long, default_value_t = 20_000)]
    pub n: usize,
    /// Measured round trips per case, cold (1 ms apart; shm and socket interleaved).
    #[arg(long, default_value_t = 3_000)]
    pub cold_n: usize,
    /// Pin this client to one CPU and the daemon's data-plane threads to another
    /// (`sessions.worker_cpus`), as a latency-critical deployment would. Without it the
    /// scheduler may put both on one core (BENCHMARKS.md).
    #[arg(long)]
    pub pin: bool,
}

/// Payload arena of the benchmark session (both transports).
const ARENA_BYTES: u64 = 1 << 20;
/// Payload sizes measured: a ping, and a search-sized request (32 heads x 64 dims x f32).
const PAYLOADS: [usize; 2] = [64, 8192];

/// One line of results (field names are the benchmark's contract).
#[derive(Debug, serde::Serialize)]
struct RttRow {
    op: &'static str,
    payload_bytes: usize,
    n: usize,
    shm_p50_us: f64,
    shm_p99_us: f64,
    socket_p50_us: f64,
    socket_p99_us: f64,
    cold_shm_p50_us: f64,
    cold_shm_p99_us: f64,
    cold_socket_p50_us: f64,
    cold_socket_p99_us: f64,
    /// Client and daemon threads pinned to separate CPUs (`--pin`).
    pinned: bool,
}

/// Runs the benchmark against a `kvdex serve` it starts and stops.
pub fn run(args: RttArgs) -> Result<()> {
    let cpus = if args.pin { Some(pin_pair()?) } else { None };
    let daemon = BenchDaemon::start(cpus.map(|(_, d)| d))?;
    // Pinned after the daemon started: a child inherits the affinity of the thread forking it.
    if let Some((client, _)) = cpus {
        CpuMask::parse(&client.to_string())?.pin_current_thread()?;
    }
    let rows = (|| {
        let client = Client::connect(&daemon.base)?;
        let shape = Shape {
            layers: 1,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 64,
            dtype: kvdex_index::KeyDtype::F16,
        };
        let opts = SessionOptions {
            payload_bytes: Some(ARENA_BYTES),
            ..Default::default()
        };
        let mut shm = client.create_session(shape, opts)?;
        let mut sock = shm.open_socket()?;
        let mut rows = Vec::new();
        for payload in PAYLOADS {
            let mut row = measure(&mut shm, &mut sock, payload, args.n, args.cold_n)?;
            row.pinned = args.pin;
            rows.push(row);
        }
        drop(sock);
        shm.drop_session()?;
        Ok::<_, KvdexError>(rows)
    })();
    // SIGTERM: the daemon ends its sessions and removes its files.
    drop(daemon);
    let rows = rows?;
    if args.json {
        for r in &rows {
            println!(
                "{}",
                serde_json::to_string(r).map_err(|e| KvdexError::Data(e.to_string()))?
            );
        }
    } else {
        print_table(&rows);
    }
    Ok(())
}

fn measure(
    shm: &mut SessionHandle,
    sock: &mut SocketSession,
    payload: usize,
    n: usize,
    cold_n: usize,
) -> Result<RttRow> {
    let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    // Check both transports echo correctly before timing them.
    if shm.ping(&data)? != &data[..] || sock.ping(&data)? != &data[..] {
        return Err(KvdexError::Protocol("ping echo mismatch".into()));
    }
    let warm = (n / 10).max(100);
    let mut times = vec![0f64; n];
    let mut run = |f: &mut dyn FnMut() -> Result<()>, count: usize| -> Result<(f64, f64)> {
        for _ in 0..warm.min(count.max(10)) {
            f()?;
        }
        for t in times[..count].iter_mut() {
            let start = Instant::now();
            f()?;
            *t = start.elapsed().as_secs_f64() * 1e6;
        }
        Ok(percentiles(&mut times[..count]))
    };
    let (shm_p50, shm_p99) = run(
        &mut || shm.ping(&data).map(|_| ()).map_err(KvdexError::from),
        n,
    )?;
    let (sock_p50, sock_p99) = run(
        &mut || sock.ping(&data).map(|_| ()).map_err(KvdexError::from),
        n,
    )?;
    let ((cshm_p50, cshm_p99), (csock_p50, csock_p99)) = cold_pairs(
        &mut || shm.ping(&data).map(|_| ()).map_err(KvdexError::from),
        &mut || sock.ping(&data).map(|_| ()).map_err(KvdexError::from),
        cold_n,
    )?;
    Ok(RttRow {
        op: Opcode::Ping.name(),
        payload_bytes: payload,
        n,
        shm_p50_us: shm_p50,
        shm_p99_us: shm_p99,
        socket_p50_us: sock_p50,
        socket_p99_us: sock_p99,
        cold_shm_p50_us: cshm_p50,
        cold_shm_p99_us: cshm_p99,
        cold_socket_p50_us: csock_p50,
        cold_socket_p99_us: csock_p99,
        pinned: false,
    })
}

/// (client CPU, daemon CPU) for `--pin`: the first and the last CPU this process may use.
fn pin_pair() -> Result<(usize, usize)> {
    let allowed = CpuMask::of_current_thread()?;
    let (first, last) = (allowed.cpus().next(), allowed.cpus().last());
    match (first, last) {
        (Some(a), Some(b)) if a != b => Ok((a, b)),
        _ => Err(KvdexError::BadRequest(format!(
            "--pin needs two CPUs, this process may use only {allowed:?}"
        ))),
    }
}

/// Cold round trips of both transports, interleaved: shm, 1 ms, socket, 1 ms, shm, ... so that
/// both see the same machine over the same seconds (a burst of other work, a frequency change)
/// and their tails are compared fairly. Returns ((shm p50, p99), (socket p50, p99)).
fn cold_pairs(
    shm: &mut dyn FnMut() -> Result<()>,
    sock: &mut dyn FnMut() -> Result<()>,
    count: usize,
) -> Result<((f64, f64), (f64, f64))> {
    let gap = Duration::from_millis(1);
    for _ in 0..10 {
        shm()?;
        sock()?;
    }
    let (mut a, mut b) = (vec![0f64; count], vec![0f64; count]);
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        std::thread::sleep(gap);
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64() * 1e6)
    };
    for (ta, tb) in a.iter_mut().zip(b.iter_mut()) {
        *ta = timed(shm)?;
        *tb = timed(sock)?;
    }
    Ok((percentiles(&mut a), percentiles(&mut b)))
}

/// (p50, p99) of `v`, rounded to 0.01 us.
fn percentiles(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| (v[((v.len() - 1) as f64 * q).round() as usize] * 100.0).round() / 100.0;
    (at(0.50), at(0.99))
}

fn print_table(rows: &[RttRow]) {
    println!(
        "{:<6} {:>7} {:>7} | {:>9} {:>9} {:>10} {:>10} {:>7} | {:>9} {:>9} {:>10} {:>10}",
        "op",
        "bytes",
        "n",
        "shm p50",
        "shm p99",
        "sock p50",
        "sock p99",
        "p99 x",
        "cold shm",
        "p99",
        "cold sock",
        "p99"
    );
    for r in rows {
        println!(
            "{:<6} {:>7} {:>7} | {:>9.2} {:>9.2} {:>10.2} {:>10.2} {:>7.1} | {:>9.2} {:>9.2} {:>10.2} {:>10.2}",
            r.op,
            r.payload_bytes,
            r.n,
            r.shm_p50_us,
            r.shm_p99_us,
            r.socket_p50_us,
            r.socket_p99_us,
            r.socket_p99_us / r.shm_p99_us,
            r.cold_shm_p50_us,
            r.cold_shm_p99_us,
            r.cold_socket_p50_us,
            r.cold_socket_p99_us
        );
    }
    println!("(microseconds; hot = back to back, cold = 1 ms apart; p99 x = socket p99 / shm p99)");
    if rows.first().is_some_and(|r| r.pinned) {
        println!("(client and daemon data-plane threads pinned to separate CPUs)");
    }
}

/// `kvdex serve` as a child process: a free port, a data socket in a private directory.
struct BenchDaemon {
    child: Child,
    /// Kept open: the daemon may log to stdout.
    _stdout: BufReader<ChildStdout>,
    base: String,
    dir: PathBuf,
}

impl BenchDaemon {
    /// Starts the daemon and waits until it prints its address and answers `/readyz`.
    /// `worker_cpus`: pin its data-plane threads to this CPU.
    fn start(worker_cpus: Option<usize>) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("kvdex-bench-rtt-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new(super::child::daemon_binary()?);
        if std::env::var_os("KVDEX_LOG").is_none() {
            // Keep the daemon's start-up lines out of the benchmark's output.
            cmd.env("KVDEX_LOG", "warn");
        }
        if let Some(cpu) = worker_cpus {
            cmd.env("KVDEX_SESSIONS__WORKER_CPUS", cpu.to_string());
        }
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("KVDEX_SESSIONS__DATA_SOCKET", dir.join("data.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take();
        let mut daemon = BenchDaemon {
            child,
            _stdout: BufReader::new(
                stdout
                    .ok_or_else(|| KvdexError::Disconnected("kvdex serve has no stdout".into()))?,
            ),
            base: String::new(),
            dir,
        };
        let mut line = String::new();
        while daemon.base.is_empty() {
            line.clear();
            if daemon._stdout.read_line(&mut line)? == 0 {
                let status = daemon.child.wait()?;
                return Err(KvdexError::Disconnected(format!(
                    "kvdex serve exited ({status}) before printing its address"
                )));
            }
            if let Some(addr) = line.trim().strip_prefix("kvdex listening on ") {
                daemon.base = addr.to_owned();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        while agent
            .get(&format!("{}/readyz", daemon.base))
            .call()
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(KvdexError::Disconnected(format!(
                    "{} did not become ready in 30 s",
                    daemon.base
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }
}

impl Drop for BenchDaemon {
    /// SIGTERM, then wait for the exit, then remove the private directory.
    fn drop(&mut self) {
        crate::bench::child::stop_child(&mut self.child, crate::bench::child::STOP_GRACE);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).rev().collect();
        assert_eq!(percentiles(&mut v), (51.0, 99.0));
        assert!(percentiles(&mut []).0.is_nan());
    }
}

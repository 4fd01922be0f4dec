//! `kvdex bench rtt`: round trips through a daemon process over shared memory and over a
//! Unix-domain socket with the same framing, in the same run.
//!
//! The daemon side runs as a separate process, as in real use: this binary re-executes itself
//! as `kvdex bench rtt --host`, which creates one session, serves its shared-memory region with
//! a real [`Worker`] and a Unix socket with the same [`crate::worker::dispatch::Dispatcher`]
//! (so both transports take the same request path), prints where to find them as one JSON line,
//! and exits when its stdin closes.
//!
//! Each request is measured hot (back to back) and cold (1 ms apart, so the waiting side of
//! either transport has gone to sleep, as between the layers of a decode step).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{format_token, parse_token, Client, SessionHandle};
use crate::error::{KvdexError, Result};
use crate::proto::{Opcode, Request, Status};
use crate::shm::layout::PAYLOAD_ALIGN;
use crate::shm::{Descriptor, Region};
use crate::store::{Session, Shape};
use crate::worker::socket::{serve_unix, FRAME_HEADER};
use crate::worker::{NoopObserver, Worker};

/// Arguments of `kvdex bench rtt`.
#[derive(Debug, clap::Args)]
pub struct RttArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measured round trips per case, hot (back to back).
    #[arg(long, default_value_t = 20_000)]
    pub n: usize,
    /// Measured round trips per case, cold (1 ms apart).
    #[arg(long, default_value_t = 1_000)]
    pub cold_n: usize,
    /// Internal: run as the daemon-side process of the benchmark.
    #[arg(long, hide = true)]
    pub host: bool,
}

/// Payload arena of the benchmark session (both transports).
const ARENA_BYTES: u64 = 1 << 20;
/// Payload sizes measured: a ping, and a search-sized request (32 heads x 64 dims x f32).
const PAYLOADS: [usize; 2] = [64, 8192];

/// Where the host process serves.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HostInfo {
    shm_path: String,
    token: String,
    socket_path: String,
}

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
}

/// Runs the benchmark (or, with `--host`, its daemon side).
pub fn run(args: RttArgs) -> Result<()> {
    if args.host {
        return host();
    }
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["bench", "rtt", "--host"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let result = (|| {
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| KvdexError::Disconnected("host has no stdout".into()))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let info: HostInfo = serde_json::from_str(&line)
            .map_err(|e| KvdexError::Disconnected(format!("bench host said {line:?}: {e}")))?;
        let mut shm = Client::attach(&info.shm_path, &parse_token(&info.token)?)?;
        let mut sock = SocketClient::connect(&info.socket_path)?;
        let mut rows = Vec::new();
        for payload in PAYLOADS {
            rows.push(measure(&mut shm, &mut sock, payload, args.n, args.cold_n)?);
        }
        Ok::<_, KvdexError>(rows)
    })();
    drop(child.stdin.take()); // the host exits when its stdin closes
    let _ = child.wait();
    let rows = result?;
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
    sock: &mut SocketClient,
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
    let mut times = vec![0f64; n.max(cold_n)];
    let mut run = |f: &mut dyn FnMut() -> Result<()>,
                   count: usize,
                   gap: Option<Duration>|
     -> Result<(f64, f64)> {
        for _ in 0..warm.min(count.max(10)) {
            f()?;
        }
        for t in times[..count].iter_mut() {
            if let Some(g) = gap {
                std::thread::sleep(g);
            }
            let start = Instant::now();
            f()?;
            *t = start.elapsed().as_secs_f64() * 1e6;
        }
        Ok(percentiles(&mut times[..count]))
    };
    let gap = Some(Duration::from_millis(1));
    let (shm_p50, shm_p99) = run(&mut || shm.ping(&data).map(|_| ()), n, None)?;
    let (sock_p50, sock_p99) = run(&mut || sock.ping(&data).map(|_| ()), n, None)?;
    let (cshm_p50, cshm_p99) = run(&mut || shm.ping(&data).map(|_| ()), cold_n, gap)?;
    let (csock_p50, csock_p99) = run(&mut || sock.ping(&data).map(|_| ()), cold_n, gap)?;
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
    })
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
}

/// The daemon side: one session served over shared memory and over a Unix socket.
fn host() -> Result<()> {
    let shape = Shape {
        layers: 1,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 64,
        dtype: kvdex_index::KeyDtype::F16,
    };
    let session = Arc::new(Session::new(shape)?);
    let pid = std::process::id();
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let shm_path = dir.join(format!("kvdex-bench-{pid}"));
    let socket_path = std::env::temp_dir().join(format!("kvdex-bench-{pid}.sock"));
    let mut token = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut token[..]);
    let region = Region::create(&shm_path, ARENA_BYTES)?;
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)?;
    let worker = Worker::spawn(
        region,
        session.clone(),
        token,
        Arc::new(NoopObserver),
        Box::new(|_| {}),
    )?;
    let sock_session = session.clone();
    std::thread::spawn(move || serve_unix(listener, sock_session, ARENA_BYTES as usize));
    let info = HostInfo {
        shm_path: shm_path.display().to_string(),
        token: format_token(&token),
        socket_path: socket_path.display().to_string(),
    };
    println!(
        "{}",
        serde_json::to_string(&info).map_err(|e| KvdexError::Data(e.to_string()))?
    );
    std::io::stdout().flush()?;
    // Serve until the benchmark closes our stdin.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(worker);
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// The socket baseline's client: one write per request, reads the completion and its body.
struct SocketClient {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl SocketClient {
    fn connect(path: &str) -> Result<Self> {
        Ok(Self {
            stream: UnixStream::connect(path)?,
            buf: vec![0u8; FRAME_HEADER + ARENA_BYTES as usize],
            next_id: 1,
        })
    }

    fn ping(&mut self, data: &[u8]) -> Result<&[u8]> {
        let req = Request::Ping { data };
        let n = req.encode(&mut self.buf[FRAME_HEADER..])?;
        let out_len = ARENA_BYTES - (n as u64).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN;
        let d = Descriptor {
            request_id: self.next_id,
            code: Opcode::Ping as u32,
            in_len: n as u64,
            out_len,
            ..Default::default()
        };
        self.next_id += 1;
        self.buf[..FRAME_HEADER].copy_from_slice(bytemuck::bytes_of(&d));
        self.stream.write_all(&self.buf[..FRAME_HEADER + n])?;
        self.stream.read_exact(&mut self.buf[..FRAME_HEADER])?;
        let c: Descriptor = bytemuck::pod_read_unaligned(&self.buf[..FRAME_HEADER]);
        let body = if c.code == Status::Ok as u32 {
            c.out_len
        } else {
            c.aux as u64
        };
        let body = usize::try_from(body)
            .ok()
            .filter(|&b| b <= ARENA_BYTES as usize)
            .ok_or_else(|| KvdexError::Protocol(format!("socket reply of {body} bytes")))?;
        self.stream.read_exact(&mut self.buf[..body])?;
        if c.code != Status::Ok as u32 {
            let msg = String::from_utf8_lossy(&self.buf[..body]).into_owned();
            return Err(Status::from_code(c.code).into_error(&c, msg));
        }
        Ok(&self.buf[..body])
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

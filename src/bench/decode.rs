//! `kvdex bench decode`: the decode-step layer request as an engine sees it.
//!
//! The bench process is the client: it starts `kvdex serve` as a child process, creates a
//! session over HTTP, attaches its shared-memory region, appends the context, and then, per
//! method, times one `retrieve` per layer and decode step (adaptive budget, partial attention).
//! Methods: `flat` (no index: the GQA-batched, multithreaded exact scan of every non-static
//! key, then attention over its top-k) and `graph` / `hnsw` (sealed with sampled prefill
//! queries, built in the daemon's background pool; the build time is reported).
//!
//! Each decode result is checked against exact attention over the whole context: the merged
//! output (kvdex's part + the static tokens' part, [`crate::client::merge`]) gives
//! `out_rel_err`; the retrieved mass gives `mass_recall` and `mass_covered`
//! ([`super::decode_data`]). The daemon's VmRSS is read from `/proc` at the end.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvdex_index::attend::BudgetParams;
use kvdex_index::IndexKind;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::decode_data::{Synth, Truth};
use crate::client::{merge, parse_token, Client, SessionHandle};
use crate::error::{KvdexError, Result};
use crate::store::retrieve::{Budget, RetrieveParams};

/// Arguments of `kvdex bench decode`.
#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Context lengths in tokens (comma-separated runs one daemon each).
    #[arg(long, value_delimiter = ',', default_value = "131072")]
    pub context: Vec<usize>,
    /// Real Q/K/V directory (../shared/data layout): its shape and benchmark split replace the
    /// shape flags and --context.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Layer of the data set used with --data.
    #[arg(long, default_value_t = 17)]
    pub layer: u32,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Layers (each gets the same context; one request per layer and step is timed).
    #[arg(long, default_value_t = 1)]
    pub layers: u32,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    pub q_heads: u32,
    /// KV heads.
    #[arg(long, default_value_t = 2)]
    pub kv_heads: u32,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    pub head_dim: u32,
    /// Methods, comma-separated: flat, graph, hnsw.
    #[arg(long, value_delimiter = ',', default_value = "flat,graph")]
    pub methods: Vec<String>,
    /// Decode steps timed per method.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Adaptive budget: fraction p of the estimated mass to cover.
    #[arg(long, default_value_t = 0.95)]
    pub coverage: f32,
    /// Adaptive budget: least k per head.
    #[arg(long, default_value_t = 16)]
    pub min_k: usize,
    /// Adaptive budget: most k per head (also the candidates searched for).
    #[arg(long, default_value_t = 256)]
    pub max_k: usize,
    /// A fixed k per head instead of the adaptive budget.
    #[arg(long)]
    pub fixed_k: Option<usize>,
    /// Prefill query positions sampled for the graph build (per query head).
    #[arg(long, default_value_t = 1024)]
    pub train: usize,
    /// S: sinks the engine keeps (passed to the daemon).
    #[arg(long, default_value_t = 128)]
    pub sinks: usize,
    /// W: recent window the engine keeps (passed to the daemon).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Graph beam width L (passed to the daemon).
    #[arg(long, default_value_t = 64)]
    pub search_list: usize,
    /// The kvdex binary to start (default: this one).
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// Seed of the synthetic data and queries.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also copy the chosen K/V rows into the response (gather), timed as copy_ms.
    #[arg(long)]
    pub gather: bool,
    /// Sessions served at once: the timed one plus N-1 others with the same context, each
    /// driven by its own client thread issuing retrieves back to back while the timed one runs.
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
}

/// One method's figures (the JSON fields, exactly).
#[derive(Debug, serde::Serialize)]
struct Row {
    context: usize,
    method: String,
    layers: u32,
    q_heads: u32,
    kv_heads: u32,
    layer_p50_ms: f64,
    layer_p99_ms: f64,
    search_ms: f64,
    attn_ms: f64,
    copy_ms: f64,
    k_mean: f64,
    mass_recall: f64,
    mass_covered: f64,
    out_rel_err: f64,
}

/// The daemon child; killed and reaped on drop.
struct Daemon {
    child: Child,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(exe: &std::path::Path, kv_bytes: u64, a: &DecodeArgs) -> Result<Daemon> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let child = Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env(
            "KVDEX_MEMORY__BUDGET_BYTES",
            (kv_bytes * 3 + (1 << 30)).to_string(),
        )
        .env("KVDEX_DECODE__SINKS", a.sinks.to_string())
        .env("KVDEX_DECODE__WINDOW", a.window.to_string())
        .env("KVDEX_DECODE__GRAPH_SEARCH_LIST", a.search_list.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let d = Daemon { child, url };
    let t = Instant::now();
    while ureq::get(&format!("{}/healthz", d.url)).call().is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            return Err(KvdexError::Disconnected(format!(
                "kvdex serve did not answer on {}",
                d.url
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(d)
}

fn json(s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| KvdexError::Protocol(format!("daemon sent bad JSON: {e}")))
}

fn http(e: ureq::Error) -> KvdexError {
    KvdexError::Disconnected(format!("HTTP: {e}"))
}

/// Creates the session over HTTP and attaches; returns the handle, id and token.
fn create(d: &Daemon, a: &DecodeArgs, payload: u64) -> Result<(SessionHandle, String, String)> {
    let body = serde_json::json!({
        "layers": a.layers, "q_heads": a.q_heads, "kv_heads": a.kv_heads,
        "head_dim": a.head_dim, "dtype": "f16", "payload_bytes": payload,
    });
    let v: serde_json::Value = ureq::post(&format!("{}/v1/sessions", d.url))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .map_err(http)?
        .into_string()
        .map_err(KvdexError::Io)
        .and_then(|s| json(&s))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .ok_or_else(|| KvdexError::Protocol(format!("POST /v1/sessions answered without {k}")))
    };
    let (id, token, path): (String, String, String) =
        (field("id")?, field("token")?, field("shm_path")?);
    let h = Client::attach(&path, &parse_token(&token)?)?;
    Ok((h, id, token))
}

/// Per-layer state from `GET /v1/sessions/{id}`.
fn layers_info(d: &Daemon, id: &str, token: &str) -> Result<Vec<serde_json::Value>> {
    let v: serde_json::Value = ureq::get(&format!("{}/v1/sessions/{id}", d.url))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(http)?
        .into_string()
        .map_err(KvdexError::Io)
        .and_then(|s| json(&s))?;
    Ok(v.get("layers")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default())
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark.
pub fn run(a: DecodeArgs) -> Result<()> {
    let mut a = a;
    let real = match &a.data {
        Some(dir) => {
            let ds = crate::data::DataSet::open(dir)?;
            let data = Synth::from_data(&ds, a.layer)?;
            a.q_heads = ds.meta.q_heads() as u32;
            a.kv_heads = ds.meta.kv_heads() as u32;
            a.head_dim = ds.meta.dim as u32;
            a.layers = 1;
            a.context = vec![data.n];
            Some(data)
        }
        None => None,
    };
    let a = a;
    if a.kv_heads == 0
        || !a.q_heads.is_multiple_of(a.kv_heads.max(1))
        || a.head_dim == 0
        || a.layers == 0
    {
        return Err(KvdexError::Config(format!(
            "shape {} q heads / {} kv heads / head_dim {} / {} layers: kv_heads must divide q_heads, all non-zero",
            a.q_heads, a.kv_heads, a.head_dim, a.layers
        )));
    }
    let kinds: Vec<(String, Option<IndexKind>)> = a
        .methods
        .iter()
        .map(|m| match m.as_str() {
            "flat" => Ok((m.clone(), None)),
            other => Ok((m.clone(), Some(IndexKind::parse(other)?))),
        })
        .collect::<Result<_>>()?;
    let exe = match &a.daemon {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    if !a.json {
        println!(
            "{:>8} {:>6} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8} {:>8} {:>9}",
            "context",
            "method",
            "layers",
            "p50 ms",
            "p99 ms",
            "search",
            "attn",
            "copy",
            "k_mean",
            "recall",
            "covered",
            "rel_err"
        );
    }
    match real {
        Some(data) => run_context(&a, data, &kinds, &exe)?,
        None => {
            for &n in &a.context {
                let t = Instant::now();
                let data = Synth::generate(
                    n,
                    a.q_heads as usize,
                    a.kv_heads as usize,
                    a.head_dim as usize,
                    a.seed,
                );
                eprintln!(
                    "# context {n}: generated in {:.1}s",
                    t.elapsed().as_secs_f64()
                );
                run_context(&a, data, &kinds, &exe)?;
            }
        }
    }
    Ok(())
}

fn run_context(
    a: &DecodeArgs,
    data: Synth,
    kinds: &[(String, Option<IndexKind>)],
    exe: &std::path::Path,
) -> Result<()> {
    let (hq, kv, d) = (a.q_heads as usize, a.kv_heads as usize, a.head_dim as usize);
    let (sinks, window) = (a.sinks, a.window);
    let n = data.n;
    let kv_bytes = (a.layers as usize * n * kv * d * 2 * 2) as u64;
    let daemon = start_daemon(exe, kv_bytes, a)?;
    let payload: u64 = 64 << 20;
    let (mut h, id, token) = create(&daemon, a, payload)?;
    let t = Instant::now();
    append_all(a, &mut h, &data, payload)?;
    let append_s = t.elapsed().as_secs_f64();
    let mut others = Vec::new();
    for _ in 1..a.sessions.max(1) {
        let (mut o, oid, otoken) = create(&daemon, a, payload)?;
        append_all(a, &mut o, &data, payload)?;
        others.push((o, oid, otoken));
    }
    let positions = super::decode_data::train_positions(n, a.train);
    let training = data.training(hq, &positions, a.seed ^ 0x5eed);
    let budget = match a.fixed_k {
        Some(k) => Budget::Fixed(k),
        None => Budget::Adaptive(BudgetParams::new(a.coverage, a.min_k, a.max_k)?),
    };
    let params = RetrieveParams {
        budget,
        attend: true,
        gather: a.gather,
        scale: None,
    };
    let mut notes = vec![format!(
        "context {n}: appended {} layer(s) in {append_s:.1}s",
        a.layers
    )];
    let mut index_bytes = 0u64;
    for (name, kind) in kinds {
        if let Some(kind) = kind {
            let t = Instant::now();
            for layer in 0..a.layers {
                h.seal(layer, *kind, Some((&training, &positions)))?;
                for (o, _, _) in &mut others {
                    o.seal(layer, *kind, Some((&training, &positions)))?;
                }
            }
            let all = std::iter::once((&id, &token)).chain(others.iter().map(|(_, i, t)| (i, t)));
            let mut info = Vec::new();
            for (sid, stoken) in all {
                info.extend(layers_info(&daemon, sid, stoken)?);
            }
            loop {
                let state =
                    |l: &serde_json::Value| l["build"]["state"].as_str().unwrap_or("?").to_owned();
                if let Some(f) = info.iter().find(|l| state(l) == "failed") {
                    return Err(KvdexError::Index(kvdex_index::IndexError::InvalidArgument(
                        format!("{name} build failed: {}", f["build"]["error"]),
                    )));
                }
                if info.iter().all(|l| state(l) == "ready") {
                    index_bytes = info
                        .iter()
                        .map(|l| l["index_bytes"].as_u64().unwrap_or(0))
                        .sum();
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                info.clear();
                for (sid, stoken) in
                    std::iter::once((&id, &token)).chain(others.iter().map(|(_, i, t)| (i, t)))
                {
                    info.extend(layers_info(&daemon, sid, stoken)?);
                }
            }
            notes.push(format!(
                "{name}: built {} layer(s) in {:.1}s, index {:.1} MiB",
                a.layers,
                t.elapsed().as_secs_f64(),
                index_bytes as f64 / (1 << 20) as f64
            ));
        }
        // The other sessions' clients retrieve back to back while the timed one runs.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let n_others = others.len();
        let row = std::thread::scope(|sc| {
            let busy: Vec<_> = others
                .iter_mut()
                .enumerate()
                .map(|(i, (o, _, _))| {
                    let (stop, data, params) = (&stop, &data, &params);
                    sc.spawn(move || -> Result<u64> {
                        let mut rng = StdRng::seed_from_u64(a.seed.wrapping_add(100 + i as u64));
                        let mut q = vec![0f32; hq * d];
                        let end = n.saturating_sub(window).max(sinks);
                        let mut done = 0u64;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            data.decode_queries(hq, sinks, end, &mut rng, &mut q);
                            for layer in 0..a.layers {
                                o.retrieve(layer, &q, params)?;
                            }
                            done += 1;
                        }
                        Ok(done)
                    })
                })
                .collect();
            let row = decode_steps(a, n, name, &mut h, &data, &params, (sinks, window));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut steps = 0;
            for b in busy {
                steps += b
                    .join()
                    .map_err(|_| KvdexError::Protocol("a client thread panicked".into()))??;
            }
            if n_others > 0 {
                eprintln!("# {name}: {n_others} other session(s) ran {steps} steps meanwhile");
            }
            row
        })?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string(&row).map_err(|e| KvdexError::Protocol(e.to_string()))?
            );
        } else {
            println!(
                "{:>8} {:>6} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>8.3} {:>8.3} {:>7.1} {:>8.4} {:>8.4} {:>9.2e}",
                row.context, row.method, row.layers, row.layer_p50_ms, row.layer_p99_ms, row.search_ms,
                row.attn_ms, row.copy_ms, row.k_mean, row.mass_recall, row.mass_covered, row.out_rel_err
            );
        }
        std::io::stdout().flush()?;
    }
    let rss = vm_rss_kib(daemon.child.id()).unwrap_or(0) * 1024;
    notes.push(format!(
        "memory: daemon VmRSS {:.1} MiB, raw KV {:.1} MiB, index {:.1} MiB, ratio RSS/(KV+index) {:.3}",
        rss as f64 / (1 << 20) as f64,
        kv_bytes as f64 / (1 << 20) as f64,
        index_bytes as f64 / (1 << 20) as f64,
        rss as f64 / (kv_bytes + index_bytes) as f64
    ));
    for n in notes {
        eprintln!("# {n}");
    }
    drop(h);
    Ok(())
}

/// Appends the whole context to every layer, in blocks that fit the arena: `[kv][block][d]`
/// K then V.
fn append_all(a: &DecodeArgs, h: &mut SessionHandle, data: &Synth, payload: u64) -> Result<()> {
    let (kv, d, n) = (a.kv_heads as usize, a.head_dim as usize, data.n);
    let block = ((payload as usize / 2) / (2 * kv * d * 2)).min(n).max(1);
    let (mut kb, mut vb) = (
        Vec::with_capacity(kv * block * d),
        Vec::with_capacity(kv * block * d),
    );
    for layer in 0..a.layers {
        let mut start = 0;
        while start < n {
            let len = block.min(n - start);
            kb.clear();
            vb.clear();
            for g in 0..kv {
                let r = (g * n + start) * d..(g * n + start + len) * d;
                kb.extend_from_slice(&data.k[r.clone()]);
                vb.extend_from_slice(&data.v[r]);
            }
            h.append(
                layer,
                len as u32,
                bytemuck::cast_slice(&kb),
                bytemuck::cast_slice(&vb),
            )?;
            start += len;
        }
    }
    Ok(())
}

fn decode_steps(
    a: &DecodeArgs,
    n: usize,
    name: &str,
    h: &mut SessionHandle,
    data: &Synth,
    params: &RetrieveParams,
    statics: (usize, usize),
) -> Result<Row> {
    let (hq, kv, d) = (a.q_heads as usize, a.kv_heads as usize, a.head_dim as usize);
    let group = hq / kv;
    let (sinks, window) = statics;
    let end = n.saturating_sub(window).max(sinks);
    let mut rng = StdRng::seed_from_u64(a.seed.wrapping_add(7));
    let mut q = vec![0f32; hq * d];
    let (mut lat, mut search, mut attn, mut copy) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ksum, mut kcount, mut recall, mut covered, mut err) = (0.0, 0usize, 0.0, 0.0, 0.0);
    let (mut ids, mut out, mut lse) = (Vec::new(), vec![0f32; hq * d], vec![0f32; hq]);
    let (mut full, mut stat, mut stat_lse, mut merged) = (
        vec![0f32; hq * d],
        vec![0f32; hq * d],
        vec![0f32; hq],
        vec![0f32; d],
    );
    let mut truth = Truth::default();
    // Two warm-up steps, untimed.
    for step in 0..a.steps + 2 {
        data.decode_queries(hq, sinks, end, &mut rng, &mut q);
        let mut bounds = vec![0usize];
        ids.clear();
        for layer in 0..a.layers {
            let t = Instant::now();
            let r = h.retrieve(layer, &q, params)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if step < 2 {
                continue;
            }
            lat.push(ms);
            search.push(r.header.search_us as f64 / 1e3);
            attn.push(r.header.attend_us as f64 / 1e3);
            copy.push(r.header.copy_us as f64 / 1e3);
            if layer == 0 {
                for hh in 0..hq {
                    ids.extend_from_slice(r.head_ids(hh));
                    bounds.push(ids.len());
                    ksum += r.k[hh] as f64;
                    kcount += 1;
                }
                out.copy_from_slice(r.out);
                lse.copy_from_slice(r.lse);
            }
        }
        if step < 2 {
            continue;
        }
        // Exact evaluation of layer 0 (every layer holds the same context).
        let (mut e2, mut n2) = (0.0f64, 0.0f64);
        for hh in 0..hq {
            let g = hh / group;
            let (keys, values) = (data.rows(false, g)?, data.rows(true, g)?);
            let r = hh * d..(hh + 1) * d;
            let (t, l) = truth.head(
                &keys,
                &values,
                &q[r.clone()],
                &ids[bounds[hh]..bounds[hh + 1]],
                statics,
                &mut full[r.clone()],
                &mut stat[r.clone()],
            )?;
            stat_lse[hh] = l;
            recall += t.mass_recall;
            covered += t.mass_covered;
            merge::merge_head(&stat[r.clone()], l, &out[r.clone()], lse[hh], &mut merged);
            for (m, f) in merged.iter().zip(&full[r]) {
                e2 += ((m - f) as f64).powi(2);
                n2 += (*f as f64).powi(2);
            }
        }
        err += (e2 / n2.max(f64::MIN_POSITIVE)).sqrt();
    }
    let steps = a.steps.max(1) as f64;
    let heads = steps * hq as f64;
    Ok(Row {
        context: n,
        method: name.to_owned(),
        layers: a.layers,
        q_heads: a.q_heads,
        kv_heads: a.kv_heads,
        layer_p50_ms: percentile(&mut lat.clone(), 0.5),
        layer_p99_ms: percentile(&mut lat, 0.99),
        search_ms: percentile(&mut search, 0.5),
        attn_ms: percentile(&mut attn, 0.5),
        copy_ms: percentile(&mut copy, 0.5),
        k_mean: ksum / kcount.max(1) as f64,
        mass_recall: recall / heads,
        mass_covered: covered / heads,
        out_rel_err: err / steps,
    })
}

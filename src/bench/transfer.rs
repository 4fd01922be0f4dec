//! `kvdex bench transfer`: gathers of random runs out of a large arena, against the limit
//! measured in the same run.
//!
//! - host: the limit is the faster of a one-thread and an all-threads contiguous copy of the
//!   same total bytes; a naive one-thread `memcpy` loop over the same runs is shown too.
//! - cuda: the limit is one contiguous pinned host-to-device copy of the same total bytes; the
//!   overlap figure is the gather's time over the larger of packing alone (CPU) and copying
//!   alone (DMA).

use std::sync::Arc;
use std::time::Instant;

use kvdex_transfer::copy::{copy_contiguous, copy_contiguous_parallel, copy_runs_parallel};
use kvdex_transfer::cuda::CudaLink;
use kvdex_transfer::host::HostConfig;
use kvdex_transfer::{DeviceLink, HostLink, Registration, Run};
use rand::{Rng, SeedableRng};

use crate::KvdexError;

/// Arguments of `kvdex bench transfer`.
#[derive(Debug, clap::Args)]
pub struct TransferArgs {
    /// Which backend to measure: `host` or `cuda`.
    #[arg(long, default_value = "host", value_parser = ["host", "cuda"])]
    pub backend: String,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Size of the source arena, MiB (the runs are drawn at random from all of it).
    #[arg(long, default_value_t = 1024)]
    pub arena_mib: usize,
    /// Bytes per gathered batch, MiB.
    #[arg(long, default_value_t = 32)]
    pub batch_mib: usize,
    /// Timed batches per run size (after two warm-up batches).
    #[arg(long, default_value_t = 15)]
    pub iters: usize,
    /// Gather threads of the host backend, and of the all-threads limit (default: every CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run sizes in bytes (default 256 B to 4 MiB, by powers of 4).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<u64>,
}

/// One row of the report.
#[derive(Debug, serde::Serialize)]
struct Row {
    backend: &'static str,
    block_bytes: u64,
    blocks: u64,
    gbps: f64,
    limit_gbps: f64,
    batch_p50_us: f64,
    ratio: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_1t_gbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_mt_gbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    naive_gbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    overlap: Option<f64>,
    /// Best batch (minimum time) and its limit: on a shared, oversubscribed machine the
    /// median includes time descheduled; the best is the least disturbed sample.
    best_gbps: f64,
    best_limit_gbps: f64,
    arena: String,
    device: String,
    /// The 1-minute load average when the row was measured.
    load1: f64,
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn secs(f: impl FnOnce() -> crate::error::Result<()>) -> crate::error::Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Random block-aligned runs of `block` bytes, packed into the destination.
fn draw_runs(rng: &mut impl Rng, arena: u64, block: u64, blocks: u64, out: &mut Vec<Run>) {
    out.clear();
    let slots = arena / block;
    out.extend((0..blocks).map(|i| Run {
        src_offset: rng.gen_range(0..slots) * block,
        dst_offset: i * block,
        len: block,
    }));
}

/// Runs the benchmark.
pub fn run(args: TransferArgs) -> crate::error::Result<()> {
    let cuda_link = match args.backend.as_str() {
        "cuda" => Some(Arc::new(CudaLink::new(0).map_err(|e| {
            KvdexError::Config(format!("--backend cuda: CUDA is unavailable here: {e}"))
        })?)),
        _ => None,
    };
    let (link, device): (Arc<dyn DeviceLink>, String) = match &cuda_link {
        Some(c) => (c.clone(), c.device_name().to_string()),
        None => {
            let mut cfg = HostConfig::default();
            cfg.threads = args.threads.unwrap_or(cfg.threads);
            (
                Arc::new(HostLink::with_config(cfg)),
                format!("cpu x{}", cfg.threads),
            )
        }
    };
    let cuda = link.name() == "cuda";
    let arena_bytes = args.arena_mib << 20;
    let batch = (args.batch_mib << 20) as u64;
    if batch == 0 || args.iters == 0 || batch as usize > arena_bytes {
        return Err(KvdexError::Config(
            "need --batch-mib > 0, --iters > 0 and --batch-mib <= --arena-mib".into(),
        ));
    }
    let sizes = if args.sizes.is_empty() {
        vec![
            256,
            1 << 10,
            4 << 10,
            16 << 10,
            64 << 10,
            256 << 10,
            1 << 20,
            4 << 20,
        ]
    } else {
        args.sizes.clone()
    };
    if let Some(bad) = sizes.iter().find(|&&s| s == 0 || s % 16 != 0 || s > batch) {
        return Err(KvdexError::Config(format!(
            "run size {bad} must be a non-zero multiple of 16 no larger than the batch"
        )));
    }

    let arena = link.alloc_arena(arena_bytes)?;
    let threads = args
        .threads
        .unwrap_or_else(|| HostConfig::default().threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| KvdexError::Config(format!("thread pool: {e}")))?;
    // SAFETY: the arena is ours alone until the first gather below.
    let src = unsafe { std::slice::from_raw_parts_mut(arena.as_mut_ptr(), arena_bytes) };
    pool.install(|| {
        use rayon::prelude::*;
        src.par_chunks_mut(1 << 20)
            .enumerate()
            .for_each(|(i, c)| c.fill(i as u8));
    });
    let src: &[u8] = src;
    let mut host_dst = vec![1u8; batch as usize];
    // Dropped before `host_dst`: unregistering waits out the last gather into it.
    let registration = match &cuda_link {
        // The bench has no engine process to export an IPC handle, so it allocates the device
        // buffer itself; gathers take the same path as into an opened IPC buffer.
        Some(c) => Registration::new(link.clone(), c.alloc_device(batch as usize)?),
        // SAFETY: host_dst outlives the registration (declared after it, dropped first).
        None => Registration::new(link.clone(), unsafe {
            link.register_host(host_dst.as_mut_ptr(), host_dst.len())
        }?),
    };
    let dst_id = registration.id();
    let mut staging = vec![0u8; batch as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut runs = Vec::new();
    let mut rows = Vec::new();

    for &block in &sizes {
        let blocks = batch / block;
        let bytes = (blocks * block) as f64;
        let (mut t_gather, mut t_1t, mut t_mt, mut t_naive, mut t_pack) =
            (vec![], vec![], vec![], vec![], vec![]);
        for it in 0..args.iters + 2 {
            draw_runs(&mut rng, arena_bytes as u64, block, blocks, &mut runs);
            let g = secs(|| Ok(link.wait(link.gather(&arena, &runs, dst_id)?)?))?;
            let start = rng.gen_range(0..=(arena_bytes as u64 - batch) / 64) as usize * 64;
            let whole = &src[start..start + batch as usize];
            let (one, many, other);
            if cuda {
                let contiguous = [Run {
                    src_offset: start as u64,
                    dst_offset: 0,
                    len: batch,
                }];
                one = secs(|| Ok(link.wait(link.gather(&arena, &contiguous, dst_id)?)?))?;
                many = one;
                // Packing alone: what the CPU does for a gather, with no copy to overlap.
                // SAFETY: runs were drawn inside the arena and the staging buffer, ascending.
                other = secs(|| {
                    unsafe {
                        copy_runs_parallel(&pool, src.as_ptr(), staging.as_mut_ptr(), &runs, batch)
                    };
                    Ok(())
                })?;
            } else {
                one = time(|| copy_contiguous(whole, &mut staging));
                many = time(|| copy_contiguous_parallel(&pool, whole, &mut staging));
                // Fresh runs: re-reading the gather's rows would find them in cache.
                draw_runs(&mut rng, arena_bytes as u64, block, blocks, &mut runs);
                other = time(|| naive_loop(src, &mut staging, &runs));
            }
            if it >= 2 {
                t_gather.push(g);
                t_1t.push(one);
                t_mt.push(many);
                if cuda {
                    t_pack.push(other)
                } else {
                    t_naive.push(other)
                }
            }
        }
        let best_limit_gbps = bytes / best(&t_1t).min(best(&t_mt)) / 1e9;
        let best_gbps = bytes / best(&t_gather) / 1e9;
        let (g, one, many) = (median(&mut t_gather), median(&mut t_1t), median(&mut t_mt));
        let limit = bytes / one.min(many) / 1e9;
        let gbps = bytes / g / 1e9;
        rows.push(Row {
            backend: link.name(),
            block_bytes: block,
            blocks,
            gbps,
            limit_gbps: limit,
            batch_p50_us: g * 1e6,
            ratio: gbps / limit,
            limit_1t_gbps: (!cuda).then(|| bytes / one / 1e9),
            limit_mt_gbps: (!cuda).then(|| bytes / many / 1e9),
            naive_gbps: (!cuda).then(|| bytes / median(&mut t_naive) / 1e9),
            overlap: cuda.then(|| g / one.max(median(&mut t_pack))),
            best_gbps,
            best_limit_gbps,
            arena: format!("{:?}", arena.backing()),
            device: device.clone(),
            load1: load1(),
        });
    }
    drop(registration);
    print_rows(&rows, args.json)
}

/// The baseline the issue quotes: one thread, one `memcpy` per run, no prefetch.
fn naive_loop(src: &[u8], dst: &mut [u8], runs: &[Run]) {
    for r in runs {
        let (s, d, l) = (r.src_offset as usize, r.dst_offset as usize, r.len as usize);
        dst[d..d + l].copy_from_slice(&src[s..s + l]);
    }
}

fn print_rows(rows: &[Row], json: bool) -> crate::error::Result<()> {
    if json {
        for r in rows {
            let line = serde_json::to_string(r).map_err(|e| KvdexError::Config(e.to_string()))?;
            println!("{line}");
        }
        return Ok(());
    }
    println!(
        "{:<7} {:>10} {:>8} {:>9} {:>9} {:>7} {:>11} {:>9} {:>7}",
        "backend", "block_B", "blocks", "GB/s", "limit", "ratio", "p50_us", "naive/ovl", "best%"
    );
    for r in rows {
        let extra = r
            .naive_gbps
            .map(|n| n / r.limit_gbps)
            .or(r.overlap)
            .unwrap_or(f64::NAN);
        println!(
            "{:<7} {:>10} {:>8} {:>9.2} {:>9.2} {:>6.0}% {:>11.1} {:>9.2} {:>6.0}%",
            r.backend,
            r.block_bytes,
            r.blocks,
            r.gbps,
            r.limit_gbps,
            r.ratio * 100.0,
            r.batch_p50_us,
            extra,
            r.best_gbps / r.best_limit_gbps * 100.0
        );
    }
    Ok(())
}

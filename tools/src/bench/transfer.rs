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

use kvdex_transfer::copy::{
    copy_contiguous, copy_contiguous_parallel, copy_contiguous_streaming, copy_runs_parallel,
};
use kvdex_transfer::cuda::CudaLink;
use kvdex_transfer::host::HostConfig;
use kvdex_transfer::{DeviceLink, HostLink, Registration, Run};
use rand::{Rng, SeedableRng};

use kvdex::KvdexError;

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
    /// Batches of at least this many KiB are shared between the caller and the gather
    /// threads (default: the host backend's own policy, see `HostConfig::parallel_min_bytes`).
    #[arg(long)]
    pub parallel_min_kib: Option<u64>,
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
    /// Median over batches of (limit time / gather time) in the same iteration: on a shared
    /// machine whose speed flips between states from one second to the next, pairing each
    /// gather with the limit measured right next to it is steadier than the ratio of medians.
    paired_ratio_p50: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_1t_gbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_mt_gbps: Option<f64>,
    /// The naive loop the issue quotes (one thread, one `memcpy` per run, no prefetch) over
    /// fresh random runs of the same size, in the same iterations.
    #[serde(skip_serializing_if = "Option::is_none")]
    naive_gbps: Option<f64>,
    /// `naive_gbps / limit_gbps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    naive_ratio: Option<f64>,
    /// As `paired_ratio_p50`, for the naive loop.
    #[serde(skip_serializing_if = "Option::is_none")]
    naive_paired_ratio_p50: Option<f64>,
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

/// The median of `v` (the upper one for an even count); NaN when empty.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median over iterations of `limit[i] / measured[i]`: each timing against the limit measured
/// right next to it.
fn paired_median(limit: &[f64], measured: &[f64]) -> f64 {
    let r: Vec<f64> = limit.iter().zip(measured).map(|(l, m)| l / m).collect();
    median(&r)
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn secs(f: impl FnOnce() -> kvdex::error::Result<()>) -> kvdex::error::Result<f64> {
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
pub fn run(args: TransferArgs) -> kvdex::error::Result<()> {
    let cuda_link = match args.backend.as_str() {
        "cuda" => Some(Arc::new(CudaLink::new(0).map_err(|e| {
            KvdexError::Config(format!("--backend cuda: CUDA is unavailable here: {e}"))
        })?)),
        _ => None,
    };
    let (link, device): (Arc<dyn DeviceLink>, String) = match &cuda_link {
        Some(c) => (
            c.clone(),
            format!("{} ({})", c.device_name(), c.gather_path()),
        ),
        None => {
            let mut cfg = HostConfig::default();
            cfg.threads = args.threads.unwrap_or(cfg.threads);
            if let Some(kib) = args.parallel_min_kib {
                cfg.parallel_min_bytes = kib << 10;
            }
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
    // The all-threads limit uses every CPU, whatever the link under test was given.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(HostConfig::default().threads)
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
    // Page-aligned destinations, as a shared-memory payload arena is: a `Vec` of this size
    // starts 16 bytes into a page, where glibc's `memcpy` (rep movsb on AMD Zen) runs ~8x slower
    // for page-aligned sources, which would make the naive baseline look worse than it is.
    let mut host_dst_buf = vec![1u8; batch as usize + PAGE];
    let host_dst = page_aligned(&mut host_dst_buf, batch as usize);
    // Dropped before `host_dst`: unregistering waits out the last gather into it.
    let registration = match &cuda_link {
        // The bench has no engine process to export an IPC handle, so it allocates the device
        // buffer itself; gathers take the same path as into an opened IPC buffer.
        Some(c) => Registration::new(link.clone(), c.alloc_device(batch as usize)?),
        // SAFETY: host_dst_buf outlives the registration (declared before it, dropped after).
        None => Registration::new(link.clone(), unsafe {
            link.register_host(host_dst.as_mut_ptr(), host_dst.len())
        }?),
    };
    let dst_id = registration.id();
    let mut staging_buf = vec![1u8; batch as usize + PAGE];
    let staging = page_aligned(&mut staging_buf, batch as usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut runs = Vec::new();
    let mut rows = Vec::new();

    for &block in &sizes {
        let blocks = batch / block;
        let bytes = (blocks * block) as f64;
        // Per iteration: the gather, then the contiguous copies of the limit (cuda: one), then
        // the naive loop (cuda: packing alone).
        let (mut t_gather, mut t_memcpy, mut t_stream, mut t_mt, mut t_other) =
            (vec![], vec![], vec![], vec![], vec![]);
        for it in 0..args.iters + 2 {
            draw_runs(&mut rng, arena_bytes as u64, block, blocks, &mut runs);
            let g = secs(|| Ok(link.wait(link.gather(&arena, &runs, dst_id)?)?))?;
            // Page-aligned, as the gathers' runs of >= 4 KiB are: a source at another offset
            // within its page than the destination can hit slow paths (store-to-load 4 KiB
            // aliasing, glibc's `rep movsb` cliff), which would weaken the limit.
            let start = rng.gen_range(0..=(arena_bytes - batch as usize) / PAGE) * PAGE;
            let whole = &src[start..start + batch as usize];
            let (memcpy, stream, many, other);
            if cuda {
                let contiguous = [Run {
                    src_offset: start as u64,
                    dst_offset: 0,
                    len: batch,
                }];
                memcpy = secs(|| Ok(link.wait(link.gather(&arena, &contiguous, dst_id)?)?))?;
                (stream, many) = (memcpy, memcpy);
                // Packing alone: what the CPU does for a gather, with no copy to overlap.
                other = secs(|| {
                    // SAFETY: runs were drawn inside the arena and the staging buffer, ascending.
                    unsafe {
                        copy_runs_parallel(&pool, src.as_ptr(), staging.as_mut_ptr(), &runs, batch)
                    };
                    Ok(())
                })?;
            } else {
                // One thread, by `memcpy` and by the gathers' own streaming loop.
                memcpy = time(|| copy_contiguous(whole, staging));
                stream = time(|| copy_contiguous_streaming(whole, staging));
                many = time(|| copy_contiguous_parallel(&pool, whole, staging));
                // Fresh runs: re-reading the gather's rows would find them in cache.
                draw_runs(&mut rng, arena_bytes as u64, block, blocks, &mut runs);
                other = time(|| naive_loop(src, staging, &runs));
            }
            if it >= 2 {
                t_gather.push(g);
                t_memcpy.push(memcpy);
                t_stream.push(stream);
                t_mt.push(many);
                t_other.push(other);
            }
        }
        // The limit is the contiguous copy with the best median (the faster of one thread, by
        // either loop, and all threads). Choosing by median, not per iteration, keeps the noise
        // of a shared machine from inflating it: the per-iteration minimum of three noisy
        // timings is biased fast.
        let (memcpy_med, stream_med) = (median(&t_memcpy), median(&t_stream));
        let (one, one_med) = if memcpy_med <= stream_med {
            (&t_memcpy, memcpy_med)
        } else {
            (&t_stream, stream_med)
        };
        let many_med = median(&t_mt);
        let limit_times = if one_med <= many_med { one } else { &t_mt };
        let paired_ratio_p50 = paired_median(limit_times, &t_gather);
        let best_limit_gbps = bytes / best(limit_times) / 1e9;
        let best_gbps = bytes / best(&t_gather) / 1e9;
        let g = median(&t_gather);
        let limit = bytes / one_med.min(many_med) / 1e9;
        let gbps = bytes / g / 1e9;
        let other_med = median(&t_other);
        rows.push(Row {
            backend: link.name(),
            block_bytes: block,
            blocks,
            gbps,
            limit_gbps: limit,
            batch_p50_us: g * 1e6,
            ratio: gbps / limit,
            paired_ratio_p50,
            limit_1t_gbps: (!cuda).then(|| bytes / one_med / 1e9),
            limit_mt_gbps: (!cuda).then(|| bytes / many_med / 1e9),
            naive_gbps: (!cuda).then(|| bytes / other_med / 1e9),
            naive_ratio: (!cuda).then(|| one_med.min(many_med) / other_med),
            naive_paired_ratio_p50: (!cuda).then(|| paired_median(limit_times, &t_other)),
            overlap: cuda.then(|| g / one_med.max(other_med)),
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

const PAGE: usize = 4096;

/// The `len` bytes of `buf` (at least `len + PAGE` long) that start on a page boundary.
fn page_aligned(buf: &mut [u8], len: usize) -> &mut [u8] {
    let skip = buf.as_ptr().align_offset(PAGE);
    &mut buf[skip..skip + len]
}

/// The baseline the issue quotes: one thread, one `memcpy` per run, no prefetch.
fn naive_loop(src: &[u8], dst: &mut [u8], runs: &[Run]) {
    for r in runs {
        let (s, d, l) = (r.src_offset as usize, r.dst_offset as usize, r.len as usize);
        dst[d..d + l].copy_from_slice(&src[s..s + l]);
    }
}

fn print_rows(rows: &[Row], json: bool) -> kvdex::error::Result<()> {
    if json {
        for r in rows {
            let line = serde_json::to_string(r).map_err(|e| KvdexError::Config(e.to_string()))?;
            println!("{line}");
        }
        return Ok(());
    }
    // host: `naive` is the naive memcpy loop's ratio to the same limit; cuda: the overlap.
    println!(
        "{:<7} {:>10} {:>8} {:>9} {:>9} {:>7} {:>7} {:>11} {:>10} {:>7}",
        "backend",
        "block_B",
        "blocks",
        "GB/s",
        "limit",
        "ratio",
        "paired",
        "p50_us",
        "naive/ovl",
        "best%"
    );
    for r in rows {
        let extra = match (r.naive_ratio, r.overlap) {
            (Some(n), _) => format!("{:.0}%", n * 100.0),
            (None, Some(o)) => format!("{o:.2}x"),
            _ => "-".into(),
        };
        println!(
            "{:<7} {:>10} {:>8} {:>9.2} {:>9.2} {:>6.0}% {:>6.0}% {:>11.1} {:>10} {:>6.0}%",
            r.backend,
            r.block_bytes,
            r.blocks,
            r.gbps,
            r.limit_gbps,
            r.ratio * 100.0,
            r.paired_ratio_p50 * 100.0,
            r.batch_p50_us,
            extra,
            r.best_gbps / r.best_limit_gbps * 100.0
        );
    }
    Ok(())
}

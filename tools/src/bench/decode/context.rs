//! One context length: a daemon, the timed session and the busy ones appended, each method
//! sealed (its background build awaited), then its decode steps timed while the other
//! sessions retrieve back to back.

use std::time::{Duration, Instant};

use kvdex_index::attend::BudgetParams;
use kvdex_index::IndexKind;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::daemon::{create, layers_info, start_daemon, vm_rss_kib};
use super::steps::decode_steps;
use super::{report, DecodeArgs};
use crate::bench::decode_data::Synth;
use kvdex::error::{KvdexError, Result};
use kvdex::store::retrieve::{Budget, RetrieveParams};
use kvdex_client::SessionHandle;

/// Payload arena of every session the bench creates; appends are cut into blocks that fit it.
pub(super) const PAYLOAD: u64 = 64 << 20;

/// Runs every method on one context: one daemon, `a.sessions` sessions, one row per method.
/// The first `n` tokens of `data` are appended before the steps (with `--append`, the rest
/// one per step).
pub(super) fn run_context(
    a: &DecodeArgs,
    data: Synth,
    n: usize,
    kinds: &[(String, Option<IndexKind>)],
    exe: &std::path::Path,
) -> Result<()> {
    let (hq, kv, d) = (a.q_heads as usize, a.kv_heads as usize, a.head_dim as usize);
    let (sinks, window) = (a.sinks, a.window);
    let kv_bytes = (a.layers as usize * data.n * kv * d * 2 * 2) as u64;
    let daemon = start_daemon(exe, kv_bytes, a)?;
    // A training set larger than the arena goes in parts (the client's seal cuts it).
    let train = a.train_for(n);
    let (mut h, id, token) = create(&daemon, a, PAYLOAD)?;
    let t = Instant::now();
    append_range(a, &mut h, &data, 0..n)?;
    let append_s = t.elapsed().as_secs_f64();
    let mut others = Vec::new();
    for _ in 1..a.sessions.max(1) {
        let (mut o, oid, otoken) = create(&daemon, a, PAYLOAD)?;
        append_range(a, &mut o, &data, 0..n)?;
        others.push((o, oid, otoken));
    }
    let mut twin = super::sampling::twin(&daemon, a, &data, n)?;
    let positions = crate::bench::decode_data::train_positions(n, train);
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
    // The timed session's length: `n`, plus one token per step with --append.
    let mut grown = n;
    for (name, kind) in kinds {
        if let Some(kind) = kind {
            let t = Instant::now();
            for layer in 0..a.layers {
                h.seal(layer, *kind, Some((&training, &positions)))?;
                for (o, _, _) in &mut others {
                    o.seal(layer, *kind, Some((&training, &positions)))?;
                }
                if let Some(t) = &mut twin {
                    t.h.seal(layer, *kind, Some((&training, &positions)))?;
                }
            }
            let all = std::iter::once((&id, &token))
                .chain(others.iter().map(|(_, i, t)| (i, t)))
                .chain(twin.iter().map(|t| (&t.id, &t.token)));
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
                for (sid, stoken) in std::iter::once((&id, &token))
                    .chain(others.iter().map(|(_, i, t)| (i, t)))
                    .chain(twin.iter().map(|t| (&t.id, &t.token)))
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
        let sampled_before = match a.sample_rate {
            Some(_) => Some(super::sampling::settled(&daemon, &id, &token)?),
            None => None,
        };
        let twin_h = twin.as_mut().map(|t| &mut t.h);
        let mut row = std::thread::scope(|sc| {
            let busy: Vec<_> = others
                .iter_mut()
                .enumerate()
                .map(|(i, (o, _, _))| {
                    let (stop, data, params) = (&stop, &data, &params);
                    sc.spawn(move || -> Result<u64> {
                        let mut rng = StdRng::seed_from_u64(a.seed.wrapping_add(100 + i as u64));
                        let mut q = vec![0f32; hq * d];
                        let mut done = 0u64;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            data.decode_queries(hq, n, &mut rng, &mut q);
                            for layer in 0..a.layers {
                                o.retrieve(layer, &q, params)?;
                            }
                            done += 1;
                        }
                        Ok(done)
                    })
                })
                .collect();
            let row = decode_steps(
                a,
                &mut grown,
                name,
                &mut h,
                &data,
                &params,
                (sinks, window),
                twin_h,
            );
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
        if let Some(before) = sampled_before {
            let after = super::sampling::settled(&daemon, &id, &token)?;
            let (mean, requests) = after.since(&before);
            row.sampled_mass_recall = Some(mean);
            row.sampled_requests = Some(requests);
            row.sample_score_ms = after.score_ms_mean;
        }
        report::print_row(&row, a.json)?;
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

/// Appends tokens `range` of `data` to every layer, in blocks that fit the payload arena:
/// `[kv][block][d]` K then V.
pub(super) fn append_range(
    a: &DecodeArgs,
    h: &mut SessionHandle,
    data: &Synth,
    range: std::ops::Range<usize>,
) -> Result<()> {
    let (kv, d, total) = (a.kv_heads as usize, a.head_dim as usize, data.n);
    let n = range.end.min(total);
    // A block's K and V fill at most half the arena; a one-token append needs one row.
    let block = ((PAYLOAD as usize / 2) / (2 * kv * d * 2))
        .min(n.saturating_sub(range.start))
        .max(1);
    let (mut kb, mut vb) = (
        Vec::with_capacity(kv * block * d),
        Vec::with_capacity(kv * block * d),
    );
    for layer in 0..a.layers {
        let mut start = range.start;
        while start < n {
            let len = block.min(n - start);
            kb.clear();
            vb.clear();
            for g in 0..kv {
                let r = (g * total + start) * d..(g * total + start + len) * d;
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

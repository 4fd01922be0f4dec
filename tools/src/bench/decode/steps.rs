//! The timed decode steps of one method: a retrieve per layer and step (two warm-up steps
//! untimed), each checked against exact attention over the whole context.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::report::Row;
use super::DecodeArgs;
use crate::bench::decode_data::{Synth, Truth};
use kvdex::error::Result;
use kvdex::store::retrieve::RetrieveParams;
use kvdex_client::{merge, SessionHandle};

/// The `p` quantile of `v` (sorted in place); NaN when empty.
pub(super) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Times `a.steps` decode steps of method `name` on the session `h` and evaluates layer 0
/// of each against the exact answer; `statics` is (sinks, window). `len` is the session's
/// length; with `--append` each step first appends the next token of `data` to every layer
/// (untimed) and `len` grows.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_steps(
    a: &DecodeArgs,
    len: &mut usize,
    name: &str,
    h: &mut SessionHandle,
    data: &Synth,
    params: &RetrieveParams,
    statics: (usize, usize),
    mut twin: Option<&mut SessionHandle>,
) -> Result<Row> {
    let (hq, kv, d) = (a.q_heads as usize, a.kv_heads as usize, a.head_dim as usize);
    let group = hq / kv;
    let n0 = *len;
    let mut rng = StdRng::seed_from_u64(a.seed.wrapping_add(7));
    let mut q = vec![0f32; hq * d];
    let (mut lat, mut search, mut attn, mut copy, mut scored, mut slowest) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let (mut ksum, mut kcount, mut recall, mut covered, mut err) = (0.0, 0usize, 0.0, 0.0, 0.0);
    let (mut ids, mut out, mut lse) = (Vec::new(), vec![0f32; hq * d], vec![0f32; hq]);
    let (mut full, mut stat, mut stat_lse, mut merged) = (
        vec![0f32; hq * d],
        vec![0f32; hq * d],
        vec![0f32; hq],
        vec![0f32; d],
    );
    let mut truth = Truth::default();
    // `--sample-rate`: the unsampled twin's latency, timed alternately (before the timed
    // session on odd steps, after it on even ones).
    let mut lat_twin = Vec::new();
    // Two warm-up steps, untimed.
    for step in 0..a.steps + 2 {
        if a.append && *len < data.n {
            super::context::append_range(a, h, data, *len..*len + 1)?;
            if let Some(t) = twin.as_deref_mut() {
                super::context::append_range(a, t, data, *len..*len + 1)?;
            }
            *len += 1;
        }
        let n = *len;
        data.decode_queries(hq, n, &mut rng, &mut q);
        let mut bounds = vec![0usize];
        ids.clear();
        for layer in 0..a.layers {
            let mut time_twin = |lat: &mut Vec<f64>| -> Result<()> {
                if let Some(t) = twin.as_deref_mut() {
                    let at = Instant::now();
                    t.retrieve(layer, &q, params)?;
                    if step >= 2 {
                        lat.push(at.elapsed().as_secs_f64() * 1e3);
                    }
                }
                Ok(())
            };
            if step % 2 == 1 {
                time_twin(&mut lat_twin)?;
            }
            let t = Instant::now();
            let r = h.retrieve(layer, &q, params)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if step % 2 == 0 {
                time_twin(&mut lat_twin)?;
            }
            if step < 2 {
                continue;
            }
            lat.push(ms);
            search.push(r.header.search_us as f64 / 1e3);
            attn.push(r.header.attend_us as f64 / 1e3);
            copy.push(r.header.copy_us as f64 / 1e3);
            scored.push(r.header.scored as f64 / hq as f64);
            slowest.push(r.header.slowest_head_us as f64 / 1e3);
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
            let (keys, values) = (data.rows(false, g, n)?, data.rows(true, g, n)?);
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
        context: n0,
        method: name.to_owned(),
        kv_format: a.kv_format.clone(),
        layers: a.layers,
        q_heads: a.q_heads,
        kv_heads: a.kv_heads,
        layer_p50_ms: percentile(&mut lat.clone(), 0.5),
        layer_p99_ms: percentile(&mut lat, 0.99),
        search_ms: percentile(&mut search, 0.5),
        attn_ms: percentile(&mut attn, 0.5),
        copy_ms: percentile(&mut copy, 0.5),
        slowest_head_ms: percentile(&mut slowest, 0.5),
        k_mean: ksum / kcount.max(1) as f64,
        scored_per_head: percentile(&mut scored, 0.5),
        mass_recall: recall / heads,
        mass_covered: covered / heads,
        out_rel_err: err / steps,
        sampled_mass_recall: None,
        sampled_requests: None,
        sample_score_ms: None,
        unsampled_p50_ms: twin.map(|_| percentile(&mut lat_twin, 0.5)),
    })
}

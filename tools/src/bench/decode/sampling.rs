//! `--sample-rate`: the daemon's online recall sampler measured against the bench's exact
//! figures, and its cost. The timed session samples its retrieves at the rate asked; a twin
//! session (same context, same seal, sampling nothing) is timed alternately with it, step by
//! step, so that `layer_p50_ms` against `unsampled_p50_ms` is the sampler's cost in one run.

use std::time::{Duration, Instant};

use super::context::{append_range, PAYLOAD};
use super::daemon::{create_sampled, http, json, Daemon};
use super::DecodeArgs;
use crate::bench::decode_data::Synth;
use kvdex::error::{KvdexError, Result};
use kvdex_client::SessionHandle;

/// The unsampled twin of the timed session.
pub(super) struct Twin {
    pub(super) h: SessionHandle,
    pub(super) id: String,
    pub(super) token: String,
}

/// The twin (sampling off) with the first `n` tokens of `data`, when `--sample-rate` is given.
pub(super) fn twin(d: &Daemon, a: &DecodeArgs, data: &Synth, n: usize) -> Result<Option<Twin>> {
    if a.sample_rate.is_none() {
        return Ok(None);
    }
    let (mut h, id, token) = create_sampled(d, a, PAYLOAD, Some(0.0))?;
    append_range(a, &mut h, data, 0..n)?;
    Ok(Some(Twin { h, id, token }))
}

/// A session's sampled figures so far: scored requests, and the sum and count of the sampled
/// query heads' mass recall.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Sampled {
    pub(super) requests: u64,
    pub(super) mass_sum: f64,
    pub(super) heads: u64,
    /// The daemon's mean milliseconds per sample scored (all of the session's samples).
    pub(super) score_ms_mean: Option<f64>,
}

impl Sampled {
    /// The figures of the samples taken between `before` and `self`: (mean mass recall,
    /// requests scored).
    pub(super) fn since(&self, before: &Sampled) -> (f64, u64) {
        let heads = self.heads.saturating_sub(before.heads);
        let mean = if heads == 0 {
            f64::NAN
        } else {
            (self.mass_sum - before.mass_sum) / heads as f64
        };
        (mean, self.requests.saturating_sub(before.requests))
    }
}

/// The session's `quality` from `GET /v1/sessions/{id}`.
pub(super) fn read(d: &Daemon, id: &str, token: &str) -> Result<Sampled> {
    let v = ureq::get(&format!("{}/v1/sessions/{id}", d.url))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(http)?
        .into_string()
        .map_err(KvdexError::Io)
        .and_then(|s| json(&s))?;
    let q = &v["quality"];
    let m = &q["mass_recall"];
    let heads = m["count"].as_u64().unwrap_or(0);
    Ok(Sampled {
        requests: q["sampled_requests"].as_u64().unwrap_or(0),
        mass_sum: m["mean"].as_f64().unwrap_or(0.0) * heads as f64,
        heads,
        score_ms_mean: q["score_ms_mean"].as_f64(),
    })
}

/// [`read`] once the scorer has caught up: the figures no longer change for half a second
/// (at most 30 s).
pub(super) fn settled(d: &Daemon, id: &str, token: &str) -> Result<Sampled> {
    let t = Instant::now();
    let mut last = read(d, id, token)?;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = read(d, id, token)?;
        if now == last || t.elapsed() > Duration::from_secs(30) {
            return Ok(now);
        }
        last = now;
    }
}

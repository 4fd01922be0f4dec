//! Attention output error of a retrieved set, with and without the cluster index's estimate of
//! the unread keys: the in-process counterpart of `bench decode`'s `out_rel_err`, over the
//! benchmark split's context (no sinks or window: every context key is retrievable).

use kvdex_index::attend::accum;
use kvdex_index::cluster::tail::TailScratch;
use kvdex_index::{ClusterIndex, KeySlice, KeyStore};

/// Exact attention output `Σ p_i v_i` from the full softmax `probs`.
pub(super) fn exact_out(probs: &[f32], values: &KeySlice<'_>) -> Vec<f32> {
    use kvdex_index::attend::ValueStore;
    let mut out = vec![0.0f32; ValueStore::dim(values)];
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            accum::add_scaled(&mut out, p, ValueStore::row(values, i as u32));
        }
    }
    out
}

/// Softmax attention over `ids` with their exact `scores` (unscaled q·k): (out, lse).
pub(super) fn retrieved_out(
    ids: &[u32],
    scores: &[f32],
    scale: f32,
    values: &KeySlice<'_>,
) -> (Vec<f32>, f32) {
    use kvdex_index::attend::ValueStore;
    let mut out = vec![0.0f32; ValueStore::dim(values)];
    let mx = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
    if !mx.is_finite() {
        return (out, f32::NEG_INFINITY);
    }
    let mut z = 0.0f32;
    for (&id, &s) in ids.iter().zip(scores) {
        let w = (s * scale - mx).exp();
        z += w;
        accum::add_scaled(&mut out, w, ValueStore::row(values, id));
    }
    out.iter_mut().for_each(|o| *o /= z);
    (out, mx + z.ln())
}

/// The LSE merge of two normalised partial outputs.
pub(super) fn merge(a: (&[f32], f32), b: (&[f32], f32)) -> Vec<f32> {
    let m = a.1.max(b.1);
    if !m.is_finite() {
        return a.0.to_vec();
    }
    let (wa, wb) = ((a.1 - m).exp(), (b.1 - m).exp());
    let z = wa + wb;
    a.0.iter()
        .zip(b.0)
        .map(|(x, y)| (wa * x + wb * y) / z)
        .collect()
}

/// `|a - b| / |b|`.
pub(super) fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// The output with the cluster index's estimate of the keys outside `ids` merged in.
pub(super) fn with_tail(
    idx: &ClusterIndex,
    q: &[f32],
    (ids, scores): (&[u32], &[f32]),
    keys: &KeySlice<'_>,
    values: &KeySlice<'_>,
    variance: bool,
) -> Result<Vec<f32>, kvdex_index::IndexError> {
    let scale = 1.0 / (keys.dim() as f32).sqrt();
    let (o, lse) = retrieved_out(ids, scores, scale, values);
    let mut tail = vec![0.0f32; o.len()];
    let est = idx.estimate_unread(
        q,
        scale,
        ids,
        values,
        variance,
        &mut TailScratch::default(),
        &mut tail,
    )?;
    Ok(merge((&o, lse), (&tail, est.lse)))
}

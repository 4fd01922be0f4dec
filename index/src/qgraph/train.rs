//! Step 1 of the build: the training queries' exact top lists (or the engine's own neighbour
//! lists), and the list density that sets the sparse-data knobs (Nq, the rank window, α and
//! the sequence edges move from their dense to their sparse values as the lists thin out).

use super::GraphParams;
use crate::error::check_finite;
use crate::{FlatIndex, Hits, IndexError, KeyStore, SearchScratch, TrainingSignal};
use rayon::prelude::*;

/// How sparse `e` training list entries per key are: 0 at e >= 32, 1 at e <= 4, log-linear
/// between.
fn sparseness(e: f32) -> f32 {
    ((32.0 / e.max(1e-6)).log2() / 3.0).clamp(0.0, 1.0)
}

/// The occlusion slack for `e` training list entries per key (see
/// [`GraphParams::sparse_alpha`]): `alpha` at e >= 32, `sparse_alpha` at e <= 4, log-linear between.
pub(super) fn density_alpha(params: &GraphParams, e: f32) -> f32 {
    params.alpha + (params.sparse_alpha - params.alpha) * sparseness(e)
}

/// `dense` at e >= 32 list entries per key, `sparse` at e <= 4, log-linear between (see
/// [`GraphParams::sparse_train_topk`]).
pub(super) fn sparse_lerp(dense: usize, sparse: usize, e: f32) -> usize {
    let t = sparseness(e) as f64;
    (dense as f64 + (sparse as f64 - dense as f64) * t).round() as usize
}

/// Step 1: the exact top lists of the (sampled) training queries, or the supplied lists, and
/// the density they give at the base Nq (list entries per key, `training queries x
/// train_topk / keys` for queries, the supplied entries per key for lists). Queries get
/// lists of the density-adjusted Nq (see [`GraphParams::sparse_train_topk`]).
pub(super) fn training_lists(
    keys: &dyn KeyStore,
    training: &TrainingSignal<'_>,
    params: &GraphParams,
) -> Result<(Vec<Vec<u32>>, f32), IndexError> {
    let n = keys.len();
    let d = keys.dim();
    match *training {
        TrainingSignal::None => Ok((Vec::new(), 0.0)),
        TrainingSignal::Neighbours(lists) => {
            for l in lists {
                if let Some(&bad) = l.iter().find(|&&id| id as usize >= n) {
                    return Err(IndexError::InvalidArgument(format!(
                        "neighbour list names key {bad} but only {n} keys are indexed"
                    )));
                }
            }
            let entries = lists.iter().map(Vec::len).sum::<usize>();
            Ok((lists.to_vec(), entries as f32 / n.max(1) as f32))
        }
        TrainingSignal::Queries { vectors, positions } => {
            if d == 0 || vectors.len() != positions.len() * d {
                return Err(IndexError::BadShape(format!(
                    "{} training floats for {} positions of dim {d}",
                    vectors.len(),
                    positions.len()
                )));
            }
            check_finite("training query", vectors)?;
            let picks = sample_queries(positions, params);
            let density = (picks.len() * params.train_topk) as f32 / n.max(1) as f32;
            let topk = sparse_lerp(params.train_topk, params.sparse_train_topk, density);
            let flat = FlatIndex::new(n);
            let lists = picks
                .par_iter()
                .map_init(
                    || (SearchScratch::new(), Hits::default()),
                    |(scratch, hits), &qi| {
                        let q = &vectors[qi * d..(qi + 1) * d];
                        let visible = (positions[qi] as usize + 1).min(n);
                        let outs = std::slice::from_mut(hits);
                        match flat.search_prefix(keys, q, topk, visible, scratch, outs) {
                            Ok(_) => hits.ids.clone(),
                            Err(_) => Vec::new(),
                        }
                    },
                )
                .filter(|l: &Vec<u32>| !l.is_empty())
                .collect();
            Ok((lists, density))
        }
    }
}

/// Which training queries to use: all when they fit in `max_train_queries`; otherwise the
/// `recent_train_queries` latest by position (decode queries follow the last prefill ones) plus
/// an even sample of the rest.
fn sample_queries(positions: &[u32], params: &GraphParams) -> Vec<usize> {
    let total = positions.len();
    let take = total.min(params.max_train_queries.max(1));
    if take == total {
        return (0..total).collect();
    }
    let recent = params.recent_train_queries.min(take);
    let mut by_pos: Vec<usize> = (0..total).collect();
    by_pos.sort_by_key(|&i| std::cmp::Reverse(positions[i]));
    let (latest, rest) = by_pos.split_at(recent);
    let spread = take - recent;
    let mut picks: Vec<usize> = latest.to_vec();
    picks.extend((0..spread).map(|i| rest[i * rest.len() / spread.max(1)]));
    picks.sort_unstable();
    picks
}

#[cfg(test)]
mod tests {
    /// Nq and the rank window move from their dense to their sparse values as the training
    /// lists thin out, and stay put on dense data (the real 8K set has ~52 entries per key).
    #[test]
    fn sparse_settings_follow_the_list_density() {
        assert_eq!(super::sparse_lerp(100, 200, 52.0), 100);
        assert_eq!(super::sparse_lerp(100, 200, 32.0), 100);
        assert_eq!(super::sparse_lerp(100, 200, 4.0), 200);
        assert_eq!(super::sparse_lerp(100, 200, 0.4), 200);
        let mid = super::sparse_lerp(8, 16, 11.3);
        assert!(mid > 8 && mid < 16, "{mid}");
    }

    #[test]
    fn density_alpha_moves_from_alpha_to_sparse_alpha() {
        let p = crate::GraphParams {
            sparse_alpha: 1.5,
            ..crate::GraphParams::default()
        };
        assert_eq!(super::density_alpha(&p, 50.0), p.alpha);
        assert_eq!(super::density_alpha(&p, 3.0), p.sparse_alpha);
        let mid = super::density_alpha(&p, 11.3);
        assert!(mid > p.alpha && mid < p.sparse_alpha, "{mid}");
        assert_eq!(super::density_alpha(&p, 0.0), p.sparse_alpha);
    }
}

//! The exact quality figures of one query head's retrieved set, from its scaled logits over
//! every token of the layer: the one definition `kvdex bench decode` (its exact evaluation)
//! and the online sampler ([`super`]) share, so that their figures compare.

/// How good one head's retrieved set was, against the exact scan.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeadFigures {
    /// Of the exact top-k non-static tokens (k = the retrieved set's size), the share the
    /// retrieved set holds.
    pub recall_at_k: f64,
    /// The retrieved set's attention mass over the mass of the exact top-k of the same k
    /// (non-static tokens only), at most 1; 1 for an empty set.
    pub mass_recall: f64,
    /// The share of the whole attention mass in the static tokens plus the retrieved ones (what
    /// the adaptive budget's `coverage` estimates).
    pub mass_covered: f64,
}

/// The figures of the retrieved set `ids` for a head whose scaled logits over every token of
/// the layer are `logits`; the non-static tokens are `start..end` (the first `start` are sinks,
/// `end..` the window). `sorted` is scratch.
pub fn head_figures(
    logits: &[f32],
    ids: &[u32],
    (start, end): (usize, usize),
    sorted: &mut Vec<f32>,
) -> HeadFigures {
    let n = logits.len();
    let end = end.min(n);
    let start = start.min(end);
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let p = |x: f32| ((x as f64) - m).exp();
    let total: f64 = logits.iter().map(|&x| p(x)).sum();
    let stat: f64 = logits[..start]
        .iter()
        .chain(&logits[end..])
        .map(|&x| p(x))
        .sum();
    let logit = |i: u32| logits.get(i as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let got: f64 = ids.iter().map(|&i| p(logit(i))).sum();
    // Exact top-|ids| among the non-static tokens.
    sorted.clear();
    sorted.extend_from_slice(&logits[start..end]);
    let k = ids.len().min(sorted.len());
    let (best, recall_at_k) = if k == 0 {
        (0.0, 1.0)
    } else {
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        let best: f64 = sorted[..k].iter().map(|&x| p(x)).sum();
        // Ties at the k-th logit count as hits: either token is an exact top-k answer.
        let hits = ids
            .iter()
            .filter(|&&i| (start..end).contains(&(i as usize)) && logit(i) >= kth)
            .count();
        (best, (hits.min(k) as f64) / k as f64)
    };
    HeadFigures {
        recall_at_k,
        mass_recall: if best > 0.0 {
            (got / best).min(1.0)
        } else {
            1.0
        },
        mass_covered: if total > 0.0 {
            (stat + got) / total
        } else {
            1.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens 0 (sink) and 5 (window) are static; 1..5 are retrievable with logits 4, 3, 2, 1.
    #[test]
    fn figures_of_exact_partial_and_empty_sets() {
        let logits = [0.0f32, 4.0, 3.0, 2.0, 1.0, 0.0];
        let mut s = Vec::new();
        let exact = head_figures(&logits, &[1, 2], (1, 5), &mut s);
        assert_eq!(exact.recall_at_k, 1.0);
        assert_eq!(exact.mass_recall, 1.0);
        let e = |x: f64| x.exp();
        let total = 2.0 * e(0.0) + e(4.0) + e(3.0) + e(2.0) + e(1.0);
        let want = (2.0 + e(4.0) + e(3.0)) / total;
        assert!((exact.mass_covered - want).abs() < 1e-12);
        // The 2nd and 4th best: one of the top two, and their mass over the top two's.
        let half = head_figures(&logits, &[2, 4], (1, 5), &mut s);
        assert_eq!(half.recall_at_k, 0.5);
        let want = (e(3.0) + e(1.0)) / (e(4.0) + e(3.0));
        assert!((half.mass_recall - want).abs() < 1e-12);
        let none = head_figures(&logits, &[], (1, 5), &mut s);
        assert_eq!((none.recall_at_k, none.mass_recall), (1.0, 1.0));
        // An id past the logits (never sent by the daemon) counts for nothing.
        let bad = head_figures(&logits, &[1, 99], (1, 5), &mut s);
        assert_eq!(bad.recall_at_k, 0.5);
    }
}

//! A figure's running count, mean and quantiles over a fixed range (a session's sampled
//! figures in [`super::QualityReport`]).

/// Bins of a running histogram: quantiles are read to 1/BINS of its range.
const BINS: usize = 200;

/// Count, mean and a fixed histogram of one figure, for its quantiles.
#[derive(Clone, Debug)]
pub(super) struct Running {
    lo: f64,
    hi: f64,
    count: u64,
    sum: f64,
    sum_abs: f64,
    bins: Box<[u64; BINS]>,
}

impl Running {
    pub(super) fn new(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            hi,
            count: 0,
            sum: 0.0,
            sum_abs: 0.0,
            bins: Box::new([0; BINS]),
        }
    }

    pub(super) fn observe(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.count += 1;
        self.sum += x;
        self.sum_abs += x.abs();
        let at = ((x - self.lo) / (self.hi - self.lo) * BINS as f64).floor();
        self.bins[(at.max(0.0) as usize).min(BINS - 1)] += 1;
    }

    /// The `p` quantile, as the upper edge of the bin that reaches it (clamped to the range).
    fn quantile(&self, p: f64) -> f64 {
        let want = (p * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.bins.iter().enumerate() {
            seen += n;
            if seen >= want {
                return self.lo + (self.hi - self.lo) * (i + 1) as f64 / BINS as f64;
            }
        }
        self.hi
    }

    pub(super) fn summary(&self) -> Option<Summary> {
        (self.count > 0).then(|| {
            let n = self.count as f64;
            Summary {
                count: self.count,
                mean: self.sum / n,
                mean_abs: self.sum_abs / n,
                p10: self.quantile(0.1),
                p50: self.quantile(0.5),
                p90: self.quantile(0.9),
            }
        })
    }
}

/// Running figures of one measure over a session's sampled query heads.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Query heads measured.
    pub count: u64,
    /// Their mean.
    pub mean: f64,
    /// The mean of the absolute values (the coverage error's size).
    pub mean_abs: f64,
    /// Quantiles, to 1/200 of the measure's range.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_figures_give_means_and_quantiles() {
        let mut r = Running::new(0.0, 1.0);
        assert!(r.summary().is_none());
        for i in 0..100 {
            r.observe(i as f64 / 100.0);
        }
        r.observe(f64::NAN);
        let s = r.summary().unwrap();
        assert_eq!(s.count, 100);
        assert!((s.mean - 0.495).abs() < 1e-9);
        assert!((s.p10 - 0.1).abs() <= 0.006, "{s:?}");
        assert!((s.p50 - 0.5).abs() <= 0.006, "{s:?}");
        let mut e = Running::new(-1.0, 1.0);
        e.observe(-0.2);
        e.observe(0.1);
        let s = e.summary().unwrap();
        assert!((s.mean + 0.05).abs() < 1e-12 && (s.mean_abs - 0.15).abs() < 1e-12);
        assert!((s.p10 + 0.2).abs() <= 0.011, "{s:?}");
    }
}

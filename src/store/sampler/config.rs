//! The sampler's settings ([`SamplingConfig`], from the `[decode]` keys `sample_rate`,
//! `sample_cpu_share`, `sample_queue`, `drift_floor`, `drift_rebuild`,
//! `drift_rebuild_queries`).

/// A fraction in a configuration file: an f64 compared bit for bit, so that the config structs
/// keep `Eq`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Fraction(pub f64);

impl PartialEq for Fraction {
    fn eq(&self, o: &Self) -> bool {
        self.0.to_bits() == o.0.to_bits()
    }
}

impl Eq for Fraction {}

/// How the daemon samples its own retrieval quality (see [`super`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Share of each layer's retrieves re-scored exactly in the background (0: off, 1: all).
    pub rate: f64,
    /// Most of one core the scoring may take: after a sample that took `t` seconds, none is
    /// admitted for `t / cpu_share` seconds (those requests count as dropped, `cpu_cap`).
    pub cpu_share: f64,
    /// Samples copied and waiting to be scored, at most (more are dropped, `queue_full`).
    pub queue: usize,
    /// A layer whose recent sampled mass recall is below this is logged as drifting (0: off).
    pub drift_floor: f64,
    /// Rebuild a drifting layer's index in the background from its sampled decode queries.
    pub drift_rebuild: bool,
    /// Sampled decode queries (positions, each all query heads) kept per layer for a rebuild.
    pub drift_rebuild_queries: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            rate: 0.0,
            cpu_share: 0.25,
            queue: 16,
            drift_floor: 0.0,
            drift_rebuild: false,
            drift_rebuild_queries: 256,
        }
    }
}

impl SamplingConfig {
    /// Refuses values the sampler cannot honour; `key` names the config key of each.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !unit(self.rate) {
            return Err((
                "decode.sample_rate",
                format!("{} is not in 0..=1", self.rate),
            ));
        }
        if !(self.cpu_share > 0.0 && self.cpu_share <= 1.0) {
            return Err((
                "decode.sample_cpu_share",
                format!("{} is not in (0, 1]", self.cpu_share),
            ));
        }
        if !(1..=4096).contains(&self.queue) {
            return Err((
                "decode.sample_queue",
                format!("{} is not in 1..=4096", self.queue),
            ));
        }
        if !unit(self.drift_floor) {
            return Err((
                "decode.drift_floor",
                format!("{} is not in 0..=1", self.drift_floor),
            ));
        }
        if !(1..=65536).contains(&self.drift_rebuild_queries) {
            return Err((
                "decode.drift_rebuild_queries",
                format!("{} is not in 1..=65536", self.drift_rebuild_queries),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_settings_name_their_key() {
        assert!(SamplingConfig::default().check().is_ok());
        let bad = |c: SamplingConfig| c.check().unwrap_err().0;
        let d = SamplingConfig::default();
        assert_eq!(bad(SamplingConfig { rate: 1.5, ..d }), "decode.sample_rate");
        assert_eq!(
            bad(SamplingConfig {
                cpu_share: 0.0,
                ..d
            }),
            "decode.sample_cpu_share"
        );
        assert_eq!(bad(SamplingConfig { queue: 0, ..d }), "decode.sample_queue");
        assert_eq!(
            bad(SamplingConfig {
                drift_floor: -0.1,
                ..d
            }),
            "decode.drift_floor"
        );
        assert_eq!(
            bad(SamplingConfig {
                drift_rebuild_queries: 0,
                ..d
            }),
            "decode.drift_rebuild_queries"
        );
        assert_eq!(Fraction(0.5), Fraction(0.5));
        assert_ne!(Fraction(0.5), Fraction(0.25));
    }
}

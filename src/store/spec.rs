//! What a session is created with beyond its shape ([`SessionSpec`]): Slim mode, static tokens
//! of its own when the engine attends to other ones than the daemon's `[decode]` values, and
//! its storage format.

use super::*;
use crate::config::MAX_STATIC_TOKENS;

/// Options of [`Store::session_spec`]. The static tokens must equal what the engine attends to
/// itself (an engine serving two models, or a model tuned with StreamingLLM's 4 sinks): a token
/// the engine keeps and retrieval also returns is counted twice in the merge, and one neither
/// keeps is never counted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SessionSpec {
    /// Slim mode (K only, V recomputed from `W_KV`); MHA shapes only.
    pub slim: Option<SlimSpec>,
    /// S: the first tokens of every layer the engine keeps; the store's `sinks` when `None`.
    pub sinks: Option<usize>,
    /// W: the most recent tokens the engine keeps; the store's `window` when `None`.
    pub window: Option<usize>,
    /// Share of retrieves sampled for online recall (0 to 1); the store's
    /// `decode.sample_rate` when `None`.
    pub sample_rate: Option<f64>,
    /// How the rows are stored: in the session dtype (the default) or int8 with scales.
    pub kv_format: KvFormat,
}

impl SessionSpec {
    /// The store's decode settings `base` with this spec's static tokens. Shares `base` when
    /// nothing is overridden. Errors: a value over [`MAX_STATIC_TOKENS`], naming the field.
    pub(super) fn decode_config(&self, base: &Arc<DecodeConfig>) -> Result<Arc<DecodeConfig>> {
        for (name, value) in [("sinks", self.sinks), ("window", self.window)] {
            if let Some(v) = value.filter(|&v| v as u64 > MAX_STATIC_TOKENS) {
                return Err(KvdexError::BadRequest(format!(
                    "{name} {v} is more than {MAX_STATIC_TOKENS}, the most static tokens at \
                     either end of a layer"
                )));
            }
        }
        let sinks = self.sinks.unwrap_or(base.sinks);
        let window = self.window.unwrap_or(base.window);
        if (sinks, window) == (base.sinks, base.window) {
            return Ok(base.clone());
        }
        Ok(Arc::new(DecodeConfig {
            sinks,
            window,
            ..DecodeConfig::clone(base)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_the_static_tokens_and_bad_values_name_the_field() {
        let base = Arc::new(DecodeConfig {
            sinks: 128,
            window: 512,
            insert_batch: 7,
            ..Default::default()
        });
        let same = SessionSpec::default().decode_config(&base).unwrap();
        assert!(
            Arc::ptr_eq(&same, &base),
            "no override shares the store's settings"
        );
        let spec = SessionSpec {
            sinks: Some(4),
            window: Some(16),
            ..Default::default()
        };
        let c = spec.decode_config(&base).unwrap();
        assert_eq!((c.sinks, c.window, c.insert_batch), (4, 16, 7));
        let only_w = SessionSpec {
            window: Some(0),
            ..Default::default()
        };
        let c = only_w.decode_config(&base).unwrap();
        assert_eq!((c.sinks, c.window), (128, 0));
        let top = MAX_STATIC_TOKENS as usize;
        let edge = SessionSpec {
            sinks: Some(top),
            window: Some(top),
            ..Default::default()
        };
        assert_eq!(edge.decode_config(&base).unwrap().sinks, top);
        for (spec, field) in [
            (
                SessionSpec {
                    sinks: Some(top + 1),
                    ..Default::default()
                },
                "sinks",
            ),
            (
                SessionSpec {
                    window: Some(usize::MAX),
                    ..Default::default()
                },
                "window",
            ),
        ] {
            match spec.decode_config(&base) {
                Err(KvdexError::BadRequest(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}

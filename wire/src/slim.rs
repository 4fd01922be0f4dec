//! Slim mode as a session asks for it (MHA models only): the daemon stores K alone and
//! recomputes `V = K·W_KV` for the rows it selects.

use kvdex_index::attend::RopeSpec;

use crate::error::{Error, Result};
use crate::Shape;

/// Largest `D = kv_heads · head_dim` Slim mode accepts (`W_KV` is `D²` floats: 1 GiB at 16384).
pub const MAX_SLIM_MODEL_DIM: usize = 16384;

/// Slim mode as asked for when a session is created.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SlimSpec {
    /// RoPE of the stored keys, undone before `K·W_KV` (None: keys are stored pre-RoPE).
    pub rope: Option<RopeSpec>,
}

impl SlimSpec {
    /// Checks Slim mode fits `shape`: MHA only (`q_heads == kv_heads`: a GQA model's `W_K` is
    /// not square, so V is not a function of K), a model dim within [`MAX_SLIM_MODEL_DIM`],
    /// and a usable RoPE.
    pub fn validate(&self, shape: &Shape) -> Result<()> {
        if shape.q_heads != shape.kv_heads {
            return Err(Error::BadRequest(format!(
                "slim mode needs an MHA model (q_heads == kv_heads); this shape has q_heads {} \
                 and kv_heads {} (GQA), whose V cannot be recomputed from K",
                shape.q_heads, shape.kv_heads
            )));
        }
        let d = shape.kv_heads as usize * shape.head_dim as usize;
        if d > MAX_SLIM_MODEL_DIM {
            return Err(Error::BadRequest(format!(
                "slim mode: kv_heads x head_dim = {d} is above the limit {MAX_SLIM_MODEL_DIM}"
            )));
        }
        if let Some(r) = self.rope {
            if r.rope_dim % 2 != 0
                || r.rope_dim > shape.head_dim as usize
                || !(r.theta.is_finite() && r.theta > 0.0)
            {
                return Err(Error::BadRequest(format!(
                    "slim rope: rope_dim {} must be even and at most head_dim {}, theta {} \
                     finite and positive",
                    r.rope_dim, shape.head_dim, r.theta
                )));
            }
        }
        Ok(())
    }
}

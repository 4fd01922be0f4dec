//! A session's [`Shape`] (layers, heads, head size, dtype), its limits, and the serde form of
//! its dtype. Every request is checked against the shape, so it lives apart from the storage.

use kvdex_index::KeyDtype;

use crate::error::{Error, Result};

/// The shape of a session's KV cache, fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// Transformer layers.
    pub layers: u32,
    /// Query heads per layer.
    pub q_heads: u32,
    /// KV heads per layer; query head `h` reads KV head `h / (q_heads / kv_heads)` (GQA).
    pub kv_heads: u32,
    /// Elements per head vector.
    pub head_dim: u32,
    /// Storage dtype of K and V.
    #[serde(with = "dtype_serde")]
    pub dtype: KeyDtype,
}

impl Shape {
    /// Most layers a session may have.
    pub const MAX_LAYERS: u32 = 1024;
    /// Most query (or KV) heads per layer.
    pub const MAX_HEADS: u32 = 1024;
    /// Longest head vector.
    pub const MAX_HEAD_DIM: u32 = 8192;

    /// Checks the shape is usable: all dimensions non-zero, within [`Shape::MAX_LAYERS`],
    /// [`Shape::MAX_HEADS`] and [`Shape::MAX_HEAD_DIM`] (a client cannot make the daemon allocate
    /// per-layer state for billions of layers), and GQA-divisible.
    pub fn validate(&self) -> Result<()> {
        for (name, v, max) in [
            ("layers", self.layers, Self::MAX_LAYERS),
            ("q_heads", self.q_heads, Self::MAX_HEADS),
            ("kv_heads", self.kv_heads, Self::MAX_HEADS),
            ("head_dim", self.head_dim, Self::MAX_HEAD_DIM),
        ] {
            if v > max {
                return Err(Error::BadRequest(format!(
                    "{name} = {v} is above the limit {max}"
                )));
            }
        }
        if self.layers == 0 || self.q_heads == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(Error::BadRequest(format!(
                "shape has a zero dimension: {self:?}"
            )));
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return Err(Error::BadRequest(format!(
                "q_heads ({}) is not a multiple of kv_heads ({})",
                self.q_heads, self.kv_heads
            )));
        }
        Ok(())
    }
    /// Query heads per KV head.
    pub fn group(&self) -> u32 {
        self.q_heads / self.kv_heads
    }
    /// Bytes of one token's row for one head.
    pub fn row_bytes(&self) -> usize {
        self.head_dim as usize * self.dtype.size()
    }
}

/// Serde for [`KeyDtype`] as "f16" | "bf16" | "f32".
pub mod dtype_serde {
    use kvdex_index::KeyDtype;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses "f16", "bf16" or "f32".
    pub fn parse(s: &str) -> Option<KeyDtype> {
        match s {
            "f16" | "float16" => Some(KeyDtype::F16),
            "bf16" | "bfloat16" => Some(KeyDtype::Bf16),
            "f32" | "float32" => Some(KeyDtype::F32),
            _ => None,
        }
    }
    /// The canonical name.
    pub fn name(d: KeyDtype) -> &'static str {
        match d {
            KeyDtype::F16 => "f16",
            KeyDtype::Bf16 => "bf16",
            KeyDtype::F32 => "f32",
        }
    }
    /// serde hook.
    pub fn serialize<S: Serializer>(d: &KeyDtype, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name(*d))
    }
    /// serde hook.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyDtype, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown dtype {s:?}: expected f16, bf16 or f32"))
        })
    }
}

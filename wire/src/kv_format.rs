//! A session's storage format (`"kv_format"` of `POST /v1/sessions`): its rows in the
//! session dtype, or int8 codes with one bf16 scale per row ([`kvdex_index::quant`]).

use kvdex_index::quant::SCALE_BYTES;
use kvdex_index::KeyDtype;

use crate::error::{Error, Result};
use crate::Shape;

/// How a session stores its K and V rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvFormat {
    /// In the session dtype, as appended.
    #[default]
    Dtype,
    /// Int8 codes with one bf16 scale per row (per token and KV head), symmetric absmax.
    Int8,
}

impl KvFormat {
    /// Parses the `kv_format` of a session of `dtype`: `"int8"`, or the dtype's own name
    /// (`"f16"`, `"bf16"`, `"f32"`: the default). Errors name the value and what is accepted.
    pub fn parse(name: &str, dtype: KeyDtype) -> Result<Self> {
        let own = crate::dtype_serde::name(dtype);
        match name {
            "int8" => Ok(Self::Int8),
            n if n == own => Ok(Self::Dtype),
            other => Err(Error::BadRequest(format!(
                "kv_format {other:?} is not a storage format for a {own} session: use \"int8\" \
                 or \"{own}\" (the default)"
            ))),
        }
    }

    /// The name [`KvFormat::parse`] reads, for a session of `dtype`.
    pub fn name(self, dtype: KeyDtype) -> &'static str {
        match self {
            Self::Dtype => crate::dtype_serde::name(dtype),
            Self::Int8 => "int8",
        }
    }

    /// Bytes of one stored row's elements (codes, without the scale).
    pub fn row_bytes(self, shape: &Shape) -> usize {
        match self {
            Self::Dtype => shape.row_bytes(),
            Self::Int8 => shape.head_dim as usize,
        }
    }

    /// Bytes of one stored row's scale (none in the session dtype).
    pub fn scale_bytes(self) -> usize {
        match self {
            Self::Dtype => 0,
            Self::Int8 => SCALE_BYTES,
        }
    }

    /// Bytes one token takes over every layer and KV head, with `planes` rows per KV head
    /// (2 for K and V, 1 in Slim mode): rows and scales, not the arenas' rounding.
    pub fn bytes_per_token(self, shape: &Shape, planes: usize) -> usize {
        let per_row = self.row_bytes(shape) + self.scale_bytes();
        shape.layers as usize * shape.kv_heads as usize * planes * per_row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_a_foreign_dtype_is_refused_by_name() {
        for dtype in [KeyDtype::F16, KeyDtype::Bf16, KeyDtype::F32] {
            for f in [KvFormat::Dtype, KvFormat::Int8] {
                assert_eq!(KvFormat::parse(f.name(dtype), dtype).unwrap(), f);
            }
        }
        let e = KvFormat::parse("f32", KeyDtype::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kv_format \"f32\"") && e.contains("int8"), "{e}");
        let e = KvFormat::parse("int4", KeyDtype::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"int4\""), "{e}");
    }

    #[test]
    fn int8_rows_cost_about_half_of_f16() {
        let shape = Shape {
            layers: 30,
            q_heads: 9,
            kv_heads: 3,
            head_dim: 64,
            dtype: KeyDtype::F16,
        };
        let f16_bytes = KvFormat::Dtype.bytes_per_token(&shape, 2);
        let int8_bytes = KvFormat::Int8.bytes_per_token(&shape, 2);
        assert_eq!(f16_bytes, 30 * 3 * 2 * 128);
        assert_eq!(int8_bytes, 30 * 3 * 2 * 66);
        assert!((int8_bytes as f64) <= 0.53 * f16_bytes as f64);
    }
}

//! numpy arrays <-> K/V bytes in a session's dtype.
//!
//! Appends accept float16 or float32 arrays, and bf16 as uint16 arrays of its bits (numpy has
//! no bf16; the Python side views a torch bfloat16 tensor that way). When the array's dtype is
//! the session's, its bytes are passed through without a copy; otherwise they are converted
//! once, which allocates, so engines should append in the session dtype.

use std::borrow::Cow;

use half::{bf16, f16};
use kvdex_index::KeyDtype;
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::bad_request;

/// `(ids uint32 [q_heads, k], scores float32 [q_heads, k])`, new arrays.
pub type SearchResult<'py> = (
    Bound<'py, numpy::PyArray2<u32>>,
    Bound<'py, numpy::PyArray2<f32>>,
);

/// A borrowed float16/float32 numpy array of any rank, as its raw elements.
pub enum FloatArray<'py> {
    /// float16 elements.
    F16(numpy::PyReadonlyArrayDyn<'py, f16>),
    /// float32 elements.
    F32(numpy::PyReadonlyArrayDyn<'py, f32>),
    /// bf16 elements, as their 16 bits.
    Bf16(numpy::PyReadonlyArrayDyn<'py, u16>),
}

impl<'py> FloatArray<'py> {
    /// Borrows `obj` as a float16 or float32 numpy array, or with `bf16` as a uint16 array
    /// of bf16 bits; anything else is a clear error.
    pub fn extract(
        py: Python<'py>,
        what: &str,
        obj: &Bound<'py, PyAny>,
        bf16: bool,
    ) -> PyResult<Self> {
        if bf16 {
            return match obj.cast::<PyArrayDyn<u16>>() {
                Ok(a) => Ok(Self::Bf16(a.readonly())),
                Err(_) => Err(bad_request(
                    py,
                    format!("{what} with dtype=\"bf16\" must be a uint16 array of bf16 bits"),
                )),
            };
        }
        if obj.cast::<PyArrayDyn<u16>>().is_ok() {
            return Err(bad_request(
                py,
                format!("{what} is uint16: pass dtype=\"bf16\" if it holds bf16 bits"),
            ));
        }
        if let Ok(a) = obj.cast::<PyArrayDyn<f16>>() {
            return Ok(Self::F16(a.readonly()));
        }
        if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
            return Ok(Self::F32(a.readonly()));
        }
        let dtype = obj
            .getattr("dtype")
            .map(|d| d.to_string())
            .unwrap_or_else(|_| obj.get_type().to_string());
        Err(bad_request(
            py,
            format!("{what} must be a float16 or float32 numpy array, got {dtype}"),
        ))
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::F16(a) => a.shape(),
            Self::F32(a) => a.shape(),
            Self::Bf16(a) => a.shape(),
        }
    }

    /// The elements as bytes in `dtype`: borrowed when the dtypes match, converted otherwise.
    pub fn bytes_as(&self, py: Python<'_>, what: &str, dtype: KeyDtype) -> PyResult<Cow<'_, [u8]>> {
        let not_contiguous = |_| bad_request(py, format!("{what} must be C-contiguous"));
        Ok(match self {
            Self::F16(a) => {
                let s = a.as_slice().map_err(not_contiguous)?;
                match dtype {
                    KeyDtype::F16 => Cow::Borrowed(bytemuck::cast_slice(s)),
                    KeyDtype::F32 => Cow::Owned(
                        bytemuck::cast_slice(&s.iter().map(|x| x.to_f32()).collect::<Vec<f32>>())
                            .to_vec(),
                    ),
                    KeyDtype::Bf16 => Cow::Owned(
                        bytemuck::cast_slice(
                            &s.iter()
                                .map(|x| bf16::from_f32(x.to_f32()))
                                .collect::<Vec<bf16>>(),
                        )
                        .to_vec(),
                    ),
                }
            }
            Self::F32(a) => {
                let s = a.as_slice().map_err(not_contiguous)?;
                match dtype {
                    KeyDtype::F32 => Cow::Borrowed(bytemuck::cast_slice(s)),
                    KeyDtype::F16 => Cow::Owned(
                        bytemuck::cast_slice(
                            &s.iter().map(|&x| f16::from_f32(x)).collect::<Vec<f16>>(),
                        )
                        .to_vec(),
                    ),
                    KeyDtype::Bf16 => Cow::Owned(
                        bytemuck::cast_slice(
                            &s.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<bf16>>(),
                        )
                        .to_vec(),
                    ),
                }
            }
            Self::Bf16(a) => {
                let s = a.as_slice().map_err(not_contiguous)?;
                let f32s = || s.iter().map(|&x| bf16::from_bits(x).to_f32());
                match dtype {
                    KeyDtype::Bf16 => Cow::Borrowed(bytemuck::cast_slice(s)),
                    KeyDtype::F32 => {
                        Cow::Owned(bytemuck::cast_slice(&f32s().collect::<Vec<f32>>()).to_vec())
                    }
                    KeyDtype::F16 => Cow::Owned(
                        bytemuck::cast_slice(&f32s().map(f16::from_f32).collect::<Vec<f16>>())
                            .to_vec(),
                    ),
                }
            }
        })
    }
}

/// A session shape from a binding's arguments; an unknown dtype is refused by name. One place
/// for what the daemon client, the in-process server and `LocalSession` all accept.
pub fn shape_from_args(
    py: Python<'_>,
    layers: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    dtype: &str,
) -> PyResult<kvdex_wire::Shape> {
    let dtype = kvdex_wire::dtype_serde::parse(dtype).ok_or_else(|| {
        bad_request(
            py,
            format!("unknown dtype {dtype:?}: expected f16, bf16 or f32"),
        )
    })?;
    Ok(kvdex_wire::Shape {
        layers,
        q_heads,
        kv_heads,
        head_dim,
        dtype,
    })
}

/// Checks `shape` equals `want`, naming the argument and the expected layout on mismatch.
pub fn check_shape(
    py: Python<'_>,
    what: &str,
    shape: &[usize],
    want: &[usize],
    layout: &str,
) -> PyResult<()> {
    if shape != want {
        return Err(bad_request(
            py,
            format!("{what} has shape {shape:?}, expected {want:?} ({layout})"),
        ));
    }
    Ok(())
}

/// Decodes `bytes` of `dtype` elements into f32 (for gathered rows returned to Python).
pub fn to_f32(dtype: KeyDtype, bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        KeyDtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])),
        ),
        KeyDtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_ne_bytes([c[0], c[1]]).to_f32()),
        ),
        KeyDtype::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_ne_bytes([c[0], c[1]]).to_f32()),
        ),
    }
}

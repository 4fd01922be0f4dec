//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in kvdex-index.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum IndexError {
    /// A query or key had the wrong number of dimensions.
    #[error("dimension mismatch: expected {expected}, got {got}")]
    DimMismatch {
        /// The store's dimension.
        expected: usize,
        /// What was passed.
        got: usize,
    },
    /// A vector held NaN or infinity.
    #[error("{what} contains a non-finite value (NaN or Inf) at position {pos}")]
    NonFinite {
        /// Which input ("query", "key", ...).
        what: &'static str,
        /// Element index of the first bad value.
        pos: usize,
    },
    /// A buffer length did not match the shape it was declared with.
    #[error("bad shape: {0}")]
    BadShape(String),
    /// An argument outside its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Checks that `v` holds only finite values.
pub fn check_finite(what: &'static str, v: &[f32]) -> Result<(), IndexError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(pos) => Err(IndexError::NonFinite { what, pos }),
        None => Ok(()),
    }
}

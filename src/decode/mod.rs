//! The decode path's wire format: the `seal` and `retrieve` requests over the shared-memory
//! rings (their execution lives in [`crate::store::indexing`] and [`crate::store::retrieve`],
//! their client side in [`crate::client::decode`]).
//!
//! # Layout
//! - [`wire`]: request and response bodies of `seal` and `retrieve`, and the response layout
//!   both sides compute from the same numbers.

pub mod wire;

//! What a retrieve asks for: the per-head budget, the attend/gather switches and the softmax
//! scale. The daemon executes them; the codec in [`crate::decode`] carries them.

use kvdex_index::attend::BudgetParams;

/// A position's visibility limit meaning "every token" (the daemon's `Session::retrieve_at`; on
/// the wire, the `limits` entry of a multi-position retrieve, [`crate::decode`]).
pub const NO_LIMIT: u32 = u32::MAX;

/// How many tokens each query head gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Exactly k (clamped to the retrievable tokens).
    Fixed(usize),
    /// The smallest k covering a fraction of the estimated attention mass, within bounds.
    Adaptive(BudgetParams),
}

/// What a retrieve computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetrieveParams {
    /// Tokens per head.
    pub budget: Budget,
    /// Compute the partial attention `(out, lse)`.
    pub attend: bool,
    /// Copy the chosen K/V rows into the response.
    pub gather: bool,
    /// Softmax scale; `None` is `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
}

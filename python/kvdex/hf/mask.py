"""The ``"kvdex"`` mask of transformers' ``AttentionMaskInterface``.

A custom attention implementation gets no causal mask unless a mask function is registered
under its name. kvdex's prefill runs sdpa, so its mask is sdpa's (a boolean ``[B, 1, q, kv]``
mask, or ``None`` where a plain causal mask lets sdpa use ``is_causal``). Decode steps do not
read it: their static tokens and retrieved tokens are all visible to the step's query.
"""

from __future__ import annotations

from typing import Callable

from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS


def kvdex_mask() -> Callable:
    """The mask function registered as ``"kvdex"``: transformers' own sdpa mask."""
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


__all__ = ["kvdex_mask"]

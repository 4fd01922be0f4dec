"""The exact log-sum-exp (LSE) merge of partial attentions.

A decode step splits a head's context into disjoint parts, e.g. the engine's static tokens
(sinks + recent window) and the tokens kvdex retrieves. Each part ``P`` yields a partial output
``o_P = softmax(s_P) @ V_P`` and ``lse_P = log(sum(exp(s_P)))``. Attention over the union is

    m   = max(lse_a, lse_b)
    out = (exp(lse_a - m) * o_a + exp(lse_b - m) * o_b) / (exp(lse_a - m) + exp(lse_b - m))
    lse = m + log(exp(lse_a - m) + exp(lse_b - m))

which is exact: no approximation beyond floating point. An empty part has ``lse = -inf``.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from . import _native
from .errors import BadRequestError


def merge(
    out_a: np.ndarray, lse_a: np.ndarray, out_b: np.ndarray, lse_b: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Merges two partial attentions over disjoint token sets, exactly.

    Args:
        out_a, out_b: float32 ``[heads, head_dim]`` partial outputs.
        lse_a, lse_b: float32 ``[heads]`` log-sum-exp of each part's logits (``-inf`` if empty).

    Returns:
        ``(out, lse)``: new float32 arrays ``[heads, head_dim]`` and ``[heads]``.

    Raises:
        kvdex.BadRequestError: when the shapes do not agree.
    """
    def c(a: np.ndarray, name: str, ndim: int) -> np.ndarray:
        x = np.ascontiguousarray(a, dtype=np.float32)
        if x.ndim != ndim:
            want = "[heads, head_dim]" if ndim == 2 else "[heads]"
            raise BadRequestError(f"merge: {name} has shape {list(x.shape)}, expected {want}")
        return x

    return _native.merge_partials(c(out_a, "out_a", 2), c(lse_a, "lse_a", 1),
                                  c(out_b, "out_b", 2), c(lse_b, "lse_b", 1))


def partial_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Attention of each query head over one part's keys, with its LSE (numpy reference).

    Args:
        q: ``[heads, head_dim]`` queries.
        k, v: ``[heads, n, head_dim]`` the part's keys and values per query head (``n`` may be 0).
        scale: the logit scale, usually ``1/sqrt(head_dim)``.

    Returns:
        ``(out [heads, head_dim], lse [heads])`` as float32; an empty part gives zeros and ``-inf``.
    """
    h, d = q.shape
    if k.shape[1] == 0:
        return np.zeros((h, d), np.float32), np.full(h, -np.inf, np.float32)
    s = np.einsum("hd,hnd->hn", q.astype(np.float32), k.astype(np.float32)) * np.float32(scale)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    z = p.sum(-1, keepdims=True)
    out = np.einsum("hn,hnd->hd", p / z, v.astype(np.float32))
    return out.astype(np.float32), (m[:, 0] + np.log(z[:, 0])).astype(np.float32)


__all__ = ["merge", "partial_attention"]

"""Torch counterparts of :mod:`kvdex.merge`: the partial attention of a token set with its
log-sum-exp (LSE), and the exact LSE merge of two partials over disjoint token sets.

Both work in float32 whatever the model dtype, so that the merged output of a decode step
equals attention over the union up to float32 rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def local_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor],
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence over a KV-head-shared token set (GQA/MQA aware).

    Args:
        q: ``[B, H, d]`` queries; ``H`` is a multiple of the KV heads.
        k, v: ``[B, KV, n, d]`` the tokens' keys and values.
        valid: ``[B, n]`` bool, the columns that hold a token (``None``: all of them).
        scale: the softmax scale.

    Returns:
        ``(out float32 [B, H, d], lse float32 [B, H])``; a row with no valid column gets zeros
        and ``-inf``.
    """
    b, h, d = q.shape
    kv = k.shape[1]
    qg = q.float().reshape(b, kv, h // kv, d)
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, KV, g, n]
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, KV, g]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = torch.matmul(p, v.float())  # [B, KV, g, d]
    return out.reshape(b, h, d), lse.reshape(b, h)


def rows_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: torch.Tensor,
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query head over its own rows (kvdex's gather layout).

    Args:
        q: ``[H, d]``; k, v: ``[H, n, d]`` candidate rows per query head, best first;
        count: ``[H]`` integer, how many leading rows each head uses.

    Returns:
        ``(out float32 [H, d], lse float32 [H])``.
    """
    n = k.shape[1]
    s = torch.matmul(k.float(), q.float()[:, :, None])[..., 0] * scale  # [H, n]
    keep = torch.arange(n, device=q.device)[None, :] < count.to(q.device)[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[:, None])
    out = torch.matmul(p[:, None, :], v.float())[:, 0, :]
    return out, lse


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> torch.Tensor:
    """The exact LSE merge (see :mod:`kvdex.merge`): ``out [..., d]`` over the union of two
    disjoint token sets from their partials ``out_* [..., d]`` and ``lse_* [...]``."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m)
    wb = torch.exp(lse_b - m)
    return (wa[..., None] * out_a + wb[..., None] * out_b) / (wa + wb)[..., None]


__all__ = ["local_partial", "rows_partial", "merge_partials"]

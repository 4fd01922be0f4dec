"""The harness's own attention function: stock attention, or sinks + window, or an exact top-k.

Registered with transformers as ``kvdex-eval`` (attention and mask), it runs transformers' SDPA
attention unchanged unless a :class:`Selection` is active (the ``streaming`` and ``oracle``
methods). During a decode step (one query token) on a full-attention layer (sliding-window layers
of hybrid models stay stock), a selection keeps, per query head:

- ``streaming`` (StreamingLLM): the first ``sinks`` tokens and the most recent ones, as many as
  make ``fraction`` of the context;
- ``oracle``: the same static tokens as kvdex (``sinks`` first, ``window`` last) plus the
  highest-scoring ``q.k`` of the rest, as many as make ``fraction`` of the context, computed
  exactly in torch.

The kept keys then go through ``scaled_dot_product_attention`` with a boolean mask, so with
``fraction`` 1 every key is kept and the result is full attention.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "kvdex-eval"
SELECTIONS = ("streaming", "oracle")


@dataclass
class Selection:
    """Which keys a decode step attends to, and the attended fraction it measured."""

    kind: str
    fraction: float
    sinks: int
    window: int
    kept: float = 0.0  # sum over (layer, step) of the attended share of the context
    calls: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SELECTIONS:
            raise ValueError(f"unknown selection {self.kind!r}; known: {', '.join(SELECTIONS)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"attended fraction {self.fraction} must be in (0, 1]")
        if self.sinks < 0 or self.window < 0:
            raise ValueError(f"sinks {self.sinks} and window {self.window} must be >= 0")

    @property
    def attended_fraction(self) -> float:
        """Mean attended share of the context over every layer and step so far."""
        return self.kept / self.calls if self.calls else 0.0

    def keep(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """Boolean mask (batch, q_heads, 1, T) of the keys attended; ``key`` is repeated to q heads."""
        b, h, _, t = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
        n = min(t, max(1, round(self.fraction * t)))
        pos = torch.arange(t, device=key.device)
        if self.kind == "streaming":
            sinks = min(self.sinks, n)
            mask = (pos < sinks) | (pos >= t - (n - sinks))
            keep = mask.view(1, 1, 1, t).expand(b, h, 1, t).clone()
        else:
            static = (pos < self.sinks) | (pos >= t - self.window)
            keep = static.view(1, 1, 1, t).expand(b, h, 1, t).clone()
            extra = n - int(static.sum())
            if extra > 0:
                scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
                scores = scores.masked_fill(keep, float("-inf"))
                top = scores.topk(extra, dim=-1).indices
                keep.scatter_(-1, top, True)
        self.kept += float(keep.sum()) / (b * h * t)
        self.calls += 1
        return keep


_active: Optional[Selection] = None


@contextlib.contextmanager
def selecting(selection: Optional[Selection]) -> Iterator[Optional[Selection]]:
    """Make ``selection`` the active one for the decode steps run inside."""
    global _active
    before, _active = _active, selection
    try:
        yield selection
    finally:
        _active = before


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
              **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers attention: SDPA, with the active selection applied to full-attention decode steps."""
    sel = _active
    if sel is None or query.shape[2] != 1 or kwargs.get("sliding_window") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    keep = sel.keep(query, key, scale)
    if attention_mask is not None:
        keep = keep & _as_bool(attention_mask[:, :, :, : key.shape[2]])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``kvdex-eval`` with transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION

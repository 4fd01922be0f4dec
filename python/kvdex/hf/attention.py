"""The ``"kvdex"`` attention function of transformers' ``AttentionInterface``.

transformers calls an attention function with the module, the query and the K/V that the
cache's ``update`` returned, but not the cache. ``KvdexLayer.update`` therefore leaves itself
in a thread-local, and this function takes it from there:

- no kvdex layer pending (a stock cache, a sliding-window layer of a hybrid model): plain
  sdpa attention, exactly what ``attn_implementation="sdpa"`` computes;
- a prefill: exact sdpa attention over the whole context, then the layer commits its rows to
  kvdex;
- a decode step: the layer's :meth:`~kvdex.hf.layer.KvdexLayer.decode`.

:func:`capture_queries` records the queries of a stock prefill (for
:meth:`KvdexCache.from_prefill`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import BadRequestError

_local = threading.local()


def set_current(layer: object) -> None:
    """Called by ``KvdexLayer.update``: the layer whose attention comes next on this thread."""
    _local.layer = layer


def _take_current(layer_idx: Optional[int]) -> Optional[object]:
    layer = getattr(_local, "layer", None)
    _local.layer = None
    if layer is not None and layer_idx is not None and getattr(layer, "layer_idx", None) != layer_idx:
        raise BadRequestError(f"kvdex attention: module of layer {layer_idx} runs after the cache "
                              f"update of layer {layer.layer_idx}")
    return layer


def kvdex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                    dropout: float = 0.0, **kwargs) -> Tuple[torch.Tensor, None]:
    """Attention for ``attn_implementation="kvdex"`` (see the module docs). Returns
    ``(out [B, q_len, H, d], None)`` like transformers' sdpa function."""
    layer_idx = getattr(module, "layer_idx", None)
    layer = _take_current(layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    _capture(layer_idx, query, key.shape[-2])
    if layer is None or layer.pending is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        layer.pending = None
        raise BadRequestError("kvdex attention does not support attention logit softcapping (Gemma-2); "
                              "kvdex's partial attention has no softcap")
    if layer.pending == "decode":
        return layer.decode(query, scale), None
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                          scaling=scaling, **kwargs)
    if layer.pending == "prefill":
        layer.commit_prefill(query, attention_mask)
    else:
        layer.commit_extend(attention_mask, query.shape[2])
    return out, weights


class CapturedQueries(dict):
    """``{layer_idx: (queries float32 [B, H, n, d], positions int64 [n])}``, filled by
    :func:`capture_queries`."""


@contextlib.contextmanager
def capture_queries(model: torch.nn.Module, layers: Optional[list] = None,
                    stride: int = 4) -> Iterator[CapturedQueries]:
    """Records the post-RoPE queries of the full-attention layers during a stock prefill.

    The model must be loaded with ``attn_implementation="kvdex"``: with a stock cache (e.g.
    ``DynamicCache``) that attention is exactly sdpa, and it sees the queries::

        with kvdex.hf.capture_queries(model) as queries:
            model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        cache = kvdex.hf.KvdexCache.from_prefill(model, prefill_cache, queries, ...)

    Args:
        layers: layer indices to record (default: the model's full-attention layers).
        stride: keep the query rows at positions divisible by ``stride`` (and each chunk's
            last row); kvdex seals with about ``max(1024, n/128)`` of them.

    Yields:
        a :class:`CapturedQueries` dict, complete when the ``with`` block ends. Positions count
        from the first token of the prefill (padding included).
    """
    from .cache import full_attention_layers  # noqa: PLC0415

    if getattr(model.config, "_attn_implementation", None) != "kvdex":
        raise BadRequestError("capture_queries needs the model loaded with attn_implementation='kvdex'")
    if stride < 1:
        raise BadRequestError(f"capture_queries: stride = {stride} must be >= 1")
    wanted = set(full_attention_layers(model.config) if layers is None else layers)
    parts: Dict[int, list] = {i: [] for i in wanted}
    _local.capture = (parts, stride)
    out = CapturedQueries()
    try:
        yield out
    finally:
        _local.capture = None
    for i, chunks in parts.items():
        if chunks:
            out[i] = (torch.cat([q for q, _ in chunks], dim=2), torch.cat([p for _, p in chunks]))


def _capture(layer_idx: Optional[int], query: torch.Tensor, kv_len: int) -> None:
    cap = getattr(_local, "capture", None)
    if cap is None or layer_idx is None or layer_idx not in cap[0]:
        return
    parts, stride = cap
    q_len = query.shape[2]
    pos = torch.arange(kv_len - q_len, kv_len)
    keep = (pos % stride == 0) | (pos == kv_len - 1)
    parts[layer_idx].append((query[:, :, keep.to(query.device)].detach().float().cpu(), pos[keep]))


__all__ = ["kvdex_attention", "capture_queries", "CapturedQueries", "set_current"]

"""``KvdexCache``: a transformers ``Cache`` whose full-attention layers live in kvdex."""

from __future__ import annotations

import copy
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ..client import Client, connect
from ..daemon import Daemon
from ..errors import BadRequestError
from .layer import KvdexLayer
from .sequences import APPEND_BLOCK, Budget, Sequences


def layer_types(config: Any) -> List[str]:
    """``"full_attention"`` / ``"sliding_attention"`` per decoder layer of ``config``."""
    cfg = config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        sliding = getattr(cfg, "sliding_window", None)
        types = ["sliding_attention" if sliding is not None else "full_attention"] * cfg.num_hidden_layers
    return list(types)


def full_attention_layers(config: Any) -> List[int]:
    """Indices of the layers kvdex keeps (the full-attention ones)."""
    return [i for i, t in enumerate(layer_types(config)) if t == "full_attention"]


class KvdexCache(Cache):
    """A transformers cache that offloads the full-attention layers' K/V to a kvdex daemon::

        import kvdex.hf
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="kvdex")
        out = model.generate(ids, past_key_values=kvdex.hf.KvdexCache(model), max_new_tokens=64)

    The prefill is exact; decode attends to the ``sinks`` first and ``window`` most recent
    tokens on the model's device and to what kvdex retrieves from the rest, merged exactly by
    log-sum-exp. Sliding-window layers (Gemma-3) stay on transformers' own sliding layer.

    Args:
        model: the model (a ``PreTrainedModel`` loaded with ``attn_implementation="kvdex"``).
        client: a :class:`kvdex.Client` or a daemon URL; ``None`` starts a ``kvdex.Daemon``
            that stops when the cache is closed or collected.
        index: the index kind each layer is sealed with: ``"graph"``, ``"hnsw"``, ``"flat"``.
        k: a fixed budget per query head (overrides ``coverage``); e.g. a huge ``k`` attends
            to every token (exact attention).
        coverage, min_k, max_k: the adaptive budget (README, "Tuning the decode request").
        sinks, window: the static tokens kept on the model's device (``window >= 1``).
        dtype: the sessions' storage dtype, ``"f16"``, ``"bf16"`` or ``"f32"``; default bf16
            for a bf16 model, else f16.
        train_queries: prefill queries per layer sealed as the index's training signal
            (default ``max(1024, n/128)``).
        wait_index: wait at the end of the first prefill until the indices are built (the time
            is ``stats()["index_ready_s"]``); otherwise decode scans exactly until then.
        gather: on a CUDA model, gather mode (rows into a registered CUDA tensor, attention on
            the GPU): ``None`` uses it when the daemon runs the cuda transfer backend, ``True``
            requires it, ``False`` uses attend mode everywhere.
        append_block: decode tokens kept on the model's device (beside the window) before
            they are appended to the sessions together, so that most decode steps make one
            daemon round trip per layer (the retrieve) instead of two. The static set holds
            up to ``sinks + window + append_block`` tokens.
    """

    def __init__(self, model: Any, client: Union[Client, str, None] = None, *, index: str = "graph",
                 k: Optional[int] = None, coverage: Optional[float] = 0.98, max_k: Optional[int] = 1024,
                 min_k: int = 16, sinks: int = 128, window: int = 512, dtype: Optional[str] = None,
                 train_queries: Optional[int] = None, wait_index: bool = True,
                 gather: Optional[bool] = None, append_block: int = APPEND_BLOCK) -> None:
        config = getattr(model, "config", model)
        if getattr(config, "_attn_implementation", None) != "kvdex":
            raise BadRequestError("KvdexCache needs the model loaded with attn_implementation='kvdex' "
                                  "(after `import kvdex.hf`)")
        self.daemon: Optional[Daemon] = None
        if client is None:
            self.daemon = Daemon().start()
            client = connect(self.daemon.url)
        elif isinstance(client, str):
            client = connect(client)
        types = layer_types(config)
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        if not full:
            raise BadRequestError("KvdexCache: the model has no full-attention layer (all sliding-window?)")
        self.seq = Sequences(client, len(full), sinks, window, index,
                             Budget(k=k, coverage=coverage, min_k=min_k, max_k=max_k), dtype,
                             train_queries, wait_index, gather, append_block)
        cfg = config.get_text_config(decoder=True)
        layers: list = []
        for i, t in enumerate(types):
            if t == "full_attention":
                layers.append(KvdexLayer(i, full.index(i), self.seq, last=(i == full[-1])))
            elif t == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window))
            else:
                raise BadRequestError(f"KvdexCache: layer {i} is {t!r}; only full and sliding attention are supported")
        super().__init__(layers=layers)
        self._finalizer = weakref.finalize(self, _shutdown, self.seq, self.daemon)

    @property
    def client(self) -> Client:
        return self.seq.client

    def wait_index(self, timeout: float = 3600.0) -> float:
        """Waits until every session's index is built; returns the seconds since the last seal."""
        return self.seq.wait_ready(timeout)

    def stats(self) -> Dict[str, Any]:
        """``decode_steps``; per step ``attended_tokens`` and ``past_tokens`` (summed over the
        full-attention layers and sequences; static tokens included); ``attended_fraction``
        (their mean ratio); ``index_ready_s`` (last seal -> indices built); ``retrieves`` (one
        per sequence and layer-step) and ``appends`` (one per sequence, layer and block of
        decode tokens); ``retrieve_ms`` (client-side, submit to result, mean), ``daemon_ms``
        (daemon's search + attend + copy)."""
        return self.seq.stats()

    def close(self) -> None:
        """Drops the sessions, and stops the daemon the cache started. Idempotent."""
        self._finalizer()

    def __enter__(self) -> "KvdexCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_prefill(cls, model: Any, prefill_cache: Cache,
                     prefill_queries: Mapping[int, Union[torch.Tensor, Tuple[torch.Tensor, Any]]],
                     client: Union[Client, str, None] = None, *, attention_mask: Optional[torch.Tensor] = None,
                     **budget: Any) -> "KvdexCache":
        """A kvdex cache holding the state of a stock prefill, to decode from it.

        The eval harness prefills once (``DynamicCache``) and decodes several methods from the
        same state; ``prefill_cache`` is not changed.

        Args:
            prefill_cache: the stock cache after the prefill (``DynamicCache(config=...)``).
            prefill_queries: per full-attention layer, the prefill's post-RoPE queries: a tensor
                ``[B, H, n, d]`` of the last ``n`` positions, or ``(queries, positions)`` with
                ``positions [n]`` (as :func:`kvdex.hf.capture_queries` records them).
            attention_mask: the prefill's 2-D mask ``[B, T]`` when it had left padding.
            **budget: the keyword arguments of :class:`KvdexCache` (``index``, ``k``,
                ``coverage``, ``sinks``, ``window``, ...).
        """
        cache = cls(model, client, **budget)
        for i, stock in enumerate(prefill_cache.layers):
            mine = cache.layers[i]
            if not isinstance(mine, KvdexLayer):
                cache.layers[i] = copy.deepcopy(stock)
                continue
            got = prefill_queries.get(i)
            if got is None:
                raise BadRequestError(f"from_prefill: no prefill queries for full-attention layer {i}")
            queries, positions = got if isinstance(got, tuple) else (got, None)
            mine.load_prefill(stock.keys, stock.values, queries, positions, attention_mask)
        return cache


def _shutdown(seq: Sequences, daemon: Optional[Daemon]) -> None:
    seq.close()
    if daemon is not None:
        daemon.stop()


__all__ = ["KvdexCache", "layer_types", "full_attention_layers"]

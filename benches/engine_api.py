"""Measures the engine API through a kvdex daemon: one multi-position retrieve of P query
positions against P single-position retrieves, and the overlap an asynchronous retrieve gives
(submit, other work, wait) against the same retrieve and work in sequence.

    python benches/engine_api.py --bin target/release/kvdex --tokens 32768 --out benches/results/engine-api.json

Synthetic data: 8 query heads over 2 KV heads, head_dim 128, f16 rows, one layer, the
daemon's default static tokens (128 sinks, 512-token window); the layer is not sealed, so
every retrieve is the daemon's exact GQA-batched scan (no index build needed). Medians over
``--reps`` repetitions, after warm-up; the variants compared run in turn within each
repetition. The "other work" is a single-threaded numpy matmul chain standing for the engine's
compute (run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import numpy as np

import kvdex

HQ, KV, D = 8, 2, 128


def median_ms(*fs: Callable[[], object], reps: int) -> List[float]:
    """Median milliseconds of each of ``fs``, run in turn within every repetition, so that a
    change in the machine's load (it is shared) falls on all of them alike."""
    for f in fs:
        f()
    t: List[List[float]] = [[] for _ in fs]
    for _ in range(reps):
        for f, ts in zip(fs, t):
            t0 = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", help="the kvdex binary (a release build)")
    ap.add_argument("--inproc", action="store_true",
                    help="no daemon: a region and worker thread inside this process (the extension's release build)")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--positions", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--work", type=int, default=384, help="side of the numpy matmul standing for the engine's compute")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    res: Dict[str, object] = {"command": "python " + " ".join(sys.argv), "tokens": a.tokens,
                              "q_heads": HQ, "kv_heads": KV, "head_dim": D, "dtype": "f16",
                              "positions": a.positions, "k": a.k, "reps": a.reps,
                              "machine": platform.node(), "index": "none (exact scan)"}
    if a.inproc:
        res["transport"] = "in-process worker (kvdex._native.InProcessServer), shared memory"
        server = kvdex._native.InProcessServer(1, HQ, KV, D, "f16", 64 << 20)
        run(a, rng, res, kvdex.attach(server.shm_path, server.token))
    else:
        res["transport"] = "daemon, shared memory"
        with kvdex.Daemon(binary=a.bin) as d:
            c = kvdex.connect(d.url)
            run(a, rng, res, c.create_session(layers=1, q_heads=HQ, kv_heads=KV, head_dim=D, dtype="f16",
                                              payload_bytes=64 << 20))
    print(json.dumps(res, indent=2))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")


def run(a: argparse.Namespace, rng: np.random.Generator, res: Dict[str, object], session: kvdex.Session) -> None:
    """Fills ``session`` and measures it into ``res``."""
    with session as s:
        chunk = 4096
        for at in range(0, a.tokens, chunk):
            k = rng.standard_normal((KV, chunk, D)).astype(np.float16)
            v = rng.standard_normal((KV, chunk, D)).astype(np.float16)
            s.append(0, k, v)
        q = rng.standard_normal((a.positions, HQ, D)).astype(np.float32)
        limits = [a.tokens - a.positions + p + 1 for p in range(a.positions)]

        def multi() -> object:
            return s.retrieve(0, q, k=a.k, limits=limits)

        def singles() -> object:
            return [s.retrieve(0, q[p:p + 1], k=a.k, limits=[limits[p]]) for p in range(a.positions)]

        m, one = median_ms(multi, singles, reps=a.reps)
        res["multi_ms"], res["singles_ms"] = m, one
        res["multi_over_singles"] = m / one
        x = rng.standard_normal((a.work, a.work)).astype(np.float32)

        def work() -> object:
            return x @ x @ x

        q1 = q[0]

        def sequential() -> object:
            r = s.retrieve(0, q1, k=a.k)
            return r, work()

        def overlapped() -> object:
            h = s.retrieve_async(0, q1, k=a.k)
            w = work()
            return h.wait(), w

        (res["retrieve_ms"], res["work_ms"], res["sequential_ms"],
         res["overlapped_ms"]) = median_ms(lambda: s.retrieve(0, q1, k=a.k), work, sequential, overlapped,
                                           reps=a.reps)
        res["overlapped_over_sequential"] = res["overlapped_ms"] / res["sequential_ms"]


if __name__ == "__main__":
    main()

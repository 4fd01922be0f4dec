"""``python -m kvdex.bench rtt``: the per-call overhead of the Python binding, next to Rust's.

Each measurement runs the same request twice in the same process: once in a Rust loop inside
the extension (no Python between calls: the Rust client's own cost), once from a Python loop
through the binding (argument checks, numpy conversions, GIL release, result arrays). The
difference of the medians is what Python adds per call.

Targets:
- ``daemon`` (default): a real daemon (``--url``, or a local one started with
  :class:`kvdex.Daemon`); ``ping`` with an empty payload is the pure round trip through shared
  memory, ``search`` a small top-k. The Rust figure is the Rust client's own loop (the same
  client the binding wraps, called from Rust), so both columns come from one run and one region.
- ``local``: an in-process :class:`kvdex.LocalSession` (the daemon's storage, no shared
  memory), isolating the binding from the transport.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import _native
from .errors import KvdexError


def _percentiles(us: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(us, dtype=np.float64)
    return {"p50_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99)), "mean_us": float(a.mean())}


def _inproc(name: str):
    """An in-process test class of the extension, which only builds with its ``inproc`` feature."""
    cls = getattr(_native, name, None)
    if cls is None:
        raise KvdexError(f"the {name} target needs the extension built with its inproc feature: "
                         "MATURIN_PEP517_ARGS='--features inproc' pip install ./python")
    return cls


def rtt_local(iters: int, tokens: int, k: int, shape=(1, 9, 3, 64)) -> List[Dict[str, object]]:
    """Search over ``tokens`` keys of an in-process session, from Rust and from Python."""
    layers, q_heads, kv_heads, head_dim = shape
    s = _inproc("LocalSession")(layers, q_heads, kv_heads, head_dim, "f16")
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((kv_heads, tokens, head_dim)).astype(np.float16)
    s.append(0, kv, kv)
    q = rng.standard_normal((q_heads, head_dim)).astype(np.float32)
    for _ in range(min(iters, 200)):  # warm caches and allocators
        s.search(0, q, k)
    rust: List[float] = []
    py: List[float] = []
    batch = 100
    for _ in range(max(1, iters // batch)):  # interleaved, as in _rtt_session
        rust += s.bench_search(0, q, k, batch)
        for _ in range(batch):
            t0 = time.perf_counter_ns()
            s.search(0, q, k)
            py.append((time.perf_counter_ns() - t0) / 1e3)
    return _pair({"bench": "rtt", "target": "local", "op": "search", "tokens": tokens, "k": k, "iters": iters},
                 rust, py)


def _pair(common: Dict[str, object], rust: Sequence[float], py: Sequence[float]) -> List[Dict[str, object]]:
    r, p = _percentiles(rust), _percentiles(py)
    return [{**common, "client": "rust", **r},
            {**common, "client": "python", **p, "overhead_p50_us": p["p50_us"] - r["p50_us"]}]


def rtt_daemon(url: Optional[str], iters: int, tokens: int, k: int) -> List[Dict[str, object]]:
    """Ping and a small search through a daemon's shared memory, from Rust and from Python."""
    from .client import connect
    from .daemon import Daemon

    daemon = Daemon().start() if url is None else None
    try:
        client = connect(url or daemon.url)
        with client.create_session(layers=1, q_heads=9, kv_heads=3, head_dim=64, dtype="f16") as s:
            return _rtt_session(s, "daemon", iters, tokens, k)
    finally:
        if daemon is not None:
            daemon.stop()


def rtt_inproc(iters: int, tokens: int, k: int) -> List[Dict[str, object]]:
    """The same through a region served by a worker thread in this process (no daemon)."""
    from .client import attach

    server = _inproc("InProcessServer")(1, 9, 3, 64, "f16")
    try:
        with attach(server.shm_path, server.token) as s:
            return _rtt_session(s, "inproc", iters, tokens, k)
    finally:
        server.stop()


def _rtt_session(s: Any, target: str, iters: int, tokens: int, k: int) -> List[Dict[str, object]]:
    """Ping (Rust loop vs Python loop) and a small search/search_into from Python on session ``s``."""
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((3, tokens, 64)).astype(np.float16)
    s.append(0, kv, kv)
    q = rng.standard_normal((9, 64)).astype(np.float32)
    rows: List[Dict[str, object]] = []
    common = {"bench": "rtt", "target": target, "iters": iters}
    for _ in range(min(iters, 500)):
        s.ping(b"")
    # Interleave Rust and Python batches so both see the same machine state (load, the
    # worker's spin/park phase); on a busy box, back-to-back runs are not comparable.
    rust: List[float] = []
    py: List[float] = []
    batch = 100
    for _ in range(max(1, iters // batch)):
        rust += s._s.bench_ping(0, batch)
        for _ in range(batch):
            t0 = time.perf_counter_ns()
            s.ping(b"")
            py.append((time.perf_counter_ns() - t0) / 1e3)
    rows += _pair({**common, "op": "ping"}, rust, py)
    ids = np.zeros((9, k), np.uint32)
    scores = np.zeros((9, k), np.float32)
    for op, call in (("search", lambda: s.search(0, q, k)),
                     ("search_into", lambda: s.search_into(0, q, k, ids, scores))):
        py = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            call()
            py.append((time.perf_counter_ns() - t0) / 1e3)
        rows.append({**common, "op": op, "tokens": tokens, "k": k, "client": "python", **_percentiles(py)})
    return rows


def rtt_harness(n: int) -> List[Dict[str, object]]:
    """The Rust harness's own figures (``kvdex bench rtt --json``: daemon-side host, shm vs Unix
    socket), tagged, so that they print next to the binding's in one run."""
    import subprocess

    from .daemon import find_binary

    out = subprocess.run([find_binary(), "bench", "rtt", "--json", "--n", str(n), "--cold-n", str(max(1, n // 20))],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise KvdexError(f"kvdex bench rtt failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return [{"bench": "rtt", "target": "kvdex bench rtt", **json.loads(line)}
            for line in out.stdout.splitlines() if line.startswith("{")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvdex.bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rtt = sub.add_parser("rtt", help="per-call overhead from Python next to the Rust client's")
    rtt.add_argument("--iters", type=int, default=20000)
    rtt.add_argument("--tokens", type=int, default=64, help="keys in the session (small: the call, not the scan)")
    rtt.add_argument("--k", type=int, default=8)
    rtt.add_argument("--json", action="store_true", help="one JSON object per line")
    rtt.add_argument("--target", choices=["daemon", "inproc", "local", "all"], default="all",
                     help="all: daemon (or inproc if this daemon has no data plane), then local")
    rtt.add_argument("--url", default=None, help="a running daemon (default: start one with kvdex.Daemon)")
    rtt.add_argument("--harness", action="store_true",
                     help="also run the Rust harness `kvdex bench rtt --json` (binary from kvdex.find_binary)")
    a = ap.parse_args(argv)
    rows: List[Dict[str, object]] = []
    if a.target in ("daemon", "all"):
        try:
            rows += rtt_daemon(a.url, a.iters, a.tokens, a.k)
        except KvdexError as e:
            if a.target == "daemon":
                raise
            print(f"daemon target unavailable ({e}); measuring the in-process server", file=sys.stderr)
            rows += rtt_inproc(a.iters, a.tokens, a.k)
    if a.target == "inproc":
        rows += rtt_inproc(a.iters, a.tokens, a.k)
    if a.target in ("local", "all"):
        rows += rtt_local(a.iters, a.tokens, a.k)
    harness = rtt_harness(a.iters) if a.harness else []
    if a.json:
        for r in rows + harness:
            print(json.dumps(r))
    else:
        print(f"{'target':8s} {'op':11s} {'client':8s} {'p50 us':>9s} {'p99 us':>9s} {'overhead p50 us':>16s}")
        for r in rows:
            ov = r.get("overhead_p50_us")
            print(f"{r['target']:8s} {r['op']:11s} {r['client']:8s} {r['p50_us']:9.2f} {r['p99_us']:9.2f} "
                  f"{'' if ov is None else f'{ov:16.2f}'}")
        for r in harness:
            print("kvdex bench rtt:", json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

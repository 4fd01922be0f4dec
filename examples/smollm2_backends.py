"""Retrieval backends for the decode path of examples/smollm2_decode.py.

At position ``t`` of layer ``l`` the engine attends itself over the static tokens: the sinks
``[0, S)`` and the recent window ``(t - W, t]``. The rest, ``[S, t - W + 1)``, is the retrieval
region. A backend returns the partial attention over the tokens it selects from that region,
``(out [H, hd], lse [H], attended [H])``, and the caller merges it exactly (LSE) with the
engine's part.

Budgets: ``Budget(k=…)`` selects a fixed ``k`` tokens per query head; ``Budget(p=…)`` is
adaptive: the fewest tokens such that the omitted attention mass is at most ``1 - p`` of the
head's total (static part included), capped at ``k_max``.

Backends:
- ``exact-topk``: the numpy oracle, exact scores over the whole region (the ceiling an index
  can reach at a given budget).
- ``recency``: no retrieval; the ``k`` tokens just before the window (a larger window of the
  same size).
- ``kvdex-graph``, ``kvdex-hnsw``, ``kvdex-flat``: through the daemon (``kvdex.Session``):
  every layer's prefill K/V is appended, the layer is sealed with a sample of the prefill
  queries as the index's training signal (a background build of that index kind per KV head),
  and each decode step appends the step's K/V and asks ``Session.retrieve`` for the partial
  attention over the tokens it retrieves. The daemon's static tokens are its ``[decode]``
  configuration's (``sinks``, ``window``; 128 + 512 by default), so the engine must use the same
  (the example starts its own daemon with the engine's values).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

Partial = Tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Budget:
    """A fixed top-``k`` (``p`` is None) or an adaptive mass target ``p`` capped at ``k``."""

    k: int
    p: Optional[float] = None

    @staticmethod
    def parse(text: str) -> "Budget":
        """``"100"`` or ``"k100"`` -> fixed 100; ``"p0.9"`` or ``"p0.9:k400"`` -> adaptive."""
        t = text.strip()
        if t.startswith("p"):
            p_part, _, k_part = t[1:].partition(":")
            p = float(p_part)
            if not 0.0 < p <= 1.0:
                raise ValueError(f"budget {text!r}: p must be in (0, 1]")
            return Budget(k=int(k_part.lstrip("k")) if k_part else 1 << 30, p=p)
        k = int(t.lstrip("k"))
        if k < 0:
            raise ValueError(f"budget {text!r}: k must be >= 0")
        return Budget(k=k)

    def __str__(self) -> str:
        if self.p is None:
            return f"k{self.k}"
        return f"p{self.p}" + (f":k{self.k}" if self.k < (1 << 30) else "")


def empty_partial(h: int, d: int) -> Partial:
    """The partial of an empty token set."""
    return np.zeros((h, d), np.float32), np.full(h, -np.inf, np.float32), np.zeros(h, np.int64)


def attend_masked(scores: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Softmax-attend scaled ``scores [H, n]`` over ``v [H, n, hd]`` where ``mask`` (all if None)."""
    s = scores if mask is None else np.where(mask, scores, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    z = p.sum(-1)
    out = np.einsum("hn,hnd->hd", p, v) / np.maximum(z, 1e-30)[:, None]
    with np.errstate(divide="ignore"):
        lse = np.where(z > 0, m[:, 0] + np.log(z), -np.inf)
    return out.astype(np.float32), lse.astype(np.float32)


class ExactTopK:
    """The numpy oracle: exact top-k (or adaptive top-p) over the retrieval region."""

    name = "exact-topk"

    def __init__(self, group: int, scale: float) -> None:
        self.group, self.scale = group, np.float32(scale)

    def retrieve(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, lo: int, hi: int,
                 budget: Budget, static_lse: np.ndarray, n: int = 0) -> Partial:
        """Partial attention over the selected tokens of ``k[:, lo:hi]`` (``[KV, n, hd]`` caches)."""
        H, d = q.shape
        n = hi - lo
        if n <= 0 or budget.k == 0:
            return empty_partial(H, d)
        kr = np.repeat(k[:, lo:hi], self.group, axis=0)  # [H, n, hd], query head h -> KV h/g
        vr = np.repeat(v[:, lo:hi], self.group, axis=0)
        s = np.einsum("hd,hnd->hn", q, kr) * self.scale
        if budget.p is None and budget.k >= n:
            out, lse = attend_masked(s, vr, None)
            return out, lse, np.full(H, n, np.int64)
        if budget.p is None:
            kk = budget.k
            top = np.argpartition(-s, kk - 1, axis=-1)[:, :kk]
            mask = np.zeros_like(s, dtype=bool)
            np.put_along_axis(mask, top, True, axis=-1)
            out, lse = attend_masked(s, vr, mask)
            return out, lse, np.full(H, kk, np.int64)
        # Adaptive: the fewest tokens whose omission leaves <= (1-p) of the total mass out.
        order = np.argsort(-s, axis=-1)
        ss = np.take_along_axis(s, order, -1)
        m = np.maximum(ss[:, :1], static_lse[:, None])
        w = np.exp(ss - m)
        total = np.exp(static_lse - m[:, 0]) + w.sum(-1)
        omitted = total[:, None] - np.exp(static_lse - m[:, 0])[:, None] - np.cumsum(w, -1)
        # count = 1 + first index where omitted mass after taking it is small enough.
        ok = omitted <= (1.0 - budget.p) * total[:, None]
        count = np.where(ok.any(-1), ok.argmax(-1) + 1, n)
        rest = total - np.exp(static_lse - m[:, 0])
        count = np.where(rest <= (1.0 - budget.p) * total, 0, count)  # static part suffices
        count = np.minimum(count, min(budget.k, n))
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(n)[None].repeat(H, 0), axis=-1)
        mask = ranks < count[:, None]
        out, lse = attend_masked(s, vr, mask)
        return out, lse, count.astype(np.int64)


class Recency:
    """No retrieval: the ``k`` tokens right before the window (a larger window, same size)."""

    name = "recency"

    def __init__(self, group: int, scale: float) -> None:
        self.group, self.scale = group, np.float32(scale)

    def retrieve(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, lo: int, hi: int,
                 budget: Budget, static_lse: np.ndarray, n: int = 0) -> Partial:
        """Partial attention over ``[max(lo, hi - k), hi)``."""
        if budget.p is not None:
            raise ValueError("recency takes a fixed budget (k), not an adaptive one (p)")
        H, d = q.shape
        a = max(lo, hi - budget.k)
        if hi - a <= 0:
            return empty_partial(H, d)
        kr = np.repeat(k[:, a:hi], self.group, axis=0)
        vr = np.repeat(v[:, a:hi], self.group, axis=0)
        s = np.einsum("hd,hnd->hn", q, kr) * self.scale
        out, lse = attend_masked(s, vr, None)
        return out, lse, np.full(H, hi - a, np.int64)


class KvdexBackend:
    """Retrieval by the daemon: one session per run (see :meth:`start`), one ``retrieve`` per
    layer and step with ``attend=True``; the engine merges its ``(out, lse)``."""

    def __init__(self, client, kind: str, group: int, scale: float, sinks: int, window: int,
                 kv_format: str = "f16") -> None:
        """``sinks``/``window``: the daemon's ``[decode]`` static tokens (it retrieves from
        ``[sinks, len - window)``); ``kv_format``: how the daemon stores the rows (``"f16"`` or
        ``"int8"``)."""
        self.client, self.kind, self.kv_format = client, kind, kv_format
        self.sinks, self.window = sinks, window
        self.name = f"kvdex-{kind}"
        self.group, self.scale = group, float(scale)
        self.session = None
        self.have: List[int] = []  # tokens appended per layer
        self.build_secs = 0.0
        self.daemon_us: List[float] = []  # search + attend + copy, per retrieve
        self.index_timeout = 3600.0  # seconds to wait for the daemon's index builds

    def start(self, cfg, kc: np.ndarray, vc: np.ndarray, P: int, queries: Dict[int, np.ndarray],
              positions: np.ndarray) -> None:
        """A new session holding the ``P`` prefill tokens of every layer, each layer sealed with
        its prefill queries ``queries[l] [H, n, hd]`` at ``positions [n]``; waits for the builds."""
        self.close()
        self.session = self.client.create_session(layers=cfg.n_layer, q_heads=cfg.n_head, kv_heads=cfg.n_kv,
                                                  head_dim=cfg.hd, dtype="f16",
                                                  kv_format=self.kv_format)
        t0 = time.perf_counter()
        for l in range(cfg.n_layer):
            self.session.append(l, kc[l, :, :P].astype(np.float16), vc[l, :, :P].astype(np.float16))
            self.session.seal(l, self.kind, queries[l], positions)
        try:
            self.client.wait_index(self.session, timeout=self.index_timeout)
        except Exception:
            self.close()  # do not leave a half-built session behind in the daemon
            raise
        self.build_secs = time.perf_counter() - t0
        self.have = [P] * cfg.n_layer

    def retrieve(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, lo: int, hi: int,
                 budget: Budget, static_lse: np.ndarray, n: int = 0) -> Partial:
        """Appends the layer's new tokens ``[have, n)``, then the daemon's partial attention."""
        if self.session is None:
            raise RuntimeError("KvdexBackend.start() first")
        H, d = q.shape
        if n > self.have[layer]:
            a = self.have[layer]
            self.session.append(layer, k[:, a:n].astype(np.float16), v[:, a:n].astype(np.float16))
            self.have[layer] = n
        if hi <= lo or budget.k == 0:
            return empty_partial(H, d)
        if lo != self.sinks or n - hi != self.window:
            raise ValueError(f"the daemon retrieves [{self.sinks}, len - {self.window}); the engine's "
                             f"static tokens must match (got sinks {lo}, window {n - hi})")
        if budget.p is None:
            r = self.session.retrieve(layer, q, budget.k, scale=self.scale)
        else:
            r = self.session.retrieve(layer, q, coverage=budget.p, max_k=min(budget.k, hi - lo), scale=self.scale)
        self.daemon_us.append(r.search_us + r.attend_us + r.copy_us)
        return r.out, r.lse, r.k.astype(np.int64)

    def close(self) -> None:
        """Drops the run's session."""
        if self.session is not None:
            self.session.close()
            self.session = None


BACKENDS = {"exact-topk": ExactTopK, "recency": Recency}
KVDEX_KINDS = {"kvdex-graph": "graph", "kvdex-hnsw": "hnsw", "kvdex-flat": "flat"}

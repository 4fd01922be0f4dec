"""The daemon side of a :class:`~kvdex.hf.KvdexCache`: one kvdex session per sequence of the
batch, the decode budget, and the figures :meth:`KvdexCache.stats` reports.

Every full-attention layer of the model is one layer of each session (``kv_layer``, counted
over the full-attention layers only), so a hybrid model's sliding layers cost nothing here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..client import Client, PendingRetrieve, Retrieved, Session
from ..errors import BadRequestError

# Decode tokens held back and appended to the sessions together: one append round trip per
# block instead of one per step (benches/results/hf_decode.md compares block sizes).
APPEND_BLOCK = 32

TORCH_DTYPE_OF_SESSION = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def session_dtype_for(model_dtype: torch.dtype) -> str:
    """The default session dtype: bf16 for a bf16 model, f16 for f16 and f32 models."""
    return "bf16" if model_dtype == torch.bfloat16 else "f16"


def host_rows(x: torch.Tensor) -> np.ndarray:
    """K/V rows ``[kv_heads, n, d]`` as a host array the client accepts (float16 or float32;
    bf16 widens to float32 exactly, and the client narrows it back for a bf16 session)."""
    x = x.detach()
    if x.dtype not in (torch.float16, torch.float32):
        x = x.float()
    return x.cpu().contiguous().numpy()


@dataclass
class Budget:
    """The decode request's budget: a fixed ``k`` per query head, or ``coverage`` of the
    estimated attention mass within ``[min_k, max_k]`` (see README "Tuning the decode request")."""

    k: Optional[int] = None
    coverage: Optional[float] = 0.98
    min_k: int = 16
    max_k: Optional[int] = 1024

    def __post_init__(self) -> None:
        if self.k is None and self.coverage is None:
            raise BadRequestError("KvdexCache: give a budget, k= (fixed) or coverage= (adaptive)")
        if self.k is not None and self.k <= 0:
            raise BadRequestError(f"KvdexCache: k = {self.k} must be positive")

    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :meth:`kvdex.Session.retrieve`."""
        if self.k is not None:
            return {"k": self.k}
        return {"coverage": self.coverage, "min_k": self.min_k, "max_k": self.max_k}

    def rows_cap(self) -> int:
        """The most candidates per head one retrieve can return (sizes gather buffers)."""
        cap = self.k if self.k is not None else self.max_k
        if cap is None:
            raise BadRequestError("gather mode needs a bounded budget: give k= or max_k=")
        return cap


@dataclass
class DecodeRecord:
    """What decode steps attended: per step, attended and past tokens summed over the
    full-attention layers and sequences."""

    attended: List[float] = field(default_factory=list)
    past: List[int] = field(default_factory=list)
    retrieves: int = 0
    appends: int = 0  # decode-time appends (one per sequence, layer and block of unsent tokens)
    retrieve_s: float = 0.0
    daemon_us: float = 0.0

    def add(self, first_layer: bool, attended: float, past: int) -> None:
        if first_layer or not self.attended:
            self.attended.append(0.0)
            self.past.append(0)
        self.attended[-1] += attended
        self.past[-1] += past


class Sequences:
    """The sessions of a batch (created at the first prefill, when the shapes are known)."""

    def __init__(self, client: Client, n_layers: int, sinks: int, window: int, index: str,
                 budget: Budget, dtype: Optional[str], train_queries: Optional[int],
                 wait_index: bool, gather: Optional[bool] = None, append_block: int = APPEND_BLOCK) -> None:
        if sinks < 0 or window < 1:
            raise BadRequestError(f"KvdexCache: sinks = {sinks} must be >= 0 and window = {window} >= 1 "
                                  "(the step's own token is attended locally)")
        if append_block < 1:
            raise BadRequestError(f"KvdexCache: append_block = {append_block} must be >= 1")
        self.client = client
        self.n_layers = n_layers
        self.sinks, self.window = sinks, window
        self.index = index
        self.budget = budget
        self.dtype = dtype
        self.train_queries = train_queries
        self.wait_index = wait_index
        self.gather = gather  # CUDA gather mode: None = when the daemon can, True = required, False = never
        self.append_block = append_block  # decode tokens appended to the sessions together
        self.sessions: List[Session] = []
        self.sealed_at: Optional[float] = None
        self.index_ready_s: Optional[float] = None
        self.record = DecodeRecord()

    def ensure(self, batch: int, q_heads: int, kv_heads: int, head_dim: int, model_dtype: torch.dtype) -> None:
        """Creates one session per sequence on first use; checks the batch afterwards."""
        if self.sessions:
            if len(self.sessions) != batch:
                raise BadRequestError(f"KvdexCache holds {len(self.sessions)} sequences, this call has {batch}: "
                                      "a new batch needs a new cache")
            return
        if self.dtype is None:
            self.dtype = session_dtype_for(model_dtype)
        for _ in range(batch):
            self.sessions.append(self.client.create_session(
                layers=self.n_layers, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                dtype=self.dtype, sinks=self.sinks, window=self.window))

    def training_rows(self, n: int) -> np.ndarray:
        """Which of ``n`` prefill query rows seal a layer: about ``n/128`` and at least 1024
        (README, "Tuning the decode request"), spread evenly, the last one included."""
        want = self.train_queries if self.train_queries is not None else max(1024, n // 128)
        want = max(1, min(n, want))
        return np.unique(np.linspace(0, n - 1, want).round().astype(np.int64))

    def seal(self, b: int, kv_layer: int, queries: np.ndarray, positions: np.ndarray) -> None:
        self.sessions[b].seal(kv_layer, self.index, queries, positions)
        self.sealed_at = time.perf_counter()

    def prefill_done(self) -> None:
        """After the last full-attention layer sealed: waits for the builds when asked to."""
        if self.wait_index:
            self.wait_ready()

    def wait_ready(self, timeout: float = 3600.0) -> float:
        """Waits until every session's index is built; returns (and records) the seconds from
        the last seal until then."""
        for s in self.sessions:
            self.client.wait_index(s, timeout=timeout)
        since = self.sealed_at if self.sealed_at is not None else time.perf_counter()
        self.index_ready_s = time.perf_counter() - since
        return self.index_ready_s

    def retrieve(self, b: int, kv_layer: int, q: np.ndarray, scale: float, **extra: Any) -> Retrieved:
        t0 = time.perf_counter()
        r = self.sessions[b].retrieve(kv_layer, q, scale=scale, **self.budget.kwargs(), **extra)
        self.record.retrieve_s += time.perf_counter() - t0
        self.record.retrieves += 1
        self.record.daemon_us += r.search_us + r.attend_us + r.copy_us
        return r

    def submit(self, b: int, kv_layer: int, q: np.ndarray, scale: float) -> Tuple[float, PendingRetrieve]:
        """An attend-mode retrieve of sequence ``b`` in flight; :meth:`collect` waits for it."""
        return time.perf_counter(), self.sessions[b].retrieve_async(kv_layer, q, scale=scale, **self.budget.kwargs())

    def collect(self, submitted: Tuple[float, PendingRetrieve]) -> Retrieved:
        """The result of :meth:`submit` (recorded like :meth:`retrieve`, from submit to result)."""
        t0, pending = submitted
        r = pending.wait()
        self.record.retrieve_s += time.perf_counter() - t0
        self.record.retrieves += 1
        self.record.daemon_us += r.search_us + r.attend_us + r.copy_us
        return r

    def close(self) -> None:
        for s in self.sessions:
            try:
                s.close()
            except Exception:  # noqa: BLE001 (closing is best effort: the daemon may be gone)
                pass
        self.sessions = []

    def stats(self) -> Dict[str, Any]:
        r = self.record
        steps = len(r.attended)
        frac = [a / p for a, p in zip(r.attended, r.past) if p > 0]
        return {
            "decode_steps": steps,
            "attended_tokens": r.attended,
            "past_tokens": r.past,
            "attended_fraction": float(np.mean(frac)) if frac else None,
            "index_ready_s": self.index_ready_s,
            "retrieves": r.retrieves,
            "appends": r.appends,
            "retrieve_ms": 1e3 * r.retrieve_s / r.retrieves if r.retrieves else None,
            "daemon_ms": 1e-3 * r.daemon_us / r.retrieves if r.retrieves else None,
            "sessions": len(self.sessions),
            "session_dtype": self.dtype,
        }


__all__ = ["APPEND_BLOCK", "Budget", "Sequences", "session_dtype_for", "host_rows", "TORCH_DTYPE_OF_SESSION"]

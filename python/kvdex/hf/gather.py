"""kvdex's part of a decode step, in one of two modes.

- attend mode (a CPU model, or ``gather=False``): the daemon attends over the tokens it
  retrieves and returns ``(out, lse)``. Every sequence's retrieve is submitted at once
  (``retrieve_async``) and waited for after the engine's own part of the step.
- gather mode (a CUDA model): the daemon copies the retrieved K/V rows straight into a CUDA
  tensor of the engine through CUDA IPC (``Session.register_cuda_tensor``, one buffer per
  sequence and layer), and the attention over them runs on the GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np
import torch

from ..errors import BadRequestError
from .attn_math import rows_partial
from .sequences import TORCH_DTYPE_OF_SESSION

if TYPE_CHECKING:
    from .layer import KvdexLayer


def uses_gather(layer: "KvdexLayer") -> bool:
    """Gather mode: a CUDA model, unless the cache was made with ``gather=False``."""
    return layer.device.type == "cuda" and layer.seq.gather is not False


class RetrieveStep:
    """kvdex's part of one decode step of a layer, for the sequences in ``which``: submitted on
    construction (attend mode), collected by :meth:`finish`."""

    def __init__(self, layer: "KvdexLayer", q: torch.Tensor, scale: float, which: List[int]) -> None:
        self.layer, self.q, self.scale, self.which = layer, q, scale, which
        self.q_host = q.detach().float().cpu().numpy() if which else None
        self.gather = uses_gather(layer)
        self.submitted: list = []
        if not self.gather:
            try:
                for b in which:
                    self.submitted.append(layer.seq.submit(b, layer.kv_layer, self.q_host[b], scale))
            except BaseException:
                self.drain(0)
                raise

    def finish(self, out_like: torch.Tensor, lse_like: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, List[float]]:
        """``(out float32 [B, H, d], lse float32 [B, H], mean k per sequence)``; sequences with
        nothing to retrieve get zeros, ``-inf`` and 0."""
        out = torch.zeros_like(out_like)
        lse = torch.full_like(lse_like, float("-inf"))
        picked = [0.0] * out.shape[0]
        seq = self.layer.seq
        for n, b in enumerate(self.which):
            if self.gather:
                out_b, lse_b, k = retrieved_partial(self.layer, b, self.q_host[b], self.q[b], self.scale)
            else:
                try:
                    r = seq.collect(self.submitted[n])
                except BaseException:
                    self.drain(n + 1)
                    raise
                out_b, lse_b, k = torch.from_numpy(r.out), torch.from_numpy(r.lse), r.k
            out[b], lse[b] = out_b.to(out.device), lse_b.to(lse.device)
            picked[b] = float(np.mean(k))
        return out, lse, picked

    def drain(self, first: int) -> None:
        """Waits for the submitted retrieves from ``first`` on, ignoring their errors (after a
        failure: each in-flight retrieve holds a part of its session's arena until waited on)."""
        for _, pending in self.submitted[first:]:
            try:
                pending.wait()
            except Exception:  # noqa: BLE001 (the first failure is the one raised)
                pass


def retrieved_partial(layer: "KvdexLayer", b: int, q_host: np.ndarray, q: torch.Tensor,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(out float32 [H, d], lse float32 [H], k [H])`` over what kvdex retrieves for sequence
    ``b``'s query ``q [H, d]`` (``q_host``: the same on the host, float32)."""
    seq = layer.seq
    got = gather_buffer(layer, b, q.shape[0], q.shape[1]) if uses_gather(layer) else None
    if got is None:
        r = seq.retrieve(b, layer.kv_layer, q_host, scale)
        out = torch.from_numpy(r.out).to(q.device)
        lse = torch.from_numpy(r.lse).to(q.device)
        return out, lse, r.k
    buf, handle = got
    r = seq.retrieve(b, layer.kv_layer, q_host, scale, attend=False, gather=True, into=(handle, 0))
    h, d = q.shape
    # The daemon packs the rows [H, 2, stride, d] from the buffer's start (its pitch is the
    # response's stride, not the buffer's cap); they have landed when retrieve returns.
    rows = buf.view(-1)[:h * 2 * r.stride * d].view(h, 2, r.stride, d)
    count = torch.from_numpy(r.k.astype(np.int64))
    out, lse = rows_partial(q, rows[:, 0], rows[:, 1], count, scale)
    return out, lse, r.k


def gather_buffer(layer: "KvdexLayer", b: int, heads: int, head_dim: int) -> Optional[Tuple[torch.Tensor, int]]:
    """The CUDA tensor of ``H * 2 * cap * d`` elements (session dtype) registered with sequence
    ``b``'s session for this layer, made on first use. ``None`` when the daemon cannot write
    GPU memory (it runs the host transfer backend) and gather mode was not asked for
    explicitly: attend mode is used from then on."""
    got = layer.gather_bufs.get(b)
    if got is None:
        dtype = TORCH_DTYPE_OF_SESSION[layer.seq.dtype]
        buf = torch.empty((heads, 2, layer.seq.budget.rows_cap(), head_dim), dtype=dtype, device=layer.device)
        try:
            handle = layer.seq.sessions[b].register_cuda_tensor(buf)
        except BadRequestError:
            if layer.seq.gather:
                raise
            layer.seq.gather = False
            return None
        got = layer.gather_bufs[b] = (buf, handle)
    return got


__all__ = ["RetrieveStep", "retrieved_partial", "uses_gather", "gather_buffer"]

"""kvdex's part of a decode step, in one of two modes.

- attend mode (a CPU model, or ``gather=False``): the daemon attends over the tokens it
  retrieves and returns ``(out, lse)``.
- gather mode (a CUDA model): the daemon copies the retrieved K/V rows straight into a CUDA
  tensor of the engine through CUDA IPC (``Session.register_cuda_tensor``, one buffer per
  sequence and layer), and the attention over them runs on the GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import numpy as np
import torch

from .attn_math import rows_partial
from .sequences import TORCH_DTYPE_OF_SESSION

if TYPE_CHECKING:
    from .layer import KvdexLayer


def uses_gather(layer: "KvdexLayer") -> bool:
    """Gather mode: a CUDA model, unless the cache was made with ``gather=False``."""
    return layer.device.type == "cuda" and layer.seq.gather is not False


def retrieved_partial(layer: "KvdexLayer", b: int, q_host: np.ndarray, q: torch.Tensor,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(out float32 [H, d], lse float32 [H], k [H])`` over what kvdex retrieves for sequence
    ``b``'s query ``q [H, d]`` (``q_host``: the same on the host, float32)."""
    seq = layer.seq
    if not uses_gather(layer):
        r = seq.retrieve(b, layer.kv_layer, q_host, scale)
        out = torch.from_numpy(r.out).to(q.device)
        lse = torch.from_numpy(r.lse).to(q.device)
        return out, lse, r.k
    buf, handle = gather_buffer(layer, b, q.shape[0], q.shape[1])
    r = seq.retrieve(b, layer.kv_layer, q_host, scale, attend=False, gather=True, into=(handle, 0))
    rows = buf[:, :, :r.stride]  # [H, 2, stride, d]; the rows have landed when retrieve returns
    count = torch.from_numpy(r.k.astype(np.int64))
    out, lse = rows_partial(q, rows[:, 0], rows[:, 1], count, scale)
    return out, lse, r.k


def gather_buffer(layer: "KvdexLayer", b: int, heads: int, head_dim: int) -> Tuple[torch.Tensor, int]:
    """The CUDA tensor ``[H, 2, cap, d]`` (session dtype) registered with sequence ``b``'s
    session for this layer, made on first use."""
    got = layer.gather_bufs.get(b)
    if got is None:
        dtype = TORCH_DTYPE_OF_SESSION[layer.seq.dtype]
        buf = torch.empty((heads, 2, layer.seq.budget.rows_cap(), head_dim), dtype=dtype, device=layer.device)
        handle = layer.seq.sessions[b].register_cuda_tensor(buf)
        got = layer.gather_bufs[b] = (buf, handle)
    return got


__all__ = ["retrieved_partial", "uses_gather", "gather_buffer"]

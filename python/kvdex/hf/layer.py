"""``KvdexLayer``: the cache of one full-attention layer, kept by kvdex.

On the model's device the layer keeps the static tokens only: the first ``sinks`` and the
most recent ``window`` tokens of each sequence the session holds, and the decode tokens not
sent to it yet. Every token also goes to the sequence's kvdex session, whose retrieval region
is the rest, ``[sinks, len - window)`` of what it holds.

- First prefill: ``update`` returns the chunk's K/V whole; the attention (exact, sdpa) runs
  over it, then :meth:`commit_prefill` appends the rows to the sessions, seals the layer with
  a sample of the prefill queries, and keeps the static tokens.
- Decode (one new token): ``update`` appends the token to the static set and returns it;
  :meth:`decode` attends over it, asks kvdex for the rest and merges both by LSE. Appends to
  the daemon are lazy: the step's tokens stay in the static set only (``unsent`` of them)
  and go to the sessions in blocks of ``append_block``, so most steps make one round trip
  (the retrieve), not two. The daemon retrieves from ``[sinks, daemon_len - window)`` with
  ``daemon_len = len - unsent``, so the static set is the sinks and every token from
  ``daemon_len - window`` on: each token is attended exactly once, here or by kvdex.
- A later prefill (a chat's next turn, chunked prefill): the offloaded rows are gathered
  back, so the new queries attend to the whole context exactly; the new rows are appended.

Left padding (batches of prompts of different lengths) is stripped before the rows reach the
daemon: session token ``i`` is the sequence's ``i``-th real token.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from ..client import bf16_to_float32
from ..errors import BadRequestError
from .attn_math import local_partial, merge_partials
from .sequences import Sequences, host_rows

try:  # transformers >= 4.56
    from transformers.cache_utils import CacheLayerMixin
except ImportError as e:  # pragma: no cover (the version check in kvdex.hf says which)
    raise ImportError("kvdex.hf needs transformers >= 4.57 (CacheLayerMixin)") from e


def rows_as_float32(rows: np.ndarray) -> np.ndarray:
    """Gathered rows as float32: a bf16 session returns the bf16 bits as uint16."""
    if rows.dtype == np.uint16:
        return bf16_to_float32(rows)
    return np.asarray(rows, dtype=np.float32)


class KvdexLayer(CacheLayerMixin):
    """A full-attention layer whose past lives in kvdex (see the module docs)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, kv_layer: int, seq: Sequences, last: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kv_layer = kv_layer
        self.seq = seq
        self.last = last  # the model's last full-attention layer: its seal ends the prefill
        self.valid: Optional[torch.Tensor] = None  # [B, n] bool: columns of `keys` holding a token
        self.lengths: List[int] = []  # real tokens per sequence (session length)
        self.pads: List[int] = []  # left padding per sequence
        self.sealed = False  # the first prefill is committed
        self.indexed: List[bool] = []  # per sequence: its session's layer is sealed
        self.pending: Optional[str] = None  # "prefill" | "extend" | "decode": what attention must finish
        self.unsent = 0  # decode tokens at the end of every static set, not yet appended to the sessions
        self.gather_bufs: dict = {}

    # --- CacheLayerMixin -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: Optional[torch.Tensor] = None) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def get_seq_length(self) -> int:
        """Tokens seen, padding included (positions come from it)."""
        return (self.pads[0] + self.lengths[0]) if self.lengths else 0

    def get_mask_sizes(self, query_length) -> Tuple[int, int]:
        """The mask spans the whole sequence (prefill attends to all of it; decode ignores it)."""
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.get_seq_length() + q, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 4.57 name
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        from .attention import set_current  # noqa: PLC0415 (the two modules refer to each other)

        if self.pending is not None:
            raise BadRequestError(
                f"KvdexCache layer {self.layer_idx}: the previous step never reached kvdex's attention; "
                "load the model with attn_implementation='kvdex' (after `import kvdex.hf`)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        set_current(self)
        if not self.sealed:
            if self.keys is not None:
                raise BadRequestError("KvdexCache: a prefill after a failed one; start a new cache")
            self.keys, self.values, self.pending = key_states, value_states, "prefill"
            return key_states, value_states
        if key_states.shape[-2] == 1:
            self.pending = "decode"
            return self.append_token(key_states, value_states)
        self.flush()
        full_k, full_v = self.full_states()
        self.keys = torch.cat([full_k, key_states], dim=-2)
        self.values = torch.cat([full_v, value_states], dim=-2)
        self.pending = "extend"
        return self.keys, self.values

    def reset(self) -> None:
        raise BadRequestError("KvdexCache cannot be reset; create a new one")

    def crop(self, tokens_to_remove: int) -> None:
        raise BadRequestError("KvdexCache cannot be cropped (assisted/speculative decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise BadRequestError("KvdexCache does not support beam search (num_beams > 1)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise BadRequestError("KvdexCache does not support num_return_sequences/beams > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise BadRequestError("KvdexCache does not support selecting sequences of a batch")

    # --- static tokens ---------------------------------------------------------------------
    def static_of(self, real_k: torch.Tensor, real_v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The static tokens of one sequence's real rows ``[KV, L, d]``: all of them up to
        ``sinks + window``, else the sinks and the window."""
        s, w = self.seq.sinks, self.seq.window
        if real_k.shape[1] <= s + w:
            return real_k, real_v
        return (torch.cat([real_k[:, :s], real_k[:, -w:]], dim=1),
                torch.cat([real_v[:, :s], real_v[:, -w:]], dim=1))

    def keep_static(self, full_k: torch.Tensor, full_v: torch.Tensor) -> None:
        """Keeps each sequence's static tokens of ``full_* [B, KV, T, d]``, right-aligned."""
        self.pack([self.static_of(full_k[b, :, p:], full_v[b, :, p:]) for b, p in enumerate(self.pads)])

    def pack(self, parts: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Stores one ``(keys, values) [KV, n_b, d]`` token set per sequence as ``keys``/``values``
        ``[B, KV, max n_b, d]``, right-aligned, with ``valid`` marking the filled columns."""
        n = max(k.shape[1] for k, _ in parts)
        kv, d = parts[0][0].shape[0], parts[0][0].shape[-1]
        keys = parts[0][0].new_zeros((len(parts), kv, n, d))
        values = parts[0][1].new_zeros((len(parts), kv, n, d))
        valid = torch.zeros((len(parts), n), dtype=torch.bool, device=keys.device)
        for b, (k, v) in enumerate(parts):
            keys[b, :, n - k.shape[1]:] = k
            values[b, :, n - k.shape[1]:] = v
            valid[b, n - k.shape[1]:] = True
        self.keys, self.values = keys, values
        self.valid = None if bool(valid.all()) else valid

    def append_token(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode: adds the step's token to the static set ``[B, KV, n, d]`` and returns the set.
        The token reaches the session at the next :meth:`flush`."""
        self.keys = torch.cat([self.keys, k], dim=-2)
        self.values = torch.cat([self.values, v], dim=-2)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones((self.valid.shape[0], 1))], dim=1)
        self.lengths = [length + 1 for length in self.lengths]
        self.unsent += 1
        return self.keys, self.values

    def daemon_lengths(self) -> List[int]:
        """Tokens each sequence's session holds for this layer (the unsent ones excluded)."""
        return [length - self.unsent for length in self.lengths]

    def flush(self) -> None:
        """Appends the unsent tokens to the sessions, then drops from the static set the
        tokens that the daemon now retrieves (those before ``len - window``, after the sinks)."""
        if self.unsent == 0:
            return
        u = self.unsent
        for i, sess in enumerate(self.seq.sessions):
            sess.append(self.kv_layer, host_rows(self.keys[i, :, -u:]), host_rows(self.values[i, :, -u:]))
            self.seq.record.appends += 1
        self.unsent = 0
        self.seal_grown()
        parts = []
        for b in range(self.keys.shape[0]):
            cols = slice(None) if self.valid is None else self.valid[b]
            parts.append(self.static_of(self.keys[b][:, cols], self.values[b][:, cols]))
        self.pack(parts)

    def full_states(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole context ``[B, KV, T, d]`` (zeros where padded): the static tokens and the
        rows of ``[sinks, len - window)`` gathered back from the sessions."""
        s, w = self.seq.sinks, self.seq.window
        fulls_k, fulls_v = [], []
        for b, (length, pad) in enumerate(zip(self.lengths, self.pads)):
            cols = torch.arange(self.keys.shape[-2], device=self.keys.device)
            if self.valid is not None:
                cols = cols[self.valid[b]]
            sk, sv = self.keys[b][:, cols], self.values[b][:, cols]
            if length > s + w:
                mk, mv = self.gather_middle(b, s, length - w)
                sk = torch.cat([sk[:, :s], mk, sk[:, s:]], dim=1)
                sv = torch.cat([sv[:, :s], mv, sv[:, s:]], dim=1)
            zeros = sk.new_zeros((sk.shape[0], pad, sk.shape[-1]))
            fulls_k.append(torch.cat([zeros, sk], dim=1))
            fulls_v.append(torch.cat([zeros, sv], dim=1))
        return torch.stack(fulls_k), torch.stack(fulls_v)

    def gather_middle(self, b: int, lo: int, hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[lo, hi)`` of sequence ``b``'s session, ``[KV, hi - lo, d]`` each."""
        sess = self.seq.sessions[b]
        ids = list(range(lo, hi))
        ks, vs = [], []
        for h in range(self.keys.shape[1]):
            k, v = sess.gather(self.kv_layer, h, ids)
            ks.append(torch.from_numpy(rows_as_float32(k)))
            vs.append(torch.from_numpy(rows_as_float32(v)))
        to = dict(device=self.keys.device, dtype=self.keys.dtype)
        return torch.stack(ks).to(**to), torch.stack(vs).to(**to)

    def load_prefill(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                     positions: Optional[np.ndarray], attention_mask: Optional[torch.Tensor]) -> None:
        """Fills a fresh layer from a stock prefill: ``keys``/``values [B, KV, T, d]``, queries
        ``[B, H, n, d]`` at ``positions [n]`` (default: the last ``n``), a 2-D padding mask."""
        b, _, t, _ = keys.shape
        self.lazy_initialization(keys, values)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        pos = np.arange(t - queries.shape[2], t) if positions is None else np.asarray(positions, dtype=np.int64)
        self.keys, self.values = keys, values
        self.commit(queries, pads_of(mask, b, t), pos)

    # --- after the attention -----------------------------------------------------------------
    def commit_prefill(self, query: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """First prefill: rows to the sessions, seal with the queries, keep the static tokens."""
        b, _, q_len, _ = query.shape
        t = self.keys.shape[-2]
        self.commit(query, pads_of(mask, b, t), np.arange(t - q_len, t))

    def commit(self, query: torch.Tensor, pads: List[int], positions: np.ndarray) -> None:
        """Appends the real rows of ``keys``/``values`` to the sessions and seals the layer with
        a sample of ``query [B, H, n, d]`` (at ``positions [n]``, padding included)."""
        full_k, full_v = self.keys, self.values
        b, h, _, d = query.shape
        t = full_k.shape[-2]
        self.pads, self.lengths = pads, [t - p for p in pads]
        self.seq.ensure(b, h, full_k.shape[1], d, full_k.dtype)
        self.indexed = [length > self.seq.sinks + self.seq.window for length in self.lengths]
        for i, pad in enumerate(pads):
            self.seq.sessions[i].append(self.kv_layer, host_rows(full_k[i, :, pad:]), host_rows(full_v[i, :, pad:]))
            if not self.indexed[i]:
                continue  # all static: sealed once it outgrows sinks + window (see seal_grown)
            real = np.nonzero(positions >= pad)[0]
            rows = real[self.seq.training_rows(len(real))]
            qs = query[i][:, torch.from_numpy(rows).to(query.device)].detach().float().cpu().numpy()
            self.seq.seal(i, self.kv_layer, qs, (positions[rows] - pad).astype(np.int64))
        self.sealed = True
        self.keep_static(full_k, full_v)
        self.pending = None
        if self.last:
            self.seq.prefill_done()

    def commit_extend(self, mask: Optional[torch.Tensor], q_len: int) -> None:
        """A later prefill: appends the new rows, keeps the static tokens of the whole context."""
        full_k, full_v = self.keys, self.values
        t = full_k.shape[-2]
        if mask is not None and not bool(mask[:, 0, -1, t - q_len:].all()):
            raise BadRequestError("KvdexCache: padding inside a later prefill chunk is not supported "
                                  "(only left padding of the first prompt)")
        for i in range(len(self.lengths)):
            self.seq.sessions[i].append(self.kv_layer, host_rows(full_k[i, :, t - q_len:]),
                                        host_rows(full_v[i, :, t - q_len:]))
        self.lengths = [length + q_len for length in self.lengths]
        self.seal_grown()
        self.keep_static(full_k, full_v)
        self.pending = None

    def seal_grown(self) -> None:
        """Seals (from the keys alone) the layer of a sequence whose prompt was all static
        tokens, once it holds tokens to retrieve."""
        for i, length in enumerate(self.daemon_lengths()):
            if not self.indexed[i] and length > self.seq.sinks + self.seq.window:
                self.seq.sessions[i].seal(self.kv_layer, self.seq.index)
                self.indexed[i] = True

    def decode(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention ``[B, 1, H, d]``: the static tokens here, the rest from kvdex.

        The sequences' retrieves are submitted first (the daemon serves them in parallel) and
        the local partial is computed while they run. The unsent tokens are appended after
        the retrieves are answered, once there are ``append_block`` of them."""
        from .gather import RetrieveStep  # noqa: PLC0415

        q = query[:, :, 0, :]
        s, w = self.seq.sinks, self.seq.window
        daemon = self.daemon_lengths()
        step = RetrieveStep(self, q, scale, [i for i, n in enumerate(daemon) if n > s + w])
        try:
            out_l, lse_l = local_partial(q, self.keys, self.values, self.valid, scale)
        except BaseException:
            step.drain(0)
            raise
        out_r, lse_r, picked = step.finish(out_l, lse_l)
        n_static = self.keys.shape[-2] if self.valid is None else self.valid.sum(dim=1).tolist()
        for i, length in enumerate(self.lengths):
            static = n_static if isinstance(n_static, int) else int(n_static[i])
            self.seq.record.add(self.kv_layer == 0 and i == 0, static + picked[i], length)
        out = merge_partials(out_l, lse_l, out_r, lse_r)
        self.pending = None
        if self.unsent >= self.seq.append_block:
            self.flush()
        return out.to(query.dtype)[:, None, :, :]


def pads_of(mask: Optional[torch.Tensor], batch: int, t: int) -> List[int]:
    """Left padding per sequence from a prefill's boolean 4-D mask (its last query row sees
    every real token); ``None`` means no padding."""
    if mask is None:
        return [0] * batch
    if mask.dtype != torch.bool:
        raise BadRequestError(f"KvdexCache expects a boolean attention mask (sdpa style), got {mask.dtype}")
    seen = mask[:, 0, -1, :].expand(batch, t) if mask.shape[0] == 1 else mask[:, 0, -1, :]
    pads = []
    for b in range(batch):
        real = int(seen[b].sum())
        if not bool(seen[b, t - real:].all()):
            raise BadRequestError("KvdexCache supports left padding only (padding_side='left')")
        pads.append(t - real)
    return pads


__all__ = ["KvdexLayer", "pads_of"]

"""The client: connect to a daemon, create sessions, append, search, gather, seal, attend.

    import kvdex, numpy as np
    with kvdex.Daemon() as d:                       # or a daemon you run: kvdex serve
        client = kvdex.connect(d.url)
        with client.create_session(layers=30, q_heads=9, kv_heads=3, head_dim=64, dtype="f16") as s:
            s.append(0, k, v)                       # k, v: [kv_heads, tokens, head_dim]
            ids, scores = s.search(0, q, 100)       # q: [q_heads, head_dim]
            k_rows, v_rows = s.gather(0, 0, ids[0])

The decode path (one call per layer and step):

            s.seal(0, "graph", queries, positions)  # after the prefill: build the layer's index
            client.wait_index(s)                    # optional: the build runs in the background
            out, lse, k = s.attend(0, q, coverage=0.95, max_k=256)   # or k=100 (fixed)
            out, lse = kvdex.merge(out_static, lse_static, out, lse)  # the engine's part + kvdex's

Every call goes through the Rust client (``kvdex._native``) over the session's shared-memory
region; HTTP is used only to create and drop the session (its token is handled inside).

Results and copies:

- ``search`` and ``gather`` return new numpy arrays: one copy out of the shared-memory arena,
  because the arena is reused by the next request and a view would change under the caller.
- ``retrieve`` and ``attend`` return new arrays too (same reason).
- ``search_into`` writes into arrays the caller owns and reuses: no allocation per call.
- ``append`` passes a C-contiguous array in the session dtype to shared memory with no extra
  copy; another float dtype (float32 into an f16 session, or float16 into f32) is converted once.

Inputs: numpy arrays, or anything exporting DLPack or the array protocol (a CPU ``torch.Tensor``
works without kvdex depending on torch). K/V must be float16 or float32; queries are converted
to float32.
"""

from __future__ import annotations

import json
import operator
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _native
from .errors import BadRequestError, DisconnectedError, KvdexError, NotFoundError


@dataclass(frozen=True)
class Retrieved:
    """One decode-step retrieve of a layer (new arrays, copied out of the shared-memory arena).

    ``H`` is the session's query heads, ``stride`` the candidates per head the daemon returned
    (the fixed k, or the adaptive budget's cap, clamped to the retrievable tokens). For a query
    of several positions (``q`` shaped ``[P, H, head_dim]``), every array below gains a leading
    ``P`` axis: ``k [P, H]``, ``ids [P, H, stride]``, ``out [P, H, head_dim]``, ``lse [P, H]``,
    ``rows [P, H, 2, stride, head_dim]``.
    """

    k: np.ndarray
    """uint32 ``[H]``: tokens chosen per query head (a prefix of its candidates)."""
    coverage: np.ndarray
    """float32 ``[H]``: estimated attention mass covered, static tokens included (adaptive
    budgets; 0 for a fixed k)."""
    ids: np.ndarray
    """uint32 ``[H, stride]``: candidate token ids, best first; head ``h`` uses ``ids[h, :k[h]]``."""
    scores: np.ndarray
    """float32 ``[H, stride]``: their raw inner products with the query."""
    out: Optional[np.ndarray]
    """float32 ``[H, head_dim]``: partial attention over the chosen tokens (``attend=True``)."""
    lse: Optional[np.ndarray]
    """float32 ``[H]``: its log-sum-exp of scaled scores, ``-inf`` when nothing was chosen."""
    rows: Optional[np.ndarray]
    """``[H, 2, stride, head_dim]``: K then V rows of the candidates (``gather=True``), in the
    session dtype; a bf16 session's are uint16 arrays of the bf16 bits (see
    :func:`bf16_to_float32`)."""
    search_us: float
    """Daemon microseconds searching."""
    attend_us: float
    """Daemon microseconds choosing budgets and attending."""
    copy_us: float
    """Daemon microseconds copying results out."""
    scored: int
    """Keys the searches scored, all heads."""
    stride: int = 0
    """Candidates per head: the row pitch of ``ids``/``scores``, and of the rows written into
    an engine destination (``into=``), laid out ``[H, 2, stride, head_dim]``."""
    slowest_head_us: float = 0.0
    """Daemon microseconds of the slowest query head's search, budget and attention:
    ``search_us + attend_us`` less this is what spreading the heads over cores cost."""


def as_numpy(x: Any, what: str) -> np.ndarray:
    """``x`` as a numpy array without copying where possible (numpy, DLPack, array protocol).

    A torch ``bfloat16`` tensor (which numpy cannot hold) comes back as a uint16 array of its
    bits; :func:`is_bf16` tells such a tensor apart.

    Raises:
        kvdex.BadRequestError: for objects that are neither, or a tensor not in host memory.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_bf16(x):
        x = x.view(_torch_int16(x))
        return as_numpy(x, what).view(np.uint16)
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError) as e:
            raise BadRequestError(f"{what}: cannot view this tensor from numpy ({e}); "
                                  "pass a CPU tensor of float16/float32/bfloat16") from e
    if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise BadRequestError(f"{what} must be a numpy array or a tensor, got {type(x).__name__}")


def is_bf16(x: Any) -> bool:
    """True for a torch ``bfloat16`` tensor (checked without importing torch)."""
    return str(getattr(x, "dtype", "")) == "torch.bfloat16"


def _torch_int16(x: Any) -> Any:
    """``torch.int16``, from the module of the tensor ``x`` (kvdex does not import torch)."""
    import sys  # noqa: PLC0415

    return sys.modules["torch"].int16


def bf16_to_float32(a: np.ndarray) -> np.ndarray:
    """bf16 values held as uint16 bits (what a bf16 session's gather returns) -> float32."""
    a = np.ascontiguousarray(a, dtype=np.uint16)
    return (a.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(a: Any) -> np.ndarray:
    """float32 -> bf16 bits as uint16, rounded to nearest even (as torch and ``half`` do), for
    ``append(..., dtype="bf16")``."""
    x = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = x + 0x7FFF + ((x >> 16) & 1)
    nan = np.isnan(np.ascontiguousarray(a, dtype=np.float32))
    return np.where(nan, (x >> 16) | 0x40, rounded >> 16).astype(np.uint16)


def _kv(x: Any, what: str, dtype: Optional[str] = None) -> Tuple[np.ndarray, bool]:
    """K or V as a C-contiguous array and whether it holds bf16 bits (a torch bfloat16
    tensor, or a uint16 array with ``dtype="bf16"``)."""
    bf16 = is_bf16(x) or dtype == "bf16"
    if dtype not in (None, "bf16"):
        raise BadRequestError(f"{what}: dtype must be None or \"bf16\", got {dtype!r}")
    a = as_numpy(x, what)
    if bf16:
        if a.dtype != np.uint16:
            raise BadRequestError(f"{what} with dtype=\"bf16\" must be a uint16 array of bf16 bits, got {a.dtype}")
    elif a.dtype not in (np.float16, np.float32):
        hint = (" (pass dtype=\"bf16\" if it holds bf16 bits)" if a.dtype == np.uint16
                else " (or bf16: a torch bfloat16 tensor, or uint16 bits with dtype=\"bf16\")")
        raise BadRequestError(f"{what} must be float16 or float32, got {a.dtype}{hint}")
    return np.ascontiguousarray(a), bf16


def _query(x: Any, dtype: Optional[str] = None, positions: bool = False) -> np.ndarray:
    """Queries as float32: ``[q_heads, head_dim]``, or with ``positions`` also
    ``[P, q_heads, head_dim]``; bf16 (a torch bfloat16 tensor, or uint16 bits with
    ``dtype="bf16"``) is converted."""
    a = as_numpy(x, "q")
    if is_bf16(x) or dtype == "bf16":
        if a.dtype != np.uint16:
            raise BadRequestError(f"q with dtype=\"bf16\" must be a uint16 array of bf16 bits, got {a.dtype}")
        a = bf16_to_float32(a)
    elif dtype is not None:
        raise BadRequestError(f"q: dtype must be None or \"bf16\", got {dtype!r}")
    q = np.ascontiguousarray(a, dtype=np.float32)
    if q.ndim != 2 and not (positions and q.ndim == 3):
        # The binding takes 2-D arrays only; say which shape is wanted rather than let it raise
        # a TypeError about casting.
        want = "(q_heads, head_dim) or 3 (P, q_heads, head_dim)" if positions else "(q_heads, head_dim)"
        raise BadRequestError(f"q has shape {list(q.shape)}, expected 2 dimensions {want}")
    return q


U32_MAX = 2**32 - 1
NO_LIMIT = U32_MAX
"""A position's limit meaning "every token" (what ``None`` in ``limits`` sends)."""


def _u32(x: Any, what: str, most: int = U32_MAX) -> int:
    """``x`` as an index or count of the wire (0 ..= ``most``, 2**32-1 unless said), or a
    BadRequestError naming it."""
    try:
        i = operator.index(x)
    except TypeError:
        raise BadRequestError(f"{what} must be an integer, got {type(x).__name__}") from None
    if not 0 <= i <= most:
        raise BadRequestError(f"{what} = {i} is out of range (0 ..= {most})")
    return i


def _u64(x: Any, what: str) -> int:
    """``x`` as a byte offset or length of the wire (0 ..= 2**64-1), or a BadRequestError."""
    return _u32(x, what, 2**64 - 1)


def _ids(ids: Any) -> List[int]:
    """Token ids for :meth:`Session.gather`, checked to be non-negative integers."""
    a = np.asarray(ids)
    if a.size == 0:
        return []
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise BadRequestError(f"ids must be a 1-D sequence of integer token ids, got {a.dtype} {list(a.shape)}")
    if a.min() < 0 or a.max() > U32_MAX:
        bad = int(a.min()) if a.min() < 0 else int(a.max())
        raise BadRequestError(f"ids: token id {bad} is out of range (0 ..= {U32_MAX})")
    return a.astype(np.int64).tolist()


class Session:
    """An attached session of the daemon (create one with :meth:`Client.create_session`).

    One request is outstanding at a time; calls from several threads are serialised. Use it as
    a context manager, or call :meth:`close`, to drop the session on the daemon.
    """

    def __init__(self, native: "_native.Session", slim: Optional[bool] = None) -> None:
        self._s = native
        layers, q_heads, kv_heads, head_dim, dtype = native.shape_tuple
        self.layers: int = layers
        self.q_heads: int = q_heads
        self.kv_heads: int = kv_heads
        self.head_dim: int = head_dim
        self.dtype: str = dtype
        self.slim: Optional[bool] = slim
        """Slim mode as created (``None`` when attached directly: not known)."""

    @property
    def id(self) -> Optional[str]:
        """The daemon's session id (``None`` when attached directly with :func:`attach`)."""
        return self._s.id

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._s.closed

    def ping(self, data: bytes = b"") -> bytes:
        """Echoes ``data`` through the daemon: a round trip that does no work."""
        return self._s.ping(data)

    def append(self, layer: int, k: Any, v: Any = None, *, dtype: Optional[str] = None) -> int:
        """Appends tokens to ``layer``; returns the layer's token count afterwards.

        Args:
            k, v: ``[kv_heads, tokens, head_dim]``: float16 or float32 arrays, torch
                ``bfloat16`` CPU tensors, or uint16 arrays of bf16 bits with ``dtype="bf16"``.
                Rows in the session's dtype are stored as they are; others are converted once.
                A Slim session (``create_session(..., slim=True)``) stores K alone: pass
                ``v=None``.
            dtype: ``"bf16"`` to say that uint16 arrays hold bf16 bits.

        Raises:
            kvdex.BadRequestError: wrong dtype or shape; kvdex.NotFoundError: unknown layer;
            kvdex.BudgetError: the daemon's memory budget is exhausted;
            kvdex.DisconnectedError: the session is closed or the daemon is gone.
        """
        if self.slim and v is not None:
            # The daemon would store K alone and drop v without a word.
            raise BadRequestError("append: this is a Slim session, which stores K alone (V = K @ W_KV); "
                                  "call append(layer, k) without v")
        if self.slim is False and v is None:
            raise BadRequestError("append: v is missing (only Slim sessions append K alone)")
        ka, bf16 = _kv(k, "k", dtype)
        va = None
        if v is not None:
            va, v_bf16 = _kv(v, "v", dtype)
            if v_bf16 != bf16:
                raise BadRequestError("append: k and v must both be bf16, or neither")
        return self._s.append(_u32(layer, "layer"), ka, va, bf16)

    def set_wkv(self, layer: int, w_kv: Any) -> None:
        """Slim sessions: uploads ``layer``'s ``W_KV``, float32 ``[D, D]`` with
        ``D = kv_heads * head_dim`` and ``V = K @ W_KV`` (K concatenated across heads, pre-RoPE
        or with the session's ``slim_rope``). Sent over shared memory in chunks; required
        before the layer's first append, fixed afterwards.

        Raises:
            kvdex.BadRequestError: not a Slim session, a wrong shape, a non-finite value, or a
            layer that already holds tokens; kvdex.NotFoundError: an unknown layer.
        """
        w = np.ascontiguousarray(as_numpy(w_kv, "w_kv"), dtype=np.float32)
        if w.ndim != 2:
            raise BadRequestError(f"w_kv has shape {list(w.shape)}, expected 2 dimensions (D, D)")
        self._s.set_wkv(_u32(layer, "layer"), w)

    def search(self, layer: int, q: Any, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` keys of ``layer`` by inner product, per query head.

        Args:
            q: ``[q_heads, head_dim]`` queries (converted to float32).
            k: keys per query head; clamped to the layer's length.

        Returns:
            ``(ids, scores)``: new arrays ``[q_heads, k']``, uint32 and float32, best first.
        """
        return self._s.search(_u32(layer, "layer"), _query(q), _u32(k, "k"))

    def search_into(self, layer: int, q: Any, k: int, ids: np.ndarray, scores: np.ndarray) -> int:
        """:meth:`search` into caller arrays ``ids`` (uint32) and ``scores`` (float32), both
        ``[q_heads, k]`` and C-contiguous. Returns ``k'``; row ``h`` is ``flat[h*k':(h+1)*k']``
        when ``k' < k``. Allocates nothing."""
        return self._s.search_into(_u32(layer, "layer"), _query(q), _u32(k, "k"), ids, scores)

    def gather(self, layer: int, kv_head: int, ids: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """K and V rows of token ``ids`` of one KV head: new arrays ``[len(ids), head_dim]`` in the
        session dtype. A bf16 session's rows come back unconverted, as uint16 arrays of the bf16
        bits: :func:`bf16_to_float32` converts them, and
        ``torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)`` makes a bf16 tensor."""
        return self._s.gather(_u32(layer, "layer"), _u32(kv_head, "kv_head"), _ids(ids))

    def seal(self, layer: int, kind: str = "graph", queries: Any = None, positions: Any = None, *,
             neighbours: Any = None) -> int:
        """Seals ``layer``'s prefill and starts the daemon's background build of a ``kind`` index
        per KV head: ``"graph"`` (query-guided), ``"hnsw"`` or ``"flat"``. Tokens appended later
        are inserted incrementally; until the build is done, retrieves scan exactly.

        Args:
            queries: ``[q_heads, n, head_dim]`` prefill queries (float32 after conversion), the
                training signal of the query-guided graph; ``None`` builds from the keys alone.
            positions: ``[n]`` the token position of each query (the build stays causal).
            neighbours: instead of queries, the neighbour lists the engine computed itself
                during prefill (its attention already scored every key, so kvdex skips its own
                exact top-k search, the expensive part of a graph build). Either an integer
                array ``[q_heads, n, m]`` (the top-``m`` token ids of ``n`` queries per query
                head), or a sequence of ``(query_head, ids)`` pairs with ids best first.
                Ids are absolute token positions; static ones (sinks, window) are ignored.

            A training set larger than the session's arena is sent in parts, which the daemon
            keeps until the seal (at most its ``decode.seal_max_staged_queries`` positions).

        Returns:
            The tokens indexed per KV head.

        Raises:
            kvdex.BadRequestError: an unknown kind, mismatched shapes, more training positions
            than the daemon stages, or neighbour lists larger than the session's arena.
        """
        layer = _u32(layer, "layer")
        if neighbours is not None:
            if queries is not None or positions is not None:
                raise BadRequestError("seal: pass either neighbours or queries/positions, not both")
            heads, lens, ids = _neighbour_lists(neighbours, self.q_heads)
            return self._s.seal_neighbours(layer, kind, heads, lens, ids)
        if (queries is None) != (positions is None):
            raise BadRequestError("seal: pass both queries and positions (the training signal), or neither")
        if queries is None:
            return self._s.seal(layer, kind, None, None)
        q = np.ascontiguousarray(as_numpy(queries, "queries"), dtype=np.float32)
        p = np.ascontiguousarray(as_numpy(positions, "positions"))
        if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer) or (p.size and p.min() < 0):
            raise BadRequestError(f"positions must be a 1-D array of non-negative integers, got "
                                  f"{p.dtype} {p.shape}")
        return self._s.seal(layer, kind, q, p.astype(np.uint32))

    def retrieve(self, layer: int, q: Any, k: Optional[int] = None, *, coverage: Optional[float] = None,
                 min_k: int = 1, max_k: Optional[int] = None, attend: bool = True, gather: bool = False,
                 scale: Optional[float] = None, into: Optional[Tuple[int, int]] = None,
                 limits: Optional[Sequence[Optional[int]]] = None, dtype: Optional[str] = None) -> Retrieved:
        """The decode-step request for ``layer``, all query heads at once.

        The daemon searches the non-static tokens (``sinks .. len - window``: the session's own
        values from :meth:`Client.create_session`, or the daemon's ``[decode]`` ones) through
        the layer's index (an exact scan before a build, and for tokens not inserted yet), picks
        the budget, and computes the partial attention and/or copies the chosen K/V rows.

        Several query positions of the sequence go in one request (chunked prefill, speculative
        decoding) with ``q`` shaped ``[P, q_heads, head_dim]``: the heads of every position are
        spread over the daemon's cores, and every result gains a leading ``P`` axis. Position
        ``p`` sees only tokens with id ``< limits[p]`` (its causal limit, e.g. its own position
        + 1 when the chunk's rows were appended first); its retrievable range is
        ``[sinks, min(limits[p], len - window))``, where ``len`` is the layer's length now:
        the window stays relative to the sequence's length, since that is what the engine
        holds and masks itself. A position that sees no retrievable token gets ``k = 0`` and
        ``lse = -inf`` (an empty part of the merge).

        Args:
            q: ``[q_heads, head_dim]`` the step's queries (post-RoPE), converted to float32, or
                ``[P, q_heads, head_dim]`` for ``P`` positions. A torch bfloat16 tensor, or uint16
                bf16 bits with ``dtype="bf16"``, is converted too.
            k: a fixed budget (tokens per head); with ``coverage``, the cap if ``max_k`` is None.
            coverage: adaptive budget: the fewest tokens covering this fraction of the
                estimated attention mass (static tokens included), within ``min_k ..= max_k``.
            attend: compute ``out``/``lse``; gather: copy the candidates' K/V rows.
            scale: softmax scale; ``None`` is ``1/sqrt(head_dim)``.
            into: ``(handle, offset_bytes)``: with ``gather=True``, write the K/V rows straight
                into an engine GPU buffer registered with :meth:`register_cuda_tensor` (or
                :meth:`register_cuda_dest`), at that byte offset, laid out
                ``[H, 2, stride, head_dim]`` (``[P, H, 2, stride, head_dim]`` with positions) in
                the session dtype; ``rows`` is then None. The rows have landed when this returns
                (and the buffer's IPC event, if one was registered, is recorded after them).
            limits: with a 3-D ``q``, one visibility limit per position (``None`` entries, or
                ``limits=None``: every token).
            dtype: ``"bf16"`` when ``q`` is uint16 bf16 bits.

        Raises:
            kvdex.BadRequestError: no budget, a zero budget, bad bounds, a wrong query shape or a
            non-finite value, ``P = 0`` positions, a limit beyond the layer's length;
            kvdex.NotFoundError: an unknown layer.
        """
        args, kw = self._retrieve_args(layer, q, k, coverage, min_k, max_k, attend, gather, scale, limits, dtype)
        if into is not None:
            kw["into"] = (_u32(into[0], "into handle"), _u64(into[1], "into offset"))
        return Retrieved(**self._s.retrieve(*args, **kw))

    def retrieve_async(self, layer: int, q: Any, k: Optional[int] = None, *, coverage: Optional[float] = None,
                       min_k: int = 1, max_k: Optional[int] = None, attend: bool = True, gather: bool = False,
                       scale: Optional[float] = None, limits: Optional[Sequence[Optional[int]]] = None,
                       dtype: Optional[str] = None) -> "PendingRetrieve":
        """:meth:`retrieve` without waiting: the daemon works while the engine computes.

        Returns a :class:`PendingRetrieve`; its ``wait()`` returns the :class:`Retrieved`
        (releasing the GIL while it waits) and ``done()`` says whether it would return at once.
        Several may be in flight (one per layer, say), and other calls may be made meanwhile:
        each pending retrieve owns a part of the session's arena, sized for its largest answer,
        until it is waited on, so a later request never overwrites its results. Wait on every
        pending retrieve. Same arguments as :meth:`retrieve` (no ``into``).

        Raises:
            kvdex.BadRequestError: as :meth:`retrieve` (at once, or from ``wait()`` for what
            the daemon checks), or not enough free arena for another retrieve in flight.
        """
        args, kw = self._retrieve_args(layer, q, k, coverage, min_k, max_k, attend, gather, scale, limits, dtype)
        return PendingRetrieve(self, self._s.submit_retrieve(*args, **kw))

    def _retrieve_args(self, layer: int, q: Any, k: Optional[int], coverage: Optional[float], min_k: int,
                       max_k: Optional[int], attend: bool, gather: bool, scale: Optional[float],
                       limits: Optional[Sequence[Optional[int]]],
                       dtype: Optional[str]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """The native call's arguments of :meth:`retrieve` and :meth:`retrieve_async`."""
        k = None if k is None else _u32(k, "k")
        max_k = None if max_k is None else _u32(max_k, "max_k")
        qa = _query(q, dtype, positions=True)
        lim: Optional[List[int]] = None
        if limits is not None:
            if qa.ndim != 3:
                raise BadRequestError("limits need q shaped [P, q_heads, head_dim] (one row of queries per position)")
            lim = [NO_LIMIT if x is None else _u32(x, f"limits[{i}]", NO_LIMIT - 1) for i, x in enumerate(limits)]
        args = (_u32(layer, "layer"), qa, k, coverage, _u32(min_k, "min_k"), max_k, attend, gather, scale)
        return args, {"limits": lim}

    def register_cuda_dest(self, mem_handle: bytes, offset: int, nbytes: int,
                           event_handle: Optional[bytes] = None) -> int:
        """Offers engine GPU memory to this session as a destination of ``retrieve(into=...)``.

        Args:
            mem_handle: the 64-byte ``cudaIpcGetMemHandle`` of the allocation.
            offset: byte offset of the buffer in that allocation (a multiple of 16).
            nbytes: bytes of the buffer.
            event_handle: optional 64-byte ``cudaIpcGetEventHandle`` of an interprocess event;
                the daemon records it after each gather into the buffer.

        Returns the handle to pass as ``into=(handle, offset)``. The daemon must run the cuda
        transfer backend (a CUDA driver and device); otherwise this raises BadRequestError
        saying so. Ending the session releases every registration.
        """
        return self._s.register_cuda_dest(bytes(mem_handle), _u64(offset, "offset"), _u64(nbytes, "nbytes"),
                                          None if event_handle is None else bytes(event_handle))

    def register_cuda_tensor(self, tensor: Any, event: Any = None) -> int:
        """Offers a contiguous CUDA ``torch.Tensor`` as a destination (see
        :meth:`register_cuda_dest`); ``event``: an optional ``torch.cuda.Event(interprocess=True)``.

        The IPC handle names the whole ``cudaMalloc`` segment that holds the tensor, and the
        tensor's offset in it is sent along. It is taken through the CUDA driver
        (``cuIpcGetMemHandle``), so PyTorch keeps no IPC reference to the storage: freeing the
        tensor returns its block to PyTorch's cache as usual. Keep the tensor alive until
        :meth:`unregister_dest` (or the session's end): the daemon writes wherever it points.
        Where the driver cannot name the memory, PyTorch's own ``_share_cuda_`` is used; that
        pins the block in PyTorch's cache for the rest of the process.
        """
        if not getattr(tensor, "is_cuda", False):
            raise BadRequestError("register_cuda_tensor needs a CUDA torch.Tensor")
        if not tensor.is_contiguous():
            raise BadRequestError("register_cuda_tensor needs a contiguous tensor")
        nbytes = tensor.numel() * tensor.element_size()
        named = _driver_ipc_handle(tensor)
        if named is None:
            named = _torch_ipc_handle(tensor)
        handle, offset = named
        ev = None if event is None else bytes(event.ipc_handle())
        return self.register_cuda_dest(handle, offset, nbytes, ev)

    def unregister_dest(self, handle: int) -> int:
        """Releases a destination (after any gather still writing it); returns how many remain."""
        return self._s.unregister_dest(_u32(handle, "handle"))

    def attend(self, layer: int, q: Any, k: Optional[int] = None, *, coverage: Optional[float] = None,
               min_k: int = 1, max_k: Optional[int] = None,
               scale: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Partial attention over the tokens the daemon retrieves for ``q`` (see :meth:`retrieve`).

        Returns:
            ``(out float32 [q_heads, head_dim], lse float32 [q_heads], k uint32 [q_heads])``: merge
            it with the engine's own part over the static tokens with :func:`kvdex.merge`.
        """
        r = self.retrieve(layer, q, k, coverage=coverage, min_k=min_k, max_k=max_k, attend=True, scale=scale)
        assert r.out is not None and r.lse is not None  # attend=True always returns them
        return r.out, r.lse, r.k

    def truncate(self, tokens: int) -> int:
        """Drops every layer's rows from token ``tokens`` on (speculative decoding's rollback,
        beam pruning); returns the bytes the daemon gave back to its memory budget.

        Retrieves never return the dropped ids. A cut that stays above what a layer's index
        covers (a rollback within the recent window) keeps the index; a deeper one drops it, and
        the layer scans exactly until it is sealed again. Layers shorter than ``tokens`` are left
        as they are.

        Raises:
            kvdex.BadRequestError: ``tokens`` beyond the session's longest layer, or a cut into
            tokens a running index build covers.
        """
        return self._s.truncate(_u64(tokens, "tokens"))

    def fork(self) -> "Session":
        """A new session (its own id, token and region) holding a copy of this one's rows and,
        where the index kind can copy itself, its built indices, as they are now: beam search,
        a shared prompt. The copy is charged to the daemon's memory budget; the two sessions
        then diverge independently. Close it like any session.

        Raises:
            kvdex.BudgetError: no room for the copy; kvdex.BadRequestError: a Slim session;
            kvdex.NotFoundError: a session attached without HTTP (:func:`attach`).
        """
        return Session(self._s.fork(), slim=self.slim)

    def close(self) -> None:
        """Drops the session on the daemon and detaches. Idempotent.

        A session the daemon already ended (it reaped it after a worker failure, say) is simply
        detached.

        Raises:
            kvdex.DisconnectedError: the daemon is gone (the session is detached all the same).
        """
        try:
            self._s.close()
        except NotFoundError:
            pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing (often because the daemon died): closing is best effort, and its own
        # error must not replace the one that explains what went wrong.
        try:
            self.close()
        except KvdexError:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<kvdex.Session {self.id} {state} layers={self.layers} q_heads={self.q_heads} "
                f"kv_heads={self.kv_heads} head_dim={self.head_dim} dtype={self.dtype}>")


class PendingRetrieve:
    """A retrieve in flight (from :meth:`Session.retrieve_async`)."""

    def __init__(self, session: Session, native: "_native.PendingRetrieve") -> None:
        self._session = session
        self._p = native
        self._result: Optional[Retrieved] = None

    def done(self) -> bool:
        """True once the results are ready (``wait()`` then returns at once). Never blocks."""
        return self._result is not None or self._session._s.retrieve_ready(self._p)

    def wait(self) -> Retrieved:
        """Waits for the results (without the GIL) and returns them; later calls return the
        same object.

        Raises:
            kvdex.KvdexError: what the daemon refused, as :meth:`Session.retrieve` would.
        """
        if self._result is None:
            self._result = Retrieved(**self._session._s.wait_retrieve(self._p))
        return self._result

    def __repr__(self) -> str:
        state = "done" if self._result is not None else "pending"
        return f"<kvdex.PendingRetrieve {self._p.request_id} {state}>"


def _neighbour_lists(neighbours: Any, q_heads: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattens neighbour lists into ``(heads, lens, ids)`` uint32 arrays for the wire."""
    def ids_of(a: Any, what: str) -> np.ndarray:
        x = np.asarray(a)
        if not np.issubdtype(x.dtype, np.integer) or (x.size and x.min() < 0):
            raise BadRequestError(f"{what} must hold non-negative integer token ids, got {x.dtype}")
        return x.astype(np.uint32)

    if isinstance(neighbours, np.ndarray) or hasattr(neighbours, "__array__"):
        arr = ids_of(neighbours, "neighbours")
        if arr.ndim != 3 or arr.shape[0] != q_heads:
            raise BadRequestError(f"neighbours array must be [q_heads={q_heads}, n, m], got {arr.shape}")
        h, n, m = arr.shape
        heads = np.repeat(np.arange(h, dtype=np.uint32), n)
        lens = np.full(h * n, m, dtype=np.uint32)
        return heads, lens, np.ascontiguousarray(arr.reshape(-1))
    heads_l, lens_l, parts = [], [], []
    for i, pair in enumerate(neighbours):
        try:
            head, ids = pair
        except (TypeError, ValueError):
            raise BadRequestError(f"neighbours[{i}] must be a (query_head, ids) pair") from None
        x = ids_of(ids, f"neighbours[{i}] ids").reshape(-1)
        heads_l.append(int(head))
        lens_l.append(x.size)
        parts.append(x)
    if any(h < 0 for h in heads_l):
        raise BadRequestError("neighbours: query heads must be non-negative")
    ids_all = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return (np.asarray(heads_l, dtype=np.uint32), np.asarray(lens_l, dtype=np.uint32),
            np.ascontiguousarray(ids_all, dtype=np.uint32))


class Client:
    """A connection to a daemon's control plane (see :func:`connect`)."""

    def __init__(self, native: "_native.Client") -> None:
        self._c = native

    @property
    def url(self) -> str:
        """The daemon's base URL."""
        return self._c.url

    def stats(self) -> Dict[str, Any]:
        """The daemon's ``/stats`` JSON: memory, budget, and per session its layers' token counts
        and index state (``build``: state ``none|building|ready|failed``, heads done, seconds)."""
        try:
            with urllib.request.urlopen(self.url + "/stats", timeout=10) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError) as e:
            raise DisconnectedError(f"GET {self.url}/stats: {e}") from e

    def index_status(self, session: "Session") -> List[Dict[str, Any]]:
        """Per layer of ``session``: ``{"tokens", "index", "indexed", "build": {...}}`` from /stats."""
        for s in self.stats().get("per_session", []):
            if s.get("id") == session.id:
                return list(s.get("layers", []))
        raise KvdexError(f"session {session.id} is not listed in {self.url}/stats")

    def wait_index(self, session: "Session", timeout: float = 600.0, poll: float = 0.2) -> List[Dict[str, Any]]:
        """Waits until every sealed layer of ``session`` has its index built; returns the final
        :meth:`index_status`.

        Raises:
            kvdex.KvdexError: a build failed (with the daemon's reason) or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            layers = self.index_status(session)
            states = [l["build"]["state"] for l in layers]
            failed = [(i, l["build"].get("error")) for i, l in enumerate(layers) if l["build"]["state"] == "failed"]
            if failed:
                raise KvdexError(f"index build failed: layer {failed[0][0]}: {failed[0][1]}")
            if "building" not in states:
                return layers
            if time.monotonic() > deadline:
                done = states.count("ready")
                raise KvdexError(f"index builds not done after {timeout:.0f}s ({done}/{len(states)} layers ready)")
            time.sleep(poll)

    def create_session(self, layers: int, q_heads: int, kv_heads: int, head_dim: int, dtype: str = "f16",
                       payload_bytes: Optional[int] = None, *, slim: bool = False,
                       slim_rope: Optional[Tuple[float, int]] = None, sinks: Optional[int] = None,
                       window: Optional[int] = None, kv_format: Optional[str] = None) -> Session:
        """Creates a session and attaches its shared-memory region.

        Args:
            dtype: storage dtype of K and V: ``"f16"``, ``"bf16"`` or ``"f32"``.
            payload_bytes: the region's payload arena (the largest request + response one call
                carries); the daemon's configured default when ``None``.
            slim: Slim mode (MHA models only, ``q_heads == kv_heads``): the daemon stores K
                alone and recomputes ``V = K @ W_KV`` for the rows a retrieve selects, halving
                the KV memory. Upload each layer's matrix with :meth:`Session.set_wkv` before
                appending to it; ``/stats`` reports the bytes saved.
            slim_rope: ``(theta, rope_dim)`` when the stored keys are post-RoPE (undone before
                ``K @ W_KV``).
            sinks: S, the first tokens of every layer that the engine keeps and retrieval never
                returns; the daemon's ``[decode] sinks`` when ``None``. It must equal what the
                engine attends to itself (e.g. 4 for a StreamingLLM-tuned model), or the merge
                counts tokens twice or never.
            window: W, the most recent tokens that the engine keeps and retrieval never returns;
                the daemon's ``[decode] window`` when ``None``. ``GET /v1/sessions/{id}`` and
                ``/stats`` report the values a session uses.
            kv_format: how the daemon stores K and V: ``"int8"`` (one signed byte per element
                and one bf16 scale per token and KV head, about 0.52x the bytes of f16; search
                and attention read it directly, gathers return the session dtype) or the dtype's
                own name (the default, ``None``).

        Raises:
            kvdex.BadRequestError: a bad shape or dtype, ``slim`` for a GQA shape, or ``sinks``
            or ``window`` negative or over 2**24, or an unknown ``kv_format``, with the daemon's
            message; kvdex.BudgetError:
            no room for another session.
        """
        layers, q_heads, kv_heads, head_dim = (_u32(x, name) for x, name in (
            (layers, "layers"), (q_heads, "q_heads"), (kv_heads, "kv_heads"), (head_dim, "head_dim")))
        if payload_bytes is not None:
            payload_bytes = _u32(payload_bytes, "payload_bytes", 2**64 - 1)
        # The daemon checks the bound (MAX_STATIC_TOKENS) and names the field; here only the type.
        sinks, window = (None if x is None else _u32(x, name, 2**64 - 1)
                         for x, name in ((sinks, "sinks"), (window, "window")))
        return Session(self._c.create_session(layers, q_heads, kv_heads, head_dim, dtype, payload_bytes,
                                              slim, slim_rope, sinks, window, kv_format), slim=slim)


def connect(url: str) -> Client:
    """Connects to the daemon at ``url`` (e.g. ``http://127.0.0.1:7070``) and checks ``/healthz``.

    Raises:
        kvdex.BadRequestError: ``url`` is not an ``http://host:port`` address;
        kvdex.DisconnectedError: nothing answers at ``url``.
    """
    if not isinstance(url, str) or not url.startswith("http://"):
        raise BadRequestError(f"url must look like http://127.0.0.1:7070 (the control plane is plain "
                              f"HTTP), got {url!r}")
    return Client(_native.Client(url))


def attach(shm_path: str, token: str) -> Session:
    """Attaches to an existing session's region directly (no HTTP), with its 32-hex-char token."""
    return Session(_native.attach(shm_path, token))


__all__ = ["Client", "Session", "Retrieved", "PendingRetrieve", "connect", "attach", "as_numpy",
           "bf16_to_float32", "float32_to_bf16"]


def _driver_ipc_handle(tensor: Any) -> Optional[Tuple[bytes, int]]:
    """``(cuIpcGetMemHandle of the allocation holding tensor, tensor's byte offset in it)``
    through the CUDA driver, or None where the driver cannot name it (no libcuda, memory from
    an allocator without IPC handles such as PyTorch's expandable segments)."""
    import ctypes  # noqa: PLC0415 (only engines with CUDA tensors get here)

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    import torch  # noqa: PLC0415 (the tensor is a torch tensor)

    ptr = tensor.data_ptr()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    handle = (ctypes.c_char * 64)()
    # The driver calls act on the thread's current context: make it the tensor's device's.
    with torch.cuda.device(tensor.device):
        torch.cuda.current_stream()  # initialises the runtime on this thread if it was not yet
        if cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)) != 0:
            return None
        if cuda.cuIpcGetMemHandle(ctypes.byref(handle), ctypes.c_uint64(base.value)) != 0:
            return None
    return bytes(handle), ptr - base.value


def _torch_ipc_handle(tensor: Any) -> Tuple[bytes, int]:
    """PyTorch's own IPC handle of the tensor's block (``_share_cuda_``) and the tensor's
    offset in it. PyTorch then counts a consumer that never lets go, so the block stays out of
    its cache for the rest of the process."""
    shared = tensor.untyped_storage()._share_cuda_()
    handle, storage_offset = bytes(shared[1]), shared[3]
    # PyTorch >= 2.5 prefixes the cudaIpcMemHandle with a version byte and a type byte
    # ('c': cudaMalloc'd segment; 'e': an expandable segment, which has no such handle).
    if len(handle) == 66 and handle[1:2] == b"c":
        handle = handle[2:]
    if len(handle) != 64:
        raise BadRequestError(
            f"this PyTorch allocator's IPC handle is {len(handle)} bytes, not a 64-byte "
            "cudaIpcMemHandle (expandable segments?): use register_cuda_dest with a handle from "
            "cudaIpcGetMemHandle")
    return handle, storage_offset + tensor.storage_offset() * tensor.element_size()

"""The client: connect to a daemon, create sessions, append, search, gather.

    import kvdex, numpy as np
    with kvdex.Daemon() as d:                       # or a daemon you run: kvdex serve
        client = kvdex.connect(d.url)
        with client.create_session(layers=30, q_heads=9, kv_heads=3, head_dim=64, dtype="f16") as s:
            s.append(0, k, v)                       # k, v: [kv_heads, tokens, head_dim]
            ids, scores = s.search(0, q, 100)       # q: [q_heads, head_dim]
            k_rows, v_rows = s.gather(0, 0, ids[0])

Every call goes through the Rust client (``kvdex._native``) over the session's shared-memory
region; HTTP is used only to create and drop the session (its token is handled inside).

Results and copies:

- ``search`` and ``gather`` return new numpy arrays: one copy out of the shared-memory arena,
  because the arena is reused by the next request and a view would change under the caller.
- ``search_into`` writes into arrays the caller owns and reuses: no allocation per call.
- ``append`` passes a C-contiguous array in the session dtype to shared memory with no extra
  copy; another float dtype (float32 into an f16 session, or float16 into f32) is converted once.

Inputs: numpy arrays, or anything exporting DLPack or the array protocol (a CPU ``torch.Tensor``
works without kvdex depending on torch). K/V must be float16 or float32; queries are converted
to float32.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from . import _native
from .errors import BadRequestError


def as_numpy(x: Any, what: str) -> np.ndarray:
    """``x`` as a numpy array without copying where possible (numpy, DLPack, array protocol).

    Raises:
        kvdex.BadRequestError: for objects that are neither, or a tensor not in host memory.
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError) as e:
            raise BadRequestError(f"{what}: cannot view this tensor from numpy ({e}); "
                                  "pass a CPU tensor of float16/float32") from e
    if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise BadRequestError(f"{what} must be a numpy array or a tensor, got {type(x).__name__}")


def _kv(x: Any, what: str) -> np.ndarray:
    a = as_numpy(x, what)
    if a.dtype not in (np.float16, np.float32):
        raise BadRequestError(f"{what} must be float16 or float32, got {a.dtype}")
    return np.ascontiguousarray(a)


def _query(x: Any) -> np.ndarray:
    return np.ascontiguousarray(as_numpy(x, "q"), dtype=np.float32)


class Session:
    """An attached session of the daemon (create one with :meth:`Client.create_session`).

    One request is outstanding at a time; calls from several threads are serialised. Use it as
    a context manager, or call :meth:`close`, to drop the session on the daemon.
    """

    def __init__(self, native: "_native.Session") -> None:
        self._s = native
        layers, q_heads, kv_heads, head_dim, dtype = native.shape_tuple
        self.layers: int = layers
        self.q_heads: int = q_heads
        self.kv_heads: int = kv_heads
        self.head_dim: int = head_dim
        self.dtype: str = dtype

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

    def append(self, layer: int, k: Any, v: Any) -> int:
        """Appends tokens to ``layer``; returns the layer's token count afterwards.

        Args:
            k, v: ``[kv_heads, tokens, head_dim]``, float16 or float32.

        Raises:
            kvdex.BadRequestError: wrong dtype or shape; kvdex.NotFoundError: unknown layer;
            kvdex.BudgetError: the daemon's memory budget is exhausted;
            kvdex.DisconnectedError: the session is closed or the daemon is gone.
        """
        return self._s.append(layer, _kv(k, "k"), _kv(v, "v"))

    def search(self, layer: int, q: Any, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` keys of ``layer`` by inner product, per query head.

        Args:
            q: ``[q_heads, head_dim]`` queries (converted to float32).
            k: keys per query head; clamped to the layer's length.

        Returns:
            ``(ids, scores)``: new arrays ``[q_heads, k']``, uint32 and float32, best first.
        """
        return self._s.search(layer, _query(q), k)

    def search_into(self, layer: int, q: Any, k: int, ids: np.ndarray, scores: np.ndarray) -> int:
        """:meth:`search` into caller arrays ``ids`` (uint32) and ``scores`` (float32), both
        ``[q_heads, k]`` and C-contiguous. Returns ``k'``; row ``h`` is ``flat[h*k':(h+1)*k']``
        when ``k' < k``. Allocates nothing."""
        return self._s.search_into(layer, _query(q), k, ids, scores)

    def gather(self, layer: int, kv_head: int, ids: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """K and V rows of token ``ids`` of one KV head: new arrays ``[len(ids), head_dim]`` in the
        session dtype (float32 for bf16 sessions)."""
        return self._s.gather(layer, kv_head, [int(i) for i in ids] if not isinstance(ids, list) else ids)

    def close(self) -> None:
        """Drops the session on the daemon and detaches. Idempotent."""
        self._s.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<kvdex.Session {self.id} {state} layers={self.layers} q_heads={self.q_heads} "
                f"kv_heads={self.kv_heads} head_dim={self.head_dim} dtype={self.dtype}>")


class Client:
    """A connection to a daemon's control plane (see :func:`connect`)."""

    def __init__(self, native: "_native.Client") -> None:
        self._c = native

    @property
    def url(self) -> str:
        """The daemon's base URL."""
        return self._c.url

    def create_session(self, layers: int, q_heads: int, kv_heads: int, head_dim: int, dtype: str = "f16",
                       payload_bytes: Optional[int] = None) -> Session:
        """Creates a session and attaches its shared-memory region.

        Args:
            dtype: storage dtype of K and V: ``"f16"``, ``"bf16"`` or ``"f32"``.
            payload_bytes: the region's payload arena (the largest request + response one call
                carries); the daemon's configured default when ``None``.

        Raises:
            kvdex.BadRequestError: a bad shape or dtype, with the daemon's message;
            kvdex.BudgetError: no room for another session.
        """
        return Session(self._c.create_session(layers, q_heads, kv_heads, head_dim, dtype, payload_bytes))


def connect(url: str) -> Client:
    """Connects to the daemon at ``url`` (e.g. ``http://127.0.0.1:7070``) and checks ``/healthz``.

    Raises:
        kvdex.DisconnectedError: nothing answers at ``url``.
    """
    return Client(_native.Client(url))


def attach(shm_path: str, token: str) -> Session:
    """Attaches to an existing session's region directly (no HTTP), with its 32-hex-char token."""
    return Session(_native.attach(shm_path, token))


__all__ = ["Client", "Session", "connect", "attach", "as_numpy"]

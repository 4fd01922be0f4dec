"""kvdex: the Python client of the kvdex KV-cache offload and retrieval daemon.

The shared-memory protocol is implemented once, in the Rust client; this package is a thin
PyO3 binding of it (``kvdex._native``) plus pure-Python helpers:

- :func:`connect` -> :class:`Client` -> :class:`Session` (append, search, gather); see
  :mod:`kvdex.client` for which results are copies and which calls allocate nothing.
- :class:`Daemon` starts and stops a local ``kvdex serve`` (a context manager).
- :func:`merge` is the exact log-sum-exp merge of two partial attentions;
  :func:`partial_attention` is its numpy reference counterpart.
- :class:`LocalSession` is the daemon's session storage in-process (no daemon, no shared
  memory): the same append/search/gather conventions, for tests and overhead measurement.
  Only in builds with the extension's ``inproc`` feature (the test suite's); ``None`` in the
  package users install, which links the client alone.
- Exceptions: :class:`KvdexError` and its subclasses in :mod:`kvdex.errors`.
"""

from __future__ import annotations

from . import _native

LocalSession = getattr(_native, "LocalSession", None)
from .client import (Client, PendingRetrieve, Retrieved, Session, attach, bf16_to_float32, connect,
                     float32_to_bf16)
from .daemon import Daemon, find_binary
from .errors import (
    BadRequestError,
    BudgetError,
    DaemonError,
    DisconnectedError,
    InternalError,
    KvdexError,
    NotFoundError,
    ProtocolError,
    UnauthorizedError,
)
from .merge import merge, partial_attention

__version__: str = _native.__version__

__all__ = [
    "connect",
    "attach",
    "Client",
    "Session",
    "Retrieved",
    "PendingRetrieve",
    "bf16_to_float32",
    "float32_to_bf16",
    "Daemon",
    "find_binary",
    "LocalSession",
    "merge",
    "partial_attention",
    "KvdexError",
    "BadRequestError",
    "NotFoundError",
    "UnauthorizedError",
    "BudgetError",
    "ProtocolError",
    "DisconnectedError",
    "InternalError",
    "DaemonError",
]

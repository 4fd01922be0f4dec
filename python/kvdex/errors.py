"""Exceptions raised by the kvdex client.

Every error carries the message of the component that detected it (the daemon's JSON
``{"error": ...}`` body, the Rust client, or the binding's own argument checks). Each class also
derives from the closest builtin, so ``except ValueError`` catches bad input as usual.
"""

from __future__ import annotations


class KvdexError(Exception):
    """Base class of every kvdex error."""


class BadRequestError(KvdexError, ValueError):
    """The request was malformed: wrong dtype, shape, layer, token id, ..."""


class NotFoundError(KvdexError, KeyError):
    """An unknown session, layer or other named thing."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnauthorizedError(KvdexError, PermissionError):
    """A missing or wrong session token."""


class BudgetError(KvdexError, MemoryError):
    """The daemon's memory budget, or another limit (e.g. session count), would be exceeded."""


class ProtocolError(KvdexError):
    """The shared-memory protocol was violated (version mismatch, corrupt ring, ...)."""


class DisconnectedError(KvdexError, ConnectionError):
    """The daemon is gone, or the session was closed."""


class InternalError(KvdexError, RuntimeError):
    """The daemon failed inside (a caught bug, an I/O or device fault); it keeps serving other
    sessions. The message says what failed."""


class DaemonError(KvdexError, RuntimeError):
    """A local daemon started by :class:`kvdex.Daemon` failed to start or died."""


__all__ = [
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

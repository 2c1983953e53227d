"""Deadlines and the per-call context, carried by :mod:`contextvars`.

A deadline is absolute (``time.monotonic()``) in this process and relative on the wire
(the DEADLINE header field: milliseconds left), so clocks of the two ends never need to
agree. A handler runs with its caller's deadline set, so a call it makes goes out with
what is left of that budget: nested calls inherit the deadline without any argument.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedOperation

if TYPE_CHECKING:
    import sqlite3

__all__ = ["CallContext", "context", "current_deadline", "deadline"]

_DEADLINE: ContextVar[float | None] = ContextVar("buzon.rpc.deadline", default=None)
_EVENT_LOCK = threading.Lock()
_CURRENT: ContextVar[CallContext | None] = ContextVar("buzon.rpc.context", default=None)
# the running exactly-once call's completion transaction (an SQLite table's), or None
_TXN: ContextVar[Any] = ContextVar("buzon.rpc.transaction", default=None)


@contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Give the calls made inside the block (and the calls their handlers make) at
    most ``seconds`` in total; a call still waiting then raises
    :class:`~buzon.errors.DeadlineExceeded` and the server is told to cancel it.

    Nested blocks can only shorten the budget, never extend it. Yields the absolute
    deadline (``time.monotonic()`` seconds)::

        with buzon.rpc.deadline(0.2):
            calc.slow()        # DeadlineExceeded after 0.2 s
    """
    if not seconds >= 0:
        raise ValueError(f"deadline(seconds): seconds must be >= 0, not {seconds!r}")
    at = time.monotonic() + seconds
    outer = _DEADLINE.get()
    if outer is not None and outer < at:
        at = outer
    token = _DEADLINE.set(at)
    try:
        yield at
    finally:
        _DEADLINE.reset(token)


def current_deadline() -> float | None:
    """The absolute deadline in force here (``time.monotonic()`` seconds), or None."""
    return _DEADLINE.get()


class CallContext:
    """What a handler knows about the call it is running (``buzon.rpc.context()``).

    ``method`` and ``call_id`` name the call, ``peer`` is the caller's
    :class:`~buzon.PeerInfo`, ``deadline`` the absolute deadline (``time.monotonic()``;
    None: none was given) and ``cancelled`` becomes True when the caller gives up: its
    deadline passed, it was interrupted, it sent a cancel, or its connection closed.
    A long handler should look at ``cancelled`` (or :meth:`wait_cancelled`) and stop.
    """

    __slots__ = ("_event", "_gave_up", "call_id", "deadline", "method", "peer")

    def __init__(self, method: str, call_id: int | None, deadline: float | None, peer: Any) -> None:
        self.method = method
        self.call_id = call_id
        self.deadline = deadline
        self.peer = peer
        self._gave_up = False
        self._event: threading.Event | None = None  # made only for wait_cancelled

    @property
    def cancelled(self) -> bool:
        """True once the caller gave up on this call, or its deadline passed."""
        if self._gave_up:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Sleep until the call is cancelled (True) or ``timeout`` passes (False)."""
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        event = self._event
        if event is None:
            with _EVENT_LOCK:  # two waiters must share one event
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        if self._gave_up:  # cancelled before the event existed
            return True
        return event.wait(timeout) or self.cancelled

    @property
    def transaction(self) -> sqlite3.Connection:
        """An SQLite connection on the server's completion table's database, inside a
        transaction that commits together with this call's completion record.

        Only for an ``exactly_once`` call on a server with ``table=PATH``. The first
        access begins the transaction (``BEGIN IMMEDIATE``: the database's write lock
        is held until the call completes); write with it, never commit or roll back:
        when the handler returns, its writes and the recorded reply commit at once
        (so a retry, even after a crash, never sees one without the other); when it
        raises, its writes are rolled back and the error is recorded. Mark such a
        handler :func:`buzon.rpc.transactional` when all its effects go through here:
        a call a crash interrupts is then run again instead of reporting an unknown
        outcome. Raises :class:`~buzon.errors.UnsupportedOperation` otherwise.
        """
        tx = _TXN.get()
        if tx is None or _CURRENT.get() is not self:
            raise UnsupportedOperation(
                f"{self.method}: context().transaction is for exactly_once calls on a server"
                " whose completion table is an SQLite file (Server(..., table=PATH))"
            )
        conn: sqlite3.Connection = tx.connection()
        return conn

    def cancel(self) -> None:
        """Mark the call cancelled (the server does this when the caller gives up)."""
        self._gave_up = True
        event = self._event
        if event is not None:
            event.set()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "running"
        return f"<CallContext {self.method} id={self.call_id} {state}>"


def context() -> CallContext:
    """The :class:`CallContext` of the call being handled by this thread (or task).

    Raises :class:`~buzon.errors.UnsupportedOperation` outside a handler.
    """
    ctx = _CURRENT.get()
    if ctx is None:
        raise UnsupportedOperation("buzon.rpc.context() is only available inside a handler")
    return ctx

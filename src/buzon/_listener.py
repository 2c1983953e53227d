"""What both drivers' listeners share: identity, counters, admission and closing.

Accepted connections run their handshakes concurrently in the listener's
:class:`~buzon._establish.Admission` (see there); a driver's ``accept`` takes the next
established channel (:meth:`ListenerBase._take`) and otherwise waits for
:meth:`ListenerBase.fileno` or the next per-peer deadline (:meth:`ListenerBase._wake_at`).
"""

from __future__ import annotations

import os
import threading
import time

from . import _reduction
from ._channel import ChannelCore
from ._establish import DEFAULT_MAX_PENDING, Admission, Admit
from ._policy import Prepared
from .address import Address
from .errors import BuzonError, ChannelClosed, Timeout
from .transport.base import ListenerTransport, Transport

__all__ = ["ListenerBase"]


class ListenerBase:
    """A bound endpoint; the drivers add ``accept`` (blocking or awaitable)."""

    _label = "buzon.Listener"

    def __init__(
        self, transport: ListenerTransport, prep: Prepared, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        _reduction.register()  # this listener may be handed to a child process
        self._lt = transport
        self._prep = prep
        try:
            self._admission = Admission(transport, prep, max_pending)
        except BaseException:
            transport.close()
            raise
        self.accepted = 0
        self._rejected = 0
        self._closed = False
        self._pid = os.getpid()  # a forked child's inherited copy leaves the endpoint alone
        # accept may be called from several threads: the engine steps under this lock
        # (briefly: it never waits); the waits happen outside it
        self._lock = threading.Lock()

    @property
    def address(self) -> Address:
        """The real address (with the port filled in when listening on port 0)."""
        return self._lt.address

    @property
    def rejected(self) -> int:
        """Peers turned away: failed or timed-out handshakes, evictions, capacity, and
        other users (on Unix sockets); :attr:`refusals` has them by cause."""
        return (
            self._rejected
            + sum(self._admission.refusals.values())
            + int(getattr(self._lt, "rejected", 0))
        )

    @property
    def refusals(self) -> dict[str, int]:
        """Peers turned away by this listener's accept engine, by cause (``authkey``,
        ``credentials``, ``capacity``, ``timeout``, ``pending``, ``handshake``)."""
        return dict(self._admission.refusals)

    @property
    def pending(self) -> int:
        """Connections whose handshake is in progress (they take no handler slot)."""
        return self._admission.pending

    @property
    def evicted(self) -> int:
        """Pending handshakes turned away to make room (``max_pending``)."""
        return self._admission.refusals.get("pending", 0)

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """Readable when ``accept`` may get further: a peer connecting, or a pending
        handshake's peer having sent (or made room for) its next step."""
        return self._admission.fileno() if not self._closed else -1

    def close(self) -> None:
        """Stop listening; the endpoint's name (socket file, FIFO, queue) is removed,
        and peers still in their handshake are dropped; except by a forked child's
        inherited copy of a socket listener (``unix:``, ``tcp://``, ``shm:``), which only
        drops its socket (as :meth:`close_in_child`): the endpoint stays the creating
        process's."""
        if not self._closed and os.getpid() != self._pid:
            self._close_inherited()
            return
        with self._lock:
            if not self._closed:
                self._closed = True
                reg = getattr(self, "_registration", None)  # listen(name=): buzon.names
                if reg is not None:
                    reg.remove()
                self._admission.close()
                self._lt.close()

    def _close_inherited(self) -> None:
        from .errors import UnsupportedOperation

        try:
            self.close_in_child()
        except UnsupportedOperation:  # a single-channel endpoint (fifo:, mq:): as before
            self._lt.close()

    def close_in_child(self) -> None:
        """In a forked child: drop the listening fd without removing the endpoint."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._admission.close(in_child=True)
                self._lt.close_in_child()

    def _set_admit(self, admit: Admit | None) -> None:
        """A server's capacity check, asked as each handshake is about to succeed."""
        self._admission.admit = admit

    @property
    def _queued(self) -> int:
        """Established channels not taken yet."""
        return len(self._admission.ready)

    def _take(self) -> ChannelCore | None:
        """The next established channel's core, or None; never waits."""
        with self._lock:
            if self._closed:
                raise ChannelClosed("the listener is closed")
            admission = self._admission
            if not admission.ready:
                admission.progress()
            if not admission.ready:
                return None
            self.accepted += 1
            return admission.ready.popleft()

    def _screen(self, transport: Transport) -> bool:
        """``accept_transport``: refuse (told, counted) a connection the listener turned
        away at once, as ``accept`` does; True if it may go on to ``establish``."""
        with self._lock:
            return self._admission.screen(transport)

    def _refused(self, exc: BaseException) -> None:
        """``establish`` failed: count the refusal (the handshake told the peer)."""
        if isinstance(exc, BuzonError):
            with self._lock:
                self._admission.count_refusal(exc)

    @property
    def _admit(self) -> Admit | None:
        return self._admission.admit

    def _wake_at(self, deadline: float | None) -> float | None:
        """How long a driver may wait for :meth:`fileno`: until ``deadline`` or the
        next pending peer's deadline; raises :class:`Timeout` once ``deadline`` passed."""
        if deadline is not None and time.monotonic() >= deadline:
            raise Timeout(f"no peer arrived at {self.address} in time")
        wake = self._admission.next_wake()
        if wake is None:
            return deadline
        return wake if deadline is None else min(wake, deadline)

    def _next_wake(self) -> float | None:
        """When ``buzon.wait`` must look again even if nothing is readable: the next
        pending peer's deadline (it is then refused and told so)."""
        return None if self._closed else self._admission.next_wake()

    def _ready(self) -> bool:
        with self._lock:
            if self._closed:
                return True  # accept raises at once
            if not self._admission.ready:
                self._admission.progress()
            return bool(self._admission.ready)

    def __enter__(self) -> ListenerBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self._label} {self.address}{' closed' if self._closed else ''}>"

"""What both drivers' listeners share: identity, counters, readiness and closing."""

from __future__ import annotations

import os
import select

from ._policy import Prepared
from .address import Address
from .transport.base import ListenerTransport

__all__ = ["ListenerBase"]


class ListenerBase:
    """A bound endpoint; the drivers add ``accept`` (blocking or awaitable)."""

    _label = "buzon.Listener"

    def __init__(self, transport: ListenerTransport, prep: Prepared) -> None:
        self._lt = transport
        self._prep = prep
        self.accepted = 0
        self._rejected = 0
        self._closed = False
        self._pid = os.getpid()  # a forked child's inherited copy leaves the endpoint alone

    @property
    def address(self) -> Address:
        """The real address (with the port filled in when listening on port 0)."""
        return self._lt.address

    @property
    def rejected(self) -> int:
        """Peers turned away: failed handshakes and, on Unix sockets, other users."""
        return self._rejected + int(getattr(self._lt, "rejected", 0))

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """Readable when a peer is waiting to be accepted."""
        return self._lt.fileno()

    def close(self) -> None:
        """Stop listening; the endpoint's name (socket file, FIFO, queue) is removed,
        except by a forked child's inherited copy of a socket listener (``unix:``,
        ``tcp://``, ``shm:``), which only drops its socket (as :meth:`close_in_child`):
        the endpoint stays the creating process's."""
        if not self._closed and os.getpid() != self._pid:
            self._close_inherited()
        elif not self._closed:
            self._closed = True
            self._lt.close()

    def _close_inherited(self) -> None:
        from .errors import UnsupportedOperation

        try:
            self.close_in_child()
        except UnsupportedOperation:  # a single-channel endpoint (fifo:, mq:): as before
            self._lt.close()

    def close_in_child(self) -> None:
        """In a forked child: drop the listening fd without removing the endpoint."""
        if not self._closed:
            self._closed = True
            self._lt.close_in_child()

    def _ready(self) -> bool:
        if self._closed:
            return True  # accept raises at once
        poller = select.poll()
        poller.register(self._lt.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def __enter__(self) -> ListenerBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self._label} {self.address}{' closed' if self._closed else ''}>"

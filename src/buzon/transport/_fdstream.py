"""Stream transports over plain fds (pipes, FIFOs) and stream sockets (Unix, TCP).

Shared machinery only; the mechanism modules (``pipe``, ``fifo``, ``unix``, ``tcp``)
choose the fds, the properties and how links are established.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from ..errors import from_oserror
from .base import WOULD_BLOCK, Buffer, LinkProperties, PeerInfo, StreamTransport

__all__ = ["FdStreamTransport", "SocketStreamTransport"]

_IOV_MAX = 1024


class FdStreamTransport(StreamTransport):
    """A pair of fds (either may be -1): one read, one written. Owns both."""

    def __init__(
        self,
        rfd: int,
        wfd: int,
        properties: LinkProperties,
        *,
        scheme: str,
        peer: PeerInfo | None = None,
    ) -> None:
        self._rfd = rfd
        self._wfd = wfd
        self.properties = properties
        self.scheme = scheme
        if peer is not None:
            self.peer = peer
        for fd in (rfd, wfd):
            if fd >= 0:
                os.set_blocking(fd, False)

    def read_fileno(self) -> int:
        return self._rfd

    def write_fileno(self) -> int:
        return self._wfd

    def recv_into(self, buf: memoryview) -> int:
        try:
            return os.readv(self._rfd, (buf,))
        except BlockingIOError:
            return WOULD_BLOCK
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            return WOULD_BLOCK
        except OSError as exc:
            raise from_oserror(exc, f"{self.scheme} read") from exc

    def send_buffers(self, bufs: Sequence[Buffer]) -> int:
        try:
            return os.writev(self._wfd, bufs[:_IOV_MAX])
        except BlockingIOError:
            return WOULD_BLOCK
        except OSError as exc:
            raise from_oserror(exc, f"{self.scheme} write") from exc

    def shutdown_write(self) -> None:
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1


class SocketStreamTransport(StreamTransport):
    """A connected, non-blocking stream socket (Unix or TCP). Owns the socket."""

    def __init__(
        self,
        sock: socket.socket,
        properties: LinkProperties,
        *,
        scheme: str,
        peer: PeerInfo | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._write_open = True
        self.properties = properties
        self.scheme = scheme
        if peer is not None:
            self.peer = peer

    def read_fileno(self) -> int:
        return self._fd

    def write_fileno(self) -> int:
        return self._fd if self._write_open else -1

    def recv_into(self, buf: memoryview) -> int:
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            return WOULD_BLOCK
        except OSError as exc:
            raise from_oserror(exc, f"{self.scheme} recv") from exc

    def send_buffers(self, bufs: Sequence[Buffer]) -> int:
        try:
            if len(bufs) == 1:
                return self.sock.send(bufs[0])
            return self.sock.sendmsg(bufs[:_IOV_MAX])
        except BlockingIOError:
            return WOULD_BLOCK
        except OSError as exc:
            raise from_oserror(exc, f"{self.scheme} send") from exc

    def shutdown_write(self) -> None:
        if self._write_open and not self.closed:
            self._write_open = False
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is already gone; nothing left to tell it

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fd = -1
        self.sock.close()

"""Stream transports over plain fds (pipes, FIFOs) and stream sockets (Unix, TCP).

Shared machinery only; the mechanism modules (``pipe``, ``fifo``, ``unix``, ``tcp``)
choose the fds, the properties and how links are established.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
import struct
import termios
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import from_oserror
from .base import WOULD_BLOCK, Buffer, LinkProperties, PeerInfo, StreamTransport

_INT0 = bytes(4)  # the ioctl's int argument (TIOCOUTQ writes the count into it)

if TYPE_CHECKING:
    import ssl  # the TLS methods import it: importing buzon does not load ssl

__all__ = ["FdStreamTransport", "SocketStreamTransport", "TlsStreamTransport", "accept_one"]


def accept_one(sock: socket.socket, address: object) -> socket.socket | None:
    """One pending connection of a non-blocking listening socket, or None if none is
    pending; connections aborted before we got to them are skipped."""
    while True:
        try:
            return sock.accept()[0]
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                continue
            raise from_oserror(exc, f"accept on {address}") from exc


_IOV_MAX = 1024


class FdStreamTransport(StreamTransport):
    """A pair of fds (either may be -1): one read, one written. Owns both."""

    plain_reads = True

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

    def write_call(self) -> Callable[[bytes], int] | None:
        return functools.partial(os.write, self._wfd) if self._wfd >= 0 else None

    def io_error(self, exc: OSError, writing: bool) -> Exception:
        return from_oserror(exc, f"{self.scheme} {'write' if writing else 'read'}")

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

    plain_reads = True

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
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.properties = properties
        self.scheme = scheme
        if peer is not None:
            self.peer = peer

    def read_fileno(self) -> int:
        return self._fd

    def write_fileno(self) -> int:
        return self._fd

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

    def write_call(self) -> Callable[[bytes], int] | None:
        return self.sock.send

    def read_call(self) -> Callable[[memoryview], int] | None:
        return self.sock.recv_into

    def unacknowledged(self) -> int:
        if not self._tcp or self.closed:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ, _INT0))[0]  # type: ignore[no-any-return]
        except OSError:
            return 0

    def drop_input(self) -> bool:
        for _ in range(64):  # bounded per call: a peer that floods cannot hold it here
            try:
                if not os.read(self._fd, 65536):
                    return False
            except BlockingIOError:
                return True
            except OSError:
                return False
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fd = -1
        self.sock.close()


class TlsStreamTransport(SocketStreamTransport):
    """TLS over a connected TCP socket (an ``ssl.SSLSocket``, non-blocking).

    The TLS handshake is not done here: :meth:`handshake_step` advances it and the
    channel's establishment steps wait for the fd as it asks. Reads drain the TLS
    library's own buffer too (``pending()``), since decrypted bytes waiting there do
    not make the fd readable; writes join their buffers (TLS copies while encrypting).
    """

    plain_reads = False  # decrypted bytes may wait in the TLS object

    def __init__(
        self,
        sock: ssl.SSLSocket,
        properties: LinkProperties,
        *,
        scheme: str,
        peer: PeerInfo | None = None,
    ) -> None:
        super().__init__(sock, properties, scheme=scheme, peer=peer)
        self.tls = sock
        self.tls_pending = True  # the handshake has not completed yet

    def handshake_step(self) -> str | None:
        """Advance the TLS handshake: ``"read"``/``"write"`` to wait for, None when done."""
        import ssl

        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return "read"
        except ssl.SSLWantWriteError:
            return "write"
        except (ssl.SSLError, ssl.CertificateError) as exc:
            from ..errors import HandshakeError

            raise HandshakeError(f"TLS handshake failed: {exc}") from exc
        except OSError as exc:
            raise from_oserror(exc, "TLS handshake") from exc
        self.tls_pending = False
        cert = self.tls.getpeercert()
        extra: dict[str, Any] = {"tls": self.tls.version(), "cipher": self.tls.cipher()}
        if cert:
            extra["peer_certificate"] = cert
        self.peer = PeerInfo(address=self.peer.address, extra=extra)
        return None

    def recv_into(self, buf: memoryview) -> int:
        import ssl

        tls = self.tls
        try:
            n = tls.recv_into(buf)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return WOULD_BLOCK
        except ssl.SSLZeroReturnError:
            return 0
        except ssl.SSLEOFError:
            return 0
        except OSError as exc:
            raise from_oserror(exc, "tls recv") from exc
        # decrypted bytes left inside the TLS object would never wake a poll on the fd
        while n and n < len(buf) and tls.pending():
            try:
                more = tls.recv_into(buf[n:])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not more:
                break
            n += more
        return n

    def write_call(self) -> Callable[[bytes], int] | None:
        return None  # TLS goes through the SSL object (send_buffers, recv_into)

    def read_call(self) -> Callable[[memoryview], int] | None:
        return None

    def send_buffers(self, bufs: Sequence[Buffer]) -> int:
        import ssl

        data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
        try:
            return self.tls.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return WOULD_BLOCK
        except OSError as exc:
            raise from_oserror(exc, "tls send") from exc

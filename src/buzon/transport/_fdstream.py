"""Stream transports over plain fds (pipes, FIFOs) and stream sockets (Unix, TCP).

Shared machinery only; the mechanism modules (``pipe``, ``fifo``, ``unix``, ``tcp``)
choose the fds, the properties and how links are established.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import socket
import struct
import termios
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import from_oserror
from .base import (
    WAIT_BLOCK,
    WAIT_SOCKET,
    WOULD_BLOCK,
    Buffer,
    LinkProperties,
    PeerInfo,
    StreamTransport,
)

_INT0 = bytes(4)  # the ioctl's int argument (TIOCOUTQ writes the count into it)
_PAGE = os.sysconf("SC_PAGE_SIZE")  # a pipe holds its bytes in pages, one per slot

if TYPE_CHECKING:
    import ssl  # the TLS methods import it: importing buzon does not load ssl

__all__ = [
    "WAIT_BLOCK",
    "WAIT_SOCKET",
    "FdStreamTransport",
    "SocketStreamTransport",
    "TlsStreamTransport",
    "accept_one",
]

_DONTWAIT = socket.MSG_DONTWAIT

# plain socket streams of this process: a fork gives the child the same open sockets
_UNSHARED: weakref.WeakSet[SocketStreamTransport] = weakref.WeakSet()


def _shared_by_fork() -> None:
    for t in list(_UNSHARED):
        t.shared = True
    _UNSHARED.clear()


os.register_at_fork(before=_shared_by_fork)


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
    spins_inside_frames = True

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

    def room_for(self, nbytes: int) -> bool:
        # A pipe is a ring of page slots (F_GETPIPE_SZ / page of them). A write fills
        # free slots page by page (after topping up the last one), so free slots are
        # room for certain; the unread bytes (FIONREAD) take at most one slot per page
        # plus one, the reader's partly read page.
        try:
            size = fcntl.fcntl(self._wfd, fcntl.F_GETPIPE_SZ)
            unread: int = struct.unpack("i", fcntl.ioctl(self._wfd, termios.FIONREAD, _INT0))[0]
        except OSError:
            return True  # not a pipe: the write itself decides
        if unread <= 0:
            return True
        return nbytes <= (size // _PAGE - (unread + _PAGE - 1) // _PAGE - 1) * _PAGE

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
    """A connected stream socket (Unix or TCP). Owns the socket.

    The socket is in blocking mode and every call that must not wait passes
    ``MSG_DONTWAIT``: so a blocking receive with no deadline can sleep in ``recv``
    itself, one system call, woken by the data (``wait_frame``'s ``WAIT_BLOCK``; a
    poll then a read cost ~1.4x the round trip on a Unix socket, see
    docs/benchmarks.md). Nothing here depends on that mode: O_NONBLOCK belongs to the
    open file, which another process may share and set; a blocking recv that meets
    it sleeps in poll instead. :attr:`shared`: the socket is (or was) open in another
    process too (passed to it, or held across a fork); its receives then never
    block in recv, because ending one from a ``close()`` in another thread takes
    ``shutdown(SHUT_RD)``, which would reach that process too."""

    plain_reads = True
    dontwait: ClassVar[bool] = True
    shared = False

    def __init__(
        self,
        sock: socket.socket,
        properties: LinkProperties,
        *,
        scheme: str,
        peer: PeerInfo | None = None,
        shared: bool = False,
    ) -> None:
        sock.setblocking(self.dontwait)
        self.sock = sock
        self._fd = sock.fileno()
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.spins_inside_frames = not self._tcp
        self.properties = properties
        self.scheme = scheme
        if peer is not None:
            self.peer = peer
        if shared:
            self.shared = True
        else:
            _UNSHARED.add(self)

    def read_fileno(self) -> int:
        return self._fd

    def write_fileno(self) -> int:
        return self._fd

    def recv_into(self, buf: memoryview) -> int:
        try:
            return self.sock.recv_into(buf, 0, _DONTWAIT)
        except BlockingIOError:
            return WOULD_BLOCK
        except OSError as exc:
            raise from_oserror(exc, f"{self.scheme} recv") from exc

    def send_buffers(self, bufs: Sequence[Buffer]) -> int:
        try:
            if len(bufs) == 1:
                return self.sock.send(bufs[0], _DONTWAIT)
            return self.sock.sendmsg(bufs[:_IOV_MAX], (), _DONTWAIT)
        except BlockingIOError:
            return WOULD_BLOCK
        except OSError as exc:
            raise from_oserror(exc, f"{self.scheme} send") from exc

    def write_call(self) -> Callable[[bytes], int] | None:
        send = self.sock.send

        def write(data: bytes) -> int:
            return send(data, _DONTWAIT)

        return write

    def read_call(self) -> Callable[[memoryview], int] | None:
        return functools.partial(self.sock.recv_into, nbytes=0, flags=_DONTWAIT)

    def room_for(self, nbytes: int) -> bool:
        # The kernel lets a write add to its send queue while the queue's memory is
        # under SO_SNDBUF, one buffer (a Unix socket's: at most 32 KiB; TCP's: a
        # segment train) at a time: a write that meets the limit half-way stops
        # there. The queue's size (SIOCOUTQ: a Unix socket counts the memory of
        # unread buffers, TCP the bytes not yet acknowledged) plus the write, with an
        # eighth and a page more for the buffers' own memory, must stay under it.
        try:
            queued: int = struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ, _INT0))[0]
            if queued <= 0:
                return True
            limit = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except OSError:
            return True
        need = queued + nbytes
        return need + (need >> 3) + _PAGE <= limit

    def wait_mode(self) -> int:
        return WAIT_SOCKET if self.shared else WAIT_SOCKET | WAIT_BLOCK

    def interrupt_reads(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)

    def unacknowledged(self) -> int:
        if not self._tcp or self.closed:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ, _INT0))[0]  # type: ignore[no-any-return]
        except OSError:
            return 0

    def drop_input(self) -> bool:
        fd = self._fd
        sock = self.sock
        plain = self.dontwait
        for _ in range(64):  # bounded per call: a peer that floods cannot hold it here
            try:
                if not (sock.recv(65536, _DONTWAIT) if plain else os.read(fd, 65536)):
                    return False
            except BlockingIOError:
                return True
            except OSError:
                return False
        return True

    def close(self) -> None:
        if self.closed:
            return
        if self.dontwait and not self.shared:
            # a socket closed with unread input (CREDITs nobody reads) makes the peer's
            # kernel report a reset instead of the end of the stream: read it away
            # (bounded; an end another process holds keeps its input for that process)
            self.drop_input()
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
    dontwait: ClassVar[bool] = False  # a non-blocking file: the TLS library reads and writes it

    def wait_mode(self) -> int:
        return 0

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

"""Named pipes (FIFOs): a pipe with a name in the file system.

* ``listen`` creates the FIFO (mode 0600; an existing FIFO is reused only if nobody is
  reading it) and ``accept`` returns its single reader channel. The listener also keeps
  a write end of its own open, so the reader does not see end-of-file each time the
  last writer leaves: a FIFO endpoint is a place many writers come and go.
* ``connect`` opens the write end. A FIFO with no reader cannot be opened for writing
  (``ENXIO``: :class:`ConnectionRefused`) and offers no fd to wait on, so ``connect``
  tries again with a short back-off until its timeout, as for any absent endpoint.
* **Several writers:** the kernel writes at most ``PIPE_BUF`` (4096) bytes atomically.
  Framed messages up to 4096 bytes (header included) from concurrent writers never
  interleave; larger ones may, so processes writing one FIFO at the same time must
  keep their messages that small (or take turns).
"""

from __future__ import annotations

import errno
import os
import select
import stat

from .._runtime import check_endpoint_path
from ..address import Address
from ..errors import ConnectionRefused, EndpointInUse, NoSuchEndpoint, UnsafePath, from_oserror
from ._fdstream import FdStreamTransport
from ._tokens import TokenPool, remove_pools
from .base import Connector, LinkProperties, ListenerTransport, Transport, TransportOptions

__all__ = ["PIPE_BUF", "FifoConnector", "FifoListener", "connect", "listen"]

PIPE_BUF = select.PIPE_BUF

PROPERTIES = LinkProperties(
    transport="fifo",
    direction="simplex",
    boundaries="stream",
    connection_oriented=False,
    reliable=True,
    ordered=True,
    local=True,
    notes=f"many writers, one reader; writes up to {PIPE_BUF} bytes are atomic",
)


class FifoListener(ListenerTransport):
    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.path = addr.fs_path(opts.runtime_dir)
        check_endpoint_path(self.path, must_exist=False)
        self._created = False
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISFIFO(st.st_mode):
                raise EndpointInUse(f"{addr}: {self.path!r} exists and is not a FIFO")
            if _has_reader(self.path):
                raise EndpointInUse(f"{addr}: another process is already reading this FIFO")
            # nobody reads it: left by a crashed listener; a private one is ours now
            self._created = addr.private
        else:
            try:
                os.mkfifo(self.path, 0o600)
            except OSError as exc:
                raise from_oserror(exc, f"mkfifo {self.path}") from exc
            self._created = True
        try:
            os.chmod(self.path, 0o600)
            self._rfd = os.open(
                self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            # Our own write end keeps the reader from seeing EOF between writers.
            self._keepalive = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if getattr(self, "_rfd", -1) >= 0:
                os.close(self._rfd)
            self._cleanup_path()
            raise from_oserror(exc, f"open {self.path}") from exc
        self._tokens: TokenPool | None = None
        if opts.capacity is not None and opts.capacity >= 0:
            try:
                self._tokens = TokenPool.create_fifos(self.path, opts.capacity)
            except BaseException:
                os.close(self._rfd)
                os.close(self._keepalive)
                self._cleanup_path()
                raise
        elif self._created:
            remove_pools(self.path)  # a dead listener's, with a capacity we do not have
        self._ready_r, self._ready_w = os.pipe()
        os.write(self._ready_w, b"!")  # accept() is ready at once, exactly one time
        self._accepted = False

    def fileno(self) -> int:
        return self._ready_r

    def accept(self) -> Transport | None:
        if self._accepted:
            return None
        self._accepted = True
        os.read(self._ready_r, 1)
        rfd, self._rfd = self._rfd, -1
        transport = FdStreamTransport(rfd, -1, PROPERTIES, scheme="fifo")
        transport.tokens, self._tokens = self._tokens, None  # the reader owns the pool now
        return transport

    def _cleanup_path(self) -> None:
        if self._created:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._created = False

    def close(self) -> None:
        if getattr(self, "_tokens", None) is not None:
            assert self._tokens is not None
            self._tokens.close()
            self._tokens = None
        for name in ("_rfd", "_keepalive", "_ready_r", "_ready_w"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._cleanup_path()


def _has_reader(path: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class FifoConnector(Connector):
    want = "retry"

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.path = addr.fs_path(opts.runtime_dir)
        self.capacity = opts.capacity

    def step(self) -> Transport | None:
        check_endpoint_path(self.path, must_exist=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchEndpoint(f"{self.address}: no FIFO at {self.path!r}") from None
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nobody reads yet: connect tries again
                raise ConnectionRefused(f"{self.address}: no process reads the FIFO") from None
            raise from_oserror(exc, f"{self.address}") from exc
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePath(f"{self.address}: {self.path!r} is not a FIFO")
        try:
            tokens = TokenPool.open_fifos(self.path, self.capacity, str(self.address))
        except BaseException:
            os.close(fd)
            raise
        transport = FdStreamTransport(-1, fd, PROPERTIES, scheme="fifo")
        transport.tokens = tokens
        return transport


def listen(addr: Address, opts: TransportOptions) -> FifoListener:
    return FifoListener(addr, opts)


def connect(addr: Address, opts: TransportOptions) -> FifoConnector:
    return FifoConnector(addr, opts)

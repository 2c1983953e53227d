"""The rendezvous of ``shm:`` channels: the listener that creates each peer's rings,
eventfds and space pipes and hands them over the socket, the connector that attaches
them, and the ring size rules (see the package's theory of operation)."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import sys
from typing import Literal

from ...address import Address
from ...errors import (
    ChannelClosed,
    ConnectionRefused,
    HandshakeError,
    PeerCredentialsRejected,
    from_oserror,
)
from ...shm._segment import attach_ring, create_ring, remove_segment
from .._fdstream import accept_one
from ..base import Connector, PeerInfo, Transport, TransportOptions
from ..unix import UnixListener, _check_uid, client_socket, peer_credentials
from ._ring import ShmTransport

__all__ = [
    "CAPACITY",
    "MAX_RING_SIZE",
    "MIN_RING_SIZE",
    "ShmConnector",
    "ShmListener",
    "check_ring_size",
    "connect",
    "listen",
]

CAPACITY = 4 << 20
"""The default ring size: bytes of each direction's ring (a power of two) for a listener
created without ``ring_size=``, read when it is created; messages up to ``ring size -
16`` bytes travel in the ring, larger ones out of line."""

MIN_RING_SIZE = 4 << 10
MAX_RING_SIZE = 1 << 30

_MAGIC = b"BZSHM1\n"
_SETUP_MAX = 512


def _default_capacity() -> int:
    """:data:`CAPACITY` as ``buzon.transport.shm`` has it now: a program may change the
    default there, and listeners created from then on use it."""
    return int(sys.modules[__package__ or ""].CAPACITY)


def check_ring_size(ring_size: object) -> int:
    """Validate ``ring_size=``: a power of two from 4 KiB (``MIN_RING_SIZE``) to 1 GiB
    (``MAX_RING_SIZE``). Each accepted peer gets two rings of this size; tmpfs gives
    them pages only as they are first written, so the size is a bound, not a cost."""
    if isinstance(ring_size, bool) or not isinstance(ring_size, int):
        raise TypeError(f"ring_size must be an int (bytes), not {ring_size!r}")
    if not MIN_RING_SIZE <= ring_size <= MAX_RING_SIZE or ring_size & (ring_size - 1):
        raise ValueError(
            f"ring_size must be a power of two from {MIN_RING_SIZE} (4 KiB) to "
            f"{MAX_RING_SIZE} (1 GiB) bytes, not {ring_size}"
        )
    return ring_size


def _one_slot_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, os.sysconf("SC_PAGE_SIZE"))
    return r, w


class ShmListener(UnixListener):
    """The rendezvous socket (a Unix listener's, same rules); every accepted peer gets
    its own pair of rings of ``ring_size`` bytes (``opts.ring_size``, else
    :data:`CAPACITY` at creation)."""

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        size = opts.ring_size
        self.ring_size = _default_capacity() if size is None else check_ring_size(size)
        super().__init__(addr, opts)

    def __repr__(self) -> str:
        return f"<ShmListener {self.address}>"

    def accept(self) -> Transport | None:
        while True:
            conn = accept_one(self.sock, self.address)
            if conn is None:
                return None
            peer = peer_credentials(conn)
            if peer.uid != os.getuid():  # the rings are 0600: nobody else could attach
                self.rejected += 1
                conn.close()
                continue
            try:
                return self._setup(conn, peer)
            except (BrokenPipeError, ConnectionResetError):
                conn.close()  # the peer left before we could answer
                continue
            except BaseException:
                conn.close()
                raise

    def _setup(self, conn: socket.socket, peer: PeerInfo) -> ShmTransport:
        label = str(self.address)[:50]
        c2s = create_ring(self.ring_size, label=f"{label} c>s")
        s2c = create_ring(self.ring_size, label=f"{label} s>c")
        names = (c2s.name, s2c.name)
        fds: list[int] = []
        try:
            d1 = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds.append(d1)
            d2 = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds.append(d2)
            s1r, s1w = _one_slot_pipe()
            fds += [s1r, s1w]
            s2r, s2w = _one_slot_pipe()
            fds += [s2r, s2w]
            conn.setblocking(False)
            msg = _MAGIC + f"{c2s.name}\n{s2c.name}\n".encode()
            sent = conn.sendmsg(
                [msg],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [d1, d2, s1w, s2r]))],
            )
            if sent != len(msg):  # pragma: no cover - an empty socket takes 100 bytes
                raise HandshakeError(f"{self.address}: short write of the setup message")
            os.close(s1w)
            os.close(s2r)
        except BaseException:
            for fd in fds:
                os.close(fd)
            for ring in (c2s, s2c):
                ring.close()
                remove_segment(ring.name)
            raise
        return ShmTransport(
            conn, s2c, c2s, (d1, d2, s1r, s2w), address=self.address, peer=peer, names=names
        )


class ShmConnector(Connector):
    """Connects to ``NAME.shm``, then waits (readable) for the rings and their fds."""

    want: Literal["read", "write", "retry"] = "write"

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.opts = opts
        self.path = addr.fs_path(opts.runtime_dir)
        self.sock: socket.socket | None = client_socket(addr, self.path, frozenset())
        self._connected = False

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def step(self) -> Transport | None:
        sock = self.sock
        if sock is None:
            raise ChannelClosed(f"connecting to {self.address} was abandoned")
        if not self._connected:
            err = sock.connect_ex(self.path)
            if err in (errno.EAGAIN, errno.EINPROGRESS):
                self.want = "retry"  # backlog full: Unix sockets give no readiness
                return None
            if err:
                self.close()
                if err == errno.ECONNREFUSED:
                    raise ConnectionRefused(f"{self.address}: nobody accepts at {self.path!r}")
                raise from_oserror(OSError(err, os.strerror(err)), str(self.address))
            self._connected = True
            peer = peer_credentials(sock)
            try:
                _check_uid(peer, self.opts, str(self.address))
            except PeerCredentialsRejected:
                self.close()
                raise
            self.want = "read"
        try:
            msg, fds = _recv_fds(sock)
        except (BlockingIOError, InterruptedError):
            return None
        try:
            transport = self._attach(sock, msg, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.close()
            raise
        self.sock = None
        return transport

    def _attach(self, sock: socket.socket, msg: bytes, fds: list[int]) -> ShmTransport:
        if not msg:
            raise ConnectionRefused(f"{self.address}: the listener closed the connection")
        lines = msg.split(b"\n")
        if not msg.startswith(_MAGIC) or len(lines) != 4 or lines[3] or len(fds) != 4:
            raise HandshakeError(f"{self.address}: malformed shared-memory setup message")
        try:
            c2s_name, s2c_name = (n.decode("ascii") for n in lines[1:3])
        except UnicodeDecodeError:
            raise HandshakeError(f"{self.address}: malformed ring names") from None
        c2s = attach_ring(c2s_name)
        try:
            s2c = attach_ring(s2c_name)
        except BaseException:
            c2s.close()
            raise
        for name in (c2s_name, s2c_name):  # both ends attached: nothing left to find
            remove_segment(name)
        d1, d2, s1w, s2r = fds
        peer = peer_credentials(sock)
        return ShmTransport(sock, c2s, s2c, (d2, d1, s2r, s1w), address=self.address, peer=peer)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    size = array.array("i").itemsize
    msg, ancdata, _flags, _addr = sock.recvmsg(
        _SETUP_MAX, socket.CMSG_SPACE(8 * size), socket.MSG_CMSG_CLOEXEC
    )
    got: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % size])
            got.extend(fds)
    return msg, got


def listen(addr: Address, opts: TransportOptions) -> ShmListener:
    """Bind ``NAME.shm``; every accepted peer gets a fresh pair of rings."""
    return ShmListener(addr, opts)


def connect(addr: Address, opts: TransportOptions) -> ShmConnector:
    """Connect to ``NAME.shm`` and attach the rings the listener hands over."""
    return ShmConnector(addr, opts)

"""Datagram sockets (UDP, Unix datagram) as message transports, and the one-shot listener.

The bound ("listening") end of a datagram endpoint is a single channel that receives
from every sender; its ``send`` replies to the most recent sender. The connecting end
is a connected socket that exchanges datagrams with the bound end only.

The socket is kept in blocking mode and every call that must not wait passes
``MSG_DONTWAIT`` (as ``SocketStreamTransport``'s): so a receive with no deadline sleeps
in ``recvmsg`` itself, one system call, instead of a poll then a read
(``Receiver.wait`` with ``blocks``). A ``close()`` from another thread ends such a
sleep (:meth:`DatagramTransport.interrupt_reads`): a bound end sends itself
``KICK``, a datagram that is never a frame and never delivered (another process that
shares the socket skips it too); a connected end, which only its peer may send to,
shuts its reading side down, which would reach another process holding the socket,
so a connected end that is (or was) shared never sleeps in ``recvmsg``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ..address import Address
from ..errors import MessageTooLarge, UnsupportedOperation, from_oserror
from .base import (
    Buffer,
    LinkProperties,
    ListenerTransport,
    MessageTransport,
    PeerInfo,
    Transport,
    nbytes,
)

__all__ = ["DatagramTransport", "SingleChannelListener"]

_SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # Linux; Python does not export it
_ANC_SPACE = socket.CMSG_SPACE(4)
_DONTWAIT = socket.MSG_DONTWAIT

try:  # the receive (and a plain receive's wait) in C: protocol/_dgram.c
    from ..protocol._dgram import KICK, MessageSender, Receiver
    from ..protocol._dgram import SOCKET as _SOCKET
except ImportError:  # pragma: no cover - the extension is always built
    Receiver = MessageSender = None  # type: ignore[assignment,misc]
    _SOCKET = 0
    KICK = b""

# connected ends whose receives may sleep in recvmsg: a fork shares them all
_UNSHARED: weakref.WeakSet[DatagramTransport] = weakref.WeakSet()


def _shared_by_fork() -> None:
    for t in list(_UNSHARED):
        t.shared = True
    _UNSHARED.clear()


os.register_at_fork(before=_shared_by_fork)


def peer_address(raw: bytes, family: int) -> Any:
    """A raw ``sockaddr`` (``Receiver.sender``) as :meth:`socket.socket.recvfrom`
    names it: ``(host, port)`` (IPv6: ``(host, port, flowinfo, scope_id)``), or a
    Unix socket's path (str; bytes for an abstract name; ``""`` unnamed)."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        port = int.from_bytes(raw[2:4], "big")
        scope = int.from_bytes(raw[24:28], sys.byteorder)
        if scope and host.startswith("fe80"):  # link-local: named with its scope
            host = socket.getnameinfo((host, port, 0, scope), socket.NI_NUMERICHOST)[0]
        return host, port, int.from_bytes(raw[4:8], "big"), scope
    path = raw[2:]
    if path[:1] == b"\0":
        return path
    return os.fsdecode(path.split(b"\0", 1)[0])


class DatagramTransport(MessageTransport):
    reports_messages = True  # last_peer: who sent it; dropped: overflows, oversize

    def __init__(
        self,
        sock: socket.socket,
        properties: LinkProperties,
        *,
        scheme: str,
        connected: bool,
        max_message: int,
        on_close: Callable[[], None] | None = None,
        shared: bool = False,
    ) -> None:
        sock.setblocking(True)  # every call that must not wait passes MSG_DONTWAIT
        self.sock = sock
        self._fd = sock.fileno()
        self.properties = properties
        self.scheme = scheme
        self.connected = connected
        self.max_message = max_message
        self._truncated = 0  # datagrams longer than max_message, dropped (no C)
        self._overflows = 0
        self._counts_drops = False
        if sock.family != socket.AF_UNIX:  # Unix datagram senders block instead of dropping
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
                self._counts_drops = True
            except OSError:  # pragma: no cover - kernels without it
                pass
        self._rbuf = bytearray(max_message + 1)
        self._on_close = on_close
        # the one receive of this end (protocol/_dgram.c): last sender, drops, and a
        # plain receive's wait and take in one C call (ChannelCore.wait_message)
        self.receiver = (
            None
            if Receiver is None
            else Receiver(self._fd, _SOCKET, max_message, connected, self._counts_drops)
        )
        self._family = sock.family
        self._sender_raw: bytes | None = None
        self._sender: Any = None
        self._shared = False
        self.shared = shared
        #: a bound Unix socket: (st_dev, st_ino) of the file bind made (its kick's check)
        self.bound_inode: tuple[int, int] | None = None
        if connected and not shared:
            _UNSHARED.add(self)
        if connected:
            try:
                self.peer = PeerInfo(address=sock.getpeername())
            except OSError:
                pass

    def read_fileno(self) -> int:
        return self._fd

    def write_fileno(self) -> int:
        return self._fd

    @property
    def shared(self) -> bool:
        """The socket is (or was) open in another process too (held across a fork, or
        passed to it). A connected end's receives then never sleep in ``recvmsg``
        (ending one takes a shutdown, which would reach that process); a bound end's
        still do (a kick ends them)."""
        return self._shared

    @shared.setter
    def shared(self, value: bool) -> None:
        self._shared = value
        if self.receiver is not None:
            self.receiver.blocks = not (value and self.connected)

    def interrupt_reads(self) -> None:
        """End a wait another thread sleeps in ``recvmsg`` in (the channel is closing,
        and its wake fd was written): a bound end sends itself :data:`KICK`; a
        connected end, or a bound end its own name no longer reaches, shuts its
        reading side down."""
        receiver = self.receiver
        if self.closed or receiver is None or not (receiver.blocks or receiver.in_block):
            return
        if not self.connected:
            try:
                self.sock.sendto(KICK, _DONTWAIT, self._own_address())
                return
            except OSError:
                pass  # no name any more (unlinked, replaced): the shutdown
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def _own_address(self) -> Any:
        """Where this bound socket receives: its name, a wildcard host as loopback;
        OSError when the name now leads elsewhere (a Unix socket's file unlinked or
        replaced)."""
        here = self.sock.getsockname()
        if self._family == socket.AF_UNIX:
            st = os.lstat(here)  # (an unnamed socket: "", FileNotFoundError)
            if (st.st_dev, st.st_ino) != self.bound_inode:
                raise OSError(errno.ESTALE, f"{here!r} is another socket now")
            return here
        if self._family == socket.AF_INET6:
            host = "::1" if here[0] == "::" else here[0]
            return (host, here[1], 0, here[3])
        return ("127.0.0.1" if here[0] == "0.0.0.0" else here[0], here[1])

    @property
    def dropped(self) -> int:
        """Datagrams lost at this end: the kernel's receive-queue overflows (UDP, via
        ``SO_RXQ_OVFL``) plus datagrams over ``max_message`` that were discarded."""
        receiver = self.receiver
        if receiver is not None:
            return receiver.overflows + receiver.truncated
        return self._overflows + self._truncated

    @property
    def truncated(self) -> int:
        """Datagrams longer than ``max_message`` that were dropped, never delivered cut."""
        receiver = self.receiver
        return receiver.truncated if receiver is not None else self._truncated

    @property
    def last_peer(self) -> Any:
        """Who sent the message received last (a bound end; None: connected)."""
        receiver = self.receiver
        if receiver is None:
            return self._sender
        raw = receiver.sender
        if raw is None:  # nothing received here yet (a passed end: what it was told)
            return self._sender
        if raw != self._sender_raw:  # a new sender: named once
            self._sender_raw, self._sender = raw, peer_address(raw, self._family)
        return self._sender

    @last_peer.setter
    def last_peer(self, value: Any) -> None:
        self._sender = value

    def recv_message(self) -> bytes | None:
        receiver = self.receiver
        if receiver is not None:
            try:
                return receiver.recv()
            except OSError as exc:
                raise from_oserror(exc, f"{self.scheme} recv") from exc
        while True:
            try:
                if self._counts_drops:
                    n, anc, _flags, addr = self.sock.recvmsg_into(
                        [self._rbuf], _ANC_SPACE, _DONTWAIT
                    )
                else:  # cheaper: no ancillary data to ask for
                    anc = []
                    n, addr = self.sock.recvfrom_into(self._rbuf, 0, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                raise from_oserror(exc, f"{self.scheme} recv") from exc
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == _SO_RXQ_OVFL and len(data) >= 4:
                    # the kernel's running count of datagrams dropped for a full queue
                    self._overflows = int.from_bytes(data[:4], sys.byteorder)
            if n > self.max_message:
                self._truncated += 1  # over our unit: never deliver a cut datagram
                continue
            if n == len(KICK) and self._rbuf[:n] == KICK:
                continue  # a closing end's kick (interrupt_reads): never a message
            if not self.connected:
                self.last_peer = addr
            return bytes(memoryview(self._rbuf)[:n])

    def small_sender(self, core: object, lock: object, limit: int) -> MessageSender | None:
        if MessageSender is None or self.receiver is None:
            return None
        to = None if self.connected else self.receiver  # a bound end replies to its sender
        return MessageSender(self._fd, _SOCKET, core, lock, limit, to)

    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        first = bufs[0]
        size = nbytes(bufs)
        if size > self.max_message:
            raise MessageTooLarge(
                f"a {self.scheme} datagram carries at most {self.max_message} bytes; "
                f"this message needs {size}"
            )
        try:
            if self.connected:
                if len(bufs) == 1:
                    self.sock.send(first, _DONTWAIT)
                else:
                    self.sock.sendmsg(bufs, (), _DONTWAIT)
            else:
                if self.last_peer is None:
                    raise UnsupportedOperation(
                        f"this bound {self.scheme} end replies to the last sender, "
                        "and nothing has been received yet"
                    )
                self.sock.sendmsg(bufs, (), _DONTWAIT, self.last_peer)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return False
            raise from_oserror(exc, f"{self.scheme} send") from exc
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.receiver is not None:
            self.receiver.close()
        self.sock.close()
        if self._on_close is not None:
            self._on_close()


class SingleChannelListener(ListenerTransport):
    """A listener whose endpoint is one channel: ``accept`` returns it once, then ``None``.

    Its fd is readable until that one accept, so ``buzon.wait`` and the drivers treat it
    like any other listener.
    """

    def __init__(self, address: Address, transport: Transport, cleanup: Callable[[], None]) -> None:
        self.address = address
        self._transport: Transport | None = transport
        self._cleanup = cleanup
        self._efd = os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        return self._efd

    def accept(self) -> Transport | None:
        transport, self._transport = self._transport, None
        if transport is not None:
            os.eventfd_read(self._efd)
        return transport

    def close(self) -> None:
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        if self._transport is not None:
            self._transport.close()  # never accepted: it dies with the listener
            self._transport = None
        self._cleanup()

"""Unix sequenced-packet sockets (``SOCK_SEQPACKET``): connections that keep boundaries.

A ``seqpacket:`` link is set up like ``unix:`` (listen, accept many peers, connect;
``SO_PEERCRED`` checked both ways, same user by default) and moves messages like
``unixgram:``: each frame is one packet, reliable and in order, so no byte stream is
reassembled and no length prefix is needed on the wire.

* The socket file ``NAME.seqpacket`` (or an absolute path) is bound, set to 0600 and
  only then put in listening state; stale files are replaced, live ones refused, and
  close removes the file only if it is still ours (the rules of :mod:`.unix`).
* **Packet size.** The kernel refuses a packet larger than the sender's send buffer
  (less 32 bytes) and allocates each one in a single piece, so both ends raise their
  send buffer to hold :data:`MAX_MESSAGE` (256 KiB, frame header included), which is
  :attr:`LinkProperties.max_message`. A larger message raises
  :class:`~buzon.errors.MessageTooLarge` naming the limit, before anything is sent, and
  the channel stays usable; nothing is fragmented (use ``unix:`` for larger messages).
  Where ``net.core.wmem_max`` keeps the buffer smaller, the limit is what it allows.
* **Receiving.** Each packet is read whole into a buffer of ``max_message + 1`` bytes
  that is anonymous memory, so only the pages a packet really touched are committed.
  A packet larger than that (a foreign peer with a bigger buffer) cannot be read
  whole: it is discarded and reported as :class:`~buzon.errors.FrameError`.
* **End of channel.** A read of zero bytes is the peer's close when the socket reports
  hang-up (``POLLRDHUP``) and no packet with bytes in it is still queued; otherwise it
  was an empty packet (possible with ``raw=True`` only: a frame is never empty), and
  is delivered as ``b""``. (Empty packets that are the last thing a peer sent before
  closing are indistinguishable from its close.)
* **Room.** In-flight packets are bounded by the sender's send buffer; the socket
  polls writable when a quarter of it is free, and a send then always fits.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import select
import socket
import sys
import termios
from collections.abc import Sequence

from .._record import replace
from ..address import Address
from ..errors import (
    EndOfChannel,
    FrameError,
    MessageTooLarge,
    from_oserror,
)
from .base import (
    Buffer,
    LinkProperties,
    MessageTransport,
    PeerInfo,
    Transport,
    TransportOptions,
    nbytes,
)
from .unix import UnixConnector, UnixListener

__all__ = [
    "MAX_MESSAGE",
    "SeqpacketConnector",
    "SeqpacketListener",
    "SeqpacketTransport",
    "connect",
    "listen",
]

MAX_MESSAGE = 256 * 1024
_SKB_OVERHEAD = 32  # the kernel refuses a packet over sk_sndbuf - 32

PROPERTIES = LinkProperties(
    transport="seqpacket",
    direction="duplex",
    boundaries="message",
    connection_oriented=True,
    reliable=True,
    ordered=True,
    local=True,
    max_message=MAX_MESSAGE,
    credentials=True,
    notes="SO_PEERCRED checked: same user by default; one frame per packet",
)


def _packet_limit(sock: socket.socket) -> int:
    """Raise the send buffer to hold a :data:`MAX_MESSAGE` packet; the limit it allows."""
    want = MAX_MESSAGE + _SKB_OVERHEAD
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < want:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)  # the kernel doubles it
        have = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError as exc:
        raise from_oserror(exc, "seqpacket SO_SNDBUF") from exc
    return min(MAX_MESSAGE, have - _SKB_OVERHEAD)


class SeqpacketTransport(MessageTransport):
    """A connected ``SOCK_SEQPACKET`` socket: one message per packet. Owns the socket."""

    scheme = "seqpacket"

    def __init__(self, sock: socket.socket, peer: PeerInfo) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self.peer = peer
        self.max_message = _packet_limit(sock)
        self.properties = (
            PROPERTIES
            if self.max_message == MAX_MESSAGE
            else replace(PROPERTIES, max_message=self.max_message)
        )
        # whole packets up to MAX_MESSAGE (a peer's limit may exceed ours), one byte
        # more to see that one was longer; pages are committed as packets touch them
        self._rmap = mmap.mmap(-1, MAX_MESSAGE + 1)
        self._rbuf = memoryview(self._rmap)

    def read_fileno(self) -> int:
        return self._fd

    def write_fileno(self) -> int:
        return self._fd

    def recv_message(self) -> bytes | None:
        try:
            n = self.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise from_oserror(exc, "seqpacket recv") from exc
        if n > MAX_MESSAGE:
            raise FrameError(
                f"the peer sent a packet of more than {MAX_MESSAGE} bytes, the largest a "
                "seqpacket: channel takes; it was discarded"
            )
        if n == 0 and self._hung_up() and not self._queued():
            raise EndOfChannel("the peer closed the connection")
        return bytes(self._rbuf[:n])

    def _hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))

    def _queued(self) -> bool:
        """Packets with bytes in them still wait (so the zero-byte read was a packet)."""
        count = fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(count, sys.byteorder, signed=True) > 0

    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        first = bufs[0]
        size = nbytes(bufs)
        if size > self.max_message:
            raise MessageTooLarge(
                f"a seqpacket: packet carries at most {self.max_message} bytes (frame "
                f"header included) and this message needs {size}; send it in parts or "
                "use a unix: address for larger messages"
            )
        try:
            if len(bufs) == 1:
                self.sock.send(first)
            else:
                self.sock.sendmsg(bufs)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # no memory for the packet right now
                return False
            raise from_oserror(exc, "seqpacket send") from exc
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fd = -1
        self.sock.close()
        try:
            self._rbuf.release()
            self._rmap.close()
        except BufferError:  # a read in another thread still holds it: the GC frees it
            pass


class SeqpacketListener(UnixListener):
    """A bound, listening ``SOCK_SEQPACKET`` socket at ``NAME.seqpacket`` (mode 0600):
    a Unix listener (same socket file rules, credentials, close) of another type."""

    sock_type = socket.SOCK_SEQPACKET

    def _transport(self, conn: socket.socket, peer: PeerInfo) -> Transport:
        try:
            return SeqpacketTransport(conn, peer)
        except BaseException:
            conn.close()
            raise


class SeqpacketConnector(UnixConnector):
    """Connects to a ``seqpacket:`` listener: a Unix connector of another socket type."""

    sock_type = socket.SOCK_SEQPACKET

    def _transport(self, sock: socket.socket, peer: PeerInfo) -> Transport:
        try:
            return SeqpacketTransport(sock, peer)
        except BaseException:
            sock.close()
            raise


def listen(addr: Address, opts: TransportOptions) -> SeqpacketListener:
    """Bind and listen at ``addr`` (``seqpacket:NAME`` or ``seqpacket:/abs/path``)."""
    return SeqpacketListener(addr, opts)


def connect(addr: Address, opts: TransportOptions) -> SeqpacketConnector:
    """Start connecting to the listener at ``addr``."""
    return SeqpacketConnector(addr, opts)

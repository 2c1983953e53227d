"""Shared-memory channels: ``shm:NAME`` (rendezvous ``NAME.shm`` in the runtime dir).

Theory of operation
-------------------
The messages travel through two rings of :mod:`buzon._core` (one per direction) in two
fresh segments; a Unix stream socket is used only to meet, to hand over what the rings
cannot carry (file descriptors), and to notice the peer's death.

* :func:`listen` binds the socket ``NAME.shm`` (0600, in the private runtime dir, stale
  ones replaced, live ones refused: the same rules as ``unix:``). Its fd is readable
  when a peer connects. ``ring_size=`` (a listener option: :func:`check_ring_size`)
  sizes the rings of every peer it accepts; :data:`CAPACITY` is the default.
* :meth:`ShmListener.accept` checks the peer's uid (``SO_PEERCRED``), creates the two
  rings (``c>s`` and ``s>c``, mode 0600, unguessable names), two eventfds and two
  one-slot pipes, and sends the ring names with four fds (``SCM_RIGHTS``) in a single
  message. It never waits: a fresh socket always has room for one small message.
* The :class:`ShmConnector` connects, waits until that message is readable, attaches
  both rings (validating their headers) and unlinks their names: from then on the two
  processes hold the only mappings and nothing is left in ``/dev/shm`` whatever happens
  to them. The server unlinks them too when it closes, in case the client never came.

Readiness without threads or polling, for both drivers and :func:`buzon.wait`:

* **data**: the reader's fd is an epoll instance watching the ring's *data eventfd* and
  the socket. The ring is *armed* (a flag in its header) whenever the eventfd is empty:
  a producer that commits while the flag is set clears it and writes the eventfd, and
  the reader drains the eventfd only when the ring is empty, then re-arms and checks
  once more. So one wake-up covers a whole burst. Peer death (or close) makes the
  socket readable at EOF.
* **space**: the writer's fd is the write end of a pipe whose size is one page, kept
  non-empty while the writer waits: it polls writable only when the consumer, seeing
  the ring's space flag armed, empties it. If the consumer dies, the pipe loses its
  only reader and polls as an error, which wakes the writer too.

End of channel is the socket's: when every process holding one end has closed it (or
died, even by SIGKILL), the other end's socket reads EOF, and its reader gets every
message that was committed, then :class:`~buzon.errors.EndOfChannel`; a message the
peer had only half written is never delivered (see docs/shm.md). So an end shared with a
forked child (``serve(mode="process")``) stays open while either process holds it,
exactly as a Unix socket does.

Messages larger than the ring travel *out of line*: the sender copies them into a fresh
block segment (:class:`buzon._core.Block`) and sends only its name, in a record flagged
``OOB``; the receiver attaches the block, unlinks its name, copies it out and unmaps it.
The sender keeps its handle on the block until the name is gone (so ``buzon clean``
never sees it unused while it waits in the ring); closing a channel unlinks the blocks
of messages it will never read. The channel's frame cap (``max_frame``) bounds them.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import socket
import weakref
from collections.abc import Callable, Sequence
from typing import Literal

from .. import _core
from ..address import Address
from ..errors import (
    ChannelClosed,
    ConnectionRefused,
    EndOfChannel,
    Full,
    HandshakeError,
    PeerCredentialsRejected,
    ProtocolError,
    from_oserror,
)
from ..shm._segment import SHM_DIR, attach_ring, create_ring, new_segment_name, remove_segment
from ._fdstream import accept_one
from .base import (
    Buffer,
    Connector,
    LinkProperties,
    ListenerTransport,
    MessageTransport,
    PeerInfo,
    RingOps,
    Transport,
    TransportOptions,
)
from .unix import _check_uid, bind_unix_path, client_socket, peer_credentials, unlink_if_ours

__all__ = [
    "CAPACITY",
    "MAX_RING_SIZE",
    "MIN_RING_SIZE",
    "ShmConnector",
    "ShmListener",
    "ShmTransport",
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
_OOB = 1  # record flag: the payload is the name of a block holding the message
_OOB_META = b'{"kind": "oob"}'
_SETUP_MAX = 512
_MAX_PARTS = 64  # the core takes at most this many buffers per message


def _properties(capacity: int) -> LinkProperties:
    return LinkProperties(
        transport="shm",
        direction="duplex",
        boundaries="message",
        connection_oriented=True,
        reliable=True,
        ordered=True,
        local=True,
        max_message=None,
        credentials=True,
        notes=(
            f"two shared-memory rings of {capacity} bytes; larger messages go out of line "
            "in their own segment; a Unix socket only to meet, pass eventfds and notice "
            "the peer's death; same user only"
        ),
    )


_LIVE: weakref.WeakSet[ShmTransport] = weakref.WeakSet()


def _mark_shared() -> None:
    """After a fork, both processes hold every open end: neither may clean up alone."""
    for transport in list(_LIVE):
        transport.shared = True


os.register_at_fork(after_in_parent=_mark_shared, after_in_child=_mark_shared)


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


def _size(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


class ShmTransport(MessageTransport):
    """One end of a shared-memory channel: ``tx`` carries our messages, ``rx`` the peer's.

    ``fds`` are ours to close: (rx data eventfd, tx data eventfd, rx space pipe read
    end, tx space pipe write end).
    """

    scheme = "shm"

    def __init__(
        self,
        sock: socket.socket,
        tx: _core.Ring,
        rx: _core.Ring,
        fds: tuple[int, int, int, int],
        *,
        address: Address,
        peer: PeerInfo,
        names: tuple[str, ...] = (),
    ) -> None:
        self._sock = sock
        self._tx = tx
        self._rx = rx
        self._rx_data, self._tx_data, self._rx_space, self._tx_space = fds
        self._names = names  # segments to unlink on close (server side, if still there)
        rx.set_notify(-1, self._rx_space)
        tx.set_notify(self._tx_data, -1)
        self._ep = select.epoll(2)
        self._ep.register(self._rx_data, select.EPOLLIN)
        self._ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        # Armed from the start: the drivers poll the fd before they try to read, so the
        # first commit must make it readable. The flag is only cleared by a producer
        # that then writes the eventfd, and the eventfd is only drained by recv_message
        # just before it re-arms: "armed or readable" holds at all times.
        if rx.arm_data():
            os.eventfd_write(self._rx_data, 1)
        self.address = address
        self.peer = peer
        self.max_message = 1 << 40  # the frame cap applies; see _send_oob
        self.ring_max = tx.max_message
        self.properties = _properties(tx.capacity)
        self._oob_out: list[_core.Block] = []  # blocks sent, not yet taken by the peer
        self.shared = False  # set at fork: another process may hold this end too
        self.ring_ops = RingOps(
            tx.try_send_frame,
            rx.try_recv_frame,
            rx.spin_wait,
            self._record_message,
            self._frame_counts,
            tx.max_message,
        )
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<ShmTransport {self.address}{' closed' if self.closed else ''}>"

    def read_fileno(self) -> int:
        return -1 if self.closed else self._ep.fileno()

    def write_fileno(self) -> int:
        return -1 if self.closed else self._tx_space

    def close_in_parent(self) -> None:
        """The child serves this end: leave it the ring names (the peer may not have
        attached yet) and the unread messages (it will read them)."""
        self._names = ()
        self.shared = True
        self.close()

    def adopt_in_child(self) -> None:
        """Our parent has let go of this end (:meth:`close_in_parent`), so the segments
        and unread out-of-line messages are ours to remove when we close."""
        self.shared = False

    def _peer_gone(self) -> bool:
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def recv_message(self) -> bytes | None:
        if self.closed:
            raise ChannelClosed(f"{self.address} is closed")
        rx = self._rx
        got = rx.try_recv_flags()
        if got is None:
            woken = True  # by data: the peer is alive, no need to ask the socket
            try:
                os.eventfd_read(self._rx_data)
            except BlockingIOError:
                woken = False
            if rx.arm_data():
                got = rx.try_recv_flags()
            if got is None and not woken and self._peer_gone():
                got = rx.try_recv_flags()  # whatever it committed before it went
                if got is None:
                    raise EndOfChannel(f"the peer of {self.address} closed the channel")
            if got is None:
                return None
        data, flags = got
        return self._take_oob(data) if flags & _OOB else data

    def _frame_counts(self) -> tuple[int, int, int, int]:
        return self._tx.frame_counts()[:2] + self._rx.frame_counts()[2:]

    def _record_message(self, code: int, record: bytes) -> bytes:
        """The message of a record ``Ring.try_recv_frame`` returned as (-1 - flags, record)."""
        return self._take_oob(record) if (-1 - code) & _OOB else record

    def _take_oob(self, ref: bytes) -> bytes:
        name = self._oob_name(ref)
        try:
            block = _core.Block.attach("/" + name)
        except FileNotFoundError:
            raise ProtocolError(f"{self.address}: an out-of-line message vanished") from None
        except OSError as exc:
            raise from_oserror(exc, f"{self.address}: out-of-line message") from exc
        try:
            remove_segment(name)
            with memoryview(block) as view:
                return view.tobytes()
        finally:
            block.close()

    def _oob_name(self, ref: bytes) -> str:
        try:
            name = ref.decode("ascii")
        except UnicodeDecodeError:
            name = ""
        if not name.startswith(f"buzon-{os.getuid()}-") or "/" in name or len(name) > 100:
            raise ProtocolError(f"{self.address}: a malformed out-of-line reference")
        return name

    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        if self.closed:
            raise ChannelClosed(f"{self.address} is closed")
        size = sum(_size(b) for b in bufs)
        if size > self.ring_max:
            return self._send_oob(bufs, size)
        parts: Sequence[Buffer] = bufs if len(bufs) <= _MAX_PARTS else [b"".join(bufs)]
        tx = self._tx
        if tx.try_send(parts):
            return True
        return self._wait_for_room(size, lambda: tx.try_send(parts))

    def _wait_for_room(self, size: int, attempt: Callable[[], bool]) -> bool:
        """Arm the space notification, then try once more; False if still no room."""
        tx = self._tx
        try:
            os.write(self._tx_space, b"\0")  # make the pipe unwritable until drained
        except BlockingIOError:
            pass
        except BrokenPipeError:
            raise EndOfChannel(f"the peer of {self.address} is gone") from None
        if tx.arm_space(size) and attempt():
            return True
        if self._peer_gone():
            raise EndOfChannel(f"the peer of {self.address} closed the channel")
        return False

    def _send_oob(self, bufs: Sequence[Buffer], size: int) -> bool:
        """Send a message larger than the ring: its bytes in a block, its name in the ring."""
        self._reap_oob()
        name = new_segment_name()
        ref = name.encode("ascii")
        loans: list[_core.Loan] = []

        def attempt() -> bool:
            try:
                loans.append(self._tx.reserve(len(ref), 0, _OOB))
            except Full:
                return False
            return True

        if not attempt() and not self._wait_for_room(len(ref), attempt):
            return False
        loan = loans[0]
        try:
            block = _core.Block.create("/" + name, size, _OOB_META)
        except BaseException:
            loan.abort()
            raise
        try:
            with memoryview(block) as view:
                offset = 0
                for buf in bufs:
                    n = _size(buf)
                    view[offset : offset + n] = buf
                    offset += n
            with memoryview(loan) as slot:
                slot[:] = ref
        except BaseException:
            loan.abort()
            block.close()
            remove_segment(name)
            raise
        loan.commit()
        self._oob_out.append(block)
        return True

    def _reap_oob(self) -> None:
        """Drop our handles on blocks the peer has taken (their names are gone)."""
        keep = []
        for block in self._oob_out:
            if os.path.exists(os.path.join(SHM_DIR, block.name.lstrip("/"))):
                keep.append(block)
            else:
                block.close()
        self._oob_out = keep

    def _discard_unread(self) -> None:
        """Unlink the blocks of out-of-line messages we will never read."""
        try:
            while (got := self._rx.try_recv_flags()) is not None:
                if got[1] & _OOB:
                    try:
                        remove_segment(self._oob_name(got[0]))
                    except ProtocolError:
                        pass
        except (EndOfChannel, ProtocolError):
            pass

    def close(self) -> None:
        """Release this process's hold on the channel (the peer sees EOF once every
        holder has closed). Out-of-line messages never read are removed, unless a forked
        process may still read them."""
        if self.closed:
            return
        self.closed = True
        if not self.shared:
            self._discard_unread()
        for block in self._oob_out:
            block.close()  # unread ones stay for the peer; it unlinks what it never reads
        self._oob_out = []
        for ring in (self._tx, self._rx):
            ring.close()
        for name in self._names:
            remove_segment(name)
        self._ep.close()
        self._sock.close()
        for fd in (self._rx_data, self._tx_data, self._rx_space, self._tx_space):
            os.close(fd)


class ShmListener(ListenerTransport):
    """The rendezvous socket; every accepted peer gets its own pair of rings of
    ``ring_size`` bytes (``opts.ring_size``, else :data:`CAPACITY` at creation)."""

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.opts = opts
        self.ring_size = CAPACITY if opts.ring_size is None else check_ring_size(opts.ring_size)
        self.path = addr.fs_path(opts.runtime_dir)
        self.rejected = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._st: os.stat_result | None = None
        try:
            self._st = bind_unix_path(self.sock, addr, self.path)
            self.sock.listen(opts.backlog)
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<ShmListener {self.address}>"

    def fileno(self) -> int:
        return self.sock.fileno()

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

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
        unlink_if_ours(self.path, self._st)
        self._st = None

    def close_in_child(self) -> None:
        self._st = None  # the parent owns the socket file
        self.sock.close()


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

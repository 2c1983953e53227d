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

Messages larger than the ring travel *out of line*: the sender copies them into a block
segment (:class:`buzon._core.Block`) of a small per-connection pool and sends only a
reference (:data:`_REF`), in a record flagged ``OOB``; the receiver maps the block once
(unlinking its name), lends the message as a read-only :class:`buzon._core.BlockView`
(a numpy array received with ``recv`` stays on the block), and gives the block back by
releasing that view: the C core stores 0 in the block's *lease* word, and the sender
reuses it. A sender whose blocks are all sent and not yet taken waits (the receiver
empties the space pipe whenever it takes one); blocks the receiver keeps (arrays alive)
make the sender use one-shot blocks instead. Each new block's fd is handed to the peer
over the socket right away, so the block stays *in use* for ``buzon clean`` until the
receiver has attached it, even if the sender closes or dies first. See docs/shm.md
("Out-of-line blocks") for the lease states and the clean-up rules.

Loans (:meth:`ShmTransport.loan_message`) and views (:meth:`recv_view_message`) lend
the ring record or the block to ``Channel.loan`` / ``Channel.recv_view``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Literal

from .. import _core
from ..address import Address
from ..errors import (
    ChannelClosed,
    ConnectionRefused,
    Empty,
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
    MessageTransport,
    PeerInfo,
    RingOps,
    Transport,
    TransportOptions,
)
from .unix import UnixListener, _check_uid, client_socket, peer_credentials

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
_OOB = 1  # record flag: the payload is a reference (_REF) to a block holding the message
_OOB_META = b'{"kind": "oob"}'
# An out-of-line reference: kind, 0, message bytes, block name, name of a pooled block
# the receiver may unmap (retired by the sender; empty if none), names NUL-padded.
_REF = struct.Struct("<IIQ64s64s")
_ONESHOT = 1  # a block for this message only: the receiver unmaps it when done
_POOLED = 2  # a block of the sender's pool: the receiver keeps it mapped for reuse
# a block's lease word: 0 idle (the receiver released its view), _SENT (set by the
# sender before the reference goes out), _TAKEN (set by the receiver with its view)
_SENT = 1
_TAKEN = 2
POOL_BLOCKS = 4
"""Out-of-line blocks each direction keeps for reuse (more in flight: one-shot blocks)."""
_MAX_CACHED = 64  # pooled blocks a receiver keeps mapped at most (a sane peer: POOL_BLOCKS)
_MAX_HANDED = 256  # handed-over fds a receiver keeps at most
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
        self._oob_out: list[_core.Block] = []  # one-shot blocks, held until taken
        self._pool: list[_core.Block] = []  # our out-of-line blocks, reused once given back
        self._created: dict[str, bool] = {}  # names of blocks we made -> sent in a message
        self._retire: list[str] = []  # pooled blocks the peer may unmap (one per reference)
        self._rx_blocks: dict[str, _core.Block] = {}  # the peer's pooled blocks, mapped
        self._handed: dict[str, int] = {}  # names (and fds, or -1) of the peer's blocks
        self.framed = True  # the channel parses frames (set False by raw channels)
        self.blocks_created = self.blocks_reused = 0
        self.shared = False  # set at fork: another process may hold this end too
        self.ring_ops = RingOps(
            tx.try_send_frame,
            tx.try_send_frames,
            rx.try_recv_frame,
            rx.spin_wait,
            self._record_message,
            self._frame_counts,
            tx.stop_frames,
            rx.stop_frames,
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
        return self._drain_socket()

    def recv_message(self) -> bytes | memoryview | None:
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

    def _record_message(self, code: int, record: bytes) -> bytes | memoryview:
        """The message of a record ``Ring.try_recv_frame`` returned as (-1 - flags, record)."""
        return self._take_oob(record) if (-1 - code) & _OOB else record

    def _take_oob(self, ref: bytes) -> bytes | memoryview:
        """An out-of-line message for ``recv_message``: a frame with out-of-band buffers
        comes as a read-only view of the block (a numpy array decoded from it stays on
        the block, which goes back to the sender's pool when the array is collected);
        anything else is copied out and the block given back at once."""
        view = self._lend(ref)
        data = memoryview(view)
        if not self.framed or len(data) < 4 or data[3] == 0:
            out = data.tobytes()
            data.release()
            view.release()
            return out
        return data

    def _lend(self, ref: bytes) -> _core.BlockView:
        """Attach (or find) the block a reference names; a read-only view of the message."""
        if len(ref) != _REF.size:
            raise ProtocolError(f"{self.address}: a malformed out-of-line reference")
        kind, _, nbytes, raw_name, raw_retire = _REF.unpack(ref)
        name = self._oob_name(raw_name.rstrip(b"\0"))
        retire = raw_retire.rstrip(b"\0")
        if retire:
            old = self._rx_blocks.pop(self._oob_name(retire), None)
            if old is not None:
                with contextlib.suppress(BufferError):  # still lent out: unmapped when done
                    old.close()
        if kind == _POOLED:
            block = self._rx_blocks.get(name)
            if block is None:
                if len(self._rx_blocks) >= _MAX_CACHED:
                    raise ProtocolError(f"{self.address}: the peer pools too many blocks")
                block = self._rx_blocks[name] = self._attach_block(name)
        elif kind == _ONESHOT:
            block = self._attach_block(name)
        else:
            raise ProtocolError(f"{self.address}: an out-of-line reference of unknown kind")
        try:
            view = block.view(0, nbytes)
        except ValueError:
            why = "an out-of-line message overruns its block"
            raise ProtocolError(f"{self.address}: {why}") from None
        block.lease = _TAKEN
        try:  # a sender waiting for a block to be taken waits on this pipe
            os.read(self._rx_space, 64)
        except BlockingIOError:
            pass
        return view

    def _attach_block(self, name: str) -> _core.Block:
        try:
            block = _core.Block.attach("/" + name)
        except FileNotFoundError:
            raise ProtocolError(f"{self.address}: an out-of-line message vanished") from None
        except OSError as exc:
            raise from_oserror(exc, f"{self.address}: out-of-line message") from exc
        if not block.meta().startswith(_OOB_META):  # not a message block: leave it be
            block.close()
            raise ProtocolError(f"{self.address}: an out-of-line reference to another segment")
        remove_segment(name)  # both ends hold it now: nothing left to find in /dev/shm
        fd = self._handed.pop(name, -1)
        if fd < 0:
            self._drain_socket()
            fd = self._handed.pop(name, -1)
        if fd >= 0:
            os.close(fd)  # our own attachment holds it from now on
        return block

    def _oob_name(self, ref: bytes) -> str:
        try:
            name = ref.decode("ascii")
        except UnicodeDecodeError:
            name = ""
        if not name.startswith(f"buzon-{os.getuid()}-") or "/" in name or len(name) > 64:
            raise ProtocolError(f"{self.address}: a malformed out-of-line reference")
        return name

    def _drain_socket(self) -> bool:
        """Take what the peer wrote on the socket (block fds handed over, one name per
        fd); True at end of file (the peer is gone)."""
        size = array.array("i").itemsize
        while True:
            try:
                msg, ancdata, _flags, _addr = self._sock.recvmsg(
                    1024,
                    socket.CMSG_SPACE(16 * size),
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
                )
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            fds = _fds_of(ancdata, size)
            if not msg and not fds:
                return True
            # b"?NAME\n": a block about to be made; b"!NAME\n" with one fd: made
            given = iter(fds)
            for line in msg.split(b"\n"):
                try:
                    name = self._oob_name(line[1:]) if line else ""
                except ProtocolError:
                    name = ""
                fd = next(given, -1) if line[:1] == b"!" else -1
                if name and (name in self._handed or len(self._handed) < _MAX_HANDED):
                    old = self._handed.get(name, -1)
                    if fd >= 0 and old >= 0:
                        os.close(old)
                    self._handed[name] = fd if fd >= 0 else old
                elif fd >= 0:
                    os.close(fd)
            for fd in given:  # more fds than names: not ours to keep
                os.close(fd)

    def recv_view_message(self) -> _core.Loan | _core.BlockView | None:
        """The next message lent in place (a ring record or an out-of-line block),
        ``None`` if none is ready; the caller releases it (``release()``)."""
        if self.closed:
            raise ChannelClosed(f"{self.address} is closed")
        got = self._try_view()
        if got is None:
            woken = True  # see recv_message
            try:
                os.eventfd_read(self._rx_data)
            except BlockingIOError:
                woken = False
            if self._rx.arm_data():
                got = self._try_view()
            if got is None and not woken and self._peer_gone():
                got = self._try_view()
                if got is None:
                    raise EndOfChannel(f"the peer of {self.address} closed the channel")
        return got

    def _try_view(self) -> _core.Loan | _core.BlockView | None:
        try:
            loan = self._rx.recv_view(0)
        except Empty:
            return None
        if not loan.flags & _OOB:
            return loan
        ref = bytes(loan)
        loan.release()
        return self._lend(ref)

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

    def _fill_space_pipe(self) -> None:
        """Make the write fd unwritable until the receiver empties the pipe (it does
        when it frees room or takes a block)."""
        try:
            os.write(self._tx_space, b"\0")
        except BlockingIOError:
            pass
        except BrokenPipeError:
            raise EndOfChannel(f"the peer of {self.address} is gone") from None

    def _wait_for_room(self, size: int, attempt: Callable[[], bool]) -> bool:
        """Arm the space notification, then try once more; False if still no room."""
        self._fill_space_pipe()
        if self._tx.arm_space(size) and attempt():
            return True
        if self._peer_gone():
            raise EndOfChannel(f"the peer of {self.address} closed the channel")
        return False

    def _reserve(self, nbytes: int, flags: int = 0) -> _core.Loan | None:
        """Reserve a ring record of ``nbytes``; None: no room (the notification armed)."""
        loans: list[_core.Loan] = []

        def attempt() -> bool:
            try:
                loans.append(self._tx.reserve(nbytes, 0, flags))
            except Full:
                return False
            return True

        if not attempt() and not self._wait_for_room(nbytes, attempt):
            return None
        return loans[0]

    def _send_oob(self, bufs: Sequence[Buffer], size: int) -> bool:
        """Send a message larger than the ring: its bytes in a block, a reference in the ring."""
        got = self._block_and_ref(size)
        if got is None:
            return False
        block, kind, loan = got
        try:
            offset = 0
            for buf in bufs:
                block.write(offset, buf)  # the GIL released for big parts
                offset += _size(buf)
        except BaseException:
            loan.abort()
            self._give_back(block, kind)
            raise
        self._commit_ref(loan, block, kind, size)
        return True

    def loan_message(self, prefix: bytes, nbytes: int) -> _RingLoan | _BlockLoan | None:
        """Lend the space of one message of ``len(prefix) + nbytes`` bytes, ``prefix``
        written at its start: in the ring if it fits, else in a block of the pool.
        ``None``: no room now (the space notification is armed, as for a send)."""
        if self.closed:
            raise ChannelClosed(f"{self.address} is closed")
        total = len(prefix) + nbytes
        if total <= self.ring_max:
            loan = self._reserve(total)
            return None if loan is None else _RingLoan(loan, prefix)
        got = self._block_and_ref(total)
        if got is None:
            return None
        block, kind, ref = got
        try:
            view = block.view(0, total, readonly=False)
        except BaseException:
            ref.abort()
            self._give_back(block, kind)
            raise
        return _BlockLoan(self, ref, block, kind, view, prefix)

    def _block_and_ref(self, size: int) -> tuple[_core.Block, int, _core.Loan] | None:
        """A block for ``size`` bytes and the ring record that will refer to it, or
        ``None`` (no block or no record now: the block goes back to the pool)."""
        got = self._block_for(size)
        if got is None:
            return None
        block, kind = got
        try:
            ref = self._reserve(_REF.size, _OOB)
        except BaseException:
            self._give_back(block, kind)
            raise
        if ref is None:
            self._give_back(block, kind)
            return None
        return block, kind, ref

    def _block_for(self, size: int) -> tuple[_core.Block, int] | None:
        """A block for ``size`` bytes (see :meth:`_acquire_block`), or ``None`` when the
        receiver has not yet taken the messages already out: then the space pipe is
        armed, and the receiver empties it when it takes one (``_lend``)."""
        got = self._acquire_block(size)
        if got is not None:
            return got
        self._fill_space_pipe()
        got = self._acquire_block(size)
        if got is None and self._peer_gone():
            raise EndOfChannel(f"the peer of {self.address} closed the channel")
        return got

    def _acquire_block(self, size: int) -> tuple[_core.Block, int] | None:
        """A block for ``size`` bytes, its lease set: the smallest idle block of the pool
        that fits; else a new one for the pool (retiring an idle one that is too small
        if the pool is full); else, if every block is taken by the receiver (arrays it
        keeps), a one-shot block; else ``None``: the receiver is behind, wait (so the
        messages sent and not yet taken stay bounded). An end shared after a fork
        uses one-shot blocks only."""
        self._reap_oob()
        if self.shared:  # two processes must not share one pool: one-shot blocks only
            block = self._new_block(size)
            block.lease = _SENT
            return block, _ONESHOT
        pool = self._pool
        best = None
        in_flight = bool(self._oob_out)
        for block in pool:
            lease = block.lease
            if lease == 0:
                if block.size >= size and (best is None or block.size < best.size):
                    best = block
            elif lease == _SENT:
                in_flight = True
        if best is not None:
            self.blocks_reused += 1
            best.lease = _SENT
            return best, _POOLED
        kind = _POOLED
        if len(pool) >= POOL_BLOCKS:
            idle = [b for b in pool if b.lease == 0]
            if idle and len(self._retire) < POOL_BLOCKS:
                old = min(idle, key=lambda b: b.size)
                pool.remove(old)
                self._retire.append(old.name.lstrip("/"))  # told with a next reference
                old.close()
            elif in_flight:
                return None
            else:
                kind = _ONESHOT
        block = self._new_block(_pool_size(size) if kind == _POOLED else size)
        if kind == _POOLED:
            pool.append(block)
        block.lease = _SENT
        return block, kind

    def _new_block(self, size: int) -> _core.Block:
        """Create a block and hand a duplicate of its fd to the peer over the socket: the
        fd in flight holds the block's participant lock, so ``buzon clean`` sees the
        block in use until the receiver has attached it, whatever this process does
        (closes, dies) meanwhile."""
        self._prune_created()
        name = new_segment_name()
        self._tell(b"?" + name.encode("ascii") + b"\n")  # so that a survivor can unlink it
        self._created[name] = False
        block = _core.Block.create("/" + name, size, _OOB_META)
        self.blocks_created += 1
        fd = os.dup(block.fileno())
        try:
            self._tell(b"!" + name.encode("ascii") + b"\n", fd)
        finally:
            os.close(fd)
        return block

    def _tell(self, line: bytes, fd: int = -1) -> None:
        """Write one line (and an fd) to the peer on the socket, never waiting: if the
        socket is full (the peer read nothing for thousands of new blocks) the block
        is only held by us until taken; if the peer is gone, the ring says so soon."""
        rights = array.array("i", [fd]) if fd >= 0 else None
        try:
            self._sock.sendmsg(
                [line],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if rights is not None else [],
                socket.MSG_DONTWAIT,
            )
        except OSError:
            pass

    def _commit_ref(self, loan: _core.Loan, block: _core.Block, kind: int, nbytes: int) -> None:
        name = block.name.lstrip("/")
        retire = self._retire[0] if self._retire else ""
        ref = _REF.pack(kind, 0, nbytes, name.encode("ascii"), retire.encode("ascii"))
        with memoryview(loan) as slot:
            slot[:] = ref
        loan.commit()
        if retire:
            del self._retire[0]
        self._created[name] = True
        if kind == _ONESHOT:
            self._oob_out.append(block)  # held (and counted in flight) until taken

    def _give_back(self, block: _core.Block, kind: int, lent: bool = False) -> None:
        """A block that carries no message after all (``lent``: views of it are still
        alive, so it can never be reused)."""
        if kind == _POOLED and not lent:
            block.lease = 0  # an idle block of the pool again
            return
        name = block.name.lstrip("/")
        if block in self._pool:
            self._pool.remove(block)
            if self._created.get(name, True):
                self._retire.append(name)  # the peer maps it: tell it to let go
        if not self._created.get(name, True):
            del self._created[name]
            remove_segment(name)  # the peer never saw it in the ring
        if not lent:
            block.close()

    def _prune_created(self) -> None:
        """Forget the names of blocks the peer has taken (bounded bookkeeping)."""
        if len(self._created) < 64:
            return
        for name in list(self._created):
            if self._created[name] and not os.path.exists(os.path.join(SHM_DIR, name)):
                del self._created[name]

    def _reap_oob(self) -> None:
        """Drop our handles on one-shot blocks the receiver has taken."""
        if self._oob_out:
            keep = []
            for block in self._oob_out:
                if block.lease == _SENT:
                    keep.append(block)
                else:
                    block.close()
            self._oob_out = keep

    def _discard_unread(self) -> None:
        """Unlink the blocks of out-of-line messages we will never read."""
        try:
            while (got := self._rx.try_recv_flags()) is not None:
                if got[1] & _OOB and len(got[0]) == _REF.size:
                    try:
                        name = self._oob_name(_REF.unpack(got[0])[3].rstrip(b"\0"))
                    except ProtocolError:
                        continue
                    if name not in self._rx_blocks:
                        remove_segment(name)
        except (EndOfChannel, ProtocolError):
            pass

    def block_counters(self) -> dict[str, int]:
        """Out-of-line blocks this end made and reused (``Channel.statistics()``)."""
        return {"blocks_created": self.blocks_created, "blocks_reused": self.blocks_reused}

    def close(self) -> None:
        """Release this process's hold on the channel (the peer sees EOF once every
        holder has closed). Out-of-line messages never read are removed, unless a forked
        process may still read them; so are our blocks the peer never attached if it is
        gone. Loans and views still alive keep their memory until they are released."""
        if self.closed:
            return
        self.closed = True
        if not self.shared:  # (a shared end leaves what the socket holds to the others)
            peer_gone = self._drain_socket()
            self._discard_unread()
            for name, fd in self._handed.items():
                remove_segment(name)  # handed over, never attached: never to be read
                if fd >= 0:
                    os.close(fd)
            for name, sent in self._created.items():
                if peer_gone or not sent:
                    remove_segment(name)  # nobody will ever attach it
        else:
            for fd in self._handed.values():
                if fd >= 0:
                    os.close(fd)
        self._handed = {}
        for block in [*self._oob_out, *self._pool, *self._rx_blocks.values()]:
            with contextlib.suppress(BufferError):  # lent out: unmapped once released
                block.close()
        self._oob_out = []
        self._pool = []
        self._rx_blocks = {}
        for ring in (self._tx, self._rx):
            with contextlib.suppress(BufferError):  # a loan or view still alive holds it
                ring.close()
        for name in self._names:
            remove_segment(name)
        self._ep.close()
        self._sock.close()
        for fd in (self._rx_data, self._tx_data, self._rx_space, self._tx_space):
            os.close(fd)


def _pool_size(n: int) -> int:
    """Round a pooled block's size up (to 1/8 of the power of two below it, at least
    1 MiB) so that messages of similar sizes share blocks."""
    step = max(1 << 20, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _fds_of(ancdata: list[tuple[int, int, bytes]], size: int) -> list[int]:
    got: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % size])
            got.extend(fds)
    return got


class _Lent:
    """A message's space lent to the caller (``ShmTransport.loan_message``): ``buffer``
    is what follows the frame header ``prefix``, ``nbytes`` the whole record."""

    __slots__ = ("_lent", "_whole", "buffer", "nbytes")

    def __init__(self, lent: _core.Loan, prefix: bytes) -> None:
        self._lent = lent
        whole = self._whole = memoryview(lent)
        self.nbytes = whole.nbytes
        whole[: len(prefix)] = prefix
        self.buffer: memoryview | None = whole[len(prefix) :]

    def _views_released(self) -> bool:
        """Release our views; False if the caller still holds views of the buffer."""
        try:
            if self.buffer is not None:
                self.buffer.release()
            self._whole.release()
        except BufferError:
            return False
        finally:
            self.buffer = None
        return True


class _RingLoan(_Lent):
    """The space lent in the ring: the record itself."""

    __slots__ = ("_loan",)

    def __init__(self, loan: _core.Loan, prefix: bytes) -> None:
        super().__init__(loan, prefix)
        self._loan: _core.Loan | None = loan

    def commit(self) -> None:
        loan, self._loan = self._loan, None
        if loan is None:
            raise ValueError("the loan is already finished")
        if not self._views_released():
            raise BufferError(_STILL_VIEWED)  # aborted when those views are collected
        try:
            loan.commit()
        except BufferError:  # views of views (numpy keeps its own memoryview)
            raise BufferError(_STILL_VIEWED) from None

    def abort(self) -> None:
        loan, self._loan = self._loan, None
        if loan is not None and self._views_released():
            with contextlib.suppress(BufferError):  # else aborted when the views go
                loan.abort()


class _BlockLoan(_Lent):
    """The space lent in an out-of-line block; the ring carries ``ref``, its name."""

    __slots__ = ("_block", "_kind", "_ref", "_transport")

    def __init__(
        self,
        transport: ShmTransport,
        ref: _core.Loan,
        block: _core.Block,
        kind: int,
        view: _core.BlockView,
        prefix: bytes,
    ) -> None:
        super().__init__(view, prefix)
        self._transport = transport
        self._ref: _core.Loan | None = ref
        self._block = block
        self._kind = kind

    def _views_released(self) -> bool:
        if not super()._views_released():
            return False
        try:
            self._lent.release()  # the block view itself
        except BufferError:
            return False
        return True

    def commit(self) -> None:
        ref, self._ref = self._ref, None
        if ref is None:
            raise ValueError("the loan is already finished")
        if not self._views_released():
            ref.abort()
            self._transport._give_back(self._block, self._kind, lent=True)
            raise BufferError(_STILL_VIEWED)
        self._transport._commit_ref(ref, self._block, self._kind, self.nbytes)

    def abort(self) -> None:
        ref, self._ref = self._ref, None
        if ref is None:
            return
        ref.abort()
        self._transport._give_back(self._block, self._kind, lent=not self._views_released())


_STILL_VIEWED = (
    "views of the loan are still alive (an array made from it?): delete them before the "
    "loan ends; the message was not sent"
)


class ShmListener(UnixListener):
    """The rendezvous socket (a Unix listener's, same rules); every accepted peer gets
    its own pair of rings of ``ring_size`` bytes (``opts.ring_size``, else
    :data:`CAPACITY` at creation)."""

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.ring_size = CAPACITY if opts.ring_size is None else check_ring_size(opts.ring_size)
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

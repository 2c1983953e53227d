"""The I/O of one ``shm:`` end (:class:`ShmTransport`): the two rings, the readiness
fds, the out-of-line send and receive through blocks, the socket to the peer, and
closing (see the package's theory of operation)."""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ... import _core
from ...address import Address
from ...errors import ChannelClosed, Empty, EndOfChannel, Full, ProtocolError, from_oserror
from ...protocol._frames import RingFrames
from ...shm._segment import SHM_DIR, new_segment_name, remove_segment
from ..base import Buffer, LinkProperties, MessageTransport, PeerInfo, RingOps
from ._loans import _BlockLoan, _RingLoan
from ._pool import (
    _MAX_CACHED,
    _ONESHOT,
    _OOB,
    _OOB_META,
    _POOLED,
    _REF,
    _TAKEN,
    BlockPool,
)
from ._rendezvous import RingRendezvous

__all__ = ["ShmTransport"]

_MAX_HANDED = 256  # handed-over fds a receiver keeps at most
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


def _size(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


class ShmTransport(MessageTransport):
    """One end of a shared-memory channel: ``tx`` carries our messages, ``rx`` the peer's.

    ``fds`` are ours to close: (rx data eventfd, tx data eventfd, rx space pipe read
    end, tx space pipe write end).
    """

    scheme = "shm"
    lends = True  # loans, received views, out-of-line block counters

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
        # our out-of-line blocks: which one carries the next message, and their books
        self._blocks: BlockPool[_core.Block] = BlockPool(self._new_block, remove_segment, _exists)
        self._rx_blocks: dict[str, _core.Block] = {}  # the peer's pooled blocks, mapped
        self._handed: dict[str, int] = {}  # names (and fds, or -1) of the peer's blocks
        self.framed = True  # the channel parses frames (set False by raw channels)
        self.rendezvous: RingRendezvous | None = None  # capacity=0 (start_rendezvous)
        self.shared = False  # set at fork: another process may hold this end too
        # the frame format's one-call send and receive on our rings (protocol/_frames.c;
        # the rings themselves move opaque records)
        self._tx_frames = tx_frames = RingFrames(tx)
        self._rx_frames = rx_frames = RingFrames(rx)
        self.ring_ops = RingOps(
            tx_frames.try_send_frame,
            tx_frames.try_send_frames,
            rx_frames.try_recv_frame,
            rx.spin_wait,
            self._record_message,
            self._frame_counts,
            tx_frames.stop,
            rx_frames.stop,
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

    # -- capacity=0: the rendezvous in the ring itself (_rendezvous.py) --------------------

    ring_rendezvous = True

    def start_rendezvous(self) -> RingRendezvous:
        """Put both rings in rendezvous mode (``capacity=0``) and return the calls a
        rendezvous send makes on them."""
        if self.closed:
            raise ChannelClosed(f"{self.address} is closed")
        self.rendezvous = RingRendezvous(self, self._tx, self._rx)
        return self.rendezvous

    def block_withdrawn(self, block: _core.Block, kind: int) -> None:
        """The out-of-line message in ``block`` was withdrawn (never delivered)."""
        self._blocks.withdrawn(block, kind)

    def peer_gone(self) -> bool:
        """The peer closed its end or died (reads what the socket brought)."""
        return self._drain_socket()

    def socket_fileno(self) -> int:
        return self._sock.fileno()

    def lending(self) -> bool:
        """A loan (``Channel.loan``, in the ring or in a block: its reference is a ring
        record) or a received view of a ring record (``recv_view``) is still open."""
        return bool(self._tx.loans or self._rx.loans)

    # -- passing this end to another process (buzon._reduction) ------------------------

    def export(self, slot: Callable[[int], int]) -> tuple[object, ...]:
        """What another process needs to hold this end too, every fd named by
        ``slot(fd)`` (it travels through ``multiprocessing``'s fd passing): the socket,
        both rings' segments (nameless once both ends attached: attached again there
        by fd), the four notify fds, the peer's pooled blocks we map and the blocks
        handed to us not yet attached. From now on two processes hold this end, as
        after a fork (``shared``): neither removes what the other may still read, and
        each sends its large messages in one-shot blocks."""
        if self.closed:
            raise ChannelClosed(f"{self.address} is closed")
        self.shared = True
        return (
            slot(self._sock.fileno()),
            slot(self._tx.fileno()),
            slot(self._rx.fileno()),
            tuple(
                slot(fd) for fd in (self._rx_data, self._tx_data, self._rx_space, self._tx_space)
            ),
            self.address,
            self.peer,
            tuple((name, slot(b.fileno())) for name, b in self._rx_blocks.items()),
            tuple((name, slot(fd)) for name, fd in self._handed.items()),
        )

    @classmethod
    def rebuild(cls, parts: tuple[Any, ...], fds: list[int]) -> ShmTransport:
        """The other process's side of :meth:`export` (``fds``: what the slots name, now
        ours; each is kept or closed here, also on failure)."""
        sock_at, tx_at, rx_at, notify, address, peer, rx_blocks, handed = parts
        made: list[Any] = []

        def attach(kind: Any, at: int) -> Any:
            seg = kind.attach(f"/proc/self/fd/{fds[at]}")  # our own description and slot
            made.append(seg)
            return seg

        sock = None
        try:
            tx = attach(_core.Ring, tx_at)
            rx = attach(_core.Ring, rx_at)
            blocks = {name: attach(_core.Block, at) for name, at in rx_blocks}
            four = (fds[notify[0]], fds[notify[1]], fds[notify[2]], fds[notify[3]])
            sock = socket.socket(fileno=fds[sock_at])
            self = cls(sock, tx, rx, four, address=address, peer=peer)
        except BaseException:
            if sock is not None:
                sock.detach()  # closed below with the others
            for seg in made:
                with contextlib.suppress(Exception):
                    seg.close()
            for fd in set(fds):
                os.close(fd)
            raise
        self.shared = True
        self._rx_blocks = blocks
        self._handed = {name: fds[at] if at >= 0 else -1 for name, at in handed}
        kept = {fds[sock_at], *four, *self._handed.values()}
        for fd in set(fds) - kept:  # the segments' fds: attached above through our own
            os.close(fd)
        return self

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
        return self._tx_frames.counts()[:2] + self._rx_frames.counts()[2:]

    def _record_message(self, code: int, record: bytes) -> bytes | memoryview:
        """The message of a record ``RingFrames.try_recv_frame`` returned as
        (-1 - flags, record)."""
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
        """A block for ``size`` bytes (see :meth:`BlockPool.acquire`), or ``None`` when the
        receiver has not yet taken the messages already out: then the space pipe is
        armed, and the receiver empties it when it takes one (``_lend``)."""
        got = self._blocks.acquire(size, shared=self.shared)
        if got is not None:
            return got
        self._fill_space_pipe()
        got = self._blocks.acquire(size, shared=self.shared)
        if got is None and self._peer_gone():
            raise EndOfChannel(f"the peer of {self.address} closed the channel")
        return got

    def _new_block(self, size: int) -> _core.Block:
        """Create a block and hand a duplicate of its fd to the peer over the socket: the
        fd in flight holds the block's participant lock, so ``buzon clean`` sees the
        block in use until the receiver has attached it, whatever this process does
        (closes, dies) meanwhile."""
        name = new_segment_name()
        self._tell(b"?" + name.encode("ascii") + b"\n")  # so that a survivor can unlink it
        self._blocks.announce(name)
        block = _core.Block.create("/" + name, size, _OOB_META)
        self._blocks.made()
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
        ref, retired = self._blocks.reference(block, kind, nbytes)
        with memoryview(loan) as slot:
            slot[:] = ref
        loan.commit()
        self._blocks.sent(block, kind, retired)
        if self.rendezvous is not None:  # capacity=0: a withdrawal gives the block back
            self.rendezvous.last_block = (self._tx.last_put(), block, kind)

    def _give_back(self, block: _core.Block, kind: int, lent: bool = False) -> None:
        """A block that carries no message after all (see :meth:`BlockPool.give_back`)."""
        self._blocks.give_back(block, kind, lent)

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
        return self._blocks.counters()

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
            for name, sent in self._blocks.created.items():
                if peer_gone or not sent:
                    remove_segment(name)  # nobody will ever attach it
        else:
            for fd in self._handed.values():
                if fd >= 0:
                    os.close(fd)
        self._handed = {}
        for block in [*self._blocks.release(), *self._rx_blocks.values()]:
            with contextlib.suppress(BufferError):  # lent out: unmapped once released
                block.close()
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


def _fds_of(ancdata: list[tuple[int, int, bytes]], size: int) -> list[int]:
    got: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % size])
            got.extend(fds)
    return got


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))

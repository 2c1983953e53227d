"""The shared broadcast ring of a ``"broadcast"`` mailbox (used by :mod:`buzon._mailbox`).

Theory of operation
-------------------
A broadcast mailbox has, beside its ring (which carries its settings and identity and
no messages), one *broadcast ring*: the segment named after the ring with ``-bcast``
appended (``buzon._bcast``, whose C file has the layout). Every message is written into
it once, by whichever sender sends it; each attached receiver reads it at its own
cursor, in a receiver entry of the segment's header. The backlog (``capacity``, or for
``capacity=None`` the messages of ``max_inline`` bytes that ``max_bytes`` holds, down to
a power of two) is how far a receiver may lag: a receiver further behind loses its
oldest messages (drop-oldest; it counts them itself in its entry, and
``statistics()["dropped"]`` sums them over the mailbox's receivers). A send never
waits, for room or for a receiver.

A record a receiver hands to the general way (a receipt record, say) moves its
cursor only when the general way is done with it (``Bcast.commit``, or the next
receive): a receipt's acknowledgement is written before the cursor says the message
was read, which is how a receipt's sender tells a copy lost from one on its way
(``Shared.lost_copies``).

A receiver attaches on its first receive (or ``buzon.wait``): it takes a free entry
(one whose OFD write lock on byte ``entry`` of the segment it can take) and starts at
the current head, so it gets every message sent after it attached. It holds that lock
while attached; the kernel drops it when the receiver dies, so a dead receiver's entry
is told from a live one by a lock test: the next receiver that takes the entry (or a
receipt's sender counting receivers) adds its counts to the segment's totals first
(its unread backlog as lost). A receiver that closes does so itself. Every mailbox
object also holds a shared (read) lock on byte ``_USED``: ``buzon clean`` sees the
segment in use (its participant bytes are 0-127) while any object has it open.

An out-of-line message (a frame larger than ``max_inline``) is a block of its own; its
record ("\\0OOL" + the block's name) is read by every receiver, so no receiver removes
the block: the sender that reuses the record's slot (``NSLOTS`` messages later) gets
the record back from ``Bcast.send``/``put`` and unlinks the block, and ``remove()``
unlinks those still in the ring. A receiver that finds the block gone was lapped: it
takes the next message.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from typing import TYPE_CHECKING, Any

from ._bcast import Bcast
from ._mailbox_fan import _PID
from .errors import BuzonError, NoSuchEndpoint
from .shm._segment import SHM_DIR, remove_segment

if TYPE_CHECKING:
    from ._mailbox import Mailbox

__all__ = ["MAX_RECEIVERS", "Shared", "counts", "create", "segment_name"]

SUFFIX = "-bcast"
MAX_RECEIVERS = 127  # entries 0-126: byte i of the segment is receiver i's liveness lock
_USED = 127  # every mailbox object's shared lock: the segment is in use (buzon clean)
_FLOCK = struct.Struct("hhqqi4x")
_OOL = b"\x00OOL"


def segment_name(ring_segment: str) -> str:
    """The broadcast ring's segment name for a mailbox ring ``ring_segment``."""
    return ring_segment + SUFFIX


def _path(ring_segment: str) -> str:
    return SHM_DIR + "/" + segment_name(ring_segment).lstrip("/")


def limit_of(capacity: int | None, max_inline: int, max_bytes: int) -> int:
    """The backlog in messages: ``capacity``, or for None what ``max_bytes`` holds in
    slots of ``max_inline`` bytes, down to a power of two."""
    if capacity is not None:
        return max(1, capacity)
    n = max(1, max_bytes // (16 + max_inline))
    return 1 << (n.bit_length() - 1)


def create(ring_segment: str, capacity: int | None, max_inline: int, max_bytes: int) -> None:
    """Make the (empty) broadcast ring of the mailbox ring ``ring_segment``."""
    fd = os.open(
        _path(ring_segment),
        os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    try:
        limit = limit_of(capacity, max_inline, max_bytes)
        Bcast(fd, True, limit, max(64, max_inline), None, None, 0, 0).close()
    except BaseException:
        os.unlink(_path(ring_segment))
        raise
    finally:
        os.close(fd)


def _lock(fd: int, kind: int, byte: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    except OSError as exc:
        if exc.errno in (11, 13):  # EAGAIN, EACCES: held by another description
            return False
        raise
    return True


def _held(fd: int, byte: int) -> bool:
    """True while some other open file description holds a lock on ``byte``."""
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
    except OSError:
        return True  # cannot tell: never reclaim on doubt
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)


def _unlink_ool(record: bytes) -> None:
    if record[:4] == _OOL:
        try:
            remove_segment(record[4:].decode("ascii", "replace"))
        except BuzonError:
            pass  # not a name of ours (scribbled): nothing to remove


class Shared:
    """One mailbox object's mapping of the broadcast ring: as a sender, and once it
    received, as a receiver (its entry)."""

    def __init__(self, box: Mailbox, encode: Any, decode: Any) -> None:
        self.box = box
        self.path = _path(box._segment)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchEndpoint(f"mailbox {box.name!r} lost its broadcast ring") from None
        try:
            self.ring = Bcast(self.fd, False, 0, 0, encode, decode, box._fast_max, box._uid)
            _lock(self.fd, fcntl.F_RDLCK, _USED)
        except BaseException:
            os.close(self.fd)
            raise
        self.ring.notify_fd = box._wake_fd
        self.ring.title = box._ring.title
        self.ring.mark_fd = box._wake_fd
        self.payload = int(self.ring.payload)
        self.pid = _PID[0]
        self.entry = -1  # this object's receiver entry, once it received
        self.lock = threading.Lock()  # threads sharing this object: one attaches

    def next_id(self) -> int:
        """A new message id (the hot path draws from the same counter)."""
        self.ring.next_id += 1
        return int(self.ring.next_id)

    # ---- the receiver's side ------------------------------------------------------------

    def _forked(self) -> None:
        """In a forked child: its own description (the inherited one shares the
        parent's locks) and no entry (the parent's stays the parent's)."""
        if self.pid == _PID[0]:
            return
        self.pid = _PID[0]
        fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.close(self.fd)  # (the parent's locks stay: it holds the description too)
        self.fd = fd
        _lock(self.fd, fcntl.F_RDLCK, _USED)
        self.entry = -1

    def subscribe(self) -> int:
        """This object's receiver entry, attaching first if needed."""
        if self.entry >= 0 and self.pid == _PID[0]:
            return self.entry
        with self.lock:
            self._forked()
            if self.entry >= 0:
                return self.entry
            ring = self.ring
            for i in range(MAX_RECEIVERS):
                state = ring.entry(i)[0]
                if state and _held(self.fd, i):
                    continue  # a live receiver's
                if not _lock(self.fd, fcntl.F_WRLCK, i):
                    continue  # attached meanwhile
                if state:  # a dead receiver's: its counts join the totals first
                    self._retire(i)
                ring.attach(i)
                self.entry = i
                return i
        raise BuzonError(f"mailbox {self.box.name!r} has {MAX_RECEIVERS} receivers already")

    def _retire(self, i: int) -> None:
        """Entry i (whose lock we hold) leaves: its counts, its unread backlog as lost,
        join the totals, and it is free."""
        state, _pid, reached, taken, dropped, depth = self.ring.entry(i)
        if state:
            self.ring.retire(reached, taken, dropped, depth)
            self.ring.free_entry(i)

    def unsubscribe(self) -> None:
        """Leave (close): this receiver's counts join the totals, its entry is free."""
        if self.entry < 0 or self.pid != _PID[0]:
            return
        self.ring.commit()  # (a record handed to the general way counts as taken)
        i, self.entry = self.entry, -1
        try:
            self._retire(i)
        finally:
            _lock(self.fd, fcntl.F_UNLCK, i)

    def depth(self) -> int:
        """Messages this receiver has yet to read (0 before it attached)."""
        if self.entry < 0 or self.pid != _PID[0]:
            return 0
        return int(self.ring.entry(self.entry)[5])

    # ---- the sender's side ---------------------------------------------------------------

    def receivers(self) -> int:
        """How many receivers are attached now (dead ones found are retired)."""
        return len(self.receiver_entries())

    def receiver_entries(self) -> list[tuple[int, int, int]]:
        """(entry, pid, start) of each receiver attached now (dead ones found are
        retired): whom a receipt's message goes to."""
        self._forked()
        out = []
        for i in range(MAX_RECEIVERS):
            if not self.ring.entry(i)[0]:
                continue
            if i == self.entry or _held(self.fd, i):
                state, pid, start, _cursor = self.ring.cursor(i)
                if state:
                    out.append((i, pid, start))
            elif _lock(self.fd, fcntl.F_WRLCK, i):  # dead: retired by whoever locks it
                try:
                    self._retire(i)
                finally:
                    _lock(self.fd, fcntl.F_UNLCK, i)
        return out

    def put(self, record: list[Any]) -> int:
        """Write a record the general way built (a whole frame, or an out-of-line
        reference); its message number. A reused slot's out-of-line block is unlinked."""
        data = b"".join(bytes(p) if type(p) is not bytes else p for p in record)
        n, old = self.ring.put(data, data[:4] == _OOL, True)
        if old is not None:
            _unlink_ool(old)
        return n

    def lost_copies(self, n: int, entries: list[tuple[int, int, int]]) -> list[tuple[int, bool]]:
        """For each receiver entry ``(entry, pid, start)`` that message ``n`` went to:
        ``(pid, settled)``, settled once the receiver is past message ``n`` (took it,
        its acknowledgement then written already, or lost it) or gone (closed, dead:
        its entry free or another receiver's)."""
        out = []
        for i, pid, start in entries:
            state, now_pid, now_start, cursor = self.ring.cursor(i)
            gone = state != 1 or now_pid != pid or now_start != start
            out.append((pid, gone or cursor > n))
        return out

    def dropped(self) -> int:
        """Messages the mailbox's receivers lost to the overflow rule (those attached
        now, and those gone)."""
        total = int(self.ring.info()["dropped"])
        for i in range(MAX_RECEIVERS):
            e = self.ring.entry(i)
            if e[0]:
                total += e[4]
        return total

    # ---- remove and close ----------------------------------------------------------------

    def shutdown_all(self) -> None:
        """remove(): receivers get EndOfChannel; the out-of-line blocks of messages still
        in the ring and the segment are unlinked."""
        self.ring.shutdown()
        for record in self.ring.out_of_line():
            _unlink_ool(record)
        remove_segment(segment_name(self.box._segment))

    def close(self) -> None:
        self.unsubscribe()
        self.ring.close()
        os.close(self.fd)  # (its locks go with it)


def counts(ring_segment: str) -> tuple[int, int, int, int, int, set[int]] | None:
    """``buzon ls``: (reached, taken, dropped, lost, depth, live receivers' pids) of the
    broadcast ring of mailbox ring ``ring_segment``, without attaching as a receiver: a
    message counts once per receiver it reached; a dead receiver not yet retired counts
    its unread backlog as lost. None if there is no broadcast ring."""
    try:
        fd = os.open(_path(ring_segment), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        ring = Bcast(fd, False, 0, 0, None, None, 0, 0)
    except (BuzonError, OSError):
        os.close(fd)
        return None
    try:
        info = ring.info()
        reached, taken, dropped, lost = (
            info["reached"],
            info["taken"],
            info["dropped"],
            info["lost"],
        )
        depth = 0
        pids: set[int] = set()
        for i in range(MAX_RECEIVERS):
            state, pid, r, t, d, left = ring.entry(i)
            if not state:
                continue
            reached, taken, dropped = reached + r, taken + t, dropped + d
            if _held(fd, i):
                depth += left
                pids.add(pid)
            else:
                lost += left
        return reached, taken, dropped, lost, depth, pids
    finally:
        ring.close()
        os.close(fd)

"""The receivers of a ``"round_robin"`` mailbox: a table of their own rings, and how
senders hand messages to them (used by :mod:`buzon._mailbox`; a ``"broadcast"`` mailbox
has one shared ring instead: :mod:`buzon._mailbox_bcast`).

Theory of operation
-------------------
Such a mailbox has, beside its ring (which carries its settings and identity and, for
these policies, no messages), a *subscriber table*: the block segment named after the
ring with ``-subs`` appended. The table is a u64 generation (bumped by every change)
at offset 0 and ``MAX_RECEIVERS`` entries of 64 bytes from offset 64, each the
NUL-padded segment name of one receiver's ring, or empty. The table changes only
under the block's lock (a robust process-shared mutex: a holder's death frees it).

A receiver attaches on its first receive (or ``buzon.wait``): it creates its own ring
(its *backlog*: the mailbox's capacity, in messages or in bytes), writes its name into
a free entry, and holds an OFD write lock on byte ``LIVE_BASE + entry`` of the table's
segment for as long as it is attached; the kernel drops that lock when the receiver
dies, which is how senders tell a dead receiver from a slow one.

A sender reads the generation on each send and re-reads the table (attaching new
rings, closing vanished ones) only when it changed. Each message goes into one ring,
the next live receiver's after the one this sender used last (turns are per sender). A
receiver found dead is removed from the table and its ring unlinked (the messages in
its backlog are lost with it, at most once, counted in ``dropped``). A receiver that
closes leaves the table first and forwards what was still in its backlog to the others.

Overflow: a full receiver is passed over for the next one; a sender waits (``send``) or
raises ``Full`` (``send_nowait``) only when every live receiver's backlog is full.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from typing import TYPE_CHECKING, Any

from . import _core
from .errors import BuzonError, EndOfChannel, NoSuchEndpoint
from .shm._segment import SHM_DIR, attach_ring, remove_segment

if TYPE_CHECKING:
    from ._mailbox import Mailbox

__all__ = ["MAX_RECEIVERS", "Fan"]

MAX_RECEIVERS = 128
_ENTRY = 64
_TABLE = 64
_SIZE = _TABLE + MAX_RECEIVERS * _ENTRY
LIVE_BASE = 1024  # receiver i's liveness lock: byte LIVE_BASE + i (slot locks use 0-127)
_GEN = struct.Struct("<Q")
# at offset 8: (committed, consumed, lost) of the receivers' rings gone so far (closed,
# found dead), added under the table's lock: with the live rings' own counters they
# are the mailbox's counts (``buzon ls``: _mailbox.describe)
RETIRED = struct.Struct("<3Q")
_RETIRED_AT = 8
_FLOCK = struct.Struct("hhqqi4x")
_LOCK_TIMEOUT = 5.0
_OOL = b"\x00OOL"


_PID = [os.getpid()]  # this process's pid, kept current by a fork hook (no getpid call)
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def table_name(segment: str) -> str:
    """The subscriber table's segment name for a mailbox ring ``segment``."""
    return segment + "-subs"


def create_table(segment: str) -> None:
    """Make the (empty) subscriber table of the mailbox ring ``segment``."""
    block = _core.Block.create(table_name(segment), _SIZE, b'{"kind": "mailbox-subs"}', 128)
    block.close()


class Fan:
    """One mailbox object's view of the subscriber table: as a sender (the receivers'
    rings it has attached) and, once it received, as a receiver (its own entry)."""

    def __init__(self, box: Mailbox) -> None:
        self.box = box
        name = table_name(box._segment)
        try:
            self.block = _core.Block.attach(name)
        except FileNotFoundError:
            raise NoSuchEndpoint(f"mailbox {box.name!r} lost its receiver table") from None
        # the generation, read on every send: one view kept (released by close)
        self._view = memoryview(self.block)
        self._gen_view = self._view[:8].cast("Q")
        self.path = SHM_DIR + "/" + name.lstrip("/")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self.pid = os.getpid()
        self.gen = -1
        self.targets: list[tuple[int, str, _core.Ring]] = []
        self.rings: dict[str, _core.Ring] = {}
        self.mine: tuple[int, _core.Ring] | None = None
        self.turn = 0
        self.dropped = 0
        # threads sharing this object: one refreshes the table's rings or subscribes at a time
        self.lock = threading.RLock()

    # ---- the table -------------------------------------------------------------------

    def _entries(self) -> list[tuple[int, str]]:
        view = memoryview(self.block)
        try:
            out = []
            for i in range(MAX_RECEIVERS):
                raw = bytes(view[_TABLE + i * _ENTRY : _TABLE + (i + 1) * _ENTRY])
                name = raw.rstrip(b"\0").decode("ascii", "replace")
                if name:
                    out.append((i, name))
            return out
        finally:
            view.release()

    def _generation(self) -> int:
        view = memoryview(self.block)
        try:
            return int(_GEN.unpack_from(view, 0)[0])
        finally:
            view.release()

    def _set(self, i: int, name: str) -> None:
        """Write entry i and bump the generation (the block's lock held)."""
        self.block.write(_TABLE + i * _ENTRY, name.encode("ascii").ljust(_ENTRY, b"\0"))
        self.block.write(0, _GEN.pack(self._generation() + 1))

    def _add_retired(self, committed: int, consumed: int, lost: int) -> None:
        """Add a departed receiver's counts to the table's totals (the lock held)."""
        view = memoryview(self.block)
        try:
            was = RETIRED.unpack_from(view, _RETIRED_AT)
        finally:
            view.release()
        now = (was[0] + max(0, committed), was[1] + max(0, consumed), was[2] + max(0, lost))
        self.block.write(_RETIRED_AT, RETIRED.pack(*now))

    def _retire_ring(self, name: str) -> None:
        """Receiver ring ``name`` goes with what is in it (its receiver died): its
        counts join the totals, its backlog as lost (the lock held)."""
        try:
            info = _core.inspect(name)
        except (OSError, BuzonError):
            return
        depth = max(0, int(info["committed"] - info["consumed"] - info["abandoned"]))
        self._add_retired(info["committed"], info["consumed"], info["abandoned"] + depth)

    def retire(self, committed: int, consumed: int, lost: int) -> None:
        """:meth:`_add_retired` under the table's lock (nothing if the table is gone)."""
        try:
            self._lock()
        except BuzonError:
            return
        try:
            self._add_retired(committed, consumed, lost)
        finally:
            self.block.unlock()

    def _lock(self) -> None:
        self.block.lock(_LOCK_TIMEOUT)

    def _forked(self) -> None:
        """In a forked child: its own liveness fd (the inherited one shares the
        parent's open file description, hence the parent's lock) and no subscription
        (the parent's entry and backlog stay the parent's)."""
        if self.pid == _PID[0]:
            return
        self.pid = _PID[0]
        os.close(self.fd)  # the parent's lock stays: it holds the description too
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self.mine = None

    def live(self, i: int) -> bool:
        """True while receiver i holds its liveness lock (our own entry: always)."""
        self._forked()
        if self.mine is not None and self.mine[0] == i:
            return True
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, LIVE_BASE + i, 1, 0)
        try:
            got = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, probe)
        except OSError:
            return True  # cannot tell: never drop on doubt
        return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)

    # ---- the receiver's side ------------------------------------------------------------

    def subscribe(self) -> _core.Ring:
        """This object's own ring, attaching it to the table first if needed."""
        mine = self.mine
        if mine is not None and self.pid == _PID[0]:  # the hot path: no call
            return mine[1]
        self._forked()
        if self.mine is not None:
            return self.mine[1]
        with self.lock:
            if self.mine is not None:
                return self.mine[1]
            return self._subscribe()

    def _subscribe(self) -> _core.Ring:
        box = self.box
        ring = box._new_backlog()
        try:
            self._lock()
            try:
                taken = {i: n for i, n in self._entries()}
                for i in range(MAX_RECEIVERS):
                    if i in taken and self.live(i):
                        continue
                    lock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, LIVE_BASE + i, 1, 0)
                    try:
                        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, lock)
                    except OSError:
                        continue  # attached meanwhile (its name is not written yet)
                    if i in taken:  # a dead receiver's: its backlog goes with it
                        self._retire_ring(taken[i])
                        remove_segment(taken[i])
                    self._set(i, ring.name)
                    self.mine = (i, ring)
                    return ring
            finally:
                self.block.unlock()
        except BaseException:
            ring.close()
            remove_segment(ring.name)
            raise
        ring.close()
        remove_segment(ring.name)
        raise BuzonError(f"mailbox {box.name!r} has {MAX_RECEIVERS} receivers already")

    def unsubscribe(self) -> list[bytes]:
        """Leave the table; return what was still in this receiver's backlog."""
        self._forked()
        if self.mine is None:
            return []
        i, ring = self.mine
        left = []
        try:
            self._lock()
            try:
                if (i, ring.name) in self._entries():
                    self._set(i, "")
            finally:
                self.block.unlock()
        except BuzonError:
            pass  # the table is gone (removed): nothing to leave
        unlock = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, LIVE_BASE + i, 1, 0)
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, unlock)
        while True:
            try:
                data = ring.try_recv()
            except EndOfChannel:
                break
            if data is None:
                break
            left.append(data)
        info = ring.info()  # its counts join the totals; what it left is not taken here
        self.retire(info["committed"] - len(left), info["consumed"] - len(left), info["abandoned"])
        name = ring.name
        ring.close()
        remove_segment(name)
        self.mine = None
        return left

    # ---- the sender's side -----------------------------------------------------------------

    def receivers(self) -> list[tuple[int, str, _core.Ring]]:
        """The attached receivers' rings (re-read when the table changed)."""
        gen = self._gen_view[0]
        if gen == self.gen:
            return self.targets
        with self.lock:
            return self._refresh(gen)

    def _refresh(self, gen: int) -> list[tuple[int, str, _core.Ring]]:
        entries = self._entries()
        names = {n for _, n in entries}
        for name in list(self.rings):
            if name not in names:
                self.rings.pop(name).close()
        targets = []
        for i, name in entries:
            ring = self.rings.get(name)
            if ring is None:
                try:
                    ring = attach_ring(name)
                except (BuzonError, OSError):
                    continue  # just removed, or not ours
                ring.set_notify(self.box._wake_fd, -1)
                self.rings[name] = ring
            targets.append((i, name, ring))
        self.gen, self.targets = gen, targets
        return targets

    def drop_dead(self, i: int, name: str) -> None:
        """Remove receiver i (found dead) from the table and unlink its ring."""
        self._lock()
        try:
            if (i, name) in self._entries() and not self.live(i):
                self._set(i, "")
                ring = self.rings.get(name)
                if ring is not None:
                    self.dropped += max(0, _depth(ring))
                self._retire_ring(name)
                remove_segment(name)
        finally:
            self.block.unlock()

    def _discard(self, data: bytes | None) -> None:
        if data is not None and data[:4] == _OOL:
            remove_segment(data[4:].decode("ascii", "replace"))

    def round_robin(self, record: list[Any]) -> bool:
        """Put ``record`` into the next live receiver's ring that has room; False if
        none has (or there is no receiver)."""
        targets = self.receivers()
        n = len(targets)
        for k in range(n):
            idx = (self.turn + k) % n
            i, name, ring = targets[idx]
            if not self.live(i):
                self.drop_dead(i, name)
                continue
            try:
                if ring.try_send(record):
                    self.turn = idx + 1
                    return True
            except EndOfChannel:
                continue
        return False

    def shutdown_all(self) -> None:
        """remove(): shut every receiver's ring down (waiting receivers get
        EndOfChannel) and unlink them and the table."""
        for _i, name in self._entries():
            try:
                ring = attach_ring(name)
            except (BuzonError, OSError):
                continue
            ring.shutdown()
            while True:
                try:
                    data = ring.try_recv()
                except EndOfChannel:
                    break
                if data is None:
                    break
                self._discard(data)
            ring.close()
            remove_segment(name)
        remove_segment(table_name(self.box._segment))

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        self.targets = []
        self.gen = -1
        self._gen_view.release()
        self._view.release()
        self.block.close()
        os.close(self.fd)


def _depth(ring: _core.Ring) -> int:
    info = ring.info()
    return int(info["committed"] - info["consumed"] - info["abandoned"])

"""The bounded buffer of the producer/consumer problem, in shared memory.

Theory of operation
-------------------
A :class:`BoundedBuffer` is a ring of :mod:`buzon._core` created with *fixed records*:
``slots`` records of at most ``item_size`` bytes each, every one taking the same
footprint, and a byte limit of exactly ``slots`` footprints. So all ``slots`` items fit
at once (not ``slots - 1``: the ring tells full from empty by its byte cursors, not by
comparing two slot indices). Any number of producers and consumers, in any processes,
``put`` and ``get`` concurrently; items are handed out once each, in the order their
space was reserved, and a process killed in the middle of a ``put`` never leaves a
partial item behind (see docs/shm.md).

Naming. ``BoundedBuffer("jobs", ...)`` lives in ``jobs.bbuf`` in buzon's private
runtime dir: a 0600 file holding the name of the segment (whose own name is
unguessable). The first process creates both, the others attach, checking that
``slots`` and ``item_size`` agree. Like a POSIX queue, the buffer and its items outlive
the processes until :meth:`BoundedBuffer.remove` (or ``buzon clean``, once no process
is attached). A name file whose segment is gone is replaced.

A buffer passes to a child process through ``multiprocessing`` (a ``Process``
argument under every start method, or a multiprocessing queue) by its segment's name:
the child attaches that very segment (:mod:`buzon._reduction`).
"""

from __future__ import annotations

import os
from types import TracebackType

from .. import _core, _reduction
from ..errors import NoSuchEndpoint
from ._names import lookup, name_path, publish, unpublish
from ._segment import attach_ring, create_ring, remove_segment

__all__ = ["BoundedBuffer"]

_SUFFIX = ".bbuf"


def _capacity(slots: int, item_size: int) -> int:
    need = slots * ((_core.RECORD_HEADER + item_size + 7) & ~7)
    cap = 4096
    while cap < need:
        cap <<= 1
    return cap


class BoundedBuffer:
    """``slots`` items of at most ``item_size`` bytes shared by N producers and M consumers.

    ``put``/``get`` block (``timeout=None``: forever; a number: then raise
    :class:`~buzon.errors.Timeout`); ``put_nowait``/``get_nowait`` raise
    :class:`~buzon.errors.Full`/:class:`~buzon.errors.Empty`. Pass ``slots`` and
    ``item_size`` to create the buffer if it does not exist; omit them to attach only.
    """

    def __init__(self, name: str, slots: int | None = None, item_size: int | None = None) -> None:
        _reduction.register()  # it may be handed to a child process
        if (slots is None) != (item_size is None):
            raise ValueError("pass both slots and item_size (to create), or neither")
        if slots is not None and item_size is not None and (slots < 1 or item_size < 0):
            raise ValueError("slots must be at least 1 and item_size at least 0")
        self.name = name
        self.path = name_path(name, _SUFFIX)
        self._ring, self.created = self._open(slots, item_size)
        info = self._ring.info()
        self.slots = info["limit"] // info["record_size"]
        self.item_size = self._ring.max_message

    @classmethod
    def _attach_segment(cls, name: str, path: str, segment: str) -> BoundedBuffer:
        """The buffer ``name`` (name file ``path``) by its segment: how a child process
        attaches the buffer it was passed, wherever its own runtime dir is."""
        self = cls.__new__(cls)
        self.name = name
        self.path = path
        self._ring = attach_ring(segment)
        self.created = False
        info = self._ring.info()
        self.slots = info["limit"] // (info["record_size"] or 1)
        self.item_size = self._ring.max_message
        return self

    def _open(self, slots: int | None, item_size: int | None) -> tuple[_core.Ring, bool]:
        for _ in range(8):
            segment = self._read_name()
            if segment is not None:
                try:
                    ring = attach_ring(segment)
                except NoSuchEndpoint:
                    self._unlink_name(segment)  # its segment was removed: stale
                    continue
                info = ring.info()
                if not info["record_size"] or (
                    slots is not None
                    and (
                        info["limit"] // info["record_size"] != slots
                        or ring.max_message < (item_size or 0)
                    )
                ):
                    ring.close()
                    raise ValueError(
                        f"bounded buffer {self.name!r} exists with other sizes; "
                        "attach without slots/item_size, or remove it first"
                    )
                return ring, False
            if slots is None or item_size is None:
                raise NoSuchEndpoint(f"no bounded buffer named {self.name!r}")
            ring = create_ring(
                _capacity(slots, item_size),
                label=f"bbuf:{self.name}",
                records=slots,
                record_size=item_size,
            )
            if self._publish(ring.name):
                return ring, True
            ring.close()  # somebody else created it first: use theirs
            remove_segment(ring.name)
        raise NoSuchEndpoint(f"bounded buffer {self.name!r} keeps changing; try again")

    def _read_name(self) -> str | None:
        return lookup(self.path)

    def _publish(self, segment: str) -> bool:
        return publish(self.path, segment)

    def _unlink_name(self, segment: str) -> None:
        unpublish(self.path, segment)

    # ---- the producer/consumer API ----------------------------------------------

    def put(self, item: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Add ``item``, waiting for a free slot (``Timeout`` after ``timeout`` seconds)."""
        self._ring.send(item, timeout)

    def put_nowait(self, item: bytes | bytearray | memoryview) -> None:
        """Add ``item`` or raise ``Full``."""
        self._ring.send_nowait(item)

    def get(self, timeout: float | None = None) -> bytes:
        """Take the oldest item, waiting for one (``Timeout`` after ``timeout`` seconds)."""
        return self._ring.recv(timeout)

    def get_nowait(self) -> bytes:
        """Take the oldest item or raise ``Empty``."""
        return self._ring.recv_nowait()

    def qsize(self) -> int:
        """Items in the buffer (committed or being written or read) right now."""
        return int(self._ring.used // (self._ring.info()["record_size"] or 1))

    def __len__(self) -> int:
        return self.qsize()

    def exists(self) -> bool:
        """True while the buffer's name still leads to a segment."""
        segment = self._read_name()
        return segment is not None and os.path.exists("/dev/shm/" + segment.lstrip("/"))

    def close(self) -> None:
        """Detach this process (the buffer and its items stay; see :meth:`remove`)."""
        self._ring.close()

    def remove(self) -> None:
        """Delete the buffer's name and segment; attached processes keep working."""
        segment = self._ring.name
        self._unlink_name(segment)
        remove_segment(segment)

    def __enter__(self) -> BoundedBuffer:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BoundedBuffer {self.name!r} slots={self.slots} item_size={self.item_size}>"


_reduction.passable(BoundedBuffer)  # passes to child processes by its segment's name

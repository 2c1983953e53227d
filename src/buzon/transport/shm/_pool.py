"""The out-of-line block pool of one ``shm:`` end, sans-IO: which block carries the next
message larger than the ring, and the books on the blocks this end made.

It never creates, names, unlinks or maps a segment and never talks to the peer: the
transport (``_ring``) gives it those effects as functions, ``make(size)`` (create a
block and tell the peer), ``unlink(name)`` and ``exists(name)``. A block
here is anything with ``name``, ``size``, a read-write ``lease`` word and ``close()``
(:class:`buzon._core.Block`, or a stand-in in tests). The lease word is the only state
shared with the receiver: 0 idle (the receiver released its view), ``_SENT`` (set
here before the reference goes out), ``_TAKEN`` (set by the receiver with its view).

Also here, the wire format of an out-of-line message: the ring record flag ``_OOB`` and
the reference ``_REF`` the record carries.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["POOL_BLOCKS", "BlockPool"]

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


class PoolBlock(Protocol):
    """What the pool needs of a block."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def lease(self) -> int: ...
    @lease.setter
    def lease(self, value: int) -> None: ...
    def close(self) -> None: ...


def _pool_size(n: int) -> int:
    """Round a pooled block's size up (to 1/8 of the power of two below it, at least
    1 MiB) so that messages of similar sizes share blocks."""
    step = max(1 << 20, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


B = TypeVar("B", bound=PoolBlock)


class BlockPool(Generic[B]):
    """The sending side's blocks: ``pool`` (reused once given back), ``out`` (one-shot
    blocks held until the receiver takes them), ``created`` (names of the blocks made
    -> referenced in a sent message yet), ``retire`` (pooled blocks the receiver may
    unmap, told one per reference)."""

    def __init__(
        self,
        make: Callable[[int], B],
        unlink: Callable[[str], object],
        exists: Callable[[str], bool],
    ) -> None:
        self._make = make
        self._unlink = unlink
        self._exists = exists
        self.pool: list[B] = []
        self.out: list[B] = []
        self.created: dict[str, bool] = {}
        self.retire: list[str] = []
        self.blocks_created = 0
        self.blocks_reused = 0

    def acquire(self, size: int, *, shared: bool = False) -> tuple[B, int] | None:
        """A block for ``size`` bytes and its kind, its lease set: the smallest idle block
        of the pool that fits; else a new one for the pool (retiring an idle one that is
        too small if the pool is full); else, if every block is taken by the receiver
        (arrays it keeps), a one-shot block; else ``None``: the receiver is behind, wait
        (so the messages sent and not yet taken stay bounded). An end ``shared`` after a
        fork uses one-shot blocks only."""
        self.reap()
        if shared:  # two processes must not share one pool: one-shot blocks only
            block = self._make(size)
            block.lease = _SENT
            return block, _ONESHOT
        pool = self.pool
        best = None
        in_flight = bool(self.out)
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
            if idle and len(self.retire) < POOL_BLOCKS:
                old = min(idle, key=lambda b: b.size)
                pool.remove(old)
                self.retire.append(old.name.lstrip("/"))  # told with a next reference
                old.close()
            elif in_flight:
                return None
            else:
                kind = _ONESHOT
        block = self._make(_pool_size(size) if kind == _POOLED else size)
        if kind == _POOLED:
            pool.append(block)
        block.lease = _SENT
        return block, kind

    def announce(self, name: str) -> None:
        """A block named ``name`` is about to be made: remember it (so that it is
        unlinked if it is never referenced), forgetting the names of blocks the
        receiver has taken (no longer ``exists``) once there are many."""
        if len(self.created) >= 64:
            for old in list(self.created):
                if self.created[old] and not self._exists(old):
                    del self.created[old]
        self.created[name] = False

    def made(self) -> None:
        """Count a block made (after :meth:`announce` and its creation)."""
        self.blocks_created += 1

    def reference(self, block: B, kind: int, nbytes: int) -> tuple[bytes, bool]:
        """The ``_REF`` record for a message of ``nbytes`` in ``block``, and whether it
        tells the receiver to retire a block (pass it to :meth:`sent`)."""
        retire = self.retire[0] if self.retire else ""
        name = block.name.lstrip("/")
        ref = _REF.pack(kind, 0, nbytes, name.encode("ascii"), retire.encode("ascii"))
        return ref, bool(retire)

    def sent(self, block: B, kind: int, retired: bool) -> None:
        """The reference to ``block`` was committed to the ring."""
        if retired:
            del self.retire[0]
        self.created[block.name.lstrip("/")] = True
        if kind == _ONESHOT:
            self.out.append(block)  # held (and counted in flight) until taken

    def give_back(self, block: B, kind: int, lent: bool = False) -> None:
        """A block that carries no message after all (``lent``: views of it are still
        alive, so it can never be reused): idle in the pool again, or forgotten (closed
        unless lent, unlinked if the peer never saw it)."""
        if kind == _POOLED and not lent:
            block.lease = 0  # an idle block of the pool again
            return
        name = block.name.lstrip("/")
        if block in self.pool:
            self.pool.remove(block)
            if self.created.get(name, True):
                self.retire.append(name)  # the peer maps it: tell it to let go
        if not self.created.get(name, True):
            del self.created[name]
            self._unlink(name)  # the peer never saw it in the ring
        if not lent:
            block.close()

    def withdrawn(self, block: B, kind: int) -> None:
        """The reference to ``block`` was withdrawn from the ring (a rendezvous send gave
        up, ``capacity=0``): the receiver never sees it, so the block is idle again (a
        pool's) or ours to unlink (a one-shot block)."""
        if kind == _POOLED:
            block.lease = 0
            return
        if block in self.out:
            self.out.remove(block)
        name = block.name.lstrip("/")
        self.created.pop(name, None)
        self._unlink(name)
        block.close()

    def reap(self) -> None:
        """Drop our handles on one-shot blocks the receiver has taken."""
        if self.out:
            keep = []
            for block in self.out:
                if block.lease == _SENT:
                    keep.append(block)
                else:
                    block.close()
            self.out = keep

    def counters(self) -> dict[str, int]:
        """Blocks made and reused (``Channel.statistics()``)."""
        return {"blocks_created": self.blocks_created, "blocks_reused": self.blocks_reused}

    def release(self) -> list[B]:
        """Forget every block (the end closes): the blocks to close."""
        blocks = [*self.out, *self.pool]
        self.out = []
        self.pool = []
        return blocks

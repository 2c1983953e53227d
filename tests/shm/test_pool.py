"""The out-of-line block pool, sans-IO: its decisions over stand-in blocks, no segment
made (``buzon.transport.shm._pool``)."""

from __future__ import annotations

from buzon.transport.shm._pool import (
    _ONESHOT,
    _POOLED,
    _REF,
    _SENT,
    _TAKEN,
    POOL_BLOCKS,
    BlockPool,
)

MiB = 1 << 20


class FakeBlock:
    """A block as the pool sees it: a name, a size, a lease word."""

    def __init__(self, name: str, size: int) -> None:
        self.name = "/" + name
        self.size = size
        self.lease = 0
        self.closed = False

    def close(self) -> None:
        self.closed = True


class World:
    """The effects the pool asks for, recorded."""

    def __init__(self) -> None:
        self.made: list[FakeBlock] = []
        self.unlinked: list[str] = []
        self.present: set[str] = set()

    def make(self, size: int) -> FakeBlock:
        block = FakeBlock(f"b{len(self.made)}", size)
        self.made.append(block)
        self.present.add(block.name[1:])
        return block

    def pool(self) -> BlockPool[FakeBlock]:
        return BlockPool(self.make, self.unlinked.append, self.present.__contains__)


def send(pool: BlockPool[FakeBlock], size: int) -> tuple[FakeBlock, int] | None:
    """What the transport does for one out-of-line message."""
    got = pool.acquire(size)
    if got is not None:
        block, kind = got
        pool.announce(block.name[1:])
        pool.made()
        _, retired = pool.reference(block, kind, size)
        pool.sent(block, kind, retired)
    return got


def test_reuses_the_smallest_idle_block_that_fits() -> None:
    world = World()
    pool = world.pool()
    small, kind = send(pool, 10) or (None, 0)
    assert kind == _POOLED and small is not None and small.size == MiB
    assert small.lease == _SENT
    big, _ = send(pool, 3 * MiB) or (None, 0)
    assert big is not None
    small.lease = big.lease = 0  # the receiver released both
    again = send(pool, 100)
    assert again == (small, _POOLED) and pool.blocks_reused == 1
    assert len(world.made) == 2


def test_a_full_pool_waits_for_the_receiver_then_goes_one_shot() -> None:
    world = World()
    pool = world.pool()
    blocks = [send(pool, MiB) for _ in range(POOL_BLOCKS)]
    assert all(b is not None and b[1] == _POOLED for b in blocks)
    assert pool.acquire(MiB) is None  # all sent, none taken: the receiver is behind
    for got in blocks:
        assert got is not None
        got[0].lease = _TAKEN  # the receiver keeps them all (arrays alive)
    got = send(pool, MiB)
    assert got is not None and got[1] == _ONESHOT and got[0] in pool.out
    got[0].lease = _TAKEN
    pool.reap()
    assert got[0].closed and pool.out == []


def test_a_full_pool_retires_its_smallest_idle_block() -> None:
    world = World()
    pool = world.pool()
    blocks = [send(pool, (i + 1) * MiB) for i in range(POOL_BLOCKS)]
    for got in blocks:
        assert got is not None
        got[0].lease = 0
    first = blocks[0]
    assert first is not None
    bigger = send(pool, 10 * MiB)
    assert bigger is not None and bigger[1] == _POOLED
    assert first[0].closed and first[0] not in pool.pool
    assert pool.retire == []  # told with that very reference
    ref, _ = pool.reference(bigger[0], _POOLED, 1)
    assert _REF.unpack(ref)[4].rstrip(b"\0") == b""


def test_shared_end_uses_one_shot_blocks_only() -> None:
    world = World()
    pool = world.pool()
    got = pool.acquire(100, shared=True)
    assert got is not None and got[1] == _ONESHOT and pool.pool == []


def test_a_block_given_back_unsent_is_unlinked() -> None:
    world = World()
    pool = world.pool()
    got = pool.acquire(5 * MiB)
    assert got is not None
    block, kind = got
    pool.announce(block.name[1:])
    pool.give_back(block, kind)  # pooled, not lent: idle in the pool again
    assert block.lease == 0 and not block.closed and world.unlinked == []
    pool.give_back(block, kind, lent=True)  # views alive: never reused, never seen
    assert block not in pool.pool and world.unlinked == [block.name[1:]]
    assert not block.closed  # the views still use it


def test_the_books_forget_taken_blocks() -> None:
    world = World()
    pool = world.pool()
    for i in range(70):
        name = f"n{i}"
        pool.announce(name)
        pool.created[name] = True  # referenced in a message, taken: no longer present
    assert len(pool.created) < 64  # at 64 names, those taken (gone) were forgotten
    assert "n0" not in pool.created and pool.created["n69"] is True
    pool.announce("fresh")
    assert pool.created["fresh"] is False
    assert pool.counters() == {"blocks_created": 0, "blocks_reused": 0}

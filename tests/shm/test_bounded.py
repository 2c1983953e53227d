"""buzon.BoundedBuffer: the producer/consumer buffer, across processes."""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Iterator

import pytest

import buzon
from buzon.errors import Empty, Full, MessageTooLarge, NoSuchEndpoint, Timeout

T = 10.0


@pytest.fixture
def buf() -> Iterator[buzon.BoundedBuffer]:
    b = buzon.BoundedBuffer("jobs", slots=5, item_size=24)
    yield b
    b.remove()
    b.close()


def test_every_slot_is_usable_and_fifo(buf: buzon.BoundedBuffer) -> None:
    assert (buf.slots, buf.item_size, buf.created) == (5, 24, True)
    for i in range(5):  # all five, not four
        buf.put_nowait(b"item%d" % i)
    assert len(buf) == 5
    with pytest.raises(Full):
        buf.put_nowait(b"x")
    with pytest.raises(Timeout):
        buf.put(b"x", timeout=0.01)
    assert [buf.get_nowait() for _ in range(5)] == [b"item%d" % i for i in range(5)]
    with pytest.raises(Empty):
        buf.get_nowait()
    with pytest.raises(Timeout):
        buf.get(timeout=0.01)
    for _ in range(3):  # and again, once the ring has wrapped
        for i in range(5):
            buf.put(b"%d" % i, timeout=T)
        assert [buf.get(T) for _ in range(5)] == [b"%d" % i for i in range(5)]


def test_item_size_is_enforced(buf: buzon.BoundedBuffer) -> None:
    buf.put(b"y" * 24)
    with pytest.raises(MessageTooLarge):
        buf.put(b"y" * 25)
    assert buf.get() == b"y" * 24


def test_attach_by_name_and_checks(buf: buzon.BoundedBuffer) -> None:
    with buzon.BoundedBuffer("jobs") as other:
        assert not other.created and other.slots == 5
        other.put(b"hello")
    assert buf.get(T) == b"hello"
    with pytest.raises(ValueError, match="other sizes"):
        buzon.BoundedBuffer("jobs", slots=6, item_size=24)
    with pytest.raises(NoSuchEndpoint):
        buzon.BoundedBuffer("nobody-made-this")
    with pytest.raises(ValueError):
        buzon.BoundedBuffer("x", slots=3)


def test_remove_leaves_nothing(runtime_dir: str) -> None:
    b = buzon.BoundedBuffer("tmp", slots=2, item_size=8)
    assert b.exists() and os.path.exists(os.path.join(runtime_dir, "tmp.bbuf"))
    b.put(b"kept")
    b.remove()
    assert not b.exists() and os.listdir(runtime_dir) == []
    assert b.get(T) == b"kept"  # attached processes keep working
    b.close()


def test_stale_name_is_replaced(runtime_dir: str) -> None:
    b = buzon.BoundedBuffer("stale", slots=2, item_size=8)
    buzon.shm.remove_segment(b._ring.name)  # as `buzon clean` would, once nobody is left
    b.close()
    c = buzon.BoundedBuffer("stale", slots=3, item_size=8)
    assert c.created and c.slots == 3
    c.remove()
    c.close()


def _fork(fn: object) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fn()  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    return pid


def test_producers_and_consumers_history_oracle(buf: buzon.BoundedBuffer) -> None:
    producers, consumers, count = 3, 2, 400

    def produce(p: int) -> None:
        with buzon.BoundedBuffer("jobs") as b:
            for seq in range(count):
                b.put(struct.pack("<II", p, seq), timeout=T)

    def consume(w: int) -> None:
        got = []
        with buzon.BoundedBuffer("jobs") as b:
            while (item := b.get(timeout=T)) != b"STOP":
                got.append(struct.unpack("<II", item))
        os.write(w, pickle.dumps(got))
        os.close(w)

    pipes = [os.pipe() for _ in range(consumers)]
    cpids = []
    for _r, w in pipes:
        cpids.append(_fork(lambda w=w: consume(w)))
        os.close(w)
    ppids = [_fork(lambda p=p: produce(p)) for p in range(producers)]
    for pid in ppids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    for _ in range(consumers):
        buf.put(b"STOP", timeout=T)
    seen: list[tuple[int, int]] = []
    for (r, _w), pid in zip(pipes, cpids, strict=True):
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        os.close(r)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        history = pickle.loads(b"".join(chunks))
        for p in range(producers):
            mine = [s for q, s in history if q == p]
            assert mine == sorted(mine), "FIFO per producer"
        seen += history
    assert sorted(seen) == [(p, s) for p in range(producers) for s in range(count)]


@pytest.mark.parametrize("k", [buzon._core.F_LOCKED, buzon._core.F_MID_PAYLOAD])
def test_a_producer_killed_mid_put_loses_no_slot(buf: buzon.BoundedBuffer, k: int) -> None:
    import signal

    def die() -> None:
        with buzon.BoundedBuffer("jobs") as b:
            b.put(b"one")
            b.put(b"two")
            buzon._core._set_fault(k)
            b.put(b"never")

    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            die()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert [buf.get(T), buf.get(T)] == [b"one", b"two"]
    for i in range(buf.slots):  # every slot is usable again, the dead one included
        buf.put(b"%d" % i, timeout=T)
    assert [buf.get_nowait() for _ in range(buf.slots)] == [b"%d" % i for i in range(5)]
    with pytest.raises(Empty):
        buf.get_nowait()

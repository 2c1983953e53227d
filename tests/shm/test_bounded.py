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
    names = ["tmp.mbox", "tmp.mbox.room", "tmp.mbox.wake"]
    assert b.exists() and sorted(os.listdir(runtime_dir)) == names
    b.put(b"kept")
    b.remove()  # the mailbox's lifecycle: what is in it is discarded, this object closed
    assert not b.exists() and os.listdir(runtime_dir) == []
    with pytest.raises(buzon.ChannelClosed):
        b.get(T)
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


# ---- one mechanism: a BoundedBuffer is the raw-bytes fixed-slot mode of the mailbox ------


def test_a_bounded_buffer_is_a_mailbox_of_the_same_name(buf: buzon.BoundedBuffer) -> None:
    assert isinstance(buf, buzon.Mailbox) and buf.policy == "any" and buf.capacity == 5
    box = buzon.mailbox("jobs")  # the same thing, opened as a mailbox
    try:
        buf.put(b"from the buffer")
        assert box.recv(T) == b"from the buffer"  # raw bytes, not a frame
        box.send(b"from the box")
        assert buf.get(T) == b"from the box"
        with pytest.raises(TypeError):
            box.send({"an": "object"})  # raw records: bytes only
        with pytest.raises(MessageTooLarge):
            box.send(b"z" * 25)
        with pytest.raises(buzon.errors.UnsupportedOperation, match="raw-bytes"):
            box.send_async(b"x")
        buf.put(b"x")
        with pytest.raises(buzon.errors.UnsupportedOperation, match="no recv_message"):
            box.recv_message(T)
        assert buf.get_nowait() == b"x"  # the refusal took nothing
        with pytest.raises(ValueError, match="other sizes"):
            buzon.BoundedBuffer("jobs", slots=5, item_size=32)
        with pytest.raises(buzon.EndpointInUse):
            buzon.mailbox("jobs", capacity=7)
    finally:
        box.close()
    objects = buzon.mailbox("objs")
    try:
        with pytest.raises(ValueError, match="mailbox of objects"):
            buzon.BoundedBuffer("objs", slots=2, item_size=8)
        with pytest.raises(ValueError, match="mailbox of objects"):
            buzon.BoundedBuffer("objs")
    finally:
        objects.remove()


def test_remove_ends_waiting_consumers_and_refuses_later_puts(
    buf: buzon.BoundedBuffer,
) -> None:
    import threading

    other = buzon.BoundedBuffer("jobs")
    got: list[BaseException] = []

    def consume() -> None:
        try:
            other.get(T)
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    buf.remove()  # (a consumer not yet waiting gets EndOfChannel all the same)
    t.join(T)
    try:
        assert len(got) == 1 and isinstance(got[0], buzon.EndOfChannel)
        with pytest.raises(NoSuchEndpoint):
            other.put(b"late")
        with pytest.raises(NoSuchEndpoint):
            buzon.BoundedBuffer("jobs")
    finally:
        other.close()


def test_buzon_wait_and_asyncio_take_a_bounded_buffer(buf: buzon.BoundedBuffer) -> None:
    import asyncio
    import threading

    assert buzon.wait([buf], timeout=0.01) == []
    t = threading.Timer(0.05, lambda: buf.put(b"ready"))
    t.start()
    assert buzon.wait([buf], timeout=T) == [buf]
    t.join()
    assert buf.get_nowait() == b"ready"

    async def main() -> bytes:
        box = buzon.aio.mailbox("jobs")
        try:
            buf.put(b"async")
            got: bytes = await box.recv(timeout=T)
            return got
        finally:
            box.close()

    assert asyncio.run(main()) == b"async"


def test_ls_shows_it_as_a_raw_mailbox_and_clean_keeps_it_while_not_empty(
    runtime_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from buzon import cli

    b = buzon.BoundedBuffer("left", slots=2, item_size=8)
    b.put(b"old-job")
    b.close()  # nobody uses it any more; its item is still in it
    try:
        assert cli.main(["ls"]) == 0
        out = capsys.readouterr().out
        assert "policy=any capacity=2 raw item_size=8 depth=1" in out
        assert cli.main(["clean"]) == 0
        capsys.readouterr()
        with buzon.BoundedBuffer("left") as again:  # kept: a mailbox lives until removed
            assert again.get_nowait() == b"old-job"
    finally:
        c = buzon.BoundedBuffer("left")
        c.remove()


def test_plain_pickle_passes_it_by_name(buf: buzon.BoundedBuffer) -> None:
    copy = pickle.loads(pickle.dumps(buf))
    try:
        assert type(copy) is buzon.BoundedBuffer and (copy.slots, copy.item_size) == (5, 24)
        copy.put(b"via pickle")
        assert buf.get(T) == b"via pickle"
    finally:
        copy.close()

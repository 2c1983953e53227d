"""Zero copy through ``shm:`` channels: loans, received views, out-of-line block reuse.

The rings are made small (``ring_size=64 KiB``) so "large" messages (out of line, through blocks)
stay cheap; every test also runs the directory's checks (nothing left in /dev/shm, no
fd left open).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import buzon
from buzon import aio, shm
from buzon.errors import EndOfChannel, ProtocolError, Timeout, UnsupportedOperation
from buzon.transport import shm as shm_transport
from buzon.transport.shm import _ring as shm_ring

T = 10.0
RING = 1 << 16
SMALL = 1000
LARGE = 3 * RING  # out of line


def _segments() -> set[str]:
    return {s.name for s in shm.list_segments()}


def _accept_connect(url: str, **kw: Any) -> tuple[Any, Any]:
    lst = buzon.listen(url, ring_size=RING, **kw)
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
    t.start()
    try:
        a = buzon.connect(url, timeout=T, **kw)
    finally:
        t.join(T)
        lst.close()
    return a, box[0]


@pytest.fixture
def pair() -> Iterator[tuple[Any, Any]]:
    a, b = _accept_connect("shm:zc")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("size", [0, SMALL, LARGE])
def test_a_loan_is_received_by_recv_bytes(pair: tuple[Any, Any], size: int) -> None:
    a, b = pair
    data = os.urandom(size)
    with a.loan(size, timeout=T) as buf:
        assert isinstance(buf, memoryview) and buf.nbytes == size and not buf.readonly
        buf[:] = data
    assert b.recv_bytes(T) == data
    stats = a.statistics()
    assert stats.loans == 1 and stats.messages_sent == 1 and stats.bytes_sent >= size


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_a_loan_filled_as_a_numpy_array(pair: tuple[Any, Any], size: int) -> None:
    a, b = pair
    arr = np.arange(size // 8, dtype="f8")
    with a.loan(arr.nbytes) as buf:
        np.frombuffer(buf, "f8")[:] = arr  # the temporary array is gone at the end
    with b.recv_view(T) as view:
        got = np.frombuffer(view, "f8")
        assert np.array_equal(got, arr)
        del got


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_a_loan_is_aborted_on_exception(pair: tuple[Any, Any], size: int) -> None:
    a, b = pair
    with pytest.raises(RuntimeError), a.loan(size) as buf:
        buf[:4] = b"lost"
        raise RuntimeError("changed my mind")
    with pytest.raises(buzon.Empty):
        b.recv_bytes_nowait()
    a.send_bytes(b"next")
    assert b.recv_bytes(T) == b"next"  # the aborted record is skipped, nothing is stuck
    assert a.statistics().messages_sent == 1


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_a_loan_whose_views_outlive_it_is_not_sent(pair: tuple[Any, Any], size: int) -> None:
    a, b = pair
    with pytest.raises(BufferError, match="not sent"), a.loan(size) as buf:
        kept = np.frombuffer(buf, "u1")
        kept[:] = 7
    with pytest.raises(buzon.Empty):
        b.recv_bytes_nowait()
    del kept, buf  # now the record is dropped (the ring is not left stuck)
    a.send_bytes(b"after")
    assert b.recv_bytes(T) == b"after"
    a.send_bytes(b"z" * LARGE)
    assert b.recv_bytes(T) == b"z" * LARGE


@pytest.mark.parametrize("size", [0, SMALL, LARGE])
def test_send_bytes_is_received_as_a_view(pair: tuple[Any, Any], size: int) -> None:
    a, b = pair
    data = os.urandom(size)
    a.send_bytes(data)
    with b.recv_view(T) as view:
        assert view.readonly and bytes(view) == data
    with pytest.raises(ValueError):
        view[0]  # released at the end of the block
    assert b.statistics().views == 1
    assert b.statistics().messages_received == 1


def test_an_object_message_is_viewed_as_its_encoded_body(pair: tuple[Any, Any]) -> None:
    a, b = pair
    a.send({"k": [1, 2]})
    a.send({"k": b"x" * LARGE})  # out of line: body and an out-of-band buffer
    a.send({"k": 3})
    with b.recv_view(T) as view:
        assert bytes(view) == b"\x81\xa1k\x92\x01\x02"
    with b.recv_view(T) as view:
        assert view.nbytes > LARGE
    assert b.recv(T) == {"k": 3}


def test_an_array_made_from_a_view_keeps_it(pair: tuple[Any, Any]) -> None:
    a, b = pair
    a.send_bytes(bytes(range(256)) * (LARGE // 256))
    with b.recv_view(T) as view:
        kept = np.frombuffer(view, "u1")
    for _ in range(6):  # later messages must not land on the block the array is on
        a.send_bytes(b"\xff" * LARGE)
        assert b.recv_bytes(T) == b"\xff" * LARGE
    assert kept[:256].tolist() == list(range(256)) and kept.sum() == 255 * 128 * (LARGE // 256)
    del kept


def test_received_arrays_stay_on_blocks_that_are_not_reused_under_them(
    pair: tuple[Any, Any],
) -> None:
    a, b = pair
    held = []
    for i in range(shm_transport.POOL_BLOCKS + 3):  # more than the pool: one-shot blocks too
        a.send(np.full(LARGE, i, dtype="u1"))
        got = b.recv(T)
        assert got.base is not None and not got.flags.owndata  # no copy on this side
        held.append(got)
    for i, arr in enumerate(held):
        assert (arr == i).all()
    created = a.statistics().blocks_created
    assert created == len(held)  # every block was still lent out
    del held, got, arr
    for i in range(10):
        a.send(np.full(LARGE, i, dtype="u1"))
        assert (b.recv(T) == i).all()
    stats = a.statistics()
    assert stats.blocks_created == created and stats.blocks_reused >= 10


def test_a_stream_of_large_messages_reuses_one_block(pair: tuple[Any, Any]) -> None:
    a, b = pair
    for i in range(20):
        a.send_bytes(bytes([i]) * LARGE)
        assert b.recv_bytes(T) == bytes([i]) * LARGE
        with a.loan(LARGE) as buf:
            buf[:] = bytes([i + 1]) * LARGE
        with b.recv_view(T) as view:
            assert view[0] == view[-1] == i + 1
    stats = a.statistics()
    assert stats.blocks_created == 1 and stats.blocks_reused == 39
    assert _segments() == set()  # the receiver unlinked it once attached


def test_a_bigger_message_grows_the_pool_and_retires_small_blocks(pair: tuple[Any, Any]) -> None:
    a, b = pair
    for n in range(1, 12):  # growing sizes: new blocks, the small idle ones retired
        a.send_bytes(b"q" * (LARGE * n))
        assert b.recv_bytes(T) == b"q" * (LARGE * n)
    assert len(a._core.transport._blocks.pool) <= shm_transport.POOL_BLOCKS
    assert len(b._core.transport._rx_blocks) <= shm_transport.POOL_BLOCKS + 1


def test_view_and_loan_use_after_the_block_raise(pair: tuple[Any, Any]) -> None:
    a, b = pair
    with a.loan(LARGE) as buf:
        pass
    with pytest.raises(ValueError):
        buf[0] = 1
    with b.recv_view(T) as view:
        pass
    with pytest.raises(ValueError):
        bytes(view)


def test_loans_need_a_shm_channel() -> None:
    a, b = buzon.pipe()
    try:
        with pytest.raises(UnsupportedOperation, match="shm:"), a.loan(10):
            pass  # pragma: no cover
        with pytest.raises(UnsupportedOperation, match="shm:"), b.recv_view(0):
            pass  # pragma: no cover
    finally:
        a.close()
        b.close()


def test_loans_refuse_capacity_zero() -> None:
    a, b = _accept_connect("shm:zc0", capacity=0)
    try:
        with pytest.raises(UnsupportedOperation, match="capacity=0"), a.loan(10):
            pass  # pragma: no cover
    finally:
        a.close()
        b.close()


def test_loans_respect_capacity() -> None:
    a, b = _accept_connect("shm:zc1", capacity=1)
    try:
        with a.loan(SMALL) as buf:
            buf[:] = b"1" * SMALL
        with pytest.raises(Timeout), a.loan(LARGE, timeout=0.05):
            pass  # pragma: no cover - no credit for a second message
        with b.recv_view(T) as view:
            assert bytes(view) == b"1" * SMALL
        with a.loan(LARGE, timeout=T) as buf:  # the receiver took one: credit again
            buf[:] = b"2" * LARGE
        assert b.recv_bytes(T) == b"2" * LARGE
    finally:
        a.close()
        b.close()


def test_asyncio_loans_and_views() -> None:
    async def main() -> None:
        lst = aio.listen("shm:zcaio", ring_size=RING)
        acc = asyncio.ensure_future(lst.accept(timeout=T))
        a = await aio.connect("shm:zcaio", timeout=T)
        b = await acc
        lst.close()
        try:
            for size in (SMALL, LARGE):
                async with a.loan(size, timeout=T) as buf:
                    buf[:] = b"a" * size
                reader = asyncio.ensure_future(b.recv_bytes(T))
                assert await reader == b"a" * size
                waiting = asyncio.ensure_future(_view_bytes(b))
                await asyncio.sleep(0)
                await a.send_bytes(b"b" * size)
                assert await waiting == b"b" * size
            with pytest.raises(RuntimeError):
                async with a.loan(SMALL) as buf:
                    raise RuntimeError
            with pytest.raises(Timeout):
                async with b.recv_view(0.01):
                    pass  # pragma: no cover
            assert a.statistics().loans == 2 and b.statistics().views == 2
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


async def _view_bytes(ch: Any) -> bytes:
    async with ch.recv_view(T) as view:
        return bytes(view)


def test_sender_closed_before_the_reader_attached_survives_clean(pair: tuple[Any, Any]) -> None:
    a, b = pair
    a.send_bytes(b"w" * LARGE)
    a.close()  # nobody maps the block now, but its fd is in flight to b
    assert len(_segments()) == 1
    assert shm.clean_segments(grace=0) == []  # in use: the handed-over fd holds its lock
    assert b.recv_bytes(T) == b"w" * LARGE
    with pytest.raises(EndOfChannel):
        b.recv_bytes(T)
    assert _segments() == set()


def _sender(url: str, ready: int) -> None:  # pragma: no cover - child
    ch = buzon.connect(url, timeout=T)
    os.write(ready, b"!")
    i = 0
    while True:
        if i % 2:
            ch.send(np.full(LARGE, i % 251, dtype="u1"))
        else:
            with ch.loan(LARGE) as buf:
                buf[:] = bytes([i % 251]) * LARGE
        i += 1


def _receiver(url: str, ready: int) -> None:  # pragma: no cover - child
    ch = buzon.connect(url, timeout=T)
    os.write(ready, b"!")
    held = []
    while True:
        held.append(ch.recv())  # keeps some blocks lent out when it dies
        held = held[-3:]


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_sigkill_mid_stream_leaves_nothing_once_the_survivor_closes(victim: str) -> None:
    url = f"shm:kill-{victim}"
    lst = buzon.listen(url, ring_size=RING)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            (_sender if victim == "sender" else _receiver)(url, w)
        finally:
            os._exit(1)
    os.close(w)
    ch = lst.accept(timeout=T)
    lst.close()
    try:
        assert os.read(r, 1) == b"!"
        if victim == "sender":
            for _ in range(5):
                ch.recv_bytes(T)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with pytest.raises(EndOfChannel):
                while True:
                    with ch.recv_view(T):
                        pass
        else:
            for i in range(5):
                ch.send(np.full(LARGE, i, dtype="u1"), timeout=T)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with pytest.raises(EndOfChannel):
                while True:
                    ch.send_bytes(b"v" * LARGE, timeout=T)
    finally:
        ch.close()
        os.close(r)
    assert _segments() == set()


def test_a_sender_ahead_of_its_receiver_waits_instead_of_making_blocks(
    pair: tuple[Any, Any],
) -> None:
    a, b = pair
    sent = 0
    with pytest.raises(buzon.Full):
        for _ in range(50):
            a.send_bytes_nowait(b"s" * LARGE)
            sent += 1
    assert sent == shm_transport.POOL_BLOCKS  # every pooled block is out, none taken yet
    with pytest.raises(Timeout), a.loan(LARGE, timeout=0):
        pass  # pragma: no cover
    with pytest.raises(Timeout):
        a.send(np.zeros(LARGE, "u1"), timeout=0.05)
    waiter = threading.Thread(target=lambda: a.send_bytes(b"t" * LARGE, timeout=T))
    waiter.start()  # blocked until b takes one
    for _ in range(sent):
        assert b.recv_bytes(T) == b"s" * LARGE
    waiter.join(T)
    assert not waiter.is_alive()
    assert b.recv_bytes(T) == b"t" * LARGE
    assert a.statistics().blocks_created == shm_transport.POOL_BLOCKS


def test_a_receiver_gone_wakes_a_sender_waiting_for_a_block() -> None:
    lst = buzon.listen("shm:zcgone", ring_size=RING)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            keep = buzon.connect("shm:zcgone", timeout=T)
            os.write(w, b"!")
            signal.pause()
            keep.close()
        finally:
            os._exit(1)
    os.close(w)
    ch = lst.accept(timeout=T)
    lst.close()
    try:
        assert os.read(r, 1) == b"!"
        for _ in range(shm_transport.POOL_BLOCKS):
            ch.send_bytes(b"g" * LARGE, timeout=T)
        killer = threading.Timer(0.1, os.kill, (pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(EndOfChannel):
            ch.send_bytes(b"g" * LARGE, timeout=T)  # waits for a block until the death
        killer.join()
        os.waitpid(pid, 0)
    finally:
        ch.close()
        os.close(r)
    assert _segments() == set()


def test_an_end_shared_with_a_forked_child_sends_large_messages(pair: tuple[Any, Any]) -> None:
    a, b = pair
    a.send_bytes(b"p" * LARGE)  # a pooled block, made before the fork
    assert b.recv_bytes(T) == b"p" * LARGE
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: a shared end, one-shot blocks only
        code = 1
        try:
            b.close()
            for i in range(3):
                a.send_bytes(bytes([i]) * LARGE, timeout=T)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for i in range(3):
        assert b.recv_bytes(T) == bytes([i]) * LARGE
    with a.loan(LARGE) as buf:  # the parent's end is shared too now
        buf[:] = b"q" * LARGE
    assert b.recv_bytes(T) == b"q" * LARGE
    assert _segments() == set()


class _DiesAfterCreate:
    """A stand-in for ``buzon._core`` whose Block.create kills the process right after
    making the segment (before its fd is handed over)."""

    def __init__(self, core: Any) -> None:
        self._core = core
        outer = self

        class Block:
            attach = core.Block.attach

            @staticmethod
            def create(*args: Any, **kw: Any) -> Any:
                outer._core.Block.create(*args, **kw)
                os.kill(os.getpid(), signal.SIGKILL)

        self.Block = Block

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


def test_a_sender_killed_between_making_a_block_and_handing_it_over() -> None:
    lst = buzon.listen("shm:zcmade", ring_size=RING)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ch = buzon.connect("shm:zcmade", timeout=T)
            shm_ring._core = _DiesAfterCreate(shm_ring._core)  # type: ignore[assignment]
            ch.send_bytes(b"m" * LARGE)
        finally:
            os._exit(1)
    ch = lst.accept(timeout=T)
    lst.close()
    try:
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        assert len(_segments()) == 1  # made, never referenced, nobody holds it
        with pytest.raises(EndOfChannel):
            ch.recv_bytes(T)
    finally:
        ch.close()  # it was announced on the socket first: the survivor unlinks it
    assert _segments() == set()


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_a_raw_channel_lends_the_bytes_as_they_are(size: int) -> None:
    a, b = _accept_connect("shm:zcraw", raw=True)
    try:
        with a.loan(size) as buf:
            buf[:] = b"r" * size
        with b.recv_view(T) as view:
            assert bytes(view) == b"r" * size  # no frame header: the bytes themselves
        a.send_bytes(b"s" * size)
        assert b.recv_bytes(T) == b"s" * size
    finally:
        a.close()
        b.close()


def test_a_reference_to_a_segment_that_is_not_a_message_block_is_refused(
    pair: tuple[Any, Any],
) -> None:
    a, b = pair
    arr = buzon.shared_array("zc-not-a-message", (4,), "f8")
    try:
        name = arr.segment_name
        ref = shm_transport._REF.pack(shm_transport._ONESHOT, 0, 8, name.encode(), b"")
        b._core.transport._tx.try_send([ref], shm_transport._OOB)  # a forged reference
        with pytest.raises(ProtocolError, match="another segment"):
            a.recv_bytes(T)
        assert name in _segments()  # not unlinked
    finally:
        arr.close()
        arr.remove()


def test_a_pooled_block_left_with_live_views_is_retired_at_the_receiver(
    pair: tuple[Any, Any],
) -> None:
    a, b = pair
    a.send_bytes(b"1" * LARGE)
    assert b.recv_bytes(T) == b"1" * LARGE
    mapped = set(b._core.transport._rx_blocks)
    assert len(mapped) == 1
    with pytest.raises(BufferError), a.loan(LARGE) as buf:  # reuses that block ...
        kept = np.frombuffer(buf, "u1")  # ... and keeps a view of it: it leaves the pool
    a.send_bytes(b"2" * LARGE)  # a new block, and the old one retired at the receiver
    assert b.recv_bytes(T) == b"2" * LARGE
    assert not mapped & set(b._core.transport._rx_blocks)
    assert a.statistics().blocks_created == 2
    del kept, buf


def test_a_received_array_outlives_its_channel() -> None:
    a, b = _accept_connect("shm:zcoutlive")
    try:
        a.send(np.arange(LARGE // 8, dtype="f8"))
        got = b.recv(T)
    finally:
        a.close()
        b.close()
    assert got.sum() == (LARGE // 8) * (LARGE // 8 - 1) / 2  # still mapped
    assert _segments() == set()
    del got  # the last mapping (and its fd) goes with it: checked by the fixture


def test_loans_on_an_unbounded_channel() -> None:
    a, b = _accept_connect("shm:zcnone", capacity=None)
    try:
        for size in (SMALL, LARGE):
            with a.loan(size, timeout=T) as buf:
                buf[:] = b"u" * size
            with b.recv_view(T) as view:
                assert bytes(view) == b"u" * size
    finally:
        a.close()
        b.close()

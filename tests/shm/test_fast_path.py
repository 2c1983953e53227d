"""The ``shm:`` hot path: small sends and receives are single C calls on the rings
(``RingFrames.try_send_frame`` / ``try_recv_frame`` of ``buzon.protocol._frames``, which
tests/protocol/test_ring_frames.py checks alone, and ``Ring.spin_wait``), lent to the
drivers by ``ShmTransport.ring_ops``. These tests check that the shortcut keeps every promise of
the general path: order, counts, validation, and falling back when it must."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import buzon
from buzon import aio
from buzon.errors import FrameError

T = 10.0


@contextlib.contextmanager
def _pair(name: str, **kw: Any) -> Iterator[tuple[Any, Any]]:
    with buzon.listen(f"shm:{name}", **kw) as lst:
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect(f"shm:{name}", timeout=T, **kw)
        t.join(T)
        try:
            yield a, box[0]
        finally:
            a.close()
            box[0].close()


@pytest.fixture
def pair() -> Iterator[tuple[Any, Any]]:
    with _pair("fp") as ends:
        yield ends


def test_default_channel_takes_the_fast_path(pair: tuple[Any, Any]) -> None:
    a, b = pair
    assert a._core.fast_send is not None and b._core.fast_recv is not None
    a.send_bytes(b"x" * 64)
    a.send({"k": 1})
    a.send_bytes(b"y" * 200_000)  # large, yet in the ring: one copy on each side
    assert b._core.transport.ring_ops.counts()[2] == 0  # nothing taken yet
    assert b.recv_bytes(timeout=T) == b"x" * 64
    assert b.recv(timeout=T) == {"k": 1}
    assert b.recv_bytes(timeout=T) == b"y" * 200_000
    sent = a._core.transport.ring_ops.counts()
    taken = b._core.transport.ring_ops.counts()
    assert sent[0] == 3 and taken[2] == 3 and sent[1] == taken[3] > 200_000


def test_a_large_send_that_waited_for_room_is_still_one_plain_frame(
    pair: tuple[Any, Any],
) -> None:
    """A body that fits a ring record goes as a plain DATA frame also when the ring was
    full and the send took the general way, so the receiver copies it out once (a
    frame with an out-of-band buffer costs a second copy in ``recv_bytes``)."""
    a, b = pair
    n = 40
    bodies = [bytes([i]) * 300_000 for i in range(n)]  # several rings' worth
    sender = threading.Thread(target=lambda: [a.send_bytes(x, timeout=T) for x in bodies])
    sender.start()
    try:
        got = [b.recv_bytes(timeout=T) for _ in range(n)]
    finally:
        sender.join(T)
    assert got == bodies
    # what a send the ring could not take at once writes: header and body, no buffers
    frame = b"".join(bytes(p) for p in a._core.encode_bytes(bodies[0]))
    assert frame[:4] == bytes([1, 1, 0, 0]) and len(frame) == 8 + 300_000


@pytest.mark.parametrize("capacity", [0, 4, None])
def test_credits_and_queues_use_the_general_path(capacity: int | None) -> None:
    with _pair(f"fpc{capacity}", capacity=capacity) as (a, b):
        assert a._core.fast_send is None
        # capacity=0 lives in the rings themselves (_core_rv.c): receives stay plain
        assert (b._core.fast_recv is None) == (capacity != 0)
        if capacity != 0:
            a.send_bytes(b"q")
        else:
            threading.Timer(0.05, lambda: b.recv_bytes(timeout=T)).start()
            a.send_bytes(b"q", timeout=T)


def test_closing_drops_the_fast_path(pair: tuple[Any, Any]) -> None:
    a, _ = pair
    a.close()
    assert a._core.fast_send is None and a._core.fast_recv is None
    with pytest.raises(buzon.ChannelClosed):
        a.send_bytes(b"late")


def test_statistics_count_both_paths_alike(pair: tuple[Any, Any]) -> None:
    a, b = pair
    big = b"L" * (a._core.transport.ring_max + 1)  # out of line: the general path
    arr = np.arange(1000, dtype=np.int64)  # out-of-band buffer: a frame with buffers
    sent0, received0 = a.statistics().bytes_sent, b.statistics().bytes_received  # handshake
    a.send_bytes(b"s1")
    a.send_bytes(big)
    a.send(arr)
    a.send_bytes(bytearray(b"not bytes"))  # general path (not bytes)
    a.send("s2")
    assert b.recv_bytes(timeout=T) == b"s1"
    assert b.recv_bytes(timeout=T) == big
    assert np.array_equal(b.recv(timeout=T), arr)
    assert b.recv_bytes(timeout=T) == b"not bytes"
    assert b.recv(timeout=T) == "s2"
    sa, sb = a.statistics(), b.statistics()
    assert sa.messages_sent == sb.messages_received == 5
    sent, received = sa.bytes_sent - sent0, sb.bytes_received - received0
    assert sent == received > len(big) + arr.nbytes
    a.close()
    sa_closed = a.statistics()  # still readable after close
    assert sa_closed.messages_sent == 5


def test_many_threads_lose_and_duplicate_nothing(pair: tuple[Any, Any]) -> None:
    a, b = pair
    senders, per = 4, 2000
    got: list[bytes] = []
    lock = threading.Lock()

    def send(k: int) -> None:
        for i in range(per):
            a.send_bytes(struct.pack("<II", k, i), timeout=T)

    def recv(n: int) -> None:
        mine = [b.recv_bytes(timeout=T) for _ in range(n)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
    threads += [threading.Thread(target=recv, args=(senders * per // 2,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    want = [struct.pack("<II", k, i) for k in range(senders) for i in range(per)]
    assert sorted(got) == sorted(want)
    assert a.statistics().messages_sent == b.statistics().messages_received == senders * per


def test_batches_go_in_one_call_and_fall_back_in_order(pair: tuple[Any, Any]) -> None:
    a, b = pair
    big = b"B" * (a._core.transport.ring_max + 1)  # out of line: the general path
    items: list[Any] = [b"a", b"b", big, bytearray(b"c"), b"d"]
    assert a.send_bytes_many(iter(items), timeout=T) == 5  # any iterable
    assert [b.recv_bytes(timeout=T) for _ in items] == [bytes(x) for x in items]
    arr = np.arange(3000, dtype=np.int32)  # a frame of several buffers
    objs: list[Any] = [1, "two", arr, {"four": 4}]
    assert a.send_many(objs, timeout=T) == 4
    got = [b.recv(timeout=T) for _ in objs]
    assert got[:2] == [1, "two"] and np.array_equal(got[2], arr) and got[3] == {"four": 4}
    assert a.statistics().messages_sent == b.statistics().messages_received == 9


def test_a_batch_larger_than_the_ring_waits_for_room(pair: tuple[Any, Any]) -> None:
    a, b = pair
    n = a._core.transport.ring_max // 1000 * 3  # about three rings' worth
    items = [b"%08d" % i + b"." * 992 for i in range(n)]
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.extend(b.recv_bytes(timeout=T) for _ in items))
    t.start()
    assert a.send_bytes_many(items, timeout=T) == n
    t.join(T)
    assert got == items


def test_records_that_are_not_plain_frames_go_the_general_way(pair: tuple[Any, Any]) -> None:
    a, b = pair
    tx = a._core.transport._tx
    hdr = struct.Struct("<BBBBI")
    tx.try_send(hdr.pack(1, 1, 0, 0, 3) + b"abc")  # plain
    tx.try_send(hdr.pack(1, 1, 0, 0, 9) + b"abc")  # length mismatch: rejected
    tx.try_send(hdr.pack(1, 1, 0, 0, 2) + b"ok")  # plain again: the channel goes on
    assert b.recv_bytes(timeout=T) == b"abc"
    with pytest.raises(FrameError):
        b.recv_bytes(timeout=T)
    assert b.recv_bytes(timeout=T) == b"ok"
    assert b.statistics().rejected_frames == 1


async def _aio_pair_round_trip() -> list[Any]:
    async with aio.listen("shm:fpa") as lst:
        accepted = asyncio.ensure_future(lst.accept())
        a = await aio.connect("shm:fpa")
        b = await accepted
        try:
            assert a._core.fast_send is not None
            big = b"B" * (a._core.transport.ring_max + 10)
            out: list[Any] = []
            for i in range(25):
                await a.send_bytes(b"%d" % i)
            assert await a.send_bytes_many([b"%d" % i for i in range(25, 50)]) == 25
            await a.send_bytes(big)
            await a.send({"end": True})
            for _ in range(50):
                out.append(await b.recv_bytes(timeout=T))
            out.append(await b.recv_bytes(timeout=T) == big)
            out.append(await b.recv(timeout=T))
            waiter = asyncio.ensure_future(b.recv_bytes(timeout=T))
            await asyncio.sleep(0.01)
            await a.send_bytes(b"woken")
            out.append(await waiter)
            return out
        finally:
            await a.aclose()
            await b.aclose()


def test_asyncio_fast_path_keeps_order_and_wakes() -> None:
    out = asyncio.run(_aio_pair_round_trip())
    assert out[:50] == [b"%d" % i for i in range(50)]
    assert out[50:] == [True, {"end": True}, b"woken"]


def test_receipts_after_fast_sends_count_every_message(pair: tuple[Any, Any]) -> None:
    """Receipts number every message sent, the ones that went the fast way too."""
    a, b = pair
    for i in range(3):
        a.send_bytes(b"fast %d" % i)
    receipt = a.send_bytes_async(b"tracked")
    assert not receipt.done()
    for i in range(3):
        assert b.recv_bytes(timeout=T) == b"fast %d" % i
    assert not receipt.done()
    a.send_bytes(b"after")  # the general path now (this end numbers its sends)
    assert b.recv_bytes(timeout=T) == b"tracked"
    receipt.wait(T)
    assert receipt.delivered()
    late = a.send_bytes_async(b"late")
    assert b.recv_bytes(timeout=T) == b"after"
    assert not late.done()
    assert b.recv_bytes(timeout=T) == b"late"
    late.wait(T)
    assert a.statistics().messages_sent == b.statistics().messages_received == 6


def test_a_receipt_is_not_done_before_its_message_is_taken(pair: tuple[Any, Any]) -> None:
    """Both ends must number the same messages: a message sent the fast way and taken
    the general way (the receiver was asleep) counts on both sides or on neither."""
    a, b = pair
    first = a.send_bytes_async(b"x")
    assert b.recv_bytes(timeout=T) == b"x"
    first.wait(T)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(b.recv_bytes(timeout=T)))
    t.start()
    time.sleep(0.2)  # the receiver sleeps in poll: it takes Y the general way
    a.send_bytes(b"y")
    t.join(T)
    assert got == [b"y"]
    second = a.send_bytes_async(b"z")
    with contextlib.suppress(buzon.Timeout):
        second.wait(0.3)  # reads any CREDIT the receiver sent meanwhile
    assert not second.done()  # z is not taken yet
    assert b.recv_bytes(timeout=T) == b"z"
    second.wait(T)

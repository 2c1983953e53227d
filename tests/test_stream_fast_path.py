"""The hot path of small sends on a stream (``ChannelCore.send_small``, issue 9 speed):
one write of header and payload, used by ``send_bytes`` and ``send_bytes_async`` in both
drivers. It must keep every rule of the general way: a write the kernel takes in part is
finished whole (never a torn frame), counts and receipt numbers stay right, and where
the general way waits (capacity=0, token pools) or frames differently (raw, compat,
message transports) it stays off.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import buzon
from buzon.protocol.frames import HEADER

KINDS = ["pipe", "unix:fastpath", "tcp://127.0.0.1:0"]


def _pair(kind: str, **options: object) -> tuple[buzon.Channel, buzon.Channel]:
    if kind == "pipe":
        return buzon.pipe(**options)  # type: ignore[arg-type]
    lst = buzon.listen(kind, **options)
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        url = lst.address if kind.startswith("tcp") else kind
        a = buzon.connect(url, timeout=10, **options)
        t.join(10)
        return a, box[0]
    finally:
        lst.close()


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    a, b = _pair(request.param)
    with a, b:
        yield a, b


def _torn(core: Any, keep: int) -> Callable[[int, bytes], int]:
    """The channel's frame write, letting the kernel take only the first ``keep``
    bytes of the first frame (its tail is left to the channel, as after a real
    partial write)."""
    write = core._write
    fd = core.write_fileno()
    calls = [0]

    def partial(flags: int, data: bytes) -> int:
        calls[0] += 1
        if calls[0] > 1:
            return int(write(flags, data))
        return os.write(fd, (HEADER.pack(1, 1, flags, 0, len(data)) + data)[:keep])

    return partial


@pytest.mark.parametrize("keep", [1, 5, 8, 40])
def test_a_small_send_the_kernel_takes_in_part_arrives_whole(
    pair: tuple[buzon.Channel, buzon.Channel], keep: int
) -> None:
    a, b = pair
    core = a._core
    assert core.small_limit > 64  # the fast path is on for this channel
    assert core.small_send is not None  # ... and its C writer (tested in test_wait_frame)
    core.small_send = None  # the Python write send_small makes, torn
    core._write = _torn(core, keep)
    a.send_bytes(b"m" * 64, timeout=10)
    assert not core.owed  # the send returned: its frame is written whole
    a.send_bytes(b"next", timeout=10)
    assert b.recv_bytes(timeout=10) == b"m" * 64
    assert b.recv_bytes(timeout=10) == b"next"
    stats = a.statistics()
    assert (stats.messages_sent, stats.bytes_sent) == (2, 64 + 8 + 4 + 8)


def test_a_small_receipt_send_taken_in_part_arrives_whole(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    first = a.send_bytes_async(b"first", timeout=10)  # makes the flow: the next is fast
    core = a._core
    core._write = _torn(core, 6)
    second = a.send_bytes_async(b"s" * 64, timeout=10)
    assert not core.owed
    assert (first.number, second.number) == (1, 2)
    assert b.recv_bytes(timeout=10) == b"first"
    assert b.recv_bytes(timeout=10) == b"s" * 64
    second.wait(timeout=10)
    assert first.delivered() and second.delivered()


def test_small_receipts_are_numbered_with_plain_sends(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    receipts = []
    for i in range(200):
        if i % 3:
            receipts.append((i, a.send_bytes_async(b"%d" % i, timeout=10)))
        else:
            a.send_bytes(b"%d" % i, timeout=10)
    assert not any(r.done() for _, r in receipts)  # nothing is taken yet
    assert [r.number for _, r in receipts] == [i + 1 for i, _ in receipts]
    assert a.statistics().messages_sent == 200
    for i in range(200):
        assert b.recv_bytes(timeout=10) == b"%d" % i
    for _, r in receipts:
        r.wait(timeout=10)
        assert r.delivered()


def test_the_fast_path_stays_off_where_the_general_way_is_needed() -> None:
    a, b = buzon.pipe(raw=True)
    with a, b:
        assert a._core.small_limit < 0
    a, b = _pair("unix:fastpath-rv", capacity=0)
    with a, b:
        assert a._core.small_limit < 0  # a rendezvous send waits for its take
        t = threading.Thread(target=lambda: b.recv_bytes(timeout=10))
        t.start()
        a.send_bytes(b"x", timeout=10)
        t.join(10)
    a, b = buzon.pipe(duplex=False, capacity=1)
    with a, b:
        assert b._core.small_limit < 0  # a token pool
    a, b = _pair("unixgram:fastpath-dg")
    with a, b:
        assert a._core.small_limit < 0  # a message transport: one datagram per message


def test_a_bounded_capacity_still_stops_small_sends() -> None:
    a, b = _pair("unix:fastpath-cap", capacity=2)
    with a, b:
        assert a._core.small_limit > 0
        a.send_bytes(b"1", timeout=10)
        a.send_bytes(b"2", timeout=10)
        with pytest.raises(buzon.Timeout):
            a.send_bytes(b"3", timeout=0.2)
        assert b.recv_bytes(timeout=10) == b"1"
        a.send_bytes(b"3", timeout=10)
        assert [b.recv_bytes(timeout=10) for _ in range(2)] == [b"2", b"3"]


@pytest.mark.parametrize("kind", KINDS)
def test_aio_small_send_taken_in_part_arrives_whole(kind: str) -> None:
    async def main() -> None:
        if kind == "pipe":
            a, b = buzon.aio.pipe()
        else:
            lst = buzon.aio.listen(kind)
            url = lst.address if kind.startswith("tcp") else kind
            accepted = asyncio.ensure_future(lst.accept(timeout=10))
            a = await buzon.aio.connect(url, timeout=10)
            b = await accepted
            lst.close()
        try:
            core = a._core
            core._write = _torn(core, 3)
            await a.send_bytes(b"m" * 64, timeout=10)
            assert not core.owed
            receipt = await a.send_bytes_async(b"r" * 10, timeout=10)
            core._write = _torn(core, 7)
            fast = await a.send_bytes_async(b"f" * 50, timeout=10)  # the flow exists now
            assert not core.owed
            assert (receipt.number, fast.number) == (2, 3)
            assert await b.recv_bytes(timeout=10) == b"m" * 64
            assert await b.recv_bytes(timeout=10) == b"r" * 10
            assert await b.recv_bytes(timeout=10) == b"f" * 50
            await asyncio.wait_for(fast, 10)
            assert receipt.delivered() and fast.delivered()
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_spin0_receives_in_order_whether_it_reads_or_sleeps_first(kind: str) -> None:
    """``spin=0`` reads first while messages stream in and sleeps first after a read
    found nothing: every switch between the two keeps order and timeouts."""
    a, b = _pair(kind, spin=0)
    with a, b:
        n = 0
        for burst in (1, 50, 1, 1, 20, 1):
            for i in range(burst):
                a.send_bytes(b"%d" % (n + i), timeout=10)
            for i in range(burst):
                assert b.recv_bytes(timeout=10) == b"%d" % (n + i)
            n += burst
            with pytest.raises(buzon.Timeout):
                b.recv_bytes(timeout=0.01)
        t = threading.Timer(0.05, lambda: a.send_bytes(b"late", timeout=10))
        t.start()
        assert b.recv_bytes(timeout=10) == b"late"  # slept first, woke for it
        t.join()


@pytest.mark.parametrize("kind", KINDS)
def test_aio_receives_in_order_whether_it_reads_or_waits_first(kind: str) -> None:
    """The asyncio twin of the spin=0 rule: after a read that found nothing it waits
    first, and never waits while messages an earlier read brought are in hand."""

    async def main() -> None:
        if kind == "pipe":
            a, b = buzon.aio.pipe()
        else:
            lst = buzon.aio.listen(kind)
            url = lst.address if kind.startswith("tcp") else kind
            accepted = asyncio.ensure_future(lst.accept(timeout=10))
            a = await buzon.aio.connect(url, timeout=10)
            b = await accepted
            lst.close()
        try:
            n = 0
            for burst in (1, 50, 1, 1, 20, 1):
                for i in range(burst):
                    await a.send_bytes(b"%d" % (n + i), timeout=10)
                for i in range(burst):
                    assert await b.recv_bytes(timeout=10) == b"%d" % (n + i)
                n += burst
                with pytest.raises(buzon.Timeout):
                    await b.recv_bytes(timeout=0.01)
            with pytest.raises(buzon.Timeout):
                await b.recv_bytes(timeout=0)  # tries a read, never just a wait
            await a.send_bytes(b"x", timeout=10)
            await asyncio.sleep(0.05)  # in the kernel before the receive starts
            assert await b.recv_bytes(timeout=0) == b"x"
            with pytest.raises(buzon.Timeout):
                await b.recv_bytes(timeout=0.01)  # waits first from here on
            for m in (b"p", b"q", b"r"):
                await a.send_bytes(m, timeout=10)
            await asyncio.sleep(0.05)
            assert b.recv_bytes_nowait() == b"p"  # one read brought all three
            assert await b.recv_bytes(timeout=5) == b"q"  # in hand: no wait for input
            assert await b.recv_bytes(timeout=5) == b"r"
            late = asyncio.get_running_loop().call_later(0.05, a.send_bytes_nowait, b"late")
            assert await b.recv_bytes(timeout=10) == b"late"
            late.cancel()
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


def test_without_the_c_extension_the_python_write_does_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import buzon._channel

    monkeypatch.setattr(buzon._channel, "write_frame", None)
    a, b = _pair("unix:fastpath-py")
    with a, b:
        assert a._core.small_limit > 0
        assert a._core._write.__name__ == "python_write"
        a._core._write = _torn(a._core, 5)
        a.send_bytes(b"p" * 100, timeout=10)
        a.send_bytes_async(b"r", timeout=10)
        receipt = a.send_bytes_async(b"s", timeout=10)  # the flow exists: python_write
        assert [b.recv_bytes(timeout=10) for _ in range(3)] == [b"p" * 100, b"r", b"s"]
        receipt.wait(timeout=10)
        assert a.statistics().bytes_sent == 108 + 9 + 9

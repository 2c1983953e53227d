"""send_bytes_async's C writer (protocol/_credit.c ReceiptWriter): the same frames,
numbers, counts and receipts as the general way, under threads and back-pressure."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest

import buzon
from _pairs import stream_pair
from buzon.errors import ChannelClosed

T = 10.0
_credit = pytest.importorskip("buzon.protocol._credit")


@pytest.fixture(params=["pipe", "unix", "tcp"])
def ends(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[tuple]:
    a, b = stream_pair(request.param, tmp_path)
    with a, b:
        yield a, b


def test_the_c_writer_sends_what_the_general_way_sends(ends: tuple) -> None:
    a, b = ends
    assert isinstance(a.send_bytes_async, _credit.ReceiptWriter)
    receipts = [a.send_bytes_async(b"x" * n) for n in (0, 1, 64, 4000)]
    stats = a.statistics()  # what the C writer counted, added in
    assert (stats.messages_sent, stats.bytes_sent) == (4, 4 * 8 + 4065)
    receipts.append(a.send_bytes_async(b"y", T))  # another argument: the general way
    receipts.append(a.send_bytes_async(b"z" * 5000))  # too big for C: the general way
    receipts.append(a.send_bytes_async(bytearray(b"w")))  # not bytes: the general way
    assert [r.number for r in receipts] == list(range(1, 8))
    assert all(type(r) is buzon.Receipt for r in receipts)
    got = [b.recv_bytes(timeout=T) for _ in range(7)]
    assert got == [b"", b"x", b"x" * 64, b"x" * 4000, b"y", b"z" * 5000, b"w"]
    for r in receipts:
        r.wait(timeout=T)
        assert r.delivered() and r.done()
    assert a.statistics().messages_sent == 7
    assert b.statistics().messages_received == 7


def test_the_frame_on_the_wire_asks_for_a_receipt() -> None:
    a, b = buzon.pipe()
    with a, b:
        a.send_bytes_async(b"abc")
        frame = None
        deadline = time.monotonic() + T
        while frame is None and time.monotonic() < deadline:
            frame = b._core.poll_frame()
        assert frame is not None and frame.receipt and bytes(frame.body) == b"abc"


def test_numbers_stay_the_order_of_sends_across_threads(ends: tuple) -> None:
    """Four threads send receipts through the C writer and the general way at once:
    every frame arrives whole, every number is used once, every receipt resolves."""
    a, b = ends
    per, threads = 300, 4
    receipts: list[list[buzon.Receipt]] = [[] for _ in range(threads)]

    def sender(i: int) -> None:
        for k in range(per):
            msg = struct.pack("<HH", i, k) + b"p" * (k % 50)
            if k % 7 == 0:
                receipts[i].append(a.send_async(msg, T))  # encoded: the general way
            else:  # raw bytes, received by recv() as bytes too
                receipts[i].append(a.send_bytes_async(msg))

    workers = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    last = [-1] * threads  # each thread's messages arrive in its order
    for _ in range(per * threads):
        got = b.recv(timeout=T)
        i, k = struct.unpack_from("<HH", got)
        assert got[4:] == b"p" * (k % 50) and k == last[i] + 1
        last[i] = k
    for w in workers:
        w.join(T)
    numbers = sorted(r.number for rs in receipts for r in rs)
    assert numbers == list(range(1, per * threads + 1))
    for rs in receipts:
        for r in rs:
            r.wait(timeout=T)
            assert r.delivered()


def test_back_pressure_keeps_frames_whole(ends: tuple) -> None:
    """The receiver reads nothing until the sender is stuck (kernel buffer full: the
    C writer meets EAGAIN or writes part of a frame, and the engine finishes it)."""
    a, b = ends
    count = 400
    box: list[buzon.Receipt] = []

    def sender() -> None:
        for k in range(count):
            box.append(a.send_bytes_async(struct.pack("<I", k) + b"q" * 3000))

    t = threading.Thread(target=sender)
    t.start()
    time.sleep(0.2)  # let it fill the buffers (not asserted)
    for k in range(count):
        msg = b.recv_bytes(timeout=T)
        assert msg == struct.pack("<I", k) + b"q" * 3000
    t.join(T)
    assert [r.number for r in box] == list(range(1, count + 1))
    box[-1].wait(timeout=T)
    assert all(r.delivered() for r in box)


def test_a_closed_channel_refuses(ends: tuple) -> None:
    a, _ = ends
    a.close()
    with pytest.raises(ChannelClosed):
        a.send_bytes_async(b"x")


def test_a_receipt_is_made_by_python_code_too() -> None:
    flow = buzon.protocol.credit.SendFlow(None)
    r = buzon.Receipt(None, flow, 3)
    assert (r.number, r._flow, r._channel) == (3, flow, None)
    with pytest.raises(AttributeError):
        r.number = 4  # type: ignore[misc]

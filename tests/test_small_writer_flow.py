"""The C small-send writer (``protocol/_stream.c`` SmallWriter) on a channel that numbers
its sends: after one receipt (or with a capacity) plain ``send_bytes`` keeps the C path,
counted in the send flow, and receipts and credit stay right.

Before: SmallWriter refused for good once the channel had a send flow (``sflow``), so
one ``send_bytes_async`` cost every later plain send its C path (the first test fails
on a7ee4e5: the writer's count stays 0).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import buzon

KINDS = ["pipe", "unix:smallflow", "tcp://127.0.0.1:0"]


def _pair(kind: str, **options: Any) -> tuple[Any, Any]:
    if kind == "pipe":
        return buzon.pipe(**options)
    lst = buzon.listen(kind, **options)
    try:
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        url = lst.address if kind.startswith("tcp") else kind
        a = buzon.connect(url, timeout=10, **options)
        t.join(10)
        return a, box[0]
    finally:
        lst.close()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def _c_sent(ch: Any) -> int:
    sent: int = ch._core._small_writer.counts()[0]
    return sent


def test_plain_sends_after_a_receipt_keep_the_c_path(kind: str) -> None:
    a, b = _pair(kind)
    with a, b:
        first = a.send_bytes_async(b"receipt 1")
        assert b.recv_bytes(timeout=10) == b"receipt 1"
        first.wait(timeout=10)
        before = _c_sent(a)
        for i in range(20):
            a.send_bytes(b"plain %d" % i)
        assert _c_sent(a) == before + 20  # the C writer sent them all
        last = a.send_bytes_async(b"receipt 2")
        assert last.number == 22  # numbered after the plain ones
        assert not last.done()
        for i in range(20):
            assert b.recv_bytes(timeout=10) == b"plain %d" % i
        assert b.recv_bytes(timeout=10) == b"receipt 2"
        last.wait(timeout=10)
        assert last.delivered
        stats = a.statistics()
        assert stats.messages_sent == 22 and b.statistics().messages_received == 22


def test_a_bounded_channel_sends_in_c_within_its_credit(kind: str) -> None:
    a, b = _pair(kind, capacity=2)
    with a, b:
        a.send_bytes(b"one")
        a.send_bytes(b"two")
        assert _c_sent(a) == 2
        with pytest.raises(buzon.Full):
            a.send_bytes_nowait(b"three")  # two are untaken: no credit
        assert b.recv_bytes(timeout=10) == b"one"
        assert b.recv_bytes(timeout=10) == b"two"
        a.send_bytes(b"three", timeout=10)  # credit came back
        assert b.recv_bytes(timeout=10) == b"three"
        assert a.statistics().messages_sent == 3

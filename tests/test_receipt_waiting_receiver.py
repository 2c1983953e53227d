"""A receipt resolves when its message is taken by a receiver that was already
blocked in ``recv`` when it arrived (the blocking driver's C wait, ``wait_frame``,
takes a lone plain frame itself: on 66a2333 it returned a receipt-asking frame
without acknowledging it, and the sender's ``receipt.wait`` timed out)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import buzon

T = 10.0


def _pair(kind: str, tmp_path: object, **options: object) -> tuple[buzon.Channel, buzon.Channel]:
    if kind == "pipe":
        return buzon.pipe(**options)  # type: ignore[arg-type]
    url = f"unix:{tmp_path}/s" if kind == "unix" else "tcp://127.0.0.1:0"
    lst = buzon.listen(url, **options)  # type: ignore[arg-type]
    box: list[buzon.Channel] = []
    t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
    t.start()
    try:
        con = buzon.connect(str(lst.address), timeout=T, **options)  # type: ignore[arg-type]
    finally:
        t.join(T)
        lst.close()
    return con, box[0]


@pytest.fixture(params=["pipe", "unix", "tcp"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[None, 0.0], ids=["spin", "spin0"])
def spin(request: pytest.FixtureRequest) -> float | None:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def ends(kind: str, spin: float | None, tmp_path: object) -> Iterator[tuple]:
    options = {} if spin is None else {"spin": spin}
    a, b = _pair(kind, tmp_path, **options)
    with a, b:
        yield a, b


def _blocked_receive(recv: object) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(recv(timeout=T)))  # type: ignore[operator]
    t.start()
    time.sleep(0.1)  # let it block in its wait (not asserted: a precondition)
    return t, got


@pytest.mark.parametrize("how", ["send_bytes_async", "send_async"])
def test_receipt_of_a_message_a_blocked_receiver_took(ends: tuple, how: str) -> None:
    a, b = ends
    for i in range(3):
        t, got = _blocked_receive(b.recv_bytes if how == "send_bytes_async" else b.recv)
        msg = b"m%d" % i if how == "send_bytes_async" else {"i": i}
        receipt = getattr(a, how)(msg)
        t.join(T)
        assert got == [msg]
        receipt.wait(timeout=T)
        assert receipt.delivered()
        assert receipt.receiver is not None or a.peer.pid is None


def test_plain_messages_a_blocked_receiver_took_count_in_the_receipt_numbers(
    ends: tuple,
) -> None:
    """Once receipts were asked, every take is numbered, those of plain messages too: a
    plain message taken by the C wait must count, or later receipts never resolve."""
    a, b = ends
    first = a.send_bytes_async(b"r0")
    assert b.recv_bytes(timeout=T) == b"r0"
    first.wait(timeout=T)
    for i in range(3):
        t, got = _blocked_receive(b.recv_bytes)
        a.send_bytes(b"p%d" % i)  # plain, no receipt
        t.join(T)
        assert got == [b"p%d" % i]
        t, got = _blocked_receive(b.recv_bytes)
        receipt = a.send_bytes_async(b"r%d" % (i + 1))
        t.join(T)
        receipt.wait(timeout=T)
        assert receipt.delivered()

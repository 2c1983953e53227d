"""How often a receiver acknowledges receipts (``protocol/credit.py``: one CREDIT per
batch, never one per message on a busy stream, and never late: a receiver that took
everything the link held answers at once)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import buzon

T = 10.0
MSG = b"m" * 64


def _unix_pair(path: str) -> tuple[buzon.Channel, buzon.Channel]:
    lst = buzon.listen(f"unix:{path}")
    box: list[buzon.Channel] = []
    t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
    t.start()
    try:
        con = buzon.connect(f"unix:{path}", timeout=T)
    finally:
        t.join(T)
        lst.close()
    return con, box[0]


@pytest.fixture(params=["pipe", "unix"])
def ends(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[tuple[object, object]]:
    if request.param == "pipe":
        a, b = buzon.pipe()
    else:
        a, b = _unix_pair(f"{tmp_path}/s")
    with a, b:
        yield a, b


def test_a_receiver_that_took_all_the_link_held_answers_at_once(ends: tuple) -> None:
    a, b = ends
    receipts = [a.send_bytes_async(MSG) for _ in range(3)]
    for _ in range(3):
        assert b.recv_bytes(timeout=T) == MSG
    # the receiver now does nothing more: the CREDIT went with its last take
    for r in receipts:
        r.wait(timeout=T)
        assert r.delivered()
    assert b.statistics().credits_sent == 1


def test_messages_that_came_while_the_last_in_hand_was_taken_share_its_credit(
    ends: tuple,
) -> None:
    """The receiver reads once more (never waiting) before it answers: what the sender
    wrote meanwhile joins the batch, and one CREDIT answers both (60416ea: one per read,
    two here)."""
    a, b = ends
    first = [a.send_bytes_async(MSG) for _ in range(3)]
    assert b.recv_bytes(timeout=T) == MSG  # one read brought all three
    assert b.recv_bytes(timeout=T) == MSG
    second = [a.send_bytes_async(MSG) for _ in range(3)]  # arrive before the third take
    for _ in range(4):
        assert b.recv_bytes(timeout=T) == MSG
    for r in first + second:
        r.wait(timeout=T)
    assert b.statistics().credits_sent == 1
    assert [r.number for r in first + second] == [1, 2, 3, 4, 5, 6]


def test_a_receiver_reading_ahead_still_reports_the_end_of_the_stream(ends: tuple) -> None:
    """The look-ahead read meets the peer's close: the message in hand is still taken
    and acknowledged, and the next receive reports the end."""
    a, b = ends
    r = a.send_bytes_async(MSG)
    a.flush(timeout=T)
    a.close()
    assert b.recv_bytes(timeout=T) == MSG
    with pytest.raises(buzon.EndOfChannel):
        b.recv_bytes(timeout=T)
    assert r.number == 1

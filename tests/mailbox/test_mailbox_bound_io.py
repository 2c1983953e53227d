"""A mailbox's own ``send`` and ``recv`` are its core's ``box_send``/``box_recv`` (one C
call, no Python frame) where the hot path applies; everything else still reaches the
methods' general way, with the same errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import buzon
from buzon._mailbox import Mailbox
from buzon.errors import ChannelClosed, Empty, Full, NoSuchEndpoint, Timeout

T = 10.0


def test_a_plain_any_mailbox_sends_and_receives_in_one_c_call() -> None:
    box = buzon.mailbox("bio", capacity=8)
    try:
        assert type(box.send).__name__ == "builtin_function_or_method"
        assert type(box.recv).__name__ == "builtin_function_or_method"
        box.send(b"x" * 64)
        box.send({"a": 1}, timeout=T)
        assert box.recv() == b"x" * 64
        assert box.recv(timeout=T) == {"a": 1}
        assert box.statistics()["sent"] == 2 and box.statistics()["received"] == 2
    finally:
        box.remove()


def test_policies_and_modes_without_the_hot_path_keep_the_methods() -> None:
    boxes = [
        buzon.mailbox("bio-x", capacity=4, policy="exclusive"),
        buzon.mailbox("bio-rv", capacity=0),
        buzon.mailbox("bio-rr", capacity=4, policy="round_robin"),
    ]
    try:
        assert "recv" not in vars(boxes[0])  # exclusive: the hold is taken in Python
        assert "send" not in vars(boxes[1])  # a rendezvous waits for its receiver
        assert "recv" not in vars(boxes[2])  # each receiver has its own ring
        bb = buzon.BoundedBuffer("bio-bb", 4, 16)
        try:
            assert "send" not in vars(bb) and "recv" not in vars(bb)
            bb.put(b"raw")
            assert bb.get(T) == b"raw"
        finally:
            bb.remove()
    finally:
        for box in boxes:
            box.remove()


def test_what_is_no_common_record_goes_the_general_way() -> None:
    box = buzon.mailbox("bio-gen", capacity=16)
    try:
        items = [np.arange(4.0), b"b" * 5000, bytearray(b"ba"), "x" * 3000]
        for item in items:
            box.send(item, T)
        got = [box.recv(T) for _ in items]
        assert np.array_equal(got[0], items[0])
        assert got[1:] == items[1:]  # (out of line, a buffer, a long str)
        assert box.statistics()["out_of_line"] >= 1
    finally:
        box.remove()


def test_errors_are_the_mailboxes() -> None:
    box = buzon.mailbox("bio-err", capacity=1)
    try:
        box.send(b"1")
        with pytest.raises(Timeout):
            box.send(b"2", 0.01)
        with pytest.raises(Full, match="capacity=1"):
            box.send_nowait(b"2")
        assert box.recv(T) == b"1"
        with pytest.raises(Empty):
            box.recv(0)
        with pytest.raises(Timeout):
            box.recv(timeout=0.01)
        with pytest.raises(TypeError):
            box.send()  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            box.recv(1.0, 2.0)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            box.send(b"x", tiemout=1)  # type: ignore[call-arg]
    finally:
        box.remove()
    with pytest.raises(ChannelClosed):
        box.send(b"after close")
    with pytest.raises(ChannelClosed):
        box.recv(T)


def test_a_removed_mailbox_is_gone_for_senders_and_ends_for_receivers() -> None:
    box = buzon.mailbox("bio-rm", capacity=4)
    other = buzon.mailbox("bio-rm")
    try:
        got: list[BaseException] = []

        def receiver() -> None:
            try:
                other.recv(T)
            except BaseException as exc:
                got.append(exc)

        t = threading.Thread(target=receiver)
        t.start()
        box.remove()
        t.join(T)
        assert got and type(got[0]).__name__ == "EndOfChannel"
        with pytest.raises(NoSuchEndpoint):
            other.send(b"late")
    finally:
        other.close()


def test_a_subclass_keeps_its_own_send_and_recv() -> None:
    class Counting(Mailbox):
        sent = 0

        def send(self, obj: object, timeout: float | None = None) -> None:
            Counting.sent += 1
            super().send(obj, timeout)

    box = Counting("bio-sub", capacity=4)
    try:
        box.send(b"a")
        assert Counting.sent == 1
        assert box.recv(T) == b"a"
    finally:
        box.remove()

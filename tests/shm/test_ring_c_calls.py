"""On a ``shm:`` channel of the blocking driver, ``send_bytes(data)`` and
``recv_bytes()`` are one C call each (``protocol._take.Put`` in its ring mode and
``protocol._take.RingTake``): no Python frame between the caller and the ring's
``try_send_frame`` / ``try_recv_frame``. The methods stay the reference: whatever the C
call does not finish (a full or empty ring, a record that is not a plain frame, a
timeout or priority argument, a body the ring cannot take) goes to them, and these
tests check that nothing changes there: order, counts, errors, waiting."""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from _pairs import url_pair
from buzon.errors import ChannelClosed, EndOfChannel, Timeout

_take = pytest.importorskip("buzon.protocol._take")

T = 10.0


@contextlib.contextmanager
def _pair(name: str) -> Iterator[tuple[Any, Any]]:
    a, b = url_pair(f"shm:{name}", T)
    with a, b:
        yield a, b


def _python_calls(body: Any) -> list[str]:
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is not body.__code__:
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        body()
    finally:
        sys.setprofile(None)
    return calls


def test_send_bytes_and_recv_bytes_are_one_c_call_each() -> None:
    with _pair("rcc-one") as (a, b):
        assert isinstance(a.send_bytes, _take.Put)
        assert isinstance(b.recv_bytes, _take.RingTake)
        before_a, before_b = a.statistics(), b.statistics()
        msgs = [bytes([i]) * (1 + i * 37) for i in range(50)]
        send, recv = a.send_bytes, b.recv_bytes
        got: list[bytes] = []

        def body() -> None:
            for m in msgs:
                send(m)
            for _ in msgs:
                got.append(recv())

        assert _python_calls(body) == []
        assert got == msgs
        sa, sb = a.statistics(), b.statistics()
        assert sa.messages_sent - before_a.messages_sent == 50
        assert sb.messages_received - before_b.messages_received == 50
        assert sb.bytes_received - before_b.bytes_received == sa.bytes_sent - before_a.bytes_sent


def test_an_empty_ring_waits_in_the_method_and_a_timeout_still_raises() -> None:
    with _pair("rcc-wait") as (a, b):
        with pytest.raises(Timeout):
            b.recv_bytes(0.02)  # an argument: the method
        t = threading.Timer(0.05, lambda: a.send_bytes(b"late"))
        t.start()
        try:
            assert b.recv_bytes() == b"late"  # empty at first: the method spins, waits
        finally:
            t.join(T)


def test_what_the_ring_does_not_take_goes_the_general_way_in_order() -> None:
    with _pair("rcc-general") as (a, b):
        limit = a._core.fast_bytes_limit
        msgs: list[Any] = [
            b"small",
            bytearray(b"not exact bytes"),
            b"z" * (limit + 1),  # over a ring record: the general way
            memoryview(b"a view"),
            b"last",
        ]
        sender = threading.Thread(target=lambda: [a.send_bytes(m) for m in msgs])
        sender.start()
        try:
            got = [b.recv_bytes(timeout=T) for _ in msgs]
        finally:
            sender.join(T)
        assert got == [bytes(m) for m in msgs]


def test_a_full_ring_makes_the_send_wait_and_loses_nothing() -> None:
    with _pair("rcc-full") as (a, b):
        n = 3000  # several rings' worth of 4 KiB bodies
        bodies = [i.to_bytes(4, "little") * 1024 for i in range(n)]
        sender = threading.Thread(target=lambda: [a.send_bytes(x) for x in bodies])
        sender.start()
        try:
            got = [b.recv_bytes() for _ in range(n)]
        finally:
            sender.join(T)
        assert got == bodies


def test_the_end_of_the_channel_comes_through_the_rest_call() -> None:
    """The peer's close is a record that is not a plain frame: the C call hands it to
    the driver's ``_after_fast``, which raises EndOfChannel after the messages."""
    with _pair("rcc-end") as (a, b):
        a.send_bytes(b"one")
        a.send_bytes(b"two")
        a.close()
        assert b.recv_bytes() == b"one"
        assert b.recv_bytes() == b"two"
        with pytest.raises(EndOfChannel):
            b.recv_bytes()
        with pytest.raises(EndOfChannel):
            b.recv_bytes()


def test_after_close_the_calls_raise_as_the_methods_do() -> None:
    with _pair("rcc-closed") as (a, b):
        send, recv = a.send_bytes, b.recv_bytes
        a.close()
        b.close()
        with pytest.raises(ChannelClosed):
            send(b"x")
        with pytest.raises(ChannelClosed):
            recv()


def test_the_c_calls_hold_the_channel_weakly() -> None:
    """A channel dropped without close() is freed at once (no reference cycle through
    its own methods), and a call kept from it raises ChannelClosed."""
    a, b = url_pair("shm:rcc-weak", T)
    a.send_bytes(b"x")
    assert b.recv_bytes() == b"x"
    send, recv = a.send_bytes, b.recv_bytes
    gc.disable()
    try:
        ra, rb = weakref.ref(a), weakref.ref(b)
        del a, b
        assert ra() is None and rb() is None
    finally:
        gc.enable()
    with pytest.raises(ChannelClosed):
        send(b"x")
    with pytest.raises(ChannelClosed):
        recv()

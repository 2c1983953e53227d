"""Rendezvous (``capacity=0``) on framed streams: the blocking driver's send and receive
in C (``protocol/_rv.c`` RvStream) keep every contract of the engine's way.

The hostile cases put a send inside the C call's wait for its take (the receiver's
offer is known from the reply it sent, then it stops receiving) and end that wait every
way there is: its deadline, a close from another thread, the peer's end, an interrupt.
Each passes on the engine's way too (a7ee4e5); the differential test runs the same
exchange both ways and compares what moved.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import buzon
import buzon.sync._channel as sync_channel
from _rv_pairs import engine_only, rv_pair

KINDS = ["pipe", "unix:rvstreamc", "tcp://127.0.0.1:0"]


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    a, b = rv_pair(request.param)
    with a, b:
        yield a, b


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # handed to the test
            box.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, box


def _round(a: Any, b: Any, msg: bytes = b"ping") -> None:
    """One request/response: a's send, b's receive and reply, a's receive. After it, a
    knows b's offer (it came with the reply) and b has stopped receiving."""
    t, got = _in_thread(lambda: b.send_bytes(b.recv_bytes(timeout=10), timeout=10))
    a.send_bytes(msg, timeout=10)
    assert a.recv_bytes(timeout=10) == msg
    t.join(10)
    assert got == [None]


def test_the_c_path_carries_a_request_response_exchange(
    pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first round neither end runs the engine's send or receive steps."""
    a, b = pair
    assert a._rv_stream is not None and b._rv_stream is not None
    _round(a, b)
    calls: list[str] = []
    for name in ("send_steps", "recv_steps"):
        real = getattr(sync_channel, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(sync_channel, name, counted)

    def echo() -> None:
        for _ in range(50):
            b.send_bytes(b.recv_bytes(timeout=10), timeout=10)

    t, _ = _in_thread(echo)
    for i in range(50):
        a.send_bytes(b"%d" % i, timeout=10)
        assert a.recv_bytes(timeout=10) == b"%d" % i
    t.join(10)
    assert calls == []
    assert a.statistics().messages_sent == 51 and b.statistics().messages_received == 51


def test_a_send_waiting_for_its_take_times_out_and_delivers_nothing(
    pair: tuple[Any, Any],
) -> None:
    a, b = pair
    _round(a, b)
    with pytest.raises(buzon.Timeout) as raised:
        a.send_bytes(b"never", timeout=0.3)  # b does not receive now
    assert "nothing of it is delivered" in str(raised.value)
    with pytest.raises(buzon.Timeout):
        print("received anyway:", b.recv_bytes(timeout=0.3))
    assert a.statistics().aborted == 1
    _round(a, b, b"after")  # the channel goes on


def test_a_retry_loop_around_the_c_path_delivers_each_message_once(
    pair: tuple[Any, Any],
) -> None:
    """A receiver that naps between receives, a sender that retries each timed-out
    send with a short deadline: every message arrives once, in order."""
    a, b = pair
    _round(a, b)
    n = 30
    got: list[bytes] = []

    def receive() -> None:
        while len(got) < n:
            try:
                got.append(b.recv_bytes(timeout=0.02))
            except buzon.Timeout:
                time.sleep(0.005)

    t, _ = _in_thread(receive)
    for i in range(n):
        while True:
            try:
                a.send_bytes(b"m%d" % i, timeout=0.01)
                break
            except buzon.Timeout:
                pass
    t.join(30)
    assert got == [b"m%d" % i for i in range(n)]


def test_a_close_in_another_thread_ends_a_send_waiting_for_its_take(
    pair: tuple[Any, Any],
) -> None:
    a, b = pair
    _round(a, b)
    t, box = _in_thread(lambda: a.send_bytes(b"stuck", timeout=30))
    time.sleep(0.2)
    a.close()
    t.join(10)
    assert not t.is_alive()
    assert len(box) == 1 and isinstance(box[0], buzon.ChannelClosed), box
    # (its message is withdrawn: tests/test_rendezvous_withdraw.py)


def test_the_peers_end_ends_a_send_waiting_for_its_take(pair: tuple[Any, Any]) -> None:
    a, b = pair
    _round(a, b)
    t, box = _in_thread(lambda: a.send_bytes(b"orphan", timeout=30))
    time.sleep(0.2)
    b.close()
    t.join(10)
    assert not t.is_alive()
    assert len(box) == 1 and isinstance(box[0], buzon.EndOfChannel), box


def test_an_interrupt_in_the_wait_for_the_take_withdraws_the_message(
    pair: tuple[Any, Any],
) -> None:
    a, b = pair
    _round(a, b)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            a.send_bytes(b"interrupted", timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    with pytest.raises(buzon.Timeout):
        print("received anyway:", b.recv_bytes(timeout=0.3))
    _round(a, b, b"after")


def test_a_receive_that_times_out_withdraws_its_offer(pair: tuple[Any, Any]) -> None:
    a, b = pair
    _round(a, b)
    with pytest.raises(buzon.Timeout):
        b.recv_bytes(timeout=0.1)
    time.sleep(0.05)
    with pytest.raises(buzon.Full):
        a.send_bytes_nowait(b"nobody waits")
    _round(a, b, b"after")


def test_a_close_in_another_thread_ends_a_waiting_receive(pair: tuple[Any, Any]) -> None:
    a, b = pair
    _round(a, b)
    t, box = _in_thread(lambda: b.recv_bytes(timeout=30))
    time.sleep(0.2)
    b.close()
    t.join(10)
    assert not t.is_alive()
    assert len(box) == 1 and isinstance(box[0], buzon.ChannelClosed), box


def _exchange(kind: str, sizes: list[int], c_path: bool) -> tuple[list[Any], list[Any]]:
    """A request/response exchange of payloads of ``sizes`` (bytes, and every third as
    an object through ``send``); returns what arrived and the two ends' counts."""
    a, b = rv_pair(kind)
    with a, b:
        if not c_path:
            engine_only(a)
            engine_only(b)

        def echo() -> None:
            for i in range(len(sizes)):
                if i % 3 == 2:
                    b.send(b.recv(timeout=10), timeout=10)
                else:
                    b.send_bytes(b.recv_bytes(timeout=10), timeout=10)

        t, _ = _in_thread(echo)
        got: list[Any] = []
        for i, size in enumerate(sizes):
            if i % 3 == 2:
                a.send({"i": i, "p": b"x" * size}, timeout=10)
                got.append(a.recv(timeout=10))
            else:
                a.send_bytes(bytes([i % 256]) * size, timeout=10)
                got.append(a.recv_bytes(timeout=10))
        t.join(10)
        counts = []
        for end in (a, b):
            s = end.statistics()
            counts.append((s.messages_sent, s.messages_received, s.bytes_sent, s.aborted))
        return got, counts


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    sizes=st.lists(
        st.one_of(st.integers(0, 80), st.sampled_from([4087, 4088, 4089, 5000])),
        min_size=1,
        max_size=8,
    ),
)
def test_the_c_path_moves_what_the_engine_moves(kind: str, sizes: list[int]) -> None:
    """Differential: the same exchange with the C calls and with the engine alone (the
    reference) delivers the same messages and counts the same (payloads up to the C
    limit and past it, which go the engine's way)."""
    assert _exchange(kind, sizes, True) == _exchange(kind, sizes, False)

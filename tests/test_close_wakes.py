"""``close()`` from another thread ends a blocked ``recv`` (and a blocked ``send``)
promptly with :class:`ChannelClosed`, on every transport the blocking driver waits
on, and leaves no fd behind (the per-channel wake fd included)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import buzon
from buzon.errors import ChannelClosed
from buzon.testing.conformance._harness import url_for

pytestmark = pytest.mark.fd_check

KINDS = ["pipe", "unix", "tcp", "unixgram", "mq", "fifo", "shm"]
SPINS = [0.0, None]  # None: the default spin
JOIN = 10.0  # generous: only a waiter that never wakes gets near it


def _pair(kind: str, **options: Any) -> tuple[buzon.Channel, buzon.Channel]:
    if kind == "pipe":
        return buzon.pipe(**options)
    lst = buzon.listen(url_for(kind), **options)
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        a = buzon.connect(str(lst.address), timeout=10, **options)
        t.join(10)
        b = box[0]
        if not b.properties.connection_oriented:  # datagrams: introduce the client
            a.send_bytes(b"hello", timeout=10)
            assert b.recv_bytes(timeout=10) == b"hello"
        return a, b
    finally:
        lst.close()


@pytest.fixture(params=[(k, s) for k in KINDS for s in SPINS], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    kind, spin = request.param
    a, b = _pair(kind, **({} if spin is None else {"spin": spin}))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _blocked(call: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException | str]]:
    """Run ``call`` in a thread; what it raised (or "returned") lands in the list."""
    out: list[BaseException | str] = []
    entered = threading.Event()

    def run() -> None:
        entered.set()
        try:
            call()
            out.append("returned")
        except BaseException as exc:  # the test looks at it
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    entered.wait(10)
    return t, out


def _settle(t: threading.Thread) -> None:
    """Give the thread time to get into its wait (no assertion on how long)."""
    t.join(0.2)
    assert t.is_alive(), "the call did not block"


@pytest.mark.parametrize("how", ["recv", "recv_bytes"])
def test_close_from_another_thread_ends_a_blocked_receive(
    pair: tuple[buzon.Channel, buzon.Channel], how: str
) -> None:
    _a, b = pair
    t, out = _blocked(lambda: getattr(b, how)(timeout=None))
    _settle(t)
    b.close()
    t.join(JOIN)
    assert not t.is_alive(), "close() did not wake the blocked receive"
    assert len(out) == 1 and isinstance(out[0], ChannelClosed), out
    with pytest.raises(ChannelClosed):
        b.recv_bytes(timeout=0)


def test_a_receive_after_the_wake_still_gets_data_on_other_channels(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair  # the wake fd made for one wait does not disturb later waits
    t, out = _blocked(lambda: b.recv_bytes(timeout=None))
    _settle(t)
    a.send_bytes(b"one")
    t.join(JOIN)
    assert out == ["returned"]
    threading.Timer(0.05, a.send_bytes, (b"two",)).start()
    assert b.recv_bytes(timeout=10) == b"two"


def test_close_ends_a_send_blocked_on_a_full_pipe() -> None:
    a, b = buzon.pipe(spin=0.0)
    try:
        chunk = b"x" * 65536

        def fill() -> None:
            while True:
                a.send_bytes(chunk, timeout=None)

        t, out = _blocked(fill)
        _settle(t)
        a.close()
        t.join(JOIN)
        assert not t.is_alive(), "close() did not wake the blocked send"
        assert len(out) == 1 and isinstance(out[0], ChannelClosed), out
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["unix", "tcp", "shm", "seqpacket"])
def test_close_from_another_thread_ends_a_blocked_accept(kind: str) -> None:
    lst = buzon.listen(url_for(kind))
    try:
        t, out = _blocked(lambda: lst.accept(timeout=None))
        _settle(t)
        lst.close()
        t.join(JOIN)
        assert not t.is_alive(), "close() did not wake the blocked accept"
        assert len(out) == 1 and isinstance(out[0], ChannelClosed), out
    finally:
        lst.close()

"""The plain blocking receive of message transports and ``fifo:`` waits and takes in
one C call (``ChannelCore.wait_message`` → ``protocol._dgram``), and a small
``send_bytes`` is one C call (``MessageSender``): every contract of a receive still
holds through them, with ``spin=0`` and with the default spin: timeouts, a close in
another thread, a signal whose handler raises, bad datagrams, a bound end's changing
sender, queue priorities, statistics."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from _fork import in_child
from buzon.errors import ChannelClosed, FrameError, Timeout
from buzon.testing.conformance._harness import url_for

pytestmark = pytest.mark.fd_check

KINDS = ["unixgram", "udp", "mq", "fifo"]
SPINS = [0.0, None]  # None: the default spin


def _pair(kind: str, **options: Any) -> tuple[buzon.Channel, buzon.Channel]:
    """(sender, receiver): the receiver is the bound (listening) end."""
    lst = buzon.listen(url_for(kind), **options)
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        a = buzon.connect(str(lst.address), timeout=10, **options)
        t.join(10)
        b = box[0]
        if kind in ("unixgram", "udp"):  # datagrams: introduce the client
            a.send_bytes(b"hello", timeout=10)
            assert b.recv_bytes(timeout=10) == b"hello"
        return a, b
    finally:
        lst.close()


def _options(spin: float | None) -> dict[str, Any]:
    return {} if spin is None else {"spin": spin}


@pytest.fixture(params=[(k, s) for k in KINDS for s in SPINS], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    kind, spin = request.param
    a, b = _pair(kind, **_options(spin))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_a_waiting_receive_takes_the_c_wait(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    before = b.statistics()
    for i in range(20):  # each receive waits: the message comes later
        threading.Timer(0.005, a.send_bytes, (b"late%d" % i,)).start()
        assert b.recv_bytes(timeout=10) == b"late%d" % i
    after = b.statistics()
    assert after.messages_received - before.messages_received == 20
    assert after.bytes_received - before.bytes_received == sum(
        8 + len(b"late%d" % i) for i in range(20)
    )
    # the engine's loop tries a receive before it sleeps, and counts it: the C wait
    # sleeps first (at most the first receive after a busy spell tries)
    assert after.recv_would_block - before.recv_would_block <= 2
    assert a.statistics().messages_sent >= 20


def test_a_timeout_passes_with_nothing_lost(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    with pytest.raises(Timeout, match="recv timed out"):
        b.recv_bytes(timeout=0.05)
    with pytest.raises(Timeout):
        b.recv(timeout=0.01)
    a.send_bytes(b"after")
    a.send({"obj": 1})
    assert b.recv_bytes(timeout=10) == b"after"
    assert b.recv(timeout=10) == {"obj": 1}


def test_close_from_another_thread_ends_the_wait(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    _, b = pair
    out: list[BaseException | str] = []

    def run() -> None:
        try:
            b.recv_bytes()
            out.append("returned")
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(0.2)
    assert t.is_alive(), "the receive did not block"
    b.close()
    t.join(10)
    assert not t.is_alive()
    assert len(out) == 1 and isinstance(out[0], ChannelClosed)


def _raw_send(ch: buzon.Channel, data: bytes) -> None:
    """Bytes as one message, past the channel's framing."""
    transport: Any = ch._core.transport
    if ch.properties.transport == "mq":
        from buzon import _posixmq

        _posixmq.send(transport._mqd, data, 0)
    elif ch.properties.transport == "fifo":
        os.write(transport._wfd, data)
    else:
        transport.sock.send(data)


def test_a_bad_message_is_refused_and_the_next_arrives(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    fifo = b.properties.transport == "fifo"
    for junk in (b"\x07garbage!", b"\x01\x01\x00\x00\xff\x00\x00\x00short"):
        threading.Timer(0.02, _raw_send, (a, junk)).start()
        if fifo:  # no envelope: skipped and counted, the channel goes on
            with pytest.raises(Timeout):
                b.recv_bytes(timeout=0.3)
        else:
            with pytest.raises(FrameError):
                b.recv_bytes(timeout=10)
        threading.Timer(0.02, a.send_bytes, (b"good",)).start()
        assert b.recv_bytes(timeout=10) == b"good"
    assert b.statistics().rejected_frames >= 2


def test_a_bound_udp_end_answers_whoever_sent_last() -> None:
    b, lst = None, buzon.listen("udp://127.0.0.1:0", spin=0.0)
    one = buzon.connect(str(lst.address), spin=0.0)
    two = buzon.connect(str(lst.address), spin=0.0)
    try:
        one.send_bytes(b"from one")
        b = lst.accept(timeout=10)
        for sender, other in ((one, two), (one, two), (two, one), (two, one), (one, two)):
            threading.Timer(0.01, sender.send_bytes, (b"hi",)).start()
            assert b.recv_bytes(timeout=10) in (b"hi", b"from one")
            if b.statistics().messages_received == 1:
                assert b.recv_bytes(timeout=10) == b"hi"
            assert b.peer.address == sender._core.transport.sock.getsockname()
            b.send_bytes(b"reply")  # the C sender: to the last sender
            assert sender.recv_bytes(timeout=10) == b"reply"
            with pytest.raises(Timeout):
                other.recv_bytes(timeout=0.01)
    finally:
        for ch in (one, two, b):
            if ch is not None:
                ch.close()
        lst.close()


def test_queue_priorities_reach_the_channel_through_the_c_wait() -> None:
    a, b = _pair("mq", spin=0.0)
    try:
        got = []
        for prio in (0, 3, 3, 0, 0, 7):
            threading.Timer(0.01, a.send_bytes, (b"p%d" % prio,), {"priority": prio}).start()
            got.append((b.recv_bytes(timeout=10), b.last_priority))
        assert got == [(b"p%d" % p, p) for p in (0, 3, 3, 0, 0, 7)]
    finally:
        a.close()
        b.close()


def test_statistics_count_the_c_sends_and_receives(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    sent0, got0 = a.statistics(), b.statistics()
    for i in range(5):
        a.send_bytes(b"x" * i)
    for i in range(5):
        assert b.recv_bytes(timeout=10) == b"x" * i
    sent, got = a.statistics(), b.statistics()
    assert sent.messages_sent - sent0.messages_sent == 5
    assert sent.bytes_sent - sent0.bytes_sent == 5 * 8 + 10
    assert got.messages_received - got0.messages_received == 5
    assert got.bytes_received - got0.bytes_received == 5 * 8 + 10


@pytest.mark.parametrize("spin", SPINS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("timeout", [None, 20.0])
def test_a_signal_handler_that_raises_interrupts_the_wait_and_a_quiet_one_does_not(
    kind: str, spin: float | None, timeout: float | None
) -> None:
    def body() -> None:
        a, b = _pair(kind, **_options(spin))
        with a, b:

            def interrupt(signum: int, frame: object) -> None:
                raise KeyboardInterrupt

            signal.signal(signal.SIGALRM, interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            try:
                b.recv_bytes(timeout=timeout)
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("recv returned")
            calls = []
            signal.signal(signal.SIGALRM, lambda *_: calls.append(1))
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            sender = os.fork()
            if sender == 0:  # pragma: no cover - a second child sends later
                time.sleep(0.3)
                try:
                    a.send_bytes(b"next")
                finally:
                    os._exit(0)
            try:
                assert b.recv_bytes(timeout=timeout) == b"next"  # the wait went on
            finally:
                os.waitpid(sender, 0)
            assert calls == [1]
            signal.signal(signal.SIGALRM, signal.SIG_DFL)

    in_child(body)


def test_the_c_paths_apply_where_declared() -> None:
    for kind in KINDS:
        a, b = _pair(kind, spin=0.0)
        try:
            assert b._core.wait_receiver is not None, kind
            assert a._core.small_send is not None, kind
        finally:
            a.close()
            b.close()
    a, b = _pair("unixgram", spin=0.0, raw=True)  # raw: no frames to take, Python way
    try:
        assert b._core.wait_receiver is None
        a.send_bytes(b"raw")
        assert b.recv_bytes(timeout=10) == b"raw"
    finally:
        a.close()
        b.close()


def test_a_udp_socket_error_is_typed() -> None:
    # a connected UDP socket learns that nobody listens (ICMP port unreachable): the
    # receive that meets it raises a typed buzon error, not a bare OSError
    spare = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spare.bind(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()
    ch = buzon.connect(f"udp://127.0.0.1:{port}", spin=0.0)
    try:
        ch.send_bytes(b"anyone?")
        with pytest.raises(buzon.errors.BuzonError) as info:
            ch.recv_bytes(timeout=5)
        assert not isinstance(info.value, Timeout)
    finally:
        ch.close()

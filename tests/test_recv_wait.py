"""The plain blocking receive waits and reads in one C call
(``ChannelCore.wait_read`` → ``protocol._stream.wait_frame``): every contract of a
receive still holds through it, with ``spin=0`` and with the default spin: timeouts,
a frame that arrives in pieces, a peer stalled mid-frame, the end of the stream, bad
frames, and a signal whose handler raises (KeyboardInterrupt) during the wait."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from _fork import in_child
from buzon._record import replace
from buzon.errors import EndOfChannel, FrameError, Timeout
from buzon.protocol.frames import HEADER

pytestmark = pytest.mark.fd_check

KINDS = ["pipe", "unix:recvwait", "tcp://127.0.0.1:0"]
SPINS = [0.0, None]  # None: the default spin


def _pair(kind: str, **options: Any) -> tuple[buzon.Channel, buzon.Channel]:
    if kind == "pipe":
        return buzon.pipe(**options)
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


def _options(spin: float | None, **more: Any) -> dict[str, Any]:
    return more if spin is None else {"spin": spin, **more}


@pytest.fixture(params=[(k, s) for k in KINDS for s in SPINS], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    kind, spin = request.param
    a, b = _pair(kind, **_options(spin))
    with a, b:
        yield a, b


def _raw_write(ch: buzon.Channel, data: bytes) -> None:
    fd = ch._core.write_fileno()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def test_the_plain_receive_takes_the_c_wait(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    assert b._core.wait_fd is not None  # declared plain reads: the C wait applies
    before = b.statistics().bytes_received
    threading.Timer(0.05, a.send_bytes, (b"late",)).start()
    assert b.recv_bytes(timeout=10) == b"late"
    assert b.statistics().messages_received == 1
    assert b.statistics().bytes_received - before == 8 + 4


def test_a_timeout_passes_with_nothing_lost(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    with pytest.raises(Timeout, match="recv timed out"):
        b.recv_bytes(timeout=0.05)
    a.send_bytes(b"after")
    assert b.recv_bytes(timeout=10) == b"after"


def test_a_frame_in_pieces_arrives_whole(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    frame = HEADER.pack(1, 1, 0, 0, 5) + b"hello"

    def later() -> None:
        _raw_write(a, frame[:3])
        time.sleep(0.05)
        _raw_write(a, frame[3:10])
        time.sleep(0.05)
        _raw_write(a, frame[10:] + HEADER.pack(1, 1, 0, 0, 2) + b"!!")

    t = threading.Thread(target=later)
    t.start()
    try:
        assert b.recv_bytes(timeout=10) == b"hello"
        assert b.recv_bytes(timeout=10) == b"!!"
    finally:
        t.join()


def test_a_peer_stalled_mid_frame_is_named(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    b._core.options = replace(b._core.options, frame_timeout=0.3)
    threading.Timer(0.02, _raw_write, (a, HEADER.pack(1, 1, 0, 0, 50) + b"part")).start()
    with pytest.raises(Timeout, match="stalled"):
        b.recv_bytes(timeout=10)


def test_end_of_stream_and_a_bad_frame(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    threading.Timer(0.02, _raw_write, (a, b"\x09garbage-not-a-frame")).start()
    with pytest.raises(FrameError):
        b.recv_bytes(timeout=10)


def test_the_end_of_the_stream_after_a_wait(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    threading.Timer(0.02, a.close).start()
    with pytest.raises(EndOfChannel):
        b.recv_bytes(timeout=10)


@pytest.mark.parametrize("spin", SPINS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("timeout", [None, 20.0])
def test_a_signal_handler_that_raises_interrupts_a_blocking_recv(
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
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            a.send_bytes(b"next")  # nothing was lost or half-read: the channel goes on
            assert b.recv_bytes(timeout=10) == b"next"

    in_child(body)

"""The big-message path with the default options (issue 9: "no row slower than on
135cb2d"; the 1 MiB one-way rows).

* A receive inside a big frame spins its spin budget before each sleep, not only
  before its first: the rest of a frame comes a kernel buffer's worth at a time (64 KiB
  on a pipe), and a receiver put to sleep after each one was woken 16 times per MiB.
  The engine tests below fail on 19dfd8e (every wait after the first slept at once).
* ``recv_bytes_into`` of a big frame read ahead (not into the caller's buffer) raised
  ``ValueError`` and lost the message on 19dfd8e.
* The contracts of that path, where the frame flows straight into the caller's buffer
  (``recv_bytes_into``): a send that times out half-way delivers nothing there either
  and the channel goes on; a buffer too small raises ``MessageTooLarge`` and the
  messages behind it arrive; a header announcing a huge chunked frame commits little.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import buzon
from _pairs import url_pair
from buzon._engine import INPUT, Step, recv_steps
from buzon.errors import MessageTooLarge
from buzon.protocol.frames import CHUNKED_FLAG, HEADER, Kind

KINDS = ["pipe", "unix:bulk", "tcp://127.0.0.1:0"]
MIB = 1 << 20


# -- the engine: when a receive spins ---------------------------------------------------


class _Core:
    """What ``recv_steps`` asks of a channel core: ``partial()`` and the options."""

    def __init__(self, partial: list[bool], frame_timeout: float | None) -> None:
        self._partial = partial  # what partial() says, one value per call, the last sticks
        self.options = SimpleNamespace(frame_timeout=frame_timeout)
        self.spin_partial = True  # the transport spins inside frames (a pipe, unix)

    def partial(self) -> bool:
        return self._partial.pop(0) if len(self._partial) > 1 else self._partial[0]


def _steps_of(core: _Core, takes: int, *, spin: bool, polled: bool) -> list[Step]:
    """Run a plain receive's steps until ``take`` gives a message on its ``takes``-th
    call; the steps it yielded."""
    calls = 0

    def take() -> Any:
        nonlocal calls
        calls += 1
        return "message" if calls >= takes else None

    gen = recv_steps(core, False, take, spin=spin, polled=polled)  # type: ignore[arg-type]
    steps: list[Step] = []
    try:
        step = next(gen)
        while True:
            steps.append(step)
            step = gen.send(None)
    except StopIteration as stop:
        assert stop.value == "message"
    return steps


@pytest.mark.parametrize("frame_timeout", [30.0, None])
@pytest.mark.parametrize("polled", [True, False])
def test_a_receive_inside_a_big_frame_spins_before_every_sleep(
    frame_timeout: float | None, polled: bool
) -> None:
    # the driver's first wait read part of a frame (and spun already): spin=False
    steps = _steps_of(_Core([True], frame_timeout), 6, spin=False, polled=polled)
    assert len(steps) >= 4
    assert all(s.kind == INPUT for s in steps)
    assert all(s.spin for s in steps), [s.spin for s in steps]
    if frame_timeout is not None:
        assert all(s.stall == frame_timeout for s in steps)


@pytest.mark.parametrize("polled", [True, False])
def test_a_tcp_receive_inside_a_big_frame_does_not_spin(polled: bool) -> None:
    """TCP's transport says no (spins_inside_frames False): polling and reading the
    segments as they came made the 1 MiB one-way 2x slower there."""
    core = _Core([True], 30.0)
    core.spin_partial = False
    steps = _steps_of(core, 6, spin=False, polled=polled)
    assert len(steps) >= 4 and not any(s.spin for s in steps)


@pytest.mark.parametrize("kind", KINDS)
def test_which_transports_spin_inside_a_big_frame(kind: str) -> None:
    a, b = url_pair(kind)
    with a, b:
        assert b._core.spin_partial is (not kind.startswith("tcp"))


def test_a_receive_between_frames_spins_only_its_first_wait() -> None:
    steps = _steps_of(_Core([False], 30.0), 5, spin=True, polled=False)
    assert [s.spin for s in steps] == [True, False, False, False]
    steps = _steps_of(_Core([False], 30.0), 5, spin=False, polled=False)
    assert not any(s.spin for s in steps)


def test_a_frame_that_begins_while_waiting_makes_the_next_waits_spin() -> None:
    # nothing of a frame at first (no spin: the driver spun), then its first part came
    steps = _steps_of(_Core([False, False, True], 30.0), 5, spin=False, polled=False)
    assert [s.spin for s in steps] == [False, True, True, True]


def test_flow_receives_spin_inside_a_big_frame_too() -> None:
    """``capacity`` or receipts: the announced receive loop follows the same rule."""
    core = _Core([True], 30.0)
    events: list[str] = []
    core.before_wait = lambda: events.append("before")  # type: ignore[attr-defined]
    core.still_waiting = lambda: events.append("still")  # type: ignore[attr-defined]
    core.wait_ended = lambda: events.append("ended")  # type: ignore[attr-defined]
    calls = 0

    def take() -> Any:
        nonlocal calls
        calls += 1
        return "message" if calls >= 4 else None

    gen = recv_steps(core, True, take, spin=False)  # type: ignore[arg-type]
    spins = []
    try:
        step = next(gen)
        while True:
            spins.append(step.spin)
            step = gen.send(None)
    except StopIteration:
        pass
    assert spins == [True, True, True]
    assert events[0] == "before" and "ended" not in events


# -- end to end: the path into the caller's buffer --------------------------------------


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    a, b = url_pair(request.param)
    with a, b:
        yield a, b


def _sender(a: buzon.Channel, messages: list[bytes]) -> threading.Thread:
    t = threading.Thread(target=lambda: [a.send_bytes(m, timeout=30) for m in messages])
    t.start()
    return t


def test_big_messages_into_one_reused_buffer_arrive_whole(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    sizes = [MIB, 3 * MIB + 5, 64 * 1024 + 1, MIB - 1, 2 * MIB, 7, MIB]
    messages = [os.urandom(n) for n in sizes]
    t = _sender(a, messages)
    buf = bytearray(4 * MIB)
    try:
        for m in messages:
            n = b.recv_bytes_into(buf, timeout=30)
            assert n == len(m)
            assert buf[:n] == m
    finally:
        t.join(30)
    assert b.statistics().rejected_frames == 0


@pytest.mark.parametrize("kind", ["unix:bulkahead", "tcp://127.0.0.1:0"])
def test_a_big_message_read_ahead_is_copied_into_the_buffer(kind: str) -> None:
    """A big frame that a read brought behind a small one is not read into the
    caller's buffer (the small one is taken first): its own buffer is copied over. On
    19dfd8e that copy released the frame's views before the decoder recycled them:
    ``ValueError: operation forbidden on released memoryview object``, and the message
    was lost."""
    a, b = url_pair(kind)
    with a, b:
        ahead = os.urandom(150_000)  # over half the 256 KiB read buffer: a big frame
        a.send_bytes(b"7", timeout=10)
        a.send_bytes(ahead, timeout=10)  # both fit in the socket buffer
        buf = bytearray(MIB)
        assert b.recv_bytes_into(buf, timeout=10) == 1
        n = b.recv_bytes_into(buf, timeout=10)
        assert buf[:n] == ahead
        a.send_bytes(b"after", timeout=10)
        assert b.recv_bytes(timeout=10) == b"after"


def test_a_send_aborted_half_way_delivers_nothing_into_the_callers_buffer(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    with pytest.raises(buzon.Timeout, match="nothing of it is delivered"):
        a.send_bytes(os.urandom(8 * MIB), timeout=0.2)  # nobody reads: it stops half-way
    assert a.statistics().aborted == 1
    buf = bytearray(16 * MIB)  # room for it: the aborted frame flows into buf, then stops
    t = _sender(a, [b"after", b"y" * (2 * MIB)])
    try:
        n = b.recv_bytes_into(buf, timeout=30)
        assert bytes(buf[:n]) == b"after"
        n = b.recv_bytes_into(buf, timeout=30)
        assert n == 2 * MIB and buf[:n] == b"y" * n
    finally:
        t.join(30)
    stats = b.statistics()
    assert stats.aborted == 1
    assert stats.rejected_frames == 0
    assert stats.messages_received == 2


def test_a_buffer_too_small_raises_and_the_messages_behind_arrive(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    behind = os.urandom(MIB + 3)
    t = _sender(a, [b"z" * (2 * MIB), behind, b"last"])
    try:
        with pytest.raises(MessageTooLarge, match="does not fit") as err:
            b.recv_bytes_into(bytearray(MIB), timeout=30)
        assert err.value.message == b"z" * (2 * MIB)  # handed over, not lost
        buf = bytearray(2 * MIB)
        n = b.recv_bytes_into(buf, timeout=30)
        assert buf[:n] == behind
        assert b.recv_bytes(timeout=30) == b"last"
    finally:
        t.join(30)
    assert b.statistics().rejected_frames == 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_peer_announcing_a_huge_chunked_frame_commits_little() -> None:
    """A raw peer's CHUNKED header announcing 60 MiB in one segment, then 100 bytes:
    the receiver, with and without a buffer of its own that would hold it, commits
    about what arrived."""
    big = 60 * MIB
    head = HEADER.pack(1, Kind.DATA, CHUNKED_FLAG, 1, 0) + big.to_bytes(8, "little")
    segment = big.to_bytes(4, "little")
    a, b = url_pair("unix:bulkmem")
    c, d = url_pair("unix:bulkmem2")
    with a, b, c, d:
        before = _rss()
        os.write(a.fileno(), head + segment + b"x" * 100)
        os.write(c.fileno(), head + segment + b"x" * 100)
        with pytest.raises(buzon.Timeout):
            b.recv_bytes_into(bytearray(4096), timeout=0.3)  # too small: not its sink
        with pytest.raises(buzon.Timeout):
            d.recv_bytes(timeout=0.3)
        grown = _rss() - before
        assert grown < 16 * MIB, f"two announced 60 MiB frames took {grown >> 20} MiB"
        assert b.statistics().messages_received == d.statistics().messages_received == 0


@pytest.mark.parametrize("kind", ["pipe", "unix:bulksmall", "tcp://127.0.0.1:0", "shm:bulksmall"])
async def test_a_small_message_too_large_for_the_buffer_is_handed_over_in_both_drivers(
    kind: str,
) -> None:
    """A message that does not fit ``recv_bytes_into``'s buffer is in the error's
    ``.message`` (blocking and asyncio ends): nothing is lost, the next one follows."""
    a, b = url_pair(kind)
    with a, b:
        a.send_bytes(b"0123456789" * 10)
        a.send_bytes(b"next")
        with pytest.raises(MessageTooLarge) as err:
            b.recv_bytes_into(bytearray(10), timeout=30)
        assert err.value.message == b"0123456789" * 10
        assert b.recv_bytes(timeout=30) == b"next"
        ab = buzon.aio.Channel(b._core)  # the same core, awaited
        a.send_bytes(b"x" * 50)
        with pytest.raises(MessageTooLarge) as err:
            await ab.recv_bytes_into(bytearray(49), timeout=30)
        assert err.value.message == b"x" * 50
        assert b.statistics().messages_received == 3

"""Stream sockets (``unix:``, ``tcp:``) stay in blocking mode, and a blocking receive
with no deadline sleeps in ``recv`` itself (``wait_frame``'s ``WAIT_BLOCK``): one system
call, woken by the data, instead of a poll then a read. Every contract that mode could
break is checked here, hostile first:

* the sleep is the read (the thread is seen inside recvfrom, not poll); a deadline
  sleeps in poll;
* nothing else ever blocks on the blocking-mode file: a send to a peer that does not
  read raises Timeout/Full (every call passes MSG_DONTWAIT), in both drivers, and the
  asyncio loop keeps running;
* ``close()`` from another thread ends a receive asleep in recv (a shutdown of the
  reading side, after the wake fd says it is the close);
* a file another process made non-blocking (O_NONBLOCK belongs to the open file) still
  waits, in poll;
* a socket held by another process too (a fork) never blocks in recv, so its close()
  never shuts the socket down under that process;
* signals: a handler that raises ends the receive, one that returns lets it go on, one
  that closes the channel ends it with ChannelClosed.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import buzon
from _fork import in_child, reap
from buzon.errors import ChannelClosed, EndOfChannel, Full, Timeout
from buzon.transport.base import WAIT_BLOCK, WAIT_SOCKET

pytestmark = pytest.mark.fd_check

KINDS = ["unix:sockblk", "tcp://127.0.0.1:0"]
JOIN = 10.0  # generous: only a call that never returns gets near it

# the system call a thread sleeps in, by number (/proc/self/task/TID/syscall)
_SYSCALLS = {
    "x86_64": {"recv": {45}, "poll": {7, 271}},  # recvfrom; poll, ppoll
    "aarch64": {"recv": {207}, "poll": {73}},  # recvfrom; ppoll
}.get(platform.machine())


def _pair(kind: str, **options: Any) -> tuple[buzon.Channel, buzon.Channel]:
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


@pytest.fixture(params=KINDS, ids=lambda k: k.split(":")[0])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    a, b = _pair(request.param, spin=0.0)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


class _Call:
    """``call`` in a thread; what it returned or raised lands in ``out``."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.out: list[Any] = []
        self.tid = 0
        started = threading.Event()

        def run() -> None:
            self.tid = threading.get_native_id()
            started.set()
            try:
                self.out.append(call())
            except BaseException as exc:  # the test looks at it
                self.out.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(JOIN)

    def sleeps_in(self) -> str:
        """The system call the thread sleeps in ("recv", "poll"), once it sleeps."""
        assert _SYSCALLS is not None
        end = time.monotonic() + JOIN
        while time.monotonic() < end:
            try:
                with open(f"/proc/self/task/{self.tid}/syscall") as f:
                    first = f.read().split()[0]
            except (OSError, IndexError):
                first = "running"
            if first.isdigit():
                nr = int(first)
                for name, numbers in _SYSCALLS.items():
                    if nr in numbers:
                        return name
            time.sleep(0.005)
        return "none"

    def result(self) -> Any:
        self.thread.join(JOIN)
        assert not self.thread.is_alive(), "the call never returned"
        return self.out[0]


needs_syscalls = pytest.mark.skipif(
    _SYSCALLS is None or not os.path.exists(f"/proc/self/task/{threading.get_native_id()}"),
    reason="no /proc/self/task/TID/syscall numbers for this machine",
)


@needs_syscalls
def test_a_wait_with_no_deadline_sleeps_in_recv(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    fd = b._core.read_fileno()
    assert os.get_blocking(fd)  # the socket's file is in blocking mode
    assert b._core.wait_read()[3] == WAIT_SOCKET | WAIT_BLOCK  # type: ignore[index]
    call = _Call(b.recv_bytes)
    assert call.sleeps_in() == "recv"
    a.send_bytes(b"woken by the data")
    assert call.result() == b"woken by the data"
    assert b.statistics().messages_received == 1


@needs_syscalls
def test_a_wait_with_a_deadline_sleeps_in_poll_and_times_out(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    call = _Call(lambda: b.recv_bytes(timeout=0.5))
    assert call.sleeps_in() == "poll"
    assert isinstance(call.result(), Timeout)
    a.send_bytes(b"after")  # nothing was lost or half-read
    assert b.recv_bytes(timeout=10) == b"after"


@needs_syscalls
def test_close_from_another_thread_ends_a_receive_asleep_in_recv(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    call = _Call(b.recv_bytes)
    assert call.sleeps_in() == "recv"
    b.close()
    assert isinstance(call.result(), ChannelClosed)
    with pytest.raises(EndOfChannel):  # the peer sees an ordinary end
        a.recv_bytes(timeout=10)


@needs_syscalls
def test_a_file_made_non_blocking_elsewhere_still_waits(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    os.set_blocking(b._core.read_fileno(), False)  # as another process sharing it could
    call = _Call(b.recv_bytes)
    assert call.sleeps_in() == "poll"  # recv said EAGAIN: the wait sleeps in poll
    a.send_bytes(b"still here")
    assert call.result() == b"still here"
    call = _Call(b.recv_bytes)
    assert call.sleeps_in() == "poll"
    b.close()
    assert isinstance(call.result(), ChannelClosed)


@pytest.mark.parametrize("size", [64, 300_000])
def test_a_send_never_blocks_on_the_blocking_mode_socket(
    pair: tuple[buzon.Channel, buzon.Channel], size: int
) -> None:
    a, b = pair
    assert os.get_blocking(a._core.write_fileno())
    data = b"s" * size
    sent = 0

    def fill() -> None:
        nonlocal sent
        for _ in range(1_000_000):  # a peer that does not read: the socket fills
            a.send_bytes_nowait(data)
            sent += 1

    assert isinstance(_Call(fill).result(), Full)  # never blocked in the kernel
    # a nowait refuses a frame it cannot hand over whole, which on TCP (an estimate
    # with a margin) may come before the socket is full: sends that wait fill the rest
    more = 0
    while not isinstance(r := _Call(lambda: a.send_bytes(data, timeout=0.2)).result(), Timeout):
        assert r is None and more < 1000, r
        more += 1
    # what went whole into the kernel arrives whole, once (the last accepted frame's
    # tail may wait in user space for this end's next call)
    n = sent + more - 1
    got = _Call(lambda: [b.recv_bytes(timeout=10) for _ in range(n)]).result()
    assert got == [data] * n


def test_asyncio_never_blocks_its_loop_on_the_blocking_mode_socket() -> None:
    async def main() -> None:
        lst = buzon.aio.listen("unix:sockblk-aio")
        accepted = asyncio.ensure_future(lst.accept(timeout=10))
        a = await buzon.aio.connect("unix:sockblk-aio", timeout=10)
        b = await accepted
        lst.close()
        try:
            assert os.get_blocking(a._core.write_fileno())
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.ensure_future(tick())
            big = b"a" * 4_000_000
            with pytest.raises((asyncio.TimeoutError, Timeout)):
                for _ in range(100):  # the peer does not read: the socket fills
                    await asyncio.wait_for(a.send_bytes(big), 0.3)
            assert ticks > 0  # the loop ran while the send waited for room
            ticker.cancel()
            await b.send_bytes(b"pong")  # the other way still works
            assert await a.recv_bytes(timeout=10) == b"pong"
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.split(":")[0])
def test_a_socket_another_process_holds_is_never_shut_down(kind: str) -> None:
    a, b = _pair(kind, spin=0.0)
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child: it keeps its copy of b
        code = 1
        try:
            os.close(go_w)
            os.read(go_r, 1)  # the parent closed its b meanwhile
            code = 0 if b.recv_bytes(timeout=10) == b"for the child" else 2
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(go_r)
    try:
        assert b._core.wait_read()[3] == WAIT_SOCKET  # type: ignore[index]
        call = _Call(b.recv_bytes)  # in poll: a shutdown would reach the child too
        time.sleep(0.1)
        b.close()
        assert isinstance(call.result(), ChannelClosed)
        a.send_bytes(b"for the child", timeout=10)
        os.write(go_w, b"!")
        assert reap(pid, 30) == 0
    finally:
        os.close(go_w)
        a.close()
        b.close()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.split(":")[0])
@pytest.mark.parametrize("handler", ["returns", "closes"])
def test_a_signal_during_the_recv(kind: str, handler: str) -> None:
    def body() -> None:  # pragma: no cover - runs in the child
        a, b = _pair(kind, spin=0.0)  # made in the child: no other process holds them
        with a, b:
            assert b._core.wait_read()[3] == WAIT_SOCKET | WAIT_BLOCK  # type: ignore[index]
            seen: list[int] = []

            def on_alarm(signum: int, frame: object) -> None:
                seen.append(signum)
                if handler == "closes":
                    b.close()
                else:  # the recv goes on; the message comes after the handler ran
                    threading.Timer(0.05, a.send_bytes, (b"after the signal",)).start()

            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            try:
                got = b.recv_bytes()
            except ChannelClosed:
                got = None
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            assert seen == [signal.SIGALRM]
            assert got == (None if handler == "closes" else b"after the signal")

    in_child(body)


def _raw_write(ch: buzon.Channel, data: bytes) -> None:
    fd = ch._core.write_fileno()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def test_with_no_deadline_every_receive_contract_still_holds(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    """The spin=0 ``recv_bytes`` with no deadline goes straight to the blocking recv:
    a frame in pieces, a stalled frame, a bad frame and the end still come out as the
    engine makes them (the wait hands part of a frame to the engine's loop)."""
    from buzon._record import replace
    from buzon.errors import FrameError
    from buzon.protocol.frames import HEADER

    a, b = pair
    frame = HEADER.pack(1, 1, 0, 0, 5) + b"hello"

    def pieces() -> None:
        _raw_write(a, frame[:3])
        time.sleep(0.05)
        _raw_write(a, frame[3:10])
        time.sleep(0.05)
        _raw_write(a, frame[10:] + HEADER.pack(1, 1, 0, 0, 2) + b"!!")

    t = threading.Thread(target=pieces)
    t.start()
    assert b.recv_bytes() == b"hello"
    assert b.recv_bytes() == b"!!"
    t.join()
    b._core.options = replace(b._core.options, frame_timeout=0.3)
    threading.Timer(0.02, _raw_write, (a, HEADER.pack(1, 1, 0, 0, 50) + b"part")).start()
    with pytest.raises(Timeout, match="stalled"):
        b.recv_bytes()
    c, d = _pair(KINDS[0], spin=0.0)
    with c, d:
        threading.Timer(0.02, _raw_write, (c, b"\x09garbage-not-a-frame")).start()
        with pytest.raises(FrameError):
            d.recv_bytes()
    e, f = _pair(KINDS[0], spin=0.0)
    with e, f:
        threading.Timer(0.02, e.close).start()
        with pytest.raises(EndOfChannel):
            f.recv_bytes()

"""Rendezvous (``capacity=0``) ``send_bytes``/``recv_bytes`` on framed streams as one C
call each (``protocol/_rv.c`` RvCall, installed as the channel's own attributes): no
Python frame and no Python callback on the common path, and the rare ways out — a
close() from another thread, a signal handler's exception, a timeout mid-wait, the
read lock busy, odd arguments — still finish in the engine as the Python methods do.
The ends are held weakly (an unclosed end is freed at once), survive a fork and are
rebuilt when pickled for a child.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import buzon
from _rv_pairs import rv_pair
from buzon.errors import ChannelClosed, Timeout

KINDS = ["pipe", "unix:rvccall", "tcp://127.0.0.1:0"]


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

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _round(a: Any, b: Any, msg: bytes = b"ping") -> None:
    """One request/response: both ends' wake fds exist, b's offer stands."""
    t, got = _in_thread(lambda: b.send_bytes(b.recv_bytes(timeout=10), timeout=10))
    a.send_bytes(msg, timeout=10)
    assert a.recv_bytes(timeout=10) == msg
    t.join(10)
    assert got == [None]


def _c_calls(end: Any) -> bool:
    return type(end.__dict__.get("send_bytes")).__name__ == "RvCall" and (
        type(end.__dict__.get("recv_bytes")).__name__ == "RvCall"
    )


def _blocked_in(end: Any, t: threading.Thread) -> None:
    """Wait until ``t`` sleeps in one of ``end``'s waits (counted in its waiters)."""
    end_at = time.monotonic() + 10
    while t.ident not in end._waiters and time.monotonic() < end_at:
        time.sleep(0.005)
    assert t.ident in end._waiters


def test_the_methods_are_c_calls(pair: tuple[Any, Any]) -> None:
    a, b = pair
    assert _c_calls(a) and _c_calls(b)


def test_no_python_frame_on_the_common_path(pair: tuple[Any, Any]) -> None:
    """A request/response in steady state runs no Python function in the caller's
    thread: not the methods, not the CREDIT's on_credit callback."""
    a, b = pair
    _round(a, b)
    rounds = 20

    def echo() -> None:
        for _ in range(rounds + 2):
            b.send_bytes(b.recv_bytes(timeout=10), timeout=10)

    t, box = _in_thread(echo)
    a.send_bytes(b"warm", timeout=10)
    assert a.recv_bytes(timeout=10) == b"warm"
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    send, recv = a.send_bytes, a.recv_bytes
    got = []
    sys.setprofile(profile)
    try:
        for i in range(rounds):
            send(bytes([i]) * 64)
            got.append(recv())
    finally:
        sys.setprofile(None)
    assert got == [bytes([i]) * 64 for i in range(rounds)]
    a.send_bytes(b"bye", timeout=10)
    assert a.recv_bytes(timeout=10) == b"bye"
    t.join(10)
    assert box == [None]
    assert calls == []


def test_idle_timeout_keeps_the_methods() -> None:
    """An idle_timeout (a deadline on every receive) is the Python methods' case."""
    lst = buzon.listen("unix:rvccall-idle", capacity=0, idle_timeout=30)
    try:
        t, box = _in_thread(lambda: lst.accept(timeout=10))
        a = buzon.connect("unix:rvccall-idle", timeout=10, capacity=0, idle_timeout=30)
        t.join(10)
    finally:
        lst.close()
    b = box[0]
    with a, b:
        assert not _c_calls(a) and not _c_calls(b)
        _round(a, b)


def test_other_arguments_go_the_python_way(pair: tuple[Any, Any]) -> None:
    a, b = pair
    _round(a, b)
    for call in (
        lambda m: a.send_bytes(m, 10),
        lambda m: a.send_bytes(m, timeout=10.0),
        lambda m: a.send_bytes(bytearray(m)),
        lambda m: a.send_bytes(memoryview(m), timeout=10),
    ):
        t, got = _in_thread(lambda: b.recv_bytes(timeout=10))
        call(b"arg")
        t.join(10)
        assert got == [b"arg"]
    t, got = _in_thread(lambda: b.send_bytes(b"back", timeout=10))
    assert a.recv_bytes(10) == b"back"
    t.join(10)
    with pytest.raises(TypeError):
        a.send_bytes(b"x", 1, 2, 3)
    with pytest.raises(TypeError):
        a.recv_bytes(nonsense=1)
    with pytest.raises(Timeout):
        a.recv_bytes(timeout=0)
    _round(a, b, b"still")


def test_a_negative_timeout_leaves_the_channel_usable(pair: tuple[Any, Any]) -> None:
    """ValueError, and nothing held: the send's read lock was kept before (the next
    receive hung)."""
    a, b = pair
    _round(a, b)
    with pytest.raises(ValueError):
        a.send_bytes(b"x", timeout=-1)
    with pytest.raises(ValueError):
        a.recv_bytes(timeout=-1)
    _round(a, b, b"still")


def test_close_from_another_thread_ends_a_c_receive(pair: tuple[Any, Any]) -> None:
    a, b = pair
    _round(a, b)
    t, box = _in_thread(lambda: a.recv_bytes())
    _blocked_in(a, t)
    a.close()
    t.join(10)
    assert len(box) == 1 and isinstance(box[0], ChannelClosed)
    assert a._waiters == [] and a._wake == -1


def test_close_from_another_thread_ends_a_c_send(pair: tuple[Any, Any]) -> None:
    """The message written, b never takes it: a close() wakes the send, which
    withdraws it (the engine's way) and raises."""
    a, b = pair
    _round(a, b)  # b's offer stands: a's send writes at once and waits for the take
    t, box = _in_thread(lambda: a.send_bytes(b"never"))
    _blocked_in(a, t)
    a.close()
    t.join(10)
    assert len(box) == 1 and isinstance(box[0], ChannelClosed)
    assert a._waiters == [] and a._wake == -1


def test_a_second_thread_sends_while_the_first_receives(pair: tuple[Any, Any]) -> None:
    """The read lock busy (a C receive sleeps holding it): send_bytes goes the Python
    way, and the receive gets the reply."""
    a, b = pair
    _round(a, b)
    r, got = _in_thread(lambda: a.recv_bytes(timeout=20))
    _blocked_in(a, r)
    e, echoed = _in_thread(lambda: b.send_bytes(b.recv_bytes(timeout=20), timeout=20))
    a.send_bytes(b"crossed", timeout=20)
    r.join(20)
    e.join(20)
    assert got == [b"crossed"] and echoed == [None]
    _round(a, b, b"after")


def test_timeouts_mid_wait(pair: tuple[Any, Any]) -> None:
    """A timed-out C receive withdraws its offer; a timed-out C send withdraws its
    message (the receiver never sees it); each later message arrives exactly once."""
    a, b = pair
    _round(a, b)
    with pytest.raises(Timeout):
        a.recv_bytes(timeout=0.05)
    with pytest.raises(Timeout):
        a.send_bytes(b"late", timeout=0.05)
    with pytest.raises(Timeout):
        b.recv_bytes(timeout=0.3)
    _round(a, b, b"next")
    t, got = _in_thread(lambda: [b.recv_bytes(timeout=10) for _ in range(3)])
    for m in (b"1", b"2", b"3"):
        a.send_bytes(m, timeout=10)
    t.join(10)
    assert got == [[b"1", b"2", b"3"]]


@pytest.fixture
def interrupt() -> Iterator[Callable[[float], None]]:
    """``interrupt(delay)``: a KeyboardInterrupt raised by a signal handler in this
    thread after ``delay`` seconds."""
    me = threading.get_ident()

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, handler)
    timers: list[threading.Timer] = []

    def arm(delay: float) -> None:
        timer = threading.Timer(delay, lambda: signal.pthread_kill(me, signal.SIGUSR1))
        timers.append(timer)
        timer.start()

    try:
        yield arm
    finally:
        for timer in timers:
            timer.join()
        signal.signal(signal.SIGUSR1, old)


def test_a_signal_handler_raising_in_a_c_receive(
    pair: tuple[Any, Any], interrupt: Callable[[float], None]
) -> None:
    a, b = pair
    _round(a, b)
    interrupt(0.1)
    with pytest.raises(KeyboardInterrupt):
        a.recv_bytes()
    assert a._waiters == []
    _round(a, b, b"after")


def test_a_signal_handler_raising_in_a_c_send(
    pair: tuple[Any, Any], interrupt: Callable[[float], None]
) -> None:
    """The message was written; the interrupted send withdraws it: it raises and
    nothing of it is delivered."""
    a, b = pair
    _round(a, b)
    interrupt(0.1)
    with pytest.raises(KeyboardInterrupt):
        a.send_bytes(b"interrupted")
    assert a._waiters == []
    with pytest.raises(Timeout):
        b.recv_bytes(timeout=0.3)
    _round(a, b, b"after")


def test_the_confirmer_answers_for_a_c_take(pair: tuple[Any, Any]) -> None:
    """b takes with the C call and makes no further call: the deferred CREDIT is
    written by the confirmer, and a's send returns."""
    a, b = pair
    _round(a, b)
    release = threading.Event()
    t, got = _in_thread(lambda: (b.recv_bytes(timeout=10), release.wait(20))[0])
    a.send_bytes(b"held", timeout=10)  # Timeout if the take were never confirmed
    release.set()
    t.join(10)
    assert got == [b"held"]


def test_a_forked_child_uses_the_c_calls() -> None:
    a, b = buzon.pipe(capacity=0)
    with a, b:
        _round(a, b)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                ok = _c_calls(b)
                b.send_bytes(b.recv_bytes(timeout=10), timeout=10)
                code = 0 if ok else 2
            finally:
                os._exit(code)
        try:
            a.send_bytes(b"to the child", timeout=10)
            assert a.recv_bytes(timeout=10) == b"to the child"
        finally:
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def _spawned_echo(b: Any, ok: Any) -> None:
    ok.value = _c_calls(b)
    b.send_bytes(b.recv_bytes(timeout=30), timeout=30)
    b.close()


def test_an_end_pickled_for_a_spawn_child() -> None:
    a, b = buzon.pipe(capacity=0)
    with a, b:
        _round(a, b)
        ctx = multiprocessing.get_context("spawn")
        ok = ctx.Value("b", 0)
        p = ctx.Process(target=_spawned_echo, args=(b, ok))
        p.start()
        try:
            a.send_bytes(b"to the spawned child", timeout=30)
            assert a.recv_bytes(timeout=30) == b"to the spawned child"
        finally:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        assert p.exitcode == 0 and ok.value == 1


def test_an_unclosed_end_is_freed_at_once() -> None:
    """The C calls hold their channel weakly: dropped without close(), an end that
    used them is freed by reference counting (no cycle), and a method taken from it
    raises ChannelClosed afterwards."""
    a, b = buzon.pipe(capacity=0)
    _round(a, b)
    send, recv = a.send_bytes, a.recv_bytes
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

"""The fan-out policies: ``"broadcast"`` (every attached receiver gets every message sent
after it attached; a full backlog loses its oldest, counted) and ``"round_robin"``
(receivers take turns; a dead or closed receiver is skipped)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
from _mb_helpers import exit_code, fork

import buzon
from buzon import Empty, EndOfChannel, Full, NoSuchEndpoint, Timeout

T = 10.0


def attach(box: buzon.Mailbox) -> None:
    """A receiver attaches with its first receive."""
    with pytest.raises(Empty):
        box.recv_nowait()


def _receiver(n: int, w: int, ready: int, policy: str = "broadcast") -> Callable[[], None]:
    def run() -> None:
        with buzon.mailbox("news", policy=policy) as b:  # type: ignore[arg-type]
            try:
                b.recv_nowait()
            except Empty:
                pass
            os.write(ready, b"r")
            got = [b.recv(T) for _ in range(n)]
            os.write(w, repr(got).encode() + b"\n")

    return run


def test_broadcast_every_attached_receiver_gets_every_message_in_order() -> None:
    box = buzon.mailbox("news", policy="broadcast", capacity=64)
    box.send("before anyone attached")  # nobody gets this one
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pids = [fork(_receiver(50, w, ready_w)) for _ in range(3)]
    for _ in pids:
        assert os.read(ready_r, 1) == b"r"
    for i in range(50):
        box.send(i)
    for pid in pids:
        assert exit_code(pid) == 0
    os.close(w)
    with os.fdopen(r) as f:
        lists = [line.strip() for line in f]
    os.close(ready_r)
    os.close(ready_w)
    box.remove()
    assert lists == [repr(list(range(50)))] * 3


def test_broadcast_a_slow_receiver_loses_its_oldest_and_it_is_counted() -> None:
    box = buzon.mailbox("news", policy="broadcast", capacity=4)
    slow = buzon.mailbox("news")
    fast = buzon.mailbox("news")
    attach(slow)
    attach(fast)
    try:
        got = []
        for i in range(10):
            box.send_nowait(i)  # never blocks and never raises: the overflow rule
            got.append(fast.recv(T))
        assert got == list(range(10))
        assert [slow.recv_nowait() for _ in range(4)] == [6, 7, 8, 9]  # the newest 4
        with pytest.raises(Empty):
            slow.recv_nowait()
        assert box.statistics()["dropped"] == 6
    finally:
        slow.close()
        fast.close()
        box.remove()


def test_broadcast_a_dead_receiver_is_dropped_and_its_backlog_reclaimed() -> None:
    box = buzon.mailbox("news", policy="broadcast", capacity=2)
    live = buzon.mailbox("news")
    attach(live)
    ready_r, ready_w = os.pipe()

    def dies() -> None:
        b = buzon.mailbox("news")
        attach(b)
        os.write(ready_w, b"r")
        time.sleep(60)

    pid = fork(dies)
    assert os.read(ready_r, 1) == b"r"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    for i in range(6):
        box.send(i)
        assert live.recv(T) == i
    # the dead receiver held nobody back; counting receivers (a receipt) retires it
    assert box._bc is not None and box._bc.receivers() == 1
    assert box.send_async("last").expected == 1
    assert live.recv(T) == "last"
    os.close(ready_r)
    os.close(ready_w)
    live.close()
    box.remove()


def test_broadcast_remove_ends_waiting_receivers() -> None:
    box = buzon.mailbox("news", policy="broadcast")
    ready_r, ready_w = os.pipe()

    def waits() -> None:
        b = buzon.mailbox("news")
        attach(b)
        os.write(ready_w, b"r")
        with pytest.raises(EndOfChannel):
            b.recv(T)

    pid = fork(waits)
    assert os.read(ready_r, 1) == b"r"
    box.remove()
    assert exit_code(pid) == 0
    os.close(ready_r)
    os.close(ready_w)


def test_round_robin_receivers_take_turns() -> None:
    box = buzon.mailbox("rr", policy="round_robin", capacity=16)
    a, b, c = (buzon.mailbox("rr") for _ in range(3))
    for x in (a, b, c):
        attach(x)
    try:
        for i in range(9):
            box.send(i, timeout=T)
        got = [sorted(x.recv_nowait() for _ in range(3)) for x in (a, b, c)]
        assert sorted(got) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    finally:
        for x in (a, b, c):
            x.close()
        box.remove()


def test_round_robin_skips_a_dead_receiver_and_a_closed_one_hands_back() -> None:
    box = buzon.mailbox("rr", policy="round_robin", capacity=16)
    live = buzon.mailbox("rr")
    attach(live)
    ready_r, ready_w = os.pipe()

    def dies() -> None:
        b = buzon.mailbox("rr")
        attach(b)
        os.write(ready_w, b"r")
        time.sleep(60)

    pid = fork(dies)
    assert os.read(ready_r, 1) == b"r"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    for i in range(4):
        box.send(i, timeout=T)
    assert [live.recv_nowait() for _ in range(4)] == [0, 1, 2, 3]  # all to the live one
    leaving = buzon.mailbox("rr")
    attach(leaving)
    for i in range(4):
        box.send(i, timeout=T)
    leaving.close()  # what it had not taken goes to the others
    assert sorted(live.recv_nowait() for _ in range(4)) == [0, 1, 2, 3]
    with pytest.raises(Empty):
        live.recv_nowait()
    os.close(ready_r)
    os.close(ready_w)
    live.close()
    box.remove()


def test_round_robin_without_receivers_waits_then_times_out_and_full_when_all_are() -> None:
    box = buzon.mailbox("rr", policy="round_robin", capacity=1)
    other = buzon.mailbox("rr")
    try:
        with pytest.raises(Timeout):
            box.send("nobody", timeout=0.05)
        with pytest.raises(Full):
            box.send_nowait("nobody")
        r = buzon.mailbox("rr")
        attach(r)
        box.send_nowait(1)
        with pytest.raises(Full):
            box.send_nowait(2)
        assert r.recv_nowait() == 1
        receipt = box.send_async(3, timeout=T)
        assert r.recv(T) == 3
        assert receipt.wait(T).pid == os.getpid()
        r.close()
    finally:
        box.remove()
    with pytest.raises(NoSuchEndpoint):
        other.send("late")
    other.close()


def test_broadcast_receipts_name_every_receiver() -> None:
    box = buzon.mailbox("news", policy="broadcast")
    with pytest.raises(buzon.Undelivered):
        box.send_async("to nobody").wait(T)  # no receiver was attached
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pids = [fork(_receiver(1, w, ready_w)) for _ in range(2)]
    for _ in pids:
        assert os.read(ready_r, 1) == b"r"
    receipt = box.send_async("to all")
    assert receipt.expected == 2
    receipt.wait(T)
    assert sorted(p.pid for p in receipt.receivers) == sorted(pids)  # type: ignore[type-var]
    for pid in pids:
        assert exit_code(pid) == 0
    for fd in (r, w, ready_r, ready_w):
        os.close(fd)
    box.remove()


def test_a_forked_child_closing_an_inherited_receiver_does_not_detach_the_parent() -> None:
    box = buzon.mailbox("news", policy="broadcast")
    rx = buzon.mailbox("news")
    attach(rx)
    assert exit_code(fork(rx.close)) == 0  # the child's copy, not the parent's receiver
    box.send("still attached")
    assert rx.recv(T) == "still attached"
    rx.close()
    box.remove()


def test_a_forked_child_of_an_exclusive_holder_does_not_hold_too() -> None:
    box = buzon.mailbox("jobs", policy="exclusive")
    box.send(1)
    assert box.recv(T) == 1 and box.holding()

    def child() -> None:
        assert not box.holding()
        with pytest.raises(Timeout):
            box.recv(timeout=0.1)  # the parent holds it
        box.close()

    assert exit_code(fork(child)) == 0
    assert box.holding()
    box.remove()


def test_round_robin_rendezvous_returns_once_a_receiver_took_it() -> None:
    box = buzon.mailbox("rr", policy="round_robin", capacity=0)
    rx = buzon.mailbox("rr")
    attach(rx)
    got: list[object] = []
    try:
        with pytest.raises(Timeout):
            box.send("not taken", timeout=0.1)  # in rx's backlog, but nobody took it
        with pytest.raises(Empty):
            rx.recv_nowait()  # withdrawn: skipped, never taken
        t = threading.Timer(0.1, lambda: got.append(rx.recv(T)))
        t.start()
        box.send("hand-over", timeout=T)
        t.join(T)
        assert got == ["hand-over"]
    finally:
        rx.close()
        box.remove()

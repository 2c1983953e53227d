"""The blocking mailbox waits are woken by the ring, not by a timer.

The blocking twin of test_mailbox_aio_wake.py: a round-robin ``send`` waiting for a
receiver or for room in one, and an exclusive ``recv`` waiting for the holder to close
or die. Each test sets the fallback slice to 60 s, so a waiter that missed its wake-up
would hit the test's 10 s bound, and counts how often the waiter looked while the
event was 0.5 s away (a polling waiter looks a dozen times or more; a woken one two or
three times). Each failed on 505eefc, which slept 0.5-10 ms (round robin) and 50 ms
(exclusive) between looks.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import buzon

T = 10.0
SLOW = 60.0  # the fallback slice: never reached in these tests
LOOKS = 4  # at most this many looks of a woken wait
DELAY = 0.5  # the event comes this long after the waiter started (not asserted)


def _count(obj: Any, name: str) -> list[int]:
    """Count calls of ``obj.name`` (an instance attribute shadowing the method)."""
    calls = [0]
    real: Callable[..., Any] = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def _later(fn: Callable[[], object], delay: float = DELAY) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), fn()))
    t.start()
    return t


def test_a_round_robin_sender_waiting_for_a_receiver_is_woken_when_one_attaches() -> None:
    box = buzon.mailbox("srrattach", capacity=1, policy="round_robin")
    box._wait_slice = SLOW
    rx = buzon.mailbox("srrattach")
    try:
        t = _later(rx._rx)  # attaches (as a recv does)
        assert box._fan is not None
        looks = _count(box._fan, "round_robin")
        box.send("first", timeout=T)  # no receiver yet: waits for one
        t.join(T)
        assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"
        assert rx.recv(T) == "first"
    finally:
        rx.close()
        box.remove()


def test_a_round_robin_sender_waiting_for_room_is_woken_by_the_take() -> None:
    box = buzon.mailbox("srrroom", capacity=1, policy="round_robin")
    box._wait_slice = SLOW
    rx = buzon.mailbox("srrroom")
    other = buzon.mailbox("srrroom")
    try:
        rx._rx()
        other._rx()
        box.send("a", timeout=T)
        box.send("b", timeout=T)  # both backlogs (capacity 1 each) are full
        assert box._fan is not None
        looks = _count(box._fan, "round_robin")
        took: list[Any] = []
        t = _later(lambda: took.append(other.recv(T)))
        box.send("c", timeout=T)
        t.join(T)
        assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"
        assert sorted([rx.recv(T), other.recv(T), *took]) == ["a", "b", "c"]
    finally:
        rx.close()
        other.close()
        box.remove()


def test_a_round_robin_sender_waiting_for_room_wakes_when_the_mailbox_is_removed() -> None:
    box = buzon.mailbox("srrgone", capacity=1, policy="round_robin")
    box._wait_slice = SLOW
    rx = buzon.mailbox("srrgone")
    rx._rx()
    box.send("a", timeout=T)
    remover = buzon.mailbox("srrgone")
    raised: list[BaseException] = []

    def send() -> None:
        try:
            box.send("b")  # no timeout: only the removal (or the 60 s slice) ends it
        except BaseException as exc:
            raised.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    t = _later(remover.remove)
    try:
        sender.join(T)
        assert not sender.is_alive(), "the removal did not wake the sender"
        assert isinstance(raised[0], buzon.NoSuchEndpoint)
    finally:
        t.join(T)
        rx.close()
        box.close()


def test_a_round_robin_sender_still_times_out() -> None:
    box = buzon.mailbox("srrtime", capacity=1, policy="round_robin")
    box._wait_slice = SLOW
    try:
        with pytest.raises(buzon.Timeout):
            box.send("nobody", timeout=0.05)
    finally:
        box.remove()


@pytest.mark.parametrize("how", ["close", "kill"])
def test_a_receiver_waiting_for_the_exclusive_holder_takes_over_when_it_goes(how: str) -> None:
    box = buzon.mailbox("sexcl", policy="exclusive")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the holder
        code = 1
        try:
            os.close(r)
            with buzon.mailbox("sexcl") as holder:
                holder.recv(T)  # it holds the mailbox from now on
                os.write(w, b"h")
                time.sleep(DELAY if how == "close" else T)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    rx = buzon.mailbox("sexcl")
    rx._wait_slice = SLOW
    killer = None
    try:
        box.send("taken by the holder")
        assert os.read(r, 1) == b"h"
        box.send("for the next holder")
        looks = _count(rx, "_check_open")
        if how == "kill":
            killer = _later(lambda: os.kill(pid, signal.SIGKILL))
        assert rx.recv(timeout=T) == "for the next holder"
        assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"
        assert rx.holding()
    finally:
        if killer is not None:
            killer.join(T)
        rx.close()
        os.close(r)
        status = os.waitpid(pid, 0)[1]
        box.remove()
    assert os.waitstatus_to_exitcode(status) == (0 if how == "close" else -signal.SIGKILL)


def test_a_receiver_waiting_for_a_holder_in_another_thread_takes_over_on_close() -> None:
    box = buzon.mailbox("sexclt", policy="exclusive")
    holder = buzon.mailbox("sexclt")
    rx = buzon.mailbox("sexclt")
    rx._wait_slice = SLOW
    try:
        box.send("one")
        box.send("two")
        assert holder.recv(T) == "one"
        looks = _count(rx, "_check_open")
        t = _later(holder.close)
        assert rx.recv(timeout=T) == "two"
        t.join(T)
        assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"
    finally:
        holder.close()
        rx.close()
        box.remove()


def test_an_exclusive_waiter_wakes_when_the_mailbox_is_removed() -> None:
    box = buzon.mailbox("sexclgone", policy="exclusive")
    holder = buzon.mailbox("sexclgone")
    rx = buzon.mailbox("sexclgone")
    rx._wait_slice = SLOW
    try:
        box.send("one")
        assert holder.recv(T) == "one"
        t = _later(box.remove)
        with pytest.raises(buzon.EndOfChannel):
            rx.recv(timeout=T)
        t.join(T)
    finally:
        holder.close()
        rx.close()
        box.close()


def test_a_round_robin_sender_with_some_room_but_not_enough_is_woken_by_the_take() -> None:
    """capacity=None: the backlog has room for a small record but not for this one;
    the sender arms the ring for its own record's size and sleeps on the room FIFO
    (it used to look every 1 ms)."""
    box = buzon.mailbox("srrpartial", capacity=None, policy="round_robin", max_bytes=65536)
    box._wait_slice = SLOW
    rx = buzon.mailbox("srrpartial")
    try:
        rx._rx()
        small, big = b"s" * 100, b"B" * 1000  # both inline (max_inline 1024)
        while True:
            try:
                box.send_nowait(small)
            except buzon.Full:
                break
        assert rx.recv(T) == small  # room for a small record now, not for a big one
        with pytest.raises(buzon.Full):
            box.send_nowait(big)
        assert box._fan is not None
        looks = _count(box._fan, "round_robin")

        def drain() -> None:
            for _ in range(20):
                rx.recv(T)

        t = _later(drain)
        box.send(big, timeout=T)
        t.join(T)
        assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"
        while rx.recv(T) != big:
            pass
    finally:
        rx.close()
        box.remove()


def _ends_closed(call: Callable[[], Any], close: Callable[[], None]) -> None:
    out: list[BaseException | str] = []

    def run() -> None:
        try:
            call()
            out.append("returned")
        except BaseException as exc:  # the test looks at it
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(0.3)  # time to get into its wait (no assertion on how long)
    assert t.is_alive(), "the call did not wait"
    close()
    t.join(T)
    assert not t.is_alive(), "close() did not end the wait"
    assert len(out) == 1 and isinstance(out[0], buzon.ChannelClosed), out


def test_close_from_another_thread_ends_a_round_robin_send_waiting_for_a_receiver() -> None:
    box = buzon.mailbox("srrclose", capacity=1, policy="round_robin")
    box._wait_slice = SLOW
    try:
        _ends_closed(lambda: box.send("x", timeout=3 * T), box.close)
    finally:
        box.remove()


def test_close_from_another_thread_ends_an_exclusive_recv_waiting_for_the_holder() -> None:
    holder = buzon.mailbox("sexclose", capacity=4, policy="exclusive")
    waiter = buzon.mailbox("sexclose")
    waiter._wait_slice = SLOW
    try:
        holder.send("mine")
        assert holder.recv(T) == "mine"  # holds it now
        _ends_closed(lambda: waiter.recv(3 * T), waiter.close)
    finally:
        waiter.close()
        holder.remove()

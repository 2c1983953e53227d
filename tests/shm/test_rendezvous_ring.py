"""The ring-level rendezvous (``_core_rv.c``): tickets, the take a sender waits for, the
withdrawal that races the consumer's claim, the receiver-waiting word, the format
version. In ``make sanitize``. Every bound is a timeout, never a wall-clock assertion.

All of these fail before the ring-level rendezvous (66a2333): the calls did not exist,
and a format-1 segment was the only format.
"""

from __future__ import annotations

import fcntl
import os
import random
import secrets
import signal
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from buzon import _core

T = 10.0  # failure bound for anything that should be quick


def seg_name() -> str:
    return f"/buzon-{os.getuid()}-t{secrets.token_hex(8)}"


def fork(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return status


PENDING, TAKEN, WITHDRAWN = 0, 1, 2


@pytest.fixture
def name() -> Iterator[str]:
    n = seg_name()
    yield n
    try:
        _core.unlink(n)
    except FileNotFoundError:
        pass


@pytest.fixture
def pair(name: str) -> Iterator[tuple[_core.Ring, _core.Ring]]:
    """(producer's object, consumer's object) of one ring, both in rendezvous mode."""
    tx = _core.Ring.create(name, 1 << 14)
    rx = _core.Ring.attach(name)
    tx.set_rendezvous()
    rx.set_rendezvous()
    yield tx, rx
    rx.close()
    tx.close()


def test_a_ticket_follows_its_record_until_taken(pair: tuple[_core.Ring, _core.Ring]) -> None:
    tx, rx = pair
    tx.send(b"one")
    t1 = tx.last_put()
    tx.send(b"two")
    t2 = tx.last_put()
    assert t1 != t2 and tx.rv_state(t1) == tx.rv_state(t2) == PENDING
    assert rx.recv(timeout=T) == b"one"
    assert tx.rv_state(t1) == TAKEN and tx.rv_state(t2) == PENDING
    assert tx.rv_wait(t1, 0) == 1  # taken: answers at once
    assert tx.rv_wait(t2, 0.02) == 0  # not taken within the timeout
    assert not tx.rv_withdraw(t1)  # taken first: the withdrawal loses
    assert tx.rv_withdraw(t2)
    assert rx.try_recv() is None  # a withdrawn record is skipped, never delivered
    assert tx.used == 0  # and its space is back
    with pytest.raises(ValueError):
        tx.rv_state(3)


def test_withdrawal_and_claim_race_decides_exactly_once_across_processes(name: str) -> None:
    """A producer withdraws each record after a random short wait while a consumer in
    another process claims as fast as it can: every record is either withdrawn or
    received, never both, never neither, and received in order."""
    n = 3000
    tx = _core.Ring.create(name, 1 << 12)
    tx.set_rendezvous()
    rfd, wfd = os.pipe()

    def consume() -> None:
        os.close(rfd)
        rx = _core.Ring.attach(name)
        got = []
        while True:
            data = rx.recv(timeout=T)
            if data == b"end":
                break
            got.append(struct.unpack("<I", data)[0])
            if len(got) % 100 == 0:  # a consumer that naps now and then: withdrawals
                time.sleep(0.002)  # win while it sleeps, whatever the machine's load
        blob = struct.pack(f"<{len(got)}I", *got)
        os.write(wfd, struct.pack("<I", len(got)))
        view = memoryview(blob)
        while view:
            view = view[os.write(wfd, view) :]
        os._exit(0)

    pid = fork(consume)
    os.close(wfd)
    rnd = random.Random(5)
    withdrawn, taken = set(), set()
    try:
        for i in range(n):
            tx.send(struct.pack("<I", i), timeout=T)
            ticket = tx.last_put()
            if tx.rv_wait(ticket, rnd.choice((0, 0, 1e-6, 2e-5))) == 1:
                taken.add(i)
            elif tx.rv_withdraw(ticket):
                withdrawn.add(i)
            else:
                taken.add(i)
        tx.send(b"end", timeout=T)
        with os.fdopen(rfd, "rb") as f:
            (count,) = struct.unpack("<I", f.read(4))
            got = list(struct.unpack(f"<{count}I", f.read(4 * count)))
    finally:
        status = reap(pid)
        tx.close()
    assert status == 0
    assert got == sorted(taken)  # in order, each taken one once
    assert not (withdrawn & set(got)) and len(withdrawn) + len(got) == n
    assert withdrawn and taken  # both outcomes happened: the race was run


def test_a_signal_handlers_exception_ends_the_wait(pair: tuple[_core.Ring, _core.Ring]) -> None:
    tx, rx = pair

    class Alarm(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Alarm

    old = signal.signal(signal.SIGALRM, handler)
    try:
        tx.send(b"x")
        ticket = tx.last_put()
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Alarm):
            tx.rv_wait(ticket, T, 0.001)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert tx.rv_withdraw(ticket)
    assert rx.try_recv() is None


def test_a_consumer_killed_after_its_claim_counts_as_taken(name: str) -> None:
    """The consumer dies holding the record (claimed, not copied): the message was
    taken (at most once), so the sender's wait ends with a take, not a hang."""
    tx = _core.Ring.create(name, 1 << 14)
    tx.set_rendezvous()
    try:
        tx.send(b"doomed")
        ticket = tx.last_put()

        def die_at_claim() -> None:
            rx = _core.Ring.attach(name)
            _core._set_fault(_core.F_CLAIMED)
            rx.recv(timeout=T)

        status = reap(fork(die_at_claim))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert tx.rv_wait(ticket, T) == 1
        assert not tx.rv_withdraw(ticket)
    finally:
        tx.close()


def test_a_wait_is_woken_by_the_take_of_a_sleeping_consumer(name: str) -> None:
    """No spin: the sender sleeps in ppoll on the space pipe; the consumer's free
    empties the pipe (the ring's space notification) and the wait ends."""
    tx = _core.Ring.create(name, 1 << 14)
    tx.set_rendezvous()
    rfd, wfd = os.pipe()  # one slot, as the transport makes it: a byte fills it
    fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(wfd, False)
    os.set_blocking(rfd, False)
    try:
        tx.send(b"late")
        ticket = tx.last_put()

        def take_later() -> None:
            rx = _core.Ring.attach(name)
            rx.set_notify(-1, rfd)
            time.sleep(0.1)
            assert rx.recv(timeout=T) == b"late"

        pid = fork(take_later)
        assert tx.rv_wait(ticket, T, 0.0, wfd) == 1
        assert reap(pid) == 0
    finally:
        tx.close()
        os.close(rfd)
        os.close(wfd)


def test_the_receiver_waiting_word(pair: tuple[_core.Ring, _core.Ring]) -> None:
    tx, rx = pair
    assert not tx.receiver_waiting()
    assert not rx.spin_wait(0.0)  # a receive begins to wait on the empty ring
    assert tx.receiver_waiting()
    rx.stop_waiting()  # and gave up
    assert not tx.receiver_waiting()
    assert not rx.arm_data()  # the asyncio driver's way to begin a wait
    assert tx.receiver_waiting()
    tx.send(b"m")
    assert not tx.receiver_waiting()  # a record is pending: not for another one
    assert rx.recv(timeout=T) == b"m"
    assert not tx.receiver_waiting()  # the take ends the wait


def test_a_ring_not_in_rendezvous_mode_never_says_a_receiver_waits(name: str) -> None:
    tx = _core.Ring.create(name, 1 << 14)
    rx = _core.Ring.attach(name)
    try:
        assert not rx.spin_wait(0.0)
        assert not tx.receiver_waiting()
    finally:
        rx.close()
        tx.close()


def test_a_format_1_ring_is_refused_with_a_clear_error(name: str) -> None:
    ring = _core.Ring.create(name, 1 << 14)
    ring.close()
    with open("/dev/shm" + name, "r+b") as f:
        f.seek(8)  # header: magic u64, version u32
        assert struct.unpack("<I", f.read(4))[0] == 2
        f.seek(8)
        f.write(struct.pack("<I", 1))
    with pytest.raises(Exception, match="ring format 1, made by an older buzon"):
        _core.Ring.attach(name)

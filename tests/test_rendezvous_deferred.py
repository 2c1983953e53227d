"""Rendezvous (``capacity=0``) on framed streams: a take's CREDIT deferred to the
taker's next write (``protocol/_rv.c``), so a request/response costs two writes.

The contracts that must keep holding with the CREDIT held back: a send returns once its
message was taken, also when the taker makes no further call on the channel (it
computes, it waits on another channel for the very sender, it is closed from another
thread, its process exits); a timed-out or withdrawn send whose message was taken is
never reported "nothing of it is delivered"; a deferring end talks to one that does not
defer (the engine's way, the asyncio driver). The bound is the confirmer's tick
(``_rv.confirm_delay``); tests that need a take to stay owed make the tick long.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import buzon
from _rv_pairs import engine_only, rv_pair
from buzon.protocol import _rv

KINDS = ["pipe", "unix:rvdefer", "tcp://127.0.0.1:0"]


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    a, b = rv_pair(request.param)
    with a, b:
        yield a, b


@contextlib.contextmanager
def _slow_confirmer(tick: float = 2.0) -> Iterator[None]:
    """The confirmer's tick made long: a take stays owed that long unless the taker's
    own writes (or a close, an exit, a WITHDRAW read) confirm it first. (Every
    request/response's reply waits for it too: used after the first round only.)"""
    old = _rv.confirm_delay(tick)
    try:
        yield
    finally:
        _rv.confirm_delay(old)


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
    """One request/response (the C path applies from then on on both ends)."""
    t, got = _in_thread(lambda: b.send_bytes(b.recv_bytes(timeout=10), timeout=10))
    a.send_bytes(msg, timeout=10)
    assert a.recv_bytes(timeout=10) == msg
    t.join(10)
    assert got == [None]


def _take_and_hold(b: Any, release: threading.Event) -> tuple[threading.Thread, list[Any]]:
    """b takes one message, then makes no call on the channel until ``release``."""

    def run() -> bytes:
        got = b.recv_bytes(timeout=10)
        release.wait(30)
        return got  # type: ignore[no-any-return]

    return _in_thread(run)


def test_a_request_response_writes_one_credit_each_way(pair: tuple[Any, Any]) -> None:
    """The take's CREDIT rides with the reply (and the reply's with the next request):
    one CREDIT per message, not two (an offer and a take's acknowledgement)."""
    a, b = pair
    _round(a, b)
    n = 60
    before = (a.statistics().credits_sent, b.statistics().credits_sent)

    def echo() -> None:
        for _ in range(n):
            b.send_bytes(b.recv_bytes(timeout=10), timeout=10)

    t, _ = _in_thread(echo)
    for i in range(n):
        a.send_bytes(b"%d" % i, timeout=10)
        assert a.recv_bytes(timeout=10) == b"%d" % i
    t.join(10)
    sent_a = a.statistics().credits_sent - before[0]
    sent_b = b.statistics().credits_sent - before[1]
    assert sent_a <= n + n // 10 and sent_b <= n + n // 10, (sent_a, sent_b)


def test_a_send_returns_while_the_taker_computes(pair: tuple[Any, Any]) -> None:
    """The taker makes no further call on the channel: the confirmer writes the owed
    CREDIT, and the send returns while the taker still computes."""
    a, b = pair
    _round(a, b)
    release = threading.Event()
    t, box = _take_and_hold(b, release)
    try:
        a.send_bytes(b"work", timeout=20)  # raises Timeout if the CREDIT never came
        assert not release.is_set() and t.is_alive()
    finally:
        release.set()
        t.join(10)
    assert box == [b"work"]
    _round(a, b, b"after")


def test_no_deadlock_when_the_taker_waits_for_the_sender_elsewhere(
    pair: tuple[Any, Any],
) -> None:
    """The taker waits on another channel for a message the sender sends only once its
    rendezvous send returned: the owed CREDIT must go without the taker's help."""
    a, b = pair
    _round(a, b)
    side_a, side_b = buzon.pipe()
    with side_a, side_b:

        def taker() -> bytes:
            first = b.recv_bytes(timeout=10)
            return first + side_b.recv_bytes(timeout=20)  # type: ignore[no-any-return]

        t, box = _in_thread(taker)
        a.send_bytes(b"first,", timeout=20)
        side_a.send_bytes(b"second")
        t.join(20)
    assert box == [b"first,second"]


def test_a_timed_out_send_whose_message_was_taken_returns(pair: tuple[Any, Any]) -> None:
    """The deadline passes while the take's CREDIT is owed: the send's WITHDRAW finds
    the receiver's offer standing, so it waits for the answer, which the confirmer
    gives (the take): the send returns normally, never "nothing is delivered"."""
    a, b = pair
    _round(a, b)
    release = threading.Event()
    with _slow_confirmer(1.0):
        t, box = _take_and_hold(b, release)
        try:
            a.send_bytes(b"taken late", timeout=0.2)
        finally:
            release.set()
            t.join(10)
    assert box == [b"taken late"]
    assert a.statistics().aborted == 0
    _round(a, b, b"after")


def test_a_withdraw_read_by_the_taker_is_answered_with_the_take(
    pair: tuple[Any, Any],
) -> None:
    """The taker reads the sender's WITHDRAW of a message it took and has not
    confirmed: it answers with the take at once (the send returns normally)."""
    a, b = pair
    _round(a, b)
    with _slow_confirmer(10.0):
        t, box = _in_thread(lambda: a.send_bytes(b"withdrawn too late", timeout=0.2))
        got = b.recv_bytes(timeout=10)
        time.sleep(0.5)  # a's deadline passed: its WITHDRAW is written
        with pytest.raises(buzon.Timeout):
            b.recv_bytes(timeout=0.3)  # reads the WITHDRAW: answers with its take
        t.join(20)
    assert got == b"withdrawn too late"
    assert box == [None], box
    assert a.statistics().aborted == 0 and b.statistics().aborted == 0


def test_a_close_in_another_thread_confirms_an_owed_take(pair: tuple[Any, Any]) -> None:
    a, b = pair
    _round(a, b)
    release = threading.Event()
    with _slow_confirmer(10.0):
        t, box = _take_and_hold(b, release)
        s, sent = _in_thread(lambda: a.send_bytes(b"then closed", timeout=20))
        deadline = time.monotonic() + 10
        while b.statistics().messages_received < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        b.close()  # the taker's channel closed by another thread: the take is confirmed
        s.join(20)
        release.set()
        t.join(10)
    assert box == [b"then closed"]
    assert sent == [None], sent


def test_the_c_receive_counts_recv_would_block(pair: tuple[Any, Any]) -> None:
    """A rendezvous receive that waits counts in ``recv_would_block`` (as the
    engine's reads count it)."""
    a, b = pair
    _round(a, b)
    before = b.statistics().recv_would_block
    t, box = _in_thread(lambda: b.recv_bytes(timeout=10))
    time.sleep(0.1)  # b waits: nothing came yet
    a.send_bytes(b"late", timeout=10)
    t.join(10)
    assert box == [b"late"]
    assert b.statistics().recv_would_block > before
    assert b.statistics().messages_received == 2


@pytest.mark.parametrize("deferring", ["a", "b"])
def test_a_deferring_end_talks_to_one_that_does_not(pair: tuple[Any, Any], deferring: str) -> None:
    """One end on the engine's way (it writes each take's CREDIT at once, as older
    buzon did), the other deferring: request/response both ways, timeouts included."""
    a, b = pair
    engine_only(b if deferring == "a" else a)
    _round(a, b)

    def echo() -> None:
        for _ in range(40):
            b.send_bytes(b.recv_bytes(timeout=10), timeout=10)

    t, _ = _in_thread(echo)
    for i in range(40):
        a.send_bytes(b"%d" % i, timeout=10)
        assert a.recv_bytes(timeout=10) == b"%d" % i
    t.join(10)
    with pytest.raises(buzon.Timeout):
        a.send_bytes(b"nobody takes", timeout=0.1)
    with pytest.raises(buzon.Timeout):
        b.recv_bytes(timeout=0.2)
    _round(a, b, b"after")
    _round(b, a, b"reverse")


@pytest.mark.parametrize("kind", ["unix:rvdeferaio", "tcp://127.0.0.1:0"])
def test_a_blocking_end_talks_to_an_asyncio_end(kind: str) -> None:
    """The asyncio driver keeps the engine's way (no deferral); a deferring blocking
    end serves it and is served by it."""
    lst = buzon.listen(kind, capacity=0)
    url = lst.address if kind.startswith("tcp") else kind
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
    t.start()
    n = 30

    async def client() -> list[bytes]:
        ch = await buzon.aio.connect(str(url), timeout=10, capacity=0)
        got = []
        try:
            for i in range(n):
                await ch.send_bytes(b"%d" % i, timeout=10)
                got.append(await ch.recv_bytes(timeout=10))
            for _ in range(n):  # the other way round: the blocking end asks
                await ch.send_bytes(await ch.recv_bytes(timeout=10), timeout=10)
        finally:
            await ch.aclose()
        return got

    def server() -> None:
        t.join(10)
        srv = box[0]
        with srv:
            for _ in range(n):
                srv.send_bytes(srv.recv_bytes(timeout=10), timeout=10)
            for i in range(n):
                srv.send_bytes(b"s%d" % i, timeout=10)
                assert srv.recv_bytes(timeout=10) == b"s%d" % i

    s, result = _in_thread(server)
    try:
        assert asyncio.run(client()) == [b"%d" % i for i in range(n)]
    finally:
        s.join(20)
        lst.close()
    assert result == [None], result


_CHILD = r"""
import sys, buzon
from buzon.protocol import _rv
ch = buzon.connect(sys.argv[1], timeout=10, capacity=0)
ch.send_bytes(ch.recv_bytes(timeout=10), timeout=10)  # a round: the C path
_rv.confirm_delay(10.0)
ch.recv_bytes(timeout=10)  # taken, its CREDIT owed
if sys.argv[2] == "kill":
    import os
    os._exit(0)
# a normal exit without close(): the exit confirms the take
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_taker_process_that_ends_with_a_take_owed(how: str) -> None:
    """A normal exit without ``close()`` confirms an owed take (the send returns); a
    taker killed before it confirmed leaves the send an ``EndOfChannel`` that never
    says "nothing of it is delivered"."""
    url = f"unix:rvdeferexit{os.getpid()}"
    lst = buzon.listen(url, capacity=0)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, url, how])
    try:
        with lst.accept(timeout=20) as a:
            a.send_bytes(b"round", timeout=20)
            assert a.recv_bytes(timeout=20) == b"round"
            try:
                a.send_bytes(b"last", timeout=20)
                outcome: BaseException | None = None
            except buzon.BuzonError as exc:
                outcome = exc
        assert child.wait(20) == 0
    finally:
        lst.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    if how == "exit":
        assert outcome is None, outcome
    else:
        assert outcome is None or isinstance(outcome, buzon.EndOfChannel), outcome
        assert outcome is None or "nothing of it is delivered" not in str(outcome)


def _forked_taker(b: Any, hold: Any) -> None:
    b.send_bytes(b.recv_bytes(timeout=10), timeout=10)  # a round: the C path
    b.recv_bytes(timeout=10)  # taken; no further call on the channel
    hold.wait(30)
    os._exit(0)


def test_the_confirmer_works_in_a_forked_child() -> None:
    """The parent's confirmer thread does not survive a fork: the child starts its
    own, and the parent's send to a child that computes after its take returns."""
    a, b = buzon.pipe(capacity=0)
    with a, b:
        _round(a, b)  # the parent's confirmer runs (deferred takes happened here)
        ctx = multiprocessing.get_context("fork")
        hold = ctx.Event()
        p = ctx.Process(target=_forked_taker, args=(b, hold))
        p.start()
        try:
            a.send_bytes(b"round", timeout=20)
            assert a.recv_bytes(timeout=20) == b"round"
            a.send_bytes(b"held", timeout=20)  # Timeout if the child never confirmed
            assert p.is_alive()
        finally:
            hold.set()
            p.join(20)
            if p.is_alive():
                p.kill()
                p.join()


def _owed_take(a: Any, b: Any) -> threading.Thread:
    """b takes a's message and owes its CREDIT (the confirmer made slow by the caller);
    returns a's sending thread."""
    s, _ = _in_thread(lambda: a.send_bytes(b"owed", timeout=30))
    assert b.recv_bytes(timeout=10) == b"owed"
    assert b._core.rflow.owed
    return s


def test_a_fork_confirms_an_owed_take_first() -> None:
    """A forked child must not inherit a take both processes would confirm (a stale
    CREDIT written after the child's offer would take that offer back): the parent
    confirms before the fork."""
    a, b = buzon.pipe(capacity=0)
    with a, b:
        _round(a, b)
        with _slow_confirmer(10.0):
            s = _owed_take(a, b)
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            assert not b._core.rflow.owed
            s.join(10)
            assert not s.is_alive()
        _round(a, b, b"after")


def _spawned(b: Any) -> None:
    b.close()


def test_passing_an_end_confirms_an_owed_take_first() -> None:
    """The same when the end is pickled for a spawn child."""
    a, b = buzon.pipe(capacity=0)
    with a, b:
        _round(a, b)
        with _slow_confirmer(10.0):
            s = _owed_take(a, b)
            p = multiprocessing.get_context("spawn").Process(target=_spawned, args=(b,))
            p.start()  # b pickled here
            try:
                assert not b._core.rflow.owed
                s.join(10)
                assert not s.is_alive()
            finally:
                p.join(30)
        assert p.exitcode == 0

"""``capacity=0`` on ``shm:`` channels: the rendezvous kept by the rings (``_ring_rv``).

Hostile cases across processes: a receiver that gives up and naps at random while the
sender retries each timed-out send (exactly once, in order), a send interrupted by a
signal handler's exception or KeyboardInterrupt (nothing delivered), a receiver that
dies before taking (EndOfChannel, no hang) or after taking (the send returns), a
sender killed halfway through its message (no torn record), ``send_nowait`` with and
without a waiting receiver, and the asyncio driver's cancellation and dead peer.
No wall-clock assertions: every wait is bounded by a generous timeout.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import buzon
from buzon import _core

T = 10.0


def _url() -> str:
    return f"shm:rv{secrets.token_hex(4)}"


def _pair() -> tuple[buzon.Channel, buzon.Channel]:
    url = _url()
    with buzon.listen(url, capacity=0) as lst:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect(url, timeout=T, capacity=0)
        t.join(T)
    return a, box[0]


@pytest.fixture
def pair() -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    a, b = _pair()
    with a, b:
        yield a, b


def _child(fn: Callable[[], None]) -> int:
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


def _forked_pair(child: Callable[[buzon.Channel], None]) -> tuple[buzon.Channel, int]:
    """A listener here; a child process connects (capacity=0) and runs ``child``."""
    url = _url()
    lst = buzon.listen(url, capacity=0)
    try:
        pid = _child(lambda: child(buzon.connect(url, timeout=T, capacity=0)))
        ch = lst.accept(timeout=T)
    finally:
        lst.close()
    return ch, pid


def _reap(pid: int) -> int:
    for _ in range(int(T / 0.01)):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_the_rings_keep_the_rendezvous(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    assert a._core.rv_ring is not None and b._core.rv_ring is not None
    assert a._core.sflow is None and a._core.rflow is None  # no CREDIT frames


def test_a_retry_loop_across_processes_delivers_each_message_once() -> None:
    """The receiver (another process) gives up after 0.1-1 ms and naps at random; the
    sender retries every send that timed out. Every withdrawal races a claim."""
    n = 600

    def receive(ch: buzon.Channel) -> None:
        rnd = random.Random(os.getpid())
        got = []
        while True:
            try:
                item = ch.recv(timeout=rnd.choice((0.0001, 0.0003, 0.001)))
            except buzon.Timeout:
                time.sleep(rnd.choice((0.0, 0.0002, 0.002)))
                continue
            if item is None:
                break
            got.append(item)
            time.sleep(rnd.choice((0.0, 0.0, 0.0005, 0.002)))  # busy: the send times out
        ch.send(got, timeout=T)
        ch.close()

    a, pid = _forked_pair(receive)
    timeouts = 0
    try:
        with a:
            for i in [*range(n), None]:
                while True:
                    try:
                        a.send(i, timeout=0.0005 if i is not None else T)
                        break
                    except buzon.Timeout as exc:
                        assert "nothing of it is delivered" in str(exc)
                        timeouts += 1
            got = a.recv(timeout=T)
            stats = a.statistics()
    finally:
        status = _reap(pid)
    assert status == 0
    assert got == list(range(n)), f"duplicates or losses after {timeouts} timeouts"
    assert timeouts > 0  # the withdrawal was exercised
    assert stats.messages_sent == n + 1 and stats.aborted == timeouts


@pytest.mark.parametrize("raised", [KeyboardInterrupt, LookupError])
def test_a_send_interrupted_by_a_signal_delivers_nothing(
    pair: tuple[buzon.Channel, buzon.Channel], raised: type[BaseException]
) -> None:
    a, b = pair

    def handler(signum: int, frame: object) -> None:
        raise raised("interrupted")

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(raised):
            a.send("never", timeout=T)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    with pytest.raises(buzon.Timeout):
        print("received anyway:", b.recv(timeout=0.2))
    assert a.statistics().aborted == 1 and a.statistics().messages_sent == 0
    t = threading.Timer(0.05, lambda: b.recv(timeout=T))
    t.start()
    a.send("next", timeout=T)  # the channel goes on
    t.join(T)


def test_a_send_to_a_receiver_that_dies_before_taking_ends_in_end_of_channel() -> None:
    def idle(ch: buzon.Channel) -> None:
        time.sleep(T)

    a, pid = _forked_pair(idle)
    try:
        with a:
            threading.Timer(0.2, lambda: os.kill(pid, signal.SIGKILL)).start()
            with pytest.raises(buzon.EndOfChannel):
                a.send("to the dead", timeout=T)
            assert a.statistics().messages_sent == 0
    finally:
        _reap(pid)


def test_a_send_whose_receiver_dies_holding_the_message_returns() -> None:
    """Killed right after claiming the record: the message was taken (at most once),
    so the send returns rather than waiting for ever."""

    def die_at_claim(ch: buzon.Channel) -> None:
        _core._set_fault(_core.F_CLAIMED)
        ch.recv(timeout=T)

    a, pid = _forked_pair(die_at_claim)
    try:
        with a:
            a.send("taken, then lost", timeout=T)
    finally:
        status = _reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_sender_killed_halfway_through_its_message_leaves_no_torn_record() -> None:
    def die_mid_payload(ch: buzon.Channel) -> None:
        _core._set_fault(_core.F_MID_PAYLOAD)
        ch.send_bytes(b"t" * 1000, timeout=T)

    b, pid = _forked_pair(die_mid_payload)
    with b:
        status = _reap(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        with pytest.raises(buzon.EndOfChannel):
            print("torn message:", b.recv_bytes(timeout=T))


def test_send_nowait_needs_a_waiting_receiver(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    a, b = pair
    with pytest.raises(buzon.Full, match="no receiver is waiting"):
        a.send_nowait("nobody")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(b.recv(timeout=T)))
    t.start()
    for _ in range(int(T / 0.001)):  # until the receive is waiting
        try:
            a.send_nowait("handed")
            break
        except buzon.Full:
            time.sleep(0.001)
    t.join(T)
    assert got == ["handed"]
    with pytest.raises(buzon.Timeout):
        b.recv(timeout=0.05)  # waited, gave up
    with pytest.raises(buzon.Full):
        a.send_nowait("after the receiver gave up")
    with pytest.raises(buzon.Empty):
        b.recv_nowait()  # looked, did not wait
    with pytest.raises(buzon.Full):
        a.send_nowait("nobody waits")


def test_buzon_wait_does_not_take_the_message(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    """``buzon.wait`` sees a message is there without taking it: the send still waits
    for the receive, and times out (withdrawn) if none comes."""
    a, b = pair
    ready: list[object] = []
    t = threading.Thread(target=lambda: ready.append(buzon.wait([b], timeout=T)))
    t.start()
    with pytest.raises(buzon.Timeout):
        a.send("seen, not taken", timeout=0.3)
    t.join(T)
    assert ready == [[b]]
    with pytest.raises(buzon.Timeout):
        b.recv(timeout=0.1)


def test_asyncio_cancel_and_dead_peer() -> None:
    async def main() -> None:
        url = _url()
        lst = buzon.aio.listen(url, capacity=0)
        acc = asyncio.ensure_future(lst.accept(timeout=T))
        a = await buzon.aio.connect(url, timeout=T, capacity=0)
        b = await acc
        lst.close()
        try:
            assert a._core.rv_ring is not None
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await asyncio.wait_for(a.send("cancelled"), 0.05)
            with pytest.raises(buzon.Timeout):
                await b.recv(timeout=0.1)
            assert a.statistics().aborted == 1
            got = asyncio.ensure_future(b.recv(timeout=T))
            await a.send("taken", timeout=T)
            assert await got == "taken"
            with pytest.raises(buzon.Timeout, match="nothing of it is delivered"):
                await a.send("timed out", timeout=0.05)
        finally:
            await b.aclose()
        with pytest.raises((buzon.EndOfChannel, buzon.ChannelClosed)):
            await a.send("to a closed peer", timeout=T)
        await a.aclose()

    asyncio.run(main())


def test_a_withdrawn_large_message_gives_its_block_back(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    """A message larger than a ring record goes out of line (a block, a reference in
    the ring): withdrawn, its block is idle again or unlinked, so later large sends
    neither stall on blocks "in flight" nor leave segments behind (the fixture checks)."""
    a, b = pair
    big = a._core.transport.ring_max + 1
    for i in range(6):  # more than the pool's blocks
        with pytest.raises(buzon.Timeout, match="nothing of it is delivered"):
            a.send_bytes(bytes([i]) * (big + i * 100_000), timeout=0.05)
    with pytest.raises(buzon.Timeout):
        print("received anyway:", len(b.recv_bytes(timeout=0.1)))
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(b.recv_bytes(timeout=T)))
    t.start()
    a.send_bytes(b"z" * big, timeout=T)
    t.join(T)
    assert got == [b"z" * big]
    assert a.statistics().aborted == 6


def test_close_from_another_thread_ends_a_rendezvous_send(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    a, b = pair
    raised: list[BaseException] = []

    def send() -> None:
        try:
            a.send("never taken", timeout=T)
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.1)  # blocked in the rendezvous (if not yet, close() ends it anyway)
    a.close()
    t.join(T)
    assert not t.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], buzon.ChannelClosed)
    with pytest.raises(buzon.EndOfChannel):
        print("received anyway:", b.recv(timeout=T))


def test_asyncio_send_to_a_receiver_killed_before_taking_ends_in_end_of_channel() -> None:
    url = _url()

    def idle() -> None:
        ch = buzon.connect(url, timeout=T, capacity=0)
        time.sleep(T)
        ch.close()

    async def main() -> None:
        lst = buzon.aio.listen(url, capacity=0)
        try:
            pid = _child(idle)
            a = await lst.accept(timeout=T)
        finally:
            lst.close()
        try:
            asyncio.get_running_loop().call_later(0.2, os.kill, pid, signal.SIGKILL)
            with pytest.raises(buzon.EndOfChannel):
                await a.send("to the dead", timeout=T)
            assert a.statistics().messages_sent == 0
        finally:
            await a.aclose()
            _reap(pid)

    asyncio.run(main())

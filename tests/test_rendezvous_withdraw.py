"""Rendezvous (``capacity=0``): a send that raises delivered nothing (contract 4a).

A send that timed out (or was cancelled) after its message was handed over withdraws
it: the receiver takes a message only while its offer stands and it has not read the
sender's withdrawal, and the sender learns which of the two happened. Exactly one of
"the receiver took it and ``send`` returns" / "``send`` raises and the receiver never
sees it" happens.

Each test here failed on f43dbb5: the timed-out message was still taken by a later
receive ("it was handed over and may still be taken"), so a retry loop delivered it
twice.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator

import pytest

import buzon


def _pair(kind: str) -> tuple[buzon.Channel, buzon.Channel]:
    """(sender, receiver); duplex kinds send both ways."""
    if kind == "pipe":
        return buzon.pipe(capacity=0)
    if kind == "pipe-simplex":
        r, w = buzon.pipe(False, capacity=0)
        return w, r
    if kind.startswith(("fifo:", "mq:")):
        with buzon.listen(kind, capacity=0) as lst:
            w = buzon.connect(str(lst.address), timeout=10)
            return w, lst.accept(timeout=10)
    reliable = kind.startswith(("udp:", "unixgram:"))
    extra = {"reliable": True} if reliable else {}
    lst = buzon.listen(kind, capacity=0, **extra)
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        url = lst.address if kind.startswith(("tcp", "udp")) else kind
        a = buzon.connect(url, timeout=10, capacity=0, **extra)
        t.join(10)
        return a, box[0]
    finally:
        lst.close()


KINDS = ["pipe", "unix:rvwithdraw", "seqpacket:rvwithdraw", "tcp://127.0.0.1:0", "shm:rvwd"]
SIMPLEX = ["pipe-simplex", "fifo:rvwithdraw", "mq:rvwithdraw"]
RELIABLE = ["udp://127.0.0.1:0", "unixgram:rvwithdraw"]  # reliable=True


@pytest.fixture(params=KINDS + SIMPLEX)
def any_pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    a, b = _pair(request.param)
    with a, b:
        yield a, b


@pytest.fixture(params=KINDS + SIMPLEX + RELIABLE)
def every_pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    """Reliable datagrams too: there a sender that gives up waits for the receiver's
    answer (no local order to conclude from), so only a receiving peer is tried."""
    a, b = _pair(request.param)
    with a, b:
        yield a, b


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    a, b = _pair(request.param)
    with a, b:
        yield a, b


def test_a_reply_that_timed_out_is_never_received(
    pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    """B's reply goes under A's offer (A offers while its own rendezvous send waits);
    A then does not receive for a while, so B's send times out after the hand-over.
    A's next receive must not get it."""
    a, b = pair
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(b.recv(timeout=10)))
    t.start()
    a.send("request", timeout=10)
    t.join(10)
    assert got == ["request"]
    with pytest.raises(buzon.Timeout) as raised:
        b.send("reply", timeout=0.2)  # a does not receive now
    with pytest.raises(buzon.Timeout):
        print("received anyway:", a.recv(timeout=0.3))
    assert "nothing of it is delivered" in str(raised.value)
    # the channel goes on, in both directions
    t = threading.Thread(target=lambda: got.append(a.recv(timeout=10)))
    t.start()
    b.send("second reply", timeout=10)
    t.join(10)
    assert got == ["request", "second reply"]
    t = threading.Thread(target=lambda: got.append(b.recv(timeout=10)))
    t.start()
    a.send("again", timeout=10)
    t.join(10)
    assert got[-1] == "again"


def test_a_message_handed_to_a_receiver_that_did_not_take_it_is_withdrawn(
    any_pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    """``buzon.wait`` offers (it waits to receive) but takes nothing: the send hands its
    message over and times out; the receiver's next receive must not get it."""
    a, b = any_pair
    waiter = threading.Thread(target=lambda: buzon.wait([b], timeout=10))
    waiter.start()
    with pytest.raises(buzon.Timeout) as raised:
        a.send("handed over", timeout=0.3)
    waiter.join(10)
    assert "nothing of it is delivered" in str(raised.value)
    with pytest.raises(buzon.Timeout):
        print("received anyway:", b.recv(timeout=0.3))
    assert a.statistics().aborted == 1 and a.statistics().messages_sent == 0
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(b.recv(timeout=10)))
    t.start()
    a.send("next", timeout=10)
    t.join(10)
    assert got == ["next"]


def test_a_retry_loop_delivers_each_message_exactly_once(
    every_pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    """A receiver that gives up often and naps; a sender that retries each timed-out
    send: every message arrives once, in order."""
    a, b = every_pair
    n = 300
    got: list[int] = []
    timeouts = [0]
    rnd = random.Random(9)

    def receive() -> None:
        while True:
            try:
                item = b.recv(timeout=rnd.choice((0.0001, 0.0003, 0.001)))
            except buzon.Timeout:
                time.sleep(rnd.choice((0.0, 0.0003, 0.001)))
                continue
            if item is None:
                return
            got.append(item)
            time.sleep(rnd.choice((0.0, 0.0, 0.0005, 0.0015)))  # busy: no offer stands

    t = threading.Thread(target=receive)
    t.start()
    for i in [*range(n), None]:
        while True:
            try:
                a.send(i, timeout=0.001 if i is not None else 10)
                break
            except buzon.Timeout:
                timeouts[0] += 1
    t.join(30)
    assert not t.is_alive()
    assert got == list(range(n)), f"duplicates or losses after {timeouts[0]} timeouts"
    assert timeouts[0] > 0  # the test did exercise the withdrawal


@pytest.mark.parametrize(
    "kind",
    ["pipe", "unix:rvwdaio", "tcp://127.0.0.1:0", "shm:rvwdaio", "fifo:rvwdaio", "mq:rvwdaio"],
)
def test_asyncio_cancelled_sends_deliver_exactly_once(kind: str) -> None:
    """The asyncio driver: ``asyncio.wait_for`` cancels a send after its hand-over; a
    retry loop still delivers each message once, and a send that returned despite
    the cancellation (its message was taken) is not retried."""

    async def main() -> list[int]:
        if kind == "pipe":
            a, b = buzon.aio.pipe(capacity=0)
        else:
            lst = buzon.aio.listen(kind, capacity=0)
            acc = asyncio.ensure_future(lst.accept(timeout=10))
            a = await buzon.aio.connect(str(lst.address), timeout=10, capacity=0)
            b = await acc
            lst.close()
        got: list[int] = []
        rnd = random.Random(4)

        async def receive() -> None:
            while True:
                try:
                    item = await b.recv(timeout=rnd.choice((0.0001, 0.0003, 0.001)))
                except buzon.Timeout:
                    await asyncio.sleep(rnd.choice((0.0, 0.0003, 0.001)))
                    continue
                if item is None:
                    return
                got.append(item)
                await asyncio.sleep(rnd.choice((0.0, 0.0, 0.0005, 0.0015)))

        task = asyncio.ensure_future(receive())
        for i in [*range(300), None]:
            while True:
                try:
                    await asyncio.wait_for(a.send(i), 0.001 if i is not None else 10)
                    break
                except (TimeoutError, buzon.Timeout):
                    pass
        await asyncio.wait_for(task, 30)
        await a.aclose()
        await b.aclose()
        return got

    assert asyncio.run(main()) == list(range(300))


def test_a_send_ended_by_close_from_another_thread_delivered_nothing(
    any_pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    """A rendezvous send waiting for its take, ended by ``close()`` in another thread,
    raises ``ChannelClosed``: it withdrew its message, so the peer never gets it."""
    a, b = any_pair
    waiter = threading.Thread(target=lambda: buzon.wait([b], timeout=10))
    waiter.start()  # b offers (it waits to receive) but takes nothing
    box: list[BaseException] = []

    def send() -> None:
        try:
            a.send("handed over", timeout=10)
        except BaseException as exc:
            box.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    waiter.join(10)  # the message arrived: b's wait ended
    time.sleep(0.1)
    a.close()
    sender.join(10)
    assert not sender.is_alive()
    assert len(box) == 1 and isinstance(box[0], buzon.ChannelClosed), box
    with pytest.raises((buzon.EndOfChannel, buzon.Timeout)):
        print("received anyway:", b.recv(timeout=0.5))

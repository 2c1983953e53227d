"""Rendezvous (``capacity=0``): a send ended by ``close()`` from another thread raises
``ChannelClosed`` and delivers nothing, whoever wins the race to the write lock
(contract 4a; docs/semantics.md "Withdrawing a rendezvous message").

The race: the sender, woken by the close, leaves the channel's waits and only then
takes the write lock to write its WITHDRAW (or, on a simplex link, to take its stake
back). ``close()`` waits for waiting threads to leave, so in that gap it could take
the write lock first and release the fds: no WITHDRAW was written, the sender raised
(or, simplex, returned as if the receiver had claimed the message), and the
receiver's next receive took the message anyway. Now ``close()`` itself withdraws a
rendezvous message in flight, under the write lock, before the fds go
(``ChannelCore.withdraw_at_close``).

The tests force the losing interleaving: the sender, once it has left every wait of
the closing channel, holds still until the close has released the channel.
``tests/test_rendezvous_withdraw.py::test_a_send_ended_by_close_from_another_thread_
delivered_nothing`` is the same case left to chance (it failed now and then, mostly
under ``make sanitize``'s slower build).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from test_rendezvous_withdraw import KINDS, SIMPLEX, _pair


class _LateLeaver(list):  # type: ignore[type-arg]
    """A channel's ``_waiters`` whose ``sender`` thread, once it left every wait of the
    channel after a close began, waits until the close released the channel."""

    def __init__(self, channel: Any, sender: list[int]) -> None:
        super().__init__(channel._waiters)
        self.channel = channel
        self.sender = sender
        self.delayed = 0

    def remove(self, ident: Any) -> None:
        super().remove(ident)
        ch = self.channel
        if ch._closing and self.sender and ident == self.sender[0] and ident not in self:
            self.delayed += 1
            end = time.monotonic() + 5
            while not ch._core.closed and time.monotonic() < end:
                time.sleep(0.001)


@pytest.fixture(params=KINDS + SIMPLEX)
def any_pair(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    a, b = _pair(request.param)
    with a, b:
        yield a, b


def test_a_send_whose_close_takes_the_write_lock_first_delivered_nothing(
    any_pair: tuple[buzon.Channel, buzon.Channel],
) -> None:
    """The close releases the channel before the woken sender writes anything: the send
    raises ``ChannelClosed`` and the receiver never gets the message."""
    a, b = any_pair
    sender_ident: list[int] = []
    waiters = _LateLeaver(a, sender_ident)
    a._waiters = waiters  # type: ignore[attr-defined]
    got = threading.Event()
    waiter = threading.Thread(target=lambda: got.set() if buzon.wait([b], timeout=10) else None)
    waiter.start()  # b offers (it waits to receive) but takes nothing
    box: list[BaseException] = []

    def send() -> None:
        sender_ident.append(threading.get_ident())
        try:
            a.send("handed over", timeout=10)
        except BaseException as exc:
            box.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    waiter.join(10)
    assert got.is_set()  # the message arrived: b's wait ended
    deadline = time.monotonic() + 10
    while sender_ident[0] not in waiters and time.monotonic() < deadline:
        time.sleep(0.001)  # the sender waits for the take
    a.close()
    sender.join(10)
    assert not sender.is_alive()
    assert waiters.delayed >= 1  # the interleaving was forced
    assert len(box) == 1 and isinstance(box[0], buzon.ChannelClosed), box
    with pytest.raises((buzon.EndOfChannel, buzon.Timeout)):
        print("received anyway:", b.recv(timeout=0.5))


async def _aio_pair(kind: str) -> tuple[Any, Any]:
    """(sender, receiver), asyncio ends with ``capacity=0``."""
    import buzon.aio

    if kind == "pipe":
        return buzon.aio.pipe(capacity=0)
    if kind == "pipe-simplex":
        r, w = buzon.aio.pipe(False, capacity=0)
        return w, r
    lst = buzon.aio.listen(kind, capacity=0)
    try:
        accepting = asyncio.create_task(lst.accept(timeout=10))
        url = str(lst.address) if kind.startswith("tcp") else kind
        a = await buzon.aio.connect(url, timeout=10, capacity=0)
        return a, await accepting
    finally:
        lst.close()


@pytest.mark.parametrize("kind", ["pipe", "pipe-simplex", "unix:rvclrace", "tcp://127.0.0.1:0"])
def test_an_asyncio_send_ended_by_close_delivered_nothing(kind: str) -> None:
    """asyncio: ``close()`` (from another task) ends the send waiting for its take. It
    raises ``ChannelClosed`` and the receiver never gets the message (before: no
    WITHDRAW was ever written, and the receiver took it; on a simplex pipe the send
    was not woken, and raised ``OSError`` at its timeout)."""
    import buzon.aio

    async def main() -> tuple[BaseException | None, BaseException | object]:
        a, b = await _aio_pair(kind)
        try:
            waiter = asyncio.create_task(buzon.aio.wait([b], timeout=10))
            send = asyncio.create_task(a.send("handed over", timeout=10))
            assert await waiter  # the message arrived: b's wait ended
            await asyncio.sleep(0.05)  # the send waits for the take
            a.close()
            raised: BaseException | None = None
            try:
                await send
            except BaseException as exc:
                raised = exc
            try:
                got: BaseException | object = await b.recv(timeout=0.5)
            except BaseException as exc:
                got = exc
            return raised, got
        finally:
            await a.aclose()
            b.close()

    raised, got = asyncio.run(main())
    assert isinstance(raised, buzon.ChannelClosed), raised
    assert isinstance(got, (buzon.EndOfChannel, buzon.Timeout)), f"received anyway: {got!r}"


def test_a_send_nowait_that_returned_is_still_delivered_after_close() -> None:
    """The close withdraws only a message whose blocking send waits for its take: a
    ``send_nowait`` that returned (a receiver was waiting) is delivered after the
    sender's ``close()``."""
    a, b = buzon.pipe(capacity=0)
    try:
        waiter = threading.Thread(target=lambda: buzon.wait([b], timeout=10))
        waiter.start()  # b offers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                a.send_nowait("x")
                break
            except buzon.Full:
                time.sleep(0.001)  # b's offer is not read yet
        waiter.join(10)
        a.close()
        assert b.recv(timeout=5) == "x"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("method", ["send", "send_bytes"])
@pytest.mark.parametrize("kind", ["pipe", "unix:rvclrace", "tcp://127.0.0.1:0"])
def test_a_c_rendezvous_send_whose_close_takes_the_write_lock_first_delivered_nothing(
    kind: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race on the C rendezvous calls (``protocol/_rv.c``: ``send`` through
    RvStream, ``send_bytes`` through RvCall), which apply once the receiver's offer
    is known: the call, woken by the close, hands over to ``Channel._rv_sent``, which
    here holds still until the close released the channel."""
    from buzon.sync import _channel as sync_channel

    original = sync_channel.Channel._rv_sent
    woken: list[int] = []

    def late(self: Any, rv: Any, code: int, *args: Any) -> bool:
        if code == sync_channel._RV_WOKEN:
            woken.append(code)
            end = time.monotonic() + 5
            while not self._core.closed and time.monotonic() < end:
                time.sleep(0.001)
        return original(self, rv, code, *args)

    monkeypatch.setattr(sync_channel.Channel, "_rv_sent", late)
    a, b = _pair(kind)  # made after the patch: RvCall takes its tail when bound
    try:
        warm = threading.Thread(target=lambda: b.recv_bytes(timeout=10))
        warm.start()  # one exchange first: the wake fd is made
        a.send_bytes(b"warm", timeout=10)
        warm.join(10)
        waiter = threading.Thread(target=lambda: buzon.wait([b], timeout=10))
        waiter.start()  # b offers
        time.sleep(0.05)
        a._core.pump()  # b's offer read: the C call applies
        box: list[BaseException] = []
        payload: Any = b"handed over" if method == "send_bytes" else "handed over"

        def send() -> None:
            try:
                getattr(a, method)(payload, timeout=10)
            except BaseException as exc:
                box.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        waiter.join(10)
        time.sleep(0.1)  # the send waits for the take
        a.close()
        sender.join(10)
        assert not sender.is_alive()
        assert woken  # the C call was woken by the close, and held
        assert len(box) == 1 and isinstance(box[0], buzon.ChannelClosed), box
        with pytest.raises((buzon.EndOfChannel, buzon.Timeout)):
            print("received anyway:", b.recv_bytes(timeout=0.5))
    finally:
        a.close()
        b.close()

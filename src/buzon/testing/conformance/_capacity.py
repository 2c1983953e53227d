"""The capacity contract (checks 14-17): every transport that offers credits, both
drivers; the two sides of each check run at the same time (threads or tasks)."""

from __future__ import annotations

import asyncio
from typing import Any

from ...errors import Full, Timeout, Undelivered, UnsupportedOperation
from ._harness import End, Pair, T, expect, gather

PAUSE = 0.05  # long enough for the other side to be blocked by then


async def _later(coro: Any) -> Any:
    await asyncio.sleep(PAUSE)
    return await coro


async def _rendezvous_one_way(sender: End, receiver: End) -> None:
    events: list[str] = []

    async def send() -> None:
        await sender.send("ping", T)
        events.append("send-returned")

    async def recv() -> Any:
        await asyncio.sleep(PAUSE)  # the sender is blocked by now
        events.append("recv-began")
        return await receiver.recv(T)

    _, got = await gather(send(), recv())
    assert got == "ping"
    assert events.index("recv-began") < events.index("send-returned"), events


async def _send_all(end: End, n: int) -> None:
    for i in range(n):
        await end.send(i, T)


async def _recv_all(end: End, n: int) -> list[Any]:
    return [await end.recv(T) for _ in range(n)]


async def check_rendezvous(p: Pair) -> None:
    """(14) capacity=0: send returns only after the receiver's recv began, both ways;
    send_nowait with nobody waiting raises Full; a send that timed out delivered
    nothing; a stream of rendezvous sends keeps its order."""
    await _rendezvous_one_way(p.a, p.b)
    if p.duplex:
        await _rendezvous_one_way(p.b, p.a)
    with expect(Full):
        p.a.send_nowait("nobody waits")
    with expect(Timeout):
        await p.a.send("nobody takes", timeout=0.05)
    with expect(Timeout):  # the timed-out send delivered nothing
        await p.b.recv(timeout=0.05)
    n = 100
    _, got = await gather(_send_all(p.a, n), _recv_all(p.b, n))
    assert got == list(range(n))


async def check_bounded(p: Pair) -> None:
    """(15) capacity=N: exactly N fit; the (N+1)th raises Full or Timeout and goes
    through as soon as the receiver takes one; many messages keep their order."""
    n = p.a.capacity
    assert n == 4 and p.a.properties.capacity == 4 and p.b.properties.capacity == 4, n
    for i in range(n):
        p.a.send_nowait(i)
    with expect(Full):
        p.a.send_nowait(n)
    with expect(Timeout):
        await p.a.send(n, timeout=0.05)
    assert await p.b.recv(T) == 0
    await p.a.send(n, timeout=T)  # one was taken: room for exactly one more
    with expect(Full):
        p.a.send_nowait(n + 1)
    assert await _recv_all(p.b, n) == list(range(1, n + 1))
    # a blocked send goes through as soon as the receiver takes one
    for i in range(n):
        p.a.send_nowait(i)
    _, first = await gather(p.a.send("late", T), _later(p.b.recv(T)))
    assert first == 0
    assert await _recv_all(p.b, n) == [1, 2, 3, "late"]
    # many messages through a small window keep their order
    count = 300
    _, got = await gather(_send_all(p.a, count), _recv_all(p.b, count))
    assert got == list(range(count))


async def check_unbounded(p: Pair) -> None:
    """(16) capacity=None: sends never wait, far beyond the kernel's buffer, until
    max_queue bytes are held (then Full); everything accepted arrives."""
    assert p.a.capacity is None and p.a.properties.capacity is None
    unit = p.a.properties.max_message
    chunk = b"u" * (65536 if unit is None else min(65536, unit - 16))
    sent = 0
    # beyond the kernel's buffer (64 KiB pipes, a few MiB for loopback TCP): never waits
    while p.a.statistics().queued_bytes == 0:
        assert sent < 2000, "128 MiB taken by the kernel and nothing queued?"
        p.a.send_bytes_nowait(chunk)
        sent += 1
    with expect(Full):
        for _ in range(100_000):  # max_queue is 4 MiB: this passes it
            p.a.send_bytes_nowait(chunk)
            sent += 1

    async def drain() -> list[Any]:
        return [await p.b.recv_bytes(T) for _ in range(sent)]

    _, got = await gather(p.a.flush(T), drain())
    assert all(x == chunk for x in got) and len(got) == sent
    assert p.a.statistics().queued_bytes == 0


async def check_receipts(p: Pair) -> None:
    """(17) send_async receipts complete once the receiver took the message (receiver
    set to its pid); a receipt whose channel closes before delivery fails with
    Undelivered, it never hangs. Simplex links refuse receipts."""
    if not p.duplex:  # no way back for acknowledgements: refused, with the reason
        with expect(UnsupportedOperation):
            await p.a.send_async(1)
        return
    receipts = [await p.a.send_async(i) for i in range(50)]
    assert [r.number for r in receipts] == list(range(1, 51))
    assert await _recv_all(p.b, 50) == list(range(50))
    for r in receipts:
        await p.a.receipt(r, T)
        assert r.done() and not r.failed
    assert receipts[-1].receiver == p.a.peer.pid
    lost = await p.a.send_async("never taken")
    await p.b.close()
    with expect(Undelivered):
        await p.a.receipt(lost, T)

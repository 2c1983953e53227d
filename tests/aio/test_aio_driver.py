"""asyncio driver specifics: cancellation safety, wait over mixed transports, timeouts."""

from __future__ import annotations

import asyncio

import pytest

import buzon
from buzon import aio


async def test_cancelled_recv_loses_nothing() -> None:
    a, b = aio.pipe()
    try:
        for _ in range(20):
            task = asyncio.ensure_future(b.recv())
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await a.send("survivor")
        assert await b.recv(timeout=5) == "survivor"
    finally:
        a.close()
        b.close()


async def test_cancel_racing_arrival_keeps_every_message() -> None:
    """Cancel receivers at random points while messages flow: each message is
    received exactly once, by some recv that was not cancelled."""
    a, b = aio.pipe()
    got: list[int] = []
    try:
        for i in range(200):
            task = asyncio.ensure_future(b.recv(timeout=5))
            if i % 3 == 0:
                await a.send(i)
                await asyncio.sleep(0)
                task.cancel()
            else:
                await a.send(i)
            try:
                got.append(await task)
            except asyncio.CancelledError:
                pass
        while True:
            try:
                got.append(b.recv_nowait())
            except buzon.Empty:
                break
        assert sorted(got) == list(range(200))
        assert got == sorted(got)
    finally:
        a.close()
        b.close()


async def test_wait_over_mixed_transports() -> None:
    a1, b1 = aio.pipe()
    lst = aio.listen("unix:mixed")
    udp = aio.listen("udp://127.0.0.1:0")
    try:
        client = await aio.connect(str(udp.address), timeout=5)
        server_udp = await udp.accept(timeout=5)
        assert await aio.wait([b1, lst, server_udp], timeout=0.05) == []
        await a1.send("pipe")
        assert await aio.wait([b1, lst, server_udp], timeout=5) == [b1]
        assert b1.recv_nowait() == "pipe"
        await client.send("dgram")
        assert await aio.wait([b1, lst, server_udp], timeout=5) == [server_udp]
        assert server_udp.recv_nowait() == "dgram"
        uc = asyncio.ensure_future(aio.connect("unix:mixed", timeout=5))
        assert await aio.wait([b1, lst, server_udp], timeout=5) == [lst]
        sc = await lst.accept(timeout=5)
        cc = await uc
        for ch in (sc, cc, client, server_udp):
            await ch.aclose()
    finally:
        a1.close()
        b1.close()
        lst.close()
        udp.close()


async def test_recv_timeout_is_a_timeout_error() -> None:
    a, b = aio.pipe()
    try:
        with pytest.raises(TimeoutError):
            await b.recv(timeout=0.05)
        with pytest.raises(buzon.Empty):
            b.recv_nowait()
    finally:
        a.close()
        b.close()


async def test_async_iteration_ends_at_end_of_channel() -> None:
    a, b = aio.pipe()
    for i in range(3):
        await a.send(i)
    await a.aclose()
    assert [m async for m in b] == [0, 1, 2]
    b.close()


async def test_connect_timeout_and_refusal() -> None:
    with pytest.raises(buzon.NoSuchEndpoint):
        await aio.connect("unix:nobody", timeout=1, retry=False)
    import os

    path = os.path.join(os.environ["BUZON_RUNTIME_DIR"], "lonely.fifo")
    os.mkfifo(path, 0o600)  # exists, nobody reads: connect keeps retrying until timeout
    with pytest.raises(buzon.Timeout):
        await aio.connect(f"fifo:{path}", timeout=0.1)


async def test_send_many_and_bytes_many() -> None:
    a, b = aio.pipe()
    try:
        items = [{"i": i} for i in range(300)]
        sender = asyncio.ensure_future(a.send_many(items, timeout=10))
        got = [await b.recv(timeout=10) for _ in range(300)]
        assert await sender == 300
        assert got == items
        sender = asyncio.ensure_future(a.send_bytes_many([b"x", b"y" * 70000], timeout=10))
        assert await b.recv_bytes(timeout=10) == b"x"
        assert await b.recv_bytes(timeout=10) == b"y" * 70000
        assert await sender == 2
    finally:
        a.close()
        b.close()


async def test_recv_and_wait_on_the_same_channel_both_wake() -> None:
    """An event loop keeps one reader per fd; two waiters on one channel must both wake."""
    a, b = aio.pipe()
    try:
        receiver = asyncio.ensure_future(b.recv(timeout=5))
        watcher = asyncio.ensure_future(aio.wait([b], timeout=5))
        await asyncio.sleep(0.01)
        await a.send("x")
        assert await receiver == "x"
        # the watcher woke too (and saw the channel empty again, then timed out or
        # found the next message): it must not sleep through a second message
        await a.send("y")
        assert await watcher == [b]
        assert b.recv_nowait() == "y"
    finally:
        a.close()
        b.close()

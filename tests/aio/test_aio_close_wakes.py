"""An asyncio channel's ``close()`` (or ``await aclose()``) ends a ``recv`` (or a
``send``) pending in another task of the same loop promptly with
:class:`ChannelClosed`, on every transport, and leaves no fd registered in the loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from buzon import aio
from buzon.errors import ChannelClosed
from buzon.testing.conformance._harness import url_for

pytestmark = pytest.mark.fd_check

KINDS = ["pipe", "unix", "tcp", "unixgram", "udp", "mq", "fifo", "shm"]
JOIN = 10.0  # generous: only a task that is never woken gets near it


async def _pair(kind: str) -> tuple[aio.Channel, aio.Channel]:
    if kind == "pipe":
        return aio.pipe()
    lst = aio.listen(url_for(kind))
    try:
        accepting = asyncio.ensure_future(lst.accept(timeout=10))
        a = await aio.connect(str(lst.address), timeout=10)
        b = await asyncio.wait_for(accepting, 10)
        if not b.properties.connection_oriented:  # datagrams: introduce the client
            await a.send_bytes(b"hello", timeout=10)
            assert await b.recv_bytes(timeout=10) == b"hello"
        return a, b
    finally:
        lst.close()


@pytest.fixture(params=KINDS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[aio.Channel, aio.Channel]]:
    a, b = await _pair(request.param)
    try:
        yield a, b
    finally:
        a.close()
        b.close()
        await asyncio.sleep(0.05)  # let a background close finish before the fd check


async def _pending(coro: Any) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0.2)  # time to get into its wait (no assertion on how long)
    assert not task.done(), "the call did not wait"
    return task


async def _ends_closed(task: asyncio.Task[Any]) -> None:
    done, _ = await asyncio.wait([task], timeout=JOIN)
    if not done:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pytest.fail("close() did not end the pending call")
    with pytest.raises(ChannelClosed):
        task.result()


@pytest.mark.parametrize("how", ["close", "aclose"])
@pytest.mark.parametrize("what", ["recv", "recv_bytes"])
async def test_close_ends_a_recv_pending_in_another_task(
    pair: tuple[aio.Channel, aio.Channel], how: str, what: str
) -> None:
    _a, b = pair
    task = await _pending(getattr(b, what)())
    if how == "close":
        b.close()
    else:
        await b.aclose()
    await _ends_closed(task)
    with pytest.raises(ChannelClosed):
        await b.recv_bytes(timeout=0)


async def test_the_channel_still_works_after_a_pending_recv_is_cancelled(
    pair: tuple[aio.Channel, aio.Channel],
) -> None:
    a, b = pair  # what close() watches does not disturb normal waits
    task = await _pending(b.recv_bytes())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    asyncio.get_running_loop().call_later(0.05, a.send_bytes_nowait, b"two")
    assert await b.recv_bytes(timeout=10) == b"two"


async def test_close_ends_every_pending_receive() -> None:
    a, b = aio.pipe()
    try:
        first = await _pending(b.recv())
        second = await _pending(b.recv_bytes(timeout=60))  # queued behind the first
        b.close()
        await _ends_closed(first)
        await _ends_closed(second)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_close_ends_a_send_pending_on_a_full_pipe(how: str) -> None:
    a, b = aio.pipe()
    try:
        chunk = b"x" * 65536

        async def fill() -> None:
            while True:
                await a.send_bytes(chunk)

        task = await _pending(fill())
        if how == "close":
            a.close()
        else:
            await a.aclose()
        await _ends_closed(task)
    finally:
        a.close()
        b.close()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["unixgram", "udp"])
async def test_closing_a_closed_channel_again_leaves_other_channels_waits_alone(
    kind: str,
) -> None:
    """A second close() of a released channel must not end waits on fd numbers it
    once had (a datagram end still reports them): another channel may have them now."""
    a, b = await _pair(kind)
    old = b.fileno()
    b.close()
    a.close()
    pairs = []
    try:
        for _ in range(16):  # a pipe end that got b's old fd number: d
            c, d = aio.pipe()
            pairs.append((c, d))
            if c.fileno() == old:
                c, d = d, c
            if d.fileno() == old:
                break
        assert d.fileno() == old, "no fd number reused (the test needs one)"
        task = await _pending(d.recv_bytes())
        b.close()
        a.close()
        await asyncio.sleep(0.05)
        assert not task.done(), task
        c.send_bytes_nowait(b"still here")
        assert await asyncio.wait_for(task, JOIN) == b"still here"
    finally:
        for c, d in pairs:
            c.close()
            d.close()

"""A channel's receive leaves its read fd registered in the event loop for the next one
(two ``epoll_ctl`` calls saved per message); the registration never outlives the fd and
never spins the loop."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

import buzon
from buzon import aio
from buzon.aio._channel import wait_ready


def _registered(fd: int) -> bool:
    loop: Any = asyncio.get_running_loop()
    return fd in loop._selector.get_map()


def _adds(loop: asyncio.AbstractEventLoop) -> list[int]:
    added: list[int] = []
    original = loop.add_reader

    def add_reader(fd: Any, callback: Any, *args: Any) -> None:
        added.append(fd)
        original(fd, callback, *args)

    loop.add_reader = add_reader  # type: ignore[method-assign]
    return added


async def _echo_rounds(a: Any, b: Any, n: int) -> None:
    for i in range(n):
        task = asyncio.ensure_future(b.recv(timeout=5))
        await asyncio.sleep(0)  # b waits in the loop
        await a.send(i)
        assert await task == i


@pytest.mark.parametrize("url", [None, "unix:keep-{}"])
async def test_the_read_fd_is_registered_once_for_many_receives(
    url: str | None, runtime_dir: str
) -> None:
    a, b, lst = await _pair(url)
    try:
        added = _adds(asyncio.get_running_loop())
        await _echo_rounds(a, b, 20)
        assert added.count(b.fileno()) == 1  # then kept between the receives
    finally:
        await _close(a, b, lst)


async def test_a_shm_ping_loop_registers_its_read_fd_once(runtime_dir: str) -> None:
    """spin=0: every receive waits in the loop; a ping loop never leaves the loop idle
    between two of them (a shm: ring's stale wake-up would drop an idle registration)."""
    import threading

    url = f"shm:keep-{os.getpid()}"
    with aio.listen(url, spin=0) as lst:
        peer: list[Any] = []
        t = threading.Thread(target=lambda: peer.append(buzon.connect(url, timeout=10)))
        t.start()
        ch = await lst.accept(timeout=10)
        while t.is_alive():
            await asyncio.sleep(0.001)
        t.join()
    echo = peer[0]

    def serve() -> None:
        while (got := echo.recv(timeout=10)) is not None:
            echo.send(got)

    server = threading.Thread(target=serve)
    server.start()
    try:
        added = _adds(asyncio.get_running_loop())
        for i in range(50):
            await ch.send(i)
            assert await ch.recv(timeout=10) == i
        assert added.count(ch.fileno()) <= 2
    finally:
        await ch.send(None)
        server.join()
        await ch.aclose()
        echo.close()


async def test_an_idle_registration_goes_when_its_fd_fires_with_nobody_waiting() -> None:
    a, b = aio.pipe()
    try:
        await _echo_rounds(a, b, 1)
        assert _registered(b.fileno())  # kept for the next receive
        await a.send("nobody waits for this yet")
        for _ in range(100):  # the loop sees the fd readable once, and lets it go
            await asyncio.sleep(0)
            if not _registered(b.fileno()):
                break
        assert not _registered(b.fileno())
        assert await b.recv(timeout=5) == "nobody waits for this yet"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_closing_the_channel_drops_its_registration(how: str) -> None:
    """A closed fd must leave the selector, or a new fd with its number (the lowest
    free one: at once) would be taken for registered and never be watched."""
    a, b = aio.pipe()
    await _echo_rounds(a, b, 2)
    fd = b.fileno()
    assert _registered(fd)
    if how == "close":
        b.close()
    else:
        await b.aclose()
    assert not _registered(fd)
    fresh: list[int] = []
    try:
        while len(fresh) < 16:  # a new fd with the old number (the lowest free ones)
            fresh += os.pipe()
            if fd in fresh:
                break
        assert fd in fresh
        peer = fresh[fresh.index(fd) + 1] if fresh.index(fd) % 2 == 0 else None
        if peer is None:  # the old number went to a write end: watch it for writing
            assert await wait_ready([], [fd], time.monotonic() + 5)
        else:
            os.write(peer, b"x")
            assert await wait_ready([fd], [], time.monotonic() + 5)  # watched: woken
    finally:
        a.close()
        for n in fresh:
            os.close(n)


async def test_a_dropped_channel_is_kept_until_its_registration_goes() -> None:
    """An idle registration holds the channel's core: the collector cannot close the fd
    under the selector; the peer's next message (or end) releases it."""
    import gc
    import weakref

    a, b = aio.pipe()
    await _echo_rounds(a, b, 1)
    core = weakref.ref(b._core)
    fd = b.fileno()
    del b
    gc.collect()
    assert core() is not None and _registered(fd)
    a.close()  # the end of the channel makes the fd readable: the registration goes
    for _ in range(100):
        await asyncio.sleep(0)
        if not _registered(fd):
            break
    assert not _registered(fd)
    leftover = core()
    if leftover is not None:  # (collected once nothing holds it; close it if not yet)
        leftover.close()


async def _pair(url: str | None) -> tuple[Any, Any, Any]:
    if url is None:
        a, b = aio.pipe()
        return a, b, None
    url = url.format(os.getpid())
    lst = aio.listen(url)
    accepted = asyncio.ensure_future(lst.accept(timeout=10))
    a = await aio.connect(url, timeout=10)
    return a, await accepted, lst


async def _close(a: Any, b: Any, lst: Any) -> None:
    await a.aclose()
    await b.aclose()
    if lst is not None:
        lst.close()


async def test_a_kept_registration_wakes_a_receive_only_for_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One wait per message in a ping-pong inside one loop: the loop's poll made before
    a task read its input must not wake that task's next wait for nothing."""
    from buzon.aio import _channel

    waits = 0
    original = _channel.wait_ready

    async def counting(*args: Any, **kwargs: Any) -> bool:
        nonlocal waits
        waits += 1
        return await original(*args, **kwargs)

    monkeypatch.setattr(_channel, "wait_ready", counting)
    a, b = aio.pipe()

    async def echo() -> None:
        while (x := await b.recv(timeout=5)) is not None:
            await b.send(x)

    task = asyncio.ensure_future(echo())
    try:
        for i in range(100):
            await a.send(i)
            assert await a.recv(timeout=5) == i
        await a.send(None)
        await task
        assert waits <= 200 + 2  # one per message each way (not two)
    finally:
        a.close()
        b.close()


def test_closing_from_another_thread_drops_the_registration_in_its_loop() -> None:
    import threading

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    async def make() -> tuple[Any, Any]:
        a, b = aio.pipe()
        await _echo_rounds(a, b, 2)
        return a, b

    async def registered(fd: int) -> bool:
        return _registered(fd)

    try:
        a, b = run(make())
        fd = b.fileno()
        assert run(registered(fd))
        b.close()  # from this thread, while the loop runs in the other
        assert not run(registered(fd))  # dropped in the loop's own thread
        a.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()

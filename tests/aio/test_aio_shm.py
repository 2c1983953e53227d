"""The asyncio driver on a ``shm:`` ring: a receive spins (bounded by ``spin`` and the
timeout) on the ring before it waits in the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import buzon
from buzon import aio


@pytest.fixture
async def shm_pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Any]]:
    """(asyncio end, blocking end in a thread's hands) of one ``shm:`` channel."""
    spin = getattr(request, "param", 5.0)
    url = f"shm:aio-spin-{os.getpid()}-{id(request)}"
    with aio.listen(url, spin=spin) as lst:
        peer: list[Any] = []
        t = threading.Thread(target=lambda: peer.append(buzon.connect(url, timeout=10)))
        t.start()
        ch = await lst.accept(timeout=10)
        while t.is_alive():
            await asyncio.sleep(0.001)
        t.join()
    try:
        yield ch, peer[0]
    finally:
        await ch.aclose()
        peer[0].close()


def _count_readers(loop: asyncio.AbstractEventLoop) -> list[int]:
    added: list[int] = []
    original = loop.add_reader

    def add_reader(fd: Any, callback: Any, *args: Any) -> None:
        added.append(fd)
        original(fd, callback, *args)

    loop.add_reader = add_reader  # type: ignore[method-assign]
    return added


async def test_a_message_arriving_while_recv_spins_is_taken_without_the_loop(
    shm_pair: tuple[Any, Any],
) -> None:
    ch, peer = shm_pair
    added = _count_readers(asyncio.get_running_loop())
    sent = threading.Event()

    def later() -> None:
        time.sleep(0.02)  # recv is spinning by now (spin=5 s, GIL released)
        peer.send_bytes(b"ping")
        sent.set()

    t = threading.Thread(target=later)
    t.start()
    try:
        assert await ch.recv_bytes(timeout=10) == b"ping"
    finally:
        t.join()
    assert sent.is_set()
    assert ch.fileno() not in added  # no add_reader: the spin found it
    await ch.send_bytes(b"pong")
    assert peer.recv_bytes(timeout=10) == b"pong"


async def test_the_spin_is_bounded_by_the_timeout(shm_pair: tuple[Any, Any]) -> None:
    ch, _ = shm_pair
    core = ch._core
    spun: list[float] = []
    spin = core.fast_spin

    def recording(seconds: float) -> bool:
        spun.append(seconds)
        return bool(spin(seconds))

    core.fast_spin = recording
    with pytest.raises(buzon.Timeout):
        await ch.recv_bytes(timeout=0.01)
    with pytest.raises(buzon.Timeout):
        await ch.recv(timeout=0)
    assert spun and max(spun) <= 0.01  # never the channel's 5 s


@pytest.mark.parametrize("shm_pair", [0.0], indirect=True)
async def test_spin_0_waits_in_the_loop_at_once(shm_pair: tuple[Any, Any]) -> None:
    ch, peer = shm_pair
    core = ch._core
    spun: list[float] = []
    core.fast_spin = lambda seconds: spun.append(seconds) or False
    task = asyncio.ensure_future(ch.recv(timeout=10))
    await asyncio.sleep(0.01)
    peer.send("hello")
    assert await task == "hello"
    assert spun == []
